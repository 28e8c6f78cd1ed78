//! Names you can trust: workloads' DNS through the agent's DNS proxy, name rules for any
//! protocol enforced by the kernel on the addresses the names resolved to, and the proxy's
//! host binding (anti domain fronting). Real resolver (dnsmasq on a loopback address), real
//! clients (dig, curl, python sockets).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{
    free_port, privileged_with, temp_dir, wait_until, Agent, Daemon, TcpServer, UdpServer,
    PACKETS_PY,
};

/// dnsmasq answering on `ip`:53 (UDP and TCP) from `records` (dnsmasq options such as
/// `--host-record=NAME,ADDR`), with TTL `ttl` seconds and no upstream.
pub(crate) fn resolver(ip: &str, ttl: u32, records: &[String]) -> Daemon {
    resolver_in(None, ip, ttl, records)
}

/// [`resolver`] in network namespace `netns` (None: this one).
pub(crate) fn resolver_in(netns: Option<&Path>, ip: &str, ttl: u32, records: &[String]) -> Daemon {
    let mut args: Vec<String> = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--group=root",
        "--pid-file=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--listen-address={ip}"));
    args.push(format!("--local-ttl={ttl}"));
    args.extend(records.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (addr, dir) = (format!("{ip}:53"), temp_dir("dnsmasq"));
    match netns {
        Some(ns) => Daemon::start_in(ns, "dnsmasq", &refs, &addr, dir),
        None => Daemon::start("dnsmasq", &refs, &addr, dir),
    }
}

pub(crate) fn host_record(name: &str, ip: &str) -> String {
    format!("--host-record={name},{ip}")
}

pub(crate) fn mesh(resolver: &str, extra: &str) -> String {
    format!(
        r#"
kind: MeshConfig
metadata: {{name: egress}}
spec:
  traffic: {{enableEgress: false}}
  proxy: {{port: {{proxy_port}}, sniffTimeout: 1s}}
  dns: {{enabled: true, port: {{dns_port}}, minTtl: 1s, grace: 1s, upstreamTimeout: 500ms}}
{extra}
---
kind: Workload
metadata: {{name: web}}
---
kind: Egress
metadata: {{name: resolver}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{resolver}/32]
  ports: [{{number: 53, protocol: udp}}, {{number: 53}}]
"#
    )
}

/// [`mesh`], and an allow Egress `name` for `hosts` on `ports` (YAML flow list items).
pub(crate) fn by_name(ns: &str, name: &str, hosts: &str, ports: &str) -> String {
    format!(
        "{}---\nkind: Egress\nmetadata: {{name: {name}}}\nspec:\n  sources: [{{name: web}}]\n  hosts: [{hosts}]\n  ports: [{ports}]\n",
        mesh(ns, "")
    )
}

/// Starts the agent on `policy` with a free DNS proxy port for `{dns_port}`.
pub(crate) fn agent(policy: &str) -> Agent {
    Agent::start(&policy.replace("{dns_port}", &free_port().to_string()))
}

/// [`agent`] logging flows as in production (`--flows denied`): the socket hooks then pass a
/// destination on its cached verdict (with every verdict logged they judge in full), which a
/// name's expiry must undo.
pub(crate) fn agent_with_cached_passes(policy: &str) -> Agent {
    let mut a = Agent::new(&policy.replace("{dns_port}", &free_port().to_string()));
    a.run_args = vec!["--flows".into(), "denied".into()];
    a.spawn();
    a
}

/// `dig` inside the workload: the answer's addresses (`+short`), one per line.
pub(crate) fn dig(agent: &Agent, resolver: &str, name: &str, extra: &[&str]) -> (i32, String) {
    let at = format!("@{resolver}");
    let mut cmd = vec!["dig", &at, name, "+short", "+time=2", "+tries=1"];
    cmd.extend_from_slice(extra);
    let out = agent.exec("web", &cmd);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn tcp(agent: &Agent, ip: &str, port: &str) -> String {
    agent.client("web", &["tcp", ip, port, "x"])
}

fn here() -> &'static Path {
    Path::new("/proc/self/ns/net")
}

