//! Pod-like workloads: each in its own network namespace behind a veth, with the agent in a
//! "node" namespace and the external hosts in an "outside" one, all created by the test (no
//! packet leaves the machine). The socket hooks judge the pod's connections as they judge a
//! host workload's; the tc backstop on the veth drops what skipped them.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use crate::harness::{
    in_netns, ip, privileged_with, wait_until, Agent, Netns, Sniffer, TcpServer,
    PACKETS_PY as PACKETS,
};

/// External stand-ins, on the outside namespace's loopback.
pub(crate) const ALLOW4: &str = "192.0.2.10";
const PROXY4: &str = "192.0.2.20";
pub(crate) const DENY4: &str = "192.0.2.30";
const PING4: &str = "192.0.2.40";
pub(crate) const ALLOW6: &str = "2001:db8::10";
const PROXY6: &str = "2001:db8::20";
pub(crate) const DENY6: &str = "2001:db8::30";
pub(crate) const POD4: &str = "10.200.0.2";
pub(crate) const POD6: &str = "fd00:200::2";
const NODE_UPLINK4: &str = "10.99.0.1";
const NODE_UPLINK6: &str = "fd99::1";
pub(crate) const PORT: u16 = 8080;

/// A node namespace (where the agent runs, like a Kubernetes node's) linked to an outside
/// namespace that holds the "external" addresses and routes the pod network back.
pub(crate) struct Net {
    tag: String,
    node: Netns,
    out: Netns,
    ext_if: String,
}

impl Net {
    pub(crate) fn new() -> Net {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "e{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            node: Netns::new(&format!("{tag}-node")),
            out: Netns::new(&format!("{tag}-out")),
            ext_if: format!("{tag}o"),
            tag,
        };
        let (n, o, up, ext) = (
            &net.node.name,
            &net.out.name,
            format!("{}u", net.tag),
            &net.ext_if,
        );
        ip(&[
            "link", "add", &up, "netns", n, "type", "veth", "peer", "name", ext, "netns", o,
        ]);
        net.node.ip_batch(&[
            format!("link set {up} up"),
            format!("addr add {NODE_UPLINK4}/24 dev {up}"),
            format!("addr add {NODE_UPLINK6}/64 dev {up} nodad"),
            "route add default via 10.99.0.2".into(),
            "route add default via fd99::2".into(),
        ]);
        let mut outside = vec![
            format!("link set {ext} up"),
            format!("addr add 10.99.0.2/24 dev {ext}"),
            format!("addr add fd99::2/64 dev {ext} nodad"),
            "route add 10.200.0.0/24 via 10.99.0.1".into(),
            "route add fd00:200::/64 via fd99::1".into(),
        ];
        for a in [ALLOW4, PROXY4, DENY4, PING4] {
            outside.push(format!("addr add {a}/32 dev lo"));
        }
        for a in [ALLOW6, PROXY6, DENY6] {
            outside.push(format!("addr add {a}/128 dev lo nodad"));
        }
        net.out.ip_batch(&outside);
        // Forwarding only inside the test's own node namespace.
        for f in ["ipv4/ip_forward", "ipv6/conf/all/forwarding"] {
            in_netns(&net.node_path(), move || {
                std::fs::write(format!("/proc/sys/net/{f}"), "1").expect("enable forwarding")
            });
        }
        net
    }

    pub(crate) fn node_path(&self) -> PathBuf {
        self.node.path()
    }

    pub(crate) fn out_path(&self) -> PathBuf {
        self.out.path()
    }

    /// One more "external" address on the outside namespace's loopback.
    pub(crate) fn outside_addr(&self, addr: &str) {
        self.out.ip_batch(&[format!("addr add {addr}/32 dev lo")]);
    }

    /// The namespace of the policy's pod `web`.
    pub(crate) fn pod_path(&self) -> PathBuf {
        Path::new("/run/netns").join(format!("{}-default-web", self.tag))
    }

    pub(crate) fn server(&self, addr: &str) -> TcpServer {
        TcpServer::start_in(&self.out_path(), addr, PORT)
    }

    /// Starts a sniffer on the outside end of the node's uplink that counts packets to `dst`.
    pub(crate) fn sniff(&self, dst: &str, secs: f32) -> Sniffer {
        Sniffer::start(&self.out_path(), &self.ext_if, dst, secs)
    }

    /// The MeshConfig (egress off unless `enable_egress`, the pod network, `extra` lines of
    /// its spec) and the pod `web`; Egress documents follow.
    pub(crate) fn pod_head(&self, enable_egress: bool, extra: &str) -> String {
        format!(
            "
kind: MeshConfig
metadata: {{name: egress}}
spec:
  traffic: {{enableEgress: {enable_egress}}}
  proxy: {{port: {{proxy_port}}}}
  podNetwork: {{ipv4: 10.200.0.0/24, ipv6: 'fd00:200::/64', netnsPrefix: {}-}}
{extra}---
kind: Workload
metadata: {{name: web}}
spec: {{network: pod}}
---
",
            self.tag
        )
    }

    pub(crate) fn policy(&self, enable_egress: bool) -> String {
        // sockets: the raw packets the tc backstop must drop.
        self.pod_head(enable_egress, "  sockets: {raw: allow}\n")
            + &format!(
                "kind: Egress
metadata: {{name: direct}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{ALLOW4}/32, '{ALLOW6}/128']
  ports: [{{number: {PORT}, protocol: tcp}}]
---
kind: Egress
metadata: {{name: proxied}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{PROXY4}/32, '{PROXY6}/128']
  ports: [{{number: {PORT}, protocol: tcp}}]
  via: proxy
---
kind: Egress
metadata: {{name: ping}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{PING4}/32]
"
            )
    }
}

