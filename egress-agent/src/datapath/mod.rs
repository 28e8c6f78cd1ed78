//! What the kernel enforces: the eBPF object, its maps, links and pins ([`bpf`], with
//! [`attach`], [`policy_maps`], [`counters`], [`pins`] and [`error`]), the workloads' cgroups
//! ([`cgroups`]), the network namespaces of pods ([`podnet`]; their addresses for the tc backstop in
//! [`pod_addrs`]; a Kubernetes pod's node-side interface in [`pod_iface`]; plumbed over rtnetlink by
//! [`netlink`]), the proxy's listening sockets ([`listen`]), entries taken out of a map in one call ([`raw_map`]), and the oldest kernel the programs load on ([`kernel_version`]).

pub mod attach;
pub mod bpf;
pub mod cgroups;
pub mod counters;
pub mod error;
pub mod exempt;
pub mod kernel_version;
pub mod listen;
pub mod netlink;
pub mod pins;
pub mod pod_addrs;
pub mod pod_iface;
pub mod podnet;
pub mod policy_maps;
mod raw_link;
pub mod raw_map;
pub mod relay;
pub mod sockets;
