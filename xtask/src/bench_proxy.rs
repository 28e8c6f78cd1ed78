//! `cargo xtask bench --proxy` (and part of `--full`): the proxy's and the control path's
//! issue-18 workloads. W10: `egress disable|enable` with 100k rules loaded, the CLI round
//! trip and the time from the request's arrival at the agent to the kernel's switch (the
//! agent reports it, `switch_us`). W11: a burst of 10,000 concurrent connections to a
//! server-first service (a banner first, like SSH), directly and through the proxy: how many
//! got the banner, and the time until the last one did.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Context as _};

use crate::{
    bench_env::Env,
    bench_measure::REPS,
    bench_report::{median, Row, Sample, Table, Verdict},
    bench_work as work,
};

/// Toggles per sample (each sample's value is their median).
const TOGGLES: usize = 10;

/// W10: `egress disable` / `egress enable` alternately with `rules` extra rules in force.
pub fn toggle(env: &Env, rules: u32) -> anyhow::Result<Table> {
    eprintln!("==> W10: egress enable|disable with {rules} rules");
    work::apply(env, rules, 7_000_000)?;
    let mut cli = Row {
        path: "CLI round trip".into(),
        samples: Vec::new(),
    };
    let mut switch = Row {
        path: "request to kernel switch".into(),
        samples: Vec::new(),
    };
    let agent = env.agent.display().to_string();
    let sock = env.sock.display().to_string();
    for _ in 0..REPS {
        let (mut round, mut sw) = (Vec::new(), Vec::new());
        let base = work::new_sample();
        for i in 0..TOGGLES {
            let verb = if i % 2 == 0 { "disable" } else { "enable" };
            let t = Instant::now();
            let out = Command::new(&agent)
                .args(["--admin-socket", &sock, "-o", "json", "egress", verb])
                .output()
                .context("cannot run the CLI")?;
            round.push(t.elapsed().as_secs_f64() * 1e6);
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "egress {verb} failed: {}{text}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            sw.push(json_u64(&text, "switch_us").context("no switch_us in the answer")? as f64);
        }
        cli.samples.push(Sample {
            value: median(round).unwrap_or(f64::NAN),
            ..base.clone()
        });
        switch.samples.push(Sample {
            value: median(sw).unwrap_or(f64::NAN),
            ..base
        });
    }
    // Leave the bench's policy as it was (enableEgress false, 10k rules).
    work::apply(env, 10_000, 0)?;
    Ok(Table {
        id: "W10",
        title: format!(
            "egress disable|enable with {rules} rules: CLI process round trip, and the agent's \
             own reading from the request's arrival to the kernel's switch (median of {TOGGLES} \
             toggles per sample)"
        ),
        unit: "µs",
        baseline: None,
        peers: Vec::new(),
        higher_is_better: false,
        rows: vec![cli, switch],
        note: None,
    })
}

/// The verdicts on W10.
pub fn toggle_verdicts(w10: &Table) -> Vec<Verdict> {
    let flag = |r: &str| {
        if w10.row(r).is_some_and(Row::busy) {
            " *busy*"
        } else {
            ""
        }
    };
    let cli = w10.value("CLI round trip");
    let sw = w10.value("request to kernel switch");
    vec![
        Verdict {
            target: "toggle with 100k rules: CLI round trip < 15 ms".into(),
            measured: format!(
                "{}{}",
                cli.map_or("-".into(), |v| format!("{:.1} ms", v / 1e3)),
                flag("CLI round trip")
            ),
            pass: cli.map(|v| v < 15_000.0),
        },
        Verdict {
            target: "toggle: kernel switch < 1 ms after the request".into(),
            measured: format!(
                "{}{}",
                sw.map_or("-".into(), |v| format!("{v:.0} µs")),
                flag("request to kernel switch")
            ),
            pass: sw.map(|v| v < 1_000.0),
        },
    ]
}

/// Concurrent connections of W11.
pub const BURST: u32 = 10_000;
/// How long a W11 client waits for every banner.
const BURST_SECS: &str = "30";

/// Starts the banner server W11 and W12 dial (port 2222 on every address).
pub fn burst_server(env: &mut Env, root: &Path) -> anyhow::Result<()> {
    let script = root.join("scripts/bench/burst.py").display().to_string();
    env.spawn(
        "burst-server",
        &["python3", &script, "server", "0.0.0.0", "2222"],
    )?;
    env.wait_log("burst-server", &["listening"], 30)
}

