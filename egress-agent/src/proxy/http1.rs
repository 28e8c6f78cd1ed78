//! Per-request judging of HTTP/1.x connections. Where a rule needs the host (or HTTP fields)
//! and the client speaks HTTP/1.x, the proxy does not hand the connection to the byte relay
//! after the first request: it reads every request head ([`egress_common::wire::http`], on
//! `httparse`), judges it, forwards it and its body, then forwards the response, and only
//! then reads the next request. Pipelined requests wait in the socket meanwhile, so each one
//! is judged before the origin sees a byte of it, and a refused one is answered in order with
//! a `403` naming the policy, after which the connection is closed.
//!
//! Bodies are delimited exactly (`Content-Length`, `chunked`; ambiguous framings are refused
//! with a `400`), so the next request is found where the origin will find it. After a `101
//! Switching Protocols` (WebSocket) or a `2xx` to CONNECT the bytes are no longer HTTP and
//! pass as they are.

use std::{
    io,
    pin::Pin,
    time::{Duration, Instant},
};

use egress_common::wire::http::{self, Body, Chunked, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the proxy decided about one request.
pub enum Judgement {
    /// Forward it; `rule` is the Egress that let it out (for the log).
    Allow { rule: String, audit: bool },
    /// Answer `403` with `why` (one line) and close; `policy` goes in `X-Egress-Policy`.
    Refuse { why: String, policy: String },
}

/// One request, for the audit line and the metrics.
#[derive(Debug, Default, Clone)]
pub struct RequestLog {
    pub method: String,
    pub host: String,
    /// The path (no query string).
    pub path: String,
    pub rule: String,
    pub verdict: &'static str,
    pub status: u16,
    /// Request bytes (head and body) and response bytes.
    pub bytes: (u64, u64),
    pub started: Option<Instant>,
}

impl RequestLog {
    /// Starts the record of request `r` (the strings keep their allocations).
    fn start(&mut self, r: &Request<'_, '_>, started: Instant) {
        for (field, v) in [
            (&mut self.method, r.method),
            (&mut self.host, r.host.unwrap_or("")),
            (&mut self.path, r.path),
        ] {
            field.clear();
            field.push_str(v);
        }
        self.rule.clear();
        self.verdict = "";
        self.status = 0;
        self.bytes = (0, 0);
        self.started = Some(started);
    }
}

/// How a judged connection ended.
#[derive(Debug, Default)]
pub struct Served {
    /// Client → upstream, upstream → client.
    pub bytes: (u64, u64),
    pub requests: u64,
    /// A request was refused (403) or malformed (400).
    pub refused: bool,
    pub end: &'static str,
}

/// Serves HTTP/1.x between `client` and `upstream` until either closes, a request is
/// refused, or `idle` passes with no byte from the side awaited. `buf` holds the bytes
/// already read from the client.
pub async fn serve<C, U>(
    client: C,
    upstream: U,
    buf: Vec<u8>,
    idle: Duration,
    mut judge: impl FnMut(&Request<'_, '_>) -> Judgement,
    mut on_request: impl FnMut(&RequestLog),
) -> Served
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut cbuf = buf;
    let mut ubuf = Vec::new();
    // The idle clocks of the three waits that may overlap: the next request head (and, in
    // step 2, the request's body) and the response.
    let (mut client_idle, mut origin_idle) = (Idle::new(idle), Idle::new(idle));
    let mut out = Served::default();
    // One log record for the connection, its strings reused from request to request.
    let mut log = RequestLog::default();
    loop {
        // 1. The next request head, judged.
        let started = Instant::now();
        let (body, upgrade, head_len, verdict) = loop {
            let mut headers = [http::EMPTY_HEADER; http::MAX_HEADERS];
            match http::request(&cbuf, &mut headers) {
                Ok(r) => {
                    log.start(&r, started);
                    let j = judge(&r);
                    break (r.body, r.upgrade, r.len, j);
                }
                Err(http::Error::Incomplete) => {}
                Err(http::Error::Host(why)) => {
                    let resp = forbidden(&format!("request refused: {why}"), "malformed");
                    let _ = cw.write_all(resp.as_bytes()).await;
                    let _ = cw.shutdown().await;
                    out.refused = true;
                    out.end = "denied";
                    return out;
                }
                Err(http::Error::Invalid(why)) => {
                    let _ = cw.write_all(bad_request(why).as_bytes()).await;
                    let _ = cw.shutdown().await;
                    out.refused = true;
                    out.end = "malformed request";
                    return out;
                }
            }
            match fill(&mut cr, &mut cbuf, &mut client_idle).await {
                Ok(0) => {
                    out.end = if cbuf.iter().all(|b| *b == b'\r' || *b == b'\n') {
                        "closed"
                    } else {
                        "client closed mid-request"
                    };
                    let _ = uw.shutdown().await;
                    return out;
                }
                Ok(_) => {}
                Err(e) => {
                    out.end = io_end(&e);
                    return out;
                }
            }
        };
        out.requests += 1;
        match verdict {
            Judgement::Refuse { why, policy } => {
                log.verdict = "deny";
                log.status = 403;
                log.rule = policy.clone();
                on_request(&log);
                let _ = cw.write_all(forbidden(&why, &policy).as_bytes()).await;
                let _ = cw.shutdown().await;
                out.refused = true;
                out.end = "denied";
                return out;
            }
            Judgement::Allow { rule, audit } => {
                log.rule = rule;
                log.verdict = if audit { "audit" } else { "allow" };
            }
        }

        // 2. Forward the head with the body, and the response, side by side (a client may
        // wait for `100 Continue` before it sends its body).
        let up = async {
            let n = copy_body(
                &mut cr,
                &mut uw,
                &mut cbuf,
                head_len,
                body,
                &mut client_idle,
            )
            .await?;
            uw.flush().await?;
            io::Result::Ok(n)
        };
        let down = response(&mut ur, &mut cw, &mut ubuf, &log.method, &mut origin_idle);
        let (sent, got) = tokio::join!(up, down);
        // The request did not get through whole (the origin closed early, the client stopped
        // mid-body): whatever follows in `cbuf` is not a request head; end after the response.
        let request_broken = sent.is_err();
        let sent = sent.unwrap_or(0);
        out.bytes.0 += sent;
        log.bytes.0 = sent;
        let (status, got, resp_end) = match got {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::InvalidData && out.requests == 1 => {
                // Not an HTTP/1.x response to the first request: what the origin says passes
                // as it is, but nothing more of the client's does, and the connection ends
                // when either side closes.
                let mut drained = 0u64;
                let mut one = [0u8; 1];
                tokio::select! {
                    r = copy_body(&mut ur, &mut cw, &mut ubuf, 0, Body::UntilClose, &mut origin_idle) => {
                        drained = r.unwrap_or(0);
                    }
                    _ = cr.read(&mut one) => {}
                }
                let _ = cw.shutdown().await;
                out.bytes.1 += drained;
                log.status = 0;
                on_request(&log);
                out.end = "closed: not an HTTP/1.x response";
                return out;
            }
            Err(e) => {
                log.status = 502;
                on_request(&log);
                out.end = io_end(&e);
                return out;
            }
        };
        out.bytes.1 += got;
        log.status = status;
        log.bytes.1 = got;
        on_request(&log);
        if resp_end == RespEnd::Closed || request_broken {
            let _ = cw.shutdown().await;
            out.end = "closed";
            return out;
        }
        if resp_end == RespEnd::Upgraded || (upgrade && status == 101) {
            // Not HTTP any more: whatever was read goes first, then bytes as they are.
            let _ = cw.write_all(&ubuf).await;
            let _ = uw.write_all(&cbuf).await;
            let mut c = cr.unsplit(cw);
            let mut u = ur.unsplit(uw);
            let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            let (a, b) = r.unwrap_or((0, 0));
            out.bytes.0 += a + cbuf.len() as u64;
            out.bytes.1 += b + ubuf.len() as u64;
            out.end = "closed (upgraded)";
            return out;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RespEnd {
    /// The next request may follow.
    KeepAlive,
    /// The response ran until the origin closed.
    Closed,
    /// 101, or 2xx to CONNECT: the connection is a tunnel now.
    Upgraded,
}

/// Forwards one response (after any `1xx` interim ones) to the client: (status, bytes, end).
async fn response<R, W>(
    ur: &mut R,
    cw: &mut W,
    ubuf: &mut Vec<u8>,
    method: &str,
    idle: &mut Idle,
) -> io::Result<(u16, u64, RespEnd)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let head = loop {
            match http::response(ubuf, method) {
                Ok(h) => break h,
                Err(http::Error::Incomplete) => {}
                Err(http::Error::Invalid(why) | http::Error::Host(why)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why))
                }
            }
            if fill(ur, ubuf, idle).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the origin closed before answering",
                ));
            }
        };
        let connect_ok =
            method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&head.status);
        if head.status == 101 || connect_ok {
            total += send(cw, ubuf, head.len).await?;
            cw.flush().await?;
            return Ok((head.status, total, RespEnd::Upgraded));
        }
        if (100..200).contains(&head.status) {
            total += send(cw, ubuf, head.len).await?;
            cw.flush().await?;
            continue;
        }
        // The head goes out with the body's first bytes: one write, one segment.
        total += copy_body(ur, cw, ubuf, head.len, head.body, idle).await?;
        cw.flush().await?;
        let end = if head.body == Body::UntilClose {
            RespEnd::Closed
        } else {
            RespEnd::KeepAlive
        };
        return Ok((head.status, total, end));
    }
}

