//! HTTP CONNECT: the pure parser of an HTTP/1.1 `CONNECT host:port` request head (what
//! `curl --proxy`, squid peers and our `http-connect` mode send), the parser of a proxy's
//! response, the authority parser the HTTP/2 tunnel shares, and the request the node proxy
//! sends. The I/O is the agent's (`egress-agent/src/gateway/connect.rs`).

use alloc::{format, string::String};

use super::Target;

/// The longest request head the gateway reads.
pub const MAX_HEAD: usize = 8 * 1024;
/// The header that carries the host the node proxy sniffed (SNI or Host), when the tunnel's
/// authority is an IP address.
pub const HOST_HEADER: &str = "egress-host";

/// A malformed or unsupported CONNECT request (or response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    TooLong,
    #[error("malformed request line")]
    RequestLine,
    #[error("method {0:?} is not CONNECT")]
    Method(String),
    #[error("not HTTP/1.x: {0:?}")]
    Version(String),
    #[error("bad CONNECT target {0:?} (want host:port)")]
    Target(String),
    #[error("malformed header line")]
    Header,
    #[error("the proxy answered {0}")]
    Status(u16),
    #[error("malformed response status line")]
    StatusLine,
}

impl ConnectError {
    /// The status a server answers with.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::TooLong => 431,
            ConnectError::Method(_) => 405,
            ConnectError::Version(_) => 505,
            _ => 400,
        }
    }
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub target: Target,
    /// The `egress-host` header, when present and a plausible host name.
    pub host_hint: Option<String>,
}

/// `host:port`, `[v6]:port` or `v4:port` → a target. Host names are 1-253 bytes of letters,
/// digits, '-', '_' and '.'.
pub fn parse_authority(s: &str) -> Result<Target, ConnectError> {
    let bad = || ConnectError::Target(s.chars().take(300).collect());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0 && !port.starts_with('+'))
        .ok_or_else(bad)?;
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: core::net::Ipv6Addr = v6.parse().map_err(|_| bad())?;
        return Ok(Target::Addr((ip, port).into()));
    }
    if !valid_host(host) {
        return Err(bad());
    }
    Ok(Target::from_host(host, port))
}

/// A host name (or IPv4 literal) as the gateway accepts it.
pub fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// An HTTP/1.x CONNECT request head: Ok(None) until the blank line arrives; then the request
/// and the length of the head (bytes after it are the client's first tunnelled bytes).
pub fn parse_connect(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, ConnectError> {
    let Some(end) = find_head_end(buf) else {
        if buf.len() >= MAX_HEAD {
            return Err(ConnectError::TooLong);
        }
        // Fail early on a request line that cannot be CONNECT.
        if buf.len() >= 8 && !buf.starts_with(b"CONNECT ") {
            let m = buf.split(|b| *b == b' ').next().unwrap_or(&[]);
            return Err(ConnectError::Method(
                String::from_utf8_lossy(&m[..m.len().min(16)]).into_owned(),
            ));
        }
        return Ok(None);
    };
    if end > MAX_HEAD {
        return Err(ConnectError::TooLong);
    }
    let head = core::str::from_utf8(&buf[..end]).map_err(|_| ConnectError::RequestLine)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().ok_or(ConnectError::RequestLine)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(authority), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnectError::RequestLine);
    };
    if method != "CONNECT" {
        return Err(ConnectError::Method(method.chars().take(16).collect()));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ConnectError::Version(version.chars().take(16).collect()));
    }
    let target = parse_authority(authority)?;
    let mut host_hint = None;
    for l in lines.filter(|l| !l.is_empty()) {
        let (name, value) = l.split_once(':').ok_or(ConnectError::Header)?;
        if name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(ConnectError::Header);
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case(HOST_HEADER) && valid_host(value) {
            host_hint = Some(value.to_ascii_lowercase());
        }
    }
    Ok(Some((ConnectRequest { target, host_hint }, end)))
}

/// The end of the head (after `\r\n\r\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A proxy's response head to CONNECT: Ok(Some(len)) for a 2xx, Err(Status) otherwise.
pub fn parse_response(buf: &[u8]) -> Result<Option<usize>, ConnectError> {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() >= MAX_HEAD {
            Err(ConnectError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = buf[..end]
        .split(|b| *b == b'\r')
        .next()
        .ok_or(ConnectError::StatusLine)?;
    let line = core::str::from_utf8(line).map_err(|_| ConnectError::StatusLine)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ConnectError::StatusLine);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ConnectError::StatusLine);
    }
    let code: u16 = code.parse().map_err(|_| ConnectError::StatusLine)?;
    if (200..300).contains(&code) {
        Ok(Some(end))
    } else {
        Err(ConnectError::Status(code))
    }
}

