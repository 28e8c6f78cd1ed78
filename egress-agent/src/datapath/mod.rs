//! What the kernel enforces: the eBPF object, its maps, links and pins ([`bpf`]), the workloads'
//! cgroups ([`cgroups`]) and the network namespaces of pods ([`podnet`], plumbed over rtnetlink
//! by [`netlink`]).

pub mod bpf;
pub mod cgroups;
pub mod netlink;
pub mod podnet;
