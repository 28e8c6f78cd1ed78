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
        links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use egress_common::{
    names, MeshConfig, OrigDst, PolicyKeyV4, PolicyKeyV6, PolicyValue, SockAddr, WorkloadInfo,
    LAYOUT_VERSION,
};

use crate::policy::Compiled;

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The programs, in the order they are attached.
pub const PROGRAMS: [&str; 7] = [
    "egress_sockops",
    "egress_getpeername4",
    "egress_getpeername6",
    "egress_sendmsg4",
    "egress_sendmsg6",
    "egress_connect4",
    "egress_connect6",
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
    #[error("{0} holds pins of another agent (still running, or it crashed): stop it, or remove them with `egress-agent uninstall --pin-dir {1}`")]
    PinsExist(PathBuf, PathBuf),
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
    pin_root: PathBuf,
    dir: PathBuf,
    links: Vec<PinnedLink>,
}

impl Datapath {
    /// Loads the object and pins its maps. Refuses when the versioned pin directory already
    /// exists (another agent's, or a crashed one's).
    pub fn load(pin_root: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(pin_root)?;
        let dir = versioned(pin_root);
        if dir.exists() {
            return Err(BpfError::PinsExist(dir, pin_root.to_path_buf()));
        }
        let ebpf = EbpfLoader::new().load(OBJECT)?;
        let mut dp = Self {
            ebpf,
            pin_root: pin_root.to_path_buf(),
            dir,
            links: Vec::new(),
        };
        if let Err(e) = dp.pin_maps() {
            dp.unpin_all();
            return Err(e);
        }
        Ok(dp)
    }

    fn pin_maps(&mut self) -> Result<(), BpfError> {
        let maps_dir = self.dir.join("maps");
        fs::create_dir_all(&maps_dir).map_err(io(&maps_dir, "mkdir"))?;
        for name in names::ALL {
            let m = self.ebpf.map(name).ok_or(BpfError::Missing(name))?;
            m.pin(maps_dir.join(name)).map_err(|e| BpfError::Io {
                path: maps_dir.join(name),
                op: "pin map",
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }

    /// Starts forwarding the programs' aya-log records to the `log` crate (and so to tracing).
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Writes the whole policy into the (fresh) maps.
    pub fn write_policy(
        &mut self,
        c: &Compiled,
        cfg: MeshConfig,
        workload_cgroups: &[(u64, u32)],
    ) -> Result<(), BpfError> {
        let mut m: Array<_, MeshConfig> = self.map(names::CONFIG)?;
        m.set(0, cfg, 0).map_err(map_err(names::CONFIG))?;

        let mut w: HashMap<_, u64, WorkloadInfo> = self.map(names::WORKLOADS)?;
        for &(cg, id) in workload_cgroups {
            w.insert(cg, WorkloadInfo { id, _pad0: 0 }, 0)
                .map_err(map_err(names::WORKLOADS))?;
        }

        let mut v4: LpmTrie<_, PolicyKeyV4, PolicyValue> = self.map(names::POLICY_V4)?;
        for e in &c.v4 {
            v4.insert(&Key::new(e.key_len(), e.key), e.value, 0)
                .map_err(map_err(names::POLICY_V4))?;
        }
        let mut v6: LpmTrie<_, PolicyKeyV6, PolicyValue> = self.map(names::POLICY_V6)?;
        for e in &c.v6 {
            v6.insert(&Key::new(e.key_len(), e.key), e.value, 0)
                .map_err(map_err(names::POLICY_V6))?;
        }

        let mut m4: LpmTrie<_, [u8; 4], u32> = self.map(names::MESH_V4)?;
        for c in &c.mesh {
            if let std::net::IpAddr::V4(a) = c.addr {
                m4.insert(&Key::new(c.len as u32, a.octets()), 1, 0)
                    .map_err(map_err(names::MESH_V4))?;
            }
        }
        let mut m6: LpmTrie<_, [u8; 16], u32> = self.map(names::MESH_V6)?;
        for c in &c.mesh {
            if let std::net::IpAddr::V6(a) = c.addr {
                m6.insert(&Key::new(c.len as u32, a.octets()), 1, 0)
                    .map_err(map_err(names::MESH_V6))?;
            }
        }
        Ok(())
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let m = self.ebpf.map_mut(name).ok_or(BpfError::Missing(name))?;
        T::try_from(m).map_err(map_err(name))
    }

    /// Loads every program, attaches it to `cgroup` with a bpf link (links stack with other
    /// programs on the cgroup and are never overridden by a sub-cgroup's), and pins the links.
    /// On any failure, everything attached and pinned so far is removed again.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let res = self.try_attach(cgroup);
        if res.is_err() {
            self.unpin_all();
        }
        res
    }

    fn try_attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let cg = fs::File::open(cgroup).map_err(io(cgroup, "open cgroup"))?;
        let links_dir = self.dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir, "mkdir"))?;
        for name in PROGRAMS {
            let prog = self.ebpf.program_mut(name).ok_or(BpfError::Missing(name))?;
            let perr = |source| BpfError::Program { name, source };
            // aya's "Single" with a bpf link is the kernel's multi-attach for links: flags 0.
            let link: FdLink = if name == "egress_sockops" {
                let p: &mut SockOps = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p
                    .attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p
                    .attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            };
            let path = links_dir.join(name);
            let pinned = link.pin(&path).map_err(|e| BpfError::Io {
                path: path.clone(),
                op: "pin link",
                source: std::io::Error::other(e.to_string()),
            })?;
            self.links.push(pinned);
        }
        Ok(())
    }

    /// The map the proxy reads original destinations from (a new handle on the same map).
    pub fn orig_by_tuple(&self) -> Result<HashMap<MapData, SockAddr, OrigDst>, BpfError> {
        self.shared_map(names::ORIG_BY_TUPLE)
    }

    pub fn counters(&self) -> Result<PerCpuArray<MapData, u64>, BpfError> {
        self.shared_map(names::COUNTERS)
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

    /// Detaches every program and removes every pin (a clean stop or `uninstall`).
    pub fn remove(mut self) {
        self.unpin_all();
    }

    fn unpin_all(&mut self) {
        for l in self.links.drain(..) {
            // Removing the pin and closing the last fd detaches the link.
            if let Err(e) = l.unpin() {
                tracing::warn!(error = %e, "cannot unpin link");
            }
        }
        remove_pins(&self.pin_root);
    }
}

/// Wraps map data in the right [`aya::maps::Map`] variant for its name.
fn map_of(name: &str, data: MapData) -> aya::maps::Map {
    use aya::maps::Map;
    match name {
        names::COUNTERS => Map::PerCpuArray(data),
        names::EVENTS => Map::RingBuf(data),
        names::ORIG_BY_COOKIE | names::ORIG_BY_TUPLE => Map::LruHashMap(data),
        names::WORKLOADS => Map::HashMap(data),
        names::CONFIG => Map::Array(data),
        _ => Map::LpmTrie(data),
    }
}

/// Removes the pins under `pin_root` (links first: that detaches the programs). Used by a clean
/// stop and by `uninstall`, also after a crash.
pub fn remove_pins(pin_root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let dir = versioned(pin_root);
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
    let _ = fs::remove_dir(&dir);
    let _ = fs::remove_dir(pin_root);
    removed
}
