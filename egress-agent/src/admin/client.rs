//! The CLI verbs that talk to a running agent (`egress`, `policy`, `flows`): one request on
//! the admin socket, the answer printed as a human table or as JSON.

use std::path::Path;

use serde_json::Value;

pub use super::ask::Failed;
use super::{
    ask::{ask, n, print_json, runtime, s, unreachable},
    cli::{EgressAction, Output, PolicyAction},
    protocol::{self, Request},
};

fn b(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn mode(enabled: bool) -> &'static str {
    if enabled {
        "enabled: unmatched destinations pass through"
    } else {
        "disabled: only what an Egress policy allows gets out"
    }
}

pub fn egress(socket: &Path, out: Output, action: EgressAction) -> Result<(), Failed> {
    let req = match action {
        EgressAction::Enable => Request::SetEgress { enable: true },
        EgressAction::Disable => Request::SetEgress { enable: false },
        EgressAction::Status => Request::Status,
    };
    let status = matches!(req, Request::Status);
    let v = ask(socket, req)?;
    if out == Output::Json {
        print_json(&v);
    } else if status {
        print_status(&v);
    } else {
        println!(
            "egress {} (policy generation {})",
            mode(b(&v, "enable_egress")),
            n(&v, "generation")
        );
    }
    Ok(())
}

fn print_status(v: &Value) {
    let list = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    println!("egress:       {}", mode(b(v, "enable_egress")));
    println!("fail mode:    {}", s(v, "fail_mode"));
    println!(
        "audit mode:   {}",
        if b(v, "audit_mode") { "on" } else { "off" }
    );
    println!("generation:   {}", n(v, "generation"));
    println!("rules:        {} Egress", n(v, "rules"));
    let entries: Vec<String> = list("map_entries")
        .iter()
        .filter_map(|e| Some(format!("{} {}", e.get(0)?.as_str()?, e.get(1)?.as_u64()?)))
        .collect();
    println!("map entries:  {}", entries.join(", "));
    let progs: Vec<String> = list("programs")
        .iter()
        .filter_map(|p| p.as_str().map(String::from))
        .collect();
    println!(
        "programs:     {} attached to {}",
        progs
            .iter()
            .filter(|p| !p.contains("(not attached"))
            .count(),
        s(v, "cgroup_root")
    );
    for p in progs {
        println!("              {p}");
    }
    let allowed: Vec<String> = list("sockets_allowed")
        .iter()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    let allowed = if allowed.is_empty() {
        "none".to_string()
    } else {
        allowed.join(", ")
    };
    println!("sockets:      tcp, udp, mptcp; also allowed: {allowed}");
    println!("              packet sockets: {}", s(v, "packet_sockets"));
    let port = n(v, "proxy_port");
    println!("proxy:        127.0.0.1:{port} [::1]:{port}");
    let wl = list("workloads");
    println!("workloads:    {}", wl.len());
    for w in wl {
        println!(
            "              {:<30} id {:<4} {}",
            s(&w, "name"),
            n(&w, "id"),
            s(&w, "cgroup")
        );
    }
}

