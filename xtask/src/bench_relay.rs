//! `cargo xtask bench --relay`: the proxy's relay in the kernel (`run --relay kernel`, a BPF
//! sockmap stream verdict) against splice (`--relay splice`), side by side in one run, with
//! a direct connection as the baseline: R1 keep-alive HTTP (req/s, the agent's CPU per
//! request, and the whole machine's: the kernel relay's work runs in softirq and kernel
//! workers, which the agent's own CPU time does not show), R2 a new connection per request,
//! R3 bulk (iperf3). The agent is restarted with the other relay between paths; each point
//! is the median of 3 interleaved samples.

use std::{fs, path::Path};

use anyhow::Context as _;

use crate::{
    bench::{machine, start_nginx},
    bench_env::{ensure_packages, release_agent, Env},
    bench_measure::{Mode, FULL, QUICK, REPS},
    bench_report::{self as report, Report, Row, Sample, Table, Verdict},
    bench_work::{self as work, Route},
};

const PATHS: [&str; 3] = ["direct", "proxy-kernel", "proxy-splice"];

pub fn relay_only(root: &Path, full: bool) -> anyhow::Result<()> {
    let mode = if full { FULL } else { QUICK };
    let agent = release_agent(root)?;
    ensure_packages(&["wrk", "nginx-light", "curl", "iperf3"])?;
    let mut env = Env::new(&agent)?;
    let result = measure(root, &mut env, &mode);
    let tables = env.conclude(result)?;
    let report = Report {
        mode: mode.name,
        machine: machine(),
        verdicts: verdicts(&tables),
        tables,
        notes: vec![format!(
            "load before the run: {:.2} (2 cores shared with other work)",
            work::new_sample().load
        )],
    };
    println!("{}", report::text(&report));
    Ok(())
}

fn table(id: &'static str, title: String, unit: &'static str, higher: bool) -> Table {
    Table {
        id,
        title,
        unit,
        baseline: Some("direct"),
        peers: Vec::new(),
        higher_is_better: higher,
        rows: PATHS
            .iter()
            .map(|p| Row {
                path: p.to_string(),
                samples: Vec::new(),
            })
            .collect(),
        note: None,
    }
}

/// Busy jiffies of the whole machine (/proc/stat: all but idle and iowait).
fn machine_busy() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    Some(total - f.get(3)? - f.get(4)?)
}

fn measure(root: &Path, env: &mut Env, mode: &Mode) -> anyhow::Result<Vec<Table>> {
    start_nginx(root, env)?;
    env.spawn("iperf3", &["iperf3", "-s", "-p", "5201"])?;
    env.wait_listen("iperf3", "*:5201")?;
    let cfg = env.work.join("policy.yaml");
    fs::write(&cfg, work::policy(0, 0))?;
    let secs = mode.wrk_secs;
    let mut w1 = table(
        "R1",
        format!("keep-alive small HTTP (wrk -t1 -c50 -d{secs}s)"),
        "req/s",
        true,
    );
    let mut m1 = table("R1m", "keep-alive: the whole machine's CPU per request (client, server, agent, softirq, kernel workers)".into(), "µs", false);
    let mut w2 = table(
        "R2",
        format!("new connection per request (wrk -t1 -c50 -d{secs}s, Connection: close)"),
        "req/s",
        true,
    );
    let mut w3 = table(
        "R3",
        format!("bulk (iperf3 -t {} -P 1)", mode.iperf_secs),
        "Gb/s",
        true,
    );
    let mut running: Option<(&str, u32)> = None;
    for rep in 0..REPS {
        for (i, path) in PATHS.iter().enumerate() {
            let route = if i == 0 {
                Route {
                    name: "direct",
                    host: "127.60.0.1",
                    in_web: false,
                    cpu_pid: None,
                }
            } else {
                let relay = if i == 1 { "kernel" } else { "splice" };
                let pid = match running {
                    Some((r, pid)) if r == relay => pid,
                    _ => {
                        env.stop("agent")?;
                        let pid = env.start_agent(&cfg, &[&format!("EGRESS_RELAY={relay}")])?;
                        let said = if i == 1 {
                            "proxy relay: in the kernel"
                        } else {
                            "proxy relay: splice"
                        };
                        env.wait_log("agent", &[said], 10)?;
                        running = Some((relay, pid));
                        pid
                    }
                };
                Route {
                    name: path,
                    host: "127.61.0.1",
                    in_web: true,
                    cpu_pid: Some(pid),
                }
            };
            let busy = machine_busy();
            let s1 = work::wrk(env, &route, secs, false)
                .with_context(|| format!("R1 on {path} (run {})", rep + 1))?;
            let m = machine_busy().zip(busy).map(|(a, b)| {
                (a - b) as f64 * 1e6 / work::clk_tck() / (s1.value * secs as f64).max(1.0)
            });
            m1.rows[i].samples.push(Sample {
                value: m.unwrap_or(f64::NAN),
                ..s1.clone()
            });
            let s2 = work::wrk(env, &route, secs, true)
                .with_context(|| format!("R2 on {path} (run {})", rep + 1))?;
            let s3 = work::iperf(env, &route, mode.iperf_secs)
                .with_context(|| format!("R3 on {path} (run {})", rep + 1))?;
            eprintln!(
                "    run {} {:<13} keep-alive {:>9.0} req/s (agent {:>5.1} µs/req, machine {:>5.1} µs/req)  new {:>8.0} req/s  bulk {:>6.2} Gb/s  (load {:.2})",
                rep + 1,
                path,
                s1.value,
                s1.cpu_us_per_req.unwrap_or(f64::NAN),
                m.unwrap_or(f64::NAN),
                s2.value,
                s3.value,
                s1.load
            );
            w1.rows[i].samples.push(s1);
            w2.rows[i].samples.push(s2);
            w3.rows[i].samples.push(s3);
        }
    }
    Ok(vec![w1, m1, w2, w3])
}

fn verdicts(t: &[Table]) -> Vec<Verdict> {
    let mut v = Vec::new();
    for (table, what) in [
        (&t[0], "keep-alive"),
        (&t[2], "new connections"),
        (&t[3], "bulk"),
    ] {
        let (k, s) = (table.ratio("proxy-kernel"), table.ratio("proxy-splice"));
        v.push(Verdict {
            target: format!("{what}: kernel relay against splice (ratio to direct)"),
            measured: format!(
                "kernel {} / splice {}",
                k.map_or("-".into(), |r| format!("{r:.2}x")),
                s.map_or("-".into(), |r| format!("{r:.2}x"))
            ),
            pass: k.zip(s).map(|(k, s)| k >= s),
        });
    }
    let cpu = |p: &str| t[0].row(p).and_then(Row::cpu);
    v.push(Verdict {
        target: "keep-alive agent CPU <= 10 µs/request (kernel relay)".into(),
        measured: format!(
            "kernel {} / splice {} µs",
            cpu("proxy-kernel").map_or("-".into(), |c| format!("{c:.1}")),
            cpu("proxy-splice").map_or("-".into(), |c| format!("{c:.1}"))
        ),
        pass: cpu("proxy-kernel").map(|c| c <= 10.0),
    });
    v
}
