//! The node's view of the cluster: its pods and the last valid version of every policy
//! object, turned into the same [`Config`] a standalone policy file gives.
//!
//! Every policy object (MeshConfig, Egress, EgressGateway) goes from its JSON to the same
//! typed documents and checks as the standalone file's (no YAML text in between), so
//! validation and error text are the same (`kubernetes: Egress ns/name:
//! spec.ports[0].number: ...`). An object that fails is reported and its previous valid
//! version (or nothing, for a new object) stays in force; the other objects and pod churn are
//! not held up by it. Pods become `Workload`s named `namespace/name` with the pod's labels,
//! whose cgroup is the kubelet's (see [`super::cgroups`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::cgroups;
pub use super::pod::Pod;
use crate::policy::{
    self, parse, validate::Objects, Config, ConfigError, Document, ObjectRef, PolicyObject, Store,
};

/// The name errors give as the "file" of a policy object.
pub const SOURCE: &str = "kubernetes";

/// The policy kinds watched (CRDs, then Kubernetes' own: see [`super::pod::api`]), with
/// their plural (URL) names and scope.
pub const KINDS: [(&str, &str, bool); 7] = [
    ("MeshConfig", "meshconfigs", false),
    ("Egress", "egresses", true),
    ("EgressGateway", "egressgateways", false),
    ("NetworkPolicy", "networkpolicies", true),
    ("Namespace", "namespaces", false),
    ("AdminNetworkPolicy", "adminnetworkpolicies", false),
    (
        "BaselineAdminNetworkPolicy",
        "baselineadminnetworkpolicies",
        false,
    ),
];

/// (kind, namespace, name); cluster-scoped kinds have an empty namespace.
pub type Key = (String, String, String);

/// What the node enforces, once resolved against the cgroup tree.
pub struct Resolved {
    pub store: Store,
    pub config: Config,
    /// Pod → its kubelet cgroup.
    pub dirs: BTreeMap<ObjectRef, PathBuf>,
    /// Pods whose cgroup the kubelet has not made yet (retried).
    pub pending: Vec<ObjectRef>,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub pods: BTreeMap<ObjectRef, Pod>,
    /// The accepted version of each policy object.
    good: BTreeMap<Key, Accepted>,
    /// `metadata.generation` of each accepted object.
    generations: BTreeMap<Key, i64>,
    /// Objects whose latest version was refused, with the reason.
    refused: BTreeMap<Key, String>,
    /// `metadata.uid` of every policy object seen (Events name their object by it).
    uids: BTreeMap<Key, String>,
    /// The latest version of each refused object, tried again after every accepted change
    /// (an Egress may arrive before the EgressGateway it names).
    pending: BTreeMap<Key, Value>,
}

impl View {
    /// Adds or replaces a policy object if the result is valid; otherwise reports why and
    /// keeps the previous version. Ok(true) when the accepted policy changed.
    pub fn apply(&mut self, kind: &str, obj: &Value) -> Result<bool, ConfigError> {
        let key = key_of(kind, obj);
        let r = self.try_apply(kind, obj);
        if r.is_err() {
            self.pending.insert(key, obj.clone());
        } else {
            self.pending.remove(&key);
            self.settle();
        }
        r
    }

    fn try_apply(&mut self, kind: &str, obj: &Value) -> Result<bool, ConfigError> {
        let key = key_of(kind, obj);
        if let Some(uid) = obj.pointer("/metadata/uid").and_then(Value::as_str) {
            self.uids.insert(key.clone(), uid.to_string());
        }
        let mut next = self.good.clone();
        let checked = Accepted::new(kind, obj).and_then(|a| {
            next.insert(key.clone(), a.clone());
            validate(&next).map(|_| a)
        });
        if let Err(e) = &checked {
            self.refused.insert(key.clone(), e.to_string());
        }
        let a = checked?;
        self.refused.remove(&key);
        let changed = self.good.get(&key).map(|g| &g.doc) != Some(&a.doc);
        self.good = next;
        let generation = obj.pointer("/metadata/generation").and_then(Value::as_i64);
        self.generations.insert(key, generation.unwrap_or(0));
        Ok(changed)
    }

