//! Which proxy thread accepts new connections: the first one with room that is not busy.
//! The others stay asleep, their copies of the listeners out of their epoll sets, until
//! that thread fills up or gets busy, so a light load costs one thread's wake-ups, not a
//! wake-up on every thread the kernel spread the connections over.
//!
//! - **Room**: a thread is *full* once it holds a quarter of what its file descriptor table
//!   had free when it started ([`fd_table`](super::fd_table): a connection takes two to four
//!   descriptors), and has room again below seven eighths of that. The next thread takes
//!   over the same listening sockets, so the connections already waiting in their accept
//!   queues are accepted by it: nothing is lost to a thread that stopped accepting.
//! - **Busy**: a thread that spent 90 % of the last 100 ms or more on the CPU is *busy*
//!   (sampled when it accepts; re-checked every 100 ms while busy), and not busy again below
//!   60 %. Connections it holds stay with it; only new ones go elsewhere.
//! - When every thread with room is busy, they all accept; when none has room, all accept
//!   (each refuses what it cannot hold, as with one thread).
//!
//! Per-thread connections held and accepted, and which threads accept, are metrics
//! (`egress_proxy_thread_connections`, `egress_proxy_thread_accepted_total`,
//! `egress_proxy_thread_accepting`).

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        OnceLock,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use tokio::sync::watch;

/// A thread's state, as [`acceptors`] sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// The thread runs (and measured its table).
    pub present: bool,
    pub full: bool,
    pub busy: bool,
}

/// The threads that accept, as a bit mask (thread `i` is bit `i`): the first present thread
/// with room that is not busy; if every one with room is busy, all with room; if none has
/// room, every present thread.
pub fn acceptors(states: &[State]) -> u64 {
    let mask = |keep: &dyn Fn(&State) -> bool| {
        states
            .iter()
            .enumerate()
            .filter(|(_, s)| s.present && keep(s))
            .fold(0u64, |m, (i, _)| m | 1 << i)
    };
    let free = mask(&|s| !s.full && !s.busy);
    if free != 0 {
        return free & free.wrapping_neg();
    }
    let room = mask(&|s| !s.full);
    if room != 0 {
        return room;
    }
    mask(&|_| true)
}

/// A thread with `free` descriptors when it started is full at this many connections.
pub fn room(free: u64) -> usize {
    usize::try_from(free / 4).unwrap_or(usize::MAX).max(1)
}

/// Has room again at or below this many connections.
fn low(high: usize) -> usize {
    high - high / 8
}

const WINDOW: Duration = Duration::from_millis(100);
const BUSY: f64 = 0.90;
const CALM: f64 = 0.60;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    pub thread: String,
}

struct Slot {
    /// Connections the thread holds (also the metric).
    live: Gauge,
    accepted: Counter,
    accepting: Gauge,
    high: AtomicUsize,
    present: AtomicBool,
    full: AtomicBool,
    busy: AtomicBool,
}

/// The proxy threads' shared view (one per process).
pub struct Spill {
    slots: Vec<Slot>,
    turn: watch::Sender<u64>,
    pub connections: Family<ThreadLabels, Gauge>,
    pub accepted: Family<ThreadLabels, Counter>,
    pub accepting: Family<ThreadLabels, Gauge>,
}

/// The process's [`Spill`], for `n` threads (fixed by the first call).
pub fn get(n: usize) -> &'static Spill {
    SPILL.get_or_init(|| {
        let connections = Family::<ThreadLabels, Gauge>::default();
        let accepted = Family::<ThreadLabels, Counter>::default();
        let accepting = Family::<ThreadLabels, Gauge>::default();
        let slots = (0..n.clamp(1, 64))
            .map(|i| {
                let l = ThreadLabels {
                    thread: i.to_string(),
                };
                Slot {
                    live: connections.get_or_create(&l).clone(),
                    accepted: accepted.get_or_create(&l).clone(),
                    accepting: accepting.get_or_create(&l).clone(),
                    high: AtomicUsize::new(usize::MAX),
                    present: AtomicBool::new(false),
                    full: AtomicBool::new(false),
                    busy: AtomicBool::new(false),
                }
            })
            .collect();
        Spill {
            slots,
            turn: watch::Sender::new(0),
            connections,
            accepted,
            accepting,
        }
    })
}

impl Spill {
    /// Thread `i` runs and may hold `high` connections ([`room`]).
    pub fn ready(&'static self, i: usize, high: usize) {
        if let Some(s) = self.slots.get(i) {
            s.high.store(high.max(1), Relaxed);
            s.present.store(true, Relaxed);
            self.publish();
        }
    }

    /// Thread `i`'s turn to accept, and its accounting.
    pub fn turn(&'static self, i: usize) -> Turn {
        Turn {
            who: Who {
                spill: self,
                thread: i.min(self.slots.len() - 1),
            },
            rx: self.turn.subscribe(),
        }
    }

    fn publish(&self) {
        self.turn.send_if_modified(|mask| {
            let states: Vec<State> = self
                .slots
                .iter()
                .map(|s| State {
                    present: s.present.load(Relaxed),
                    full: s.full.load(Relaxed),
                    busy: s.busy.load(Relaxed),
                })
                .collect();
            let new = acceptors(&states);
            for (i, s) in self.slots.iter().enumerate() {
                s.accepting.set(i64::from(new & 1 << i != 0));
            }
            let changed = *mask != new;
            *mask = new;
            changed
        });
    }
}

