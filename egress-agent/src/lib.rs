//! The egress node agent: policy parsing and compilation, the eBPF datapath, workload cgroups,
//! the transparent proxy, and the command line.
pub mod admin;
pub mod bpf;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod flows;
pub mod gateway;
pub mod k8s;
pub mod metrics;
pub mod podnet;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod store;
pub mod workload;
