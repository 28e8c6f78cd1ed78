//! The in-kernel relay (`run --relay kernel`): the two sockets of a connection go into the
//! socket maps of [`crate::datapath::relay`] and the kernel's stream-verdict program moves
//! every byte from one to the other; userspace never sees the payload. What is left here:
//! the switch (without losing or reordering a byte), half-close, the idle timeout, closing
//! on a policy change, and the byte counts, all from the sockets' counters
//! ([`egress_common::relay`]).
//!
//! The switch, in an order that keeps every byte in place:
//! 1. Counters of both sockets, while userspace reads and writes neither.
//! 2. Each socket goes into the targets map under its peer's cookie: it can now receive
//!    redirected bytes; how it receives does not change.
//! 3. The upstream goes into the verdict map. Bytes that arrive from now on are redirected;
//!    the ones already waiting in its receive queue are redirected at the next arrival (in
//!    order, before it), and setting SO_RCVLOWAT (tcp_set_rcvlowat calls the data-ready
//!    callback, now the verdict's) makes that happen at once, so nothing waits for a byte
//!    that will not come. Bytes the client sends meanwhile wait in its receive queue.
//! 4. The same for the client (its request, often sent before the proxy even connected,
//!    waited in its queue). The kernel takes only established sockets: a client whose FIN
//!    came before this step has all its bytes queued, and userspace copies them (nothing
//!    else writes to the upstream).
//!
//! A FIN is not redirected: the socket's poll shows it (RDHUP, watched through an epoll set
//! of the connection's own that does not listen for data), and the peer is shut down for
//! writing once every byte the socket received is in the peer's send queue (redirected bytes
//! first wait in the kernel's per-socket queue, sent by a kernel worker).

use std::{
    io,
    net::{Shutdown, TcpStream as StdStream},
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use egress_common::relay::{stable, Counts, Way};
use futures::future::Either;
use nix::{
    errno::Errno,
    sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpStream,
};

use super::relay::{supervise, Relayed};
use crate::{
    datapath::relay::{socket_cookie, KernelRelay, RelayMap},
    gateway::Upstream,
};

/// Relays `client` and `upstream` in the kernel. When the kernel refuses the sockets (the
/// maps are full, a socket is no longer established), nothing has changed and they come
/// back for the splice relay.
pub async fn relay(
    k: &KernelRelay,
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    still_allowed: impl Fn() -> bool,
) -> Result<Relayed, (TcpStream, TcpStream, io::Error)> {
    let pair = match Pair::switch(k, &client, &upstream) {
        Ok(p) => p,
        Err(Refused::Untouched(e)) => return Err((client, upstream, e)),
        Err(Refused::Broken(e)) => {
            return Ok(Relayed {
                bytes: (0, 0),
                idle_timeout: false,
                revoked: false,
                error: Some(e),
            })
        }
    };
    // Out of tokio's reactor: it would wake up for every byte the kernel moves.
    let r = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => pair.run([&c, &u], idle, changes, still_allowed).await,
        (Err(e), _) | (_, Err(e)) => Relayed {
            bytes: (0, 0),
            idle_timeout: false,
            revoked: false,
            error: Some(e),
        },
    };
    pair.release(k);
    Ok(r)
}

impl super::Proxy {
    /// Relays until the connection ends: in the kernel when it is on and takes the sockets,
    /// else by splice (or by copy for an HTTP/2 tunnel). The splice relay's future is returned
    /// as it is (no async layer around it, which would hold its arguments again); the other
    /// ways are boxed.
    pub(super) fn relay<'a>(
        &'a self,
        client: TcpStream,
        upstream: Upstream,
        changes: impl Fn() -> Option<tokio::sync::watch::Receiver<u64>> + Send + 'a,
        still_allowed: impl Fn() -> bool + Send + Sync + 'a,
    ) -> impl std::future::Future<Output = Relayed> + 'a {
        let idle = self.limits.idle_timeout;
        let upstream = match (upstream, self.kernel.get()) {
            (Upstream::Tcp(u), None) => {
                let splice = super::relay::relay(client, u, idle, changes(), still_allowed);
                return Either::Left(splice);
            }
            (u, _) => u,
        };
        Either::Right(Box::pin(async move {
            let (client, upstream) = match (upstream, self.kernel.get()) {
                (Upstream::Tcp(u), Some(k)) => {
                    match relay(k, client, u, idle, changes(), &still_allowed).await {
                        Ok(r) => return r,
                        Err((c, u, e)) => {
                            tracing::info!(error = %e, "the kernel did not take the connection; relaying by splice");
                            (c, Upstream::Tcp(u))
                        }
                    }
                }
                (u, _) => (client, u),
            };
            match upstream {
                Upstream::Tcp(u) => {
                    super::relay::relay(client, u, idle, changes(), still_allowed).await
                }
                Upstream::H2(s) => {
                    crate::gateway::relay_io(client, s, idle, changes(), still_allowed).await
                }
            }
        }))
    }
}

