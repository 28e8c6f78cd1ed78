//! cgroup_skb/egress: every packet a workload's sockets send, judged by its real destination
//! with the same maps and `decide()` as the socket hooks.
//!
//! The socket hooks judge the address a socket is given; this program catches what they
//! cannot see: connections made before the agent (or before a policy change refused them),
//! source routes (IPv4 LSRR/SSRR, IPv6 routing headers) whose header destination is not the
//! one the socket was judged for, and ping sockets' unconnected sendto().
//!
//! Fast path: a plain packet (IPv4 without options, IPv6 without extension headers; TCP or
//! UDP) is read straight from the packet (`egress_common::packet::plain`), and when its
//! cgroup, destination and protocol are those of the last pass on this CPU under the current
//! policy generation (`EGRESS_LAST_VERDICT`), it passes. Otherwise the verdict cache
//! (`EGRESS_DST_VERDICTS`, see `egress_common::skb`) decides; failing that, the packet is
//! judged in full and the verdict is cached.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_TCP_LISTEN, BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT},
    helpers::{bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use egress_common::{
    decide::{on_error, Query},
    hook,
    packet::{self, plain, Bytes, Class},
    skb::{self as s, DstKey, LAST_SKB},
    MeshConfig, OrigDst, OrigKey, Outcome, VerdictEvent,
};

use crate::{
    events::emit,
    maps::{
        active_set, cache_verdict, in_mesh, last_verdict, mark_sock, names_epoch, orig_of, policy,
        remember, sock_marks, workload_of, CONFIG, DST_VERDICTS, ORIG_BY_TUPLE, PACKET_DROPS,
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
fn count(wid: u32, slot: u8) {
    if let Some(c) = PACKET_DROPS.get_ptr_mut(s::skb_index(wid, slot)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Drops a packet: counts it, and tells the agent unless this drop was told already (one
/// flow event per cgroup, destination and policy generation, not per packet).
#[inline(always)]
fn drop_packet(
    cfg: Option<&MeshConfig>,
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
    emit(&VerdictEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: cg,
        pid_tgid: 0,
        dst: pkt.dst,
        workload_id: wid,
        rule_id,
        generation: cfg.map(|c| c.generation).unwrap_or(0) as u32,
        outcome: slot,
        proto: pkt.proto,
        hook: hook::SKB,
        _pad0: 0,
    });
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
    let data = unsafe { read_volatile(&(*skb).data) } as usize;
    let data_end = unsafe { read_volatile(&(*skb).data_end) } as usize;
    let v6 = match u16::from_be(l3 as u16) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return PASS,
    };
    let pkt = plain_packet(data, data_end, v6).unwrap_or_else(|| packet::parse(&Skb(ctx), 0, v6));
    let bad = match pkt.class {
        Class::Link => return PASS,
        Class::SourceRoute => s::DROP_SOURCE_ROUTE,
        Class::TooManyHeaders => s::DROP_TOO_MANY_HEADERS,
        Class::Malformed => s::DROP_MALFORMED,
        Class::Judge | Class::LaterFragment => 0,
    };
    let state = if sk.is_null() {
        0
    } else {
        unsafe { read_volatile(&(*sk).state) }
    };
    if bad == 0 && (state == BPF_TCP_LISTEN || state == BPF_TCP_SYN_RECV) {
        // A listener's SYN-ACK (or a socket it accepted with TCP Fast Open, which answers
        // before it is established): it answers a peer that connected in. The mark is cloned
        // by the kernel into every socket the listener accepts: their packets are replies.
        mark_sock(sk.cast(), s::INBOUND);
        return PASS;
    }
    // A socket the listener accepted sends replies. Asked only when a packet would not pass
    // otherwise: the common case (a cached pass) skips the socket storage lookup.
    let answers = || bad == 0 && sock_marks(sk.cast()) & s::INBOUND != 0;

    let set = active_set();
    let cfg = CONFIG.get(set);
    let cg = unsafe { bpf_skb_cgroup_id(skb) };
    // A socket redirected to the proxy is judged by its original destination.
    let mut key = DstKey::new(cg, pkt.dst, pkt.proto, 0);
    if let Some(c) = cfg {
        if cg == c.agent_cgroup_id {
            return PASS;
        }
        let syn = pkt.syn && state == BPF_TCP_SYN_SENT;
        if bad == 0 && (is_proxy(c, &pkt.dst) || (syn && to_other_set_proxy(set, &pkt.dst))) {
            if let Some(o) = orig_of(sk.cast()) {
                key.dst = o.dst;
                key.redirected = 1;
                if syn {
                    key_for_proxy(&o, &pkt);
                }
            }
        }
        if bad == 0 {
            if let Some(v) = last_verdict(LAST_SKB, &key) {
                if v.generation == c.generation && v.drop == 0 {
                    return PASS;
                }
            }
        }
        // SAFETY: copied out at once.
        if let Some(v) = unsafe { DST_VERDICTS.get(&key) }.copied() {
            if v.generation == c.generation && bad == 0 {
                if v.drop == 0 {
                    remember(LAST_SKB, &key, &v);
                    return PASS;
                }
                if answers() {
                    return PASS;
                }
                // A drop stands until names are learned (one may now allow this address).
                if v.names_epoch == names_epoch() {
                    count(v.workload_id, v.drop);
                    return DROP;
                }
            }
        }
    }
    if answers() {
        return PASS;
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
                    cache_verdict(&key, c.generation, 0, o as u8, o as u8);
                    return drop_packet(cfg, false, cg, 0, &pkt, 0, o as u8);
                }
            }
        }
        return PASS;
    };
    if bad != 0 {
        return drop_packet(cfg, false, cg, w.id, &pkt, 0, bad);
    }
    let Some(cfg) = cfg else {
        let o = on_error(None) as u8;
        return drop_packet(None, false, cg, w.id, &pkt, 0, o);
    };

    // Full judgment.
    let redirected = key.redirected != 0;
    let to_proxy = is_proxy(cfg, &pkt.dst);
    let q = Query {
        proto: pkt.proto,
        port: key.dst.port as u16,
        in_mesh: in_mesh(set, &key.dst),
        to_proxy: to_proxy && !redirected,
    };
    let d = egress_common::fqdn::decide_named(
        cfg,
        &q,
        policy(w.id, set, &key.dst),
        crate::maps::named(w.id, &key.dst),
    );
    let slot = if d.outcome.is_denied() {
        d.outcome as u8
    } else if d.outcome == Outcome::Proxy && !redirected {
        // Straight to a destination the policy now sends through the proxy.
        s::DROP_PROXY_BYPASS
    } else {
        0
    };
    let v = cache_verdict(&key, cfg.generation, w.id, d.outcome as u8, slot);
    if slot != 0 {
        return drop_packet(Some(cfg), false, cg, w.id, &pkt, d.rule_id, slot);
    }
    remember(LAST_SKB, &key, &v);
    PASS
}

/// Keys a redirected socket's original destination by its client address, at its SYN: the
/// proxy (or the DNS proxy) sees that address as its peer, and takes the entry when it
/// accepts the connection. A retransmitted SYN writes the same entry again.
#[inline(always)]
fn key_for_proxy(o: &OrigDst, pkt: &packet::Packet) {
    let key = OrigKey {
        netns: o.netns,
        addr: pkt.src,
    };
    // A full LRU map evicts its oldest entry; a failure leaves the proxy without the entry,
    // and it refuses the connection as not redirected.
    let _ = ORIG_BY_TUPLE.insert(&key, o, 0);
}

/// Whether `dst` is the agent's proxy under the policy set not in force: a socket redirected
/// just before a switch dials the old set's port.
#[inline(always)]
fn to_other_set_proxy(set: u32, dst: &egress_common::SockAddr) -> bool {
    CONFIG.get(set ^ 1).is_some_and(|c| is_proxy(c, dst))
}

/// The packet read straight from its bytes when it is plain (see
/// `egress_common::packet::plain`) and its linear part holds the bytes that takes.
#[inline(always)]
fn plain_packet(data: usize, data_end: usize, v6: bool) -> Option<packet::Packet> {
    if v6 {
        if data + plain::V6_LEN > data_end {
            return None;
        }
        // SAFETY: within the packet's linear part (checked above; the verifier checks too).
        plain::v6(unsafe { &*(data as *const [u8; plain::V6_LEN]) })
    } else {
        if data + plain::V4_LEN > data_end {
            return None;
        }
        // SAFETY: as above.
        plain::v4(unsafe { &*(data as *const [u8; plain::V4_LEN]) })
    }
}
