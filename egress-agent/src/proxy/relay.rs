//! Copying bytes both ways between the client and the upstream, with half-close preserved
//! (EOF one way shuts down writing that way, the other way goes on) and an idle timeout.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer per direction. Large enough for bulk transfers to run at memory speed, small
/// enough for 10k connections to fit in a few hundred MiB at worst (buffers are only
/// allocated while a connection is active in copy_bidirectional).
const BUF: usize = 64 * 1024;

/// A stream that records when it last delivered bytes, and how many.
struct Tracked<S> {
    inner: S,
    last: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Tracked<S> {
    fn new(inner: S, last: &Arc<AtomicU64>, epoch: Instant) -> Self {
        Self {
            inner,
            last: last.clone(),
            read: Arc::new(AtomicU64::new(0)),
            epoch,
        }
    }

    fn touch(&self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.touch(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

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
/// connection is never re-judged).
pub async fn relay<A, B>(
    client: A,
    upstream: B,
    idle: Duration,
    mut changes: Option<tokio::sync::watch::Receiver<u64>>,
    still_allowed: impl Fn() -> bool,
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let mut a = Tracked::new(client, &last, epoch);
    let mut b = Tracked::new(upstream, &last, epoch);
    let (read_a, read_b) = (a.read.clone(), b.read.clone());
    let bytes = || {
        (
            read_a.load(Ordering::Relaxed),
            read_b.load(Ordering::Relaxed),
        )
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF, BUF);
    tokio::pin!(copy);
    let idle_ms = idle.as_millis() as u64;
    let mut tick = tokio::time::interval(idle / 4);
    let ended = |idle_timeout, revoked, error| Relayed {
        bytes: bytes(),
        idle_timeout,
        revoked,
        error,
    };
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut copy => return ended(false, false, r.err()),
            _ = tick.tick() => {
                let now = epoch.elapsed().as_millis() as u64;
                if now.saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                    return ended(true, false, None);
                }
            }
            alive = changed => {
                if !alive {
                    changes = None;
                } else if !still_allowed() {
                    return ended(false, true, None);
                }
            }
        }
    }
}
