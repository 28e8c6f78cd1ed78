//! Networking fixtures: free ports, network namespaces made by the test (removed on drop),
//! threads inside a namespace, TCP and UDP servers on loopback stand-ins for external hosts,
//! and a packet sniffer.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crate::{wait_until, PACKETS_PY};

/// A port that was free a moment ago on 127.0.0.1 and [::1], below the kernel's ephemeral
/// range (32768-60999 by default), so that no client socket of a test running alongside (a
/// scrape storm opens thousands) is given it before its user binds it.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % 12000;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20000 + (start.wrapping_add(n.wrapping_mul(131)) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
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

/// `ip ARGS...`, asserting success.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`), its loopback up; deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// /run/netns/NAME, for `nsenter --net=` and [`in_netns`].
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME` with each of `cmds` (split on whitespace).
    pub fn ip_batch(&self, cmds: &[String]) {
        for c in cmds {
            let mut a = vec!["-n", self.name.as_str()];
            a.extend(c.split_whitespace());
            ip(&a);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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
                    // A non-blocking accept loop (so that the server stops when dropped,
                    // also in another namespace): this is its poll interval, not a wait.
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

    /// Waits (2 s at most) for `msg` to arrive.
    pub fn got(&self, msg: &str) -> bool {
        wait_until(Duration::from_secs(2), || {
            self.received.lock().unwrap().iter().any(|m| m == msg)
        })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// tests/e2e/packets.py sniffing on interface `iface` of namespace `netns` for `secs`
/// seconds, counting packets to `dst`. Started (it said `ready`) when returned.
pub struct Sniffer {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Sniffer {
    pub fn start(netns: &Path, iface: &str, dst: &str, secs: f32) -> Sniffer {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args([
                "python3",
                PACKETS_PY,
                "sniff",
                iface,
                dst,
                &secs.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start sniffer");
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("sniffer ready");
        assert_eq!(line.trim(), "ready");
        Sniffer { child, out: r }
    }

    /// Packets seen, once the sniffing time is over.
    pub fn count(mut self) -> usize {
        let mut s = String::new();
        self.out.read_to_string(&mut s).expect("sniffer output");
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
