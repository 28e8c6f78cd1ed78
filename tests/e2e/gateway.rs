//! Egress gateways: a workload's connection goes agent → gateway → destination over HTTP/2
//! CONNECT and SOCKS5 (the destination sees the gateway's address), per policy and global;
//! a gateway that is down fails closed; standard clients (curl) use our gateway and our agent
//! uses standard gateways (microsocks, squid); malformed SOCKS5 and CONNECT requests get a
//! clean refusal and the gateway lives on.
//!
//! Loopback stand-ins: destinations on 127.50.x.y, our gateways on 127.0.8.x, Debian's
//! gateways on 127.0.9.x.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{
    free_port, http_server, privileged, privileged_with, run_ok, temp_dir, wait_listening,
    wait_until, Agent, Daemon, Log, Stopped, TcpServer, AGENT,
};

/// A running `egress-agent gateway`, stopped (by its PID) when dropped.
pub(crate) struct Gateway {
    process: Stopped,
    /// SOCKS5 and HTTP listener addresses.
    pub(crate) socks: String,
    pub(crate) http: String,
    metrics_port: u16,
    log: Log,
}

impl Gateway {
    /// A gateway listening on `ip` (SOCKS5 and HTTP), dialling out from `ip`, allowing `allow`
    /// (YAML list of allow rules).
    pub(crate) fn start(ip: &str, allow: &str) -> Gateway {
        let socks = format!("{ip}:{}", free_port());
        Self::start_at(ip, &socks, &format!("{ip}:{}", free_port()), allow)
    }

    /// The same on the given SOCKS5 and HTTP listener addresses.
    fn start_at(ip: &str, socks: &str, http: &str, allow: &str) -> Gateway {
        let (socks, http) = (socks.to_string(), http.to_string());
        let metrics_port = free_port();
        let config = temp_dir("gw").join("gateway.yaml");
        std::fs::write(
            &config,
            format!(
                "kind: GatewayServer\nmetadata: {{name: test}}\nspec:\n  listeners:\n    - {{address: {socks}, protocol: socks5}}\n    - {{address: {http}, protocol: http}}\n  egressAddress: {ip}\n  handshakeTimeout: 2s\n  allow: {allow}\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(AGENT)
            .args(["gateway", "--config"])
            .arg(&config)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("EGRESS_LOG", "info,egress::gateway=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn egress-agent gateway");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap());
        let mut gw = Gateway {
            process: Stopped {
                child,
                dir: config.parent().unwrap().to_path_buf(),
            },
            socks,
            http,
            metrics_port,
            log,
        };
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(30), || {
            exited = gw.process.child.try_wait().unwrap();
            exited.is_some() || gw.log().contains("gateway ready")
        });
        if let Some(st) = exited {
            panic!("gateway exited ({st}) before ready:\n{}", gw.log());
        }
        assert!(ready, "gateway not ready:\n{}", gw.log());
        gw
    }

    pub(crate) fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str) -> String {
        self.log.wait_for("gateway", needle, Duration::from_secs(5))
    }

    pub(crate) fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }
}

/// The workload `web` reaches `dst` with `msg` and sees it as its peer, and `dst` sees
/// `peer_ip` (the gateway's outgoing address) as the peer of its `n`-th connection.
fn through(agent: &Agent, dst: &TcpServer, msg: &str, n: usize, peer_ip: &str) {
    let out = agent.client("web", &["tcp", &dst.ip(), &dst.port(), msg]);
    assert_eq!(
        out,
        format!("ok peer={0} reply={0}|{msg}", dst.addr),
        "{}",
        agent.log()
    );
    assert_eq!(dst.peer(n).ip(), ip(peer_ip), "the destination's peer");
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of one sample line (`name{labels} value`) in a metrics text; 0 when absent.
pub(crate) fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A policy with one workload `web`, egress off, and `rest` appended.
fn policy(rest: &str) -> String {
    format!(
        "kind: MeshConfig\nmetadata: {{name: e}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\n{rest}"
    )
}

fn peers_of(log: &str, protocol: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(&format!("protocol=\"{protocol}\"")) && l.contains("result=\"allowed\"")
        })
        .filter_map(|l| {
            let p = l.split(" peer=").nth(1)?;
            Some(p.split_whitespace().next()?.to_string())
        })
        .collect()
}

