//! The oldest kernel the programs load on, checked before anything is installed so that an old
//! node fails with one clear line instead of a verifier log.
//!
//! Linux 5.15 is the first release where every helper and hook the programs use is there:
//! `bpf_get_netns_cookie` from the connect hooks (the in-pod proxy keys redirected connections
//! by network namespace), taking a map entry in one call (5.14, the proxy's accept), the `getpeername4/6` hooks and the BPF ring buffer (5.8), cgroup bpf
//! links (5.7). tc programs attach through tcx on 6.6 and later, through a clsact qdisc before.

use std::fmt;

/// (major, minor) of the oldest supported kernel.
pub const MINIMUM: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error)]
pub struct TooOld {
    pub release: String,
}

impl fmt::Display for TooOld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this kernel is Linux {}; egress needs Linux {}.{} or later (bpf_get_netns_cookie in cgroup programs, lookup-and-delete of hash map entries)",
            self.release, MINIMUM.0, MINIMUM.1
        )
    }
}

/// `major.minor` of a release string such as `6.18.0-1-amd64` or `5.15.0-91-generic`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails on a kernel older than [`MINIMUM`]. An unreadable or unparsable release passes: the
/// program load reports the real problem then.
pub fn check() -> Result<(), TooOld> {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return Ok(());
    };
    match parse_release(&release) {
        Some(v) if v < MINIMUM => Err(TooOld {
            release: release.trim().to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("5.4.0").unwrap() < MINIMUM);
        assert!(parse_release("5.15.1").unwrap() >= MINIMUM);
        assert!(parse_release("6.1.0").unwrap() >= MINIMUM);
    }

    #[test]
    fn this_kernel_is_supported() {
        check().unwrap();
    }
}
