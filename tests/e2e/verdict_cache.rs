//! The socket hooks' cached-verdict fast path (`egress_common::skb::hook_fast_pass`), tried as
//! an attacker would: a pass one workload earned is not another's, and a pass cached under an
//! older policy is not kept after the policy refuses the destination. Root and an unprivileged
//! uid, IPv4, IPv6 and IPv4-mapped, TCP and unconnected UDP; the refused servers count what
//! reaches them: nothing.

use std::time::Duration;

use crate::harness::{
    privileged, split_local, wait_until, Agent, TcpServer, UdpServer, CLIENT, NOBODY,
};

/// `web` may reach `allowed` (TCP servers, and the UDP server) when `open`; `other` never.
fn policy(tcp: &[&TcpServer], udp: &UdpServer, open: bool) -> String {
    let mut p = "kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}\n---\nkind: Workload\nmetadata: {name: web, namespace: shop}\n---\nkind: Workload\nmetadata: {name: other, namespace: shop}\n".to_string();
    if !open {
        return p;
    }
    let mut allow: Vec<(String, String, &str)> =
        tcp.iter().map(|s| (s.ip(), s.port(), "tcp")).collect();
    allow.push(("127.73.0.1".into(), udp.port(), "udp"));
    for (i, (ip, port, proto)) in allow.iter().enumerate() {
        let net = if ip.contains(':') {
            format!("\"{ip}/128\"")
        } else {
            format!("{ip}/32")
        };
        p += &format!("---\nkind: Egress\nmetadata: {{name: allow-{i}, namespace: shop}}\nspec: {{sources: [{{name: web}}], ipAddresses: [{net}], ports: [{{number: {port}, protocol: {proto}}}]}}\n");
    }
    p
}

/// client.py ARGS in workload `shop/NAME`, as root or as nobody: its verdict line.
fn client(a: &Agent, name: &str, nobody: bool, args: &[&str]) -> String {
    let mut cmd: Vec<&str> = Vec::new();
    if nobody {
        cmd.extend(NOBODY);
    }
    cmd.extend(["/usr/bin/python3", CLIENT]);
    cmd.extend(args);
    let what = format!("{name} {args:?} nobody={nobody}");
    split_local(&a.exec_line(&format!("shop/{name}"), &cmd, &what)).0
}

#[test]
fn bypass_a_cached_pass_is_neither_shared_nor_kept_after_a_tightening() {
    if !privileged() {
        return;
    }
    let (s4, s6) = (TcpServer::start("127.71.0.1"), TcpServer::start("::1"));
    let udp = UdpServer::start("127.73.0.1");
    // The socket hooks alone: with the per-packet program on, it would drop what a wrong
    // cached pass let through (EPERM at the first packet) and hide the hooks' mistake. Flows
    // as in production (`denied`): with every verdict logged, the hooks judge in full.
    let mut a = Agent::new(&policy(&[&s4, &s6], &udp, true));
    a.run_args = vec!["--flows".into(), "denied".into()];
    a.env = vec![("EGRESS_NO_PACKET_PROGRAM".into(), "1".into())];
    a.spawn();
    let (p4, p6, pu) = (s4.port(), s6.port(), udp.port());
    let cases = [
        ("v4", "127.71.0.1", &s4, p4.as_str()),
        ("v6", "::1", &s6, p6.as_str()),
        ("mapped", "::ffff:127.71.0.1", &s4, p4.as_str()),
    ];
    let accepted = || s4.accepted() + s6.accepted();

    // web earns the pass (the hook judges in full and caches it; the second connect is the
    // cached one); `other`, in its own cgroup, dials the very same destinations: refused.
    for nobody in [false, true] {
        for (fam, host, _, port) in cases {
            for round in 0..2 {
                let out = client(&a, "web", nobody, &["tcp", host, port, "x"]);
                assert!(
                    out.starts_with("ok "),
                    "web {fam} #{round} nobody={nobody}: {out}"
                );
            }
            let before = accepted();
            let out = client(&a, "other", nobody, &["tcp", host, port, "x"]);
            assert!(
                out.starts_with("err EPERM"),
                "other {fam} nobody={nobody}: {out}"
            );
            assert!(
                !wait_until(Duration::from_millis(100), || accepted() > before),
                "other's {fam} connection reached the server (nobody={nobody})"
            );
        }
        let msg = format!("web-udp-{nobody}");
        for _ in 0..2 {
            let out = client(&a, "web", nobody, &["udp", "127.73.0.1", &pu, &msg]);
            assert!(out.starts_with("ok"), "web udp nobody={nobody}: {out}");
        }
        assert!(wait_until(Duration::from_secs(2), || udp.got(&msg)));
        let stolen = format!("other-udp-{nobody}");
        let out = client(&a, "other", nobody, &["udp", "127.73.0.1", &pu, &stolen]);
        assert!(
            out.starts_with("err EPERM"),
            "other udp nobody={nobody}: {out}"
        );
        assert!(!wait_until(Duration::from_millis(200), || udp.got(&stolen)));
    }

    // The policy now refuses what web had cached as a pass: refused at once, every family.
    a.reload(&policy(&[&s4, &s6], &udp, false));
    let before = accepted();
    for nobody in [false, true] {
        for (fam, host, _, port) in cases {
            let out = client(&a, "web", nobody, &["tcp", host, port, "x"]);
            assert!(
                out.starts_with("err EPERM"),
                "web {fam} after tightening nobody={nobody}: {out}"
            );
        }
        let late = format!("late-udp-{nobody}");
        let out = client(&a, "web", nobody, &["udp", "127.73.0.1", &pu, &late]);
        assert!(
            out.starts_with("err EPERM"),
            "web udp after tightening nobody={nobody}: {out}"
        );
        assert!(!wait_until(Duration::from_millis(200), || udp.got(&late)));
    }
    assert!(
        !wait_until(Duration::from_millis(200), || accepted() > before),
        "a connection reached a server after the tightening"
    );
}
