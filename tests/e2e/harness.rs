//! Fixtures for the end-to-end tests that need the agent: a running `egress-agent run` on
//! its own cgroup root and pin directory, and real clients run inside its workloads. The
//! generic fixtures (netns, cgroups, servers, sniffers, processes, waits, the skip-or-fail
//! rule) are in the `egress-test-support` crate, re-exported here. Everything a test creates
//! is removed when its fixture drops, also when the test panics.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

pub use egress_test_support::{
    cgroup::{cgroup2_mount, client_in_cgroup, in_cgroup, split_local, CgroupTree},
    env::{require, Need},
    net::{free_port, in_netns, ip, Netns, Sniffer, TcpServer, UdpServer},
    process::{
        http_server, run_ok, runs, ssh_server, temp_dir, terminate, tls_server, wait_listening,
        Daemon, Log, Stopped,
    },
    unique, wait_until, FakeApiServer, CLIENT_PY as CLIENT, PACKETS_PY,
};

pub const AGENT: &str = env!("CARGO_BIN_EXE_egress-agent");

/// The head of most test policies: the MeshConfig (egress off unless a rule allows it, the
/// agent's proxy port left as `{proxy_port}`) and the workload `web`; Egress documents follow.
pub const WEB_POLICY_HEAD: &str = "kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  traffic: {enableEgress: false}\n  proxy: {port: {proxy_port}}\n---\nkind: Workload\nmetadata: {name: web}\n---\n";

/// What every test that runs the agent needs: root, cgroup v2, bpffs, and python3 for the
/// clients.
const AGENT_NEEDS: [Need; 4] = [
    Need::Root,
    Need::Cgroup2,
    Need::Bpffs,
    Need::Tool("python3"),
];

/// True when a test that runs the agent can run here; otherwise skipped, or a failure under
/// CI=true (see [`require`]).
pub fn privileged() -> bool {
    require(&AGENT_NEEDS)
}

