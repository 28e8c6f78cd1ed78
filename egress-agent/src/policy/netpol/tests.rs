use std::net::IpAddr;

use egress_common::{proto, Outcome};

use crate::policy::{compile, parse, ObjectRef};

const WORKLOADS: &str = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: true, meshCIDRs: [10.96.0.0/12]}}\n---\nkind: Workload\nmetadata: {name: db, labels: {role: db}}\n---\nkind: Workload\nmetadata: {name: web, labels: {role: web}}\n---\nkind: Workload\nmetadata: {name: other, namespace: prod, labels: {role: db}}\n";

/// The example of the Kubernetes documentation (its ingress part is the CNI's), and one with
/// a port range.
const DOCS: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
    - namespaceSelector: {matchLabels: {project: myproject}}
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: multi-port-egress}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.128/25]}}]
    ports: [{protocol: TCP, port: 32000, endPort: 32768}, {protocol: UDP, port: 53}]
"#;

fn decide(text: &str, w: &str, ip: &str, port: u16, p: u8) -> (Outcome, String) {
    let cfg = parse(text, "t.yaml").unwrap();
    let c = compile(&cfg).unwrap();
    let id: ObjectRef = w.parse().unwrap();
    let wid = c.workload_id(&id).unwrap();
    let d = c.decide(wid, ip.parse::<IpAddr>().unwrap(), port, p);
    (
        d.outcome,
        c.rule(d.rule_id).map(|r| r.name()).unwrap_or_default(),
    )
}

#[test]
fn the_documentation_examples_isolate_the_selected_workloads_only() {
    let text = format!("{WORKLOADS}{DOCS}");
    let np = "NetworkPolicy default/test-network-policy";
    let cases: &[(&str, &str, u16, u8, Outcome)] = &[
        ("db", "10.0.0.5", 5978, proto::TCP, Outcome::Pass),
        ("db", "10.0.0.5", 5979, proto::TCP, Outcome::DenyRule),
        ("db", "10.0.0.5", 5978, proto::UDP, Outcome::DenyRule),
        ("db", "10.0.1.5", 5978, proto::TCP, Outcome::DenyRule),
        // The range of the second policy, its exception, UDP 53.
        ("db", "10.0.0.5", 32000, proto::TCP, Outcome::Pass),
        ("db", "10.0.0.5", 32768, proto::TCP, Outcome::Pass),
        ("db", "10.0.0.5", 32769, proto::TCP, Outcome::DenyRule),
        ("db", "10.0.0.200", 32000, proto::TCP, Outcome::DenyRule),
        ("db", "10.0.0.200", 5978, proto::TCP, Outcome::Pass),
        ("db", "10.0.0.5", 53, proto::UDP, Outcome::Pass),
        ("db", "10.0.0.5", 53, proto::TCP, Outcome::DenyRule),
        ("db", "10.0.0.5", 53, proto::SCTP, Outcome::DenyRule),
        ("db", "8.8.8.8", 443, proto::TCP, Outcome::DenyRule),
        ("db", "2001:db8::1", 443, proto::TCP, Outcome::DenyRule),
        // The mesh is the CNI's.
        ("db", "10.96.0.10", 53, proto::UDP, Outcome::Mesh),
        // Not selected: untouched.
        ("web", "8.8.8.8", 443, proto::TCP, Outcome::Pass),
        ("prod/other", "8.8.8.8", 443, proto::TCP, Outcome::Pass),
    ];
    for &(w, ip, port, p, want) in cases {
        let (got, rule) = decide(&text, w, ip, port, p);
        assert_eq!(got, want, "{w} -> {ip}:{port}/{p}");
        if want == Outcome::DenyRule {
            assert_eq!(rule, np, "{w} -> {ip}:{port}/{p}");
        }
    }
}