/// Why the switch did not happen.
enum Refused {
    /// Nothing changed: the splice relay can take over.
    Untouched(io::Error),
    /// The client's bytes already go to the upstream in the kernel but the upstream's could
    /// not be set up: no way back to splice without reordering bytes; the connection closes.
    Broken(io::Error),
}

/// A connection the kernel relays: the sockets' cookies (client, upstream) and its two ways
/// (client to upstream, upstream to client) as they stood at the switch.
struct Pair {
    cookies: [u64; 2],
    ways: [Way; 2],
    /// The client had sent its FIN before the kernel took it: userspace copies what is left
    /// of its bytes to the upstream.
    client_by_user: bool,
}

impl Pair {
    fn switch(k: &KernelRelay, c: &TcpStream, u: &TcpStream) -> Result<Self, Refused> {
        let cookies = [socket_cookie(c), socket_cookie(u)];
        let (cc, uc) = (counts_at_rest(c), counts_at_rest(u));
        let (cookies, cc, uc) = match (cookies, cc, uc) {
            ([Ok(a), Ok(b)], Ok(cc), Ok(uc)) => ([a, b], cc, uc),
            ([Err(e), _], _, _) | ([_, Err(e)], _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return Err(Refused::Untouched(e))
            }
        };
        let mut p = Self {
            cookies,
            ways: [Way::at_switch(&cc, &uc), Way::at_switch(&uc, &cc)],
            client_by_user: false,
        };
        // The kernel takes only established sockets. The upstream goes first: a server that
        // answers and closes at once (Connection: close) is the common early FIN; a client
        // that half-closes right after its request is rare, and handled below.
        let targets = k
            .insert(RelayMap::Peers, cookies[0], u.as_fd())
            .and_then(|()| k.insert(RelayMap::Peers, cookies[1], c.as_fd()))
            .and_then(|()| k.insert(RelayMap::Verdict, cookies[1], u.as_fd()));
        if let Err(e) = targets {
            p.release(k);
            return Err(Refused::Untouched(e));
        }
        kick(u);
        if let Err(e) = k.insert(RelayMap::Verdict, cookies[0], c.as_fd()) {
            // The upstream's bytes already go to the client in the kernel. A client that has
            // sent its FIN has all its bytes in its receive queue, and nothing else writes to
            // the upstream: userspace copies them. Anything else cannot be undone: close.
            if fin_received(c).unwrap_or(false) {
                p.client_by_user = true;
                return Ok(p);
            }
            p.release(k);
            return Err(Refused::Broken(io::Error::other(format!(
                "kernel relay half set up ({e}); the connection is closed"
            ))));
        }
        kick(c);
        Ok(p)
    }

    /// Out of both maps (closing the sockets would do it too).
    fn release(&self, k: &KernelRelay) {
        for c in self.cookies {
            k.remove(RelayMap::Verdict, c);
            k.remove(RelayMap::Peers, c);
        }
    }

    async fn run(
        &self,
        socks: [&StdStream; 2],
        idle: Duration,
        changes: Option<tokio::sync::watch::Receiver<u64>>,
        still_allowed: impl Fn() -> bool,
    ) -> Relayed {
        // Bytes each way, once that way ended (its target shut down for writing).
        let ended = [Ended::default(), Ended::default()];
        let work = std::pin::pin!(async {
            if self.client_by_user {
                let n = copy_rest(socks[0], socks[1]).await?;
                let _ = socks[1].shutdown(Shutdown::Write);
                ended[0].set(Some(n));
            }
            let h = Hangups::new(socks)?;
            self.watch(&h, socks, &ended).await
        });
        let idle_ms = || socks.iter().map(last_data_recv_ms).min().unwrap_or(0);
        let (idle_timeout, revoked, error) =
            supervise(work, idle, idle_ms, changes, still_allowed).await;
        if let Some(e) = &error {
            tracing::debug!(target: "egress::proxy", error = %e, "kernel relay ended with an error");
        }
        let moved = |i: usize| {
            ended[i].get().unwrap_or_else(|| {
                counts(socks[1 - i])
                    .map(|to| self.ways[i].moved(&to))
                    .unwrap_or(0)
            })
        };
        Relayed {
            bytes: (moved(0), moved(1)),
            idle_timeout,
            revoked,
            error,
        }
    }

