//! K1: what the agent's kernel programs cost per run, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: run time and run count per program, read with bpftool). Unlike
//! the wall-clock rows, these figures hardly move with other load on the machine: they time
//! the programs only, not the scheduler. The accounting adds two clock reads to every run (in
//! a virtual machine, paravirtual clock reads): K1 measures that overhead in the same run with
//! programs that do nothing (`scripts/bench/noprog.c`) and reports the figures net of it beside
//! the raw ones.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::{
    bench_env::{run_quiet, Env},
    bench_measure::Mode,
    bench_report::{Row, Sample, Table},
    bench_work::{self as work, Route},
};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
const REPS: usize = 3;

/// Turns the kernel's per-program accounting on; back to what it was when dropped.
pub struct Accounting(String);

impl Accounting {
    pub fn on() -> anyhow::Result<Accounting> {
        let old = fs::read_to_string(STATS).context("read kernel.bpf_stats_enabled")?;
        fs::write(STATS, "1").context("enable kernel.bpf_stats_enabled")?;
        Ok(Accounting(old.trim().to_string()))
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        let _ = fs::write(STATS, &self.0);
    }
}

/// The ids of the programs attached to cgroup `cg` (`bpftool cgroup show`: `ID  TYPE ...`).
fn attached(cg: &Path) -> anyhow::Result<Vec<String>> {
    let text = run_quiet(&["bpftool", "cgroup", "show", &cg.display().to_string()])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
        .map(String::from)
        .collect())
}

/// (run time ns, run count) of the programs attached to the bench's cgroup root, by name,
/// from `bpftool prog show` (the first line of each program: `ID: TYPE  name NAME ...
/// run_time_ns N  run_cnt M`). Other agents' programs (tests running beside the bench) are
/// left out.
pub fn snapshot(cg: &Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let ids = attached(cg)?;
    let text = run_quiet(&["bpftool", "prog", "show"])?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let ours = w
            .first()
            .and_then(|id| id.strip_suffix(':'))
            .is_some_and(|id| ids.iter().any(|x| x == id));
        let after = |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
        let Some(name) = after("name").filter(|_| ours) else {
            continue;
        };
        let num = |key| after(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let e = out.entry(name.to_string()).or_insert((0, 0));
        e.0 += num("run_time_ns");
        e.1 += num("run_cnt");
    }
    Ok(out)
}

/// Mean ns per run of program `name` between two snapshots (None: it did not run).
pub fn per_run(
    a: &BTreeMap<String, (u64, u64)>,
    b: &BTreeMap<String, (u64, u64)>,
    name: &str,
) -> Option<f64> {
    let (t0, c0) = a.get(name).copied().unwrap_or_default();
    let (t1, c1) = b.get(name).copied()?;
    (c1 > c0).then(|| (t1 - t0) as f64 / (c1 - c0) as f64)
}

pub fn sample(value: Option<f64>) -> Sample {
    let (load, procs_running) = work::load();
    Sample {
        value: value.unwrap_or(f64::NAN),
        load,
        procs_running,
        errors: value.is_none().then(|| "the program did not run".into()),
        ..Sample::default()
    }
}

/// What the accounting itself adds per run of a `sock_create` and of a `connect4` program:
/// the run time of programs that do nothing (`noprog`, attached beside the agent's to the
/// bench's cgroup root by bpf links, detached when it exits) during one connbench run inside
/// `web`.
fn accounting_overhead(
    env: &Env,
    connbench: &Path,
    noprog: &Path,
    mode: &Mode,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let mut child = Command::new(noprog)
        .arg(&env.cg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start noprog")?;
    let mut ready = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut ready)?;
    }
    if ready.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        anyhow::bail!("noprog could not attach its programs: {}", err.trim());
    }
    let a = snapshot(&env.cg);
    let run = work::connbench(
        env,
        connbench,
        true,
        "udp",
        "127.60.0.1",
        "9999",
        mode.conn_iters,
    );
    let b = snapshot(&env.cg);
    drop(child.stdin.take()); // noprog exits, its links close
    child.wait()?;
    run?;
    let (a, b) = (a?, b?);
    Ok((
        per_run(&a, &b, "noop_sock_crt"),
        per_run(&a, &b, "noop_connect4"),
    ))
}

