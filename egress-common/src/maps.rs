//! Map keys and values. Names of the maps are in [`names`].

use core::mem::size_of;

/// Names of the maps in the eBPF object (also the names of their pins).
pub mod names {
    pub const ACTIVE: &str = "EGRESS_ACTIVE";
    pub const CONFIG: &str = "EGRESS_CONFIG";
    pub const WORKLOADS: &str = "EGRESS_WORKLOADS";
    pub const POLICY_V4: &str = "EGRESS_POLICY_V4";
    pub const POLICY_V6: &str = "EGRESS_POLICY_V6";
    pub const MESH_V4: &str = "EGRESS_MESH_V4";
    pub const MESH_V6: &str = "EGRESS_MESH_V6";
    /// The original destination of each redirected connection the proxy has not accepted
    /// yet, by the client's address (the proxy takes the entry at accept).
    pub const ORIG_BY_TUPLE: &str = "EGRESS_ORIG_TUPLE";
    /// The original destination of a redirected socket, in its socket-local storage (freed
    /// with the socket): for getpeername, recvmsg and the per-packet program.
    pub const SOCK_ORIG: &str = "EGRESS_SOCK_ORIG";
    pub const COUNTERS: &str = "EGRESS_COUNTERS";
    pub const EVENTS: &str = "EGRESS_EVENTS";
    pub const TC_COUNTERS: &str = "EGRESS_TC_COUNTERS";
    pub const REPLIES: &str = "EGRESS_REPLIES";
    pub const FRAGMENTS: &str = "EGRESS_FRAGMENTS";
    pub const POD_ADDRS: &str = "EGRESS_POD_ADDRS";
    /// Sockets accepted by a workload's listener (socket-local storage, `skb::INBOUND`, cloned
    /// from a listener to the sockets it accepts).
    pub const SOCK_MARKS: &str = "EGRESS_SOCK_MARKS";
    /// The per-packet program's verdict cache, by (cgroup, destination, protocol).
    pub const DST_VERDICTS: &str = "EGRESS_DST_VERDICTS";
    /// Packets the per-packet program dropped, per (workload, reason), per CPU.
    pub const PACKET_DROPS: &str = "EGRESS_PACKET_DROPS";
    /// Addresses workloads learned from DNS answers for name rules (see [`crate::fqdn`]).
    pub const NAMES: &str = "EGRESS_NAMES";
    /// Bumped by the agent whenever it writes learned names: cached drops older than it are
    /// judged again.
    pub const NAMES_EPOCH: &str = "EGRESS_NAMES_EPOCH";
    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 20] = [
        ACTIVE,
        CONFIG,
        WORKLOADS,
        POLICY_V4,
        POLICY_V6,
        MESH_V4,
        MESH_V6,
        ORIG_BY_TUPLE,
        SOCK_ORIG,
        COUNTERS,
        EVENTS,
        TC_COUNTERS,
        REPLIES,
        FRAGMENTS,
        POD_ADDRS,
        SOCK_MARKS,
        DST_VERDICTS,
        PACKET_DROPS,
        NAMES,
        NAMES_EPOCH,
    ];
}

/// Capacity of the maps (entries).
pub mod capacity {
    /// Workload ids are 1..MAX_WORKLOADS; 0 is never a workload.
    pub const MAX_WORKLOADS: u32 = 1024;
    /// cgroup ids that resolve to a workload, for both policy sets.
    pub const WORKLOAD_CGROUPS: u32 = 2 * MAX_WORKLOADS;
    /// Distinct (workload, prefix) entries per address family, for both policy sets.
    pub const POLICY_PREFIXES: u32 = 2 * 131_072;
    pub const MESH_PREFIXES: u32 = 2 * 256;
    /// Redirected sockets tracked at once (LRU; entries are also removed on close).
    pub const ORIG_DST: u32 = 65_536;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Pending event bytes above which the kernel wakes the agent; below, the agent polls.
    pub const EVENTS_WAKEUP_BYTES: u64 = 1 << 18;
    /// Nesting below a workload's cgroup that still counts as that workload.
    pub const MAX_CGROUP_NESTING: u32 = 8;
    /// Connections into workloads whose replies the tc backstop lets out (LRU).
    pub const REPLIES: u32 = 65_536;
    /// Fragmented datagrams leaving workloads whose first fragment passed (LRU).
    pub const FRAGMENTS: u32 = 16_384;
    /// Pod interfaces whose addresses the tc backstop knows.
    pub const POD_IFACES: u32 = MAX_WORKLOADS;
    /// (cgroup, destination, protocol) verdicts the per-packet program remembers (LRU; an
    /// evicted or stale entry is judged again in full).
    pub const DST_VERDICTS: u32 = 65_536;
    /// (workload, address) pairs learned from DNS answers for name rules, over all workloads.
    pub const NAMES: u32 = 131_072;
}

