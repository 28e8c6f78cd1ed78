//! Kubernetes mode end to end, without a cluster: realistic kubelet cgroup trees (systemd and
//! cgroupfs drivers, containerd and CRI-O container scopes) under a test parent, the agent in
//! `--kubernetes` mode against `FakeApiServer` (a FAKE API server in this test process that
//! speaks the real list/watch JSON), real programs attached to the test's kubepods cgroup,
//! and real processes in the pods' container cgroups. Traffic goes to loopback only; a
//! refusal by policy is EPERM, an allowed connect to a port where nothing listens is
//! ECONNREFUSED.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use egress_agent::k8s::cgroups::{container_dir, pod_dir, Driver, Qos};
use serde_json::{json, Value};

use crate::harness::{
    client_in_cgroup, in_cgroup, privileged, privileged_with, wait_until, Agent, CgroupTree,
    FakeApiServer, Netns, TcpServer, AGENT, CLIENT,
};

pub(crate) const EPERM: &str = "err EPERM";
pub(crate) const ALLOWED: &str = "err ECONNREFUSED";
pub(crate) const NODE: &str = "node-a";

pub(crate) fn verdict(dir: &Path, ip: &str) -> &'static str {
    let out = client_in_cgroup(dir, &["tcp", ip, "9"]);
    if out.starts_with(EPERM) {
        EPERM
    } else if out.starts_with(ALLOWED) {
        ALLOWED
    } else {
        panic!("unexpected client result for {ip}: {out}")
    }
}

/// Waits until `f` returns true (10 s at most).
pub(crate) fn eventually(what: &str, agent: &Agent, f: impl Fn() -> bool) {
    assert!(
        wait_until(Duration::from_secs(10), f),
        "never: {what}\nagent log:\n{}",
        agent.log()
    );
}

pub(crate) fn uid(n: u32) -> String {
    format!("{n:08x}-0d4e-4f5a-8b6c-{:012x}", std::process::id())
}

pub(crate) fn pod(name: &str, uid: &str, app: &str, qos: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": app}},
           "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
           "status": {"qosClass": qos, "phase": "Running"}})
}

fn egress(port: i64) -> Value {
    json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
           "metadata": {"name": "web-out", "namespace": "shop"},
           "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ipAddresses": ["127.77.0.0/16"], "ports": [{"number": port}]}})
}

/// The kubelet's and the runtime's part: the pod cgroup and one container cgroup in it.
pub(crate) fn make_pod(
    tree: &CgroupTree,
    kubepods: &str,
    driver: Driver,
    qos: Qos,
    uid: &str,
    container: &str,
) -> PathBuf {
    let rel = Path::new(kubepods).join(pod_dir(driver, qos, uid));
    tree.mkdir(&rel);
    tree.mkdir(rel.join(container_dir(driver, container).expect("container id")))
}

