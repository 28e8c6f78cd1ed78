//! Port segments: the port rules of one (workload, prefix) entry as the sorted,
//! non-overlapping port ranges the kernel scans (see `egress_common::MAX_SEGMENTS`), each with
//! the one action that wins there.

use std::collections::BTreeSet;

use egress_common::{action, proto, PolicyValue, PortRule, Segment, MAX_SEGMENTS};

pub(super) fn port_rule(lo: u16, hi: u16, proto: u8, action: u8, rule_id: u32) -> PortRule {
    PortRule {
        port_lo: lo,
        port_hi: hi,
        proto,
        action,
        rule_id,
    }
}

fn strength(r: &PortRule) -> (u8, u32) {
    let prio = match r.action {
        action::DENY => 3,
        action::PROXY => 2,
        action::ALLOW => 1,
        _ => 0,
    };
    (prio, r.rule_id)
}

/// Compiles the rules that apply to one prefix into the kernel's segments: per protocol
/// class, the port ranges where one action wins, sorted, non-overlapping, adjacent equal
/// ranges merged. Rules in audit mode (`audited(rule_id)`) never change what the enforced
/// ones decide: their denies only mark where the enforced verdict would let the connection
/// through ([`action::AUDIT_ALLOW`], [`action::AUDIT_DEFAULT`]), their allows and redirects
/// are left out. Err(n): n segments needed, more than [`MAX_SEGMENTS`].
pub(super) fn segments(
    rules: &[PortRule],
    audited: impl Fn(u32) -> bool,
) -> Result<PolicyValue, usize> {
    let mut v = PolicyValue::default();
    let mut all: Vec<Segment> = Vec::new();
    for (class, p) in [(0, proto::TCP), (1, proto::UDP), (2, proto::ANY)] {
        // Other protocols only see protocol-less rules; only TCP is ever proxied.
        let relevant: Vec<&PortRule> = rules
            .iter()
            .filter(|r| {
                r.proto == proto::ANY
                    || (class < 2 && r.proto == p)
                    || (class == 2 && r.proto == proto::SCTP)
            })
            .filter(|r| r.action != action::PROXY || p == proto::TCP)
            .collect();
        let mut cuts: BTreeSet<u32> = [0, 65536].into();
        for r in &relevant {
            cuts.insert(r.port_lo as u32);
            cuts.insert(r.port_hi as u32 + 1);
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let mut segs: Vec<Segment> = Vec::new();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1] - 1);
            let covering = || {
                relevant
                    .iter()
                    .filter(move |r| r.port_lo as u32 <= a && r.port_hi as u32 >= b)
            };
            let enforced = covering()
                .filter(|r| !audited(r.rule_id))
                .max_by_key(|r| strength(r));
            let audit_deny = covering()
                .filter(|r| r.action == action::DENY && audited(r.rule_id))
                .max_by_key(|r| r.rule_id);
            let (act, rule_id) = match (enforced, audit_deny) {
                (Some(e), Some(d)) if e.action == action::ALLOW => (action::AUDIT_ALLOW, d.rule_id),
                (Some(e), _) => (e.action, e.rule_id),
                (None, Some(d)) => (action::AUDIT_DEFAULT, d.rule_id),
                (None, None) => continue,
            };
            match segs.last_mut() {
                Some(last)
                    if last.action == act && last.rule_id == rule_id && last.hi as u32 + 1 == a =>
                {
                    last.hi = b as u16
                }
                _ => segs.push(Segment {
                    lo: a as u16,
                    hi: b as u16,
                    action: act,
                    _pad0: [0; 3],
                    rule_id,
                }),
            }
        }
        v.counts[class] = segs.len().min(255) as u8;
        all.extend(segs);
    }
    if all.len() > MAX_SEGMENTS {
        return Err(all.len());
    }
    v.segs[..all.len()].copy_from_slice(&all);
    Ok(v)
}
