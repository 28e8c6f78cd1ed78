//! A file descriptor table of each proxy thread's own. Every relayed connection holds two
//! sockets, and `RLIMIT_NOFILE` bounds each fd *table*, not the process: with one table for
//! the whole agent, a hard limit of 20,000 (a container without `CAP_SYS_RESOURCE`) serves
//! fewer than 10,000 connections at once, and the rest fail at accept (`EMFILE`). So each
//! proxy thread leaves the process's table (`unshare(CLONE_FILES)`) before it starts: the
//! connections it accepts count against its own limit, as in a server with one process per
//! worker.
//!
//! The thread's table starts as a copy of the process's. It keeps the BPF maps (the proxy
//! uses them by the numbers the agent loaded them under) and every tokio runtime's epoll and
//! wake-up descriptors (a thread wakes another runtime's task by writing to that runtime's
//! descriptor, by number; so all proxy runtimes are built before any thread leaves the
//! shared table). Every other copy (sockets, program and link fds, whose copies would keep a
//! socket open or a program attached after the agent closed its own) is replaced by
//! `/dev/null`, so a number the process's table still uses can never name another file in
//! the thread's; a guard of numbers below 1024 does the same for numbers the process's
//! table will use later. A listener created later in the process's table reaches the thread
//! by [`adopt`] (`pidfd_getfd`). Where the kernel refuses any step the thread keeps the
//! shared table.

use std::{
    cell::{Cell, RefCell},
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

thread_local! {
    /// This thread's pidfd of the agent's main thread, whose table is the process's, when this
    /// thread has a table of its own.
    static LEADER: Cell<Option<RawFd>> = const { Cell::new(None) };
    /// Whether this thread left the process's table (even if a later step failed).
    static OWN: Cell<bool> = const { Cell::new(false) };
}

/// Gives the calling thread a table of its own (see the module doc). `before`: the
/// descriptors open before the proxy threads built their runtimes (a runtime's signal
/// socket, opened since, is kept). On an error the thread may still share the process's
/// table.
pub fn leave_shared(before: &[RawFd]) -> io::Result<()> {
    // Check that the kernel (and any seccomp filter) allows taking a file from the process's
    // table before leaving it: without that, no listener could reach this thread.
    drop(getfd(&pidfd_open()?, 2)?);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES)?;
    // From here on, this thread's table is a copy.
    OWN.set(true);
    let leader = std::os::fd::IntoRawFd::into_raw_fd(pidfd_open()?);
    LEADER.set(Some(leader));
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    let replace = |fd: RawFd| {
        // A number at or above the limit (inherited from whoever started the agent) cannot be
        // a dup target, and is never given to this thread either: closing the copy will do.
        // SAFETY: closes or dups onto a number of this thread's own table; a copy it replaces
        // is closed atomically and nothing in this thread uses it.
        let r = if u64::try_from(fd).is_ok_and(|n| n >= limit) {
            unsafe { libc::close(fd) }
        } else {
            unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("replacing descriptor {fd}: {e}"),
            ));
        }
        Ok(())
    };
    let open = open_fds()?;
    for &fd in &open {
        if fd > 2 && fd != null.as_raw_fd() && fd != leader && !kept(fd, before) {
            replace(fd)?;
        }
    }
    // A guard: the numbers below GUARD that were free are taken too, so this thread's own
    // sockets get numbers above every one the process's table had in use so far and its
    // first few hundred after: a number of the process's table used here by mistake names
    // /dev/null or a shared wake-up descriptor, never one of this thread's connections.
    let guard = GUARD.min(limit / 8) as RawFd;
    for fd in 3..guard {
        if !open.contains(&fd) && fd != null.as_raw_fd() {
            replace(fd)?;
        }
    }
    // Stays open: its number is below the guard too.
    let _ = std::os::fd::IntoRawFd::into_raw_fd(null);
    Ok(())
}

/// See [`leave_shared`].
const GUARD: u64 = 1024;

/// A copy, in the calling thread's table, of `fd` of the process's table. The caller closes
/// its own copy (on a thread that shares the process's table) once this returned.
pub fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    match LEADER.get() {
        // SAFETY: the pidfd lives as long as the thread (never closed).
        Some(leader) => getfd(unsafe { &std::os::fd::BorrowedFd::borrow_raw(leader) }, fd),
        // Left the process's table but could not open the way back: `fd` means nothing here.
        None if OWN.get() => Err(io::Error::other(
            "this thread's own fd table cannot reach the process's",
        )),
        None => {
            let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new descriptor, ours alone.
            Ok(unsafe { OwnedFd::from_raw_fd(r) })
        }
    }
}

