//! The command line of `egress-agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ObjectRef;

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "eBPF egress interceptor: allow, redirect to a transparent proxy, or refuse every outbound socket of a workload",
    after_help = "Exit status: 0 success, 1 runtime failure, 2 bad usage or invalid input.\nLogs: EGRESS_LOG=debug (tracing filter syntax); flows are logged under target egress::flow."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: enforce the policy file on its workloads until SIGTERM/SIGINT.
    Run {
        /// Policy file: MeshConfig, Workload, Egress and EgressGateway documents (YAML).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// cgroup v2 directory the programs attach to; workloads are created below it.
        /// Default: <cgroup2 mount>/egress.
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory for pins (maps and links go under <DIR>/v<layout>/).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/egress")]
        pin_dir: PathBuf,
        /// Allow --cgroup-root to be the root of the cgroup hierarchy (intercepts the whole machine).
        #[arg(long)]
        allow_root_cgroup: bool,
        /// Which verdicts become flow events: `denied` (refused, proxied, audited: the
        /// default) or `all` (also every allowed connection; costs about 1 µs per connect).
        #[arg(long, value_enum, default_value_t = Flows::Denied)]
        flows: Flows,
    },
    /// Run a command inside a workload of a running standalone agent.
    Exec {
        /// The workload: NAME or NAMESPACE/NAME (namespace "default" when omitted).
        #[arg(long, short = 'w', value_name = "NAME", value_parser = parse_workload)]
        workload: ObjectRef,
        /// The agent's --cgroup-root. Default: <cgroup2 mount>/egress.
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Check a policy file (parse, validate, compile) without changing anything.
    Validate {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Remove what a crashed agent left: pins (this detaches its programs) and empty cgroups.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/egress")]
        pin_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flows {
    Denied,
    All,
}

fn parse_workload(s: &str) -> Result<ObjectRef, String> {
    let (ns, name) = s.split_once('/').unwrap_or(("default", s));
    let valid = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if valid(ns) && valid(name) {
        Ok(ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        })
    } else {
        Err(format!("{s:?} is not NAME or NAMESPACE/NAME"))
    }
}
