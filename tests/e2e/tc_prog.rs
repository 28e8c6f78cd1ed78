//! The tc backstop's programs run on crafted packets with `BPF_PROG_TEST_RUN` (root only):
//! the object the agent embeds, loaded into private maps (nothing pinned, nothing attached),
//! one pod on the loopback interface's index with a policy written by hand.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use egress_common::{
    action, iface_key, names, policy_key, policy_scope,
    tc::{self, FlowKey, PodAddrs, TcCount},
    MeshConfig, PolicyKeyV4, PolicyKeyV6, PolicyValue, Segment, WorkloadInfo,
};

use crate::harness::privileged;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

const FROM: &str = "egress_tc_from_workload";
const TO: &str = "egress_tc_to_workload";
const TC_SHOT: u32 = 2;
/// TC_NEXT (-1) as the u32 the kernel reports.
const TC_NEXT: u32 = u32::MAX;
/// `lo`: BPF_PROG_TEST_RUN runs the program as if on the loopback device.
const IFINDEX: u32 = 1;
const WID: u32 = 1;

const POD4: [u8; 4] = [10, 200, 0, 2];
const POD6: [u8; 16] = [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const HOST4: [u8; 4] = [192, 0, 2, 30];
const HOST6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30];
const ALLOWED_PORT: u16 = 80;
const DENIED_PORT: u16 = 22;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

struct Backstop {
    ebpf: Ebpf,
}

impl Backstop {
    /// Loads both programs and fills the maps: policy set 0, deny by default, the host
    /// allowed on TCP port 80 (IPv4 and IPv6), the pod on `lo` with its two addresses.
    fn new() -> Backstop {
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("load the object");
        for name in [FROM, TO] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            let t = std::time::Instant::now();
            p.load().unwrap_or_else(|e| panic!("{name}: {e:?}"));
            eprintln!("{name}: loaded in {:?}", t.elapsed());
        }
        let mut active: Array<_, u32> = ebpf.map_mut(names::ACTIVE).unwrap().try_into().unwrap();
        active.set(0, 0, 0).unwrap();
        let mut cfg: Array<_, MeshConfig> =
            ebpf.map_mut(names::CONFIG).unwrap().try_into().unwrap();
        cfg.set(
            0,
            MeshConfig {
                generation: 1,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let mut w: HashMap<_, u64, WorkloadInfo> =
            ebpf.map_mut(names::WORKLOADS).unwrap().try_into().unwrap();
        w.insert(iface_key(IFINDEX, 0), WorkloadInfo { id: WID, _pad0: 0 }, 0)
            .unwrap();
        let mut addrs: HashMap<_, u32, PodAddrs> =
            ebpf.map_mut(names::POD_ADDRS).unwrap().try_into().unwrap();
        addrs
            .insert(
                IFINDEX,
                PodAddrs {
                    ip4: POD4,
                    has4: 1,
                    has6: 1,
                    _pad0: [0; 2],
                    ip6: POD6,
                },
                0,
            )
            .unwrap();
        let mut v = PolicyValue {
            counts: [1, 0, 0],
            ..Default::default()
        };
        v.segs[0] = Segment {
            lo: ALLOWED_PORT,
            hi: ALLOWED_PORT,
            action: action::ALLOW,
            _pad0: [0; 3],
            rule_id: 7,
        };
        let scope = policy_scope(WID, 0);
        let mut p4: LpmTrie<_, PolicyKeyV4, PolicyValue> =
            ebpf.map_mut(names::POLICY_V4).unwrap().try_into().unwrap();
        p4.insert(&Key::new(64, policy_key(scope, &HOST4)), v, 0)
            .unwrap();
        let mut p6: LpmTrie<_, PolicyKeyV6, PolicyValue> =
            ebpf.map_mut(names::POLICY_V6).unwrap().try_into().unwrap();
        p6.insert(&Key::new(160, policy_key(scope, &HOST6)), v, 0)
            .unwrap();
        Backstop { ebpf }
    }

    /// Runs program `name` on `frame`; its return code.
    fn run(&self, name: &str, frame: &[u8]) -> u32 {
        let p: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let fd = p.fd().unwrap().as_fd().as_raw_fd();
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: a bpf_attr of the size given, pointing at a buffer that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        assert_eq!(
            r,
            0,
            "BPF_PROG_TEST_RUN: {}",
            std::io::Error::last_os_error()
        );
        attr.retval
    }

    fn from(&self, frame: &[u8]) -> u32 {
        self.run(FROM, frame)
    }

    /// Packets counted under `slot`, over all CPUs.
    fn count(&self, slot: u8) -> u64 {
        let c: PerCpuArray<_, TcCount> = self
            .ebpf
            .map(names::TC_COUNTERS)
            .unwrap()
            .try_into()
            .unwrap();
        c.get(&tc::tc_index(WID, slot), 0)
            .unwrap()
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    fn replies(&self) -> usize {
        let r: HashMap<_, FlowKey, u8> = self.ebpf.map(names::REPLIES).unwrap().try_into().unwrap();
        r.keys().count()
    }

    /// Runs `frame` through the program from the pod and checks the verdict and that exactly
    /// one packet was counted under `slot`.
    fn expect(&self, what: &str, frame: &[u8], verdict: u32, slot: u8) {
        let before = self.count(slot);
        assert_eq!(self.from(frame), verdict, "{what}");
        assert_eq!(
            self.count(slot),
            before + 1,
            "{what}: counter of slot {slot}"
        );
    }
}

// --- Packet crafting -------------------------------------------------------------------

pub(crate) const TCP: u8 = 6;
const UDP: u8 = 17;
pub(crate) const ICMPV6: u8 = 58;
pub(crate) const DSTOPTS: u8 = 60;
pub(crate) const FRAGMENT: u8 = 44;
pub(crate) const HOPOPTS: u8 = 0;

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

pub(crate) const SYN: u8 = 0x02;

/// IPv4 with options `opts` (a multiple of 4 bytes) and fragment field `frag`.
pub(crate) fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag: u16,
    opts: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let ihl = 20 + opts.len();
    let mut p = vec![0u8; ihl];
    p[0] = 0x40 | (ihl / 4) as u8;
    p[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(opts);
    // The header checksum, so the node's stack would take it too.
    let mut sum: u32 = p
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(l4);
    eth(0x0800, &p)
}

pub(crate) fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src);
    p[24..40].copy_from_slice(&dst);
    p.extend_from_slice(rest);
    eth(0x86dd, &p)
}

