//! Kubernetes NetworkPolicy egress and the sources users already write (ServiceAccounts as
//! OSM and FSM mean them), as the kernel applies them: the examples of the Kubernetes
//! NetworkPolicy documentation (a /28 on TCP 80, a port range, ipBlock except) on real
//! cgroups in standalone mode (workload labels stand in for pod labels), and the same objects
//! watched through `FakeApiServer` (a FAKE API server) in Kubernetes mode. A refusal is EPERM;
//! an allowed connect to a port where nothing listens is ECONNREFUSED.

use std::{process::Command, time::Duration};

use egress_agent::k8s::cgroups::{Driver, Qos};
use serde_json::json;

use crate::{
    harness::{
        privileged, require, wait_until, Agent, CgroupTree, FakeApiServer, Need, TcpServer, AGENT,
    },
    k8s::{eventually, kube_agent, make_pod, metric, uid, verdict as pod_verdict},
};

const EPERM: &str = "err EPERM";
const ALLOWED: &str = "err ECONNREFUSED";

/// The MeshConfig (enableEgress true: NetworkPolicy alone decides), `db` and `web` in
/// `default`, and a `db` of another namespace.
const WORKLOADS: &str = r#"kind: MeshConfig
metadata: {name: egress}
spec: {traffic: {enableEgress: true, meshCIDRs: [127.60.0.0/16]}, proxy: {port: {proxy_port}}}
---
kind: Workload
metadata: {name: db, labels: {role: db}}
---
kind: Workload
metadata: {name: web, labels: {role: web}}
---
kind: Workload
metadata: {name: db, namespace: jobs, labels: {role: db}}
"#;

/// The documentation's examples, on loopback addresses: `test-network-policy` restricts the
/// db pods to a /28 on TCP 80 (its ingress part is the CNI's); `multi-port-egress` adds TCP
/// 32000-32768 to a /24 except its upper half. An Egress denies one address the policy
/// allows: both must allow.
const POLICIES: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}}]
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 127.21.0.16/28}}]
    ports: [{protocol: TCP, port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: multi-port-egress}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 127.22.0.0/24, except: [127.22.0.128/25]}}]
    ports: [{protocol: TCP, port: 32000, endPort: 32768}]
---
kind: Egress
metadata: {name: not-that-one}
spec: {sources: [{podSelector: {matchLabels: {role: db}}}], ipAddresses: [127.21.0.18/32], action: deny}
"#;

fn verdict(agent: &Agent, w: &str, ip: &str, port: u16) -> String {
    let out = agent.client(w, &["tcp", ip, &port.to_string()]);
    [EPERM, ALLOWED]
        .into_iter()
        .find(|v| out.starts_with(v))
        .unwrap_or_else(|| panic!("unexpected client result for {ip}:{port}: {out}"))
        .to_string()
}

