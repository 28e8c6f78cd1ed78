//! Standalone pods: workloads that own a network namespace behind a veth pair, the way a CNI
//! plugs a pod into a Kubernetes node. For each workload declared with `network: pod`:
//!
//! - the namespace `/run/netns/<prefix><namespace>-<name>` (kept across agent restarts and
//!   adopted again; removed by `uninstall` or when the workload leaves the policy);
//! - a veth pair: `eth0` inside, `eg<hash>` on the agent's (node's) side;
//! - the pod's addresses from `MeshConfig spec.podNetwork` (a /32 and a /128, in declaration
//!   order from .2 on), and a default route through the link-local gateways 169.254.1.1 and
//!   fe80::1 that the node side answers for (the Calico pattern: no per-pod subnet);
//! - on the node: a host route to each pod address through its veth, forwarding enabled on it.
//!
//! The redirect target stays `127.0.0.1:<proxy port>` (and `[::1]`) everywhere: the agent
//! opens a proxy listener inside each pod's namespace ([`bind_in`], as Istio's ztunnel does in
//! "inpod" mode) and serves it from the node process. No node address is exposed to pods, and
//! a pod reaches only its own proxy socket. Upstream connections leave from the agent's own
//! namespace, so they never cross the pod's veth (and never meet the tc backstop there).
//!
//! The plumbing runs `ip` (iproute2) in batch mode: two processes per pod.

use std::{
    ffi::CString,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::policy::{Cidr, Config, Network, ObjectRef};

/// The node side answers for these as every pod's default gateway.
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The pod side of every veth.
pub const POD_IF: &str = "eth0";
/// The extended attribute on a workload's cgroup that names its network namespace (read by
/// `egress-agent exec`).
const NETNS_XATTR: &str = "user.egress.netns";
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("pod {pod}: `ip {cmd}` failed: {reason}")]
    Ip {
        pod: String,
        cmd: String,
        reason: String,
    },
    #[error("pod {pod}: {what}: {source}")]
    Io {
        pod: String,
        what: String,
        source: io::Error,
    },
}

/// The network of one pod workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub workload: ObjectRef,
    /// Name under /run/netns.
    pub netns: String,
    /// The node side of the veth.
    pub host_if: String,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
}

/// The pods of a policy: names and addresses, a pure function of the config.
pub fn plan(cfg: &Config) -> Vec<Pod> {
    let Some(net) = &cfg.mesh.pod_network else {
        return Vec::new();
    };
    cfg.workloads
        .iter()
        .filter(|w| w.network == Network::Pod)
        .enumerate()
        .map(|(i, w)| {
            let netns = format!("{}{}-{}", net.netns_prefix, w.id.namespace, w.id.name);
            Pod {
                host_if: host_if_name(&netns),
                netns,
                workload: w.id.clone(),
                ip4: net.ipv4.map(|c| match nth(&c, i as u128 + 2) {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(_) => unreachable!("validated as IPv4"),
                }),
                ip6: net.ipv6.map(|c| match nth(&c, i as u128 + 2) {
                    IpAddr::V6(a) => a,
                    IpAddr::V4(_) => unreachable!("validated as IPv6"),
                }),
            }
        })
        .collect()
}

/// `eg` and 8 hex digits of a hash of the namespace name (interface names have 15 bytes).
fn host_if_name(netns: &str) -> String {
    // FNV-1a: stable across builds and machines.
    let h = netns.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!("eg{h:08x}")
}

/// The `i`-th address of a prefix.
fn nth(c: &Cidr, i: u128) -> IpAddr {
    match c.addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(i as u32))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(i))),
    }
}

