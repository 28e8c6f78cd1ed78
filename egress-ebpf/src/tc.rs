//! The tc backstop on the host side of each workload's veth: packets that did not go through
//! a judged socket (raw sockets, another network stack) get the same verdict by policy.
//!
//! Packets leaving the workload are parsed by `egress_common::packet::parse` (the whole IPv6
//! extension header chain, IPv4 options, fragments), must carry one of the workload's own
//! source addresses, and are judged by destination, protocol and port like a connect().
//! What the parser cannot judge (source routes, too many extension headers, malformed
//! headers), frames that are neither IP nor ARP, and later fragments whose first fragment
//! did not pass are dropped and counted under their reason.

use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use egress_common::{
    decide::Query,
    fqdn::decide_named,
    hook, iface_key,
    packet::{parse, Bytes, Class, Packet},
    proto, tc, Outcome, SockAddr, VerdictEvent,
};

use crate::{
    events::emit,
    maps::{
        active_set, in_mesh, named, policy, CONFIG, FRAGMENTS, POD_ADDRS, REPLIES, TC_COUNTERS,
        WORKLOADS,
    },
};

/// tcx: let the next program (or the stack) have the packet; drop it.
const TC_NEXT: i32 = -1;
const TC_DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

/// The packet's bytes through `bpf_skb_load_bytes` (any offset, nonlinear data included;
/// an error past the end).
struct Skb<'a>(&'a TcContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(off).ok()
    }
}

/// What kind of frame [`frame`] found.
#[derive(PartialEq, Eq)]
pub(crate) enum Frame {
    /// IPv4 or IPv6: the packet is parsed.
    Ip,
    Arp,
    /// Any other ethertype (or an 802.3 length field).
    Other,
}

/// Parses the frame into `out`.
#[inline(always)]
pub(crate) fn frame(ctx: &TcContext, out: &mut Packet) -> Frame {
    match Skb(ctx).be16(12) {
        Some(ETH_P_IP) => {
            parse4(ctx, out);
            Frame::Ip
        }
        Some(ETH_P_IPV6) => {
            parse6(ctx, out);
            Frame::Ip
        }
        Some(ETH_P_ARP) => Frame::Arp,
        _ => Frame::Other,
    }
}

// The parsers are BPF functions of their own (not inlined): their temporaries get a stack
// frame of their own rather than adding to the program's 512 bytes.
#[inline(never)]
fn parse4(ctx: &TcContext, out: &mut Packet) {
    *out = parse(&Skb(ctx), ETH_HLEN, false);
}

#[inline(never)]
fn parse6(ctx: &TcContext, out: &mut Packet) {
    *out = parse(&Skb(ctx), ETH_HLEN, true);
}