/// One thread's side of [`Spill`].
pub struct Turn {
    who: Who,
    rx: watch::Receiver<u64>,
}

/// A thread, for counting its connections.
#[derive(Clone, Copy)]
pub struct Who {
    spill: &'static Spill,
    thread: usize,
}

impl Turn {
    /// Until this thread accepts.
    pub async fn mine(&mut self) {
        let bit = 1 << self.who.thread;
        let _ = self.rx.wait_for(|m| m & bit != 0).await.map(drop);
    }

    /// A future that ends when this thread no longer accepts, and the thread.
    pub fn split(&mut self) -> (impl std::future::Future<Output = ()> + '_, Who) {
        let bit = 1 << self.who.thread;
        let rx = &mut self.rx;
        (
            async move {
                let _ = rx.wait_for(|m| m & bit == 0).await.map(drop);
            },
            self.who,
        )
    }
}

impl Who {
    /// Counts a connection this thread accepted, as long as the returned value lives.
    pub fn hold(self) -> Held {
        let s = &self.spill.slots[self.thread];
        s.accepted.inc();
        let n = usize::try_from(s.live.inc() + 1).unwrap_or(0);
        if n >= s.high.load(Relaxed) && !s.full.swap(true, Relaxed) {
            self.spill.publish();
        }
        self.sample();
        Held {
            thread: self.thread as u8,
        }
    }

    /// Busy? Sampled at most once a window, on the thread itself.
    fn sample(self) {
        let Some(util) = utilization() else {
            return;
        };
        let s = &self.spill.slots[self.thread];
        if util >= BUSY && !s.busy.swap(true, Relaxed) {
            self.spill.publish();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(WINDOW).await;
                    if utilization().is_some_and(|u| u < CALM) {
                        self.spill.slots[self.thread].busy.store(false, Relaxed);
                        self.spill.publish();
                        return;
                    }
                }
            });
        }
    }
}

thread_local! {
    /// When this thread last sampled its CPU time, and the time then.
    static SAMPLED: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// The share of wall time the calling thread spent on the CPU since its last sample, if a
/// window or more passed.
fn utilization() -> Option<f64> {
    let now = Instant::now();
    let last = SAMPLED.get();
    if let Some((t, _)) = last {
        if now - t < WINDOW {
            return None;
        }
    }
    let cpu = thread_cpu()?;
    SAMPLED.set(Some((now, cpu)));
    let (t, c) = last?;
    let wall = (now - t).as_secs_f64();
    (wall > 0.0).then(|| cpu.saturating_sub(c).as_secs_f64() / wall)
}

fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec the call fills.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// A connection counted against its thread ([`Turn::hold`]).
pub struct Held {
    thread: u8,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(spill) = SPILL.get() else { return };
        let s = &spill.slots[usize::from(self.thread)];
        let n = usize::try_from(s.live.dec() - 1).unwrap_or(0);
        if s.full.load(Relaxed) && n <= low(s.high.load(Relaxed)) && s.full.swap(false, Relaxed) {
            spill.publish();
        }
    }
}

static SPILL: OnceLock<Spill> = OnceLock::new();

#[cfg(test)]
mod tests {
    use super::*;

    fn st(full: bool, busy: bool) -> State {
        State {
            present: true,
            full,
            busy,
        }
    }

    #[test]
    fn the_first_thread_with_room_and_time_accepts_alone() {
        assert_eq!(acceptors(&[st(false, false), st(false, false)]), 0b01);
        assert_eq!(acceptors(&[st(true, false), st(false, false)]), 0b10);
        assert_eq!(acceptors(&[st(false, true), st(false, false)]), 0b10);
        assert_eq!(
            acceptors(&[st(true, false), st(false, true), st(false, false)]),
            0b100
        );
    }

    #[test]
    fn busy_threads_with_room_share_and_full_ones_all_accept_as_a_last_resort() {
        assert_eq!(acceptors(&[st(false, true), st(false, true)]), 0b11);
        assert_eq!(acceptors(&[st(true, false), st(false, true)]), 0b10);
        assert_eq!(acceptors(&[st(true, false), st(true, true)]), 0b11);
    }

    #[test]
    fn a_thread_that_is_not_running_never_accepts() {
        let gone = State::default();
        assert_eq!(acceptors(&[gone, st(false, false)]), 0b10);
        assert_eq!(acceptors(&[gone, st(true, false)]), 0b10);
        assert_eq!(acceptors(&[gone, gone]), 0);
    }

    #[test]
    fn a_thread_that_sleeps_is_not_busy_and_one_that_spins_uses_the_cpu() {
        std::thread::spawn(|| {
            assert_eq!(utilization(), None, "no sample to compare with yet");
            assert_eq!(utilization(), None, "less than a window since");
            std::thread::sleep(WINDOW + WINDOW / 5);
            let slept = utilization().unwrap();
            assert!(slept < 0.2, "{slept}");
            let start = Instant::now();
            while start.elapsed() < WINDOW + WINDOW / 5 {
                std::hint::black_box(0u64.wrapping_add(1));
            }
            // Even sharing two cores with other tests, a spinning thread gets more than this.
            let spun = utilization().unwrap();
            assert!(spun > 0.2, "{spun}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn room_is_a_quarter_of_the_free_table_and_returns_below_seven_eighths() {
        assert_eq!(room(18_900), 4725);
        assert_eq!(room(2), 1);
        assert_eq!(low(4725), 4135);
        assert_eq!(low(1), 1);
    }
}
