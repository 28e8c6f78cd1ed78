//! libFuzzer target for the HTTP/1.x heads the proxy judges request by request
//! (egress-common/src/wire/http.rs, on httparse) and the chunked-body end finder.
#![no_main]

use egress_common::wire::{
    http::{self, Chunked, EMPTY_HEADER, MAX_HEADERS},
    sniff::{sniff, Sniffed},
};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::check_host;

fuzz_target!(|data: &[u8]| {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    if let Ok(r) = http::request(data, &mut headers) {
        assert!(r.len <= data.len() && r.len <= http::MAX_HEAD);
        if let Some(h) = r.host {
            check_host(h);
        }
        assert!(r.path.is_empty() || r.path.starts_with('/') || r.path == "*");
        // The body framing is one of the unambiguous ones.
        assert!(!matches!(r.body, http::Body::UntilClose));
    }
    if let Ok(r) = http::response(data, "GET") {
        assert!(r.len <= data.len());
    }
    // The end of a chunked body: byte by byte and at once agree.
    let mut whole = Chunked::default();
    let at_once = whole.feed(data);
    let mut bytes = Chunked::default();
    let mut used = 0;
    let mut err = false;
    for b in data.chunks(1) {
        match bytes.feed(b) {
            Ok(n) => used += n,
            Err(_) => {
                err = true;
                break;
            }
        }
        if bytes.done() {
            break;
        }
    }
    match at_once {
        Ok(n) => {
            assert!(n <= data.len());
            assert!(!err);
            assert_eq!(n, used);
            assert_eq!(whole.done(), bytes.done());
        }
        Err(_) => assert!(err),
    }
    match sniff(data) {
        Sniffed::Tls(Some(host)) | Sniffed::Http(Some(host)) => check_host(&host),
        _ => {}
    }
});
