//! The API-server side of Kubernetes mode: list/watch this node's pods (field selector
//! `spec.nodeName`) and the policy CRDs, keep the node's [`View`] current, and install it
//! through the same [`Control`] path as every standalone change.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt as _;
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::view::{Pod, View, KINDS};
use crate::{
    control::Control,
    gateway::services::{Services, SERVICE_NAME_LABEL},
    policy::{ConfigError, ObjectRef},
};

pub use super::pod::{GROUP, VERSION};
/// The startup taint the agent removes from its node once enforcement is in place.
pub const STARTUP_TAINT: &str = "egress.dev/agent-not-ready";

/// The API resource of a policy kind.
pub fn resource(kind: &str) -> ApiResource {
    let plural = KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, p, _)| *p)
        .unwrap_or("unknown");
    let (group, version) = super::pod::api(kind);
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// One event of one of the watched kinds ("Pod" or a policy kind).
type Change = (&'static str, watcher::Event<DynamicObject>);

/// EndpointSlices (of gateways' Services): watched like the policy kinds, kept apart.
pub const ENDPOINT_SLICE: &str = "EndpointSlice";

/// The watches, merged into one channel.
pub struct Watch {
    rx: mpsc::Receiver<Change>,
    /// Where EndpointSlices go (the node proxy reads them).
    services: Arc<Services>,
    /// Kinds still before their first complete list.
    unsynced: Vec<&'static str>,
    init: BTreeMap<&'static str, Vec<Value>>,
}

impl Watch {
    /// Starts watching the pods of `node`, the policy CRDs and the EndpointSlices of
    /// Services (all namespaces; the slices go to `services`).
    pub fn start(client: Client, node: &str, services: Arc<Services>) -> Watch {
        let (tx, rx) = mpsc::channel(1024);
        let pods = Api::<DynamicObject>::all_with(
            client.clone(),
            &ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
        );
        let by_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        spawn_watch("Pod", pods, by_node, tx.clone());
        let mut unsynced = vec!["Pod"];
        for (kind, _, _) in KINDS {
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource(kind));
            spawn_watch(kind, api, watcher::Config::default(), tx.clone());
            unsynced.push(kind);
        }
        let slices = Api::<DynamicObject>::all_with(
            client.clone(),
            &ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&()),
        );
        let of_services = watcher::Config::default().labels(SERVICE_NAME_LABEL);
        spawn_watch(ENDPOINT_SLICE, slices, of_services, tx.clone());
        unsynced.push(ENDPOINT_SLICE);
        Watch {
            rx,
            services,
            unsynced,
            init: BTreeMap::new(),
        }
    }

    pub fn synced(&self) -> bool {
        self.unsynced.is_empty()
    }

    /// Waits for the next event and applies it to `view`. Returns whether the view changed
    /// and the objects it rejected; None when every watch ended.
    pub async fn next(&mut self, view: &mut View) -> Option<(bool, Vec<ConfigError>)> {
        let (kind, event) = self.rx.recv().await?;
        Some(self.handle(view, kind, event))
    }

    fn handle(
        &mut self,
        view: &mut View,
        kind: &'static str,
        event: watcher::Event<DynamicObject>,
    ) -> (bool, Vec<ConfigError>) {
        let json = |o: &DynamicObject| serde_json::to_value(o).unwrap_or_default();
        match event {
            watcher::Event::Init => {
                self.init.insert(kind, Vec::new());
                (false, Vec::new())
            }
            watcher::Event::InitApply(o) => {
                self.init.entry(kind).or_default().push(json(&o));
                (false, Vec::new())
            }
            watcher::Event::InitDone => {
                let objs = self.init.remove(kind).unwrap_or_default();
                self.unsynced.retain(|k| *k != kind);
                if kind == ENDPOINT_SLICE {
                    self.services.relist(&objs);
                    (false, Vec::new())
                } else if kind == "Pod" {
                    view.pods = objs
                        .iter()
                        .filter_map(Pod::from_json)
                        .map(|p| (p.id.clone(), p))
                        .collect();
                    (true, Vec::new())
                } else {
                    (true, view.relist(kind, &objs))
                }
            }
            watcher::Event::Apply(o) if kind == ENDPOINT_SLICE => {
                self.services.apply(&json(&o));
                (false, Vec::new())
            }
            watcher::Event::Delete(o) if kind == ENDPOINT_SLICE => {
                self.services.delete(&json(&o));
                (false, Vec::new())
            }
            watcher::Event::Apply(o) if kind == "Pod" => match Pod::from_json(&json(&o)) {
                Some(p) => {
                    let changed = view.pods.get(&p.id) != Some(&p);
                    view.pods.insert(p.id.clone(), p);
                    (changed, Vec::new())
                }
                None => (false, Vec::new()),
            },
            watcher::Event::Delete(o) if kind == "Pod" => {
                let id = ObjectRef {
                    namespace: o.metadata.namespace.clone().unwrap_or_default(),
                    name: o.metadata.name.clone().unwrap_or_default(),
                };
                (view.pods.remove(&id).is_some(), Vec::new())
            }
            watcher::Event::Apply(o) => match view.apply(kind, &json(&o)) {
                Ok(changed) => (changed, Vec::new()),
                Err(e) => (false, vec![e]),
            },
            watcher::Event::Delete(o) => match view.delete(kind, &json(&o)) {
                Ok(changed) => (changed, Vec::new()),
                Err(e) => (false, vec![e]),
            },
        }
    }

    /// Applies events until every kind has been listed once: the first sync.
    pub async fn first_sync(&mut self, view: &mut View) -> anyhow::Result<Vec<ConfigError>> {
        let mut rejected = Vec::new();
        while !self.synced() {
            let (_, errs) = self
                .next(view)
                .await
                .ok_or_else(|| anyhow::anyhow!("the Kubernetes watches ended"))?;
            rejected.extend(errs);
        }
        Ok(rejected)
    }
}

