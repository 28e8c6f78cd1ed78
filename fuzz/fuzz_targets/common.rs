//! What every sniffing target asserts about a host name a parser returns.

/// It must be something the policy can match on.
pub fn check_host(host: &str) {
    assert!(!host.is_empty(), "empty host");
    assert!(host.len() <= 255, "host of {} bytes", host.len());
    assert!(
        host.bytes().all(|b| b.is_ascii_graphic()),
        "non-graphic byte in host {host:?}"
    );
}
