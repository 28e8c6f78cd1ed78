//! AdminNetworkPolicy and BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`),
//! their egress part, for destinations outside `meshCIDRs`: documents to [`AdminPolicy`].
//!
//! How they decide, with NetworkPolicy, is in `super::tiers`. Peers: `networks` are CIDRs;
//! `namespaces` and `pods` name in-cluster pods, which are the CNI's (they match nothing
//! outside the mesh); `nodes` and `domainNames` are refused by name (node addresses are not
//! watched, and names need the DNS-aware names work). `namedPort` is refused: a destination
//! outside the cluster has no named ports.

use serde::Deserialize;
use serde_json::Value;

use super::{
    error::ConfigError,
    model::{AdminAction, AdminPolicy, AdminRule, Allow, Block},
    netpol::{in_range, protocol},
    scalar::Cidr,
    selector::LabelSelector,
};

pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha1";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    priority: Option<i64>,
    subject: Subject,
    /// The CNI's: kept only to be accepted.
    #[serde(default)]
    #[allow(dead_code)]
    ingress: Option<Value>,
    #[serde(default)]
    egress: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subject {
    #[serde(default)]
    namespaces: Option<LabelSelector>,
    #[serde(default)]
    pods: Option<Pods>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Pods {
    namespace_selector: LabelSelector,
    pod_selector: LabelSelector,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    action: String,
    to: Vec<Peer>,
    #[serde(default)]
    ports: Option<Vec<PortDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Peer {
    #[serde(default)]
    namespaces: Option<LabelSelector>,
    #[serde(default)]
    pods: Option<Pods>,
    #[serde(default)]
    nodes: Option<Value>,
    #[serde(default)]
    networks: Option<Vec<Cidr>>,
    #[serde(default)]
    domain_names: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    #[serde(default)]
    port_number: Option<PortNumber>,
    #[serde(default)]
    port_range: Option<PortRange>,
    #[serde(default)]
    named_port: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortNumber {
    #[serde(default)]
    protocol: Option<String>,
    port: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortRange {
    #[serde(default)]
    protocol: Option<String>,
    start: i64,
    end: i64,
}

/// The typed spec of `name`, checked: errors name `file`, `label` and the field.
pub fn from_spec(
    file: &str,
    label: &str,
    name: String,
    baseline: bool,
    spec: Spec,
) -> Result<AdminPolicy, ConfigError> {
    let err = |field: &str, reason: String| ConfigError::new(file, label, field, reason);
    if baseline && name != "default" {
        return Err(err(
            "metadata.name",
            format!("{name:?}: the BaselineAdminNetworkPolicy must be named \"default\""),
        ));
    }
    let priority = match (baseline, spec.priority) {
        (true, None) => 0,
        (true, Some(_)) => return Err(err("spec.priority", "a baseline has no priority".into())),
        (false, None) => return Err(err("spec.priority", "missing".into())),
        (false, Some(p)) if (0..=1000).contains(&p) => p as u32,
        (false, Some(p)) => {
            return Err(err("spec.priority", format!("{p} is out of range 0-1000")))
        }
    };
    let (namespaces, pods) = match spec.subject {
        Subject {
            namespaces: Some(n),
            pods: None,
        } => (n, None),
        Subject {
            namespaces: None,
            pods: Some(p),
        } => (p.namespace_selector, Some(p.pod_selector)),
        _ => {
            return Err(err(
                "spec.subject",
                "give namespaces or pods, one of them".into(),
            ))
        }
    };
    for (f, sel) in [
        ("spec.subject.namespaces", Some(&namespaces)),
        ("spec.subject.pods.podSelector", pods.as_ref()),
    ] {
        if let Some(Err((field, reason))) = sel.map(|s| s.check()) {
            return Err(err(&format!("{f}.{field}"), reason));
        }
    }
    let mut rules = Vec::new();
    for (i, r) in spec.egress.iter().enumerate() {
        let f = format!("spec.egress[{i}]");
        let action = match (r.action.as_str(), baseline) {
            ("Allow", _) => AdminAction::Allow,
            ("Deny", _) => AdminAction::Deny,
            ("Pass", false) => AdminAction::Pass,
            (a, _) => {
                let want = if baseline {
                    "Allow or Deny"
                } else {
                    "Allow, Deny or Pass"
                };
                return Err(err(&format!("{f}.action"), format!("{a:?} is not {want}")));
            }
        };
        if r.to.is_empty() {
            return Err(err(
                &format!("{f}.to"),
                "at least one peer is required".into(),
            ));
        }
        let mut blocks = Vec::new();
        for (j, p) in r.to.iter().enumerate() {
            let pf = format!("{f}.to[{j}]");
            let given = [
                p.namespaces.is_some(),
                p.pods.is_some(),
                p.nodes.is_some(),
                p.networks.is_some(),
                p.domain_names.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(err(
                    &pf,
                    "give exactly one of namespaces, pods, networks".into(),
                ));
            }
            if p.nodes.is_some() {
                return Err(err(
                    &format!("{pf}.nodes"),
                    "node peers are not supported (node addresses are not watched)".into(),
                ));
            }
            if p.domain_names.is_some() {
                return Err(err(
                    &format!("{pf}.domainNames"),
                    "not supported yet (needs DNS-aware names); use networks".into(),
                ));
            }
            blocks.extend(p.networks.iter().flatten().map(|&cidr| Block {
                cidr,
                except: Vec::new(),
            }));
        }
        let ports = match &r.ports {
            None => None,
            Some(ps) => {
                let mut out = Vec::new();
                for (j, p) in ps.iter().enumerate() {
                    let pf = format!("{f}.ports[{j}]");
                    out.push(
                        port(p).map_err(|(field, reason)| err(&format!("{pf}{field}"), reason))?,
                    );
                }
                Some(out)
            }
        };
        // Only in-cluster peers: it matches nothing outside the mesh.
        if blocks.is_empty() {
            continue;
        }
        rules.push(AdminRule {
            action,
            to: Allow {
                blocks: Some(blocks),
                ports,
            },
        });
    }
    Ok(AdminPolicy {
        name,
        baseline,
        priority,
        namespaces,
        pods,
        rules,
    })
}

/// One AdminNetworkPolicyPort as (first, last, protocol). Err: (field suffix, reason).
fn port(p: &PortDoc) -> Result<(u16, u16, u8), (String, String)> {
    match p {
        PortDoc { port_number: Some(n), port_range: None, named_port: None } => {
            let pr = protocol(n.protocol.as_deref()).map_err(|r| (".portNumber.protocol".to_string(), r))?;
            let port = in_range(n.port, ".portNumber.port")?;
            Ok((port, port, pr))
        }
        PortDoc { port_number: None, port_range: Some(r), named_port: None } => {
            let pr = protocol(r.protocol.as_deref()).map_err(|e| (".portRange.protocol".to_string(), e))?;
            let (lo, hi) = (in_range(r.start, ".portRange.start")?, in_range(r.end, ".portRange.end")?);
            if hi < lo {
                return Err((".portRange.end".into(), format!("end {hi} is below start {lo}")));
            }
            Ok((lo, hi, pr))
        }
        PortDoc { named_port: Some(n), port_number: None, port_range: None } => Err((
            ".namedPort".into(),
            format!("named port {n:?}: a destination outside the cluster has no named ports; use portNumber"),
        )),
        _ => Err((String::new(), "give exactly one of portNumber, portRange, namedPort".into())),
    }
}
