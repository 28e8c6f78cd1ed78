//! The tc backstop: what happens to a packet that leaves a workload's network namespace.
//!
//! The socket hooks judge connections; the tc programs on the host side of each workload's
//! veth judge packets with the same policy maps and the same [`crate::decide`], and catch what
//! never went through a socket hook (raw and packet sockets, ICMP, connections that existed
//! before the agent). Allowed traffic passes; traffic the proxy should have carried but that
//! came straight out did not go through the proxy and is dropped.

use core::mem::size_of;

use crate::{
    packet::{Class, Packet},
    proto, Outcome, SockAddr,
};

/// Counter slots per workload. Judged packets count under their [`Outcome`] (1..=11); these
/// slots follow.
pub const TC_SLOTS: u32 = 32;
/// A packet to a destination the policy sends through the proxy, that did not come from the
/// proxy: dropped.
pub const TC_PROXY_BYPASS: u8 = 12;
/// A reply on a connection that was opened into the workload: passed unjudged.
pub const TC_REPLY: u8 = 13;
/// Link control (ARP, IPv6 neighbour discovery and MLD): passed unjudged.
pub const TC_LINK: u8 = 14;

/// Packets into the workload (any kind): counted, never judged.
pub const TC_INBOUND: u8 = 15;
/// An IPv4 source route option or an IPv6 routing header with segments left: dropped (the
/// header's destination is only the next hop, not where the packet goes).
pub const TC_SOURCE_ROUTE: u8 = 16;
/// More IPv6 extension headers than the parser walks: dropped.
pub const TC_TOO_MANY_HEADERS: u8 = 17;
/// Headers that end past the packet or have impossible lengths: dropped.
pub const TC_MALFORMED: u8 = 18;
/// A packet leaving the workload whose source is none of its addresses: dropped.
pub const TC_SPOOFED: u8 = 19;
/// A later fragment whose first fragment was not let through (or not seen): dropped.
pub const TC_ORPHAN_FRAGMENT: u8 = 20;
/// A frame neither IPv4, IPv6 nor ARP: dropped.
pub const TC_NON_IP: u8 = 21;
/// A later fragment of a datagram whose first fragment was let through: passed.
pub const TC_FRAGMENT: u8 = 22;
/// A frame a workload wrote through a packet socket (AF_PACKET), leaving a node interface
/// while packet sockets are not allowed (the node backstop): dropped.
pub const TC_PACKET_SOCKET: u8 = 23;

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

/// Key of `EGRESS_FRAGMENTS`: one fragmented datagram leaving a workload, whose first
/// fragment was let through. Addresses in network order (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub ifindex: u32,
    /// IPv4 identification, or the IPv6 fragment header's identification.
    pub id: u32,
    /// 4 or 6.
    pub family: u8,
    /// What ties the fragments: IPv4's protocol, the IPv6 fragment header's next header.
    pub proto: u8,
    pub _pad0: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl FragKey {
    #[inline(always)]
    pub fn of(ifindex: u32, p: &Packet) -> FragKey {
        FragKey {
            ifindex,
            id: p.frag_id,
            family: p.dst.family as u8,
            proto: p.frag_proto,
            _pad0: [0; 2],
            src: p.src.addr,
            dst: p.dst.addr,
        }
    }
}

/// Value of `EGRESS_POD_ADDRS` (key: the ifindex of the host side of a pod's veth): the
/// addresses a packet leaving the pod may carry as its source, and the only destinations
/// an inbound packet opens a reply flow for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    pub ip4: [u8; 4],
    /// 1: `ip4` is the pod's.
    pub has4: u8,
    /// 1: `ip6` is the pod's.
    pub has6: u8,
    pub _pad0: [u8; 2],
    pub ip6: [u8; 16],
}

impl PodAddrs {
    /// Whether `a` (address only; the port is ignored) is one of the pod's addresses.
    #[inline(always)]
    pub fn owns(&self, a: &SockAddr) -> bool {
        if a.family == 4 {
            self.has4 == 1 && a.ip4() == self.ip4
        } else {
            self.has6 == 1 && a.addr == self.ip6
        }
    }

