//! The DNS tables of `cargo xtask bench` (alone: `cargo xtask bench --dns`): what the agent's
//! DNS proxy adds to a workload's DNS round trip, and what a connect() costs with 10,000+
//! names learned from DNS. Its own network namespace, agent and resolver (dnsmasq on
//! 127.53.0.1, no upstream), the paths interleaved, 3 repetitions.
//!
//! - D1: `tests/e2e/dns_rtt.py` (one connected UDP socket, send → answer, the first 10 %
//!   dropped as warm-up) straight to dnsmasq from outside every workload, and from inside
//!   `web` (the kernel steers the query to the agent, which forwards it, learns the answer
//!   into the kernel map, and answers). Once the same name over and over (nothing new to
//!   write), once a new name per query (each answer written into `EGRESS_NAMES` before it is
//!   released). Every repetition asks names of its own, so nothing is learned already.
//! - D2: connbench's UDP socket()+connect()+close() from inside `web` to an address learned
//!   from DNS and to an address rule's, against outside every workload (wall-clock).
//! - D3: the kernel's own accounting of `sock_create` and `connect4` per run around D2's
//!   in-workload runs (see `bench_kernel`).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::Context as _;

use crate::{
    bench_env::{ensure_packages, Env},
    bench_kernel::{per_run, sample, snapshot, Accounting},
    bench_report::{self as report, Report, Row, Sample, Table, Verdict},
    bench_work as work,
};

const REPS: usize = 3;
const RESOLVER: &str = "127.53.0.1";
/// Queries per D1 point.
const QUERIES: u32 = 10_000;
/// The address rule's address (D2), and connect()s per D2 point.
const BY_RULE: &str = "127.60.0.1";
const CONNECTS: u64 = 100_000;

const POLICY: &str = "kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  \
traffic: {enableEgress: false}\n  proxy: {port: 15001}\n  \
dns: {enabled: true, port: 15053, minTtl: 600s}\n---\n\
kind: Workload\nmetadata: {name: web}\n---\n\
kind: Egress\nmetadata: {name: resolver}\nspec:\n  sources: [{name: web}]\n  \
ipAddresses: [127.53.0.1/32]\n  ports: [{number: 53, protocol: udp}, {number: 53}]\n---\n\
kind: Egress\nmetadata: {name: by-name}\nspec:\n  sources: [{name: web}]\n  \
hosts: ['*.bench.example']\n  ports: [{number: 9999, protocol: udp}]\n---\n\
kind: Egress\nmetadata: {name: by-address}\nspec:\n  sources: [{name: web}]\n  \
ipAddresses: [127.60.0.1/32]\n  ports: [{number: 9999, protocol: udp}]\n";

/// The address of name `i` of repetition `rep` (127.81.0.1 is rep 1's first).
fn addr(rep: usize, i: u32) -> String {
    format!("127.{}.{}.{}", 80 + rep, i / 250, i % 250 + 1)
}

/// `cargo xtask bench --dns`: only these tables, printed and written to target/bench/dns.*.
pub fn bench(root: &Path) -> anyhow::Result<()> {
    eprintln!("==> the release agent");
    let agent = crate::bench_env::release_agent(root)?;
    ensure_packages(&["dnsmasq-base", "gcc", "bpftool"])?;
    let (tables, verdicts, notes) = measure(root, &agent)?;
    let report = Report {
        mode: "dns",
        machine: vec![(
            "load average at the end".into(),
            fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
        )],
        tables,
        verdicts,
        notes,
    };
    println!("{}", report::text(&report));
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("dns.json"), report::json(&report))?;
    fs::write(out.join("dns.md"), report::markdown(&report, true))?;
    eprintln!("wrote target/bench/dns.json and dns.md");
    Ok(())
}

/// D1-D3 in a namespace of their own: (tables, verdicts, notes).
pub fn measure(
    root: &Path,
    agent: &Path,
) -> anyhow::Result<(Vec<Table>, Vec<Verdict>, Vec<String>)> {
    let mut env = Env::new(agent)?;
    eprintln!("==> DNS bench in network namespace {}", env.ns);
    let result = run(root, &mut env);
    let out = env.conclude(result)?;
    Ok(out)
}

fn table(id: &'static str, title: &str, unit: &'static str, rows: &[&str]) -> Table {
    Table {
        id,
        title: title.into(),
        unit,
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows: rows
            .iter()
            .map(|r| Row {
                path: (*r).into(),
                samples: Vec::new(),
            })
            .collect(),
        note: None,
    }
}

