use std::net::IpAddr;

use egress_common::{proto, Outcome};

use crate::policy::{compile, parse, ObjectRef};

/// enableEgress true: the tiers alone decide. `web` in `shop` (env: prod), `db` in `shop`,
/// `batch` in `jobs` (no labels).
const BASE: &str = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: true, meshCIDRs: [10.96.0.0/12]}}\n---\nkind: Namespace\napiVersion: v1\nmetadata: {name: shop, labels: {env: prod}}\n---\nkind: Workload\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n---\nkind: Workload\nmetadata: {name: db, namespace: shop, labels: {app: db}}\n---\nkind: Workload\nmetadata: {name: batch, namespace: jobs}\n";

const ADMIN: &str = r#"---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-metadata}
spec:
  priority: 5
  subject: {namespaces: {}}
  egress:
  - {name: no-metadata, action: Deny, to: [{networks: [169.254.169.254/32]}]}
  - {name: pass-corp, action: Pass, to: [{networks: [10.0.0.0/8]}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: allow-cloud}
spec:
  priority: 50
  subject: {pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {}}}
  egress:
  - name: cloud
    action: Allow
    to: [{networks: [169.254.0.0/16, 10.0.0.0/8]}]
  - name: in-cluster
    action: Allow
    to: [{namespaces: {}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-only-corp-https, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.1.0.0/16}}], ports: [{port: 443}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  egress:
  - {action: Allow, to: [{networks: [1.1.1.1/32]}], ports: [{portNumber: {protocol: UDP, port: 53}}]}
  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#;

fn decide(text: &str, w: &str, ip: &str, port: u16, p: u8) -> (Outcome, String) {
    let cfg = parse(text, "t.yaml").unwrap();
    let c = compile(&cfg).unwrap();
    let id: ObjectRef = w.parse().unwrap();
    let d = c.decide(
        c.workload_id(&id).unwrap(),
        ip.parse::<IpAddr>().unwrap(),
        port,
        p,
    );
    (
        d.outcome,
        c.rule(d.rule_id).map(|r| r.name()).unwrap_or_default(),
    )
}

#[test]
fn priority_pass_and_the_baseline() {
    let t = format!("{BASE}{ADMIN}");
    let deny = Outcome::DenyRule;
    let cases: &[(&str, &str, u16, u8, Outcome, &str)] = &[
        // A higher-priority Deny beats a lower-priority Allow.
        (
            "shop/web",
            "169.254.169.254",
            80,
            proto::TCP,
            deny,
            "AdminNetworkPolicy deny-metadata",
        ),
        (
            "shop/db",
            "169.254.169.254",
            80,
            proto::TCP,
            deny,
            "AdminNetworkPolicy deny-metadata",
        ),
        // The lower Allow applies where the higher says nothing.
        ("shop/web", "169.254.1.1", 80, proto::TCP, Outcome::Pass, ""),
        // Pass hands 10/8 to NetworkPolicy, skipping the lower Allow: web is isolated to
        // 10.1/16 port 443; db is not isolated, so the baseline decides (Deny).
        ("shop/web", "10.1.2.3", 443, proto::TCP, Outcome::Pass, ""),
        (
            "shop/web",
            "10.1.2.3",
            80,
            proto::TCP,
            deny,
            "NetworkPolicy shop/web-only-corp-https",
        ),
        (
            "shop/web",
            "10.2.0.1",
            443,
            proto::TCP,
            deny,
            "NetworkPolicy shop/web-only-corp-https",
        ),
        (
            "shop/db",
            "10.1.2.3",
            443,
            proto::TCP,
            deny,
            "BaselineAdminNetworkPolicy default",
        ),
        // The baseline: DNS to 1.1.1.1 allowed, the rest denied; IPv6 unmatched: allowed.
        ("jobs/batch", "1.1.1.1", 53, proto::UDP, Outcome::Pass, ""),
        (
            "jobs/batch",
            "1.1.1.1",
            53,
            proto::TCP,
            deny,
            "BaselineAdminNetworkPolicy default",
        ),
        (
            "jobs/batch",
            "8.8.8.8",
            443,
            proto::TCP,
            deny,
            "BaselineAdminNetworkPolicy default",
        ),
        (
            "jobs/batch",
            "2001:db8::1",
            443,
            proto::TCP,
            Outcome::Pass,
            "",
        ),
        // allow-cloud selects prod namespaces only.
        (
            "jobs/batch",
            "169.254.1.1",
            80,
            proto::TCP,
            deny,
            "BaselineAdminNetworkPolicy default",
        ),
        // The mesh is the CNI's.
        (
            "jobs/batch",
            "10.96.0.1",
            443,
            proto::TCP,
            Outcome::Mesh,
            "",
        ),
    ];
    for &(w, ip, port, p, want, by) in cases {
        let (got, rule) = decide(&t, w, ip, port, p);
        assert_eq!((got, rule.as_str()), (want, by), "{w} -> {ip}:{port}/{p}");
    }
}

#[test]
fn what_cannot_be_honoured_is_refused_by_name() {
    let anp = |spec: &str| {
        format!("{BASE}---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: a}}\nspec: {{priority: 1, subject: {{namespaces: {{}}}}, {spec}}}\n")
    };
    let cases = [
        (anp("egress: [{action: Allow, to: [{domainNames: [\"*.example.com\"]}]}]"), "AdminNetworkPolicy a: spec.egress[0].to[0].domainNames: not supported yet"),
        (anp("egress: [{action: Allow, to: [{nodes: {}}]}]"), "AdminNetworkPolicy a: spec.egress[0].to[0].nodes: node peers are not supported"),
        (anp("egress: [{action: Allow, to: [{networks: [1.0.0.0/8]}], ports: [{namedPort: http}]}]"), "AdminNetworkPolicy a: spec.egress[0].ports[0].namedPort: named port \"http\""),
        (anp("egress: [{action: Allow, to: [{networks: [1.0.0.0/8]}], ports: [{portRange: {start: 9, end: 8}}]}]"), "AdminNetworkPolicy a: spec.egress[0].ports[0].portRange.end: end 8 is below start 9"),
        (anp("egress: [{action: Drop, to: [{networks: [1.0.0.0/8]}]}]"), "AdminNetworkPolicy a: spec.egress[0].action: \"Drop\" is not Allow, Deny or Pass"),
        (anp("egress: [{action: Allow, to: [{networks: [1.0.0.0/8], namespaces: {}}]}]"), "AdminNetworkPolicy a: spec.egress[0].to[0]: give exactly one of"),
        (anp("egress: [], extra: 1").replace("priority: 1", "priority: 1001"), "AdminNetworkPolicy a: spec.extra: unknown field `extra`"),
        (anp("egress: []").replace("priority: 1", "priority: 1001"), "AdminNetworkPolicy a: spec.priority: 1001 is out of range 0-1000"),
        (format!("{BASE}---\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: other}}\nspec: {{subject: {{namespaces: {{}}}}}}\n"), "BaselineAdminNetworkPolicy other: metadata.name: \"other\": the BaselineAdminNetworkPolicy must be named \"default\""),
        (format!("{BASE}---\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec: {{subject: {{namespaces: {{}}}}, egress: [{{action: Pass, to: [{{networks: [1.0.0.0/8]}}]}}]}}\n"), "BaselineAdminNetworkPolicy default: spec.egress[0].action: \"Pass\" is not Allow or Deny"),
    ];
    for (text, want) in cases {
        let e = parse(&text, "t.yaml").unwrap_err().to_string();
        let want = format!("t.yaml: {want}");
        assert!(e.starts_with(&want), "\n got {e}\nwant {want}");
    }
}
