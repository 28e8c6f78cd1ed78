//! The programs that refuse socket kinds no destination hook judges (`spec.sockets`):
//! `egress_sock_create` (cgroup/sock_create, AF_INET/AF_INET6), `egress_lsm_socket_create`
//! (the `socket_create` LSM hook per cgroup, for AF_PACKET/AF_XDP) and, only where that LSM
//! program cannot run and a node backstop can be skipped, `egress_setsockopt`
//! (cgroup/setsockopt: a packet socket's `PACKET_QDISC_BYPASS`, AF_XDP's set-up). All are
//! attached to the agent's cgroup root through pinned bpf links, like the other cgroup
//! programs: a pinned link running the same program is kept across restarts, another one is
//! replaced after the new one is attached, and `uninstall` removes the pins with the rest.
//!
//! The LSM program needs kernel >= 6.0 with the BPF LSM active (`bpf` in
//! /sys/kernel/security/lsm). Without it the agent runs on, logs why, and `status` says that
//! packet sockets are not refused.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockopt, LsmCgroup, ProgramError,
    },
    Btf, Ebpf,
};
use egress_common::sockets::kind;

use super::{bpf::Datapath, error::BpfError};

pub const SOCK_CREATE: &str = "egress_sock_create";
pub const LSM_SOCKET_CREATE: &str = "egress_lsm_socket_create";
/// cgroup/setsockopt: refuses the options that would carry a packet socket's frames past the
/// node backstop (`PACKET_QDISC_BYPASS`, AF_XDP's set-up) where packet sockets are refused;
/// attached only where that stops something ([`setsockopt_needed`]).
pub const SETSOCKOPT: &str = "egress_setsockopt";
/// The node backstop on the node's own interfaces (`run --node-interface`): drops frames of
/// workloads' packet sockets where packet sockets are refused (see egress-ebpf's tc_node);
/// attached by `Datapath::attach_node`.
pub const NODE_PROGRAM: &str = "egress_tc_node";
/// The LSM hook the packet-socket program runs on.
const LSM_HOOK: &str = "socket_create";
/// Marks the report line of a packet-socket program that could not be attached.
const NOT_ATTACHED: &str = "(not attached:";

/// Attaches the programs to `cgroup` (see the module doc): cgroup/sock_create, which must
/// attach, and the LSM program, which may fail (reported and logged, not returned); where it
/// fails and `node_backstop` (a `--node-interface` is named), cgroup/setsockopt.
/// Links attached fresh are pushed to `fresh` (the caller unpins them if a later step fails).
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup: &fs::File,
    node_backstop: bool,
    links_dir: &Path,
    fresh: &mut Vec<PinnedLink>,
    report: &mut Vec<String>,
) -> Result<(), BpfError> {
    let name = SOCK_CREATE;
    let perr = |source| BpfError::Program { name, source };
    let prog: &mut CgroupSock = loaded(ebpf, name)?;
    let tag = prog.info().map_err(perr)?.tag();
    let line = pin_link(name, links_dir, tag, fresh, || {
        let id = prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
        Ok(prog.take_link(id)?.try_into()?)
    })?;
    report.push(line);

    // cgroup/setsockopt runs on every setsockopt(2) of every workload, with the socket locked
    // and the option copied in (about 1 % of a new TCP connection's cost, `cargo xtask bench
    // --packet`), so it is attached only where it stops something (see [`setsockopt_needed`]).
    let lsm = match attach_lsm(ebpf, cgroup, links_dir, fresh) {
        Ok(line) => {
            report.push(line);
            true
        }
        Err(reason) => {
            tracing::warn!(
                program = LSM_SOCKET_CREATE,
                %reason,
                "packet sockets (AF_PACKET, AF_XDP) are NOT refused: the socket_create LSM program cannot run here (needs kernel >= 6.0 with the BPF LSM active: CONFIG_BPF_LSM=y and \"bpf\" in lsm=)"
            );
            report.push(format!("{LSM_SOCKET_CREATE} {NOT_ATTACHED} {reason})"));
            false
        }
    };
    let name = SETSOCKOPT;
    if let Some(why) = setsockopt_needed(lsm, node_backstop).err() {
        // A link pinned by an earlier run: removing its only pin detaches it.
        let pin = links_dir.join(name);
        let done = match fs::remove_file(&pin) {
            Ok(()) => "detached",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "not attached",
            Err(source) => {
                return Err(BpfError::Io {
                    path: pin,
                    op: "remove link pin",
                    source,
                })
            }
        };
        report.push(format!("{name} ({done}: {why})"));
        return Ok(());
    }
    // aya 0.14 cannot pin a cgroup/setsockopt link: it is made with the raw call.
    let perr = |source| BpfError::Program { name, source };
    let prog: &mut CgroupSockopt = loaded(ebpf, name)?;
    let tag = prog.info().map_err(perr)?.tag();
    let tmp = links_dir.join(format!("{name}_tmp"));
    let prog_fd = prog.fd().map_err(perr)?;
    let line = pin_link(name, links_dir, tag, fresh, || {
        super::raw_link::cgroup_link(prog_fd, cgroup, super::raw_link::CGROUP_SETSOCKOPT, &tmp)
            .map_err(AttachError::Io)
    })?;
    report.push(line);
    Ok(())
}

