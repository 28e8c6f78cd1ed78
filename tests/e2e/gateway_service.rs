//! An FSM EgressGateway naming a Service, in Kubernetes mode against `FakeApiServer` (a FAKE
//! API server in this test process): the FSM object goes through `egress-agent convert` as
//! an operator's would, the Service's EndpointSlice names a real gateway (`egress-agent
//! gateway` on a loopback address), and a pod's connection leaves through it. The slice then
//! names a second gateway: new connections go through that one (its own counters and the
//! destination's peer address say so, not the agent). With no ready endpoint, connections
//! are refused and counted, and nothing reaches the destination directly.

use std::{path::Path, process::Command};

use egress_agent::k8s::cgroups::{Driver, Qos};
use serde_json::{json, Value};

use crate::{
    gateway::{sample, Gateway},
    harness::{
        client_in_cgroup, privileged, temp_dir, wait_until, CgroupTree, FakeApiServer, TcpServer,
        AGENT,
    },
    k8s::{eventually, kube_agent, make_pod, pod, uid, NODE},
};

const FSM_GATEWAY: &str = "apiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: global-egress-gateway, namespace: fsm}\nspec:\n  global:\n    - {service: fsm-egress-gateway, namespace: fsm}\n";

/// `egress-agent convert -f FILE` of `text`: the documents it prints, as JSON.
fn convert(text: &str) -> Vec<Value> {
    let file = temp_dir("convert").join("fsm.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(AGENT)
        .args(["convert", "-f"])
        .arg(&file)
        .output()
        .expect("egress-agent convert");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "convert: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    egress_agent::policy::documents(&stdout, "convert output")
        .unwrap()
        .into_iter()
        .map(|d| d.body)
        .collect()
}

/// The Service's one EndpointSlice: `endpoint` (IP:PORT), ready or not.
fn slice(endpoint: &str, ready: bool) -> Value {
    let (ip, port) = endpoint.rsplit_once(':').unwrap();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "fsm-egress-gateway-x7k2p", "namespace": "fsm",
                        "labels": {"kubernetes.io/service-name": "fsm-egress-gateway"}},
           "addressType": "IPv4",
           "ports": [{"name": "egress-nat-port", "port": port.parse::<u16>().unwrap(), "protocol": "TCP"}],
           "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}]})
}

/// The pod's connection to `dst` with `msg`: whether it got through, and the client's line.
fn connect(dir: &Path, dst: &TcpServer, msg: &str) -> (bool, String) {
    let out = client_in_cgroup(dir, &["tcp", &dst.ip(), &dst.port(), msg]);
    (out.ends_with(&format!("|{msg}")), out)
}

/// Tunnels a gateway let out over HTTP/2 (FSM's default mode).
fn tunnels(gw: &Gateway) -> u64 {
    sample(
        &gw.metrics(),
        "egress_gateway_connections_total{protocol=\"http2tunnel\",result=\"allowed\"}",
    )
}

#[test]
fn fsm_gateway_by_service_follows_its_endpoints_and_fails_closed_without_any() {
    if !privileged() {
        return;
    }
    let kubepods = "kubepods.slice";
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start();
    let dst = TcpServer::start("127.50.20.1");
    let allow = "[{ipAddresses: [127.50.20.0/24]}]";
    let (gw1, gw2) = (
        Gateway::start("127.0.8.21", allow),
        Gateway::start("127.0.8.22", allow),
    );
    let u = uid(0x91);
    let web = make_pod(
        &tree,
        kubepods,
        Driver::Systemd,
        Qos::Burstable,
        &u,
        &format!("containerd://{}", "c4".repeat(32)),
    );
    fake.put("pods", pod("web-1", &u, "web", "Burstable", NODE));
    // The operator converts FSM's object and applies the result.
    let converted = convert(FSM_GATEWAY);
    assert_eq!(
        converted[0]["spec"]["global"][0],
        json!({"service": {"name": "fsm-egress-gateway", "namespace": "fsm"}, "mode": "http2tunnel"})
    );
    fake.put("egressgateways", converted[0].clone());
    fake.put(
        "egresses",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
               "metadata": {"name": "out", "namespace": "shop"},
               "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                        "ipAddresses": ["127.50.20.0/24"], "via": "gateway"}}),
    );
    fake.put("endpointslices", slice(&gw1.http, true));
    let (agent, kubeconfig) = kube_agent(&fake, tree.path.join(kubepods));

    // Through the Service's endpoint: the destination sees the first gateway.
    let (ok, out) = connect(&web, &dst, "one");
    assert!(ok, "{out}\n{}", agent.log());
    assert_eq!(dst.peer(0).ip().to_string(), "127.0.8.21");
    assert_eq!((tunnels(&gw1), tunnels(&gw2)), (1, 0));

    // The endpoint moves to the second gateway: new connections follow it.
    fake.put("endpointslices", slice(&gw2.http, true));
    let moved = wait_until(std::time::Duration::from_secs(10), || {
        let (ok, _) = connect(&web, &dst, "poll");
        ok && dst.peer(dst.accepted() - 1).ip().to_string() == "127.0.8.22"
    });
    assert!(moved, "never through the second gateway\n{}", agent.log());
    let (before1, before2, seen) = (tunnels(&gw1), tunnels(&gw2), dst.accepted());
    for i in 0..3 {
        let (ok, out) = connect(&web, &dst, &format!("two{i}"));
        assert!(ok, "{out}");
        assert_eq!(dst.peer(seen + i).ip().to_string(), "127.0.8.22");
    }
    assert_eq!(
        tunnels(&gw1),
        before1,
        "the old endpoint gets no new connection"
    );
    assert_eq!(tunnels(&gw2), before2 + 3, "{}", gw2.log());

    // No ready endpoint: refused, counted, never sent direct.
    fake.put("endpointslices", slice(&gw2.http, false));
    eventually("a connection is refused", &agent, || {
        !connect(&web, &dst, "poll").0
    });
    let errors = |a: &crate::harness::Agent| {
        sample(
            &a.http_get("/metrics").1,
            "egress_proxy_gateway_connections_total{gateway=\"global-egress-gateway\",result=\"error\"}",
        )
    };
    let (failed, seen, via2) = (errors(&agent), dst.accepted(), tunnels(&gw2));
    for _ in 0..2 {
        let (ok, out) = connect(&web, &dst, "three");
        assert!(!ok, "must not get through: {out}");
    }
    assert_eq!(errors(&agent), failed + 2, "each refusal counted");
    assert_eq!(dst.accepted(), seen, "nothing reached the destination");
    assert_eq!(tunnels(&gw2), via2);
    let log = agent.wait_log("has no ready endpoints");
    assert!(
        log.contains("EgressGateway global-egress-gateway")
            && log.contains("Service fsm/fsm-egress-gateway has no ready endpoints"),
        "{log}"
    );

    drop(agent);
    let _ = std::fs::remove_file(kubeconfig);
}
