//! The in-kernel egress decision path. Thin on purpose: read the context, ask
//! `egress_common::decide`, act (pass, rewrite to the proxy, or refuse with EPERM).
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, classifier, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext, TcContext},
    EbpfContext,
};
use aya_log_ebpf::error;
use egress_common::{
    capacity, counter_index, decide, decide::on_error, decide::Query, hook, iface_key, mesh_key,
    policy_key, policy_scope, proto, tc, v4_mapped, workload_key, Decision, MeshConfig, MeshKeyV4,
    MeshKeyV6, OrigDst, OrigKey, Outcome, PolicyKeyV4, PolicyKeyV6, PolicyValue, SockAddr,
    VerdictEvent, WorkloadInfo, COUNTERS_LEN, EVENT_LOST,
};

/// Which policy set (0 or 1) the programs read; see `egress_common::workload_key`.
#[map(name = "EGRESS_ACTIVE")]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// The mesh settings of each policy set.
#[map(name = "EGRESS_CONFIG")]
static CONFIG: Array<MeshConfig> = Array::with_max_entries(2, 0);

#[map(name = "EGRESS_WORKLOADS")]
static WORKLOADS: HashMap<u64, WorkloadInfo> =
    HashMap::with_max_entries(capacity::WORKLOAD_CGROUPS, 0);

// LPM tries need BPF_F_NO_PREALLOC.
const NO_PREALLOC: u32 = 1;

#[map(name = "EGRESS_POLICY_V4")]
static POLICY_V4: LpmTrie<PolicyKeyV4, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_POLICY_V6")]
static POLICY_V6: LpmTrie<PolicyKeyV6, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_MESH_V4")]
static MESH_V4: LpmTrie<MeshKeyV4, u32> =
    LpmTrie::with_max_entries(capacity::MESH_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_MESH_V6")]
static MESH_V6: LpmTrie<MeshKeyV6, u32> =
    LpmTrie::with_max_entries(capacity::MESH_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_ORIG_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map(name = "EGRESS_ORIG_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<OrigKey, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map(name = "EGRESS_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "EGRESS_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map(name = "EGRESS_TC_COUNTERS")]
static TC_COUNTERS: PerCpuArray<tc::TcCount> =
    PerCpuArray::with_max_entries(capacity::MAX_WORKLOADS * tc::TC_SLOTS, 0);

#[map(name = "EGRESS_REPLIES")]
static REPLIES: LruHashMap<tc::FlowKey, u8> = LruHashMap::with_max_entries(capacity::REPLIES, 0);

/// cgroup/connect* and sendmsg* return values.
const PASS: i32 = 1;
const REFUSE: i32 = 0; // the syscall fails with EPERM

/// The destination of one connect()/sendmsg(), as the program found it.
struct Dst {
    addr: SockAddr,
    /// Dialled as `::ffff:a.b.c.d` on an IPv6 socket.
    mapped: bool,
}

/// What the program must do after judging.
enum Act {
    /// Not enrolled, exempt, or allowed: leave the address alone.
    Pass,
    Refuse,
    /// Rewrite the destination to the proxy (v4 or, for IPv6 sockets, v6/mapped).
    Redirect(MeshConfig),
}

#[inline(always)]
fn active_set() -> u32 {
    ACTIVE.get(0).copied().unwrap_or(0) & 1
}

#[inline(always)]
fn workload(cg: u64, set: u32, root_level: Option<u32>) -> Option<WorkloadInfo> {
    // SAFETY: values are plain data copied out at once; the agent replaces whole entries.
    if let Some(w) = unsafe { WORKLOADS.get(&workload_key(cg, set)) } {
        return Some(*w);
    }
    // A process in a cgroup nested below its workload's cgroup is still that workload.
    let mut level = root_level? + 1;
    for _ in 0..capacity::MAX_CGROUP_NESTING {
        let anc = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if anc == 0 || anc == cg {
            break;
        }
        if let Some(w) = unsafe { WORKLOADS.get(&workload_key(anc, set)) } {
            return Some(*w);
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn policy(workload_id: u32, set: u32, dst: &SockAddr) -> Option<&'static PolicyValue> {
    let scope = policy_scope(workload_id, set);
    if dst.family == 4 {
        let k: PolicyKeyV4 = policy_key(scope, &dst.ip4());
        POLICY_V4.get(Key::new(32 + 32, k))
    } else {
        let k: PolicyKeyV6 = policy_key(scope, &dst.addr);
        POLICY_V6.get(Key::new(32 + 128, k))
    }
}

#[inline(always)]
fn in_mesh(set: u32, dst: &SockAddr) -> bool {
    if dst.family == 4 {
        let k: MeshKeyV4 = mesh_key(set, &dst.ip4());
        MESH_V4.get(Key::new(8 + 32, k)).is_some()
    } else {
        let k: MeshKeyV6 = mesh_key(set, &dst.addr);
        MESH_V6.get(Key::new(8 + 128, k)).is_some()
    }
}

#[inline(always)]
fn is_proxy(cfg: &MeshConfig, dst: &SockAddr) -> bool {
    if dst.port != cfg.proxy_port as u32 {
        return false;
    }
    if dst.family == 4 {
        let ip = dst.ip4();
        ip == cfg.proxy_ip4 || ip == [0; 4]
    } else {
        dst.addr == cfg.proxy_ip6 || dst.addr == [0; 16]
    }
}

#[inline(always)]
fn record(
    cfg: Option<&MeshConfig>,
    cg: u64,
    wid: u32,
    dst: &SockAddr,
    proto: u8,
    hook: u8,
    d: Decision,
) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(wid, d.outcome as u8, proto)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
    let quiet = matches!(d.outcome, Outcome::Mesh | Outcome::Allow | Outcome::Pass);
    if quiet && cfg.map(|c| c.events_all) != Some(1) {
        return;
    }
    let ev = VerdictEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: cg,
        pid_tgid: bpf_get_current_pid_tgid(),
        dst: *dst,
        workload_id: wid,
        rule_id: d.rule_id,
        generation: cfg.map(|c| c.generation as u32).unwrap_or(0),
        outcome: d.outcome as u8,
        proto,
        hook,
        _pad0: 0,
    };
    emit(&ev);
}

#[inline(always)]
fn emit(ev: &VerdictEvent) {
    let wid = ev.workload_id;
    // Wake the agent only when a batch has piled up (it also polls): a wake-up per connect
    // would cost more than the whole decision. A full ring buffer loses the event, never the
    // verdict; the counters still count it.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > capacity::EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<VerdictEvent>(ev, flags as u64).is_err() {
        if let Some(c) = COUNTERS.get_ptr_mut(counter_index(wid, EVENT_LOST, 0)) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *c += 1 };
        }
    }
}

