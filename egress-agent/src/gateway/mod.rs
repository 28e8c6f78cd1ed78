//! Egress gateways: the node proxy's client side (sending a relayed connection through a
//! gateway: HTTP/2 CONNECT, SOCKS5 or HTTP/1.1 CONNECT) and `egress-agent gateway`, the
//! gateway server (see [`server`]).
//!
//! The protocols are the standard ones, so standard tools are clients of our gateway
//! (`curl --socks5-hostname`, `curl --proxy`) and standard proxies are gateways for our node
//! proxy (dante or microsocks for `socks5`, squid for `http-connect`, nghttpx for
//! `http2tunnel`).

pub mod connect;
pub mod h2tunnel;
pub mod metrics;
pub mod server;
pub mod services;
pub mod settings;
pub mod socks5;

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    policy::{EgressGateway, GatewayMode},
    proxy::relay::{self, Relayed},
};

pub use egress_common::wire::Target;

/// Why a tunnel through a gateway could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("the peer closed the connection during the handshake")]
    Truncated,
    #[error("handshake longer than {0} bytes")]
    TooLong(usize),
    #[error("SOCKS5: {0}")]
    Socks5(#[from] socks5::Socks5Error),
    #[error("HTTP CONNECT: {0}")]
    Connect(#[from] connect::ConnectError),
    #[error("HTTP/2: {0}")]
    H2(h2::Error),
    #[error("HTTP/2 CONNECT answered {0}")]
    Status(u16),
    #[error("{0}")]
    Protocol(String),
}

/// The upstream side of a relayed connection.
pub enum Upstream {
    /// A direct connection, or a SOCKS5 / HTTP/1.1 CONNECT tunnel (after its handshake the
    /// socket carries the bytes as they are, so it relays by splice like a direct one).
    Tcp(TcpStream),
    /// A stream of the gateway's shared HTTP/2 connection.
    H2(h2tunnel::H2Io),
}

impl Upstream {
    /// Sends bytes the proxy already read from the client (while sniffing).
    pub async fn send_head(&mut self, head: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Upstream::Tcp(s) => s.write_all(head).await,
            Upstream::H2(s) => s.write_all(head).await,
        }
    }

    /// Relays `client` to this upstream: by splice for TCP, by copy for HTTP/2 streams.
    pub async fn relay(
        self,
        client: TcpStream,
        idle: Duration,
        changes: Option<tokio::sync::watch::Receiver<u64>>,
        still_allowed: impl Fn() -> bool,
    ) -> Relayed {
        match self {
            Upstream::Tcp(s) => relay::relay(client, s, idle, changes, still_allowed).await,
            Upstream::H2(s) => relay_io(client, s, idle, changes, still_allowed).await,
        }
    }
}

/// The node proxy's way out through gateways.
#[derive(Default)]
pub struct Dialer {
    h2: h2tunnel::Pool,
    /// The cluster's EndpointSlices, for gateways named by Service (Kubernetes mode).
    services: std::sync::OnceLock<std::sync::Arc<services::Services>>,
    /// Spreads connections over a Service's endpoints.
    turn: AtomicU64,
}

/// Why no tunnel opened: where (an address, or a Service), in which mode, and the error.
pub type DialError = (String, GatewayMode, GatewayError);

impl Dialer {
    /// Gateways named by Service find their endpoints in `s`.
    pub fn bind_services(&self, s: std::sync::Arc<services::Services>) {
        let _ = self.services.set(s);
    }

    /// Where `gw` can be reached now, in the order to try, each with its mode: its addresses,
    /// and its Services' ready endpoints (starting at a different one each time). A Service
    /// with none gives an error in place of its endpoints.
    fn candidates(&self, gw: &EgressGateway) -> Vec<Result<(SocketAddr, GatewayMode), DialError>> {
        let mut out = Vec::new();
        for ep in gw.spec.all() {
            if let Some(a) = ep.address {
                out.push(Ok((a, ep.mode)));
            }
            let Some(svc) = &ep.service else { continue };
            let found = match self.services.get() {
                Some(s) => s.endpoints(svc),
                None => Err(format!(
                    "Service {svc}: no cluster to find its endpoints in"
                )),
            };
            match found {
                Ok(mut addrs) => {
                    let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize % addrs.len();
                    addrs.rotate_left(turn);
                    out.extend(addrs.into_iter().map(|a| Ok((a, ep.mode))));
                }
                Err(why) => out.push(Err((
                    format!("Service {svc}"),
                    ep.mode,
                    GatewayError::Protocol(why),
                ))),
            }
        }
        out
    }

