//! End-to-end tests: the real agent binary, real eBPF programs on a real kernel, real cgroups,
//! real sockets and real clients (python3, curl). A test whose environment is missing (root,
//! cgroup v2, bpffs, a tool) prints `SKIPPED: <test>: <reason>` and returns, except under
//! CI=true where it fails: one rule, `egress_test_support::env::require`, used through
//! `harness::privileged`/`privileged_with` or directly.

mod bad_input;
mod bypass;
mod control;
mod datapath;
mod deploy;
mod dns;
mod dns_binding;
mod dns_pods;
mod gateway;
mod gateway_service;
mod harness;
mod host_judging;
mod k8s;
mod k8s_pods;
mod kernel_relay;
mod lifecycle;
mod metrics;
mod metrics_storm;
mod netpol;
mod node_backstop;
mod node_box;
mod packets;
mod pods;
mod preview;
mod proxy;
mod semantics;
mod sockets;
mod tc_attacks;
mod tc_prog;
mod verdict_cache;
