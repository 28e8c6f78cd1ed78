//! Project tasks: `cargo xtask setup | test | demo | bench | layout` (the alias lives in `.cargo/config.toml`).

mod bench;
mod bench_cpu;
mod bench_dns;
mod bench_env;
mod bench_gateway;
mod bench_hosts;
mod bench_kernel;
mod bench_measure;
mod bench_memory;
mod bench_packet;
mod bench_preview;
mod bench_proxy;
mod bench_readme;
mod bench_relay;
mod bench_report;
mod bench_syscalls;
mod bench_versus;
mod bench_work;
mod cmd;
mod layout;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project tasks for egress"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build, the tests and the demo need (scripts/setup.sh, idempotent).
    Setup,
    /// Setup, then fmt --check, layout, clippy -D warnings and every test (as root).
    Test {
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- --nocapture`).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Setup, build the release agent and run scripts/demo.sh and scripts/demo-pods.sh with it
    /// (as root).
    Demo,
    /// Benchmark the datapath against direct and a peer, in a network namespace (as root).
    Bench {
        /// Short runs, 10k rules (the default; about 10 minutes).
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// Longer runs, 100k rules too; also writes docs/benchmarks.md and the README's
        /// performance table.
        #[arg(long)]
        full: bool,
        /// Instead: the egress gateway paths (HTTP/2 tunnel, SOCKS5) against direct and
        /// redsocks → dante/squid; writes docs/benchmarks-gateway.md.
        #[arg(long, conflicts_with_all = ["quick", "full"])]
        gateway: bool,
        /// Instead: only W9, `policy preview` of a 10k-rule candidate against 100k history
        /// entries, without an agent (no root).
        #[arg(long, conflicts_with_all = ["quick", "full", "gateway"])]
        preview: bool,
        /// Instead: only W1h, proxied keep-alive with every request judged by Host against
        /// the same relayed unjudged (nginx and the agent only; about a minute; as root).
        #[arg(long, conflicts_with_all = ["gateway", "preview", "dns", "proxy"])]
        host_judging: bool,
        /// Instead: only the proxy's and the toggle's workloads (W10 toggle with 100k
        /// rules, W11 a burst of 10,000 connections, W12 memory), the agent and a banner
        /// server alone in the namespace (as root).
        #[arg(long, conflicts_with_all = ["quick", "full", "gateway", "preview", "dns"])]
        proxy: bool,
        /// Instead: the proxy's relay in the kernel (sockmap) against splice, side by side
        /// with a direct baseline: keep-alive, new connections, bulk (R1-R3; as root).
        #[arg(long, conflicts_with_all = ["quick", "gateway", "preview", "dns", "proxy", "host_judging"])]
        relay: bool,
        /// Instead: only the DNS tables (D1-D3: round trip through the agent's DNS proxy vs
        /// straight to dnsmasq, connect() with 10k learned names); under a minute.
        #[arg(long, conflicts_with_all = ["quick", "full", "gateway", "preview"])]
        dns: bool,
        /// Instead: the proxy against its peers only: W1-W3 on direct, egress-proxy, haproxy
        /// and nginx stream, then S1-S4, the system calls and wake-ups of each proxy per
        /// request and per connection (perf stat); a few minutes (as root).
        #[arg(long, conflicts_with_all = ["quick", "full", "gateway", "preview", "dns", "proxy", "host_judging"])]
        syscalls: bool,
        /// Instead: only the per-packet program: its run time per packet on keep-alive, new
        /// connections and bulk (K2), and P1, its cost to the allowed-direct path in paired
        /// rounds (as root; about 5 minutes, --full about 12).
        #[arg(long, conflicts_with_all = ["quick", "gateway", "preview", "dns", "proxy", "host_judging", "relay", "syscalls"])]
        packet: bool,
    },
    /// Check the source layout: no import cycle between files, no file over 600 lines.
    Layout {
        /// Also print every import edge between files, with the names that make it.
        #[arg(long)]
        edges: bool,
    },
}

fn main() -> ExitCode {
    let root = cmd::workspace_root();
    let result = match Cli::parse().task {
        Task::Setup => cmd::setup(&root),
        Task::Test { args } => cmd::test(&root, &args),
        Task::Demo => cmd::demo(&root),
        Task::Bench { gateway: true, .. } => bench_gateway::bench(&root),
        Task::Bench { preview: true, .. } => bench::preview_only(&root),
        Task::Bench {
            host_judging: true,
            full,
            ..
        } => bench::host_judging_only(&root, full),
        Task::Bench { proxy: true, .. } => bench::proxy_only(&root),
        Task::Bench {
            relay: true, full, ..
        } => bench_relay::relay_only(&root, full),
        Task::Bench { dns: true, .. } => bench_dns::bench(&root),
        Task::Bench { syscalls: true, .. } => bench_versus::bench(&root),
        Task::Bench {
            packet: true, full, ..
        } => bench::packet_only(&root, full),
        Task::Bench { full, .. } => bench::bench(&root, full),
        Task::Layout { edges } => layout::layout(&root, edges),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
