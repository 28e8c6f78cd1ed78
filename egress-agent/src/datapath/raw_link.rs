//! A cgroup bpf link made with the raw `bpf(BPF_LINK_CREATE)` call, for program types whose
//! aya 0.14 link cannot become an [`FdLink`] (cgroup/setsockopt): the link is pinned at a
//! temporary path and opened again as a [`PinnedLink`], which can.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use aya::programs::links::{FdLink, PinnedLink};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const CGROUP_SETSOCKOPT: u32 = 22;

/// `union bpf_attr` as `BPF_LINK_CREATE`, `BPF_OBJ_PIN` and the map element commands read
/// it (zeroed beyond).
#[repr(C)]
pub(super) struct Attr {
    pub words: [u64; 16],
}

pub(super) fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, fully initialised bpf_attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Links program `prog` to cgroup `cgroup` at `attach_type` (multi: beside other programs),
/// as an [`FdLink`]; `tmp` is the temporary pin (removed again).
pub fn cgroup_link(
    prog: impl AsFd,
    cgroup: impl AsFd,
    attach_type: u32,
    tmp: &Path,
) -> io::Result<FdLink> {
    let mut a = Attr { words: [0; 16] };
    // link_create: prog_fd u32, target_fd u32, attach_type u32, flags u32.
    a.words[0] =
        prog.as_fd().as_raw_fd() as u32 as u64 | (cgroup.as_fd().as_raw_fd() as u32 as u64) << 32;
    a.words[1] = attach_type as u64;
    let fd = bpf(BPF_LINK_CREATE, &a)?;
    // SAFETY: a new file descriptor the kernel just returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(tmp.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let _ = fs::remove_file(tmp);
    // obj_pin: pathname u64, bpf_fd u32, file_flags u32.
    let mut p = Attr { words: [0; 16] };
    p.words[0] = path.as_ptr() as u64;
    p.words[1] = link.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, &p)?;
    let pinned = PinnedLink::from_pin(tmp).map_err(|e| io::Error::other(e.to_string()));
    let _ = fs::remove_file(tmp);
    Ok(FdLink::from(pinned?))
}
