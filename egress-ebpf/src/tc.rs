//! The tc backstop on the host side of each workload's veth: packets that did not go through
//! a judged socket (raw sockets, another network stack) get the same verdict by policy.

use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use egress_common::{
    decide, decide::Query, hook, iface_key, proto, tc, Outcome, SockAddr, VerdictEvent,
};

use crate::{
    events::emit,
    maps::{active_set, in_mesh, policy, CONFIG, REPLIES, TC_COUNTERS, WORKLOADS},
};

/// tcx: let the next program (or the stack) have the packet; drop it.
const TC_NEXT: i32 = -1;
const TC_DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_HOPOPTS: u8 = 0;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The headers of one packet the backstop judges.
struct Packet {
    proto: u8,
    src: SockAddr,
    dst: SockAddr,
    /// TCP SYN without ACK: a connection being opened.
    syn: bool,
    /// Link control (IPv6 neighbour discovery, MLD): never judged.
    link: bool,
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    ctx.load::<u16>(off).ok().map(u16::from_be)
}

/// Parses Ethernet + IPv4/IPv6 + the first bytes of TCP/UDP/ICMP. `None`: not IP.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let (proto, mut src, mut dst, l4, first_fragment) = match be16(ctx, 12)? {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            let frag = be16(ctx, ETH_HLEN + 6)? & 0x1fff;
            let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            let s: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
            let d: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
            (
                proto,
                SockAddr::v4(s, 0),
                SockAddr::v4(d, 0),
                ETH_HLEN + ihl,
                frag == 0,
            )
        }
        ETH_P_IPV6 => {
            let mut proto: u8 = ctx.load(ETH_HLEN + 6).ok()?;
            let s: [u8; 16] = ctx.load(ETH_HLEN + 8).ok()?;
            let d: [u8; 16] = ctx.load(ETH_HLEN + 24).ok()?;
            let mut l4 = ETH_HLEN + 40;
            // One hop-by-hop options header (MLD reports carry one) is looked through.
            if proto == IPPROTO_HOPOPTS {
                proto = ctx.load(l4).ok()?;
                let len: u8 = ctx.load(l4 + 1).ok()?;
                l4 += (len as usize + 1) * 8;
            }
            (proto, SockAddr::v6(s, 0), SockAddr::v6(d, 0), l4, true)
        }
        _ => return None,
    };
    let mut syn = false;
    let mut link = false;
    if first_fragment {
        if proto == proto::TCP || proto == proto::UDP {
            src.port = be16(ctx, l4).unwrap_or(0) as u32;
            dst.port = be16(ctx, l4 + 2).unwrap_or(0) as u32;
            if proto == proto::TCP {
                let flags: u8 = ctx.load(l4 + 13).unwrap_or(0);
                syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            }
        } else if proto == proto::ICMPV6 {
            let ty: u8 = ctx.load(l4).unwrap_or(0);
            link = tc::is_link_control(proto, ty);
        }
    }
    Some(Packet {
        proto,
        src,
        dst,
        syn,
        link,
    })
}

#[inline(always)]
fn tc_count(wid: u32, slot: u8, bytes: u32) {
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
    let Some(p) = parse(ctx) else {
        tc_count(w.id, tc::TC_LINK, len);
        return TC_NEXT;
    };
    if p.link {
        tc_count(w.id, tc::TC_LINK, len);
        return TC_NEXT;
    }
    if p.proto == proto::TCP || p.proto == proto::UDP {
        if REPLIES
            .get_ptr(&flow_key(ifindex, p.proto, p.src, p.dst))
            .is_some()
        {
            tc_count(w.id, tc::TC_REPLY, len);
            return TC_NEXT;
        }
    }
    let Some(cfg) = CONFIG.get(set) else {
        tc_count(w.id, Outcome::DenyError as u8, len);
        return TC_DROP;
    };
    let q = Query {
        proto: p.proto,
        port: p.dst.port as u16,
        in_mesh: in_mesh(set, &p.dst),
        to_proxy: false,
    };
    let d = decide(cfg, &q, policy(w.id, set, &p.dst));
    let (slot, drop) = tc::tc_verdict(d.outcome);
    tc_count(w.id, slot, len);
    if !drop {
        return TC_NEXT;
    }
    // A connection being opened gets a flow event; the rest of a dropped flow only counts.
    if p.syn || !(p.proto == proto::TCP) {
        emit(&VerdictEvent {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            cgroup_id: 0,
            pid_tgid: 0,
            dst: p.dst,
            workload_id: w.id,
            rule_id: d.rule_id,
            generation: cfg.generation as u32,
            outcome: slot,
            proto: p.proto,
            hook: hook::TC,
            _pad0: 0,
        });
    }
    TC_DROP
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
    if let Some(p) = parse(ctx) {
        if (p.proto == proto::TCP && p.syn) || p.proto == proto::UDP {
            let _ = REPLIES.insert(&flow_key(ifindex, p.proto, p.dst, p.src), &1, 0);
        }
    }
    TC_NEXT
}