/// Judge one outgoing connect()/sendmsg() of the current task.
#[inline(always)]
fn judge(ctx: &SockAddrContext, dst: &Dst, proto: u8, hook: u8) -> Act {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let set = active_set();
    let cfg = CONFIG.get(set);
    if let Some(c) = cfg {
        if cg == c.agent_cgroup_id {
            return Act::Pass;
        }
    }
    let Some(w) = workload(cg, set, cfg.map(|c| c.root_level)) else {
        // Kubernetes mode: every cgroup below the kubepods root is a pod's, and one the agent
        // has not enrolled yet is an internal error (failMode decides), so no pod runs
        // unjudged. Otherwise a cgroup that is no workload is untouched.
        if let Some(c) = cfg {
            if c.refuse_unenrolled != 0 {
                let d = Decision {
                    outcome: on_error(Some(c)),
                    rule_id: 0,
                };
                record(Some(c), cg, 0, &dst.addr, proto, hook, d);
                if d.outcome.is_denied() {
                    return Act::Refuse;
                }
            }
        }
        return Act::Pass;
    };
    let Some(cfg) = cfg else {
        error!(ctx, "egress: no mesh config, refusing cgroup {}", cg);
        let d = Decision {
            outcome: on_error(None),
            rule_id: 0,
        };
        record(None, cg, w.id, &dst.addr, proto, hook, d);
        return Act::Refuse;
    };
    let to_proxy = is_proxy(cfg, &dst.addr);
    if to_proxy && orig_of_cookie(ctx).is_some() {
        // Redirected by an earlier program on this hook (ours, during an upgrade, when the
        // old and the new programs run side by side for a moment).
        return Act::Pass;
    }
    let q = Query {
        proto,
        port: dst.addr.port as u16,
        in_mesh: in_mesh(set, &dst.addr),
        to_proxy,
    };
    let mut d = decide(cfg, &q, policy(w.id, set, &dst.addr));
    if d.outcome == Outcome::Proxy {
        let orig = OrigDst {
            dst: dst.addr,
            cgroup_id: cg,
            workload_id: w.id,
            rule_id: d.rule_id,
            mapped: dst.mapped as u32,
            _pad0: 0,
        };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
            error!(
                ctx,
                "egress: cannot record original destination, cgroup {}", cg
            );
            d.outcome = on_error(Some(cfg));
        }
    }
    record(Some(cfg), cg, w.id, &dst.addr, proto, hook, d);
    match d.outcome {
        Outcome::Proxy => Act::Redirect(*cfg),
        o if o.is_denied() => Act::Refuse,
        _ => Act::Pass,
    }
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    // user_port holds the port in network order in its low 16 bits.
    u16::from_be(unsafe { read_volatile(&(*sa(ctx)).user_port) } as u16)
}

