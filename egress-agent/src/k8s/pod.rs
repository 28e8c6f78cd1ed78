//! A pod of this node as enforcement sees it (labels, ServiceAccount, QoS class), and the
//! API group of each watched kind.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::cgroups::Qos;
use crate::policy::ObjectRef;

/// The API group and version of the CRDs.
pub const GROUP: &str = "policy.egress.dev";
pub const VERSION: &str = "v1alpha1";

/// Kinds whose CRDs a cluster may not have (network-policy-api's): the first sync does not
/// wait for them.
pub fn optional(kind: &str) -> bool {
    api(kind).0 == "policy.networking.k8s.io"
}

/// (group, version) of a watched kind: Kubernetes' own for NetworkPolicy and Namespace, ours
/// for the CRDs.
pub fn api(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "NetworkPolicy" => ("networking.k8s.io", "v1"),
        "Namespace" => ("", "v1"),
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
            ("policy.networking.k8s.io", "v1alpha1")
        }
        _ => (GROUP, VERSION),
    }
}

/// A pod of this node, as far as enforcement needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub id: ObjectRef,
    pub uid: String,
    pub qos: Option<Qos>,
    pub labels: BTreeMap<String, String>,
    /// `status.phase` Succeeded or Failed: nothing runs, and the kubelet removed the cgroup.
    pub finished: bool,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: Option<String>,
}

impl Pod {
    /// From a Pod object's JSON; None without a name or UID.
    pub fn from_json(v: &Value) -> Option<Pod> {
        let meta = v.get("metadata")?;
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        Some(Pod {
            id: ObjectRef {
                namespace: s(meta.get("namespace")).unwrap_or_else(|| "default".into()),
                name: s(meta.get("name"))?,
            },
            uid: s(meta.get("uid"))?,
            qos: v
                .pointer("/status/qosClass")
                .and_then(Value::as_str)
                .and_then(Qos::parse),
            labels: serde_json::from_value(meta.get("labels").cloned().unwrap_or_default())
                .unwrap_or_default(),
            finished: matches!(
                v.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            ),
            service_account: s(v.pointer("/spec/serviceAccountName")),
        })
    }

