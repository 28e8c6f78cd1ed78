//! Pure, bounded parsers of the bytes that cross the agent's sockets: the first bytes of a
//! redirected connection ([`sniff`]: TLS ClientHello SNI, HTTP/1.x `Host`) and the gateway
//! handshakes ([`socks5`], HTTP [`connect`]). Byte slices in, `Ok(None)` or `Incomplete`
//! while more bytes are needed, never a panic on any input; the I/O around them is the
//! agent's. They live here, behind the `wire` feature, so that the fuzz targets (`fuzz/`)
//! depend on them alone and not on the agent and its eBPF build.

use alloc::string::String;
use core::net::{IpAddr, SocketAddr};

pub mod connect;
pub mod dns;
pub mod http;
pub mod sniff;
pub mod socks5;

/// Where a tunnel goes: an address, or a name the gateway resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    Domain(String, u16),
}

impl Target {
    /// `host` as an IP address when it is one, else as a (lower-cased) name.
    pub fn from_host(host: &str, port: u16) -> Target {
        match host.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Domain(host.to_ascii_lowercase(), port),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Domain(_, p) => *p,
        }
    }
}

impl core::fmt::Display for Target {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}