/// Moves one body from `r` to `w` after the `pre` bytes at the start of `buf` (its head,
/// already judged), which go out in the same write as the body's first bytes: first from
/// `buf` (bytes already read), then from `r`. Bytes past the body stay in `buf`. Returns the
/// bytes written, `pre` included.
async fn copy_body<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut Vec<u8>,
    mut pre: usize,
    body: Body,
    idle: &mut Idle,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let eof = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed in the middle of a body",
        )
    };
    let mut moved = 0u64;
    match body {
        Body::None => {
            if pre > 0 {
                moved += send(w, buf, pre).await?;
            }
        }
        Body::Length(n) => {
            let mut left = n;
            loop {
                let take = left.min((buf.len() - pre) as u64) as usize;
                if pre + take > 0 {
                    moved += send(w, buf, pre + take).await?;
                    pre = 0;
                    left -= take as u64;
                }
                if left == 0 {
                    break;
                }
                if fill(r, buf, idle).await? == 0 {
                    return Err(eof());
                }
            }
        }
        Body::Chunked => {
            let mut c = Chunked::default();
            loop {
                let n = if buf.len() > pre {
                    c.feed(&buf[pre..]).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "bad chunked body")
                    })?
                } else {
                    0
                };
                if pre + n > 0 {
                    moved += send(w, buf, pre + n).await?;
                    pre = 0;
                }
                if c.done() {
                    break;
                }
                if fill(r, buf, idle).await? == 0 {
                    return Err(eof());
                }
            }
        }
        Body::UntilClose => loop {
            if !buf.is_empty() {
                moved += send(w, buf, buf.len()).await?;
            }
            if fill(r, buf, idle).await? == 0 {
                break;
            }
        },
    }
    Ok(moved)
}

