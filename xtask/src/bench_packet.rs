//! P1: what the per-packet `cgroup_skb/egress` program costs the allowed-direct path, measured
//! in pairs so that the machine's drift cancels out. Each round restarts the agent with the
//! program or without it (`EGRESS_NO_PACKET_PROGRAM=1`: its link is removed, the rest kept),
//! then measures `direct` and `egress-allow` back to back (their order alternating) on each
//! workload; the round's figure is egress-allow / direct. The variants alternate W N N W W N,
//! so each sees early and late rounds alike. A table of ratios, one row per workload and
//! variant; the verdict is the median of the with-program rounds, the without-program median
//! beside it.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    bench_env::Env,
    bench_measure::Mode,
    bench_report::{Row, Sample, Table, Verdict},
    bench_work::{self as work, Route},
};

/// true: the agent runs the per-packet program in that round.
const ROUNDS: [bool; 6] = [true, false, false, true, true, false];
const WORKLOADS: [&str; 3] = ["keep-alive", "new connections", "bulk"];

fn row_name(workload: &str, with: bool) -> String {
    let v = if with { "with" } else { "without" };
    format!("{workload}, egress-allow / direct, {v} the per-packet program")
}

/// One sample of `workload` (0 keep-alive, 1 new connections, 2 bulk) on `route`.
fn one(env: &Env, route: &Route, workload: usize, mode: &Mode) -> anyhow::Result<Sample> {
    match workload {
        0 => work::wrk(env, route, mode.wrk_secs, false),
        1 => work::wrk(env, route, mode.wrk_secs, true),
        _ => work::iperf(env, route, mode.iperf_secs),
    }
}

/// P1 on `routes` (`direct`, `egress-allow`); leaves the agent running without the program
/// (the last round's variant).
pub fn paired(
    env: &mut Env,
    cfg_file: &Path,
    routes: &[Route],
    mode: &Mode,
) -> anyhow::Result<Table> {
    eprintln!("==> P1: the per-packet program on the allowed-direct path, paired rounds");
    let mut t = Table {
        id: "P1",
        title: "the per-packet program's cost, paired rounds (egress-allow / direct, each round \
                back to back)"
            .into(),
        unit: "x direct",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: true,
        rows: WORKLOADS
            .iter()
            .flat_map(|w| [true, false].map(|with| row_name(w, with)))
            .map(|path| Row {
                path,
                samples: Vec::new(),
            })
            .collect(),
        note: Some(String::new()),
    };
    let mut raw = Vec::new();
    for (round, with) in ROUNDS.into_iter().enumerate() {
        env.stop("agent")?;
        let vars: &[&str] = if with {
            &[]
        } else {
            &["EGRESS_NO_PACKET_PROGRAM=1"]
        };
        env.start_agent(cfg_file, vars)?;
        for (w, name) in WORKLOADS.iter().enumerate() {
            let order: Vec<&Route> = if round % 2 == 0 {
                routes.iter().collect()
            } else {
                routes.iter().rev().collect()
            };
            let mut got = [None, None];
            for r in order {
                let s = one(env, r, w, mode)
                    .with_context(|| format!("P1 {name} on {} (round {})", r.name, round + 1))?;
                let i = usize::from(r.in_web);
                got[i] = Some(s);
            }
            let [Some(direct), Some(allow)] = got else {
                anyhow::bail!("P1 needs the routes direct and egress-allow");
            };
            let ratio = allow.value / direct.value;
            eprintln!(
                "    round {} {:<8} {:<16} direct {:>10.2} allow {:>10.2} = {ratio:.3}x",
                round + 1,
                if with { "with" } else { "without" },
                name,
                direct.value,
                allow.value
            );
            raw.push(format!(
                "{} {name} {:.2}/{:.2}",
                if with { "W" } else { "N" },
                allow.value,
                direct.value
            ));
            let errors = [&direct.errors, &allow.errors]
                .into_iter()
                .flatten()
                .cloned()
                .reduce(|a, b| format!("{a}; {b}"));
            t.rows[w * 2 + usize::from(!with)].samples.push(Sample {
                value: ratio,
                errors,
                ..allow
            });
        }
    }
    t.note = Some(format!(
        "each sample is one round's egress-allow / direct, measured back to back (rounds W N N \
         W W N: W with the per-packet program, N without; the agent restarted between rounds); \
         the median of each row's rounds is its value. Raw rounds (allow/direct): {}",
        raw.join(", ")
    ));
    Ok(t)
}

/// The verdicts: with the program >= 0.97x direct on each workload (the median of the paired
/// rounds), the same without it beside.
pub fn verdicts(p1: &Table) -> Vec<Verdict> {
    WORKLOADS
        .iter()
        .enumerate()
        .map(|(w, what)| {
            let (with, without) = (&p1.rows[w * 2], &p1.rows[w * 2 + 1]);
            let (r, r0) = (with.value(), without.value());
            let rounds = with
                .samples
                .iter()
                .map(|s| format!("{:.2}", s.value))
                .collect::<Vec<_>>()
                .join("/");
            let busy = with.busy() || without.busy();
            Verdict {
                target: format!("allow-direct with the packet program, {what} >= 0.97x (P1)"),
                measured: format!(
                    "{} (rounds {rounds}; without it: {}){}",
                    r.map_or("-".into(), |r| format!("{r:.2}x")),
                    r0.map_or("-".into(), |r| format!("{r:.2}x")),
                    if busy { " *busy*" } else { "" }
                ),
                pass: r.map(|r| r >= 0.97),
            }
        })
        .collect()
}
