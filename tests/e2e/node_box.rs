//! A node in a box: the agent runs as the DaemonSet runs it, against a FAKE API server
//! (`FakeApiServer`, in this test process). A kubelet-like cgroup tree (systemd and cgroupfs
//! drivers) under the test's own cgroup parent; the agent started *inside* it as a pod (its own
//! pod and container cgroup, its own cgroup and mount namespaces with a read-only root and only
//! the DaemonSet's volumes writable, the host's PID and network namespaces), with exactly the
//! capabilities `deploy/kubernetes/base/daemonset.yaml` grants (setpriv, no_new_privs); a pod
//! with its own network namespace (made as a CNI would, with its sandbox process) running a
//! loop of allowed and denied connections throughout. Scenarios: first install, container
//! restart, rollout (new pod UID) in both orders, the API server unreachable at start and
//! during the run, all with `enableEgress: false` and the API server outside `meshCIDRs`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use egress_agent::k8s::cgroups::{container_dir, pod_dir, Driver, Qos};
use serde_json::{json, Value};

use crate::harness::{
    free_port, in_cgroup, privileged_with, temp_dir, unique, wait_until, Agent, CgroupTree,
    FakeApiServer, Netns, TcpServer,
};

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/base/daemonset.yaml"
);
const LOOP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/connect_loop.py");
const NODE: &str = "node-box";
const CAPS: [(&str, u32); 4] = [
    ("NET_ADMIN", 12),
    ("SYS_ADMIN", 21),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// `capabilities.add` of the DaemonSet's agent container, e.g. `BPF`, its other settings checked.
fn daemonset() -> Vec<String> {
    let text = std::fs::read_to_string(DAEMONSET).unwrap();
    let ds: Value = serde_saphyr::from_str(&text).expect("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "the box runs the agent in the host's PID namespace"
    );
    assert_eq!(
        pod["hostNetwork"], true,
        "the box runs the agent in the host's network"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    // The box makes exactly these writable (same roles, the test's own paths).
    assert_eq!(
        mounts,
        [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/run/egress",
            "/var/lib/egress"
        ]
    );
    sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The container runtime's part, as a shell script: into the container's cgroup, new cgroup
/// and mount namespaces, the root and /sys read-only with the volumes bound writable, then
/// the agent with only the granted capabilities and no_new_privs.
const RUNTIME: &str = r#"set -e
cg=$1; caps=$2; rw=$3; shift 3
echo $$ > "$cg/cgroup.procs"
exec unshare --mount --cgroup --propagation private sh -c '
set -e
caps=$1; rw=$2; shift 2
IFS=:; for d in $rw; do mount --bind "$d" "$d"; done; unset IFS
mount -o remount,bind,ro /
mount -o remount,bind,ro /sys
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="-all,$caps" -- "$@"
' container "$caps" "$rw" "$@"
"#;

fn uid(n: u32) -> String {
    format!("{n:08x}-b0c5-4e1d-9a7f-{:012x}", std::process::id())
}

fn cid(n: u32) -> String {
    format!("containerd://{}", format!("{n:08x}").repeat(8))
}

/// One node: its cgroup tree, the fake API server, the agent's volumes and the pod spec.
struct Node {
    tree: CgroupTree,
    kubepods: &'static str,
    driver: Driver,
    fake: Option<FakeApiServer>,
    /// Every object put, to serve again when the API server comes back.
    objects: Vec<(&'static str, Value)>,
    kubeconfig: PathBuf,
    volumes: PathBuf,
    /// The capabilities the DaemonSet grants.
    caps: Vec<String>,
    /// The agent's proxy port (in the MeshConfig).
    proxy_port: u16,
    allowed: TcpServer,
    /// Kept listening: a denied connect that got out would reach it.
    _denied: TcpServer,
    netns: Netns,
    sandbox: Child,
    sandbox_dir: PathBuf,
    app: PathBuf,
}

impl Node {
    fn new(driver: Driver) -> Node {
        let kubepods = match driver {
            Driver::Systemd => "kubepods.slice",
            Driver::Cgroupfs => "kubepods",
        };
        let tree = CgroupTree::new();
        tree.mkdir(kubepods);
        let volumes = temp_dir("node-box");
        for v in ["run", "state"] {
            std::fs::create_dir_all(volumes.join(v)).unwrap();
        }
        // The workload: pod web-1 in its own network namespace, its sandbox process in the
        // sandbox container's cgroup, an app container cgroup next to it; two servers in the
        // pod's namespace, one the policy allows and one it does not.
        let web = uid(0x1);
        let pod = Path::new(kubepods).join(pod_dir(driver, Qos::Burstable, &web));
        let sandbox_dir = tree.mkdir(pod.join(container_dir(driver, &cid(0x5a)).unwrap()));
        let app = tree.mkdir(pod.join(container_dir(driver, &cid(0xa9)).unwrap()));
        let netns = Netns::new(&unique("egress-box"));
        let sandbox = sandbox_process(&sandbox_dir, &netns);
        let allowed = TcpServer::start_in(&netns.path(), "127.77.0.1", 0);
        let denied = TcpServer::start_in(&netns.path(), "127.78.0.1", allowed.addr.port());
        let mut node = Node {
            kubeconfig: volumes.join("kubeconfig"),
            tree,
            kubepods,
            driver,
            fake: Some(FakeApiServer::start()),
            objects: Vec::new(),
            volumes,
            caps: daemonset(),
            proxy_port: free_port(),
            allowed,
            _denied: denied,
            netns,
            sandbox,
            sandbox_dir,
            app,
        };
        node.fake().write_kubeconfig(&node.kubeconfig).unwrap();
        // enableEgress false, no meshCIDRs: the API server is outside them.
        let mesh = json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "MeshConfig",
               "metadata": {"name": "egress"},
               "spec": {"traffic": {"enableEgress": false}, "proxy": {"port": node.proxy_port}}});
        node.put("meshconfigs", mesh);
        node.put("pods", pod_object("web-1", "shop", &web, "web", false));
        node.put(
            "egresses",
            json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
                   "metadata": {"name": "web-out", "namespace": "shop"},
                   "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "ipAddresses": ["127.77.0.0/16"],
                            "ports": [{"number": node.allowed.addr.port()}]}}),
        );
        node
    }

    fn fake(&self) -> &FakeApiServer {
        self.fake.as_ref().expect("the API server is up")
    }

    fn put(&mut self, collection: &'static str, obj: Value) {
        self.fake().put(collection, obj.clone());
        self.objects.push((collection, obj));
    }

    /// The API server goes away (its watches and connections end).
    fn api_down(&mut self) -> std::net::SocketAddr {
        let addr = self.fake().addr();
        self.fake = None;
        addr
    }

    /// The API server comes back at `addr` with every object.
    fn api_up(&mut self, addr: std::net::SocketAddr) {
        let fake = FakeApiServer::start_at(addr);
        for (c, o) in &self.objects {
            fake.put(c, o.clone());
        }
        self.fake = Some(fake);
    }

    /// The agent's pod `n` (the kubelet's pod cgroup, in the API) and its container `c`'s
    /// cgroup. Returns the container cgroup.
    fn agent_pod(&mut self, n: u32, c: u32) -> PathBuf {
        let u = uid(0xa0 + n);
        let pod = Path::new(self.kubepods).join(pod_dir(self.driver, Qos::Burstable, &u));
        let dir = self
            .tree
            .mkdir(pod.join(container_dir(self.driver, &cid(c)).unwrap()));
        if self.fake.is_some() {
            let name = format!("egress-agent-{n}");
            self.put(
                "pods",
                pod_object(&name, "egress-system", &u, "egress-agent", true),
            );
        }
        dir
    }

    /// The agent, not started, for the container cgroup `container`.
    fn agent(&self, container: &Path) -> Agent {
        let mut agent = Agent::new("");
        agent.proxy_port = self.proxy_port;
        agent.root = self.tree.path.join(self.kubepods);
        agent.socket = self.volumes.join("run/admin.sock");
        agent.state = self.volumes.join("state/egress.policy.yaml");
        agent.run_args = ["--kubernetes", "--node-name", NODE]
            .map(String::from)
            .to_vec();
        agent.env = vec![("KUBECONFIG".into(), self.kubeconfig.display().to_string())];
        self.containerize(&mut agent, container);
        agent
    }

    /// Runs `agent` in container cgroup `container` (a new container of the same pod, or
    /// another pod).
    fn containerize(&self, agent: &mut Agent, container: &Path) {
        let caps: Vec<String> = self
            .caps
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        let rw = [self.volumes.join("run"), self.volumes.join("state")]
            .map(|p| p.display().to_string())
            .join(":");
        agent.wrapper = vec![
            "sh".into(),
            "-c".into(),
            RUNTIME.into(),
            "runtime".into(),
            container.display().to_string(),
            caps.join(","),
            rw,
        ];
    }

    /// The connect loop in the web pod (its namespace, its app container), for `secs`.
    fn connect_loop(&self, secs: u64) -> Child {
        let port = self.allowed.addr.port().to_string();
        in_cgroup(&self.app, "nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .args(["python3", LOOP, &secs.to_string(), "127.77.0.1", &port])
            .args(["127.78.0.1", &port])
            .stdout(Stdio::piped())
            .spawn()
            .expect("connect loop")
    }
}

