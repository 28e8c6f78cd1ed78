//! The Kubernetes tiers of a workload's egress, compiled into the kernel's entries:
//! AdminNetworkPolicy, then NetworkPolicy, then the BaselineAdminNetworkPolicy.
//!
//! For a connection of a workload to a destination outside `meshCIDRs`:
//! 1. The AdminNetworkPolicies that select the workload, lowest `priority` first (equal
//!    priorities: by name), their rules in order: the first whose `networks` and `ports` match
//!    decides. `Allow`: allowed (NetworkPolicy and the baseline are not asked). `Deny`:
//!    refused. `Pass`: the remaining admin rules are skipped, NetworkPolicy decides.
//! 2. If NetworkPolicies isolate the workload for egress: allowed if one of them allows it
//!    (see `super::netpol`), refused otherwise.
//! 3. The BaselineAdminNetworkPolicy's rules in order: the first that matches decides.
//! 4. Otherwise allowed.
//!
//! What these tiers allow, the Egress objects and `enableEgress` then judge as without them:
//! both must allow. The tiers' refusals become deny rules per LPM prefix (deny wins over
//! everything in the kernel's segments), computed for each prefix exactly (not inherited by
//! longer ones): every CIDR the tiers name is a prefix of the workload's entries, so the
//! longest match says which CIDRs contain the destination.

use std::collections::{BTreeMap, BTreeSet};

use egress_common::{action, proto, PortRule};

use super::{
    model::{AdminAction, AdminPolicy, Allow, Config, NetworkPolicy, ObjectRef},
    scalar::{self, Cidr},
};

/// A workload's LPM prefixes (workload id, prefix length, address) → the rules given there.
pub type Prefixes<const N: usize> = BTreeMap<(u32, u8, [u8; N]), Vec<PortRule>>;

/// (action, rule id, where): a rule of an admin tier.
type Ruled = (AdminAction, u32, Allow);

/// What decides for one workload.
#[derive(Debug, Default)]
struct Chain {
    admin: Vec<Ruled>,
    /// NetworkPolicy isolation: the rule id of the first policy selecting it, and the union.
    isolated: Option<(u32, Vec<Allow>)>,
    baseline: Vec<Ruled>,
}

/// The workloads some tier applies to.
#[derive(Debug, Default)]
pub struct Tiers {
    by_workload: BTreeMap<u32, Chain>,
}

/// One object of the tiers, as `policy list` and the flow log name it.
pub struct TierObject {
    pub kind: &'static str,
    pub id: ObjectRef,
    pub rule_id: u32,
    pub workloads: BTreeSet<u32>,
    pub cidrs: Vec<Cidr>,
    pub ports: Vec<(u16, u16, u8)>,
}

impl Tiers {
    /// The tiers of `cfg`'s workloads (ids `ids`); their objects get rule ids from
    /// `first_rule` on (NetworkPolicies, then admin policies, in `cfg` order), returned in
    /// that order. The prefixes the tiers need are added to `v4` and `v6`.
    pub fn new(
        cfg: &Config,
        ids: &BTreeMap<&ObjectRef, u32>,
        first_rule: u32,
        v4: &mut Prefixes<4>,
        v6: &mut Prefixes<16>,
    ) -> (Tiers, Vec<TierObject>) {
        let mut by_workload: BTreeMap<u32, Chain> = BTreeMap::new();
        let mut objects = Vec::new();
        let mut rule_id = first_rule;
        for np in &cfg.network_policies {
            let workloads = selected(cfg, ids, |ns, _, l| np.selects(ns, l));
            for &wid in &workloads {
                let c = by_workload.entry(wid).or_default();
                let iso = c.isolated.get_or_insert((rule_id, Vec::new()));
                iso.1.extend(np.egress.iter().flatten().cloned());
            }
            objects.push(np_object(np, rule_id, workloads));
            rule_id += 1;
        }
        let mut admin: Vec<(&AdminPolicy, u32)> = Vec::new();
        for a in &cfg.admin_policies {
            admin.push((a, rule_id));
            rule_id += 1;
        }
        admin.sort_by(|x, y| (x.0.priority, &x.0.name).cmp(&(y.0.priority, &y.0.name)));
        for (a, id) in &admin {
            let workloads = selected(cfg, ids, |_, nl, l| a.selects(nl, l));
            for &wid in &workloads {
                let c = by_workload.entry(wid).or_default();
                let tier = if a.baseline {
                    &mut c.baseline
                } else {
                    &mut c.admin
                };
                tier.extend(a.rules.iter().map(|r| (r.action, *id, r.to.clone())));
            }
            let blocks = a.rules.iter().flat_map(|r| r.to.blocks.iter().flatten());
            objects.push(TierObject {
                kind: a.kind(),
                id: ObjectRef {
                    namespace: String::new(),
                    name: a.name.clone(),
                },
                rule_id: *id,
                workloads,
                cidrs: blocks.map(|b| b.cidr).collect(),
                ports: Vec::new(),
            });
        }
        objects.sort_by_key(|o| o.rule_id);
        let tiers = Tiers { by_workload };
        for (wid, c) in tiers.prefixes() {
            if let Some(k) = key_of::<4>(&c) {
                v4.entry((wid, c.len, k)).or_default();
            }
            if let Some(k) = key_of::<16>(&c) {
                v6.entry((wid, c.len, k)).or_default();
            }
        }
        (tiers, objects)
    }

