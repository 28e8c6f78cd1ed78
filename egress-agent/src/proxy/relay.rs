//! Moving bytes both ways between the client and the upstream (bulk by splice, without
//! copying through userspace), with half-close preserved (EOF one way shuts down writing that way, the
//! other way goes on), an idle timeout, and re-judging on policy changes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SpliceFFlags},
    sys::socket,
    unistd,
};
use tokio::{io::Interest, net::TcpStream};

/// How a relay ended.
#[derive(Debug)]
pub struct Relayed {
    /// Client → upstream, upstream → client.
    pub bytes: (u64, u64),
    pub idle_timeout: bool,
    /// Closed because a policy change refuses the connection now.
    pub revoked: bool,
    pub error: Option<io::Error>,
}

/// Relays until both directions finish, an error, `idle` passes with no byte read, or a
/// policy change after which `still_allowed` says no (`changes` tells of changes; None: the
/// connection is never re-judged). Small messages are copied once through a per-thread
/// buffer; bulk moves with splice(2), socket to pipe to socket inside the kernel.
///
/// A plain function returning its future: an `async fn` would hold each argument twice in
/// its state (as given and as moved into its body), and an idle connection costs what this
/// state weighs.
#[allow(clippy::manual_async_fn)] // an async fn would hold its arguments twice
pub fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    still_allowed: impl Fn() -> bool,
) -> impl std::future::Future<Output = Relayed> {
    async move {
        let act = Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            one_ended: AtomicBool::new(false),
        };
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let both = std::pin::pin!(async {
            let (a, b) = tokio::join!(
                pump(&client, &upstream, &up, &act),
                pump(&upstream, &client, &down, &act)
            );
            a.and(b)
        });
        let (idle_timeout, revoked, error) =
            supervise(both, idle, || act.idle_ms(), changes, &still_allowed).await;
        Relayed {
            bytes: (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)),
            idle_timeout,
            revoked,
            error,
        }
    }
}

/// Drives `work` (both directions of a relay) until it ends, `idle_ms()` reaches `idle`, or
/// a policy change after which `still_allowed` says no. Returns (idle timeout, revoked,
/// error). `work` is pinned by the caller and only borrowed here: a future taken by value
/// would be held twice in the relay's state (the caller's and this one's), and an idle
/// connection costs what its relay's state weighs. The idle check is one timer inline (no
/// boxed `Interval`).
#[allow(clippy::manual_async_fn)] // an async fn would hold its arguments twice
pub(crate) fn supervise<'a>(
    mut work: std::pin::Pin<&'a mut impl std::future::Future<Output = io::Result<()>>>,
    idle: Duration,
    idle_ms: impl Fn() -> u64 + 'a,
    mut changes: Option<tokio::sync::watch::Receiver<u64>>,
    still_allowed: impl Fn() -> bool + 'a,
) -> impl std::future::Future<Output = (bool, bool, Option<io::Error>)> + 'a {
    async move {
        let limit = idle.as_millis() as u64;
        let period = idle / 4;
        let mut tick = std::pin::pin!(tokio::time::sleep(period));
        loop {
            let changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = work.as_mut() => return (false, false, r.err()),
                _ = tick.as_mut() => {
                    if idle_ms() >= limit {
                        return (true, false, None);
                    }
                    tick.as_mut().reset(tokio::time::Instant::now() + period);
                }
                alive = changed => {
                    if !alive {
                        changes = None;
                    } else if !still_allowed() {
                        return (false, true, None);
                    }
                }
            }
        }
    }
}

/// When bytes last moved, for the idle timeout; and whether one direction has ended.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
    one_ended: AtomicBool,
}

impl Activity {
    /// EOF from the other side of `to`: the first direction to end passes the half-close on
    /// (shutdown(SHUT_WR)); the second needs no shutdown(2): the relay ends and closing
    /// both sockets sends the FIN.
    fn ended(&self, to: &TcpStream) {
        if !self.one_ended.swap(true, Ordering::Relaxed) {
            half_close(to);
        }
    }

    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.last.load(Ordering::Relaxed))
    }
}

/// Bytes one splice call moves at most (the pipe holds them in between).
const CHUNK: usize = 256 * 1024;