#[test]
fn per_policy_gateways_http2tunnel_and_socks5() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let a = TcpServer::start("127.50.1.1");
    let b = TcpServer::start("127.50.2.1");
    let h2gw = Gateway::start("127.0.8.1", "[{ipAddresses: [127.50.0.0/16]}]");
    let socksgw = Gateway::start("127.0.8.2", "[{ipAddresses: [127.50.0.0/16]}]");
    let agent = Agent::start(&policy(&format!(
        "kind: EgressGateway\nmetadata: {{name: h2}}\nspec: {{endpoints: [{{address: {}, mode: http2tunnel}}]}}\n---\nkind: EgressGateway\nmetadata: {{name: socks}}\nspec: {{endpoints: [{{address: {}, mode: socks5}}]}}\n---\nkind: Egress\nmetadata: {{name: to-a}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.1.1/32], gateway: h2}}\n---\nkind: Egress\nmetadata: {{name: to-b}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.2.1/32], gateway: socks}}\n---\nkind: Egress\nmetadata: {{name: site}}\nspec: {{sources: [{{name: web}}], hosts: [site.example], ports: [{{number: 80, protocol: http}}], gateway: h2}}\n",
        h2gw.http, socksgw.socks
    )));

    // HTTP/2 tunnel: several connections, one HTTP/2 connection to the gateway.
    // The workload sees the address it dialled; the destination sees the gateway.
    for i in 0..3 {
        through(&agent, &a, &format!("h2-{i}"), i, "127.0.8.1");
    }
    // SOCKS5.
    through(&agent, &b, "socks", 0, "127.0.8.2");
    // curl in the workload, by host name: the proxy judges the Host, then tunnels over HTTP/2
    // with the host in the request (the gateway logs it).
    let www = temp_dir("gwwww");
    std::fs::write(www.join("index.html"), "through the gateway\n").unwrap();
    let _site = http_server("127.50.1.2", 80, www);
    let out = agent.exec(
        "web",
        &[
            "curl",
            "-s",
            "--max-time",
            "10",
            "--resolve",
            "site.example:80:127.50.1.2",
            "http://site.example/",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through the gateway\n"
    );
    let log = h2gw.wait_log("destination=\"127.50.1.2:80\" host=\"site.example\"");
    assert!(log.contains("result=\"allowed\""), "{log}");
    // Each flow left through its own gateway, and only that one.
    assert_eq!((a.accepted(), b.accepted()), (3, 1));
    let log = h2gw.wait_log("protocol=\"http2tunnel\"");
    let peers = peers_of(&log, "http2tunnel");
    assert_eq!(peers.len(), 4, "{log}");
    assert!(
        peers.iter().all(|p| p == &peers[0]),
        "one reused HTTP/2 connection: {peers:?}"
    );
    assert!(!log.contains("protocol=\"socks5\""), "{log}");
    let slog = socksgw.wait_log("protocol=\"socks5\"");
    assert!(slog.contains("destination=\"127.50.2.1:"), "{slog}");
    let m = h2gw.metrics();
    assert_eq!(
        sample(
            &m,
            "egress_gateway_connections_total{protocol=\"http2tunnel\",result=\"allowed\"}"
        ),
        4,
        "{m}"
    );
    let (_, am) = agent.http_get("/metrics");
    assert_eq!(
        sample(
            &am,
            "egress_proxy_gateway_connections_total{gateway=\"h2\",result=\"ok\"}"
        ),
        4,
        "{am}"
    );
    assert_eq!(
        sample(
            &am,
            "egress_proxy_gateway_connections_total{gateway=\"socks\",result=\"ok\"}"
        ),
        1,
        "{am}"
    );
    let alog = agent.log();
    assert!(!alog.contains("gateway failed"), "{alog}");

    // The gateway restarts on the same address: the pooled HTTP/2 connection is gone, the
    // next tunnel dials a new one.
    let (h2_http, h2_socks) = (h2gw.http.clone(), h2gw.socks.clone());
    drop(h2gw);
    let h2gw = Gateway::start_at(
        "127.0.8.1",
        &h2_socks,
        &h2_http,
        "[{ipAddresses: [127.50.0.0/16]}]",
    );
    through(&agent, &a, "after-restart", 3, "127.0.8.1");
    h2gw.wait_log("protocol=\"http2tunnel\"");

    // The gateway's own allowlist: a destination the policy routes there but the gateway
    // does not allow is refused by the gateway (HTTP 403 on the stream), so the client is reset.
    drop(h2gw);
    let h2gw = Gateway::start("127.0.8.1", "[{ipAddresses: [127.50.9.0/24]}]");
    let dir = temp_dir("gwpolicy");
    let file = dir.join("p.yaml");
    std::fs::write(
        &file,
        format!(
            "kind: EgressGateway\nmetadata: {{name: h2}}\nspec: {{endpoints: [{{address: {}, mode: http2tunnel}}]}}\n",
            h2gw.http
        ),
    )
    .unwrap();
    let applied = agent.cli(&["policy", "apply", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let out = agent.client("web", &["tcp", &a.ip(), &a.port(), "x"]);
    assert!(!out.contains("|x"), "refused by the gateway: {out}");
    assert_eq!(a.accepted(), 4);
    h2gw.wait_log("result=\"refused\"");
    agent.wait_log("HTTP/2 CONNECT answered 403");
}

#[test]
fn global_gateway_and_a_dead_gateway_fails_closed() {
    if !privileged() {
        return;
    }
    let dst = TcpServer::start("127.50.3.1");
    let gw = Gateway::start("127.0.8.3", "[{ipAddresses: [127.50.3.0/24]}]");
    let dead = format!("127.0.8.4:{}", free_port());
    // A global gateway takes every proxied connection: here a via: proxy rule.
    let agent = Agent::start(&policy(&format!(
        "kind: EgressGateway\nmetadata: {{name: global}}\nspec: {{global: [{{address: {}, mode: socks5}}]}}\n---\nkind: EgressGateway\nmetadata: {{name: dead}}\nspec: {{endpoints: [{{address: {dead}, mode: http2tunnel}}]}}\n---\nkind: Egress\nmetadata: {{name: proxied}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.3.1/32], via: proxy}}\n---\nkind: Egress\nmetadata: {{name: via-dead}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.3.2/32], gateway: dead}}\n",
        gw.socks
    )));
    through(&agent, &dst, "g", 0, "127.0.8.3");

    // The named gateway is down: the client is reset, nothing goes direct.
    let started = Instant::now();
    let out = agent.client("web", &["tcp", "127.50.3.2", &dst.port(), "x"]);
    assert!(!out.contains("|x"), "must not get through: {out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a down gateway fails fast"
    );
    let log = agent.wait_log("egress gateway failed");
    assert!(
        log.contains(&format!("EgressGateway dead (http2tunnel at {dead})")),
        "{log}"
    );
    let (_, m) = agent.http_get("/metrics");
    assert!(m.contains("result=\"gateway-error\""), "{m}");
    assert_eq!(
        sample(
            &m,
            "egress_proxy_gateway_connections_total{gateway=\"dead\",result=\"error\"}"
        ),
        1,
        "{m}"
    );

    // The global gateway goes down too: its flows fail closed as well.
    drop(gw);
    let out = agent.client("web", &["tcp", &dst.ip(), &dst.port(), "y"]);
    assert!(!out.contains("|y"), "must not get through: {out}");
    assert_eq!(
        dst.accepted(),
        1,
        "nothing reached the destination directly"
    );
}

/// curl inside or outside a workload; returns (exit code, stdout).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn standard_clients_use_our_gateway() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let dst = TcpServer::start("127.50.4.1");
    let gw = Gateway::start(
        "127.0.8.5",
        "[{ipAddresses: [127.50.4.0/24, \"::1/128\"]}, {hosts: [localhost], ports: [{number: 1}]}]",
    );
    let url = format!("http://{}/", dst.addr);
    // SOCKS5 with the name resolved by the gateway, and HTTP/1.1 CONNECT.
    let socks = format!("socks5h://{}", gw.socks);
    let (code, out) = curl(&["--http0.9", "--proxy", &socks, &url]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{}|GET / HTTP/1.1", dst.addr).as_str())
    );
    let proxy = format!("http://{}", gw.http);
    let (code, out) = curl(&["--http0.9", "--proxytunnel", "--proxy", &proxy, &url]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{}|GET / HTTP/1.1", dst.addr).as_str())
    );
    assert_eq!(dst.accepted(), 2);
    for n in 0..2 {
        assert_eq!(dst.peer(n).ip(), ip("127.0.8.5"));
    }
    // IPv6 destinations: SOCKS5 address type 4 (curl resolves, --socks5) and CONNECT [::1]:port.
    let v6 = TcpServer::start("::1");
    let url6 = format!("http://[::1]:{}/", v6.addr.port());
    let want6 = format!("{}|GET / HTTP/1.1", v6.addr);
    let socks_plain = format!("socks5://{}", gw.socks);
    let (code, out) = curl(&["--http0.9", "--proxy", &socks_plain, &url6]);
    assert_eq!((code, out.trim()), (0, want6.as_str()));
    let (code, out) = curl(&["--http0.9", "--proxytunnel", "--proxy", &proxy, &url6]);
    assert_eq!((code, out.trim()), (0, want6.as_str()));
    assert_eq!(v6.accepted(), 2);
    // Refused by the allowlist: SOCKS5 reply 2 (curl 97), HTTP 403 (curl 56, code 403).
    let other = "http://127.50.5.1:80/";
    assert_eq!(curl(&["--proxy", &socks, other]).0, 97);
    let (code, out) = curl(&[
        "--proxytunnel",
        "--proxy",
        &proxy,
        "-w",
        "%{http_connect}",
        other,
    ]);
    assert_eq!((code, out.as_str()), (56, "403"));
    // A name: allowed by a host rule only on its port.
    assert_eq!(curl(&["--proxy", &socks, "http://localhost:2/"]).0, 97);
    // HTTP/2 with prior knowledge, but not CONNECT: 405 on the stream.
    let (code, out) = curl(&["--http2-prior-knowledge", "-w", "%{http_code}", &proxy]);
    assert_eq!((code, out.as_str()), (0, "405"));
    let m = gw.metrics();
    assert_eq!(
        sample(
            &m,
            "egress_gateway_connections_total{protocol=\"socks5\",result=\"refused\"}"
        ),
        2,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "egress_gateway_connections_total{protocol=\"http-connect\",result=\"refused\"}"
        ),
        1,
        "{m}"
    );
    assert_eq!(
        http_get(gw.metrics_port, "/readyz").lines().next(),
        Some("HTTP/1.1 200 OK")
    );
}

