//! The tc backstop: what happens to a packet that leaves a workload's network namespace.
//!
//! The socket hooks judge connections; the tc programs on the host side of each workload's
//! veth judge packets with the same policy maps and the same [`crate::decide`], and catch what
//! never went through a socket hook (raw and packet sockets, ICMP, connections that existed
//! before the agent). Allowed traffic passes; traffic the proxy should have carried but that
//! came straight out did not go through the proxy and is dropped.

use core::mem::size_of;

use crate::{proto, Outcome, SockAddr};

/// Counter slots per workload. Judged packets count under their [`Outcome`] (1..=11); these
/// slots follow.
pub const TC_SLOTS: u32 = 16;
/// A packet to a destination the policy sends through the proxy, that did not come from the
/// proxy: dropped.
pub const TC_PROXY_BYPASS: u8 = 12;
/// A reply on a connection that was opened into the workload: passed unjudged.
pub const TC_REPLY: u8 = 13;
/// Link control (ARP, IPv6 neighbour discovery and MLD): passed unjudged.
pub const TC_LINK: u8 = 14;

/// Packets into the workload (any kind): counted, never judged.
pub const TC_INBOUND: u8 = 15;

/// Index into `EGRESS_TC_COUNTERS`.
#[inline(always)]
pub fn tc_index(workload_id: u32, slot: u8) -> u32 {
    workload_id * TC_SLOTS + (slot as u32 & (TC_SLOTS - 1))
}

/// Packets and bytes of one (workload, slot), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcCount {
    pub packets: u64,
    pub bytes: u64,
}

/// A flow seen from a workload's side: `local` in the workload, `remote` outside. Key of
/// `EGRESS_REPLIES`, the connections opened into a workload (a peer's TCP SYN, or a UDP
/// datagram), whose replies leave without being judged as new egress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    pub proto: u8,
    pub _pad0: [u8; 3],
    pub local: SockAddr,
    pub remote: SockAddr,
}

/// The slot a judged packet counts under, and whether it is dropped.
#[inline(always)]
pub fn tc_verdict(o: Outcome) -> (u8, bool) {
    match o {
        Outcome::Proxy => (TC_PROXY_BYPASS, true),
        o => (o as u8, o.is_denied()),
    }
}

/// Whether the slot is one of dropped packets, and its reason label.
pub fn tc_drop_reason(slot: u8) -> Option<&'static str> {
    match slot {
        TC_PROXY_BYPASS => Some("proxy-bypass"),
        // The backstop never judges a packet as aimed at the proxy port.
        s => Outcome::from_u8(s)
            .filter(|o| o.is_denied() && *o != Outcome::DenyProxyPort)
            .map(Outcome::name),
    }
}

/// The flow-log verdict of a packet the backstop dropped.
pub fn tc_event_verdict(slot: u8) -> Option<&'static str> {
    match tc_drop_reason(slot)? {
        "proxy-bypass" => Some("tc-drop-proxy-bypass"),
        "deny-rule" => Some("tc-drop-deny-rule"),
        "deny-default" => Some("tc-drop-deny-default"),
        _ => Some("tc-drop-error"),
    }
}

/// Stable name of a slot (metric label).
pub fn tc_slot_name(slot: u8) -> Option<&'static str> {
    match slot {
        TC_PROXY_BYPASS => Some("proxy-bypass"),
        TC_REPLY => Some("reply"),
        TC_LINK => Some("link"),
        TC_INBOUND => Some("inbound"),
        s => Outcome::from_u8(s).map(Outcome::name),
    }
}

/// ICMPv6 messages a link needs to work (MLD 130-132 and 143, neighbour discovery 133-137):
/// never judged as egress.
#[inline(always)]
pub fn is_link_control(ip_proto: u8, icmp_type: u8) -> bool {
    ip_proto == proto::ICMPV6 && matches!(icmp_type, 130..=137 | 143)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, explicit padding: every bit pattern is
    // valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::TcCount {}
    unsafe impl aya::Pod for super::FlowKey {}
}

const _: () = assert!(size_of::<TcCount>() == 16);
const _: () = assert!(size_of::<FlowKey>() == 56);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_destinations_are_dropped_when_they_skip_the_proxy() {
        assert_eq!(tc_verdict(Outcome::Proxy), (TC_PROXY_BYPASS, true));
        assert_eq!(tc_verdict(Outcome::Allow), (Outcome::Allow as u8, false));
        assert_eq!(tc_verdict(Outcome::Pass), (Outcome::Pass as u8, false));
        assert_eq!(
            tc_verdict(Outcome::AuditRule),
            (Outcome::AuditRule as u8, false)
        );
        assert_eq!(
            tc_verdict(Outcome::DenyRule),
            (Outcome::DenyRule as u8, true)
        );
        assert_eq!(
            tc_verdict(Outcome::DenyDefault),
            (Outcome::DenyDefault as u8, true)
        );
    }

    #[test]
    fn slots_have_names_and_drop_reasons() {
        assert_eq!(tc_drop_reason(TC_PROXY_BYPASS), Some("proxy-bypass"));
        assert_eq!(tc_drop_reason(Outcome::DenyRule as u8), Some("deny-rule"));
        assert_eq!(tc_drop_reason(Outcome::Allow as u8), None);
        assert_eq!(tc_drop_reason(TC_REPLY), None);
        assert_eq!(tc_slot_name(TC_LINK), Some("link"));
        assert_eq!(tc_slot_name(TC_INBOUND), Some("inbound"));
        assert_eq!(tc_slot_name(0), None);
        assert!(tc_index(2, TC_LINK) < tc_index(3, 0));
    }

    #[test]
    fn neighbour_discovery_is_link_control_but_echo_is_not() {
        assert!(is_link_control(proto::ICMPV6, 135));
        assert!(is_link_control(proto::ICMPV6, 143));
        assert!(!is_link_control(proto::ICMPV6, 128));
        assert!(!is_link_control(proto::ICMP, 135));
    }
}
