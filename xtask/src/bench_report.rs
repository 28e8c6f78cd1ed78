//! `cargo xtask bench`: results, the printed tables, JSON, Markdown and the verdicts.

use std::fmt::Write as _;

/// One measurement of one path (one repetition).
#[derive(Clone, Default)]
pub struct Sample {
    pub value: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub cpu_us_per_req: Option<f64>,
    /// 1-minute load average and procs_running just before the point.
    pub load: f64,
    pub procs_running: u32,
    /// Errors the client reported (wrk socket errors, non-2xx), if any.
    pub errors: Option<String>,
}

pub struct Row {
    pub path: String,
    pub samples: Vec<Sample>,
}

pub struct Table {
    pub id: &'static str,
    pub title: String,
    pub unit: &'static str,
    /// The row the ratios are taken to ("direct"); None: no ratio column.
    pub baseline: Option<&'static str>,
    /// Rows that are peers (ratio to the best of them).
    pub peers: Vec<&'static str>,
    pub higher_is_better: bool,
    pub rows: Vec<Row>,
    pub note: Option<String>,
}

pub struct Verdict {
    pub target: String,
    pub measured: String,
    /// None: not measured in this mode.
    pub pass: Option<bool>,
}

pub struct Report {
    pub mode: &'static str,
    pub machine: Vec<(String, String)>,
    pub tables: Vec<Table>,
    pub verdicts: Vec<Verdict>,
    pub notes: Vec<String>,
}

pub const BUSY_LOAD: f64 = 1.5;

const METHOD: &str = "## How it is measured\n\n\
Everything runs inside one network namespace the bench creates (`egress-bench-PID`); loopback \
addresses stand in for hosts. nginx (1 worker, access log off, keep-alive on) serves a small \
file on 127.60.0.1:8080 and 127.61.0.1:8080; iperf3 listens on port 5201. The agent runs with \
its own cgroup root, pin dir and state file, the policy `web` allowed to 127.60.0.1 directly, \
to 127.61.0.1 `via: proxy`, plus 10,000 other /32 rules.\n\n\
- `direct`: the client outside every workload, to 127.60.0.1 (the baseline).\n\
- `egress-allow`: the client inside `web` (`egress-agent exec`), allowed directly.\n\
- `egress-proxy`: inside `web`, to 127.61.0.1: every connection through the agent's \
transparent proxy. *proxy cpu* is the agent's utime+stime per request.\n\
- W1h, the cost of judging every request: inside `web`, wrk with `Host: bench.example` to \
127.70.0.1, which an Egress with `hosts: [bench.example]` sends to the proxy (every request of \
the keep-alive connection parsed and judged), against the same requests to 127.61.0.1 \
(`via: proxy` by address: relayed unread); 5 rounds, the order alternating.\n\
- `haproxy-redirect` (peer): outside, to 127.62.0.1, which an iptables `nat OUTPUT REDIRECT` \
sends to haproxy (TCP mode, `nbthread 1`), which forwards to a fixed backend (127.60.0.1): \
the cost of the extra userspace hop behind iptables. *proxy cpu* is haproxy's.\n\
- `nginx-stream-redirect` (peer): outside, to 127.64.0.1, the same iptables REDIRECT to nginx's \
`stream` module (TCP proxy, 1 worker; `libnginx-mod-stream`), also to that fixed backend, not \
to the original destination. *proxy cpu* is its worker process's.\n\n\
W4 runs `scripts/bench/connbench.c` (socket()+connect()+close() on UDP, which sends nothing) \
outside and inside `web`; W7 the same with TCP to a destination no rule allows (EPERM); W8 \
times `egress-agent policy apply -f FILE` replacing the 10,000 extra rules by a new set. W5 \
runs `wrk -d1s -H 'Connection: close'` back to back (10 s in --quick, 60 s in --full) on \
`direct` and `egress-proxy`, one sample per second, and reports the last-third / first-third \
rate ratio, the namespace's TcpRetransSegs delta and its TIME_WAIT sockets. W4r: \
TCP socket()+connect()+close(RST) outside every workload to one nginx listener \
(127.0.0.1:8081), dialled directly and through an iptables `nat OUTPUT REDIRECT` \
(127.65.0.1:8081), to show what the rule adds per connect beside the eBPF hook (W4). \
K1 reads the kernel's own per-program accounting (`kernel.bpf_stats_enabled`, `bpftool prog \
show` for the programs attached to the bench's cgroup root) around W4's in-workload run and a \
keep-alive wrk run on `egress-allow`: ns per run of `sock_create`, `connect4` and the \
per-packet `skb_egress`, which other load on the machine hardly moves. The accounting itself \
adds two clock reads to every run; K1 measures that with two programs that do nothing \
(`scripts/bench/noprog.c`: `r0 = 1; exit`, a sock_create and a connect4 program attached \
beside the agent's by bpf links for one more in-workload run) and reports the hooks' cost net \
of it beside the raw figure.\n\n";

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Row {
    pub fn value(&self) -> Option<f64> {
        median(self.samples.iter().map(|s| s.value).collect())
    }
    fn field(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        median(self.samples.iter().filter_map(f).collect())
    }
    pub fn p50(&self) -> Option<f64> {
        self.field(|s| s.p50_us)
    }
    pub fn p99(&self) -> Option<f64> {
        self.field(|s| s.p99_us)
    }
    pub fn cpu(&self) -> Option<f64> {
        self.field(|s| s.cpu_us_per_req)
    }
    pub fn busy(&self) -> bool {
        self.samples.iter().any(|s| s.load > BUSY_LOAD)
    }
    fn errors(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| s.errors.clone())
            .collect()
    }
}