#[test]
fn both_must_allow() {
    let deny_all = "---\nkind: NetworkPolicy\nmetadata: {name: default-deny-egress}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";
    let allow_all = "---\nkind: NetworkPolicy\nmetadata: {name: allow-all-egress}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}\n";
    let egress_deny = "---\nkind: Egress\nmetadata: {name: no-dns}\nspec: {sources: [{name: web}], ipAddresses: [1.1.1.1/32], action: deny}\n";
    let closed = WORKLOADS.replace("enableEgress: true", "enableEgress: false");
    let egress_allow = "---\nkind: Egress\nmetadata: {name: web-out}\nspec: {sources: [{name: web}], ipAddresses: [1.1.1.0/24]}\n";
    let ingress_only = "---\nkind: NetworkPolicy\nmetadata: {name: in}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    // Pod peers are in-cluster: nothing outside the mesh.
    let pods = "---\nkind: NetworkPolicy\nmetadata: {name: to-pods}\nspec: {podSelector: {matchExpressions: [{key: role, operator: In, values: [web]}]}, egress: [{to: [{podSelector: {}}]}]}\n";
    use Outcome::*;
    let cases: &[(String, &str, &str, u16, u8, Outcome)] = &[
        // Deny everything: even an Egress allow does not open it.
        (
            format!("{closed}{deny_all}{egress_allow}"),
            "web",
            "1.1.1.1",
            443,
            proto::TCP,
            DenyRule,
        ),
        (
            format!("{closed}{deny_all}{egress_allow}"),
            "web",
            "1.1.1.1",
            0,
            proto::ICMP,
            DenyRule,
        ),
        // Allow everything: the Egress objects and enableEgress decide.
        (
            format!("{closed}{allow_all}{egress_allow}"),
            "web",
            "1.1.1.1",
            443,
            proto::TCP,
            Allow,
        ),
        (
            format!("{closed}{allow_all}{egress_allow}"),
            "web",
            "1.2.1.1",
            443,
            proto::TCP,
            DenyDefault,
        ),
        (
            format!("{WORKLOADS}{allow_all}{egress_deny}"),
            "web",
            "1.1.1.1",
            53,
            proto::UDP,
            DenyRule,
        ),
        (
            format!("{WORKLOADS}{allow_all}{egress_deny}"),
            "web",
            "1.1.1.2",
            53,
            proto::UDP,
            Pass,
        ),
        // A policy without Egress among its types isolates nothing.
        (
            format!("{WORKLOADS}{ingress_only}"),
            "web",
            "1.1.1.1",
            443,
            proto::TCP,
            Pass,
        ),
        (
            format!("{WORKLOADS}{pods}"),
            "web",
            "1.1.1.1",
            443,
            proto::TCP,
            DenyRule,
        ),
        (
            format!("{WORKLOADS}{pods}"),
            "db",
            "1.1.1.1",
            443,
            proto::TCP,
            Pass,
        ),
    ];
    for (t, w, ip, port, p, want) in cases {
        assert_eq!(
            decide(t, w, ip, *port, *p).0,
            *want,
            "{w} -> {ip}:{port}/{p}\n{t}"
        );
    }
}

#[test]
fn unsupported_fields_are_refused_by_name() {
    let cases = [
        ("egress: [{ports: [{port: http}]}]", "spec.egress[0].ports[0].port: named port \"http\""),
        ("egress: [{ports: [{port: 80, endPort: 79}]}]", "spec.egress[0].ports[0].endPort: endPort 79 is below port 80"),
        ("egress: [{ports: [{endPort: 79}]}]", "spec.egress[0].ports[0].endPort: endPort needs port"),
        ("egress: [{ports: [{protocol: ICMP}]}]", "spec.egress[0].ports[0].protocol: \"ICMP\" is not TCP, UDP or SCTP"),
        ("egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/25]}}]}]", "spec.egress[0].to[0].ipBlock.except[0]: 10.1.0.0/25 is not a strict subnet of 10.0.0.0/24"),
        ("egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}]}]", "spec.egress[0].to[0].ipBlock: ipBlock cannot be combined"),
        ("egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}], toFQDN: [x]}]", "spec.egress[0].toFQDN: unknown field `toFQDN`"),
        ("policyTypes: [Outbound]", "spec.policyTypes[0]: \"Outbound\" is not Ingress or Egress"),
        ("egress: [{to: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]}]", "spec.egress[0].to[0].podSelector.matchExpressions[0].values: In needs at least one value"),
    ];
    for (spec, want) in cases {
        let t = format!("{WORKLOADS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad}}\nspec: {{podSelector: {{}}, {spec}}}\n");
        let e = parse(&t, "t.yaml").unwrap_err().to_string();
        let want = format!("t.yaml: NetworkPolicy default/bad: {want}");
        assert!(e.starts_with(&want), "{spec}:\n got {e}\nwant {want}");
    }
    let t = format!("{WORKLOADS}---\napiVersion: networking.k8s.io/v2\nkind: NetworkPolicy\nmetadata: {{name: bad}}\nspec: {{podSelector: {{}}}}\n");
    let e = parse(&t, "t.yaml").unwrap_err().to_string();
    assert_eq!(e, "t.yaml: NetworkPolicy default/bad: apiVersion: \"networking.k8s.io/v2\" is not \"networking.k8s.io/v1\"");
}
