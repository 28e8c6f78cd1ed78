//! `cargo xtask bench [--quick|--full]`: the agent's datapath against a direct connection and
//! peers (haproxy and nginx `stream` behind an iptables REDIRECT), all inside a network
//! namespace of its own.
//!
//! Paths: `direct` (client outside every workload to nginx on 127.60.0.1:8080),
//! `egress-allow` (the client inside `web`, allowed directly, 10,000 other /32 rules loaded),
//! `egress-proxy` (inside `web`, 127.61.0.1 `via: proxy`: the agent's transparent proxy),
//! `haproxy-redirect` (outside, 127.62.0.1 REDIRECTed by iptables to haproxy, which forwards
//! to a fixed backend, nginx on 127.60.0.1) and `nginx-stream-redirect` (outside, 127.64.0.1,
//! the same REDIRECT to nginx's `stream` TCP proxy, also to that fixed backend). Workloads:
//! W1 keep-alive HTTP, W2 a new connection per request, W3 bulk (iperf3), W5 a
//! connection-churn soak sampled per second (direct and egress-proxy: rate decay,
//! retransmits, TIME_WAIT), W4 connect() cost, W4r TCP connect() with and without an iptables
//! REDIRECT, W7 refused connects, W8 policy apply time. Each point is the median of 3 runs,
//! the paths interleaved.

use std::{fs, path::Path, time::Instant};

use anyhow::Context as _;

use crate::{
    bench_env::{ensure_packages, run_in, run_quiet, Env},
    bench_report::{self as report, Report, Row, Table, Verdict},
    bench_work::{self as work, Route},
};

const PACKAGES: &[&str] = &[
    "wrk",
    "iperf3",
    "nginx-light",
    "haproxy",
    "libnginx-mod-stream",
    "iptables",
    "gcc",
    "curl",
];
const REPS: usize = 3;

struct Mode {
    name: &'static str,
    wrk_secs: u32,
    iperf_secs: u32,
    conn_iters: u64,
    churn_secs: u32,
    scale: &'static [u32],
}

const QUICK: Mode = Mode {
    name: "quick",
    wrk_secs: 3,
    iperf_secs: 3,
    conn_iters: 100_000,
    churn_secs: 10,
    scale: &[10_000],
};
const FULL: Mode = Mode {
    name: "full",
    wrk_secs: 10,
    iperf_secs: 10,
    conn_iters: 1_000_000,
    churn_secs: 60,
    scale: &[10_000, 100_000],
};

pub fn bench(root: &Path, full: bool) -> anyhow::Result<()> {
    let mode = if full { FULL } else { QUICK };
    let started = Instant::now();
    eprintln!("==> setup (scripts/setup.sh) and the release agent");
    run_in(root, &["bash", "scripts/setup.sh"])?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_in(
        root,
        &[
            &cargo,
            "build",
            "--release",
            "--quiet",
            "-p",
            "egress-agent",
        ],
    )?;
    ensure_packages(PACKAGES)?;
    let agent = root.join("target/release/egress-agent");
    let mut env = Env::new(&agent)?;
    eprintln!(
        "==> bench ({} mode) in network namespace {}, cgroup root {}, pins {}",
        mode.name,
        env.ns,
        env.cg.display(),
        env.pin.display()
    );
    let result = run(root, &mut env, &mode);
    let cleanup = env.finish();
    let report = result?;
    cleanup?;
    let text = report::text(&report);
    println!("{text}");
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("results.json"), report::json(&report))?;
    fs::write(out.join("results.md"), report::markdown(&report, true))?;
    if full {
        fs::write(
            root.join("docs/benchmarks.md"),
            report::markdown(&report, true),
        )?;
        eprintln!("wrote docs/benchmarks.md");
    }
    eprintln!(
        "wrote target/bench/results.json and results.md ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn template(root: &Path, name: &str, work: &Path) -> anyhow::Result<String> {
    let p = root.join("scripts/bench").join(name);
    let t = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(t.replace("@WORK@", &work.display().to_string()))
}