/// An 8-byte destination options (or hop-by-hop) header followed by `rest`.
pub(crate) fn opts_header(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![next, 0, 1, 4, 0, 0, 0, 0]; // PadN
    h.extend_from_slice(rest);
    h
}

/// Neighbour solicitation for `target`.
pub(crate) fn ns(target: [u8; 16]) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target);
    m
}

pub(crate) fn solicited_node(a: [u8; 16]) -> [u8; 16] {
    let mut m = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    m[13..].copy_from_slice(&a[13..]);
    m
}

#[test]
fn tc_prog_judges_transport_behind_ipv6_extension_headers() {
    if !privileged() {
        return;
    }
    let b = Backstop::new();
    let deny = tc::tc_verdict(egress_common::Outcome::DenyDefault).0;
    let allow = egress_common::Outcome::Allow as u8;
    // Plain, then behind destination options, then behind hop-by-hop + destination options.
    for (what, wrap) in [
        (
            "plain",
            (|t: Vec<u8>| (TCP, t)) as fn(Vec<u8>) -> (u8, Vec<u8>),
        ),
        ("dest opts", |t| (DSTOPTS, opts_header(TCP, &t))),
        ("hop-by-hop, dest opts", |t| {
            (HOPOPTS, opts_header(DSTOPTS, &opts_header(TCP, &t)))
        }),
    ] {
        let (next, rest) = wrap(tcp(40000, DENIED_PORT, SYN));
        b.expect(what, &ipv6(POD6, HOST6, next, &rest), TC_SHOT, deny);
        let (next, rest) = wrap(tcp(40000, ALLOWED_PORT, SYN));
        b.expect(what, &ipv6(POD6, HOST6, next, &rest), TC_NEXT, allow);
    }
    // An atomic fragment header (offset 0, no more fragments) in front: the same.
    let mut frag = vec![TCP, 0, 0, 0, 0, 0, 0, 9];
    frag.extend_from_slice(&tcp(40000, DENIED_PORT, SYN));
    b.expect(
        "fragment header",
        &ipv6(POD6, HOST6, FRAGMENT, &frag),
        TC_SHOT,
        deny,
    );
    // A routing header with segments left: the destination is only the next hop.
    let mut rh = vec![TCP, 2, 4, 1, 0, 0, 0, 0];
    rh.extend_from_slice(&HOST6);
    rh.extend_from_slice(&tcp(40000, ALLOWED_PORT, SYN));
    b.expect(
        "routing header",
        &ipv6(POD6, HOST6, 43, &rh),
        TC_SHOT,
        tc::TC_SOURCE_ROUTE,
    );
    // Nine destination options headers.
    let mut chain = tcp(40000, ALLOWED_PORT, SYN);
    chain = opts_header(TCP, &chain);
    for _ in 0..9 {
        chain = opts_header(DSTOPTS, &chain);
    }
    b.expect(
        "too many headers",
        &ipv6(POD6, HOST6, DSTOPTS, &chain),
        TC_SHOT,
        tc::TC_TOO_MANY_HEADERS,
    );
    // Truncated: the TCP header is cut after the ports.
    let cut = &ipv6(POD6, HOST6, TCP, &tcp(40000, ALLOWED_PORT, SYN))[..14 + 40 + 4];
    let mut cut = cut.to_vec();
    cut[14 + 5] = 4; // payload length 4
    b.expect("truncated", &cut, TC_SHOT, tc::TC_MALFORMED);
}