impl Table {
    pub fn row(&self, path: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.path == path)
    }
    pub fn value(&self, path: &str) -> Option<f64> {
        self.row(path).and_then(Row::value)
    }
    /// value / baseline (for "lower is better" units: baseline / value, so > 1 is faster).
    pub fn ratio_to(&self, path: &str, base: f64) -> Option<f64> {
        let v = self.value(path)?;
        if base == 0.0 || v == 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            v / base
        } else {
            base / v
        })
    }
    pub fn ratio(&self, path: &str) -> Option<f64> {
        self.ratio_to(path, self.value(self.baseline?)?)
    }
    fn best_peer(&self) -> Option<f64> {
        let vals = self.peers.iter().filter_map(|p| self.value(p));
        if self.higher_is_better {
            vals.reduce(f64::max)
        } else {
            vals.reduce(f64::min)
        }
    }
    fn has(&self, f: impl Fn(&Row) -> Option<f64>) -> bool {
        self.rows.iter().any(|r| f(r).is_some())
    }
}

fn num(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) => format!("{v:.prec$}"),
        None => "-".into(),
    }
}

fn ratio(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.2}x"),
        None => "-".into(),
    }
}

fn prec(unit: &str) -> usize {
    match unit {
        "req/s" | "EPERM/s" => 0,
        "ns/iter" | "µs" => 0,
        "s" => 3,
        _ => 2,
    }
}