/// The pod's sandbox process (pause) in its cgroup and network namespace.
fn sandbox_process(dir: &Path, netns: &Netns) -> Child {
    in_cgroup(dir, "nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .args(["sleep", "600"])
        .spawn()
        .unwrap()
}

impl Node {
    /// A reboot, as far as the agent sees it: every process ends, bpffs (the pins), the
    /// cgroups and /run are empty again; the disk (the state file) stays. The kubelet then
    /// makes the web pod's cgroups and sandbox again.
    fn reboot(&mut self, agent: &mut Agent) {
        agent.kill();
        let _ = self.sandbox.kill();
        let _ = self.sandbox.wait();
        std::fs::remove_dir_all(&agent.pins).unwrap();
        fn rmdirs(dir: &Path) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    rmdirs(&e.path());
                    std::fs::remove_dir(e.path()).unwrap();
                }
            }
        }
        rmdirs(&self.tree.path);
        let _ = std::fs::remove_file(&agent.socket);
        self.tree.mkdir(self.kubepods);
        for d in [&self.sandbox_dir, &self.app] {
            std::fs::create_dir_all(d).unwrap();
        }
        self.sandbox = sandbox_process(&self.sandbox_dir, &self.netns);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.sandbox.kill();
        let _ = self.sandbox.wait();
        let _ = std::fs::remove_dir_all(&self.volumes);
    }
}