fn spawn_watch(
    kind: &'static str,
    api: Api<DynamicObject>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Change>,
) {
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
        // A kind whose CRD is optional counts as listed (none) until its first list succeeds.
        let (mut listed, mut absent) = (false, false);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    listed |= matches!(event, watcher::Event::InitDone);
                    if tx.send((kind, event)).await.is_err() {
                        return;
                    }
                }
                Err(e) if super::pod::optional(kind) && !listed => {
                    if !absent {
                        info!(kind, error = %e, "cannot list this optional kind (CRD not installed?): none in force; trying again");
                        absent = true;
                        let _ = tx.send((kind, watcher::Event::InitDone)).await;
                    }
                }
                Err(e) => warn!(
                    kind,
                    error = %e,
                    "watch failed, retrying (for a policy kind: are the CRDs installed, `kubectl apply -k deploy/`? does the ServiceAccount's ClusterRole allow list/watch?)"
                ),
            }
        }
    });
}

/// `egress_policy_rejected`: policy objects refused, by kind. Registered in every mode (the
/// series exist only in Kubernetes mode).
#[derive(Clone, Debug, Default)]
pub struct RejectedMetrics {
    rejected: Family<KindLabels, Counter>,
}

/// `{kind}`: the kind of a policy object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl RejectedMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "egress_policy_rejected",
            "Policy objects refused (Kubernetes mode: invalid CRD objects; the previous version stays in force), by kind",
            m.rejected.clone(),
        );
        m
    }

    /// A policy object of `kind` was refused.
    pub fn inc(&self, kind: &str) {
        let labels = KindLabels { kind: kind.into() };
        self.rejected.get_or_create(&labels).inc();
    }
}

/// Reports rejected objects: a warning naming object and field, and the metric.
pub fn report(rejected: &[ConfigError], metrics: Option<&RejectedMetrics>) {
    for e in rejected {
        warn!(error = %e, "policy object rejected; its previous valid version (if any) stays in force");
        if let Some(m) = metrics {
            m.inc(e.object.split(' ').next().unwrap_or(""));
        }
    }
}

/// What is installed: the objects and the pods' cgroups.
pub type Installed = (crate::policy::Store, BTreeMap<ObjectRef, PathBuf>);

