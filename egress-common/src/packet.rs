//! The packet parser the per-packet programs share: an IPv4 or IPv6 header, the whole IPv6
//! extension header chain, IPv4 options, and the first bytes of the transport header.
//!
//! Pure and bounded: it reads bytes through [`Bytes`] (a slice in userspace, `bpf_skb_load_bytes`
//! in the kernel), walks at most [`MAX_EXT_HEADERS`] extension headers and at most
//! [`IPV4_OPTIONS_MAX`] bytes of options, and never trusts a length it has not checked. What it
//! cannot judge it says so ([`Class`]): the caller drops it.

use crate::{proto, SockAddr};

/// IPv6 extension headers walked before the packet is refused as [`Class::TooManyHeaders`].
pub const MAX_EXT_HEADERS: usize = 8;
/// Longest IPv4 options area (IHL 15).
pub const IPV4_OPTIONS_MAX: usize = 40;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;
pub const IPPROTO_UDPLITE: u8 = 136;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_DCCP: u8 = 33;

/// IPv4 options that route the packet through other hosts (RFC 791): loose and strict
/// source route. The header's destination is then only the first hop.
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Random access to a packet's bytes. `None` past the end.
pub trait Bytes {
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;

    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.load::<1>(off).map(|b| b[0])
    }

    #[inline(always)]
    fn be16(&self, off: usize) -> Option<u16> {
        self.load::<2>(off).map(u16::from_be_bytes)
    }
}

/// The bytes of `b` before `end`: the IP datagram's own length. Whatever follows it in the
/// frame (link padding, or bytes a raw sender appended) is not part of the datagram: the
/// receiver never sees it, so it must not be judged as its transport header (a first
/// fragment too short to hold its ports would otherwise be judged by trailing bytes).
struct Within<'a, B: ?Sized> {
    b: &'a B,
    end: usize,
}

impl<B: Bytes + ?Sized> Bytes for Within<'_, B> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        // Load first, then decide: no early return that leaves the bytes undefined (in the
        // kernel, LLVM may then read an uninitialised register, which the verifier refuses).
        let inside = off.checked_add(N).is_some_and(|e| e <= self.end);
        let r = self.b.load::<N>(off);
        if inside {
            r
        } else {
            None
        }
    }
}

/// The end of a datagram whose length field says `len` bytes from `start`. 0 (the stack's
/// BIG TCP / jumbogram convention; the node drops such packets otherwise): the frame's end.
#[inline(always)]
fn datagram_end(start: usize, len: u16) -> usize {
    if len == 0 {
        usize::MAX
    } else {
        start + len as usize
    }
}

impl Bytes for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        self.get(off..end)?.try_into().ok()
    }
}

/// What the parser found, for the caller's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A packet to judge by its destination, protocol and (first fragment) port.
    Judge,
    /// IPv6 neighbour discovery or MLD to a link-local or multicast address: the link needs it,
    /// and it cannot leave the link.
    Link,
    /// A fragment after the first: no transport header. Tie it to its first fragment.
    LaterFragment,
    /// IPv4 source route option, or an IPv6 routing header with segments left: the header's
    /// destination is not where the packet ends up.
    SourceRoute,
    /// More than [`MAX_EXT_HEADERS`] IPv6 extension headers.
    TooManyHeaders,
    /// A header that ends past the packet or has impossible lengths.
    Malformed,
}

/// The facts of one IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub class: Class,
    /// The transport protocol after every extension header.
    pub proto: u8,
    /// Addresses, with ports for TCP, UDP, UDP-Lite, SCTP and DCCP (first fragment).
    pub src: SockAddr,
    pub dst: SockAddr,
    /// A TCP SYN without ACK: a connection being opened.
    pub syn: bool,
    /// Fragment identification (IPv4 id, IPv6 fragment header id), 0 when not fragmented.
    pub frag_id: u32,
    /// Part of a fragmented datagram (first or later fragment).
    pub fragment: bool,
    /// What ties the fragments of one datagram together besides addresses and id: IPv4's
    /// protocol field, the IPv6 fragment header's next header (the same in every fragment,
    /// unlike [`Packet::proto`] when extension headers follow the fragment header). 0 when
    /// not fragmented.
    pub frag_proto: u8,
}

