//! The kernel's state for `/metrics`, read on a thread of its own with its own handles on the
//! pinned maps: never in the async runtime, never under the datapath lock that policy changes
//! take. A scrape is served a snapshot read after it arrived; scrapes arriving together share
//! one read, and the thread reads at most once per [`MIN_INTERVAL`] however many ask.

use std::{
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use super::kernel::{KernelSnapshot, KernelSource};

/// The reading thread reads at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a scrape waits for a fresh read before it is served the last one.
const WAIT: Duration = Duration::from_secs(2);

pub struct Snapshots {
    latest: Arc<Mutex<(Instant, Arc<KernelSnapshot>)>>,
    ask: mpsc::SyncSender<()>,
    reads: tokio::sync::watch::Receiver<u64>,
}

impl Snapshots {
    /// Starts the reading thread: `read` is called on it whenever a scrape finds the last
    /// snapshot (`first` to begin with) read before the scrape arrived. The thread ends with
    /// `Self`.
    pub fn spawn(
        first: KernelSnapshot,
        mut read: impl FnMut() -> KernelSnapshot + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let latest = Arc::new(Mutex::new((Instant::now(), Arc::new(first))));
        let (ask, asked) = mpsc::sync_channel::<()>(1);
        let (done, reads) = tokio::sync::watch::channel(0u64);
        let shared = latest.clone();
        std::thread::Builder::new()
            .name("metrics-reader".into())
            .spawn(move || {
                let mut last = Instant::now();
                let mut n = 0;
                while asked.recv().is_ok() {
                    if let Some(wait) = MIN_INTERVAL.checked_sub(last.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let started = Instant::now();
                    let s = Arc::new(read());
                    last = started;
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = (started, s);
                    n += 1;
                    done.send_replace(n);
                }
            })?;
        Ok(Arc::new(Self { latest, ask, reads }))
    }

    /// Makes sure the snapshot was read after this call began, waiting for the reading thread
    /// (at most 2 s; then the last one is served).
    pub async fn fresh(&self) {
        let asked = Instant::now();
        let mut reads = self.reads.clone();
        while self.latest().0 < asked {
            reads.borrow_and_update();
            // Full: a read is already asked for; the next one is asked for after it.
            let _ = self.ask.try_send(());
            let left = WAIT.saturating_sub(asked.elapsed());
            if left.is_zero() || tokio::time::timeout(left, reads.changed()).await.is_err() {
                return;
            }
        }
    }

    /// How many reads the thread has made: a snapshot's number.
    pub fn reads(&self) -> u64 {
        *self.reads.borrow()
    }

    fn latest(&self) -> (Instant, Arc<KernelSnapshot>) {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl KernelSource for Snapshots {
    fn snapshot(&self) -> KernelSnapshot {
        (*self.latest().1).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn snapshot(generation: u64) -> KernelSnapshot {
        let cfg =
            crate::policy::parse("kind: MeshConfig\nmetadata: {name: egress}\n", "t").unwrap();
        KernelSnapshot {
            policy: Arc::new(crate::policy::compile(&cfg).unwrap()),
            pods: Vec::new(),
            sums: Default::default(),
            tc: Default::default(),
            sockets: Default::default(),
            packet_drops: Default::default(),
            entries: Vec::new(),
            generation,
            unenrolled: None,
        }
    }

    /// Many scrapers at once share a read made after they asked; one after them gets another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapers_share_reads() {
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        let s = Snapshots::spawn(snapshot(0), move || {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(50));
            snapshot(n)
        })
        .unwrap();
        let scrapes: Vec<_> = (0..50)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.fresh().await;
                    s.snapshot().generation
                })
            })
            .collect();
        for t in scrapes {
            assert!(
                t.await.unwrap() >= 1,
                "a scrape was served the old snapshot"
            );
        }
        let n = reads.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "{n} reads for 50 scrapes at once");
        s.fresh().await;
        assert_eq!(reads.load(Ordering::SeqCst), n + 1);
        assert_eq!(s.snapshot().generation, n + 1);
    }
}