pub fn policy(socket: &Path, out: Output, action: PolicyAction) -> Result<(), Failed> {
    match action {
        PolicyAction::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failed::new(format!("{}: cannot read: {e}", file.display()), 2))?;
            let v = ask(
                socket,
                Request::Apply {
                    file: file.display().to_string(),
                    text,
                },
            )?;
            if out == Output::Json {
                print_json(&v);
            } else if b(&v, "changed") {
                println!(
                    "applied {}: generation {}, {} Egress, {} workloads, {} map entries, egress {}",
                    file.display(),
                    n(&v, "generation"),
                    n(&v, "rules"),
                    n(&v, "workloads"),
                    n(&v, "entries"),
                    if b(&v, "enable_egress") {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
            } else {
                println!(
                    "unchanged: {} is already in force (generation {})",
                    file.display(),
                    n(&v, "generation")
                );
            }
        }
        PolicyAction::Delete { name } => {
            let v = ask(socket, Request::Delete { name: name.clone() })?;
            if out == Output::Json {
                print_json(&v);
            } else {
                println!("deleted Egress {name}: generation {}", n(&v, "generation"));
            }
        }
        PolicyAction::List => {
            let v = ask(socket, Request::List)?;
            if out == Output::Json {
                print_json(&v);
                return Ok(());
            }
            let join = |r: &Value, k: &str| {
                r.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|x| !x.is_empty())
                    .unwrap_or_else(|| "*".into())
            };
            println!(
                "{:<32} {:>4} {:<6} {:<7} {:<7} {:<24} {:<32} PORTS",
                "NAME", "ID", "ACTION", "VIA", "MODE", "SOURCES", "DESTINATIONS"
            );
            for r in v.as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<32} {:>4} {:<6} {:<7} {:<7} {:<24} {:<32} {}",
                    s(&r, "name"),
                    n(&r, "rule_id"),
                    s(&r, "action"),
                    s(&r, "via"),
                    s(&r, "mode"),
                    join(&r, "sources"),
                    join(&r, "destinations"),
                    join(&r, "ports")
                );
            }
        }
        PolicyAction::Preview {
            file,
            replace,
            kubernetes,
            workload,
            since,
            fail_on_new_denies,
            current,
            history,
        } => {
            let args = super::preview::PreviewArgs {
                file: &file,
                replace,
                kubernetes,
                workload,
                since,
                fail_on_new_denies,
                offline: current.as_deref().zip(history.as_deref()),
            };
            return super::preview::preview(socket, out, args);
        }
        PolicyAction::Check {
            workload,
            destination,
            protocol,
        } => {
            let v = ask(
                socket,
                Request::Check {
                    workload,
                    destination,
                    protocol,
                },
            )?;
            if out == Output::Json {
                print_json(&v);
                return Ok(());
            }
            println!(
                "{} {} {} -> {}: {}",
                s(&v, "workload"),
                s(&v, "protocol"),
                s(&v, "destination"),
                s(&v, "verdict"),
                s(&v, "reason")
            );
            if let Some(h) = v
                .get("hosts")
                .and_then(Value::as_array)
                .filter(|h| !h.is_empty())
            {
                let hosts: Vec<&str> = h.iter().filter_map(Value::as_str).collect();
                println!(
                    "  the proxy then judges the host (SNI or Host): {}",
                    hosts.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `flows [--follow] [--since D]`: the recent verdicts (those seen within `since`).
pub fn flows(
    socket: &Path,
    out: Output,
    follow: bool,
    since: Option<std::time::Duration>,
) -> Result<(), Failed> {
    let json = out == Output::Json;
    let since_ms = since.map_or(0, |d| {
        crate::telemetry::flows::now_ms().saturating_sub(d.as_millis() as u64)
    });
    let mut failure = None;
    runtime()?
        .block_on(protocol::call(socket, &Request::Flows { follow }, |r| {
            if !r.ok {
                eprintln!("egress-agent: {}", r.error);
                return true;
            }
            if n(&r.data, "time_ms") < since_ms {
                return true;
            }
            if json {
                println!("{}", serde_json::to_string(&r.data).unwrap_or_default());
            } else {
                let f = &r.data;
                println!(
                    "{:>13} {:<28} {:<40} {:<4} {:<14} {:<28} x{}",
                    n(f, "time_ms"),
                    s(f, "workload"),
                    s(f, "destination"),
                    s(f, "protocol"),
                    s(f, "verdict"),
                    s(f, "rule"),
                    n(f, "count")
                );
            }
            use std::io::Write as _;
            if std::io::stdout().flush().is_err() {
                failure = Some(Failed::new("stdout closed", 1));
                return false;
            }
            true
        }))
        .map_err(unreachable)?;
    failure.map_or(Ok(()), Err)
}