impl Default for Packet {
    /// An empty, malformed packet.
    fn default() -> Self {
        Packet::new(SockAddr::default(), SockAddr::default()).with(Class::Malformed)
    }
}

impl Packet {
    fn new(src: SockAddr, dst: SockAddr) -> Self {
        Self {
            class: Class::Judge,
            proto: 0,
            src,
            dst,
            syn: false,
            frag_id: 0,
            fragment: false,
            frag_proto: 0,
        }
    }

    fn with(mut self, class: Class) -> Self {
        self.class = class;
        self
    }
}

/// Whether `p`'s first four transport bytes are source and destination ports.
#[inline(always)]
pub fn has_ports(p: u8) -> bool {
    matches!(
        p,
        proto::TCP | proto::UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP
    )
}

/// ICMPv6 types a link needs: MLD (130-132, 143) and neighbour discovery (133-137).
#[inline(always)]
pub fn is_nd_or_mld(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=137 | 143)
}

/// fe80::/10 or ff00::/8: cannot be routed off the link.
#[inline(always)]
pub fn is_link_scope_v6(a: &[u8; 16]) -> bool {
    a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
}

/// Parses the IP packet starting at `l3` (after the link header).
#[inline(always)]
pub fn parse<B: Bytes + ?Sized>(b: &B, l3: usize, ipv6: bool) -> Packet {
    if ipv6 {
        parse_v6(b, l3)
    } else {
        parse_v4(b, l3)
    }
}

#[inline(always)]
fn parse_v4<B: Bytes + ?Sized>(b: &B, l3: usize) -> Packet {
    let none = Packet::new(SockAddr::default(), SockAddr::default());
    let (Some(vihl), Some(total), Some(frag), Some(id), Some(p), Some(s), Some(d)) = (
        b.u8_at(l3),
        b.be16(l3 + 2),
        b.be16(l3 + 6),
        b.be16(l3 + 4),
        b.u8_at(l3 + 9),
        b.load::<4>(l3 + 12),
        b.load::<4>(l3 + 16),
    ) else {
        return none.with(Class::Malformed);
    };
    let mut pkt = Packet::new(SockAddr::v4(s, 0), SockAddr::v4(d, 0));
    pkt.proto = p;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 || (total != 0 && (total as usize) < ihl) {
        return pkt.with(Class::Malformed);
    }
    let b = &Within {
        b,
        end: datagram_end(l3, total),
    };
    if v4_source_routed(b, l3 + 20, ihl - 20) {
        return pkt.with(Class::SourceRoute);
    }
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    if offset != 0 || more {
        pkt.fragment = true;
        pkt.frag_id = id as u32;
        pkt.frag_proto = p;
    }
    if offset != 0 {
        return pkt.with(Class::LaterFragment);
    }
    transport(b, l3 + ihl, pkt)
}

/// Walks the IPv4 options (at most [`IPV4_OPTIONS_MAX`] bytes) for a source route. A
/// malformed options area counts as routed: it cannot be judged.
#[inline(always)]
fn v4_source_routed<B: Bytes + ?Sized>(b: &B, start: usize, len: usize) -> bool {
    let mut i = 0;
    for _ in 0..IPV4_OPTIONS_MAX {
        if i >= len {
            return false;
        }
        let Some(kind) = b.u8_at(start + i) else {
            return true;
        };
        match kind {
            0 => return false, // end of options
            1 => i += 1,       // no-op
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => match b.u8_at(start + i + 1) {
                Some(l) if l >= 2 => i += l as usize,
                _ => return true,
            },
        }
    }
    i < len
}

