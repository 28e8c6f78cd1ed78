//! sock_ops: follows a redirected TCP socket so the proxy can find the original destination
//! by the client address it sees.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
    EbpfContext,
};
use aya_log_ebpf::error;
use egress_common::{skb, v4_mapped, OrigKey, SockAddr};

use crate::maps::{active_set, mark_sock, CONFIG, ORIG_BY_COOKIE, ORIG_BY_TUPLE};

const AF_INET: u32 = 2;

/// The program `egress_sockops` (see main.rs). Most callbacks of a connection (timeouts,
/// windows, ECN, RTT, established) are of no use here: they leave after reading `op` alone.
#[inline(always)]
pub fn on_event(ctx: &SockOpsContext) -> u32 {
    // SAFETY: the context; the verifier checks the read.
    let op = unsafe { read_volatile(&(*ctx.ops).op) };
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        accepted(ctx)
    } else if op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_STATE_CB {
        follow(ctx)
    } else {
        1
    }
}

/// Accepted by a listener of the workload: its packets answer a peer that connected in, and
/// the per-packet program lets them pass (see `egress_common::skb`). A function of its own
/// (a BPF subprogram), so its context reads are not behind a branch (see `follow`).
#[inline(never)]
fn accepted(ctx: &SockOpsContext) -> u32 {
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if !mark_sock(sk.cast(), skb::INBOUND) {
        error!(ctx, "egress: cannot mark an accepted socket as inbound");
    }
    1
}

/// TCP_CONNECT of a redirected socket: key its original destination by its client address
/// (the proxy sees that address as its peer) and follow its state; on CLOSE, forget it.
#[inline(never)]
fn follow(ctx: &SockOpsContext) -> u32 {
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
    // Network order, in the upper 16 bits on a little-endian machine (the kernel shifts it
    // there for sock_ops), in the lower 16 bits on a big-endian one.
    let remote_port = unsafe { read_volatile(&(*ops).remote_port) };
    #[cfg(target_endian = "little")]
    let remote_port = u16::from_be((remote_port >> 16) as u16);
    #[cfg(target_endian = "big")]
    let remote_port = remote_port as u16;

    let closed = op == BPF_SOCK_OPS_STATE_CB && new_state == BPF_TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && !closed {
        return 1;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB && !to_agent_port(remote_port) {
        // Only a socket the connect hook redirected dials the proxy's (or the DNS proxy's)
        // port: the others skip the cookie and the lookup.
        return 1;
    }
    let local = if family == AF_INET {
        SockAddr::v4(ip4, port)
    } else {
        match v4_mapped(&ip6) {
            Some(v4) => SockAddr::v4(v4, port),
            None => SockAddr::v6(ip6, port),
        }
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let local = || OrigKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: local,
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: copied out at once.
        if let Some(o) = unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied() {
            if ORIG_BY_TUPLE.insert(&local(), &o, 0).is_err() {
                error!(
                    ctx,
                    "egress: cannot key original destination by client address"
                );
            }
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
    } else if closed {
        let _ = ORIG_BY_TUPLE.remove(&local());
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    1
}

/// Whether a connection to `port` may be one the connect hook redirected: to the proxy's port
/// or the DNS proxy's, under either policy set (a redirect made just before a switch dials
/// the old set's port). Without a mesh config, every port may be.
#[inline(always)]
fn to_agent_port(port: u16) -> bool {
    let set = active_set();
    let mut any = false;
    for s in [set, set ^ 1] {
        match CONFIG.get(s) {
            Some(c) => {
                any |= port == c.proxy_port || (c.dns_port != 0 && port == c.dns_port);
            }
            None => return true,
        }
    }
    any
}
