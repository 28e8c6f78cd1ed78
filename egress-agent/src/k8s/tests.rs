//! The watcher, the startup taint and the cluster toggle against [`FakeApiServer`] (a fake:
//! an in-process server speaking the real list/watch JSON, from the `egress-test-support`
//! dev-dependency), through the real kube client.

use std::time::Duration;

use egress_test_support::{wait_until_async, FakeApiServer};
use serde_json::{json, Value};

use super::{
    toggle,
    view::View,
    watch::{remove_startup_taint, Watch, STARTUP_TAINT},
};
use crate::policy::ObjectRef;

fn client(fake: &FakeApiServer) -> kube::Client {
    let cfg = kube::Config::new(fake.url().parse().unwrap());
    kube::Client::try_from(cfg).unwrap()
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
           "status": {"qosClass": "Burstable"}})
}

fn egress(port: i64) -> Value {
    json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
           "metadata": {"name": "web-out", "namespace": "shop"},
           "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ipAddresses": ["127.0.0.0/8"], "ports": [{"number": port}]}})
}

fn id(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// Applies events until `done` holds (or fails after 10 s); returns the rejections seen.
async fn until(watch: &mut Watch, view: &mut View, done: impl Fn(&View) -> bool) -> Vec<String> {
    let mut rejected = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(view) {
        let (_, errs) = tokio::time::timeout_at(deadline, watch.next(view))
            .await
            .expect("the watcher never delivered the expected state")
            .expect("watch ended");
        rejected.extend(errs.iter().map(|e| e.to_string()));
    }
    rejected
}

#[tokio::test]
async fn watcher_follows_node_pods_and_keeps_the_last_valid_policy() {
    let fake = FakeApiServer::start();
    fake.put("pods", pod("web-1", "node-a"));
    fake.put("pods", pod("web-2", "node-b"));
    fake.put("egresses", egress(443));
    fake.put(
        "meshconfigs",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "MeshConfig",
               "metadata": {"name": "egress"}, "spec": {"traffic": {"enableEgress": false}}}),
    );
    let mut watch = Watch::start(client(&fake), "node-a", Default::default());
    let mut view = View::default();
    let rejected = watch.first_sync(&mut view).await.unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    // Only this node's pods: the field selector went to the server.
    assert_eq!(view.pods.keys().cloned().collect::<Vec<_>>(), [id("web-1")]);
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName=node-a")));
    let r = view
        .resolve(std::path::Path::new("/nonexistent/kubepods"))
        .unwrap();
    assert_eq!(r.config.egresses.len(), 1);
    assert!(!r.config.mesh.traffic.enable_egress);
    assert_eq!(view.mesh_generation(), 1);

    // Churn: a pod on this node comes, one goes; another node's pod is never seen.
    fake.put("pods", pod("web-3", "node-a"));
    fake.put("pods", pod("web-4", "node-b"));
    fake.delete("pods", "shop", "web-1");
    until(&mut watch, &mut view, |v| {
        v.pods.keys().cloned().collect::<Vec<_>>() == [id("web-3")]
    })
    .await;

    // The server ends every watch (its timeout, a restart): the watcher resumes from the
    // last resourceVersion and misses nothing.
    fake.end_watches();
    let pod_watches = |fake: &FakeApiServer| {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
            .count()
    };
    // The change below comes after the watcher watches again, so it must resume, not list.
    assert!(
        wait_until_async(Duration::from_secs(10), || pod_watches(&fake) >= 2).await,
        "the pod watch was not resumed: {:?}",
        fake.requests()
    );
    fake.put("pods", pod("web-5", "node-a"));
    until(&mut watch, &mut view, |v| v.pods.contains_key(&id("web-5"))).await;
    assert!(pod_watches(&fake) >= 2, "{:?}", fake.requests());

    // A bad change to the Egress is reported, naming object and field; the old one stays.
    fake.put("egresses", egress(0));
    let errs = until(&mut watch, &mut view, |v| !v.rejected().is_empty()).await;
    assert_eq!(
        errs,
        ["kubernetes: Egress shop/web-out: spec.ports[0].number: port 0 is out of range 1-65535"]
    );
    let r = view
        .resolve(std::path::Path::new("/nonexistent/kubepods"))
        .unwrap();
    assert_eq!(r.config.egresses[0].spec.ports[0].number.0, 443);
    // Fixed: accepted, and the rejection is gone.
    fake.put("egresses", egress(8443));
    until(&mut watch, &mut view, |v| v.rejected().is_empty()).await;
    let r = view
        .resolve(std::path::Path::new("/nonexistent/kubepods"))
        .unwrap();
    assert_eq!(r.config.egresses[0].spec.ports[0].number.0, 8443);
    fake.delete("egresses", "shop", "web-out");
    until(&mut watch, &mut view, |v| {
        v.resolve(std::path::Path::new("/x"))
            .unwrap()
            .config
            .egresses
            .is_empty()
    })
    .await;
}