    /// The Workload document that stands for it, enrolled as `id`.
    pub fn workload(&self, id: &ObjectRef) -> Value {
        let mut doc = json!({
            "kind": "Workload",
            "metadata": {"name": id.name, "namespace": id.namespace, "labels": self.labels},
        });
        if let Some(sa) = &self.service_account {
            doc["spec"] = json!({ "serviceAccount": sa });
        }
        doc
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::k8s::{
        cgroups::{self, Driver},
        view::{View, KINDS},
    };

    /// Pods of ServiceAccount `sa` (and one of another), their cgroups made under `root`.
    fn pod(root: &std::path::Path, ns: &str, name: &str, sa: &str, team: &str) -> Pod {
        let uid = format!("uid-{ns}-{name}");
        let dir = root.join(cgroups::pod_dir(Driver::Cgroupfs, Qos::BestEffort, &uid));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        Pod::from_json(
            &json!({"metadata": {"name": name, "namespace": ns, "uid": uid,
            "labels": {"team": team}}, "spec": {"serviceAccountName": sa},
            "status": {"qosClass": "BestEffort"}}),
        )
        .unwrap()
    }

    #[test]
    fn service_account_and_namespace_selector_sources_select_pods_as_osm_means_them() {
        let root = std::env::temp_dir().join(format!("egress-pod-{}/kubepods", std::process::id()));
        let mut v = View::default();
        for p in [
            pod(&root, "curl", "curl-1", "curl", "a"),
            pod(&root, "curl", "curl-2", "curl", "b"),
            pod(&root, "curl", "other", "default", "a"),
            pod(&root, "shop", "curl-3", "curl", "a"),
        ] {
            v.pods.insert(p.id.clone(), p);
        }
        let osm = json!({"apiVersion": "policy.openservicemesh.io/v1alpha1", "kind": "Egress",
            "metadata": {"name": "httpbin", "namespace": "curl"},
            "spec": {"sources": [{"kind": "ServiceAccount", "name": "curl", "namespace": "curl"}],
                     "ipAddresses": ["10.0.0.0/8"], "ports": [{"number": 80, "protocol": "http"}]}});
        v.apply("Egress", &osm).unwrap();
        let by_ns = json!({"kind": "Egress", "metadata": {"name": "prod", "namespace": "curl"},
            "spec": {"sources": [{"namespaceSelector": {"matchExpressions":
                [{"key": "env", "operator": "In", "values": ["prod"]}]},
                "podSelector": {"matchLabels": {"team": "a"}}}], "ipAddresses": ["10.1.0.0/16"]}});
        v.apply("Egress", &by_ns).unwrap();
        v.apply(
            "Namespace",
            &json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"env": "prod"}, "uid": "x"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        )
        .unwrap();
        let r = v.resolve(&root).unwrap();
        let sources = |name: &str| -> BTreeSet<String> {
            let e = r
                .config
                .egresses
                .iter()
                .find(|e| e.id.name == name)
                .unwrap();
            e.sources_in(&r.config.workloads, &r.config.namespaces)
                .map(|w| w.id.to_string())
                .collect()
        };
        // Every pod of the ServiceAccount in its namespace, and no other.
        assert_eq!(
            sources("httpbin"),
            ["curl/curl-1", "curl/curl-2"].map(String::from).into()
        );
        assert_eq!(sources("prod"), ["shop/curl-3"].map(String::from).into());
        // OSM's `matches` (HTTPRouteGroup) is refused by name; the previous version stays.
        let mut bad = osm.clone();
        bad["spec"]["matches"] = json!([{"kind": "HTTPRouteGroup", "name": "r"}]);
        let e = v.apply("Egress", &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("kubernetes: Egress curl/httpbin: spec.matches: unknown field `matches`"),
            "{e}"
        );
        assert_eq!(v.resolve(&root).unwrap().config.egresses.len(), 2);
        // A NetworkPolicy is watched like the rest; a bad one is refused by field.
        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "curl"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}});
        v.apply("NetworkPolicy", &np).unwrap();
        let mut bad = np.clone();
        bad["spec"]["egress"] = json!([{"ports": [{"port": "http"}]}]);
        let e = v.apply("NetworkPolicy", &bad).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "kubernetes: NetworkPolicy curl/deny: spec.egress[0].ports[0].port: named port"
            ),
            "{e}"
        );
        assert_eq!(v.resolve(&root).unwrap().config.network_policies.len(), 1);
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    /// The ClusterRole grants list and watch on every watched kind, and on Kubernetes' own
    /// kinds nothing more.
    #[test]
    fn the_cluster_role_grants_exactly_the_watches() {
        let text = include_str!("../../../deploy/kubernetes/base/rbac.yaml");
        let docs = crate::policy::documents(text, "rbac.yaml").unwrap();
        let role = docs
            .iter()
            .find(|d| d.kind == "ClusterRole" && d.name == "egress-agent")
            .unwrap();
        let rules = role.body["rules"].as_array().unwrap();
        for (kind, plural, _) in KINDS {
            let (group, _) = api(kind);
            let rule = rules
                .iter()
                .find(|r| {
                    r["apiGroups"][0] == group
                        && r["resources"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|x| x == plural)
                })
                .unwrap_or_else(|| panic!("no rule for {plural}"));
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert!(
                verbs.contains(&"list") && verbs.contains(&"watch"),
                "{plural}: {verbs:?}"
            );
            if group != GROUP {
                assert_eq!(verbs, ["list", "watch"], "{plural}");
            }
            if matches!(kind, "NetworkPolicy" | "Namespace") {
                assert_eq!(rule["resources"].as_array().unwrap().len(), 1, "{plural}");
            }
        }
        // Gateways named by Service: EndpointSlices, list and watch, nothing else.
        let slices: Vec<_> = rules
            .iter()
            .filter(|r| r["apiGroups"][0] == "discovery.k8s.io")
            .collect();
        assert_eq!(slices.len(), 1);
        assert_eq!(
            slices[0]["resources"],
            serde_json::json!(["endpointslices"])
        );
        assert_eq!(slices[0]["verbs"], serde_json::json!(["list", "watch"]));
    }
}
