//! Links, addresses and routes over rtnetlink, for [`super::podnet`]. Each request says what it
//! did, on which interface and in which namespace; a refusal keeps the kernel's errno.
//!
//! A [`session`] runs on a thread of its own with a current-thread runtime, so that it can be
//! called from anywhere (a plain thread, `spawn_blocking` or an async task) and so that the
//! thread can first enter a pod's network namespace: the netlink socket it then opens talks to
//! that namespace.

use std::{
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use futures::TryStreamExt as _;
use nix::{
    errno::Errno,
    sched::{setns, CloneFlags},
};
use rtnetlink::{
    packet_route::{
        address::AddressHeaderFlags,
        link::{InfoData, InfoVeth},
        route::{RouteMessage, RouteProtocol, RouteScope},
    },
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    EnterNetns,
    OpenSocket,
    FindLink,
    CreateVeth,
    DeleteLink,
    SetUp,
    AddAddress,
    AddRoute,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::EnterNetns => "enter the network namespace",
            Op::OpenSocket => "open a netlink socket",
            Op::FindLink => "find link",
            Op::CreateVeth => "create veth",
            Op::DeleteLink => "delete link",
            Op::SetUp => "bring up link",
            Op::AddAddress => "add an address on",
            Op::AddRoute => "add a route through",
        })
    }
}

/// One request: the operation, the interface it is about, and its argument (an address, a
/// route, a peer) when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub iface: String,
    pub arg: Option<String>,
}

impl Request {
    pub(super) fn new(op: Op, iface: &str, arg: Option<String>) -> Request {
        Request {
            op,
            iface: iface.to_string(),
            arg,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if !self.iface.is_empty() {
            write!(f, " {}", self.iface)?;
        }
        if let Some(a) = &self.arg {
            write!(f, " ({a})")?;
        }
        Ok(())
    }
}

fn ns_name(netns: &Option<String>) -> String {
    match netns {
        Some(n) => format!("netns {n}"),
        None => "the node's namespace".to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused: its errno.
    #[error("cannot {req} in {}: {errno}", ns_name(.netns))]
    Kernel {
        req: Request,
        /// None: the caller's (node's) namespace.
        netns: Option<String>,
        errno: Errno,
    },
    /// A failure without an errno: an answer netlink-packet-route could not use, a helper
    /// thread that panicked.
    #[error("cannot {req} in {}: {reason}", ns_name(.netns))]
    Other {
        req: Request,
        netns: Option<String>,
        reason: String,
    },
}

impl NetlinkError {
    /// The kernel's errno, when it refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Other { .. } => None,
        }
    }
}

/// The errno of a netlink NACK.
pub(super) fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// A route as `ip route replace` takes it: `DST/PREFIX [via GW] dev IFACE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub via: Option<IpAddr>,
}

impl Route {
    /// A host route, `ADDR dev IFACE`.
    pub fn host(dst: IpAddr) -> Route {
        let prefix = if dst.is_ipv4() { 32 } else { 128 };
        Route {
            dst,
            prefix,
            via: None,
        }
    }

    /// `default via GW dev IFACE`.
    pub fn default_via(gw: IpAddr) -> Route {
        let dst = match gw {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Route {
            dst,
            prefix: 0,
            via: Some(gw),
        }
    }

    /// The message iproute2 sends for it: main table, protocol `boot`, scope `link` for an
    /// IPv4 route without a gateway and `global` otherwise, no RTA_DST for `default`.
    fn message(&self, oif: u32) -> RouteMessage {
        let scope = if self.dst.is_ipv4() && self.via.is_none() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        match (self.dst, self.via) {
            (IpAddr::V4(d), via) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new();
                if self.prefix > 0 {
                    b = b.destination_prefix(d, self.prefix);
                }
                if let Some(IpAddr::V4(g)) = via {
                    b = b.gateway(g);
                }
                b.output_interface(oif)
                    .protocol(RouteProtocol::Boot)
                    .scope(scope)
                    .build()
            }
            (IpAddr::V6(d), via) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new();
                if self.prefix > 0 {
                    b = b.destination_prefix(d, self.prefix);
                }
                if let Some(IpAddr::V6(g)) = via {
                    b = b.gateway(g);
                }
                b.output_interface(oif)
                    .protocol(RouteProtocol::Boot)
                    .scope(scope)
                    .build()
            }
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}/{}", self.dst, self.prefix)?;
        }
        if let Some(g) = self.via {
            write!(f, " via {g}")?;
        }
        Ok(())
    }
}

/// A netlink connection to one network namespace.
pub struct Nl {
    pub(super) handle: Handle,
    netns: Option<String>,
}

