//! What the kernel enforces: the eBPF object, its maps, links and pins ([`bpf`], with
//! [`attach`], [`policy_maps`], [`counters`], [`pins`] and [`error`]), the workloads' cgroups
//! ([`cgroups`]) and the network namespaces of pods ([`podnet`]).

pub mod attach;
pub mod bpf;
pub mod cgroups;
pub mod counters;
pub mod error;
pub mod pins;
pub mod podnet;
pub mod policy_maps;
