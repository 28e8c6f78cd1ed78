//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`), its egress part, for destinations
//! outside `meshCIDRs`.
//!
//! Semantics (the standard ones): a workload selected by at least one NetworkPolicy whose
//! `policyTypes` include `Egress` is *isolated*: it may reach only the union of what the
//! `egress` rules of those policies allow (`ipBlock` `cidr` minus `except`, `ports` with
//! `protocol` and `endPort`; no `to`: every destination; no `ports`: every port and
//! protocol). A workload selected by none is untouched by NetworkPolicy.
//!
//! With Egress objects and `enableEgress`: both must allow. Where NetworkPolicy refuses, the
//! connection is refused (EPERM) whatever an Egress says; where it allows, the Egress rules
//! and `enableEgress` decide as they would without it.
//!
//! Pod and namespace peers (`podSelector`, `namespaceSelector`) name in-cluster pods, whose
//! addresses lie in `meshCIDRs` and are the CNI's to enforce: they allow nothing outside the
//! mesh here. `ingress` rules are the CNI's too and are not read.
//!
//! The compiler (`super::tiers`) turns the union into a deny, per LPM prefix, of every port
//! and protocol it does not allow; deny wins over everything else in the kernel's segments.

use egress_common::proto;
use serde::Deserialize;
use serde_json::Value;

use super::{
    error::ConfigError,
    model::{Allow, Block, NetworkPolicy, ObjectRef},
    scalar::Cidr,
    selector::{LabelSelector, Labels},
};

pub const API_VERSION: &str = "networking.k8s.io/v1";

// ---- the document ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pod_selector: LabelSelector,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
    /// The CNI's: kept only to be accepted.
    #[serde(default)]
    #[allow(dead_code)]
    ingress: Option<Value>,
    #[serde(default)]
    egress: Option<Vec<Rule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    to: Vec<Peer>,
    #[serde(default)]
    ports: Vec<PortDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Peer {
    #[serde(default)]
    ip_block: Option<IpBlock>,
    #[serde(default)]
    pod_selector: Option<LabelSelector>,
    #[serde(default)]
    namespace_selector: Option<LabelSelector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlock {
    cidr: Cidr,
    #[serde(default)]
    except: Vec<Cidr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<Value>,
    #[serde(default)]
    end_port: Option<i64>,
}

/// The typed spec, checked: errors name `file`, `label` and the field.
pub fn from_spec(
    file: &str,
    label: &str,
    id: ObjectRef,
    spec: Spec,
) -> Result<NetworkPolicy, ConfigError> {
    let err = |field: &str, reason: String| ConfigError::new(file, label, field, reason);
    let sel_err = |f: &str, (field, reason): (String, String)| err(&format!("{f}.{field}"), reason);
    spec.pod_selector
        .check()
        .map_err(|e| sel_err("spec.podSelector", e))?;
    let types = match &spec.policy_types {
        Some(t) => {
            for (i, x) in t.iter().enumerate() {
                if x != "Ingress" && x != "Egress" {
                    return Err(err(
                        &format!("spec.policyTypes[{i}]"),
                        format!("{x:?} is not Ingress or Egress"),
                    ));
                }
            }
            t.iter().any(|x| x == "Egress")
        }
        // As Kubernetes defaults it: Egress when there are egress rules.
        None => spec.egress.is_some(),
    };
    let mut allows = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let f = format!("spec.egress[{i}]");
        let mut blocks = Vec::new();
        for (j, p) in r.to.iter().enumerate() {
            let pf = format!("{f}.to[{j}]");
            for (name, sel) in [
                ("podSelector", &p.pod_selector),
                ("namespaceSelector", &p.namespace_selector),
            ] {
                if let Some(s) = sel {
                    s.check().map_err(|e| sel_err(&format!("{pf}.{name}"), e))?;
                }
            }
            let Some(b) = &p.ip_block else {
                if p.pod_selector.is_none() && p.namespace_selector.is_none() {
                    return Err(err(
                        &pf,
                        "give ipBlock, podSelector or namespaceSelector".into(),
                    ));
                }
                // In-cluster pods: the CNI's (see the module documentation).
                continue;
            };
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(err(
                    &format!("{pf}.ipBlock"),
                    "ipBlock cannot be combined with podSelector or namespaceSelector".into(),
                ));
            }
            for (k, e) in b.except.iter().enumerate() {
                let inside = e.addr.is_ipv4() == b.cidr.addr.is_ipv4()
                    && e.len > b.cidr.len
                    && b.cidr.contains(e.addr);
                if !inside {
                    return Err(err(
                        &format!("{pf}.ipBlock.except[{k}]"),
                        format!("{e} is not a strict subnet of {}", b.cidr),
                    ));
                }
            }
            blocks.push(Block {
                cidr: b.cidr,
                except: b.except.clone(),
            });
        }
        // Only pod or namespace peers: nothing outside the mesh.
        if !r.to.is_empty() && blocks.is_empty() {
            continue;
        }
        let mut ports = Vec::new();
        for (j, p) in r.ports.iter().enumerate() {
            ports.push(
                port(p)
                    .map_err(|(field, reason)| err(&format!("{f}.ports[{j}]{field}"), reason))?,
            );
        }
        allows.push(Allow {
            blocks: (!r.to.is_empty()).then_some(blocks),
            ports: (!r.ports.is_empty()).then_some(ports),
        });
    }
    Ok(NetworkPolicy {
        id,
        pod_selector: spec.pod_selector,
        egress: types.then_some(allows),
    })
}