    /// Until both ways have ended: passes each FIN on once its bytes are through.
    async fn watch(
        &self,
        h: &Hangups,
        socks: [&StdStream; 2],
        ended: &[Ended; 2],
    ) -> io::Result<()> {
        let mut eof = [false; 2];
        let mut delay = Duration::from_micros(100);
        loop {
            for i in 0..2 {
                if !eof[i] || ended[i].get().is_some() {
                    continue;
                }
                let (from, to) = (counts(socks[i])?, counts(socks[1 - i])?);
                if self.ways[i].drained(&from, &to) {
                    ended[i].set(Some(self.ways[i].moved(&to)));
                    let _ = socks[1 - i].shutdown(Shutdown::Write);
                }
            }
            if ended.iter().all(|e| e.get().is_some()) {
                return Ok(());
            }
            let draining = (0..2).any(|i| eof[i] && ended[i].get().is_none());
            tokio::select! {
                evs = h.next() => {
                    for (i, flags) in evs? {
                        if flags.contains(EpollFlags::EPOLLERR) {
                            if let Some(e) = socks[i].take_error()? {
                                return Err(e);
                            }
                        }
                        eof[i] |= flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP);
                    }
                    delay = Duration::from_micros(100);
                }
                _ = tokio::time::sleep(delay), if draining => {
                    delay = (delay * 2).min(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Bytes one way moved, set once the way ended (its target shut down for writing).
#[derive(Default)]
struct Ended(AtomicU64);

impl Ended {
    fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    fn set(&self, v: Option<u64>) {
        self.0.store(v.map_or(0, |v| v + 1), Ordering::Relaxed);
    }
}

/// The sockets' hang-ups (FIN, reset), without their data: an epoll set that does not ask
/// for EPOLLIN is not woken by the kernel's data-ready callbacks.
struct Hangups {
    ep: AsyncFd<EpollFd>,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl Hangups {
    fn new(socks: [&StdStream; 2]) -> io::Result<Self> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, s) in socks.iter().enumerate() {
            let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            ep.add(s, EpollEvent::new(flags, i as u64))?;
        }
        // SAFETY: the epoll fd is owned by the EpollFd the AsyncFd owns; never closed or
        // replaced while registered.
        let ep = unsafe { AsyncFd::register_with_interest(EpollFd(ep), Interest::READABLE) }?;
        Ok(Self { ep })
    }

    /// The next hang-ups: (0 client / 1 upstream, what happened).
    async fn next(&self) -> io::Result<Vec<(usize, EpollFlags)>> {
        loop {
            let mut g = self.ep.readable().await?;
            let mut evs = [EpollEvent::empty(); 2];
            let n = self.ep.get_ref().0.wait(&mut evs, EpollTimeout::ZERO)?;
            if n == 0 {
                g.clear_ready();
                continue;
            }
            return Ok(evs[..n]
                .iter()
                .map(|e| (e.data() as usize & 1, e.events()))
                .collect());
        }
    }
}

/// Copies what is left in `from`'s receive queue (its FIN has arrived) to `to`.
async fn copy_rest(from: &StdStream, to: &StdStream) -> io::Result<u64> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    let mut moved = 0;
    let pause = || tokio::time::sleep(Duration::from_millis(1));
    loop {
        let n = match (&*from).read(&mut buf) {
            Ok(0) => return Ok(moved),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pause().await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut left = &buf[..n];
        while !left.is_empty() {
            match (&*to).write(left) {
                Ok(w) => left = &left[w..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pause().await,
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
}

/// Makes the kernel run the data-ready callback (now the verdict's) over the bytes already
/// in the receive queue: `tcp_set_rcvlowat` calls it. 1 is the default low-water mark.
fn kick(s: &impl AsFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own, on a borrowed fd.
    unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// TCP_INFO fields this relay reads (offsets in `struct tcp_info`, stable ABI).
struct TcpInfo {
    last_data_recv_ms: u32,
    bytes_acked: u64,
    bytes_received: u64,
}

fn tcp_info(s: &impl AsFd) -> io::Result<TcpInfo> {
    let mut b = [0u8; 136];
    let mut len = b.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a buffer we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            b.as_mut_ptr().cast(),
            &mut len,
        )
    };
    Errno::result(r)?;
    if (len as usize) < b.len() {
        return Err(io::Error::other("TCP_INFO without byte counters"));
    }
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    Ok(TcpInfo {
        last_data_recv_ms: u32::from_ne_bytes(b[52..56].try_into().unwrap_or([0; 4])),
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
    })
}

fn last_data_recv_ms(s: &impl AsFd) -> u64 {
    tcp_info(s).map(|i| i.last_data_recv_ms as u64).unwrap_or(0)
}

fn ioctl_int(s: &impl AsFd, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one int we own.
    let r = unsafe { libc::ioctl(s.as_fd().as_raw_fd(), req, &mut v) };
    Errno::result(r)?;
    Ok(v.max(0) as u64)
}

fn fin_received(s: &impl AsFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: s.as_fd().as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd we own; zero timeout.
    Errno::result(unsafe { libc::poll(&mut p, 1, 0) })?;
    Ok(p.revents & libc::POLLRDHUP != 0)
}

fn counts(s: &impl AsFd) -> io::Result<Counts> {
    let i = tcp_info(s)?;
    Ok(Counts {
        received: i.bytes_received,
        acked: i.bytes_acked,
        fin: fin_received(s)?,
        inq: ioctl_int(s, libc::FIONREAD)?,
        outq: ioctl_int(s, libc::TIOCOUTQ)?,
    })
}

/// Counters of a socket that may still be receiving, consistent with each other: read until
/// no byte (nor the FIN) arrived while they were read.
fn counts_at_rest(s: &impl AsFd) -> io::Result<Counts> {
    for _ in 0..1000 {
        let c = counts(s)?;
        if stable(c.received, tcp_info(s)?.bytes_received) {
            return Ok(c);
        }
    }
    Err(io::Error::other("the socket's counters never settled"))
}
