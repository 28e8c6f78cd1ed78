//! The per-packet `cgroup_skb/egress` program: what it remembers, and what it counts.
//!
//! The socket hooks (connect, sendmsg) judge a socket when it is given a destination; the
//! per-packet program judges every packet a workload sends by the packet's real destination.
//! It stays cheap by remembering verdicts per (cgroup, destination, protocol) in an LRU
//! cache ([`DstKey`] -> [`DstVerdict`], `EGRESS_DST_VERDICTS`): the verdict is a pure function
//! of the workload, the destination and the policy generation, so a packet to a destination
//! judged under the policy in force passes (or drops) after one lookup, whichever socket sent
//! it, and nothing is written per socket or per connect(). (Writing a per-socket record at
//! every connect(), in socket-local storage or an LRU by socket cookie, was measured at about
//! 1 µs per connect() here: more than the whole decision.) The one per-socket fact kept is
//! that a socket was accepted by a listener of the workload ([`INBOUND`], socket-local
//! storage written by sock_ops): its packets are replies, not egress.

use core::mem::size_of;

use crate::{Outcome, SockAddr};

/// Socket-local flag (`EGRESS_SOCK_MARKS`): the socket was accepted by a listener of the
/// workload (a server's side of an inbound connection): its packets are replies, not egress.
pub const INBOUND: u32 = 1;

/// Key of `EGRESS_DST_VERDICTS`: who sent the packet (its cgroup) and where it really goes
/// (for a socket redirected to the proxy: the destination it asked for).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DstKey {
    pub cgroup_id: u64,
    pub dst: SockAddr,
    /// IP protocol number.
    pub proto: u8,
    /// 1: the packet goes to the proxy for `dst` (a redirected socket).
    pub redirected: u8,
    pub _pad: [u8; 6],
}

/// Value of `EGRESS_DST_VERDICTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DstVerdict {
    /// `MeshConfig::generation` of the policy that judged it; another generation is stale.
    pub generation: u64,
    pub workload_id: u32,
    /// 0: packets pass; else the drop slot (a denying outcome or `DROP_*`).
    pub drop: u8,
    /// [`Outcome`] as u8 of the decision.
    pub outcome: u8,
    pub _pad: [u8; 2],
    /// `EGRESS_NAMES_EPOCH` when it was judged: once the agent's learned names change, a
    /// cached drop is judged again (a name rule may now allow the address) and the socket
    /// hooks stop trusting a cached pass (the name may be forgotten).
    pub names_epoch: u32,
    pub _pad1: u32,
}

impl DstVerdict {
    #[inline(always)]
    pub fn outcome(&self) -> Option<Outcome> {
        Outcome::from_u8(self.outcome)
    }
}

/// The socket hooks' fast path (connect, sendmsg): when a cached verdict for this cgroup,
/// destination and protocol says the destination passes untouched under the policy and the
/// names in force, the hook passes it without walking the policy tries. Returns the cached
/// pass [`Outcome`] (counted as usual), or `None` when the hook must judge in full: another
/// generation, names learned or forgotten since, a drop or a proxy verdict, every verdict
/// logged (`events_all`: the full path emits the event), or a DNS request the agent steers.
#[inline(always)]
pub fn hook_fast_pass(
    v: &DstVerdict,
    generation: u64,
    names_epoch: u32,
    events_all: bool,
    dns_steered_port: bool,
) -> Option<Outcome> {
    if v.generation != generation
        || v.names_epoch != names_epoch
        || v.drop != 0
        || events_all
        || dns_steered_port
    {
        return None;
    }
    v.outcome()
        .filter(|o| matches!(o, Outcome::Allow | Outcome::Mesh | Outcome::Pass))
}

/// Counter slots per workload of `EGRESS_PACKET_DROPS`: a dropped packet counts under the
/// denying [`Outcome`] (1..=11) or one of the parser's reasons below.
pub const SKB_SLOTS: u32 = 16;
/// An IPv4 source route option or an IPv6 routing header with segments left.
pub const DROP_SOURCE_ROUTE: u8 = 12;
/// More IPv6 extension headers than the parser walks.
pub const DROP_TOO_MANY_HEADERS: u8 = 13;
/// A header the parser could not read.
pub const DROP_MALFORMED: u8 = 14;
/// A packet straight to a destination the policy sends through the proxy (a connection made
/// before the policy said so): it would skip the proxy's judgment.
pub const DROP_PROXY_BYPASS: u8 = 15;

