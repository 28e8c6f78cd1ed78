//! A compiled policy into the maps: two policy sets, one in force and one being written, so a
//! change is one flip of `EGRESS_ACTIVE` (atomic for every connect), and the toggle of
//! `enableEgress` in place.

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
