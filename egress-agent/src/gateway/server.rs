//! `egress-agent gateway --config FILE`: the egress gateway server.
//!
//! Listeners speak SOCKS5 (RFC 1928, CONNECT, no authentication) or HTTP CONNECT (HTTP/1.1,
//! and HTTP/2 with prior knowledge, many tunnels over one connection, told apart by the first
//! byte). Every tunnel is judged against the file's allowlist before the gateway dials out
//! from its `egressAddress`; a refusal is SOCKS5 reply 2 or HTTP 403. Handshakes are bounded
//! and timed; tunnels are capped, idle ones closed. Metrics (`egress_gateway_*`), /healthz and
//! /readyz are served on `--metrics-addr`; each tunnel is logged under `egress::gateway`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    signal::unix::{signal, SignalKind},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, info, warn};

use super::{
    connect::{self, HOST_HEADER},
    h2tunnel::{self, H2Io},
    metrics::{GatewayMetrics, TunnelProtocol, TunnelResult},
    settings::{self, GatewayServer, ListenerProtocol},
    socks5::{self, reply},
    GatewayError, Target,
};
use crate::{proxy::relay, telemetry::metrics};

/// Beside the node agent's 15090.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15091";

/// Why a tunnel was not opened, as the client is told.
#[derive(Debug)]
enum Refusal {
    /// The allowlist does not have it.
    NotAllowed,
    /// The name does not resolve.
    Unresolved(String),
    Timeout,
    Connect(std::io::Error),
}

impl Refusal {
    fn socks5_reply(&self) -> u8 {
        match self {
            Refusal::NotAllowed => reply::NOT_ALLOWED,
            Refusal::Unresolved(_) => reply::HOST_UNREACHABLE,
            Refusal::Timeout => reply::TTL_EXPIRED,
            Refusal::Connect(e) => match e.kind() {
                std::io::ErrorKind::ConnectionRefused => reply::CONNECTION_REFUSED,
                std::io::ErrorKind::NetworkUnreachable => reply::NETWORK_UNREACHABLE,
                std::io::ErrorKind::HostUnreachable => reply::HOST_UNREACHABLE,
                _ => reply::GENERAL_FAILURE,
            },
        }
    }

    fn http_status(&self) -> u16 {
        match self {
            Refusal::NotAllowed => 403,
            Refusal::Timeout => 504,
            _ => 502,
        }
    }

    fn result(&self) -> TunnelResult {
        match self {
            Refusal::NotAllowed => TunnelResult::Refused,
            _ => TunnelResult::UpstreamError,
        }
    }

    fn why(&self) -> String {
        match self {
            Refusal::NotAllowed => "no allow rule of the gateway matches".into(),
            Refusal::Unresolved(e) => format!("cannot resolve: {e}"),
            Refusal::Timeout => "connect timed out".into(),
            Refusal::Connect(e) => e.to_string(),
        }
    }
}

/// A running gateway.
pub struct Gateway {
    cfg: GatewayServer,
    metrics: Arc<GatewayMetrics>,
    permits: Arc<Semaphore>,
}

/// One tunnel, for the log and the metrics.
struct Tunnel {
    protocol: TunnelProtocol,
    peer: SocketAddr,
    target: String,
    host: Option<String>,
    started: Instant,
}

