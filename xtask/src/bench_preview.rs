//! W9: `egress-agent policy preview` of a candidate with 10,000 Egress rules against a flow
//! history of 100,000 entries, run without an agent (`--current`, `--history`): the whole
//! command (reading both policies and the history, compiling both, judging every flow twice)
//! and, as the agent reports it, the judging alone. Part of `cargo xtask bench`; alone with
//! `cargo xtask bench --preview` (no root, no network namespace).

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{bail, Context as _};

use crate::{
    bench_measure::REPS,
    bench_report::{Row, Sample, Table, Verdict},
    bench_work,
};

pub const RULES: usize = 10_000;
pub const FLOWS: usize = 100_000;
const WORKLOADS: usize = 10;

/// The address of rule `i`'s destination.
fn addr(i: usize) -> String {
    format!("100.64.{}.{}", i / 256, i % 256)
}

/// /32 rules per Egress object (a file holds at most 1024 documents).
const PER_EGRESS: usize = 100;

/// The workload of rule `i`'s Egress object.
fn workload(i: usize) -> usize {
    (i / PER_EGRESS) % WORKLOADS
}

/// A policy of [`RULES`] /32 rules in Egress objects of [`PER_EGRESS`], over [`WORKLOADS`]
/// workloads: allows; every 20th object a host rule (via the proxy), every 10th a deny,
/// every 5th only port 443. `candidate`: rule 101 (an allow) removed and a deny added for
/// rule 201's address.
fn policy(candidate: bool) -> String {
    let mut s = String::from(
        "kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}}\n",
    );
    for w in 0..WORKLOADS {
        let _ = write!(s, "---\nkind: Workload\nmetadata: {{name: w{w}}}\n");
    }
    for g in 0..RULES / PER_EGRESS {
        let ips: Vec<String> = (g * PER_EGRESS..(g + 1) * PER_EGRESS)
            .filter(|&i| !(candidate && i == 101))
            .map(|i| format!("{}/32", addr(i)))
            .collect();
        let ips = ips.join(", ");
        let spec = if g % 20 == 0 {
            format!("hosts: [h{g}.example], ipAddresses: [{ips}], ports: [{{number: 443, protocol: https}}]")
        } else if g % 10 == 0 {
            format!("ipAddresses: [{ips}], action: deny")
        } else if g % 5 == 0 {
            format!("ipAddresses: [{ips}], ports: [{{number: 443}}]")
        } else {
            format!("ipAddresses: [{ips}]")
        };
        let _ = write!(
            s,
            "---\nkind: Egress\nmetadata: {{name: g{g}}}\nspec: {{sources: [{{name: w{}}}], {spec}}}\n",
            g % WORKLOADS
        );
    }
    if candidate {
        let _ = write!(
            s,
            "---\nkind: Egress\nmetadata: {{name: new-deny}}\nspec: {{sources: [{{name: w{}}}], ipAddresses: [{}/32], action: deny}}\n",
            workload(201),
            addr(201)
        );
    }
    s
}

/// [`FLOWS`] distinct history entries: each rule's workload to its address on ten ports
/// (hosts named for host rules), one in ten to an address no rule names.
fn history() -> String {
    let mut s = String::from("[");
    for k in 0..FLOWS {
        let (j, port) = (k % RULES, 440 + (k / RULES) as u16);
        let ip = if k % 10 == 9 {
            format!("198.18.{}.{}", j / 256, j % 256)
        } else {
            addr(j)
        };
        let (g, workload) = (j / PER_EGRESS, workload(j));
        let host = if g % 20 == 0 {
            format!(",\"host\":\"h{g}.example\"")
        } else {
            String::new()
        };
        if k > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"workload\":\"default/w{workload}\",\"ip\":\"{ip}\",\"port\":{port},\"proto\":6{host},\"first_ms\":{k},\"last_ms\":{k},\"count\":1,\"verdict\":\"allow\",\"rule\":\"\"}}"
        );
    }
    s.push(']');
    s
}

/// W9, with the files written under `work`.
pub fn measure(agent: &Path, work: &Path) -> anyhow::Result<Table> {
    eprintln!("==> W9: policy preview, {RULES} rules x {FLOWS} history entries");
    fs::create_dir_all(work)?;
    let (cur, cand, hist) = (
        work.join("preview-current.yaml"),
        work.join("preview-candidate.yaml"),
        work.join("preview-history.json"),
    );
    fs::write(&cur, policy(false))?;
    fs::write(&cand, policy(true))?;
    fs::write(&hist, history())?;
    let mut whole = Row {
        path: "whole command".into(),
        samples: Vec::new(),
    };
    let mut judging = Row {
        path: "judging only".into(),
        samples: Vec::new(),
    };
    for _ in 0..REPS {
        let (load, procs_running) = bench_work::load();
        let t = Instant::now();
        let out = std::process::Command::new(agent)
            .args(["-o", "json", "policy", "preview", "--replace", "-f"])
            .arg(&cand)
            .arg("--current")
            .arg(&cur)
            .arg("--history")
            .arg(&hist)
            .output()
            .context("run egress-agent policy preview")?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "policy preview failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let judge_ms = field(&text, "judge_ms").context("no judge_ms in the preview")?;
        let changes = text.matches("\"destination\"").count();
        // Rule 101's address on its ten ports, rule 201's on its ten: nothing else.
        if changes != 20 {
            bail!("policy preview listed {changes} changes, not 20:\n{text}");
        }
        let sample = |value| Sample {
            value,
            load,
            procs_running,
            ..Sample::default()
        };
        whole.samples.push(sample(secs));
        judging.samples.push(sample(judge_ms / 1e3));
    }
    Ok(Table {
        id: "W9",
        title: format!(
            "egress-agent policy preview: a {RULES}-rule candidate against {FLOWS} history entries"
        ),
        unit: "s",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows: vec![whole, judging],
        note: Some(
            "whole command: reading and compiling both policies and loading the history \
             (--current/--history, no agent); judging only: both verdicts for every entry"
                .into(),
        ),
    })
}

/// A number field of the preview's JSON answer.
fn field(json: &str, name: &str) -> Option<f64> {
    let rest = json.split_once(&format!("\"{name}\": "))?.1;
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// The W9 target.
pub fn verdict(w9: &Table) -> Verdict {
    let v = w9.value("whole command");
    let busy = w9.rows.iter().any(Row::busy);
    Verdict {
        target: format!("preview {RULES} rules x {FLOWS} flows < 1 s"),
        measured: format!(
            "{}{}",
            v.map_or("-".into(), |v| format!("{v:.3} s")),
            if busy { " *busy*" } else { "" }
        ),
        pass: v.map(|v| v < 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_have_the_advertised_size() {
        let (cur, cand) = (policy(false), policy(true));
        assert_eq!(cur.matches("/32").count(), RULES);
        assert_eq!(cand.matches("/32").count(), RULES);
        assert!(cur.matches("\n---\n").count() < 1024);
        assert_eq!(history().matches("\"workload\"").count(), FLOWS);
        assert_eq!(field("{\n  \"judge_ms\": 12.5,\n}", "judge_ms"), Some(12.5));
    }
}
