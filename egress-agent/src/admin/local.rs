//! The verbs that act on this node directly, without a running agent: `exec` (run a command
//! inside a workload) and `uninstall` (remove everything the agent installed).

use std::path::Path;

use anyhow::Context as _;

use crate::{
    datapath::{
        bpf,
        cgroups::{self, CgroupRoot},
        podnet,
    },
    policy::ObjectRef,
};

/// `egress-agent exec`: moves this process into the workload's cgroup and execs `cmd`.
pub fn exec(root: &Path, workload: &ObjectRef, cmd: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let root = CgroupRoot::new(root, true)?;
    let dir = root.existing_workload(workload)?;
    if let Some(netns) = podnet::netns_of_cgroup(&dir) {
        podnet::enter(&netns).with_context(|| {
            format!(
                "cannot enter the pod's network namespace {}",
                netns.display()
            )
        })?;
    }
    cgroups::move_pid(&dir, std::process::id())?;
    let (prog, args) = cmd.split_first().context("no command given")?;
    let err = std::process::Command::new(prog).args(args).exec();
    Err(err).with_context(|| format!("cannot run {prog:?}"))
}

/// `egress-agent uninstall`: removes pins (detaching the programs), the saved live policy, the
/// flow history beside it and empty cgroups.
pub fn uninstall(pin_dir: &Path, cgroup_root: &Path, state_file: &Path) -> anyhow::Result<()> {
    let removed = bpf::remove_pins(pin_dir);
    println!("removed {} pins under {}", removed.len(), pin_dir.display());
    let history = crate::telemetry::history::default_path(state_file);
    for f in [state_file, history.as_path()] {
        if std::fs::remove_file(f).is_ok() {
            println!("removed {}", f.display());
        }
    }
    if let Ok(root) = CgroupRoot::new(cgroup_root, false) {
        for netns in podnet::remove_tagged(&root.path) {
            println!("removed the network namespace {}", netns.display());
        }
        for b in root.remove_all() {
            println!("left {} in place: it still holds processes", b.display());
        }
    }
    Ok(())
}