#[test]
fn tc_prog_lets_link_control_out_only_on_the_link() {
    if !privileged() {
        return;
    }
    let b = Backstop::new();
    let deny = tc::tc_verdict(egress_common::Outcome::DenyDefault).0;
    let ll: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    // NS to the solicited-node group (also from `::`, duplicate address detection): link.
    let sn = solicited_node(HOST6);
    b.expect(
        "NS",
        &ipv6(ll, sn, ICMPV6, &ns(HOST6)),
        TC_NEXT,
        tc::TC_LINK,
    );
    b.expect(
        "DAD",
        &ipv6([0; 16], sn, ICMPV6, &ns(POD6)),
        TC_NEXT,
        tc::TC_LINK,
    );
    // MLD report behind hop-by-hop to ff02::16: link.
    let mld = opts_header(ICMPV6, &[143, 0, 0, 0, 0, 0, 0, 0]);
    let mut all_routers = [0u8; 16];
    all_routers[0] = 0xff;
    all_routers[1] = 2;
    all_routers[15] = 0x16;
    b.expect(
        "MLD",
        &ipv6(ll, all_routers, HOPOPTS, &mld),
        TC_NEXT,
        tc::TC_LINK,
    );
    // The same messages to a global address are judged: denied here.
    b.expect(
        "NS global",
        &ipv6(POD6, HOST6, ICMPV6, &ns(HOST6)),
        TC_SHOT,
        deny,
    );
    let mld = opts_header(ICMPV6, &[143, 0, 0, 0, 0, 0, 0, 0]);
    b.expect(
        "MLD global",
        &ipv6(POD6, HOST6, HOPOPTS, &mld),
        TC_SHOT,
        deny,
    );
    // `::` outside link control is a spoofed source.
    b.expect(
        "unspecified source",
        &ipv6([0; 16], HOST6, ICMPV6, &ns(HOST6)),
        TC_SHOT,
        tc::TC_SPOOFED,
    );
    // ARP passes; other ethertypes are dropped.
    b.expect("ARP", &eth(0x0806, &[0u8; 28]), TC_NEXT, tc::TC_LINK);
    b.expect("other", &eth(0x88b5, &[0u8; 46]), TC_SHOT, tc::TC_NON_IP);
}

