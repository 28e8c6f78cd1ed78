//! The programs on the kernel's hooks: the socket programs on the cgroup root and the tc
//! backstop on workloads' interfaces, through pinned bpf links that outlive the agent.

use std::{fs, os::fd::AsFd, path::Path};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{NlOptions, TcAttachOptions},
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier,
    TcAttachType,
};

use super::{
    bpf::Datapath,
    error::{io, BpfError},
    pins::retire_old_versions,
};

/// The programs, in the order they are attached.
pub const PROGRAMS: [&str; 9] = [
    PACKET_PROGRAM,
    "egress_getpeername4",
    "egress_getpeername6",
    "egress_recvmsg4",
    "egress_recvmsg6",
    "egress_sendmsg4",
    "egress_sendmsg6",
    "egress_connect4",
    "egress_connect6",
];

/// The per-packet `cgroup_skb/egress` program.
pub const PACKET_PROGRAM: &str = "egress_skb_egress";

/// Set (to anything but 0) in the agent's environment: run without the per-packet program
/// (the benchmark compares the two, a tc-only test isolates the backstop; not for
/// production: the per-packet program also keys redirected connections for the proxy, which
/// refuses them without it).
pub const NO_PACKET_PROGRAM_ENV: &str = "EGRESS_NO_PACKET_PROGRAM";

