//! Memory that comes back after peaks. glibc's malloc keeps what the program frees in its
//! arenas (one per thread that allocated, up to 8 per core) and returns little of it to the
//! system on its own, so the agent's RSS used to stay at its highest point (a burst of
//! connections, a 100k-rule apply). Here: at most [`ARENAS`] arenas, and `malloc_trim`
//! (which gives every arena's free pages back) after a peak: when a policy set was retired,
//! and when the proxy's open connections fell below half of their last peak.

use std::time::Duration;

/// glibc arenas the agent allocates from (its two runtime workers, the blocking pool and the
/// control's threads share them; fewer arenas, less memory stranded in them).
pub const ARENAS: i32 = 2;

/// How often the proxy's connection count is looked at.
pub const EVERY: Duration = Duration::from_secs(5);

/// Limits the arenas; call first thing in `main`, before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; no pointer is passed.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Gives the free memory of every arena back to the system; true when some was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0) != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Whether to trim when `now` connections are open and `peak` were at most since the last
/// trim: once they fell below half of a peak of at least 64 (small ups and downs are not
/// worth the walk over the heap).
pub fn after_peak(peak: i64, now: i64) -> bool {
    peak >= 64 && now * 2 < peak
}

/// Trims after every fall of `open()` (the proxy's open connections) below half its peak.
pub async fn after_connection_peaks(open: impl Fn() -> i64) {
    let mut peak = 0;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let now = open();
        peak = peak.max(now);
        if after_peak(peak, now) {
            let freed = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(peak, now, freed, "malloc_trim after a connection peak");
            peak = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_real_peak() {
        assert!(!after_peak(10, 0));
        assert!(!after_peak(100, 60));
        assert!(after_peak(100, 49));
        assert!(after_peak(10_000, 0));
        // Runs (glibc: returns whether memory was released; either is fine here).
        let _ = trim();
    }
}
