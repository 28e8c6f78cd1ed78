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
//! The plumbing speaks rtnetlink ([`super::netlink`]) for links, addresses and routes, and
//! makes the namespace itself as `ip netns add` does (a bind mount of a fresh namespace on a
//! file under /run/netns). Failures are typed: [`PodNetError`] names the pod, the operation,
//! the interface or path and the kernel's errno.

use std::{
    ffi::CString,
    fmt,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
    sys::statfs::{statfs, NSFS_MAGIC},
};

use super::netlink::{self, NetlinkError, Route};
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

/// What podnet did outside netlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysOp {
    /// mkdir /run/netns, or make it a shared mount point.
    PrepareNetnsDir,
    /// Create the file the namespace is mounted on.
    CreateNetnsFile,
    /// unshare(CLONE_NEWNET) on a helper thread.
    NewNetns,
    /// Bind-mount the new namespace on its file.
    MountNetns,
    /// Open the namespace's file.
    OpenNetns,
    WriteSysctl,
}

impl fmt::Display for SysOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SysOp::PrepareNetnsDir => "prepare",
            SysOp::CreateNetnsFile => "create the namespace file",
            SysOp::NewNetns => "create a network namespace for",
            SysOp::MountNetns => "mount the network namespace on",
            SysOp::OpenNetns => "open the network namespace",
            SysOp::WriteSysctl => "write",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// A link, address or route request (in the node's namespace or the pod's).
    #[error("pod {pod}: {source}")]
    Netlink {
        pod: String,
        /// Boxed: keeps the error (and `ControlError`) small.
        #[source]
        source: Box<NetlinkError>,
    },
    /// A system call about the namespace or a sysctl.
    #[error("pod {pod}: cannot {op} {}: {errno}", .path.display())]
    Sys {
        pod: String,
        op: SysOp,
        path: PathBuf,
        errno: Errno,
    },
    /// A helper thread panicked.
    #[error("pod {pod}: the thread that would {op} panicked")]
    Panicked { pod: String, op: SysOp },
}

impl PodNetError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            PodNetError::Netlink { source, .. } => source.errno(),
            PodNetError::Sys { errno, .. } => Some(*errno),
            PodNetError::Panicked { .. } => None,
        }
    }
}

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
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

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl Pod {
    fn name(&self) -> String {
        self.workload.to_string()
    }

    fn sys(&self, op: SysOp, path: impl Into<PathBuf>) -> impl FnOnce(Errno) -> PodNetError {
        let (pod, path) = (self.name(), path.into());
        move |errno| PodNetError::Sys {
            pod,
            op,
            path,
            errno,
        }
    }

    fn nl(&self) -> impl FnOnce(NetlinkError) -> PodNetError {
        let pod = self.name();
        move |e| PodNetError::Netlink {
            pod,
            source: Box::new(e),
        }
    }
}

fn write_sysctl(pod: &Pod, path: &str, value: &str) -> Result<(), PodNetError> {
    std::fs::write(path, value).map_err(|e| pod.sys(SysOp::WriteSysctl, path)(errno_of(&e)))
}

/// Whether `path` is a mounted network namespace (rather than missing, or the bare file of an
/// interrupted creation).
fn is_netns(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// `ip netns add`: makes /run/netns a shared mount point (so that namespaces mounted there
/// show in every mount namespace that shares it), then mounts a new network namespace on
/// /run/netns/NAME. A namespace already mounted there is adopted as it is; a bare file left
/// by an interrupted run gets a new namespace. Tells whether the namespace is new.
fn ensure_netns(pod: &Pod) -> Result<bool, PodNetError> {
    let path = pod.netns_path();
    if is_netns(&path) {
        return Ok(false);
    }
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|e| pod.sys(SysOp::PrepareNetnsDir, dir)(errno_of(&e)))?;
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if let Err(e) = shared() {
        if e != Errno::EINVAL {
            return Err(pod.sys(SysOp::PrepareNetnsDir, dir)(e));
        }
        // Not a mount point yet: make it one.
        mount(
            Some(dir),
            dir,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| shared())
        .map_err(pod.sys(SysOp::PrepareNetnsDir, dir))?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| pod.sys(SysOp::CreateNetnsFile, &path)(errno_of(&e)))?;
    // unshare() changes the namespace of the calling thread only: a thread of its own, which
    // ends once the namespace is mounted (the mount keeps it alive).
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(pod.sys(SysOp::NewNetns, &path))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(pod.sys(SysOp::MountNetns, &path))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(PodNetError::Panicked {
                pod: pod.name(),
                op: SysOp::NewNetns,
            })
        })
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made.map(|()| true)
}

