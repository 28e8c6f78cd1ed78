//! The bypass battery: ways out of a workload other than a plain connect()/sendto() that are
//! already supposed to be closed, each tried as root and as an unprivileged uid (setpriv)
//! inside the workload, over IPv4, IPv6 and IPv4-mapped IPv6: sendmmsg(), io_uring connect,
//! TCP Fast Open, MPTCP, SO_MARK, a child cgroup, and the agent's proxy port. A receiver on the
//! denied destination must count nothing, the denied counter must move by exactly the number
//! of refused attempts, and the same client to an allowed destination must get through (the
//! control that lets each test fail).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use egress_test_support::env::skip;

use crate::harness::{
    cgroup2_mount, in_netns, privileged, unique, wait_until, Agent, Netns, TcpServer, UdpServer,
    CLIENT, NOBODY,
};

const BYPASS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/bypass.py");

/// Workload `shop/web`, refused by default, allowed to each of `allow` (ip, port, protocol).
fn policy(allow: &[(String, String, &str)]) -> String {
    let mut p = "kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}\n---\nkind: Workload\nmetadata: {name: web, namespace: shop}\n".to_string();
    for (i, (ip, port, proto)) in allow.iter().enumerate() {
        let net = if ip.contains(':') {
            format!("\"{ip}/128\"")
        } else {
            format!("{ip}/32")
        };
        p += &format!("---\nkind: Egress\nmetadata: {{name: allow-{i}, namespace: shop}}\nspec: {{sources: [{{name: web}}], ipAddresses: [{net}], ports: [{{number: {port}, protocol: {proto}}}]}}\n");
    }
    p
}

/// Runs `python3 SCRIPT ARGS` in workload `shop/web`, as root or as nobody, optionally in
/// network namespace `netns`; returns its one-line verdict.
fn run(a: &Agent, nobody: bool, netns: Option<&Path>, script: &str, args: &[&str]) -> String {
    let ns = netns.map(|p| format!("--net={}", p.display()));
    let mut cmd: Vec<&str> = Vec::new();
    if let Some(ns) = &ns {
        cmd.extend(["nsenter", ns.as_str()]);
    }
    if nobody {
        cmd.extend(NOBODY);
    }
    cmd.extend(["/usr/bin/python3", script]);
    cmd.extend(args);
    let text = a.exec_line("shop/web", &cmd, &format!("{args:?} nobody={nobody}"));
    crate::harness::split_local(&text).0
}

