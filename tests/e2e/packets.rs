//! The per-packet `cgroup_skb/egress` program: packets that the socket hooks never judged
//! (connections older than the agent or the policy, source routes, ping sockets' sendto)
//! do not reach a denied host; allowed traffic and a workload's server keep working.
//!
//! The attacks run inside the workload's cgroup, in a network namespace of the test's own
//! (`ip netns`) whose loopback holds an allowed and a denied address, with a sniffer on it.
//! The same attacks from outside the workload show that the sniffer sees them when nothing
//! stops them.

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::harness::{privileged, run_ok, Agent, WEB_POLICY_HEAD};

const ATTACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/attack.py");
const PACKETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/packets.py");
const BYPASS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/bypass.py");

const GOOD4: &str = "192.0.2.1";
const BAD4: &str = "192.0.2.2";
const GOOD6: &str = "2001:db8::1";
const BAD6: &str = "2001:db8::2";
/// The uid the unprivileged attempts run as (in ping_group_range of the test's netns).
const NOBODY: &str = "65534";

/// A network namespace of the test's own, removed when dropped.
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "egress-pk-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        for a in [GOOD4, BAD4] {
            ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for a in [GOOD6, BAD6] {
            ns.ip(&["addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"]);
        }
        ns.sysctl("net.ipv4.ping_group_range=0 2147483647");
        ns
    }

    fn sysctl(&self, setting: &str) {
        run_ok(Command::new("ip").args(["netns", "exec", &self.name, "sysctl", "-qw", setting]));
    }

    fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// Starts a sniffer on the namespace's loopback counting packets to `dst` for `secs`.
    fn sniff(&self, dst: &str, secs: f32) -> Sniffer {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "python3", PACKETS, "sniff", "lo", dst,
            ])
            .arg(secs.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sniffer");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "sniffer did not start");
        Sniffer { child, out }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct Sniffer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Sniffer {
    /// Waits for the sniffer's end: how many packets it saw.
    fn count(mut self) -> usize {
        let mut s = String::new();
        self.out.read_to_string(&mut s).unwrap();
        let _ = self.child.wait();
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("sniffer said {s:?}"))
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// attack.py ARGS in network namespace `ns`: inside workload `web` of `agent` (or outside any
/// workload with `None`), as root or as `uid`. Returns its one-line result.
fn attack(agent: Option<&Agent>, ns: &Netns, uid: Option<&str>, args: &[&str]) -> String {
    let mut cmd: Vec<String> = vec!["nsenter".into(), format!("--net={}", ns.path.display())];
    if let Some(u) = uid {
        for a in [
            "setpriv",
            &format!("--reuid={u}"),
            &format!("--regid={u}"),
            "--clear-groups",
        ] {
            cmd.push(a.to_string());
        }
    }
    // The system's python: the unprivileged uid cannot use root's pyenv shims.
    cmd.push("/usr/bin/python3".into());
    cmd.push(ATTACK.into());
    cmd.extend(args.iter().map(|a| a.to_string()));
    let out = match agent {
        Some(a) => {
            let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
            a.exec("web", &refs)
        }
        None => Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap(),
    };
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !text.is_empty(),
        "attack {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The value of `egress_packet_dropped_total` for workload web and `reason`.
fn dropped(agent: &Agent, reason: &str) -> u64 {
    dropped_of(agent, "web", reason)
}

fn dropped_of(agent: &Agent, workload: &str, reason: &str) -> u64 {
    let (_, body) = agent.http_get("/metrics");
    let (w, r) = (
        format!("workload=\"{workload}\""),
        format!("reason=\"{reason}\""),
    );
    body.lines()
        .filter(|l| l.starts_with("egress_packet_dropped_total{"))
        .filter(|l| l.contains(&w) && l.contains(&r))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn netns_policy() -> String {
    format!(
        r#"{WEB_POLICY_HEAD}kind: Egress
metadata: {{name: allow-good}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{GOOD4}/32, "{GOOD6}/128"]
---
kind: Egress
metadata: {{name: deny-bad}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{BAD4}/32, "{BAD6}/128"]
  action: deny
"#
    )
}

/// A TCP server counting every byte it receives, on all its connections.
struct ByteSink {
    port: u16,
    bytes: Arc<AtomicUsize>,
    /// Bytes `o` (the tag of `hold_as`'s "other" connections).
    tagged: Arc<AtomicUsize>,
}

impl ByteSink {
    fn start(ip: &str) -> ByteSink {
        let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let port = l.local_addr().unwrap().port();
        let bytes = Arc::new(AtomicUsize::new(0));
        let tagged = Arc::new(AtomicUsize::new(0));
        let (b, t) = (bytes.clone(), tagged.clone());
        thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                let (b, t) = (b.clone(), t.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let o = buf[..n].iter().filter(|&&x| x == b'o').count();
                        t.fetch_add(o, Ordering::SeqCst);
                        b.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        ByteSink {
            port,
            bytes,
            tagged,
        }
    }

    /// Whether `count` still grows: a moment from now against now.
    fn growing(count: impl Fn() -> usize) -> bool {
        thread::sleep(Duration::from_millis(300)); // what was in flight
        let before = count();
        thread::sleep(Duration::from_millis(1500));
        count() != before
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    fn wait_bytes(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.bytes() == 0 {
            assert!(Instant::now() < deadline, "no bytes arrived");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether bytes still arrive: the count a moment from now against the count now.
    fn still_flowing(&self) -> bool {
        Self::growing(|| self.bytes())
    }
}

/// A process of the test started in cgroup `dir`, killed when dropped.
struct Proc(Child);

impl Proc {
    fn in_cgroup(dir: &Path, args: &[&str]) -> Proc {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(dir)
            .args(args);
        Proc::start(cmd, args)
    }

    /// `args` outside every workload.
    fn outside(args: &[&str]) -> Proc {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        Proc::start(cmd, args)
    }

    /// Runs `cmd` until it says it is connected or listening.
    fn start(mut cmd: Command, args: &[&str]) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in cgroup");
        let mut p = Proc(child);
        let mut line = String::new();
        BufReader::new(p.0.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            matches!(line.trim(), "connected" | "listening"),
            "{args:?}: {line:?}"
        );
        p
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hold(dir: &Path, ip: &str, port: u16) -> Proc {
    Proc::in_cgroup(
        dir,
        &["python3", ATTACK, "hold", ip, &port.to_string(), "30"],
    )
}

/// [`hold`] on CPU 0, sending lines of `tag`, as nobody when `nobody`.
fn hold_as(dir: &Path, ip: &str, port: u16, tag: &str, nobody: bool) -> Proc {
    let port = port.to_string();
    let mut argv = vec!["taskset", "-c", "0"];
    if nobody {
        argv.extend(crate::harness::NOBODY);
    }
    // The system's python (a root-only shim may come first on PATH).
    argv.extend(["/usr/bin/python3", ATTACK, "hold", ip, &port, "30", tag]);
    Proc::in_cgroup(dir, &argv)
}

fn deny_policy(ips: &[&str], allow: bool) -> String {
    let list = ips
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let action = if allow { "allow" } else { "deny" };
    format!(
        r#"{WEB_POLICY_HEAD}kind: Egress
metadata: {{name: the-rule}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{list}]
  action: {action}
"#
    )
}

/// (1) A host-network workload's connection made before the agent started, to a destination
/// the policy denies: once the agent runs, its bytes stop arriving.
#[test]
fn connection_older_than_the_agent_stops() {
    if !privileged() {
        return;
    }
    let v4 = ByteSink::start("127.31.0.1");
    let v6 = ByteSink::start("::1");
    let mut agent = Agent::new(&deny_policy(&["127.31.0.1/32", "::1/128"], false));
    let dir = agent.root.join("default").join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let _c4 = hold(&dir, "127.31.0.1", v4.port);
    let _c6 = hold(&dir, "::1", v6.port);
    v4.wait_bytes();
    v6.wait_bytes();
    agent.spawn();
    assert!(!v4.still_flowing(), "IPv4 bytes still arrive");
    assert!(!v6.still_flowing(), "IPv6 bytes still arrive");
    assert!(dropped(&agent, "deny-rule") > 0, "{}", agent.log());
    agent.wait_log("packet-drop-deny-rule");
}

/// (2) A connection allowed under policy A; policy B refuses it: its next bytes do not arrive
/// (IPv4, IPv6, IPv4-mapped IPv6).
#[test]
fn policy_change_stops_existing_connections() {
    if !privileged() {
        return;
    }
    let v4 = ByteSink::start("127.32.0.1");
    let v6 = ByteSink::start("::1");
    let mapped = ByteSink::start("127.32.0.2");
    let ips = ["127.32.0.1/32", "127.32.0.2/32", "::1/128"];
    let agent = Agent::start(&deny_policy(&ips, true));
    let dir = agent.root.join("default").join("web");
    let _c4 = hold(&dir, "127.32.0.1", v4.port);
    let _c6 = hold(&dir, "::1", v6.port);
    let _cm = hold(&dir, "::ffff:127.32.0.2", mapped.port);
    for s in [&v4, &v6, &mapped] {
        s.wait_bytes();
        assert!(s.still_flowing(), "allowed bytes do not flow");
    }
    agent.reload(&deny_policy(&ips, false));
    assert!(!v4.still_flowing(), "IPv4 bytes still arrive");
    assert!(!v6.still_flowing(), "IPv6 bytes still arrive");
    assert!(!mapped.still_flowing(), "IPv4-mapped bytes still arrive");
    assert!(dropped(&agent, "deny-rule") > 0);
}

/// (2b) The per-packet program's per-CPU last pass is not another workload's. `web` and
/// `other` hold connections to the same servers (one destination, port and protocol: their
/// keys differ only by cgroup), every process on CPU 0, IPv4 and IPv6, root and nobody; then
/// the policy refuses `other` alone. `web`'s packets keep writing CPU 0's slot with its pass
/// while `other`'s, between them, are dropped: no byte of `other`'s arrives, `web`'s do.
#[test]
fn a_pass_cached_on_a_cpu_is_not_another_workloads() {
    if !privileged() {
        return;
    }
    let v4 = ByteSink::start("127.33.0.1");
    let v6 = ByteSink::start("::1");
    let policy = |other: bool| {
        let mut p = format!(
            "{WEB_POLICY_HEAD}kind: Workload\nmetadata: {{name: other}}\n---\nkind: Egress\nmetadata: {{name: web-out}}\nspec:\n  sources: [{{name: web}}]\n  ipAddresses: [127.33.0.1/32, ::1/128]\n"
        );
        if other {
            p.push_str("---\nkind: Egress\nmetadata: {name: other-out}\nspec:\n  sources: [{name: other}]\n  ipAddresses: [127.33.0.1/32, ::1/128]\n");
        }
        p
    };
    let agent = Agent::start(&policy(true));
    let (web, other) = (
        agent.root.join("default").join("web"),
        agent.root.join("default").join("other"),
    );
    let mut held = Vec::new();
    for (ip, s) in [("127.33.0.1", &v4), ("::1", &v6)] {
        held.push(hold_as(&web, ip, s.port, "w", false));
        held.push(hold_as(&other, ip, s.port, "o", false));
        held.push(hold_as(&other, ip, s.port, "o", true));
    }
    for s in [&v4, &v6] {
        s.wait_bytes();
        assert!(ByteSink::growing(|| s.tagged.load(Ordering::SeqCst)));
    }
    agent.reload(&policy(false));
    for (fam, s) in [("IPv4", &v4), ("IPv6", &v6)] {
        let tagged = || s.tagged.load(Ordering::SeqCst);
        assert!(
            !ByteSink::growing(tagged),
            "{fam}: other's bytes still arrive"
        );
        let web_bytes = || s.bytes() - tagged();
        assert!(ByteSink::growing(web_bytes), "{fam}: web's bytes stopped");
    }
    assert!(
        dropped_of(&agent, "other", "deny-default") > 0,
        "{}",
        agent.log()
    );
    assert_eq!(dropped(&agent, "deny-default"), 0, "web's packets dropped");
    drop(held);
}

/// (3) Source routes: an IPv6 segment routing header whose active segment is denied, an IPv4
/// loose source route through a denied host; root and an unprivileged uid. The denied host
/// sees nothing from the workload (and does see the same attack from outside it).
#[test]
fn source_routes_do_not_reach_the_denied_host() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let agent = Agent::start(&netns_policy());
    let good4 = crate::harness::TcpServer::start_in(&ns.path, GOOD4, 0);
    let good6 = crate::harness::TcpServer::start_in(&ns.path, GOOD6, 0);
    let (p4, p6) = (good4.port(), good6.port());

    // Allowed traffic still works.
    for (ip, p) in [(GOOD4, &p4), (GOOD6, &p6)] {
        assert_eq!(
            attack(Some(&agent), &ns, None, &["connect", ip, p]),
            "connected"
        );
        assert_eq!(
            attack(Some(&agent), &ns, Some(NOBODY), &["connect", ip, p]),
            "connected"
        );
    }

    // The attacks work when nothing judges them (outside the workload): the test can see them.
    let cases = [("srh", GOOD6, BAD6, &p6), ("lsrr", GOOD4, BAD4, &p4)];
    for (kind, good, bad, port) in cases {
        let s = ns.sniff(bad, 2.0);
        let out = attack(None, &ns, None, &[kind, good, bad, port]);
        let seen = s.count();
        eprintln!("{kind} outside any workload, root: {out}; {seen} packets to {bad}");
        assert!(
            seen > 0,
            "{kind}: the control attack did not reach {bad}: {out}"
        );
    }

    let before = dropped(&agent, "source-route");
    for (kind, good, bad, port) in cases {
        for uid in [None, Some(NOBODY)] {
            let s = ns.sniff(bad, 2.0);
            let out = attack(Some(&agent), &ns, uid, &[kind, good, bad, port]);
            let seen = s.count();
            eprintln!(
                "{kind} in the workload as {}: {out}; {seen} packets to {bad}",
                uid.unwrap_or("root")
            );
            assert_eq!(seen, 0, "{kind} as {uid:?} reached {bad}: {out}");
            assert_ne!(out, "connected", "{kind} as {uid:?}");
        }
    }
    assert!(dropped(&agent, "source-route") > before, "{}", agent.log());
    agent.wait_log("packet-drop-source-route");
}

/// (4) Ping sockets: sendto() without connect to a denied address sends nothing; to an
/// allowed one the reply comes back. Root and an unprivileged uid, IPv4 and IPv6.
#[test]
fn ping_sendto_is_judged_per_packet() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let agent = Agent::start(&netns_policy());
    for uid in [None, Some(NOBODY)] {
        for (good, bad) in [(GOOD4, BAD4), (GOOD6, BAD6)] {
            assert_eq!(
                attack(Some(&agent), &ns, uid, &["ping", good]),
                "reply",
                "ping {good} as {uid:?}"
            );
            let s = ns.sniff(bad, 1.5);
            let out = attack(Some(&agent), &ns, uid, &["ping", bad]);
            let seen = s.count();
            eprintln!(
                "ping {bad} in the workload as {}: {out}; {seen} packets",
                uid.unwrap_or("root")
            );
            assert_eq!(seen, 0, "echo requests reached {bad} ({uid:?}): {out}");
            assert_ne!(out, "reply");
        }
    }
    assert!(dropped(&agent, "deny-rule") > 0);
}

/// (5) A workload acting as a server answers connections from outside, though the policy
/// allows no egress at all (its replies are not egress).
#[test]
fn workload_server_answers() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&deny_policy(&["127.33.0.9/32"], true));
    let port = crate::harness::free_port();
    let dir = agent.root.join("default").join("web");
    let p = port.to_string();
    let _s4 = Proc::in_cgroup(&dir, &["python3", ATTACK, "serve", "127.33.0.1", &p]);
    let _s6 = Proc::in_cgroup(&dir, &["python3", ATTACK, "serve", "::1", &p]);
    for ip in ["127.33.0.1", "::1"] {
        for _ in 0..3 {
            let mut c = std::net::TcpStream::connect((ip, port)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            std::io::Write::write_all(&mut c, b"ping\n").unwrap();
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line).expect("reply");
            assert_eq!(line.trim(), "pong", "{ip}");
        }
    }
    // The workload's own connections to the same address are still refused at connect().
    let out = agent.exec("web", &["python3", ATTACK, "connect", "127.33.0.1", &p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not permitted"), "{text}");
}

/// (5b) The same with TCP Fast Open, where the listener's very first connection carries its
/// data in the SYN (the client holds a cookie from an earlier server on that address): the
/// socket accepted at the SYN answers (SYN-ACK, first data) before it is established, and
/// before its listener ever sent a SYN-ACK of its own. The namespace's `TCPFastOpenPassive`
/// counter shows that the connections really were Fast Open.
#[test]
fn workload_server_answers_tcp_fast_open() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_fastopen=3");
    let agent = Agent::start(&deny_policy(&["127.33.0.9/32"], true));
    let port = crate::harness::free_port().to_string();
    let dir = agent.root.join("default").join("web");
    let net = format!("--net={}", ns.path.display());
    let serve = |ip| {
        [
            "nsenter", &net, "python3", ATTACK, "serve", ip, &port, "tfo",
        ]
    };
    let client = |ip| {
        let out = Command::new("nsenter")
            .args([&net, "python3", BYPASS, "fastopen", ip, &port, "ping"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let passive = || {
        let out = Command::new("nsenter")
            .args([&net, "cat", "/proc/net/netstat"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == "TCPFastOpenPassive")
            .expect("TCPFastOpenPassive");
        values
            .split_whitespace()
            .nth(i)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    for ip in [GOOD4, GOOD6] {
        // A server outside every workload hands the client its cookie, then goes.
        let seed = Proc::outside(&serve(ip));
        assert_eq!(client(ip), "ok reply=pong", "{ip}: seeding");
        drop(seed);
        let _server = Proc::in_cgroup(&dir, &serve(ip));
        let before = passive();
        for i in 0..2 {
            assert_eq!(client(ip), "ok reply=pong", "{ip}, connection {i}");
        }
        assert!(passive() >= before + 2, "no Fast Open connection to {ip}");
    }
}
