//! cgroup v2 fixtures: the mount, a tree a test builds itself (a kubelet's, say), and
//! processes run as members of a cgroup.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{env, unique, CLIENT_PY};

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> PathBuf {
    env::mounted("cgroup2", None)
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

/// A cgroup tree a test builds itself (a kubelet's, for Kubernetes mode) under a dedicated
/// parent `<cgroup2 mount>/egress-test-PID-N`, removed deepest first when dropped.
pub struct CgroupTree {
    pub path: PathBuf,
}

impl CgroupTree {
    pub fn new() -> CgroupTree {
        let path = cgroup2_mount().join(unique("egress-test"));
        std::fs::create_dir(&path).expect("create the test cgroup parent");
        CgroupTree { path }
    }

    /// Creates `rel` (and its parents) below the tree's parent.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let dir = self.path.join(rel);
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        dir
    }
}

impl Default for CgroupTree {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.path);
    }
}

/// A command that runs `program ARGS...` as a member of cgroup `dir` (a shell writes its pid
/// into `cgroup.procs`, then execs).
pub fn in_cgroup(dir: &Path, program: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
        .arg(dir)
        .arg(program);
    cmd
}

/// Splits ` local=ADDR` off a client.py result line.
pub fn split_local(out: &str) -> (String, Option<std::net::SocketAddr>) {
    match out.rsplit_once(" local=") {
        Some((text, local)) => (text.to_string(), local.parse().ok()),
        None => (out.to_string(), None),
    }
}

/// Runs tests/e2e/client.py with `args` as a process of the cgroup `dir`; returns its
/// one-line verdict without the client's own address.
pub fn client_in_cgroup(dir: &Path, args: &[&str]) -> String {
    let out = in_cgroup(dir, "python3")
        .arg(CLIENT_PY)
        .args(args)
        .output()
        .expect("run client.py");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !text.is_empty(),
        "client {args:?} in {}: {}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    split_local(&text).0
}
