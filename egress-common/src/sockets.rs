//! Which sockets a workload may open at all. The connect/sendmsg hooks judge TCP, UDP and MPTCP
//! by destination; the per-packet programs judge ICMP echo. Everything else (raw IP, packet
//! sockets, UDP-Lite, SCTP, DCCP, any protocol the datapath does not parse) would carry bytes
//! that no hook judges, so `socket()` itself is refused unless the MeshConfig allows that kind
//! (`spec.sockets`).

/// Address families (`linux/socket.h`).
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const AF_PACKET: u32 = 17;
pub const AF_XDP: u32 = 44;

/// Socket types (without SOCK_NONBLOCK/SOCK_CLOEXEC, as the kernel stores them).
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;

pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_MPTCP: u32 = 262;

/// Kinds of sockets, as bits of [`crate::MeshConfig::sockets_allowed`].
pub mod kind {
    /// `SOCK_RAW` in AF_INET/AF_INET6: any IP packet the process writes.
    pub const RAW: u32 = 1;
    /// AF_PACKET and AF_XDP: whole link-layer frames.
    pub const PACKET: u32 = 2;
    /// Ping sockets (`SOCK_DGRAM` with ICMP/ICMPv6): judged per packet.
    pub const ICMP: u32 = 4;
    /// Any other AF_INET/AF_INET6 protocol (UDP-Lite, SCTP, DCCP, ...).
    pub const OTHER: u32 = 8;
    /// The defaults: ping works (judged per packet by destination); raw, packet and unknown
    /// protocols are refused.
    pub const DEFAULT_ALLOWED: u32 = ICMP;
}

/// The kind of a new socket; `None` for the sockets the socket hooks judge (TCP, UDP, MPTCP)
/// and for families that carry no IP traffic of their own (unix, netlink, ...).
#[inline(always)]
pub fn kind_of(family: u32, ty: u32, protocol: u32) -> Option<u32> {
    match family {
        AF_PACKET | AF_XDP => Some(kind::PACKET),
        AF_INET | AF_INET6 => {
            let icmp = if family == AF_INET {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
            match (ty, protocol) {
                (SOCK_RAW, _) => Some(kind::RAW),
                (SOCK_STREAM, IPPROTO_TCP | IPPROTO_MPTCP) => None,
                (SOCK_DGRAM, IPPROTO_UDP) => None,
                (SOCK_DGRAM, p) if p == icmp => Some(kind::ICMP),
                _ => Some(kind::OTHER),
            }
        }
        _ => None,
    }
}

/// Whether `socket(family, ty, protocol)` is refused under `allowed` (bits of [`kind`]).
#[inline(always)]
pub fn refused(family: u32, ty: u32, protocol: u32, allowed: u32) -> bool {
    match kind_of(family, ty, protocol) {
        Some(k) => allowed & k == 0,
        None => false,
    }
}

/// Socket option levels and names that would let a workload's frames past every hook.
pub const SOL_PACKET: i32 = 263;
/// A packet socket's frames go straight to the driver, skipping the qdisc layer and with it
/// the node interfaces' tc programs.
pub const PACKET_QDISC_BYPASS: i32 = 20;
/// Every AF_XDP option (`XDP_UMEM_REG`, the rings): an AF_XDP socket cannot send without them.
pub const SOL_XDP: i32 = 283;

/// The kind of socket `setsockopt(level, optname)` belongs to when the option would carry
/// frames past the stack's hooks and the node interfaces' tc programs: a packet socket's
/// `PACKET_QDISC_BYPASS`, and AF_XDP's set-up (its frames go to the driver directly). Refused
/// like the socket itself (`cgroup/setsockopt`), so that where the `socket_create` LSM cannot
/// refuse packet sockets, their frames still meet the node backstop (see [`node_frame_refused`]).
#[inline(always)]
pub fn sockopt_kind(level: i32, optname: i32) -> Option<u32> {
    match (level, optname) {
        (SOL_PACKET, PACKET_QDISC_BYPASS) | (SOL_XDP, _) => Some(kind::PACKET),
        _ => None,
    }
}

/// Whether a frame written by a workload's socket of `family` is dropped at a node interface
/// (the node backstop, tc egress) under `allowed`: packet sockets' frames when packet sockets
/// are not allowed. IP sockets' packets were judged by the socket hooks and the per-packet
/// program already.
#[inline(always)]
pub fn node_frame_refused(family: u32, allowed: u32) -> bool {
    writes_frames(family) && allowed & kind::PACKET == 0
}

/// Whether a socket of `family` writes whole frames (packet sockets, AF_XDP): the node
/// backstop asks this first, before it reads the mesh config, as nearly every frame it sees
/// comes from an IP socket.
#[inline(always)]
pub fn writes_frames(family: u32) -> bool {
    matches!(family, AF_PACKET | AF_XDP)
}

/// Stable name of a kind (flow log, metrics, MeshConfig field).
pub fn kind_name(k: u32) -> &'static str {
    match k {
        kind::RAW => "raw",
        kind::PACKET => "packet",
        kind::ICMP => "icmp",
        _ => "other",
    }
}

/// Where socket refusals are counted in `EGRESS_COUNTERS`: the four protocol slots of outcome 0,
/// which no [`crate::Outcome`] uses, one per kind (no new map, the same layout).
#[inline(always)]
pub fn counter_index(workload_id: u32, k: u32) -> u32 {
    workload_id * crate::COUNTER_SLOTS + kind_slot(k)
}

/// 0..4: the counter slot of a kind.
#[inline(always)]
pub fn kind_slot(k: u32) -> u32 {
    match k {
        kind::RAW => 0,
        kind::PACKET => 1,
        kind::ICMP => 2,
        _ => 3,
    }
}