fn pod_object(name: &str, ns: &str, uid: &str, app: &str, host_network: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": app}},
           "spec": {"nodeName": NODE, "hostNetwork": host_network,
                    "containers": [{"name": "main", "image": "busybox"}]},
           "status": {"qosClass": "Burstable", "phase": "Running"}})
}

/// Starts the agent and waits until it is ready; returns how long that took.
fn ready(agent: &mut Agent) -> Duration {
    let t = Instant::now();
    agent.start_process();
    agent.wait_ready(Duration::from_secs(90));
    t.elapsed()
}

/// The loop's counts: the denied connections that got out must be zero.
fn finish(looper: Child, what: &str) -> String {
    let out = looper.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let n = |k: &str| -> u64 {
        counts
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {counts:?}"))
    };
    assert_eq!(
        n("denied_leaked"),
        0,
        "{what}: a denied connection got out: {counts}"
    );
    assert!(n("denied_refused") > 0, "{what}: {counts}");
    assert_eq!(
        n("allowed_failed"),
        0,
        "{what}: allowed traffic failed: {counts}"
    );
    assert!(n("allowed_ok") > 0, "{what}: {counts}");
    counts
}

/// The agent process as the box made it: exactly the granted capabilities, no_new_privs,
/// a read-only root, its own cgroup namespace, and now in the exempt `_agent` cgroup.
fn check_container(agent: &Agent, node: &Node) {
    let pid = agent.pid().expect("agent running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    let want: u64 = node
        .caps
        .iter()
        .map(|c| {
            let bit = CAPS
                .iter()
                .find(|(n, _)| n == c)
                .expect("a known capability")
                .1;
            1u64 << bit
        })
        .sum();
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        want,
        "effective capabilities"
    );
    assert_eq!(u64::from_str_radix(&field("CapBnd:"), 16).unwrap(), want);
    assert_eq!(want & (1 << 1), 0, "never CAP_DAC_OVERRIDE");
    assert_eq!(field("NoNewPrivs:"), "1");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    assert!(
        root.split_whitespace().nth(5).unwrap().starts_with("ro"),
        "{root}"
    );
    let procs = std::fs::read_to_string(agent.root.join("_agent/cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "not in _agent: {procs}"
    );
}

fn box_tools() -> bool {
    privileged_with(&["ip", "nsenter", "unshare", "setpriv"])
}

/// First install, a container restart (crash), a rollout that stops the old pod before the
/// new one starts (the manifest's `maxUnavailable`), and one where the new pod starts while
/// the old one still runs (a surge): the loop runs throughout.
fn restart_and_rollout(driver: Driver) {
    let mut node = Node::new(driver);
    let a1 = node.agent_pod(1, 0xa1);
    let mut agent = node.agent(&a1);
    let first = ready(&mut agent);
    check_container(&agent, &node);
    let looper = node.connect_loop(45);

    // Container restart (SIGKILL, as a crash or an OOM kill): the runtime makes a new
    // container cgroup in the same pod.
    agent.kill();
    let a2 = node.agent_pod(1, 0xa2);
    node.containerize(&mut agent, &a2);
    let restart = ready(&mut agent);
    check_container(&agent, &node);

    // Rollout, old pod first: SIGTERM, then a new pod (new UID, new cgroup).
    agent.stop_keep();
    let b = node.agent_pod(2, 0xb1);
    node.containerize(&mut agent, &b);
    let rollout = ready(&mut agent);
    check_container(&agent, &node);

    // Surge: the new pod starts while the old one runs. It cannot take over (the admin
    // socket and the node's ports are the old one's): it says so and exits, as often as the
    // kubelet restarts it, until the old one stops; enforcement holds meanwhile.
    let c = node.agent_pod(3, 0xc1);
    let mut second = node.agent(&c);
    second.metrics_port = agent.metrics_port;
    second.start_process();
    assert!(
        wait_until(Duration::from_secs(30), || second.exited().is_some()),
        "a second agent kept running:\n{}",
        second.log()
    );
    assert!(
        second
            .log()
            .contains("another egress-agent is serving this admin socket"),
        "{}",
        second.log()
    );
    // Nothing of the second one is removed when it is dropped: it is the node's.
    second.pins = PathBuf::from("/nonexistent");
    second.root = PathBuf::from("/nonexistent");
    second.socket = PathBuf::from("/nonexistent");
    second.state = PathBuf::from("/nonexistent");
    drop(second);
    agent.stop_keep();
    node.containerize(&mut agent, &c);
    let surge = ready(&mut agent);
    check_container(&agent, &node);
    assert_eq!(agent.http_get("/readyz").0, "HTTP/1.1 200 OK");

    let counts = finish(looper, "restart and rollout");
    eprintln!(
        "{}: ready after first install {} ms, container restart {} ms, rollout {} ms, surge (after the old one stopped) {} ms; loop: {counts}",
        node.kubepods,
        first.as_millis(),
        restart.as_millis(),
        rollout.as_millis(),
        surge.as_millis()
    );
    drop(agent);
}

#[test]
fn node_box_restart_and_rollout_systemd() {
    if !box_tools() {
        return;
    }
    restart_and_rollout(Driver::Systemd);
}

#[test]
fn node_box_restart_and_rollout_cgroupfs() {
    if !box_tools() {
        return;
    }
    restart_and_rollout(Driver::Cgroupfs);
}

/// The API server goes away while the agent runs (the policy in force stays, the agent stays
/// ready), and is unreachable when a new agent starts (it waits, not ready, while the pinned
/// policy enforces; ready once the API server is back).
#[test]
fn node_box_api_server_unreachable() {
    if !box_tools() {
        return;
    }
    let mut node = Node::new(Driver::Systemd);
    let a1 = node.agent_pod(1, 0xa1);
    let mut agent = node.agent(&a1);
    ready(&mut agent);
    let looper = node.connect_loop(30);

    let addr = node.api_down();
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.exited().is_none(), "{}", agent.log());
    assert_eq!(agent.http_get("/readyz").0, "HTTP/1.1 200 OK");

    // A restart while the API server is down: not ready, the pins enforce.
    agent.kill();
    let a2 = node.agent_pod(1, 0xa2);
    node.containerize(&mut agent, &a2);
    agent.start_process();
    std::thread::sleep(Duration::from_secs(5));
    assert!(agent.exited().is_none(), "{}", agent.log());
    assert_eq!(
        agent.http_get("/readyz").0,
        "HTTP/1.1 503 Service Unavailable"
    );
    let t = Instant::now();
    node.api_up(addr);
    agent.wait_ready(Duration::from_secs(60));
    let back = t.elapsed();
    check_container(&agent, &node);

    let counts = finish(looper, "API server unreachable");
    eprintln!(
        "API server unreachable: ready {} ms after it came back; loop: {counts}",
        back.as_millis()
    );
    drop(agent);
}

