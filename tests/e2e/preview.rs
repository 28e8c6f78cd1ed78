//! Changing policy without fear: a policy in audit mode reports what it would refuse and lets
//! it through while the others keep enforcing; the flow history of real connections (kept
//! across a restart) and `policy preview` listing exactly the flows a candidate would change,
//! which applying it then refuses.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;

use crate::harness::{
    http_server, privileged, privileged_with, temp_dir, wait_until, Agent, Daemon, TcpServer,
};

fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    serde_json::from_str(&agent.cli_ok(&a)).unwrap()
}

fn tcp(agent: &Agent, ip: &str, port: &str) -> String {
    agent.client("web", &["tcp", ip, port])
}

/// `curl` in `web` to `http://host/` resolved to `ip`: the HTTP status (000: no answer).
fn curl(agent: &Agent, host: &str, ip: &str) -> String {
    crate::proxy::curl(agent, "http", host, ip, 80).1
}

/// An HTTP server on `ip`:80 serving `hello`.
fn web(ip: &str) -> Daemon {
    let www = temp_dir("www");
    std::fs::write(www.join("index.html"), "hello\n").unwrap();
    http_server(ip, 80, www)
}

/// The value of one series on `/metrics` (0 when absent).
fn metric(agent: &Agent, series: &str) -> u64 {
    let (_, body) = agent.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const AUDIT_POLICY: &str = r#"
kind: MeshConfig
metadata: {name: egress}
spec: {traffic: {enableEgress: true}, proxy: {port: {proxy_port}, sniffTimeout: 2s}}
---
kind: Workload
metadata: {name: web}
---
kind: Egress
metadata: {name: audited}
spec: {sources: [{name: web}], ipAddresses: [127.51.0.1/32], action: deny, mode: audit}
---
kind: Egress
metadata: {name: enforced}
spec: {sources: [{name: web}], ipAddresses: [127.51.0.2/32], action: deny}
---
kind: Egress
metadata: {name: hosts}
spec: {sources: [{name: web}], hosts: [ok.example], ipAddresses: [127.51.0.3/32], ports: [{number: 80, protocol: http}]}
---
kind: Egress
metadata: {name: audited-host}
spec: {sources: [{name: web}], hosts: [ok.example], ports: [{number: 80, protocol: http}], action: deny, mode: audit}
"#;

#[test]
fn audit_mode_per_policy_reports_while_another_enforces() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let audited_srv = TcpServer::start("127.51.0.1");
    let enforced_srv = TcpServer::start("127.51.0.2");
    let _http = web("127.51.0.3");
    let agent = Agent::start(AUDIT_POLICY);

    // The audited deny lets the connection through, to the real server.
    let out = tcp(&agent, &audited_srv.ip(), &audited_srv.port());
    assert!(out.starts_with("ok peer=127.51.0.1:"), "{out}");
    // The enforced one refuses.
    let out = tcp(&agent, &enforced_srv.ip(), &enforced_srv.port());
    assert!(out.starts_with("err EPERM"), "{out}");
    // A host denied by an audited policy over an enforced host allow: answered, and audited.
    assert_eq!(curl(&agent, "ok.example", "127.51.0.3"), "200");

    let kernel =
        r#"egress_audit_total{policy="default/audited",workload="default/web",layer="kernel"}"#;
    let proxy =
        r#"egress_audit_total{policy="default/audited-host",workload="default/web",layer="proxy"}"#;
    assert!(
        wait_until(Duration::from_secs(5), || metric(&agent, kernel) == 1),
        "kernel audit not counted once:\n{}",
        agent.http_get("/metrics").1
    );
    assert_eq!(metric(&agent, proxy), 1);
    let enforced = r#"egress_audit_total{policy="default/enforced""#;
    assert!(!agent.http_get("/metrics").1.contains(enforced));
    agent.wait_log(r#"verdict="audit-rule" rule="default/audited""#);
    let log = agent.wait_log(r#"verdict="audit" rule="default/audited-host""#);
    assert!(
        log.contains(r#"verdict="deny-rule" rule="default/enforced""#),
        "{log}"
    );
    // `policy list` and `check` say which policy only audits.
    let check = agent.cli_ok(&["policy", "check", "-w", "web", "127.51.0.1:9"]);
    assert!(check.contains("audit-rule"), "{check}");
    let list = json(&agent, &["policy", "list"]);
    let modes: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert!(modes.contains(&("default/audited", "audit")), "{modes:?}");
    assert!(
        modes.contains(&("default/enforced", "enforce")),
        "{modes:?}"
    );
}

fn policy(rules: &str) -> String {
    format!("kind: MeshConfig\nmetadata: {{name: egress}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}, sniffTimeout: 2s}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n{rules}")
}

fn rule(name: &str, ip: &str, action: &str) -> String {
    format!("---\nkind: Egress\nmetadata: {{name: {name}}}\nspec: {{sources: [{{name: web}}], ipAddresses: [{ip}/32], action: {action}}}\n")
}

const HOSTS: &str = "---\nkind: Egress\nmetadata: {name: hosts}\nspec: {sources: [{name: web}], hosts: [ok.example], ipAddresses: [127.52.0.3/32], ports: [{number: 80, protocol: http}]}\n";

/// The destinations (ip:port) of the history entries.
fn history(agent: &Agent) -> BTreeSet<String> {
    json(agent, &["flows", "--aggregate", "--since", "1h"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}:{}", r["ip"].as_str().unwrap(), r["port"]))
        .collect()
}

#[test]
fn preview_lists_exactly_the_changed_flows_and_apply_refuses_them() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let a = TcpServer::start("127.52.0.1");
    let b = TcpServer::start("127.52.0.2");
    let _http = web("127.52.0.3");
    let current = policy(
        &(rule("allow-a", "127.52.0.1", "allow") + &rule("allow-b", "127.52.0.2", "allow") + HOSTS),
    );
    let mut agent = Agent::start(&current);

    // Real connections: allowed, proxied with a host, refused.
    assert!(tcp(&agent, &a.ip(), &a.port()).starts_with("ok "));
    assert!(tcp(&agent, &b.ip(), &b.port()).starts_with("ok "));
    assert_eq!(curl(&agent, "ok.example", "127.52.0.3"), "200");
    assert!(tcp(&agent, "127.52.0.4", "80").starts_with("err EPERM"));
    let want: BTreeSet<String> = [
        format!("127.52.0.1:{}", a.port()),
        format!("127.52.0.2:{}", b.port()),
        "127.52.0.3:80".into(),
        "127.52.0.4:80".into(),
    ]
    .into();
    assert!(
        wait_until(Duration::from_secs(5), || history(&agent) == want),
        "history {:?}, want {want:?}",
        history(&agent)
    );
    let rows = json(&agent, &["flows", "--aggregate"]);
    let host_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == 80 && r["ip"] == "127.52.0.3");
    assert_eq!(host_row.unwrap()["host"], "ok.example");

    // The history outlives a restart.
    agent.stop_keep();
    agent.spawn();
    assert_eq!(history(&agent), want);

    // The candidate removes allow-b and adds a deny for a.
    let candidate = policy(
        &(rule("allow-a", "127.52.0.1", "allow") + &rule("deny-a", "127.52.0.1", "deny") + HOSTS),
    );
    let file = temp_dir("candidate").join("candidate.yaml");
    std::fs::write(
        &file,
        candidate.replace("{proxy_port}", &agent.proxy_port.to_string()),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let g0 = json(&agent, &["egress", "status"])["generation"].clone();
    let v = json(&agent, &["policy", "preview", "-f", f, "--replace"]);
    let got: BTreeSet<(String, String, String, String)> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |v: &Value| v.as_str().unwrap().to_string();
            (
                s(&c["destination"]),
                s(&c["before"]["route"]),
                s(&c["after"]["route"]),
                s(&c["after"]["rule"]),
            )
        })
        .collect();
    let refused = |ip: &str, port: &str, rule: &str| {
        (
            format!("{ip}:{port}"),
            "allowed".into(),
            "refused".into(),
            rule.to_string(),
        )
    };
    let expected: BTreeSet<_> = [
        refused("127.52.0.1", &a.port(), "default/deny-a"),
        refused("127.52.0.2", &b.port(), ""),
    ]
    .into();
    assert_eq!(got, expected, "{v:#}");
    assert_eq!(v["new_denies"], 2);
    let table = agent.cli_ok(&["policy", "preview", "-f", f, "--replace"]);
    assert!(
        table.contains("2 of 4 flows in the history would change (2 newly refused)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "tcp 127.52.0.1:{}: allowed -> refused by Egress default/deny-a (deny-rule)",
            a.port()
        )),
        "{table}"
    );
    let gate = agent.cli(&[
        "policy",
        "preview",
        "-f",
        f,
        "--replace",
        "--fail-on-new-denies",
    ]);
    assert_eq!(gate.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gate.stderr).contains("would refuse 2 flow(s)"));
    // Nothing changed on the agent.
    assert_eq!(json(&agent, &["egress", "status"])["generation"], g0);

    // Applying it refuses exactly those flows.
    agent.reload(&candidate);
    assert!(tcp(&agent, &a.ip(), &a.port()).starts_with("err EPERM"));
    assert!(tcp(&agent, &b.ip(), &b.port()).starts_with("err EPERM"));
    assert_eq!(curl(&agent, "ok.example", "127.52.0.3"), "200");
    assert!(tcp(&agent, "127.52.0.4", "80").starts_with("err EPERM"));
    // And now the candidate is the policy in force: previewing it changes nothing.
    let v = json(
        &agent,
        &[
            "policy",
            "preview",
            "-f",
            f,
            "--replace",
            "--fail-on-new-denies",
        ],
    );
    assert_eq!(v["changes"].as_array().unwrap().len(), 0, "{v:#}");
}