/// One D1 point: dns_rtt.py for `name`, inside `web` or not; value = p50 (µs).
fn rtt(env: &Env, script: &str, in_web: bool, name: &str) -> anyhow::Result<Sample> {
    let (load, procs_running) = work::load();
    let n = QUERIES.to_string();
    let out = work::client(env, in_web, &["python3", script, RESOLVER, name, &n])?;
    let get = |k: &str| -> anyhow::Result<f64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .with_context(|| format!("no {k} in dns_rtt.py's output: {out}"))?
            .parse::<f64>()
            .map_err(Into::into)
    };
    let (p50, p99) = (get("p50_us")?, get("p99_us")?);
    Ok(Sample {
        value: p50,
        p50_us: Some(p50),
        p99_us: Some(p99),
        load,
        procs_running,
        ..Sample::default()
    })
}

fn run(root: &Path, env: &mut Env) -> anyhow::Result<(Vec<Table>, Vec<Verdict>, Vec<String>)> {
    let work_dir = env.work.clone();
    let mut hosts = String::new();
    for rep in 1..=REPS {
        for i in 0..QUERIES {
            let _ = writeln!(hosts, "{} r{rep}n{i}.bench.example", addr(rep, i));
        }
    }
    let hosts_file = work_dir.join("names.hosts");
    fs::write(&hosts_file, hosts)?;
    let addn = format!("--addn-hosts={}", hosts_file.display());
    env.spawn(
        "dnsmasq",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.53.0.1",
            "--port=53",
            "--user=root",
            "--group=root",
            "--pid-file=",
            "--local-ttl=600",
            "--host-record=db.bench.example,127.64.0.1",
            &addn,
        ],
    )?;
    env.wait_listen("dnsmasq", "127.53.0.1:53")?;
    let cfg = work_dir.join("policy.yaml");
    fs::write(&cfg, POLICY)?;
    env.start_agent(&cfg, &[])?;
    let connbench = work::build_connbench(root, &work_dir)?;
    let script = root.join("tests/e2e/dns_rtt.py").display().to_string();

    let paths = [
        "direct, one name",
        "through the agent, one name",
        "direct, a new name per query",
        "through the agent, a new name per query",
    ];
    let mut d1 = table(
        "D1",
        &format!(
            "DNS round trip, {QUERIES} queries on one UDP socket (value: p50; dnsmasq, no upstream)"
        ),
        "µs",
        &paths,
    );
    eprintln!("==> D1: {}", d1.title);
    for rep in 1..=REPS {
        let new = format!("r{rep}n{{i}}.bench.example");
        for (i, (in_web, name)) in [
            (false, "db.bench.example"),
            (true, "db.bench.example"),
            (false, new.as_str()),
            (true, new.as_str()),
        ]
        .into_iter()
        .enumerate()
        {
            let s = rtt(env, &script, in_web, name)
                .with_context(|| format!("D1 {} (run {rep})", paths[i]))?;
            eprintln!(
                "    run {rep} {:<42} p50 {:>6.0} µs  p99 {:>6.0} µs  (load {:.2})",
                paths[i],
                s.value,
                s.p99_us.unwrap_or(f64::NAN),
                s.load
            );
            d1.rows[i].samples.push(s);
        }
    }
    let learned = work::client(
        env,
        false,
        &["curl", "-s", "http://127.0.0.1:15190/metrics"],
    )
    .unwrap_or_default()
    .lines()
    .find(|l| l.starts_with("egress_dns_cache_entries "))
    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    .unwrap_or(f64::NAN);

    let learned_addr = addr(1, 0);
    let conn_paths = [
        "outside every workload".to_string(),
        format!("inside web, to a learned name's address ({learned_addr})"),
        format!("inside web, to an address rule's address ({BY_RULE})"),
    ];
    let conn_refs: Vec<&str> = conn_paths.iter().map(String::as_str).collect();
    let mut d2 = table(
        "D2",
        &format!(
            "UDP socket()+connect()+close() with {learned:.0} learned entries in EGRESS_NAMES"
        ),
        "ns/iter",
        &conn_refs,
    );
    let kernel_rows = [
        "connect() added to a learned name's address: sock_create + connect4",
        "connect() added to an address rule's address: sock_create + connect4",
    ];
    let mut d3 = table(
        "D3",
        &format!(
            "kernel program run time per connect() (kernel.bpf_stats_enabled) with {learned:.0} learned entries"
        ),
        "ns/run",
        &kernel_rows,
    );
    d3.note =
        Some("the kernel's own accounting: a busy machine moves these far less than D2".into());
    eprintln!("==> D2/D3: {}", d2.title);
    let _on = Accounting::on()?;
    for rep in 1..=REPS {
        for (i, (in_web, dst)) in [
            (false, BY_RULE),
            (true, learned_addr.as_str()),
            (true, BY_RULE),
        ]
        .into_iter()
        .enumerate()
        {
            let before = snapshot(&env.cg)?;
            let (s, _, ok, eperm) =
                work::connbench(env, &connbench, in_web, "udp", dst, "9999", CONNECTS)
                    .with_context(|| format!("D2 {} (run {rep})", conn_paths[i]))?;
            anyhow::ensure!(
                eperm == 0 && ok > 0,
                "D2 {}: {eperm} connects refused (the name was not learned?)",
                conn_paths[i]
            );
            let after = snapshot(&env.cg)?;
            eprintln!(
                "    run {rep} {:<60} {:>6.0} ns/iter  (load {:.2})",
                conn_paths[i], s.value, s.load
            );
            d2.rows[i].samples.push(s);
            if in_web {
                let create = per_run(&before, &after, "egress_sock_create");
                let connect = per_run(&before, &after, "egress_connect4");
                d3.rows[i - 1]
                    .samples
                    .push(sample(create.zip(connect).map(|(x, y)| x + y)));
            }
        }
    }

    let added = |t: &Table, a: usize, b: usize, f: fn(&Row) -> Option<f64>| {
        f(&t.rows[b]).zip(f(&t.rows[a])).map(|(x, y)| x - y)
    };
    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} µs"));
    let mut verdicts = Vec::new();
    for (what, a, b) in [("one name", 0, 1), ("a new name per query", 2, 3)] {
        let p99 = added(&d1, a, b, Row::p99);
        let p50 = added(&d1, a, b, Row::p50);
        let busy = d1.rows[a].busy() || d1.rows[b].busy();
        // The spread: each repetition's own difference (the paths ran side by side).
        let per_rep = |f: fn(&Sample) -> Option<f64>| {
            let (x, y) = (&d1.rows[a].samples, &d1.rows[b].samples);
            let d: Vec<String> = x
                .iter()
                .zip(y)
                .filter_map(|(x, y)| Some(format!("{:+.0}", f(y)? - f(x)?)))
                .collect();
            d.join("/")
        };
        verdicts.push(Verdict {
            target: format!("DNS p99 added < 1 ms ({what})"),
            measured: format!(
                "p99 +{} (runs {} µs), p50 +{} (runs {} µs){}",
                us(p99),
                per_rep(|s| s.p99_us),
                us(p50),
                per_rep(|s| s.p50_us),
                if busy { " *busy*" } else { "" }
            ),
            pass: p99.map(|v| v < 1000.0),
        });
    }
    // The claim: learned names cost a connect() no more than an address rule (one hash
    // lookup where no rule decided); the hooks' absolute cost is K1's.
    let (named, ruled) = (d3.rows[0].value(), d3.rows[1].value());
    verdicts.push(Verdict {
        target: format!(
            "connect() to a learned address within 50 ns of an address rule's ({learned:.0} learned, D3)"
        ),
        measured: match named.zip(ruled) {
            Some((n, r)) => format!("{n:.0} ns vs {r:.0} ns ({:+.0} ns)", n - r),
            None => "-".into(),
        },
        pass: named.zip(ruled).map(|(n, r)| n - r < 50.0),
    });
    let notes = vec![format!(
        "D1's spread: the samples column lists each repetition's p50; p50/p99 columns are the \
         medians over {REPS} repetitions; added = through the agent - direct"
    )];
    Ok((vec![d1, d2, d3], verdicts, notes))
}

/// Where `cargo xtask bench` (the whole bench) puts the DNS tables: after its own, from a
/// namespace and agent of their own.
pub fn append(root: &Path, agent: &Path, report: &mut Report) -> anyhow::Result<()> {
    let (tables, verdicts, notes) = measure(root, agent)?;
    report.tables.extend(tables);
    report.verdicts.extend(verdicts);
    report.notes.extend(notes);
    Ok(())
}
