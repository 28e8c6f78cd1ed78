//! `MeshConfig spec.sockets`: the socket kinds workloads may open beyond TCP, UDP and MPTCP.

use serde::Deserialize;

/// `spec.sockets`: which socket kinds workloads may open beyond TCP, UDP and MPTCP (whose
/// connections the socket hooks judge by destination).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SocketsSpec {
    /// Raw IP sockets (`SOCK_RAW`, root or CAP_NET_RAW): any packet the process writes.
    pub raw: SocketRule,
    /// AF_PACKET and AF_XDP sockets: whole frames, below IP.
    pub packet: SocketRule,
    /// Ping sockets (`SOCK_DGRAM` ICMP/ICMPv6): each echo is judged by its destination.
    pub icmp: SocketRule,
    /// Every other IP protocol (UDP-Lite, SCTP, DCCP, ...).
    pub other: SocketRule,
}

impl Default for SocketsSpec {
    fn default() -> Self {
        Self {
            raw: SocketRule::Deny,
            packet: SocketRule::Deny,
            icmp: SocketRule::Allow,
            other: SocketRule::Deny,
        }
    }
}

impl SocketsSpec {
    /// The kernel's bit set ([`egress_common::sockets::kind`]) of allowed kinds.
    pub fn allowed_bits(&self) -> u32 {
        use egress_common::sockets::kind;
        [
            (self.raw, kind::RAW),
            (self.packet, kind::PACKET),
            (self.icmp, kind::ICMP),
            (self.other, kind::OTHER),
        ]
        .into_iter()
        .filter(|(r, _)| *r == SocketRule::Allow)
        .fold(0, |bits, (_, k)| bits | k)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketRule {
    Allow,
    Deny,
}
