//! The in-kernel egress decision path. Thin on purpose: read the context, ask
//! `egress_common::decide`, act (pass, rewrite to the proxy, or refuse with EPERM).
//!
//! This file is the list of programs: each entry point is a line or two calling the logic of
//! its hook (`sock_addr`, `skb`, `tc`). The function names are the program names the
//! agent loads and attaches by; the maps (`maps`) are found by their `EGRESS_*` names.
#![no_std]
#![no_main]

mod dns;
mod events;
mod maps;
mod relay;
mod skb;
mod sock_addr;
mod sock_create;
mod tc;
mod tc_node;

use aya_ebpf::{
    macros::{
        cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier, lsm_cgroup,
        stream_verdict,
    },
    programs::{
        LsmContext, SkBuffContext, SockAddrContext, SockContext, SockoptContext, TcContext,
    },
};
use egress_common::{hook, proto};

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let p = sock_addr::protocol(&ctx);
    sock_addr::sock4(&ctx, p, hook::CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let p = sock_addr::protocol(&ctx);
    sock_addr::sock6(&ctx, p, hook::CONNECT6)
}

// sendmsg runs for UDP datagrams sent with an explicit address (sendto without connect).
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::sock4(&ctx, proto::UDP, hook::SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::sock6(&ctx, proto::UDP, hook::SENDMSG6)
}

/// A reply from the DNS proxy to an unconnected UDP client shows the resolver it asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::recvmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::recvmsg6(&ctx)
}

/// The application sees the address it dialled, not the proxy's.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_addr::getpeername4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_addr::getpeername6(&ctx)
}

/// socket() of an AF_INET/AF_INET6 socket: kinds no hook judges are refused (EPERM) unless
/// `spec.sockets` allows them.
#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context is the new socket; the verifier checks every field read.
    let (f, t, p) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).type_),
            core::ptr::read_volatile(&(*sk).protocol),
        )
    };
    sock_create::judge(f, t, p, 0, hook::SOCK_CREATE)
}

/// socket() of any family, for packet sockets (AF_PACKET, AF_XDP), which cgroup/sock_create
/// never sees: `security_socket_create(family, type, protocol, kern)`.
#[lsm_cgroup(hook = "socket_create")]
pub fn egress_lsm_socket_create(ctx: LsmContext) -> i32 {
    let (f, t, p, kern): (i32, i32, i32, i32) = (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    if kern != 0 {
        return sock_create::ALLOW; // the kernel's own sockets
    }
    sock_create::judge(
        f as u32,
        t as u32,
        p as u32,
        egress_common::sockets::kind::PACKET,
        hook::LSM_SOCKET_CREATE,
    )
}

/// setsockopt() of an option that would send a packet socket's frames past every hook
/// (`PACKET_QDISC_BYPASS`, AF_XDP's set-up): refused (EPERM) unless `spec.sockets` allows
/// packet sockets.
#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt(ctx: SockoptContext) -> i32 {
    sock_create::setsockopt(&ctx)
}

/// Every packet a workload's sockets send, judged by its real destination (fast path: the
/// socket's remembered verdict). Catches connections older than the agent or the policy,
/// source routes, and ping sockets' unconnected sendto().
#[cgroup_skb(egress)]
pub fn egress_skb_egress(ctx: SkBuffContext) -> i32 {
    skb::egress(&ctx)
}

/// Packets leaving a workload (ingress of the host side of its veth): judged by the policy
/// of the workload that owns the interface, exactly as its sockets are.
#[classifier]
pub fn egress_tc_from_workload(ctx: TcContext) -> i32 {
    tc::from_workload(&ctx)
}

/// Packets into a workload (egress of the host side of its veth): a peer opening a connection
/// into the workload (TCP SYN, or a UDP datagram) makes that flow's replies pass unjudged.
#[classifier]
pub fn egress_tc_to_workload(ctx: TcContext) -> i32 {
    tc::to_workload(&ctx)
}

/// The proxy's in-kernel relay: bytes a relayed socket receives leave by its peer.
#[stream_verdict]
pub fn egress_relay_verdict(ctx: SkBuffContext) -> u32 {
    relay::verdict(&ctx)
}

/// Frames leaving a node interface (`run --node-interface`): those a workload wrote through
/// a packet socket are dropped unless `spec.sockets` allows packet sockets.
#[classifier]
pub fn egress_tc_node(ctx: TcContext) -> i32 {
    tc_node::from_node(&ctx)
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