fn packet_program_disabled() -> bool {
    std::env::var(NO_PACKET_PROGRAM_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The tc backstop: (program, hook on the host side of a workload's veth, pin suffix).
pub const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("egress_tc_from_workload", TcAttachType::Ingress, "from"),
    ("egress_tc_to_workload", TcAttachType::Egress, "to"),
];

impl Datapath {
    /// Loads every program and makes sure it is attached to `cgroup` through a pinned bpf
    /// link (links stack with other programs and a sub-cgroup cannot override them). A link
    /// pinned by an earlier run that runs the same program is kept as it is: enforcement has
    /// no gap across restarts. A link running another program (an upgrade) is replaced only
    /// after the new one is attached. Pins of older layout versions go last. On a failure,
    /// the links this call attached are removed again and the earlier ones stay.
    pub fn attach(&mut self, cgroup: &Path, node_backstop: bool) -> Result<Vec<String>, BpfError> {
        let mut report = Vec::new();
        let res = self.try_attach(cgroup, node_backstop, &mut report);
        if res.is_err() {
            for l in self.links.drain(..) {
                let _ = l.unpin();
            }
        } else {
            self.links.clear(); // committed: the pins own the links now
            retire_old_versions(&self.pin_root);
        }
        res.map(|()| report)
    }

    fn try_attach(
        &mut self,
        cgroup: &Path,
        node_backstop: bool,
        report: &mut Vec<String>,
    ) -> Result<(), BpfError> {
        let cg = fs::File::open(cgroup).map_err(io(cgroup, "open cgroup"))?;
        let links_dir = self.dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir, "mkdir"))?;
        for name in PROGRAMS {
            let path = links_dir.join(name);
            let packet = name == PACKET_PROGRAM;
            if packet && packet_program_disabled() {
                let _ = fs::remove_file(&path);
                report.push(format!("{name} (disabled by {NO_PACKET_PROGRAM_ENV})"));
                continue;
            }
            let prog = self.ebpf.program_mut(name).ok_or(BpfError::Missing(name))?;
            let perr = |source| BpfError::Program { name, source };
            if packet {
                <&mut CgroupSkb>::try_from(&mut *prog)
                    .map_err(perr)?
                    .load()
                    .map_err(perr)?;
            } else {
                <&mut CgroupSockAddr>::try_from(&mut *prog)
                    .map_err(perr)?
                    .load()
                    .map_err(perr)?;
            }
            let info = prog.info().map_err(perr)?;
            let new_tag = info.tag();
            tracing::debug!(
                program = name,
                verified_insns = info.verified_instruction_count().unwrap_or(0),
                "loaded"
            );
            let old = if path.exists() {
                let l = PinnedLink::from_pin(&path)
                    .map_err(|source| BpfError::Link { name, source })?;
                let link = FdLink::from(l);
                let tag = link.info().ok().and_then(|i| program_tag(i.program_id()));
                Some((link, tag))
            } else {
                None
            };
            if let Some((_, Some(tag))) = &old {
                if *tag == new_tag {
                    report.push(format!("{name} (kept)"));
                    continue;
                }
            }
            // aya's "Single" with a bpf link is the kernel's multi-attach for links: flags 0.
            let link: FdLink = if packet {
                let p: &mut CgroupSkb = prog.try_into().map_err(perr)?;
                let id = p
                    .attach(
                        cg.as_fd(),
                        CgroupSkbAttachType::Egress,
                        CgroupAttachMode::Single,
                    )
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                let id = p
                    .attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| BpfError::Link { name, source })?
            };
            let pin_err = |e: aya::pin::PinError| BpfError::Io {
                path: path.clone(),
                op: "pin link",
                source: std::io::Error::other(format!("{e:?}")),
            };
            if let Some((old, _)) = old {
                // The new link runs beside the old one; moving the pin onto it and closing
                // the old link's last fd detaches the old program.
                let tmp = links_dir.join(format!("{name}_new"));
                let pinned = link.pin(&tmp).map_err(pin_err)?;
                fs::rename(&tmp, &path).map_err(io(&path, "replace link pin"))?;
                drop(pinned);
                drop(old);
                report.push(format!("{name} (replaced)"));
            } else {
                let pinned = link.pin(&path).map_err(pin_err)?;
                self.links.push(pinned);
                report.push(format!("{name} (attached)"));
            }
        }
        super::sockets::attach(
            &mut self.ebpf,
            &cg,
            node_backstop,
            &links_dir,
            &mut self.links,
            report,
        )?;
        Ok(())
    }

    /// Makes sure the tc backstop runs on interface `iface` (index `ifindex`, in the agent's
    /// network namespace) through pinned tcx links, named by the interface index. Like the
    /// cgroup links, a pinned link that runs the same program is kept; another one is replaced
    /// after the new one is attached. On kernels without tcx (< 6.6), the programs go on a
    /// clsact qdisc instead (not pinned: the filters stay on the qdisc, and every start
    /// replaces them). `EGRESS_TC_ATTACH=tcx|clsact` overrides the choice.
    pub fn attach_tc(&mut self, iface: &str, ifindex: u32) -> Result<Vec<String>, BpfError> {
        self.attach_tc_programs(iface, ifindex, &TC_PROGRAMS, "tc")
    }

    /// Makes sure the node backstop ([`super::sockets::NODE_PROGRAM`], tc egress) runs on the node interface
    /// `iface` (index `ifindex`), like [`Datapath::attach_tc`]; its pins are `node-INDEX-out`,
    /// which pruning the workloads' interfaces leaves alone.
    pub fn attach_node(&mut self, iface: &str, ifindex: u32) -> Result<Vec<String>, BpfError> {
        let progs = [(super::sockets::NODE_PROGRAM, TcAttachType::Egress, "out")];
        self.attach_tc_programs(iface, ifindex, &progs, "node")
    }

    fn attach_tc_programs(
        &mut self,
        iface: &str,
        ifindex: u32,
        programs: &[(&'static str, TcAttachType, &str)],
        pin_prefix: &str,
    ) -> Result<Vec<String>, BpfError> {
        let links_dir = self.dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir, "mkdir"))?;
        let tcx = match std::env::var("EGRESS_TC_ATTACH").as_deref() {
            Ok("clsact") => false,
            Ok("tcx") => true,
            _ => aya::util::KernelVersion::current()
                .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
                .unwrap_or(true),
        };
        let mut report = Vec::new();
        for &(name, hook, dir) in programs {
            let perr = |source| BpfError::Program { name, source };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing(name))?
                .try_into()
                .map_err(perr)?;
            if prog.fd().is_err() {
                prog.load().map_err(perr)?;
            }
            let new_tag = prog.info().map_err(perr)?.tag();
            if !tcx {
                let _ = aya::programs::tc::qdisc_add_clsact(iface);
                let _ = aya::programs::tc::qdisc_detach_program(iface, hook, name);
                let id = prog
                    .attach_with_options(
                        iface,
                        hook,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(perr)?;
                // The filter stays on the qdisc when the agent exits.
                std::mem::forget(prog.take_link(id).map_err(perr)?);
                report.push(format!("{name} on {iface} (clsact)"));
                continue;
            }
            let path = links_dir.join(format!("{pin_prefix}-{ifindex}-{dir}"));
            let old = PinnedLink::from_pin(&path).ok().map(FdLink::from);
            let old_tag = old
                .as_ref()
                .and_then(|l| l.info().ok())
                .and_then(|i| program_tag(i.program_id()));
            if old_tag == Some(new_tag) {
                report.push(format!("{name} on {iface} (kept)"));
                continue;
            }
            let id = prog
                .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(Default::default()))
                .map_err(perr)?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(perr)?
                .try_into()
                .map_err(|source| BpfError::Link { name, source })?;
            let tmp = links_dir.join(format!("{pin_prefix}-{ifindex}-{dir}_new"));
            let _ = fs::remove_file(&tmp);
            link.pin(&tmp).map_err(|e| BpfError::Io {
                path: tmp.clone(),
                op: "pin link",
                source: std::io::Error::other(format!("{e:?}")),
            })?;
            fs::rename(&tmp, &path).map_err(io(&path, "pin link"))?;
            drop(old);
            report.push(format!("{name} on {iface} (attached)"));
        }
        Ok(report)
    }

    /// Detaches the tc backstop from every interface not in `keep` (indexes), by removing
    /// the pins of their links (a link of a deleted interface is gone already).
    pub fn prune_tc(&mut self, keep: &[u32]) -> Vec<u32> {
        let links_dir = self.dir.join("links");
        let mut gone = Vec::new();
        for e in fs::read_dir(&links_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("tc-") else {
                continue;
            };
            let Some(ifindex) = rest.split('-').next().and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            if !keep.contains(&ifindex) && fs::remove_file(e.path()).is_ok() {
                gone.push(ifindex);
            }
        }
        gone.sort_unstable();
        gone.dedup();
        gone
    }
}

fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}