/// Each case: `WORKLOAD IP:PORT allowed|EPERM WHY`; every case is tried, the failures listed.
fn check_cases(agent: &Agent, cases: &[&str]) {
    let mut failures = Vec::new();
    for c in cases {
        let f: Vec<&str> = c.splitn(4, ' ').collect();
        let (ip, port) = f[1].rsplit_once(':').unwrap();
        let want = if f[2] == "allowed" { ALLOWED } else { EPERM };
        let got = verdict(agent, f[0], ip, port.parse().unwrap());
        if got != want {
            failures.push(format!("{c}: got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn network_policy_documentation_examples_allow_refuse_and_leave_others_untouched() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&format!("{WORKLOADS}{POLICIES}"));
    check_cases(
        &agent,
        &[
            "db 127.21.0.16:80 allowed first address of the /28, TCP 80",
            "db 127.21.0.31:80 allowed last address of the /28",
            "db 127.21.0.15:80 EPERM just below the /28",
            "db 127.21.0.32:80 EPERM just above the /28",
            "db 127.21.0.17:81 EPERM another port",
            "db 127.21.0.18:80 EPERM allowed by NetworkPolicy, denied by an Egress",
            "db 127.22.0.1:32000 allowed first port of the range",
            "db 127.22.0.1:32768 allowed last port of the range",
            "db 127.22.0.1:31999 EPERM below the range",
            "db 127.22.0.1:32769 EPERM above the range",
            "db 127.22.0.127:32000 allowed last address before the exception",
            "db 127.22.0.128:32000 EPERM inside ipBlock.except",
            "db 127.99.0.1:443 EPERM anywhere else",
            "db 127.60.0.1:443 allowed meshCIDRs are the CNI's",
            "web 127.99.0.1:443 allowed not selected: untouched",
            "web 127.22.0.128:32000 allowed not selected: untouched",
            "jobs/db 127.99.0.1:443 allowed same labels, another namespace: untouched",
        ],
    );
    // UDP: the policies allow TCP only.
    assert!(agent
        .client("db", &["udp", "127.21.0.16", "80"])
        .starts_with(EPERM));
    assert_eq!(
        agent.client("web", &["udp", "127.21.0.16", "80"]),
        "ok sent"
    );
    // Bytes through an allowed connection (a real server on the allowed port range is not
    // needed: an open server outside the range is refused, one in the mesh is reached).
    let open = TcpServer::start("127.60.0.9");
    let out = agent.client("db", &["tcp", &open.ip(), &open.port(), "hi"]);
    assert!(out.starts_with("ok "), "{out}");
    assert_eq!(open.accepted(), 1);
    // The refusal names the object, in the flow log and in `policy check`.
    agent.wait_log("verdict=\"deny-rule\" rule=\"NetworkPolicy default/test-network-policy\"");
    let check = agent.cli_ok(&["policy", "check", "--workload", "db", "127.99.0.1:443"]);
    assert!(
        check.contains("NetworkPolicy default/test-network-policy"),
        "{check}"
    );
    assert!(check.contains("isolated for egress"), "{check}");
    let list = agent.cli_ok(&["policy", "list"]);
    assert!(
        list.contains("NetworkPolicy default/multi-port-egress"),
        "{list}"
    );
    assert!(list.contains("not-that-one"), "{list}");
}

#[test]
fn a_bad_network_policy_is_refused_by_field_and_the_previous_policy_stays() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&format!("{WORKLOADS}{POLICIES}"));
    let bad = POLICIES.replace("port: 80}", "port: http}");
    let file = std::env::temp_dir().join(format!("egress-np-bad-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        format!("{WORKLOADS}{bad}").replace("{proxy_port}", "15001"),
    )
    .unwrap();
    let out = Command::new(AGENT)
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NetworkPolicy default/test-network-policy: spec.egress[0].ports[0].port: named port \"http\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = agent.cli(&["policy", "apply", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(!out.status.success());
    assert_eq!(verdict(&agent, "db", "127.21.0.16", 80), ALLOWED);
    assert_eq!(verdict(&agent, "db", "127.99.0.1", 80), EPERM);
}

/// Kubernetes mode, FAKE API server: an Egress whose source is a ServiceAccount (as OSM
/// writes it) applies to every pod of that ServiceAccount and to no other; a NetworkPolicy
/// watched from the fake narrows those pods further; a bad one is refused (Warning Event,
/// metric) and the previous one stays.
#[test]
fn fake_api_server_service_account_sources_and_network_policies() {
    if !privileged() || !require(&[Need::Tool("python3")]) {
        return;
    }
    let kubepods = "kubepods";
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start();
    let pods = [
        ("curl-1", "curl", 0x31u32),
        ("curl-2", "curl", 0x32),
        ("web-1", "default", 0x33),
    ];
    let mut dirs = Vec::new();
    for (name, sa, n) in pods {
        let u = uid(n);
        dirs.push(make_pod(
            &tree,
            kubepods,
            Driver::Cgroupfs,
            Qos::BestEffort,
            &u,
            &format!("containerd://{}", format!("{n:02x}").repeat(32)),
        ));
        fake.put("pods", json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": u, "labels": {"app": name.split('-').next().unwrap()}},
            "spec": {"nodeName": "node-a", "serviceAccountName": sa, "containers": [{"name": "main", "image": "curl"}]},
            "status": {"qosClass": "BestEffort", "phase": "Running"}}));
    }
    // This cluster has no AdminNetworkPolicy CRDs (yet): the first sync does not wait.
    for c in ["adminnetworkpolicies", "baselineadminnetworkpolicies"] {
        fake.set_installed(c, false);
    }
    fake.put(
        "egresses",
        json!({"apiVersion": "policy.openservicemesh.io/v1alpha1", "kind": "Egress",
        "metadata": {"name": "curl-out", "namespace": "shop"},
        "spec": {"sources": [{"kind": "ServiceAccount", "name": "curl", "namespace": "shop"}],
                 "ipAddresses": ["127.77.0.0/16"], "ports": [{"number": 9, "protocol": "tcp"}]}}),
    );
    let (agent, _kubeconfig) = kube_agent(&fake, tree.path.join(kubepods));
    agent.wait_log("cannot list this optional kind (CRD not installed?)");
    let [curl1, curl2, web] = [&dirs[0], &dirs[1], &dirs[2]];
    assert_eq!(pod_verdict(curl1, "127.77.1.1"), ALLOWED);
    assert_eq!(pod_verdict(curl2, "127.77.2.1"), ALLOWED);
    assert_eq!(pod_verdict(web, "127.77.1.1"), EPERM);
    // A NetworkPolicy for the curl pods: both must allow.
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "curl-egress", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "curl"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "127.77.1.0/24"}}]}]}});
    fake.put("networkpolicies", np.clone());
    eventually("the NetworkPolicy narrows the curl pods", &agent, || {
        pod_verdict(curl2, "127.77.2.1") == EPERM
    });
    assert_eq!(pod_verdict(curl1, "127.77.1.1"), ALLOWED);
    assert_eq!(pod_verdict(web, "127.77.1.1"), EPERM);
    // A bad version: refused by field, counted, a Warning Event; the previous one stays.
    let mut bad = np;
    bad["spec"]["egress"][0]["ports"] = json!([{"port": "http"}]);
    fake.put("networkpolicies", bad);
    agent.wait_log(
        "kubernetes: NetworkPolicy shop/curl-egress: spec.egress[0].ports[0].port: named port",
    );
    eventually("the rejection is counted", &agent, || {
        metric(
            &agent,
            "egress_policy_rejected_total{kind=\"NetworkPolicy\"}",
        ) == Some(1.0)
    });
    eventually("a Warning Event names the NetworkPolicy", &agent, || {
        fake.list("events").iter().any(|e| {
            e["reason"] == "Rejected"
                && e["regarding"]["kind"] == "NetworkPolicy"
                && e["regarding"]["apiVersion"] == "networking.k8s.io/v1"
                && e["regarding"]["name"] == "curl-egress"
        })
    });
    assert_eq!(pod_verdict(curl1, "127.77.1.1"), ALLOWED);
    assert_eq!(pod_verdict(curl2, "127.77.2.1"), EPERM);
    // Deleted: the Egress alone decides again.
    fake.delete("networkpolicies", "shop", "curl-egress");
    eventually("the NetworkPolicy is gone", &agent, || {
        pod_verdict(curl2, "127.77.2.1") == ALLOWED
    });
    // The AdminNetworkPolicy CRDs get installed: the watch (retrying with backoff) finds
    // them, and an AdminNetworkPolicy, cluster-scoped, is enforced.
    for c in ["adminnetworkpolicies", "baselineadminnetworkpolicies"] {
        fake.set_installed(c, true);
    }
    fake.put("adminnetworkpolicies", json!({"apiVersion": "policy.networking.k8s.io/v1alpha1",
        "kind": "AdminNetworkPolicy", "metadata": {"name": "no-77-2"},
        "spec": {"priority": 1, "subject": {"namespaces": {}},
                 "egress": [{"name": "deny", "action": "Deny", "to": [{"networks": ["127.77.2.0/24"]}]}]}}));
    // The watch's backoff (up to 30 s) decides when it looks again.
    assert!(
        wait_until(Duration::from_secs(45), || pod_verdict(curl2, "127.77.2.1")
            == EPERM),
        "the AdminNetworkPolicy never took effect:\n{}",
        agent.log()
    );
    assert_eq!(pod_verdict(curl1, "127.77.1.1"), ALLOWED);
}

