use std::process::ExitCode;

use clap::Parser as _;
use egress_agent::{
    cli::{Cli, Command},
    config, policy, run, workload,
};

fn main() -> ExitCode {
    let cli = Cli::parse(); // bad usage exits 2 with clap's message
    init_tracing();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-agent: {}", one_line(&e));
            ExitCode::from(exit_status(&e))
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            cgroup_root,
            pin_dir,
            allow_root_cgroup,
            flows,
        } => {
            let opts = run::RunOptions {
                all_flows: flows == egress_agent::cli::Flows::All,
                config,
                cgroup_root: cgroup_root.unwrap_or_else(workload::default_root),
                pin_dir,
                allow_root_cgroup,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run::run(opts))
        }
        Command::Exec {
            workload,
            cgroup_root,
            cmd,
        } => run::exec(
            &cgroup_root.unwrap_or_else(workload::default_root),
            &workload,
            &cmd,
        ),
        Command::Validate { config } => {
            let cfg = config::load(&config)?;
            let c = policy::compile(&cfg)?;
            println!(
                "{}: valid: {} workloads, {} egress rules, {} map entries, enableEgress {}",
                config.display(),
                c.workloads.len(),
                c.rules.len(),
                c.v4.len() + c.v6.len(),
                c.config.enable_egress != 0
            );
            Ok(())
        }
        Command::Uninstall {
            pin_dir,
            cgroup_root,
        } => run::uninstall(
            &pin_dir,
            &cgroup_root.unwrap_or_else(workload::default_root),
        ),
    }
}

/// Invalid input is exit status 2, everything else 1.
fn exit_status(e: &anyhow::Error) -> u8 {
    let usage = e.downcast_ref::<config::ConfigError>().is_some()
        || e.downcast_ref::<policy::CompileError>().is_some()
        || matches!(
            e.downcast_ref::<workload::CgroupError>(),
            Some(
                workload::CgroupError::RootRefused(_)
                    | workload::CgroupError::NotCgroup2(..)
                    | workload::CgroupError::NoWorkload(..)
            )
        );
    if usage {
        2
    } else {
        1
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