    /// Everything, and every CIDR and exception the tiers name, for each workload.
    fn prefixes(&self) -> Vec<(u32, Cidr)> {
        let mut out = Vec::new();
        for (wid, c) in &self.by_workload {
            let allows = c.admin.iter().chain(&c.baseline).map(|r| &r.2);
            let allows = allows.chain(c.isolated.iter().flat_map(|i| &i.1));
            out.extend([Cidr::ALL_V4, Cidr::ALL_V6].map(|x| (*wid, x)));
            for b in allows.flat_map(|a| a.blocks.iter().flatten()) {
                out.push((*wid, b.cidr));
                out.extend(b.except.iter().map(|e| (*wid, *e)));
            }
        }
        out
    }

    /// The deny rules for prefix `(len, addr)` of workload `wid`: every port and protocol the
    /// tiers refuse there, each with the rule id of the object that refuses it.
    pub fn denials<const N: usize>(&self, wid: u32, len: u8, addr: &[u8; N]) -> Vec<PortRule> {
        let Some(chain) = self.by_workload.get(&wid) else {
            return Vec::new();
        };
        let ip = if N == 4 {
            std::net::IpAddr::from(<[u8; 4]>::try_from(&addr[..4]).unwrap_or_default())
        } else {
            std::net::IpAddr::from(<[u8; 16]>::try_from(&addr[..]).unwrap_or_default())
        };
        let covers = |c: &Cidr| c.addr.is_ipv4() == (N == 4) && c.len <= len && c.contains(ip);
        let here = |a: &Allow| match &a.blocks {
            None => true,
            Some(bs) => bs
                .iter()
                .any(|b| covers(&b.cidr) && !b.except.iter().any(covers)),
        };
        // The rules that apply at this prefix; only their ports remain to match.
        let admin: Vec<&Ruled> = chain.admin.iter().filter(|r| here(&r.2)).collect();
        let baseline: Vec<&Ruled> = chain.baseline.iter().filter(|r| here(&r.2)).collect();
        let isolated = chain
            .isolated
            .as_ref()
            .map(|(id, allows)| (*id, allows.iter().filter(|a| here(a)).collect::<Vec<_>>()));
        let decide = |port: u16, class: u8| -> Option<u32> {
            let hit = |a: &Allow| {
                a.ports.as_ref().is_none_or(|ps| {
                    ps.iter().any(|&(lo, hi, p)| {
                        (lo..=hi).contains(&port) && (p == proto::ANY || p == class)
                    })
                })
            };
            for (act, id, a) in &admin {
                if hit(a) {
                    match act {
                        AdminAction::Allow => return None,
                        AdminAction::Deny => return Some(*id),
                        AdminAction::Pass => break,
                    }
                }
            }
            if let Some((id, allows)) = &isolated {
                return (!allows.iter().any(|a| hit(a))).then_some(*id);
            }
            let first = baseline.iter().find(|(_, _, a)| hit(a))?;
            (first.0 == AdminAction::Deny).then_some(first.1)
        };
        // The ports where some rule starts or ends cut 0-65535 into ranges decided alike.
        let all = admin.iter().chain(&baseline).map(|r| &r.2);
        let all: Vec<&Allow> = all
            .chain(isolated.iter().flat_map(|i| i.1.iter().copied()))
            .collect();
        let mut out: Vec<PortRule> = Vec::new();
        for class in [proto::TCP, proto::UDP, proto::SCTP] {
            let mut cuts: BTreeSet<u32> = [0, 65536].into();
            for &(lo, hi, _) in all.iter().flat_map(|a| a.ports.iter().flatten()) {
                cuts.insert(lo as u32);
                cuts.insert(hi as u32 + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            for w in cuts.windows(2) {
                let Some(id) = decide(w[0] as u16, class) else {
                    continue;
                };
                match out.last_mut() {
                    Some(l)
                        if l.proto == class && l.rule_id == id && l.port_hi as u32 + 1 == w[0] =>
                    {
                        l.port_hi = (w[1] - 1) as u16
                    }
                    _ => out.push(PortRule {
                        port_lo: w[0] as u16,
                        port_hi: (w[1] - 1) as u16,
                        proto: class,
                        action: action::DENY,
                        rule_id: id,
                    }),
                }
            }
        }
        out
    }
}

/// The workload ids `pick(namespace, namespace labels, labels)` selects.
fn selected(
    cfg: &Config,
    ids: &BTreeMap<&ObjectRef, u32>,
    pick: impl Fn(&str, &super::Labels, &super::Labels) -> bool,
) -> BTreeSet<u32> {
    let none = super::Labels::new();
    cfg.workloads
        .iter()
        .filter(|w| {
            let nl = cfg.namespaces.get(&w.id.namespace).unwrap_or(&none);
            pick(&w.id.namespace, nl, &w.labels)
        })
        .filter_map(|w| ids.get(&w.id).copied())
        .collect()
}

fn np_object(np: &NetworkPolicy, rule_id: u32, workloads: BTreeSet<u32>) -> TierObject {
    TierObject {
        kind: "NetworkPolicy",
        id: np.id.clone(),
        rule_id,
        workloads,
        cidrs: np.cidrs(),
        ports: np.ports(),
    }
}

/// `policy check`'s reason when a tier decided; None otherwise. `rule`: the deciding rule's
/// (kind, object).
pub fn explain(o: egress_common::Outcome, rule: Option<(&str, &ObjectRef)>) -> Option<String> {
    let (kind, id) = rule.filter(|(k, _)| *k != "Egress")?;
    let name = if id.namespace.is_empty() {
        id.name.clone()
    } else {
        id.to_string()
    };
    let what = match kind {
        "NetworkPolicy" => "the workload is isolated for egress, and no NetworkPolicy selecting it allows this destination, port and protocol",
        "AdminNetworkPolicy" => "its first rule that matches (by priority, then in order) is Deny",
        _ => "no AdminNetworkPolicy or NetworkPolicy decided, and its first rule that matches is Deny",
    };
    Some(match o {
        egress_common::Outcome::AuditRule => {
            format!("would be refused by {kind} {name}: {what}; allowed by auditMode")
        }
        _ => format!("refused by {kind} {name}: {what}"),
    })
}

/// The LPM key bytes of `c` when it is of the `N`-byte family.
fn key_of<const N: usize>(c: &Cidr) -> Option<[u8; N]> {
    let bytes: Vec<u8> = match c.addr {
        std::net::IpAddr::V4(a) => scalar::mask(&a.octets(), c.len).to_vec(),
        std::net::IpAddr::V6(a) => scalar::mask(&a.octets(), c.len).to_vec(),
    };
    <[u8; N]>::try_from(&bytes[..]).ok()
}

#[cfg(test)]
mod tests;