/// What the reconcile loop needs besides the view.
pub struct Node {
    pub client: Client,
    pub name: String,
    /// Warning Events on refused objects (`kubectl describe egress NAME` shows them).
    pub recorder: kube::runtime::events::Recorder,
    /// The MeshConfig whose status the node reports into when the policy has none.
    pub mesh_config: String,
    pub control: Arc<Control>,
    pub metrics: RejectedMetrics,
    /// The enrolled pods' own network namespaces, where the proxy listens.
    pub in_pod: tokio::sync::watch::Sender<Vec<PodNetns>>,
}

/// A pod with a network namespace of its own (not hostNetwork), found through a process of
/// its cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNetns {
    pub pod: ObjectRef,
    pub path: PathBuf,
    /// (device, inode) of the namespace: the same namespace under another process's path
    /// is the same pod network.
    pub id: (u64, u64),
}

impl crate::proxy::inpod::InPod for PodNetns {
    fn label(&self) -> String {
        self.pod.to_string()
    }
    fn netns_path(&self) -> PathBuf {
        self.path.clone()
    }
}

/// The namespaces of the enrolled pods that have their own, and whether some pod has no
/// process yet to find its namespace by.
fn pod_namespaces(dirs: &BTreeMap<ObjectRef, PathBuf>) -> (Vec<PodNetns>, bool) {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let node = id(std::path::Path::new("/proc/self/ns/net"));
    let mut out = Vec::new();
    let mut missing = false;
    for (pod, dir) in dirs {
        match super::cgroups::pod_netns(dir).and_then(|p| Some((id(&p)?, p))) {
            Some((ns, _)) if Some(ns) == node => {} // hostNetwork: the node's own listener
            Some((ns, path)) => out.push(PodNetns {
                pod: pod.clone(),
                path,
                id: ns,
            }),
            None => missing = true,
        }
    }
    (out, missing)
}

/// Keeps the node's enforcement equal to the view, until the watches end: installs after
/// every change (a burst of events is one install), retries pods whose cgroups the kubelet has
/// not made yet, and reports each node's generation in the MeshConfig status.
pub async fn reconcile(node: Node, mut watch: Watch, mut view: View, installed: Installed) {
    let mut installed = Some(installed);
    // Pods whose cgroup the kubelet has not made yet are looked for this often (inotify
    // below usually sees the cgroup first); until enrolled, the kernel refuses them.
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    let mut dirty = true;
    let mut last_error = String::new();
    let mut reported = Value::Null;
    let mut appeared = match super::appear::watch(&node.control.root.path) {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(error = %e, "cannot watch the kubepods cgroup for new pods; looking every 0.25 s instead");
            None
        }
    };
    // The objects the first sync refused.
    announce(&node, &view, &BTreeMap::new()).await;
    loop {
        if dirty {
            let before = view.refused().clone();
            // Coalesce a burst (a relist, a rollout) into one install, for at most 0.5 s.
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some((changed, errs))) = tokio::time::timeout(
                Duration::from_millis(50)
                    .min(until.saturating_duration_since(tokio::time::Instant::now())),
                watch.next(&mut view),
            )
            .await
            {
                dirty |= changed;
                report(&errs, Some(&node.metrics));
            }
            announce(&node, &view, &before).await;
            match install(&node, &view, &mut installed).await {
                Ok(pending) => {
                    report_status(&node, &view, &mut reported).await;
                    dirty = pending;
                    last_error.clear();
                }
                Err(e) => {
                    if e != last_error {
                        warn!(error = %e, "cannot install the node's policy; the previous one stays in force; retrying");
                    }
                    last_error = e;
                }
            }
        }
        let before = view.refused().clone();
        tokio::select! {
            ev = watch.next(&mut view) => match ev {
                Some((changed, errs)) => {
                    dirty |= changed || !errs.is_empty();
                    report(&errs, Some(&node.metrics));
                    announce(&node, &view, &before).await;
                }
                None => return,
            },
            _ = retry.tick() => dirty |= installed.is_none() || !last_error.is_empty(),
            Some(()) = async { appeared.as_mut()?.recv().await } => dirty = true,
        }
    }
}

