//! The admin API's wire format: one JSON request per line on a unix socket, answered with one
//! JSON line (`flows --follow`: a stream of them); and the client side of it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

pub const DEFAULT_SOCKET: &str = "/run/egress/admin.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    SetEgress {
        enable: bool,
    },
    Apply {
        file: String,
        text: String,
    },
    List,
    Delete {
        name: String,
    },
    Check {
        workload: String,
        destination: String,
        protocol: String,
    },
    Flows {
        follow: bool,
    },
    /// The flow history, entries last seen at or after `since_ms` (Unix ms).
    History {
        since_ms: u64,
    },
    /// `policy preview`: the history judged under the live policy and under `text`.
    Preview {
        file: String,
        text: String,
        replace: bool,
        /// The file holds CRD objects (sources may name pods of other nodes).
        #[serde(default)]
        kubernetes: bool,
        #[serde(default)]
        workload: Option<String>,
        since_ms: u64,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// One line, for stderr.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The caller's input was at fault (CLI exit status 2).
    #[serde(default)]
    pub invalid: bool,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            data: serde_json::to_value(data).unwrap_or_default(),
            ..Default::default()
        }
    }

    pub fn err(e: impl std::fmt::Display, invalid: bool) -> Self {
        Self {
            ok: false,
            error: e.to_string().replace('\n', " "),
            invalid,
            ..Default::default()
        }
    }
}

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub enable_egress: bool,
    pub fail_mode: &'static str,
    pub audit_mode: bool,
    pub generation: u64,
    pub rules: usize,
    pub workloads: Vec<WorkloadStatus>,
    pub map_entries: Vec<(String, usize)>,
    pub programs: Vec<String>,
    pub cgroup_root: String,
    pub proxy_port: u16,
    /// Socket kinds workloads may open beyond TCP/UDP/MPTCP (`spec.sockets`).
    pub sockets_allowed: Vec<&'static str>,
    /// Whether packet sockets are refused (needs the BPF LSM), and why not.
    pub packet_sockets: String,
}

#[derive(Debug, Serialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub id: u32,
    pub cgroup: String,
}

#[derive(Debug, Serialize)]
pub struct EgressRow {
    pub name: String,
    pub rule_id: u32,
    pub action: String,
    pub via: String,
    /// `enforce` or `audit`.
    pub mode: String,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
    pub ports: Vec<String>,
}

/// `DEST[:PORT]`: an IP, `ip:port` or `[v6]:port`; port 0 (any) when omitted.
pub fn parse_destination(s: &str) -> Result<(IpAddr, u16), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip(), a.port()));
    }
    s.parse::<IpAddr>()
        .map(|ip| (ip, 0))
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

/// Client side: sends one request and hands every response line to `each` until the agent
/// closes the connection (or `each` returns false).
pub async fn call(
    socket: &Path,
    req: &Request,
    mut each: impl FnMut(Response) -> bool,
) -> Result<(), ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ClientError::Unreachable(socket.to_path_buf(), e))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| ClientError::Unreachable(socket.to_path_buf(), e))?;
    let mut lines = BufReader::new(r).lines();
    let mut any = false;
    while let Some(l) = lines
        .next_line()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
    {
        any = true;
        let resp: Response =
            serde_json::from_str(&l).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if !each(resp) {
            break;
        }
    }
    if !any && !matches!(req, Request::Flows { .. }) {
        return Err(ClientError::Protocol(
            "the agent closed the connection without answering".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {0}: {1} (is `egress-agent run` running? see --admin-socket)"
    )]
    Unreachable(PathBuf, std::io::Error),
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
}
