//! The proxy's accept loops: on each proxy thread, a listener is in the runtime's epoll set
//! only while that thread accepts ([`spill`]); each connection accepted is counted against
//! the proxy's limit and its thread's room and gets a task of its own. A connection that
//! finds no descriptor left is accepted with the thread's reserve and reset at once.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use egress_common::OrigKey;
use tokio::net::TcpListener;
use tracing::warn;

use super::{fd_table, metrics::ProxyResult, reset, sock_addr, spill, task, Proxy};

impl Proxy {
    pub(super) async fn accept_loop(
        self: Arc<Self>,
        mut listener: std::net::TcpListener,
        mut turn: Option<spill::Turn>,
    ) {
        // Clients of a listener share its network namespace (a pod's, or the agent's own).
        let netns = match crate::datapath::podnet::netns_cookie(&listener) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the proxy listener's network namespace cookie; not serving it");
                return;
            }
        };
        loop {
            if let Some(t) = &mut turn {
                t.mine().await;
            }
            // In this runtime's epoll set only while this thread accepts.
            let l = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "cannot register a proxy listener; not serving it");
                    return;
                }
            };
            self.accept_turn(&l, netns, &mut turn).await;
            listener = match l.into_std() {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "cannot set a proxy listener aside; not serving it");
                    return;
                }
            };
        }
    }

    /// Accepts on `listener` until this thread's turn is over (never, without a turn).
    async fn accept_turn(
        self: &Arc<Self>,
        listener: &TcpListener,
        netns: u64,
        turn: &mut Option<spill::Turn>,
    ) {
        let (over, turn) = match turn {
            Some(t) => {
                let (over, who) = t.split();
                (futures::future::Either::Left(over), Some(who))
            }
            None => (futures::future::Either::Right(std::future::pending()), None),
        };
        tokio::pin!(over);
        fd_table::reserve();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut over => return,
                a = listener.accept() => a,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // No descriptor left: the connection waiting first is refused at once
                    // (reset) through the reserve, not left waiting in the queue.
                    if self.shed(listener).is_none() {
                        warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
                Err(e) => {
                    // Other failures (ENOBUFS, ENOMEM, ...): back off instead of spinning.
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.metrics
                    .connection("", None, ProxyResult::OverLimit, (0, 0));
                warn!(%peer, limit = self.limits.max_connections, "proxy connection limit reached, refusing");
                reset(client);
                continue;
            };
            let key = OrigKey {
                netns,
                addr: sock_addr(peer),
            };
            let held = task::Held {
                _limit: permit,
                _room: turn.map(|t| t.hold()),
            };
            tokio::spawn(self.clone().connection(client, key, peer, held));
        }
    }

    /// Accepts one waiting connection with the thread's reserve descriptor and resets it.
    fn shed(&self, listener: &TcpListener) -> Option<()> {
        use futures::FutureExt as _;
        // Closed inside, so that the reserve gets its number back.
        let peer = fd_table::with_reserve(|| {
            let (client, peer) = listener.accept().now_or_never()?.ok()?;
            reset(client);
            Some(peer)
        })??;
        self.metrics
            .connection("", None, ProxyResult::OverLimit, (0, 0));
        shed_warning(peer);
        Some(())
    }
}

/// Logs a connection refused for want of descriptors, at most once a second per thread
/// (with how many since the last line).
fn shed_warning(peer: SocketAddr) {
    thread_local! {
        static LAST: std::cell::Cell<(Option<Instant>, u64)> = const { std::cell::Cell::new((None, 0)) };
    }
    let (last, n) = LAST.get();
    let now = Instant::now();
    if last.is_some_and(|t| now - t < Duration::from_secs(1)) {
        LAST.set((last, n + 1));
        return;
    }
    LAST.set((Some(now), 0));
    warn!(%peer, refused_since_last = n, "proxy out of file descriptors (RLIMIT_NOFILE), refusing (reset)");
}
