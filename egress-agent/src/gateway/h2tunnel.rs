//! "http2tunnel": TCP tunnels as HTTP/2 CONNECT streams (RFC 9113 section 8.5) over one
//! plain-text (h2c, prior knowledge) connection per gateway, reused for every tunnel.
//!
//! [`H2Io`] turns one stream into an `AsyncRead + AsyncWrite` byte pipe (DATA frames, with the
//! flow-control window released as the bytes are read); [`Pool`] is the node proxy's client
//! side; the gateway's server side lives in `server.rs`.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use super::{connect::HOST_HEADER, GatewayError, Target};

/// Flow-control windows: large enough that one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
pub const MAX_FRAME: u32 = 128 * 1024;

/// One HTTP/2 stream as a byte pipe.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
        }
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())), // END_STREAM: EOF
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Ask for the whole buffer's window every time: h2 reports capacity only when it was
        // assigned since the last report.
        self.send
            .reserve_capacity(buf.len().min(MAX_FRAME as usize * 4));
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io_error)?;
                Poll::Ready(Ok(n))
            }
            Some(Ok(_)) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Err(e)) => Poll::Ready(Err(h2_io_error(e))),
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HTTP/2 stream closed",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM on our side; the other direction goes on.
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// The CONNECT request for `target`, with the sniffed host when known.
pub fn request(target: &Target, host: Option<&str>) -> Result<http::Request<()>, GatewayError> {
    let mut b = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string());
    if let Some(h) = host.filter(|h| super::connect::valid_host(h)) {
        b = b.header(HOST_HEADER, h);
    }
    b.body(())
        .map_err(|e| GatewayError::Protocol(format!("cannot build the CONNECT request: {e}")))
}

/// The node proxy's HTTP/2 connections, one per gateway address, reused for every tunnel
/// and replaced when they fail.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<SocketAddr, SendRequest<Bytes>>>,
}

impl Pool {
    /// A ready handle on the connection to `addr`, dialling it when there is none (or the
    /// pooled one has failed).
    async fn handle(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SendRequest<Bytes>, GatewayError> {
        // Wait for stream capacity without holding the lock: other tunnels go on meanwhile.
        let pooled = self.conns.lock().await.get(&addr).cloned();
        if let Some(s) = pooled {
            match s.ready().await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    debug!(gateway = %addr, error = %e, "pooled HTTP/2 connection failed; dialling again");
                }
            }
        }
        // One dial at a time per pool; a tunnel that waited here takes the fresh connection.
        let mut conns = self.conns.lock().await;
        if let Some(s) = conns.get(&addr).cloned() {
            if let Ok(s) = s.ready().await {
                return Ok(s);
            }
            conns.remove(&addr);
        }
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| GatewayError::Timeout)??;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = tokio::time::timeout(
            timeout,
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .handshake::<_, Bytes>(tcp),
        )
        .await
        .map_err(|_| GatewayError::Timeout)?
        .map_err(GatewayError::H2)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(gateway = %addr, error = %e, "HTTP/2 connection to the gateway ended");
            }
        });
        conns.insert(addr, send.clone());
        drop(conns);
        send.ready().await.map_err(GatewayError::H2)
    }

    /// Opens a tunnel to `target` through the gateway at `addr`.
    pub async fn open(
        &self,
        addr: SocketAddr,
        target: &Target,
        host: Option<&str>,
        timeout: Duration,
    ) -> Result<H2Io, GatewayError> {
        let mut send = self.handle(addr, timeout).await?;
        let (resp, stream) = send
            .send_request(request(target, host)?, false)
            .map_err(GatewayError::H2)?;
        let resp = tokio::time::timeout(timeout, resp)
            .await
            .map_err(|_| GatewayError::Timeout)?
            .map_err(GatewayError::H2)?;
        if !resp.status().is_success() {
            return Err(GatewayError::Status(resp.status().as_u16()));
        }
        Ok(H2Io::new(stream, resp.into_body()))
    }
}
