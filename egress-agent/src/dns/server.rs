//! The DNS proxy's sockets: UDP and TCP on the proxy's addresses and `spec.dns.port`. Each
//! query goes to the resolver the workload asked (from the kernel's record of the steered
//! socket), from the agent's exempt cgroup; the answer is parsed and learned before it is
//! sent back. Malformed or oversized messages are dropped and counted; a resolver that does
//! not answer leaves the client to its own timeout.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_common::{
    fqdn::udp_key_addr,
    wire::dns::{parse_answer, parse_query, MAX_MESSAGE},
    OrigDst, OrigKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use super::{metrics::Dropped, Names};
use crate::proxy::{sock_addr, OrigMap};

/// Queries in flight at once; more are dropped (the clients retry).
const MAX_INFLIGHT: usize = 4096;
/// Queries of one workload in flight at once: a flooding workload cannot take the others'
/// share.
const MAX_PER_WORKLOAD: usize = 256;

pub struct DnsProxy {
    names: Arc<Names>,
    orig: OrigMap,
    timeout: Duration,
    inflight: Arc<Semaphore>,
    per_workload: Arc<Mutex<HashMap<u32, usize>>>,
}

/// One query of a workload in flight (released on drop).
struct Slot(Arc<Mutex<HashMap<u32, usize>>>, u32);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// The DNS proxy's sockets: UDP and TCP on 127.0.0.1 and, where there is IPv6, [::1].
pub type Sockets = (Vec<UdpSocket>, Vec<TcpListener>);

/// Binds UDP and TCP on 127.0.0.1 and, where the host has IPv6, [::1].
pub async fn bind(port: u16) -> std::io::Result<Sockets> {
    to_tokio(bind_std(port)?)
}

/// [`bind`] inside a pod's network namespace at `path` (the steered query's target there
/// is the pod's own 127.0.0.1/[::1]).
pub fn bind_in(path: &std::path::Path, port: u16) -> std::io::Result<Sockets> {
    to_tokio(crate::datapath::podnet::run_in(path, move || {
        bind_std(port)
    })?)
}

/// Keeps the DNS proxy listening inside every pod's network namespace.
pub async fn serve_pods<P: crate::proxy::inpod::InPod>(
    pods: tokio::sync::watch::Receiver<Vec<P>>,
    server: Arc<DnsProxy>,
    port: u16,
) {
    crate::proxy::inpod::serve_in_pods(pods, "DNS proxy", move |p: &P, path| {
        let (udp, tcp) = bind_in(path, port)?;
        info!(pod = %p.label(), netns = %path.display(), port, "DNS steered to the agent inside the pod");
        Ok(server.clone().serve((udp, tcp), Some(path.to_path_buf())))
    })
    .await
}

type StdSockets = (Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>);

fn bind_std(port: u16) -> std::io::Result<StdSockets> {
    use std::net::{TcpListener as T, UdpSocket as U};
    let mut udp = vec![U::bind((Ipv4Addr::LOCALHOST, port))?];
    let mut tcp = vec![T::bind((Ipv4Addr::LOCALHOST, port))?];
    if let Ok(u) = U::bind((Ipv6Addr::LOCALHOST, port)) {
        udp.push(u);
        if let Ok(t) = T::bind((Ipv6Addr::LOCALHOST, port)) {
            tcp.push(t);
        }
    }
    for u in &udp {
        u.set_nonblocking(true)?;
    }
    for t in &tcp {
        t.set_nonblocking(true)?;
    }
    Ok((udp, tcp))
}

fn to_tokio((udp, tcp): StdSockets) -> std::io::Result<Sockets> {
    Ok((
        udp.into_iter()
            .map(UdpSocket::from_std)
            .collect::<std::io::Result<_>>()?,
        tcp.into_iter()
            .map(TcpListener::from_std)
            .collect::<std::io::Result<_>>()?,
    ))
}

