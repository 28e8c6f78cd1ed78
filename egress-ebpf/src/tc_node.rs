//! The node backstop: tc egress on the node's own interfaces (`run --node-interface`), for
//! frames that no cgroup program sees. A workload's packet socket (AF_PACKET) writes whole
//! frames straight to a device: neither the socket hooks nor `cgroup_skb` run for them, and a
//! host-network workload's frames never cross a workload veth. Where the `socket_create` LSM
//! can refuse such sockets this program never fires; where it cannot (no BPF LSM), their
//! frames are dropped here: the frame still carries its socket, and the socket its cgroup.
//! (`PACKET_QDISC_BYPASS`, which would skip this hook, and AF_XDP's set-up are refused by
//! cgroup/setsockopt: `sock_create::setsockopt`.)
//!
//! Everything else passes untouched after one read: frames of IP sockets (judged already),
//! frames with no socket (forwarded traffic, pods' packets, judged on their veths), and
//! frames of sockets outside every workload.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    programs::TcContext,
};
use egress_common::{packet::Packet, sockets, tc};

use crate::{
    maps::{active_set, workload_of, CONFIG},
    tc::{drop_packet, frame},
};

/// tcx: let the next program (or the stack) have the packet.
const TC_NEXT: i32 = -1;

/// The program `egress_tc_node` (see main.rs).
#[inline(always)]
pub fn from_node(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context; the verifier checks the field and the null test.
    let sk = unsafe { read_volatile(&(*skb).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return TC_NEXT;
    }
    let family = unsafe { read_volatile(&(*sk).family) };
    if !sockets::writes_frames(family) {
        return TC_NEXT;
    }
    let set = active_set();
    let Some(cfg) = CONFIG.get(set) else {
        return TC_NEXT;
    };
    if !sockets::node_frame_refused(family, cfg.sockets_allowed) {
        return TC_NEXT;
    }
    let cg = unsafe { bpf_skb_cgroup_id(skb) };
    if cg == cfg.agent_cgroup_id {
        return TC_NEXT;
    }
    let w = workload_of(cg, set, Some(cfg.root_level), |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    });
    let wid = match w {
        Some(w) => w.id,
        // Kubernetes mode: a pod not enrolled yet; the socket rules are mesh-wide.
        None if cfg.refuse_unenrolled != 0 => 0,
        None => return TC_NEXT,
    };
    if cfg.audit_mode != 0 {
        return TC_NEXT;
    }
    let mut p = Packet::default();
    frame(ctx, &mut p);
    drop_packet(
        wid,
        tc::TC_PACKET_SOCKET,
        ctx.len(),
        &p,
        cfg.generation as u32 as u64,
    )
}
