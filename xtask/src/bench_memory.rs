//! W12 of `cargo xtask bench --proxy`: the agent's resident memory (VmRSS) idle, with 10,000
//! idle proxied connections, 30 s after they closed, at its peak during a 100k-rule
//! `policy apply` (VmHWM, reset first through /proc/PID/clear_refs) and after the policy went
//! back to the bench's 3 rules. The cost of one idle proxied connection is taken per round,
//! (RSS held - RSS idle just before) / the connections burst.py reports served (each one got
//! the server's banner through the proxy, so it is established and relaying), and the
//! verdict is the median of the rounds. Each RSS figure while connections are held is the
//! median of [`READS`] reads, the first [`QUIET_MS`] after the last banner.

use std::{fs, path::Path, thread, time::Duration};

use anyhow::Context as _;

use crate::{
    bench_env::Env,
    bench_measure::REPS,
    bench_report::{Row, Sample, Table, Verdict},
    bench_work as work,
};

/// Idle proxied connections held open.
pub const HELD: u32 = 10_000;
/// How long after the connections closed (or the policy shrank) RSS is read again.
const SETTLE_SECS: u64 = 30;

/// Reads of VmRSS while the connections are held (their median is the figure), and the
/// time between two.
const READS: usize = 5;
const QUIET_MS: u64 = 500;

const ROWS: [&str; 6] = [
    "idle",
    "with 10000 idle proxied connections",
    "30 s after they closed",
    "peak during a 100k-rule apply",
    "30 s after going back to 3 rules",
    "per idle proxied connection (KiB, not MiB): (held - idle) / connections served",
];

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// VmHWM (peak RSS) of `pid`, in KiB.
fn hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    work::rss_kib(pid).context("cannot read the agent's VmRSS")
}

/// The median of [`READS`] reads of VmRSS, [`QUIET_MS`] apart, the first after as long.
fn steady_rss(pid: u32) -> anyhow::Result<u64> {
    let mut reads = Vec::with_capacity(READS);
    for _ in 0..READS {
        thread::sleep(Duration::from_millis(QUIET_MS));
        reads.push(rss(pid)?);
    }
    reads.sort_unstable();
    Ok(reads[READS / 2])
}

/// `served=N` of burst.py's line.
fn served(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("served="))?
        .parse()
        .ok()
}

/// W12, `REPS` rounds; the burst server of W11 must listen on 2222.
pub fn memory(env: &mut Env, root: &Path, agent: u32) -> anyhow::Result<Table> {
    eprintln!("==> W12: the agent's memory");
    let script = root.join("scripts/bench/burst.py").display().to_string();
    let mut rows: Vec<Row> = ROWS
        .iter()
        .map(|p| Row {
            path: p.to_string(),
            samples: Vec::new(),
        })
        .collect();
    let n = HELD.to_string();
    // Long enough to read RSS while they are open.
    let hold = "8";
    for rep in 0..REPS {
        let base = work::new_sample();
        let at = |kib: u64| Sample {
            value: mib(kib),
            ..base.clone()
        };
        let idle = steady_rss(agent)?;
        let name = format!("hold-{rep}");
        let argv = env.in_web(&["python3", &script, "hold", "127.61.0.1", "2222", &n, hold]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        env.spawn(&name, &argv)?;
        env.wait_log(&name, &["served="], 60)?;
        let line = fs::read_to_string(env.log(&name))?;
        // Fewer held than asked is reported (flag); the per-connection figure divides by the
        // connections served.
        let short = (!line.contains(&format!("served={HELD} ")))
            .then(|| format!("held: {} ({})", line.trim(), work::agent_refusals(env)));
        let held = steady_rss(agent)?;
        let count = served(&line).filter(|&n| n > 0);
        env.wait_log(&name, &["closed"], 60)?;
        env.stop(&name)?;
        thread::sleep(Duration::from_secs(SETTLE_SECS));
        let after = rss(agent)?;

        fs::write(format!("/proc/{agent}/clear_refs"), "5")
            .context("cannot reset the agent's peak RSS (/proc/PID/clear_refs)")?;
        work::apply(env, 100_000, 9_000_000 + rep as u32 * 200_000)?;
        let peak = hwm_kib(agent).context("cannot read VmHWM")?;
        let (a, sock) = (
            env.agent.display().to_string(),
            env.sock.display().to_string(),
        );
        env.ns_run(&[
            &a,
            "--admin-socket",
            &sock,
            "policy",
            "delete",
            "default/bulk-rules",
        ])?;
        thread::sleep(Duration::from_secs(SETTLE_SECS));
        let back = rss(agent)?;
        // The bench's own policy again for what follows.
        work::apply(env, 10_000, 0)?;
        for (row, kib) in rows.iter_mut().zip([idle, held, after, peak, back]) {
            row.samples.push(at(kib));
        }
        rows[1].samples.last_mut().expect("pushed").errors = short;
        if let Some(n) = count {
            rows[5].samples.push(Sample {
                value: (held as f64 - idle as f64) / n as f64,
                ..base.clone()
            });
        }
    }
    Ok(Table {
        id: "W12",
        title: format!(
            "the agent's resident memory (VmRSS; the apply's peak is VmHWM): idle with the \
             bench's 10k rules, {HELD} idle proxied connections held by burst.py (idle and \
             held: the median of {READS} reads {QUIET_MS} ms apart), {SETTLE_SECS} s after \
             they closed, a 100k-rule apply, back to 3 rules; per connection: each round's \
             (held - idle) over the connections served in it (each got the banner through \
             the proxy)"
        ),
        unit: "MiB",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows,
        note: None,
    })
}

/// The verdicts on W12, each from the medians.
pub fn verdicts(w12: &Table) -> Vec<Verdict> {
    let v = |i: usize| w12.value(ROWS[i]);
    let busy = if w12.rows.iter().any(Row::busy) {
        " *busy*"
    } else {
        ""
    };
    let idle = v(0);
    let per_conn = v(5);
    let spread = w12.rows.get(5).map_or(String::new(), |r| {
        let mut s: Vec<f64> = r.samples.iter().map(|s| s.value).collect();
        s.sort_by(f64::total_cmp);
        match (s.first(), s.last()) {
            (Some(a), Some(b)) => format!(" ({a:.2}-{b:.2} over {} rounds)", s.len()),
            _ => String::new(),
        }
    });
    let ratio = |i: usize| idle.zip(v(i)).map(|(a, b)| b / a);
    let above = idle.zip(v(3)).map(|(a, p)| p - a);
    let x = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x idle"));
    vec![
        Verdict {
            target: "memory per idle proxied connection <= 4 KiB".into(),
            measured: format!(
                "{}{spread}{busy}",
                per_conn.map_or("-".into(), |k| format!("{k:.2} KiB"))
            ),
            pass: per_conn.map(|k| k <= 4.0),
        },
        Verdict {
            target: "RSS 30 s after the connections closed <= 1.25x idle".into(),
            measured: format!("{}{busy}", x(ratio(2))),
            pass: ratio(2).map(|r| r <= 1.25),
        },
        Verdict {
            target: "RSS peak during a 100k-rule apply <= idle + 64 MiB".into(),
            measured: format!(
                "{}{busy}",
                above.map_or("-".into(), |m| format!("+{m:.1} MiB"))
            ),
            pass: above.map(|m| m <= 64.0),
        },
        Verdict {
            target: "RSS after deleting it back to 3 rules <= 1.25x idle".into(),
            measured: format!("{}{busy}", x(ratio(4))),
            pass: ratio(4).map(|r| r <= 1.25),
        },
    ]
}
