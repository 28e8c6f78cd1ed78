//! The proxy's in-kernel relay (see `egress_common::relay`): a byte that arrives on one
//! socket of a relayed connection leaves by the other one.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::map, maps::SockHash, programs::SkBuffContext,
};
use egress_common::relay::{redirects, RELAY_SOCKETS, SK_DROP, SK_PASS};

/// Socket cookie -> the peer socket (the redirect targets).
#[map(name = "EGRESS_RELAY_PEERS")]
static RELAY_PEERS: SockHash<u64> = SockHash::with_max_entries(RELAY_SOCKETS, 0);

/// The sockets whose received bytes the verdict program redirects (it is attached here).
#[map(name = "EGRESS_RELAY")]
static RELAY: SockHash<u64> = SockHash::with_max_entries(RELAY_SOCKETS, 0);

/// Redirects the bytes to the egress of the peer socket (an empty skb, a bare FIN, is
/// dropped: see `egress_common::relay::redirects`). Without a peer (being torn down)
/// `bpf_sk_redirect_hash` sets no redirect and SK_PASS keeps the bytes on their own socket:
/// never a drop of bytes TCP has already acknowledged.
#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    if !redirects(ctx.len()) {
        return SK_DROP;
    }
    // The socket the skb arrived on (skb->sk).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let _ = RELAY_PEERS.redirect_skb(ctx, cookie, 0);
    // Keep the map referenced from the object (the agent attaches the program to it).
    let _ = &RELAY;
    SK_PASS
}
