//! The proxy's listening sockets, made so that a burst of connections waits in the kernel
//! instead of being lost: for each address, [`ACCEPTORS`] sockets (SO_REUSEPORT: the kernel
//! spreads new connections over them, each with an accept queue of its own), each with the
//! longest accept queue the kernel allows (`listen(-1)`: `net.core.somaxconn` of the
//! namespace), and TCP_NODELAY, which every accepted connection inherits. Every proxy thread
//! holds a copy of each; the one whose turn it is accepts from all of them
//! (`proxy::spill`). Before the group binds, a plain bind checks that nobody else holds the
//! port (SO_REUSEPORT would otherwise let another root process share it silently).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
};

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6,
};
use std::os::fd::AsRawFd as _;

/// Listening sockets per address (and the default number of proxy threads, and of the
/// agent's runtime's worker threads).
pub const ACCEPTORS: usize = 2;

/// `net.core.somaxconn` of the calling thread's network namespace (what `listen(-1)` gets).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `n` listening sockets sharing `addr` (non-blocking, close-on-exec).
pub fn group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // Nobody else may hold the port: a plain listener fails with EADDRINUSE if someone does.
    drop(std::net::TcpListener::bind(addr)?);
    (0..n.max(1)).map(|_| one(addr)).collect()
}

fn one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    // Accepted connections inherit TCP_NODELAY from the listener: no setsockopt per client.
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?
        }
    }
    listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(std::net::TcpListener::from(fd))
}

/// The proxy's listeners on 127.0.0.1:`port` and, where the host has IPv6, [::1]:`port`
/// ([`ACCEPTORS`] each); the IPv6 error, if any, beside them.
pub fn loopback(port: u16) -> io::Result<(Vec<std::net::TcpListener>, Option<io::Error>)> {
    let mut out = group(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        ACCEPTORS,
    )?;
    let v6 = match group(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ACCEPTORS,
    ) {
        Ok(l) => {
            out.extend(l);
            None
        }
        Err(e) => Some(e),
    };
    Ok((out, v6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_group_shares_the_port_and_an_outsider_is_refused() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let g = group(addr, 2).unwrap();
        assert_eq!(g.len(), 2);
        // Somebody else on the port: refused, not shared.
        assert_eq!(group(addr, 2).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        // Connections reach the group.
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"x").unwrap();
        let mut got = None;
        for _ in 0..100 {
            for l in &g {
                if let Ok((mut s, _)) = l.accept() {
                    // Inherited from the listener: the proxy sets nothing per connection.
                    assert!(s.nodelay().unwrap(), "TCP_NODELAY not inherited");
                    s.set_nonblocking(false).unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).unwrap();
                    got = Some(b[0]);
                }
            }
            if got.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(got, Some(b'x'));
    }
}