#[inline(always)]
pub(crate) fn tc_count(wid: u32, slot: u8, bytes: u32) {
    if let Some(c) = TC_COUNTERS.get_ptr_mut(tc::tc_index(wid, slot)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// A flow as seen from the workload: `local` is its side.
#[inline(always)]
fn flow_key(ifindex: u32, proto: u8, local: SockAddr, remote: SockAddr) -> tc::FlowKey {
    tc::FlowKey {
        ifindex,
        proto,
        _pad0: [0; 3],
        local,
        remote,
    }
}

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    unsafe { read_volatile(&(*ctx.skb.skb).ifindex) }
}

/// Counts a dropped packet under `slot` and, for a connection being opened (or any packet
/// but a TCP segment), tells the agent; the rest of a dropped flow only counts. Not inlined:
/// the event's stack is not the program's.
#[inline(never)]
/// `rule`: the rule id (high half) and the policy generation (low half); a BPF function takes
/// at most five arguments.
pub(crate) fn drop_packet(wid: u32, slot: u8, len: u32, p: &Packet, rule: u64) -> i32 {
    let (rule_id, generation) = ((rule >> 32) as u32, rule as u32);
    tc_count(wid, slot, len);
    if p.syn || p.proto != proto::TCP {
        emit(&VerdictEvent {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            cgroup_id: 0,
            pid_tgid: 0,
            dst: p.dst,
            workload_id: wid,
            rule_id,
            generation,
            outcome: slot,
            proto: p.proto,
            hook: hook::TC,
            _pad0: 0,
        });
    }
    TC_DROP
}

/// The program `egress_tc_from_workload` (see main.rs).
#[inline(always)]
pub fn from_workload(ctx: &TcContext) -> i32 {
    let ifindex = skb_ifindex(ctx);
    let set = active_set();
    // SAFETY: copied out at once.
    let Some(w) = (unsafe { WORKLOADS.get(&iface_key(ifindex, set)) }).copied() else {
        return TC_NEXT; // not a workload's interface (any more)
    };
    let len = ctx.len();
    let mut p = Packet::default();
    match frame(ctx, &mut p) {
        Frame::Ip => {}
        Frame::Arp => {
            tc_count(w.id, tc::TC_LINK, len);
            return TC_NEXT;
        }
        Frame::Other => {
            tc_count(w.id, tc::TC_NON_IP, len);
            return TC_DROP;
        }
    }
    judge_out(ifindex, w.id, set, len, &p)
}

/// The verdict on an IP packet leaving workload `wid` through `ifindex`. Its own BPF
/// function: the parser's stack and this one's are never live at once.
#[inline(never)]
fn judge_out(ifindex: u32, wid: u32, set: u32, len: u32, p: &Packet) -> i32 {
    let Some(cfg) = CONFIG.get(set) else {
        tc_count(wid, Outcome::DenyError as u8, len);
        return TC_DROP;
    };
    let generation = cfg.generation & 0xffff_ffff;
    // Anti-spoof: the source must be the pod's (see `PodAddrs::may_send`). An interface
    // whose addresses are unknown sends nothing but ARP.
    // SAFETY: copied out at once.
    let may_send = match unsafe { POD_ADDRS.get(&ifindex) } {
        Some(a) => a.may_send(p),
        None => false,
    };
    if !may_send {
        return drop_packet(wid, tc::TC_SPOOFED, len, p, generation);
    }
    if let Some(slot) = tc::refused_slot(p.class) {
        return drop_packet(wid, slot, len, p, generation);
    }
    if p.class == Class::Link {
        tc_count(wid, tc::TC_LINK, len);
        return TC_NEXT;
    }
    let frag = tc::FragKey::of(ifindex, p);
    if p.class == Class::LaterFragment {
        // No ports here: the verdict is the first fragment's.
        if FRAGMENTS.get_ptr(&frag).is_some() {
            tc_count(wid, tc::TC_FRAGMENT, len);
            return TC_NEXT;
        }
        return drop_packet(wid, tc::TC_ORPHAN_FRAGMENT, len, p, generation);
    }
    if (p.proto == proto::TCP || p.proto == proto::UDP)
        && REPLIES
            .get_ptr(&flow_key(ifindex, p.proto, p.src, p.dst))
            .is_some()
    {
        tc_count(wid, tc::TC_REPLY, len);
        if p.fragment {
            let _ = FRAGMENTS.insert(&frag, &1, 0);
        }
        return TC_NEXT;
    }
    let q = Query {
        proto: p.proto,
        port: p.dst.port as u16,
        in_mesh: in_mesh(set, &p.dst),
        to_proxy: false,
    };
    // Name rules too: a pod's connection to an address its DNS taught the agent crosses
    // the veth like one an address rule allows.
    let d = decide_named(cfg, &q, policy(wid, set, &p.dst), named(wid, &p.dst));
    let (slot, drop) = tc::tc_verdict(d.outcome);
    if !drop {
        tc_count(wid, slot, len);
        // Its later fragments follow this one's verdict.
        if p.fragment {
            let _ = FRAGMENTS.insert(&frag, &1, 0);
        }
        return TC_NEXT;
    }
    if p.fragment {
        // A reused identification does not inherit an earlier datagram's pass.
        let _ = FRAGMENTS.remove(&frag);
    }
    drop_packet(wid, slot, len, p, (d.rule_id as u64) << 32 | generation)
}

/// The program `egress_tc_to_workload` (see main.rs).
#[inline(always)]
pub fn to_workload(ctx: &TcContext) -> i32 {
    let ifindex = skb_ifindex(ctx);
    let set = active_set();
    // SAFETY: copied out at once.
    let Some(w) = (unsafe { WORKLOADS.get(&iface_key(ifindex, set)) }).copied() else {
        return TC_NEXT;
    };
    tc_count(w.id, tc::TC_INBOUND, ctx.len());
    let mut p = Packet::default();
    if frame(ctx, &mut p) == Frame::Ip {
        note_inbound(ifindex, &p);
    }
    TC_NEXT
}

/// Only a packet really addressed to the pod, from someone else, opens a reply flow; see
/// `PodAddrs::opens_reply_flow` for why (with anti-spoof on the way out). Its own BPF
/// function, like [`judge_out`].
#[inline(never)]
fn note_inbound(ifindex: u32, p: &Packet) {
    // SAFETY: copied out at once.
    let opens = match unsafe { POD_ADDRS.get(&ifindex) } {
        Some(a) => a.opens_reply_flow(p),
        None => false,
    };
    if opens {
        let _ = REPLIES.insert(&flow_key(ifindex, p.proto, p.dst, p.src), &1, 0);
    }
}
