//! FSM's EgressGateway (`policy.flomesh.io/v1alpha1`) as ours: `spec.global: [{service,
//! namespace, weight}]` becomes `spec.global: [{service: {name, namespace}, mode}]`.
//!
//! FSM keeps the gateway's mode on its Service (annotation `flomesh.io/egress-gateway-mode`,
//! `http2tunnel` or `sock5`, default `http2tunnel`). The agent does not read Services (its
//! ClusterRole grants EndpointSlices only), so the mode is taken from the same annotation on
//! the EgressGateway itself, or FSM's default. What we cannot honour is refused by name:
//! `spec.rules` (gateways bound to named Egress policies), `spec.matches`, and more than one
//! Service (FSM balances by weight; one Service has all the weight).

use serde::Deserialize;
use serde_json::{json, Value};

use super::{document::Document, error::ConfigError, model::API_VERSION};

/// FSM's API group (the same as its Egress).
pub const FSM_API: &str = "policy.flomesh.io/v1alpha1";

/// The annotations that say the mode (FSM's current and its OSM-era key).
pub const MODE_ANNOTATIONS: [&str; 2] = [
    "flomesh.io/egress-gateway-mode",
    "openservicemesh.io/egress-gateway-mode",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    global: Vec<Binding>,
    #[serde(default)]
    rules: Option<Value>,
    #[serde(default)]
    matches: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Binding {
    service: String,
    namespace: String,
    #[serde(default)]
    #[allow(dead_code)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
struct Fsm {
    spec: Option<Spec>,
}

/// Whether `doc` is FSM's EgressGateway.
pub fn is_fsm(doc: &Document) -> bool {
    doc.kind == "EgressGateway" && doc.body.get("apiVersion") == Some(&Value::from(FSM_API))
}

/// `doc` as our EgressGateway, when it is FSM's; None otherwise.
pub fn ours(doc: &Document, file: &str) -> Result<Option<Document>, ConfigError> {
    if !is_fsm(doc) {
        return Ok(None);
    }
    let label = doc.label();
    let err = |field: &str, reason: &str| ConfigError::new(file, &label, field, reason);
    // The rest of the body is checked by our parser afterwards; the spec is FSM's.
    let fsm: Fsm = doc.typed(file)?;
    let spec = fsm.spec.ok_or_else(|| err("spec", "missing"))?;
    if spec.rules.is_some() {
        return Err(err("spec.rules", "FSM's gateway rules (gateways bound to named Egress policies) are not supported: give the Service in spec.global, or convert it and name the gateway from each Egress (spec.gateway)"));
    }
    if spec.matches.is_some() {
        return Err(err(
            "spec.matches",
            "route matches (HTTPRouteGroup) on a gateway are not supported",
        ));
    }
    match spec.global.len() {
        0 => return Err(err("spec.global", "give the gateway's Service")),
        1 => {}
        _ => return Err(err("spec.global[1]", "one Service per gateway: FSM balances several by weight, which is not supported; keep one (its endpoints are balanced)")),
    }
    let annotations = doc.body.pointer("/metadata/annotations");
    let written = MODE_ANNOTATIONS
        .iter()
        .find_map(|k| Some((*k, annotations?.get(*k)?)));
    let mode = match written {
        None => "http2tunnel",
        Some((_, m)) if m == "http2tunnel" => "http2tunnel",
        Some((_, m)) if m == "sock5" || m == "socks5" => "socks5",
        Some((k, m)) => {
            return Err(err(
                &format!("metadata.annotations.{k}"),
                &format!("{m} is not http2tunnel or sock5"),
            ))
        }
    };
    let b = &spec.global[0];
    let mut body = doc.body.clone();
    body["apiVersion"] = Value::from(API_VERSION);
    // Ours is cluster-scoped; the Service names its namespace.
    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("namespace");
    }
    body["spec"] = json!({"global": [{
        "service": {"name": b.service, "namespace": b.namespace},
        "mode": mode,
    }]});
    Document::from_value(body, doc.index, file).map(Some)
}