/// The request the node proxy sends for `target` (with the sniffed host, if any).
pub fn encode_request(target: &Target, host: Option<&str>) -> String {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(h) = host.filter(|h| valid_host(h)) {
        req.push_str(&format!("{HOST_HEADER}: {h}\r\n"));
    }
    req.push_str("\r\n");
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn connect_requests() {
        let r = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: curl/7.88.1\r\n\r\nhello";
        let (req, n) = parse_connect(r).unwrap().unwrap();
        assert_eq!(req.target, Target::Domain("example.com".into(), 443));
        assert_eq!(&r[n..], b"hello");
        for cut in 0..r.len() - 5 {
            assert_eq!(parse_connect(&r[..cut]), Ok(None), "truncated at {cut}");
        }
        let (req, _) =
            parse_connect(b"CONNECT [::1]:8080 HTTP/1.1\r\nEgress-Host: API.Example\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(req.target, Target::Addr("[::1]:8080".parse().unwrap()));
        assert_eq!(req.host_hint.as_deref(), Some("api.example"));
        let (req, _) = parse_connect(b"CONNECT 127.0.0.1:80 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.target, Target::Addr("127.0.0.1:80".parse().unwrap()));
        let t = Target::Domain("a.example".into(), 8443);
        let e = encode_request(&t, Some("a.example"));
        assert_eq!(parse_connect(e.as_bytes()).unwrap().unwrap().0.target, t);
    }

    #[test]
    fn malformed_connect_requests() {
        let err = |b: &[u8]| parse_connect(b).unwrap_err();
        assert_eq!(
            err(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            ConnectError::Method("GET".into())
        );
        assert_eq!(err(b"GET http://x/").status(), 405);
        assert_eq!(
            err(b"CONNECT x:1 HTTP/2.0\r\n\r\n"),
            ConnectError::Version("HTTP/2.0".into())
        );
        for bad in [
            "CONNECT x HTTP/1.1\r\n\r\n",
            "CONNECT x:0 HTTP/1.1\r\n\r\n",
            "CONNECT x:65536 HTTP/1.1\r\n\r\n",
            "CONNECT x:+80 HTTP/1.1\r\n\r\n",
            "CONNECT :80 HTTP/1.1\r\n\r\n",
            "CONNECT [nope]:80 HTTP/1.1\r\n\r\n",
            "CONNECT a/b:80 HTTP/1.1\r\n\r\n",
            "CONNECT ::1:80 HTTP/1.1\r\n\r\n",
        ] {
            let e = err(bad.as_bytes());
            assert!(matches!(e, ConnectError::Target(_)), "{bad:?}: {e:?}");
            assert_eq!(e.status(), 400);
        }
        assert_eq!(
            err(b"CONNECT x:1  HTTP/1.1\r\n\r\n"),
            ConnectError::RequestLine
        );
        assert_eq!(
            err(b"CONNECT x:1 HTTP/1.1\r\nno colon\r\n\r\n"),
            ConnectError::Header
        );
        assert_eq!(
            err(b"CONNECT \xff:1 HTTP/1.1\r\n\r\n"),
            ConnectError::RequestLine
        );
        let long = format!(
            "CONNECT x:1 HTTP/1.1\r\nA: {}\r\n\r\n",
            "b".repeat(MAX_HEAD)
        );
        assert_eq!(err(long.as_bytes()), ConnectError::TooLong);
        assert_eq!(err(long.as_bytes()).status(), 431);
        assert_eq!(err(&long.as_bytes()[..MAX_HEAD]), ConnectError::TooLong);
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(Some(39))
        );
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(
            parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
            Err(ConnectError::Status(403))
        );
        assert_eq!(
            parse_response(b"SSH-2.0-x\r\n\r\n"),
            Err(ConnectError::StatusLine)
        );
    }

    /// Deterministic stand-in for the fuzz target: random and mutated inputs never panic.
    #[test]
    fn mutations_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: x\r\negress-host: a.b\r\n\r\n";
        for _ in 0..20_000 {
            let mut v = seed.to_vec();
            for _ in 0..(next() % 6) {
                let pos = (next() as usize) % v.len();
                v[pos] = next() as u8;
            }
            if next() % 3 == 0 {
                v.truncate((next() as usize) % (v.len() + 1));
            }
            let _ = parse_connect(&v);
            let _ = parse_response(&v);
            if let Ok(s) = core::str::from_utf8(&v) {
                let _ = parse_authority(s);
            }
        }
    }
}