#[tokio::test]
async fn the_startup_taint_goes_and_other_taints_stay() {
    let fake = FakeApiServer::start();
    fake.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
               "spec": {"taints": [
                   {"key": STARTUP_TAINT, "effect": "NoSchedule"},
                   {"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
    );
    let c = client(&fake);
    assert!(remove_startup_taint(&c, "node-a").await.unwrap());
    let n = fake.get("nodes", "", "node-a").unwrap();
    assert_eq!(
        n["spec"]["taints"],
        json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])
    );
    assert!(!remove_startup_taint(&c, "node-a").await.unwrap());
}

#[tokio::test]
async fn toggle_patches_the_meshconfig_and_waits_for_every_node() {
    let fake = FakeApiServer::start();
    fake.put(
        "meshconfigs",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "MeshConfig",
               "metadata": {"name": "egress"}, "spec": {"traffic": {"enableEgress": true}},
               "status": {"nodes": {
                   "node-a": {"generation": 3, "observedGeneration": 1, "enableEgress": true},
                   "node-b": {"generation": 7, "observedGeneration": 1, "enableEgress": true}}}}),
    );
    let c = client(&fake);
    // Two "agents" converge once the toggle's change is there, as a real node would after
    // its watch event.
    let f = std::sync::Arc::new(fake);
    let agents = {
        let f = f.clone();
        tokio::spawn(async move {
            let disabled = || {
                f.get("meshconfigs", "", "egress").unwrap()["spec"]["traffic"]["enableEgress"]
                    == json!(false)
            };
            assert!(
                wait_until_async(Duration::from_secs(10), disabled).await,
                "the toggle never patched the MeshConfig"
            );
            let mut m = f.get("meshconfigs", "", "egress").unwrap();
            assert_eq!(m["spec"]["traffic"]["enableEgress"], json!(false));
            let g = m["metadata"]["generation"].clone();
            m["status"]["nodes"]["node-a"] =
                json!({"generation": 4, "observedGeneration": g, "enableEgress": false});
            m["status"]["nodes"]["node-b"] = json!({"generation": 8, "observedGeneration": g, "enableEgress": false,
                "rejected": ["kubernetes: Egress shop/x: spec.ports[0].number: port 0 is out of range 1-65535"]});
            f.put("meshconfigs", m);
        })
    };
    let (reports, generation) =
        toggle::toggle(c.clone(), Some(false), "egress", Duration::from_secs(10))
            .await
            .unwrap();
    agents.await.unwrap();
    assert_eq!(generation, 2);
    assert_eq!(reports.len(), 2);
    assert!(reports
        .iter()
        .all(|r| r.observed_generation == 2 && !r.enable_egress));
    assert_eq!(reports[1].rejected.len(), 1);
    // A node that does not converge is reported as such after the wait.
    let (reports, generation) =
        toggle::toggle(c.clone(), Some(true), "egress", Duration::from_millis(500))
            .await
            .unwrap();
    assert_eq!(generation, 3);
    assert!(reports.iter().all(|r| r.observed_generation < generation));
    let e = toggle::toggle(c, Some(true), "nope", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.status, 2, "{}", e.message);
}