pub(crate) fn metric(agent: &Agent, name: &str) -> f64 {
    let (_, body) = agent.http_get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn dns_name_rule_tcp_udp_cname_and_expiry() {
    if !privileged_with(&["dnsmasq", "dig"]) {
        return;
    }
    let ns = "127.53.1.1";
    let db = TcpServer::start("127.60.1.1");
    let port = db.port();
    let p: u16 = port.parse().unwrap();
    let other = TcpServer::start_in(here(), "127.60.1.2", p);
    let via_cname = TcpServer::start_in(here(), "127.60.1.5", p);
    let via_tcp_dns = TcpServer::start_in(here(), "127.60.1.6", p);
    let udp = UdpServer::start("127.60.1.3");
    let _dns = resolver(
        ns,
        3,
        &[
            host_record("db.test.example", "127.60.1.1"),
            host_record("udp.test.example", "127.60.1.3"),
            host_record("real.test.example", "127.60.1.5"),
            "--cname=alias.test.example,real.test.example".into(),
            host_record("tcp.test.example", "127.60.1.6"),
        ],
    );
    let ports = format!(
        "{{number: {port}}}, {{number: {}, protocol: udp}}",
        udp.port()
    );
    let policy = by_name(
        ns,
        "db-by-name",
        "db.test.example, udp.test.example, alias.test.example, tcp.test.example",
        &ports,
    );
    let a = agent_with_cached_passes(&policy);

    // Before any answer, the name's address is refused like any other.
    assert!(tcp(&a, "127.60.1.1", &port).starts_with("err EPERM"));

    let t = Instant::now();
    assert_eq!(
        dig(&a, ns, "db.test.example", &[]),
        (0, "127.60.1.1".into())
    );
    let dig_ms = t.elapsed().as_millis();
    // Straight to the answered address: the server sees the client itself (no proxy).
    let (out, local) = a.client_from("web", &["tcp", "127.60.1.1", &port, "x"]);
    assert!(out.starts_with("ok peer=127.60.1.1:"), "{out}");
    assert_eq!(Some(db.peer(0)), local, "no proxy on the path");
    // Another address on the same port: refused.
    assert!(tcp(&a, "127.60.1.2", &port).starts_with("err EPERM"));
    assert_eq!(other.accepted(), 0);

    // UDP the same way.
    assert_eq!(dig(&a, ns, "udp.test.example", &[]).1, "127.60.1.3");
    assert_eq!(
        a.client("web", &["udp", "127.60.1.3", &udp.port(), "by-name"]),
        "ok sent"
    );
    assert!(udp.got("by-name"));
    assert!(a
        .client("web", &["udp", "127.60.1.4", &udp.port(), "x"])
        .starts_with("err EPERM"));

    // A CNAME chain in one answer: the rule names the alias, the address is the target's.
    let (_, short) = dig(&a, ns, "alias.test.example", &[]);
    assert!(short.ends_with("127.60.1.5"), "{short}");
    assert!(tcp(&a, "127.60.1.5", &port).starts_with("ok "));
    assert_eq!(via_cname.accepted(), 1);

    // DNS over TCP is seen too.
    assert_eq!(dig(&a, ns, "tcp.test.example", &["+tcp"]).1, "127.60.1.6");
    assert!(tcp(&a, "127.60.1.6", &port).starts_with("ok "));
    assert_eq!(via_tcp_dns.accepted(), 1);

    // After TTL (3 s) plus grace (1 s): an open connection lives on, a new one is refused.
    let t0 = Instant::now();
    dig(&a, ns, "db.test.example", &[]);
    let mut open = Command::new(crate::harness::AGENT)
        .args(["exec", "--workload", "web", "--cgroup-root"])
        .arg(&a.root)
        .args([
            "--",
            "python3",
            "-c",
            &format!(
                "import socket,sys\ns=socket.create_connection(('127.60.1.1',{port}))\nprint('connected',flush=True)\nsys.stdin.readline()\ns.sendall(b'late\\n')\nprint(s.makefile().readline().strip())"
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("long-lived client");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(open.stdout.take().unwrap()));
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(
        first, "connected",
        "the long-lived client could not connect in time"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the machine is too slow for this TTL"
    );
    std::thread::sleep(Duration::from_millis(4600).saturating_sub(t0.elapsed()));
    assert!(tcp(&a, "127.60.1.1", &port).starts_with("err EPERM"));
    std::io::Write::write_all(&mut open.stdin.take().unwrap(), b"go\n").unwrap();
    let reply = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(reply.ends_with("|late"), "the open connection: {reply:?}");
    let _ = open.wait();

    assert!(metric(&a, "egress_dns_requests_total") >= 5.0);
    assert!(metric(&a, "egress_dns_answers_total") >= 5.0);
    eprintln!("dig through the agent: {dig_ms} ms (incl. exec)");
}

#[test]
fn dns_silent_resolver_and_garbage() {
    if !privileged_with(&["dig"]) {
        return;
    }
    let ns = "127.53.3.1";
    // A resolver that never answers.
    let _silent = std::net::UdpSocket::bind((ns, 53)).expect("bind the silent resolver");
    let a = agent(&mesh(ns, ""));
    let (code, out) = dig(&a, ns, "db.test.example", &[]);
    assert_eq!(code, 9, "dig: no servers could be reached: {out}");
    assert!(wait_until(Duration::from_secs(3), || metric(
        &a,
        "egress_dns_dropped_total{reason=\"timeout\"}"
    ) >= 1.0));
    // Garbage to port 53 is steered, dropped and counted; the proxy carries on.
    assert_eq!(a.client("web", &["udp", ns, "53", "not dns"]), "ok sent");
    assert!(wait_until(Duration::from_secs(3), || metric(
        &a,
        "egress_dns_dropped_total{reason=\"malformed\"}"
    ) >= 1.0));
    assert_eq!(metric(&a, "egress_dns_cache_entries"), 0.0);
}

#[test]
fn dns_a_flooding_workload_does_not_starve_another() {
    if !privileged_with(&["dnsmasq", "dig"]) {
        return;
    }
    let (silent_ns, ns) = ("127.53.7.1", "127.53.7.2");
    let _silent = std::net::UdpSocket::bind((silent_ns, 53)).expect("bind the silent resolver");
    let _dns = resolver(ns, 60, &[host_record("db.test.example", "127.65.0.1")]);
    let policy = format!(
        "{}---\nkind: Workload\nmetadata: {{name: other}}\n---\nkind: Egress\nmetadata: {{name: both}}\nspec:\n  sources: [{{name: web}}, {{name: other}}]\n  ipAddresses: [{ns}/32]\n  ports: [{{number: 53, protocol: udp}}]\n",
        mesh(silent_ns, "")
    );
    let a = agent(&policy);
    // `web` floods the resolver that never answers: each query holds its slot for the
    // upstream timeout (500 ms); past 256 in flight they are dropped.
    let flood = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nq=bytes.fromhex('abcd01000001000000000000')+bytes([2])+b'db'+bytes([4])+b'test'+bytes([7])+b'example'+bytes([0,0,1,0,1])\nfor i in range(20000): s.sendto(q,('{silent_ns}',53))\nprint('sent')"
    );
    let out = a.exec("web", &["python3", "-c", &flood]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent");
    // Meanwhile `other` resolves through the same proxy.
    let at = format!("@{ns}");
    let got = a.exec(
        "other",
        &[
            "dig",
            &at,
            "db.test.example",
            "+short",
            "+time=2",
            "+tries=1",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "127.65.0.1");
    assert!(metric(&a, "egress_dns_dropped_total{reason=\"busy\"}") >= 1.0);
}

#[test]
fn dns_names_survive_kill9() {
    if !privileged_with(&["dnsmasq", "dig"]) {
        return;
    }
    let ns = "127.53.4.1";
    let db = TcpServer::start("127.62.0.1");
    let port = db.port();
    let _dns = resolver(ns, 60, &[host_record("db.test.example", "127.62.0.1")]);
    let policy = by_name(
        ns,
        "db-by-name",
        "db.test.example",
        &format!("{{number: {port}}}"),
    );
    let mut a = agent(&policy);
    assert_eq!(dig(&a, ns, "db.test.example", &[]).1, "127.62.0.1");
    let shown = a.cli_ok(&["dns"]);
    assert!(
        shown.contains("db.test.example") && shown.contains("127.62.0.1"),
        "{shown}"
    );
    // Saved within the expiry tick.
    std::thread::sleep(Duration::from_millis(600));
    a.kill();
    // The kernel keeps enforcing on the pinned map while the agent is down.
    assert!(tcp(&a, "127.62.0.1", &port).starts_with("ok "));
    a.spawn();
    assert!(tcp(&a, "127.62.0.1", &port).starts_with("ok "));
    let shown = a.cli_ok(&["dns"]);
    assert!(shown.contains("db.test.example"), "{shown}");
    assert!(a.log().contains("restored the learned DNS names"));
    // A policy change moves the rule's id: the learned entry follows.
    let current = std::fs::read_to_string(&a.config).unwrap();
    let first = "kind: Egress\nmetadata: {name: aaa-first}\nspec:\n  sources: [{name: web}]\n  ipAddresses: [127.99.0.1/32]\n";
    let (mesh_doc, rest) = current.split_once("---").unwrap();
    a.reload(&format!("{mesh_doc}---\n{first}---{rest}"));
    let check = a.cli_ok(&[
        "policy",
        "check",
        "--workload",
        "web",
        &format!("127.62.0.1:{port}"),
    ]);
    assert!(
        check.contains("allowed directly by Egress default/db-by-name"),
        "{check}"
    );
    assert!(tcp(&a, "127.62.0.1", &port).starts_with("ok "));
}

#[test]
fn dns_glibc_and_a_thousand_addresses_over_tcp() {
    if !privileged_with(&["dnsmasq", "dig", "getent", "unshare"]) {
        return;
    }
    let ns = "127.53.5.1";
    let dir = temp_dir("dns-big");
    let hosts = dir.join("big.hosts");
    let lines: String = (0..1000)
        .map(|i| format!("127.77.{}.{} big.test.example\n", i / 250, i % 250 + 1))
        .collect();
    std::fs::write(&hosts, lines).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {ns}\noptions attempts:1 timeout:2\n"),
    )
    .unwrap();
    let db = TcpServer::start("127.63.0.1");
    let port = db.port();
    let p: u16 = port.parse().unwrap();
    let big = TcpServer::start_in(here(), "127.77.3.201", p);
    let _dns = resolver(
        ns,
        60,
        &[
            host_record("db.test.example", "127.63.0.1"),
            format!("--addn-hosts={}", hosts.display()),
        ],
    );
    let policy = by_name(
        ns,
        "by-name",
        "db.test.example, big.test.example",
        &format!("{{number: {port}}}"),
    );
    let a = agent(&policy);

    // glibc's resolver (getaddrinfo over UDP), with the workload's own resolv.conf.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && getent ahostsv4 db.test.example",
        resolv.display()
    );
    let out = a.exec("web", &["unshare", "-m", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("127.63.0.1"),
        "getent: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tcp(&a, "127.63.0.1", &port).starts_with("ok "));

    // 1000 addresses: truncated over UDP, then the whole answer (about 16 KB) over TCP.
    let (code, short) = dig(&a, ns, "big.test.example", &[]);
    assert_eq!((code, short.lines().count()), (0, 1000));
    assert!(tcp(&a, "127.77.3.201", &port).starts_with("ok "));
    assert_eq!(big.accepted(), 1);
    assert!(metric(&a, "egress_dns_cache_entries") >= 1001.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dns_rtt.py` output: (p50, p99) in microseconds.
fn rtt(out: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(out);
    let field = |k: &str| -> u64 {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text:?}"))
    };
    (field("p50_us="), field("p99_us="))
}

/// The DNS round trip through the agent against the same queries straight to the resolver,
/// from the same kind of client: what the DNS proxy adds (parse, learn into the kernel map,
/// relay). Prints the figures; asserts only a loose bound (debug build, shared machine).
#[test]
fn dns_round_trip_added_latency() {
    if !privileged_with(&["dnsmasq"]) {
        return;
    }
    let ns = "127.53.6.1";
    let _dns = resolver(ns, 60, &[host_record("db.test.example", "127.64.0.1")]);
    let policy = by_name(ns, "by-name", "db.test.example", "{number: 5432}");
    let a = agent(&policy);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/dns_rtt.py");
    let n = "3000";
    let direct = Command::new("python3")
        .args([script, ns, "db.test.example", n])
        .output()
        .unwrap();
    let through = a.exec("web", &["python3", script, ns, "db.test.example", n]);
    let (d50, d99) = rtt(&direct.stdout);
    let (t50, t99) = rtt(&through.stdout);
    eprintln!(
        "DNS round trip: direct p50 {d50} µs p99 {d99} µs; through the agent p50 {t50} µs p99 {t99} µs; added p50 {} µs p99 {} µs",
        t50 as i64 - d50 as i64,
        t99 as i64 - d99 as i64
    );
    assert!(t50 < d50 + 5_000, "p50 added over 5 ms");
    assert!(metric(&a, "egress_dns_answers_total") >= 3000.0);
}

/// A drop the per-packet program cached for an address before a name rule allowed it does not
/// outlive learning the name: a raw SYN to the address (raw sockets allowed) is dropped and
/// counted; once `dig` has learned the name, a TCP connection to that address gets through
/// (the agent bumps `EGRESS_NAMES_EPOCH`, so the cached drop is judged again).
#[test]
fn dns_a_cached_drop_does_not_outlive_learning_the_name() {
    if !privileged_with(&["dnsmasq", "dig", "python3"]) {
        return;
    }
    let ns = "127.53.8.1";
    let server = TcpServer::start("127.60.8.1");
    let port = server.port();
    let _dns = resolver(ns, 30, &[host_record("late.test.example", "127.60.8.1")]);
    let policy = by_name(
        ns,
        "late",
        "late.test.example",
        &format!("{{number: {port}}}"),
    )
    .replace(
        "  traffic: {enableEgress: false}\n",
        "  traffic: {enableEgress: false}\n  sockets: {raw: allow}\n",
    );
    assert!(policy.contains("sockets: {raw: allow}"));
    let a = agent(&policy);
    let out = a.exec("web", &["python3", PACKETS_PY, "syn", "127.60.8.1", &port]);
    // The per-packet program drops it; the kernel tells the sender (EPERM).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        metric(&a, "egress_packet_dropped_total{"),
        1.0,
        "{}",
        a.http_get("/metrics").1
    );
    let (code, answer) = dig(&a, ns, "late.test.example", &[]);
    assert_eq!((code, answer.as_str()), (0, "127.60.8.1"));
    let out = tcp(&a, "127.60.8.1", &port);
    assert!(out.starts_with("ok "), "{out}\n{}", a.log());
    assert_eq!(server.accepted(), 1);
}

/// `spec.dns` turned on by a reload, after the agent started without it: the DNS proxy
/// opens at start only, so DNS stays unsteered (and working) until a restart, rather than
/// steered to a port nobody serves; the agent says so.
#[test]
fn dns_turned_on_by_a_reload_leaves_dns_working_unsteered() {
    if !privileged_with(&["dnsmasq", "dig"]) {
        return;
    }
    let ns = "127.53.9.1";
    let _dns = resolver(ns, 60, &[host_record("db.test.example", "127.66.0.1")]);
    let on = mesh(ns, "");
    let off = on.replace("  dns: {enabled: true,", "  dns: {enabled: false,");
    assert_ne!(on, off);
    let port = free_port().to_string();
    let a = Agent::start(&off.replace("{dns_port}", &port));
    a.reload(&on.replace("{dns_port}", &port));
    a.wait_log("DNS is not steered until the agent restarts");
    assert_eq!(
        dig(&a, ns, "db.test.example", &[]),
        (0, "127.66.0.1".into())
    );
    assert_eq!(metric(&a, "egress_dns_requests_total"), 0.0);
}