/// The cells of one table: header and rows.
fn cells(t: &Table) -> (Vec<String>, Vec<Vec<String>>) {
    let mut head = vec!["path".to_string(), format!("median ({})", t.unit)];
    let best_peer = t.best_peer();
    let with_peer = best_peer.is_some() && t.rows.iter().any(|r| !t.peers.contains(&&*r.path));
    let with_p = t.has(Row::p99);
    let with_cpu = t.has(Row::cpu);
    if let Some(base) = t.baseline {
        // Another baseline than `direct`: the table's note says which.
        head.push(
            if base == "direct" {
                "vs direct"
            } else {
                "ratio"
            }
            .into(),
        );
    }
    if with_peer {
        head.push("vs best peer".into());
    }
    if with_p {
        head.push("p50 µs".into());
        head.push("p99 µs".into());
    }
    if with_cpu {
        head.push("proxy cpu µs/req".into());
    }
    head.push("samples".into());
    head.push("flag".into());
    let mut rows = Vec::new();
    for r in &t.rows {
        let mut c = vec![r.path.clone(), num(r.value(), prec(t.unit))];
        if t.baseline.is_some() {
            c.push(ratio(t.ratio(&r.path)));
        }
        if with_peer {
            c.push(if t.peers.contains(&&*r.path) {
                "(peer)".into()
            } else {
                ratio(best_peer.and_then(|b| t.ratio_to(&r.path, b)))
            });
        }
        if with_p {
            c.push(num(r.p50(), 0));
            c.push(num(r.p99(), 0));
        }
        if with_cpu {
            c.push(num(r.cpu(), 1));
        }
        c.push(
            r.samples
                .iter()
                .map(|s| num(Some(s.value), prec(t.unit)))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let mut flags = Vec::new();
        if r.busy() {
            flags.push("*busy*".to_string());
        }
        if !r.errors().is_empty() {
            flags.push(format!("errors: {}", r.errors().join("; ")));
        }
        c.push(flags.join(" "));
        rows.push(c);
    }
    (head, rows)
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    for t in &r.tables {
        let (head, rows) = cells(t);
        let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cols: &[String]| {
            cols.iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(s, "\n{}: {}", t.id, t.title);
        let _ = writeln!(s, "{}", line(&head));
        for row in &rows {
            let _ = writeln!(s, "{}", line(row));
        }
        if let Some(n) = &t.note {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    let _ = writeln!(s, "\nverdicts ({} mode):", r.mode);
    for v in &r.verdicts {
        let tag = match v.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "SKIP",
        };
        let _ = writeln!(s, "  {tag}  {:<50} measured: {}", v.target, v.measured);
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

pub fn markdown(r: &Report, with_machine: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# egress benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `cargo xtask bench --{}` (see `xtask/src/bench.rs`). Every value is the \
         median of the repetitions listed under *samples*, the paths interleaved. A row flagged \
         `*busy*` was measured while the 1-minute load average exceeded {BUSY_LOAD}.\n",
        r.mode
    );
    s.push_str(METHOD);
    if with_machine {
        let _ = writeln!(s, "## Machine\n");
        for (k, v) in &r.machine {
            let _ = writeln!(s, "- {k}: {v}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "## Verdicts\n\n| result | target | measured |\n|---|---|---|"
    );
    for v in &r.verdicts {
        let tag = match v.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "SKIP",
        };
        let _ = writeln!(s, "| {tag} | {} | {} |", v.target, v.measured);
    }
    for t in &r.tables {
        let (head, rows) = cells(t);
        let _ = writeln!(s, "\n## {}: {}\n", t.id, t.title);
        let _ = writeln!(s, "| {} |", head.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
        for row in rows {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        if let Some(n) = &t.note {
            let _ = writeln!(s, "\n{n}");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn jstr(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn jnum(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".into(),
    }
}

pub fn json(r: &Report) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"mode\": {},", jstr(r.mode));
    let machine: Vec<String> = r
        .machine
        .iter()
        .map(|(k, v)| format!("{}: {}", jstr(k), jstr(v)))
        .collect();
    let _ = writeln!(s, "  \"machine\": {{{}}},", machine.join(", "));
    s.push_str("  \"workloads\": [\n");
    for (ti, t) in r.tables.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {{\"id\": {}, \"title\": {}, \"unit\": {}, \"rows\": [",
            jstr(t.id),
            jstr(&t.title),
            jstr(t.unit)
        );
        for (ri, row) in t.rows.iter().enumerate() {
            let samples: Vec<String> = row
                .samples
                .iter()
                .map(|x| {
                    format!(
                        "{{\"value\": {}, \"p50_us\": {}, \"p99_us\": {}, \"cpu_us_per_req\": {}, \"load1\": {}, \"procs_running\": {}, \"errors\": {}}}",
                        jnum(Some(x.value)),
                        jnum(x.p50_us),
                        jnum(x.p99_us),
                        jnum(x.cpu_us_per_req),
                        jnum(Some(x.load)),
                        x.procs_running,
                        x.errors.as_deref().map(jstr).unwrap_or_else(|| "null".into())
                    )
                })
                .collect();
            let _ = write!(
                s,
                "      {{\"path\": {}, \"median\": {}, \"ratio_to_direct\": {}, \"p99_us\": {}, \"cpu_us_per_req\": {}, \"busy\": {}, \"samples\": [{}]}}",
                jstr(&row.path),
                jnum(row.value()),
                jnum(t.ratio(&row.path)),
                jnum(row.p99()),
                jnum(row.cpu()),
                row.busy(),
                samples.join(", ")
            );
            s.push_str(if ri + 1 < t.rows.len() { ",\n" } else { "\n" });
        }
        let _ = write!(
            s,
            "    ], \"note\": {}}}",
            t.note.as_deref().map(jstr).unwrap_or_else(|| "null".into())
        );
        s.push_str(if ti + 1 < r.tables.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"verdicts\": [\n");
    for (i, v) in r.verdicts.iter().enumerate() {
        let pass = match v.pass {
            Some(p) => p.to_string(),
            None => "null".into(),
        };
        let _ = write!(
            s,
            "    {{\"target\": {}, \"measured\": {}, \"pass\": {}}}",
            jstr(&v.target),
            jstr(&v.measured),
            pass
        );
        s.push_str(if i + 1 < r.verdicts.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    let notes: Vec<String> = r.notes.iter().map(|n| jstr(n)).collect();
    let _ = writeln!(s, "  ],\n  \"notes\": [{}]\n}}", notes.join(", "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn json_escapes() {
        assert_eq!(jstr("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