#[test]
fn preview_of_bad_input_exits_2_and_changes_nothing() {
    if !privileged_with(&["curl"]) {
        return;
    }
    let agent = Agent::start(&policy(&rule("allow-a", "127.53.0.1", "allow")));
    let g0 = json(&agent, &["egress", "status"])["generation"].clone();
    let dir = temp_dir("bad");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: Egress\nmetadata: {name: x}\nspec: {sources: [{name: web}], action: maybe}\n",
    )
    .unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, rule("allow-b", "127.53.0.2", "allow")).unwrap();
    for args in [
        vec!["policy", "preview", "-f", bad.to_str().unwrap()],
        vec![
            "policy",
            "preview",
            "-f",
            good.to_str().unwrap(),
            "-w",
            "nosuch",
        ],
        vec!["policy", "preview", "-f", "/nonexistent/candidate.yaml"],
    ] {
        let out = agent.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("egress-agent: "), "{err}");
    }
    assert_eq!(json(&agent, &["egress", "status"])["generation"], g0);
    let list = agent.cli_ok(&["policy", "list"]);
    assert!(!list.contains("allow-b"), "{list}");
}

#[test]
fn preview_of_a_crd_file_against_a_kubernetes_node_agent() {
    use crate::k8s::{kube_agent, make_pod, pod, uid, verdict, ALLOWED, EPERM};
    use egress_agent::k8s::cgroups::{Driver, Qos};
    if !privileged() {
        return;
    }
    let tree = crate::harness::CgroupTree::new();
    let kubepods = "kubepods.slice";
    tree.mkdir(kubepods);
    let fake = crate::harness::FakeApiServer::start();
    let a = uid(0x19);
    let container = format!("containerd://{}", "c9".repeat(32));
    let web = make_pod(
        &tree,
        kubepods,
        Driver::Systemd,
        Qos::Burstable,
        &a,
        &container,
    );
    fake.put(
        "pods",
        pod("web-a", &a, "web", "Burstable", crate::k8s::NODE),
    );
    fake.put(
        "egresses",
        serde_json::json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
            "metadata": {"name": "web-out", "namespace": "shop"},
            "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "ipAddresses": ["127.79.0.0/16"]}}),
    );
    let (agent, _kubeconfig) = kube_agent(&fake, tree.path.join(kubepods));
    assert_eq!(verdict(&web, "127.79.0.1"), ALLOWED);
    assert_eq!(verdict(&web, "127.79.0.2"), ALLOWED);
    assert_eq!(verdict(&web, "127.80.0.1"), EPERM);
    assert!(
        wait_until(Duration::from_secs(5), || history(&agent).len() == 3),
        "{:?}",
        history(&agent)
    );
    // A CRD file: a deny for one address, selecting pods by label (also other nodes').
    let file = temp_dir("crd").join("deny.yaml");
    std::fs::write(&file, "apiVersion: policy.egress.dev/v1alpha1\nkind: Egress\nmetadata: {name: no-one, namespace: shop}\nspec: {sources: [{podSelector: {matchLabels: {app: web}}}], ipAddresses: [127.79.0.1/32], action: deny}\n").unwrap();
    let v = json(
        &agent,
        &[
            "policy",
            "preview",
            "--kubernetes",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v:#}");
    assert_eq!(changes[0]["workload"], "shop/web-a");
    assert_eq!(changes[0]["destination"], "127.79.0.1:9");
    assert_eq!(changes[0]["after"]["rule"], "shop/no-one");
    assert_eq!(changes[0]["after"]["route"], "refused");
    // Nothing changed on the node.
    assert_eq!(verdict(&web, "127.79.0.1"), ALLOWED);
}
