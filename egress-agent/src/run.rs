//! `egress-agent run`: the standalone agent.
//!
//! Order matters: everything that can reject bad input (parse, validate, compile, the cgroup
//! root check) runs before anything on the machine changes; the maps are filled and the proxy
//! listens before the programs attach, so the first judged connect already sees the whole
//! policy and a live proxy.
//!
//! Enforcement outlives the agent: maps and links stay pinned when it stops or crashes (the
//! kernel keeps judging; redirected connections fail closed while the proxy is down). A new
//! agent on the same pins reuses them, keeps the attached programs when they are the same,
//! and resumes the saved live policy without a gap. `egress-agent uninstall` removes it all.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    admin::server as admin,
    control::Control,
    datapath::{
        bpf::{self, Datapath},
        cgroups::{self, CgroupRoot},
    },
    k8s,
    policy::{self, Live, Store},
    proxy::{self, inpod::serve_pods, metrics::ProxyMetrics, Proxy},
    telemetry::{
        audit::AuditMetrics,
        flows,
        history::{self, History},
        kernel::HostDenials,
        metrics::{self, Metrics},
        snapshot::Snapshots,
    },
};

pub struct RunOptions {
    pub config: PathBuf,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub allow_root_cgroup: bool,
    /// Node interfaces the node backstop (tc egress) runs on: `--node-interface`.
    pub node_interfaces: Vec<String>,
    /// A flow event for every judged connection, not only the refused/proxied/audited ones.
    pub all_flows: bool,
    /// The proxy relays in the kernel (sockmap) when the kernel takes the program.
    pub kernel_relay: bool,
    pub admin_socket: PathBuf,
    pub metrics_addr: std::net::SocketAddr,
    /// Where the live policy is saved after every change. Default: next to the pins' name
    /// under /var/lib/egress.
    pub state_file: Option<PathBuf>,
    /// Where the flow history is saved. Default: beside the state file.
    pub history_file: Option<PathBuf>,
    /// Entries the flow history keeps at most.
    pub history_size: usize,
    /// Kubernetes mode: the node's pods and the policy CRDs instead of `config`.
    pub kubernetes: Option<k8s::Options>,
}

/// The default state file of an agent using `pin_dir`.
pub fn default_state_file(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "egress".into());
    PathBuf::from("/var/lib/egress").join(format!("{name}.policy.yaml"))
}

/// Undoes what the agent process itself changed (not the enforcement), also on failure.
struct Leave {
    agent_home: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(home) = self.agent_home.take() {
            if let Err(e) = cgroups::move_pid(&home, std::process::id()) {
                warn!(error = %e, "cannot move the agent back to its cgroup");
            }
        }
        if let Some(s) = self.admin_socket.take() {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Each relayed connection holds two sockets (and two pipes while it moves bulk): allow as
/// many fds as the kernel lets a process have (`fs.nr_open`, up to 1M; root may raise its
/// hard limit), else the hard limit. The limit bounds each fd table, and each proxy thread
/// has its own (`proxy::fd_table`).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    if let Ok((cur, max)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if want > max && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
            return;
        }
        if cur < max {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, max, max);
        }
    }
}

/// Creates `<root>/_agent` (or reuses it: its id is the one the pinned policy exempts), makes
/// sure pinned policy sets exempt it, and moves this process into it. Returns its id.
fn enter_agent_cgroup(root: &CgroupRoot, pin_dir: &Path, leave: &mut Leave) -> anyhow::Result<u64> {
    root.ensure(&root.path)?;
    let agent_cgroup = root.ensure(&root.agent_dir())?;
    if crate::datapath::exempt::exempt_agent(pin_dir, agent_cgroup)? {
        warn!(cgroup = %root.agent_dir().display(), "the agent's cgroup was re-created: the pinned policy now exempts the new one");
    }
    // In a cgroup namespace of its own (a container's, the default with cgroup v2),
    // /proc/self/cgroup names no host path ("/"): then the agent stays in `_agent` when it
    // stops (it is exiting anyway) rather than moving to the hierarchy's root.
    let home = cgroups::cgroup_of(std::process::id())?;
    let named = home != cgroups::cgroup2_mount()?
        && !home
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    cgroups::move_pid(&root.agent_dir(), std::process::id())?;
    leave.agent_home = named.then_some(home);
    info!(cgroup = %root.agent_dir().display(), id = agent_cgroup, "in the agent's exempt cgroup");
    Ok(agent_cgroup)
}

