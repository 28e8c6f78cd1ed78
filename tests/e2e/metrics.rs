//! Metrics with a real Prometheus server (Debian's `prometheus`) scraping the agent, checked
//! through Prometheus' own HTTP API; `promtool check metrics` on the agent's output; exact
//! counts under concurrency; health endpoints.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{
    free_port, http_server, privileged, privileged_with, run_ok, temp_dir, wait_until, Agent,
    Daemon,
};

const POLICY: &str = "kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}\n---\nkind: Workload\nmetadata: {name: web, namespace: shop}\n---\nkind: Egress\nmetadata: {name: api, namespace: shop}\nspec: {sources: [{name: web}], ipAddresses: [127.51.0.1/32], ports: [{number: 8080}]}\n";

/// One instant-query value from Prometheus (None: no series yet).
fn prom_query(port: u16, query: &str) -> Option<String> {
    let out = Command::new("curl")
        .args([
            "-sG",
            &format!("http://127.0.0.1:{port}/api/v1/query"),
            "--data-urlencode",
        ])
        .arg(format!("query={query}"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["data"]["result"].get(0)?["value"][1]
            .as_str()?
            .to_string(),
    )
}

fn metric(agent: &Agent, series: &str) -> u64 {
    let (_, body) = agent.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

#[test]
fn prometheus_scrapes_exact_counts() {
    if !privileged_with(&["curl", "prometheus", "promtool"]) {
        return;
    }
    let www = temp_dir("www51");
    std::fs::write(www.join("index.html"), "api\n").unwrap();
    let _api = http_server("127.51.0.1", 8080, www);
    let agent = Agent::start(POLICY);

    let (status, body) = agent.http_get("/readyz");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert_eq!(agent.http_get("/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(agent.http_get("/nope").0, "HTTP/1.1 404 Not Found");

    // One denied and one allowed curl in the workload.
    let denied = agent.exec(
        "shop/web",
        &["curl", "-s", "--max-time", "5", "http://127.52.0.1:8080/"],
    );
    assert_eq!(denied.status.code(), Some(7));
    let allowed = agent.exec(
        "shop/web",
        &["curl", "-s", "--max-time", "5", "http://127.51.0.1:8080/"],
    );
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "api\n");

    // The agent's output passes promtool.
    let (_, text) = agent.http_get("/metrics");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the agent every second.
    let dir = temp_dir("prometheus");
    let web = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: egress-agent\n    static_configs: [{{targets: ['127.0.0.1:{}']}}]\n", agent.metrics_port),
    )
    .unwrap();
    run_ok(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    );
    let listen = format!("127.0.0.1:{web}");
    let _prom = Daemon::start(
        "prometheus",
        &[
            "prometheus",
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            &format!("--web.listen-address={listen}"),
        ],
        &listen,
        dir,
    );
    let want = [
        ("egress_connections_total{workload=\"web\",namespace=\"shop\",verdict=\"deny-default\",protocol=\"tcp\"}", "1"),
        ("egress_connections_total{workload=\"web\",namespace=\"shop\",verdict=\"allow\",protocol=\"tcp\"}", "1"),
        ("egress_denied_total{workload=\"web\",reason=\"default\",protocol=\"tcp\"}", "1"),
        ("egress_policy_rules", "1"),
        ("egress_ready", "1"),
        ("up{job=\"egress-agent\"}", "1"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (q, v) in want {
        let mut got = None;
        let seen = wait_until(deadline.saturating_duration_since(Instant::now()), || {
            got = prom_query(web, q);
            got.as_deref() == Some(v)
        });
        assert!(seen, "Prometheus says {q} = {got:?}, want {v}");
    }
}

#[test]
fn counters_stay_exact_under_concurrency() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(POLICY);
    let series = "egress_connections_total{workload=\"web\",namespace=\"shop\",verdict=\"deny-default\",protocol=\"tcp\"}";
    let before = metric(&agent, series);
    // 8 processes x 25 threads x 10 connects = 2000 denied connects at once, on both cores.
    let script = "import socket,threading\ndef f():\n    for _ in range(10):\n        s=socket.socket()\n        try: s.connect(('127.53.0.1',9))\n        except OSError: pass\n        s.close()\nts=[threading.Thread(target=f) for _ in range(25)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n";
    let kids: Vec<_> = (0..8)
        .map(|_| {
            Command::new(crate::harness::AGENT)
                .args(["exec", "--workload", "shop/web", "--cgroup-root"])
                .arg(&agent.root)
                .args(["--", "python3", "-c", script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(metric(&agent, series) - before, 2000);
    let denied = "egress_denied_total{workload=\"web\",namespace=\"shop\",reason=\"default\",protocol=\"tcp\"}";
    assert_eq!(metric(&agent, denied), 2000 + before);
}