/// Port segments one (workload, prefix) entry holds, over all protocol classes. The agent
/// compiles every rule that applies to the prefix (its own and those of every shorter prefix
/// that contains it: an LPM lookup returns only the longest match, and a deny on a shorter
/// prefix must still win) into sorted, non-overlapping port ranges per protocol, each with the
/// one action that wins there. The kernel stops at the first segment at or past the port, a
/// scan the verifier checks in time linear in this bound.
pub const MAX_SEGMENTS: usize = 16;

/// The mesh-wide settings, element 0 of the `EGRESS_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// Policy generation the maps currently hold.
    pub generation: u64,
    /// The agent's own cgroup: its sockets are never judged (exempt by cgroup id, not uid/mark).
    pub agent_cgroup_id: u64,
    /// 1: unmatched external traffic passes; 0: only what a policy allows.
    pub enable_egress: u32,
    /// 1: `failMode: open` (an internal error lets the connection go direct).
    pub fail_open: u32,
    /// 1: would-deny is allowed and reported.
    pub audit_mode: u32,
    /// cgroup v2 level of the agent's cgroup root (the mount's root is level 0).
    pub root_level: u32,
    /// The proxy's port, host order.
    pub proxy_port: u16,
    /// The DNS proxy's port (UDP and TCP, on the proxy's addresses), host order; 0: workloads'
    /// DNS is not steered (`spec.dns` off). See [`crate::fqdn`].
    pub dns_port: u16,
    /// The proxy's IPv4 address (network order bytes), also used for IPv4-mapped destinations.
    pub proxy_ip4: [u8; 4],
    /// The proxy's IPv6 address (network order bytes).
    pub proxy_ip6: [u8; 16],
    /// 1: a verdict event for every judged connection; 0: only for those not let through
    /// plainly (deny, proxy, audit, error). Allowed traffic is always counted.
    pub events_all: u32,
    /// 1 (Kubernetes mode, where every cgroup below the root is a pod's): a cgroup below the
    /// root that is no workload (a pod not enrolled yet) is judged an internal error, refused
    /// unless `failMode: open`. 0: such cgroups are untouched. (Was padding: same layout.)
    pub refuse_unenrolled: u32,
    /// Socket kinds workloads may open beyond TCP, UDP and MPTCP: bits of
    /// [`crate::sockets::kind`] (`spec.sockets`). The others are refused at `socket()`.
    pub sockets_allowed: u32,
    pub _pad1: u32,
}

/// What the kernel knows about one enrolled cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// 1..MAX_WORKLOADS, the scope of its policy entries.
    pub id: u32,
    pub _pad0: u32,
}

/// The maps hold two policy sets, 0 and 1; `EGRESS_ACTIVE` says which one the programs read.
/// The agent writes the other set completely, then flips `EGRESS_ACTIVE` (one aligned u32
/// write): every connect sees one whole policy, never a mix or an empty map. The set is part
/// of every key: the config slot, the cgroup key's top bit, the policy scope's top bit, the
/// mesh key's first byte.
#[inline(always)]
pub fn workload_key(cgroup_id: u64, set: u32) -> u64 {
    (cgroup_id & !(1 << 63)) | ((set as u64 & 1) << 63)
}

/// Tag of the `EGRESS_WORKLOADS` keys that name a network interface (the host side of a
/// workload's veth, for the tc backstop) rather than a cgroup. cgroup ids are inode numbers and
/// never reach bit 62.
pub const IFACE_TAG: u64 = 1 << 62;