    /// Whether a packet leaving the pod may carry its source address: one of the pod's own;
    /// for IPv6 also a link-local one (fe80::/10, neighbour discovery and anything else that
    /// cannot be routed off the link: the node does not forward link-local sources), and the
    /// unspecified `::` for link control only (duplicate address detection, MLD).
    #[inline(always)]
    pub fn may_send(&self, p: &Packet) -> bool {
        if self.owns(&p.src) {
            return true;
        }
        if p.src.family != 6 {
            return false;
        }
        let a = &p.src.addr;
        let link_local = a[0] == 0xfe && a[1] & 0xc0 == 0x80;
        let unspecified = a.iter().all(|b| *b == 0);
        link_local || (unspecified && p.class == Class::Link)
    }

    /// Whether a packet entering the pod opens a flow whose replies leave unjudged: a TCP SYN
    /// or a UDP datagram addressed to the pod itself, from an address that is not the pod's.
    ///
    /// Both conditions, and the anti-spoof check on the way out ([`PodAddrs::may_send`]), are
    /// needed. Without anti-spoof a pod sends "SYN from the denied host to me", the node
    /// routes it straight back into the pod, and the pod's own SYNs to the denied host then
    /// pass as replies. Anti-spoof stops the forged source; the checks here make sure only
    /// packets that really answer the pod's address count: not the pod's own packets
    /// hairpinned back (source = the pod), and not packets the node routes through the veth
    /// to some other address.
    #[inline(always)]
    pub fn opens_reply_flow(&self, p: &Packet) -> bool {
        p.class == Class::Judge
            && ((p.proto == proto::TCP && p.syn) || p.proto == proto::UDP)
            && self.owns(&p.dst)
            && !self.owns(&p.src)
    }
}

/// The slot a packet the parser refuses to judge counts under (always dropped), or `None`
/// for the classes that go on (judged, link control, later fragments).
#[inline(always)]
pub fn refused_slot(c: Class) -> Option<u8> {
    match c {
        Class::SourceRoute => Some(TC_SOURCE_ROUTE),
        Class::TooManyHeaders => Some(TC_TOO_MANY_HEADERS),
        Class::Malformed => Some(TC_MALFORMED),
        Class::Judge | Class::Link | Class::LaterFragment => None,
    }
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
        TC_SOURCE_ROUTE => Some("source-route"),
        TC_TOO_MANY_HEADERS => Some("too-many-headers"),
        TC_MALFORMED => Some("malformed"),
        TC_SPOOFED => Some("spoofed-source"),
        TC_ORPHAN_FRAGMENT => Some("orphan-fragment"),
        TC_NON_IP => Some("non-ip"),
        TC_PACKET_SOCKET => Some("packet-socket"),
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
        "source-route" => Some("tc-drop-source-route"),
        "too-many-headers" => Some("tc-drop-too-many-headers"),
        "malformed" => Some("tc-drop-malformed"),
        "spoofed-source" => Some("tc-drop-spoofed-source"),
        "orphan-fragment" => Some("tc-drop-orphan-fragment"),
        "non-ip" => Some("tc-drop-non-ip"),
        "packet-socket" => Some("tc-drop-packet-socket"),
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
        TC_FRAGMENT => Some("fragment"),
        s => tc_drop_reason(s).or_else(|| Outcome::from_u8(s).map(Outcome::name)),
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
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::PodAddrs {}
}

