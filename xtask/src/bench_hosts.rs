//! W1h: what judging every request by its Host costs on a proxied keep-alive connection.
//!
//! Two paths through the agent's transparent proxy to the same nginx, the same wrk command
//! (keep-alive, `Host: bench.example`), interleaved: `proxy, host rule` dials 127.70.0.1, which
//! an Egress with `hosts: [bench.example]` (and that address, so the proxy may dial it) sends
//! to the proxy: it parses and judges every request of the connection (HTTP/1.x per-request
//! judging). `proxy, no host rule` dials 127.61.0.1, which a CIDR rule sends `via: proxy`: the
//! proxy relays the bytes without reading them. The ratio of the first to the second is the
//! cost of per-request judging; the target is >= 0.90x.

use anyhow::Context as _;

use crate::{
    bench_env::Env,
    bench_measure::Mode,
    bench_report::{Row, Table, Verdict},
    bench_work::{self as work, Route},
};

/// The host the wrk requests name (both paths), and the judged path's address.
const HOST: &str = "bench.example";
const JUDGED_ADDR: &str = "127.70.0.1";
const JUDGED: &str = "proxy, host rule (every request judged)";
const RELAYED: &str = "proxy, no host rule (relayed)";
/// Samples per path: more than the other tables' 3, as the two are close.
const REPS: usize = 5;
const TARGET: f64 = 0.90;

/// Runs W1h; the table and its verdict (median ratio, with the range of the per-round ratios).
pub fn measure(env: &Env, agent_pid: u32, mode: &Mode) -> anyhow::Result<(Table, Verdict)> {
    let routes = [
        Route {
            name: JUDGED,
            host: JUDGED_ADDR,
            in_web: true,
            cpu_pid: Some(agent_pid),
        },
        Route {
            name: RELAYED,
            host: "127.61.0.1",
            in_web: true,
            cpu_pid: Some(agent_pid),
        },
    ];
    // Sanity: the judged path serves the page for the allowed host and refuses another.
    let url = format!("http://{JUDGED_ADDR}:8080/index.html");
    let host = format!("Host: {HOST}");
    let page = work::client(env, true, &["curl", "-sSf", "-H", &host, &url])
        .context("the host-rule path does not serve bench.example")?;
    anyhow::ensure!(page.contains("egress bench"), "host-rule path: {page}");
    let code = work::client(
        env,
        true,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: other.example",
            &url,
        ],
    )?;
    anyhow::ensure!(
        code.trim() == "403",
        "the host-rule path did not refuse another host (HTTP {code}): nothing is judged"
    );
    let mut t = Table {
        id: "W1h",
        title: format!(
            "proxied keep-alive, every request judged by Host vs relayed (wrk -t1 -c50 -d{}s \
             -H 'Host: {HOST}')",
            mode.wrk_secs
        ),
        unit: "req/s",
        baseline: Some(RELAYED),
        peers: Vec::new(),
        higher_is_better: true,
        rows: routes
            .iter()
            .map(|r| Row {
                path: r.name.into(),
                samples: Vec::new(),
            })
            .collect(),
        note: None,
    };
    eprintln!("==> W1h: {}", t.title);
    for rep in 0..REPS {
        // Alternate which path goes first, so a drift in load does not favour one.
        let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let r = &routes[i];
            let s = work::wrk_with(env, r, mode.wrk_secs, &[&host])
                .with_context(|| format!("W1h on {} (run {})", r.name, rep + 1))?;
            eprintln!(
                "    run {} {:<40} {:>10.0} req/s  cpu {:>5.1} µs/req  (load {:.2})",
                rep + 1,
                r.name,
                s.value,
                s.cpu_us_per_req.unwrap_or(f64::NAN),
                s.load
            );
            t.rows[i].samples.push(s);
        }
    }
    let ratio = t.ratio(JUDGED);
    // The ratio of each round (judged / relayed, measured back to back): its spread.
    let rounds: Vec<f64> = t.rows[0]
        .samples
        .iter()
        .zip(&t.rows[1].samples)
        .filter(|(_, b)| b.value > 0.0)
        .map(|(a, b)| a.value / b.value)
        .collect();
    let mid = crate::bench_report::median(rounds.clone());
    let lo = rounds.iter().copied().reduce(f64::min);
    let hi = rounds.iter().copied().reduce(f64::max);
    let busy = t.rows.iter().any(Row::busy);
    let cpu = |i: usize| {
        t.rows[i]
            .cpu()
            .map_or("-".into(), |c: f64| format!("{c:.1}"))
    };
    let measured = format!(
        "{} ({:.0} vs {:.0} req/s; per-round ratios {}-{}, median {}; agent CPU {} vs {} \
         µs/req){}",
        ratio.map_or("-".into(), |r| format!("{r:.3}x")),
        t.rows[0].value().unwrap_or(f64::NAN),
        t.rows[1].value().unwrap_or(f64::NAN),
        lo.map_or("-".into(), |v| format!("{v:.2}")),
        hi.map_or("-".into(), |v| format!("{v:.2}")),
        mid.map_or("-".into(), |v| format!("{v:.2}")),
        cpu(0),
        cpu(1),
        if busy { " *busy*" } else { "" }
    );
    t.note = Some(format!(
        "ratio column: each path / `{RELAYED}`. `{JUDGED}`: 127.70.0.1, an Egress with \
         `hosts: [{HOST}]`; the proxy parses every request head (httparse), judges its Host \
         against the policy in force, forwards it and its response, then reads the next. \
         `{RELAYED}`: 127.61.0.1, `via: proxy` by address; the proxy relays bytes without \
         reading them. Same nginx, same requests; {REPS} rounds, the order alternating. \
         Verdict: {measured}"
    ));
    let verdict = Verdict {
        target: format!(
            "proxied keep-alive, every request judged by Host, >= {TARGET:.2}x relayed"
        ),
        measured,
        pass: ratio.map(|r| r >= TARGET),
    };
    Ok((t, verdict))
}
