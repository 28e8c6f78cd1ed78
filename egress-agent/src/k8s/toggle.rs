//! `egress-agent egress enable|disable|status --kubernetes`: the mesh-wide toggle in a
//! cluster. It patches the MeshConfig object (`spec.traffic.enableEgress`), as OSM and FSM
//! do, so every node's agent converges; each agent reports in the MeshConfig's
//! `status.nodes.<node>` the MeshConfig generation it enforces (`observedGeneration`) and
//! its own policy generation, and the command waits until every reporting node caught up.

use std::time::{Duration, Instant};

use kube::{
    api::{DynamicObject, Patch, PatchParams},
    Api, Client,
};
use serde_json::{json, Value};

use super::watch::resource;
use crate::admin::{cli::Output, client::Failed};

/// One node's report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeReport {
    pub node: String,
    pub generation: u64,
    pub observed_generation: i64,
    pub enable_egress: bool,
    pub rejected: Vec<String>,
}

fn reports(mesh: &Value) -> Vec<NodeReport> {
    let Some(nodes) = mesh.pointer("/status/nodes").and_then(Value::as_object) else {
        return Vec::new();
    };
    nodes
        .iter()
        .map(|(node, r)| NodeReport {
            node: node.clone(),
            generation: r["generation"].as_u64().unwrap_or(0),
            observed_generation: r["observedGeneration"].as_i64().unwrap_or(0),
            enable_egress: r["enableEgress"].as_bool().unwrap_or(false),
            rejected: r["rejected"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

fn failed(e: impl std::fmt::Display, status: u8) -> Failed {
    Failed {
        message: e.to_string(),
        status,
    }
}

/// `enable`: Some(flag) patches the MeshConfig first; None only shows the nodes.
pub fn run(
    enable: Option<bool>,
    mesh_config: &str,
    wait: Duration,
    out: Output,
) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(e, 1))?;
    rt.block_on(async {
        let client = Client::try_default()
            .await
            .map_err(|e| failed(format!("cannot reach the Kubernetes API: {e}"), 1))?;
        let (reports, generation) = toggle(client, enable, mesh_config, wait).await?;
        print(&reports, generation, enable, out);
        let lagging = reports
            .iter()
            .filter(|r| r.observed_generation < generation)
            .count();
        if enable.is_some() && lagging > 0 {
            return Err(failed(
                format!(
                    "{lagging} of {} nodes did not report MeshConfig generation {generation} within {}s",
                    reports.len(),
                    wait.as_secs()
                ),
                1,
            ));
        }
        Ok(())
    })
}

/// Patches (when `enable` is Some) and waits up to `wait` for every node that reports to
/// enforce the new MeshConfig generation. Returns the reports and that generation.
pub async fn toggle(
    client: Client,
    enable: Option<bool>,
    mesh_config: &str,
    wait: Duration,
) -> Result<(Vec<NodeReport>, i64), Failed> {
    let api = Api::<DynamicObject>::all_with(client, &resource("MeshConfig"));
    let not_found = |e: kube::Error| {
        match e {
        kube::Error::Api(s) if s.code == 404 => failed(
            format!("no MeshConfig {mesh_config:?} in the cluster (kubectl get meshconfigs; see deploy/examples/)"),
            2,
        ),
        e => failed(e, 1),
    }
    };
    let obj = match enable {
        Some(flag) => {
            let patch = json!({"spec": {"traffic": {"enableEgress": flag}}});
            api.patch(mesh_config, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(not_found)?
        }
        None => api.get(mesh_config).await.map_err(not_found)?,
    };
    let generation = obj.metadata.generation.unwrap_or(0);
    let deadline = Instant::now() + wait;
    loop {
        let now = serde_json::to_value(api.get(mesh_config).await.map_err(not_found)?)
            .unwrap_or_default();
        let r = reports(&now);
        let done = !r.is_empty() && r.iter().all(|n| n.observed_generation >= generation);
        if done || enable.is_none() || Instant::now() >= deadline {
            return Ok((r, generation));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print(reports: &[NodeReport], generation: i64, enable: Option<bool>, out: Output) {
    if out == Output::Json {
        let v = json!({"meshConfigGeneration": generation, "nodes": reports});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if let Some(flag) = enable {
        println!(
            "MeshConfig patched: enableEgress {flag} (generation {generation}); nodes report:"
        );
    }
    if reports.is_empty() {
        println!(
            "no node has reported yet (are the agents running? kubectl -n egress-system get pods)"
        );
        return;
    }
    println!(
        "{:<32} {:>10} {:>10} {:>8}  STATE",
        "NODE", "POLICY-GEN", "MESH-GEN", "EGRESS"
    );
    for r in reports {
        let state = if r.observed_generation >= generation {
            "converged"
        } else {
            "pending"
        };
        println!(
            "{:<32} {:>10} {:>10} {:>8}  {state}",
            r.node,
            r.generation,
            r.observed_generation,
            if r.enable_egress { "on" } else { "off" }
        );
        for e in &r.rejected {
            println!("    rejected: {e}");
        }
    }
}
