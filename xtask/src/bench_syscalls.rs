//! S1-S4 of `cargo xtask bench` (also alone: `--syscalls`): the system calls and wake-ups a
//! proxy makes per request on keep-alive connections and per connection when every request
//! opens a new one, for the agent's proxy and the peers (haproxy, nginx stream) in the same
//! run. System calls are counted by `perf stat -e 'syscalls:sys_enter_*' -p PID` (the
//! kernel's tracepoints, counting only: no per-call trap into a tracer as with strace);
//! wake-ups are the voluntary context switches of the process's threads
//! (`/proc/PID/task/*/status`): each is one sleep and so one wake-up.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    bench_env::Env,
    bench_measure::REPS,
    bench_report::{median, Row, Sample, Table, Verdict},
    bench_work::{self as work, Route},
};

/// The counts of one wrk run on one path.
struct Counted {
    /// Requests wrk completed (one connection each with `Connection: close`).
    reqs: u64,
    syscalls: BTreeMap<String, u64>,
    /// Wake-ups by thread name.
    wakeups: BTreeMap<String, u64>,
    /// The process's CPU per request, µs (perf attached).
    cpu_us: Option<f64>,
    sample: Sample,
}

/// Starts counting every system call of `pid`'s threads into `out`.
fn perf_start(pid: u32, out: &Path) -> anyhow::Result<Child> {
    let pid = pid.to_string();
    let out = out.display().to_string();
    let argv = [
        "stat",
        "-x,",
        "--no-big-num",
        "-o",
        &out,
        "-e",
        "syscalls:sys_enter_*",
        "-p",
        &pid,
    ];
    let child = perf(&argv)?;
    // perf opens one counter per system call and thread before it counts.
    std::thread::sleep(Duration::from_millis(700));
    Ok(child)
}

/// Starts `perf ARGV...` in the background, its output discarded.
fn perf(argv: &[&str]) -> anyhow::Result<Child> {
    Command::new("perf")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start perf {} (Debian: linux-perf)", argv[0]))
}

/// Stops perf (SIGINT: it writes its counts) and reads them: system call name → count.
fn perf_stop(mut child: Child, out: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    child.wait()?;
    let text =
        fs::read_to_string(out).with_context(|| format!("no perf output {}", out.display()))?;
    Ok(parse_perf(&text))
}

/// `perf stat -x,` lines (`count,unit,event,...`): the non-zero `syscalls:sys_enter_NAME`.
fn parse_perf(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let n: u64 = f.next()?.trim().parse().ok()?;
            let name = f.nth(1)?.strip_prefix("syscalls:sys_enter_")?;
            (n > 0).then(|| (name.to_string(), n))
        })
        .collect()
}

/// With EGRESS_BENCH_PROFILE=DIR: `perf record -g` of `pid` into
/// DIR/PATH-keepalive.data or DIR/PATH-newconn.data (the last run's), for `perf report -i`.
fn profile(pid: u32, path: &str, close: bool) -> anyhow::Result<Option<Child>> {
    let Some(dir) = std::env::var_os("EGRESS_BENCH_PROFILE") else {
        return Ok(None);
    };
    fs::create_dir_all(&dir)?;
    let kind = if close { "newconn" } else { "keepalive" };
    let file = Path::new(&dir).join(format!("{path}-{kind}.data"));
    let (file, pid) = (file.display().to_string(), pid.to_string());
    let child = perf(&["record", "-q", "-g", "-F", "2000", "-o", &file, "-p", &pid])?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Some(child))
}

/// Voluntary context switches of every thread of `pid` (each: one sleep, one wake-up), by
/// thread name (/proc/PID/task/TID/comm).
fn wakeups(pid: u32) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by;
    };
    for t in tasks.flatten() {
        let n = fs::read_to_string(t.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(n) = n {
            *by.entry(comm.trim().to_string()).or_insert(0) += n;
        }
    }
    by
}

