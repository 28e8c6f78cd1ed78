//! cgroup_skb/egress: every packet a workload's sockets send, judged by its real destination
//! with the same maps and `decide()` as the socket hooks.
//!
//! The socket hooks judge the address a socket is given; this program catches what they
//! cannot see: connections made before the agent (or before a policy change refused them),
//! source routes (IPv4 LSRR/SSRR, IPv6 routing headers) whose header destination is not the
//! one the socket was judged for, and ping sockets' unconnected sendto().
//!
//! Fast path: the socket's remembered verdict (`EGRESS_SOCK_VERDICTS`, by socket cookie) for
//! the current policy generation and this destination decides. Otherwise the packet is judged
//! in full and the verdict is remembered for the socket's next packets.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_TCP_LISTEN,
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    programs::SkBuffContext,
    EbpfContext,
};
use egress_common::{
    decide::{on_error, Query},
    hook,
    packet::{self, Bytes, Class},
    skb::{self as s, SockVerdict},
    MeshConfig, Outcome, SockAddr, VerdictEvent,
};

use crate::{
    events::emit,
    maps::{
        active_set, in_mesh, policy, workload_of, CONFIG, ORIG_BY_COOKIE, PACKET_DROPS,
        SOCK_VERDICTS,
    },
    sock_addr::is_proxy,
};

/// cgroup_skb return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// The packet's bytes, from its IP header on (cgroup_skb has no link header).
struct Skb<'a>(&'a SkBuffContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(off).ok()
    }
}

#[inline(always)]
fn same_dst(a: &SockAddr, b: &SockAddr, addr_only: bool) -> bool {
    a.family == b.family && a.addr == b.addr && (addr_only || a.port == b.port)
}

#[inline(always)]
fn count(wid: u32, slot: u8) {
    if let Some(c) = PACKET_DROPS.get_ptr_mut(s::skb_index(wid, slot)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Drops a packet: counts it, and tells the agent unless this socket's drop of this
/// destination was told already (one flow event per socket and destination, not per packet).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn drop_packet(
    cfg: Option<&MeshConfig>,
    cookie: u64,
    told: bool,
    cg: u64,
    wid: u32,
    pkt: &packet::Packet,
    rule_id: u32,
    slot: u8,
) -> i32 {
    count(wid, slot);
    if told {
        return DROP;
    }
    let generation = cfg.map(|c| c.generation).unwrap_or(0);
    emit(&VerdictEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: cg,
        pid_tgid: 0,
        dst: pkt.dst,
        workload_id: wid,
        rule_id,
        generation: generation as u32,
        outcome: slot,
        proto: pkt.proto,
        hook: hook::SKB,
        _pad0: 0,
    });
    if cookie != 0 {
        let v = SockVerdict {
            generation,
            dst: pkt.dst,
            orig: pkt.dst,
            outcome: 0,
            drop: slot,
            _pad0: [0; 2],
            flags: 0,
            workload_id: wid,
            _pad1: 0,
        };
        let _ = SOCK_VERDICTS.insert(&cookie, &v, 0);
    }
    DROP
}

