//! The kernel's series as the agent served them before label sets were typed: names, HELP
//! texts, labels (names, values, order) and values, exactly.

use std::{collections::HashMap, sync::Arc};

use egress_common::{proto, tc, Outcome, EVENT_LOST};
use prometheus_client::registry::Registry;

use super::{
    kernel::{HostDenials, KernelSnapshot, KernelSource},
    metrics::Metrics,
};

const POLICY: &str = "kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}}\n---\nkind: Workload\nmetadata: {name: web, namespace: shop}\n---\nkind: Workload\nmetadata: {name: db, namespace: shop}\n---\nkind: Egress\nmetadata: {name: api, namespace: shop}\nspec: {sources: [{name: web}], ipAddresses: [127.51.0.1/32], ports: [{number: 8080}]}\n";

/// Two workloads: web (counted in the kernel) and db (a pod, counted by the tc backstop).
struct Fake;

impl KernelSource for Fake {
    fn snapshot(&self) -> KernelSnapshot {
        let cfg = crate::policy::parse(POLICY, "test").unwrap();
        let policy = crate::policy::compile(&cfg).unwrap();
        let id = |name: &str| {
            let w = policy.workloads.iter().find(|(w, _)| w.name == name);
            w.unwrap().clone()
        };
        let (web, db) = (id("web").1, id("db"));
        let mut sums = HashMap::new();
        sums.insert((web, Outcome::Allow as u8, proto::TCP), 5);
        sums.insert((web, Outcome::DenyDefault as u8, proto::UDP), 2);
        sums.insert((web, Outcome::DenyError as u8, proto::TCP), 1);
        sums.insert((web, Outcome::Proxy as u8, proto::TCP), 3);
        sums.insert((db.1, EVENT_LOST, proto::ANY), 4);
        let mut tcs = HashMap::new();
        tcs.insert((db.1, tc::TC_PROXY_BYPASS), (2, 120));
        tcs.insert((db.1, tc::TC_INBOUND), (7, 700));
        KernelSnapshot {
            policy: Arc::new(policy),
            pods: vec![db.0],
            sums,
            tc: tcs,
            sockets: HashMap::from([((web, egress_common::sockets::kind::OTHER), 5)]),
            packet_drops: HashMap::from([((web, egress_common::skb::DROP_SOURCE_ROUTE), 5)]),
            entries: vec![
                ("EGRESS_WORKLOADS", 2, 4096),
                ("EGRESS_POLICY_V4", 1, 65536),
            ],
            generation: 3,
            unenrolled: None,
        }
    }
}