    /// Opens a tunnel to `target` through `gw`, trying its endpoints in order; the error is
    /// the last endpoint's, with its address. Never falls back to a direct connection.
    pub async fn open(
        &self,
        gw: &EgressGateway,
        target: &Target,
        host: Option<&str>,
        timeout: Duration,
    ) -> Result<Upstream, DialError> {
        let mut last = None;
        for c in self.candidates(gw) {
            let (addr, mode) = match c {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match self.open_one(addr, mode, target, host, timeout).await {
                Ok(u) => return Ok(u),
                Err(e) => last = Some((addr.to_string(), mode, e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                "nowhere".into(),
                GatewayMode::Socks5,
                GatewayError::Protocol("the gateway has no endpoints".into()),
            )
        }))
    }

    async fn open_one(
        &self,
        addr: SocketAddr,
        mode: GatewayMode,
        target: &Target,
        host: Option<&str>,
        timeout: Duration,
    ) -> Result<Upstream, GatewayError> {
        if mode == GatewayMode::Http2tunnel {
            return self
                .h2
                .open(addr, target, host, timeout)
                .await
                .map(Upstream::H2);
        }
        let handshake = async {
            let mut s = TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            match mode {
                GatewayMode::Socks5 => socks5::connect(&mut s, target).await?,
                _ => connect::connect(&mut s, target, host).await?,
            }
            Ok::<_, GatewayError>(s)
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| GatewayError::Timeout)?
            .map(Upstream::Tcp)
    }
}

/// Copy buffer of each direction of an HTTP/2 relay.
const COPY_BUF: usize = 128 * 1024;

/// When bytes last moved, shared by both directions.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    moved: [AtomicU64; 2],
}

/// A pipe that notes when it reads bytes, and how many.
struct Counted<'a, T> {
    io: T,
    act: &'a Activity,
    dir: usize,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let act = self.act;
            act.moved[self.dir].fetch_add(n as u64, Ordering::Relaxed);
            act.last_ms
                .store(act.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Relays between two byte pipes (for HTTP/2 streams, which splice cannot move) until both
/// directions end (half-close passes through), an error, `idle` with no byte read, or a
/// policy change after which `still_allowed` says no.
pub async fn relay_io<A, B>(
    a: A,
    b: B,
    idle: Duration,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    still_allowed: impl Fn() -> bool,
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let act = Activity {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
        moved: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let mut a = Counted {
        io: a,
        act: &act,
        dir: 0,
    };
    let mut b = Counted {
        io: b,
        act: &act,
        dir: 1,
    };
    // Large buffers: each write becomes at most a few big DATA frames, not many 8 KiB ones.
    let work = std::pin::pin!(async {
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF)
            .await
            .map(|_| ())
    });
    let idle_ms = || {
        (act.epoch.elapsed().as_millis() as u64).saturating_sub(act.last_ms.load(Ordering::Relaxed))
    };
    let (idle_timeout, revoked, error) =
        relay::supervise(work, idle, idle_ms, changes, still_allowed).await;
    Relayed {
        bytes: (
            act.moved[0].load(Ordering::Relaxed),
            act.moved[1].load(Ordering::Relaxed),
        ),
        idle_timeout,
        revoked,
        error,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::policy::{parse_unlinked, EgressGateway};

    fn gateway() -> EgressGateway {
        let text = "kind: EgressGateway\nmetadata: {name: g}\nspec: {endpoints: [{service: {name: gw, namespace: fsm}, mode: socks5}, {address: 127.0.8.9:1080, mode: http2tunnel}]}\n";
        parse_unlinked(text, "g.yaml").unwrap().gateways.remove(0)
    }

    fn slice(ips: &[&str]) -> serde_json::Value {
        let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
        json!({"metadata": {"name": "gw-1", "namespace": "fsm",
                            "labels": {services::SERVICE_NAME_LABEL: "gw"}},
               "addressType": "IPv4", "ports": [{"port": 1080}], "endpoints": endpoints})
    }

    /// (address or error, mode) of each candidate.
    fn tried(d: &Dialer, gw: &EgressGateway) -> Vec<String> {
        d.candidates(gw)
            .into_iter()
            .map(|c| match c {
                Ok((a, m)) => format!("{a} {}", m.name()),
                Err((at, m, e)) => format!("{at} {}: {e}", m.name()),
            })
            .collect()
    }

    #[test]
    fn a_services_endpoints_take_turns_and_none_is_an_error_in_their_place() {
        let d = Dialer::default();
        let gw = gateway();
        let s = Arc::new(services::Services::default());
        d.bind_services(s.clone());
        s.apply(&slice(&["10.1.0.1", "10.1.0.2"]));
        let first = tried(&d, &gw);
        assert_eq!(
            first,
            [
                "10.1.0.1:1080 socks5",
                "10.1.0.2:1080 socks5",
                "127.0.8.9:1080 http2tunnel"
            ]
        );
        assert_eq!(
            tried(&d, &gw),
            [
                "10.1.0.2:1080 socks5",
                "10.1.0.1:1080 socks5",
                "127.0.8.9:1080 http2tunnel"
            ]
        );
        s.apply(&slice(&[]));
        assert_eq!(
            tried(&d, &gw),
            [
                "Service fsm/gw socks5: Service fsm/gw has no ready endpoints",
                "127.0.8.9:1080 http2tunnel"
            ]
        );
    }
}
