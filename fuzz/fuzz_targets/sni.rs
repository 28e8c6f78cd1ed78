//! libFuzzer target for the TLS ClientHello SNI parser (egress-common/src/wire/sniff.rs).
#![no_main]

use egress_common::wire::sniff::{client_hello_sni, sniff, Sniffed};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::check_host;

/// The handshake bytes of a hello that sits whole in its first record.
fn handshake(data: &[u8]) -> Option<&[u8]> {
    let len = u16::from_be_bytes([*data.get(3)?, *data.get(4)?]) as usize;
    let rec = data.get(5..5 + len)?;
    let hl =
        ((*rec.get(1)? as usize) << 16) | ((*rec.get(2)? as usize) << 8) | *rec.get(3)? as usize;
    rec.get(..4 + hl)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(sni)) = client_hello_sni(data) {
        check_host(&sni);
    }
    match sniff(data) {
        Sniffed::Tls(Some(host)) | Sniffed::Http(Some(host)) => check_host(&host),
        _ => {}
    }
    // The same ClientHello cut into records of 1 + data[0] % 64 bytes names the same host.
    if let (Some(&k), Ok(Some(sni))) = (data.first(), client_hello_sni(data)) {
        let size = 1 + (k as usize % 64);
        if let Some(hs) = handshake(data) {
            let mut cut = Vec::new();
            for part in hs.chunks(size) {
                cut.extend_from_slice(&[0x16, 3, 1]);
                cut.extend_from_slice(&(part.len() as u16).to_be_bytes());
                cut.extend_from_slice(part);
            }
            if let Ok(again) = client_hello_sni(&cut) {
                assert_eq!(again.as_deref(), Some(sni.as_str()));
            }
        }
    }
});
