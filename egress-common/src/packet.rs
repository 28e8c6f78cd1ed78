//! The packet parser the per-packet programs share: an IPv4 or IPv6 header, the whole IPv6
//! extension header chain, IPv4 options, and the first bytes of the transport header.
//!
//! Pure and bounded: it reads bytes through [`Bytes`] (a slice in userspace, `bpf_skb_load_bytes`
//! in the kernel), walks at most [`MAX_EXT_HEADERS`] extension headers and at most
//! [`IPV4_OPTIONS_MAX`] bytes of options, and never trusts a length it has not checked. What it
//! cannot judge it says so ([`Class`]): the caller drops it.

use crate::{proto, SockAddr};

pub mod plain;

/// IPv6 extension headers walked before the packet is refused as [`Class::TooManyHeaders`].
pub const MAX_EXT_HEADERS: usize = 8;
/// Longest IPv4 options area (IHL 15).
pub const IPV4_OPTIONS_MAX: usize = 40;
/// IPv4 options walked (a no-op counts as one) before the packet is refused as
/// [`Class::SourceRoute`] (it cannot be judged). Real packets carry one or two options (router
/// alert, a timestamp); each step costs the verifier, which explores every one.
pub const IPV4_OPTIONS_WALKED: usize = 8;

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
    // The fixed header in one read (each read is a helper call in the kernel).
    let Some(h) = b.load::<20>(l3) else {
        return none.with(Class::Malformed);
    };
    let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let (vihl, total, id, frag, p) = (h[0], be16(2), be16(4), be16(6), h[9]);
    let s = [h[12], h[13], h[14], h[15]];
    let d = [h[16], h[17], h[18], h[19]];
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

/// Walks the IPv4 options (at most [`IPV4_OPTIONS_MAX`] bytes, [`IPV4_OPTIONS_WALKED`]
/// options) for a source route. A malformed options area, or one with more options, counts
/// as routed: it cannot be judged.
#[inline(always)]
fn v4_source_routed<B: Bytes + ?Sized>(b: &B, start: usize, len: usize) -> bool {
    let mut i = 0;
    for _ in 0..IPV4_OPTIONS_WALKED {
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
    // The fixed header in one read (each read is a helper call in the kernel).
    let Some(h) = b.load::<40>(l3) else {
        return none.with(Class::Malformed);
    };
    let (v, payload, next) = (h[0], u16::from_be_bytes([h[4], h[5]]), h[6]);
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s.copy_from_slice(&h[8..24]);
    d.copy_from_slice(&h[24..40]);
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
        let Some(ports) = b.load::<4>(l4) else {
            return pkt.with(Class::Malformed);
        };
        pkt.src.port = u16::from_be_bytes([ports[0], ports[1]]) as u32;
        pkt.dst.port = u16::from_be_bytes([ports[2], ports[3]]) as u32;
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
mod tests;