/// A Warning Event (reason `Rejected`, from this node) on each object refused since
/// `before`, or refused for another reason. Failing to publish is not worth more than a debug
/// line: the log, the metric and the MeshConfig status say it too.
async fn announce(node: &Node, view: &View, before: &BTreeMap<super::view::Key, String>) {
    use kube::runtime::events::{Event, EventType};
    for (key, why) in view.refused() {
        if before.get(key) == Some(why) {
            continue;
        }
        let (kind, namespace, name) = key;
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(resource(kind).api_version),
            kind: Some(kind.clone()),
            namespace: (!namespace.is_empty()).then(|| namespace.clone()),
            name: Some(name.clone()),
            uid: view.uid(key).map(str::to_string),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "Rejected".into(),
            note: Some(why.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = node.recorder.publish(&event, &reference).await {
            debug!(error = %e, "cannot publish the rejection as an Event");
        }
    }
}

/// Installs the view when it differs from what is installed; Ok(true) while pods wait for
/// their cgroups.
async fn install(
    node: &Node,
    view: &View,
    installed: &mut Option<Installed>,
) -> Result<bool, String> {
    let r = view
        .resolve(&node.control.root.path)
        .map_err(|e| e.to_string())?;
    let pending = !r.pending.is_empty();
    if pending {
        debug!(pods = ?r.pending, "pods without a cgroup yet");
    }
    // Pods in their own network namespace get the tc backstop on their veth's node side: a
    // pod whose namespace appeared (its first process) needs an install too.
    let (namespaces, missing) = pod_namespaces(&r.dirs);
    let netns_changed = node.control.set_pod_netns(
        namespaces
            .iter()
            .map(|n| (n.pod.clone(), (n.id, n.path.clone())))
            .collect(),
    );
    let same = !netns_changed
        && installed
            .as_ref()
            .is_some_and(|(s, d)| *s == r.store && *d == r.dirs);
    if !same {
        let control = node.control.clone();
        let (store, dirs) = (r.store.clone(), r.dirs.clone());
        let what = format!("kubernetes sync: {} pods", r.dirs.len());
        tokio::task::spawn_blocking(move || {
            control.replace_cluster(store, &r.config, dirs, "kubernetes", &what)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        *installed = Some((r.store, r.dirs));
    }
    // The proxy listens inside each pod's own namespace: keep the list current (by
    // namespace identity, so a new first process of the same pod changes nothing).
    node.in_pod.send_if_modified(|cur| {
        let same = cur.len() == namespaces.len()
            && cur
                .iter()
                .zip(&namespaces)
                .all(|(a, b)| a.pod == b.pod && a.id == b.id);
        if !same {
            *cur = namespaces;
        }
        !same
    });
    Ok(pending || missing)
}

/// The node's entry in the MeshConfig status: the policy generation in force, the
/// MeshConfig generation it reflects and the objects it rejected.
/// Patches only when the entry changed since `reported`.
async fn report_status(node: &Node, view: &View, reported: &mut Value) {
    let name = view.mesh_name().unwrap_or(&node.mesh_config).to_string();
    let live = node.control.live.get();
    let entry = json!({
        "generation": node.control.generation(),
        "observedGeneration": view.mesh_generation(),
        "enableEgress": live.config.enable_egress != 0,
        "pods": live.workloads.len(),
        "rejected": view.rejected(),
    });
    if entry == *reported {
        return;
    }
    let patch = json!({"status": {"nodes": {node.name.clone(): entry.clone()}}});
    let api = Api::<DynamicObject>::all_with(node.client.clone(), &resource("MeshConfig"));
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        debug!(meshconfig = %name, error = %e, "cannot report the node's status");
        return;
    }
    *reported = entry;
}

/// Removes [`STARTUP_TAINT`] from the node, once: workloads the taint kept away may now be
/// scheduled, because enforcement is in place.
pub async fn remove_startup_taint(client: &Client, node: &str) -> Result<bool, kube::Error> {
    let api = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let n = api.get(node).await?;
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    let keep: Vec<_> = taints
        .iter()
        .filter(|t| t.key != STARTUP_TAINT)
        .cloned()
        .collect();
    if keep.len() == taints.len() {
        return Ok(false);
    }
    // The resourceVersion makes this a compare-and-swap: a concurrent taint change fails it.
    let patch = json!({
        "metadata": {"resourceVersion": n.metadata.resource_version},
        "spec": {"taints": keep},
    });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(node, taint = STARTUP_TAINT, "removed the startup taint");
    Ok(true)
}
