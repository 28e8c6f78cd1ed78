//! The one reader (and writer) of YAML: a file of `---`-separated documents becomes
//! [`Document`]s, objects whose kind and name are known and whose body is typed on demand
//! ([`Document::typed`]) with errors naming the file, the object and the field. Kubernetes
//! objects (JSON values) become the same [`Document`]s without any text in between.
//!
//! Every user of YAML goes through here: the policy parser, the live policy store, the
//! gateway's file and the Kubernetes view.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ConfigError;

/// Kinds without a namespace: errors name them `Kind name`, and the live policy keys them by
/// name alone.
const CLUSTER_SCOPED: [&str; 6] = [
    "MeshConfig",
    "EgressGateway",
    "GatewayServer",
    "Namespace",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
];

/// What the parser adds to a duplicate key error.
const DUPLICATE_ADVICE: &str = ", set DuplicateKeyPolicy in Options if acceptable";

/// (kind, namespace, name); cluster-scoped kinds have an empty namespace, namespaced ones
/// `default` when none is given.
pub type DocKey = (String, String, String);

/// One object of a YAML file (or one Kubernetes object), its header read.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Position in its file, from 1 (empty documents count, as a reader counts `---`).
    pub index: usize,
    pub kind: String,
    /// `metadata.name`, empty when missing (the typed body then says why).
    pub name: String,
    /// `metadata.namespace` as written.
    pub namespace: Option<String>,
    /// The whole document.
    pub body: Value,
}

/// Splits `text` into its documents (empty ones skipped), strictly: invalid YAML, duplicate
/// keys, or a document without a `kind` are errors naming `file` and `document N` (and the
/// line and column, for YAML errors).
pub fn documents(text: &str, file: &str) -> Result<Vec<Document>, ConfigError> {
    let options = serde_saphyr::options! {
        // One line per error (the default draws the offending line under it).
        with_snippet: false,
        // YAML 1.2: `yes`, `on` and friends are strings, not booleans.
        strict_booleans: true,
    };
    let docs: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let line = e.location().map_or(1, |l| l.line() as usize);
            let object = format!("document {}", document_at(text, line));
            // The parser's advice is for programmers, not for whoever wrote the file.
            let reason = e.to_string().replace(DUPLICATE_ADVICE, "");
            ConfigError::new(file, &object, "", reason)
        })?;
    docs.into_iter()
        .map(|d| {
            let index = document_at(text, d.referenced.line() as usize);
            Document::from_value(d.value, index, file)
        })
        .collect()
}

/// Which document of `text` line `line` (from 1) is in: a document starts at a `---` line, or
/// at the first content line of the file or after a `...`.
fn document_at(text: &str, line: usize) -> usize {
    let marker = |l: &str, m: &str| {
        l.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    };
    let (mut n, mut open) = (0, false);
    for l in text.lines().take(line.max(1)) {
        if marker(l, "---") {
            n += 1;
            open = true;
        } else if marker(l, "...") {
            open = false;
        } else if !open {
            // Outside a document, a directive or a comment starts none; content does.
            let t = l.trim();
            if !(t.is_empty() || t.starts_with('#') || t.starts_with('%')) {
                n += 1;
                open = true;
            }
        }
    }
    n.max(1)
}

impl Document {
    /// A document from a value (a YAML document, or a Kubernetes object's JSON).
    pub fn from_value(body: Value, index: usize, file: &str) -> Result<Document, ConfigError> {
        let err = |field: &str, reason: &str| {
            ConfigError::new(file, &format!("document {index}"), field, reason)
        };
        let kind = match body.get("kind") {
            Some(Value::String(k)) => k.clone(),
            Some(_) => return Err(err("kind", "must be a string")),
            None if body.is_object() => return Err(err("kind", "missing")),
            None => {
                return Err(err(
                    "",
                    "not an object (a mapping with kind, metadata and spec)",
                ))
            }
        };
        let meta = |f: &str| {
            body.get("metadata")
                .and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Ok(Document {
            index,
            name: meta("name").unwrap_or_default(),
            namespace: meta("namespace"),
            kind,
            body,
        })
    }

    /// Documents from values, numbered from 1.
    pub fn from_values(
        values: impl IntoIterator<Item = Value>,
        file: &str,
    ) -> Result<Vec<Document>, ConfigError> {
        let numbered = values.into_iter().enumerate();
        numbered
            .map(|(i, v)| Document::from_value(v, i + 1, file))
            .collect()
    }

    pub fn cluster_scoped(&self) -> bool {
        CLUSTER_SCOPED.contains(&self.kind.as_str())
    }

    /// How errors name it: `Egress ns/name`, `MeshConfig name`, `Workload (document 3)`.
    pub fn label(&self) -> String {
        let k = &self.kind;
        match self.key() {
            (_, _, name) if name.is_empty() => format!("{k} (document {})", self.index),
            (_, ns, name) if ns.is_empty() => format!("{k} {name}"),
            (_, ns, name) => format!("{k} {ns}/{name}"),
        }
    }

    /// What identifies it among the objects of a policy.
    pub fn key(&self) -> DocKey {
        let ns = match &self.namespace {
            _ if self.cluster_scoped() => String::new(),
            Some(ns) if !ns.is_empty() => ns.clone(),
            _ => "default".into(),
        };
        (self.kind.clone(), ns, self.name.clone())
    }

    /// The body as `T`, strictly; an error names `file`, this object and the field path.
    pub fn typed<T: DeserializeOwned>(&self, file: &str) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(&self.body).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            ConfigError::new(file, &self.label(), &field, e.into_inner().to_string())
        })
    }
}

/// Documents as a YAML file: each one after a `---` line.
pub fn to_yaml<'a>(docs: impl IntoIterator<Item = &'a Value>) -> String {
    let mut out = String::new();
    for v in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(v).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_numbered_as_written() {
        let text = "\nkind: A\nmetadata: {name: a}\n---\n---\n# c\nkind: B\n---\n--- {kind: C, metadata: {name: c, namespace: x}}\n...\nkind: D\n";
        let docs = documents(text, "f").unwrap();
        let got: Vec<_> = docs.iter().map(|d| (d.index, d.label())).collect();
        assert_eq!(
            got,
            [
                (1, "A default/a".to_string()),
                (3, "B (document 3)".into()),
                (5, "C x/c".into()),
                (6, "D (document 6)".into()),
            ]
        );
        let e = documents("kind: A\n---\nkind: B\nmetadata: {name: x\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.yaml: document 2: "), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let e = documents("a: 1\na: 2\n", "f").unwrap_err().to_string();
        assert_eq!(
            e,
            "f: document 1: duplicate mapping key: a at line 2, column 1"
        );
        let e = documents("metadata: {name: a}\n", "f")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "f: document 1: kind: missing");
        let e = documents("kind: 3\n", "f").unwrap_err().to_string();
        assert_eq!(e, "f: document 1: kind: must be a string");
    }

    #[test]
    fn yaml_1_2_scalars_and_a_round_trip() {
        let docs = documents("kind: K\nspec: {a: yes, b: on, c: 443, d: \"443\"}\n", "f").unwrap();
        let spec = &docs[0].body["spec"];
        assert_eq!(spec["a"], "yes");
        assert_eq!(spec["b"], "on");
        assert_eq!(spec["c"], 443);
        assert_eq!(spec["d"], "443");
        let text = to_yaml(docs.iter().map(|d| &d.body));
        let again = documents(&text, "f").unwrap();
        assert_eq!(again[0].body, docs[0].body);
    }
}