/// W11 (the server of [`burst_server`] listening): `BURST` connections at once to the banner server (scripts/bench/burst.py on port
/// 2222), directly (127.60.0.1) and through the proxy (127.61.0.1, from inside `web`).
pub fn burst(env: &mut Env, root: &Path) -> anyhow::Result<Table> {
    eprintln!("==> W11: a burst of {BURST} connections to a server-first service");
    let script = root.join("scripts/bench/burst.py").display().to_string();
    let n = BURST.to_string();
    const ROUTES: [(&str, &str, bool); 2] = [
        ("direct", "127.60.0.1", false),
        ("egress-proxy", "127.61.0.1", true),
    ];
    let mut rows: Vec<Row> = ROUTES
        .iter()
        .map(|(p, _, _)| Row {
            path: p.to_string(),
            samples: Vec::new(),
        })
        .collect();
    for _ in 0..REPS {
        for (row, (_, host, in_web)) in rows.iter_mut().zip(ROUTES) {
            let mut s = work::new_sample();
            let argv = ["python3", &script, "client", host, "2222", &n, BURST_SECS];
            let out = work::client(env, in_web, &argv)?;
            work::close_sample(&mut s);
            let (served, lost, last_ms) =
                parse_burst(&out).with_context(|| format!("burst client said: {out}"))?;
            s.value = last_ms / 1e3;
            if lost > 0 {
                s.errors = Some(format!(
                    "{lost} of {} lost ({})",
                    served + lost,
                    work::agent_refusals(env)
                ));
            }
            row.samples.push(s);
            // Let the closed connections drain before the next run.
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    Ok(Table {
        id: "W11",
        title: format!(
            "{BURST} concurrent connections to a server-first service (banner first): time              until the last banner arrived; a lost connection (no banner within              {BURST_SECS} s) is listed under flag"
        ),
        unit: "s",
        baseline: Some("direct"),
        peers: Vec::new(),
        higher_is_better: false,
        rows,
        note: None,
    })
}

/// `served=N lost=N last_ms=X` from burst.py.
fn parse_burst(out: &str) -> Option<(u64, u64, f64)> {
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    Some((
        field("served")?.parse().ok()?,
        field("lost")?.parse().ok()?,
        field("last_ms")?.parse().ok()?,
    ))
}

/// The verdict on W11: every connection through the proxy served.
pub fn burst_verdict(w11: &Table) -> Verdict {
    let row = w11.row("egress-proxy");
    let lost: Vec<String> = row
        .map(|r| r.samples.iter().filter_map(|s| s.errors.clone()).collect())
        .unwrap_or_default();
    let busy = row.is_some_and(Row::busy);
    Verdict {
        target: format!("burst of {BURST} through the proxy: 0 lost"),
        measured: format!(
            "{}, the last served after {} s{}",
            if lost.is_empty() {
                "0 lost".to_string()
            } else {
                lost.join("; ")
            },
            w11.value("egress-proxy")
                .map_or("-".into(), |v| format!("{v:.2}")),
            if busy { " *busy*" } else { "" }
        ),
        pass: row.map(|r| !r.samples.is_empty() && lost.is_empty()),
    }
}

/// The verdicts on W10, W11 and W12 (`tables` in that order; none when empty).
pub fn verdicts(tables: &[Table]) -> Vec<Verdict> {
    let [w10, w11, w12] = tables else {
        return Vec::new();
    };
    let mut v = toggle_verdicts(w10);
    v.push(burst_verdict(w11));
    v.extend(crate::bench_memory::verdicts(w12));
    v
}

/// The number after `"key":` in JSON text.
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\""))?;
    let rest = text[at + key.len() + 2..].trim_start().strip_prefix(':')?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The machine's load at the end, and how much of it was this bench's own.
pub fn load_note() -> String {
    let (load, running) = work::load();
    format!("1-minute load average at the end {load:.2}, {running} runnable (2 cores shared with other work)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_numbers() {
        let t = "{\n  \"generation\": 7,\n  \"switch_us\": 42\n}";
        assert_eq!(super::json_u64(t, "switch_us"), Some(42));
        assert_eq!(super::json_u64(t, "nope"), None);
    }

    #[test]
    fn burst_line() {
        assert_eq!(
            super::parse_burst("served=9990 lost=10 last_ms=1234.5\n"),
            Some((9990, 10, 1234.5))
        );
    }
}
