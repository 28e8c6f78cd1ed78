//! libFuzzer target for the tc backstop's packet parser (egress-common/src/packet.rs): any
//! bytes, at any link-header offset, as IPv4 and as IPv6.
#![no_main]

use egress_common::packet::{parse, plain, Class};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&l3, bytes)) = data.split_first() else {
        return;
    };
    let l3 = (l3 % 32) as usize;
    for ipv6 in [false, true] {
        let p = parse(bytes, l3, ipv6);
        // No transport header is read before these verdicts.
        if matches!(
            p.class,
            Class::LaterFragment | Class::SourceRoute | Class::TooManyHeaders
        ) {
            assert_eq!((p.src.port, p.dst.port, p.syn), (0, 0, false), "{p:?}");
        }
        assert!(p.src.port <= 0xffff && p.dst.port <= 0xffff);
        assert!(p.fragment || p.frag_id == 0, "{p:?}");
        if p.class == Class::LaterFragment {
            assert!(p.fragment, "{p:?}");
        }
    }
    // The per-packet program's one-look reader agrees with the parser on what it calls plain.
    if let Some(h) = bytes.get(..plain::V6_LEN) {
        if let Some(q) = plain::v6(h.try_into().unwrap()) {
            assert_eq!(q, parse(bytes, 0, true));
        }
    }
    if let Some(h) = bytes.get(..plain::V4_LEN) {
        if let Some(q) = plain::v4(h.try_into().unwrap()) {
            assert_eq!(q, parse(bytes, 0, false));
        }
    }
});
