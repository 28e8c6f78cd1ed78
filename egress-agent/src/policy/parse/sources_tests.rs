//! Sources by ServiceAccount, by namespace labels and by expressions, in a policy file; OSM's
//! and FSM's objects as written.

use std::collections::BTreeSet;

use crate::policy::parse;

const BASE: &str = r#"kind: Namespace
apiVersion: v1
metadata: {name: shop, labels: {env: prod}}
---
kind: Workload
metadata: {name: curl-1, namespace: curl, labels: {app: curl}}
spec: {serviceAccount: curl}
---
kind: Workload
metadata: {name: curl-2, namespace: curl, labels: {app: curl, canary: "yes"}}
spec: {serviceAccount: curl}
---
kind: Workload
metadata: {name: web, namespace: curl, labels: {app: web}}
---
kind: Workload
metadata: {name: curl-3, namespace: shop, labels: {app: curl}}
spec: {serviceAccount: curl}
"#;

fn sources(egress: &str) -> Result<BTreeSet<String>, String> {
    let text = format!("{BASE}---\n{egress}");
    let cfg = parse(&text, "p.yaml").map_err(|e| e.to_string())?;
    let e = &cfg.egresses[0];
    Ok(e.sources_in(&cfg.workloads, &cfg.namespaces)
        .map(|w| w.id.to_string())
        .collect())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sources_select_as_osm_and_kubernetes_mean_them() {
    let osm = "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\nmetadata: {name: httpbin, namespace: curl}\nspec:\n  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]\n  hosts: [httpbin.org]\n  ports: [{number: 80, protocol: http}]\n";
    assert_eq!(sources(osm).unwrap(), set(&["curl/curl-1", "curl/curl-2"]));
    let fsm = osm.replace("policy.openservicemesh.io", "policy.flomesh.io");
    assert_eq!(sources(&fsm).unwrap(), set(&["curl/curl-1", "curl/curl-2"]));
    // The default ServiceAccount is every workload that declares none.
    let dflt = "kind: Egress\nmetadata: {name: d, namespace: curl}\nspec: {sources: [{kind: ServiceAccount, name: default}]}\n";
    assert_eq!(sources(dflt).unwrap(), set(&["curl/web"]));
    // A ServiceAccount with no workload yet is no error (like a selector matching none).
    let none = "kind: Egress\nmetadata: {name: n, namespace: curl}\nspec: {sources: [{kind: ServiceAccount, name: nobody}]}\n";
    assert_eq!(sources(none).unwrap(), set(&[]));
    let exprs = "kind: Egress\nmetadata: {name: x, namespace: curl}\nspec: {sources: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [curl]}, {key: canary, operator: DoesNotExist}]}}]}\n";
    assert_eq!(sources(exprs).unwrap(), set(&["curl/curl-1"]));
    let by_ns = "kind: Egress\nmetadata: {name: x, namespace: curl}\nspec: {sources: [{namespaceSelector: {matchLabels: {env: prod}}}]}\n";
    assert_eq!(sources(by_ns).unwrap(), set(&["shop/curl-3"]));
    let every_ns = "kind: Egress\nmetadata: {name: x, namespace: curl}\nspec: {sources: [{namespaceSelector: {}, podSelector: {matchLabels: {app: curl}}}]}\n";
    assert_eq!(
        sources(every_ns).unwrap(),
        set(&["curl/curl-1", "curl/curl-2", "shop/curl-3"])
    );
}

#[test]
fn what_cannot_be_honoured_is_refused_by_name() {
    let cases = [
        ("apiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{kind: ServiceAccount, name: curl}], ports: [{number: 80, protocol: http}], matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: r}]}\n",
         "p.yaml: Egress curl/e: spec.matches: unknown field `matches`"),
        ("apiVersion: policy.flomesh.io/v1alpha1\nkind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{kind: ServiceAccount, name: curl, mtls: {issuer: osm}}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].mtls: unknown field `mtls`"),
        // Standalone: a Service is found in a cluster, which a policy file does not have.
        ("apiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g, namespace: fsm}\nspec: {global: [{service: fsm-egress-gateway, namespace: fsm}]}\n",
         "p.yaml: EgressGateway g: spec.global[0].service: a gateway named by Service needs Kubernetes mode"),
        ("kind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{kind: ServiceAccount, name: curl, podSelector: {}}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].podSelector: a ServiceAccount source is named"),
        ("kind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{namespace: shop, namespaceSelector: {}}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].namespaceSelector: give either namespace or namespaceSelector"),
        ("kind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{podSelector: {matchExpressions: [{key: a, operator: Maybe}]}}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].podSelector.matchExpressions[0].operator: unknown variant `Maybe`"),
        ("kind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{namespaceSelector: {matchExpressions: [{key: a, operator: NotIn}]}}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].namespaceSelector.matchExpressions[0].values: NotIn needs at least one value"),
        ("kind: Egress\nmetadata: {name: e, namespace: curl}\nspec: {sources: [{kind: Group, name: g}]}\n",
         "p.yaml: Egress curl/e: spec.sources[0].kind: unknown source kind \"Group\""),
    ];
    for (doc, want) in cases {
        let e = sources(doc).unwrap_err();
        assert!(e.starts_with(want), "\n got {e}\nwant {want}");
        assert!(!e.contains('\n'), "{e}");
    }
}
