//! Test fixtures for egress, shared by the agent's unit tests and the end-to-end tests. Not
//! part of the product: a dev-dependency only, and it never depends on `egress-agent`.
//!
//! - [`fake_api`]: a FAKE Kubernetes API server (list/watch JSON over HTTP/1.1, on hyper).
//! - [`env`]: what an end-to-end test needs (root, cgroup v2, bpffs, tools); skipped
//!   locally when missing, a failure under `CI=true`.
//! - [`net`]: free ports, network namespaces, TCP/UDP servers, packet sniffers.
//! - [`cgroup`]: the cgroup v2 mount, cgroup trees a test builds, processes in a cgroup.
//! - [`process`]: daemons and processes stopped on drop, captured logs, temp dirs.
//! - [`wait_until`] and [`wait_until_async`]: waiting on a condition with a deadline, never
//!   a bare sleep.

pub mod cgroup;
pub mod env;
pub mod fake_api;
pub mod net;
pub mod process;

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

pub use fake_api::FakeApiServer;

/// tests/e2e/client.py: one TCP/UDP client, one result line.
pub const CLIENT_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/client.py");
/// tests/e2e/packets.py: raw packets and the sniffer.
pub const PACKETS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/packets.py");

/// How often a wait looks at its condition.
const POLL: Duration = Duration::from_millis(10);

/// Polls `condition` until it holds (true) or `within` has passed (false, after one last
/// look).
pub fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `f` until it gives a value or `within` has passed.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut got = None;
    wait_until(within, || {
        got = f();
        got.is_some()
    });
    got
}

/// [`wait_until`] for async tests: the runtime goes on between looks.
pub async fn wait_until_async(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `prefix-PID-N`, unique in this machine for this run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_when_the_condition_holds_or_at_the_deadline() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        let t = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(wait_for(Duration::from_secs(1), || Some(7)), Some(7));
        assert_ne!(unique("x"), unique("x"));
    }
}
