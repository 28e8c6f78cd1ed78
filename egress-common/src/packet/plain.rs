//! The common packet in one look: what the per-packet program reads straight from the packet
//! (direct packet access, no helper call) before it falls back to [`super::parse`].
//!
//! A packet is plain when nothing in it needs walking: IPv4 with no options and not a
//! fragment, or IPv6 with TCP or UDP right after the fixed header; TCP or UDP, with the
//! datagram long enough to hold what `parse` reads of the transport header. For a plain
//! packet the result is exactly `parse`'s (a unit test and the fuzz target check that);
//! anything else is `None`, and `parse` judges it.

use super::{Class, Packet, TCP_ACK, TCP_SYN};
use crate::{proto, SockAddr};

/// Bytes a plain IPv4 packet is read from: the fixed header and the TCP header up to its
/// flags byte.
pub const V4_LEN: usize = 34;
/// Bytes a plain IPv6 packet is read from.
pub const V6_LEN: usize = 54;

/// How many transport bytes `parse` reads for protocol `p` (None: not a plain protocol).
#[inline(always)]
fn transport_len(p: u8) -> Option<u16> {
    match p {
        proto::TCP => Some(14),
        proto::UDP => Some(4),
        _ => None,
    }
}

#[inline(always)]
fn be16(h: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([h[i], h[i + 1]])
}

/// The packet whose transport header starts at `l4` of `h`, when plain.
#[inline(always)]
fn with_ports(h: &[u8], l4: usize, p: u8, src: SockAddr, dst: SockAddr) -> Packet {
    let mut pkt = Packet::new(src, dst);
    pkt.class = Class::Judge;
    pkt.proto = p;
    pkt.src.port = be16(h, l4) as u32;
    pkt.dst.port = be16(h, l4 + 2) as u32;
    pkt.syn = p == proto::TCP && h[l4 + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
    pkt
}

/// A plain IPv4 packet from its first [`V4_LEN`] bytes (a UDP packet needs only 24 of them
/// to be plain, but is read from 34 like TCP).
#[inline(always)]
pub fn v4(h: &[u8; V4_LEN]) -> Option<Packet> {
    let (total, frag, p) = (be16(h, 2), be16(h, 6), h[9]);
    let need = 20 + transport_len(p)?;
    // Version 4, no options; not a fragment (DF may be set); the datagram holds what
    // `parse` reads (a length of 0 means "to the frame's end": left to `parse`).
    if h[0] != 0x45 || frag & 0x3fff != 0 || total < need {
        return None;
    }
    let src = SockAddr::v4([h[12], h[13], h[14], h[15]], 0);
    let dst = SockAddr::v4([h[16], h[17], h[18], h[19]], 0);
    Some(with_ports(h, 20, p, src, dst))
}

/// A plain IPv6 packet from its first [`V6_LEN`] bytes.
#[inline(always)]
pub fn v6(h: &[u8; V6_LEN]) -> Option<Packet> {
    let (payload, next) = (be16(h, 4), h[6]);
    if h[0] >> 4 != 6 || payload < transport_len(next)? {
        return None;
    }
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s.copy_from_slice(&h[8..24]);
    d.copy_from_slice(&h[24..40]);
    Some(with_ports(
        h,
        40,
        next,
        SockAddr::v6(s, 0),
        SockAddr::v6(d, 0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::parse;

    /// xorshift: reproducible bytes without a dependency.
    fn noise(seed: &mut u64) -> u8 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed as u8
    }

    fn tcp_v4(flags: u8, total: u16) -> [u8; 64] {
        let mut p = [0u8; 64];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6] = 0x40; // DF
        p[9] = proto::TCP;
        p[12..16].copy_from_slice(&[127, 0, 0, 1]);
        p[16..20].copy_from_slice(&[127, 60, 0, 1]);
        p[20..24].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90]); // 40000 -> 8080
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    fn first<const N: usize>(p: &[u8]) -> &[u8; N] {
        p[..N].try_into().unwrap()
    }

    #[test]
    fn plain_tcp_v4_is_read_as_parse_reads_it() {
        for flags in [0x02, 0x12, 0x10, 0x18, 0x11] {
            let p = tcp_v4(flags, 64);
            let got = v4(first(&p)).expect("plain");
            assert_eq!(got, parse(&p[..], 0, false));
            assert_eq!(got.dst, SockAddr::v4([127, 60, 0, 1], 8080));
            assert_eq!(got.syn, flags == 0x02);
        }
    }

    #[test]
    fn what_needs_walking_is_not_plain() {
        let mut p = tcp_v4(0x10, 64);
        p[0] = 0x46; // options
        assert_eq!(v4(first(&p)), None);
        let mut p = tcp_v4(0x10, 64);
        p[6] = 0x20; // more fragments
        assert_eq!(v4(first(&p)), None);
        let mut p = tcp_v4(0x10, 64);
        p[7] = 1; // a later fragment
        assert_eq!(v4(first(&p)), None);
        let mut p = tcp_v4(0x10, 64);
        p[9] = proto::ICMP;
        assert_eq!(v4(first(&p)), None);
        // The datagram ends before the TCP flags: `parse` calls it malformed.
        let p = tcp_v4(0x10, 33);
        assert_eq!(v4(first(&p)), None);
        assert_eq!(parse(&p[..], 0, false).class, Class::Malformed);
        // A length of 0 (to the frame's end) is left to `parse`.
        assert_eq!(v4(first(&tcp_v4(0x10, 0))), None);
        let mut h = [0u8; 64];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&24u16.to_be_bytes());
        h[6] = crate::packet::IPPROTO_DSTOPTS;
        assert_eq!(v6(first(&h)), None);
        h[6] = proto::UDP;
        assert!(v6(first(&h)).is_some());
        h[4..6].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(v6(first(&h)), None, "payload shorter than the ports");
    }

    /// Whatever the bytes, a packet `v4`/`v6` call plain is the packet `parse` finds.
    #[test]
    fn plain_agrees_with_parse_on_random_headers() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut plain = [0usize; 2];
        for i in 0..400_000 {
            let mut p = [0u8; 80];
            for b in p.iter_mut() {
                *b = noise(&mut seed);
            }
            // Bias towards the plain shapes so both outcomes are exercised.
            if i % 2 == 0 {
                p[0] = 0x45;
                p[6] &= 0xc0;
                p[7] = 0;
                p[9] = [proto::TCP, proto::UDP][i % 4 / 2];
            } else {
                p[0] = 0x60 | (p[0] & 0x0f);
                p[6] = [proto::TCP, proto::UDP][i % 4 / 2];
            }
            let len = 20 + (noise(&mut seed) as usize % 61);
            let bytes = &p[..len.max(V6_LEN)];
            if let Some(got) = v4(first(bytes)) {
                plain[0] += 1;
                assert_eq!(got, parse(bytes, 0, false), "{bytes:02x?}");
            }
            if let Some(got) = v6(first(bytes)) {
                plain[1] += 1;
                assert_eq!(got, parse(bytes, 0, true), "{bytes:02x?}");
            }
        }
        assert!(plain[0] > 10_000 && plain[1] > 10_000, "{plain:?}");
    }
}