#[test]
fn tc_prog_drops_spoofed_sources_source_routes_and_orphan_fragments() {
    if !privileged() {
        return;
    }
    let b = Backstop::new();
    let allow = egress_common::Outcome::Allow as u8;
    let syn = tcp(40000, ALLOWED_PORT, SYN);
    b.expect(
        "own source",
        &ipv4(POD4, HOST4, TCP, 0, &[], &syn),
        TC_NEXT,
        allow,
    );
    for src in [[10, 200, 0, 3], HOST4, [0, 0, 0, 0]] {
        b.expect(
            "spoofed v4",
            &ipv4(src, HOST4, TCP, 0, &[], &syn),
            TC_SHOT,
            tc::TC_SPOOFED,
        );
    }
    let mut other6 = POD6;
    other6[15] = 3;
    b.expect(
        "spoofed v6",
        &ipv6(other6, HOST6, TCP, &syn),
        TC_SHOT,
        tc::TC_SPOOFED,
    );
    // Loose source route through the allowed host, and strict.
    for kind in [131u8, 137] {
        let opts = [1, kind, 7, 4, 192, 0, 2, 99];
        b.expect(
            "source route",
            &ipv4(POD4, HOST4, TCP, 0, &opts, &syn),
            TC_SHOT,
            tc::TC_SOURCE_ROUTE,
        );
    }
    // A later fragment without its first: dropped. After an allowed first fragment with the
    // same id: passed. A denied first fragment withdraws the pass.
    let later = ipv4(POD4, HOST4, TCP, 3, &[], &[0u8; 24]);
    b.expect("orphan", &later, TC_SHOT, tc::TC_ORPHAN_FRAGMENT);
    b.expect(
        "first fragment",
        &ipv4(POD4, HOST4, TCP, 0x2000, &[], &syn),
        TC_NEXT,
        allow,
    );
    b.expect("later fragment", &later, TC_NEXT, tc::TC_FRAGMENT);
    let deny = tc::tc_verdict(egress_common::Outcome::DenyDefault).0;
    b.expect(
        "denied first fragment",
        &ipv4(POD4, HOST4, TCP, 0x2000, &[], &tcp(1, DENIED_PORT, SYN)),
        TC_SHOT,
        deny,
    );
    b.expect("orphan again", &later, TC_SHOT, tc::TC_ORPHAN_FRAGMENT);
    // IPv6 later fragment without its first.
    let mut frag = vec![TCP, 0, 0, 8 << 3, 0, 0, 0, 5];
    frag.extend_from_slice(&[0u8; 16]);
    b.expect(
        "orphan v6",
        &ipv6(POD6, HOST6, FRAGMENT, &frag),
        TC_SHOT,
        tc::TC_ORPHAN_FRAGMENT,
    );
    // A first fragment too short to hold its TCP header (bytes after the datagram do not
    // count): malformed.
    let mut tiny = ipv4(POD4, HOST4, TCP, 0x2000, &[], &syn);
    tiny[14 + 2..14 + 4].copy_from_slice(&24u16.to_be_bytes());
    b.expect("tiny first fragment", &tiny, TC_SHOT, tc::TC_MALFORMED);
}

#[test]
fn tc_prog_records_replies_only_for_packets_to_the_pod_from_others() {
    if !privileged() {
        return;
    }
    let b = Backstop::new();
    let deny = tc::tc_verdict(egress_common::Outcome::DenyDefault).0;
    // The pod's own address as source, hairpinned back in: no flow.
    assert_eq!(
        b.run(TO, &ipv4(POD4, POD4, TCP, 0, &[], &tcp(1, 2, SYN))),
        TC_NEXT
    );
    // To an address that is not the pod's: no flow.
    assert_eq!(
        b.run(
            TO,
            &ipv4(
                HOST4,
                [10, 200, 0, 9],
                TCP,
                0,
                &[],
                &tcp(DENIED_PORT, 8080, SYN)
            )
        ),
        TC_NEXT
    );
    assert_eq!(b.replies(), 0);
    let answer = ipv4(POD4, HOST4, TCP, 0, &[], &tcp(8080, DENIED_PORT, 0x12));
    b.expect("no flow yet", &answer, TC_SHOT, deny);
    // A real inbound SYN from the host's port 22 to the pod: its answer passes as a reply.
    assert_eq!(
        b.run(
            TO,
            &ipv4(HOST4, POD4, TCP, 0, &[], &tcp(DENIED_PORT, 8080, SYN))
        ),
        TC_NEXT
    );
    assert_eq!(b.replies(), 1);
    b.expect("reply", &answer, TC_NEXT, tc::TC_REPLY);
    // UDP too, IPv6.
    let udp_in = {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&53u16.to_be_bytes());
        u[2..4].copy_from_slice(&5353u16.to_be_bytes());
        u
    };
    assert_eq!(b.run(TO, &ipv6(HOST6, POD6, UDP, &udp_in)), TC_NEXT);
    let mut udp_out = udp_in.clone();
    udp_out[0..2].copy_from_slice(&5353u16.to_be_bytes());
    udp_out[2..4].copy_from_slice(&53u16.to_be_bytes());
    b.expect(
        "udp reply",
        &ipv6(POD6, HOST6, UDP, &udp_out),
        TC_NEXT,
        tc::TC_REPLY,
    );
}
