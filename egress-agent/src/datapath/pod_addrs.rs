//! The addresses of the pod behind each veth (`EGRESS_POD_ADDRS`), for the tc backstop: a
//! packet leaving the pod must carry one of them as its source (anti-spoof), and only a
//! packet addressed to one of them opens a reply flow.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::HashMap;
use egress_common::{names, tc::PodAddrs};

use super::{
    bpf::Datapath,
    error::{map_err, BpfError},
};

/// The map value for a pod's addresses.
pub fn pod_addrs(ip4: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>) -> PodAddrs {
    PodAddrs {
        ip4: ip4.map(|a| a.octets()).unwrap_or_default(),
        has4: ip4.is_some() as u8,
        has6: ip6.is_some() as u8,
        _pad0: [0; 2],
        ip6: ip6.map(|a| a.octets()).unwrap_or_default(),
    }
}

impl Datapath {
    /// Records the addresses of the pod behind interface `ifindex`. Before the backstop's
    /// programs judge the interface: until then they pass nothing but ARP from it.
    pub fn set_pod_addrs(&mut self, ifindex: u32, addrs: PodAddrs) -> Result<(), BpfError> {
        let mut m: HashMap<_, u32, PodAddrs> = self.map(names::POD_ADDRS)?;
        m.insert(ifindex, addrs, 0)
            .map_err(map_err(names::POD_ADDRS))
    }

    /// Forgets the addresses of every interface not in `keep`.
    pub fn prune_pod_addrs(&mut self, keep: &[u32]) -> Result<(), BpfError> {
        let mut m: HashMap<_, u32, PodAddrs> = self.map(names::POD_ADDRS)?;
        let gone: Vec<u32> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !keep.contains(i))
            .collect();
        for i in gone {
            let _ = m.remove(&i);
        }
        Ok(())
    }
}
