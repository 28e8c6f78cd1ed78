//! Packets crafted inside a pod to slip past the tc backstop (the holes of "Seal the kernel
//! path"), sent as Ethernet frames from a packet socket (the whole frame is the pod's: no socket hook
//! and no per-packet socket program sees it), with a sniffer in
//! the outside namespace: none of them reaches the outside, and the drop counters move by
//! exactly the number of packets, under their reason.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    harness::{privileged_with, Agent, PACKETS_PY as PACKETS},
    pods::{drops, metric, Net, ALLOW4, ALLOW6, DENY4, DENY6, POD4, POD6, PORT},
    tc_prog::{ipv4, ipv6, ns, opts_header, tcp, DSTOPTS, FRAGMENT, HOPOPTS, ICMPV6, SYN, TCP},
};

const DENIED_PORT: u16 = 22;

fn v4(a: &str) -> [u8; 4] {
    a.parse::<Ipv4Addr>().unwrap().octets()
}

fn v6(a: &str) -> [u8; 16] {
    a.parse::<Ipv6Addr>().unwrap().octets()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The pods policy, with packet sockets allowed: the crafted packets go out as Ethernet
/// frames, past the socket hooks and the per-packet socket program, straight to the veth.
fn policy(net: &Net) -> String {
    let p = net.policy(false);
    assert!(p.contains("sockets: {raw: allow}"));
    p.replace(
        "sockets: {raw: allow}",
        "sockets: {raw: allow, packet: allow}",
    )
}

/// Sends `frame` as an Ethernet frame on the pod's eth0, to the node side of its veth.
fn send_frame(net: &Net, a: &Agent, frame: &[u8]) {
    let cfg = egress_agent::policy::parse(&std::fs::read_to_string(&a.config).unwrap(), "p")
        .expect("policy");
    let host_if = egress_agent::datapath::podnet::plan(&cfg)[0]
        .host_if
        .clone();
    let mac = crate::harness::mac_of(&net.node_path(), &host_if);
    let ethertype = format!("{:02x}{:02x}", frame[12], frame[13]);
    let out = a.exec(
        "web",
        &[
            "python3",
            PACKETS,
            "frame",
            "eth0",
            &mac,
            &ethertype,
            &hex(&frame[14..]),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dropped(a: &Agent, reason: &str) -> u64 {
    metric(
        a,
        "egress_tc_dropped_packets_total{",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// Sends each packet with a sniffer on its destination; asserts how many got out.
fn expect_out(net: &Net, a: &Agent, dst: &str, frames: &[Vec<u8>], out: usize, what: &str) {
    let seen = net.sniff(dst, 1.5);
    for f in frames {
        send_frame(net, a, f);
    }
    assert_eq!(seen.count(), out, "{what}");
}

#[test]
fn tc_attacks_ipv6_extension_headers_and_link_control_do_not_get_out() {
    if !privileged_with(&["ip", "nsenter", "python3"]) {
        return;
    }
    let net = Net::new();
    let a = Agent::start_in(&policy(&net), Some(&net.node_path()));
    let _server = net.server(ALLOW6);
    let (pod, allow, deny) = (v6(POD6), v6(ALLOW6), v6(DENY6));
    let behind_dstopts = |port| {
        ipv6(
            pod,
            allow,
            DSTOPTS,
            &opts_header(TCP, &tcp(40000, port, SYN)),
        )
    };
    // The control: the allowed port behind destination options gets out (and is judged).
    expect_out(&net, &a, ALLOW6, &[behind_dstopts(PORT)], 1, "allowed SYN");
    assert_eq!(drops(&a), 0, "{}", a.http_get("/metrics").1);

    // A denied port of the same host, behind destination options and behind a fragment
    // header (an atomic fragment: offset 0, no more fragments), and behind both.
    let mut frag = vec![TCP, 0, 0, 0, 0, 0, 0, 9];
    frag.extend_from_slice(&tcp(40000, DENIED_PORT, SYN));
    let mut frag_then_opts = vec![DSTOPTS, 0, 0, 0, 0, 0, 0, 10];
    frag_then_opts.extend_from_slice(&opts_header(TCP, &tcp(40000, DENIED_PORT, SYN)));
    let frames = [
        behind_dstopts(DENIED_PORT),
        ipv6(pod, allow, FRAGMENT, &frag),
        ipv6(pod, allow, FRAGMENT, &frag_then_opts),
    ];
    expect_out(&net, &a, ALLOW6, &frames, 0, "SYNs to a denied port");
    assert_eq!(dropped(&a, "deny-default"), 3);

    // Neighbour solicitation and an MLD report to a global, denied address.
    let mld = opts_header(ICMPV6, &[143, 0, 0, 0, 0, 0, 0, 0]);
    let frames = [
        ipv6(pod, deny, ICMPV6, &ns(deny)),
        ipv6(pod, deny, HOPOPTS, &mld),
    ];
    expect_out(&net, &a, DENY6, &frames, 0, "ND/MLD to a global address");
    assert_eq!(dropped(&a, "deny-default"), 5);
    assert_eq!(drops(&a), 5, "{}", a.http_get("/metrics").1);
    // The pod's own neighbour discovery still works: it reaches the allowed host.
    let out = a.client("web", &["tcp", ALLOW6, &PORT.to_string(), "x"]);
    assert!(out.starts_with("ok "), "{out}");
}

#[test]
fn tc_attacks_spoofed_sources_and_forged_inbound_syns_do_not_open_a_way_out() {
    if !privileged_with(&["ip", "nsenter", "python3"]) {
        return;
    }
    let net = Net::new();
    let a = Agent::start_in(&policy(&net), Some(&net.node_path()));
    let _server = net.server(DENY4);

    // A packet from an address that is not the pod's, to an allowed destination.
    let spoofed = ipv4(
        v4("10.200.0.99"),
        v4(ALLOW4),
        TCP,
        0,
        &[],
        &tcp(40000, PORT, SYN),
    );
    expect_out(&net, &a, ALLOW4, &[spoofed], 0, "spoofed source");
    assert_eq!(dropped(&a, "spoofed-source"), 1);

    // "SYN from the denied host to me", put on the wire by the pod (AF_PACKET: its own
    // stack would deliver it locally), meant to come back through the node and make the
    // pod's SYNs to that host look like replies; IPv4 and IPv6.
    let forged4 = ipv4(v4(DENY4), v4(POD4), TCP, 0, &[], &tcp(PORT, 40000, SYN));
    send_frame(&net, &a, &forged4);
    let forged6 = ipv6(v6(DENY6), v6(POD6), TCP, &tcp(PORT, 40000, SYN));
    send_frame(&net, &a, &forged6);
    assert_eq!(dropped(&a, "spoofed-source"), 3);
    // The pod's own SYNs to the denied host (from the port the forged SYN was sent to).
    let syn4 = ipv4(v4(POD4), v4(DENY4), TCP, 0, &[], &tcp(40000, PORT, SYN));
    let syn6 = ipv6(v6(POD6), v6(DENY6), TCP, &tcp(40000, PORT, SYN));
    for (dst, syn) in [(DENY4, syn4), (DENY6, syn6)] {
        let what = format!("SYNs to {dst} after a forged inbound SYN");
        expect_out(&net, &a, dst, &[syn.clone(), syn], 0, &what);
    }
    assert_eq!(dropped(&a, "deny-default"), 4);
    assert_eq!(
        metric(&a, "egress_tc_packets_total{", &["verdict=\"reply\""]),
        0
    );
    // IPv4 loose source route through the denied host, to an allowed one.
    let lsrr = [1, 131, 7, 4, 192, 0, 2, 30];
    let routed = ipv4(v4(POD4), v4(ALLOW4), TCP, 0, &lsrr, &tcp(40000, PORT, SYN));
    expect_out(&net, &a, ALLOW4, &[routed], 0, "source route");
    assert_eq!(dropped(&a, "source-route"), 1);
    assert_eq!(drops(&a), 3 + 4 + 1, "{}", a.http_get("/metrics").1);
}
