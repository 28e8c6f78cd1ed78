//! Processes a test starts: daemons waited on until they listen and stopped (by their PID)
//! when dropped, captured logs, temp dirs, and the Debian servers the tests use.

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use crate::{unique, wait_until};

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(&format!("egress-{tag}")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `cmd`, asserting success; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True while process `pid` runs a command line containing `needle` (after an exec, say).
pub fn runs(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
}

/// Waits until `addr` accepts TCP connections; panics naming `what` after `within`.
pub fn wait_listening(what: &str, addr: &str, within: Duration) {
    assert!(
        wait_until(within, || TcpStream::connect(addr).is_ok()),
        "{what} does not listen on {addr}"
    );
}

/// The stderr (or stdout) lines of a process, collected as they come (ANSI colours
/// removed), to wait on and to show when a test fails.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// Collects `from` on a thread of its own until it closes.
    pub fn capture(&self, from: impl Read + Send + 'static) {
        let sink = self.0.clone();
        thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&strip_ansi(&line));
                l.push('\n');
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Waits until the log contains `needle`; returns the log. Panics naming `who` after
    /// `within`.
    pub fn wait_for(&self, who: &str, needle: &str, within: Duration) -> String {
        let mut text = String::new();
        let found = wait_until(within, || {
            text = self.text();
            text.contains(needle)
        });
        assert!(found, "{who} log never showed {needle:?}:\n{text}");
        text
    }
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

/// Sends SIGTERM to `child` (so that one which forks workers stops them), waits up to
/// `grace` for it, then SIGKILLs it. Reaped either way.
pub fn terminate(child: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    wait_until(grace, || child.try_wait().ok().flatten().is_some());
    let _ = child.kill();
    let _ = child.wait();
}

/// A process a test started, stopped by its PID with SIGTERM, then SIGKILL if it lingers
/// (5 s); its temp dir is removed.
pub struct Stopped {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server process started by a test, killed (by its PID) when dropped; its dir removed.
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts `cmd` in `dir` and waits until `addr` accepts TCP connections.
    pub fn start(name: &str, cmd: &[&str], addr: &str, dir: PathBuf) -> Daemon {
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..]);
        let d = Self::spawn(name, c, dir);
        wait_listening(name, addr, Duration::from_secs(15));
        d
    }

    /// [`Daemon::start`] inside network namespace `netns` (`nsenter --net`, which execs
    /// `cmd`: the PID is the daemon's), waiting until `addr` accepts there.
    pub fn start_in(netns: &Path, name: &str, cmd: &[&str], addr: &str, dir: PathBuf) -> Daemon {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns.display())).args(cmd);
        let d = Self::spawn(name, c, dir);
        wait_listening_in(netns, name, addr, Duration::from_secs(15));
        d
    }

    fn spawn(name: &str, mut cmd: Command, dir: PathBuf) -> Daemon {
        let child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Daemon { child, dir }
    }
}

/// [`wait_listening`] from inside network namespace `netns`.
pub fn wait_listening_in(netns: &Path, what: &str, addr: &str, within: Duration) {
    let a = addr.to_string();
    let up = crate::net::in_netns(netns, move || {
        wait_until(within, || TcpStream::connect(a.as_str()).is_ok())
    });
    assert!(
        up,
        "{what} does not listen on {addr} in {}",
        netns.display()
    );
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// A throw-away self-signed certificate (EC P-256, CN egress-test): `dir`/cert.pem, key.pem.
pub fn self_signed(dir: &Path) {
    run_ok(Command::new("openssl").current_dir(dir).args([
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
}

/// `openssl s_server -www` (a self-signed certificate) on ip:port.
pub fn tls_server(ip: &str, port: u16) -> Daemon {
    let dir = temp_dir("tls");
    self_signed(&dir);
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