/// Every kind, in counter-slot order.
pub const KINDS: [u32; 4] = [kind::RAW, kind::PACKET, kind::ICMP, kind::OTHER];

/// A refused (or, in audit mode, reported) `socket()` as a verdict event's destination: the
/// address family in `family`, the protocol in `port`, the type in the first address bytes
/// (the event's `proto` is the kind). See [`crate::hook::SOCK_CREATE`].
#[inline(always)]
pub fn event_addr(family: u32, ty: u32, protocol: u32) -> crate::SockAddr {
    let t = ty.to_ne_bytes();
    let mut addr = [0u8; 16];
    addr[0] = t[0];
    addr[1] = t[1];
    addr[2] = t[2];
    addr[3] = t[3];
    crate::SockAddr {
        family,
        port: protocol,
        addr,
    }
}

/// `(family, type, protocol)` of an [`event_addr`].
pub fn event_socket(a: &crate::SockAddr) -> (u32, u32, u32) {
    let ty = u32::from_ne_bytes([a.addr[0], a.addr[1], a.addr[2], a.addr[3]]);
    (a.family, ty, a.port)
}

/// Stable name of an address family (flow log).
pub fn family_name(f: u32) -> &'static str {
    match f {
        AF_INET => "inet",
        AF_INET6 => "inet6",
        AF_PACKET => "packet",
        AF_XDP => "xdp",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDPLITE: u32 = 136;
    const SCTP: u32 = 132;

    #[test]
    fn judged_sockets_pass() {
        for (f, t, p) in [
            (AF_INET, SOCK_STREAM, IPPROTO_TCP),
            (AF_INET6, SOCK_STREAM, IPPROTO_TCP),
            (AF_INET, SOCK_STREAM, IPPROTO_MPTCP),
            (AF_INET, SOCK_DGRAM, IPPROTO_UDP),
            (AF_INET6, SOCK_DGRAM, IPPROTO_UDP),
            (1, SOCK_STREAM, 0), // unix
            (16, SOCK_RAW, 0),   // netlink (getaddrinfo, ip)
        ] {
            assert_eq!(kind_of(f, t, p), None, "{f} {t} {p}");
            assert!(!refused(f, t, p, 0));
        }
    }

    #[test]
    fn unjudged_sockets_are_refused_by_default() {
        let d = kind::DEFAULT_ALLOWED;
        assert!(refused(AF_INET, SOCK_RAW, IPPROTO_ICMP, d));
        assert!(refused(AF_INET6, SOCK_RAW, 255, d));
        assert!(refused(AF_PACKET, SOCK_RAW, 0x0300, d));
        assert!(refused(AF_XDP, SOCK_RAW, 0, d));
        assert!(refused(AF_INET, SOCK_DGRAM, UDPLITE, d));
        assert!(refused(AF_INET6, SOCK_STREAM, SCTP, d));
        // Ping sockets are allowed by default; their packets are judged.
        assert!(!refused(AF_INET, SOCK_DGRAM, IPPROTO_ICMP, d));
        assert!(!refused(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6, d));
        // ICMPv6 on an AF_INET socket is no ping socket.
        assert_eq!(
            kind_of(AF_INET, SOCK_DGRAM, IPPROTO_ICMPV6),
            Some(kind::OTHER)
        );
    }

    #[test]
    fn kinds_can_be_allowed_one_by_one() {
        assert!(!refused(AF_INET, SOCK_RAW, 1, kind::RAW));
        assert!(refused(AF_INET, SOCK_DGRAM, 1, kind::RAW));
        assert!(!refused(AF_PACKET, SOCK_RAW, 0, kind::PACKET));
        assert!(!refused(AF_INET, SOCK_DGRAM, UDPLITE, kind::OTHER));
        assert_eq!(kind_name(kind::PACKET), "packet");
    }

    #[test]
    fn packet_socket_bypasses_are_refused_with_packet_sockets() {
        assert_eq!(
            sockopt_kind(SOL_PACKET, PACKET_QDISC_BYPASS),
            Some(kind::PACKET)
        );
        assert_eq!(sockopt_kind(SOL_XDP, 4), Some(kind::PACKET)); // XDP_UMEM_REG
        assert_eq!(sockopt_kind(SOL_PACKET, 1), None); // PACKET_ADD_MEMBERSHIP
        assert_eq!(sockopt_kind(6, 1), None); // TCP_NODELAY
        assert_eq!(sockopt_kind(1, 20), None); // SOL_SOCKET
        let d = kind::DEFAULT_ALLOWED;
        assert!(node_frame_refused(AF_PACKET, d));
        assert!(node_frame_refused(AF_XDP, d));
        assert!(!node_frame_refused(AF_PACKET, d | kind::PACKET));
        assert!(!node_frame_refused(AF_INET, d));
        assert!(!node_frame_refused(AF_INET6, 0));
    }

    #[test]
    fn counters_use_the_free_slots_of_outcome_zero() {
        let slots: [u32; 4] = KINDS.map(|k| counter_index(3, k));
        assert_eq!(slots, [192, 193, 194, 195]);
        // No outcome, nor EVENT_LOST, lands there.
        for o in crate::Outcome::ALL {
            for p in [crate::proto::TCP, crate::proto::UDP, 0] {
                assert!(!slots.contains(&crate::counter_index(3, o as u8, p)));
            }
        }
        assert!(!slots.contains(&crate::counter_index(3, crate::EVENT_LOST, 0)));
        let a = event_addr(AF_INET, SOCK_DGRAM, 136);
        assert_eq!(event_socket(&a), (AF_INET, SOCK_DGRAM, 136));
    }
}
