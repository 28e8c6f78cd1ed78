//! SOCKS5 (RFC 1928), CONNECT only, no authentication: pure parsers for both sides (byte
//! slices in, `Ok(None)` while more bytes are needed) and the encoders of the messages the
//! agent sends. The agent's gateway server and the node proxy's client handshake
//! (`egress-agent/src/gateway/socks5.rs`) do the I/O.
//!
//! Every length is checked before it is used; a domain name must be 1-255 printable ASCII
//! bytes. The parsers never allocate more than the name they return.

use alloc::{string::String, vec, vec::Vec};
use core::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Target;

pub const VERSION: u8 = 5;
pub const NO_AUTH: u8 = 0;
pub const NO_ACCEPTABLE: u8 = 0xff;
pub const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// Reply codes (RFC 1928 section 6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// A malformed or unsupported SOCKS5 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS5: version byte {0:#04x}")]
    Version(u8),
    #[error("the greeting offers zero authentication methods")]
    NoMethods,
    #[error("the client does not offer 'no authentication', the only method served")]
    NoAcceptableMethod,
    #[error("command {0:#04x} is not supported (CONNECT only)")]
    Command(u8),
    #[error("reserved byte is {0:#04x}, not 0")]
    Reserved(u8),
    #[error("address type {0:#04x} is not IPv4 (1), domain (3) or IPv6 (4)")]
    AddressType(u8),
    #[error("domain name of length 0")]
    EmptyDomain,
    #[error("domain name is not printable ASCII")]
    BadDomain,
    #[error("port 0")]
    PortZero,
    #[error("the server chose method {0:#04x}, not 'no authentication'")]
    Method(u8),
    #[error("the server refused: reply code {0:#04x} ({text})", text = reply_text(*.0))]
    Refused(u8),
}

impl Socks5Error {
    /// The reply code a server sends for this error (before closing).
    pub fn reply_code(&self) -> u8 {
        match self {
            Socks5Error::Command(_) => reply::COMMAND_NOT_SUPPORTED,
            Socks5Error::AddressType(_) => reply::ADDRESS_TYPE_NOT_SUPPORTED,
            _ => reply::GENERAL_FAILURE,
        }
    }
}

pub fn reply_text(code: u8) -> &'static str {
    match code {
        reply::SUCCEEDED => "succeeded",
        reply::GENERAL_FAILURE => "general failure",
        reply::NOT_ALLOWED => "connection not allowed by ruleset",
        reply::NETWORK_UNREACHABLE => "network unreachable",
        reply::HOST_UNREACHABLE => "host unreachable",
        reply::CONNECTION_REFUSED => "connection refused",
        reply::TTL_EXPIRED => "TTL expired",
        reply::COMMAND_NOT_SUPPORTED => "command not supported",
        reply::ADDRESS_TYPE_NOT_SUPPORTED => "address type not supported",
        _ => "unassigned",
    }
}

/// The client's greeting: `VER NMETHODS METHODS...`. Ok(Some(len)) when it offers
/// 'no authentication'; Err(NoAcceptableMethod) when it does not (answer `05 FF`).
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let len = 2 + n as usize;
    let Some(methods) = buf.get(2..len) else {
        return Ok(None);
    };
    if methods.contains(&NO_AUTH) {
        Ok(Some(len))
    } else {
        Err(Socks5Error::NoAcceptableMethod)
    }
}

/// An address as SOCKS5 writes it (`ATYP ADDR PORT`), starting at `buf[0]`: the target and the
/// bytes it took.
fn parse_address(buf: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let (addr_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => match buf.get(1) {
            None => return Ok(None),
            Some(0) => return Err(Socks5Error::EmptyDomain),
            Some(&n) => (n as usize, 2),
        },
        other => return Err(Socks5Error::AddressType(other)),
    };
    let end = start + addr_len + 2;
    let Some(bytes) = buf.get(start..end) else {
        return Ok(None);
    };
    let (addr, port) = bytes.split_at(addr_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    if port == 0 {
        return Err(Socks5Error::PortZero);
    }
    let target = match atyp {
        ATYP_V4 => {
            let a: [u8; 4] = addr
                .try_into()
                .map_err(|_| Socks5Error::AddressType(atyp))?;
            Target::Addr(SocketAddr::from((Ipv4Addr::from(a), port)))
        }
        ATYP_V6 => {
            let a: [u8; 16] = addr
                .try_into()
                .map_err(|_| Socks5Error::AddressType(atyp))?;
            Target::Addr(SocketAddr::from((Ipv6Addr::from(a), port)))
        }
        _ => {
            if !addr.iter().all(|b| b.is_ascii_graphic()) {
                return Err(Socks5Error::BadDomain);
            }
            let name = String::from_utf8_lossy(addr).into_owned();
            // A client may send an IP literal as a "domain" (curl --socks5-hostname 127.0.0.1).
            Target::from_host(&name, port)
        }
    };
    Ok(Some((target, end)))
}

/// The client's request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    let Some(head) = buf.get(..3) else {
        // Check what we have so far: a wrong version fails at once.
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(Socks5Error::Version(v));
            }
        }
        return Ok(None);
    };
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    if head[1] != CMD_CONNECT {
        return Err(Socks5Error::Command(head[1]));
    }
    if head[2] != 0 {
        return Err(Socks5Error::Reserved(head[2]));
    }
    Ok(parse_address(&buf[3..])?.map(|(t, n)| (t, 3 + n)))
}

