//! `policy preview` and `flows --aggregate`, both sides: the agent judges its flow history
//! under the live and a candidate policy ([`serve`]); the CLI prints the history
//! ([`history`]) and the flows whose verdict would change ([`preview`]).

use std::{path::Path, time::Duration};

use serde_json::Value;

use super::{
    ask::{ask, n, print_json, s, Failed},
    cli::Output,
    protocol::{Request, Response},
};
use crate::{
    control::{Control, ControlError},
    policy::{self, preview, Compiled, ObjectRef, Store},
    telemetry::{
        flows::now_ms,
        history::{FlowRecord, History},
    },
};

/// The agent's side of `policy preview`: an invalid candidate or an unknown workload is the
/// caller's fault (exit 2); nothing is applied either way.
pub fn serve(
    c: &Control,
    history: &History,
    candidate: Result<Compiled, ControlError>,
    file: &str,
    workload: Option<String>,
    since_ms: u64,
) -> Response {
    let candidate = match candidate {
        Ok(p) => p,
        Err(e) => return Response::err(&e, e.is_invalid()),
    };
    let flows = history.since(since_ms);
    match judge(&c.live.get(), &candidate, &flows, workload, file) {
        Ok(p) => Response::ok(p),
        Err(e) => Response::err(e, true),
    }
}

/// The preview of `candidate` (from `file`) against the policy in force, for the flows of
/// `workload` (all when None). Err: the workload is in neither policy, or not a name.
fn judge(
    current: &Compiled,
    candidate: &Compiled,
    flows: &[FlowRecord],
    workload: Option<String>,
    file: &str,
) -> Result<preview::Preview, String> {
    let t0 = std::time::Instant::now();
    let workload = workload.map(|w| w.parse::<ObjectRef>()).transpose()?;
    if let Some(w) = &workload {
        if current.workload_id(w).is_none() && candidate.workload_id(w).is_none() {
            return Err(format!(
                "no Workload {w} in the policy in force or in {file}"
            ));
        }
    }
    let name = workload.map(|w| w.to_string());
    let changes = preview::preview(current, candidate, flows, name.as_deref());
    let mut p = preview::Preview::new(flows.len(), changes);
    p.judge_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(p)
}

/// `policy preview --current FILE --history FILE`: the same, without an agent: the policy in
/// force and the history (`flows --aggregate -o json`, or the agent's saved history) are read
/// from files. Bad input is exit status 2.
fn offline(a: &PreviewArgs<'_>, current: &Path, history: &Path) -> Result<Value, Failed> {
    let bad = |e: &dyn std::fmt::Display| Failed::new(e.to_string(), 2);
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| Failed::new(format!("{}: cannot read: {e}", p.display()), 2))
    };
    let (cur_file, file) = (current.display().to_string(), a.file.display().to_string());
    let store = Store::parse_fragment(&read(current)?, &cur_file).map_err(|e| bad(&e))?;
    let cur_cfg = Store::default()
        .candidate(&store, &cur_file, false, a.kubernetes)
        .map_err(|e| bad(&e))?;
    let cur = policy::compile(&cur_cfg).map_err(|e| bad(&e))?;
    let add = Store::parse_fragment(&read(a.file)?, &file).map_err(|e| bad(&e))?;
    let cfg = store
        .candidate(&add, &file, a.replace, a.kubernetes)
        .map_err(|e| bad(&e))?;
    let cand = policy::compile_stable(&cfg, &cur.ids()).map_err(|e| bad(&e))?;
    let flows = History::load(history, usize::MAX)
        .map_err(|e| bad(&e))?
        .since(since_ms(a.since));
    let p = judge(&cur, &cand, &flows, a.workload.clone(), &file).map_err(|e| bad(&e))?;
    serde_json::to_value(p).map_err(|e| Failed::new(e.to_string(), 1))
}

fn since_ms(since: Option<Duration>) -> u64 {
    since.map_or(0, |d| now_ms().saturating_sub(d.as_millis() as u64))
}

