//! Fixtures for the end-to-end tests: a running agent on its own cgroup root and pin
//! directory, real TCP/UDP servers on loopback stand-ins for external hosts, and real clients
//! run inside workloads. Everything a test creates is removed when its fixture drops, also
//! when the test panics.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

pub const AGENT: &str = env!("CARGO_BIN_EXE_egress-agent");
pub const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/client.py");

/// True when the test may touch the kernel. Without root it skips, except in CI, where a
/// privileged test that cannot run is a failure.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this end-to-end test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and CI=true: refusing to skip");
    }
    eprintln!("skipped: needs root");
    false
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// A port that was free a moment ago on 127.0.0.1 and [::1].
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().unwrap().port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
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
    log: Arc<Mutex<String>>,
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
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    /// Starts the agent process (again, after [`Agent::kill`] or [`Agent::stop_keep`]) on
    /// the same pins, cgroups, socket and state, and waits until it is ready.
    pub fn spawn(&mut self) {
        self.log.lock().unwrap().clear();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(AGENT);
                c
            }
            None => Command::new(AGENT),
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
            .args(["--flows", "all"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .env("EGRESS_LOG", "info,egress::flow=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn egress-agent");
        let stderr = child.stderr.take().unwrap();
        let sink = self.log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&strip_ansi(&line));
                l.push('\n');
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.log().contains(" ready ") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("agent exited ({status}) before ready:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 90 s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("reloaded the policy file").count() == n {
            assert!(Instant::now() < deadline, "no reload:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the agent's log contains `needle` (flow events arrive asynchronously).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = self.log();
            if l.contains(needle) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "agent log never showed {needle:?}:\n{l}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a command inside a workload through `egress-agent exec`.
    pub fn exec(&self, workload: &str, cmd: &[&str]) -> Output {
        Command::new(AGENT)
            .args(["exec", "--workload", workload, "--cgroup-root"])
            .arg(&self.root)
            .arg("--")
            .args(cmd)
            .output()
            .expect("run egress-agent exec")
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
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
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

/// Splits ` local=ADDR` off a client.py result line.
pub fn split_local(out: &str) -> (String, Option<SocketAddr>) {
    match out.rsplit_once(" local=") {
        Some((text, local)) => (text.to_string(), local.parse().ok()),
        None => (out.to_string(), None),
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

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A TCP server on a loopback stand-in for an external host. For each connection it records
/// the peer, reads one line and answers `<its own address>|<the line>`.
pub struct TcpServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl TcpServer {
    pub fn start(ip: &str) -> TcpServer {
        let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        Self::serve(l)
    }

    /// A server on `ip:port` in network namespace `netns` (a test's "outside world").
    pub fn start_in(netns: &Path, ip: &str, port: u16) -> TcpServer {
        let ip2 = ip.to_string();
        let l = in_netns(netns, move || TcpListener::bind((ip2.as_str(), port)))
            .unwrap_or_else(|e| panic!("bind {ip}:{port} in {}: {e}", netns.display()));
        Self::serve(l)
    }

    fn serve(l: TcpListener) -> TcpServer {
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, p, s) = (accepted.clone(), peers.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, peer)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        p.lock().unwrap().push(peer);
                        thread::spawn(move || answer(conn, addr));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TcpServer {
            addr,
            accepted,
            peers,
            stop,
        }
    }

    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// The peer address of the n-th accepted connection.
    pub fn peer(&self, n: usize) -> SocketAddr {
        self.peers.lock().unwrap()[n]
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn answer(conn: TcpStream, me: SocketAddr) {
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut line = String::new();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    if r.read_line(&mut line).is_ok() {
        let _ = (&conn).write_all(format!("{me}|{}\n", line.trim()).as_bytes());
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP server that collects the datagrams it receives.
pub struct UdpServer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl UdpServer {
    pub fn start(ip: &str) -> UdpServer {
        let s = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind udp {ip}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = s.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    r.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        UdpServer {
            addr,
            received,
            stop,
        }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Waits briefly for `msg` to arrive.
    pub fn got(&self, msg: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.received.lock().unwrap().iter().any(|m| m == msg) {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server process started by a test, killed (by its PID) when dropped.
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts `cmd` in a fresh temp dir and waits until `addr` accepts TCP connections.
    pub fn start(name: &str, cmd: &[&str], addr: &str, dir: PathBuf) -> Daemon {
        let child = Command::new(cmd[0])
            .args(&cmd[1..])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", cmd[0]));
        let d = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name} does not listen on {addr}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(&format!("egress-{tag}")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `python3 -m http.server` serving `dir` on ip:port.
pub fn http_server(ip: &str, port: u16, dir: PathBuf) -> Daemon {
    let p = port.to_string();
    let d = dir.to_string_lossy().into_owned();
    Daemon::start(
        "http.server",
        &[
            "python3",
            "-m",
            "http.server",
            &p,
            "--bind",
            ip,
            "--directory",
            &d,
        ],
        &format!("{ip}:{port}"),
        dir,
    )
}

/// `openssl s_server -www` (a self-signed certificate) on ip:port.
pub fn tls_server(ip: &str, port: u16) -> Daemon {
    let dir = temp_dir("tls");
    run_ok(Command::new("openssl").current_dir(&dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "1",
        "-subj",
        "/CN=egress-test",
    ]));
    let accept = format!("{ip}:{port}");
    Daemon::start(
        "openssl s_server",
        &[
            "openssl", "s_server", "-accept", &accept, "-cert", "cert.pem", "-key", "key.pem",
            "-www", "-quiet",
        ],
        &accept,
        dir,
    )
}

/// Debian's sshd on ip:22 with a throw-away host key, accepting one throw-away client key
/// for root. Returns the daemon and the client key's path.
pub fn ssh_server(ip: &str) -> (Daemon, PathBuf) {
    let dir = temp_dir("sshd");
    std::fs::create_dir_all("/run/sshd").unwrap();
    for key in ["host_key", "client_key"] {
        run_ok(
            Command::new("ssh-keygen")
                .current_dir(&dir)
                .args(["-q", "-t", "ed25519", "-N", "", "-f", key]),
        );
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let conf = format!(
        "ListenAddress {ip}:22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), conf).unwrap();
    let cfg = dir.join("sshd_config").to_string_lossy().into_owned();
    let key = dir.join("client_key");
    let d = Daemon::start(
        "sshd",
        &["/usr/sbin/sshd", "-D", "-e", "-f", &cfg],
        &format!("{ip}:22"),
        dir,
    );
    (d, key)
}

/// Runs `f` on a thread inside network namespace `netns`; what it opens stays there.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns")
}

/// A cgroup tree a test builds itself (a kubelet's, for Kubernetes mode) under a dedicated
/// parent `<cgroup2 mount>/egress-test-PID-N`, removed deepest first when dropped.
pub struct CgroupTree {
    pub path: PathBuf,
}

impl CgroupTree {
    pub fn new() -> CgroupTree {
        let path = cgroup2_mount().join(unique("egress-test"));
        std::fs::create_dir(&path).expect("create the test cgroup parent");
        CgroupTree { path }
    }

    /// Creates `rel` (and its parents) below the tree's parent.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let dir = self.path.join(rel);
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        dir
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.path);
    }
}

/// Runs tests/e2e/client.py with `args` as a process of the cgroup `dir` (its pid written to
/// `cgroup.procs` before it execs); returns its one-line verdict.
pub fn client_in_cgroup(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("sh")
        .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec python3 \"$@\""])
        .arg(dir)
        .arg(CLIENT)
        .args(args)
        .output()
        .expect("run client.py");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !text.is_empty(),
        "client {args:?} in {}: {}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    split_local(&text).0
}
