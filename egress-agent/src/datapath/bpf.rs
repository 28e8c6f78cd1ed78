//! The eBPF datapath: load the object, fill the maps from a compiled policy, attach the
//! programs to the cgroup root through bpf links, and pin maps and links under
//! `<pin dir>/v<LAYOUT_VERSION>/`.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::FdLink,
        links::PinnedLink,
        tc::{NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError,
        SchedClassifier, SockOps, TcAttachType,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use egress_common::{
    mesh_key, names, tc::TcCount, workload_key, MeshConfig, MeshKeyV4, MeshKeyV6, OrigDst, OrigKey,
    PolicyKeyV4, PolicyKeyV6, PolicyValue, WorkloadInfo, IFACE_TAG, LAYOUT_VERSION,
};

use crate::policy::Compiled;

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The programs, in the order they are attached.
pub const PROGRAMS: [&str; 8] = [
    "egress_sockops",
    PACKET_PROGRAM,
    "egress_getpeername4",
    "egress_getpeername6",
    "egress_sendmsg4",
    "egress_sendmsg6",
    "egress_connect4",
    "egress_connect6",
];

/// The per-packet `cgroup_skb/egress` program.
pub const PACKET_PROGRAM: &str = "egress_skb_egress";

/// Set (to anything but 0) in the agent's environment: run without the per-packet program
/// (the benchmark compares the two; not for production).
pub const NO_PACKET_PROGRAM_ENV: &str = "EGRESS_NO_PACKET_PROGRAM";

fn packet_program_disabled() -> bool {
    std::env::var(NO_PACKET_PROGRAM_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The tc backstop: (program, hook on the host side of a workload's veth, pin suffix).
pub const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("egress_tc_from_workload", TcAttachType::Ingress, "from"),
    ("egress_tc_to_workload", TcAttachType::Egress, "to"),
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: the pins in {dir} have another layout ({detail}): remove them with `egress-agent uninstall` (enforcement stops) or use another --pin-dir")]
    Incompatible {
        map: &'static str,
        dir: PathBuf,
        detail: String,
    },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> BpfError + 'a {
    move |source| BpfError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// The versioned directory below a pin root.
pub fn versioned(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{LAYOUT_VERSION}"))
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
fn ensure_bpffs(pin_root: &Path) -> Result<(), BpfError> {
    if !pin_root.starts_with("/sys/fs/bpf") {
        return Ok(());
    }
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(io(Path::new("/proc/mounts"), "read"))?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if !mounted {
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| BpfError::Io {
            path: "/sys/fs/bpf".into(),
            op: "mount bpffs",
            source: e.into(),
        })?;
    }
    Ok(())
}

/// A loaded datapath. Dropping it without [`Datapath::remove`] leaves the pinned links
/// attached and the maps pinned (enforcement survives the agent).
pub struct Datapath {
    ebpf: Ebpf,
    /// Policy sets known to hold no entries (so an apply need not walk the maps to clear
    /// them). Unknown after a restart.
    clean: [bool; 2],
    pin_root: PathBuf,
    dir: PathBuf,
    links: Vec<PinnedLink>,
}

impl Datapath {
    /// Loads the object with its maps pinned under `<pin_root>/v<layout>/maps`. Maps pinned
    /// there by an earlier run (a restart, or a crash) are reused after their layout is checked,
    /// so the policy, the generation and the original destinations survive. Returns whether
    /// pins were reused.
    pub fn open(pin_root: &Path) -> Result<(Self, bool), BpfError> {
        ensure_bpffs(pin_root)?;
        let dir = versioned(pin_root);
        let maps_dir = dir.join("maps");
        let reused = maps_dir.join(names::ACTIVE).exists();
        if reused {
            check_layout(&maps_dir)?;
        }
        fs::create_dir_all(&maps_dir).map_err(io(&maps_dir, "mkdir"))?;
        let paths: Vec<(&'static str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT)?;
        Ok((
            Self {
                ebpf,
                clean: [!reused, !reused],
                pin_root: pin_root.to_path_buf(),
                dir,
                links: Vec::new(),
            },
            reused,
        ))
    }

    /// Starts forwarding the programs' aya-log records to the `log` crate (and so to tracing).
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// The policy set the programs read now, and its mesh config.
    pub fn active(&mut self) -> Result<(u32, MeshConfig), BpfError> {
        let a: Array<_, u32> = self.map(names::ACTIVE)?;
        let set = a.get(&0, 0).map_err(map_err(names::ACTIVE))? & 1;
        let c: Array<_, MeshConfig> = self.map(names::CONFIG)?;
        let cfg = c.get(&set, 0).map_err(map_err(names::CONFIG))?;
        Ok((set, cfg))
    }

    /// Installs a whole policy atomically: writes it into the inactive set and flips
    /// `EGRESS_ACTIVE` (from then on every connect sees the new policy, before it every
    /// connect saw the old one whole). On an error before the flip the old policy stays in
    /// force untouched. Returns the set it replaced: [`Datapath::retire`] deletes it.
    pub fn apply(
        &mut self,
        c: &Compiled,
        cfg: MeshConfig,
        workload_cgroups: &[(u64, u32)],
    ) -> Result<u32, BpfError> {
        let (cur, _) = self.active()?;
        let next = cur ^ 1;
        if !self.clean[next as usize] {
            self.clear_set(next)?;
        }
        self.clean[next as usize] = false;
        if let Err(e) = self.write_set(next, c, cfg, workload_cgroups) {
            let _ = self.clear_set(next);
            return Err(e);
        }
        let mut a: Array<_, u32> = self.map(names::ACTIVE)?;
        a.set(0, next, 0).map_err(map_err(names::ACTIVE))?;
        Ok(cur)
    }

    /// Deletes the entries of a replaced policy set, unless it became the active one again
    /// meanwhile. Call it a moment after [`Datapath::apply`]: a program that read the old set
    /// number just before the flip finishes within microseconds.
    pub fn retire(&mut self, set: u32) -> Result<(), BpfError> {
        if self.active()?.0 != set {
            self.clear_set(set)?;
        }
        Ok(())
    }

    /// Changes only `enableEgress` of the policy in force (one aligned u32 in place, no
    /// rebuild): the toggle takes effect on the very next connect.
    pub fn set_enable_egress(
        &mut self,
        enable: bool,
        generation: u64,
    ) -> Result<MeshConfig, BpfError> {
        let (set, mut cfg) = self.active()?;
        cfg.enable_egress = enable as u32;
        cfg.generation = generation;
        let mut c: Array<_, MeshConfig> = self.map(names::CONFIG)?;
        c.set(set, cfg, 0).map_err(map_err(names::CONFIG))?;
        Ok(cfg)
    }

    fn write_set(
        &mut self,
        set: u32,
        c: &Compiled,
        cfg: MeshConfig,
        workload_cgroups: &[(u64, u32)],
    ) -> Result<(), BpfError> {
        let mut m: Array<_, MeshConfig> = self.map(names::CONFIG)?;
        m.set(set, cfg, 0).map_err(map_err(names::CONFIG))?;

        let mut w: HashMap<_, u64, WorkloadInfo> = self.map(names::WORKLOADS)?;
        for &(cg, id) in workload_cgroups {
            w.insert(workload_key(cg, set), WorkloadInfo { id, _pad0: 0 }, 0)
                .map_err(map_err(names::WORKLOADS))?;
        }

        let v4 =
            c.v4.iter()
                .map(|e| (Key::new(e.key_len(), e.key(set)), e.value));
        insert_all::<PolicyKeyV4, PolicyValue>(self.map(names::POLICY_V4)?, names::POLICY_V4, v4)?;
        let v6 =
            c.v6.iter()
                .map(|e| (Key::new(e.key_len(), e.key(set)), e.value));
        insert_all::<PolicyKeyV6, PolicyValue>(self.map(names::POLICY_V6)?, names::POLICY_V6, v6)?;

        let mesh = |c: &crate::policy::Cidr| 8 + c.len as u32;
        let m4 = c.mesh.iter().filter_map(|c| match c.addr {
            std::net::IpAddr::V4(a) => Some((Key::new(mesh(c), mesh_key(set, &a.octets())), 1)),
            _ => None,
        });
        insert_all::<MeshKeyV4, u32>(self.map(names::MESH_V4)?, names::MESH_V4, m4)?;
        let m6 = c.mesh.iter().filter_map(|c| match c.addr {
            std::net::IpAddr::V6(a) => Some((Key::new(mesh(c), mesh_key(set, &a.octets())), 1)),
            _ => None,
        });
        insert_all::<MeshKeyV6, u32>(self.map(names::MESH_V6)?, names::MESH_V6, m6)?;
        Ok(())
    }

    /// Deletes every entry of policy set `set`.
    fn clear_set(&mut self, set: u32) -> Result<(), BpfError> {
        self.clean[set as usize & 1] = false;
        let mut w: HashMap<_, u64, WorkloadInfo> = self.map(names::WORKLOADS)?;
        let keys: Vec<u64> = w
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k >> 63 == set as u64)
            .collect();
        for k in keys {
            w.remove(&k).map_err(map_err(names::WORKLOADS))?;
        }
        clear_trie::<PolicyKeyV4, PolicyValue>(
            self.map(names::POLICY_V4)?,
            names::POLICY_V4,
            |k| (k[0] >> 7) as u32 == set,
        )?;
        clear_trie::<PolicyKeyV6, PolicyValue>(
            self.map(names::POLICY_V6)?,
            names::POLICY_V6,
            |k| (k[0] >> 7) as u32 == set,
        )?;
        clear_trie::<MeshKeyV4, u32>(self.map(names::MESH_V4)?, names::MESH_V4, |k| {
            k[0] as u32 == set
        })?;
        clear_trie::<MeshKeyV6, u32>(self.map(names::MESH_V6)?, names::MESH_V6, |k| {
            k[0] as u32 == set
        })?;
        self.clean[set as usize & 1] = true;
        Ok(())
    }

    /// The (cgroup id, workload id) pairs of the policy set in force.
    pub fn workload_ids(&mut self) -> Result<Vec<(u64, u32)>, BpfError> {
        let (set, _) = self.active()?;
        let w: HashMap<_, u64, WorkloadInfo> = self.map(names::WORKLOADS)?;
        Ok(w.iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k >> 63 == set as u64 && k & IFACE_TAG == 0)
            .map(|(k, v)| (k & !(1 << 63), v.id))
            .collect())
    }

    /// Zeroes the counters of a workload id, before it is given to a new workload.
    pub fn zero_counters(&mut self, workload_id: u32) -> Result<(), BpfError> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            op: "read",
            source: e,
        })?;
        let mut c: PerCpuArray<_, u64> = self.map(names::COUNTERS)?;
        let first = egress_common::counter_index(workload_id, 0, 0);
        for i in first..first + egress_common::COUNTER_SLOTS {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]).map_err(io(
                Path::new("/sys/devices/system/cpu/possible"),
                "per-CPU values",
            ))?;
            c.set(i, zeros, 0).map_err(map_err(names::COUNTERS))?;
        }
        let mut t: PerCpuArray<_, TcCount> = self.map(names::TC_COUNTERS)?;
        let first = egress_common::tc::tc_index(workload_id, 0);
        for i in first..first + egress_common::tc::TC_SLOTS {
            let zeros =
                aya::maps::PerCpuValues::try_from(vec![TcCount::default(); ncpu]).map_err(io(
                    Path::new("/sys/devices/system/cpu/possible"),
                    "per-CPU values",
                ))?;
            t.set(i, zeros, 0).map_err(map_err(names::TC_COUNTERS))?;
        }
        let mut d: PerCpuArray<_, u64> = self.map(names::PACKET_DROPS)?;
        let first = egress_common::skb::skb_index(workload_id, 0);
        for i in first..first + egress_common::skb::SKB_SLOTS {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]).map_err(io(
                Path::new("/sys/devices/system/cpu/possible"),
                "per-CPU values",
            ))?;
            d.set(i, zeros, 0).map_err(map_err(names::PACKET_DROPS))?;
        }
        Ok(())
    }

    /// Packets the per-packet program dropped, summed over the CPUs, by (workload id, drop
    /// slot: a denying outcome or `egress_common::skb::DROP_*`). Zero slots are left out.
    pub fn packet_drop_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8), u64> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, u64>>(names::PACKET_DROPS) else {
            return out;
        };
        for &w in workloads {
            for slot in 0..egress_common::skb::SKB_SLOTS as u8 {
                if egress_common::skb::skb_drop_reason(slot).is_none() {
                    continue;
                }
                if let Ok(v) = c.get(&egress_common::skb::skb_index(w, slot), 0) {
                    let n: u64 = v.iter().sum();
                    if n > 0 {
                        out.insert((w, slot), n);
                    }
                }
            }
        }
        out
    }

    /// The tc backstop's counters of the given workloads, summed over the CPUs, keyed by
    /// (workload id, slot): (packets, bytes). Slots with nothing counted are left out.
    pub fn tc_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8), (u64, u64)> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, TcCount>>(names::TC_COUNTERS) else {
            return out;
        };
        for &w in workloads {
            for slot in 0..egress_common::tc::TC_SLOTS as u8 {
                if let Ok(v) = c.get(&egress_common::tc::tc_index(w, slot), 0) {
                    let (p, b) = v
                        .iter()
                        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                    if p > 0 {
                        out.insert((w, slot), (p, b));
                    }
                }
            }
        }
        out
    }

    /// Every counter of the given workloads, summed over the CPUs, keyed by (workload id,
    /// outcome or [`egress_common::EVENT_LOST`], protocol TCP/UDP/ANY).
    pub fn counter_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8, u8), u64> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, u64>>(names::COUNTERS) else {
            return out;
        };
        let slots = egress_common::Outcome::ALL
            .iter()
            .map(|o| *o as u8)
            .chain([egress_common::EVENT_LOST]);
        let slots: Vec<u8> = slots.collect();
        for &w in workloads {
            for &o in &slots {
                for p in [
                    egress_common::proto::TCP,
                    egress_common::proto::UDP,
                    egress_common::proto::ANY,
                ] {
                    let i = egress_common::counter_index(w, o, p);
                    if let Ok(v) = c.get(&i, 0) {
                        out.insert((w, o, p), v.iter().sum());
                    }
                }
            }
        }
        out
    }

    /// (map, entries, capacity) for the metrics. Policy entries are known from the policy
    /// in force; the LRU maps are counted.
    pub fn map_fill(&mut self, policy: &Compiled) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        let known = [
            (names::WORKLOADS, policy.workloads.len()),
            (names::POLICY_V4, policy.v4.len()),
            (names::POLICY_V6, policy.v6.len()),
        ];
        for (name, n) in known {
            if let Some(cap) = self
                .ebpf
                .map(name)
                .and_then(map_data)
                .and_then(|d| d.info().ok())
            {
                out.push((name, n, cap.max_entries()));
            }
        }
        if let Ok(m) = self.map::<HashMap<_, OrigKey, OrigDst>>(names::ORIG_BY_TUPLE) {
            let n = m.keys().count();
            out.push((names::ORIG_BY_TUPLE, n, egress_common::capacity::ORIG_DST));
        }
        if let Ok(m) = self.map::<HashMap<_, u64, OrigDst>>(names::ORIG_BY_COOKIE) {
            let n = m.keys().count();
            out.push((names::ORIG_BY_COOKIE, n, egress_common::capacity::ORIG_DST));
        }
        out
    }

    /// Entries per map, for `status`.
    pub fn map_entries(&mut self) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        if let Ok(w) = self.map::<HashMap<_, u64, WorkloadInfo>>(names::WORKLOADS) {
            out.push((names::WORKLOADS, w.keys().count()));
        }
        if let Ok(t) = self.map::<LpmTrie<_, PolicyKeyV4, PolicyValue>>(names::POLICY_V4) {
            out.push((names::POLICY_V4, t.keys().count()));
        }
        if let Ok(t) = self.map::<LpmTrie<_, PolicyKeyV6, PolicyValue>>(names::POLICY_V6) {
            out.push((names::POLICY_V6, t.keys().count()));
        }
        out
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let m = self.ebpf.map_mut(name).ok_or(BpfError::Missing(name))?;
        T::try_from(m).map_err(map_err(name))
    }

    /// Loads every program and makes sure it is attached to `cgroup` through a pinned bpf
    /// link (links stack with other programs and a sub-cgroup cannot override them). A link
    /// pinned by an earlier run that runs the same program is kept as it is: enforcement has
    /// no gap across restarts. A link running another program (an upgrade) is replaced only
    /// after the new one is attached. Pins of older layout versions go last. On a failure,
    /// the links this call attached are removed again and the earlier ones stay.
    pub fn attach(&mut self, cgroup: &Path) -> Result<Vec<String>, BpfError> {
        let mut report = Vec::new();
        let res = self.try_attach(cgroup, &mut report);
        if res.is_err() {
            for l in self.links.drain(..) {
                let _ = l.unpin();
            }
        } else {
            self.links.clear(); // committed: the pins own the links now
            retire_old_versions(&self.pin_root);
        }
        res.map(|()| report)
    }

    fn try_attach(&mut self, cgroup: &Path, report: &mut Vec<String>) -> Result<(), BpfError> {
        let cg = fs::File::open(cgroup).map_err(io(cgroup, "open cgroup"))?;
        let links_dir = self.dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir, "mkdir"))?;
        for name in PROGRAMS {
            let path = links_dir.join(name);
            let packet = name == PACKET_PROGRAM;
            if packet && packet_program_disabled() {
                let _ = fs::remove_file(&path);
                report.push(format!("{name} (disabled by {NO_PACKET_PROGRAM_ENV})"));
                continue;
            }
            let prog = self.ebpf.program_mut(name).ok_or(BpfError::Missing(name))?;
            let perr = |source| BpfError::Program { name, source };
            let sock_ops = name == "egress_sockops";
            if packet {
                <&mut CgroupSkb>::try_from(&mut *prog)
                    .map_err(perr)?
                    .load()
                    .map_err(perr)?;
            } else if sock_ops {
                <&mut SockOps>::try_from(&mut *prog)
                    .map_err(perr)?
                    .load()
                    .map_err(perr)?;
            } else {
                <&mut CgroupSockAddr>::try_from(&mut *prog)
                    .map_err(perr)?
                    .load()
                    .map_err(perr)?;
            }
            let info = prog.info().map_err(perr)?;
            let new_tag = info.tag();
            tracing::debug!(
                program = name,
                verified_insns = info.verified_instruction_count().unwrap_or(0),
                "loaded"
            );
            let old = if path.exists() {
                let l = PinnedLink::from_pin(&path)
                    .map_err(|source| BpfError::Link { name, source })?;
                let link = FdLink::from(l);
                let tag = link.info().ok().and_then(|i| program_tag(i.program_id()));
                Some((link, tag))
            } else {
                None
            };
            if let Some((_, Some(tag))) = &old {
                if *tag == new_tag {
                    report.push(format!("{name} (kept)"));
                    continue;
                }
            }
            // aya's "Single" with a bpf link is the kernel's multi-attach for links: flags 0.
            let link: FdLink = if packet {
                let p: &mut CgroupSkb = prog.try_into().map_err(perr)?;
                let id = p
                    .attach(
                        cg.as_fd(),
                        CgroupSkbAttachType::Egress,
                        CgroupAttachMode::Single,
                    )
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            } else if sock_ops {
                let p: &mut SockOps = prog.try_into().map_err(perr)?;
                let id = p
                    .attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                let id = p
                    .attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            };
            let pin_err = |e: aya::pin::PinError| BpfError::Io {
                path: path.clone(),
                op: "pin link",
                source: std::io::Error::other(format!("{e:?}")),
            };
            if let Some((old, _)) = old {
                // The new link runs beside the old one; moving the pin onto it and closing
                // the old link's last fd detaches the old program.
                let tmp = links_dir.join(format!("{name}_new"));
                let pinned = link.pin(&tmp).map_err(pin_err)?;
                fs::rename(&tmp, &path).map_err(io(&path, "replace link pin"))?;
                drop(pinned);
                drop(old);
                report.push(format!("{name} (replaced)"));
            } else {
                let pinned = link.pin(&path).map_err(pin_err)?;
                self.links.push(pinned);
                report.push(format!("{name} (attached)"));
            }
        }
        Ok(())
    }

    /// Makes sure the tc backstop runs on interface `iface` (index `ifindex`, in the agent's
    /// network namespace) through pinned tcx links, named by the interface index. Like the
    /// cgroup links, a pinned link that runs the same program is kept; another one is replaced
    /// after the new one is attached. On kernels without tcx (< 6.6), the programs go on a
    /// clsact qdisc instead (not pinned: the filters stay on the qdisc, and every start
    /// replaces them). `EGRESS_TC_ATTACH=tcx|clsact` overrides the choice.
    pub fn attach_tc(&mut self, iface: &str, ifindex: u32) -> Result<Vec<String>, BpfError> {
        let links_dir = self.dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir, "mkdir"))?;
        let tcx = match std::env::var("EGRESS_TC_ATTACH").as_deref() {
            Ok("clsact") => false,
            Ok("tcx") => true,
            _ => aya::util::KernelVersion::current()
                .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
                .unwrap_or(true),
        };
        let mut report = Vec::new();
        for (name, hook, dir) in TC_PROGRAMS {
            let perr = |source| BpfError::Program { name, source };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing(name))?
                .try_into()
                .map_err(perr)?;
            if prog.fd().is_err() {
                prog.load().map_err(perr)?;
            }
            let new_tag = prog.info().map_err(perr)?.tag();
            if !tcx {
                let _ = aya::programs::tc::qdisc_add_clsact(iface);
                let _ = aya::programs::tc::qdisc_detach_program(iface, hook, name);
                let id = prog
                    .attach_with_options(
                        iface,
                        hook,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(perr)?;
                // The filter stays on the qdisc when the agent exits.
                std::mem::forget(prog.take_link(id).map_err(perr)?);
                report.push(format!("{name} on {iface} (clsact)"));
                continue;
            }
            let path = links_dir.join(format!("tc-{ifindex}-{dir}"));
            let old = PinnedLink::from_pin(&path).ok().map(FdLink::from);
            let old_tag = old
                .as_ref()
                .and_then(|l| l.info().ok())
                .and_then(|i| program_tag(i.program_id()));
            if old_tag == Some(new_tag) {
                report.push(format!("{name} on {iface} (kept)"));
                continue;
            }
            let id = prog
                .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(Default::default()))
                .map_err(perr)?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(perr)?
                .try_into()
                .map_err(|source| BpfError::Link { name, source })?;
            let tmp = links_dir.join(format!("tc-{ifindex}-{dir}_new"));
            let _ = fs::remove_file(&tmp);
            link.pin(&tmp).map_err(|e| BpfError::Io {
                path: tmp.clone(),
                op: "pin link",
                source: std::io::Error::other(format!("{e:?}")),
            })?;
            fs::rename(&tmp, &path).map_err(io(&path, "pin link"))?;
            drop(old);
            report.push(format!("{name} on {iface} (attached)"));
        }
        Ok(report)
    }

    /// Detaches the tc backstop from every interface not in `keep` (indexes), by removing
    /// the pins of their links (a link of a deleted interface is gone already).
    pub fn prune_tc(&mut self, keep: &[u32]) -> Vec<u32> {
        let links_dir = self.dir.join("links");
        let mut gone = Vec::new();
        for e in fs::read_dir(&links_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("tc-") else {
                continue;
            };
            let Some(ifindex) = rest.split('-').next().and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            if !keep.contains(&ifindex) && fs::remove_file(e.path()).is_ok() {
                gone.push(ifindex);
            }
        }
        gone.sort_unstable();
        gone.dedup();
        gone
    }

    /// The map the proxy reads original destinations from (a new handle on the same map).
    pub fn orig_by_tuple(&self) -> Result<HashMap<MapData, OrigKey, OrigDst>, BpfError> {
        self.shared_map(names::ORIG_BY_TUPLE)
    }

    pub fn events(&mut self) -> Result<RingBuf<MapData>, BpfError> {
        let m = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(BpfError::Missing(names::EVENTS))?;
        RingBuf::try_from(m).map_err(map_err(names::EVENTS))
    }

    fn shared_map<T>(&self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        let path = self.dir.join("maps").join(name);
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        let map = map_of(name, data);
        T::try_from(map).map_err(map_err(name))
    }
}

fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

fn map_data(m: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match m {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => Some(d),
        Map::PerCpuArray(d) | Map::RingBuf(d) => Some(d),
        _ => None,
    }
}

/// Checks that the maps pinned in `maps_dir` have the layout this agent's object needs (type,
/// key and value size, capacity), by comparing with throw-away maps created from the object.
fn check_layout(maps_dir: &Path) -> Result<(), BpfError> {
    let fresh = EbpfLoader::new().load(OBJECT)?;
    for name in names::ALL {
        let want = fresh
            .map(name)
            .and_then(map_data)
            .ok_or(BpfError::Missing(name))?
            .info()
            .map_err(map_err(name))?;
        let have = aya::maps::MapInfo::from_pin(maps_dir.join(name)).map_err(map_err(name))?;
        let shape = |i: &aya::maps::MapInfo| {
            (
                i.map_type().ok(),
                i.key_size(),
                i.value_size(),
                i.max_entries(),
            )
        };
        if shape(&want) != shape(&have) {
            return Err(BpfError::Incompatible {
                map: name,
                dir: maps_dir.to_path_buf(),
                detail: format!("pinned {:?}, needed {:?}", shape(&have), shape(&want)),
            });
        }
    }
    Ok(())
}

/// Removes the pins of every layout version other than this one: their programs are
/// detached once the new ones are attached.
fn retire_old_versions(pin_root: &Path) {
    let Ok(entries) = fs::read_dir(pin_root) else {
        return;
    };
    let current = format!("v{LAYOUT_VERSION}");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('v') && name != current && name[1..].parse::<u32>().is_ok() {
            remove_version(&e.path());
            tracing::info!(pins = %e.path().display(), "retired the pins of an older layout");
        }
    }
}

