//! Workloads as cgroup v2 directories: `<cgroup root>/<namespace>/<name>`. The agent itself
//! runs in `<cgroup root>/_agent` (a name no Kubernetes namespace can have), and its sockets
//! are exempt by that cgroup's id.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::policy::ObjectRef;

pub const AGENT_CGROUP: &str = "_agent";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/mounts)")]
    NoCgroup2,
    #[error("{0} is not inside a cgroup v2 mount ({1})")]
    NotCgroup2(PathBuf, String),
    #[error("{0} is the root of the cgroup v2 hierarchy: attaching there would intercept the whole machine; pass --allow-root-cgroup to really do that")]
    RootRefused(PathBuf),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "workload {0} has no cgroup under {1} (is the agent running with this --cgroup-root?)"
    )]
    NoWorkload(ObjectRef, PathBuf),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The mount point of the cgroup v2 hierarchy (e.g. `/sys/fs/cgroup` or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts"), "read"))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(CgroupError::NoCgroup2)
}

/// The default `--cgroup-root`: `<cgroup2 mount>/egress`.
pub fn default_root() -> PathBuf {
    cgroup2_mount()
        .unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"))
        .join("egress")
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the directory's inode.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err(dir, "stat"))?.ino())
}

/// Moves process `pid` (all its threads) into the cgroup `dir`.
pub fn move_pid(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(io_err(&procs, "open"))?;
    f.write_all(pid.to_string().as_bytes())
        .map_err(io_err(&procs, "write"))
}

/// The cgroup v2 directory of process `pid`.
pub fn cgroup_of(pid: u32) -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(io_err(&path, "read"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoCgroup2)?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// The agent's cgroup root: where programs attach and workloads live.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    pub path: PathBuf,
    /// Depth below the cgroup v2 mount (the mount's root is level 0).
    pub level: u32,
}

impl CgroupRoot {
    /// Resolves `path`; refuses the hierarchy's root unless `allow_root`. Does not create it.
    pub fn new(path: &Path, allow_root: bool) -> Result<Self, CgroupError> {
        let mount = cgroup2_mount()?;
        let path = absolute(path);
        let rel = path
            .strip_prefix(&mount)
            .map_err(|_| CgroupError::NotCgroup2(path.clone(), mount.display().to_string()))?;
        let level = rel.components().count() as u32;
        if level == 0 && !allow_root {
            return Err(CgroupError::RootRefused(path));
        }
        Ok(Self { path, level })
    }

    pub fn workload_dir(&self, w: &ObjectRef) -> PathBuf {
        self.path.join(&w.namespace).join(&w.name)
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.path.join(AGENT_CGROUP)
    }

    /// Creates (or reuses) a cgroup directory below the root and returns its id.
    pub fn ensure(&self, dir: &Path) -> Result<u64, CgroupError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "mkdir"))?;
        cgroup_id(dir)
    }

    /// The existing cgroup of workload `w`.
    pub fn existing_workload(&self, w: &ObjectRef) -> Result<PathBuf, CgroupError> {
        let dir = self.workload_dir(w);
        if dir.join("cgroup.procs").exists() {
            Ok(dir)
        } else {
            Err(CgroupError::NoWorkload(w.clone(), self.path.clone()))
        }
    }

    /// Removes every empty cgroup below the root and then the root, deepest first. Cgroups
    /// that still hold processes are left (and reported), never killed.
    pub fn remove_all(&self) -> Vec<PathBuf> {
        let mut busy = Vec::new();
        remove_tree(&self.path, &mut busy);
        busy
    }
}

fn remove_tree(dir: &Path, busy: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path(), busy);
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            busy.push(dir.to_path_buf());
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    // Lexical normalisation: cgroupfs has no symlinks, and the path may not exist yet.
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}
