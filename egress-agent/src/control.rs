//! Every change to the running policy goes through here: `policy apply`, `policy delete`,
//! `egress enable|disable` and SIGHUP. A change is parsed, validated and compiled completely
//! before anything is written; the datapath then switches to it in one step; a rejected change
//! leaves the previous policy fully in force. Changes are serialized (one lock around the
//! whole of each), logged with who asked and the new generation, and saved to the state file
//! so that a restart loses nothing.

mod check;

pub use check::Check;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use egress_common::{proto, MeshConfig};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    datapath::{
        bpf::{BpfError, Datapath},
        cgroups::{self, CgroupError, CgroupRoot},
        pod_addrs, pod_iface,
        podnet::{self, Pod, PodNetError},
    },
    policy::{self, CompileError, Compiled, Config, ConfigError, Live, ObjectRef, Store},
    telemetry::kernel::{KernelSnapshot, KernelSource},
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input: exit status 2 at the CLI.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{0}")]
    NotFound(String),
    /// A local change to a policy someone else manages (Kubernetes mode).
    #[error("{0}")]
    Managed(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    PodNet(#[from] PodNetError),
}

impl ControlError {
    /// Whether the caller's input was at fault (CLI exit status 2).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            Self::Invalid(_) | Self::Compile(_) | Self::NotFound(_) | Self::Managed(_)
        )
    }
}

/// What a change did.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub generation: u64,
    pub changed: bool,
    pub rules: usize,
    pub workloads: usize,
    pub entries: usize,
    pub enable_egress: bool,
    /// `egress enable|disable`: µs from the request's arrival to the kernel's switch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch_us: Option<u64>,
}

pub struct Control {
    pub root: CgroupRoot,
    pub agent_cgroup: u64,
    datapath: Arc<Mutex<Datapath>>,
    /// The live objects; held for the whole of a change, which serializes changes.
    store: Mutex<Store>,
    pub live: Arc<Live>,
    /// Writes the state file after every change, off the request path.
    saver: Option<crate::policy::saver::Saver>,
    /// Workloads whose cgroup someone else made (Kubernetes pods: the kubelet's), by name;
    /// the others are `<root>/<namespace>/<name>`, created by the agent.
    dirs: RwLock<BTreeMap<ObjectRef, PathBuf>>,
    /// Kubernetes mode: the policy comes from the API server, and cgroups below the root
    /// that are no workload (pods not enrolled) are refused.
    kubernetes: std::sync::atomic::AtomicBool,
    /// The pods (workloads with their own network namespace) of the policy in force.
    pods: tokio::sync::watch::Sender<Vec<Pod>>,
    /// What workloads' DNS taught the agent (set once at start).
    pub names: std::sync::OnceLock<Arc<crate::dns::Names>>,
    /// The port the DNS proxy serves (set once at start; see [`crate::dns::steered_port`]).
    pub dns_serving: std::sync::OnceLock<u16>,
    /// Kubernetes pods in a network namespace of their own (the CNI's): the tc backstop goes
    /// on the node side of their veth. By pod: (namespace identity, a path to it).
    pod_netns: RwLock<PodNamespaces>,
}

/// Kubernetes pods' own network namespaces: by pod, (the namespace's (device, inode), a path
/// to it).
pub type PodNamespaces = BTreeMap<ObjectRef, ((u64, u64), PathBuf)>;

