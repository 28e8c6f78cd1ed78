//! The agent's own exemption before it has opened the datapath: on a restart or a rollout the
//! pinned programs are still enforcing (in Kubernetes mode refusing every cgroup below the
//! root that is no workload, such as a new agent pod's), so the agent moves into its exempt
//! cgroup and makes sure the pinned policy exempts that cgroup before its first packet.

use std::path::Path;

use aya::maps::{Array, MapData};
use egress_common::{names, MeshConfig};

use super::{
    error::{map_err, BpfError},
    pins::versioned,
};

/// Makes the pinned policy sets under `pin_root` (if any) exempt cgroup `agent_cgroup_id`.
/// Normally they already do (the `_agent` cgroup outlives the agent); this covers a removed
/// and re-created `_agent` cgroup. Returns whether a pinned set had to be changed. Without
/// pins (a first install, a node reboot) nothing enforces yet and nothing is done.
pub fn exempt_agent(pin_root: &Path, agent_cgroup_id: u64) -> Result<bool, BpfError> {
    let path = versioned(pin_root).join("maps").join(names::CONFIG);
    if !path.exists() {
        return Ok(false);
    }
    let data = MapData::from_pin(&path).map_err(map_err(names::CONFIG))?;
    let mut sets: Array<MapData, MeshConfig> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::CONFIG))?;
    let mut changed = false;
    for set in 0..2 {
        let mut cfg = sets.get(&set, 0).map_err(map_err(names::CONFIG))?;
        if cfg.generation != 0 && cfg.agent_cgroup_id != agent_cgroup_id {
            cfg.agent_cgroup_id = agent_cgroup_id;
            sets.set(set, cfg, 0).map_err(map_err(names::CONFIG))?;
            changed = true;
        }
    }
    Ok(changed)
}
