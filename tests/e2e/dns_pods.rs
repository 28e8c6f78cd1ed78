//! DNS for workloads in a network namespace of their own: the agent's DNS proxy listens
//! inside each pod's namespace (as its HTTP proxy does), so a pod's queries are steered to it
//! there, and the pod's name rules allow the answered addresses, on the socket hooks and on
//! the tc backstop of its veth. A standalone pod, and a Kubernetes pod (FAKE API server)
//! whose cluster DNS is a Service-IP-style address: real dnsmasq in the "outside" namespace,
//! real dig and python clients in the pods.

use std::path::Path;

use serde_json::json;

use crate::{
    dns::{dig, host_record, resolver_in},
    harness::{free_port, in_cgroup, privileged_with, Agent, CgroupTree, FakeApiServer},
    k8s::{eventually, kube_agent_in, pod, pod_in_netns, uid, NODE},
    k8s_pods::{plug, POD_IP},
    pods::{Net, ALLOW4, DENY4, POD4, PORT},
};

/// A resolver on the outside namespace's loopback, for the standalone pod.
const RESOLVER: &str = "192.0.2.53";
/// Cluster DNS at a Service-IP-style address (CoreDNS's usual 10.96.0.10), in the outside
/// namespace: queries reach it from the node through the uplink.
const CLUSTER_DNS: &str = "10.96.0.10";

/// Resolver and name rule Egress documents for the standalone pod `web`.
fn egresses() -> String {
    format!(
        "kind: Egress
metadata: {{name: resolver}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{RESOLVER}/32, 127.0.0.1/32]
  ports: [{{number: 53, protocol: udp}}, {{number: 53}}]
---
kind: Egress
metadata: {{name: db-by-name}}
spec:
  sources: [{{name: web}}]
  hosts: [db.test.example]
  ports: [{{number: {PORT}}}]
"
    )
}

#[test]
fn dns_a_pod_resolves_through_the_agent_inside_its_own_namespace() {
    if !privileged_with(&["ip", "nsenter", "dnsmasq", "dig"]) {
        return;
    }
    let net = Net::new();
    net.outside_addr(RESOLVER);
    let _dns = resolver_in(
        Some(&net.out_path()),
        RESOLVER,
        60,
        &[host_record("db.test.example", ALLOW4)],
    );
    let db = net.server(ALLOW4);
    let other = net.server(DENY4);
    let dns = format!("  dns: {{enabled: true, port: {}}}\n", free_port());
    let policy = net.pod_head(false, &dns) + &egresses();
    let a = Agent::start_in(&policy, Some(&net.node_path()));
    a.wait_log("DNS steered to the agent inside the pod");
    let p = PORT.to_string();

    // Before any answer, the name's address is refused like any other.
    let out = a.client("web", &["tcp", ALLOW4, &p]);
    assert!(out.starts_with("err EPERM"), "{out}");
    assert_eq!(
        dig(&a, RESOLVER, "db.test.example", &[]),
        (0, ALLOW4.into())
    );
    // Direct (the server sees the pod's own address): the socket hook and the veth's tc
    // backstop both know the learned address.
    let out = a.client("web", &["tcp", ALLOW4, &p, "by-name"]);
    assert!(out.starts_with("ok "), "{out}\n{}", a.log());
    assert_eq!(db.peer(0).ip().to_string(), POD4, "no proxy on the path");
    let out = a.client("web", &["tcp", DENY4, &p]);
    assert!(out.starts_with("err EPERM"), "{out}");
    assert_eq!(other.accepted(), 0);
    // DNS over TCP from the pod too.
    assert_eq!(dig(&a, RESOLVER, "db.test.example", &["+tcp"]).1, ALLOW4);
    let shown = a.cli_ok(&["dns"]);
    assert!(
        shown.contains("db.test.example") && shown.contains(ALLOW4),
        "{shown}"
    );
    // A resolver on the pod's own loopback (a sidecar cache): the agent asks it from inside
    // the pod's namespace, not the node's loopback (where nothing answers), over UDP and TCP.
    let _sidecar = resolver_in(
        Some(&net.pod_path()),
        "127.0.0.1",
        60,
        &[host_record("local.test.example", ALLOW4)],
    );
    assert_eq!(
        dig(&a, "127.0.0.1", "local.test.example", &[]),
        (0, ALLOW4.into())
    );
    assert_eq!(
        dig(&a, "127.0.0.1", "local.test.example", &["+tcp"]),
        (0, ALLOW4.into())
    );
    assert_eq!(
        crate::pods::drops(&a),
        0,
        "the tc backstop dropped a packet of an allowed connection"
    );
}

