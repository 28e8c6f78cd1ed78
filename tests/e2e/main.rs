//! End-to-end tests: the real agent binary, real eBPF programs on a real kernel, real cgroups,
//! real sockets and real clients (python3, curl). They need root; without it they skip, except
//! under CI=true where they fail.

mod bad_input;
mod control;
mod datapath;
mod deploy;
mod gateway;
mod harness;
mod k8s;
mod lifecycle;
mod metrics;
mod packets;
mod pods;
mod proxy;
mod semantics;