/// The `EGRESS_WORKLOADS` key of an interface in a set.
#[inline(always)]
pub fn iface_key(ifindex: u32, set: u32) -> u64 {
    workload_key(IFACE_TAG | ifindex as u64, set)
}

/// The scope of a workload's policy entries in a set.
#[inline(always)]
pub fn policy_scope(workload_id: u32, set: u32) -> u32 {
    (workload_id & !(1 << 31)) | ((set & 1) << 31)
}

/// LPM key data for the mesh CIDR tries: the set, then the address. Prefix length 8 + CIDR.
pub type MeshKeyV4 = [u8; 1 + 4];
pub type MeshKeyV6 = [u8; 1 + 16];

#[inline(always)]
pub fn mesh_key<const N: usize, const A: usize>(set: u32, addr: &[u8; A]) -> [u8; N] {
    let mut k = [0u8; N];
    k[0] = (set & 1) as u8;
    let mut j = 0;
    while j < A && 1 + j < N {
        k[1 + j] = addr[j];
        j += 1;
    }
    k
}

/// LPM key data for the policy tries: scope ([`policy_scope`], big-endian) then the address.
/// The prefix length of a key is 32 + the CIDR's length.
pub type PolicyKeyV4 = [u8; 4 + 4];
pub type PolicyKeyV6 = [u8; 4 + 16];

/// Builds the key data of a policy trie from a workload id and an address.
#[inline(always)]
pub fn policy_key<const N: usize, const A: usize>(workload: u32, addr: &[u8; A]) -> [u8; N] {
    let mut k = [0u8; N];
    let w = workload.to_be_bytes();
    let mut i = 0;
    while i < 4 {
        k[i] = w[i];
        i += 1;
    }
    let mut j = 0;
    while j < A && 4 + j < N {
        k[4 + j] = addr[j];
        j += 1;
    }
    k
}

/// One rule as the agent compiles it (before segmentation): a port range of a protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// Inclusive port range, host order; 0..=65535 means every port.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`crate::proto`]: ANY, TCP or UDP.
    pub proto: u8,
    /// [`crate::action`]: ALLOW, PROXY or DENY.
    pub action: u8,
    /// Index of the Egress object in the compiled policy (for `check`, events and metrics).
    pub rule_id: u32,
}

/// A port range of one protocol class and the action that wins there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Inclusive, host order.
    pub lo: u16,
    pub hi: u16,
    /// [`crate::action`].
    pub action: u8,
    pub _pad0: [u8; 3],
    pub rule_id: u32,
}

/// Value of a policy trie entry: the segments of TCP, then UDP, then other protocols.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// Segments per class: TCP, UDP, other.
    pub counts: [u8; 3],
    pub _pad0: u8,
    pub segs: [Segment; MAX_SEGMENTS],
}

impl Default for PolicyValue {
    fn default() -> Self {
        Self {
            counts: [0; 3],
            _pad0: 0,
            segs: [Segment::default(); MAX_SEGMENTS],
        }
    }
}

/// The segment class of a protocol: 0 TCP, 1 UDP, 2 any other.
#[inline(always)]
pub fn proto_class(p: u8) -> usize {
    match p {
        crate::proto::TCP => 0,
        crate::proto::UDP => 1,
        _ => 2,
    }
}

impl PolicyValue {
    /// (first index, count) of a protocol's segments.
    #[inline(always)]
    pub fn class(&self, p: u8) -> (usize, usize) {
        let (t, u, o) = (
            self.counts[0] as usize,
            self.counts[1] as usize,
            self.counts[2] as usize,
        );
        match proto_class(p) {
            0 => (0, t),
            1 => (t, u),
            _ => (t + u, o),
        }
    }
}

/// A socket address: family 4 or 6, address bytes in network order (IPv4 in the first four),
/// port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub family: u32,
    pub port: u32,
    pub addr: [u8; 16],
}

