//! The proxy's own threads, one per acceptor ([`ACCEPTORS`]; `EGRESS_PROXY_THREADS=N` sets
//! another number): each runs a single-threaded tokio runtime that accepts on the listeners
//! given to it and relays every connection it accepted from start to end. A connection's
//! readiness events, timers and wake-ups stay on one thread: no work stealing, no worker woken
//! to look for work it will not find (a futex or eventfd write and a context switch each time
//! on the agent's multi-threaded runtime). The kernel spreads new connections over the
//! listeners (SO_REUSEPORT, one socket per acceptor). Started on first use; they live as long
//! as the agent.

use std::{future::Future, sync::OnceLock};

use tokio::{net::TcpListener, runtime::Handle};
use tracing::warn;

use crate::datapath::listen::ACCEPTORS;

/// Runs `accept_loop` for each listener on a proxy thread, in turn, until dropped.
pub async fn serve<F, Fut>(listeners: Vec<TcpListener>, accept_loop: F)
where
    F: Fn(std::net::TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let threads = handles();
    let mut tasks = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        // Registered again by the runtime that serves it.
        let l = match l.into_std() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot hand a proxy listener to its thread; not serving it");
                continue;
            }
        };
        let work = accept_loop(l);
        tasks.push(match threads.get(i % threads.len().max(1)) {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        });
    }
    let _abort = AbortOnDrop(tasks.iter().map(|h| h.abort_handle()).collect());
    for t in tasks {
        let _ = t.await;
    }
}

static THREADS: OnceLock<Vec<Handle>> = OnceLock::new();

/// The proxy threads' runtimes (empty if none could start: the caller's runtime serves).
pub fn handles() -> &'static [Handle] {
    THREADS.get_or_init(|| (0..count()).filter_map(start).collect())
}

/// How many proxy threads: `EGRESS_PROXY_THREADS` (1 to 64), else one per acceptor.
fn count() -> usize {
    std::env::var("EGRESS_PROXY_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(ACCEPTORS)
}

fn start(i: usize) -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("egress-proxy-{i}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            // A tick every second keeps the timer wheel's next wake-up near. A connection's own
            // timers (connect timeout, sniff deadline, idle check) all lie further ahead, so
            // registering one never has to interrupt the thread's epoll_wait to bring its
            // wake-up forward (an eventfd write per connection otherwise). Costs one wake-up
            // a second per thread when idle.
            rt.block_on(async {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                }
            });
        });
    let started = match spawned {
        Ok(_) => rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread ended"))),
        Err(e) => Err(e),
    };
    match started {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %e, thread = i, "cannot start a proxy thread; the agent's runtime serves its listeners");
            None
        }
    }
}

/// Aborts the tasks when dropped (the proxy's listeners in a pod that went away).
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