pub(crate) fn metric(agent: &Agent, name: &str) -> Option<f64> {
    let (_, body) = agent.http_get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn cluster_cli(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(AGENT)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("egress-agent");
    assert!(
        out.status.success(),
        "egress-agent {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An agent in Kubernetes mode for node NODE on the kubepods cgroup `root`, against `fake`,
/// whose MeshConfig `egress` (enableEgress false, this agent's proxy port) is put first.
/// Started, and ready. Returns it and its kubeconfig file.
pub(crate) fn kube_agent(fake: &FakeApiServer, root: PathBuf) -> (Agent, PathBuf) {
    kube_agent_in(fake, root, None, json!({}))
}

/// [`kube_agent`] in network namespace `netns` (a test's node), with `more` added to the
/// MeshConfig's spec.
pub(crate) fn kube_agent_in(
    fake: &FakeApiServer,
    root: PathBuf,
    netns: Option<&Path>,
    more: Value,
) -> (Agent, PathBuf) {
    let mut agent = Agent::new("");
    agent.netns = netns.map(Path::to_path_buf);
    let mut spec = json!({"traffic": {"enableEgress": false}, "proxy": {"port": agent.proxy_port}});
    if let (Some(s), Some(m)) = (spec.as_object_mut(), more.as_object()) {
        s.extend(m.clone());
    }
    fake.put(
        "meshconfigs",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "MeshConfig",
               "metadata": {"name": "egress"}, "spec": spec}),
    );
    let kubeconfig = agent.config.with_extension("kubeconfig");
    fake.write_kubeconfig(&kubeconfig).unwrap();
    agent.root = root;
    agent.run_args = ["--kubernetes", "--node-name", NODE]
        .map(String::from)
        .to_vec();
    agent.env = vec![
        ("KUBECONFIG".into(), kubeconfig.display().to_string()),
        // The watcher's debug lines say which pods still wait for their cgroup.
        (
            "EGRESS_LOG".into(),
            "info,egress::flow=debug,egress_agent::k8s::watch=debug".into(),
        ),
    ];
    agent.spawn();
    (agent, kubeconfig)
}

/// One node, two drivers' worth of layout: pods enforced per pod, churn reconciled without
/// touching the other pods, a bad CRD object reported with the previous policy kept, the
/// cluster toggle converging and reported per node.
fn pods_are_enforced_per_pod(driver: Driver, kubepods: &str, runtime: &str) {
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start();
    let (a, b, c) = (uid(0xa), uid(0xb), uid(0xc));
    let cid = |n: &str| format!("{runtime}://{}", n.repeat(64 / n.len()));
    let web_a = make_pod(&tree, kubepods, driver, Qos::Burstable, &a, &cid("a1"));
    let db_b = make_pod(&tree, kubepods, driver, Qos::BestEffort, &b, &cid("b2"));
    fake.put("pods", pod("web-a", &a, "web", "Burstable", NODE));
    fake.put("pods", pod("db-b", &b, "db", "BestEffort", NODE));
    // Another node's pod with the same labels: never this node's business.
    fake.put(
        "pods",
        pod("web-x", &uid(0xd), "web", "Burstable", "node-b"),
    );
    fake.put("egresses", egress(9));

    // The node was registered with the startup taint: no workload is scheduled on it until
    // its agent enforces.
    fake.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"taints": [{"key": "egress.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"},
                                   {"key": "gpu", "effect": "NoSchedule"}]}}),
    );
    let (mut agent, kubeconfig) = kube_agent(&fake, tree.path.join(kubepods));
    assert_eq!(agent.http_get("/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(metric(&agent, "egress_workloads "), Some(2.0));
    eventually(
        "the startup taint is removed, the others kept",
        &agent,
        || {
            fake.get("nodes", "", NODE).unwrap()["spec"]["taints"]
                == json!([{"key": "gpu", "effect": "NoSchedule"}])
        },
    );

    // Per pod: web is allowed to 127.77/16 port 9, db is not; neither elsewhere.
    assert_eq!(verdict(&web_a, "127.77.0.1"), ALLOWED);
    assert_eq!(verdict(&db_b, "127.77.0.1"), EPERM);
    assert_eq!(verdict(&web_a, "127.78.0.1"), EPERM);
    // A process of the test (outside kubepods) is untouched.
    let outside = crate::harness::split_local(
        String::from_utf8_lossy(
            &Command::new("python3")
                .args([crate::harness::CLIENT, "tcp", "127.78.0.1", "9"])
                .output()
                .unwrap()
                .stdout,
        )
        .trim(),
    )
    .0;
    assert!(outside.starts_with(ALLOWED), "{outside}");

    // A bad change to the Egress: reported (log, metric, MeshConfig status); the previous
    // version stays in force.
    fake.put("egresses", egress(0));
    agent.wait_log(
        "kubernetes: Egress shop/web-out: spec.ports[0].number: port 0 is out of range 1-65535",
    );
    eventually("the rejection is counted", &agent, || {
        metric(&agent, "egress_policy_rejected_total{kind=\"Egress\"}") == Some(1.0)
    });
    assert_eq!(verdict(&web_a, "127.77.0.1"), ALLOWED);
    eventually(
        "a Warning Event names the object and the field",
        &agent,
        || {
            fake.list("events").iter().any(|e| {
                e["reason"] == "Rejected"
                    && e["type"] == "Warning"
                    && e["regarding"]["kind"] == "Egress"
                    && e["regarding"]["name"] == "web-out"
                    && e["metadata"]["namespace"] == "shop"
                    && e["reportingInstance"] == NODE
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("spec.ports[0].number"))
            })
        },
    );
    eventually("the node reports the rejection", &agent, || {
        fake.get("meshconfigs", "", "egress").unwrap()["status"]["nodes"][NODE]["rejected"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
    });

    // Churn: a new web pod whose cgroup the kubelet makes only after the API object exists
    // (pending, then enforced); web-a deleted. db-b is judged the same throughout.
    fake.put("pods", pod("web-c", &c, "web", "Guaranteed", NODE));
    eventually("web-c is pending (known, no cgroup yet)", &agent, || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("pods without a cgroup yet") && l.contains("web-c"))
    });
    let t0 = Instant::now();
    let web_c = make_pod(&tree, kubepods, driver, Qos::Guaranteed, &c, &cid("c3"));
    eventually("web-c is enrolled", &agent, || {
        metric(&agent, "egress_workloads ") == Some(3.0)
    });
    eprintln!(
        "{kubepods}: web-c enrolled {} ms after its cgroup appeared",
        t0.elapsed().as_millis()
    );
    assert_eq!(verdict(&web_c, "127.77.0.1"), ALLOWED);
    assert_eq!(verdict(&web_c, "127.78.0.1"), EPERM);
    let gen_before = metric(&agent, "egress_policy_generation ").unwrap();
    fake.delete("pods", "shop", "web-a");
    eventually("web-a is gone", &agent, || {
        metric(&agent, "egress_workloads ") == Some(2.0)
    });
    assert!(metric(&agent, "egress_policy_generation ").unwrap() > gen_before);
    assert_eq!(verdict(&db_b, "127.77.0.1"), EPERM);
    assert_eq!(verdict(&web_c, "127.77.0.1"), ALLOWED);
    // The deleted pod's cgroup is no workload any more: what still runs there is refused.
    assert_eq!(verdict(&web_a, "127.77.0.1"), EPERM);

    // A container restart: the runtime makes a new container cgroup in the same pod cgroup;
    // no API event is needed for it to be judged as its pod.
    let restarted = web_c
        .parent()
        .unwrap()
        .join(container_dir(driver, &cid("e5")).unwrap());
    std::fs::create_dir(&restarted).unwrap();
    assert_eq!(verdict(&restarted, "127.77.0.1"), ALLOWED);
    assert_eq!(verdict(&restarted, "127.78.0.1"), EPERM);
    // A pod deleted and created again under the same name (a StatefulSet's): new UID, new
    // cgroup, enforced; its old cgroup no longer is.
    let again = uid(0xf);
    fake.delete("pods", "shop", "db-b");
    fake.put("pods", pod("db-b", &again, "web", "Burstable", NODE));
    let db_b2 = make_pod(&tree, kubepods, driver, Qos::Burstable, &again, &cid("f6"));
    eventually(
        "db-b is enrolled under its new UID (as a web pod now)",
        &agent,
        || verdict(&db_b2, "127.77.0.1") == ALLOWED,
    );
    assert_eq!(verdict(&db_b, "127.77.0.1"), EPERM);
    assert_eq!(verdict(&db_b2, "127.78.0.1"), EPERM);

    // The cluster toggle: patch the MeshConfig, every node (here one) converges and says so.
    let out = cluster_cli(
        &kubeconfig,
        &["egress", "enable", "--kubernetes", "--wait", "20"],
    );
    assert!(out.contains(NODE) && out.contains("converged"), "{out}");
    assert_eq!(verdict(&db_b2, "127.78.0.1"), ALLOWED);
    // No pod runs unjudged: a pod cgroup the agent was not told of (yet) is refused even
    // where enrolled pods pass (failMode closed).
    let unknown = make_pod(
        &tree,
        kubepods,
        driver,
        Qos::BestEffort,
        &uid(0x99),
        &cid("99"),
    );
    assert_eq!(verdict(&unknown, "127.78.0.1"), EPERM);
    let out = cluster_cli(
        &kubeconfig,
        &["egress", "disable", "--kubernetes", "--wait", "20"],
    );
    assert!(
        out.contains("enableEgress false") && out.contains("converged"),
        "{out}"
    );
    assert_eq!(verdict(&db_b2, "127.78.0.1"), EPERM);
    let out = cluster_cli(
        &kubeconfig,
        &["egress", "status", "--kubernetes", "-o", "json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nodes"][0]["node"], NODE);
    assert_eq!(v["nodes"][0]["enable_egress"], false);

    // The local admin socket still answers questions, but local policy changes are refused:
    // the API server's objects are the policy.
    let check = agent.cli_ok(&["policy", "check", "-w", "shop/web-c", "127.77.0.1:9"]);
    assert!(check.contains("shop/web-out"), "{check}");
    let out = agent.cli(&["egress", "enable"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Kubernetes mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // kill -9: the pinned programs and maps keep enforcing per pod while the agent is down;
    // a new agent syncs again and takes over without a gap.
    agent.kill();
    assert_eq!(verdict(&web_c, "127.77.0.1"), ALLOWED);
    assert_eq!(verdict(&web_c, "127.78.0.1"), EPERM);
    assert_eq!(verdict(&unknown, "127.78.0.1"), EPERM);
    agent.spawn();
    assert_eq!(agent.http_get("/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(verdict(&web_c, "127.77.0.1"), ALLOWED);
    assert_eq!(verdict(&db_b2, "127.78.0.1"), EPERM);
    assert_eq!(metric(&agent, "egress_workloads "), Some(2.0));

    drop(agent);
    let _ = std::fs::remove_file(kubeconfig);
}

#[test]
fn kubernetes_systemd_driver_containerd() {
    if !privileged() {
        return;
    }
    pods_are_enforced_per_pod(Driver::Systemd, "kubepods.slice", "containerd");
}

#[test]
fn kubernetes_cgroupfs_driver_cri_o() {
    if !privileged() {
        return;
    }
    pods_are_enforced_per_pod(Driver::Cgroupfs, "kubepods", "cri-o");
}

/// A pod's own network namespace as the CNI makes it (here only loopback), with its sandbox
/// process (`sleep`, standing in for pause) in the sandbox's container cgroup. Removed, and
/// the process killed, when dropped.
pub(crate) struct PodNetns {
    pub(crate) netns: Netns,
    sandbox: Child,
}

impl PodNetns {
    pub(crate) fn new(sandbox_cgroup: &Path, tag: &str) -> PodNetns {
        let netns = Netns::new(&format!("egress-k8s-{}-{tag}", std::process::id()));
        // Into the cgroup first, then the namespace (nsenter keeps the host's /sys, where
        // the cgroup hierarchy is; `ip netns exec` would remount it).
        let sandbox = in_cgroup(sandbox_cgroup, "nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["sleep", "600"])
            .spawn()
            .expect("sandbox process");
        let pod = PodNetns { netns, sandbox };
        let procs = sandbox_cgroup.join("cgroup.procs");
        assert!(
            wait_until(Duration::from_secs(5), || {
                !std::fs::read_to_string(&procs)
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
            }),
            "the sandbox never joined its cgroup"
        );
        pod
    }

    /// client.py inside the pod: in its namespace and in container cgroup `dir`.
    pub(crate) fn client(&self, dir: &Path, args: &[&str]) -> String {
        let out = in_cgroup(dir, "nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .args(["python3", CLIENT])
            .args(args)
            .output()
            .expect("client.py in the pod");
        crate::harness::split_local(String::from_utf8_lossy(&out.stdout).trim()).0
    }
}

impl Drop for PodNetns {
    /// The sandbox process first; then the namespace goes (the `netns` field drops).
    fn drop(&mut self) {
        let _ = self.sandbox.kill();
        let _ = self.sandbox.wait();
    }
}

/// A Burstable pod of the systemd driver with uid `u`: its sandbox process in its own network
/// namespace, and an empty application container cgroup (returned, with the namespace).
pub(crate) fn pod_in_netns(
    tree: &CgroupTree,
    kubepods: &str,
    u: &str,
    tag: &str,
) -> (PathBuf, PodNetns) {
    let driver = Driver::Systemd;
    let sandbox = make_pod(
        tree,
        kubepods,
        driver,
        Qos::Burstable,
        u,
        &format!("containerd://{}", "5a".repeat(32)),
    );
    let app = sandbox
        .parent()
        .unwrap()
        .join(container_dir(driver, &format!("containerd://{}", "a9".repeat(32))).unwrap());
    std::fs::create_dir(&app).unwrap();
    let netns = PodNetns::new(&sandbox, tag);
    (app, netns)
}

/// A pod in its own network namespace (not the node's): a `via: proxy` rule redirects its
/// connection to 127.0.0.1:<proxy port> inside the pod, where the agent opened a listener
/// (found through the pod's cgroup), and the proxy reaches the destination from the node. The
/// destination exists only on the node's loopback, so a reply proves the relay.
#[test]
fn kubernetes_pod_in_its_own_netns_uses_the_in_pod_proxy() {
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    let kubepods = "kubepods.slice";
    let tree = CgroupTree::new();
    tree.mkdir(kubepods);
    let fake = FakeApiServer::start();
    let server = TcpServer::start("127.79.0.1");
    let u = uid(0x70);
    let (app, netns) = pod_in_netns(&tree, kubepods, &u, "api");
    fake.put("pods", pod("api-1", &u, "api", "Burstable", NODE));
    fake.put(
        "egresses",
        json!({"apiVersion": "policy.egress.dev/v1alpha1", "kind": "Egress",
               "metadata": {"name": "api-out", "namespace": "shop"},
               "spec": {"sources": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                        "ipAddresses": ["127.79.0.0/16"], "ports": [{"number": server.addr.port()}],
                        "via": "proxy"}}),
    );
    let (agent, kubeconfig) = kube_agent(&fake, tree.path.join(kubepods));
    agent.wait_log("proxy listening inside the pod");

    let out = netns.client(&app, &["tcp", "127.79.0.1", &server.port()]);
    assert!(
        out.starts_with(&format!("ok peer=127.79.0.1:{}", server.port())),
        "{out}\n{}",
        agent.log()
    );
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Anything else stays refused at connect().
    let out = netns.client(&app, &["tcp", "127.80.0.1", "9"]);
    assert!(out.starts_with(EPERM), "{out}");

    drop(agent);
    drop(netns);
    let _ = std::fs::remove_file(kubeconfig);
}