#[inline(always)]
fn parse_v6<B: Bytes + ?Sized>(b: &B, l3: usize) -> Packet {
    let none = Packet::new(SockAddr::default(), SockAddr::default());
    let (Some(v), Some(payload), Some(next), Some(s), Some(d)) = (
        b.u8_at(l3),
        b.be16(l3 + 4),
        b.u8_at(l3 + 6),
        b.load::<16>(l3 + 8),
        b.load::<16>(l3 + 24),
    ) else {
        return none.with(Class::Malformed);
    };
    let mut pkt = Packet::new(SockAddr::v6(s, 0), SockAddr::v6(d, 0));
    if v >> 4 != 6 {
        return pkt.with(Class::Malformed);
    }
    // Payload length 0 is a jumbogram only behind a hop-by-hop header; otherwise the
    // datagram is the bare header (the node trims the rest).
    let end = if payload == 0 && next != IPPROTO_HOPOPTS {
        l3 + 40
    } else {
        datagram_end(l3 + 40, payload)
    };
    let b = &Within { b, end };
    let mut next = next;
    let mut off = l3 + 40;
    for _ in 0..MAX_EXT_HEADERS {
        pkt.proto = next;
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING | IPPROTO_MH => {
                let (Some(n), Some(len)) = (b.u8_at(off), b.u8_at(off + 1)) else {
                    return pkt.with(Class::Malformed);
                };
                if next == IPPROTO_ROUTING {
                    // Segments left > 0: the destination field is only the next hop.
                    match b.u8_at(off + 3) {
                        Some(0) => {}
                        Some(_) => return pkt.with(Class::SourceRoute),
                        None => return pkt.with(Class::Malformed),
                    }
                }
                next = n;
                off += (len as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let (Some(n), Some(fo), Some(id)) =
                    (b.u8_at(off), b.be16(off + 2), b.load::<4>(off + 4))
                else {
                    return pkt.with(Class::Malformed);
                };
                pkt.fragment = true;
                pkt.frag_id = u32::from_be_bytes(id);
                pkt.frag_proto = n;
                next = n;
                off += 8;
                if fo >> 3 != 0 {
                    pkt.proto = next;
                    return pkt.with(Class::LaterFragment);
                }
            }
            IPPROTO_AH => {
                let (Some(n), Some(len)) = (b.u8_at(off), b.u8_at(off + 1)) else {
                    return pkt.with(Class::Malformed);
                };
                next = n;
                off += (len as usize + 2) * 4;
            }
            _ => return transport(b, off, pkt),
        }
    }
    pkt.proto = next;
    if matches!(
        next,
        IPPROTO_HOPOPTS
            | IPPROTO_DSTOPTS
            | IPPROTO_ROUTING
            | IPPROTO_MH
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
    ) {
        return pkt.with(Class::TooManyHeaders);
    }
    transport(b, off, pkt)
}

/// The transport header at `l4` of a first (or only) fragment.
#[inline(always)]
fn transport<B: Bytes + ?Sized>(b: &B, l4: usize, mut pkt: Packet) -> Packet {
    let p = pkt.proto;
    if p == IPPROTO_NONE {
        return pkt;
    }
    if has_ports(p) {
        let (Some(sp), Some(dp)) = (b.be16(l4), b.be16(l4 + 2)) else {
            return pkt.with(Class::Malformed);
        };
        pkt.src.port = sp as u32;
        pkt.dst.port = dp as u32;
        if p == proto::TCP {
            let Some(flags) = b.u8_at(l4 + 13) else {
                return pkt.with(Class::Malformed);
            };
            pkt.syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        }
    } else if p == proto::ICMPV6 {
        let Some(ty) = b.u8_at(l4) else {
            return pkt.with(Class::Malformed);
        };
        if is_nd_or_mld(ty) && is_link_scope_v6(&pkt.dst.addr) {
            return pkt.with(Class::Link);
        }
    }
    pkt
}

#[cfg(test)]
mod tests {
    use super::*;