impl Gateway {
    pub fn new(cfg: GatewayServer, metrics: Arc<GatewayMetrics>) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(cfg.spec.max_connections as usize)),
            cfg,
            metrics,
        })
    }

    fn finish(&self, t: &Tunnel, res: TunnelResult, bytes: (u64, u64), detail: &str) {
        self.metrics.count(t.protocol, res, bytes);
        let ms = t.started.elapsed().as_millis() as u64;
        let host = t.host.as_deref().unwrap_or("");
        let (protocol, target) = (t.protocol.as_str(), t.target.as_str());
        let result = res.as_str();
        if res == TunnelResult::Allowed {
            debug!(target: "egress::gateway", protocol, peer = %t.peer, destination = target, host, result, bytes_out = bytes.0, bytes_in = bytes.1, ms, detail, "tunnel");
        } else {
            info!(target: "egress::gateway", protocol, peer = %t.peer, destination = target, host, result, bytes_out = bytes.0, bytes_in = bytes.1, ms, detail, "tunnel");
        }
    }

    /// A tunnel that did not open (nothing relayed).
    fn refuse(&self, t: &Tunnel, res: TunnelResult, detail: &str) {
        self.finish(t, res, (0, 0), detail)
    }

    /// Judges `target` and dials it from the egress address.
    async fn open(&self, target: &Target) -> Result<(TcpStream, SocketAddr), Refusal> {
        let spec = &self.cfg.spec;
        let timeout = spec.connect_timeout.0;
        let (candidates, name): (Vec<SocketAddr>, Option<&str>) = match target {
            Target::Addr(a) => (vec![*a], None),
            Target::Domain(h, p) => {
                let found =
                    tokio::time::timeout(timeout, tokio::net::lookup_host((h.as_str(), *p)))
                        .await
                        .map_err(|_| Refusal::Timeout)?
                        .map_err(|e| Refusal::Unresolved(e.to_string()))?;
                (found.collect(), Some(h.as_str()))
            }
        };
        let allowed: Vec<SocketAddr> = candidates
            .into_iter()
            .filter(|a| spec.allowed(a.ip(), a.port(), name).is_some())
            .collect();
        let Some(&dst) = allowed.first() else {
            return Err(Refusal::NotAllowed);
        };
        let started = Instant::now();
        let sock = if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(Refusal::Connect)?;
        if let Some(src) = spec.egress_address.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
            sock.bind(SocketAddr::new(src, 0))
                .map_err(Refusal::Connect)?;
        }
        let s = tokio::time::timeout(timeout, sock.connect(dst))
            .await
            .map_err(|_| Refusal::Timeout)?
            .map_err(Refusal::Connect)?;
        self.metrics.connected(started.elapsed());
        let _ = s.set_nodelay(true);
        Ok((s, dst))
    }

    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, protocol: ListenerProtocol) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = client.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                match protocol {
                    ListenerProtocol::Socks5 => this.socks5(client, peer).await,
                    ListenerProtocol::Http => this.http(client, peer).await,
                }
            });
        }
    }

    /// Relays an open TCP tunnel (splice) after the client's early bytes.
    async fn relay_tcp(&self, t: &Tunnel, client: TcpStream, upstream: TcpStream, early: &[u8]) {
        let mut upstream = upstream;
        if !early.is_empty() && upstream.write_all(early).await.is_err() {
            return self.refuse(t, TunnelResult::UpstreamError, "write failed");
        }
        let idle = self.cfg.spec.idle_timeout.0;
        let relayed = relay::relay(client, upstream, idle, None, || true);
        self.account(t, relayed, early.len() as u64).await;
    }

    /// Runs a relay, counting it as active meanwhile, and accounts for it.
    async fn account(
        &self,
        t: &Tunnel,
        relayed: impl std::future::Future<Output = relay::Relayed>,
        early: u64,
    ) {
        self.metrics.active().inc();
        let r = relayed.await;
        self.metrics.active().dec();
        let end = if r.idle_timeout {
            "idle timeout"
        } else {
            "closed"
        };
        self.finish(
            t,
            TunnelResult::Allowed,
            (r.bytes.0 + early, r.bytes.1),
            end,
        );
    }

    async fn socks5(&self, mut client: TcpStream, peer: SocketAddr) {
        let mut t = Tunnel {
            protocol: TunnelProtocol::Socks5,
            peer,
            target: String::new(),
            host: None,
            started: Instant::now(),
        };
        let Some(_permit) = self.permit() else {
            let _ = client
                .write_all(&socks5::encode_reply(reply::GENERAL_FAILURE, None))
                .await;
            return self.refuse(&t, TunnelResult::OverLimit, "too many tunnels");
        };
        let mut buf = Vec::new();
        let handshake = async {
            let n =
                socks5::read_until(&mut client, &mut buf, 2 + 255, socks5::parse_greeting).await;
            let n = match n {
                Ok(n) => n,
                Err(GatewayError::Socks5(socks5::Socks5Error::NoAcceptableMethod)) => {
                    let _ = client
                        .write_all(&[socks5::VERSION, socks5::NO_ACCEPTABLE])
                        .await;
                    return Err(GatewayError::Socks5(
                        socks5::Socks5Error::NoAcceptableMethod,
                    ));
                }
                Err(e) => return Err(e),
            };
            buf.drain(..n);
            client
                .write_all(&[socks5::VERSION, socks5::NO_AUTH])
                .await?;
            match socks5::read_until(
                &mut client,
                &mut buf,
                3 + 1 + 256 + 2,
                socks5::parse_request,
            )
            .await
            {
                Ok(r) => Ok(r),
                Err(GatewayError::Socks5(e)) => {
                    let _ = client
                        .write_all(&socks5::encode_reply(e.reply_code(), None))
                        .await;
                    Err(GatewayError::Socks5(e))
                }
                Err(e) => Err(e),
            }
        };
        let (target, n) =
            match tokio::time::timeout(self.cfg.spec.handshake_timeout.0, handshake).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return self.refuse(&t, TunnelResult::BadRequest, &e.to_string()),
                Err(_) => return self.refuse(&t, TunnelResult::BadRequest, "handshake timed out"),
            };
        buf.drain(..n);
        t.target = target.to_string();
        if let Target::Domain(h, _) = &target {
            t.host = Some(h.clone());
        }
        match self.open(&target).await {
            Ok((upstream, _)) => {
                let bound = upstream.local_addr().ok();
                if client
                    .write_all(&socks5::encode_reply(reply::SUCCEEDED, bound))
                    .await
                    .is_err()
                {
                    return self.refuse(&t, TunnelResult::BadRequest, "client went away");
                }
                self.relay_tcp(&t, client, upstream, &buf).await;
            }
            Err(r) => {
                let _ = client
                    .write_all(&socks5::encode_reply(r.socks5_reply(), None))
                    .await;
                self.refuse(&t, r.result(), &r.why());
            }
        }
    }

    /// HTTP/1.1 CONNECT, or HTTP/2 when the client starts with the connection preface.
    async fn http(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let mut first = [0u8; 1];
        let peeked =
            tokio::time::timeout(self.cfg.spec.handshake_timeout.0, client.peek(&mut first)).await;
        if !matches!(peeked, Ok(Ok(1))) {
            return;
        }
        if first[0] == b'P' {
            return self.h2(client, peer).await;
        }
        let mut t = Tunnel {
            protocol: TunnelProtocol::HttpConnect,
            peer,
            target: String::new(),
            host: None,
            started: Instant::now(),
        };
        let Some(_permit) = self.permit() else {
            let _ = respond_h1(&mut client, 503, "too many tunnels").await;
            return self.refuse(&t, TunnelResult::OverLimit, "too many tunnels");
        };
        let mut buf = Vec::new();
        let read = socks5::read_until(
            &mut client,
            &mut buf,
            connect::MAX_HEAD,
            connect::parse_connect,
        );
        let (req, n) = match tokio::time::timeout(self.cfg.spec.handshake_timeout.0, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let status = match &e {
                    GatewayError::Connect(c) => c.status(),
                    GatewayError::TooLong(_) => 431,
                    _ => 400,
                };
                let _ = respond_h1(&mut client, status, &e.to_string()).await;
                return self.refuse(&t, TunnelResult::BadRequest, &e.to_string());
            }
            Err(_) => {
                let _ = respond_h1(&mut client, 408, "request head timed out").await;
                return self.refuse(&t, TunnelResult::BadRequest, "handshake timed out");
            }
        };
        buf.drain(..n);
        t.target = req.target.to_string();
        t.host = match &req.target {
            Target::Domain(h, _) => Some(h.clone()),
            _ => req.host_hint.clone(),
        };
        match self.open(&req.target).await {
            Ok((upstream, _)) => {
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return self.refuse(&t, TunnelResult::BadRequest, "client went away");
                }
                self.relay_tcp(&t, client, upstream, &buf).await;
            }
            Err(r) => {
                let _ = respond_h1(&mut client, r.http_status(), &r.why()).await;
                self.refuse(&t, r.result(), &r.why());
            }
        }
    }

    async fn h2(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let spec = &self.cfg.spec;
        let handshake = h2::server::Builder::new()
            .initial_window_size(h2tunnel::STREAM_WINDOW)
            .initial_connection_window_size(h2tunnel::CONNECTION_WINDOW)
            .max_frame_size(h2tunnel::MAX_FRAME)
            .max_concurrent_streams(spec.max_connections)
            .handshake::<_, Bytes>(client);
        let mut conn = match tokio::time::timeout(spec.handshake_timeout.0, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let t = self.tunnel_h2(peer);
                return self.refuse(
                    &t,
                    TunnelResult::BadRequest,
                    &format!("HTTP/2 handshake: {e}"),
                );
            }
            Err(_) => {
                let t = self.tunnel_h2(peer);
                return self.refuse(&t, TunnelResult::BadRequest, "HTTP/2 handshake timed out");
            }
        };
        while let Some(next) = conn.accept().await {
            match next {
                Ok((req, respond)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.h2_stream(peer, req, respond).await });
                }
                Err(e) => {
                    debug!(%peer, error = %e, "HTTP/2 connection from a client ended");
                    break;
                }
            }
        }
    }

    fn tunnel_h2(&self, peer: SocketAddr) -> Tunnel {
        Tunnel {
            protocol: TunnelProtocol::Http2Tunnel,
            peer,
            target: String::new(),
            host: None,
            started: Instant::now(),
        }
    }

    async fn h2_stream(
        &self,
        peer: SocketAddr,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let mut t = self.tunnel_h2(peer);
        let status = |code: u16| {
            http::Response::builder()
                .status(code)
                .body(())
                .unwrap_or_default()
        };
        let Some(_permit) = self.permit() else {
            let _ = respond.send_response(status(503), true);
            return self.refuse(&t, TunnelResult::OverLimit, "too many tunnels");
        };
        if req.method() != http::Method::CONNECT {
            let _ = respond.send_response(status(405), true);
            return self.refuse(&t, TunnelResult::BadRequest, "method is not CONNECT");
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target = match connect::parse_authority(authority) {
            Ok(t) => t,
            Err(e) => {
                let _ = respond.send_response(status(400), true);
                return self.refuse(&t, TunnelResult::BadRequest, &e.to_string());
            }
        };
        t.target = target.to_string();
        t.host = match &target {
            Target::Domain(h, _) => Some(h.clone()),
            _ => req
                .headers()
                .get(HOST_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|h| connect::valid_host(h))
                .map(str::to_ascii_lowercase),
        };
        let upstream = match self.open(&target).await {
            Ok((u, _)) => u,
            Err(r) => {
                let _ = respond.send_response(status(r.http_status()), true);
                return self.refuse(&t, r.result(), &r.why());
            }
        };
        let send = match respond.send_response(status(200), false) {
            Ok(s) => s,
            Err(e) => return self.refuse(&t, TunnelResult::BadRequest, &e.to_string()),
        };
        let stream = H2Io::new(send, req.into_body());
        let idle = self.cfg.spec.idle_timeout.0;
        let relayed = super::relay_io(stream, upstream, idle, None, || true);
        self.account(&t, relayed, 0).await;
    }
}

