use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use egress_agent::{
    admin::{
        cli::{Cli, Command, EgressAction, Flows, LogFormat, Relay},
        client, local, preview,
    },
    datapath::cgroups as workload,
    gateway, k8s, policy, run,
};

fn main() -> ExitCode {
    let cli = Cli::parse(); // bad usage exits 2 with clap's message
    init_tracing(cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-agent: {}", one_line(&e));
            ExitCode::from(exit_status(&e))
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let (socket, out) = (cli.admin_socket, cli.output);
    match cli.command {
        Command::Run {
            config,
            cgroup_root,
            pin_dir,
            allow_root_cgroup,
            node_interfaces,
            flows,
            relay,
            state_file,
            history_size,
            history_file,
            metrics_addr,
            kubernetes,
            node_name,
            mesh_config,
        } => {
            let kubernetes = kubernetes.then(|| k8s::Options {
                node: node_name.unwrap_or_default(),
                mesh_config,
            });
            let opts = run::RunOptions {
                config: config.unwrap_or_else(|| "(kubernetes)".into()),
                kubernetes,
                cgroup_root: cgroup_root.unwrap_or_else(workload::default_root),
                pin_dir,
                allow_root_cgroup,
                node_interfaces,
                all_flows: flows == Flows::All,
                kernel_relay: relay == Relay::Kernel,
                admin_socket: socket,
                metrics_addr,
                state_file,
                history_file,
                history_size,
            };
            // Before any thread: at most two glibc arenas (memory that comes back, see trim).
            egress_agent::telemetry::trim::limit_arenas();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(egress_agent::datapath::listen::ACCEPTORS)
                .enable_all()
                .build()?
                .block_on(run::run(opts))
        }
        Command::Exec {
            workload,
            cgroup_root,
            cmd,
        } => local::exec(
            &cgroup_root.unwrap_or_else(workload::default_root),
            &workload,
            &cmd,
        ),
        Command::Validate { config, kubernetes } => {
            let cfg = if kubernetes {
                let text = std::fs::read_to_string(&config)
                    .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", config.display()))?;
                policy::parse_unlinked(&text, &config.display().to_string())?
            } else {
                policy::load(&config)?
            };
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
        Command::Convert { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| policy::ConfigError::unreadable(&file.display().to_string(), &e))?;
            print!(
                "{}",
                policy::convert::convert(&text, &file.display().to_string())?
            );
            Ok(())
        }
        Command::Gateway {
            config,
            metrics_addr,
            check,
        } => {
            if check {
                let g = gateway::settings::load(&config)?;
                println!(
                    "{}: valid: GatewayServer {}, {} listeners, {} allow rules",
                    config.display(),
                    g.name,
                    g.spec.listeners.len(),
                    g.spec.allow.len()
                );
                return Ok(());
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(gateway::server::run(config, metrics_addr))
        }
        Command::Egress {
            action,
            kubernetes: true,
            mesh_config,
            wait,
        } => {
            let enable = match action {
                EgressAction::Enable => Some(true),
                EgressAction::Disable => Some(false),
                EgressAction::Status => None,
            };
            let wait = std::time::Duration::from_secs(wait);
            Ok(k8s::toggle::run(enable, &mesh_config, wait, out)?)
        }
        Command::Egress { action, .. } => Ok(client::egress(&socket, out, action)?),
        Command::Policy { action } => Ok(client::policy(&socket, out, action)?),
        Command::Flows {
            json,
            aggregate: true,
            since,
            ..
        } => Ok(preview::history(&socket, out.or_json(json), since)?),
        Command::Flows {
            follow,
            json,
            since,
            ..
        } => Ok(client::flows(&socket, out.or_json(json), follow, since)?),
        Command::Dns { json } => Ok(client::dns(&socket, out, json)?),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "egress-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Uninstall {
            pin_dir,
            cgroup_root,
            state_file,
        } => local::uninstall(
            &pin_dir,
            &cgroup_root.unwrap_or_else(workload::default_root),
            &state_file.unwrap_or_else(|| run::default_state_file(&pin_dir)),
        ),
    }
}

/// Invalid input is exit status 2, everything else 1.
fn exit_status(e: &anyhow::Error) -> u8 {
    if let Some(f) = e.downcast_ref::<client::Failed>() {
        return f.status;
    }
    let usage = e.downcast_ref::<policy::ConfigError>().is_some()
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}
