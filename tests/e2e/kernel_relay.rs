//! The proxy's in-kernel relay (`run --relay kernel`) with real clients through the real
//! proxy: many HTTP requests on one connection (python, curl), 50 MB each way with checksums,
//! a client that shuts down writing first and still reads the whole answer, a server that
//! speaks first, a server that answers and closes at once, the idle timeout, closing on a
//! policy change, the byte metrics; and the same traffic with the default relay (splice).

use std::time::{Duration, Instant};

use crate::harness::{free_port, privileged_with, temp_dir, wait_until, Agent, Daemon};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/relay_peer.py");
const IP: &str = "127.31.7.1";
const MB50: usize = 50 * 1024 * 1024;

/// The four servers of relay_peer.py on IP:base..base+3.
fn peer_servers() -> (Daemon, u16) {
    let base = loop {
        let p = free_port();
        if p < 65_000 {
            break p;
        }
    };
    let addr = format!("{IP}:{}", base + 3);
    let ports = base.to_string();
    let d = Daemon::start(
        "relay peer",
        &["python3", PEER, "serve", IP, &ports],
        &addr,
        temp_dir("relay-peer"),
    );
    (d, base)
}

fn policy(base: u16, extra: &str) -> String {
    format!(
        "kind: MeshConfig\nmetadata: {{name: e}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}{extra}}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\nkind: Egress\nmetadata: {{name: peer}}\nspec: {{sources: [{{name: web}}], ipAddresses: [{IP}/32], ports: [{{number: {base}, endPort: {}}}], via: proxy}}\n",
        base + 3
    )
}

/// An agent with the kernel relay on.
fn kernel_agent(policy: &str) -> Agent {
    let mut agent = Agent::new(policy);
    agent.run_args = vec!["--relay".into(), "kernel".into()];
    agent.spawn();
    agent.wait_log("proxy relay: in the kernel");
    agent
}

fn run(agent: &Agent, args: &[&str]) -> String {
    let mut cmd = vec!["python3", PEER];
    cmd.extend_from_slice(args);
    agent.exec_line("web", &cmd, &format!("relay_peer {args:?}"))
}

/// `egress_proxy_bytes_total` (upstream, downstream).
fn bytes_metric(agent: &Agent) -> (u64, u64) {
    let (_, body) = agent.http_get("/metrics");
    let get = |dir: &str| {
        let want = format!("egress_proxy_bytes_total{{direction=\"{dir}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    (get("upstream"), get("downstream"))
}

/// Runs `f` and returns the byte metrics' growth once the connection it made was counted.
fn counted(agent: &Agent, f: impl FnOnce() -> String) -> (String, (u64, u64)) {
    // Earlier connections are counted when they end: wait until the metrics are still.
    let mut before = bytes_metric(agent);
    wait_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = bytes_metric(agent);
        std::mem::replace(&mut before, now) == now
    });
    let out = f();
    let mut after = before;
    wait_until(Duration::from_secs(10), || {
        after = bytes_metric(agent);
        after != before
    });
    (out, (after.0 - before.0, after.1 - before.1))
}

