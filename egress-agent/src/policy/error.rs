//! The error of every policy-shaped input (policy files, applied fragments, Kubernetes
//! objects, the gateway's file): one line naming the file, the object and the field.

/// An invalid policy file. Displays as one line.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {object}{sep}{field}: {reason}", sep = if field.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    /// `Kind namespace/name`, or `document N` when the kind or name is unknown.
    pub object: String,
    /// Dotted field path, empty when the whole object is at fault.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &str, object: &str, field: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            object: object.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// A file that cannot be read.
    pub fn unreadable(file: &str, e: &std::io::Error) -> Self {
        Self::new(file, "file", "", format!("cannot read: {e}"))
    }
}