#[inline(always)]
fn write_port(ctx: &SockAddrContext, port: u16) {
    unsafe { write_volatile(&mut (*sa(ctx)).user_port, port.to_be() as u32) };
}

#[inline(always)]
fn read_ip6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        let w = unsafe { read_volatile(&(*sa(ctx)).user_ip6[i]) }.to_ne_bytes();
        out[i * 4..i * 4 + 4].copy_from_slice(&w);
    }
    out
}

#[inline(always)]
fn write_ip6(ctx: &SockAddrContext, ip: &[u8; 16]) {
    for i in 0..4 {
        let w = u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
        unsafe { write_volatile(&mut (*sa(ctx)).user_ip6[i], w) };
    }
}

#[inline(always)]
fn mapped6(ip4: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..16].copy_from_slice(&ip4);
    a
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    unsafe { read_volatile(&(*sa(ctx)).protocol) as u8 }
}

fn sock4(ctx: &SockAddrContext, proto: u8, hook: u8) -> i32 {
    let ip = unsafe { read_volatile(&(*sa(ctx)).user_ip4) }.to_ne_bytes();
    let dst = Dst {
        addr: SockAddr::v4(ip, read_port(ctx)),
        mapped: false,
    };
    match judge(ctx, &dst, proto, hook) {
        Act::Pass => PASS,
        Act::Refuse => REFUSE,
        Act::Redirect(cfg) => {
            let ip = u32::from_ne_bytes(cfg.proxy_ip4);
            unsafe { write_volatile(&mut (*sa(ctx)).user_ip4, ip) };
            write_port(ctx, cfg.proxy_port);
            PASS
        }
    }
}

fn sock6(ctx: &SockAddrContext, proto: u8, hook: u8) -> i32 {
    let ip = read_ip6(ctx);
    let port = read_port(ctx);
    // An IPv4-mapped destination is judged (and redirected) as IPv4.
    let dst = match v4_mapped(&ip) {
        Some(v4) => Dst {
            addr: SockAddr::v4(v4, port),
            mapped: true,
        },
        None => Dst {
            addr: SockAddr::v6(ip, port),
            mapped: false,
        },
    };
    match judge(ctx, &dst, proto, hook) {
        Act::Pass => PASS,
        Act::Refuse => REFUSE,
        Act::Redirect(cfg) => {
            let to = if dst.mapped {
                mapped6(cfg.proxy_ip4)
            } else {
                cfg.proxy_ip6
            };
            write_ip6(ctx, &to);
            write_port(ctx, cfg.proxy_port);
            PASS
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let p = protocol(&ctx);
    sock4(&ctx, p, hook::CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let p = protocol(&ctx);
    sock6(&ctx, p, hook::CONNECT6)
}

// sendmsg runs for UDP datagrams sent with an explicit address (sendto without connect).
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock4(&ctx, proto::UDP, hook::SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock6(&ctx, proto::UDP, hook::SENDMSG6)
}

#[inline(always)]
fn orig_of_cookie(ctx: &SockAddrContext) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied()
}

/// The application sees the address it dialled, not the proxy's.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(o) = orig_of_cookie(&ctx) {
        if o.dst.family == 4 {
            let ip = u32::from_ne_bytes(o.dst.ip4());
            unsafe { write_volatile(&mut (*sa(&ctx)).user_ip4, ip) };
            write_port(&ctx, o.dst.port as u16);
        }
    }
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(o) = orig_of_cookie(&ctx) {
        let ip = if o.dst.family == 4 {
            mapped6(o.dst.ip4())
        } else {
            o.dst.addr
        };
        write_ip6(&ctx, &ip);
        write_port(&ctx, o.dst.port as u16);
    }
    PASS
}