/// `_agent` re-created under the pins; then a node reboot (pins and cgroups gone, a new
/// `_agent`). Pods the kubelet restarts before the agent is ready run unjudged (nothing is
/// attached; the startup taint only keeps new pods away): the loop starts once it is ready.
#[test]
fn node_box_reboot() {
    if !box_tools() {
        return;
    }
    let mut node = Node::new(Driver::Cgroupfs);
    let a1 = node.agent_pod(1, 0xa1);
    let mut agent = node.agent(&a1);
    ready(&mut agent);
    let id = |agent: &Agent| {
        let log = agent.log();
        let line = log
            .lines()
            .find(|l| l.contains("in the agent's exempt cgroup"))
            .unwrap();
        line.split("id=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    // `_agent` removed while the pins stay: the next agent makes it anew and has the pinned
    // policy exempt the new id before its first connection (else it would be locked out).
    agent.kill();
    std::fs::remove_dir(agent.root.join("_agent")).unwrap();
    let a2 = node.agent_pod(1, 0xa2);
    node.containerize(&mut agent, &a2);
    ready(&mut agent);
    let log = agent.log();
    assert!(log.contains("the agent's cgroup was re-created"), "{log}");
    let before = id(&agent);
    node.reboot(&mut agent);
    let a = node.agent_pod(1, 0xa3);
    node.containerize(&mut agent, &a);
    let after_reboot = ready(&mut agent);
    check_container(&agent, &node);
    assert_ne!(id(&agent), before, "a new _agent cgroup after the reboot");
    let counts = finish(node.connect_loop(5), "after a reboot");
    eprintln!(
        "reboot: ready {} ms after the agent started; loop: {counts}",
        after_reboot.as_millis()
    );
    drop(agent);
}
