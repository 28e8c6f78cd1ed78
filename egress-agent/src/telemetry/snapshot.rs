//! The kernel's state for `/metrics`, read on a thread of its own with its own handles on the
//! pinned maps: never in the async runtime, never under the datapath lock that policy changes
//! take, and at most once per [`MIN_INTERVAL`] however many scrapers ask (the others are served
//! the last snapshot).

use std::{
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use super::kernel::{KernelSnapshot, KernelSource};

/// A snapshot younger than this is served as it is; an older one is read again first.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// The reading thread reads at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// How long a scrape waits for a fresh read before it is served the last one.
const WAIT: Duration = Duration::from_secs(2);

pub struct Snapshots {
    latest: Arc<Mutex<(Instant, Arc<KernelSnapshot>)>>,
    ask: mpsc::SyncSender<()>,
    reads: tokio::sync::watch::Receiver<u64>,
}

impl Snapshots {
    /// Starts the reading thread: `read` is called on it whenever a scrape finds the last
    /// snapshot (`first` to begin with) older than [`MAX_AGE`]. The thread ends with `Self`.
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
                    let s = Arc::new(read());
                    last = Instant::now();
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = (last, s);
                    n += 1;
                    done.send_replace(n);
                }
            })?;
        Ok(Arc::new(Self { latest, ask, reads }))
    }

    /// Makes sure the snapshot is at most [`MAX_AGE`] old, waiting for the reading thread if
    /// needed (at most 2 s; then the last one is served).
    pub async fn fresh(&self) {
        if self.latest().0.elapsed() < MAX_AGE {
            return;
        }
        let mut reads = self.reads.clone();
        reads.borrow_and_update();
        // Full: a read is already asked for, and this scrape waits for it too.
        let _ = self.ask.try_send(());
        let _ = tokio::time::timeout(WAIT, reads.changed()).await;
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

    /// Many scrapers at once cause one read, and a stale snapshot is read again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapers_share_one_read() {
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        let s = Snapshots::spawn(snapshot(0), move || {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(50));
            snapshot(n)
        })
        .unwrap();
        s.fresh().await;
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "the first snapshot is fresh"
        );
        tokio::time::sleep(MAX_AGE).await;
        let scrapes: Vec<_> = (0..50)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.fresh().await })
            })
            .collect();
        for t in scrapes {
            t.await.unwrap();
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(s.snapshot().generation, 1);
    }
}
