//! libFuzzer target for the HTTP CONNECT parsers (egress-common/src/wire/connect.rs).
#![no_main]

use egress_common::wire::{
    connect::{parse_authority, parse_connect, parse_response, valid_host, MAX_HEAD},
    Target,
};
use libfuzzer_sys::fuzz_target;

fn check(target: &Target) {
    assert_ne!(target.port(), 0, "port 0 accepted");
    if let Target::Domain(name, _) = target {
        assert!(valid_host(name), "host {name:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, n))) = parse_connect(data) {
        assert!(n <= data.len() && n <= MAX_HEAD, "head length {n}");
        check(&req.target);
        if let Some(h) = &req.host_hint {
            assert!(valid_host(h), "hint {h:?}");
        }
    }
    if let Ok(Some(n)) = parse_response(data) {
        assert!(n <= data.len(), "response length {n}");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = parse_authority(s) {
            check(&t);
        }
    }
});