impl Control {
    pub fn new(
        root: CgroupRoot,
        agent_cgroup: u64,
        datapath: Datapath,
        store: Store,
        live: Arc<Live>,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            root,
            agent_cgroup,
            datapath: Arc::new(Mutex::new(datapath)),
            store: Mutex::new(store),
            live,
            saver: state_file.map(crate::policy::saver::Saver::start),
            dirs: RwLock::default(),
            kubernetes: Default::default(),
            pods: tokio::sync::watch::channel(Vec::new()).0,
            names: std::sync::OnceLock::new(),
            dns_serving: std::sync::OnceLock::new(),
            pod_netns: RwLock::default(),
        }
    }

    /// Kubernetes mode: the pods' own network namespaces, for the next install; true when
    /// they changed (a pod got or lost one), which needs an install.
    pub fn set_pod_netns(&self, next: PodNamespaces) -> bool {
        let mut cur = self.pod_netns.write().unwrap_or_else(|e| e.into_inner());
        let same = cur.len() == next.len()
            && cur
                .iter()
                .zip(&next)
                .all(|((a, (x, _)), (b, (y, _)))| a == b && x == y);
        *cur = next;
        !same
    }

    /// Kubernetes mode: from the next install on, the kernel refuses (failMode closed) every
    /// cgroup below the root that is no workload, i.e. a pod not enrolled yet; local policy
    /// changes are refused (the API server's objects would undo them).
    pub fn set_kubernetes(&self, on: bool) {
        self.kubernetes
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn kubernetes(&self) -> bool {
        self.kubernetes.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn local_change(&self) -> Result<(), ControlError> {
        if self.kubernetes() {
            return Err(ControlError::Managed(
                "this agent runs in Kubernetes mode: change the MeshConfig and Egress objects (kubectl, or `egress-agent egress enable|disable --kubernetes`)".into(),
            ));
        }
        Ok(())
    }

    /// The cgroup directory of workload `w`.
    pub fn workload_dir(&self, w: &ObjectRef) -> PathBuf {
        let dirs = self.dirs.read().unwrap_or_else(|e| e.into_inner());
        dirs.get(w)
            .cloned()
            .unwrap_or_else(|| self.root.workload_dir(w))
    }

    /// Kubernetes mode: installs `cfg` (the node's pods and the policy objects, validated) as
    /// the live policy; `dirs` are the pods' kubelet cgroups, which must exist.
    pub fn replace_cluster(
        &self,
        next: Store,
        cfg: &Config,
        dirs: BTreeMap<ObjectRef, PathBuf>,
        who: &str,
        what: &str,
    ) -> Result<Applied, ControlError> {
        let store = self.store();
        let old = self.set_dirs(dirs);
        match self.install(cfg, &next, who, what) {
            Ok(applied) => {
                swap_store(store, next);
                Ok(applied)
            }
            Err(e) => {
                self.set_dirs(old);
                Err(e)
            }
        }
    }

    /// Sets the cgroups of the workloads the agent does not create (pods); returns the old.
    pub fn set_dirs(&self, dirs: BTreeMap<ObjectRef, PathBuf>) -> BTreeMap<ObjectRef, PathBuf> {
        std::mem::replace(
            &mut *self.dirs.write().unwrap_or_else(|e| e.into_inner()),
            dirs,
        )
    }

    /// The pods of the policy in force, updated by every change (the proxy opens a listener
    /// inside each).
    pub fn pods(&self) -> tokio::sync::watch::Receiver<Vec<Pod>> {
        self.pods.subscribe()
    }

    pub fn datapath(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mesh config the kernel gets for a compiled policy.
    pub fn mesh_config(&self, c: &Compiled, generation: u64, events_all: bool) -> MeshConfig {
        MeshConfig {
            generation,
            agent_cgroup_id: self.agent_cgroup,
            root_level: self.root.level,
            proxy_ip4: Ipv4Addr::LOCALHOST.octets(),
            proxy_ip6: Ipv6Addr::LOCALHOST.octets(),
            events_all: events_all as u32,
            refuse_unenrolled: self.kubernetes() as u32,
            dns_port: crate::dns::steered_port(c.config.dns_port, self.dns_serving.get()),
            ..c.config
        }
    }

    /// Compiles `cfg`, creates the cgroups of its workloads, and installs it as one switch.
    /// Used at start and by every change.
    pub fn install(
        &self,
        cfg: &Config,
        store: &Store,
        who: &str,
        what: &str,
    ) -> Result<Applied, ControlError> {
        let events_all = self.datapath().active()?.1.events_all != 0;
        self.install_with(cfg, store, who, what, events_all)
    }

    /// [`Control::install`], also choosing whether allowed connections produce flow events.
    pub fn install_with(
        &self,
        cfg: &Config,
        store: &Store,
        who: &str,
        what: &str,
        events_all: bool,
    ) -> Result<Applied, ControlError> {
        let t0 = std::time::Instant::now();
        let before = self.live.get().ids();
        let compiled = policy::compile_stable(cfg, &before)?;
        let compile_ms = t0.elapsed().as_millis() as u64;
        let mut cgroups = Vec::with_capacity(compiled.workloads.len());
        for (w, id) in &compiled.workloads {
            let known = self
                .dirs
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(w)
                .cloned();
            // A pod's cgroup is the kubelet's: never create it, only look it up.
            let cgroup = match known {
                Some(dir) => cgroups::cgroup_id(&dir)?,
                None => self.root.ensure(&self.root.workload_dir(w))?,
            };
            cgroups.push((cgroup, *id));
        }
        // Pods: their namespace and veth first, so the backstop's interface is known to the
        // policy set written below; the programs on it pass everything until that set is
        // in force.
        let pods = podnet::plan(cfg);
        let mut ifaces = Vec::with_capacity(pods.len());
        for p in &pods {
            let ifindex = podnet::ensure(p)?;
            let dir = self.root.workload_dir(&p.workload);
            if let Err(e) = podnet::tag_cgroup(&dir, &p.netns_path()) {
                warn!(pod = %p.workload, error = %e, "cannot mark the pod's cgroup with its network namespace; `exec` will not enter it");
            }
            if let Some((_, id)) = compiled.workloads.iter().find(|(w, _)| *w == p.workload) {
                cgroups.push((egress_common::IFACE_TAG | ifindex as u64, *id));
            }
            ifaces.push((p.host_if.clone(), ifindex, p.ip4, p.ip6));
        }
        // Kubernetes pods in the CNI's namespaces: the node side of their veth.
        let netns: Vec<_> = (self
            .pod_netns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter())
        .filter_map(|(w, (_, path))| {
            let id = compiled.workloads.iter().find(|(x, _)| x == w)?.1;
            Some((id, path.clone()))
        })
        .collect();
        for (id, i) in pod_iface::backstops(&netns) {
            cgroups.push((egress_common::IFACE_TAG | i.ifindex as u64, id));
            ifaces.push((i.host_if, i.ifindex, i.ip4, i.ip6));
        }
        let mut dp = self.datapath();
        for (name, ifindex, ip4, ip6) in &ifaces {
            // Before the set that judges the interface: the backstop's anti-spoof needs them.
            dp.set_pod_addrs(*ifindex, pod_addrs::pod_addrs(*ip4, *ip6))?;
            let report = dp.attach_tc(name, *ifindex)?;
            info!(interface = %name, ifindex, programs = %report.join(", "), "tc backstop");
        }
        for (w, id) in &compiled.workloads {
            if before.get(w) != Some(id) {
                dp.zero_counters(*id)?;
            }
        }
        let (_, cur) = dp.active()?;
        let generation = cur.generation + 1;
        let mesh = self.mesh_config(&compiled, generation, events_all);
        let old = dp.apply(&compiled, mesh, &cgroups)?;
        let keep: Vec<u32> = ifaces.iter().map(|(_, i, _, _)| *i).collect();
        dp.prune_tc(&keep);
        if let Err(e) = dp.prune_pod_addrs(&keep) {
            warn!(error = %e, "cannot forget the addresses of removed pods");
        }
        drop(dp);
        let gone: Vec<Pod> = self
            .pods
            .borrow()
            .iter()
            .filter(|p| !pods.iter().any(|n| n.netns == p.netns))
            .cloned()
            .collect();
        for p in &gone {
            podnet::remove(p);
            info!(pod = %p.workload, netns = %p.netns, "removed the pod's network");
        }
        self.pods.send_replace(pods);
        // The replaced set goes in the background, off the caller's path; the datapath lock
        // orders it with the next change, and retire() skips a set that is active again.
        let datapath = self.datapath.clone();
        std::thread::spawn(move || {
            // Until no program can still be reading it (a grace period, not a guess).
            if let Err(e) = crate::datapath::policy_maps::wait_for_readers() {
                warn!(error = %e, "cannot wait for the programs reading the replaced policy set");
            }
            let mut dp = datapath.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = dp.retire(old) {
                warn!(error = %e, "cannot delete the replaced policy set; the next change retries");
            }
            drop(dp);
            // The compile's and the switch's peak goes back to the system.
            crate::telemetry::trim::trim();
        });
        let switch_ms = t0.elapsed().as_millis() as u64 - compile_ms;
        let applied = summary(&compiled, generation, true);
        self.live.set(Arc::new(compiled));
        self.save(store);
        let total_ms = t0.elapsed().as_millis() as u64;
        info!(
            who,
            what,
            generation,
            rules = applied.rules,
            entries = applied.entries,
            compile_ms,
            switch_ms,
            total_ms,
            "policy applied"
        );
        Ok(applied)
    }

    /// Saves `store` as the state file; waits for the write (a change the caller was told
    /// of survives a crash).
    fn save(&self, store: &Store) {
        if let Some(s) = &self.saver {
            s.wait(s.submit(store.clone()));
        }
    }

    /// Waits until the state file holds the last change (at shutdown).
    pub fn flush_state(&self) {
        if let Some(s) = &self.saver {
            s.flush();
        }
    }

    /// `policy apply`: upserts the objects of `text` into the live set.
    pub fn apply(&self, text: &str, file: &str, who: &str) -> Result<Applied, ControlError> {
        self.local_change()?;
        let store = self.store();
        let add = Store::parse_fragment(text, file)?;
        let (next, cfg) = store.merge(&add, file)?;
        if next == *store {
            return Ok(summary(&self.live.get(), self.generation(), false));
        }
        let applied = self.install(&cfg, &next, who, &format!("apply {file}"))?;
        swap_store(store, next);
        Ok(applied)
    }

    /// `policy delete`: removes one Egress.
    pub fn delete(&self, id: &ObjectRef, who: &str) -> Result<Applied, ControlError> {
        self.local_change()?;
        let store = self.store();
        let (next, cfg) = store
            .without_egress(id)
            .ok_or_else(|| ControlError::NotFound(format!("no Egress {id}")))??;
        let applied = self.install(&cfg, &next, who, &format!("delete Egress {id}"))?;
        swap_store(store, next);
        Ok(applied)
    }

    /// SIGHUP: the policy file replaces the live set.
    pub fn replace(&self, text: &str, file: &str, who: &str) -> Result<Applied, ControlError> {
        self.local_change()?;
        let store = self.store();
        let (next, cfg) = Store::parse(text, file)?;
        let applied = self.install(&cfg, &next, who, &format!("reload {file}"))?;
        swap_store(store, next);
        Ok(applied)
    }

    /// `policy preview`: the policy `text` would make ([`Store::candidate`]), compiled with
    /// the workload ids in force; nothing changes.
    pub fn candidate(
        &self,
        text: &str,
        file: &str,
        replace: bool,
        kubernetes: bool,
    ) -> Result<Compiled, ControlError> {
        let add = Store::parse_fragment(text, file)?;
        let cfg = self.store().candidate(&add, file, replace, kubernetes)?;
        Ok(policy::compile_stable(&cfg, &self.live.get().ids())?)
    }

    /// `egress enable|disable`: the kernel's word first (one u32 of the policy in force),
    /// then the in-memory policy (its large parts shared, nothing parsed again), then the
    /// state file in the background. O(1) in the size of the policy. `arrived`: when the
    /// request came in (the log's `switch_us` is from then to the kernel's switch).
    pub fn set_enable_egress(
        &self,
        enable: bool,
        who: &str,
        arrived: std::time::Instant,
    ) -> Result<Applied, ControlError> {
        self.local_change()?;
        let mut store = self.store();
        let mesh = {
            let mut dp = self.datapath();
            let generation = dp.active()?.1.generation + 1;
            dp.set_enable_egress(enable, generation)?
        };
        let switch_us = arrived.elapsed().as_micros() as u64;
        let mut compiled = Compiled::clone(&self.live.get());
        compiled.config.enable_egress = enable as u32;
        let mut applied = summary(&compiled, mesh.generation, true);
        applied.switch_us = Some(switch_us);
        self.live.set(Arc::new(compiled));
        store.set_enable_egress(enable);
        if let Some(s) = &self.saver {
            s.submit(store.clone());
        }
        drop(store);
        info!(
            who,
            what = if enable {
                "egress enable"
            } else {
                "egress disable"
            },
            generation = mesh.generation,
            switch_us,
            total_us = arrived.elapsed().as_micros() as u64,
            "policy applied"
        );
        Ok(applied)
    }

    pub fn generation(&self) -> u64 {
        self.datapath()
            .active()
            .map(|(_, c)| c.generation)
            .unwrap_or(0)
    }
}

/// Makes `next` the live store, then frees the old one (a 100k-rule store is tens of MiB)
/// and gives the memory back, on a thread of its own: off the request path.
fn swap_store(mut store: std::sync::MutexGuard<'_, Store>, next: Store) {
    let old = std::mem::replace(&mut *store, next);
    drop(store);
    std::thread::spawn(move || {
        drop(old);
        crate::telemetry::trim::trim();
    });
}

fn summary(c: &Compiled, generation: u64, changed: bool) -> Applied {
    Applied {
        generation,
        changed,
        rules: c.rules.len(),
        workloads: c.workloads.len(),
        entries: c.v4.len() + c.v6.len(),
        enable_egress: c.config.enable_egress != 0,
        switch_us: None,
    }
}

impl Control {
    /// What the kernel counted, read through `dp` (the metrics' own handles on the pinned
    /// maps: the datapath lock is not taken).
    pub fn read_kernel(&self, dp: &mut Datapath) -> KernelSnapshot {
        let policy = self.live.get();
        let pods = self
            .pods
            .borrow()
            .iter()
            .map(|p| p.workload.clone())
            .collect();
        let mut ids: Vec<u32> = policy.workloads.iter().map(|(_, id)| *id).collect();
        // Workload id 0: the refusals of cgroups that are no workload (Kubernetes mode).
        let unenrolled = self.kubernetes().then_some(0);
        ids.extend(unenrolled);
        let sums = dp.counter_sums(&ids);
        let unenrolled = unenrolled.map(|w| {
            [proto::TCP, proto::UDP, proto::ANY].map(|p| {
                egress_common::Outcome::ALL
                    .iter()
                    .filter(|o| o.is_denied())
                    .filter_map(|o| sums.get(&(w, *o as u8, p)))
                    .sum()
            })
        });
        KernelSnapshot {
            tc: dp.tc_sums(&ids),
            sockets: dp.socket_refusals(&ids),
            packet_drops: dp.packet_drop_sums(&ids),
            entries: dp.map_fill(&policy),
            generation: dp.active().map(|(_, c)| c.generation).unwrap_or(0),
            sums,
            pods,
            policy,
            unenrolled,
        }
    }
}

impl KernelSource for Control {
    fn snapshot(&self) -> KernelSnapshot {
        self.read_kernel(&mut self.datapath())
    }
}
