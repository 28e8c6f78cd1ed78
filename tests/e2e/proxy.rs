//! The transparent proxy with real clients: HTTP by Host, HTTPS by SNI, TCP by port, SSH and
//! git through the proxy, passthrough on port 80 and 22, and hostile clients.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::harness::{
    http_server, privileged, privileged_with, ssh_server, temp_dir, tls_server, Agent, TcpServer,
    CLIENT,
};

const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/hostile.py");
const HELLO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/clienthello-curl.bin"
);

/// `curl` inside the workload with `host` resolved to `ip`; returns (exit code, http code, body).
pub fn curl(agent: &Agent, scheme: &str, host: &str, ip: &str, port: u16) -> (i32, String, String) {
    let resolve = format!("{host}:{port}:{ip}");
    let url = format!("{scheme}://{host}:{port}/");
    let out = agent.exec(
        "web",
        &[
            "curl",
            "-sk",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.to_string(),
        body.to_string(),
    )
}

fn hosts_policy(enable: bool) -> String {
    format!(
        r#"
kind: MeshConfig
metadata: {{name: egress}}
spec: {{traffic: {{enableEgress: {enable}}}, proxy: {{port: {{proxy_port}}, sniffTimeout: 1s}}}}
---
kind: Workload
metadata: {{name: web}}
---
kind: Egress
metadata: {{name: allow-hosts}}
spec:
  sources: [{{name: web}}]
  hosts: [allowed.example, "*.wild.example", "**.deep.example"]
  # The test's stand-in for an external address is on loopback, which the proxy dials only
  # when a rule names it.
  ipAddresses: [127.31.0.0/24]
  ports: [{{number: 80, protocol: http}}, {{number: 443, protocol: https}}]
---
kind: Egress
metadata: {{name: deny-internal}}
spec:
  sources: [{{name: web}}]
  hosts: ["**.internal.deep.example"]
  ports: [{{number: 80, protocol: http}}]
  action: deny
"#
    )
}

#[test]
fn http_by_host_and_https_by_sni() {
    if !privileged_with(&["curl", "openssl"]) {
        return;
    }
    let ip = "127.31.0.1";
    let www = temp_dir("www");
    std::fs::write(www.join("index.html"), "hello from the destination\n").unwrap();
    let _http = http_server(ip, 80, www);
    let _tls = tls_server(ip, 443);
    let agent = Agent::start(&hosts_policy(false));

    let (code, status, body) = curl(&agent, "http", "allowed.example", ip, 80);
    assert_eq!(
        (code, status.as_str(), body.as_str()),
        (0, "200", "hello from the destination\n")
    );
    // A wrong Host to the same IP and port: 403 naming the policy.
    let (code, status, body) = curl(&agent, "http", "other.example", ip, 80);
    assert_eq!((code, status.as_str()), (0, "403"), "{body}");
    assert!(
        body.contains(
            "host other.example is refused for workload default/web: no Egress policy allows it"
        ),
        "{body}"
    );
    // Wildcards: `*.` is exactly one label, `**.` any depth; a host deny beats a host allow.
    for (host, want) in [
        ("a.wild.example", "200"),
        ("a.b.wild.example", "403"),
        ("wild.example", "403"),
        ("x.y.deep.example", "200"),
        ("db.internal.deep.example", "403"),
    ] {
        assert_eq!(curl(&agent, "http", host, ip, 80).1, want, "{host}");
    }
    let (_, _, body) = curl(&agent, "http", "db.internal.deep.example", ip, 80);
    assert!(
        body.contains("Egress policy default/deny-internal denies it"),
        "{body}"
    );

    // HTTPS by SNI, through the proxy to a TLS server with a self-signed certificate.
    let (code, status, body) = curl(&agent, "https", "allowed.example", ip, 443);
    assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    // A wrong SNI to the allowed IP is refused with a TLS alert (curl: SSL connect error).
    let (code, _, _) = curl(&agent, "https", "evil.example", ip, 443);
    assert_eq!(code, 35, "curl exit for a refused TLS handshake");
    let log = agent.wait_log("host=\"evil.example\" verdict=\"deny\"");
    assert!(
        log.contains("host=\"other.example\" verdict=\"deny\""),
        "{log}"
    );
}

#[test]
fn tcp_by_port_only_and_another_ip_on_the_same_port() {
    if !privileged() {
        return;
    }
    let db = TcpServer::start("127.31.1.1");
    let agent = Agent::start(&format!(
        "kind: MeshConfig\nmetadata: {{name: e}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\nkind: Egress\nmetadata: {{name: db}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.31.1.1/32], ports: [{{number: {}, protocol: tcp}}], via: proxy}}\n",
        db.port()
    ));
    for _ in 0..3 {
        let out = agent.client("web", &["tcp", &db.ip(), &db.port(), "q"]);
        assert_eq!(out, format!("ok peer={0} reply={0}|q", db.addr));
    }
    // The proxy takes each connection's entry at accept: none stays behind.
    let keyed = crate::dns::metric(&agent, "egress_map_entries{map=\"EGRESS_ORIG_TUPLE\"}");
    assert_eq!(keyed, 0.0, "entries left in EGRESS_ORIG_TUPLE");
    let cap = crate::dns::metric(&agent, "egress_map_capacity{map=\"EGRESS_ORIG_TUPLE\"}");
    assert_eq!(
        cap,
        egress_common::capacity::ORIG_DST as f64,
        "the map is reported"
    );
    let out = agent.client("web", &["tcp", "127.31.1.2", &db.port()]);
    assert!(
        out.starts_with("err EPERM"),
        "another IP on the same port: {out}"
    );
}

#[test]
fn ssh_and_git_through_the_proxy_with_passthrough_on_80_and_22() {
    if !privileged_with(&["/usr/sbin/sshd", "ssh", "ssh-keygen", "git"]) {
        return;
    }
    let (_sshd, key) = ssh_server("127.32.0.1");
    // A bare repository served over dumb HTTP.
    let www = temp_dir("git");
    let repo = www.join("repo.git");
    let git = |args: &[&str], dir: &std::path::Path| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let work = temp_dir("gitwork");
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "through the egress proxy\n").unwrap();
    git(&["add", "README"], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ],
        &work,
    );
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            repo.to_str().unwrap(),
        ],
        &work,
    );
    git(&["update-server-info"], &repo);
    let _http = http_server("127.33.0.1", 80, www);

    // enableEgress true: every port-80 connection goes through the proxy (a host rule names
    // port 80), SSH to 127.32.0.1 goes through it too (via: proxy), and nothing collides.
    let agent = Agent::start(
        "kind: MeshConfig\nmetadata: {name: e}\nspec: {traffic: {enableEgress: true}, proxy: {port: {proxy_port}}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: web-hosts}\nspec: {sources: [{name: web}], hosts: [only.example], ports: [{number: 80, protocol: http}]}\n---\nkind: Egress\nmetadata: {name: ssh}\nspec: {sources: [{name: web}], ipAddresses: [127.32.0.1/32], ports: [{number: 22}], via: proxy}\n---\nkind: Egress\nmetadata: {name: git}\nspec: {sources: [{name: web}], ipAddresses: [127.33.0.1/32], ports: [{number: 80}], via: proxy}\n",
    );
    let key = key.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = agent.exec(
        "web",
        &[
            "ssh",
            "-i",
            &key,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "root@127.32.0.1",
            "echo",
            "ssh-through-the-proxy",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ssh-through-the-proxy",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "server-first SSH was delayed by sniffing"
    );
    agent.wait_log("dst=127.32.0.1:22 protocol=\"tcp\" verdict=\"proxy\" rule=\"default/ssh\"");

    let dest = temp_dir("clone").join("repo");
    let out = agent.exec(
        "web",
        &[
            "git",
            "clone",
            "-q",
            "http://127.33.0.1/repo.git",
            dest.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("README")).unwrap(),
        "through the egress proxy\n"
    );
    agent.wait_log("dst=127.33.0.1:80 protocol=\"tcp\" verdict=\"proxy\" rule=\"default/git\"");
    let _ = std::fs::remove_dir_all(dest.parent().unwrap());
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn hostile_clients_are_bounded_and_others_still_served() {
    if !privileged() {
        return;
    }
    let srv = TcpServer::start("127.34.0.1");
    let agent = Agent::start(&format!(
        "kind: MeshConfig\nmetadata: {{name: e}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}, sniffTimeout: 1s}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\nkind: Egress\nmetadata: {{name: hosts}}\nspec: {{sources: [{{name: web}}], hosts: [allowed.example], ipAddresses: [127.34.0.0/24], ports: [{{number: {}}}]}}\n",
        srv.port()
    ));
    let port = srv.port();
    // Many silent clients hold connections open while the others misbehave.
    let silent: Vec<_> = (0..50)
        .map(|_| {
            let mut c = Command::new(crate::harness::AGENT);
            c.args(["exec", "--workload", "web", "--cgroup-root"])
                .arg(&agent.root)
                .args(["--", "python3", HOSTILE, "silent", "127.34.0.1", &port])
                .stdout(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (mode, max_s) in [
        ("garbage", 0.9),
        ("truncated-hello", 3.0),
        ("huge-header", 3.0),
    ] {
        let out = agent.exec(
            "web",
            &["python3", HOSTILE, mode, "127.34.0.1", &port, HELLO],
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let secs: f64 = text
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(99.0);
        assert!(
            text.starts_with("closed") && !text.contains("still-open") && secs < max_s,
            "{mode}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A well-behaved client is served meanwhile, and an HTTP request for the allowed host
    // passes (the TcpServer answers the first line).
    let out = agent.exec(
        "web",
        &[
            "python3",
            CLIENT,
            "tcp",
            "127.34.0.1",
            &port,
            "GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "ok peer=127.34.0.1:{port} reply=127.34.0.1:{port}|GET / HTTP/1.1"
        )),
        "{text}"
    );
    // The silent ones are closed after the sniff timeout (1 s).
    for c in silent {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let secs: f64 = text
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(99.0);
        // The client starts its clock after connect() returns, under the load of 50 processes.
        assert!(
            text.starts_with("closed") && (0.3..5.0).contains(&secs),
            "silent: {text}"
        );
    }
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent_pid(&agent)))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 64 * 1024, "agent RSS {rss_kib} KiB");
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        srv.accepted(),
        1,
        "only the well-behaved client reached the destination"
    );
}

fn agent_pid(agent: &Agent) -> u32 {
    // The agent moved itself into <root>/_agent: the only process there.
    std::fs::read_to_string(agent.root.join("_agent/cgroup.procs"))
        .unwrap()
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("agent pid")
}

/// scripts/bench/burst.py: a banner-first server and a burst client.
const BURST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench/burst.py");

/// A child process killed (by its PID) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// burst.py's banner server on `ip`:2222, listening.
fn banner_server(ip: &str) -> Child {
    let mut server = Child(
        Command::new("python3")
            .args([BURST, "server", ip, "2222"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "listening");
    server
}

#[test]
fn a_burst_of_server_first_connections_loses_none() {
    if !privileged_with(&["python3"]) {
        return;
    }
    // A server that speaks first (like SSH or SMTP): a client that is never accepted by the
    // proxy would wait for its banner forever.
    let _server = banner_server("127.31.2.1");
    let agent = Agent::start(
        "kind: MeshConfig\nmetadata: {name: e}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}, maxConnections: 8192}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: banner}\nspec: {sources: [{name: web}], ipAddresses: [127.31.2.1/32], ports: [{number: 2222}], via: proxy}\n",
    );
    let out = agent.exec_line(
        "web",
        &[
            "python3",
            BURST,
            "client",
            "127.31.2.1",
            "2222",
            "2000",
            "20",
        ],
        "burst client",
    );
    println!("burst of 2000 through the proxy: {out}");
    assert!(out.starts_with("served=2000 lost=0 "), "{out}");
}

/// The fd limit bounds each table, and each proxy thread has one of its own: an agent whose
/// limit is below two sockets per connection still serves every connection of a burst held
/// open at once. The agent runs without CAP_SYS_RESOURCE (bounding set), so it cannot raise
/// the limit the test gives it.
#[test]
fn a_burst_needing_more_fds_than_the_limit_loses_none() {
    if !privileged_with(&["python3", "setpriv", "prlimit"]) {
        return;
    }
    const LIMIT: usize = 700;
    const N: usize = 400;
    let _server = banner_server("127.31.2.2");
    let agent = fd_limited_agent("127.31.2.2", LIMIT);
    let pid = agent_pid(&agent);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: usize = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(soft, LIMIT, "{line}");
    let base = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // One table could not hold them: two sockets per connection, and what the agent opened.
    assert!(2 * N + base > LIMIT, "base {base}");
    let out = agent.exec_line(
        "web",
        &[
            "python3",
            BURST,
            "client",
            "127.31.2.2",
            "2222",
            &N.to_string(),
            "20",
        ],
        "burst client",
    );
    println!("burst of {N} through the proxy, fd limit {LIMIT}, {base} fds at start: {out}");
    assert!(
        out.starts_with(&format!("served={N} lost=0 ")),
        "{out}\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("proxy accept failed"),
        "{}",
        agent.log()
    );
    assert_own_fd_tables(&agent);
    // The first thread took connections until it was full, the second the rest.
    let by = accepted_by_thread(&agent);
    assert_eq!(by.iter().sum::<u64>(), N as u64, "{by:?}");
    assert!(by[0] > 0 && by[1] > 0, "accepted by thread: {by:?}");
}

/// Past what every thread's table holds, a connection is refused at once (reset), never left
/// waiting in the accept queue for a descriptor that may never come: 300 connections held
/// open against an agent whose limit holds about a third of them.
#[test]
fn a_burst_past_every_fd_table_is_refused_at_once_not_left_hanging() {
    if !privileged_with(&["python3", "setpriv", "prlimit"]) {
        return;
    }
    const LIMIT: usize = 200;
    const N: usize = 300;
    let _server = banner_server("127.31.2.4");
    let agent = fd_limited_agent("127.31.2.4", LIMIT);
    // Every connection made at once and held; each ends up served (the banner), refused
    // (reset or closed), or hanging (nothing within 15 s).
    let client = format!(
        "import socket, select, time\nsocks = []\nfor i in range({N}):\n    s = socket.socket()\n    s.setblocking(False)\n    try:\n        s.connect(('127.31.2.4', 2222))\n    except BlockingIOError:\n        pass\n    socks.append(s)\nserved = refused = 0\npending = set(socks)\nend = time.time() + 15\nwhile pending and time.time() < end:\n    ready, _, _ = select.select(list(pending), [], [], 0.5)\n    for s in ready:\n        pending.discard(s)\n        try:\n            got = s.recv(64)\n        except OSError:\n            got = b''\n        if got:\n            served += 1\n        else:\n            refused += 1\nprint(f'served={{served}} refused={{refused}} hanging={{len(pending)}}')\n"
    );
    let out = agent.exec_line("web", &["python3", "-c", &client], "client");
    println!("{N} held connections, fd limit {LIMIT}: {out}");
    let count = |k: &str| -> usize {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    assert_eq!(count("hanging"), 0, "{out}\n{}", agent.log());
    assert!(count("served") > 0 && count("refused") > 0, "{out}");
    assert!(
        agent.log().contains("proxy out of file descriptors"),
        "{}",
        agent.log()
    );
    assert_own_fd_tables(&agent);
}

/// Every proxy thread left the process's fd table (the inherited descriptor above the limit
/// included).
fn assert_own_fd_tables(agent: &Agent) {
    let log = agent.log();
    assert!(!log.contains("could not set up a file table"), "{log}");
}

/// An agent whose web workload reaches the banner server at `ip` through the proxy, started
/// with an fd limit of `limit` and without CAP_SYS_RESOURCE (so it cannot raise it).
fn fd_limited_agent(ip: &str, limit: usize) -> Agent {
    let mut agent = Agent::new(&format!(
        "kind: MeshConfig\nmetadata: {{name: e}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}, maxConnections: 8192}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\nkind: Egress\nmetadata: {{name: banner}}\nspec: {{sources: [{{name: web}}], ipAddresses: [{ip}/32], ports: [{{number: 2222}}], via: proxy}}\n",
    ));
    // It also inherits a descriptor numbered above its limit, as an agent started by a
    // supervisor that leaks one may (the e2e suite's parallel tests did).
    agent.wrapper = [
        "bash",
        "-c",
        "exec 1000</dev/null; exec \"$@\"",
        "bash",
        "setpriv",
        "--bounding-set",
        "-sys_resource",
        "prlimit",
        &format!("--nofile={limit}:{limit}"),
    ]
    .map(String::from)
    .to_vec();
    agent.spawn();
    agent
}

/// Connections each proxy thread accepted (`egress_proxy_thread_accepted_total`).
fn accepted_by_thread(agent: &Agent) -> [u64; 2] {
    [0, 1].map(|t| {
        crate::pods::metric(
            agent,
            "egress_proxy_thread_accepted_total",
            &[&format!("thread=\"{t}\"")],
        )
    })
}

/// A light load is one proxy thread's work: the other sleeps, its copies of the listeners out
/// of its epoll set, instead of being woken for the share of connections the kernel would
/// spread to it.
#[test]
fn a_light_load_is_served_by_one_proxy_thread() {
    if !privileged_with(&["python3"]) {
        return;
    }
    let _server = banner_server("127.31.2.3");
    let agent = Agent::start(
        "kind: MeshConfig\nmetadata: {name: e}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: banner}\nspec: {sources: [{name: web}], ipAddresses: [127.31.2.3/32], ports: [{number: 2222}], via: proxy}\n",
    );
    const N: u64 = 40;
    // IPv4 and IPv4-mapped clients, one after another.
    let client = format!(
        "import socket, time\nfor i in range({N}):\n    fam = socket.AF_INET if i % 2 else socket.AF_INET6\n    host = '127.31.2.3' if i % 2 else '::ffff:127.31.2.3'\n    s = socket.socket(fam)\n    s.connect((host, 2222))\n    assert s.recv(64), i\n    s.close()\n    time.sleep(0.01)\nprint('served', {N})\n"
    );
    let out = agent.exec_line("web", &["python3", "-c", &client], "client");
    assert_eq!(out, format!("served {N}"));
    let by = accepted_by_thread(&agent);
    assert_eq!(by, [N, 0], "accepted by thread\n{}", agent.log());
    let accepting = [0, 1].map(|t| {
        crate::pods::metric(
            &agent,
            "egress_proxy_thread_accepting",
            &[&format!("thread=\"{t}\"")],
        )
    });
    assert_eq!(accepting, [1, 0]);
}
