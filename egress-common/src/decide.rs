//! The egress decision, as a pure function of the mesh settings, the destination and the rules
//! that apply to it. The kernel programs and the agent (`policy check`, tests) share it.

use crate::{action, proto, MeshConfig, PolicyValue, MAX_RULES_PER_PREFIX};

/// What happened to a connection, and why. Stored as u8 in events and counter indices.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Destination inside a mesh CIDR: not egress, untouched.
    Mesh = 1,
    /// No rule matched and `enableEgress` is true: passthrough.
    Pass = 2,
    /// An allow rule matched: direct.
    Allow = 3,
    /// A host rule or `via: proxy` matched: redirected to the agent's proxy.
    Proxy = 4,
    /// A deny rule matched: EPERM.
    DenyRule = 5,
    /// No rule matched and `enableEgress` is false: EPERM.
    DenyDefault = 6,
    /// A workload dialled the proxy port directly without being redirected: EPERM.
    DenyProxyPort = 7,
    /// An internal error (map missing or full) for an enrolled cgroup, `failMode: closed`: EPERM.
    DenyError = 8,
    /// Audit mode: a deny rule matched; allowed and reported.
    AuditRule = 9,
    /// Audit mode: unmatched with `enableEgress` false; allowed and reported.
    AuditDefault = 10,
    /// An internal error with `failMode: open`: let through directly.
    ErrorOpen = 11,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Mesh,
        Outcome::Pass,
        Outcome::Allow,
        Outcome::Proxy,
        Outcome::DenyRule,
        Outcome::DenyDefault,
        Outcome::DenyProxyPort,
        Outcome::DenyError,
        Outcome::AuditRule,
        Outcome::AuditDefault,
        Outcome::ErrorOpen,
    ];

    /// The connect()/sendmsg() fails with EPERM.
    #[inline(always)]
    pub fn is_denied(self) -> bool {
        matches!(
            self,
            Outcome::DenyRule | Outcome::DenyDefault | Outcome::DenyProxyPort | Outcome::DenyError
        )
    }

    pub fn from_u8(v: u8) -> Option<Outcome> {
        Outcome::ALL.iter().copied().find(|o| *o as u8 == v)
    }

    /// Stable lower-case name (metric label, flow log).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Mesh => "mesh",
            Outcome::Pass => "passthrough",
            Outcome::Allow => "allow",
            Outcome::Proxy => "proxy",
            Outcome::DenyRule => "deny-rule",
            Outcome::DenyDefault => "deny-default",
            Outcome::DenyProxyPort => "deny-proxy-port",
            Outcome::DenyError => "deny-error",
            Outcome::AuditRule => "audit-rule",
            Outcome::AuditDefault => "audit-default",
            Outcome::ErrorOpen => "error-open",
        }
    }
}

/// The facts about one connection attempt that the decision needs.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// [`crate::proto`] TCP or UDP.
    pub proto: u8,
    /// Destination port, host order.
    pub port: u16,
    /// The destination lies in a mesh CIDR.
    pub in_mesh: bool,
    /// The destination is the agent's proxy listener itself.
    pub to_proxy: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The rule that decided (0 when none did).
    pub rule_id: u32,
}

impl Decision {
    #[inline(always)]
    const fn new(outcome: Outcome, rule_id: u32) -> Self {
        Self { outcome, rule_id }
    }
}

/// Decide one connection. Precedence: the proxy port is never dialled directly; mesh
/// destinations are untouched; among matching rules deny wins, then proxy, then allow; an
/// unmatched destination passes when `enableEgress` is on and is refused otherwise. Audit mode
/// turns every refusal by policy into an allowed, reported one.
#[inline(always)]
pub fn decide(cfg: &MeshConfig, q: &Query, rules: Option<&PolicyValue>) -> Decision {
    if q.to_proxy {
        return Decision::new(Outcome::DenyProxyPort, 0);
    }
    if q.in_mesh {
        return Decision::new(Outcome::Mesh, 0);
    }
    let audit = cfg.audit_mode != 0;
    // One scan keeps the strongest match as (priority << 24 | rule id): deny 3, proxy 2,
    // allow 1. A single running maximum (no flags) keeps the verifier's state space small.
    let mut best = 0u32;
    if let Some(v) = rules {
        let mut i = 0;
        while i < MAX_RULES_PER_PREFIX {
            if i as u32 >= v.count {
                break;
            }
            let r = &v.rules[i];
            i += 1;
            let proto_ok = r.proto == proto::ANY || r.proto == q.proto;
            let port_ok = q.port >= r.port_lo && q.port <= r.port_hi;
            let prio = match r.action {
                action::DENY => 3,
                // Only TCP can be proxied; the compiler never emits other proxy rules.
                action::PROXY if q.proto == proto::TCP => 2,
                action::ALLOW => 1,
                _ => 0,
            };
            let score = (prio << 24) | (r.rule_id & MAX_RULE_ID);
            if proto_ok && port_ok && score > best {
                best = score;
            }
        }
    }
    let rule_id = best & MAX_RULE_ID;
    match best >> 24 {
        3 if audit => Decision::new(Outcome::AuditRule, rule_id),
        3 => Decision::new(Outcome::DenyRule, rule_id),
        2 => Decision::new(Outcome::Proxy, rule_id),
        1 => Decision::new(Outcome::Allow, rule_id),
        _ if cfg.enable_egress != 0 => Decision::new(Outcome::Pass, 0),
        _ if audit => Decision::new(Outcome::AuditDefault, 0),
        _ => Decision::new(Outcome::DenyDefault, 0),
    }
}

/// Rule ids fit in 24 bits (the decision packs them beside a priority).
pub const MAX_RULE_ID: u32 = (1 << 24) - 1;

