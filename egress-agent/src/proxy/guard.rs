//! No way into the node through the proxy. The proxy dials from the node's network namespace,
//! so a pod's connection to its own `127.0.0.1` would reach the **node's** loopback, and one to
//! `169.254.169.254` would reach the cloud's metadata endpoint with the node's identity. The
//! proxy therefore never dials, on behalf of a workload, an address of the node itself:
//! loopback (127.0.0.0/8, ::1), "this host" (0.0.0.0/8, ::), link-local (169.254.0.0/16,
//! fe80::/10) or an address on one of the node's interfaces, unless an allow rule that
//! applies to the connection names that address explicitly: one of its `ipAddresses` contains
//! it and lies inside the same class (127.31.0.1/32 or 127.0.0.0/8 name a loopback address;
//! 0.0.0.0/0 does not). Connections that leave through an EgressGateway are the gateway's to
//! dial and are not checked here.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::policy::{normalize, Action, Cidr, Compiled};

/// The class of node-only addresses `ip` belongs to (as a CIDR), or None for an ordinary one.
pub fn node_class(ip: IpAddr, node_addrs: &[IpAddr]) -> Option<Cidr> {
    let ip = normalize(ip);
    let classes: [(&str, u8); 6] = [
        ("127.0.0.0", 8),
        ("0.0.0.0", 8),
        ("169.254.0.0", 16),
        ("::1", 128),
        ("::", 128),
        ("fe80::", 10),
    ];
    classes
        .iter()
        .map(|(a, len)| Cidr {
            addr: a.parse().expect("constant address"),
            len: *len,
        })
        .find(|c| c.contains(ip))
        .or_else(|| {
            node_addrs.contains(&ip).then_some(Cidr {
                addr: ip,
                len: if ip.is_ipv4() { 32 } else { 128 },
            })
        })
}

/// Whether `c` lies inside `class` (every address of `c` is in it).
fn inside(c: &Cidr, class: &Cidr) -> bool {
    c.len >= class.len && class.contains(c.addr)
}

/// None: the proxy may dial `dst` for `workload`. Some(class): it may not, `dst` is a node
/// address of that class and no applicable allow rule names it.
pub fn into_node(
    policy: &Compiled,
    workload: u32,
    dst: SocketAddr,
    node_addrs: &[IpAddr],
) -> Option<Cidr> {
    let ip = normalize(dst.ip());
    let class = node_class(ip, node_addrs)?;
    let named = policy.rules.iter().any(|r| {
        r.action == Action::Allow
            && r.applies_tcp(workload, ip, dst.port())
            && r.cidrs.iter().any(|c| c.contains(ip) && inside(c, &class))
    });
    (!named).then_some(class)
}

/// The addresses on the node's interfaces (the proxy's own network namespace), re-read at
/// most every few seconds.
#[derive(Default)]
pub struct NodeAddrs {
    cached: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

const REFRESH: Duration = Duration::from_secs(5);

impl NodeAddrs {
    pub fn get(&self) -> Vec<IpAddr> {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        match &*c {
            Some((at, addrs)) if at.elapsed() < REFRESH => addrs.clone(),
            _ => {
                let addrs = read_node_addrs();
                *c = Some((Instant::now(), addrs.clone()));
                addrs
            }
        }
    }
}

fn read_node_addrs() -> Vec<IpAddr> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    ifs.filter_map(|i| {
        let a = i.address?;
        if let Some(v4) = a.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            a.as_sockaddr_in6().map(|v6| normalize(IpAddr::V6(v6.ip())))
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, parse::parse};

    fn policy(rules: &str) -> Compiled {
        let text = format!("kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{traffic: {{enableEgress: true}}}}\n---\nkind: Workload\nmetadata: {{name: web}}\n{rules}");
        compile(&parse(&text, "t.yaml").unwrap()).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_addresses_are_refused_unless_named() {
        let node: Vec<IpAddr> = vec!["10.9.0.5".parse().unwrap()];
        let p = policy("---\nkind: Egress\nmetadata: {name: h}\nspec: {sources: [{name: web}], hosts: [a.example], ports: [{number: 80}]}\n---\nkind: Egress\nmetadata: {name: all}\nspec: {sources: [{name: web}], ipAddresses: [0.0.0.0/0, '::/0'], ports: [{number: 80}]}\n---\nkind: Egress\nmetadata: {name: lo}\nspec: {sources: [{name: web}], ipAddresses: [127.31.0.1/32, 169.254.10.0/24], ports: [{number: 80}]}\n");
        let web = 1;
        for refused in [
            "127.0.0.1:80",
            "127.31.0.2:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "0.0.0.0:80",
            "[::]:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "10.9.0.5:80",
        ] {
            assert!(
                into_node(&p, web, sa(refused), &node).is_some(),
                "{refused}"
            );
        }
        for allowed in [
            "127.31.0.1:80",
            "169.254.10.7:80",
            "10.9.0.6:80",
            "93.184.216.34:80",
        ] {
            assert_eq!(into_node(&p, web, sa(allowed), &node), None, "{allowed}");
        }
        // Named, but for another port: not this connection's rule.
        assert!(into_node(&p, web, sa("127.31.0.1:81"), &node).is_some());
        assert!(!read_node_addrs().is_empty(), "loopback at least");
    }
}
