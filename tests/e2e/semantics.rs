//! Policy semantics as the kernel applies them. A refusal by policy is EPERM; a destination
//! the policy lets through but where nothing listens is ECONNREFUSED, so most cases need no
//! server at all.

use crate::harness::{privileged, Agent, TcpServer};

const EPERM: &str = "err EPERM";
const REFUSED: &str = "err ECONNREFUSED";

fn verdict(agent: &Agent, workload: &str, ip: &str, port: u16) -> &'static str {
    let out = agent.client(workload, &["tcp", ip, &port.to_string()]);
    if out.starts_with(EPERM) {
        EPERM
    } else if out.starts_with(REFUSED) {
        REFUSED
    } else {
        panic!("unexpected client result for {ip}:{port}: {out}")
    }
}

fn mesh(enable: bool, audit: bool) -> String {
    format!(
        "kind: MeshConfig\nmetadata: {{name: egress}}\nspec: {{traffic: {{enableEgress: {enable}, meshCIDRs: [127.60.0.0/16]}}, auditMode: {audit}, proxy: {{port: {{proxy_port}}}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n---\nkind: Workload\nmetadata: {{name: batch, namespace: jobs}}\n"
    )
}

const RULES: &str = r#"---
kind: Egress
metadata: {name: allow-block}
spec:
  sources: [{name: web}]
  ipAddresses: [127.16.0.4/30]
---
kind: Egress
metadata: {name: deny-one-inside}
spec:
  sources: [{name: web}]
  ipAddresses: [127.16.0.0/16]
  ports: [{number: 9006}]
  action: deny
---
kind: Egress
metadata: {name: port-range}
spec:
  sources: [{name: web}]
  ipAddresses: [127.18.0.1/32]
  ports: [{number: 30000, endPort: 30002, protocol: tcp}, {number: 30005, protocol: udp}]
---
kind: Egress
metadata: {name: deny-everywhere}
spec:
  sources: [{name: web}]
  ipAddresses: [127.19.0.0/24]
  action: deny
"#;

#[test]
fn cidr_boundaries_ports_protocols_and_deny_precedence() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&format!("{}{RULES}", mesh(false, false)));
    let cases: &[(&str, u16, &str, &str)] = &[
        // 127.16.0.4/30: the first and last address in, the neighbours out.
        ("127.16.0.3", 9000, EPERM, "just below the prefix"),
        ("127.16.0.4", 9000, REFUSED, "first address of the prefix"),
        ("127.16.0.7", 9000, REFUSED, "last address of the prefix"),
        ("127.16.0.8", 9000, EPERM, "just above the prefix"),
        // A deny on the shorter 127.16.0.0/16 wins over the allow on the /30, on its port only.
        (
            "127.16.0.5",
            9006,
            EPERM,
            "deny on a broader prefix beats a narrower allow",
        ),
        (
            "127.16.0.5",
            9005,
            REFUSED,
            "the deny is for port 9006 only",
        ),
        // Port range 30000-30002/tcp.
        ("127.18.0.1", 29999, EPERM, "below the port range"),
        ("127.18.0.1", 30000, REFUSED, "first port of the range"),
        ("127.18.0.1", 30002, REFUSED, "last port of the range"),
        ("127.18.0.1", 30003, EPERM, "above the port range"),
        (
            "127.18.0.1",
            30005,
            EPERM,
            "30005 is allowed for udp, not tcp",
        ),
        // Mesh CIDRs are not egress.
        ("127.60.1.1", 80, REFUSED, "in-mesh destination"),
        // Unmatched with enableEgress false.
        ("127.99.0.1", 80, EPERM, "unmatched"),
    ];
    let mut failures = Vec::new();
    for &(ip, port, want, why) in cases {
        let got = verdict(&agent, "web", ip, port);
        if got != want {
            failures.push(format!("{ip}:{port} ({why}): want {want}, got {got}"));
        }
    }
    // Policies apply to their sources only: `batch` has no rules.
    if verdict(&agent, "jobs/batch", "127.16.0.4", 9000) != EPERM {
        failures.push("jobs/batch got web's allow".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let out = agent.client("web", &["udp", "127.18.0.1", "30005"]);
    assert_eq!(out, "ok sent");
}

#[test]
fn enable_egress_true_lets_unmatched_traffic_pass_but_not_denies() {
    if !privileged() {
        return;
    }
    let open = TcpServer::start("127.20.0.9");
    let agent = Agent::start(&format!("{}{RULES}", mesh(true, false)));
    let out = agent.client("web", &["tcp", &open.ip(), &open.port(), "pass"]);
    assert_eq!(out, format!("ok peer={0} reply={0}|pass", open.addr));
    assert_eq!(open.accepted(), 1);
    agent.wait_log(&format!(
        "dst={} protocol=\"tcp\" verdict=\"passthrough\"",
        open.addr
    ));
    // Deny rules still apply with egress enabled.
    assert_eq!(verdict(&agent, "web", "127.19.0.200", 443), EPERM);
    assert_eq!(verdict(&agent, "jobs/batch", "127.19.0.200", 443), REFUSED);
}

#[test]
fn audit_mode_allows_and_reports_would_deny() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&format!("{}{RULES}", mesh(false, true)));
    assert_eq!(verdict(&agent, "web", "127.19.0.1", 443), REFUSED);
    assert_eq!(verdict(&agent, "web", "127.99.0.1", 80), REFUSED);
    agent.wait_log("dst=127.19.0.1:443 protocol=\"tcp\" verdict=\"audit-rule\" rule=\"default/deny-everywhere\"");
    agent.wait_log("dst=127.99.0.1:80 protocol=\"tcp\" verdict=\"audit-default\"");
}
