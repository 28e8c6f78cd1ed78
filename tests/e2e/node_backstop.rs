//! The node backstop, where the `socket_create` LSM cannot refuse packet sockets (simulated
//! with `EGRESS_LSM=off`, as on machines without the BPF LSM): a host-network workload, as
//! root, opens an AF_PACKET socket and writes Ethernet frames straight to the node's uplink
//! (a veth of a "node" namespace into an "outside" one, where a sniffer counts), carrying IPv4
//! and IPv6. With
//! `--node-interface` on that uplink, none of the frames gets out and the drop counter moves
//! by exactly their number; `PACKET_QDISC_BYPASS` (which would skip tc) and AF_XDP's set-up
//! are refused with EPERM (cgroup/setsockopt, attached only with a `--node-interface`: a
//! restart without one detaches it). The workload's IP sockets and the node's own
//! frames still pass, and with `spec.sockets.packet: allow` the same frames get out: the
//! drops are the backstop's.

use egress_test_support::{
    net::{ip, Netns, Sniffer},
    unique,
};

use crate::{
    harness::{mac_of, privileged_with, Agent},
    pods::metric,
};

const NODE_IP: &str = "10.213.0.1";
const OUT_IP: &str = "10.213.0.2";
const NODE_IP6: &str = "fd00:213::1";
const OUT_IP6: &str = "fd00:213::2";

/// `python3 -c NODE_PY WHAT ARGS...`: prints `ok` or `err <errno name>`.
/// - `frame IFACE MAC N [6]`: N Ethernet frames, each an IPv4/UDP datagram from NODE_IP to
///   OUT_IP port 9 (with `6`: IPv6/UDP from NODE_IP6 to OUT_IP6), written on IFACE through an
///   AF_PACKET socket (`err ERRNO xK`: K sends failed);
/// - `bypass`: setsockopt(PACKET_QDISC_BYPASS) on an AF_PACKET socket;
/// - `xdp`: setsockopt(SOL_XDP, XDP_UMEM_REG) on an AF_XDP socket (EINVAL past us: no memory);
/// - `udp`: one datagram to OUT_IP port 9 from a UDP socket.
const NODE_PY: &str = r#"
import errno, socket, struct, sys
NODE, OUT = "10.213.0.1", "10.213.0.2"
NODE6, OUT6 = "fd00:213::1", "fd00:213::2"
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
what = sys.argv[1]
try:
    if what == "frame":
        iface, mac, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((iface, 0))
        src = s.getsockname()[4]
        udp = struct.pack("!HHHH", 40000, 9, 8 + 6, 0) + b"egress"
        if sys.argv[5:] == ["6"]:
            # The receiver drops a bad UDP checksum after the sniffer has counted the frame.
            hdr = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                              socket.inet_pton(socket.AF_INET6, NODE6),
                              socket.inet_pton(socket.AF_INET6, OUT6))
            ethertype = 0x86DD
        else:
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                              socket.inet_aton(NODE), socket.inet_aton(OUT))
            hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
            ethertype = 0x0800
        eth = bytes.fromhex(mac.replace(":", "")) + src + struct.pack("!H", ethertype)
        refused = []
        for _ in range(n):
            try:
                s.send(eth + hdr + udp)
            except OSError as e:
                refused.append(errno.errorcode.get(e.errno, str(e.errno)))
        if refused:
            print("err %s x%d" % (refused[0], len(refused)))
            sys.exit(0)
    elif what == "bypass":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.setsockopt(263, 20, struct.pack("i", 1))
    elif what == "xdp":
        s = socket.socket(44, socket.SOCK_RAW, 0)
        s.setsockopt(283, 4, struct.pack("QQIIII", 0, 0, 2048, 0, 0, 0))
    elif what == "udp":
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"egress", (OUT, 9))
    print("ok")