async fn respond_h1(s: &mut TcpStream, status: u16, why: &str) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = format!("egress gateway: {why}\n");
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await?;
    // Lingering close: read what the client still sends (up to 64 KiB, 1 s), so that closing
    // with unread bytes does not reset the connection before the client read the answer.
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match tokio::io::AsyncReadExt::read(s, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// Runs the gateway until SIGTERM/SIGINT.
pub async fn run(config: PathBuf, metrics_addr: SocketAddr) -> anyhow::Result<()> {
    let cfg = settings::load(&config)?;
    let metrics_listener = metrics::bind(metrics_addr).await?;
    let mut listeners = Vec::new();
    for (i, l) in cfg.spec.listeners.iter().enumerate() {
        let listener = TcpListener::bind(l.address).await.with_context(|| {
            format!(
                "{}: GatewayServer {}: spec.listeners[{i}].address: cannot listen on {}",
                config.display(),
                cfg.name,
                l.address
            )
        })?;
        listeners.push((listener, l.protocol));
    }
    if let Some(src) = cfg.spec.egress_address {
        // Fail now rather than on every tunnel when the address is not this machine's.
        let probe = std::net::TcpListener::bind((src, 0)).with_context(|| {
            format!(
                "{}: GatewayServer {}: spec.egressAddress: {src} is not an address of this machine",
                config.display(),
                cfg.name
            )
        });
        drop(probe?);
    }
    let mut registry = Registry::default();
    let gw_metrics = Arc::new(GatewayMetrics::register(&mut registry));
    let metrics = metrics::Metrics::new(registry);
    let gw = Gateway::new(cfg.clone(), gw_metrics);
    let mut tasks = tokio::task::JoinSet::new();
    for (l, p) in listeners {
        tasks.spawn(gw.clone().accept_loop(l, p));
    }
    tasks.spawn(metrics::serve(metrics_listener, metrics.clone()));
    metrics.set_ready();
    let addrs: Vec<String> = cfg
        .spec
        .listeners
        .iter()
        .map(|l| format!("{}={}", l.address, protocol_name(l.protocol)))
        .collect();
    info!(
        config = %config.display(),
        name = %cfg.name,
        listeners = %addrs.join(", "),
        egress_address = %cfg.spec.egress_address.map(|a| a.to_string()).unwrap_or_else(|| "auto".into()),
        allow_rules = cfg.spec.allow.len(),
        metrics = %metrics_addr,
        "gateway ready"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("gateway stopping");
    tasks.shutdown().await;
    Ok(())
}

fn protocol_name(p: ListenerProtocol) -> &'static str {
    match p {
        ListenerProtocol::Socks5 => "socks5",
        ListenerProtocol::Http => "http",
    }
}