    /// Starts from the policy objects the previous run had accepted (its saved live policy,
    /// `--state-file`): an object whose current version is invalid then keeps its last valid
    /// version across a restart too. Pods are not taken from it (the API server says which
    /// run here). Returns how many objects were taken.
    pub fn seed(&mut self, saved: &str) -> usize {
        let mut n = 0;
        let Ok(docs) = policy::documents(saved, "saved policy") else {
            return 0;
        };
        for d in docs {
            if !KINDS.iter().any(|(k, _, _)| *k == d.kind) {
                continue;
            }
            let key = key_of(&d.kind, &d.body);
            let Ok(a) = Accepted::new(&d.kind, &d.body) else {
                continue;
            };
            let mut next = self.good.clone();
            next.insert(key.clone(), a);
            if validate(&next).is_ok() {
                self.good = next;
                self.generations.insert(key, 0);
                n += 1;
            }
        }
        n
    }

    /// Removes a policy object. Objects that no longer validate without it (an Egress
    /// naming a deleted EgressGateway) are refused in turn and reported: fail closed.
    pub fn delete(&mut self, kind: &str, obj: &Value) -> Result<bool, ConfigError> {
        let key = key_of(kind, obj);
        self.refused.remove(&key);
        self.uids.remove(&key);
        self.pending.remove(&key);
        self.generations.remove(&key);
        let changed = self.good.remove(&key).is_some();
        self.settle();
        Ok(changed)
    }

