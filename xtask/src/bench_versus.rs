//! `cargo xtask bench --syscalls`: the agent's proxy against its peers only, in a few
//! minutes: W1-W3 (keep-alive, a new connection per request, bulk) on `direct`,
//! `egress-proxy`, `haproxy-redirect` and `nginx-stream-redirect`, then S1-S4 (system calls
//! and wake-ups per request and per connection, [`crate::bench_syscalls`]). Writes
//! target/bench/versus.md.

use std::{fs, path::Path};

use crate::{
    bench::{machine, start_nginx, start_peers, PACKAGES},
    bench_env::{ensure_packages, release_agent, Env},
    bench_measure::{self as measure, QUICK},
    bench_report::{self as report, Report, Row, Table, Verdict},
    bench_syscalls,
    bench_work::{self as work, Route},
};

pub fn bench(root: &Path) -> anyhow::Result<()> {
    let agent = release_agent(root)?;
    ensure_packages(PACKAGES)?;
    let mut env = Env::new(&agent)?;
    let result = run(root, &mut env);
    let r = env.conclude(result)?;
    let text = report::text(&r);
    println!("{text}");
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("versus.md"), report::markdown(&r, true))?;
    eprintln!("wrote target/bench/versus.md");
    Ok(())
}

fn run(root: &Path, env: &mut Env) -> anyhow::Result<Report> {
    start_nginx(root, env)?;
    env.spawn("iperf3", &["iperf3", "-s", "-p", "5201"])?;
    env.wait_listen("iperf3", "*:5201")?;
    let (haproxy, stream_worker) = start_peers(root, env)?;
    let cfg_file = env.work.join("policy.yaml");
    fs::write(&cfg_file, work::policy(10_000, 0))?;
    let agent_pid = env.start_agent(&cfg_file, &[])?;
    let route = |name, host, in_web, cpu_pid| Route {
        name,
        host,
        in_web,
        cpu_pid,
    };
    let routes = [
        route("direct", "127.60.0.1", false, None),
        route("egress-proxy", "127.61.0.1", true, Some(agent_pid)),
        route("haproxy-redirect", "127.62.0.1", false, Some(haproxy)),
        route(
            "nginx-stream-redirect",
            "127.64.0.1",
            false,
            Some(stream_worker),
        ),
    ];
    work::check_routes(env, &routes)?;
    let mode = QUICK;
    let [w1, w2, w3] = measure::http_and_bulk(env, &routes, &mode)?;
    let counted: Vec<&Route> = routes.iter().filter(|r| r.cpu_pid.is_some()).collect();
    let s = bench_syscalls::measure(env, &counted, mode.wrk_secs)?;
    let busy = |t: &Table, p: &str| {
        if t.row(p).is_some_and(Row::busy) {
            " *busy*"
        } else {
            ""
        }
    };
    let (r1, c1) = (
        w1.ratio("egress-proxy"),
        w1.row("egress-proxy").and_then(Row::cpu),
    );
    let (r2, c2) = (
        w2.ratio("egress-proxy"),
        w2.row("egress-proxy").and_then(Row::cpu),
    );
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    let mut verdicts = vec![
        Verdict {
            target: "proxied keep-alive >= 0.50x at <= 12 µs CPU/req".into(),
            measured: format!(
                "{}, {} µs CPU/req{}",
                x(r1),
                us(c1),
                busy(&w1, "egress-proxy")
            ),
            pass: r1.zip(c1).map(|(r, c)| r >= 0.5 && c <= 12.0),
        },
        Verdict {
            target: "new connections (proxied) >= 0.70x".into(),
            measured: format!(
                "{}, {} µs CPU/conn{}",
                x(r2),
                us(c2),
                busy(&w2, "egress-proxy")
            ),
            pass: r2.map(|r| r >= 0.7),
        },
        bench_syscalls::best_peer_verdict(&w2),
    ];
    verdicts.extend(bench_syscalls::verdicts(&s));
    let mut tables = vec![w1, w2, w3];
    tables.extend(s);
    Ok(Report {
        mode: "syscalls",
        machine: machine(),
        tables,
        verdicts,
        notes: vec![crate::bench_proxy::load_note()],
    })
}