impl DnsProxy {
    pub fn new(names: Arc<Names>, orig: OrigMap, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            names,
            orig,
            timeout,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            per_workload: Arc::default(),
        })
    }

    /// Serves the sockets of one network namespace: `netns` is a pod's (None: the agent's).
    pub async fn serve(self: Arc<Self>, (udp, tcp): Sockets, netns: Option<PathBuf>) {
        let netns = netns.map(Arc::new);
        let mut tasks = tokio::task::JoinSet::new();
        for u in udp {
            tasks.spawn(self.clone().udp_loop(Arc::new(u), netns.clone()));
        }
        for t in tcp {
            tasks.spawn(self.clone().tcp_loop(t, netns.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// A slot for one more query of workload `wid`, unless it has too many in flight.
    fn slot(&self, wid: u32) -> Option<Slot> {
        let mut m = self.per_workload.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(wid).or_insert(0);
        if *n >= MAX_PER_WORKLOAD {
            return None;
        }
        *n += 1;
        Some(Slot(self.per_workload.clone(), wid))
    }

    /// The resolver a steered UDP socket asked (its entry stays: the socket may send more
    /// queries).
    fn original(&self, key: &OrigKey) -> Option<OrigDst> {
        let o = self.orig.get(key, 0).ok()?;
        resolver(o)
    }

    /// The resolver a steered TCP connection asked, taken out of the map (the connection's
    /// client address is keyed for this one connection).
    fn take_original(&self, key: &OrigKey) -> Option<OrigDst> {
        resolver(crate::datapath::raw_map::take(&self.orig, key).ok()?)
    }

    async fn udp_loop(self: Arc<Self>, sock: Arc<UdpSocket>, pod: Option<Arc<PathBuf>>) {
        let netns = match crate::datapath::podnet::netns_cookie(&*sock) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "DNS proxy: cannot read the socket's network namespace");
                return;
            }
        };
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "DNS proxy: receive failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let m = &self.names.metrics;
            m.request("udp");
            let key = OrigKey {
                netns,
                addr: udp_key_addr(sock_addr(peer).family, peer.port()),
            };
            let Some(orig) = self.original(&key) else {
                m.dropped(Dropped::NotSteered);
                debug!(%peer, "DNS query from a socket the kernel did not steer");
                continue;
            };
            let (Ok(permit), Some(slot)) = (
                self.inflight.clone().try_acquire_owned(),
                self.slot(orig.workload_id),
            ) else {
                m.dropped(Dropped::Busy);
                continue;
            };
            let query = buf[..n].to_vec();
            let (this, sock, pod) = (self.clone(), sock.clone(), pod.clone());
            tokio::spawn(async move {
                if let Some(reply) = this.udp_query(orig, &query, pod.as_deref()).await {
                    let _ = sock.send_to(&reply, peer).await;
                }
                drop((permit, slot));
            });
        }
    }

    /// One UDP query: to the resolver, back with its answer learned (None: dropped).
    async fn udp_query(
        &self,
        orig: OrigDst,
        query: &[u8],
        pod: Option<&PathBuf>,
    ) -> Option<Vec<u8>> {
        let m = &self.names.metrics;
        let Ok(q) = parse_query(query) else {
            m.dropped(Dropped::Malformed);
            return None;
        };
        let resolver = orig.dst.socket_addr();
        let up = match super::upstream::udp(pod.map(PathBuf::as_path), resolver).await {
            Ok(s) => s,
            Err(_) => {
                m.dropped(Dropped::Upstream);
                return None;
            }
        };
        if up.send(query).await.is_err() {
            m.dropped(Dropped::Upstream);
            return None;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, up.recv(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => {
                    m.dropped(Dropped::Upstream);
                    return None;
                }
                Err(_) => {
                    m.dropped(Dropped::Timeout);
                    return None;
                }
            };
            let got = Instant::now();
            // Only the answer to this query (same id); anything else is ignored.
            if n < 2 || buf[..2] != q.id.to_be_bytes() {
                continue;
            }
            return self.learned(orig.workload_id, &buf[..n], got);
        }
    }

    /// Parses and learns an answer; None when it must be dropped.
    fn learned(&self, wid: u32, answer: &[u8], got: Instant) -> Option<Vec<u8>> {
        let m = &self.names.metrics;
        match parse_answer(answer) {
            Ok(a) => {
                let n = self.names.learn(wid, &a, got);
                m.answer(got.elapsed(), n);
                Some(answer.to_vec())
            }
            Err(e) => {
                m.dropped(Dropped::Malformed);
                debug!(error = %e, "DNS proxy dropped an answer");
                None
            }
        }
    }

    async fn tcp_loop(self: Arc<Self>, listener: TcpListener, pod: Option<Arc<PathBuf>>) {
        let netns = match crate::datapath::podnet::netns_cookie(&listener) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "DNS proxy: cannot read the listener's network namespace");
                return;
            }
        };
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "DNS proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let key = OrigKey {
                netns,
                addr: sock_addr(peer),
            };
            let (this, pod) = (self.clone(), pod.clone());
            tokio::spawn(async move { this.tcp_conn(client, key, pod.as_deref()).await });
        }
    }

    /// A DNS-over-TCP connection: each length-prefixed query to the resolver, each answer
    /// learned before it goes back.
    async fn tcp_conn(&self, mut client: TcpStream, key: OrigKey, pod: Option<&PathBuf>) {
        let m = &self.names.metrics;
        let Some(orig) = self.take_original(&key) else {
            m.dropped(Dropped::NotSteered);
            return;
        };
        let resolver = orig.dst.socket_addr();
        let mut up =
            match super::upstream::tcp(pod.map(PathBuf::as_path), resolver, self.timeout).await {
                Ok(s) => s,
                Err(_) => {
                    m.dropped(Dropped::Upstream);
                    return;
                }
            };
        let _ = client.set_nodelay(true);
        let _ = up.set_nodelay(true);
        loop {
            // The client may keep the connection idle between queries.
            let Ok(query) = read_msg(&mut client, Duration::from_secs(30)).await else {
                return;
            };
            m.request("tcp");
            if parse_query(&query).is_err() {
                m.dropped(Dropped::Malformed);
                return;
            }
            if write_msg(&mut up, &query).await.is_err() {
                m.dropped(Dropped::Upstream);
                return;
            }
            let Ok(answer) = read_msg(&mut up, self.timeout).await else {
                m.dropped(Dropped::Timeout);
                return;
            };
            let got = Instant::now();
            let Some(reply) = self.learned(orig.workload_id, &answer, got) else {
                return;
            };
            if write_msg(&mut client, &reply).await.is_err() {
                return;
            }
        }
    }
}

async fn read_msg(s: &mut TcpStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    let read = async {
        let n = s.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn write_msg(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// `o` when it records a query to a resolver (port 53).
fn resolver(o: OrigDst) -> Option<OrigDst> {
    (o.dst.port == egress_common::fqdn::DNS_PORT as u32).then_some(o)
}
