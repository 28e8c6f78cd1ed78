//! The proxy's own threads ([`ACCEPTORS`]; `EGRESS_PROXY_THREADS=N` sets another number):
//! each runs a single-threaded tokio runtime and relays every connection it accepted from
//! start to end. A connection's readiness events, timers and wake-ups stay on one thread: no
//! work stealing, no worker woken to look for work it will not find (a futex or eventfd
//! write and a context switch each time on the agent's multi-threaded runtime). Every thread
//! has a copy of every listener, but only the one [`spill`] names accepts (the first with
//! room that is not busy); the others leave the listeners out of their epoll sets until
//! their turn. Each thread has a file descriptor table of its own ([`fd_table`]), so the
//! connections it holds count against a limit of their own. Started on first use; they live
//! as long as the agent.

use std::{
    future::Future,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Condvar, Mutex, OnceLock},
};

use tokio::{net::TcpListener, runtime::Handle};
use tracing::warn;

use super::{fd_table, spill};
use crate::datapath::listen::ACCEPTORS;

/// Runs `accept_loop` for each listener on every proxy thread, each with its thread's
/// [`spill::Turn`] (or once, with none, on the caller's runtime if no thread runs), until
/// dropped.
pub async fn serve<F, Fut>(listeners: Vec<TcpListener>, accept_loop: F)
where
    F: Fn(std::net::TcpListener, Option<spill::Turn>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let threads = handles();
    let mut tasks = Vec::new();
    for l in listeners {
        // Registered again by the runtime that serves it, from its thread's own table.
        let fd = match l.into_std() {
            Ok(l) => OwnedFd::from(l),
            Err(e) => {
                warn!(error = %e, "cannot hand a proxy listener to its threads; not serving it");
                continue;
            }
        };
        if threads.is_empty() {
            tasks.push(tokio::spawn(accept_loop(fd.into(), None)));
            continue;
        }
        for (i, rt) in threads {
            let (taken, copied) = tokio::sync::oneshot::channel();
            let raw = fd.as_raw_fd();
            let accept_loop = accept_loop.clone();
            let turn = spill::get(count()).turn(*i);
            let work = async move {
                let copy = fd_table::adopt(raw);
                let _ = taken.send(());
                match copy {
                    Ok(l) => accept_loop(std::net::TcpListener::from(l), Some(turn)).await,
                    Err(e) => {
                        warn!(error = %e, "cannot take a proxy listener into its thread; not serving it")
                    }
                }
            };
            tasks.push(rt.spawn(work));
            let _ = copied.await;
        }
        // Every thread has its copy: close this table's (on this thread, which shares the
        // process's table).
        drop(fd);
    }
    let _abort = AbortOnDrop(tasks.iter().map(|h| h.abort_handle()).collect());
    for t in tasks {
        let _ = t.await;
    }
}

static THREADS: OnceLock<Vec<(usize, Handle)>> = OnceLock::new();

/// The proxy threads' runtimes, by thread number (empty if none could start: the caller's
/// runtime serves).
pub fn handles() -> &'static [(usize, Handle)] {
    THREADS.get_or_init(start_all)
}

/// How many proxy threads: `EGRESS_PROXY_THREADS` (1 to 64), else one per acceptor.
pub fn count() -> usize {
    std::env::var("EGRESS_PROXY_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(ACCEPTORS)
}

/// Starts the threads. Every runtime is built in the process's table before any thread
/// leaves it, so that each table holds every runtime's wake-up descriptor under the same
/// number: a thread wakes a task of another by writing to that runtime's descriptor, in
/// its own table ([`fd_table`]). Each thread runs no task before it has its table.
fn start_all() -> Vec<(usize, Handle)> {
    let before = Arc::new(fd_table::open_fds().unwrap_or_default());
    let built = Arc::new(Gate::default());
    let handles = (0..count())
        .filter_map(|i| Some((i, start(i, before.clone(), built.clone())?)))
        .collect();
    built.open();
    handles
}

/// Closed until every thread's runtime is built.
#[derive(Default)]
struct Gate(Mutex<bool>, Condvar);

impl Gate {
    fn open(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.1.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn start(i: usize, before: Arc<Vec<RawFd>>, built: Arc<Gate>) -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("egress-proxy-{i}"))
        .spawn(move || {
            // No signal is handled here: tokio's handler writes to a descriptor of the
            // process's table, which this thread's own table does not keep.
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_BLOCK,
                Some(&nix::sys::signal::SigSet::all()),
                None,
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let _ = tx.send(rt.as_ref().map(|rt| rt.handle().clone()).map_err(clone_err));
            built.wait();
            let Ok(rt) = rt else { return };
            let own = fd_table::leave_shared(&before);
            if let Err(e) = &own {
                warn!(error = %e, thread = i, "a proxy thread could not set up a file table of its own (it may share the agent's, and its fd limit)");
            }
            spill::get(count()).ready(i, room(own.is_ok()));
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

/// How many connections this thread may hold before the next one takes new connections:
/// [`spill::room`] of what its table has free (a shared table: this thread's share of it).
fn room(own_table: bool) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let open = fd_table::open_fds().map_or(0, |fds| fds.len() as u64);
    let free = soft.saturating_sub(open);
    spill::room(if own_table {
        free
    } else {
        free / count() as u64
    })
}

fn clone_err(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
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