fn ip_batch(pod: &Pod, netns: Option<&str>, cmds: &[String]) -> Result<(), PodNetError> {
    let mut c = Command::new("ip");
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    let err = |reason: String| PodNetError::Ip {
        pod: pod.workload.to_string(),
        cmd: cmds.join("; "),
        reason,
    };
    let mut child = c
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run ip (iproute2): {e}")))?;
    let script = cmds.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn write_sysctl(pod: &Pod, path: &str, value: &str) -> Result<(), PodNetError> {
    std::fs::write(path, value).map_err(|source| PodNetError::Io {
        pod: pod.workload.to_string(),
        what: format!("write {path}"),
        source,
    })
}

/// Creates (or adopts, when it exists) the pod's namespace, veth pair, addresses and routes.
/// Idempotent. Returns the index of the node side of the veth.
pub fn ensure(pod: &Pod) -> Result<u32, PodNetError> {
    let io_err = |what: &str| {
        let pod = pod.workload.to_string();
        let what = what.to_string();
        move |source| PodNetError::Io { pod, what, source }
    };
    if !pod.netns_path().exists() {
        ip_batch(pod, None, &[format!("netns add {}", pod.netns)])?;
    }
    let h = &pod.host_if;
    if ifindex(h).is_none() {
        // A half-made pair from an interrupted run: start over inside.
        let _ = ip_batch(pod, Some(&pod.netns), &[format!("link del {POD_IF}")]);
        ip_batch(
            pod,
            None,
            &[format!(
                "link add {h} type veth peer name {POD_IF} netns {}",
                pod.netns
            )],
        )?;
    }
    let mut host = vec![format!("link set {h} up")];
    let mut inside = vec![
        "link set lo up".to_string(),
        format!("link set {POD_IF} up"),
    ];
    if let Some(a) = pod.ip4 {
        write_sysctl(pod, &format!("/proc/sys/net/ipv4/conf/{h}/forwarding"), "1")?;
        host.push(format!("addr replace {GATEWAY4}/32 dev {h}"));
        host.push(format!("route replace {a}/32 dev {h}"));
        inside.push(format!("addr replace {a}/32 dev {POD_IF}"));
        inside.push(format!("route replace {GATEWAY4} dev {POD_IF} scope link"));
        inside.push(format!("route replace default via {GATEWAY4} dev {POD_IF}"));
    }
    if let Some(a) = pod.ip6 {
        write_sysctl(pod, &format!("/proc/sys/net/ipv6/conf/{h}/forwarding"), "1")?;
        write_sysctl(pod, &format!("/proc/sys/net/ipv6/conf/{h}/accept_dad"), "0")?;
        host.push(format!("addr replace {GATEWAY6}/64 dev {h} nodad"));
        host.push(format!("route replace {a}/128 dev {h}"));
        inside.push(format!("addr replace {a}/128 dev {POD_IF} nodad"));
        inside.push(format!("route replace default via {GATEWAY6} dev {POD_IF}"));
    }
    ip_batch(pod, None, &host)?;
    ip_batch(pod, Some(&pod.netns), &inside)?;
    ifindex(h)
        .ok_or_else(|| io_err("find the veth")(io::Error::new(io::ErrorKind::NotFound, h.clone())))
}

/// Deletes the pod's namespace and veth. Processes still inside keep their (now detached)
/// namespace until they exit; the veth goes with the namespace or here.
pub fn remove(pod: &Pod) {
    if pod.netns_path().exists() {
        if let Err(e) = ip_batch(pod, None, &[format!("netns del {}", pod.netns)]) {
            tracing::warn!(error = %e, "cannot delete the pod's network namespace");
        }
    }
    if ifindex(&pod.host_if).is_some() {
        let _ = ip_batch(pod, None, &[format!("link del {}", pod.host_if)]);
    }
}

/// Removes the namespaces (and veths) of the pods whose cgroups below `root` name one:
/// `uninstall`.
pub fn remove_tagged(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
        let Some(path) = netns_of_cgroup(&dir) else {
            continue;
        };
        let Some(netns) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let pod = Pod {
            workload: ObjectRef::default(),
            host_if: host_if_name(&netns),
            netns,
            ip4: None,
            ip6: None,
        };
        remove(&pod);
        out.push(path);
    }
    out
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on an fd we own; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the proxy's listeners (127.0.0.1 and [::1] on `port`) inside the network namespace
/// at `path`, from a short-lived thread: the sockets stay in that namespace and are served
/// from the agent's runtime like any other.
pub fn bind_in(path: &Path, port: u16) -> io::Result<Vec<std::net::TcpListener>> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        enter(&path)?;
        let mut out = vec![std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?];
        if let Ok(l) = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
            out.push(l);
        }
        for l in &out {
            l.set_nonblocking(true)?;
        }
        Ok(out)
    })
    .join()
    .map_err(|_| io::Error::other("the thread binding in the pod's namespace panicked"))?
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of a socket's network namespace (the kernel's `bpf_get_netns_cookie`).
pub fn netns_cookie(s: &impl AsFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its size.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut v as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Records on a workload's cgroup directory which network namespace it owns.
pub fn tag_cgroup(dir: &Path, netns: &Path) -> io::Result<()> {
    let (p, n) = (c_path(dir)?, CString::new(NETNS_XATTR)?);
    let v = netns.as_os_str().as_bytes();
    // SAFETY: valid C strings and a byte slice with its length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The network namespace a workload's cgroup directory names, if any.
pub fn netns_of_cgroup(dir: &Path) -> Option<PathBuf> {
    let (p, n) = (c_path(dir).ok()?, CString::new(NETNS_XATTR).ok()?);
    let mut buf = [0u8; 4096];
    // SAFETY: valid C strings and a buffer with its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r > 0).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&buf[..r as usize])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    const POLICY: &str = "
kind: MeshConfig
metadata: {name: egress}
spec:
  podNetwork: {ipv4: 10.200.0.0/24, ipv6: 'fd00:200::/64', netnsPrefix: t1-}
---
kind: Workload
metadata: {name: web, namespace: shop}
spec: {network: pod}
---
kind: Workload
metadata: {name: local}
---
kind: Workload
metadata: {name: db, namespace: shop}
spec: {network: pod}
";

    #[test]
    fn pods_get_addresses_in_declaration_order_and_stable_names() {
        let pods = plan(&parse(POLICY, "p.yaml").unwrap());
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].netns, "t1-shop-web");
        assert_eq!(pods[0].ip4, Some(Ipv4Addr::new(10, 200, 0, 2)));
        assert_eq!(pods[0].ip6, Some("fd00:200::2".parse().unwrap()));
        assert_eq!(pods[1].netns, "t1-shop-db");
        assert_eq!(pods[1].ip4, Some(Ipv4Addr::new(10, 200, 0, 3)));
        assert!(pods[0].host_if.len() <= 15 && pods[0].host_if.starts_with("eg"));
        assert_ne!(pods[0].host_if, pods[1].host_if);
        assert_eq!(pods[0].host_if, host_if_name("t1-shop-web"));
        assert_eq!(pods[0].netns_path(), Path::new("/run/netns/t1-shop-web"));
    }

    #[test]
    fn the_pods_example_plans_two_pods() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/pods.yaml");
        let pods = plan(&crate::policy::load(&path).unwrap());
        let names: Vec<&str> = pods.iter().map(|p| p.netns.as_str()).collect();
        assert_eq!(names, ["egress-shop-web", "egress-shop-worker"]);
        assert_eq!(pods[1].ip6, Some("fd00:200::3".parse().unwrap()));
    }

    #[test]
    fn pod_workloads_without_a_pod_network_are_rejected() {
        let bad = POLICY.replace(
            "  podNetwork: {ipv4: 10.200.0.0/24, ipv6: 'fd00:200::/64', netnsPrefix: t1-}\n",
            "  auditMode: false\n",
        );
        let e = parse(&bad, "p.yaml").unwrap_err().to_string();
        assert!(
            e.contains("Workload shop/web: spec.network: pod needs spec.podNetwork"),
            "{e}"
        );
        let small = POLICY.replace("10.200.0.0/24", "10.200.0.0/31");
        let e = parse(&small, "p.yaml").unwrap_err().to_string();
        assert!(
            e.contains("spec.podNetwork.ipv4: 10.200.0.0/31 has no room for 2 pod addresses"),
            "{e}"
        );
        let fam = POLICY.replace("ipv4: 10.200.0.0/24", "ipv4: 'fd00::/64'");
        let e = parse(&fam, "p.yaml").unwrap_err().to_string();
        assert!(
            e.contains("spec.podNetwork.ipv4: fd00::/64 is not an ipv4 prefix"),
            "{e}"
        );
        let prefix = POLICY.replace("netnsPrefix: t1-", "netnsPrefix: 'a/b'");
        let e = parse(&prefix, "p.yaml").unwrap_err().to_string();
        assert!(e.contains("spec.podNetwork.netnsPrefix"), "{e}");
        let net = POLICY.replace("spec: {network: pod}", "spec: {network: bridge}");
        let e = parse(&net, "p.yaml").unwrap_err().to_string();
        assert!(e.contains("spec.network: unknown variant `bridge`"), "{e}");
    }
}