/// A Kubernetes protocol name (TCP when none) as [`proto`].
pub fn protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(proto::SCTP),
        other => Err(format!("{other:?} is not TCP, UDP or SCTP")),
    }
}

/// A port number `n` (field suffix `f`) in 1-65535.
pub fn in_range(n: i64, f: &str) -> Result<u16, (String, String)> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| (f.to_string(), format!("port {n} is out of range 1-65535")))
}

/// A NetworkPolicyPort as (first, last, protocol). Err: (field suffix, reason).
fn port(p: &PortDoc) -> Result<(u16, u16, u8), (String, String)> {
    let pr = protocol(p.protocol.as_deref()).map_err(|r| (".protocol".to_string(), r))?;
    let lo = match &p.port {
        None => {
            if p.end_port.is_some() {
                return Err((".endPort".into(), "endPort needs port".into()));
            }
            return Ok((0, 65535, pr));
        }
        Some(Value::Number(n)) => in_range(n.as_i64().unwrap_or(-1), ".port")?,
        Some(Value::String(s)) => {
            return Err((
                ".port".into(),
                format!("named port {s:?}: a destination outside the cluster has no named ports; give the number"),
            ))
        }
        Some(_) => return Err((".port".into(), "must be a number".into())),
    };
    let hi = match p.end_port {
        Some(e) => in_range(e, ".endPort")?,
        None => lo,
    };
    if hi < lo {
        return Err((
            ".endPort".into(),
            format!("endPort {hi} is below port {lo}"),
        ));
    }
    Ok((lo, hi, pr))
}

impl NetworkPolicy {
    /// Whether it isolates workload `(ns, labels)` for egress.
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        self.egress.is_some() && self.id.namespace == namespace && self.pod_selector.matches(labels)
    }

    /// Every CIDR it allows (for `policy list`); empty: every destination.
    pub fn cidrs(&self) -> Vec<Cidr> {
        let allows = self.egress.iter().flatten();
        let all = allows.clone().any(|a| a.blocks.is_none());
        if all {
            return Vec::new();
        }
        allows
            .flat_map(|a| a.blocks.iter().flatten().map(|b| b.cidr))
            .collect()
    }

    /// Every port range it allows; empty: every port.
    pub fn ports(&self) -> Vec<(u16, u16, u8)> {
        let allows = self.egress.iter().flatten();
        if allows.clone().any(|a| a.ports.is_none()) {
            return Vec::new();
        }
        allows
            .flat_map(|a| a.ports.iter().flatten().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests;