/// Creates (or adopts, when it exists) the pod's namespace, veth pair, addresses and routes.
/// Idempotent. Returns the index of the node side of the veth.
pub fn ensure(pod: &Pod) -> Result<u32, PodNetError> {
    let fresh = ensure_netns(pod)?;
    let (h, ns) = (pod.host_if.as_str(), pod.netns_path());
    let host = netlink::session(None, async |nl| nl.find(h).await).map_err(pod.nl())?;
    let inside = match fresh {
        true => None,
        false => netlink::session(Some(&ns), async |nl| nl.find(POD_IF).await).map_err(pod.nl())?,
    };
    if host.is_none() || inside.is_none() {
        // A half-made pair from an interrupted run, or a node side whose namespace was
        // replaced: start over.
        netlink::session(None, async |nl| nl.delete(h).await).map_err(pod.nl())?;
        if inside.is_some() {
            netlink::session(Some(&ns), async |nl| nl.delete(POD_IF).await).map_err(pod.nl())?;
        }
        let fd = File::open(&ns).map_err(|e| pod.sys(SysOp::OpenNetns, &ns)(errno_of(&e)))?;
        netlink::session(None, async |nl| {
            nl.add_veth(h, POD_IF, fd.as_fd(), &pod.netns).await
        })
        .map_err(pod.nl())?;
    }
    if pod.ip4.is_some() {
        write_sysctl(pod, &format!("/proc/sys/net/ipv4/conf/{h}/forwarding"), "1")?;
    }
    if pod.ip6.is_some() {
        write_sysctl(pod, &format!("/proc/sys/net/ipv6/conf/{h}/forwarding"), "1")?;
        write_sysctl(pod, &format!("/proc/sys/net/ipv6/conf/{h}/accept_dad"), "0")?;
    }
    let index = netlink::session(None, async |nl| {
        nl.set_up(h).await?;
        if let Some(a) = pod.ip4 {
            nl.replace_address(h, GATEWAY4.into(), 32, false).await?;
            nl.replace_route(h, Route::host(a.into())).await?;
        }
        if let Some(a) = pod.ip6 {
            nl.replace_address(h, GATEWAY6.into(), 64, true).await?;
            nl.replace_route(h, Route::host(a.into())).await?;
        }
        nl.index(h).await
    })
    .map_err(pod.nl())?;
    netlink::session(Some(&ns), async |nl| {
        nl.set_up("lo").await?;
        nl.set_up(POD_IF).await?;
        if let Some(a) = pod.ip4 {
            nl.replace_address(POD_IF, a.into(), 32, false).await?;
            // `ip route replace 169.254.1.1 dev eth0 scope link`, then the default through it.
            nl.replace_route(POD_IF, Route::host(GATEWAY4.into()))
                .await?;
            nl.replace_route(POD_IF, Route::default_via(GATEWAY4.into()))
                .await?;
        }
        if let Some(a) = pod.ip6 {
            nl.replace_address(POD_IF, a.into(), 128, true).await?;
            nl.replace_route(POD_IF, Route::default_via(GATEWAY6.into()))
                .await?;
        }
        Ok(())
    })
    .map_err(pod.nl())?;
    Ok(index)
}

/// `ip netns del`: unmounts the pod's namespace and removes its file, then deletes the node
/// side of the veth if it is still there. Processes still inside keep their (now detached)
/// namespace until they exit; the veth goes with the namespace or here.
pub fn remove(pod: &Pod) {
    let path = pod.netns_path();
    if path.exists() {
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not mounted (a bare file left by an interrupted creation).
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(e) => {
                tracing::warn!(pod = %pod.workload, netns = %pod.netns, error = %e, "cannot unmount the pod's network namespace")
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(pod = %pod.workload, netns = %pod.netns, error = %e, "cannot delete the pod's network namespace");
        }
    }
    if ifindex(&pod.host_if).is_some() {
        let h = pod.host_if.as_str();
        if let Err(e) = netlink::session(None, async |nl| nl.delete(h).await) {
            tracing::warn!(pod = %pod.workload, error = %e, "cannot delete the pod's veth");
        }
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
    let f = File::open(path)?;
    setns(f, CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// Runs `f` inside the network namespace at `path`, on a short-lived thread: the sockets it
/// opens stay in that namespace and are served from the agent's runtime like any other.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        enter(&path)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("the thread in the pod's namespace panicked"))?
}

/// Opens the proxy's listeners (127.0.0.1 and [::1] on `port`) inside the network namespace
/// at `path` (see [`run_in`]).
pub fn bind_in(path: &Path, port: u16) -> io::Result<Vec<std::net::TcpListener>> {
    let netns = path.display().to_string();
    run_in(path, move || {
        let (listeners, v6) = super::listen::loopback(port)?;
        if let Some(e) = v6 {
            tracing::warn!(%netns, error = %e, "no IPv6 proxy listener on [::1]:{port} in the pod; its IPv6 redirects will be refused");
        }
        Ok(listeners)
    })
}

/// The cookie of a socket's network namespace (the kernel's `bpf_get_netns_cookie`).
/// SO_NETNS_COOKIE (Linux 5.14) has no option type in nix 0.29: getsockopt(2) itself.
pub fn netns_cookie(s: &impl AsFd) -> io::Result<u64> {
    socket_u64(s, libc::SO_NETNS_COOKIE)
}

/// A u64 `SOL_SOCKET` option (the cookies).
pub(crate) fn socket_u64(s: &impl AsFd, opt: libc::c_int) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a u64 we own, on a borrowed fd.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    Errno::result(r)?;
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