fn machine() -> Vec<(String, String)> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let kernel = run_quiet(&["uname", "-r"]).unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let ver = |argv: &[&str]| {
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default();
        out
    };
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    vec![
        ("nproc".into(), nproc),
        ("load average at the end".into(), load.trim().to_string()),
        ("kernel".into(), kernel.trim().to_string()),
        ("cpu".into(), cpu),
        ("nginx".into(), ver(&["nginx", "-v"])),
        ("haproxy".into(), ver(&["haproxy", "-v"])),
        ("wrk".into(), ver(&["wrk", "--version"])),
        ("iperf3".into(), ver(&["iperf3", "--version"])),
    ]
}

fn run(root: &Path, env: &mut Env, mode: &Mode) -> anyhow::Result<Report> {
    let work_dir = env.work.clone();
    // --- servers, peer, agent ---------------------------------------------------------
    fs::create_dir_all(work_dir.join("www"))?;
    fs::write(
        work_dir.join("www/index.html"),
        "<html><body>egress bench: a small page</body></html>\n",
    )?;
    let nginx_conf = work_dir.join("nginx.conf");
    fs::write(&nginx_conf, template(root, "nginx.conf.in", &work_dir)?)?;
    let conf = nginx_conf.display().to_string();
    env.spawn("nginx", &["nginx", "-c", &conf])?;
    env.wait_listen("nginx", "127.60.0.1:8080")?;
    env.wait_listen("nginx", "127.61.0.1:8080")?;
    env.wait_listen("nginx", "127.0.0.1:8081")?;
    env.spawn("iperf3", &["iperf3", "-s", "-p", "5201"])?;
    env.wait_listen("iperf3", "*:5201")?;

    let haproxy_cfg = work_dir.join("haproxy.cfg");
    fs::write(&haproxy_cfg, template(root, "haproxy.cfg.in", &work_dir)?)?;
    let cfg = haproxy_cfg.display().to_string();
    let haproxy = env.spawn("haproxy", &["haproxy", "-db", "-f", &cfg])?;
    env.wait_listen("haproxy", "127.0.0.1:15101")?;
    let stream_conf = work_dir.join("nginx-stream.conf");
    fs::write(
        &stream_conf,
        template(root, "nginx-stream.conf.in", &work_dir)?,
    )?;
    let sc = stream_conf.display().to_string();
    let stream_master = env.spawn("nginx-stream", &["nginx", "-c", &sc])?;
    env.wait_listen("nginx-stream", "127.0.0.1:15111")?;
    let stream_worker = work::child_pid(stream_master)
        .context("cannot find the nginx stream worker (/proc/PID/task/PID/children)")?;
    for (dst, port, to) in [
        ("127.62.0.1", "8080", "15101"),
        ("127.62.0.1", "5201", "15102"),
        ("127.64.0.1", "8080", "15111"),
        ("127.64.0.1", "5201", "15112"),
        // W4r: the same listener (nginx, 127.0.0.1:8081) with and without the rule.
        ("127.65.0.1", "8081", "8081"),
    ] {
        env.ns_run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            dst,
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "REDIRECT",
            "--to-ports",
            to,
        ])?;
    }

    let connbench = work_dir.join("connbench");
    let src = root.join("scripts/bench/connbench.c");
    run_quiet(&[
        "gcc",
        "-O2",
        "-o",
        &connbench.display().to_string(),
        &src.display().to_string(),
    ])?;

    let cfg_file = work_dir.join("policy.yaml");
    fs::write(&cfg_file, work::policy(10_000, 0))?;
    let a = env.agent.display().to_string();
    let (sock, cfg, cg, pin, state) = (
        env.sock.display().to_string(),
        cfg_file.display().to_string(),
        env.cg.display().to_string(),
        env.pin.display().to_string(),
        env.state.display().to_string(),
    );
    let t = Instant::now();
    let agent_pid = env.spawn(
        "agent",
        &[
            &a,
            "--admin-socket",
            &sock,
            "run",
            "--config",
            &cfg,
            "--cgroup-root",
            &cg,
            "--pin-dir",
            &pin,
            "--state-file",
            &state,
            "--metrics-addr",
            "127.0.0.1:15190",
        ],
    )?;
    env.wait_log("agent", &[" ready", "\"ready\""], 60)?;
    let mut notes = vec![format!(
        "the agent started with 10,000 extra /32 rules and was ready in {:.2} s",
        t.elapsed().as_secs_f64()
    )];

    // Sanity: each path serves the page before anything is measured.
    let routes = [
        Route {
            name: "direct",
            host: "127.60.0.1",
            in_web: false,
            cpu_pid: None,
        },
        Route {
            name: "egress-allow",
            host: "127.60.0.1",
            in_web: true,
            cpu_pid: None,
        },
        Route {
            name: "egress-proxy",
            host: "127.61.0.1",
            in_web: true,
            cpu_pid: Some(agent_pid),
        },
        Route {
            name: "haproxy-redirect",
            host: "127.62.0.1",
            in_web: false,
            cpu_pid: Some(haproxy),
        },
        Route {
            name: "nginx-stream-redirect",
            host: "127.64.0.1",
            in_web: false,
            cpu_pid: Some(stream_worker),
        },
    ];
    for r in &routes {
        let url = format!("http://{}:8080/index.html", r.host);
        let page = work::client(env, r.in_web, &["curl", "-sSf", "--max-time", "5", &url])
            .with_context(|| format!("path {} does not work", r.name))?;
        anyhow::ensure!(
            page.contains("egress bench"),
            "path {} served something else: {page}",
            r.name
        );
    }
    let peers = vec!["haproxy-redirect", "nginx-stream-redirect"];
    let mk = |id, title: &str, unit, note: Option<String>| Table {
        id,
        title: title.to_string(),
        unit,
        baseline: Some("direct"),
        peers: peers.clone(),
        higher_is_better: true,
        rows: routes
            .iter()
            .map(|r| Row {
                path: r.name.to_string(),
                samples: Vec::new(),
            })
            .collect(),
        note,
    };
    let peer_note = "haproxy-redirect: iptables REDIRECT to haproxy (TCP mode, nbthread 1), \
                     which forwards to a fixed backend (nginx on 127.60.0.1), not to the \
                     original destination: it measures the extra userspace hop, as a peer. \
                     nginx-stream-redirect: the same iptables REDIRECT (127.64.0.1) to nginx's \
                     stream module (TCP proxy, 1 worker), also to that fixed backend, not to \
                     the original destination; its proxy cpu is the worker process's.";
    let mut w1 = mk(
        "W1",
        &format!("keep-alive small HTTP (wrk -t1 -c50 -d{}s)", mode.wrk_secs),
        "req/s",
        Some(peer_note.to_string()),
    );
    let mut w2 = mk(
        "W2",
        &format!(
            "new connection per request (wrk -t1 -c50 -d{}s, Connection: close)",
            mode.wrk_secs
        ),
        "req/s",
        None,
    );
    let mut w3 = mk(
        "W3",
        &format!("bulk (iperf3 -t {} -P 1)", mode.iperf_secs),
        "Gb/s",
        None,
    );
    for (table, kind) in [(&mut w1, 1), (&mut w2, 2), (&mut w3, 3)] {
        eprintln!("==> {}: {}", table.id, table.title);
        for rep in 0..REPS {
            for (i, r) in routes.iter().enumerate() {
                let s = match kind {
                    1 => work::wrk(env, r, mode.wrk_secs, false),
                    2 => work::wrk(env, r, mode.wrk_secs, true),
                    _ => work::iperf(env, r, mode.iperf_secs),
                }
                .with_context(|| format!("{} on {} (run {})", table.id, r.name, rep + 1))?;
                eprintln!(
                    "    run {} {:<17} {:>12.2} {}  (load {:.2})",
                    rep + 1,
                    r.name,
                    s.value,
                    table.unit,
                    s.load
                );
                table.rows[i].samples.push(s);
            }
        }
    }

    // --- W5: connection churn soak ------------------------------------------------------
    let mut w5 = Table {
        id: "W5",
        title: format!(
            "connection churn soak (wrk -t1 -c50 -d1s x {}, Connection: close; samples: req/s \
             per second)",
            mode.churn_secs
        ),
        unit: "req/s",
        baseline: Some("direct"),
        peers: Vec::new(),
        higher_is_better: true,
        rows: Vec::new(),
        note: None,
    };
    eprintln!("==> W5: {}", w5.title);
    let mut churn_notes = Vec::new();
    let mut decays = Vec::new();
    for r in routes
        .iter()
        .filter(|r| matches!(r.name, "direct" | "egress-proxy"))
    {
        let c =
            work::churn(env, r, mode.churn_secs).with_context(|| format!("W5 on {}", r.name))?;
        let rates: Vec<f64> = c.per_sec.iter().map(|s| s.value).collect();
        let d = work::decay(&rates);
        let opt = |v: Option<usize>| v.map_or("-".into(), |v: usize| v.to_string());
        let line = format!(
            "{}: last/first third {}{}, TcpRetransSegs +{}, TIME_WAIT {} at the start, {} at \
             the end, nf_conntrack_count {} at the end",
            r.name,
            d.map_or("-".into(), |d| format!("{d:.2}")),
            if d.is_some_and(|d| d < 0.9) {
                " DECAY"
            } else {
                ""
            },
            c.retrans.map_or("-".into(), |v| v.to_string()),
            opt(c.time_wait.0),
            opt(c.time_wait.1),
            c.conntrack.map_or("-".into(), |v| v.to_string()),
        );
        eprintln!("    {line}");
        churn_notes.push(line);
        decays.push((r.name, d));
        w5.rows.push(Row {
            path: r.name.to_string(),
            samples: c.per_sec,
        });
    }
    churn_notes.push(
        "decay = mean req/s of the last third / the first third (< 0.9 flagged DECAY); \
         retransmits and TIME_WAIT count the whole namespace (ss -tan state time-wait), so \
         the second path starts with the first's TIME_WAIT sockets still there; the peers' nat \
         rules make the namespace track every connection, and a full conntrack table \
         (nf_conntrack_max) would drop SYNs and show up as retransmits and decay"
            .into(),
    );
    w5.note = Some(churn_notes.join("; "));

    // --- W4 / W7: connect() ------------------------------------------------------------
    eprintln!(
        "==> W4/W7: connect() micro-benchmark ({} iterations)",
        mode.conn_iters
    );
    let conn_cases: [(&str, bool, &str, &str, &str); 3] = [
        ("outside (no hooks)", false, "udp", "127.60.0.1", "9999"),
        ("inside web, allowed", true, "udp", "127.60.0.1", "9999"),
        (
            "inside web, denied (tcp)",
            true,
            "tcp",
            "127.63.0.1",
            "8080",
        ),
    ];
    let mut w4 = Table {
        id: "W4",
        title: "socket()+connect()+close() (UDP, connect sends nothing; 10,000 extra rules loaded)"
            .into(),
        unit: "ns/iter",
        baseline: Some("outside (no hooks)"),
        peers: Vec::new(),
        higher_is_better: false,
        rows: conn_cases[..2]
            .iter()
            .map(|c| Row {
                path: c.0.into(),
                samples: Vec::new(),
            })
            .collect(),
        note: Some("ratio column: outside / inside (1.00x = no cost)".into()),
    };
    let mut w7 = Table {
        id: "W7",
        title: "refused connect(): TCP socket()+connect() -> EPERM +close() inside web".into(),
        unit: "EPERM/s",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: true,
        rows: vec![Row {
            path: conn_cases[2].0.into(),
            samples: Vec::new(),
        }],
        note: None,
    };
    let bin = connbench.clone();
    for _ in 0..REPS {
        for (i, (name, in_web, proto, addr, port)) in conn_cases.iter().enumerate() {
            let (mut s, per_sec, ok, eperm) =
                work::connbench(env, &bin, *in_web, proto, addr, port, mode.conn_iters)
                    .with_context(|| format!("connbench {name}"))?;
            if i < 2 {
                if ok != mode.conn_iters {
                    s.errors = Some(format!("only {ok} connects succeeded"));
                }
                w4.rows[i].samples.push(s);
            } else {
                if eperm != mode.conn_iters {
                    s.errors = Some(format!("only {eperm} connects got EPERM"));
                }
                s.value = per_sec;
                w7.rows[0].samples.push(s);
            }
        }
    }

    if let Some(o) = w4.rows[0].value() {
        w7.note = Some(format!(
            "each iteration includes socket() and close(): for scale, a UDP \
             socket()+connect()+close() outside any workload costs {o:.0} ns here, at most \
             {:.0}k/s",
            1e6 / o
        ));
    }

    // --- W4r: what an iptables REDIRECT adds to connect() ------------------------------
    let red_iters = (mode.conn_iters / 10).max(1000);
    eprintln!("==> W4r: TCP connect() with and without iptables REDIRECT ({red_iters} iterations)");
    let red_cases = [
        ("outside, tcp 127.0.0.1:8081 (no rule)", "127.0.0.1"),
        ("outside, tcp 127.65.0.1:8081 (REDIRECT)", "127.65.0.1"),
    ];
    let mut w4r = Table {
        id: "W4r",
        title: "TCP socket()+connect()+close() (SO_LINGER 0) to a listener, with and without an \
                iptables nat OUTPUT REDIRECT"
            .into(),
        unit: "ns/iter",
        baseline: Some(red_cases[0].0),
        peers: Vec::new(),
        higher_is_better: false,
        rows: red_cases
            .iter()
            .map(|c| Row {
                path: c.0.into(),
                samples: Vec::new(),
            })
            .collect(),
        note: None,
    };
    for _ in 0..REPS {
        for (i, (name, addr)) in red_cases.iter().enumerate() {
            let (mut s, _, ok, _) =
                work::connbench(env, &bin, false, "tcprst", addr, "8081", red_iters)
                    .with_context(|| format!("connbench {name}"))?;
            if ok != red_iters {
                s.errors = Some(format!("only {ok} connects succeeded"));
            }
            eprintln!("    {name:<42} {:>10.0} ns/iter", s.value);
            w4r.rows[i].samples.push(s);
        }
    }
    let red_added = w4r.rows[1]
        .value()
        .zip(w4r.rows[0].value())
        .map(|(r, b)| r - b);
    let hook_added = w4.rows[1]
        .value()
        .zip(w4.rows[0].value())
        .map(|(i, o)| i - o);
    let conntrack = env
        .ns_run(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "-".into());
    w4r.note = Some(format!(
        "ratio column: no rule / REDIRECT. Both rows are outside every workload (no eBPF hook) \
         and reach the same nginx listener (127.0.0.1:8081); only the destination differs, so \
         the difference is the nat rule (the NAT binding of a new conntrack entry and the \
         un-NAT of the replies): REDIRECT adds {} ns per connect, against {} ns the eBPF \
         connect hook adds (W4). TCP, not UDP: a UDP connect() sends no packet, so a nat rule \
         never runs for it; each iteration is therefore a full loopback handshake, closed with \
         an RST (SO_LINGER 0) so no TIME_WAIT piles up. Both rows pass through conntrack (the \
         namespace has nat rules, so it tracks every connection); nf_conntrack_count at the \
         end: {conntrack}. {red_iters} iterations per run (a tenth of W4's).",
        red_added.map_or("-".into(), |a| format!("{a:.0}")),
        hook_added.map_or("-".into(), |a| format!("{a:.0}")),
    ));

    // --- W8: policy apply --------------------------------------------------------------
    eprintln!("==> W8: policy apply");
    let mut w8 = Table {
        id: "W8",
        title: "egress-agent policy apply -f FILE (the bulk-rules Egress replaced by N new /32s)"
            .into(),
        unit: "s",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows: Vec::new(),
        note: None,
    };
    for (i, &n) in mode.scale.iter().enumerate() {
        let mut row = Row {
            path: format!("{n} rules"),
            samples: Vec::new(),
        };
        for rep in 0..REPS as u32 {
            // A different set every time, so every apply changes every entry.
            let salt = (i as u32 * REPS as u32 + rep + 1) * 200_000;
            row.samples.push(work::apply(env, n, salt)?);
        }
        w8.rows.push(row);
    }
    if let Some(kib) = work::rss_kib(agent_pid) {
        notes.push(format!(
            "agent RSS after the runs: {:.1} MiB",
            kib as f64 / 1024.0
        ));
    }

    // --- verdicts ----------------------------------------------------------------------
    let mut verdicts = Vec::new();
    let inside = w4.rows[1].value();
    let outside = w4.rows[0].value();
    let added = inside.zip(outside).map(|(i, o)| i - o);
    verdicts.push(Verdict {
        target: "connect() added < 0.3 µs".into(),
        measured: added.map_or("-".into(), |a| format!("{:.3} µs", a / 1e3)),
        pass: added.map(|a| a < 300.0),
    });
    let eperm = w7.rows[0].value();
    verdicts.push(Verdict {
        target: "deny >= 140k EPERM/s".into(),
        measured: eperm.map_or("-".into(), |e| format!("{:.0}k EPERM/s", e / 1e3)),
        pass: eperm.map(|e| e >= 140_000.0),
    });
    let r = w1.ratio("egress-allow");
    verdicts.push(Verdict {
        target: "allow-direct 1.00x (W1, >= 0.97x: noise)".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        pass: r.map(|r| r >= 0.97),
    });
    let r = w1.ratio("egress-proxy");
    let cpu = w1.row("egress-proxy").and_then(Row::cpu);
    verdicts.push(Verdict {
        target: "proxied keep-alive >= 0.50x at <= 12 µs CPU/req".into(),
        measured: format!(
            "{}, {} µs CPU/req",
            r.map_or("-".into(), |r| format!("{r:.2}x")),
            cpu.map_or("-".into(), |c| format!("{c:.1}"))
        ),
        pass: r.zip(cpu).map(|(r, c)| r >= 0.5 && c <= 12.0),
    });
    let r = w2.ratio("egress-proxy");
    verdicts.push(Verdict {
        target: "new connections (proxied) >= 0.70x".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        pass: r.map(|r| r >= 0.7),
    });
    let r = w3.ratio("egress-proxy");
    verdicts.push(Verdict {
        target: "bulk (proxied) >= 0.85x".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        pass: r.map(|r| r >= 0.85),
    });
    let worst = decays.iter().filter_map(|(_, d)| *d).reduce(f64::min);
    verdicts.push(Verdict {
        target: "churn: no decay (last/first >= 0.9)".into(),
        measured: decays
            .iter()
            .map(|(n, d)| format!("{n} {}", d.map_or("-".into(), |d| format!("{d:.2}"))))
            .collect::<Vec<_>>()
            .join(", "),
        pass: worst.map(|w| w >= 0.9 && decays.iter().all(|(_, d)| d.is_some())),
    });
    let big = w8.value("100000 rules");
    verdicts.push(Verdict {
        target: "100k rules < 1 s".into(),
        measured: match big {
            Some(b) => format!("{b:.3} s"),
            None => format!(
                "not run in quick mode (10k: {} s)",
                w8.value("10000 rules")
                    .map_or("-".into(), |v| format!("{v:.3}"))
            ),
        },
        pass: big.map(|b| b < 1.0),
    });
    if [&w1, &w2, &w3, &w5, &w4, &w4r, &w7]
        .iter()
        .any(|t| t.rows.iter().any(Row::busy))
    {
        notes.push(format!(
            "rows flagged *busy* were measured while the 1-minute load average exceeded {} \
             (2 cores): other work on the machine may have lowered them",
            report::BUSY_LOAD
        ));
    }
    notes.push(
        "processes enter the bench's network namespace with nsenter --net (ip netns exec \
         would remount /sys and hide bpffs and the cgroup2 mount from the agent)"
            .into(),
    );
    // A verdict from a point measured on a busy machine says so.
    let busy = |t: &Table| t.rows.iter().any(Row::busy);
    let sources = [
        busy(&w4),
        busy(&w7),
        busy(&w1),
        busy(&w1),
        busy(&w2),
        busy(&w3),
        busy(&w5),
        busy(&w8),
    ];
    for (v, b) in verdicts.iter_mut().zip(sources) {
        if b && v.pass.is_some() {
            v.measured.push_str(" *busy*");
        }
    }
    Ok(Report {
        mode: mode.name,
        machine: machine(),
        tables: vec![w1, w2, w3, w5, w4, w4r, w7, w8],
        verdicts,
        notes,
    })
}
