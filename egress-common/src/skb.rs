//! The per-packet `cgroup_skb/egress` program: what it remembers about a socket, and what it
//! counts.
//!
//! The socket hooks (connect, sendmsg) judge a socket when it is given a destination; the
//! per-packet program judges every packet a workload sends by the packet's real destination.
//! It stays cheap by remembering, per socket (by socket cookie), the verdict the socket got:
//! a packet of a socket judged under the current policy generation, to the destination it was
//! judged for, passes without another decision.

use core::mem::size_of;

use crate::{Outcome, SockAddr};

/// [`SockVerdict::flags`]: the socket was accepted by a listener of the workload (a server's
/// side of an inbound connection): its packets are replies, not egress.
pub const INBOUND: u32 = 1;

/// Value of `EGRESS_SOCK_VERDICTS`, keyed by socket cookie. Written by connect4/6 and
/// sendmsg4/6 (the verdict they gave), by the packet program (the verdict it gave a socket
/// that had none, or had one for another destination or generation) and by sock_ops (inbound
/// sockets); removed when a TCP socket closes (UDP and ICMP entries age out of the LRU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockVerdict {
    /// `MeshConfig::generation` of the policy that judged it.
    pub generation: u64,
    /// The destination the socket's packets carry: the proxy's address for a redirected
    /// socket; an IPv4-mapped destination as IPv4 (the packets are IPv4).
    pub dst: SockAddr,
    /// The destination the application asked for (the same as `dst` unless redirected).
    pub orig: SockAddr,
    /// [`Outcome`] as u8 (0 for an inbound socket).
    pub outcome: u8,
    /// The drop slot (a denying outcome or `DROP_*`) when the socket's packets to `dst` are
    /// dropped; 0 when they pass.
    pub drop: u8,
    pub _pad0: [u8; 2],
    /// [`INBOUND`].
    pub flags: u32,
    pub workload_id: u32,
    pub _pad1: u32,
}

impl SockVerdict {
    #[inline(always)]
    pub fn redirected(&self) -> bool {
        self.outcome == Outcome::Proxy as u8
    }
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
    unsafe impl aya::Pod for super::SockVerdict {}
}

const _: () = assert!(size_of::<SockVerdict>() == 72);

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!(SockVerdict::default()).redirected());
    }
}
