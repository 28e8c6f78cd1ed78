//! `spec.sockets`: socket kinds no destination hook judges are refused at `socket()` (EPERM)
//! for workloads, root or not, IPv4 and IPv6: UDP-Lite (whose connect() no cgroup hook sees),
//! raw IP, AF_PACKET/AF_XDP (through the socket_create LSM hook), and ping sockets when
//! `icmp: deny`. TCP, UDP and MPTCP still open; the agent and processes outside workloads are
//! untouched; `egress_sockets_refused_total` counts every refusal exactly once.

use std::{
    net::UdpSocket,
    os::fd::{FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::harness::{privileged, Agent, NOBODY};

/// `python3 -c SOCKET WHAT FAMILY [DST PORT]`: opens one socket (and with DST, connects it and
/// sends one datagram); prints `ok` or `err <errno name>`.
const SOCKET: &str = r#"
import errno, socket, sys
what, fam = sys.argv[1], sys.argv[2]
F = socket.AF_INET6 if fam == "6" else socket.AF_INET
ICMP = 58 if fam == "6" else 1
try:
    if what == "udplite":
        s = socket.socket(F, socket.SOCK_DGRAM, 136)
    elif what == "raw":
        s = socket.socket(F, socket.SOCK_RAW, ICMP)
    elif what == "packet":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    elif what == "xdp":
        s = socket.socket(44, socket.SOCK_RAW, 0)
    elif what == "ping":
        s = socket.socket(F, socket.SOCK_DGRAM, ICMP)
    elif what == "tcp":
        s = socket.socket(F, socket.SOCK_STREAM, 6)
    elif what == "udp":
        s = socket.socket(F, socket.SOCK_DGRAM, 17)
    elif what == "mptcp":
        s = socket.socket(F, socket.SOCK_STREAM, 262)
    if len(sys.argv) > 3:
        s.connect((sys.argv[3], int(sys.argv[4])))
        s.send(b"egress")
    print("ok")
except OSError as e:
    print("err " + errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn policy(sockets: &str) -> String {
    format!(
        "kind: MeshConfig\nmetadata: {{name: egress}}\nspec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}{sockets}}}\n---\nkind: Workload\nmetadata: {{name: web, namespace: shop}}\n"
    )
}

/// Runs the SOCKET script in workload `shop/web`, as root or as nobody.
fn open(a: &Agent, nobody: bool, args: &[&str]) -> String {
    let mut cmd: Vec<&str> = Vec::new();
    if nobody {
        cmd.extend(NOBODY);
    }
    cmd.extend(["/usr/bin/python3", "-c", SOCKET]);
    cmd.extend(args);
    a.exec_line("shop/web", &cmd, &format!("{args:?}"))
}

/// A ping socket in the workload, in a network namespace of its own where every group may
/// open ping sockets (`net.ipv4.ping_group_range` is per namespace; the host's stays as is).
fn ping_socket(a: &Agent, nobody: bool, fam: &str) -> String {
    let user = if nobody {
        NOBODY.join(" ")
    } else {
        String::new()
    };
    let script = format!(
        "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range && exec {user} /usr/bin/python3 -c \"$0\" ping {fam}"
    );
    let out = a.exec("shop/web", &["unshare", "-n", "sh", "-c", &script, SOCKET]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !text.is_empty(),
        "ping socket: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Whether the socket_create LSM program runs (kernel >= 6.0, BPF LSM active, and BTF
/// programs loadable here); without it packet sockets are not refused, and `status` says so.
fn lsm_attached(a: &Agent) -> bool {
    let status = a.cli_ok(&["egress", "status"]);
    if status.contains("packet sockets: refused (socket_create LSM)") {
        return true;
    }
    assert!(
        status.contains(
            "packet sockets: NOT refused: the socket_create LSM program is not attached ("
        ),
        "{status}"
    );
    eprintln!("the socket_create LSM program cannot run on this kernel: packet sockets are checked as not refused");
    false
}

fn refused(a: &Agent, kind: &str) -> u64 {
    let series = format!(
        "egress_sockets_refused_total{{workload=\"web\",namespace=\"shop\",kind=\"{kind}\"}}"
    );
    let (_, body) = a.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

fn counts(a: &Agent) -> [u64; 4] {
    ["raw", "packet", "icmp", "other"].map(|k| refused(a, k))
}

/// A UDP-Lite socket bound outside every workload, counting what arrives.
struct Receiver {
    sock: UdpSocket,
    port: u16,
}

impl Receiver {
    fn bind(ip: &str) -> Receiver {
        let v6 = ip.contains(':');
        let fam = if v6 {
            nix::libc::AF_INET6
        } else {
            nix::libc::AF_INET
        };
        // SAFETY: a plain socket(2); the fd is owned at once.
        let fd = unsafe { nix::libc::socket(fam, nix::libc::SOCK_DGRAM, 136) };
        assert!(fd >= 0, "UDP-Lite socket outside workloads");
        let sock = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // std's bind works on any datagram socket through the raw fd: use nix for it.
        let addr: std::net::SocketAddr = if v6 {
            format!("[{ip}]:0")
        } else {
            format!("{ip}:0")
        }
        .parse()
        .unwrap();
        let sa = nix::sys::socket::SockaddrStorage::from(addr);
        nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &sa).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        Receiver { sock, port }
    }

    /// Datagrams received within `secs`.
    fn count(&self, secs: f32) -> usize {
        let end = Instant::now() + Duration::from_secs_f32(secs);
        let mut n = 0;
        let mut buf = [0u8; 64];
        while Instant::now() < end {
            if self.sock.recv(&mut buf).is_ok() {
                n += 1;
            }
        }
        n
    }
}

#[test]
fn unjudged_sockets_are_refused_for_root_and_unprivileged_workloads() {
    if !privileged() {
        return;
    }
    let a = Agent::start(&policy(""));
    let rx = [Receiver::bind("127.61.0.1"), Receiver::bind("::1")];
    let dst = ["127.61.0.1", "::1"];

    // Outside every workload (this test process) UDP-Lite goes through: the receivers work.
    for (i, fam) in ["4", "6"].into_iter().enumerate() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                SOCKET,
                "udplite",
                fam,
                dst[i],
                &rx[i].port.to_string(),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        assert_eq!(rx[i].count(0.5), 1, "UDP-Lite outside workloads, IPv{fam}");
    }
    assert_eq!(counts(&a), [0, 0, 0, 0]);

    // UDP-Lite connect + send to a denied address, as root and as nobody: socket() fails,
    // nothing arrives.
    for nobody in [false, true] {
        for (i, fam) in ["4", "6"].into_iter().enumerate() {
            let port = rx[i].port.to_string();
            let out = open(&a, nobody, &["udplite", fam, dst[i], &port]);
            assert_eq!(out, "err EPERM", "UDP-Lite IPv{fam} nobody={nobody}");
            assert_eq!(rx[i].count(0.3), 0, "a UDP-Lite datagram arrived");
        }
    }
    // Root: raw IP (v4, v6), AF_PACKET and AF_XDP.
    for fam in ["4", "6"] {
        assert_eq!(open(&a, false, &["raw", fam]), "err EPERM", "raw IPv{fam}");
    }
    let lsm = lsm_attached(&a);
    let packet = if lsm { "err EPERM" } else { "ok" };
    assert_eq!(open(&a, false, &["packet", "4"]), packet, "AF_PACKET");
    // AF_XDP: refused by the LSM; without it, the kernel's own answer (not ours).
    let xdp = open(&a, false, &["xdp", "4"]);
    if lsm {
        assert_eq!(xdp, "err EPERM", "AF_XDP");
    }
    // Ping sockets are allowed by default (their echoes are judged per packet).
    for nobody in [false, true] {
        for fam in ["4", "6"] {
            assert_eq!(
                ping_socket(&a, nobody, fam),
                "ok",
                "ping IPv{fam} nobody={nobody}"
            );
        }
    }
    // The sockets the connect/sendmsg hooks judge still open.
    for nobody in [false, true] {
        for fam in ["4", "6"] {
            for what in ["tcp", "udp", "mptcp"] {
                assert_eq!(open(&a, nobody, &[what, fam]), "ok", "{what} IPv{fam}");
            }
        }
    }
    // Exactly one count per refusal: raw 2, packet 2 (AF_PACKET, AF_XDP), UDP-Lite 4.
    let packets = if lsm { 2 } else { 0 };
    assert_eq!(
        counts(&a),
        [2, packets, 0, 4],
        "AF_XDP without the LSM: {xdp}"
    );
    a.wait_log("deny-socket");
    let log = a.log();
    assert!(log.contains("socket(inet6, type 2, protocol 136)"), "{log}");
    if lsm {
        assert!(
            log.contains("socket(packet, type 3, protocol 768)"),
            "{log}"
        );
    }

    // Processes outside workloads are untouched: this one opens raw and packet sockets.
    for (f, t, p) in [
        (nix::libc::AF_INET, nix::libc::SOCK_RAW, 1),
        (nix::libc::AF_PACKET, nix::libc::SOCK_RAW, 0x0300),
    ] {
        // SAFETY: a plain socket(2), closed at once.
        let fd = unsafe { nix::libc::socket(f, t, p) };
        assert!(fd >= 0, "socket({f}, {t}, {p}) outside workloads");
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    let status = a.cli_ok(&["egress", "status"]);
    assert!(status.contains("also allowed: icmp"), "{status}");
}

#[test]
fn spec_sockets_allows_raw_and_packet_and_refuses_ping() {
    if !privileged() {
        return;
    }
    let a = Agent::start(&policy(
        ", sockets: {raw: allow, packet: allow, icmp: deny}",
    ));
    for fam in ["4", "6"] {
        assert_eq!(open(&a, false, &["raw", fam]), "ok", "raw IPv{fam}");
    }
    // The LSM program returns 1 (allow) here: the packet socket opens.
    assert_eq!(open(&a, false, &["packet", "4"]), "ok", "AF_PACKET allowed");
    for nobody in [false, true] {
        for fam in ["4", "6"] {
            assert_eq!(
                ping_socket(&a, nobody, fam),
                "err EPERM",
                "ping IPv{fam} nobody={nobody}"
            );
        }
    }
    assert_eq!(open(&a, true, &["udplite", "4"]), "err EPERM");
    assert_eq!(counts(&a), [0, 0, 4, 1]);
    let status = a.cli_ok(&["egress", "status"]);
    assert!(status.contains("also allowed: raw, packet"), "{status}");
}

#[test]
fn the_programs_survive_restarts_and_uninstall_removes_them() {
    if !privileged() {
        return;
    }
    let mut a = Agent::start(&policy(""));
    let links = a
        .pins
        .join(format!("v{}/links", egress_common::LAYOUT_VERSION));
    assert!(links.join("egress_sock_create").exists());
    let lsm = lsm_attached(&a);
    assert_eq!(links.join("egress_lsm_socket_create").exists(), lsm);
    a.stop_keep();
    // Stopped: the pinned links keep refusing.
    assert_eq!(open(&a, false, &["udplite", "4"]), "err EPERM");
    if lsm {
        assert_eq!(open(&a, false, &["packet", "4"]), "err EPERM");
    }
    a.spawn();
    let log = a.log();
    assert!(log.contains("egress_sock_create (kept)"), "{log}");
    assert_eq!(
        log.contains("egress_lsm_socket_create (kept)"),
        lsm,
        "{log}"
    );
    assert_eq!(open(&a, false, &["raw", "4"]), "err EPERM");
    a.stop_keep();
    let out = a.uninstall();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!links.exists());
}

#[test]
fn without_the_bpf_lsm_the_agent_runs_and_says_packet_sockets_are_not_refused() {
    if !privileged() {
        return;
    }
    let a = Agent::start_with(&policy(""), None, &[("EGRESS_LSM", "off")]);
    a.wait_log("packet sockets (AF_PACKET, AF_XDP) are NOT refused");
    let status = a.cli_ok(&["egress", "status"]);
    assert!(
        status.contains("packet sockets: NOT refused: the socket_create LSM program is not attached (EGRESS_LSM=off)"),
        "{status}"
    );
    // cgroup/sock_create still refuses what it sees.
    assert_eq!(open(&a, true, &["udplite", "6"]), "err EPERM");
    assert_eq!(open(&a, false, &["packet", "4"]), "ok");
    assert_eq!(counts(&a), [0, 0, 0, 1]);
}