/// `raw` net of the accounting overheads `over` (None when any is unknown).
fn net(raw: Option<f64>, over: &[Option<f64>]) -> Option<f64> {
    over.iter().try_fold(raw?, |v, o| Some(v - (*o)?))
}

/// K1: `sock_create` and `connect4` per run during W4's UDP socket()+connect()+close() inside
/// `web`, to one destination (its verdict cached after the first) and to a new destination
/// each time (judged in full, then cached), their sums (what the hooks add to a connect), the
/// per-packet program per packet during keep-alive HTTP on the allowed-direct route, what the
/// accounting itself adds per run, and the sums net of it.
pub fn programs(
    env: &mut Env,
    bin: &Path,
    noprog: &Path,
    allowed: &Route,
    mode: &Mode,
) -> anyhow::Result<Table> {
    eprintln!("==> K1: program run time per run (kernel bpf_stats)");
    let names = [
        "sock_create per socket()",
        "connect4 per connect(), destination judged before (cached verdict)",
        "connect() added: sock_create + connect4 (cached verdict)",
        "connect4 per connect(), a new destination each time (judged in full, cached: the cache is full, so an LRU eviction too)",
        "connect() added: sock_create + connect4 (new destination, judged in full)",
        "skb_egress per packet (keep-alive, allowed directly)",
        "accounting overhead: a sock_create program that does nothing",
        "accounting overhead: a connect4 program that does nothing",
        "connect() added, net of the accounting (cached verdict)",
        "connect() added, net of the accounting (new destination, judged in full)",
    ];
    let mut t = Table {
        id: "K1",
        title: "kernel program run time (kernel.bpf_stats_enabled; 10,000 extra rules loaded)"
            .into(),
        unit: "ns/run",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows: names
            .iter()
            .map(|n| Row {
                path: (*n).into(),
                samples: Vec::new(),
            })
            .collect(),
        note: Some(
            "from the kernel's own per-program accounting, which times the programs and not \
             the scheduler: a busy machine moves these far less than the wall-clock rows"
                .into(),
        ),
    };
    let _on = Accounting::on()?;
    for _ in 0..REPS {
        let a = snapshot(&env.cg)?;
        work::connbench(env, bin, true, "udp", "127.60.0.1", "9999", mode.conn_iters)?;
        let b = snapshot(&env.cg)?;
        let create = per_run(&a, &b, "egress_sock_create");
        let connect = per_run(&a, &b, "egress_connect4");
        t.rows[0].samples.push(sample(create));
        t.rows[1].samples.push(sample(connect));
        t.rows[2]
            .samples
            .push(sample(create.zip(connect).map(|(x, y)| x + y)));
        // 65,536 addresses of 127.60.0.0/16 in turn (the policy allows the range): no
        // connect() finds its verdict cached.
        let a = snapshot(&env.cg)?;
        let spread = "udpspread";
        work::connbench(
            env,
            bin,
            true,
            spread,
            "127.60.0.1",
            "9999",
            mode.conn_iters,
        )?;
        let b = snapshot(&env.cg)?;
        let create = per_run(&a, &b, "egress_sock_create");
        let connect = per_run(&a, &b, "egress_connect4");
        t.rows[3].samples.push(sample(connect));
        t.rows[4]
            .samples
            .push(sample(create.zip(connect).map(|(x, y)| x + y)));
        let c = snapshot(&env.cg)?;
        work::wrk(env, allowed, mode.wrk_secs.min(3), false)?;
        let d = snapshot(&env.cg)?;
        t.rows[5]
            .samples
            .push(sample(per_run(&c, &d, "egress_skb_egress")));
        let (oc, oc4) = accounting_overhead(env, bin, noprog, mode)?;
        t.rows[6].samples.push(sample(oc));
        t.rows[7].samples.push(sample(oc4));
        let raw = |row: usize| t.rows[row].samples.last().map(|s| s.value);
        let (cached, full) = (net(raw(2), &[oc, oc4]), net(raw(4), &[oc, oc4]));
        t.rows[8].samples.push(sample(cached));
        t.rows[9].samples.push(sample(full));
    }
    Ok(t)
}
