//! The egress decision, as a pure function of the mesh settings, the destination and the rules
//! that apply to it. The kernel programs and the agent (`policy check`, tests) share it.

use crate::{action, proto, MeshConfig, PolicyValue, MAX_SEGMENTS};

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
/// destinations are untouched; the segment of the destination's port (where the agent already
/// resolved deny over proxy over allow) decides; an unmatched destination passes when
/// `enableEgress` is on and is refused otherwise. Audit mode turns every refusal by policy into
/// an allowed, reported one. A deny of a policy in audit mode (the compiler put it in the
/// segment as [`action::AUDIT_ALLOW`] or [`action::AUDIT_DEFAULT`]) changes nothing the
/// enforced policies decide; where they let the connection through, it is reported as audited
/// with the audited policy's rule.
#[inline(always)]
pub fn decide(cfg: &MeshConfig, q: &Query, rules: Option<&PolicyValue>) -> Decision {
    if q.to_proxy {
        return Decision::new(Outcome::DenyProxyPort, 0);
    }
    if q.in_mesh {
        return Decision::new(Outcome::Mesh, 0);
    }
    let audit = cfg.audit_mode != 0;
    let (mut act, mut rule_id) = (0u8, 0u32);
    if let Some(v) = rules {
        let (start, n) = v.class(q.proto);
        let end = start + n;
        // Sorted, non-overlapping: stop at the first segment that reaches the port. The index
        // runs over the whole fixed array (a constant bound on every read, which the verifier
        // needs) and skips the slots of the classes before this one.
        let mut j = 0;
        while j < MAX_SEGMENTS {
            if j >= end {
                break;
            }
            let s = &v.segs[j];
            j += 1;
            if j <= start {
                continue;
            }
            if q.port <= s.hi {
                if q.port >= s.lo {
                    act = s.action;
                    rule_id = s.rule_id;
                }
                break;
            }
        }
    }
    match act {
        action::DENY if audit => Decision::new(Outcome::AuditRule, rule_id),
        action::DENY => Decision::new(Outcome::DenyRule, rule_id),
        // Only TCP can be proxied; the agent never puts proxy segments in other classes.
        action::PROXY if q.proto == proto::TCP => Decision::new(Outcome::Proxy, rule_id),
        action::ALLOW => Decision::new(Outcome::Allow, rule_id),
        action::AUDIT_ALLOW => Decision::new(Outcome::AuditRule, rule_id),
        action::AUDIT_DEFAULT if cfg.enable_egress != 0 => {
            Decision::new(Outcome::AuditRule, rule_id)
        }
        _ if cfg.enable_egress != 0 => Decision::new(Outcome::Pass, 0),
        _ if audit => Decision::new(Outcome::AuditDefault, 0),
        _ => Decision::new(Outcome::DenyDefault, 0),
    }
}

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
    use crate::Segment;

    fn seg(lo: u16, hi: u16, a: u8, id: u32) -> Segment {
        Segment {
            lo,
            hi,
            action: a,
            _pad0: [0; 3],
            rule_id: id,
        }
    }

    /// A value with the given TCP, UDP and other-protocol segments.
    fn value(tcp: &[Segment], udp: &[Segment], other: &[Segment]) -> PolicyValue {
        let mut v = PolicyValue::default();
        let all = tcp.iter().chain(udp).chain(other);
        for (i, s) in all.enumerate() {
            v.segs[i] = *s;
        }
        v.counts = [tcp.len() as u8, udp.len() as u8, other.len() as u8];
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
    fn segment_boundaries_and_gaps() {
        let v = value(
            &[
                seg(0, 79, action::ALLOW, 1),
                seg(80, 80, action::DENY, 2),
                seg(443, 443, action::PROXY, 3),
                seg(8000, 8080, action::ALLOW, 4),
            ],
            &[],
            &[],
        );
        let c = cfg(false, false);
        for (port, want, rule) in [
            (0, Outcome::Allow, 1),
            (79, Outcome::Allow, 1),
            (80, Outcome::DenyRule, 2),
            (81, Outcome::DenyDefault, 0),
            (442, Outcome::DenyDefault, 0),
            (443, Outcome::Proxy, 3),
            (7999, Outcome::DenyDefault, 0),
            (8000, Outcome::Allow, 4),
            (8080, Outcome::Allow, 4),
            (8081, Outcome::DenyDefault, 0),
            (65535, Outcome::DenyDefault, 0),
        ] {
            assert_eq!(
                decide(&c, &q(proto::TCP, port), Some(&v)),
                Decision::new(want, rule),
                "port {port}"
            );
        }
        let audit = decide(&cfg(false, true), &q(proto::TCP, 80), Some(&v));
        assert_eq!(audit, Decision::new(Outcome::AuditRule, 2));
    }

    #[test]
    fn protocol_classes_are_separate() {
        let v = value(
            &[seg(53, 53, action::DENY, 1)],
            &[seg(53, 53, action::ALLOW, 2)],
            &[seg(0, 65535, action::ALLOW, 3)],
        );
        let c = cfg(false, false);
        assert_eq!(
            decide(&c, &q(proto::TCP, 53), Some(&v)).outcome,
            Outcome::DenyRule
        );
        assert_eq!(
            decide(&c, &q(proto::UDP, 53), Some(&v)).outcome,
            Outcome::Allow
        );
        assert_eq!(
            decide(&c, &q(1, 0), Some(&v)),
            Decision::new(Outcome::Allow, 3)
        );
        assert_eq!(
            decide(&c, &q(proto::UDP, 54), Some(&v)).outcome,
            Outcome::DenyDefault
        );
    }

    #[test]
    fn audited_denies_report_and_never_refuse() {
        let v = value(
            &[
                seg(80, 80, action::AUDIT_ALLOW, 7),
                seg(81, 81, action::AUDIT_DEFAULT, 8),
                seg(82, 82, action::DENY, 9),
            ],
            &[],
            &[],
        );
        for (enable, mesh_audit, port, want) in [
            // Over an enforced allow: through and reported, whatever enableEgress says.
            (true, false, 80, Decision::new(Outcome::AuditRule, 7)),
            (false, false, 80, Decision::new(Outcome::AuditRule, 7)),
            // Where nothing enforced matches, enableEgress decides as for an unmatched port.
            (true, false, 81, Decision::new(Outcome::AuditRule, 8)),
            (false, false, 81, Decision::new(Outcome::DenyDefault, 0)),
            (false, true, 81, Decision::new(Outcome::AuditDefault, 0)),
            // An enforced deny next to them still refuses.
            (true, false, 82, Decision::new(Outcome::DenyRule, 9)),
        ] {
            let d = decide(&cfg(enable, mesh_audit), &q(proto::TCP, port), Some(&v));
            assert_eq!(d, want, "enable {enable} audit {mesh_audit} port {port}");
            assert_eq!(d.outcome.is_denied(), want.outcome.is_denied());
        }
    }

    #[test]
    fn udp_is_never_proxied() {
        let v = value(&[], &[seg(53, 53, action::PROXY, 1)], &[]);
        assert_eq!(
            decide(&cfg(false, false), &q(proto::UDP, 53), Some(&v)).outcome,
            Outcome::DenyDefault
        );
    }

    #[test]
    fn counts_bound_what_is_read() {
        let mut v = value(&[seg(80, 80, action::ALLOW, 1)], &[], &[]);
        v.segs[1] = seg(0, 65535, action::DENY, 9); // beyond the TCP count: never read
        assert_eq!(
            decide(&cfg(false, false), &q(proto::TCP, 81), Some(&v)).outcome,
            Outcome::DenyDefault
        );
        v.counts = [200, 200, 200]; // corrupt counts stay inside the array
        let _ = decide(&cfg(false, false), &q(2, 81), Some(&v));
    }

    #[test]
    fn proxy_port_and_mesh_come_first() {
        let v = value(&[seg(0, 65535, action::DENY, 1)], &[], &[]);
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