/// Whether cgroup/setsockopt stops anything (`Ok`), or why not (`Err`). It refuses
/// `PACKET_QDISC_BYPASS` and AF_XDP's set-up, the two ways a packet socket's frames skip the
/// node backstop (tc egress on `--node-interface`). Where the LSM program runs, no workload
/// opens such a socket unless `spec.sockets.packet: allow`, which allows the options too.
/// Without a node backstop, a host-network workload's packet-socket frames leave unjudged
/// anyway, and a pod's frames, bypass or AF_XDP, still cross its veth into the tc backstop.
pub fn setsockopt_needed(lsm: bool, node_backstop: bool) -> Result<(), &'static str> {
    if lsm {
        return Err("the socket_create LSM refuses the packet and AF_XDP sockets whose options it would refuse");
    }
    if !node_backstop {
        return Err("no --node-interface: nothing on the node's interfaces for PACKET_QDISC_BYPASS or AF_XDP to skip");
    }
    Ok(())
}

/// Program `name` of `ebpf` as a `P`, loaded.
fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    P: LoadCgroup,
{
    let perr = |source| BpfError::Program { name, source };
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(perr)?;
    if !prog.is_loaded() {
        prog.load_it().map_err(perr)?;
    }
    Ok(prog)
}

/// The cgroup program types [`loaded`] loads.
trait LoadCgroup {
    fn is_loaded(&self) -> bool;
    fn load_it(&mut self) -> Result<(), ProgramError>;
}

