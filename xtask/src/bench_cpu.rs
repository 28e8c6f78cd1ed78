//! `cargo xtask bench`: the CPU the machine spent outside the bench's own process tree, for
//! the *busy* flag of each point ([`crate::bench_work::close_sample`]).

use std::{fs, time::Instant};

/// The machine's CPU time and the bench's own share of it, at one instant (clock ticks).
#[derive(Clone, Debug)]
pub struct CpuSnap {
    at: Instant,
    /// user + nice + system of every CPU (/proc/stat; irq and softirq time left out, as the
    /// processes' own figures leave it out).
    total: u64,
    /// utime + stime of the bench's process tree (this process and its descendants, with the
    /// children they reaped: cutime + cstime) and of kernel threads (softirq work the bench's
    /// traffic defers to ksoftirqd lands there).
    own: u64,
}

impl CpuSnap {
    pub fn now() -> Option<CpuSnap> {
        let at = Instant::now();
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(3)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total = cpu.iter().sum();
        // (pid, ppid, own ticks, reaped children's ticks) of every process.
        let mut procs = Vec::new();
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(st) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            if let Some(p) = parse_stat_times(&st) {
                procs.push((pid, p.0, p.1, p.2));
            }
        }
        let mut tree = vec![std::process::id(), 2];
        let mut own = 0;
        // Descendants: repeat until no process joins (parents before children is not given).
        let mut counted = vec![false; procs.len()];
        loop {
            let mut grew = false;
            for (i, &(pid, ppid, t, c)) in procs.iter().enumerate() {
                if !counted[i] && (tree.contains(&pid) || tree.contains(&ppid)) {
                    counted[i] = true;
                    grew = true;
                    tree.push(pid);
                    own += t + c;
                }
            }
            if !grew {
                break;
            }
        }
        Some(CpuSnap { at, total, own })
    }

    /// Cores that processes outside the bench's tree kept busy from `earlier` to this one.
    pub fn others_since(&self, earlier: &CpuSnap) -> Option<f64> {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        if secs < 0.05 {
            return None;
        }
        let total = self.total.saturating_sub(earlier.total) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        Some(((total - own) / clk_tck() / secs).max(0.0))
    }
}

/// (ppid, utime + stime, cutime + cstime) from /proc/PID/stat.
fn parse_stat_times(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field N is f[N - 3].
    let n = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some((f.get(1)?.parse().ok()?, n(11)? + n(12)?, n(13)? + n(14)?))
}

pub fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        crate::bench_env::run_quiet(&["getconf", "CLK_TCK"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_times() {
        // pid (comm with) spaces) state ppid ... utime(14) stime(15) cutime(16) cstime(17)
        let st = "42 (a b) c) S 7 42 42 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 1 0 5 0 0";
        assert_eq!(super::parse_stat_times(st), Some((7, 33, 77)));
    }

    #[test]
    fn the_bench_is_not_the_others() {
        let a = super::CpuSnap::now().unwrap();
        // Burn 200 ms of this process's CPU: not counted as other processes' load.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 200 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = super::CpuSnap::now().unwrap();
        let others = b.others_since(&a).unwrap();
        assert!(others >= 0.0 && x > 0, "{others}");
    }
}
