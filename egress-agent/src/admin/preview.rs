//! `policy preview` and `flows --aggregate`, both sides: the agent judges its flow history
//! under the live and a candidate policy ([`serve`]); the CLI prints the history
//! ([`history`]) and the flows whose verdict would change ([`preview`]).

use std::{path::Path, time::Duration};

use serde_json::Value;

use super::{
    cli::Output,
    client::{ask, print_json, Failed},
    protocol::{Request, Response},
};
use crate::{
    control::Control,
    policy::{preview, ObjectRef},
    telemetry::{flows::now_ms, history::History},
};

/// The agent's side of `policy preview`: an invalid candidate or an unknown workload is the
/// caller's fault (exit 2); nothing is applied either way.
pub fn serve(
    c: &Control,
    history: &History,
    file: &str,
    text: &str,
    replace: bool,
    workload: Option<String>,
    since_ms: u64,
) -> Response {
    let candidate = match c.candidate(text, file, replace) {
        Ok(p) => p,
        Err(e) => return Response::err(&e, e.is_invalid()),
    };
    let current = c.live.get();
    let workload = match workload.map(|w| w.parse::<ObjectRef>()).transpose() {
        Ok(w) => w,
        Err(e) => return Response::err(e, true),
    };
    if let Some(w) = &workload {
        if current.workload_id(w).is_none() && candidate.workload_id(w).is_none() {
            return Response::err(
                format!("no Workload {w} in the live policy or in {file}"),
                true,
            );
        }
    }
    let flows = history.since(since_ms);
    let name = workload.map(|w| w.to_string());
    let changes = preview::preview(&current, &candidate, &flows, name.as_deref());
    Response::ok(preview::Preview::new(flows.len(), changes))
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

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
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
    pub workload: Option<String>,
    pub since: Option<Duration>,
    pub fail_on_new_denies: bool,
}

/// `policy preview -f FILE`: per workload, the flows whose verdict would change.
pub fn preview(socket: &Path, out: Output, a: PreviewArgs<'_>) -> Result<(), Failed> {
    let text = std::fs::read_to_string(a.file)
        .map_err(|e| Failed::new(format!("{}: cannot read: {e}", a.file.display()), 2))?;
    let v = ask(
        socket,
        Request::Preview {
            file: a.file.display().to_string(),
            text,
            replace: a.replace,
            workload: a.workload,
            since_ms: since_ms(a.since),
        },
    )?;
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