/// Everything a relay must carry, with its byte counts.
fn traffic(agent: &Agent, base: u16, bulk: usize) {
    let ports: Vec<String> = (0..4).map(|i| (base + i).to_string()).collect();
    // Keep-alive: many requests on one connection, python and curl.
    let started = Instant::now();
    let out = run(agent, &["http", IP, &ports[0], "300"]);
    assert!(out.starts_with("ok 300 "), "{out}");
    println!("300 requests on one connection: {:?}", started.elapsed());
    let urls: Vec<String> = (0..20)
        .map(|i| format!("http://{IP}:{}/c{i}", ports[0]))
        .collect();
    let mut curl = vec!["curl", "-s", "--max-time", "20", "-w", "%{num_connects} "];
    curl.extend(urls.iter().map(String::as_str));
    let out = agent.exec_line("web", &curl, "curl keep-alive");
    for i in 0..20 {
        assert!(out.contains(&format!("pong /c{i}\n")), "{out}");
    }
    // One connection for all 20 (the counts: 1 then 0s).
    assert_eq!(out.matches("1 ").count(), 1, "{out}");
    // A new connection per request: the server answers and closes at once, often before
    // the proxy has handed the connection to the kernel.
    let out = run(agent, &["close", IP, &ports[0], "200"]);
    assert_eq!(out, "ok 200 of 200");

    // Bulk up, then half-close: the client shuts down writing and still gets the answer.
    let (out, bytes) = counted(agent, || {
        run(agent, &["sink", IP, &ports[1], &bulk.to_string()])
    });
    let (sent, got) = out
        .split_once(" got ")
        .unwrap_or_else(|| panic!("{out}\n{}", agent.log()));
    let sent = sent.strip_prefix("sent ").unwrap();
    assert_eq!(sent, got, "the server received every byte in order");
    let answer_len = got.len() as u64 + 1;
    assert_eq!(bytes, (bulk as u64, answer_len), "metrics: {out}");

    // Bulk down.
    let (out, bytes) = counted(agent, || {
        run(agent, &["source", IP, &ports[2], &bulk.to_string()])
    });
    let want = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap();
    assert_eq!(want, bulk, "{out}");
    let (sink_out, _) = counted(agent, || {
        run(agent, &["sink", IP, &ports[1], &bulk.to_string()])
    });
    let same_sha = sink_out.split_whitespace().nth(2).unwrap();
    assert!(
        out.ends_with(same_sha),
        "downloaded {out}, uploaded {sink_out}"
    );
    let request_len = bulk.to_string().len() as u64 + 1;
    assert_eq!(bytes, (request_len, bulk as u64));

    // The server speaks first; the client half-closes and reads to EOF.
    let (out, bytes) = counted(agent, || run(agent, &["banner", IP, &ports[3]]));
    assert_eq!(out, "banner banner from the server echo ping eof");
    assert_eq!(bytes, (5, 23 + 5));
}

#[test]
fn kernel_relay_carries_keep_alive_bulk_half_close_and_server_first() {
    if !privileged_with(&["python3", "curl"]) {
        return;
    }
    let (_peer, base) = peer_servers();
    let agent = kernel_agent(&policy(base, ""));
    traffic(&agent, base, MB50);
    let log = agent.log();
    assert!(!log.contains("did not take the connection"), "{log}");
}

#[test]
fn splice_relay_by_default() {
    if !privileged_with(&["python3", "curl"]) {
        return;
    }
    let (_peer, base) = peer_servers();
    let agent = Agent::start(&policy(base, ""));
    agent.wait_log("proxy relay: splice");
    traffic(&agent, base, 8 * 1024 * 1024);
    assert!(!agent.log().contains("in the kernel"));
}

#[test]
fn kernel_relay_idle_timeout_and_close_on_tighten() {
    if !privileged_with(&["python3"]) {
        return;
    }
    let (_peer, base) = peer_servers();
    let banner = (base + 3).to_string();
    let agent = kernel_agent(&policy(base, ", idleTimeout: 2s"));
    // No byte either way for 2 s: closed (the supervisor ticks every 0.5 s).
    let out = run(&agent, &["wait", IP, &banner, "10"]);
    let secs: f64 = out
        .strip_prefix("connected\nclosed after ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!((1.5..4.0).contains(&secs), "{out}");

    // A policy change that refuses the destination closes the relayed connection.
    let reloaded = std::thread::scope(|s| {
        let waiter = s.spawn(|| run(&agent, &["wait", IP, &banner, "20"]));
        std::thread::sleep(Duration::from_millis(800));
        let started = Instant::now();
        agent.reload(&policy(base, ", idleTimeout: 2s").replace("via: proxy", "action: deny"));
        (waiter.join().unwrap(), started.elapsed())
    });
    let (out, took) = reloaded;
    assert!(out.starts_with("connected\nclosed after "), "{out}");
    assert!(took < Duration::from_secs(5), "{out}");
    agent.wait_log("closed: the policy now refuses it");
}