/// The program `egress_skb_egress` (see main.rs).
#[inline(always)]
pub fn egress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // Read every ctx field unconditionally (the verifier rejects ctx accesses that LLVM turns
    // into pointer arithmetic behind a branch).
    let l3 = unsafe { read_volatile(&(*skb).protocol) };
    let sk = unsafe { read_volatile(&(*skb).__bindgen_anon_2.sk) };
    let v6 = match u16::from_be(l3 as u16) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return PASS,
    };
    let pkt = packet::parse(&Skb(ctx), 0, v6);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let rec = unsafe { SOCK_VERDICTS.get(&cookie) }.copied();
    let set = active_set();
    let cfg = CONFIG.get(set);
    let generation = cfg.map(|c| c.generation).unwrap_or(u64::MAX);

    let bad = match pkt.class {
        Class::Link => return PASS,
        Class::SourceRoute => s::DROP_SOURCE_ROUTE,
        Class::TooManyHeaders => s::DROP_TOO_MANY_HEADERS,
        Class::Malformed => s::DROP_MALFORMED,
        Class::Judge | Class::LaterFragment => 0,
    };
    let later = pkt.class == Class::LaterFragment;
    // This socket's verdict for this destination under the policy in force, if it has one.
    let known = rec.filter(|r| r.generation == generation && same_dst(&r.dst, &pkt.dst, later));
    if bad == 0 {
        if let Some(r) = rec {
            if r.flags & s::INBOUND != 0 {
                return PASS; // an accepted connection's replies
            }
        }
        if let Some(r) = known {
            if r.drop == 0 {
                return PASS;
            }
            count(r.workload_id, r.drop);
            return DROP;
        }
        if !sk.is_null() {
            // A listening socket sends only SYN-ACKs: answers to peers connecting in.
            let state = unsafe { read_volatile(&(*sk).state) };
            if state == BPF_TCP_LISTEN {
                return PASS;
            }
        }
    }

    let cg = unsafe { bpf_skb_cgroup_id(skb) };
    if let Some(c) = cfg {
        if cg == c.agent_cgroup_id {
            return PASS;
        }
    }
    let w = workload_of(cg, set, cfg.map(|c| c.root_level), |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    });
    let Some(w) = w else {
        // As the socket hooks: in Kubernetes mode a cgroup not enrolled yet is an error
        // (failMode decides); otherwise a cgroup that is no workload is untouched.
        if let Some(c) = cfg {
            if c.refuse_unenrolled != 0 {
                let o = on_error(Some(c));
                if o.is_denied() {
                    let told = known.map(|r| r.drop == o as u8).unwrap_or(false);
                    return drop_packet(cfg, cookie, told, cg, 0, &pkt, 0, o as u8);
                }
            }
        }
        return PASS;
    };
    if bad != 0 {
        let told = known.map(|r| r.drop == bad).unwrap_or(false);
        return drop_packet(cfg, cookie, told, cg, w.id, &pkt, 0, bad);
    }
    let Some(cfg) = cfg else {
        let o = on_error(None) as u8;
        return drop_packet(None, cookie, false, cg, w.id, &pkt, 0, o);
    };

    // Full judgment. A socket redirected to the proxy is judged by its original destination.
    let to_proxy = is_proxy(cfg, &pkt.dst);
    let mut target = pkt.dst;
    let mut redirected = false;
    if to_proxy {
        if let Some(r) = rec {
            if r.outcome == Outcome::Proxy as u8 && same_dst(&r.dst, &pkt.dst, later) {
                target = r.orig;
                redirected = true;
            }
        }
        if !redirected {
            // Redirected before this program ran (its original destination is known).
            // SAFETY: copied out at once.
            if let Some(o) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
                target = o.dst;
                redirected = true;
            }
        }
    }
    let q = Query {
        proto: pkt.proto,
        port: target.port as u16,
        in_mesh: in_mesh(set, &target),
        to_proxy: to_proxy && !redirected,
    };
    let d = egress_common::fqdn::decide_named(
        cfg,
        &q,
        policy(w.id, set, &target),
        crate::maps::named(w.id, &target),
    );
    let slot = if d.outcome.is_denied() {
        d.outcome as u8
    } else if d.outcome == Outcome::Proxy && !redirected {
        // Straight to a destination the policy now sends through the proxy.
        s::DROP_PROXY_BYPASS
    } else {
        0
    };
    if slot != 0 {
        return drop_packet(Some(cfg), cookie, false, cg, w.id, &pkt, d.rule_id, slot);
    }
    if cookie != 0 && !later {
        let outcome = if redirected {
            Outcome::Proxy
        } else {
            d.outcome
        };
        let v = SockVerdict {
            generation: cfg.generation,
            dst: pkt.dst,
            orig: target,
            outcome: outcome as u8,
            drop: 0,
            _pad0: [0; 2],
            flags: 0,
            workload_id: w.id,
            _pad1: 0,
        };
        let _ = SOCK_VERDICTS.insert(&cookie, &v, 0);
    }
    PASS
}
