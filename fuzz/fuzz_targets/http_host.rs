//! libFuzzer target for the HTTP/1.x Host parser (egress-common/src/wire/sniff.rs).
#![no_main]

use egress_common::wire::sniff::{http_host, sniff, Sniffed};
use libfuzzer_sys::fuzz_target;

/// Whatever the parser returns as a host name must be something the policy can match on.
fn check_host(host: &str) {
    assert!(!host.is_empty(), "empty host");
    assert!(host.len() <= 255, "host of {} bytes", host.len());
    assert!(
        host.bytes().all(|b| b.is_ascii_graphic()),
        "non-graphic byte in host {host:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(host)) = http_host(data) {
        check_host(host);
    }
    match sniff(data) {
        Sniffed::Tls(Some(host)) | Sniffed::Http(Some(host)) => check_host(host),
        _ => {}
    }
});