#[test]
fn malformed_socks5_and_connect_requests_get_clean_errors() {
    if !privileged() {
        return;
    }
    let dst = TcpServer::start("127.50.6.1");
    let gw = Gateway::start("127.0.8.6", "[{ipAddresses: [127.50.6.0/24]}]");
    // Sends `bytes`, half-closes, returns all the gateway answered.
    let exchange = |addr: &str, bytes: &[u8]| -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let socks = gw.socks.as_str();
    let p = dst.addr.port().to_be_bytes();
    // Bad version, zero methods, truncated greeting: closed without a reply.
    assert_eq!(exchange(socks, &[4, 1, 0]), b"");
    assert_eq!(exchange(socks, &[5, 0]), b"");
    assert_eq!(exchange(socks, &[5, 3, 0]), b"");
    // Only user/password offered: "no acceptable methods".
    assert_eq!(exchange(socks, &[5, 1, 2]), [5, 0xff]);
    // BIND: command not supported (7); unknown address type: 8; bad length, truncated.
    let r = exchange(socks, &[5, 1, 0, 5, 2, 0, 1, 127, 50, 6, 1, p[0], p[1]]);
    assert_eq!(&r[..4], [5, 0, 5, 7]);
    let r = exchange(socks, &[5, 1, 0, 5, 1, 0, 9, 127, 50, 6, 1, p[0], p[1]]);
    assert_eq!(&r[..4], [5, 0, 5, 8]);
    let r = exchange(socks, &[5, 1, 0, 5, 1, 0, 3, 0, p[0], p[1]]);
    assert_eq!(&r[..4], [5, 0, 5, 1], "zero-length name: general failure");
    assert_eq!(exchange(socks, &[5, 1, 0, 5, 1, 0, 3, 200, b'a']), [5, 0]);
    assert_eq!(exchange(socks, &[5, 1, 0, 5, 1, 0, 1, 127, 50]), [5, 0]);
    // HTTP: not CONNECT, bad target, bad version, header too long, garbage.
    let http = gw.http.as_str();
    let status = |b: &[u8]| {
        let r = exchange(http, b);
        String::from_utf8_lossy(&r)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        status(b"GET http://x/ HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        status(b"CONNECT nohost HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status(b"CONNECT a:99999 HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status(b"CONNECT a:1 HTTP/9\r\n\r\n"),
        "HTTP/1.1 505 HTTP Version Not Supported"
    );
    assert_eq!(
        status(b"CONNECT a:1 HTTP/1.1\r\nbroken\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    let long = format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(9000));
    assert_eq!(
        status(long.as_bytes()),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(status(b"CONNECT a:1 HTT"), "HTTP/1.1 400 Bad Request");
    assert_eq!(
        status(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    // A silent client: closed after the handshake timeout (2 s), not held forever.
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(8));
    // Still serving, nothing reached the destination, and the gateway counted it all.
    let mut s = TcpStream::connect(socks).unwrap();
    s.write_all(&[5, 1, 0, 5, 1, 0, 1, 127, 50, 6, 1, p[0], p[1]])
        .unwrap();
    s.write_all(b"alive\n").unwrap();
    let mut r = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_end(&mut r);
    let r = String::from_utf8_lossy(&r);
    assert!(r.ends_with(&format!("{}|alive\n", dst.addr)), "{r:?}");
    assert_eq!(dst.accepted(), 1);
    let m = gw.metrics();
    assert!(
        sample(
            &m,
            "egress_gateway_connections_total{protocol=\"socks5\",result=\"bad-request\"}"
        ) >= 9,
        "{m}"
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// A gateway file or a policy naming a missing gateway: exit 2, naming file, object, field.
#[test]
fn invalid_gateway_configuration_is_refused() {
    let dir = temp_dir("gwbad");
    let bad = dir.join("gw.yaml");
    std::fs::write(&bad, "kind: GatewayServer\nmetadata: {name: g}\nspec:\n  listeners: [{address: 127.0.8.9:1, protocol: socks4}]\n").unwrap();
    let out = Command::new(AGENT)
        .args(["gateway", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "gw.yaml: GatewayServer g: spec.listeners[0].protocol: unknown variant `socks4`"
        ),
        "{err}"
    );
    let p = dir.join("p.yaml");
    std::fs::write(&p, "kind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: out}\nspec: {sources: [{name: web}], gateway: nowhere}\n").unwrap();
    let out = Command::new(AGENT)
        .args(["validate", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml: Egress default/out: spec.gateway: no EgressGateway \"nowhere\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Debian's dante (danted) on ip:port, dialling out from ip.
fn dante(ip: &str, port: u16) -> Stopped {
    let dir = temp_dir("dante");
    let conf = dir.join("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: {}/danted.log\ninternal: {ip} port = {port}\nexternal: {ip}\nsocksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\nclient pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\nsocks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect }}\n",
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("danted")
        .arg("-f")
        .arg(&conf)
        .args(["-N", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start danted");
    // Stopped with SIGTERM so that danted stops the workers it forked.
    let d = Stopped { child, dir };
    wait_listening("danted", &format!("{ip}:{port}"), Duration::from_secs(15));
    d
}

/// Debian's microsocks and dante (SOCKS5), squid (HTTP/1.1 CONNECT) and nghttpx in HTTP/2
/// proxy mode in front of squid (HTTP/2 CONNECT, "http2tunnel") as the agent's gateways.
#[test]
fn agent_uses_standard_gateways() {
    if !privileged_with(&["microsocks", "danted", "squid", "nghttpx"]) {
        return;
    }
    let dst = TcpServer::start("127.50.7.1");
    let msport = free_port().to_string();
    let ms_addr = format!("127.0.9.1:{msport}");
    let _microsocks = Daemon::start(
        "microsocks",
        &[
            "microsocks",
            "-i",
            "127.0.9.1",
            "-p",
            &msport,
            "-b",
            "127.0.9.1",
        ],
        &ms_addr,
        temp_dir("microsocks"),
    );
    let sq_port = free_port();
    let sq_addr = format!("127.0.9.2:{sq_port}");
    let sq_dir = temp_dir("squid");
    run_ok(Command::new("chmod").arg("777").arg(&sq_dir));
    let d = sq_dir.display();
    std::fs::write(
        sq_dir.join("squid.conf"),
        format!("http_port {sq_addr}\nhttp_access allow all\ntcp_outgoing_address 127.0.9.2\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log none\ncache deny all\ncache_mem 8 MB\nvisible_hostname egress-test\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"),
    )
    .unwrap();
    let conf = sq_dir.join("squid.conf").to_string_lossy().into_owned();
    let _squid = Daemon::start("squid", &["squid", "-N", "-f", &conf], &sq_addr, sq_dir);
    // nghttpx -s: HTTP/2 (h2c here) in front, its CONNECT streams forwarded to squid.
    let ng_addr = format!("127.0.9.3:{}", free_port());
    let ng_dir = temp_dir("nghttpx");
    let frontend = format!("--frontend={};no-tls", ng_addr.replace(':', ","));
    let backend = format!("--backend={}", sq_addr.replace(':', ","));
    let errlog = format!("--errorlog-file={}/error.log", ng_dir.display());
    let _nghttpx = Daemon::start(
        "nghttpx",
        &[
            "nghttpx",
            "-s",
            "--single-process",
            "--conf=/dev/null",
            &frontend,
            &backend,
            &errlog,
        ],
        &ng_addr,
        ng_dir,
    );
    let dante_port = free_port();
    let _dante = dante("127.0.9.4", dante_port);
    let agent = Agent::start(&policy(&format!(
        "kind: EgressGateway\nmetadata: {{name: dante}}\nspec: {{endpoints: [{{address: 127.0.9.4:{dante_port}, mode: socks5}}]}}\n---\nkind: Egress\nmetadata: {{name: d}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.7.4/32], gateway: dante}}\n---\nkind: EgressGateway\nmetadata: {{name: microsocks}}\nspec: {{endpoints: [{{address: {ms_addr}, mode: socks5}}]}}\n---\nkind: EgressGateway\nmetadata: {{name: squid}}\nspec: {{endpoints: [{{address: {sq_addr}, mode: http-connect}}]}}\n---\nkind: Egress\nmetadata: {{name: a}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.7.1/32], gateway: microsocks}}\n---\nkind: Egress\nmetadata: {{name: b}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.7.2/32], gateway: squid}}\n---\nkind: EgressGateway\nmetadata: {{name: nghttpx}}\nspec: {{endpoints: [{{address: {ng_addr}, mode: http2tunnel}}]}}\n---\nkind: Egress\nmetadata: {{name: c}}\nspec: {{sources: [{{name: web}}], ipAddresses: [127.50.7.3/32], gateway: nghttpx}}\n"
    )));
    // microsocks, squid, nghttpx (then squid; twice over the one HTTP/2 connection), dante.
    through(&agent, &dst, "ms", 0, "127.0.9.1");
    let dst2 = TcpServer::start("127.50.7.2");
    through(&agent, &dst2, "sq", 0, "127.0.9.2");
    let dst3 = TcpServer::start("127.50.7.3");
    for i in 0..2 {
        through(&agent, &dst3, &format!("ng{i}"), i, "127.0.9.2");
    }
    let dst4 = TcpServer::start("127.50.7.4");
    through(&agent, &dst4, "dante", 0, "127.0.9.4");
    let (_, m) = agent.http_get("/metrics");
    for (gw, n) in [
        ("microsocks", 1),
        ("squid", 1),
        ("nghttpx", 2),
        ("dante", 1),
    ] {
        let series =
            format!("egress_proxy_gateway_connections_total{{gateway=\"{gw}\",result=\"ok\"}}");
        assert_eq!(sample(&m, &series), n, "{m}");
    }
}
