//! The command line of `egress-agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use std::str::FromStr as _;

use crate::policy::ObjectRef;

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "eBPF egress interceptor: allow, redirect to a transparent proxy, or refuse every outbound socket of a workload",
    after_help = "Exit status: 0 success, 1 runtime failure, 2 bad usage or invalid input.\nLogs: EGRESS_LOG=debug (tracing filter syntax); flows are logged under target egress::flow."
)]
pub struct Cli {
    /// The running agent's admin socket (root only).
    #[arg(long, global = true, value_name = "PATH", default_value = crate::admin::protocol::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output of the commands that talk to the agent: human tables or JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Log lines (flows included) as text or as JSON objects, one per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    /// JSON when `json` (a verb's own `--json`) is set.
    pub fn or_json(self, json: bool) -> Self {
        if json {
            Output::Json
        } else {
            self
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: enforce the policy on its workloads, serve the proxy, the admin API and
    /// the metrics until SIGTERM/SIGINT. Enforcement stays after the agent stops (see uninstall);
    /// a restart on the same pins resumes the live policy without a gap.
    Run {
        /// Policy file: MeshConfig, Workload, Egress, EgressGateway, NetworkPolicy and
        /// Namespace documents (YAML).
        /// Not used with --kubernetes.
        #[arg(
            long,
            short = 'c',
            value_name = "FILE",
            required_unless_present = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Kubernetes mode: the workloads are this node's pods (watched with the field
        /// selector spec.nodeName), the policy is the MeshConfig, Egress and EgressGateway
        /// objects (CRDs, policy.egress.dev/v1alpha1) with the NetworkPolicies,
        /// AdminNetworkPolicies and Namespaces; --cgroup-root is the kubepods cgroup.
        /// The API server is found from KUBECONFIG or, in a pod, the ServiceAccount.
        #[arg(long, requires = "node_name")]
        kubernetes: bool,
        /// This node's name (Kubernetes mode), from the downward API (spec.nodeName).
        #[arg(long, env = "NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
        /// The MeshConfig each node reports its status into (Kubernetes mode).
        #[arg(long, value_name = "NAME", default_value = "egress")]
        mesh_config: String,
        /// cgroup v2 directory the programs attach to; workloads are created below it.
        /// Kubernetes mode: the kubepods cgroup (/sys/fs/cgroup/kubepods.slice with the
        /// systemd driver, /sys/fs/cgroup/kubepods with cgroupfs).
        /// Default: <cgroup2 mount>/egress.
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory for pins (maps and links go under <DIR>/v<layout>/).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/egress")]
        pin_dir: PathBuf,
        /// Allow --cgroup-root to be the root of the cgroup hierarchy (intercepts the whole machine).
        #[arg(long)]
        allow_root_cgroup: bool,
        /// A node interface (the uplink, e.g. eth0; repeat for each) whose outgoing frames
        /// are checked for workloads' packet sockets (tc egress): while spec.sockets.packet
        /// is deny, frames a workload wrote through AF_PACKET are dropped there. Needed where
        /// the socket_create LSM cannot refuse packet sockets (no BPF LSM): `egress status`
        /// says which. Frames of IP sockets and forwarded traffic pass untouched.
        #[arg(long = "node-interface", value_name = "IFACE")]
        node_interfaces: Vec<String>,
        /// Which verdicts become flow events: `denied` (refused, proxied, audited: the
        /// default) or `all` (also every allowed connection: one more ring-buffer event per
        /// connect).
        #[arg(long, value_enum, default_value_t = Flows::Denied)]
        flows: Flows,
        /// How the transparent proxy moves the bytes of a connection it does not inspect any
        /// more: `splice` (the agent relays: one copy for small messages, splice(2) for bulk;
        /// the faster one measured on kernel 6.18) or `kernel` (a BPF sockmap redirects them
        /// between the two sockets, the agent never touches them; falls back to splice when
        /// the kernel refuses the program). See README "Proxy relay".
        #[arg(long, env = "EGRESS_RELAY", value_enum, default_value_t = Relay::Splice)]
        relay: Relay,
        /// Prometheus metrics, /healthz and /readyz.
        #[arg(long, value_name = "ADDR", default_value = crate::telemetry::metrics::DEFAULT_ADDR)]
        metrics_addr: std::net::SocketAddr,
        /// Where the live policy is saved after every change, for restarts.
        /// Default: /var/lib/egress/<pin dir name>.policy.yaml.
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
        /// Entries the flow history keeps (per workload, destination, protocol and host);
        /// when full, those seen least recently make room.
        #[arg(long, value_name = "N", default_value_t = crate::telemetry::history::DEFAULT_SIZE)]
        history_size: usize,
        /// Where the flow history is saved (every 30 s and at stop) for restarts.
        /// Default: beside the state file, <name>.flows.json.
        #[arg(long, value_name = "FILE")]
        history_file: Option<PathBuf>,
    },
    /// Run a command inside a workload of a running standalone agent.
    Exec {
        /// The workload: NAME or NAMESPACE/NAME (namespace "default" when omitted).
        #[arg(long, short = 'w', value_name = "NAME", value_parser = ObjectRef::from_str)]
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
        /// Check the objects as Kubernetes CRD objects: a source may name a pod the file
        /// does not hold, and a gateway may name a Service.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Print FILE with its OSM and FSM Egress objects and FSM's EgressGateway as
    /// policy.egress.dev ones (for `kubectl apply -f -`); a field that cannot be honoured is
    /// refused by name (exit 2).
    Convert {
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
    },
    /// Toggle egress mesh-wide (OSM/FSM enableEgress), or show the agent's state.
    /// With --kubernetes: patch the MeshConfig object so every node converges, and show the
    /// MeshConfig generation each node reports.
    Egress {
        #[command(subcommand)]
        action: EgressAction,
        /// Act on the cluster's MeshConfig (KUBECONFIG or the pod's ServiceAccount) instead of
        /// the local agent.
        #[arg(long, global = true)]
        kubernetes: bool,
        /// The MeshConfig object (with --kubernetes).
        #[arg(long, global = true, value_name = "NAME", default_value = "egress")]
        mesh_config: String,
        /// How long enable/disable --kubernetes waits for every node to converge.
        #[arg(long, global = true, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Manage the running agent's Egress policies, live and atomically.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Show recent verdicts (refused, proxied, audited; all with `run --flows all`), or with
    /// --aggregate the flow history: one line per workload, destination, protocol and host.
    Flows {
        /// Keep streaming new flows.
        #[arg(long, short = 'f', conflicts_with = "aggregate")]
        follow: bool,
        /// The flow history, aggregated, instead of the recent verdicts.
        #[arg(long)]
        aggregate: bool,
        /// Only flows seen within this long: 90s, 30m, 1h, 2d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// JSON lines (same as -o json).
        #[arg(long)]
        json: bool,
    },
    /// Show what workloads' DNS answered (spec.dns): learned names with their addresses and
    /// seconds of TTL left, and recent answers with the rules they fed.
    Dns {
        /// JSON (same as -o json).
        #[arg(long)]
        json: bool,
    },
    /// Run an egress gateway: accept tunnels from node agents (and standard clients) over
    /// SOCKS5 and HTTP CONNECT (HTTP/1.1, and HTTP/2 "http2tunnel" with many tunnels over one
    /// connection), let out only what the file's allowlist names, from its egressAddress.
    Gateway {
        /// Gateway file: one GatewayServer document (listeners, egressAddress, allow, limits).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Prometheus metrics (egress_gateway_*), /healthz and /readyz.
        #[arg(long, value_name = "ADDR", default_value = crate::gateway::server::DEFAULT_METRICS_ADDR)]
        metrics_addr: std::net::SocketAddr,
        /// Check the file and exit.
        #[arg(long)]
        check: bool,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Remove everything the agent installed: pins (this detaches its programs) and empty
    /// cgroups. Enforcement stops.
    Uninstall {
        /// The agent's --pin-dir.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/egress")]
        pin_dir: PathBuf,
        /// The agent's --cgroup-root (empty cgroups are removed). Default: <cgroup2 mount>/egress.
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// The saved live policy to remove. Default: /var/lib/egress/<pin dir name>.policy.yaml.
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EgressAction {
    /// Unmatched external destinations pass through (enableEgress: true).
    Enable,
    /// Only what an Egress policy allows gets out (enableEgress: false).
    Disable,
    /// Mode, fail mode, audit mode, policy generation, rules, map entries, programs, workloads.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Add or replace the objects of FILE (MeshConfig, Workload, Egress, EgressGateway,
    /// NetworkPolicy, Namespace) in the live policy.
    Apply {
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
    },
    /// List the policies in force (Egress and NetworkPolicy objects).
    List,
    /// Remove an Egress policy: NAME or NAMESPACE/NAME.
    Delete {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Which connections of the flow history a candidate policy would treat differently
    /// (allowed -> refused, refused -> allowed, direct -> proxied, ...), judged by the same
    /// compiler and decision as `apply`; nothing changes. Exit 0; with --fail-on-new-denies,
    /// 1 when some flow would become refused; 2 for an invalid file or unknown workload.
    Preview {
        /// The candidate: objects added to (or replacing those of) the live policy, as
        /// `policy apply -f` would; with --replace, the whole policy, as a reload would.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        replace: bool,
        /// FILE holds Kubernetes CRD objects (Egress, MeshConfig): a source may select pods
        /// that do not run on this node; the node agent's pods stay the workloads.
        #[arg(long)]
        kubernetes: bool,
        /// Only this workload's flows: NAME or NAMESPACE/NAME.
        #[arg(long, short = 'w', value_name = "NAME")]
        workload: Option<String>,
        /// Only flows seen within this long: 90s, 30m, 1h, 2d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// Exit 1 when the candidate would refuse a flow the policy in force lets through.
        #[arg(long)]
        fail_on_new_denies: bool,
        /// Without an agent: the policy in force from this file (with --history).
        #[arg(long, value_name = "FILE", requires = "history")]
        current: Option<PathBuf>,
        /// Without an agent: the flow history from this file (`flows --aggregate -o json`
        /// or the agent's saved <name>.flows.json; with --current).
        #[arg(long, value_name = "FILE", requires = "current")]
        history: Option<PathBuf>,
    },
    /// What the kernel decides for a workload's connection, and which object decides it.
    Check {
        #[arg(long, short = 'w', value_name = "NAME")]
        workload: String,
        /// IP, IP:PORT or [IPv6]:PORT.
        #[arg(value_name = "DEST[:PORT]")]
        destination: String,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        protocol: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Relay {
    Kernel,
    Splice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flows {
    Denied,
    All,
}

/// `90s`, `30m`, `1h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h, 2d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?} is not a duration like 90s, 30m, 1h, 2d")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(super::parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(super::parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            super::parse_duration("2d"),
            Ok(Duration::from_secs(172_800))
        );
        assert!(super::parse_duration("1w").is_err());
        assert!(super::parse_duration("h").is_err());
    }
}