except OSError as e:
    print("err " + errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn policy(packet: &str) -> String {
    format!(
        "kind: MeshConfig\nmetadata: {{name: egress}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}, sockets: {{packet: {packet}}}}}\n---\nkind: Workload\nmetadata: {{name: web, namespace: default}}\n---\nkind: Egress\nmetadata: {{name: out, namespace: default}}\nspec:\n  sources: [{{kind: Workload, name: web}}]\n  ipAddresses: [{OUT_IP}/32]\n  ports: [{{number: 9, protocol: udp}}]\n"
    )
}

/// The node and outside namespaces, joined by the node's uplink `nb0` (outside: `nb1`).
struct World {
    node: Netns,
    out: Netns,
    mac: String,
}

fn world() -> World {
    let node = Netns::new(&unique("egress-nb-node"));
    let out = Netns::new(&unique("egress-nb-out"));
    ip(&[
        "link", "add", "nb0", "netns", &node.name, "type", "veth", "peer", "name", "nb1", "netns",
        &out.name,
    ]);
    node.ip_batch(&[
        format!("addr add {NODE_IP}/24 dev nb0"),
        format!("addr add {NODE_IP6}/64 dev nb0 nodad"),
        "link set nb0 up".into(),
    ]);
    out.ip_batch(&[
        format!("addr add {OUT_IP}/24 dev nb1"),
        format!("addr add {OUT_IP6}/64 dev nb1 nodad"),
        "link set nb1 up".into(),
    ]);
    let mac = mac_of(&out.path(), "nb1");
    World { node, out, mac }
}

fn run(a: &Agent, nobody: bool, args: &[&str]) -> String {
    let mut cmd: Vec<&str> = Vec::new();
    if nobody {
        cmd.extend(crate::harness::NOBODY);
    }
    cmd.extend(["/usr/bin/python3", "-c", NODE_PY]);
    cmd.extend(args);
    a.exec_line("web", &cmd, &format!("{args:?}"))
}

/// Packets to OUT_IP seen outside while `f` runs, then `marks` frames from the node itself
/// (outside every workload: they pass) are sent last, in the same window: a count that
/// includes them shows the sniffer was listening while `f` ran, however slow the machine.
fn seen_outside(w: &World, marks: usize, f: impl FnOnce()) -> usize {
    seen_outside_at(w, false, marks, f)
}

/// [`seen_outside`], counting packets to OUT_IP6 (and marking with IPv6 frames) when `v6`.
fn seen_outside_at(w: &World, v6: bool, marks: usize, f: impl FnOnce()) -> usize {
    let dst = if v6 { OUT_IP6 } else { OUT_IP };
    let sniff = Sniffer::start(&w.out.path(), "nb1", dst, 6.0);
    f();
    if marks > 0 {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", w.node.path().display()))
            .args(["python3", "-c", NODE_PY, "frame", "nb0", &w.mac])
            .arg(marks.to_string())
            .args(v6.then_some("6"))
            .output()
            .expect("node frame");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
    sniff.count()
}

fn dropped(a: &Agent) -> u64 {
    metric(
        a,
        "egress_tc_dropped_packets_total{",
        &["reason=\"packet-socket\"", "workload=\"web\""],
    )
}

#[test]
fn node_backstop_drops_packet_socket_frames_of_host_workloads_without_the_lsm() {
    if !privileged_with(&["ip", "nsenter", "python3", "setpriv"]) {
        return;
    }
    let w = world();
    let mut a = Agent::new(&policy("deny"));
    a.netns = Some(w.node.path());
    a.exec_in_node = true;
    a.env = vec![("EGRESS_LSM".into(), "off".into())];
    a.run_args = vec!["--node-interface".into(), "nb0".into()];
    a.spawn();
    let status = a.cli_ok(&["egress", "status"]);
    assert!(
        status.contains("dropped leaving nb0 (node backstop)"),
        "{status}"
    );
    let mac = w.mac.clone();

    // Root in the workload: the socket opens (no LSM), its frames do not get out; the
    // sender learns at once (a frame dropped at tc egress fails its send with ENOBUFS). The
    // node's own frame, sent after them, does get out.
    let mut said = String::new();
    let n = seen_outside(&w, 1, || {
        said = run(&a, false, &["frame", "nb0", &mac, "5"])
    });
    assert_eq!(said, "err ENOBUFS x5");
    assert_eq!(n, 1, "packet-socket frames got out (1: the node's own)");
    assert_eq!(dropped(&a), 5);
    // The same with IPv6 inside: the backstop drops a packet socket's frame whatever it
    // carries.
    let n = seen_outside_at(&w, true, 1, || {
        said = run(&a, false, &["frame", "nb0", &mac, "4", "6"])
    });
    assert_eq!(said, "err ENOBUFS x4");
    assert_eq!(
        n, 1,
        "IPv6 packet-socket frames got out (1: the node's own)"
    );
    assert_eq!(dropped(&a), 9);
    // The ways around tc are refused; an unprivileged user cannot open one at all.
    assert_eq!(run(&a, false, &["bypass"]), "err EPERM");
    assert_eq!(run(&a, false, &["xdp"]), "err EPERM");
    assert_eq!(run(&a, true, &["frame", "nb0", &mac, "1"]), "err EPERM");
    assert_eq!(dropped(&a), 9);

    // The workload's IP sockets pass the backstop (judged by the socket hooks).
    let n = seen_outside(&w, 1, || assert_eq!(run(&a, false, &["udp"]), "ok"));
    assert_eq!(n, 2, "an allowed UDP datagram, then the node's frame");
    assert_eq!(dropped(&a), 9);

    // spec.sockets.packet: allow: the same frames and options go through.
    a.reload(&policy("allow"));
    let n = seen_outside(&w, 0, || {
        assert_eq!(run(&a, false, &["frame", "nb0", &mac, "3"]), "ok");
    });
    assert_eq!(n, 3, "frames with packet sockets allowed");
    let n = seen_outside_at(&w, true, 0, || {
        assert_eq!(run(&a, false, &["frame", "nb0", &mac, "2", "6"]), "ok");
    });
    assert_eq!(n, 2, "IPv6 frames with packet sockets allowed");
    assert_eq!(run(&a, false, &["bypass"]), "ok");
    assert_ne!(run(&a, false, &["xdp"]), "err EPERM");
    assert_eq!(dropped(&a), 9);

    // Without a --node-interface there is no tc for the options to skip: a restart without
    // one detaches cgroup/setsockopt (it would cost every setsockopt() and stop nothing).
    a.reload(&policy("deny"));
    assert_eq!(run(&a, false, &["bypass"]), "err EPERM");
    a.stop_keep();
    a.run_args.clear();
    a.spawn();
    a.wait_log("egress_setsockopt (detached: no --node-interface");
    assert_eq!(run(&a, false, &["bypass"]), "ok");
    drop(a);
    drop(w);
}