    /// After a change: objects the accepted set no longer supports are refused (kept for a
    /// retry), and refused objects that now validate are accepted.
    fn settle(&mut self) {
        while let Err(e) = validate(&self.good) {
            let Some(key) = self.good.keys().find(|k| label(k) == e.object).cloned() else {
                tracing::warn!(error = %e, "the accepted policy objects do not validate together");
                break;
            };
            if let Some(a) = self.good.remove(&key) {
                self.pending.insert(key.clone(), a.doc);
            }
            self.generations.remove(&key);
            self.refused.insert(key, e.to_string());
        }
        loop {
            let mut progress = false;
            for (key, obj) in self.pending.clone() {
                if self.try_apply(&key.0, &obj).is_ok() {
                    self.pending.remove(&key);
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
    }

    /// Replaces every object of `kind` by `objs` (a relist), one by one, each validated.
    /// Returns the rejections.
    pub fn relist(&mut self, kind: &str, objs: &[Value]) -> Vec<ConfigError> {
        let listed: std::collections::BTreeSet<Key> =
            objs.iter().map(|o| key_of(kind, o)).collect();
        self.good.retain(|k, _| k.0 != kind || listed.contains(k));
        self.generations
            .retain(|k, _| k.0 != kind || listed.contains(k));
        self.refused
            .retain(|k, _| k.0 != kind || listed.contains(k));
        self.pending
            .retain(|k, _| k.0 != kind || listed.contains(k));
        // Usually all are valid: one check for the lot. Otherwise one by one, so that each
        // invalid object keeps its previous version and the valid ones go in.
        let mut all = self.good.clone();
        let mut each_valid = true;
        for o in objs {
            each_valid &= Accepted::new(kind, o)
                .map(|a| all.insert(key_of(kind, o), a))
                .is_ok();
            if let Some(uid) = o.pointer("/metadata/uid").and_then(Value::as_str) {
                self.uids.insert(key_of(kind, o), uid.to_string());
            }
        }
        if each_valid && validate(&all).is_ok() {
            self.good = all;
            for o in objs {
                let g = o.pointer("/metadata/generation").and_then(Value::as_i64);
                self.generations.insert(key_of(kind, o), g.unwrap_or(0));
                self.refused.remove(&key_of(kind, o));
                self.pending.remove(&key_of(kind, o));
            }
            self.settle();
            return Vec::new();
        }
        let errs = objs
            .iter()
            .filter_map(|o| self.apply(kind, o).err())
            .collect();
        self.settle();
        errs
    }

    /// The name of the accepted MeshConfig.
    pub fn mesh_name(&self) -> Option<&str> {
        self.good
            .keys()
            .find(|k| k.0 == "MeshConfig")
            .map(|k| k.2.as_str())
    }

    /// Why the objects whose latest version was refused were refused.
    pub fn rejected(&self) -> Vec<&str> {
        self.refused.values().map(String::as_str).collect()
    }

    /// The refused objects by key, with the reason.
    pub fn refused(&self) -> &BTreeMap<Key, String> {
        &self.refused
    }

    /// The uid of a policy object seen.
    pub fn uid(&self, key: &Key) -> Option<&str> {
        self.uids.get(key).map(String::as_str)
    }

    /// `metadata.generation` of the accepted MeshConfig, 0 without one.
    pub fn mesh_generation(&self) -> i64 {
        self.generations
            .iter()
            .find(|(k, _)| k.0 == "MeshConfig")
            .map(|(_, g)| *g)
            .unwrap_or(0)
    }

    /// The policy for the pods whose cgroups exist under `root` (the kubepods cgroup).
    /// hostNetwork pods are workloads like the others (their sockets are judged the same way).
    pub fn resolve(&self, root: &Path) -> Result<Resolved, ConfigError> {
        let mut dirs = BTreeMap::new();
        let mut pending = Vec::new();
        let mut docs: Vec<Value> = self.good.values().map(|a| a.doc.clone()).collect();
        let mut all = Objects::new(SOURCE);
        for a in self.good.values() {
            all.add(a.object.clone())?;
        }
        for pod in self.pods.values().filter(|p| !p.finished) {
            let Some(dir) = cgroups::find_pod(root, pod.qos, &pod.uid) else {
                pending.push(pod.id.clone());
                continue;
            };
            // A pod name the policy format cannot hold (one with a dot, as static pods named
            // after a node's FQDN have) is enrolled as `pod-<uid>`: its labels still select it.
            let Some((id, doc, object)) = [pod.id.name.clone(), format!("pod-{}", pod.uid)]
                .into_iter()
                .find_map(|name| {
                    let id = ObjectRef {
                        namespace: pod.id.namespace.clone(),
                        name,
                    };
                    let doc = pod.workload(&id);
                    let object = to_object(&doc).ok()?;
                    Some((id, doc, object))
                })
            else {
                tracing::warn!(pod = %pod.id, "pod left out of enforcement: no valid workload name");
                continue;
            };
            all.add(object)?;
            docs.push(doc);
            dirs.insert(id, dir);
        }
        Ok(Resolved {
            config: all.finish_unlinked()?,
            store: Store::from_documents(Document::from_values(docs, SOURCE)?, SOURCE)?,
            dirs,
            pending,
        })
    }
}

/// An accepted policy object: its document (what the state file saves) and what it means.
#[derive(Clone, Debug, PartialEq)]
struct Accepted {
    doc: Value,
    object: PolicyObject,
}

impl Accepted {
    /// A CRD object, typed and checked on its own.
    fn new(kind: &str, obj: &Value) -> Result<Accepted, ConfigError> {
        let doc = policy_doc(kind, obj);
        let object = to_object(&doc)?;
        Ok(Accepted { doc, object })
    }
}

/// A policy document as a typed object, checked on its own (errors name [`SOURCE`]).
fn to_object(doc: &Value) -> Result<PolicyObject, ConfigError> {
    parse::object(&Document::from_value(doc.clone(), 1, SOURCE)?, SOURCE)
}

/// The accepted objects checked together.
fn validate(objs: &BTreeMap<Key, Accepted>) -> Result<Config, ConfigError> {
    let mut all = Objects::new(SOURCE);
    for a in objs.values() {
        all.add(a.object.clone())?;
    }
    all.finish_unlinked()
}

/// How the parser names an object in its errors: `Egress ns/name`, `MeshConfig name`.
fn label(k: &Key) -> String {
    if k.1.is_empty() {
        format!("{} {}", k.0, k.2)
    } else {
        format!("{} {}/{}", k.0, k.1, k.2)
    }
}

pub fn key_of(kind: &str, obj: &Value) -> Key {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let namespaced = KINDS.iter().any(|(k, _, ns)| *k == kind && *ns);
    let ns = if namespaced {
        s("/metadata/namespace")
    } else {
        String::new()
    };
    (kind.to_string(), ns, s("/metadata/name"))
}

/// A CRD object as the policy file writes it: apiVersion, kind, the user's metadata (name,
/// namespace, labels, annotations; not the server's uid, resourceVersion, managedFields...)
/// and spec. `status` is the agents' own.
pub fn policy_doc(kind: &str, obj: &Value) -> Value {
    let mut meta = serde_json::Map::new();
    for f in ["name", "namespace", "labels", "annotations"] {
        if let Some(v) = obj.get("metadata").and_then(|m| m.get(f)) {
            meta.insert(f.into(), v.clone());
        }
    }
    let mut doc = serde_json::Map::new();
    if let Some(v) = obj.get("apiVersion") {
        doc.insert("apiVersion".into(), v.clone());
    }
    doc.insert("kind".into(), Value::from(kind));
    doc.insert("metadata".into(), Value::Object(meta));
    if let Some(v) = obj.get("spec") {
        doc.insert("spec".into(), v.clone());
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::cgroups::Qos;
    use serde_json::json;

    fn egress(name: &str, port: i64) -> Value {
        json!({"apiVersion": policy::API_VERSION, "kind": "Egress",
            "metadata": {"name": name, "namespace": "shop", "uid": "u", "resourceVersion": "7", "generation": 2,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "ipAddresses": ["127.0.0.0/8"], "ports": [{"number": port}]},
            "status": {"anything": true}})
    }

    /// The first port of each Egress in force.
    fn ports(v: &View) -> Vec<u16> {
        let r = v.resolve(Path::new("/nonexistent/kubepods.slice")).unwrap();
        r.config
            .egresses
            .iter()
            .map(|e| e.spec.ports[0].number.0)
            .collect()
    }

    #[test]
    fn a_bad_object_is_reported_and_the_previous_version_stays() {
        let mut v = View::default();
        assert!(v.apply("Egress", &egress("web-out", 443)).unwrap());
        assert!(!v.apply("Egress", &egress("web-out", 443)).unwrap());
        let e = v.apply("Egress", &egress("web-out", 70000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kubernetes: Egress shop/web-out: spec.ports[0].number: port 70000 is out of range 1-65535"
        );
        assert_eq!(ports(&v), [443]);
        // A new bad object is not added at all.
        assert!(v.apply("Egress", &egress("other", 0)).is_err());
        assert_eq!(ports(&v), [443]);
        assert!(v.delete("Egress", &egress("web-out", 1)).unwrap());
        assert!(ports(&v).is_empty());
    }

    #[test]
    fn a_pod_name_with_a_dot_is_enrolled_by_uid() {
        let root =
            std::env::temp_dir().join(format!("egress-view-{}/kubepods", std::process::id()));
        let pod = Pod::from_json(
            &json!({"metadata": {"name": "kube-apiserver-cp1.example.com",
            "namespace": "kube-system", "uid": "1234-abcd", "labels": {"tier": "control-plane"}},
            "status": {"qosClass": "Burstable"}}),
        )
        .unwrap();
        let dir = root.join(cgroups::pod_dir(
            cgroups::Driver::Cgroupfs,
            Qos::Burstable,
            "1234-abcd",
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        let mut v = View::default();
        v.pods.insert(pod.id.clone(), pod);
        let r = v.resolve(&root).unwrap();
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
        let want = ObjectRef {
            namespace: "kube-system".into(),
            name: "pod-1234-abcd".into(),
        };
        assert_eq!(r.dirs.get(&want), Some(&dir));
        assert_eq!(r.config.workloads[0].labels["tier"], "control-plane");
    }

    #[test]
    fn a_saved_valid_version_outlives_a_restart() {
        let mut before = View::default();
        before.apply("Egress", &egress("web-out", 443)).unwrap();
        let saved = before.resolve(Path::new("/x")).unwrap().store.to_text();
        let mut after = View::default();
        assert_eq!(after.seed(&saved), 1);
        // The cluster now holds an invalid version: the saved one stays in force.
        let errs = after.relist("Egress", &[egress("web-out", 0)]);
        assert_eq!(errs.len(), 1);
        assert_eq!(ports(&after), [443]);
        // Gone from the cluster: gone here.
        after.relist("Egress", &[]);
        assert!(ports(&after).is_empty());
    }

    #[test]
    fn gateway_references_settle_in_any_order_and_a_deleted_gateway_fails_closed() {
        let via = json!({"apiVersion": policy::API_VERSION, "kind": "Egress",
            "metadata": {"name": "via-gw", "namespace": "shop"},
            "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "hosts": ["example.com"], "ports": [{"number": 443, "protocol": "https"}],
                     "gateway": "corp"}});
        let gw = json!({"apiVersion": policy::API_VERSION, "kind": "EgressGateway",
            "metadata": {"name": "corp"},
            "spec": {"endpoints": [{"address": "127.0.0.1:1080", "mode": "socks5"}]}});
        let mut v = View::default();
        // The Egress first: refused (its gateway is unknown), kept for a retry.
        let e = v.apply("Egress", &via).unwrap_err();
        assert!(e.to_string().contains("spec.gateway"), "{e}");
        assert_eq!(v.rejected().len(), 1);
        // The gateway arrives: the Egress goes in too.
        v.apply("EgressGateway", &gw).unwrap();
        assert!(v.rejected().is_empty(), "{:?}", v.rejected());
        assert_eq!(ports(&v), [443]);
        // The gateway is deleted: the Egress naming it is refused (fail closed), reported.
        assert!(v.delete("EgressGateway", &gw).unwrap());
        assert!(ports(&v).is_empty());
        assert_eq!(v.rejected().len(), 1);
        assert!(
            v.rejected()[0].contains("no EgressGateway \"corp\""),
            "{:?}",
            v.rejected()
        );
        // Back again: so is the Egress.
        v.relist("EgressGateway", &[gw]);
        assert_eq!(ports(&v), [443]);
    }

    #[test]
    fn a_large_relist_is_checked_at_once() {
        let objs: Vec<Value> = (0..2000)
            .map(|i| {
                let mut e = egress(&format!("e{i}"), 443);
                e["metadata"]["generation"] = json!(i);
                e
            })
            .collect();
        let mut v = View::default();
        let t0 = std::time::Instant::now();
        assert!(v.relist("Egress", &objs).is_empty());
        let took = t0.elapsed();
        assert_eq!(
            v.resolve(Path::new("/x")).unwrap().config.egresses.len(),
            2000
        );
        eprintln!("relist of 2000 Egress objects: {took:?}");
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn relist_replaces_a_kind() {
        let mut v = View::default();
        v.apply("Egress", &egress("a", 1)).unwrap();
        v.apply("Egress", &egress("b", 2)).unwrap();
        let errs = v.relist("Egress", &[egress("b", 3), egress("c", 0)]);
        assert_eq!(errs.len(), 1);
        let r = v.resolve(Path::new("/x")).unwrap();
        let names: Vec<_> = r
            .config
            .egresses
            .iter()
            .map(|e| e.id.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn pods_without_a_cgroup_are_pending_and_mesh_generation_is_tracked() {
        let mut v = View::default();
        let pod = Pod::from_json(
            &json!({"metadata": {"name": "web-1", "namespace": "shop", "uid": "abc",
            "labels": {"app": "web"}}, "status": {"qosClass": "BestEffort"}}),
        )
        .unwrap();
        assert_eq!(pod.qos, Some(Qos::BestEffort));
        v.pods.insert(pod.id.clone(), pod);
        v.apply(
            "MeshConfig",
            &json!({"kind": "MeshConfig", "metadata": {"name": "egress", "generation": 5},
            "spec": {"traffic": {"enableEgress": false}}}),
        )
        .unwrap();
        assert_eq!(v.mesh_generation(), 5);
        let r = v.resolve(Path::new("/nonexistent/kubepods")).unwrap();
        assert_eq!(r.pending.len(), 1);
        assert!(!r.config.mesh.traffic.enable_egress);
        let e = v
            .apply(
                "MeshConfig",
                &json!({"kind": "MeshConfig", "metadata": {"name": "egress", "generation": 6},
                "spec": {"traffic": {"enableEgres": false}}}),
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("kubernetes: MeshConfig egress: spec.traffic"),
            "{e}"
        );
        assert_eq!(v.mesh_generation(), 5);
    }
}