/// The server's reply: `VER REP RSV ATYP BND.ADDR BND.PORT` (the bound port may be 0).
pub fn parse_reply(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let Some(head) = buf.get(..3) else {
        return Ok(None);
    };
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    if head[1] != reply::SUCCEEDED {
        return Err(Socks5Error::Refused(head[1]));
    }
    let rest = &buf[3..];
    let Some(&atyp) = rest.first() else {
        return Ok(None);
    };
    let addr_len = match atyp {
        ATYP_V4 => 4,
        ATYP_V6 => 16,
        ATYP_DOMAIN => match rest.get(1) {
            None => return Ok(None),
            Some(&n) => 1 + n as usize,
        },
        other => return Err(Socks5Error::AddressType(other)),
    };
    let len = 3 + 1 + addr_len + 2;
    Ok((buf.len() >= len).then_some(len))
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT` with `bound` (0.0.0.0:0 when None).
pub fn encode_reply(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    match bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))) {
        SocketAddr::V4(a) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    out
}

/// The CONNECT request for `target`.
pub fn encode_request(target: &Target) -> Vec<u8> {
    let mut out = vec![VERSION, CMD_CONNECT, 0];
    let port = match target {
        Target::Addr(SocketAddr::V4(a)) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Addr(SocketAddr::V6(a)) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Domain(name, port) => {
            out.push(ATYP_DOMAIN);
            out.push(name.len().min(255) as u8);
            out.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{string::ToString, vec};

    #[test]
    fn greeting() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some(4)));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(Socks5Error::NoAcceptableMethod)
        );
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0, 80];
        let t = parse_request(&v4).unwrap().unwrap();
        assert_eq!(t, (Target::Addr("127.0.0.1:80".parse().unwrap()), 10));
        for cut in 0..v4.len() {
            assert_eq!(parse_request(&v4[..cut]), Ok(None), "truncated at {cut}");
        }
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse_request(&v6).unwrap().unwrap().0,
            Target::Addr("[::1]:443".parse().unwrap())
        );
        let mut d = vec![5, 1, 0, 3, 11];
        d.extend_from_slice(b"example.com");
        d.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse_request(&d).unwrap().unwrap(),
            (Target::Domain("example.com".into(), 443), d.len())
        );
        for cut in 0..d.len() {
            assert_eq!(parse_request(&d[..cut]), Ok(None), "truncated at {cut}");
        }
        // Round trip through the encoder.
        for t in [
            Target::Addr("10.1.2.3:8080".parse().unwrap()),
            Target::Addr("[2001:db8::1]:22".parse().unwrap()),
            Target::Domain("a.b".into(), 1),
        ] {
            let e = encode_request(&t);
            assert_eq!(parse_request(&e), Ok(Some((t, e.len()))));
        }
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(
            parse_request(&[4, 1, 0, 1, 1, 2, 3, 4, 0, 80]),
            Err(Socks5Error::Version(4))
        );
        assert_eq!(parse_request(&[6]), Err(Socks5Error::Version(6)));
        assert_eq!(
            parse_request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80]),
            Err(Socks5Error::Command(2))
        );
        assert_eq!(
            parse_request(&[5, 3, 0, 1]).unwrap_err().reply_code(),
            reply::COMMAND_NOT_SUPPORTED
        );
        assert_eq!(
            parse_request(&[5, 1, 1, 1, 1, 2, 3, 4, 0, 80]),
            Err(Socks5Error::Reserved(1))
        );
        let e = parse_request(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]).unwrap_err();
        assert_eq!(e, Socks5Error::AddressType(9));
        assert_eq!(e.reply_code(), reply::ADDRESS_TYPE_NOT_SUPPORTED);
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Socks5Error::EmptyDomain)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]),
            Err(Socks5Error::BadDomain)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 1, 1, 2, 3, 4, 0, 0]),
            Err(Socks5Error::PortZero)
        );
        // A domain length that claims more than is there: wait, never read past the end.
        assert_eq!(parse_request(&[5, 1, 0, 3, 255, b'a']), Ok(None));
    }

    #[test]
    fn replies() {
        let ok = encode_reply(reply::SUCCEEDED, Some("127.0.8.1:4000".parse().unwrap()));
        assert_eq!(parse_reply(&ok), Ok(Some(10)));
        assert_eq!(parse_reply(&ok[..9]), Ok(None));
        let refused = encode_reply(reply::NOT_ALLOWED, None);
        let e = parse_reply(&refused).unwrap_err();
        assert_eq!(e, Socks5Error::Refused(2));
        assert!(e.to_string().contains("not allowed by ruleset"), "{e}");
        assert_eq!(parse_reply(&[5, 0, 0, 3, 2, b'a', b'b', 0, 1]), Ok(Some(9)));
        assert_eq!(parse_reply(&[5, 0, 0, 7]), Err(Socks5Error::AddressType(7)));
    }

    /// Deterministic stand-in for the fuzz target: random and mutated inputs never panic.
    #[test]
    fn mutations_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 3] = [
            &[5, 1, 0, 1, 127, 0, 0, 1, 0, 80],
            &[5, 1, 0, 3, 3, b'a', b'.', b'b', 1, 187],
            &[5, 2, 0, 1],
        ];
        for i in 0..20_000 {
            let mut v = seeds[i % seeds.len()].to_vec();
            for _ in 0..(next() % 4) {
                let pos = (next() as usize) % v.len();
                v[pos] = next() as u8;
            }
            if next() % 3 == 0 {
                v.truncate((next() as usize) % (v.len() + 1));
            }
            let _ = parse_greeting(&v);
            let _ = parse_request(&v);
            let _ = parse_reply(&v);
        }
    }
}