/// Index into the per-CPU `EGRESS_PACKET_DROPS` array.
#[inline(always)]
pub fn skb_index(workload_id: u32, slot: u8) -> u32 {
    workload_id * SKB_SLOTS + (slot as u32 & (SKB_SLOTS - 1))
}

/// The `reason` label of a drop slot (`None`: not a drop slot).
pub fn skb_drop_reason(slot: u8) -> Option<&'static str> {
    match slot {
        DROP_SOURCE_ROUTE => Some("source-route"),
        DROP_TOO_MANY_HEADERS => Some("too-many-headers"),
        DROP_MALFORMED => Some("malformed"),
        DROP_PROXY_BYPASS => Some("proxy-bypass"),
        s => Outcome::from_u8(s)
            .filter(|o| o.is_denied())
            .map(Outcome::name),
    }
}

/// The flow-log verdict of a packet the program dropped.
pub fn skb_event_verdict(slot: u8) -> Option<&'static str> {
    Some(match skb_drop_reason(slot)? {
        "source-route" => "packet-drop-source-route",
        "too-many-headers" => "packet-drop-too-many-headers",
        "malformed" => "packet-drop-malformed",
        "proxy-bypass" => "packet-drop-proxy-bypass",
        "deny-rule" => "packet-drop-deny-rule",
        "deny-default" => "packet-drop-deny-default",
        "deny-proxy-port" => "packet-drop-deny-proxy-port",
        _ => "packet-drop-error",
    })
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, explicit padding: every bit pattern is
    // valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::DstKey {}
    unsafe impl aya::Pod for super::DstVerdict {}
}

const _: () = assert!(size_of::<DstKey>() == 40);
const _: () = assert!(size_of::<DstVerdict>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(outcome: Outcome, drop: u8) -> DstVerdict {
        DstVerdict {
            generation: 7,
            workload_id: 3,
            drop,
            outcome: outcome as u8,
            names_epoch: 2,
            ..DstVerdict::default()
        }
    }

    #[test]
    fn hook_fast_pass_only_for_a_current_quiet_pass() {
        for o in [Outcome::Allow, Outcome::Mesh, Outcome::Pass] {
            assert_eq!(hook_fast_pass(&verdict(o, 0), 7, 2, false, false), Some(o));
        }
        // Stale policy or names, or a verdict the hook must log or steer: judged in full.
        let v = verdict(Outcome::Allow, 0);
        assert_eq!(hook_fast_pass(&v, 8, 2, false, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 3, false, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 2, true, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 2, false, true), None);
        // Denials, proxy verdicts and packet drops never take the fast path.
        for o in [
            Outcome::DenyRule,
            Outcome::DenyDefault,
            Outcome::Proxy,
            Outcome::AuditRule,
            Outcome::DenyProxyPort,
        ] {
            assert_eq!(hook_fast_pass(&verdict(o, 0), 7, 2, false, false), None);
        }
        let bypass = verdict(Outcome::Allow, DROP_PROXY_BYPASS);
        assert_eq!(hook_fast_pass(&bypass, 7, 2, false, false), None);
    }

    #[test]
    fn drop_slots_have_reasons_and_fit() {
        for s in [
            DROP_SOURCE_ROUTE,
            DROP_TOO_MANY_HEADERS,
            DROP_MALFORMED,
            DROP_PROXY_BYPASS,
        ] {
            assert!(skb_drop_reason(s).is_some());
            assert!((s as u32) < SKB_SLOTS);
            assert!(skb_event_verdict(s).is_some());
        }
        for o in Outcome::ALL {
            assert!((o as u32) < SKB_SLOTS);
            assert_eq!(skb_drop_reason(o as u8).is_some(), o.is_denied());
        }
        assert_eq!(
            skb_event_verdict(Outcome::DenyRule as u8),
            Some("packet-drop-deny-rule")
        );
        assert_eq!(skb_index(2, 12), 2 * SKB_SLOTS + 12);
        assert_eq!(DstVerdict::default().outcome(), None);
    }
}