/// The proxy's in-kernel relay, or None (logged once) when the kernel refuses it.
fn kernel_relay(dp: &mut Datapath) -> Option<Arc<crate::datapath::relay::KernelRelay>> {
    match dp.kernel_relay() {
        Ok(k) => {
            info!("proxy relay: in the kernel (sockmap stream verdict)");
            Some(Arc::new(k))
        }
        Err(e) => {
            warn!(error = %e, "proxy relay: the kernel refused the sockmap program; relaying by splice");
            None
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    crate::datapath::kernel_version::check()?;
    raise_fd_limit();
    let root = CgroupRoot::new(&opts.cgroup_root, opts.allow_root_cgroup)?;
    // Before anything changes: a node interface that does not exist is a typo.
    let node_ifaces = node_interfaces(&opts.node_interfaces)?;
    let state_file = opts
        .state_file
        .clone()
        .unwrap_or_else(|| default_state_file(&opts.pin_dir));
    // A policy file is parsed and validated before anything on the machine changes.
    let source = match &opts.kubernetes {
        Some(k) => Err(k),
        None => {
            let loaded = Store::load(&opts.config)?;
            policy::compile(&loaded.1)?;
            Ok(loaded)
        }
    };

    // The admin socket doubles as the lock: a second agent on it is refused here.
    let admin_listener = admin::bind(&opts.admin_socket).await?;
    let metrics_listener = metrics::bind(opts.metrics_addr).await?;
    let mut leave = Leave {
        agent_home: None,
        admin_socket: Some(opts.admin_socket.clone()),
    };
    // Into the exempt cgroup before any network I/O: on a restart or a rollout the pinned
    // programs still enforce (in Kubernetes mode refusing every cgroup below the root that is
    // no workload, such as this agent's own new pod), so the first connection to the API
    // server must already come from the exempt cgroup. `_agent` outlives the agent and its id
    // is in the pinned policy; exempt_agent covers a re-created one.
    let agent_cgroup = enter_agent_cgroup(&root, &opts.pin_dir, &mut leave)?;

    // Until the agent is set up (the first sync can wait long for the API server), the
    // endpoint says it is alive and not ready.
    let (stop_early, stopped) = tokio::sync::oneshot::channel();
    let early = tokio::spawn(metrics::serve_until(
        metrics_listener,
        Metrics::new(prometheus_client::registry::Registry::default()),
        stopped,
    ));

    // Kubernetes mode: the first sync of pods and policy objects stands in for the file.
    let mut cluster = None;
    let (file_store, file_cfg) = match source {
        Ok(loaded) => loaded,
        Err(k) => {
            let started = k8s::first_sync(k, &root.path, &state_file).await?;
            let r = &started.resolved;
            let loaded = (r.store.clone(), r.config.clone());
            cluster = Some(started);
            policy::compile(&loaded.1)?;
            loaded
        }
    };
    let dirs = cluster
        .as_ref()
        .map(|c| c.resolved.dirs.clone())
        .unwrap_or_default();

    let _ = stop_early.send(());
    let metrics_listener = early.await?;

    let (mut dp, reused) = Datapath::open(&opts.pin_dir)?;
    let kernel_logs = dp.logger();
    let orig = dp.orig_by_tuple()?;
    let kernel_relay = if opts.kernel_relay {
        kernel_relay(&mut dp)
    } else {
        info!("proxy relay: splice (--relay splice)");
        None
    };
    let events = dp.events()?;
    let (_, running) = dp.active()?;

    // Where to start: after a restart, the live policy saved by the previous run (it is what
    // the pinned maps hold); on a fresh install, the policy file.
    // (In Kubernetes mode the API server is the source of truth, and the first sync is.)
    let saved = if reused && state_file.exists() && cluster.is_none() {
        match Store::load(&state_file) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "ignoring the saved live policy; starting from the policy file");
                None
            }
        }
    } else {
        None
    };
    let resume = saved.is_some() && running.generation > 0;
    let (mut store, mut cfg) = saved.unwrap_or((file_store, file_cfg));
    // `egress enable|disable` switches the kernel first and saves after: a crash between the
    // two leaves the kernel's word newer than the state file, and it wins.
    let kernel_enable = running.enable_egress != 0;
    if resume && kernel_enable != cfg.mesh.traffic.enable_egress {
        info!(
            enable_egress = kernel_enable,
            "the pinned policy's enableEgress is newer than the state file; keeping it"
        );
        store.set_enable_egress(kernel_enable);
        cfg.mesh.traffic.enable_egress = kernel_enable;
    }
    // Workload ids scope policy entries and counters: keep the ones the kernel holds.
    let held = dp.workload_ids()?;
    let previous = cfg
        .workloads
        .iter()
        .filter_map(|w| {
            let dir = dirs
                .get(&w.id)
                .cloned()
                .unwrap_or_else(|| root.workload_dir(&w.id));
            let cg = cgroups::cgroup_id(&dir).ok()?;
            let id = held.iter().find(|(c, _)| *c == cg)?.1;
            Some((w.id.clone(), id))
        })
        .collect();
    let compiled = policy::compile_stable(&cfg, &previous)?;
    let live = Live::new(compiled.clone());
    let control = Arc::new(Control::new(
        root.clone(),
        agent_cgroup,
        dp,
        store.clone(),
        live.clone(),
        Some(state_file.clone()),
    ));
    control.set_dirs(dirs);
    if compiled.dns.enabled {
        // The DNS proxy opens on this port below (or the agent stops).
        let _ = control.dns_serving.set(compiled.dns.port.0);
    }
    control.set_kubernetes(cluster.is_some());
    // Pods are plugged in by an install (their namespaces are adopted when they exist), so a
    // policy with pods is installed again rather than resumed as it is.
    let has_pods = !crate::datapath::podnet::plan(&cfg).is_empty();
    if resume
        && !has_pods
        && running.events_all == opts.all_flows as u32
        && running.agent_cgroup_id == agent_cgroup
    {
        info!(
            generation = running.generation,
            "resuming the pinned policy"
        );
    } else {
        let what = if resume {
            "resume with new settings"
        } else {
            "start"
        };
        control.install_with(&cfg, &store, "startup", what, opts.all_flows)?;
    }

    let port = compiled.config.proxy_port;
    let listeners = proxy::bind(port).await.with_context(|| {
        format!("proxy cannot listen on 127.0.0.1:{port} (MeshConfig spec.proxy.port)")
    })?;
    let p = &cfg.mesh.proxy;
    // Each component registers its metrics; the kernel's come last.
    let mut registry = prometheus_client::registry::Registry::default();
    let host_denials = HostDenials::default();
    let proxy_metrics = Arc::new(ProxyMetrics::register(&mut registry, host_denials.clone()));
    let open = proxy_metrics.clone();
    let trimmer = crate::telemetry::trim::after_connection_peaks(move || open.active().get());
    let dns_metrics = crate::dns::metrics::DnsMetrics::register(&mut registry);
    let audit = AuditMetrics::register(&mut registry);
    let history_file = opts
        .history_file
        .clone()
        .unwrap_or_else(|| history::default_path(&state_file));
    let history = Arc::new(
        History::load(&history_file, opts.history_size).unwrap_or_else(|e| {
            warn!(error = %e, "starting with an empty flow history");
            History::new(opts.history_size)
        }),
    );
    let rejected = k8s::watch::RejectedMetrics::register(&mut registry);
    // The metrics read the kernel through their own handles on the pinned maps, on a thread
    // of their own: a scrape never holds the datapath that policy changes need.
    let (mut reader, _) = Datapath::open(&opts.pin_dir)?;
    let first = control.read_kernel(&mut reader);
    let c = control.clone();
    let snapshots = Snapshots::spawn(first, move || c.read_kernel(&mut reader))?;
    let metrics = Metrics::agent_snapshots(registry, snapshots, host_denials);
    let relay = Proxy::new(
        orig,
        live.clone(),
        proxy::Limits {
            max_connections: p.max_connections as usize,
            sniff_timeout: p.sniff_timeout.0,
            idle_timeout: p.idle_timeout.0,
            close_on_tighten: p.close_on_tighten,
            ..proxy::Limits::default()
        },
        proxy_metrics,
        (audit.clone(), history.clone()),
    );
    let names = crate::dns::Names::open(
        &control.datapath(),
        live.clone(),
        dns_metrics,
        Some(crate::dns::names_file(&state_file)),
    )?;
    relay.bind_names(names.clone());
    if let Some(k) = kernel_relay {
        relay.bind_kernel_relay(k);
    }
    if let Some(c) = &cluster {
        relay.bind_services(c.services.clone());
    }
    let _ = control.names.set(names.clone());
    // The DNS proxy on the node (host workloads) and inside every pod's namespace; in
    // Kubernetes mode too (cluster DNS at a Service IP or a node-local cache is steered like
    // any resolver the policy lets a pod reach).
    let dns_proxy = if compiled.dns.enabled {
        let port = compiled.dns.port.0;
        let (udp, tcp) = crate::dns::server::bind(port).await.with_context(|| {
            format!("DNS proxy cannot listen on 127.0.0.1:{port} (MeshConfig spec.dns.port)")
        })?;
        let server = crate::dns::server::DnsProxy::new(
            names.clone(),
            control.datapath().orig_by_tuple()?,
            compiled.dns.upstream_timeout.0,
        );
        Some((server, udp, tcp, port))
    } else {
        None
    };
    let mut programs = control
        .datapath()
        .attach(&root.path, !node_ifaces.is_empty())?;
    for (iface, ifindex) in &node_ifaces {
        let lines = control
            .datapath()
            .attach_node(iface, *ifindex)
            .with_context(|| {
                format!("--node-interface {iface}: cannot attach the node backstop")
            })?;
        programs.extend(lines);
    }
    let hub = flows::Hub::new(audit, history.clone());

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(relay.clone().serve(listeners));
    tasks.spawn(trimmer);
    tasks.spawn(names.clone().maintain());
    tasks.spawn(serve_pods(control.pods(), relay.clone(), port));
    // Kubernetes pods: their namespaces are the CNI's, found from their cgroups.
    let k8s_pods = tokio::sync::watch::channel(Vec::<k8s::watch::PodNetns>::new());
    if opts.kubernetes.is_some() {
        tasks.spawn(serve_pods(k8s_pods.1.clone(), relay.clone(), port));
    }
    if let Some((server, udp, tcp, dns_port)) = dns_proxy {
        tasks.spawn(server.clone().serve((udp, tcp), None));
        tasks.spawn(crate::dns::server::serve_pods(
            control.pods(),
            server.clone(),
            dns_port,
        ));
        if opts.kubernetes.is_some() {
            tasks.spawn(crate::dns::server::serve_pods(
                k8s_pods.1.clone(),
                server,
                dns_port,
            ));
        }
    }
    tasks.spawn(flows::run(events, live.clone(), hub.clone()));
    tasks.spawn(history::save_every(
        history.clone(),
        history_file.clone(),
        history::SAVE_EVERY,
    ));
    tasks.spawn(admin::serve(
        admin_listener,
        control.clone(),
        hub,
        programs.clone(),
    ));
    tasks.spawn(metrics::serve(metrics_listener, metrics.clone()));
    if let (Some(k), Some(started)) = (opts.kubernetes.clone(), cluster) {
        tasks.spawn(k8s::run(k, started, control.clone(), rejected, k8s_pods.0));
    }
    metrics.set_ready();
    if let Some(l) = kernel_logs {
        tasks.spawn(flows::forward_kernel_logs(l));
    }
    info!(
        config = %opts.config.display(),
        kubernetes = opts.kubernetes.as_ref().map(|k| k.node.as_str()).unwrap_or("no"),
        cgroup_root = %root.path.display(),
        pins = %bpf::versioned(&opts.pin_dir).display(),
        admin_socket = %opts.admin_socket.display(),
        metrics = %opts.metrics_addr,
        generation = control.generation(),
        programs = %programs.join(", "),
        workloads = compiled.workloads.len(),
        rules = compiled.rules.len(),
        enable_egress = live.get().config.enable_egress != 0,
        proxy_port = port,
        "ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => if opts.kubernetes.is_some() {
                info!("SIGHUP ignored: in Kubernetes mode the policy comes from the API server");
            } else {
                reload(&control, &opts.config).await
            },
        }
    }
    info!("stopping; the programs stay attached and keep enforcing the policy (`egress-agent uninstall` removes them)");
    tasks.shutdown().await;
    control.flush_state();
    if let Err(e) = history.save(&history_file) {
        warn!(error = %e, "the flow history of this run is lost");
    }
    drop(control);
    drop(leave);
    Ok(())
}

/// SIGHUP: the policy file replaces the live policy, if it is valid.
async fn reload(control: &Arc<Control>, path: &Path) {
    let c = control.clone();
    let path = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        c.replace(&text, &path.display().to_string(), "SIGHUP")
            .map_err(|e| e.to_string())
    })
    .await;
    match res {
        Ok(Ok(a)) => info!(generation = a.generation, "reloaded the policy file"),
        Ok(Err(e)) => warn!(error = %e, "reload refused; the previous policy stays in force"),
        Err(e) => warn!(error = %e, "reload failed"),
    }
}

/// Each `--node-interface` with its index (see `datapath::attach::NODE_PROGRAM`); one that
/// does not exist is an error.
fn node_interfaces(ifaces: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    ifaces
        .iter()
        .map(|i| {
            let index = nix::net::if_::if_nametoindex(i.as_str())
                .with_context(|| format!("--node-interface {i}: no such interface"))?;
            Ok((i.clone(), index))
        })
        .collect()
}
