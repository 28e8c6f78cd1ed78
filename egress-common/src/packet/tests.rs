//! Unit tests of the packet parser.

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

#[test]
fn ipv4_options_past_the_walked_number_are_refused() {
    let mut opts = [1u8; 40];
    opts[IPV4_OPTIONS_WALKED - 1] = 0; // end of options within the walk: judged
    let p = v4(15, 0, proto::TCP, &opts, &tcp(1, 80, TCP_SYN));
    assert_eq!(parse(&p[..], 0, false).class, Class::Judge);
    let p = v4(15, 0, proto::TCP, &[1u8; 40], &tcp(1, 80, TCP_SYN));
    assert_eq!(parse(&p[..], 0, false).class, Class::SourceRoute);
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