/// Removes a pod's namespace the test plugged in itself, also when it fails before an agent
/// (whose uninstall would) has taken it over.
struct Unplug(egress_agent::datapath::podnet::Pod);

impl Drop for Unplug {
    fn drop(&mut self) {
        egress_agent::datapath::podnet::remove(&self.0);
    }
}

/// The sum of a metric's samples whose line contains every one of `labels`.
pub(crate) fn metric(a: &Agent, name: &str, labels: &[&str]) -> u64 {
    let (_, body) = a.http_get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// What the agent's last start did with the backstop's ingress link: attached, kept, replaced.
fn tc_link_state(log: &str) -> String {
    let at = log
        .rfind("egress_tc_from_workload on ")
        .unwrap_or_else(|| panic!("no tc backstop in the log:\n{log}"));
    let rest = &log[at..];
    let open = rest.find('(').unwrap();
    let close = rest.find(')').unwrap();
    rest[open + 1..close].to_string()
}

pub(crate) fn drops(a: &Agent) -> u64 {
    metric(a, "egress_tc_dropped_packets_total{", &[])
}

pub(crate) fn raw_syn(a: &Agent, dst: &str) {
    let out = a.exec("web", &["python3", PACKETS, "syn", dst, &PORT.to_string()]);
    assert!(
        out.status.success(),
        "raw SYN to {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pod_connections_are_allowed_redirected_and_denied_for_ipv4_and_ipv6() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let net = Net::new();
    let a = Agent::start_in(&net.policy(false), Some(&net.node_path()));
    let p = PORT.to_string();
    for (allow, proxy, deny, pod, uplink) in [
        (ALLOW4, PROXY4, DENY4, POD4, NODE_UPLINK4),
        (ALLOW6, PROXY6, DENY6, POD6, NODE_UPLINK6),
    ] {
        let (sa, sp) = (net.server(allow), net.server(proxy));
        let fmt = |h: &str| {
            if h.contains(':') {
                format!("[{h}]:{PORT}")
            } else {
                format!("{h}:{PORT}")
            }
        };

        // Direct: the destination sees the pod's own address.
        let out = a.client("web", &["tcp", allow, &p, "direct"]);
        assert_eq!(
            out,
            format!("ok peer={} reply={}|direct", fmt(allow), fmt(allow))
        );
        assert_eq!(sa.peer(0).ip().to_string(), pod);

        // Redirected to the proxy inside the pod's namespace: the application still sees
        // the address it dialled; the connection leaves from the node.
        let out = a.client("web", &["tcp", proxy, &p, "via-proxy"]);
        assert_eq!(
            out,
            format!("ok peer={} reply={}|via-proxy", fmt(proxy), fmt(proxy))
        );
        assert_eq!(sp.peer(0).ip().to_string(), uplink);

        // Denied at connect(): EPERM, no packet.
        let sniff = net.sniff(deny, 1.0);
        let out = a.client("web", &["tcp", deny, &p]);
        assert!(out.starts_with("err EPERM"), "{out}");
        assert_eq!(sniff.count(), 0, "a denied connect sent a packet");
    }
    // A connection into the pod, from a peer the pod may not dial itself, is answered: its
    // replies are not new egress.
    let inside = TcpServer::start_in(&net.pod_path(), POD4, PORT);
    let reply = in_netns(&net.out_path(), || {
        let mut s = TcpStream::connect_timeout(
            &format!("{POD4}:{PORT}").parse().unwrap(),
            Duration::from_secs(3),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"inbound\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        std::io::Result::Ok(line)
    })
    .expect("connect into the pod");
    assert_eq!(reply.trim(), format!("{POD4}:{PORT}|inbound"));
    assert_eq!(inside.peer(0).ip().to_string(), "10.99.0.2");
    assert!(metric(&a, "egress_tc_packets_total{", &["verdict=\"reply\""]) >= 2);

    // Allowed and redirected traffic crossed the backstop without a single drop.
    assert_eq!(drops(&a), 0, "{}", a.http_get("/metrics").1);
    assert!(metric(&a, "egress_tc_packets_total{", &["verdict=\"allow\""]) >= 6);
    assert!(metric(&a, "egress_tc_bytes_total{", &["verdict=\"allow\""]) > 0);
    let l = a.wait_log("verdict=\"proxy\"");
    assert!(l.contains("proxy listening inside the pod"), "{l}");
}

#[test]
fn tc_drops_raw_packets_and_icmp_that_skip_the_socket_hooks() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let net = Net::new();
    // The per-packet cgroup program would drop these packets first (EPERM at sendto, see
    // packets.rs): this test is about the veth backstop alone.
    let a = Agent::start_with(
        &net.policy(false),
        Some(&net.node_path()),
        &[("EGRESS_NO_PACKET_PROGRAM", "1")],
    );
    let _servers: Vec<TcpServer> = [ALLOW4, DENY4, DENY6]
        .iter()
        .map(|h| net.server(h))
        .collect();

    // A raw socket's SYN to an allowed destination goes out (the sniffer works) ...
    let seen = net.sniff(ALLOW4, 1.5);
    raw_syn(&a, ALLOW4);
    assert_eq!(seen.count(), 1, "the allowed raw SYN did not arrive");

    // ... and to a denied one it never reaches the outside, IPv4 and IPv6.
    for dst in [DENY4, DENY6] {
        let before = drops(&a);
        let seen = net.sniff(dst, 1.5);
        raw_syn(&a, dst);
        assert_eq!(seen.count(), 0, "a raw SYN to {dst} got out");
        assert_eq!(
            drops(&a),
            before + 1,
            "drop counter:\n{}",
            a.http_get("/metrics").1
        );
    }
    a.wait_log("verdict=\"tc-drop-deny-default\"");

    // ICMP echo: `ping` is answered where the policy allows it; echo requests from a raw
    // socket (NET_RAW: no socket hook sees them) to a denied host are dropped on the veth.
    let ok = a.exec("web", &["ping", "-c", "1", "-W", "2", PING4]);
    assert!(
        ok.status.success(),
        "ping {PING4}: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    for dst in [DENY4, DENY6] {
        let before = drops(&a);
        let seen = net.sniff(dst, 1.5);
        let out = a.exec("web", &["python3", PACKETS, "echo", dst]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(seen.count(), 0, "an echo request to {dst} got out");
        assert_eq!(drops(&a), before + 1, "{}", a.http_get("/metrics").1);
    }
    let denied = a.exec("web", &["ping", "-c", "1", "-W", "1", DENY4]);
    assert!(
        !denied.status.success(),
        "ping to a denied host was answered"
    );
    assert_eq!(
        metric(
            &a,
            "egress_tc_dropped_packets_total{",
            &["reason=\"deny-default\""]
        ),
        4,
        "{}",
        a.http_get("/metrics").1
    );
}

#[test]
fn tc_drops_a_connection_opened_before_the_agent_started_and_survives_restarts() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let net = Net::new();
    let policy = net.policy(false);
    // Plug the pod in with the agent's own code, before any agent runs (as a CNI would),
    // and open a connection to a destination the policy will deny.
    let cfg = egress_agent::policy::parse(&policy.replace("{proxy_port}", "15001"), "p.yaml")
        .expect("policy");
    let pods = egress_agent::datapath::podnet::plan(&cfg);
    let pod = pods[0].clone();
    let pod2 = pod.clone();
    let _unplug = Unplug(pod.clone());
    in_netns(&net.node_path(), move || {
        egress_agent::datapath::podnet::ensure(&pod2)
    })
    .expect("plug pod");
    let server = net.server(DENY4);
    let mut early = in_netns(&pod.netns_path(), || {
        TcpStream::connect_timeout(
            &format!("{DENY4}:{PORT}").parse().unwrap(),
            Duration::from_secs(3),
        )
    })
    .expect("connect before the agent");
    early
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    wait_until(Duration::from_secs(2), || server.accepted() == 1);
    assert_eq!(server.accepted(), 1);

    // The per-packet program would refuse the raw SYN below at sendto() already: the
    // backstop alone here (tests/e2e/packets.rs covers the per-packet program).
    let mut a = Agent::start_with(
        &policy,
        Some(&net.node_path()),
        &[("EGRESS_NO_PACKET_PROGRAM", "1")],
    );
    assert_eq!(tc_link_state(&a.log()), "attached");
    let listening = || a.log().matches("proxy listening inside the pod").count();
    wait_until(Duration::from_secs(5), || listening() >= 1);
    assert_eq!(listening(), 1);

    // The established connection's next segment is dropped on the veth: no reply.
    let before = drops(&a);
    let seen = net.sniff(DENY4, 2.0);
    early.write_all(b"after the agent\n").unwrap();
    let mut buf = [0u8; 64];
    // No answer: a timeout, or the server's own idle close (a FIN: it never got the line,
    // which it would have echoed first; the agent can take seconds to start on a busy
    // machine).
    if let Ok(n @ 1..) = early.read(&mut buf) {
        panic!(
            "the server answered a dropped segment: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    assert_eq!(seen.count(), 0, "a segment of the early connection got out");
    assert!(drops(&a) > before);

    // Stopped agent: the pinned tc links keep dropping; a restarted one keeps them.
    a.stop_keep();
    let seen = net.sniff(DENY4, 1.5);
    raw_syn(&a, DENY4);
    assert_eq!(
        seen.count(),
        0,
        "a raw SYN got out while the agent was stopped"
    );
    a.spawn();
    assert_eq!(tc_link_state(&a.log()), "kept");
    let out = a.client("web", &["tcp", DENY4, &PORT.to_string()]);
    assert!(out.starts_with("err EPERM"), "{out}");

    // Uninstall removes the pod's namespace and veth with the rest.
    a.kill();
    let un = a.uninstall();
    let text = String::from_utf8_lossy(&un.stdout);
    assert!(text.contains("removed the network namespace"), "{text}");
    assert!(!pod.netns_path().exists());
    drop(early);
}

#[test]
fn the_clsact_fallback_drops_what_skips_the_socket_hooks_too() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let net = Net::new();
    let mut a = Agent::start_with(
        &net.policy(false),
        Some(&net.node_path()),
        // The packet program would drop the raw packets first: the backstop alone here.
        &[
            ("EGRESS_TC_ATTACH", "clsact"),
            ("EGRESS_NO_PACKET_PROGRAM", "1"),
        ],
    );
    assert_eq!(tc_link_state(&a.log()), "clsact");
    let _servers: Vec<TcpServer> = [ALLOW4, DENY4].iter().map(|h| net.server(h)).collect();
    let out = a.client("web", &["tcp", ALLOW4, &PORT.to_string(), "x"]);
    assert!(out.starts_with("ok "), "{out}");
    // A restart replaces the filters rather than stacking a second copy.
    a.stop_keep();
    a.spawn();
    let cfg = egress_agent::policy::parse(&std::fs::read_to_string(&a.config).unwrap(), "p")
        .expect("policy");
    let host_if = egress_agent::datapath::podnet::plan(&cfg)[0]
        .host_if
        .clone();
    for dir in ["ingress", "egress"] {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", net.node_path().display()))
            .args(["tc", "filter", "show", "dev", &host_if, dir])
            .output()
            .expect("tc filter show");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches(" direct-action ").count(), 1, "{dir}:\n{text}");
    }
    let seen = net.sniff(DENY4, 1.5);
    raw_syn(&a, DENY4);
    assert_eq!(seen.count(), 0, "a raw SYN to {DENY4} got out");
    assert_eq!(drops(&a), 1, "{}", a.http_get("/metrics").1);
}

#[test]
fn a_pod_leaving_the_policy_is_unplugged_without_touching_the_others() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let net = Net::new();
    let two = net.policy(false).replace(
        "---\nkind: Egress\nmetadata: {name: direct}",
        "---\nkind: Workload\nmetadata: {name: batch}\nspec: {network: pod}\n---\nkind: Egress\nmetadata: {name: direct}",
    );
    // The packet program would drop the raw packets first: the backstop alone here.
    let a = Agent::start_with(
        &two,
        Some(&net.node_path()),
        &[("EGRESS_NO_PACKET_PROGRAM", "1")],
    );
    let batch = Path::new("/run/netns").join(format!("{}-default-batch", net.tag));
    assert!(batch.exists() && net.pod_path().exists());
    let pins = |a: &Agent| {
        std::fs::read_dir(
            a.pins
                .join(format!("v{}/links", egress_common::LAYOUT_VERSION)),
        )
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("tc-")
        })
        .count()
    };
    assert_eq!(pins(&a), 4);
    let _servers: Vec<TcpServer> = [ALLOW4, DENY4].iter().map(|h| net.server(h)).collect();

    a.reload(&net.policy(false));
    assert!(
        !batch.exists(),
        "the removed pod's namespace is still there"
    );
    assert_eq!(pins(&a), 2);
    // web is enforced as before, by its hooks and its backstop.
    let out = a.client("web", &["tcp", ALLOW4, &PORT.to_string(), "still"]);
    assert!(out.starts_with("ok "), "{out}");
    let seen = net.sniff(DENY4, 1.5);
    raw_syn(&a, DENY4);
    assert_eq!(seen.count(), 0);
    assert_eq!(drops(&a), 1);
}