/// The decision for an enrolled cgroup when the kernel path hits an internal error.
#[inline(always)]
pub fn on_error(cfg: Option<&MeshConfig>) -> Outcome {
    match cfg {
        Some(c) if c.fail_open != 0 => Outcome::ErrorOpen,
        _ => Outcome::DenyError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortRule;

    fn rule(lo: u16, hi: u16, p: u8, a: u8, id: u32) -> PortRule {
        PortRule {
            port_lo: lo,
            port_hi: hi,
            proto: p,
            action: a,
            _pad0: [0; 2],
            rule_id: id,
        }
    }

    fn value(rules: &[PortRule]) -> PolicyValue {
        let mut v = PolicyValue::default();
        for (i, r) in rules.iter().enumerate() {
            v.rules[i] = *r;
        }
        v.count = rules.len() as u32;
        v
    }

    fn q(p: u8, port: u16) -> Query {
        Query {
            proto: p,
            port,
            in_mesh: false,
            to_proxy: false,
        }
    }

    fn cfg(enable: bool, audit: bool) -> MeshConfig {
        MeshConfig {
            enable_egress: enable as u32,
            audit_mode: audit as u32,
            ..Default::default()
        }
    }

    #[test]
    fn unmatched_follows_enable_egress() {
        assert_eq!(
            decide(&cfg(true, false), &q(proto::TCP, 80), None).outcome,
            Outcome::Pass
        );
        assert_eq!(
            decide(&cfg(false, false), &q(proto::TCP, 80), None).outcome,
            Outcome::DenyDefault
        );
        assert_eq!(
            decide(&cfg(false, true), &q(proto::TCP, 80), None).outcome,
            Outcome::AuditDefault
        );
    }

    #[test]
    fn deny_wins_over_allow_and_proxy_in_any_order() {
        let v = value(&[
            rule(0, 65535, proto::ANY, action::ALLOW, 1),
            rule(443, 443, proto::TCP, action::PROXY, 2),
            rule(443, 443, proto::TCP, action::DENY, 3),
        ]);
        let d = decide(&cfg(true, false), &q(proto::TCP, 443), Some(&v));
        assert_eq!(d, Decision::new(Outcome::DenyRule, 3));
        let d = decide(&cfg(true, true), &q(proto::TCP, 443), Some(&v));
        assert_eq!(d, Decision::new(Outcome::AuditRule, 3));
        // Port 80 only matches the allow.
        let d = decide(&cfg(false, false), &q(proto::TCP, 80), Some(&v));
        assert_eq!(d, Decision::new(Outcome::Allow, 1));
    }

    #[test]
    fn proxy_beats_allow() {
        let v = value(&[
            rule(443, 443, proto::TCP, action::ALLOW, 1),
            rule(443, 443, proto::TCP, action::PROXY, 2),
        ]);
        let d = decide(&cfg(false, false), &q(proto::TCP, 443), Some(&v));
        assert_eq!(d, Decision::new(Outcome::Proxy, 2));
    }

    #[test]
    fn udp_is_never_proxied() {
        let v = value(&[rule(53, 53, proto::ANY, action::PROXY, 1)]);
        let d = decide(&cfg(false, false), &q(proto::UDP, 53), Some(&v));
        assert_eq!(d.outcome, Outcome::DenyDefault);
    }

    #[test]
    fn port_range_and_protocol_boundaries() {
        let v = value(&[rule(8000, 8080, proto::TCP, action::ALLOW, 7)]);
        let c = cfg(false, false);
        for (p, port, want) in [
            (proto::TCP, 7999, Outcome::DenyDefault),
            (proto::TCP, 8000, Outcome::Allow),
            (proto::TCP, 8080, Outcome::Allow),
            (proto::TCP, 8081, Outcome::DenyDefault),
            (proto::UDP, 8000, Outcome::DenyDefault),
        ] {
            assert_eq!(
                decide(&c, &q(p, port), Some(&v)).outcome,
                want,
                "{p} {port}"
            );
        }
    }

    #[test]
    fn count_bounds_the_rules_read() {
        let mut v = value(&[rule(80, 80, proto::TCP, action::ALLOW, 1)]);
        v.rules[1] = rule(0, 65535, proto::ANY, action::DENY, 9);
        assert_eq!(
            decide(&cfg(false, false), &q(proto::TCP, 80), Some(&v)).outcome,
            Outcome::Allow
        );
    }

    #[test]
    fn proxy_port_and_mesh_come_first() {
        let v = value(&[rule(0, 65535, proto::ANY, action::DENY, 1)]);
        let mut query = q(proto::TCP, 15001);
        query.to_proxy = true;
        assert_eq!(
            decide(&cfg(true, true), &query, Some(&v)).outcome,
            Outcome::DenyProxyPort
        );
        query.to_proxy = false;
        query.in_mesh = true;
        assert_eq!(
            decide(&cfg(false, false), &query, Some(&v)).outcome,
            Outcome::Mesh
        );
    }

    #[test]
    fn errors_fail_closed_unless_opted_out() {
        assert_eq!(on_error(None), Outcome::DenyError);
        assert_eq!(on_error(Some(&cfg(true, false))), Outcome::DenyError);
        let open = MeshConfig {
            fail_open: 1,
            ..Default::default()
        };
        assert_eq!(on_error(Some(&open)), Outcome::ErrorOpen);
    }

    #[test]
    fn outcome_round_trips() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::from_u8(o as u8), Some(o));
            assert!((o as u32) * 4 + 3 < crate::COUNTER_SLOTS);
        }
        assert_eq!(Outcome::from_u8(0), None);
    }
}