/// AdminNetworkPolicy tiers on real cgroups: a higher-priority Deny beats a lower Allow,
/// Pass hands over to NetworkPolicy, the BaselineAdminNetworkPolicy is the default.
const ADMIN: &str = r#"---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-metadata}
spec:
  priority: 5
  subject: {namespaces: {}}
  egress:
  - {name: no-metadata, action: Deny, to: [{networks: [127.31.0.254/32]}]}
  - {name: pass-corp, action: Pass, to: [{networks: [127.32.0.0/16]}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: allow-cloud}
spec:
  priority: 50
  subject: {namespaces: {}}
  egress:
  - {name: cloud, action: Allow, to: [{networks: [127.31.0.0/16, 127.32.0.0/16]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-corp-443}
spec:
  podSelector: {matchLabels: {role: web}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 127.32.1.0/24}}], ports: [{port: 443}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  egress:
  - {action: Allow, to: [{networks: [127.33.0.1/32]}], ports: [{portNumber: {protocol: TCP, port: 8080}}]}
  - {action: Deny, to: [{networks: [127.0.0.0/8]}]}
"#;

#[test]
fn admin_network_policy_priority_pass_and_baseline() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&format!("{WORKLOADS}{ADMIN}"));
    check_cases(
        &agent,
        &[
            "web 127.31.0.254:80 EPERM priority 5 Deny beats priority 50 Allow",
            "web 127.31.0.1:80 allowed priority 50 Allow",
            "web 127.32.1.1:443 allowed Pass: NetworkPolicy allows",
            "web 127.32.1.1:80 EPERM Pass: NetworkPolicy refuses (the lower Allow is skipped)",
            "web 127.32.2.1:443 EPERM Pass: outside the NetworkPolicy's block",
            "db 127.32.1.1:80 EPERM Pass, not isolated: the baseline denies",
            "db 127.33.0.1:8080 allowed baseline Allow",
            "db 127.33.0.1:8081 EPERM baseline Deny",
            "jobs/db 127.99.0.1:80 EPERM baseline Deny",
            "db 127.60.0.1:80 allowed meshCIDRs are the CNI's",
        ],
    );
    let check = agent.cli_ok(&["policy", "check", "--workload", "web", "127.31.0.254:80"]);
    assert!(
        check.contains("refused by AdminNetworkPolicy deny-metadata"),
        "{check}"
    );
    let check = agent.cli_ok(&["policy", "check", "--workload", "db", "127.99.0.1:80"]);
    assert!(
        check.contains("refused by BaselineAdminNetworkPolicy default"),
        "{check}"
    );
    let list = agent.cli_ok(&["policy", "list"]);
    for name in [
        "AdminNetworkPolicy allow-cloud",
        "BaselineAdminNetworkPolicy default",
        "NetworkPolicy default/web-corp-443",
    ] {
        assert!(list.contains(name), "{name}:\n{list}");
    }
}
