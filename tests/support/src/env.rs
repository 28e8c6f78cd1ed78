//! What an end-to-end test needs from its environment, and the one rule for a test that
//! cannot run: locally it prints `SKIPPED: <test>: <reason>` and returns; under `CI=true` it
//! fails with the reason, since CI's machine is meant to have everything.
//!
//! ```ignore
//! if !require(&[Need::Root, Need::Cgroup2, Need::Bpffs, Need::Tool("curl")]) {
//!     return;
//! }
//! ```

use std::{io::Write as _, path::Path};

/// One thing a test needs.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    Root,
    /// A cgroup v2 hierarchy mounted.
    Cgroup2,
    /// bpffs mounted on /sys/fs/bpf (pins).
    Bpffs,
    /// An executable: a name looked up in PATH, or an absolute path.
    Tool(&'static str),
}

impl Need {
    /// Why this need is not met, if it is not.
    pub fn missing(&self) -> Option<String> {
        match self {
            Need::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into()),
            Need::Cgroup2 => mounted("cgroup2", None)
                .is_none()
                .then(|| "needs a cgroup v2 hierarchy".into()),
            Need::Bpffs => mounted("bpf", Some("/sys/fs/bpf"))
                .is_none()
                .then(|| "needs bpffs mounted on /sys/fs/bpf".into()),
            Need::Tool(t) => (!tool_exists(t)).then(|| format!("needs the tool {t}")),
        }
    }
}

/// True when the `CI` environment variable is `true`.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// True when every need is met. Otherwise: under `CI=true`, panics naming what is missing;
/// locally, reports the test skipped (see [`skip`]) and returns false.
pub fn require(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    missing.is_empty() || skip(&missing.join("; "))
}

/// A test that cannot run for `reason`: under `CI=true` a panic; locally a
/// `SKIPPED: <test>: <reason>` line on the real stderr (visible even when the test harness
/// captures output) and false, for the test to return.
pub fn skip(reason: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    if in_ci() {
        panic!("{test} cannot run and CI=true, so it fails instead of skipping: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
    false
}

/// The mount point of the first mount of filesystem type `fstype` (at `at`, if given).
pub fn mounted(fstype: &str, at: Option<&str>) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == fstype && at.is_none_or(|a| a == f[1])).then(|| f[1].to_string())
    })
}

fn tool_exists(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let exec = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        return exec(Path::new(tool));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| exec(&d.join(tool)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_found_in_path_or_by_absolute_path() {
        assert!(Need::Tool("sh").missing().is_none());
        assert!(Need::Tool("/bin/sh").missing().is_none());
        let m = Need::Tool("no-such-tool-egress").missing().unwrap();
        assert_eq!(m, "needs the tool no-such-tool-egress");
        assert!(Need::Tool("/nonexistent/x").missing().is_some());
    }

    #[test]
    fn a_missing_need_skips_locally_and_fails_under_ci() {
        let r =
            std::panic::catch_unwind(|| require(&[Need::Root, Need::Tool("no-such-tool-egress")]));
        if in_ci() {
            let e = r.unwrap_err();
            let msg = e.downcast_ref::<String>().unwrap();
            assert!(
                msg.contains("CI=true") && msg.contains("no-such-tool-egress"),
                "{msg}"
            );
        } else {
            assert_eq!(r.ok(), Some(false));
        }
        assert!(std::panic::catch_unwind(|| require(&[Need::Tool("sh")])).unwrap());
    }
}
