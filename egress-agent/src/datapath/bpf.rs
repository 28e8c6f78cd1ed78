//! The eBPF datapath: the object loaded with its maps pinned, and handles on its maps. The
//! rest of [`Datapath`] is in the sibling modules: [`super::attach`] (programs and links),
//! [`super::policy_maps`] (a compiled policy into the maps), [`super::counters`] (counters and
//! map fill for the metrics), [`super::pins`] (pin layout and removal).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, RingBuf},
    programs::links::PinnedLink,
    Ebpf, EbpfLoader,
};
use egress_common::{names, MeshConfig, OrigDst, OrigKey};

pub use super::{
    error::BpfError,
    pins::{remove_pins, versioned},
};
use super::{
    error::{io, map_err},
    pins::{check_layout, ensure_bpffs},
};

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// A loaded datapath. Dropping it without [`Datapath::remove`] leaves the pinned links
/// attached and the maps pinned (enforcement survives the agent).
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    /// Policy sets known to hold no entries (so an apply need not walk the maps to clear
    /// them). Unknown after a restart.
    pub(super) clean: [bool; 2],
    pub(super) pin_root: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) links: Vec<PinnedLink>,
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
            check_layout(&maps_dir, OBJECT)?;
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

    pub(super) fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let m = self.ebpf.map_mut(name).ok_or(BpfError::Missing(name))?;
        T::try_from(m).map_err(map_err(name))
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

    pub(crate) fn shared_map<T>(&self, name: &'static str) -> Result<T, BpfError>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        let path = self.dir.join("maps").join(name);
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        let map = map_of(name, data);
        T::try_from(map).map_err(map_err(name))
    }
}

/// Wraps map data in the right [`aya::maps::Map`] variant for its name.
fn map_of(name: &str, data: MapData) -> aya::maps::Map {
    use aya::maps::Map;
    match name {
        names::COUNTERS | names::TC_COUNTERS | names::PACKET_DROPS => Map::PerCpuArray(data),
        names::EVENTS => Map::RingBuf(data),
        names::ORIG_BY_TUPLE | names::REPLIES | names::FRAGMENTS | names::DST_VERDICTS => {
            Map::LruHashMap(data)
        }
        names::SOCK_MARKS | names::SOCK_ORIG => Map::SkStorage(data),
        names::WORKLOADS | names::POD_ADDRS | names::NAMES => Map::HashMap(data),
        names::CONFIG | names::ACTIVE | names::NAMES_EPOCH => Map::Array(data),
        _ => Map::LpmTrie(data),
    }
}