/// `5s ago`, `3m ago`, `2h ago`, `4d ago`.
fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn destination(v: &Value) -> String {
    let ip = s(v, "ip");
    if ip.contains(':') {
        format!("[{ip}]:{}", n(v, "port"))
    } else {
        format!("{ip}:{}", n(v, "port"))
    }
}

/// `flows --aggregate [--since D]`: the flow history, most recent first.
pub fn history(socket: &Path, out: Output, since: Option<Duration>) -> Result<(), Failed> {
    let v = ask(
        socket,
        Request::History {
            since_ms: since_ms(since),
        },
    )?;
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<28} {:<40} {:<5} {:<24} {:<14} {:<28} {:>8} {:>9} {:>9}",
        "WORKLOAD", "DESTINATION", "PROTO", "HOST", "VERDICT", "RULE", "COUNT", "FIRST", "LAST"
    );
    for r in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{:<28} {:<40} {:<5} {:<24} {:<14} {:<28} {:>8} {:>9} {:>9}",
            s(&r, "workload"),
            destination(&r),
            egress_common::proto::name(n(&r, "proto") as u8),
            s(&r, "host"),
            s(&r, "verdict"),
            s(&r, "rule"),
            n(&r, "count"),
            ago(n(&r, "first_ms")),
            ago(n(&r, "last_ms")),
        );
    }
    Ok(())
}

/// The options of `policy preview`.
pub struct PreviewArgs<'a> {
    pub file: &'a Path,
    pub replace: bool,
    pub kubernetes: bool,
    pub workload: Option<String>,
    pub since: Option<Duration>,
    pub fail_on_new_denies: bool,
    /// Offline: the policy in force and the history, from files.
    pub offline: Option<(&'a Path, &'a Path)>,
}

/// `policy preview -f FILE`: per workload, the flows whose verdict would change.
pub fn preview(socket: &Path, out: Output, a: PreviewArgs<'_>) -> Result<(), Failed> {
    let v = match a.offline {
        Some((current, history)) => offline(&a, current, history)?,
        None => {
            let text = std::fs::read_to_string(a.file)
                .map_err(|e| Failed::new(format!("{}: cannot read: {e}", a.file.display()), 2))?;
            let req = Request::Preview {
                file: a.file.display().to_string(),
                text,
                replace: a.replace,
                kubernetes: a.kubernetes,
                workload: a.workload.clone(),
                since_ms: since_ms(a.since),
            };
            ask(socket, req)?
        }
    };
    let changes = v
        .get("changes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if out == Output::Json {
        print_json(&v);
    } else {
        print_changes(&v, &changes);
    }
    let new_denies = n(&v, "new_denies");
    if a.fail_on_new_denies && new_denies > 0 {
        return Err(Failed::new(
            format!(
                "{} would refuse {new_denies} flow(s) that are let through now",
                a.file.display()
            ),
            1,
        ));
    }
    Ok(())
}

fn print_changes(v: &Value, changes: &[Value]) {
    println!(
        "{} of {} flows in the history would change ({} newly refused)",
        changes.len(),
        n(v, "flows"),
        n(v, "new_denies")
    );
    let mut workload = "";
    for c in changes {
        if s(c, "workload") != workload {
            workload = s(c, "workload");
            println!("{workload}:");
        }
        let judged = |k: &str| c.get(k).cloned().unwrap_or_default();
        let (before, after) = (judged("before"), judged("after"));
        let rule = match s(&after, "rule") {
            "" => format!("({})", s(&after, "verdict")),
            r => format!("by Egress {r} ({})", s(&after, "verdict")),
        };
        let host = match s(c, "host") {
            "" => String::new(),
            h => format!(" host {h}"),
        };
        println!(
            "  {} {}{host}: {} -> {} {rule}, x{} last {}",
            s(c, "protocol"),
            s(c, "destination"),
            s(&before, "route"),
            s(&after, "route"),
            n(c, "count"),
            ago(n(c, "last_ms")),
        );
    }
}