/// Writes the first `n` bytes of `buf` to `w` and drops them from `buf`; `n`.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut Vec<u8>, n: usize) -> io::Result<u64> {
    w.write_all(&buf[..n]).await?;
    buf.drain(..n);
    Ok(n as u64)
}

/// Bytes read per call; a buffer grows to at most a head's bound plus this.
const READ: usize = 64 * 1024;

/// How long a read may wait for a byte: one timer per wait, pushed back at each read (which
/// takes no lock in tokio's timer wheel while the deadline only moves later), rather than a
/// new timer for every read.
struct Idle {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

/// Reads more into `buf`; 0 at EOF. `idle.limit` without a byte is an error.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    idle: &mut Idle,
) -> io::Result<usize> {
    buf.reserve(READ);
    idle.timer
        .as_mut()
        .reset(tokio::time::Instant::now() + idle.limit);
    tokio::select! {
        biased;
        n = r.read_buf(buf) => n,
        () = idle.timer.as_mut() => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
}

fn io_end(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "idle timeout",
        io::ErrorKind::UnexpectedEof => "closed mid-message",
        io::ErrorKind::InvalidData => "malformed response",
        _ => "error",
    }
}

/// A `403` naming the policy, closing the connection.
pub fn forbidden(why: &str, policy: &str) -> String {
    let body = format!("egress: {why}\n");
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nX-Egress-Policy: {policy}\r\n\r\n{body}",
        body.len()
    )
}

fn bad_request(why: &str) -> String {
    let body = format!("egress: malformed request refused: {why}\n");
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests;