/// dig inside a Kubernetes pod (its container cgroup `app`, its namespace).
fn dig_in_pod(app: &Path, netns: &Path, name: &str) -> String {
    let at = format!("@{CLUSTER_DNS}");
    let out = in_cgroup(app, "nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["dig", &at, name, "+short", "+time=2", "+tries=1"])
        .output()
        .expect("dig in the pod");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn kubernetes_pod_cluster_dns_feeds_name_rules_with_a_fake_api_server() {
    if !privileged_with(&["ip", "nsenter", "dnsmasq", "dig"]) {
        return;
    }
    let net = Net::new();
    net.outside_addr(CLUSTER_DNS);
    let _dns = resolver_in(
        Some(&net.out_path()),
        CLUSTER_DNS,
        60,
        &[host_record("db.shop.svc.cluster.local", ALLOW4)],
    );
    let db = net.server(ALLOW4);
    let _other = net.server(DENY4);
    let kubepods = "kubepods.slice";
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start_in(&net.node_path());
    let u = uid(0x72);
    let (app, pod_ns) = pod_in_netns(&tree, kubepods, &u, "dns");
    let host_if = format!("eg{}d", std::process::id());
    plug(&net, &pod_ns, &host_if);
    fake.put("pods", pod("web-1", &u, "web", "Burstable", NODE));
    fake.put(
        "egresses",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
               "metadata": {"name": "db-by-name", "namespace": "shop"},
               "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                        "hosts": ["db.shop.svc.cluster.local"], "ports": [{"number": PORT}]}}),
    );
    // Cluster DNS is in the mesh (the service CIDR): allowed, and steered to the agent.
    let (agent, kubeconfig) = kube_agent_in(
        &fake,
        tree.path.join(kubepods),
        Some(&net.node_path()),
        json!({"traffic": {"enableEgress": false, "meshCIDRs": ["10.96.0.0/12"]},
               "dns": {"enabled": true, "port": free_port()}}),
    );
    eventually("the DNS proxy inside the pod", &agent, || {
        agent
            .log()
            .contains("DNS steered to the agent inside the pod")
    });
    eventually("the tc backstop on the pod's veth", &agent, || {
        agent
            .log()
            .contains(&format!("egress_tc_from_workload on {host_if}"))
    });
    let p = PORT.to_string();
    let out = pod_ns.client(&app, &["tcp", ALLOW4, &p]);
    assert!(out.starts_with("err EPERM"), "before DNS: {out}");
    assert_eq!(
        dig_in_pod(&app, &pod_ns.netns.path(), "db.shop.svc.cluster.local"),
        ALLOW4,
        "{}",
        agent.log()
    );
    let out = pod_ns.client(&app, &["tcp", ALLOW4, &p, "x"]);
    assert!(out.starts_with("ok "), "{out}\n{}", agent.log());
    assert_eq!(db.peer(0).ip().to_string(), POD_IP, "no proxy on the path");
    let out = pod_ns.client(&app, &["tcp", DENY4, &p]);
    assert!(out.starts_with("err EPERM"), "{out}");
    let shown = agent.cli_ok(&["dns"]);
    assert!(shown.contains("db.shop.svc.cluster.local"), "{shown}");
    drop(agent);
    drop(pod_ns);
    let _ = std::fs::remove_file(kubeconfig);
}
