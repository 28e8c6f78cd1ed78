//! The proxy's in-kernel relay (`run --relay kernel`, see `egress_common::relay`): the
//! stream-verdict program attached to `EGRESS_RELAY`, and the two socket maps. The maps are
//! the agent's own (not pinned): the sockets in them are the agent's and die with it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Mutex,
};

use aya::{
    maps::{MapData, SockHash},
    programs::SkSkb,
};
use egress_common::relay::{names, VERDICT_PROGRAM};

use super::{
    bpf::Datapath,
    error::{map_err, BpfError},
};

/// The kernel relay's maps. Every change goes through a lock (aya's maps take `&mut`); each
/// is one bpf(2) call.
pub struct KernelRelay {
    peers: Mutex<SockHash<MapData, u64>>,
    relay: Mutex<SockHash<MapData, u64>>,
}

impl Datapath {
    /// Loads the stream-verdict program and attaches it to `EGRESS_RELAY`. The attachment
    /// lives as long as this datapath (its object holds the program) and the returned maps.
    pub fn kernel_relay(&mut self) -> Result<KernelRelay, BpfError> {
        let name = VERDICT_PROGRAM;
        let perr = |source| BpfError::Program { name, source };
        let take = |ebpf: &mut aya::Ebpf, map: &'static str| {
            let m = ebpf.take_map(map).ok_or(BpfError::Missing(map))?;
            SockHash::<MapData, u64>::try_from(m).map_err(map_err(map))
        };
        // The program's map references were resolved when the object was loaded: the maps
        // may leave the object first (their fds stay open in the handles).
        let relay = take(&mut self.ebpf, names::RELAY)?;
        let peers = take(&mut self.ebpf, names::RELAY_PEERS)?;
        let prog: &mut SkSkb = self
            .ebpf
            .program_mut(name)
            .ok_or(BpfError::Missing(name))?
            .try_into()
            .map_err(perr)?;
        prog.load().map_err(perr)?;
        prog.attach(relay.fd()).map_err(perr)?;
        Ok(KernelRelay {
            peers: Mutex::new(peers),
            relay: Mutex::new(relay),
        })
    }
}

/// Which of the two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMap {
    /// Redirect targets, by the cookie of the socket whose bytes go there.
    Peers,
    /// Sockets whose received bytes the verdict program redirects, by their own cookie.
    Verdict,
}

impl KernelRelay {
    fn map(&self, which: RelayMap) -> &Mutex<SockHash<MapData, u64>> {
        match which {
            RelayMap::Peers => &self.peers,
            RelayMap::Verdict => &self.relay,
        }
    }

    /// Puts `sock` into a map under `key`.
    pub fn insert(&self, which: RelayMap, key: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
        let mut m = self.map(which).lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, sock.as_raw_fd(), 0)
            .map_err(|e| io::Error::other(format!("{which:?} map: {e}")))
    }

    /// Removes `key` from a map (absent is fine: a closed socket leaves the maps by itself).
    pub fn remove(&self, which: RelayMap, key: u64) {
        let mut m = self.map(which).lock().unwrap_or_else(|e| e.into_inner());
        let _ = m.remove(&key);
    }
}

/// `SO_COOKIE`: the socket's cookie, as `bpf_get_socket_cookie` sees it.
pub fn socket_cookie(s: &impl AsFd) -> io::Result<u64> {
    super::podnet::socket_u64(s, libc::SO_COOKIE)
}