const _: () = assert!(size_of::<TcCount>() == 16);
const _: () = assert!(size_of::<FlowKey>() == 56);
const _: () = assert!(size_of::<FragKey>() == 44);
const _: () = assert!(size_of::<PodAddrs>() == 24);

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

    fn pod() -> PodAddrs {
        PodAddrs {
            ip4: [10, 200, 0, 2],
            has4: 1,
            has6: 1,
            _pad0: [0; 2],
            ip6: [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        }
    }

    fn pkt(class: Class, proto: u8, syn: bool, src: SockAddr, dst: SockAddr) -> Packet {
        Packet {
            class,
            proto,
            src,
            dst,
            syn,
            frag_id: 0,
            fragment: false,
            frag_proto: 0,
        }
    }

    #[test]
    fn a_pod_sends_only_from_its_own_addresses() {
        let p = pod();
        let out4 = SockAddr::v4([192, 0, 2, 30], 80);
        let own4 = SockAddr::v4([10, 200, 0, 2], 4000);
        let judge = |src| pkt(Class::Judge, proto::TCP, true, src, out4);
        assert!(p.may_send(&judge(own4)));
        assert!(!p.may_send(&judge(SockAddr::v4([10, 200, 0, 3], 4000))));
        assert!(!p.may_send(&judge(SockAddr::v4([0, 0, 0, 0], 0))));
        let out6 = SockAddr::v6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30],
            0,
        );
        let own6 = SockAddr::v6(p.ip6, 0);
        let ll = SockAddr::v6([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9], 0);
        let any = SockAddr::v6([0; 16], 0);
        let other = SockAddr::v6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30],
            0,
        );
        let j6 = |src| pkt(Class::Judge, proto::ICMPV6, false, src, out6);
        assert!(p.may_send(&j6(own6)));
        assert!(p.may_send(&j6(ll)));
        assert!(!p.may_send(&j6(other)));
        // `::` only for link control (duplicate address detection).
        assert!(!p.may_send(&j6(any)));
        assert!(p.may_send(&pkt(Class::Link, proto::ICMPV6, false, any, out6)));
        // A pod without an IPv6 address owns none.
        let v4only = PodAddrs { has6: 0, ..p };
        assert!(!v4only.may_send(&j6(own6)));
    }

    #[test]
    fn only_packets_to_the_pod_from_others_open_reply_flows() {
        let p = pod();
        let own = SockAddr::v4([10, 200, 0, 2], 8080);
        let peer = SockAddr::v4([192, 0, 2, 30], 40000);
        assert!(p.opens_reply_flow(&pkt(Class::Judge, proto::TCP, true, peer, own)));
        assert!(p.opens_reply_flow(&pkt(Class::Judge, proto::UDP, false, peer, own)));
        // Not a SYN; not to the pod; the pod's own packet hairpinned back; not judged.
        assert!(!p.opens_reply_flow(&pkt(Class::Judge, proto::TCP, false, peer, own)));
        let elsewhere = SockAddr::v4([10, 200, 0, 9], 8080);
        assert!(!p.opens_reply_flow(&pkt(Class::Judge, proto::TCP, true, peer, elsewhere)));
        assert!(!p.opens_reply_flow(&pkt(Class::Judge, proto::TCP, true, own, own)));
        assert!(!p.opens_reply_flow(&pkt(Class::Malformed, proto::UDP, false, peer, own)));
    }

    #[test]
    fn refused_packets_have_drop_reasons() {
        for (c, reason) in [
            (Class::SourceRoute, "source-route"),
            (Class::TooManyHeaders, "too-many-headers"),
            (Class::Malformed, "malformed"),
        ] {
            let slot = refused_slot(c).unwrap();
            assert_eq!(tc_drop_reason(slot), Some(reason));
            assert_eq!(tc_slot_name(slot), Some(reason));
            assert!(tc_event_verdict(slot).unwrap().ends_with(reason));
        }
        assert_eq!(refused_slot(Class::Judge), None);
        assert_eq!(tc_drop_reason(TC_SPOOFED), Some("spoofed-source"));
        assert_eq!(tc_drop_reason(TC_ORPHAN_FRAGMENT), Some("orphan-fragment"));
        assert_eq!(tc_drop_reason(TC_NON_IP), Some("non-ip"));
        assert_eq!(tc_drop_reason(TC_PACKET_SOCKET), Some("packet-socket"));
        assert_eq!(
            tc_event_verdict(TC_PACKET_SOCKET),
            Some("tc-drop-packet-socket")
        );
        assert!(TC_PACKET_SOCKET < TC_SLOTS as u8);
        assert_eq!(tc_drop_reason(TC_FRAGMENT), None);
        assert_eq!(tc_slot_name(TC_FRAGMENT), Some("fragment"));
        assert!(TC_FRAGMENT < TC_SLOTS as u8);
    }
}