fn insert_all<K: aya::Pod, V: aya::Pod>(
    mut t: LpmTrie<&mut MapData, K, V>,
    name: &'static str,
    entries: impl Iterator<Item = (Key<K>, V)>,
) -> Result<(), BpfError> {
    for (k, v) in entries {
        t.insert(&k, v, 0).map_err(map_err(name))?;
    }
    Ok(())
}

fn clear_trie<K: aya::Pod, V: aya::Pod>(
    mut t: LpmTrie<&mut MapData, K, V>,
    name: &'static str,
    in_set: impl Fn(&K) -> bool,
) -> Result<(), BpfError> {
    let keys: Vec<Key<K>> = t
        .keys()
        .filter_map(Result::ok)
        .filter(|k| in_set(&k.data()))
        .collect();
    for k in keys {
        t.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

/// Wraps map data in the right [`aya::maps::Map`] variant for its name.
fn map_of(name: &str, data: MapData) -> aya::maps::Map {
    use aya::maps::Map;
    match name {
        names::COUNTERS | names::TC_COUNTERS | names::PACKET_DROPS => Map::PerCpuArray(data),
        names::EVENTS => Map::RingBuf(data),
        names::ORIG_BY_COOKIE | names::ORIG_BY_TUPLE | names::REPLIES | names::SOCK_VERDICTS => {
            Map::LruHashMap(data)
        }
        names::WORKLOADS => Map::HashMap(data),
        names::CONFIG | names::ACTIVE => Map::Array(data),
        _ => Map::LpmTrie(data),
    }
}

/// Removes every pin under `pin_root`, of every layout version (links first: that detaches
/// the programs). `uninstall`.
pub fn remove_pins(pin_root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(pin_root) {
        for e in entries.flatten() {
            removed.extend(remove_version(&e.path()));
        }
    }
    let _ = fs::remove_dir(pin_root);
    removed
}

fn remove_version(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if fs::remove_file(e.path()).is_ok() {
                    removed.push(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&d);
    }
    let _ = fs::remove_dir(dir);
    removed
}
