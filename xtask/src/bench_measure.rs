//! The measurements of `cargo xtask bench` (see bench.rs for the paths and the workloads):
//! each function runs one workload over the paths, [`REPS`] times interleaved, and returns its
//! table.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    bench_env::Env,
    bench_report::{Row, Table},
    bench_work::{self as work, Route},
};

pub const REPS: usize = 3;

pub struct Mode {
    pub name: &'static str,
    pub wrk_secs: u32,
    pub iperf_secs: u32,
    pub conn_iters: u64,
    pub churn_secs: u32,
    pub scale: &'static [u32],
}

pub const QUICK: Mode = Mode {
    name: "quick",
    wrk_secs: 3,
    iperf_secs: 3,
    conn_iters: 100_000,
    churn_secs: 10,
    scale: &[10_000],
};
pub const FULL: Mode = Mode {
    name: "full",
    wrk_secs: 10,
    iperf_secs: 10,
    conn_iters: 1_000_000,
    churn_secs: 60,
    scale: &[10_000, 100_000],
};

/// A table with a row per path, `direct` its baseline and the REDIRECT paths its peers.
fn paths_table(
    routes: &[Route],
    id: &'static str,
    title: String,
    unit: &'static str,
    note: Option<String>,
) -> Table {
    Table {
        id,
        title,
        unit,
        baseline: Some("direct"),
        peers: vec!["haproxy-redirect", "nginx-stream-redirect"],
        higher_is_better: true,
        rows: Row::named(routes.iter().map(|r| r.name)),
        note,
    }
}

/// W1 keep-alive HTTP, W2 a new connection per request, W3 bulk, over every path.
pub fn http_and_bulk(env: &mut Env, routes: &[Route], mode: &Mode) -> anyhow::Result<[Table; 3]> {
    let peer_note = "haproxy-redirect: iptables REDIRECT to haproxy (TCP mode, nbthread 1), \
                     which forwards to the original destination as the agent does (`server s1 \
                     0.0.0.0:0`: the address it reads with SO_ORIGINAL_DST; nginx on \
                     127.62.0.1, iperf3 on *:5201). nginx-stream-redirect: the same iptables \
                     REDIRECT (127.64.0.1) to nginx's stream module (TCP proxy, 1 worker), which \
                     cannot read SO_ORIGINAL_DST (its $server_addr is the REDIRECT's 127.0.0.1) \
                     and so forwards to a fixed backend (127.60.0.1); its proxy cpu is the worker \
                     process's.";
    let mut w1 = paths_table(
        routes,
        "W1",
        format!("keep-alive small HTTP (wrk -t1 -c50 -d{}s)", mode.wrk_secs),
        "req/s",
        Some(peer_note.to_string()),
    );
    let mut w2 = paths_table(
        routes,
        "W2",
        format!(
            "new connection per request (wrk -t1 -c50 -d{}s, Connection: close)",
            mode.wrk_secs
        ),
        "req/s",
        None,
    );
    let mut w3 = paths_table(
        routes,
        "W3",
        format!("bulk (iperf3 -t {} -P 1)", mode.iperf_secs),
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

    Ok([w1, w2, w3])
}

/// Per path, the last third of the churn soak's rate over its first third (None: no data).
pub type Decays = Vec<(&'static str, Option<f64>)>;

/// W5: the connection-churn soak on `direct` and `egress-proxy`; also the decay of each.
pub fn churn(env: &mut Env, routes: &[Route], mode: &Mode) -> anyhow::Result<(Table, Decays)> {
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

    Ok((w5, decays))
}

/// W4 connect() cost (outside and inside a workload) and W7 refused connects.
pub fn connect(env: &mut Env, bin: &Path, mode: &Mode) -> anyhow::Result<(Table, Table)> {
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
    for _ in 0..REPS {
        for (i, (name, in_web, proto, addr, port)) in conn_cases.iter().enumerate() {
            let (mut s, per_sec, ok, eperm) =
                work::connbench(env, bin, *in_web, proto, addr, port, mode.conn_iters)
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

    Ok((w4, w7))
}

/// W4r: what an iptables REDIRECT adds to a TCP connect(), next to what the hook adds (`w4`).
pub fn redirect(env: &mut Env, bin: &Path, mode: &Mode, w4: &Table) -> anyhow::Result<Table> {
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
                work::connbench(env, bin, false, "tcprst", addr, "8081", red_iters)
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

    Ok(w4r)
}

/// W8: `policy apply` of the bulk-rules Egress at each scale of the mode.
pub fn apply(env: &mut Env, mode: &Mode) -> anyhow::Result<Table> {
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
    Ok(w8)
}
