//! The flow history: what the workloads did, aggregated per (workload, destination address
//! and port, protocol, host the proxy saw), with first and last seen and a count. Bounded
//! (`run --history-size`): when full, the entries seen least recently make room. Saved to the
//! state directory (write, then rename) so that a restart keeps it; `flows --aggregate` shows
//! it and `policy preview` judges a candidate policy against it.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SIZE: usize = 100_000;

/// What makes two connections the same history entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    /// `namespace/name`.
    pub workload: String,
    pub ip: IpAddr,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// The SNI or Host the proxy read (proxied connections only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One history entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    #[serde(flatten)]
    pub key: FlowKey,
    /// Unix time, milliseconds.
    pub first_ms: u64,
    pub last_ms: u64,
    pub count: u64,
    /// The last verdict (`allow`, `passthrough`, `deny-rule`, `proxy`, `audit-rule`, ...).
    pub verdict: String,
    /// The Egress that decided it last (empty: none).
    #[serde(default)]
    pub rule: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: cannot read the flow history: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the flow history is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cannot save the flow history: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bounded, aggregated history.
pub struct History {
    size: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<FlowKey, FlowRecord>,
    /// Changed since the last save.
    dirty: bool,
}

impl History {
    /// An empty history of at most `size` entries (at least one).
    pub fn new(size: usize) -> Self {
        Self {
            size: size.max(1),
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `count` connections of one flow at `now_ms`, with their verdict and deciding rule.
    pub fn record(&self, key: FlowKey, now_ms: u64, count: u64, verdict: &str, rule: &str) {
        let mut inner = self.inner();
        inner.dirty = true;
        if let Some(r) = inner.entries.get_mut(&key) {
            r.last_ms = r.last_ms.max(now_ms);
            r.count += count;
            verdict.clone_into(&mut r.verdict);
            rule.clone_into(&mut r.rule);
            return;
        }
        if inner.entries.len() >= self.size {
            evict(&mut inner.entries, self.size);
        }
        let rec = FlowRecord {
            key: key.clone(),
            first_ms: now_ms,
            last_ms: now_ms,
            count,
            verdict: verdict.into(),
            rule: rule.into(),
        };
        inner.entries.insert(key, rec);
    }

    /// The entries last seen at or after `since_ms`, most recent first.
    pub fn since(&self, since_ms: u64) -> Vec<FlowRecord> {
        let mut out: Vec<FlowRecord> = self
            .inner()
            .entries
            .values()
            .filter(|r| r.last_ms >= since_ms)
            .cloned()
            .collect();
        out.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then(a.key.cmp(&b.key)));
        out
    }

    pub fn len(&self) -> usize {
        self.inner().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads a saved history (none at `path`: empty). Beyond `size`, the most recent stay.
    pub fn load(path: &Path, size: usize) -> Result<Self, HistoryError> {
        let h = Self::new(size);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(h),
            Err(source) => {
                return Err(HistoryError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut records: Vec<FlowRecord> =
            serde_json::from_str(&text).map_err(|source| HistoryError::Parse {
                path: path.into(),
                source,
            })?;
        records.sort_by_key(|r| std::cmp::Reverse(r.last_ms));
        records.truncate(h.size);
        h.inner().entries = records.into_iter().map(|r| (r.key.clone(), r)).collect();
        Ok(h)
    }

    /// Saves the history if it changed since the last save: written to a temporary file
    /// beside `path`, then renamed over it, so a crash leaves the old or the new one whole.
    pub fn save(&self, path: &Path) -> Result<bool, HistoryError> {
        let records = {
            let mut inner = self.inner();
            if !inner.dirty {
                return Ok(false);
            }
            inner.dirty = false;
            inner.entries.values().cloned().collect::<Vec<_>>()
        };
        let err = |source| HistoryError::Write {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(&records).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(true)
    }
}

/// How often a changed history is saved while the agent runs (and once when it stops).
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Saves the history every `period` while it changes, until the task is dropped.
pub async fn save_every(
    history: std::sync::Arc<History>,
    path: PathBuf,
    period: std::time::Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (h, p) = (history.clone(), path.clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || h.save(&p)).await {
            tracing::warn!(error = %e, "the flow history was not saved; retrying later");
        }
    }
}

/// Makes room for new entries: drops the eighth seen least recently (at least one), so a
/// full history pays for a sort once every `size / 8` new flows, not on each.
fn evict(entries: &mut HashMap<FlowKey, FlowRecord>, size: usize) {
    let mut by_age: Vec<(u64, FlowKey)> = entries
        .values()
        .map(|r| (r.last_ms, r.key.clone()))
        .collect();
    let drop = (size / 8).max(1).min(by_age.len());
    by_age.select_nth_unstable_by_key(drop - 1, |(t, _)| *t);
    for (_, k) in &by_age[..drop] {
        entries.remove(k);
    }
}

/// Default place of the history: beside the state file (`<name>.policy.yaml` ->
/// `<name>.flows.json`).
pub fn default_path(state_file: &Path) -> PathBuf {
    let name = state_file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("egress");
    let stem = name.strip_suffix(".policy.yaml").unwrap_or(name);
    state_file.with_file_name(format!("{stem}.flows.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(w: &str, port: u16, host: Option<&str>) -> FlowKey {
        FlowKey {
            workload: w.into(),
            ip: "127.0.0.1".parse().unwrap(),
            port,
            proto: egress_common::proto::TCP,
            host: host.map(String::from),
        }
    }

    #[test]
    fn aggregates_per_flow_and_keeps_first_and_last_seen() {
        let h = History::new(10);
        h.record(key("default/web", 80, None), 1000, 2, "allow", "default/a");
        h.record(
            key("default/web", 80, None),
            3000,
            1,
            "deny-rule",
            "default/d",
        );
        h.record(
            key("default/web", 443, Some("example.com")),
            2000,
            1,
            "allow",
            "",
        );
        let all = h.since(0);
        assert_eq!(all.len(), 2);
        let r = &all[0];
        assert_eq!((r.first_ms, r.last_ms, r.count), (1000, 3000, 3));
        assert_eq!(
            (r.verdict.as_str(), r.rule.as_str()),
            ("deny-rule", "default/d")
        );
        assert_eq!(h.since(2500).len(), 1);
    }

    #[test]
    fn bounded_by_dropping_the_least_recent() {
        let h = History::new(16);
        for p in 0..40u16 {
            h.record(key("default/web", p, None), 1000 + p as u64, 1, "allow", "");
        }
        assert!(h.len() <= 16);
        let ports: Vec<u16> = h.since(0).iter().map(|r| r.key.port).collect();
        assert_eq!(ports[0], 39, "the newest stays");
        assert!(ports.iter().all(|p| *p >= 40 - 16));
    }

    #[test]
    fn saved_and_loaded_whole() {
        let dir = std::env::temp_dir().join(format!("egress-history-{}", std::process::id()));
        let path = dir.join("x.flows.json");
        let h = History::new(10);
        h.record(
            key("default/web", 80, Some("a.example")),
            5,
            1,
            "proxy",
            "default/p",
        );
        assert!(h.save(&path).unwrap());
        assert!(!h.save(&path).unwrap(), "nothing new: not written again");
        let back = History::load(&path, 10).unwrap();
        assert_eq!(back.since(0), h.since(0));
        std::fs::write(&path, "[{").unwrap();
        let e = History::load(&path, 10).err().unwrap().to_string();
        assert!(e.contains("not valid"), "{e}");
        assert!(History::load(&dir.join("none"), 10).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_path_sits_beside_the_state_file() {
        assert_eq!(
            default_path(Path::new("/var/lib/egress/egress.policy.yaml")),
            Path::new("/var/lib/egress/egress.flows.json")
        );
    }
}
