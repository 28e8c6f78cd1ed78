//! Workloads' DNS to the agent's DNS proxy (see `egress_common::fqdn`): connect4/6 and
//! sendmsg4/6 steer an allowed query (port 53, UDP or TCP) to the proxy's address and DNS
//! port, keeping the resolver the workload asked as the socket's original destination;
//! recvmsg4/6 show an unconnected UDP client the reply as coming from that resolver.
//!
//! The DNS proxy finds the resolver by the client's address: TCP through the per-packet
//! program, which keys it at the socket's SYN (as for the HTTP proxy), UDP by (network
//! namespace, source port) in `EGRESS_ORIG_TUPLE`. A UDP socket that connect()s has no source
//! port yet; it is bound here to a random ephemeral port first (what the kernel's autobind
//! would do a moment later).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_prandom_u32},
    programs::SockAddrContext,
    EbpfContext,
};
use egress_common::{
    decide::Query,
    fqdn::{dns_redirect, udp_key_addr},
    hook, proto, Decision, MeshConfig, OrigDst, OrigKey, SockAddr,
};

use crate::maps::{active_set, orig_of, set_orig, sock, CONFIG, ORIG_BY_TUPLE};

const AF_INET: u32 = 2;
const PASS: i32 = 1;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The socket's local port (host order), 0 when it has none yet.
#[inline(always)]
fn src_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: `sk` of a sock_addr context is always a valid socket; the verifier checks it.
    unsafe {
        let sk = read_volatile(&(*sa(ctx)).__bindgen_anon_1.sk);
        read_volatile(&(*sk).src_port) as u16
    }
}

/// Binds an unbound socket to a random ephemeral port on the wildcard address.
#[inline(always)]
fn bind_ephemeral(ctx: &SockAddrContext) -> u16 {
    let family = unsafe { read_volatile(&(*sa(ctx)).family) };
    for _ in 0..4 {
        let port = (32768 + unsafe { bpf_get_prandom_u32() } % 28232) as u16;
        let rc = if family == AF_INET {
            let mut a = SockaddrIn {
                family: AF_INET as u16,
                port: port.to_be(),
                addr: 0,
                zero: [0; 8],
            };
            unsafe {
                bpf_bind(
                    ctx.as_ptr() as *mut _,
                    &mut a as *mut SockaddrIn as *mut sockaddr,
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            }
        } else {
            let mut a = SockaddrIn6 {
                family: 10,
                port: port.to_be(),
                flowinfo: 0,
                addr: [0; 16],
                scope_id: 0,
            };
            unsafe {
                bpf_bind(
                    ctx.as_ptr() as *mut _,
                    &mut a as *mut SockaddrIn6 as *mut sockaddr,
                    core::mem::size_of::<SockaddrIn6>() as i32,
                )
            }
        };
        if rc == 0 {
            return src_port(ctx);
        }
    }
    0
}

/// Steers the query when the decision allows DNS and the mesh has a DNS proxy; records the
/// resolver for the proxy, recvmsg/getpeername and the per-packet program (which judges a
/// steered socket's packets by the resolver, through `EGRESS_SOCK_ORIG`). False: leave the
/// connection to the caller (also when the socket cannot be keyed: it then goes its way
/// unseen, as the policy allowed).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn steer(
    ctx: &SockAddrContext,
    cfg: &MeshConfig,
    cg: u64,
    wid: u32,
    q: &Query,
    dst: SockAddr,
    mapped: bool,
    d: Decision,
    hook: u8,
) -> bool {
    if !dns_redirect(cfg, q, d.outcome) {
        return false;
    }
    let orig = OrigDst {
        dst,
        cgroup_id: cg,
        workload_id: wid,
        rule_id: d.rule_id,
        mapped: mapped as u32,
        _pad0: 0,
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    if q.proto == proto::UDP {
        let mut port = src_port(ctx);
        // Only connect may bind (sendmsg sockets are bound already; the verifier refuses
        // bpf_bind elsewhere and sees `hook` as a constant).
        if port == 0 && (hook == hook::CONNECT4 || hook == hook::CONNECT6) {
            port = bind_ephemeral(ctx);
        }
        if port == 0 {
            return false;
        }
        let key = OrigKey {
            netns: orig.netns,
            addr: udp_key_addr(dst.family, port),
        };
        if ORIG_BY_TUPLE.insert(&key, &orig, 0).is_err() {
            return false;
        }
    }
    set_orig(sock(ctx), &orig)
}

/// The original destination of a steered socket, when the datagram comes from the DNS proxy.
#[inline(always)]
fn steered(ctx: &SockAddrContext, from_port: u16) -> Option<OrigDst> {
    let o = orig_of(sock(ctx))?;
    let cfg = CONFIG.get(active_set())?;
    let ours = cfg.dns_port != 0 && from_port == cfg.dns_port;
    (ours && o.dst.port == egress_common::fqdn::DNS_PORT as u32).then_some(o)
}

#[inline(always)]
fn from_port(ctx: &SockAddrContext) -> u16 {
    u16::from_be(unsafe { read_volatile(&(*sa(ctx)).user_port) } as u16)
}

/// The program `egress_recvmsg4`: a reply from the DNS proxy shows the resolver's address.
#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) -> i32 {
    if let Some(o) = steered(ctx, from_port(ctx)) {
        if o.dst.family == 4 {
            let ip = u32::from_ne_bytes(o.dst.ip4());
            unsafe {
                write_volatile(&mut (*sa(ctx)).user_ip4, ip);
                write_volatile(
                    &mut (*sa(ctx)).user_port,
                    (o.dst.port as u16).to_be() as u32,
                );
            }
        }
    }
    PASS
}

/// The program `egress_recvmsg6`, for IPv6 sockets (an IPv4 resolver as `::ffff:a.b.c.d`).
#[inline(always)]
pub fn recvmsg6(ctx: &SockAddrContext) -> i32 {
    if let Some(o) = steered(ctx, from_port(ctx)) {
        let mut ip = o.dst.addr;
        if o.dst.family == 4 {
            ip = [0; 16];
            ip[10] = 0xff;
            ip[11] = 0xff;
            ip[12..16].copy_from_slice(&o.dst.ip4());
        }
        for i in 0..4 {
            let w = u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
            unsafe { write_volatile(&mut (*sa(ctx)).user_ip6[i], w) };
        }
        unsafe {
            write_volatile(
                &mut (*sa(ctx)).user_port,
                (o.dst.port as u16).to_be() as u32,
            )
        };
    }
    PASS
}
