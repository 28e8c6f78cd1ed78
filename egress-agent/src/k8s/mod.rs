//! Kubernetes mode: one agent per node (a DaemonSet), the node's pods as workloads, and the
//! policy as CRDs (group `policy.egress.dev`, version `v1alpha1`: MeshConfig, Egress,
//! EgressGateway), validated exactly like the standalone file.
//!
//! - [`cgroups`]: where the kubelet puts a pod's cgroup (systemd and cgroupfs drivers,
//!   containerd and CRI-O), pure functions.
//! - [`view`]: the node's pods and the last valid version of each policy object, turned into
//!   the same `Config` a policy file gives.
//! - [`appear`]: inotify on the kubepods cgroup, so a new pod is enrolled at once.
//! - [`watch`]: list/watch against the API server, reconcile into `Control`, status reports,
//!   the startup taint; EndpointSlices go to the node proxy (gateways named by Service, see
//!   [`crate::gateway::services`]).
//! - [`toggle`]: `egress enable|disable|status --kubernetes`.

pub mod appear;
pub mod cgroups;
pub mod pod;
pub mod toggle;
pub mod view;
pub mod watch;

#[cfg(test)]
mod tests;

/// `egress-agent run --kubernetes`.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node (`spec.nodeName` of its pods), from the downward API.
    pub node: String,
    /// The MeshConfig the node reports into when none is in force yet.
    pub mesh_config: String,
}

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or, in a pod, the
/// ServiceAccount.
pub async fn client() -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (no kubeconfig and not in a pod?)")
}

/// The cluster as the agent found it at start.
pub struct Started {
    pub client: kube::Client,
    pub watch: watch::Watch,
    pub view: view::View,
    pub resolved: view::Resolved,
    /// The EndpointSlices of gateways named by Service (the node proxy reads them).
    pub services: std::sync::Arc<crate::gateway::services::Services>,
    /// Policy objects refused in the first sync (reported once metrics exist).
    pub rejected: Vec<crate::policy::ConfigError>,
}

/// Connects, lists the node's pods and the policy objects (the first sync), and resolves the
/// pods' cgroups under `root`. Nothing on the machine changes here.
pub async fn first_sync(
    opts: &Options,
    root: &std::path::Path,
    state_file: &std::path::Path,
) -> anyhow::Result<Started> {
    let client = client().await?;
    let services = std::sync::Arc::new(crate::gateway::services::Services::default());
    let mut watch = watch::Watch::start(client.clone(), &opts.node, services.clone());
    let mut view = view::View::default();
    if let Ok(saved) = std::fs::read_to_string(state_file) {
        let n = view.seed(&saved);
        tracing::info!(state_file = %state_file.display(), objects = n, "the last accepted policy objects stay in force where the cluster's are invalid");
    }
    tracing::info!(node = %opts.node, "waiting for the first list of pods and policy objects");
    let rejected = watch.first_sync(&mut view).await?;
    let resolved = view.resolve(root)?;
    Ok(Started {
        client,
        watch,
        view,
        resolved,
        services,
        rejected,
    })
}

/// After the first install: removes the startup taint, then keeps the node in sync.
pub async fn run(
    opts: Options,
    started: Started,
    control: std::sync::Arc<crate::control::Control>,
    metrics: watch::RejectedMetrics,
    in_pod: tokio::sync::watch::Sender<Vec<watch::PodNetns>>,
) {
    watch::report(&started.rejected, Some(&metrics));
    // A concurrent change to the node's taints fails the compare-and-swap: read and try again.
    for attempt in 1..=5 {
        match watch::remove_startup_taint(&started.client, &opts.node).await {
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 5 => continue,
            Err(e) => {
                tracing::warn!(node = %opts.node, error = %e, "cannot remove the startup taint {} (does the ClusterRole allow get/patch on nodes?)", watch::STARTUP_TAINT)
            }
            Ok(_) => {}
        }
        break;
    }
    let installed = (started.resolved.store, started.resolved.dirs);
    let reporter = kube::runtime::events::Reporter {
        controller: "egress-agent".into(),
        instance: Some(opts.node.clone()),
    };
    let node = watch::Node {
        recorder: kube::runtime::events::Recorder::new(started.client.clone(), reporter),
        client: started.client,
        name: opts.node,
        mesh_config: opts.mesh_config,
        control,
        metrics,
        in_pod,
    };
    watch::reconcile(node, started.watch, started.view, installed).await;
    tracing::warn!("the Kubernetes watches ended; the last policy stays in force");
}
