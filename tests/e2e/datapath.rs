//! Allow, deny and redirect for TCP over IPv4, IPv6 and IPv4-mapped IPv6, and UDP.

use std::time::{Duration, Instant};

use crate::harness::{
    privileged, privileged_with, wait_until, Agent, TcpServer, UdpServer, WEB_POLICY_HEAD,
};

fn policy(
    allow: &TcpServer,
    proxied: &TcpServer,
    denied: &TcpServer,
    v6: [&TcpServer; 3],
) -> String {
    format!(
        r#"{WEB_POLICY_HEAD}kind: Egress
metadata: {{name: allow-api}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{a}/32, "::1/128"]
  ports: [{{number: {ap}}}, {{number: {v6a}}}]
---
kind: Egress
metadata: {{name: partner-via-proxy}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{p}/32, "::1/128"]
  ports: [{{number: {pp}}}, {{number: {v6p}}}]
  via: proxy
---
kind: Egress
metadata: {{name: deny-bad}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{d}/32, "::1/128"]
  ports: [{{number: {dp}}}, {{number: {v6d}}}]
  action: deny
"#,
        a = allow.ip(),
        ap = allow.port(),
        p = proxied.ip(),
        pp = proxied.port(),
        d = denied.ip(),
        dp = denied.port(),
        v6a = v6[0].port(),
        v6p = v6[1].port(),
        v6d = v6[2].port(),
    )
}

struct Setup {
    agent: Agent,
    allow: TcpServer,
    proxied: TcpServer,
    denied: TcpServer,
    v6: [TcpServer; 3],
}

fn setup() -> Setup {
    let allow = TcpServer::start("127.11.0.1");
    let proxied = TcpServer::start("127.12.0.1");
    let denied = TcpServer::start("127.13.0.1");
    let v6 = [
        TcpServer::start("::1"),
        TcpServer::start("::1"),
        TcpServer::start("::1"),
    ];
    let agent = Agent::start(&policy(&allow, &proxied, &denied, [&v6[0], &v6[1], &v6[2]]));
    Setup {
        agent,
        allow,
        proxied,
        denied,
        v6,
    }
}

#[test]
fn tcp_ipv4_allow_redirect_deny() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let s = setup();
    let a = &s.agent;

    // Allowed: straight to the server.
    let (out, local) = a.client_from("web", &["tcp", &s.allow.ip(), &s.allow.port(), "direct"]);
    assert_eq!(out, format!("ok peer={0} reply={0}|direct", s.allow.addr));
    assert_eq!(s.allow.accepted(), 1);
    assert_eq!(
        Some(s.allow.peer(0)),
        local,
        "the server saw the client itself"
    );

    // Redirected: the bytes reach the original destination through the agent, and the
    // application still sees the address it dialled.
    let (out, local) = a.client_from(
        "web",
        &["tcp", &s.proxied.ip(), &s.proxied.port(), "via-proxy"],
    );
    assert_eq!(
        out,
        format!("ok peer={0} reply={0}|via-proxy", s.proxied.addr)
    );
    assert_eq!(
        s.proxied.accepted(),
        1,
        "exactly one connection reached the destination"
    );
    assert_ne!(
        Some(s.proxied.peer(0)),
        local,
        "the server must see the agent, not the client"
    );
    let log = a.wait_log(&format!(
        "dst={} protocol=\"tcp\" verdict=\"proxy\" rule=\"default/partner-via-proxy\"",
        s.proxied.addr
    ));
    // The agent's own connection to the destination was not judged (and redirected) again.
    assert_eq!(
        log.matches(&format!("dst={}", s.proxied.addr)).count(),
        1,
        "{log}"
    );

    // Denied: EPERM at connect(), at once, and no packet reached the listener.
    let out = a.client("web", &["tcp", &s.denied.ip(), &s.denied.port()]);
    assert!(out.starts_with("err EPERM"), "{out}");
    let url = format!("http://{}/", s.denied.addr);
    let t0 = Instant::now();
    let curl = a.exec("web", &["curl", "-sS", "--max-time", "5", &url]);
    assert_eq!(curl.status.code(), Some(7), "curl exits 7: {curl:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refusal was not immediate"
    );
    // Watched for 50 ms more: a connection that got through would be accepted by then.
    assert!(
        !wait_until(Duration::from_millis(50), || s.denied.accepted() > 0),
        "the denied destination saw a connection"
    );
    assert_eq!(s.denied.accepted(), 0);
    a.wait_log(&format!(
        "dst={} protocol=\"tcp\" verdict=\"deny-rule\" rule=\"default/deny-bad\"",
        s.denied.addr
    ));
}

