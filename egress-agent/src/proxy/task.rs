//! One accepted connection's task, and what it keeps while it relays. An idle relayed
//! connection costs what its task weighs (besides the kernel's socket buffers and tokio's
//! registration of its two sockets): the task is allocated at its future's largest state, so
//! that state is the relay's, and everything before it (sniffing, judging, dialling) is
//! boxed and freed when the relay starts. The unit test
//! `an_idle_connection_s_task_stays_small` keeps it so.

use std::{net::SocketAddr, sync::Arc};

use egress_common::OrigKey;
use tokio::net::TcpStream;

use super::{Proxy, Record, REVOKED};
use crate::gateway::Upstream;

/// An allowed connection, dialled, with its sniffed bytes sent: what its relay needs (the
/// rest of [`Proxy::handle`]'s state is freed before the relay starts).
pub(super) struct Relaying {
    pub(super) client: TcpStream,
    pub(super) upstream: Upstream,
    pub(super) rec: Record,
    /// Sniffed bytes already sent upstream.
    pub(super) head_len: u64,
    pub(super) wid: u32,
}

/// What an accepted connection counts against while it lives: the proxy's connection limit
/// and its thread's room ([`super::spill`]).
pub(super) struct Held {
    pub(super) _limit: tokio::sync::OwnedSemaphorePermit,
    pub(super) _room: Option<super::spill::Held>,
}

impl Proxy {
    /// One accepted connection's task, from start to end. An idle relayed connection costs
    /// what this future weighs: its task is allocated at its largest state, the relay's; what
    /// comes before is boxed (and freed when the relay starts). Plain functions returning
    /// `async move` blocks rather than `async fn`s, and futures awaited where they lie: an
    /// `async fn` holds each argument twice (as given, and as moved into its body), and a
    /// future awaited by value is held twice (where it was, and where `.await` pins it).
    pub(super) fn connection(
        self: Arc<Self>,
        client: TcpStream,
        key: OrigKey,
        peer: SocketAddr,
        held: Held,
    ) -> impl std::future::Future<Output = ()> {
        let this = self.clone();
        let setup = Box::pin(async move { this.handle(client, key, peer).await });
        async move {
            self.metrics.active().inc();
            let mut relay: futures::future::OptionFuture<_> =
                setup.await.map(|r| self.relayed(r)).into();
            // SAFETY: `relay` lies in this future's state, which is pinned, and is not moved
            // again (awaited in place, not by value, so that it is not held twice).
            unsafe { std::pin::Pin::new_unchecked(&mut relay) }.await;
            self.metrics.active().dec();
            drop(held);
        }
    }

    /// Relays an allowed connection to its end, then logs and counts it.
    fn relayed(&self, r: Relaying) -> impl std::future::Future<Output = ()> + '_ {
        let Relaying {
            client,
            upstream,
            rec,
            head_len,
            wid,
        } = r;
        let changes = || self.limits.close_on_tighten.then(|| self.live.subscribe());
        let (dst, host) = (rec.dst, rec.host.clone());
        let still_allowed = move || self.still_allowed(wid, dst, host.as_deref());
        let mut relay = self.relay(client, upstream, changes, still_allowed);
        async move {
            // SAFETY: as in `connection`: pinned in place, never moved again.
            let out = unsafe { std::pin::Pin::new_unchecked(&mut relay) }.await;
            let bytes = (out.bytes.0 + head_len, out.bytes.1);
            let end = if out.revoked {
                REVOKED
            } else if out.idle_timeout {
                "idle timeout"
            } else if out.error.is_some() {
                "error"
            } else {
                "closed"
            };
            self.finish(&rec, bytes, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, time::Duration};

    use super::*;

    fn size<A, B, C, D, E, F: Future>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The task of a relayed connection: about 1.5 KiB in a debug build (1.2 KiB of it the
    /// splice relay: two directions, the idle timer, the policy watch), against 3 KiB before
    /// the arguments and awaited futures were held once (W12 of `cargo xtask bench --proxy`
    /// measures what a connection costs in all).
    #[test]
    fn an_idle_connection_s_task_stays_small() {
        let task = size(Proxy::connection);
        let splice = size(
            |a: TcpStream,
             b: TcpStream,
             i: Duration,
             c: Option<tokio::sync::watch::Receiver<u64>>,
             _: ()| super::super::relay::relay(a, b, i, c, || true),
        );
        eprintln!("connection task future {task} bytes, splice relay {splice}");
        assert!(task <= 1792, "{task} bytes");
        assert!(splice <= 1280, "{splice} bytes");
    }
}
