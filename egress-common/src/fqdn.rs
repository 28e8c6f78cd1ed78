//! Names bound to addresses: what the kernel needs for FQDN rules on any protocol.
//!
//! Workloads' DNS (UDP and TCP to port 53, when `spec.dns` is on) is steered to the agent's
//! DNS proxy ([`dns_redirect`]); the proxy forwards it to the resolver the workload asked,
//! reads the answer, and writes the addresses it gave for a name that a name rule
//! (`hosts:` on `tcp`/`udp` ports) allows into `EGRESS_NAMES`, keyed by (workload, address),
//! before it releases the answer. The value holds the port segments of the name rules that
//! learned the address ([`crate::PolicyValue`], as the policy tries). [`decide_named`] lets
//! those addresses out where the policy alone would refuse them by default; a deny rule still
//! wins.

use core::mem::size_of;

use crate::{decide, decide::Query, proto, Decision, MeshConfig, Outcome, PolicyValue, SockAddr};

/// The DNS port workloads' queries are steered from.
pub const DNS_PORT: u16 = 53;

/// Key of `EGRESS_NAMES`: a workload and an address (IPv4 in the first four bytes, family 4;
/// an IPv4-mapped address is IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub workload_id: u32,
    pub family: u32,
    pub addr: [u8; 16],
}

impl NameKey {
    #[inline(always)]
    pub fn of(workload_id: u32, dst: &SockAddr) -> Self {
        Self {
            workload_id,
            family: dst.family,
            addr: dst.addr,
        }
    }
}

/// [`decide`], then, where no rule decided (the default refused, passed or audited the
/// connection), the workload's learned name entry for the destination: an allow there lets
/// the connection out directly, reported under the name rule. Denies, redirects and explicit
/// allows of the policy are never changed.
#[inline(always)]
pub fn decide_named(
    cfg: &MeshConfig,
    q: &Query,
    rules: Option<&PolicyValue>,
    named: Option<&PolicyValue>,
) -> Decision {
    let d = decide(cfg, q, rules);
    match d.outcome {
        Outcome::DenyDefault | Outcome::AuditDefault | Outcome::Pass => {}
        _ => return d,
    }
    let Some(n) = named else {
        return d;
    };
    let strict = MeshConfig {
        enable_egress: 0,
        audit_mode: 0,
        ..*cfg
    };
    let by_name = decide(&strict, q, Some(n));
    if by_name.outcome == Outcome::Allow {
        by_name
    } else {
        d
    }
}

/// Whether a connect()/sendmsg() that got `outcome` goes to the DNS proxy instead: DNS
/// (port 53, UDP or TCP) that the policy lets out in any way but through the HTTP proxy.
/// A refused query stays refused.
#[inline(always)]
pub fn dns_redirect(cfg: &MeshConfig, q: &Query, outcome: Outcome) -> bool {
    cfg.dns_port != 0
        && q.port == DNS_PORT
        && (q.proto == proto::UDP || q.proto == proto::TCP)
        && !outcome.is_denied()
        && outcome != Outcome::Proxy
        && outcome != Outcome::DenyProxyPort
}

/// Key of a steered UDP socket in `EGRESS_ORIG_TUPLE`: the DNS proxy sees the client's
/// source port; the address part is left zero (a TCP key always has the client's address),
/// as the socket may not have a source address yet.
#[inline(always)]
pub fn udp_key_addr(family: u32, src_port: u16) -> SockAddr {
    SockAddr {
        family,
        port: src_port as u32,
        addr: [0; 16],
    }
}

const _: () = assert!(size_of::<NameKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and a byte array, no padding.
    unsafe impl aya::Pod for super::NameKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{action, Segment};

    fn allow_tcp(port: u16, id: u32) -> PolicyValue {
        let mut v = PolicyValue::default();
        v.segs[0] = Segment {
            lo: port,
            hi: port,
            action: action::ALLOW,
            _pad0: [0; 3],
            rule_id: id,
        };
        v.counts = [1, 0, 0];
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

    fn cfg(enable: bool) -> MeshConfig {
        MeshConfig {
            enable_egress: enable as u32,
            dns_port: 15053,
            ..Default::default()
        }
    }

    #[test]
    fn a_learned_address_allows_only_its_ports() {
        let named = allow_tcp(5432, 7);
        let c = cfg(false);
        let d = decide_named(&c, &q(proto::TCP, 5432), None, Some(&named));
        assert_eq!(
            d,
            Decision {
                outcome: Outcome::Allow,
                rule_id: 7
            }
        );
        let other = decide_named(&c, &q(proto::TCP, 5433), None, Some(&named));
        assert_eq!(other.outcome, Outcome::DenyDefault);
        let udp = decide_named(&c, &q(proto::UDP, 5432), None, Some(&named));
        assert_eq!(udp.outcome, Outcome::DenyDefault);
        assert_eq!(
            decide_named(&c, &q(proto::TCP, 5432), None, None).outcome,
            Outcome::DenyDefault
        );
    }

    #[test]
    fn deny_rules_still_win_and_passthrough_is_reported_by_name() {
        let named = allow_tcp(5432, 7);
        let mut deny = PolicyValue::default();
        deny.segs[0] = Segment {
            lo: 0,
            hi: 65535,
            action: action::DENY,
            _pad0: [0; 3],
            rule_id: 2,
        };
        deny.counts = [1, 0, 0];
        let d = decide_named(&cfg(false), &q(proto::TCP, 5432), Some(&deny), Some(&named));
        assert_eq!(d.outcome, Outcome::DenyRule);
        let pass = decide_named(&cfg(true), &q(proto::TCP, 5432), None, Some(&named));
        assert_eq!(
            pass,
            Decision {
                outcome: Outcome::Allow,
                rule_id: 7
            }
        );
        let audit = MeshConfig {
            audit_mode: 1,
            ..cfg(false)
        };
        let a = decide_named(&audit, &q(proto::TCP, 5432), None, Some(&named));
        assert_eq!(a.outcome, Outcome::Allow);
    }

    #[test]
    fn only_allowed_dns_is_steered() {
        let c = cfg(false);
        assert!(dns_redirect(&c, &q(proto::UDP, 53), Outcome::Allow));
        assert!(dns_redirect(&c, &q(proto::TCP, 53), Outcome::Mesh));
        assert!(dns_redirect(&c, &q(proto::UDP, 53), Outcome::Pass));
        assert!(!dns_redirect(&c, &q(proto::UDP, 53), Outcome::DenyDefault));
        assert!(!dns_redirect(&c, &q(proto::TCP, 53), Outcome::Proxy));
        assert!(!dns_redirect(&c, &q(proto::UDP, 54), Outcome::Allow));
        assert!(!dns_redirect(&c, &q(1, 53), Outcome::Allow));
        let off = MeshConfig { dns_port: 0, ..c };
        assert!(!dns_redirect(&off, &q(proto::UDP, 53), Outcome::Allow));
    }
}
