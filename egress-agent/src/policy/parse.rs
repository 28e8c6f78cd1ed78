//! Documents to policy objects: MeshConfig, Workload, Egress and EgressGateway.
//!
//! Parsing is strict (unknown kinds and fields are errors) and complete: every object is
//! validated before anything is compiled, and the first error names the file, the object and
//! the field path, e.g. `policy.yaml: Egress default/web-out: spec.ports[0].number: port 0 is
//! out of range 1-65535`. Kubernetes objects take the same way from their JSON
//! ([`Document::from_value`], [`object`]).

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use super::{
    anp,
    document::{documents, Document},
    error::ConfigError,
    fsm_gateway,
    model::{
        Config, Egress, EgressGateway, EgressSpec, GatewaySpec, MeshSpec, Network, ObjectRef,
        PolicyObject, Workload, API_VERSION,
    },
    netpol,
    validate::{check_egress, check_gateway, check_name, Objects},
};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The shape of every policy document.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object<S> {
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadSpec {
    #[serde(default)]
    network: Network,
    /// The ServiceAccount it runs as (sources of `kind: ServiceAccount`).
    #[serde(default)]
    service_account: Option<String>,
}

/// A Namespace (`v1`): only its labels matter (`namespaceSelector`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceSpec {
    #[serde(default)]
    #[allow(dead_code)]
    finalizers: Vec<String>,
}

/// OSM's and FSM's API groups: their Egress is read as written (the fields we cannot honour,
/// `matches` and `sources[].mtls`, are refused by name, as unknown fields).
pub const FOREIGN_EGRESS_APIS: [&str; 2] = [
    "policy.openservicemesh.io/v1alpha1",
    "policy.flomesh.io/v1alpha1",
];

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
    parse(&text, &file)
}

/// Parses and validates the text of a policy file (`file` names it in errors).
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    objects(&documents(text, file)?, file)?.finish()
}

/// Kubernetes mode: like [`parse`], but an Egress may name a source that is not among the
/// objects (a pod of another node, or one not scheduled yet): it applies to nobody here.
pub fn parse_unlinked(text: &str, file: &str) -> Result<Config, ConfigError> {
    objects(&documents(text, file)?, file)?.finish_unlinked()
}

/// The objects of `docs`, each validated on its own and against those before it; the
/// caller finishes with [`Objects::finish`] or [`Objects::finish_unlinked`].
pub fn objects<'a>(
    docs: impl IntoIterator<Item = &'a Document>,
    file: &str,
) -> Result<Objects, ConfigError> {
    let mut all = Objects::new(file);
    for doc in docs {
        all.add(object(doc, file)?)?;
    }
    Ok(all)
}

/// One document as a policy object, validated on its own.
pub fn object(doc: &Document, file: &str) -> Result<PolicyObject, ConfigError> {
    let label = doc.label();
    let err = |field: &str, reason: &str| ConfigError::new(file, &label, field, reason);
    let id = ObjectRef {
        namespace: doc.namespace.clone().unwrap_or_else(|| "default".into()),
        name: doc.name.clone(),
    };
    let ours = &[API_VERSION][..];
    let egress_apis = &[API_VERSION, FOREIGN_EGRESS_APIS[0], FOREIGN_EGRESS_APIS[1]][..];
    let object = match doc.kind.as_str() {
        "MeshConfig" => {
            let o: Object<MeshSpec> = typed(doc, file, ours)?;
            PolicyObject::Mesh {
                name: o.metadata.name,
                spec: o.spec.unwrap_or_default(),
            }
        }
        "Workload" => {
            let o: Object<WorkloadSpec> = typed(doc, file, ours)?;
            let (network, service_account) = o
                .spec
                .map(|s| (s.network, s.service_account))
                .unwrap_or_default();
            if let Some(sa) = &service_account {
                check_name(sa).map_err(|r| err("spec.serviceAccount", &r))?;
            }
            PolicyObject::Workload(Workload {
                id,
                labels: o.metadata.labels,
                network,
                service_account,
            })
        }
        "Namespace" => {
            let o: Object<NamespaceSpec> = typed(doc, file, &["v1"])?;
            PolicyObject::Namespace {
                name: o.metadata.name,
                labels: o.metadata.labels,
            }
        }
        "NetworkPolicy" => {
            let o: Object<netpol::Spec> = typed(doc, file, &[netpol::API_VERSION])?;
            let spec = o.spec.ok_or_else(|| err("spec", "missing"))?;
            PolicyObject::NetworkPolicy(netpol::from_spec(file, &label, id, spec)?)
        }
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
            let o: Object<anp::Spec> = typed(doc, file, &[anp::API_VERSION])?;
            let spec = o.spec.ok_or_else(|| err("spec", "missing"))?;
            let baseline = doc.kind.starts_with("Baseline");
            PolicyObject::Admin(anp::from_spec(file, &label, o.metadata.name, baseline, spec)?)
        }
        "Egress" => {
            let o: Object<EgressSpec> = typed(doc, file, egress_apis)?;
            let spec = o.spec.ok_or_else(|| err("spec", "missing"))?;
            check_egress(file, &label, &spec)?;
            PolicyObject::Egress(Egress { id, spec })
        }
        "EgressGateway" => {
            let fsm = fsm_gateway::ours(doc, file)?;
            let doc = fsm.as_ref().unwrap_or(doc);
            let o: Object<GatewaySpec> = typed(doc, file, ours)?;
            let spec = o.spec.ok_or_else(|| err("spec", "missing"))?;
            check_gateway(file, &label, &spec)?;
            PolicyObject::Gateway(EgressGateway { id, spec })
        }
        other => {
            return Err(err(
                "kind",
                &format!(
                "unknown kind {other:?} (expected MeshConfig, Workload, Egress, EgressGateway, NetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy or Namespace)"
            ),
            ))
        }
    };
    Ok(object)
}

/// The typed document, its apiVersion (one of `apis`, or none) and names checked.
fn typed<S: for<'de> Deserialize<'de>>(
    doc: &Document,
    file: &str,
    apis: &[&str],
) -> Result<Object<S>, ConfigError> {
    let o: Object<S> = doc.typed(file)?;
    let err = |field: &str, reason: String| ConfigError::new(file, &doc.label(), field, reason);
    if let Some(api) = o.api_version.as_deref().filter(|a| !apis.contains(a)) {
        let want: Vec<String> = apis.iter().map(|a| format!("{a:?}")).collect();
        return Err(err(
            "apiVersion",
            format!("{api:?} is not {}", want.join(" or ")),
        ));
    }
    check_name(&o.metadata.name).map_err(|r| err("metadata.name", r))?;
    if let Some(ns) = &o.metadata.namespace {
        check_name(ns).map_err(|r| err("metadata.namespace", r))?;
    }
    Ok(o)
}

#[cfg(test)]
mod gateway_tests;
#[cfg(test)]
mod sources_tests;
#[cfg(test)]
mod tests;