/// `after - before`, per thread name (threads that came or went count from 0).
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, a)| (k.clone(), a.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// One wrk run on `route` (keep-alive, or `Connection: close` when `close`) with the
/// route's process counted.
fn count(env: &Env, route: &Route, secs: u32, close: bool) -> anyhow::Result<Counted> {
    let pid = route.cpu_pid.context("a counted path needs its process")?;
    let mut sample = work::new_sample();
    let out = env.work.join("perf-stat.txt");
    let perf = perf_start(pid, &out)?;
    let record = profile(pid, route.name, close)?;
    let (w0, c0) = (wakeups(pid), work::cpu_ticks(pid));
    let url = format!("http://{}:8080/index.html", route.host);
    let d = format!("{secs}s");
    let mut argv = vec!["wrk", "-t1", "-c50", "-d", &d];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(&url);
    let ran = work::client(env, route.in_web, &argv);
    let (w1, c1) = (wakeups(pid), work::cpu_ticks(pid));
    let syscalls = perf_stop(perf, &out)?;
    if let Some(mut r) = record {
        let _ = Command::new("kill")
            .args(["-INT", &r.id().to_string()])
            .status();
        r.wait()?;
    }
    let (parsed, reqs) = work::parse_wrk(&ran?)?;
    sample.errors = parsed.errors;
    work::close_sample(&mut sample);
    anyhow::ensure!(reqs > 0, "wrk completed no request on {}", route.name);
    let cpu_us = c0
        .zip(c1)
        .map(|(a, b)| (b - a) as f64 * 1e6 / work::clk_tck() / reqs as f64);
    Ok(Counted {
        reqs,
        syscalls,
        wakeups: delta(&w0, &w1),
        cpu_us,
        sample,
    })
}

/// The tables S1-S4 over `routes` (the paths with a proxy process: the agent, the peers),
/// each point the median of [`REPS`] runs, the paths interleaved.
pub fn measure(env: &Env, routes: &[&Route], secs: u32) -> anyhow::Result<Vec<Table>> {
    eprintln!("==> S1-S4: system calls and wake-ups per request / per connection (perf stat)");
    let peers = vec!["haproxy-redirect", "nginx-stream-redirect"];
    let table = |id, what: &str, unit, close: bool| Table {
        id,
        title: format!(
            "{what} of the proxy's process, {} (wrk -t1 -c50 -d{secs}s{})",
            if close {
                "per connection, a new connection per request"
            } else {
                "per request, keep-alive"
            },
            if close { ", Connection: close" } else { "" }
        ),
        unit,
        baseline: None,
        peers: peers.clone(),
        higher_is_better: false,
        rows: Row::named(routes.iter().map(|r| r.name)),
        note: None,
    };
    let mut out = [
        table("S1", "system calls", "calls/req", false),
        table("S2", "wake-ups", "wake-ups/req", false),
        table("S3", "system calls", "calls/conn", true),
        table("S4", "wake-ups", "wake-ups/conn", true),
    ];
    // Per table pair (keep-alive, close) and path: per-request counts of each call, per run.
    let mut per_call: [Vec<Vec<BTreeMap<String, f64>>>; 2] = [
        vec![Vec::new(); routes.len()],
        vec![Vec::new(); routes.len()],
    ];
    let mut per_thread = per_call.clone();
    for rep in 0..REPS {
        for (k, close) in [false, true].into_iter().enumerate() {
            for (i, r) in routes.iter().enumerate() {
                let c = count(env, r, secs, close)
                    .with_context(|| format!("syscall count on {} (run {})", r.name, rep + 1))?;
                let n = c.reqs as f64;
                let total: u64 = c.syscalls.values().sum();
                let wakeups: u64 = c.wakeups.values().sum();
                eprintln!(
                    "    run {} {:<22} {:<10} {:>7.2} calls/req {:>6.2} wake-ups/req ({} requests)",
                    rep + 1,
                    r.name,
                    if close { "new-conn" } else { "keep-alive" },
                    total as f64 / n,
                    wakeups as f64 / n,
                    c.reqs
                );
                let calls = Sample {
                    value: total as f64 / n,
                    cpu_us_per_req: c.cpu_us,
                    ..c.sample.clone()
                };
                let wakes = Sample {
                    value: wakeups as f64 / n,
                    ..c.sample
                };
                out[2 * k].rows[i].samples.push(calls);
                out[2 * k + 1].rows[i].samples.push(wakes);
                per_thread[k][i].push(
                    c.wakeups
                        .iter()
                        .map(|(s, v)| (s.clone(), *v as f64 / n))
                        .collect(),
                );
                per_call[k][i].push(
                    c.syscalls
                        .iter()
                        .map(|(s, v)| (s.clone(), *v as f64 / n))
                        .collect(),
                );
            }
        }
    }
    for (k, runs) in per_call.iter().enumerate() {
        let tops: Vec<String> = routes
            .iter()
            .zip(runs)
            .map(|(r, runs)| format!("{}: {}", r.name, top_calls(runs, 6)))
            .collect();
        out[2 * k].note = Some(format!(
            "counted by `perf stat -e 'syscalls:sys_enter_*' -p PID` over the whole wrk run \
             (plus 0.7 s before it while perf attaches); the proxy cpu column is measured with \
             perf attached. The most frequent calls per {} (median of the runs): {}",
            if k == 0 { "request" } else { "connection" },
            tops.join("; ")
        ));
        let threads: Vec<String> = routes
            .iter()
            .zip(&per_thread[k])
            .map(|(r, runs)| format!("{}: {}", r.name, top_calls(runs, 4)))
            .collect();
        out[2 * k + 1].note = Some(format!(
            "wake-ups: the voluntary context switches of the process's threads \
             (/proc/PID/task/*/status), each one sleep (epoll_wait, a futex) ended by a wake-up. \
             By thread name, per {} (median of the runs): {}",
            if k == 0 { "request" } else { "connection" },
            threads.join("; ")
        ));
    }
    Ok(out.into())
}

/// The `n` largest entries over `runs` (each one's median per-request count).
fn top_calls(runs: &[BTreeMap<String, f64>], n: usize) -> String {
    let mut names: Vec<&String> = runs.iter().flat_map(|m| m.keys()).collect();
    names.sort();
    names.dedup();
    let mut med: Vec<(String, f64)> = names
        .into_iter()
        .filter_map(|s| {
            let v = median(
                runs.iter()
                    .map(|m| m.get(s).copied().unwrap_or(0.0))
                    .collect(),
            )?;
            Some((s.clone(), v))
        })
        .collect();
    med.sort_by(|a, b| b.1.total_cmp(&a.1));
    med.iter()
        .take(n)
        .map(|(s, v)| format!("{s} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// W2's target against the peers: new connections through the proxy >= 1.15x the best peer.
pub fn best_peer_verdict(w2: &Table) -> Verdict {
    let r = w2.vs_best_peer("egress-proxy");
    Verdict {
        target: "new connections (proxied) >= 1.15x the best peer".into(),
        measured: format!(
            "{}{}",
            r.map_or("-".into(), |r| format!("{r:.2}x")),
            if w2.rows.iter().any(Row::busy) {
                " *busy*"
            } else {
                ""
            }
        ),
        pass: r.map(|r| r >= 1.15),
    }
}

/// The verdicts: fewer system calls and wake-ups than haproxy, per request and per connection.
pub fn verdicts(tables: &[Table]) -> Vec<Verdict> {
    tables
        .iter()
        .map(|t| {
            let (a, h) = (t.value("egress-proxy"), t.value("haproxy-redirect"));
            let busy = t.rows.iter().any(Row::busy);
            Verdict {
                target: format!("{} ({}): fewer than haproxy", t.id, t.unit),
                measured: format!(
                    "{} (haproxy {}){}",
                    a.map_or("-".into(), |v| format!("{v:.2}")),
                    h.map_or("-".into(), |v| format!("{v:.2}")),
                    if busy { " *busy*" } else { "" }
                ),
                pass: a.zip(h).map(|(a, h)| a < h),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn perf_lines() {
        let t = "# started on Mon\n\n12,,syscalls:sys_enter_read,100,100.00,,\n\
                 0,,syscalls:sys_enter_write,100,100.00,,\n<not counted>,,syscalls:sys_enter_x,0,0,,\n";
        let m = super::parse_perf(t);
        assert_eq!(m.len(), 1);
        assert_eq!(m["read"], 12);
    }
}
