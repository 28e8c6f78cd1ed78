//! The node side of a Kubernetes pod's network. A CNI gives a pod a network namespace of its
//! own and a veth whose one end is the pod's `eth0` and whose other end stays in the node's
//! namespace: that node-side end is where the tc backstop goes (its ingress is the pod's
//! egress), and the pod's addresses are what the backstop's anti-spoof check accepts.
//!
//! Found from inside the pod's namespace: every link there whose peer lives in another
//! namespace (`IFLA_LINK` with `IFLA_LINK_NETNSID`), with its global addresses; then, in the
//! agent's own namespace, the link of that index whose own peer is the pod's link. A peer in
//! a third namespace (not the node's) is skipped: the cgroup programs still judge the pod.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressScope},
    link::{LinkAttribute, LinkFlags},
};

use super::netlink::{session, NetlinkError, Nl, Op, Request};

/// A pod interface as seen from the node: the node-side link and the pod's addresses on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIface {
    /// The node-side link's name and index (in the agent's namespace).
    pub host_if: String,
    pub ifindex: u32,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
}

/// One link inside the pod's namespace, as netlink reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PodLink {
    index: u32,
    /// `IFLA_LINK`: the peer's index, in the namespace `IFLA_LINK_NETNSID` names.
    peer: Option<u32>,
    /// The peer lives in another namespace.
    peer_elsewhere: bool,
    loopback: bool,
}

/// The pod links with a peer in another namespace, each with its first global IPv4 and IPv6
/// address: (pod index, peer index, ip4, ip6).
fn pod_side(
    links: &[PodLink],
    addrs: &[(u32, IpAddr)],
) -> Vec<(u32, u32, Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    links
        .iter()
        .filter(|l| !l.loopback && l.peer_elsewhere)
        .filter_map(|l| {
            let peer = l.peer?;
            let mine = || addrs.iter().filter(|(i, _)| *i == l.index).map(|(_, a)| *a);
            let ip4 = mine().find_map(|a| match a {
                IpAddr::V4(v) if !v.is_loopback() && !v.is_link_local() => Some(v),
                _ => None,
            });
            let ip6 = mine().find_map(|a| match a {
                IpAddr::V6(v) if !v.is_loopback() && !v.is_unicast_link_local() => Some(v),
                _ => None,
            });
            Some((l.index, peer, ip4, ip6))
        })
        .collect()
}

impl Nl {
    async fn pod_links(&self) -> Result<Vec<PodLink>, NetlinkError> {
        let fail = |e| self.fail(Request::new(Op::FindLink, "*", None))(e);
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(fail)?;
        Ok(msgs
            .into_iter()
            .map(|m| PodLink {
                index: m.header.index,
                peer: m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(p) => Some(*p),
                    _ => None,
                }),
                peer_elsewhere: m
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_))),
                loopback: m.header.flags.contains(LinkFlags::Loopback),
            })
            .collect())
    }

    /// Global (universe-scope) addresses, by link index.
    async fn global_addrs(&self) -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
        let fail = |e| self.fail(Request::new(Op::FindLink, "*", Some("addresses".into())))(e);
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(fail)?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.scope == AddressScope::Universe)
            .flat_map(|m| {
                let index = m.header.index;
                m.attributes.into_iter().filter_map(move |a| match a {
                    AddressAttribute::Address(ip) => Some((index, ip)),
                    _ => None,
                })
            })
            .collect())
    }

    /// The name of link `index` when its peer is link `peer` of another namespace.
    async fn peer_named(&self, index: u32, peer: u32) -> Result<Option<String>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let m = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if super::netlink::errno_of(&e) == Some(nix::errno::Errno::ENODEV) => {
                return Ok(None)
            }
            Err(e) => {
                return Err(self.fail(Request::new(
                    Op::FindLink,
                    &index.to_string(),
                    None,
                ))(e))
            }
        };
        let is_peer = m.attributes.contains(&LinkAttribute::Link(peer))
            && m.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        Ok(is_peer
            .then(|| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .flatten())
    }
}

/// The node-side interfaces of the pod whose network namespace is at `netns`, with the pod's
/// addresses on each. Empty when the pod has no link to the agent's namespace.
pub fn find(netns: &Path) -> Result<Vec<PodIface>, NetlinkError> {
    let inside = session(Some(netns), async |nl| {
        let links = nl.pod_links().await?;
        let addrs = nl.global_addrs().await?;
        Ok(pod_side(&links, &addrs))
    })?;
    if inside.is_empty() {
        return Ok(Vec::new());
    }
    session(None, async |nl| {
        let mut out = Vec::new();
        for (pod_index, peer, ip4, ip6) in inside {
            if let Some(host_if) = nl.peer_named(peer, pod_index).await? {
                out.push(PodIface {
                    host_if,
                    ifindex: peer,
                    ip4,
                    ip6,
                });
            }
        }
        Ok(out)
    })
}

/// The node-side interfaces of every pod in `pods` (a key, such as the workload id, and the
/// path of the pod's network namespace). A pod whose namespace cannot be read (gone, or no
/// veth to this namespace) is skipped with a warning: the cgroup programs still judge it.
pub fn backstops<K: Copy>(pods: &[(K, std::path::PathBuf)]) -> Vec<(K, PodIface)> {
    let mut out = Vec::new();
    for (key, netns) in pods {
        match find(netns) {
            Ok(list) if list.is_empty() => tracing::debug!(
                netns = %netns.display(),
                "no veth to this namespace: no tc backstop for this pod"
            ),
            Ok(list) => out.extend(list.into_iter().map(|i| (*key, i))),
            Err(e) => tracing::warn!(
                netns = %netns.display(),
                error = %e,
                "cannot find the pod's node-side interface: no tc backstop for it (the cgroup programs still judge it)"
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, peer: Option<u32>, elsewhere: bool) -> PodLink {
        PodLink {
            index,
            peer,
            peer_elsewhere: elsewhere,
            loopback: false,
        }
    }

    #[test]
    fn the_veth_with_a_peer_elsewhere_is_the_pods_with_its_global_addresses() {
        let links = [
            PodLink {
                loopback: true,
                ..link(1, None, false)
            },
            link(3, Some(17), true),
            // A link whose peer is in the pod's own namespace (a bridge port, a dummy).
            link(4, Some(5), false),
        ];
        let addrs = [
            (1, "127.0.0.1".parse().unwrap()),
            (3, "fe80::1".parse().unwrap()),
            (3, "10.244.1.7".parse().unwrap()),
            (3, "fd00:10:244::7".parse().unwrap()),
            (4, "192.168.9.9".parse().unwrap()),
        ];
        assert_eq!(
            pod_side(&links, &addrs),
            vec![(
                3,
                17,
                Some("10.244.1.7".parse().unwrap()),
                Some("fd00:10:244::7".parse().unwrap())
            )]
        );
    }

    #[test]
    fn a_pod_link_without_addresses_is_still_found() {
        assert_eq!(
            pod_side(&[link(2, Some(9), true)], &[]),
            vec![(2, 9, None, None)]
        );
    }
}