const AF_INET: u32 = 2;

/// Re-keys the original destination of a redirected socket by the client's address once the
/// kernel has chosen it (the proxy sees exactly that address as its peer), and forgets both
/// entries when the socket closes.
#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Read every field unconditionally: the verifier rejects ctx accesses that LLVM turns
    // into pointer arithmetic behind a branch.
    let op = unsafe { read_volatile(&(*ops).op) };
    let family = unsafe { read_volatile(&(*ops).family) };
    let ip4 = unsafe { read_volatile(&(*ops).local_ip4) }.to_ne_bytes();
    let mut ip6 = [0u8; 16];
    for i in 0..4 {
        let w = unsafe { read_volatile(&(*ops).local_ip6[i]) }.to_ne_bytes();
        ip6[i * 4..i * 4 + 4].copy_from_slice(&w);
    }
    let port = unsafe { read_volatile(&(*ops).local_port) } as u16;
    let new_state = unsafe { read_volatile(&(*ops).__bindgen_anon_1.args[1]) };

    let local = if family == AF_INET {
        SockAddr::v4(ip4, port)
    } else {
        match v4_mapped(&ip6) {
            Some(v4) => SockAddr::v4(v4, port),
            None => SockAddr::v6(ip6, port),
        }
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let local = OrigKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: local,
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: copied out at once.
        if let Some(o) = unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied() {
            if ORIG_BY_TUPLE.insert(&local, &o, 0).is_err() {
                error!(
                    &ctx,
                    "egress: cannot key original destination by client address"
                );
            }
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && new_state == BPF_TCP_CLOSE {
        let _ = ORIG_BY_TUPLE.remove(&local);
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    1
}

// ---- tc backstop ------------------------------------------------------------------------

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

/// Packets leaving a workload (ingress of the host side of its veth): judged by the policy
/// of the workload that owns the interface, exactly as its sockets are.
#[classifier]
pub fn egress_tc_from_workload(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    let set = active_set();
    // SAFETY: copied out at once.
    let Some(w) = (unsafe { WORKLOADS.get(&iface_key(ifindex, set)) }).copied() else {
        return TC_NEXT; // not a workload's interface (any more)
    };
    let len = ctx.len();
    let Some(p) = parse(&ctx) else {
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

/// Packets into a workload (egress of the host side of its veth): a peer opening a connection
/// into the workload (TCP SYN, or a UDP datagram) makes that flow's replies pass unjudged.
#[classifier]
pub fn egress_tc_to_workload(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    let set = active_set();
    // SAFETY: copied out at once.
    let Some(w) = (unsafe { WORKLOADS.get(&iface_key(ifindex, set)) }).copied() else {
        return TC_NEXT;
    };
    tc_count(w.id, tc::TC_INBOUND, ctx.len());
    if let Some(p) = parse(&ctx) {
        if (p.proto == proto::TCP && p.syn) || p.proto == proto::UDP {
            let _ = REPLIES.insert(&flow_key(ifindex, p.proto, p.dst, p.src), &1, 0);
        }
    }
    TC_NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Must agree with `license` in Cargo.toml (MIT OR GPL-2.0-only); the kernel reads it as
/// GPL-compatible.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
