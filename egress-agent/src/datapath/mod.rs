//! What the kernel enforces: the eBPF object, its maps, links and pins ([`bpf`]), the workloads'
//! cgroups ([`cgroups`]) and the network namespaces of pods ([`podnet`]).

pub mod bpf;
pub mod cgroups;
pub mod kernel_version;
pub mod podnet;
pub mod sockets;
