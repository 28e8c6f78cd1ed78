//! The DNS proxy's sockets toward the resolver a workload asked. From the agent's own
//! network namespace (its cgroup is exempt), except for a pod that asked a loopback resolver
//! (a resolver inside the pod, such as a sidecar cache): that query is sent from inside the
//! pod's namespace, so it reaches the pod's own loopback and never the node's.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::{TcpStream, UdpSocket};

use crate::datapath::podnet;

/// The namespace a query to `resolver` must leave from: the pod's when the resolver is one
/// of its loopback addresses; None: the agent's.
fn pod_side(netns: Option<&Path>, resolver: SocketAddr) -> Option<PathBuf> {
    netns
        .filter(|_| resolver.ip().is_loopback())
        .map(Path::to_path_buf)
}

fn unspecified(resolver: SocketAddr) -> SocketAddr {
    match resolver.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A UDP socket connected to `resolver`.
pub async fn udp(netns: Option<&Path>, resolver: SocketAddr) -> io::Result<UdpSocket> {
    let local = unspecified(resolver);
    let up = match pod_side(netns, resolver) {
        Some(ns) => {
            let s = tokio::task::spawn_blocking(move || {
                podnet::run_in(&ns, move || {
                    let s = std::net::UdpSocket::bind(local)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
            })
            .await
            .map_err(io::Error::other)??;
            UdpSocket::from_std(s)?
        }
        None => UdpSocket::bind(local).await?,
    };
    up.connect(resolver).await?;
    Ok(up)
}

/// A TCP connection to `resolver`, within `timeout`.
pub async fn tcp(
    netns: Option<&Path>,
    resolver: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match pod_side(netns, resolver) {
        Some(ns) => {
            let s = tokio::task::spawn_blocking(move || {
                podnet::run_in(&ns, move || {
                    let s = std::net::TcpStream::connect_timeout(&resolver, timeout)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
            })
            .await
            .map_err(io::Error::other)??;
            TcpStream::from_std(s)
        }
        None => tokio::time::timeout(timeout, TcpStream::connect(resolver))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
    }
}
