//! The transparent relay behind the kernel's redirect. For each accepted connection it looks up
//! the original destination the kernel recorded under the client's address; a connection
//! without one was not redirected and is refused. It then connects to that destination from
//! the agent's own (exempt) cgroup and copies bytes both ways, half-close preserved.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData, MapError};
use egress_common::{OrigDst, SockAddr};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::config::normalize;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections relayed at once; more are refused until one ends.
pub const MAX_CONNECTIONS: usize = 16_384;

/// Original destinations, keyed by the client's address.
pub type OrigMap = HashMap<MapData, SockAddr, OrigDst>;

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub not_redirected: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub over_limit: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

pub struct Proxy {
    orig: OrigMap,
    /// Workload names by id, for logs.
    workloads: Vec<String>,
    limit: Semaphore,
    pub stats: Stats,
}

/// Binds the proxy's listeners: 127.0.0.1 and, where the host has IPv6, [::1].
pub async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut out = vec![TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?];
    match TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await {
        Ok(l) => out.push(l),
        Err(e) => {
            warn!(error = %e, "no IPv6 proxy listener on [::1]:{port}; IPv6 redirects will be refused")
        }
    }
    Ok(out)
}

impl Proxy {
    pub fn new(orig: OrigMap, workloads: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            orig,
            workloads,
            limit: Semaphore::new(MAX_CONNECTIONS),
            stats: Stats::default(),
        })
    }

    /// Serves every listener until the task is dropped.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            tasks.spawn(self.clone().accept_loop(l));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            tokio::spawn(async move { this.handle(client, peer).await });
        }
    }

    fn original(&self, peer: SocketAddr) -> Result<OrigDst, MapError> {
        self.orig.get(&sock_addr(peer), 0)
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Ok(_permit) = self.limit.try_acquire() else {
            self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "proxy connection limit {MAX_CONNECTIONS} reached, refusing");
            reset(client);
            return;
        };
        let orig = match self.original(peer) {
            Ok(o) => o,
            Err(e) => {
                self.stats.not_redirected.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, error = %e, "refused a connection that the kernel did not redirect");
                reset(client);
                return;
            }
        };
        let dst = socket_addr(&orig.dst);
        let workload = self.workload_name(orig.workload_id);
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.upstream_failed(workload, dst, &e.to_string());
                reset(client);
                return;
            }
            Err(_) => {
                self.upstream_failed(workload, dst, "connect timed out");
                reset(client);
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        debug!(workload, %dst, %peer, "relaying");
        let (mut c, mut u) = (client, upstream);
        match tokio::io::copy_bidirectional(&mut c, &mut u).await {
            Ok((out, back)) => {
                self.stats.bytes_out.fetch_add(out, Ordering::Relaxed);
                self.stats.bytes_in.fetch_add(back, Ordering::Relaxed);
                debug!(workload, %dst, bytes_out = out, bytes_in = back, "relay done");
            }
            Err(e) => debug!(workload, %dst, error = %e, "relay ended with an error"),
        }
    }

    fn upstream_failed(&self, workload: &str, dst: SocketAddr, why: &str) {
        self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
        info!(workload, %dst, error = why, "proxy could not reach the original destination");
    }

    fn workload_name(&self, id: u32) -> &str {
        id.checked_sub(1)
            .and_then(|i| self.workloads.get(i as usize))
            .map(String::as_str)
            .unwrap_or("unknown")
    }
}

/// Closes with RST, so the client sees a reset rather than a clean, empty response.
fn reset(s: TcpStream) {
    // A zero linger never blocks on drop (the deprecation is about non-zero ones).
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// The kernel's key for a client address (IPv4-mapped addresses are IPv4).
pub fn sock_addr(a: SocketAddr) -> SockAddr {
    match normalize(a.ip()) {
        IpAddr::V4(v4) => SockAddr::v4(v4.octets(), a.port()),
        IpAddr::V6(v6) => SockAddr::v6(v6.octets(), a.port()),
    }
}

pub fn socket_addr(a: &SockAddr) -> SocketAddr {
    let port = a.port as u16;
    if a.family == 4 {
        SocketAddr::from((a.ip4(), port))
    } else {
        SocketAddr::from((a.addr, port))
    }
}
