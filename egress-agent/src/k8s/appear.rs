//! Wakes the reconcile loop the moment the kubelet makes a cgroup below the kubepods root
//! (inotify on the root and its QoS-class level), so that a new pod is enrolled within
//! milliseconds of its cgroup's creation: before its sandbox's network is set up, hence
//! before its containers run. The 0.25 s retry of the reconcile loop remains the fallback.

use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc;

/// Starts the watching thread; a message on the returned channel means "a cgroup appeared".
/// The thread ends at the first event after the receiver is dropped.
pub fn watch(root: &Path) -> std::io::Result<mpsc::Receiver<()>> {
    let fd = Inotify::init(InitFlags::IN_CLOEXEC)?;
    let mask = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR;
    let mut levels = vec![fd.add_watch(root, mask)?];
    // The QoS levels (kubepods-burstable.slice, burstable, ...) that exist already.
    for e in std::fs::read_dir(root)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Ok(wd) = fd.add_watch(&e.path(), mask) {
                levels.push(wd);
            }
        }
    }
    let root = root.to_path_buf();
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || loop {
            let Ok(events) = fd.read_events() else {
                return;
            };
            for ev in events {
                // A new directory right below the root may be a QoS level made late.
                if ev.wd == levels[0] {
                    if let Some(name) = &ev.name {
                        let _ = fd.add_watch(&root.join(name), mask);
                    }
                }
            }
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                return;
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    async fn next(rx: &mut tokio::sync::mpsc::Receiver<()>) {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no wake-up")
            .expect("thread ended");
    }

    #[tokio::test]
    async fn a_new_pod_directory_wakes_the_loop_also_below_a_late_qos_level() {
        // inotify works the same on any filesystem; cgroupfs reports mkdir like this one.
        let root = std::env::temp_dir().join(format!("egress-appear-{}", std::process::id()));
        std::fs::create_dir_all(root.join("burstable")).unwrap();
        let mut rx = super::watch(&root).unwrap();
        std::fs::create_dir(root.join("burstable/pod1")).unwrap();
        next(&mut rx).await;
        std::fs::create_dir(root.join("besteffort")).unwrap();
        next(&mut rx).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::create_dir(root.join("besteffort/pod2")).unwrap();
        next(&mut rx).await;
        std::fs::remove_dir_all(&root).unwrap();
    }
}