macro_rules! load_cgroup {
    ($($t:ty),*) => {$(
        impl LoadCgroup for $t {
            fn is_loaded(&self) -> bool {
                self.fd().is_ok()
            }
            fn load_it(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
        }
    )*};
}
load_cgroup!(CgroupSock, CgroupSockopt);

fn attach_lsm(
    ebpf: &mut Ebpf,
    cgroup: &fs::File,
    links_dir: &Path,
    fresh: &mut Vec<PinnedLink>,
) -> Result<String, String> {
    if std::env::var("EGRESS_LSM").as_deref() == Ok("off") {
        return Err("EGRESS_LSM=off".into());
    }
    if let Ok(active) = fs::read_to_string("/sys/kernel/security/lsm") {
        if !active.trim().split(',').any(|l| l == "bpf") {
            return Err(format!(
                "the BPF LSM is not active (/sys/kernel/security/lsm: {})",
                active.trim()
            ));
        }
    }
    let name = LSM_SOCKET_CREATE;
    let prog: &mut LsmCgroup = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no {name}"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    if prog.fd().is_err() {
        let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        prog.load(LSM_HOOK, &btf)
            .map_err(|e| format!("load: {}", chain(&e)))?;
    }
    let tag = prog.info().map_err(|e| e.to_string())?.tag();
    pin_link(name, links_dir, tag, fresh, || {
        let id = prog.attach(cgroup.as_fd())?;
        Ok(prog.take_link(id)?.into())
    })
    .map_err(|e| chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// Makes sure `links_dir/name` pins a link running a program with `tag`: keeps a pinned link
/// that does, otherwise attaches (`attach`) and pins the new link, replacing the old pin
/// after the new link runs.
fn pin_link(
    name: &'static str,
    links_dir: &Path,
    tag: u64,
    fresh: &mut Vec<PinnedLink>,
    attach: impl FnOnce() -> Result<FdLink, AttachError>,
) -> Result<String, BpfError> {
    let path = links_dir.join(name);
    let old = PinnedLink::from_pin(&path).ok().map(FdLink::from);
    let old_tag = old
        .as_ref()
        .and_then(|l| l.info().ok())
        .and_then(|i| program_tag(i.program_id()));
    if old.is_some() && old_tag == Some(tag) {
        return Ok(format!("{name} (kept)"));
    }
    let link = attach().map_err(|e| match e {
        AttachError::Program(source) => BpfError::Program { name, source },
        AttachError::Link(source) => BpfError::Link { name, source },
        AttachError::Io(source) => BpfError::Io {
            path: links_dir.join(name),
            op: "bpf link",
            source,
        },
    })?;
    let pin_err = |path: &PathBuf| {
        let path = path.clone();
        move |e: aya::pin::PinError| BpfError::Io {
            path,
            op: "pin link",
            source: std::io::Error::other(format!("{e:?}")),
        }
    };
    match old {
        Some(old) => {
            let tmp = links_dir.join(format!("{name}_new"));
            let _ = fs::remove_file(&tmp);
            let pinned = link.pin(&tmp).map_err(pin_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(|source| BpfError::Io {
                path: path.clone(),
                op: "replace link pin",
                source,
            })?;
            drop(pinned);
            drop(old);
            Ok(format!("{name} (replaced)"))
        }
        None => {
            fresh.push(link.pin(&path).map_err(pin_err(&path))?);
            Ok(format!("{name} (attached)"))
        }
    }
}

enum AttachError {
    Program(ProgramError),
    Link(aya::programs::links::LinkError),
    Io(std::io::Error),
}

impl From<ProgramError> for AttachError {
    fn from(e: ProgramError) -> Self {
        AttachError::Program(e)
    }
}

impl From<aya::programs::links::LinkError> for AttachError {
    fn from(e: aya::programs::links::LinkError) -> Self {
        AttachError::Link(e)
    }
}

fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

/// What happens to a workload's packet socket, for `status`: from the policy's
/// `sockets_allowed` and the attach report.
pub fn packet_sockets(programs: &[String], sockets_allowed: u32) -> String {
    if sockets_allowed & kind::PACKET != 0 {
        return "allowed (spec.sockets.packet: allow)".into();
    }
    let refused = match programs.iter().find(|p| p.starts_with(LSM_SOCKET_CREATE)) {
        Some(p) if !p.contains(NOT_ATTACHED) => return "refused (socket_create LSM)".into(),
        Some(p) => {
            let reason = p
                .split_once(NOT_ATTACHED)
                .map(|(_, r)| r.trim().trim_end_matches(')'))
                .unwrap_or("");
            format!("NOT refused: the socket_create LSM program is not attached ({reason})")
        }
        None => "NOT refused: the socket_create LSM program is not attached".into(),
    };
    let prefix = format!("{NODE_PROGRAM} on ");
    let node: Vec<&str> = programs
        .iter()
        .filter_map(|p| p.strip_prefix(&prefix)?.split(' ').next())
        .collect();
    if node.is_empty() {
        return format!(
            "{refused}; no --node-interface drops their frames (nor refuses PACKET_QDISC_BYPASS or AF_XDP)"
        );
    }
    format!(
        "{refused}; their frames are dropped leaving {} (node backstop), PACKET_QDISC_BYPASS and AF_XDP refused (cgroup/setsockopt)",
        node.join(", ")
    )
}

impl Datapath {
    /// The socket refusals of the given workloads, summed over the CPUs, keyed by (workload
    /// id, kind). Read from `EGRESS_COUNTERS` (see [`egress_common::sockets::counter_index`]).
    pub fn socket_refusals(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u32), u64> {
        let mut out = std::collections::HashMap::new();
        let Ok(counters) =
            self.map::<aya::maps::PerCpuArray<_, u64>>(egress_common::names::COUNTERS)
        else {
            return out;
        };
        for &w in workloads {
            for k in egress_common::sockets::KINDS {
                let i = egress_common::sockets::counter_index(w, k);
                if let Ok(v) = counters.get(&i, 0) {
                    out.insert((w, k), v.iter().sum());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_whether_packet_sockets_are_refused() {
        let ok = vec![format!("{LSM_SOCKET_CREATE} (attached)")];
        assert_eq!(packet_sockets(&ok, 0), "refused (socket_create LSM)");
        let bad = vec![format!(
            "{LSM_SOCKET_CREATE} {NOT_ATTACHED} the BPF LSM is not active)"
        )];
        assert_eq!(
            packet_sockets(&bad, kind::ICMP),
            "NOT refused: the socket_create LSM program is not attached (the BPF LSM is not active); no --node-interface drops their frames (nor refuses PACKET_QDISC_BYPASS or AF_XDP)"
        );
        assert!(packet_sockets(&bad, kind::PACKET).starts_with("allowed"));
        let mut node = bad.clone();
        node.push(format!("{} on eth0 (attached)", NODE_PROGRAM));
        node.push(format!("{} on eth1 (kept)", NODE_PROGRAM));
        let s = packet_sockets(&node, kind::ICMP);
        assert!(s.starts_with("NOT refused"), "{s}");
        assert!(
            s.contains("dropped leaving eth0, eth1 (node backstop)"),
            "{s}"
        );
    }

    #[test]
    fn setsockopt_is_attached_only_where_it_stops_something() {
        assert!(setsockopt_needed(false, true).is_ok());
        assert!(setsockopt_needed(false, false)
            .unwrap_err()
            .contains("no --node-interface"));
        assert!(setsockopt_needed(true, true).unwrap_err().contains("LSM"));
        assert!(setsockopt_needed(true, false).unwrap_err().contains("LSM"));
    }
}