/// The per-thread buffer small messages are copied through. A read that fills it marks the
/// direction as bulk, which then moves by splice.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SCRATCH]);
}

/// One direction: `from` → `to`, until EOF on `from` (then `to` is shut down for writing:
/// half-close passes through) or an error. Small messages are copied through the thread's
/// buffer (one read, one write, no per-connection buffer or pipe); once a read fills that
/// buffer the direction switches to splice through a pipe of its own.
#[allow(clippy::manual_async_fn)] // an async fn would hold its arguments twice
fn pump<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    moved: &'a AtomicU64,
    act: &'a Activity,
) -> impl std::future::Future<Output = io::Result<()>> + 'a {
    // A plain function returning its future: arguments held once (see `relay`).
    async move {
        let mut pipe_fds: Option<(OwnedFd, OwnedFd)> = None;
        // Bytes read but not yet written: only when `to` could not take a whole message at once.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let Some((pr, pw)) = &pipe_fds else {
                let ready = from.ready(Interest::READABLE).await?;
                let read = BUF.with(|b| {
                    let mut b = b.borrow_mut();
                    let n = match read_draining(from, &mut b) {
                        Ok(0) => return Ok(0), // EOF: nothing to write (no empty write(2))
                        Ok(n) => n,
                        Err(e) => return Err(e),
                    };
                    let w = match to.try_write(&b[..n]) {
                        Ok(w) => w,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Err(e),
                    };
                    pending.extend_from_slice(&b[w..n]);
                    moved.fetch_add(w as u64, Ordering::Relaxed);
                    Ok(n)
                });
                let n = match read {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    act.ended(to);
                    return Ok(());
                }
                act.touch();
                while !pending.is_empty() {
                    to.writable().await?;
                    match to.try_write(&pending) {
                        Ok(w) => {
                            pending.drain(..w);
                            moved.fetch_add(w as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
                pending = Vec::new();
                if n == SCRATCH {
                    pipe_fds = Some(pipe()?);
                } else if ready.is_read_closed() {
                    // The peer's FIN was in before this read (TCP takes it only after every byte
                    // it follows), and the read drained the socket: EOF, without a read to see it.
                    act.ended(to);
                    return Ok(());
                }
                continue;
            };
            let n = loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || splice(from, pw, CHUNK)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                act.ended(to);
                return Ok(());
            }
            act.touch();
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || splice(pr, to, left)) {
                    Ok(m) => {
                        left -= m;
                        moved.fetch_add(m as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// One read(2) of `from` into `buf`, inside tokio's readiness: a read that returns less than
/// `buf` holds has drained the socket, so its readiness is cleared (the sockets are
/// registered edge-triggered, and new bytes bring a new edge), as tokio's own `poll_read`
/// does; without that the next `readable()` would return at once into a read failing with
/// EAGAIN after every message. Ok(0): EOF.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    let r = from.try_io(Interest::READABLE, || {
        n = unistd::read(from.as_fd(), buf)?;
        if n > 0 && n < buf.len() {
            // Not an error: tells try_io to clear the readiness it saw (closed states stay).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => Ok(n),
        Err(e) => Err(e),
        Ok(()) => Ok(n),
    }
}

/// EOF one way: pass the half-close on. The peer may already be gone; that is fine.
fn half_close(to: &TcpStream) {
    let _ = socket::shutdown(to.as_raw_fd(), socket::Shutdown::Write);
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe moves bulk data in fewer calls; the default (64 KiB) is fine if refused.
    let _ = fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as libc::c_int));
    Ok((r, w))
}

/// splice(2) between a socket and a pipe (no offsets), without blocking.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(fcntl::splice(from, None, to, None, len, flags)?)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair over loopback: (dialled end, accepted end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (a, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_passes_both_ways_and_bytes_are_counted() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(super::relay(
            client_side,
            upstream_side,
            std::time::Duration::from_secs(10),
            None,
            || true,
        ));
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other way still works after the first one ended.
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let r = relay.await.unwrap();
        assert_eq!(r.bytes, (5, 3));
        assert!(r.error.is_none() && !r.idle_timeout && !r.revoked);
    }
}