impl SockAddr {
    /// As a standard socket address (userspace).
    pub fn socket_addr(&self) -> core::net::SocketAddr {
        let port = self.port as u16;
        if self.family == 4 {
            let a = self.addr;
            core::net::SocketAddr::from(([a[0], a[1], a[2], a[3]], port))
        } else {
            core::net::SocketAddr::from((self.addr, port))
        }
    }

    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16) -> Self {
        let mut a = [0u8; 16];
        a[0] = addr[0];
        a[1] = addr[1];
        a[2] = addr[2];
        a[3] = addr[3];
        Self {
            family: 4,
            port: port as u32,
            addr: a,
        }
    }

    #[inline(always)]
    pub fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            family: 6,
            port: port as u32,
            addr,
        }
    }

    #[inline(always)]
    pub fn ip4(&self) -> [u8; 4] {
        [self.addr[0], self.addr[1], self.addr[2], self.addr[3]]
    }
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
#[inline(always)]
pub fn v4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// The original destination of a redirected socket, kept by the kernel for the proxy
/// (keyed by the client's address) and for getpeername (in the socket's own storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// As the kernel judged it (an IPv4-mapped address is family 4).
    pub dst: SockAddr,
    pub cgroup_id: u64,
    pub workload_id: u32,
    pub rule_id: u32,
    /// 1 when the application dialled the IPv4-mapped form on an IPv6 socket.
    pub mapped: u32,
    pub _pad0: u32,
    /// `bpf_get_netns_cookie` of the socket's namespace, read at connect: the per-packet
    /// program keys the entry for the proxy with it at the socket's SYN.
    pub netns: u64,
}

/// Key of `EGRESS_ORIG_TUPLE`: the client's address of a redirected connection in its network
/// namespace (every pod has its own 127.0.0.1, so the address alone is ambiguous).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    /// `bpf_get_netns_cookie` of the socket's namespace (`SO_NETNS_COOKIE` in userspace).
    pub netns: u64,
    pub addr: SockAddr,
}

/// Where a verdict event came from.
pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
    /// The tc backstop on a workload's interface.
    pub const TC: u8 = 5;
    /// `cgroup/sock_create`: a socket kind no hook judges ([`crate::sockets::event_addr`]).
    pub const SOCK_CREATE: u8 = 6;
    /// The `socket_create` LSM (cgroup) hook: packet sockets.
    pub const LSM_SOCKET_CREATE: u8 = 7;
    /// The per-packet `cgroup_skb/egress` program (outcome: a [`crate::skb`] drop slot).
    pub const SKB: u8 = 12;
    /// `cgroup/setsockopt`: an option that would carry a packet socket's frames past every
    /// hook ([`crate::sockets::sockopt_kind`]); the event is a socket's, as for
    /// [`SOCK_CREATE`].
    pub const SETSOCKOPT: u8 = 13;
}

/// One decision, written to the `EGRESS_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub dst: SockAddr,
    pub workload_id: u32,
    pub rule_id: u32,
    pub generation: u32,
    /// [`crate::Outcome`] as u8.
    pub outcome: u8,
    pub proto: u8,
    pub hook: u8,
    pub _pad0: u8,
}

/// Index into the per-CPU `EGRESS_COUNTERS` array.
#[inline(always)]
pub fn counter_index(workload_id: u32, outcome: u8, proto: u8) -> u32 {
    let p = match proto {
        crate::proto::TCP => 0,
        crate::proto::UDP => 1,
        _ => 2,
    };
    workload_id * COUNTER_SLOTS + (outcome as u32) * 4 + p
}

/// The counter slot (in place of an outcome) of verdict events the ring buffer could not take.
pub const EVENT_LOST: u8 = 15;

/// Counters per workload: 16 outcomes x 4 protocol slots.
pub const COUNTER_SLOTS: u32 = 64;
pub const COUNTERS_LEN: u32 = capacity::MAX_WORKLOADS * COUNTER_SLOTS;

const _: () = assert!(size_of::<MeshConfig>() == 72);
const _: () = assert!(size_of::<WorkloadInfo>() == 8);
const _: () = assert!(size_of::<Segment>() == 12);
const _: () = assert!(size_of::<PolicyValue>() == 4 + 12 * MAX_SEGMENTS);
const _: () = assert!(size_of::<SockAddr>() == 24);
const _: () = assert!(size_of::<OrigDst>() == 56);
const _: () = assert!(size_of::<VerdictEvent>() == 64);
const _: () = assert!(size_of::<OrigKey>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for MeshConfig {}
    unsafe impl aya::Pod for WorkloadInfo {}
    unsafe impl aya::Pod for Segment {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for OrigKey {}
}
