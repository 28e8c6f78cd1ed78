//! `egress-agent run`: the standalone agent from start to a clean stop.
//!
//! Order matters: everything that can reject bad input (parse, validate, compile, the cgroup
//! root check) runs before anything on the machine changes; the maps are filled and the proxy
//! listens before the programs attach, so the first judged connect already sees the whole
//! policy and a live proxy.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use egress_common::MeshConfig;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    bpf::Datapath,
    config, flows, policy,
    proxy::{self, Proxy},
    workload::{self, CgroupRoot},
};

pub struct RunOptions {
    pub config: PathBuf,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub allow_root_cgroup: bool,
    /// A flow event for every judged connection, not only the refused/proxied/audited ones.
    pub all_flows: bool,
}

/// Undoes what `run` changed on the machine, also when it fails half-way.
struct Cleanup {
    root: CgroupRoot,
    agent_home: Option<PathBuf>,
    datapath: Option<Datapath>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dp) = self.datapath.take() {
            dp.remove();
        }
        if let Some(home) = self.agent_home.take() {
            if let Err(e) = workload::move_pid(&home, std::process::id()) {
                warn!(error = %e, "cannot move the agent back to its cgroup");
            }
        }
        for busy in self.root.remove_all() {
            warn!(cgroup = %busy.display(), "left in place: it still holds processes");
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = config::load(&opts.config)?;
    let compiled = policy::compile(&cfg)?;
    let root = CgroupRoot::new(&opts.cgroup_root, opts.allow_root_cgroup)?;

    let mut cleanup = Cleanup {
        root: root.clone(),
        agent_home: None,
        datapath: None,
    };
    root.ensure(&root.path)?;
    let agent_dir = root.agent_dir();
    let agent_cgroup = root.ensure(&agent_dir)?;
    let home = workload::cgroup_of(std::process::id())?;
    workload::move_pid(&agent_dir, std::process::id())?;
    cleanup.agent_home = Some(home);
    let dp = cleanup.datapath.insert(Datapath::load(&opts.pin_dir)?);
    let kernel_logs = dp.logger();

    let mut cgroups = Vec::with_capacity(compiled.workloads.len());
    for (w, id) in &compiled.workloads {
        cgroups.push((root.ensure(&root.workload_dir(w))?, *id));
    }
    let mesh = MeshConfig {
        generation: 1,
        agent_cgroup_id: agent_cgroup,
        root_level: root.level,
        proxy_ip4: Ipv4Addr::LOCALHOST.octets(),
        proxy_ip6: Ipv6Addr::LOCALHOST.octets(),
        events_all: opts.all_flows as u32,
        ..compiled.config
    };
    dp.apply(&compiled, mesh, &cgroups)?;

    let port = compiled.config.proxy_port;
    let listeners = proxy::bind(port).await.with_context(|| {
        format!("proxy cannot listen on 127.0.0.1:{port} (MeshConfig spec.proxy.port)")
    })?;
    let relay = Proxy::new(
        dp.orig_by_tuple()?,
        std::sync::Arc::new(compiled.clone()),
        proxy::Limits {
            max_connections: cfg.mesh.proxy.max_connections as usize,
            sniff_timeout: cfg.mesh.proxy.sniff_timeout.0,
            idle_timeout: cfg.mesh.proxy.idle_timeout.0,
            ..proxy::Limits::default()
        },
    );
    let events = dp.events()?;

    dp.attach(&root.path)?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(relay.clone().serve(listeners));
    tasks.spawn(flows::run(events, flows::Names::new(&compiled)));
    if let Some(l) = kernel_logs {
        tasks.spawn(flows::forward_kernel_logs(l));
    }

    info!(
        config = %opts.config.display(),
        cgroup_root = %root.path.display(),
        pins = %crate::bpf::versioned(&opts.pin_dir).display(),
        workloads = compiled.workloads.len(),
        rules = compiled.rules.len(),
        entries = compiled.v4.len() + compiled.v6.len(),
        enable_egress = compiled.config.enable_egress != 0,
        proxy_port = port,
        "ready"
    );
    wait_for_stop().await?;
    info!("stopping: detaching programs, removing pins and cgroups");
    tasks.shutdown().await;
    drop(cleanup);
    Ok(())
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `egress-agent exec`: moves this process into the workload's cgroup and execs `cmd`.
pub fn exec(root: &Path, workload: &config::ObjectRef, cmd: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let root = CgroupRoot::new(root, true)?;
    let dir = root.existing_workload(workload)?;
    workload::move_pid(&dir, std::process::id())?;
    let (prog, args) = cmd.split_first().context("no command given")?;
    let err = std::process::Command::new(prog).args(args).exec();
    Err(err).with_context(|| format!("cannot run {prog:?}"))
}

/// `egress-agent uninstall`: removes pins (detaching the programs) and empty cgroups.
pub fn uninstall(pin_dir: &Path, cgroup_root: &Path) -> anyhow::Result<()> {
    let removed = crate::bpf::remove_pins(pin_dir);
    println!("removed {} pins under {}", removed.len(), pin_dir.display());
    if let Ok(root) = CgroupRoot::new(cgroup_root, false) {
        let busy = root.remove_all();
        for b in &busy {
            println!("left {} in place: it still holds processes", b.display());
        }
    }
    Ok(())
}
