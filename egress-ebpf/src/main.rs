//! The in-kernel egress decision path. Thin on purpose: read the context, ask
//! `egress_common::decide`, act (pass, rewrite to the proxy, or refuse with EPERM).
//!
//! This file is the list of programs: each entry point is a line or two calling the logic of
//! its hook (`sock_addr`, `sockops`, `tc`). The function names are the program names the
//! agent loads and attaches by; the maps (`maps`) are found by their `EGRESS_*` names.
#![no_std]
#![no_main]

mod events;
mod maps;
mod skb;
mod sock_addr;
mod sockops;
mod tc;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, classifier, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, TcContext},
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

/// The application sees the address it dialled, not the proxy's.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_addr::getpeername4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_addr::getpeername6(&ctx)
}

/// Re-keys the original destination of a redirected socket by the client's address once the
/// kernel has chosen it (the proxy sees exactly that address as its peer), and forgets both
/// entries when the socket closes.
#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    sockops::on_event(&ctx)
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
