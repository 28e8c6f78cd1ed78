//! One request to the running agent from the CLI, and the answer: a [`Failed`] verb carries
//! its one-line message and exit status.

use std::path::Path;

use serde_json::Value;

use super::protocol::{self, Request, Response};

/// A failed verb: the message (one line) and the exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    pub message: String,
    pub status: u8,
}

impl Failed {
    pub fn new(message: impl Into<String>, status: u8) -> Self {
        Self {
            message: message.into(),
            status,
        }
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(e.to_string(), 1))
}

/// The agent could not be asked (no socket, no answer): a runtime failure, exit status 1.
pub fn unreachable(e: protocol::ClientError) -> Failed {
    Failed::new(e.to_string(), 1)
}

/// One request, one answer.
pub fn ask(socket: &Path, req: Request) -> Result<Value, Failed> {
    let mut answer: Option<Response> = None;
    runtime()?
        .block_on(protocol::call(socket, &req, |r| {
            answer = Some(r);
            false
        }))
        .map_err(unreachable)?;
    let r = answer.ok_or_else(|| Failed::new("no answer from the agent", 1))?;
    if r.ok {
        Ok(r.data)
    } else {
        Err(Failed::new(r.error, if r.invalid { 2 } else { 1 }))
    }
}

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

pub fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}