impl Nl {
    pub(super) fn fail(&self, req: Request) -> impl FnOnce(rtnetlink::Error) -> NetlinkError + '_ {
        move |e| match errno_of(&e) {
            Some(errno) => NetlinkError::Kernel {
                req,
                netns: self.netns.clone(),
                errno,
            },
            None => NetlinkError::Other {
                req,
                netns: self.netns.clone(),
                reason: e.to_string(),
            },
        }
    }

    /// The index of link `name`; None when there is none.
    pub async fn find(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|m| m.header.index)),
            Err(e) if errno_of(&e) == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(self.fail(Request::new(Op::FindLink, name, None))(e)),
        }
    }

    /// The index of link `name`, which must exist.
    pub async fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.find(name).await?.ok_or_else(|| NetlinkError::Kernel {
            req: Request::new(Op::FindLink, name, None),
            netns: self.netns.clone(),
            errno: Errno::ENODEV,
        })
    }

    /// `ip link set NAME up`.
    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(self.fail(Request::new(Op::SetUp, name, None)))
    }

    /// `ip link del NAME` when it exists; tells whether it did.
    pub async fn delete(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.find(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between (with its namespace, or its peer).
            Err(e) if errno_of(&e) == Some(Errno::ENODEV) => Ok(false),
            Err(e) => Err(self.fail(Request::new(Op::DeleteLink, name, None))(e)),
        }
    }

    /// `ip link add NAME type veth peer name PEER netns NETNS`: the peer is created directly
    /// inside the namespace `peer_netns` (named `peer_netns_name`), so its name never meets
    /// the node's interfaces.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: impl AsFd,
        peer_netns_name: &str,
    ) -> Result<(), NetlinkError> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_netns.as_fd().as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        let arg = format!("peer {peer} in netns {peer_netns_name}");
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(self.fail(Request::new(Op::CreateVeth, name, Some(arg))))
    }

    /// `ip addr replace ADDR/PREFIX dev NAME [nodad]`.
    pub async fn replace_address(
        &self,
        name: &str,
        addr: IpAddr,
        prefix: u8,
        nodad: bool,
    ) -> Result<(), NetlinkError> {
        let index = self.index(name).await?;
        let mut req = self.handle.address().add(index, addr, prefix).replace();
        if nodad {
            // iproute2 puts flags that fit in 8 bits in the header, not in IFA_FLAGS.
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        let arg = format!("{addr}/{prefix}{}", if nodad { " nodad" } else { "" });
        req.execute()
            .await
            .map_err(self.fail(Request::new(Op::AddAddress, name, Some(arg))))
    }

    /// `ip route replace ROUTE dev NAME`.
    pub async fn replace_route(&self, name: &str, route: Route) -> Result<(), NetlinkError> {
        let index = self.index(name).await?;
        self.handle
            .route()
            .add(route.message(index))
            .replace()
            .execute()
            .await
            .map_err(self.fail(Request::new(Op::AddRoute, name, Some(route.to_string()))))
    }
}

/// Runs `f` with a netlink connection to the namespace at `netns` (None: the calling
/// thread's), on a thread of its own that ends with it.
pub fn session<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetlinkError>
where
    T: Send,
    F: AsyncFnOnce(Nl) -> Result<T, NetlinkError> + Send,
{
    let name = netns.map(|p| {
        p.file_name()
            .unwrap_or(p.as_os_str())
            .to_string_lossy()
            .into_owned()
    });
    let other = |op, reason: String| NetlinkError::Other {
        req: Request::new(op, "", None),
        netns: name.clone(),
        reason,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let kernel = |op, errno| NetlinkError::Kernel {
                req: Request::new(op, "", None),
                netns: name.clone(),
                errno,
            };
            let io_errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(0));
            if let Some(path) = netns {
                let f = File::open(path).map_err(|e| kernel(Op::EnterNetns, io_errno(e)))?;
                setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| kernel(Op::EnterNetns, e))?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| kernel(Op::OpenSocket, io_errno(e)))?;
            rt.block_on(async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| kernel(Op::OpenSocket, io_errno(e)))?;
                tokio::spawn(conn);
                f(Nl {
                    handle,
                    netns: name.clone(),
                })
                .await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(other(Op::OpenSocket, "the netlink thread panicked".into())))
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};

    use super::*;

    #[test]
    fn routes_are_the_messages_ip_route_replace_sends() {
        let host = Route::host("10.200.0.2".parse().unwrap());
        assert_eq!(host.to_string(), "10.200.0.2/32");
        let m = host.message(7);
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.protocol, RouteProtocol::Boot);
        assert_eq!(m.header.destination_prefix_length, 32);
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));

        let def = Route::default_via(IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(def.to_string(), "default via 169.254.1.1");
        let m = def.message(7);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert_eq!(m.header.destination_prefix_length, 0);
        assert!(!m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert!(m
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                169, 254, 1, 1
            )))));

        let six = Route::host("fd00:200::2".parse().unwrap());
        assert_eq!(six.to_string(), "fd00:200::2/128");
        assert_eq!(six.message(7).header.scope, RouteScope::Universe);
        let gw6 = Route::default_via("fe80::1".parse().unwrap()).message(7);
        assert!(gw6
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet6(
                "fe80::1".parse().unwrap()
            ))));
    }

    #[test]
    fn errors_name_the_request_the_namespace_and_the_errno() {
        let e = NetlinkError::Kernel {
            req: Request::new(Op::AddAddress, "eth0", Some("10.200.0.2/32".into())),
            netns: Some("egress-shop-web".into()),
            errno: Errno::EEXIST,
        };
        assert_eq!(
            e.to_string(),
            "cannot add an address on eth0 (10.200.0.2/32) in netns egress-shop-web: EEXIST: File exists"
        );
        assert_eq!(e.errno(), Some(Errno::EEXIST));
        let e = NetlinkError::Kernel {
            req: Request::new(Op::SetUp, "eg0123abcd", None),
            netns: None,
            errno: Errno::ENODEV,
        };
        assert_eq!(
            e.to_string(),
            "cannot bring up link eg0123abcd in the node's namespace: ENODEV: No such device"
        );
    }
}