#[test]
fn tcp_ipv6_allow_redirect_deny() {
    if !privileged() {
        return;
    }
    let s = setup();
    let a = &s.agent;
    let [allow, proxied, denied] = &s.v6;

    let out = a.client("web", &["tcp", "::1", &allow.port(), "six"]);
    assert_eq!(out, format!("ok peer={0} reply={0}|six", allow.addr));

    let out = a.client("web", &["tcp", "::1", &proxied.port(), "six-proxy"]);
    assert_eq!(
        out,
        format!("ok peer={0} reply={0}|six-proxy", proxied.addr)
    );
    assert_eq!(proxied.accepted(), 1);
    a.wait_log(&format!(
        "dst={} protocol=\"tcp\" verdict=\"proxy\"",
        proxied.addr
    ));

    let out = a.client("web", &["tcp", "::1", &denied.port()]);
    assert!(out.starts_with("err EPERM"), "{out}");
    assert_eq!(denied.accepted(), 0);

    // An IPv6 destination that no rule names: enableEgress is false.
    let out = a.client("web", &["tcp", "2001:db8::1", "80"]);
    assert!(out.starts_with("err EPERM"), "{out}");
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    if !privileged() {
        return;
    }
    let s = setup();
    let a = &s.agent;
    let mapped = |srv: &TcpServer| format!("::ffff:{}", srv.ip());

    let out = a.client("web", &["tcp", &mapped(&s.allow), &s.allow.port(), "m"]);
    assert_eq!(
        out,
        format!(
            "ok peer=[::ffff:{0}]:{1} reply={2}|m",
            s.allow.ip(),
            s.allow.port(),
            s.allow.addr
        )
    );

    // Redirected to the proxy's IPv4 address in mapped form; getpeername gives back the
    // mapped address the application dialled.
    let out = a.client(
        "web",
        &["tcp", &mapped(&s.proxied), &s.proxied.port(), "mp"],
    );
    assert_eq!(
        out,
        format!(
            "ok peer=[::ffff:{0}]:{1} reply={2}|mp",
            s.proxied.ip(),
            s.proxied.port(),
            s.proxied.addr
        )
    );
    assert_eq!(s.proxied.accepted(), 1);

    // A v4 deny rule cannot be bypassed through connect6.
    let out = a.client("web", &["tcp", &mapped(&s.denied), &s.denied.port()]);
    assert!(out.starts_with("err EPERM"), "{out}");
    assert_eq!(s.denied.accepted(), 0);
}

#[test]
fn udp_sendto_without_connect_is_judged() {
    if !privileged() {
        return;
    }
    let allowed = UdpServer::start("127.14.0.1");
    let denied = UdpServer::start("127.15.0.1");
    let agent = Agent::start(&format!(
        r#"
kind: MeshConfig
metadata: {{name: egress}}
spec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}}}
---
kind: Workload
metadata: {{name: dns-client}}
---
kind: Egress
metadata: {{name: allow-udp}}
spec:
  sources: [{{name: dns-client}}]
  ipAddresses: [127.14.0.1/32]
  ports: [{{number: {}, protocol: udp}}]
"#,
        allowed.port()
    ));
    let out = agent.client(
        "dns-client",
        &["udp", "127.14.0.1", &allowed.port(), "datagram-1"],
    );
    assert_eq!(out, "ok sent");
    assert!(
        allowed.got("datagram-1"),
        "the allowed datagram did not arrive"
    );

    let out = agent.client(
        "dns-client",
        &["udp", "127.15.0.1", &denied.port(), "datagram-2"],
    );
    assert!(out.starts_with("err EPERM"), "{out}");
    let out = agent.client(
        "dns-client",
        &["udp-connect", "127.15.0.1", &denied.port(), "datagram-3"],
    );
    assert!(out.starts_with("err EPERM"), "{out}");
    // Watched for 100 ms: a datagram that got out would have arrived by then.
    assert!(
        !wait_until(Duration::from_millis(100), || !denied
            .received
            .lock()
            .unwrap()
            .is_empty()),
        "a denied datagram arrived"
    );

    // The rule is for UDP only: TCP to the same address and port is refused.
    let out = agent.client("dns-client", &["tcp", "127.14.0.1", &allowed.port()]);
    assert!(out.starts_with("err EPERM"), "{out}");
    agent.wait_log("protocol=\"udp\" verdict=\"deny-default\"");
}