    const V6_SRC: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const V6_DST: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];

    /// An IPv6 header whose first next-header is `next`, followed by `rest`.
    fn v6(next: u8, dst: [u8; 16], rest: &[u8]) -> [u8; 256] {
        let mut p = [0u8; 256];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(256u16 - 40).to_be_bytes()); // the whole buffer
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&V6_SRC);
        p[24..40].copy_from_slice(&dst);
        p[40..40 + rest.len()].copy_from_slice(rest);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn v4(ihl_words: u8, frag: u16, proto: u8, opts: &[u8], l4: &[u8]) -> [u8; 128] {
        let mut p = [0u8; 128];
        p[0] = 0x40 | ihl_words;
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[127, 1, 2, 3]);
        p[20..20 + opts.len()].copy_from_slice(opts);
        let l4at = ihl_words as usize * 4;
        p[l4at..l4at + l4.len()].copy_from_slice(l4);
        p
    }

    #[test]
    fn ipv4_tcp_syn() {
        let p = v4(5, 0, proto::TCP, &[], &tcp(40000, 443, TCP_SYN));
        let r = parse(&p[..], 0, false);
        assert_eq!(r.class, Class::Judge);
        assert_eq!(r.proto, proto::TCP);
        assert_eq!(r.dst, SockAddr::v4([127, 1, 2, 3], 443));
        assert_eq!(r.src, SockAddr::v4([10, 0, 0, 2], 40000));
        assert!(r.syn);
        assert!(!r.fragment);
    }

    #[test]
    fn ipv4_options_are_walked_and_source_routes_refused() {
        // NOP, NOP, timestamp-like option (kind 68, len 4), end: judged by the ports after it.
        let opts = [1, 1, 68, 4, 0, 0, 0, 0];
        let p = v4(7, 0, proto::TCP, &opts, &tcp(1, 80, TCP_SYN));
        let r = parse(&p[..], 0, false);
        assert_eq!((r.class, r.dst.port), (Class::Judge, 80));
        for kind in [IPOPT_LSRR, IPOPT_SSRR] {
            let opts = [1, kind, 7, 4, 127, 9, 9, 9];
            let p = v4(7, 0, proto::TCP, &opts, &tcp(1, 80, TCP_SYN));
            assert_eq!(parse(&p[..], 0, false).class, Class::SourceRoute);
        }
        // An option whose length is 0 or 1 cannot be walked.
        let p = v4(6, 0, proto::TCP, &[68, 1, 0, 0], &tcp(1, 80, 0));
        assert_eq!(parse(&p[..], 0, false).class, Class::SourceRoute);
    }

    #[test]
    fn ipv4_fragments() {
        let first = v4(5, 0x2000, proto::UDP, &[], &[0, 53, 0x1f, 0x90]);
        let r = parse(&first[..], 0, false);
        assert_eq!(
            (r.class, r.dst.port, r.fragment),
            (Class::Judge, 8080, true)
        );
        assert_eq!(r.frag_id, 0x1234);
        let later = v4(5, 185, proto::UDP, &[], &[9, 9, 9, 9]);
        let r = parse(&later[..], 0, false);
        assert_eq!((r.class, r.dst.port), (Class::LaterFragment, 0));
        assert_eq!(r.frag_id, 0x1234);
    }

    #[test]
    fn ipv4_bad_headers() {
        let mut p = v4(5, 0, proto::TCP, &[], &tcp(1, 2, 0));
        p[0] = 0x44; // IHL 4 < 5
        assert_eq!(parse(&p[..], 0, false).class, Class::Malformed);
        assert_eq!(parse(&p[..10], 0, false).class, Class::Malformed);
        // Ports past the end.
        let p = v4(5, 0, proto::TCP, &[], &[]);
        assert_eq!(parse(&p[..21], 0, false).class, Class::Malformed);
    }

    #[test]
    fn ipv6_tcp_behind_destination_options_is_judged_by_its_port() {
        let mut rest = [0u8; 48];
        rest[0] = proto::TCP; // dest options: next = TCP
        rest[1] = 0; // 8 bytes
        rest[8..28].copy_from_slice(&tcp(5555, 22, TCP_SYN));
        let p = v6(IPPROTO_DSTOPTS, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!(r.class, Class::Judge);
        assert_eq!(r.proto, proto::TCP);
        assert_eq!(r.dst, SockAddr::v6(V6_DST, 22));
        assert!(r.syn);
    }

    #[test]
    fn ipv6_chain_of_headers() {
        // hop-by-hop (16 bytes) -> dest opts (8) -> AH (12 = (1+2)*4) -> UDP.
        let mut rest = [0u8; 64];
        rest[0] = IPPROTO_DSTOPTS;
        rest[1] = 1;
        rest[16] = IPPROTO_AH;
        rest[24] = proto::UDP;
        rest[25] = 1;
        rest[36..40].copy_from_slice(&[0x13, 0x88, 0x00, 0x35]);
        let p = v6(IPPROTO_HOPOPTS, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!(
            (r.class, r.proto, r.dst.port),
            (Class::Judge, proto::UDP, 53)
        );
    }

    #[test]
    fn ipv6_routing_header_with_segments_left_is_refused() {
        // SRH: next TCP, len 2 (24 bytes), type 4, segments left 1, one segment.
        let mut rest = [0u8; 64];
        rest[0] = proto::TCP;
        rest[1] = 2;
        rest[2] = 4;
        rest[3] = 1;
        let p = v6(IPPROTO_ROUTING, V6_DST, &rest);
        assert_eq!(parse(&p[..], 0, true).class, Class::SourceRoute);
        // Segments left 0: the destination is the final one.
        rest[3] = 0;
        rest[24..44].copy_from_slice(&tcp(1, 443, TCP_SYN));
        let p = v6(IPPROTO_ROUTING, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!((r.class, r.dst.port), (Class::Judge, 443));
    }

    #[test]
    fn ipv6_fragments() {
        let mut rest = [0u8; 40];
        rest[0] = proto::TCP;
        rest[2..4].copy_from_slice(&1u16.to_be_bytes()); // offset 0, more fragments
        rest[4..8].copy_from_slice(&0xdeadbeefu32.to_be_bytes());
        rest[8..28].copy_from_slice(&tcp(1, 25, TCP_SYN));
        let p = v6(IPPROTO_FRAGMENT, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!((r.class, r.dst.port, r.fragment), (Class::Judge, 25, true));
        assert_eq!(r.frag_id, 0xdeadbeef);
        rest[2..4].copy_from_slice(&(100u16 << 3).to_be_bytes());
        let p = v6(IPPROTO_FRAGMENT, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!(
            (r.class, r.proto, r.dst.port),
            (Class::LaterFragment, proto::TCP, 0)
        );
    }

    #[test]
    fn too_many_extension_headers() {
        let mut rest = [0u8; 200];
        for i in 0..MAX_EXT_HEADERS + 1 {
            rest[i * 8] = IPPROTO_DSTOPTS;
        }
        let p = v6(IPPROTO_DSTOPTS, V6_DST, &rest);
        assert_eq!(parse(&p[..], 0, true).class, Class::TooManyHeaders);
        // Exactly the limit, then TCP: judged.
        let mut rest = [0u8; 200];
        for i in 0..MAX_EXT_HEADERS - 1 {
            rest[i * 8] = IPPROTO_DSTOPTS;
        }
        rest[(MAX_EXT_HEADERS - 1) * 8] = proto::TCP;
        rest[MAX_EXT_HEADERS * 8..MAX_EXT_HEADERS * 8 + 20].copy_from_slice(&tcp(1, 80, TCP_SYN));
        let p = v6(IPPROTO_DSTOPTS, V6_DST, &rest);
        let r = parse(&p[..], 0, true);
        assert_eq!(
            (r.class, r.proto, r.dst.port),
            (Class::Judge, proto::TCP, 80)
        );
    }

    #[test]
    fn neighbour_discovery_passes_only_on_the_link() {
        let ns = [135u8, 0, 0, 0];
        let solicited: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
        let ll: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        for dst in [solicited, ll] {
            let p = v6(proto::ICMPV6, dst, &ns);
            assert_eq!(parse(&p[..], 0, true).class, Class::Link);
        }
        // The same message to a global address is judged like any other packet.
        let p = v6(proto::ICMPV6, V6_DST, &ns);
        let r = parse(&p[..], 0, true);
        assert_eq!((r.class, r.proto), (Class::Judge, proto::ICMPV6));
        // MLD behind hop-by-hop to a multicast group: link.
        let mut rest = [0u8; 16];
        rest[0] = proto::ICMPV6;
        rest[8] = 143;
        let p = v6(IPPROTO_HOPOPTS, solicited, &rest);
        assert_eq!(parse(&p[..], 0, true).class, Class::Link);
        // Echo to a link-local address is not link control.
        let p = v6(proto::ICMPV6, ll, &[128, 0, 0, 0]);
        assert_eq!(parse(&p[..], 0, true).class, Class::Judge);
    }

    #[test]
    fn truncated_ipv6() {
        let p = v6(proto::TCP, V6_DST, &[]);
        assert_eq!(parse(&p[..39], 0, true).class, Class::Malformed);
        assert_eq!(parse(&p[..42], 0, true).class, Class::Malformed);
        let mut rest = [0u8; 8];
        rest[0] = proto::TCP;
        rest[1] = 30; // 248 bytes: past the end
        let p = v6(IPPROTO_DSTOPTS, V6_DST, &rest);
        assert_eq!(parse(&p[..], 0, true).class, Class::Malformed);
    }

    #[test]
    fn bytes_after_the_datagram_are_not_its_transport_header() {
        // An IPv4 first fragment whose 20-byte datagram ends before its ports; the frame
        // carries "ports" after it.
        let mut p = v4(5, 0x2000, proto::TCP, &[], &tcp(1, 80, TCP_SYN));
        p[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse(&p[..], 0, false).class, Class::Malformed);
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        let r = parse(&p[..], 0, false);
        assert_eq!(
            (r.class, r.dst.port, r.frag_proto),
            (Class::Judge, 80, proto::TCP)
        );
        // A total length shorter than the header.
        p[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse(&p[..], 0, false).class, Class::Malformed);
        // IPv6: payload length 8 holds the destination options, not the TCP header after.
        let mut rest = [0u8; 48];
        rest[0] = proto::TCP;
        rest[8..28].copy_from_slice(&tcp(5555, 22, TCP_SYN));
        let mut p = v6(IPPROTO_DSTOPTS, V6_DST, &rest);
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(parse(&p[..], 0, true).class, Class::Malformed);
        p[4..6].copy_from_slice(&28u16.to_be_bytes());
        assert_eq!(parse(&p[..], 0, true).dst.port, 22);
        // Payload length 0 without hop-by-hop: the bare header, nothing after it is read.
        p[4..6].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse(&p[..], 0, true).class, Class::Malformed);
    }

    #[test]
    fn ipv6_fragments_are_tied_by_the_fragment_headers_next_header() {
        // Fragment header -> destination options -> TCP, first and later fragment.
        let mut rest = [0u8; 48];
        rest[0] = IPPROTO_DSTOPTS;
        rest[2..4].copy_from_slice(&1u16.to_be_bytes());
        rest[4..8].copy_from_slice(&7u32.to_be_bytes());
        rest[8] = proto::TCP;
        rest[16..36].copy_from_slice(&tcp(1, 22, TCP_SYN));
        let first = parse(&v6(IPPROTO_FRAGMENT, V6_DST, &rest)[..], 0, true);
        assert_eq!(
            (first.class, first.proto, first.dst.port),
            (Class::Judge, proto::TCP, 22)
        );
        rest[2..4].copy_from_slice(&(8u16 << 3).to_be_bytes());
        let later = parse(&v6(IPPROTO_FRAGMENT, V6_DST, &rest)[..], 0, true);
        assert_eq!(later.class, Class::LaterFragment);
        assert_eq!(
            (first.frag_proto, first.frag_id),
            (later.frag_proto, later.frag_id)
        );
        assert_eq!(first.frag_proto, IPPROTO_DSTOPTS);
    }

    /// Every prefix of every test packet parses without panicking (the fuzz target does this on
    /// random input too).
    #[test]
    fn every_prefix_is_safe() {
        let p = v4(
            7,
            0,
            proto::TCP,
            &[1, 68, 4, 0, 0, 0, 0, 0],
            &tcp(1, 80, TCP_SYN),
        );
        for n in 0..p.len() {
            let _ = parse(&p[..n], 0, false);
        }
        let mut rest = [0u8; 64];
        rest[0] = IPPROTO_FRAGMENT;
        rest[8] = proto::TCP;
        let p = v6(IPPROTO_HOPOPTS, V6_DST, &rest);
        for n in 0..p.len() {
            let _ = parse(&p[..n], 0, true);
        }
    }
}
