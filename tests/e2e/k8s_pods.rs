//! Kubernetes mode with a pod networked the way a CNI does it: the pod's own namespace, a veth
//! whose node-side end stays in the node's namespace (proxy ARP and a /32 route, Calico
//! style), the agent in that node namespace against `FakeApiServer` (a FAKE API server in this
//! test process). The agent finds the node-side end from inside the pod's namespace and puts
//! the tc backstop there: Ethernet frames the pod writes itself (a packet socket, which no
//! cgroup program sees) to a denied host never reach the "outside" namespace.

use std::path::Path;

use serde_json::json;

use crate::{
    harness::{in_cgroup, in_netns, ip, privileged_with, CgroupTree, FakeApiServer},
    k8s::{eventually, kube_agent_in, pod, pod_in_netns, uid, PodNetns, NODE},
    pods::{metric, Net, ALLOW4, DENY4, PORT},
    tc_prog::{ipv4, tcp, SYN, TCP},
};

pub(crate) const POD_IP: &str = "10.200.0.9";

/// How long each sniffer counts: long enough for a frame sent by a freshly started process
/// on a loaded machine (at 1.5 s the allowed control frame was missed under load).
const SNIFF_SECS: f32 = 4.0;

fn v4(a: &str) -> [u8; 4] {
    a.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// The CNI's part: a veth between the pod's namespace (`eth0`, `POD_IP`/32, a default route
/// through a link-local next hop) and the node's (`host_if`, proxy ARP, a /32 route back).
pub(crate) fn plug(net: &Net, pod: &PodNetns, host_if: &str) {
    let node = net.node_path();
    let node_name = node.file_name().unwrap().to_string_lossy().into_owned();
    ip(&[
        "link",
        "add",
        host_if,
        "netns",
        &node_name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod.netns.name,
    ]);
    pod.netns.ip_batch(&[
        "link set lo up".into(),
        "link set eth0 up".into(),
        format!("addr add {POD_IP}/32 dev eth0"),
        "route add 169.254.1.1 dev eth0".into(),
        "route add default via 169.254.1.1 dev eth0".into(),
    ]);
    ip(&["-n", &node_name, "link", "set", host_if, "up"]);
    ip(&[
        "-n",
        &node_name,
        "route",
        "add",
        &format!("{POD_IP}/32"),
        "dev",
        host_if,
    ]);
    let f = format!("/proc/sys/net/ipv4/conf/{host_if}/proxy_arp");
    in_netns(&node, move || std::fs::write(f, "1").expect("proxy_arp"));
}

/// Writes `frame` (an Ethernet frame from `tc_prog`'s builders) on the pod's eth0 to
/// `to_mac`, from a process of the pod's container cgroup `dir`.
fn send_frame(pod: &PodNetns, dir: &Path, to_mac: &str, frame: &[u8]) {
    let hex: String = frame[14..].iter().map(|b| format!("{b:02x}")).collect();
    let ethertype = format!("{:02x}{:02x}", frame[12], frame[13]);
    let out = in_cgroup(dir, "nsenter")
        .arg(format!("--net={}", pod.netns.path().display()))
        .args([
            "python3",
            crate::harness::PACKETS_PY,
            "frame",
            "eth0",
            to_mac,
            &ethertype,
            &hex,
        ])
        .output()
        .expect("packets.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_pod_veth_gets_the_tc_backstop() {
    if !privileged_with(&["ip", "nsenter", "python3"]) {
        return;
    }
    let net = Net::new();
    let kubepods = "kubepods.slice";
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start_in(&net.node_path());
    let u = uid(0x71);
    let (app, pod_ns) = pod_in_netns(&tree, kubepods, &u, "tc");
    let host_if = format!("eg{}k", std::process::id());
    plug(&net, &pod_ns, &host_if);
    fake.put("pods", pod("web-1", &u, "web", "Burstable", NODE));
    fake.put(
        "egresses",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
               "metadata": {"name": "web-out", "namespace": "shop"},
               "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                        "ipAddresses": [format!("{ALLOW4}/32")], "ports": [{"number": PORT}]}}),
    );
    // Packet sockets allowed: the frames go past the cgroup programs, straight to the veth.
    let (agent, kubeconfig) = kube_agent_in(
        &fake,
        tree.path.join(kubepods),
        Some(&net.node_path()),
        json!({"sockets": {"raw": "allow", "packet": "allow"}}),
    );
    eventually("the tc backstop on the pod's veth", &agent, || {
        agent
            .log()
            .contains(&format!("egress_tc_from_workload on {host_if}"))
    });
    let _allowed = net.server(ALLOW4);
    let _denied = net.server(DENY4);

    // The pod's own connections: allowed through the veth, refused at connect().
    let out = pod_ns.client(&app, &["tcp", ALLOW4, &PORT.to_string(), "x"]);
    assert!(out.starts_with("ok "), "{out}\n{}", agent.log());
    let out = pod_ns.client(&app, &["tcp", DENY4, &PORT.to_string()]);
    assert!(out.starts_with("err EPERM"), "{out}");

    let to = crate::harness::mac_of(&net.node_path(), &host_if);
    let syn = |dst: &str, src: &str| ipv4(v4(src), v4(dst), TCP, 0, &[], &tcp(40000, PORT, SYN));
    let dropped = |reason: &str| {
        metric(
            &agent,
            "egress_tc_dropped_packets_total{",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    // The control: a frame to the allowed host gets out.
    let seen = net.sniff(ALLOW4, SNIFF_SECS);
    send_frame(&pod_ns, &app, &to, &syn(ALLOW4, POD_IP));
    assert_eq!(
        seen.count(),
        1,
        "the allowed SYN frame did not get out\n{}",
        agent.http_get("/metrics").1
    );
    // To the denied host: dropped on the node side of the veth, counted.
    let seen = net.sniff(DENY4, SNIFF_SECS);
    send_frame(&pod_ns, &app, &to, &syn(DENY4, POD_IP));
    send_frame(&pod_ns, &app, &to, &syn(DENY4, POD_IP));
    assert_eq!(seen.count(), 0, "a SYN frame to the denied host got out");
    assert_eq!(
        dropped("deny-default"),
        2,
        "{}",
        agent.http_get("/metrics").1
    );
    // A source that is not the pod's (its address was read from its namespace).
    let seen = net.sniff(ALLOW4, SNIFF_SECS);
    send_frame(&pod_ns, &app, &to, &syn(ALLOW4, "10.200.0.99"));
    assert_eq!(seen.count(), 0, "a spoofed SYN frame got out");
    assert_eq!(dropped("spoofed-source"), 1);

    drop(agent);
    drop(pod_ns);
    let _ = std::fs::remove_file(kubeconfig);
}
