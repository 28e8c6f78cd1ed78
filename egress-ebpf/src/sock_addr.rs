//! cgroup/connect*, sendmsg* and getpeername*: judge the destination of a connect() or a
//! sendto(), then pass it, refuse it (EPERM) or rewrite it to the proxy; later, show the
//! application the address it dialled rather than the proxy's.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::error;
use egress_common::{
    decide::on_error,
    decide::Query,
    fqdn::{decide_named, DNS_PORT},
    skb::{hook_fast_pass, DstKey, LAST_HOOK},
    v4_mapped, Decision, MeshConfig, OrigDst, Outcome, SockAddr,
};

use crate::{
    events::record,
    maps::{
        active_set, cache_verdict, in_mesh, last_verdict, named, names_epoch, orig_of, policy,
        remember, set_orig, sock, workload, CONFIG, DST_VERDICTS,
    },
};

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
pub fn is_proxy(cfg: &MeshConfig, dst: &SockAddr) -> bool {
    let dns = cfg.dns_port != 0 && dst.port == cfg.dns_port as u32;
    if dst.port != cfg.proxy_port as u32 && !dns {
        return false;
    }
    if dst.family == 4 {
        let ip = dst.ip4();
        ip == cfg.proxy_ip4 || ip == [0; 4]
    } else {
        dst.addr == cfg.proxy_ip6 || dst.addr == [0; 16]
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
    // Fast path: this cgroup's verdict for this destination, cached under the policy and
    // names in force (by this hook or the per-packet program), passes it untouched; this
    // CPU's last such pass (`LAST_HOOK`) is compared before the cache's hash lookup.
    let key = DstKey::new(cg, dst.addr, proto, 0);
    if let Some(c) = cfg {
        // This CPU's last cached pass of the hooks first, then the cache itself.
        let last = last_verdict(LAST_HOOK, &key);
        // SAFETY: copied out at once.
        let found = last.or_else(|| unsafe { DST_VERDICTS.get(&key) }.copied());
        if let Some(v) = found {
            let steered = c.dns_port != 0 && dst.addr.port == DNS_PORT as u32;
            let fast = hook_fast_pass(&v, c.generation, names_epoch(), c.events_all == 1, steered);
            if let Some(outcome) = fast {
                if last.is_none() {
                    remember(LAST_HOOK, &key, &v);
                }
                let d = Decision {
                    outcome,
                    rule_id: 0,
                };
                record(Some(c), cg, v.workload_id, &dst.addr, proto, hook, d);
                return Act::Pass;
            }
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
    if to_proxy && orig_of(sock(ctx)).is_some() {
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
    let rules = policy(w.id, set, &dst.addr);
    let mut d = decide_named(cfg, &q, rules, named(w.id, &dst.addr));
    if d.outcome == Outcome::Proxy {
        let orig = OrigDst {
            dst: dst.addr,
            cgroup_id: cg,
            workload_id: w.id,
            rule_id: d.rule_id,
            mapped: dst.mapped as u32,
            _pad0: 0,
            netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        };
        if !set_orig(sock(ctx), &orig) {
            error!(
                ctx,
                "egress: cannot record original destination, cgroup {}", cg
            );
            d.outcome = on_error(Some(cfg));
        }
    }
    record(Some(cfg), cg, w.id, &dst.addr, proto, hook, d);
    if crate::dns::steer(ctx, cfg, cg, w.id, &q, dst.addr, dst.mapped, d, hook) {
        // To the agent's DNS proxy, on its port.
        return Act::Redirect(MeshConfig {
            proxy_port: cfg.dns_port,
            ..*cfg
        });
    }
    if matches!(d.outcome, Outcome::Allow | Outcome::Mesh | Outcome::Pass) {
        let v = cache_verdict(&key, cfg.generation, w.id, d.outcome as u8, 0);
        remember(LAST_HOOK, &key, &v);
    }
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
pub fn protocol(ctx: &SockAddrContext) -> u8 {
    unsafe { read_volatile(&(*sa(ctx)).protocol) as u8 }
}

pub fn sock4(ctx: &SockAddrContext, proto: u8, hook: u8) -> i32 {
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

pub fn sock6(ctx: &SockAddrContext, proto: u8, hook: u8) -> i32 {
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

/// The program `egress_getpeername4`: the application sees the address it dialled, not the
/// proxy's.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    if let Some(o) = orig_of(sock(ctx)) {
        if o.dst.family == 4 {
            let ip = u32::from_ne_bytes(o.dst.ip4());
            unsafe { write_volatile(&mut (*sa(ctx)).user_ip4, ip) };
            write_port(ctx, o.dst.port as u16);
        }
    }
    PASS
}

/// The program `egress_getpeername6`, for IPv6 sockets.
#[inline(always)]
pub fn getpeername6(ctx: &SockAddrContext) -> i32 {
    if let Some(o) = orig_of(sock(ctx)) {
        let ip = if o.dst.family == 4 {
            mapped6(o.dst.ip4())
        } else {
            o.dst.addr
        };
        write_ip6(ctx, &ip);
        write_port(ctx, o.dst.port as u16);
    }
    PASS
}