#[test]
fn kernel_series_are_unchanged() {
    let denials = HostDenials::default();
    let m = Metrics::agent(Registry::default(), Arc::new(Fake), denials.clone());
    denials.add("shop/web");
    denials.add("shop/web");
    m.set_ready();
    let want = r#"# HELP egress_connections_total Connections judged in the kernel, by workload, verdict and protocol
# TYPE egress_connections_total counter
egress_connections_total{workload="db",namespace="shop",verdict="allow",protocol="tcp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="allow",protocol="udp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="allow",protocol="other"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-rule",protocol="tcp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-rule",protocol="udp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-rule",protocol="other"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-default",protocol="tcp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-default",protocol="udp"} 0
egress_connections_total{workload="db",namespace="shop",verdict="deny-default",protocol="other"} 0
egress_connections_total{workload="web",namespace="shop",verdict="allow",protocol="tcp"} 5
egress_connections_total{workload="web",namespace="shop",verdict="allow",protocol="udp"} 0
egress_connections_total{workload="web",namespace="shop",verdict="allow",protocol="other"} 0
egress_connections_total{workload="web",namespace="shop",verdict="proxy",protocol="tcp"} 3
egress_connections_total{workload="web",namespace="shop",verdict="deny-rule",protocol="tcp"} 0
egress_connections_total{workload="web",namespace="shop",verdict="deny-rule",protocol="udp"} 0
egress_connections_total{workload="web",namespace="shop",verdict="deny-rule",protocol="other"} 0
egress_connections_total{workload="web",namespace="shop",verdict="deny-default",protocol="tcp"} 0
egress_connections_total{workload="web",namespace="shop",verdict="deny-default",protocol="udp"} 2
egress_connections_total{workload="web",namespace="shop",verdict="deny-default",protocol="other"} 0
egress_connections_total{workload="web",namespace="shop",verdict="deny-error",protocol="tcp"} 1
# HELP egress_denied_total Connections refused, by workload and reason (rule, default, proxy-port, error in the kernel; host in the proxy; unenrolled: a pod not enrolled yet, Kubernetes mode, no workload label)
# TYPE egress_denied_total counter
egress_denied_total{workload="db",namespace="shop",reason="rule",protocol="tcp"} 0
egress_denied_total{workload="db",namespace="shop",reason="rule",protocol="udp"} 0
egress_denied_total{workload="db",namespace="shop",reason="rule",protocol="other"} 0
egress_denied_total{workload="db",namespace="shop",reason="default",protocol="tcp"} 0
egress_denied_total{workload="db",namespace="shop",reason="default",protocol="udp"} 0
egress_denied_total{workload="db",namespace="shop",reason="default",protocol="other"} 0
egress_denied_total{workload="web",namespace="shop",reason="rule",protocol="tcp"} 0
egress_denied_total{workload="web",namespace="shop",reason="rule",protocol="udp"} 0
egress_denied_total{workload="web",namespace="shop",reason="rule",protocol="other"} 0
egress_denied_total{workload="web",namespace="shop",reason="default",protocol="tcp"} 0
egress_denied_total{workload="web",namespace="shop",reason="default",protocol="udp"} 2
egress_denied_total{workload="web",namespace="shop",reason="default",protocol="other"} 0
egress_denied_total{workload="web",namespace="shop",reason="error",protocol="tcp"} 1
egress_denied_total{workload="web",namespace="shop",reason="host",protocol="tcp"} 2
# HELP egress_tc_dropped_packets_total Packets the tc backstop dropped on a workload's interface (they skipped the socket hooks), by reason
# TYPE egress_tc_dropped_packets_total counter
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="deny-rule"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="deny-default"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="deny-error"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="proxy-bypass"} 2
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="source-route"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="too-many-headers"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="malformed"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="spoofed-source"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="orphan-fragment"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="non-ip"} 0
egress_tc_dropped_packets_total{workload="db",namespace="shop",reason="packet-socket"} 0
# HELP egress_packet_dropped_total Packets of workloads' sockets the per-packet program dropped (source routes, connections the policy in force refuses), by reason
# TYPE egress_packet_dropped_total counter
egress_packet_dropped_total{workload="db",namespace="shop",reason="deny-rule"} 0
egress_packet_dropped_total{workload="db",namespace="shop",reason="deny-default"} 0
egress_packet_dropped_total{workload="web",namespace="shop",reason="deny-rule"} 0
egress_packet_dropped_total{workload="web",namespace="shop",reason="deny-default"} 0
egress_packet_dropped_total{workload="web",namespace="shop",reason="source-route"} 5
# HELP egress_tc_packets_total Packets through the tc backstop on a workload's interface, by verdict (inbound: into the workload)
# TYPE egress_tc_packets_total counter
egress_tc_packets_total{workload="db",namespace="shop",verdict="proxy-bypass"} 2
egress_tc_packets_total{workload="db",namespace="shop",verdict="inbound"} 7
# HELP egress_tc_bytes_total Bytes through the tc backstop on a workload's interface, by verdict (inbound: into the workload)
# TYPE egress_tc_bytes_total counter
egress_tc_bytes_total{workload="db",namespace="shop",verdict="proxy-bypass"} 120
egress_tc_bytes_total{workload="db",namespace="shop",verdict="inbound"} 700
# HELP egress_sockets_refused_total socket() calls refused in the kernel because spec.sockets does not allow their kind (raw, packet, icmp, other)
# TYPE egress_sockets_refused_total counter
egress_sockets_refused_total{workload="db",namespace="shop",kind="raw"} 0
egress_sockets_refused_total{workload="db",namespace="shop",kind="packet"} 0
egress_sockets_refused_total{workload="db",namespace="shop",kind="icmp"} 0
egress_sockets_refused_total{workload="db",namespace="shop",kind="other"} 0
egress_sockets_refused_total{workload="web",namespace="shop",kind="raw"} 0
egress_sockets_refused_total{workload="web",namespace="shop",kind="packet"} 0
egress_sockets_refused_total{workload="web",namespace="shop",kind="icmp"} 0
egress_sockets_refused_total{workload="web",namespace="shop",kind="other"} 5
# HELP egress_flow_events_lost_total Verdict events the kernel could not hand to the agent (the counters still count their connections)
# TYPE egress_flow_events_lost_total counter
egress_flow_events_lost_total 4
# HELP egress_policy_generation Generation of the policy in force
# TYPE egress_policy_generation gauge
egress_policy_generation 3
# HELP egress_policy_rules Egress objects in the policy in force
# TYPE egress_policy_rules gauge
egress_policy_rules 1
# HELP egress_workloads Workloads in the policy in force
# TYPE egress_workloads gauge
egress_workloads 2
# HELP egress_map_entries Entries in each BPF map (both policy sets while a change is applied)
# TYPE egress_map_entries gauge
egress_map_entries{map="EGRESS_WORKLOADS"} 2
egress_map_entries{map="EGRESS_POLICY_V4"} 1
# HELP egress_map_capacity Capacity of each BPF map
# TYPE egress_map_capacity gauge
egress_map_capacity{map="EGRESS_WORKLOADS"} 4096
egress_map_capacity{map="EGRESS_POLICY_V4"} 65536
# HELP egress_ready 1 once the programs are attached and the first policy is applied
# TYPE egress_ready gauge
egress_ready 1
# HELP egress_build_info Build of the agent
# TYPE egress_build_info gauge
egress_build_info{version="0.1.0",layout="LAYOUT"} 1
"#;
    let want = want.replace("LAYOUT", &egress_common::LAYOUT_VERSION.to_string());
    assert_eq!(m.render(), want);
}

/// Kubernetes mode: the refusals of pods not enrolled yet (workload id 0) have their series.
struct Unenrolled;

impl KernelSource for Unenrolled {
    fn snapshot(&self) -> KernelSnapshot {
        KernelSnapshot {
            unenrolled: Some([3, 0, 1]),
            ..Fake.snapshot()
        }
    }
}

#[test]
fn refusals_of_unenrolled_pods_are_reported() {
    let m = Metrics::agent(
        Registry::default(),
        Arc::new(Unenrolled),
        HostDenials::default(),
    );
    let out = m.render();
    for line in [
        "egress_denied_total{workload=\"\",namespace=\"\",reason=\"unenrolled\",protocol=\"tcp\"} 3\n",
        "egress_denied_total{workload=\"\",namespace=\"\",reason=\"unenrolled\",protocol=\"udp\"} 0\n",
        "egress_denied_total{workload=\"\",namespace=\"\",reason=\"unenrolled\",protocol=\"other\"} 1\n",
    ] {
        assert!(out.contains(line), "no {line} in\n{out}");
    }
}
