//! libFuzzer target for the SOCKS5 parsers (egress-common/src/wire/socks5.rs).
#![no_main]

use egress_common::wire::{
    socks5::{encode_request, parse_greeting, parse_reply, parse_request},
    Target,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(n)) = parse_greeting(data) {
        assert!(n <= data.len() && n >= 3, "greeting length {n}");
    }
    if let Ok(Some(n)) = parse_reply(data) {
        assert!(n <= data.len(), "reply length {n}");
    }
    if let Ok(Some((target, n))) = parse_request(data) {
        assert!(n <= data.len(), "request length {n}");
        assert_ne!(target.port(), 0, "port 0 accepted");
        if let Target::Domain(name, _) = &target {
            assert!(
                !name.is_empty() && name.len() <= 255,
                "name of {} bytes",
                name.len()
            );
            assert!(name.bytes().all(|b| b.is_ascii_graphic()), "name {name:?}");
        }
        // What we parse, we encode back to something that parses to the same target.
        let again = encode_request(&target);
        assert_eq!(
            parse_request(&again).ok().flatten().map(|(t, _)| t),
            Some(target)
        );
    }
});