/// The sum of every `egress_denied_total` series of workload `shop/web`.
fn denied(a: &Agent) -> u64 {
    let (_, body) = a.http_get("/metrics");
    body.lines()
        .filter(|l| l.starts_with("egress_denied_total{workload=\"web\",namespace=\"shop\","))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Asserts that the denied counter reaches `want` (it is read from the kernel's counters
/// asynchronously) and stays there.
fn assert_denied(a: &Agent, want: u64, what: &str) {
    let mut got = 0;
    wait_until(Duration::from_secs(3), || {
        got = denied(a);
        got >= want
    });
    assert_eq!(got, want, "egress_denied_total after {what}");
    thread::sleep(Duration::from_millis(100));
    assert_eq!(denied(a), want, "egress_denied_total after {what} (later)");
}

/// `::ffff:a.b.c.d`
fn mapped(ip: &str) -> String {
    format!("::ffff:{ip}")
}

fn udp_count(s: &UdpServer) -> usize {
    s.received.lock().unwrap().len()
}

/// Families: (name, client host for the allowed server, client host for the denied server).
fn families(allowed4: &str, denied4: &str) -> [(&'static str, String, String); 3] {
    [
        ("v4", allowed4.to_string(), denied4.to_string()),
        ("v6", "::1".to_string(), "::1".to_string()),
        ("mapped", mapped(allowed4), mapped(denied4)),
    ]
}

/// TCP servers: allowed and denied, on IPv4 (127.71/127.72) and on ::1.
struct Tcp {
    allow4: TcpServer,
    deny4: TcpServer,
    allow6: TcpServer,
    deny6: TcpServer,
}

impl Tcp {
    fn start() -> Tcp {
        Tcp {
            allow4: TcpServer::start("127.71.0.1"),
            deny4: TcpServer::start("127.72.0.1"),
            allow6: TcpServer::start("::1"),
            deny6: TcpServer::start("::1"),
        }
    }

    fn policy(&self) -> String {
        policy(&[
            (self.allow4.ip(), self.allow4.port(), "tcp"),
            (self.allow6.ip(), self.allow6.port(), "tcp"),
        ])
    }

    /// (family, allowed server, its host, denied server, its host)
    fn cases(&self) -> Vec<(&'static str, &TcpServer, String, &TcpServer, String)> {
        families("127.71.0.1", "127.72.0.1")
            .into_iter()
            .map(|(f, ah, dh)| {
                if f == "v6" {
                    (f, &self.allow6, ah, &self.deny6, dh)
                } else {
                    (f, &self.allow4, ah, &self.deny4, dh)
                }
            })
            .collect()
    }

    fn denied_accepted(&self) -> usize {
        self.deny4.accepted() + self.deny6.accepted()
    }
}

/// Runs one TCP bypass `mode` (a bypass.py mode taking HOST PORT [MSG]) as root and nobody over
/// v4, v6 and mapped: the allowed server answers, the denied one sees nothing, and each denied
/// attempt is counted once. `expect_denied` is the whole verdict line of a denied attempt
/// for (nobody).
fn tcp_battery(
    mode: &str,
    msg: Option<&str>,
    allowed_prefix: impl Fn(bool) -> String,
    expect_denied: impl Fn(bool) -> String,
) {
    let t = Tcp::start();
    let a = Agent::start(&t.policy());
    let mut refused = denied(&a);
    for nobody in [false, true] {
        for (fam, allow, ah, deny, dh) in t.cases() {
            let what = format!("{mode} {fam} nobody={nobody}");
            let mut args = vec![mode, ah.as_str()];
            let ap = allow.port();
            args.push(&ap);
            args.extend(msg);
            let before = allow.accepted();
            let out = run(&a, nobody, None, BYPASS, &args);
            if let Some(reason) = out.strip_prefix("skip ") {
                skip(&format!("{what}: {reason}"));
                return;
            }
            let reply = msg.unwrap_or("uring");
            assert_eq!(
                out,
                format!("{}ok reply={}|{reply}", allowed_prefix(nobody), allow.addr),
                "allowed {what}"
            );
            assert_eq!(allow.accepted(), before + 1, "allowed {what}");

            let dp = deny.port();
            let mut args = vec![mode, dh.as_str(), dp.as_str()];
            args.extend(msg);
            let out = run(&a, nobody, None, BYPASS, &args);
            assert_eq!(out, expect_denied(nobody), "denied {what}");
            refused += 1;
            assert!(
                !wait_until(Duration::from_millis(50), || t.denied_accepted() > 0),
                "the denied server saw a connection: {what}"
            );
            assert_denied(&a, refused, &what);
        }
    }
}

#[test]
fn bypass_sendmmsg_is_judged_per_datagram() {
    if !privileged() {
        return;
    }
    let allow4 = UdpServer::start("127.71.0.1");
    let deny4 = UdpServer::start("127.72.0.1");
    let allow6 = UdpServer::start("::1");
    let deny6 = UdpServer::start("::1");
    let a = Agent::start(&policy(&[
        ("127.71.0.1".into(), allow4.port(), "udp"),
        ("::1".into(), allow6.port(), "udp"),
    ]));
    let mut refused = denied(&a);
    for nobody in [false, true] {
        for (fam, ah, dh) in families("127.71.0.1", "127.72.0.1") {
            let what = format!("sendmmsg {fam} nobody={nobody}");
            let (allow, deny) = if fam == "v6" {
                (&allow6, &deny6)
            } else {
                (&allow4, &deny4)
            };
            let before = udp_count(allow);
            let out = run(
                &a,
                nobody,
                None,
                BYPASS,
                &["sendmmsg", &ah, &allow.port(), "3"],
            );
            assert_eq!(out, "ok sent=3", "allowed {what}");
            assert!(
                wait_until(Duration::from_secs(2), || udp_count(allow) == before + 3),
                "allowed {what}: {} of 3 datagrams arrived",
                udp_count(allow) - before
            );

            let out = run(
                &a,
                nobody,
                None,
                BYPASS,
                &["sendmmsg", &dh, &deny.port(), "3"],
            );
            // The first datagram is refused and sendmmsg() stops there: one refusal.
            assert_eq!(out, "err EPERM", "denied {what}");
            refused += 1;
            assert!(
                !wait_until(Duration::from_millis(100), || udp_count(&deny4)
                    + udp_count(&deny6)
                    > 0),
                "a denied datagram arrived: {what}"
            );
            assert_denied(&a, refused, &what);
        }
    }
}

#[test]
fn bypass_io_uring_connect_is_judged() {
    if !privileged() {
        return;
    }
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .unwrap_or_default()
        .trim()
        .to_string();
    if disabled == "2" && !skip("io_uring is disabled (kernel.io_uring_disabled=2)") {
        return;
    }
    // io_uring_disabled=1 allows root only: the unprivileged attempt then fails in setup,
    // which bypass.py reports as `skip`; with 0 both run.
    tcp_battery(
        "iouring",
        None,
        |_| String::new(),
        |_| "err EPERM".to_string(),
    );
}

#[test]
fn bypass_mptcp_connect_is_judged() {
    if !privileged() {
        return;
    }
    let enabled = std::fs::read_to_string("/proc/sys/net/mptcp/enabled").unwrap_or_default();
    if enabled.trim() != "1" && !skip("MPTCP is disabled (net.mptcp.enabled != 1)") {
        return;
    }
    tcp_battery(
        "mptcp",
        Some("m"),
        |_| String::new(),
        |_| "err EPERM".to_string(),
    );
}

#[test]
fn bypass_so_mark_and_another_uid_do_not_change_the_identity() {
    if !privileged() {
        return;
    }
    // Root sets SO_MARK (CAP_NET_ADMIN); nobody cannot, and connects unmarked as another uid:
    // both are judged as the workload.
    let mark = |nobody: bool| {
        if nobody {
            "mark=EPERM ".to_string()
        } else {
            "mark=ok ".to_string()
        }
    };
    tcp_battery("mark", Some("k"), mark, move |nobody| {
        format!("{}err EPERM", mark(nobody))
    });
}

/// A TCP listener with TCP_FASTOPEN in a network namespace: counts connections, answers
/// `<addr>|<line>`.
struct TfoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TfoServer {
    fn start(netns: &Path, ip: &str) -> TfoServer {
        let ip = ip.to_string();
        let l = in_netns(netns, move || TcpListener::bind((ip.as_str(), 0))).expect("bind");
        let qlen: nix::libc::c_int = 16;
        // SAFETY: setsockopt(TCP_FASTOPEN) with an int on a listening socket we own.
        let r = unsafe {
            nix::libc::setsockopt(
                l.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_FASTOPEN,
                &qlen as *const _ as *const nix::libc::c_void,
                std::mem::size_of::<nix::libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0, "TCP_FASTOPEN on the listener");
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        n.fetch_add(1, Ordering::SeqCst);
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
                        let mut line = String::new();
                        if BufReader::new(&c).read_line(&mut line).is_ok() {
                            let _ = (&c).write_all(format!("{addr}|{}\n", line.trim()).as_bytes());
                        }
                    }
                    // Non-blocking accept so that the thread ends when dropped: poll interval.
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TfoServer {
            addr,
            accepted,
            stop,
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TfoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn bypass_tcp_fast_open_sendto_is_judged() {
    if !privileged() {
        return;
    }
    // A network namespace of our own with net.ipv4.tcp_fastopen=3 (client and server): the
    // host's setting is untouched.
    let ns = Netns::new(&unique("egress-tfo"));
    let path = ns.path();
    in_netns(&path, || {
        std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "3").expect("tcp_fastopen=3")
    });
    let allow4 = TfoServer::start(&path, "127.71.0.1");
    let deny4 = TfoServer::start(&path, "127.72.0.1");
    let allow6 = TfoServer::start(&path, "::1");
    let deny6 = TfoServer::start(&path, "::1");
    let a = Agent::start(&policy(&[
        ("127.71.0.1".into(), allow4.port(), "tcp"),
        ("::1".into(), allow6.port(), "tcp"),
    ]));

    // Outside every workload, the denied servers are reached with Fast Open twice, so that the
    // namespace caches their cookies: a workload's next SYN could carry data.
    let outside = |host: &str, port: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["python3", BYPASS, "fastopen", host, port, "seed"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for _ in 0..2 {
        let out = outside("127.72.0.1", &deny4.port());
        assert_eq!(out, format!("ok reply={}|seed", deny4.addr));
        let out = outside("::1", &deny6.port());
        assert_eq!(out, format!("ok reply={}|seed", deny6.addr));
    }
    let seeded = deny4.accepted() + deny6.accepted();
    assert_eq!(seeded, 4);

    let mut refused = denied(&a);
    for nobody in [false, true] {
        for (fam, ah, dh) in families("127.71.0.1", "127.72.0.1") {
            let what = format!("fastopen {fam} nobody={nobody}");
            let (allow, deny) = if fam == "v6" {
                (&allow6, &deny6)
            } else {
                (&allow4, &deny4)
            };
            let before = allow.accepted();
            let out = run(
                &a,
                nobody,
                Some(&path),
                BYPASS,
                &["fastopen", &ah, &allow.port(), "tfo"],
            );
            assert_eq!(
                out,
                format!("ok reply={}|tfo", allow.addr),
                "allowed {what}"
            );
            assert_eq!(allow.accepted(), before + 1, "allowed {what}");

            let out = run(
                &a,
                nobody,
                Some(&path),
                BYPASS,
                &["fastopen", &dh, &deny.port(), "tfo"],
            );
            assert_eq!(out, "err EPERM", "denied {what}");
            refused += 1;
            assert!(
                !wait_until(Duration::from_millis(50), || deny4.accepted()
                    + deny6.accepted()
                    > seeded),
                "the denied server saw a connection: {what}"
            );
            assert_denied(&a, refused, &what);
        }
    }
}

#[test]
fn bypass_a_child_cgroup_is_still_judged_root_or_not() {
    if !privileged() {
        return;
    }
    // lifecycle.rs covers a root client over IPv4 TCP in a nested cgroup; here the process
    // moves itself into a child cgroup it creates below its own workload cgroup, then runs
    // the client as root or as nobody, TCP over v4/v6/mapped and UDP sendto.
    let t = Tcp::start();
    let udp_deny = UdpServer::start("127.72.0.2");
    let a = Agent::start(&t.policy());
    let mount = cgroup2_mount();
    let mut refused = denied(&a);
    for nobody in [false, true] {
        let user = if nobody {
            NOBODY.join(" ")
        } else {
            String::new()
        };
        let client = |args: &[&str]| {
            let script = format!(
                "cg='{}'$(sed -n 's/^0:://p' /proc/self/cgroup) && mkdir -p \"$cg/escape\" && echo $$ > \"$cg/escape/cgroup.procs\" && grep -q '^0::.*/escape$' /proc/self/cgroup && exec {user} /usr/bin/python3 '{CLIENT}' \"$@\"",
                mount.display()
            );
            let mut cmd = vec!["sh", "-c", &script, "sh"];
            cmd.extend(args);
            let out = a.exec("shop/web", &cmd);
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(
                out.status.success() && !text.is_empty(),
                "{args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            crate::harness::split_local(&text).0
        };
        for (fam, allow, ah, deny, dh) in t.cases() {
            let what = format!("child cgroup {fam} nobody={nobody}");
            let out = client(&["tcp", &ah, &allow.port(), "c"]);
            assert!(out.starts_with("ok peer="), "allowed {what}: {out}");
            let out = client(&["tcp", &dh, &deny.port(), "c"]);
            assert!(out.starts_with("err EPERM"), "denied {what}: {out}");
            refused += 1;
            assert_denied(&a, refused, &what);
        }
        let out = client(&["udp", "127.72.0.2", &udp_deny.port(), "u"]);
        assert!(out.starts_with("err EPERM"), "UDP child cgroup: {out}");
        refused += 1;
        assert_denied(&a, refused, "UDP in a child cgroup");
    }
    assert_eq!(t.denied_accepted(), 0);
    assert_eq!(udp_count(&udp_deny), 0);
    // An unprivileged process cannot even create a child cgroup to move into.
    let mkdir = format!(
        "mkdir '{}'$(sed -n 's/^0:://p' /proc/self/cgroup)/escape2",
        mount.display()
    );
    let mut argv = crate::harness::NOBODY.to_vec();
    argv.extend(["sh", "-c", &mkdir]);
    let out = a.exec("shop/web", &argv);
    assert!(!out.status.success(), "nobody created a child cgroup");
    // Our child cgroup goes (the agent's uninstall removes its root too).
    remove_escapes(&a.root);
}

/// Removes every (empty, process-less) cgroup named `escape` below `dir`.
fn remove_escapes(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_escapes(&e.path());
            if e.file_name() == "escape" {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

#[test]
fn bypass_the_proxy_port_directly_is_refused_v4_v6_root_or_not() {
    if !privileged() {
        return;
    }
    // lifecycle.rs dials 127.0.0.1 and 0.0.0.0 as root; here also ::1, ::, the mapped form,
    // and as nobody.
    let t = Tcp::start();
    let a = Agent::start(&t.policy());
    let port = a.proxy_port.to_string();
    let mut refused = denied(&a);
    for nobody in [false, true] {
        let client = |args: &[&str]| {
            let mut full = vec!["tcp"];
            full.extend(args);
            run(&a, nobody, None, CLIENT, &full)
        };
        // Control: the allowed destinations answer.
        let out = client(&[&t.allow4.ip(), &t.allow4.port(), "c"]);
        assert_eq!(out, format!("ok peer={0} reply={0}|c", t.allow4.addr));
        let out = client(&["::1", &t.allow6.port(), "c"]);
        assert_eq!(out, format!("ok peer={0} reply={0}|c", t.allow6.addr));
        for host in ["127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"] {
            let out = client(&[host, &port]);
            assert!(
                out.starts_with("err EPERM"),
                "proxy port via {host} nobody={nobody}: {out}"
            );
            refused += 1;
            assert_denied(&a, refused, &format!("proxy port via {host}"));
        }
    }
}
