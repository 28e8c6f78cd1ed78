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
//! The compiler ([`Isolation`]) turns the union into a deny, per LPM prefix, of every port
//! and protocol it does not allow; deny wins over everything else in the kernel's segments.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use egress_common::{action, proto, PortRule};
use serde::Deserialize;
use serde_json::Value;

use super::{
    error::ConfigError,
    model::{Allow, Block, Config, NetworkPolicy, ObjectRef},
    scalar::{self, Cidr},
    selector::{LabelSelector, Labels},
};

/// A workload's LPM prefixes (workload id, prefix length, address) → the rules given there.
pub type Prefixes<const N: usize> = BTreeMap<(u32, u8, [u8; N]), Vec<PortRule>>;

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

/// A NetworkPolicyPort as (first, last, protocol). Err: (field suffix, reason).
fn port(p: &PortDoc) -> Result<(u16, u16, u8), (String, String)> {
    let pr = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => {
            return Err((
                ".protocol".into(),
                format!("{other:?} is not TCP, UDP or SCTP"),
            ))
        }
    };
    let in_range = |n: i64, f: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| (f.to_string(), format!("port {n} is out of range 1-65535")))
    };
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

// ---- compiling -------------------------------------------------------------------------

/// The isolated workloads: workload id → (the rule id of the first NetworkPolicy selecting
/// it, what the policies selecting it allow).
#[derive(Debug, Default)]
pub struct Isolation {
    by_workload: BTreeMap<u32, (u32, Vec<Allow>)>,
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

impl Isolation {
    /// `selected(i)`: the workload ids NetworkPolicy `i` isolates; its rule id is
    /// `first_rule + i`.
    pub fn new(
        policies: &[NetworkPolicy],
        first_rule: u32,
        selected: impl Fn(&NetworkPolicy) -> BTreeSet<u32>,
    ) -> Isolation {
        let mut by_workload: BTreeMap<u32, (u32, Vec<Allow>)> = BTreeMap::new();
        for (i, np) in policies.iter().enumerate() {
            for wid in selected(np) {
                let e = by_workload
                    .entry(wid)
                    .or_insert_with(|| (first_rule + i as u32, Vec::new()));
                e.1.extend(np.egress.iter().flatten().cloned());
            }
        }
        Isolation { by_workload }
    }

    /// The prefixes each isolated workload needs in its LPM entries: everything, and every
    /// CIDR and exception its policies name (so that the longest match decides membership).
    pub fn prefixes(&self) -> impl Iterator<Item = (u32, Cidr)> + '_ {
        self.by_workload.iter().flat_map(|(wid, (_, allows))| {
            let named = allows
                .iter()
                .flat_map(|a| a.blocks.iter().flatten())
                .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()));
            [Cidr::ALL_V4, Cidr::ALL_V6]
                .into_iter()
                .chain(named)
                .map(|c| (*wid, c))
        })
    }

    /// The deny rules for prefix `(len, addr)` of workload `wid`: every port and protocol
    /// the NetworkPolicies selecting it do not allow there. Empty for an unisolated workload.
    pub fn denials<const N: usize>(&self, wid: u32, len: u8, addr: &[u8; N]) -> Vec<PortRule> {
        let Some((rule_id, allows)) = self.by_workload.get(&wid) else {
            return Vec::new();
        };
        let ip: IpAddr = if N == 4 {
            IpAddr::from(<[u8; 4]>::try_from(&addr[..4]).unwrap_or_default())
        } else {
            IpAddr::from(<[u8; 16]>::try_from(&addr[..]).unwrap_or_default())
        };
        let covers = |c: &Cidr| c.addr.is_ipv4() == (N == 4) && c.len <= len && c.contains(ip);
        let allowed: Vec<(u16, u16, u8)> = allows
            .iter()
            .filter(|a| match &a.blocks {
                None => true,
                Some(bs) => bs
                    .iter()
                    .any(|b| covers(&b.cidr) && !b.except.iter().any(covers)),
            })
            .flat_map(|a| {
                a.ports
                    .clone()
                    .unwrap_or_else(|| vec![(0, 65535, proto::ANY)])
            })
            .collect();
        let mut out = Vec::new();
        // TCP, UDP and every other protocol (SCTP among them) each have their own segments.
        for (class, p) in [
            (proto::TCP, proto::TCP),
            (proto::UDP, proto::UDP),
            (proto::SCTP, proto::SCTP),
        ] {
            let mut ranges: Vec<(u32, u32)> = allowed
                .iter()
                .filter(|(_, _, q)| *q == proto::ANY || *q == class)
                .map(|&(lo, hi, _)| (lo as u32, hi as u32))
                .collect();
            ranges.sort();
            let mut next = 0u32;
            for (lo, hi) in ranges {
                if lo > next {
                    out.push(deny(next, lo - 1, p, *rule_id));
                }
                next = next.max(hi + 1);
            }
            if next <= 65535 {
                out.push(deny(next, 65535, p, *rule_id));
            }
        }
        out
    }
}

/// The prefixes isolated workloads need, added to `v4` and `v6`; NetworkPolicy `i` of
/// `cfg` gets rule id `first_rule + i`.
pub fn isolate(
    cfg: &Config,
    ids: &BTreeMap<&ObjectRef, u32>,
    first_rule: u32,
    v4: &mut Prefixes<4>,
    v6: &mut Prefixes<16>,
) -> Isolation {
    let isolation = Isolation::new(&cfg.network_policies, first_rule, |np| {
        selected(cfg, ids, np)
    });
    for (wid, c) in isolation.prefixes() {
        if let Some(k) = key_of::<4>(&c) {
            v4.entry((wid, c.len, k)).or_default();
        }
        if let Some(k) = key_of::<16>(&c) {
            v6.entry((wid, c.len, k)).or_default();
        }
    }
    isolation
}

/// The workload ids NetworkPolicy `np` isolates.
pub fn selected(
    cfg: &Config,
    ids: &BTreeMap<&ObjectRef, u32>,
    np: &NetworkPolicy,
) -> BTreeSet<u32> {
    cfg.workloads
        .iter()
        .filter(|w| np.selects(&w.id.namespace, &w.labels))
        .filter_map(|w| ids.get(&w.id).copied())
        .collect()
}

/// `policy check`'s reason when a NetworkPolicy decided; None otherwise.
/// `rule`: the deciding rule's (kind, object).
pub fn explain(o: egress_common::Outcome, rule: Option<(&str, &ObjectRef)>) -> Option<String> {
    use egress_common::Outcome::*;
    let (_, id) = rule.filter(|(k, _)| *k == "NetworkPolicy")?;
    let what = "the workload is isolated for egress, and no NetworkPolicy selecting it allows this destination, port and protocol";
    Some(match o {
        AuditRule => format!(
            "would be refused by NetworkPolicy {}: {what}; allowed by auditMode",
            id
        ),
        _ => format!("refused by NetworkPolicy {}: {what}", id),
    })
}

fn deny(lo: u32, hi: u32, p: u8, rule_id: u32) -> PortRule {
    PortRule {
        port_lo: lo as u16,
        port_hi: hi as u16,
        proto: p,
        action: action::DENY,
        rule_id,
    }
}

/// The LPM key bytes of `c` when it is of the `N`-byte family.
fn key_of<const N: usize>(c: &Cidr) -> Option<[u8; N]> {
    match c.addr {
        IpAddr::V4(a) if N == 4 => <[u8; N]>::try_from(&scalar::mask(&a.octets(), c.len)[..]).ok(),
        IpAddr::V6(a) if N == 16 => <[u8; N]>::try_from(&scalar::mask(&a.octets(), c.len)[..]).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