/// [`privileged`], and these tools too.
pub fn privileged_with(tools: &[&'static str]) -> bool {
    let mut needs = AGENT_NEEDS.to_vec();
    needs.extend(tools.iter().map(|t| Need::Tool(t)));
    require(&needs)
}

/// A running `egress-agent run` on its own cgroup root, pin directory, admin socket and state
/// file.
pub struct Agent {
    child: Option<Child>,
    pub root: PathBuf,
    pub pins: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub proxy_port: u16,
    pub metrics_port: u16,
    pub config: PathBuf,
    /// More `run` arguments (Kubernetes mode).
    pub run_args: Vec<String>,
    /// The network namespace the agent runs in (a test's "node"); `None`: this one.
    pub netns: Option<PathBuf>,
    /// Extra environment of the agent process.
    pub env: Vec<(String, String)>,
    /// A command line the agent's is appended to (a container runtime's, say).
    pub wrapper: Vec<String>,
    /// [`Agent::exec`] runs host workloads' commands in the agent's network namespace
    /// (`netns`) rather than this one.
    pub exec_in_node: bool,
    log: Log,
}

impl Agent {
    /// Starts an agent on `policy` (`{proxy_port}` in it is replaced) and waits until ready.
    pub fn start(policy: &str) -> Agent {
        Self::start_in(policy, None)
    }

    /// [`Agent::start`], with the agent in network namespace `netns` (a test's "node").
    pub fn start_in(policy: &str, netns: Option<&Path>) -> Agent {
        Self::start_with(policy, netns, &[])
    }

    /// [`Agent::start_in`], with extra environment variables for the agent.
    pub fn start_with(policy: &str, netns: Option<&Path>, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::new(policy);
        agent.netns = netns.map(Path::to_path_buf);
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent.spawn();
        agent
    }

    /// An agent not started yet: its names, ports and policy file.
    pub fn new(policy: &str) -> Agent {
        let name = unique("egress-test");
        let proxy_port = free_port();
        let config = std::env::temp_dir().join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            policy.replace("{proxy_port}", &proxy_port.to_string()),
        )
        .expect("write policy");
        Agent {
            child: None,
            root: cgroup2_mount().join(&name),
            pins: PathBuf::from("/sys/fs/bpf").join(&name),
            socket: std::env::temp_dir().join(format!("{name}.sock")),
            state: std::env::temp_dir().join(format!("{name}.state.yaml")),
            proxy_port,
            metrics_port: free_port(),
            config,
            run_args: Vec::new(),
            netns: None,
            env: Vec::new(),
            wrapper: Vec::new(),
            exec_in_node: false,
            log: Log::default(),
        }
    }

    /// Starts the agent process (again, after [`Agent::kill`] or [`Agent::stop_keep`]) on
    /// the same pins, cgroups, socket and state, and waits until it is ready.
    pub fn spawn(&mut self) {
        self.start_process();
        self.wait_ready(Duration::from_secs(90));
    }

    /// Starts the agent process without waiting for anything.
    pub fn start_process(&mut self) {
        self.log.clear();
        let mut cmd = match (&self.netns, self.wrapper.split_first()) {
            (Some(ns), _) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(AGENT);
                c
            }
            (None, Some((first, rest))) => {
                let mut c = Command::new(first);
                c.args(rest).arg(AGENT);
                c
            }
            (None, None) => Command::new(AGENT),
        };
        let mut child = cmd
            .arg("--admin-socket")
            .arg(&self.socket)
            .args(["run", "--config"])
            .arg(&self.config)
            .args(&self.run_args)
            .arg("--cgroup-root")
            .arg(&self.root)
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--state-file")
            .arg(&self.state)
            // Every verdict as an event, which the tests read, unless a test chose.
            .args(if self.run_args.iter().any(|a| a == "--flows") {
                &[][..]
            } else {
                &["--flows", "all"][..]
            })
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            // TEST_EGRESS_LOG: another filter for debugging (egress::proxy=debug, say).
            .env(
                "EGRESS_LOG",
                std::env::var("TEST_EGRESS_LOG").unwrap_or("info,egress::flow=debug".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn egress-agent");
        self.log.capture(child.stderr.take().unwrap());
        self.child = Some(child);
    }

    /// Waits until the started agent says it is ready; panics if it exits first.
    pub fn wait_ready(&mut self, within: Duration) {
        let mut exited = None;
        let child = self.child.as_mut().expect("agent started");
        let log = self.log.clone();
        let ready = wait_until(within, || {
            exited = child.try_wait().unwrap();
            exited.is_some() || log.text().contains(" ready ")
        });
        if let Some(status) = exited {
            self.child = None;
            panic!("agent exited ({status}) before ready:\n{}", self.log());
        }
        assert!(ready, "agent not ready after {within:?}:\n{}", self.log());
    }

    /// The exit status, once the started agent has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// GET a path of the agent's metrics endpoint: (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        let port = self.metrics_port;
        let mut s = match &self.netns {
            Some(ns) => in_netns(ns, move || TcpStream::connect(("127.0.0.1", port))),
            None => TcpStream::connect(("127.0.0.1", port)),
        }
        .expect("metrics endpoint");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// `egress-agent --admin-socket <ours> ARGS...`
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(AGENT)
            .arg("--admin-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run egress-agent")
    }

    /// Like [`Agent::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "egress-agent {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agent process' id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the agent dies without any cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Replaces the policy file (`{proxy_port}` filled in) and sends SIGHUP; waits until
    /// the agent reloaded it.
    pub fn reload(&self, policy: &str) {
        std::fs::write(
            &self.config,
            policy.replace("{proxy_port}", &self.proxy_port.to_string()),
        )
        .expect("write policy");
        let n = self.log().matches("reloaded the policy file").count();
        let pid = self.child.as_ref().expect("agent running").id() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
        assert!(
            wait_until(Duration::from_secs(10), || {
                self.log().matches("reloaded the policy file").count() > n
            }),
            "no reload:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until the agent's log contains `needle` (flow events arrive asynchronously).
    pub fn wait_log(&self, needle: &str) -> String {
        self.log.wait_for("agent", needle, Duration::from_secs(5))
    }

    /// Runs a command inside a workload through `egress-agent exec`.
    pub fn exec(&self, workload: &str, cmd: &[&str]) -> Output {
        let mut c = match (&self.netns, self.exec_in_node) {
            (Some(ns), true) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(AGENT);
                c
            }
            _ => Command::new(AGENT),
        };
        c.args(["exec", "--workload", workload, "--cgroup-root"])
            .arg(&self.root)
            .arg("--")
            .args(cmd)
            .output()
            .expect("run egress-agent exec")
    }

    /// [`Agent::exec`] of a command that must succeed and print something: its trimmed
    /// stdout. Fails naming `what`, with the exit status and stderr, otherwise.
    pub fn exec_line(&self, workload: &str, cmd: &[&str], what: &str) -> String {
        let out = self.exec(workload, cmd);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !text.is_empty(),
            "{what}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Runs tests/e2e/client.py inside a workload; returns its one-line verdict without the
    /// client's own address (see [`Agent::client_from`]).
    pub fn client(&self, workload: &str, args: &[&str]) -> String {
        self.client_from(workload, args).0
    }

    /// Like [`Agent::client`], also returning the client's local address when it connected.
    pub fn client_from(&self, workload: &str, args: &[&str]) -> (String, Option<SocketAddr>) {
        split_local(&self.client_raw(workload, args))
    }

    /// Runs tests/e2e/client.py inside a workload; returns its one-line verdict.
    fn client_raw(&self, workload: &str, args: &[&str]) -> String {
        let mut cmd = vec!["python3", CLIENT];
        cmd.extend_from_slice(args);
        let out = self.exec(workload, &cmd);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !text.is_empty(),
            "client {args:?} in {workload} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// The ids of the programs attached to the agent's cgroup root.
    pub fn attached_programs(&self) -> Vec<u32> {
        attached_programs(&self.root)
    }

    /// Stops the agent process with SIGTERM and waits for it; enforcement stays installed.
    /// Returns its whole log.
    pub fn stop_keep(&mut self) -> String {
        self.terminate();
        self.log()
    }

    /// `egress-agent uninstall` for this agent's pins, cgroups and state.
    pub fn uninstall(&self) -> Output {
        Command::new(AGENT)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--cgroup-root")
            .arg(&self.root)
            .arg("--state-file")
            .arg(&self.state)
            .output()
            .expect("egress-agent uninstall")
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        // Enforcement outlives the agent: remove it.
        let _ = self.uninstall();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Program ids attached to a cgroup, from `bpftool cgroup show`.
pub fn attached_programs(cgroup: &Path) -> Vec<u32> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

pub fn program_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The MAC address of interface `iface` in network namespace `netns` (`ip -o link show`, run
/// there: /sys shows the namespace it was mounted in).
pub fn mac_of(netns: &Path, iface: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link", "show", "dev", iface])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text:?}"))
        .trim()
        .to_string()
}

/// Runs the rest of a command line as an unprivileged user (uid and gid 65534, no groups).
pub const NOBODY: [&str; 6] = [
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
];