/// A pidfd of this process (its main thread: the thread group's leader).
fn pidfd_open() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `fd` of the table of `pidfd`'s process's leader, copied into the calling thread's table.
fn getfd(pidfd: &impl AsRawFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is a new descriptor (close-on-exec) or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

thread_local! {
    /// A descriptor this thread keeps free for the moment its table is full.
    static RESERVE: RefCell<Option<fs::File>> = const { RefCell::new(None) };
}

/// Keeps one descriptor of the calling thread's table in reserve (if it is not already).
pub fn reserve() {
    RESERVE.with_borrow_mut(|r| {
        if r.is_none() {
            *r = fs::File::open("/dev/null").ok();
        }
    });
}

/// Runs `f` with the reserve given back to the table (so that `f` can take one descriptor,
/// and must close it), then takes it again. None: there was no reserve, and none could be
/// taken now.
pub fn with_reserve<T>(f: impl FnOnce() -> T) -> Option<T> {
    reserve();
    drop(RESERVE.with_borrow_mut(Option::take)?);
    let out = f();
    reserve();
    Some(out)
}

/// The descriptors open in the calling thread's table.
pub fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut out: Vec<RawFd> = fs::read_dir("/proc/thread-self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // Not the directory's own descriptor, closed by now (the next one opened reuses it).
    out.retain(|fd| !link(*fd).is_empty());
    out.sort_unstable();
    Ok(out)
}

fn link(fd: RawFd) -> String {
    fs::read_link(format!("/proc/thread-self/fd/{fd}"))
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What a thread with its own table keeps of the process's: the BPF maps (used by number),
/// every runtime's epoll and wake-up (event) descriptors (a task of one runtime is woken from
/// another thread by a write to its runtime's descriptor, by number), and the unnamed
/// sockets (a socket pair's end: tokio's signal driver) opened since `before`.
fn kept(fd: RawFd, before: &[RawFd]) -> bool {
    let l = link(fd);
    match l.as_str() {
        "anon_inode:bpf-map" | "anon_inode:[eventpoll]" | "anon_inode:[eventfd]" => true,
        s if s.starts_with("socket:") => !before.contains(&fd) && unnamed_unix(fd),
        _ => false,
    }
}

fn unnamed_unix(fd: RawFd) -> bool {
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&addr) as libc::socklen_t;
    let r = unsafe { libc::getsockname(fd, std::ptr::from_mut(&mut addr).cast(), &mut len) };
    r == 0
        && addr.ss_family == libc::AF_UNIX as libc::sa_family_t
        && len as usize <= std::mem::size_of::<libc::sa_family_t>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root not needed: unshare(CLONE_FILES) and pidfd_getfd of one's own process are open
    /// to every user.
    #[test]
    fn a_thread_of_its_own_sees_only_what_it_adopts() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let raw = a.as_raw_fd();
        let before = open_fds().unwrap();
        std::thread::spawn(move || {
            leave_shared(&before).unwrap();
            assert!(LEADER.get().is_some());
            // The copy of the socket was replaced: the number names /dev/null here.
            let here = fs::read_link(format!("/proc/thread-self/fd/{raw}")).unwrap();
            assert_eq!(here.to_string_lossy(), "/dev/null");
            let mine = adopt(raw).unwrap();
            let mine = std::os::unix::net::UnixStream::from(mine);
            use std::io::Write;
            (&mine).write_all(b"hi").unwrap();
            // Closed in the thread's table, where it lives.
            drop(mine);
            // A socket made here is not in the process's table.
            let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
            let n = c.as_raw_fd();
            let (soft, _) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
            assert!(n as u64 >= GUARD.min(soft / 8), "{n} below the guard");
            (
                n,
                fs::read_link(format!("/proc/thread-self/fd/{n}")).unwrap(),
            )
        })
        .join()
        .map(|(n, here)| {
            // The number is free in the process's table, or names another file there.
            let there = fs::read_link(format!("/proc/self/fd/{n}"));
            assert!(there.is_err() || there.unwrap() != here, "{here:?}");
        })
        .unwrap();
        assert!(LEADER.get().is_none());
        let mut buf = [0u8; 2];
        use std::io::Read;
        (&b).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // The process's own copy still works (the thread's replacement did not close it).
        use std::io::Write;
        (&a).write_all(b"x").unwrap();
    }
}
