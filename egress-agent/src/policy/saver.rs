//! The state file, written off the request path: every change hands [`Saver`] a snapshot of
//! the live store (cheap: its documents are shared) and one thread writes the newest one
//! (temporary file, fsync, rename), skipping snapshots a later change already replaced. A
//! change that must be on disk before it answers waits for its ticket ([`Saver::wait`]);
//! `egress enable|disable` does not (the kernel's word is the truth a restart resumes from).

use std::{
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
};

use tracing::warn;

use super::store::Store;

#[derive(Default)]
struct Queue {
    /// The newest snapshot not written yet, with its ticket.
    pending: Option<(u64, Store)>,
    /// The last ticket handed out, and the last one written (or failed to be).
    submitted: u64,
    written: u64,
    stop: bool,
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// Writes snapshots of the store to the state file, in order, on a thread of its own.
pub struct Saver {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    pub fn start(path: PathBuf) -> Saver {
        let shared: Shared = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("state-file".into())
            .spawn(move || write_loop(&s, &path))
            .expect("cannot start the state file's writer thread");
        Saver {
            shared,
            thread: Some(thread),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `store` to be written (replacing an older snapshot not written yet); its ticket.
    pub fn submit(&self, store: Store) -> u64 {
        let mut q = self.queue();
        q.submitted += 1;
        let ticket = q.submitted;
        q.pending = Some((ticket, store));
        self.shared.1.notify_all();
        ticket
    }

    /// Waits until the snapshot of `ticket`, or a later one, is written (or failed, logged).
    pub fn wait(&self, ticket: u64) {
        let mut q = self.queue();
        while q.written < ticket {
            q = self.shared.1.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every snapshot submitted so far is written.
    pub fn flush(&self) {
        let ticket = self.queue().submitted;
        self.wait(ticket);
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.queue().stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(shared: &Shared, path: &std::path::Path) {
    let (lock, cv) = &**shared;
    loop {
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        while q.pending.is_none() && !q.stop {
            q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let Some((ticket, store)) = q.pending.take() else {
            return; // stopping, nothing left to write
        };
        drop(q);
        if let Err(e) = store.save(path) {
            warn!(path = %path.display(), error = %e, "cannot save the live policy; a restart would fall back to the policy file");
        }
        drop(store);
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        q.written = ticket;
        cv.notify_all();
        drop(q);
        // A change's parse, compile and YAML text are freed by now: give it back.
        crate::telemetry::trim::trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_newest_snapshot_and_waits_for_it() {
        let dir = std::env::temp_dir().join(format!("egress-saver-{}", std::process::id()));
        let path = dir.join("state.yaml");
        let saver = Saver::start(path.clone());
        let (mut s, _) = Store::parse("kind: Workload\nmetadata: {name: web}\n", "t").unwrap();
        for i in 0..20 {
            s.set_enable_egress(i % 2 == 0);
            saver.submit(s.clone());
        }
        saver.flush();
        let (back, cfg) = Store::load(&path).unwrap();
        assert_eq!(back, s);
        assert!(!cfg.mesh.traffic.enable_egress);
        // Dropping writes what is still queued.
        s.set_enable_egress(true);
        saver.submit(s.clone());
        drop(saver);
        assert!(Store::load(&path).unwrap().1.mesh.traffic.enable_egress);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
