//! A compiled policy into the maps: two policy sets, one in force and one being written, so a
//! change is one flip of `EGRESS_ACTIVE` (atomic for every connect), and the toggle of
//! `enableEgress` in place.
//!
//! A set is written or deleted only after every program that may still read it has returned:
//! a program reads `EGRESS_ACTIVE` once and then the set it named, so after a flip the old set
//! has readers until the programs running at the flip have finished. [`wait_for_readers`] waits
//! for exactly that (an RCU grace period, which the kernel takes on every update of a
//! map-of-maps), not for a guessed time.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData};
use egress_common::{
    mesh_key, names, workload_key, MeshConfig, MeshKeyV4, MeshKeyV6, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, WorkloadInfo, IFACE_TAG,
};

use super::{
    bpf::Datapath,
    error::{map_err, BpfError},
};
use crate::policy::Compiled;

impl Datapath {
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
        // The set about to be written may still have readers from the last flip.
        wait_if_flipped()?;
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
        FLIPS.fetch_add(1, Ordering::SeqCst);
        Ok(cur)
    }

    /// Deletes the entries of a replaced policy set, unless it became the active one again
    /// meanwhile, once no program can be reading it (it waits for that if needed; call
    /// [`wait_for_readers`] first, without holding the datapath, to keep the wait off it).
    pub fn retire(&mut self, set: u32) -> Result<(), BpfError> {
        if self.active()?.0 != set {
            wait_if_flipped()?;
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

/// Flips of `EGRESS_ACTIVE` by this process, and how many of them a grace period has covered.
static FLIPS: AtomicU64 = AtomicU64::new(0);
static GRACED: AtomicU64 = AtomicU64::new(0);

/// Returns once every BPF program (non-sleepable: all of ours) that was running when it was
/// called has returned; so a policy set replaced before the call has no reader left. The
/// kernel waits for an RCU grace period in every update of a map-of-maps
/// (`maybe_wait_bpf_programs`, since Linux 4.20), which is used here on a private one that no
/// program reads. Takes milliseconds: call it off the paths that wait for a reply.
pub fn wait_for_readers() -> Result<(), BpfError> {
    let seen = FLIPS.load(Ordering::SeqCst);
    let (outer, inner) = grace_maps()?;
    let key: u32 = 0;
    let value: u32 = inner.as_raw_fd() as u32;
    let mut attr = [0u64; 4];
    attr[0] = outer.as_raw_fd() as u64; // map_fd (u32) and padding
    attr[1] = &key as *const u32 as u64;
    attr[2] = &value as *const u32 as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(|e| grace_err("update", e))?;
    GRACED.fetch_max(seen, Ordering::SeqCst);
    Ok(())
}

/// [`wait_for_readers`] if a flip happened since the last grace period.
fn wait_if_flipped() -> Result<(), BpfError> {
    if GRACED.load(Ordering::SeqCst) < FLIPS.load(Ordering::SeqCst) {
        wait_for_readers()?;
    }
    Ok(())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

fn grace_err(op: &'static str, source: std::io::Error) -> BpfError {
    BpfError::Io {
        path: "grace-period map-of-maps".into(),
        op,
        source,
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 4]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the command's layout, 32 bytes, alive for
    // the call; the pointers in it point to live locals of the caller.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 32usize) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The private (outer array-of-maps, inner array) pair, created once.
fn grace_maps() -> Result<&'static (OwnedFd, OwnedFd), BpfError> {
    static MAPS: OnceLock<(OwnedFd, OwnedFd)> = OnceLock::new();
    if let Some(m) = MAPS.get() {
        return Ok(m);
    }
    let create = |map_type: u32, inner: u32| {
        // map_type, key_size, value_size, max_entries | map_flags, inner_map_fd
        let mut attr = [0u64; 4];
        attr[0] = map_type as u64 | (4u64 << 32);
        attr[1] = 4 | (1u64 << 32);
        attr[2] = (inner as u64) << 32;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        bpf(BPF_MAP_CREATE, &mut attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let inner = create(BPF_MAP_TYPE_ARRAY, 0).map_err(|e| grace_err("create", e))?;
    let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32)
        .map_err(|e| grace_err("create", e))?;
    Ok(MAPS.get_or_init(|| (outer, inner)))
}
