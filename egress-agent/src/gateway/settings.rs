//! The gateway's own file (`egress-agent gateway --config FILE`): one `GatewayServer`
//! document. Strict like the policy file: unknown fields are errors, and an error names the
//! file, the object and the field.
//!
//! ```yaml
//! kind: GatewayServer
//! metadata: {name: egress-gateway}
//! spec:
//!   listeners:
//!     - {address: 127.0.8.1:1080, protocol: socks5}
//!     - {address: 127.0.8.1:8080, protocol: http}   # HTTP/1.1 CONNECT and HTTP/2 (h2c) CONNECT
//!   egressAddress: 127.0.8.1        # source address of the gateway's outgoing connections
//!   allow:
//!     - {ipAddresses: [127.41.0.0/16], ports: [{number: 80}]}
//!     - {hosts: ["*.example.com"], ports: [{number: 443}]}
//! ```

use std::{net::IpAddr, net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

use crate::policy::{documents, Cidr, ConfigError, HostPattern, Port, Seconds, API_VERSION};

/// What a listener speaks.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// SOCKS5 CONNECT, no authentication.
    Socks5,
    /// HTTP CONNECT: HTTP/1.1, and HTTP/2 with prior knowledge (h2c), told apart by the
    /// first byte.
    Http,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRange {
    pub number: Port,
    #[serde(default)]
    pub end_port: Option<Port>,
}

/// One allowed set of destinations: a destination is allowed when its port is in `ports`
/// (empty: any) and its address is in `ipAddresses` or its name matches `hosts` (both empty:
/// any destination on those ports).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AllowRule {
    #[serde(default)]
    pub hosts: Vec<HostPattern>,
    #[serde(default)]
    pub ip_addresses: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

impl AllowRule {
    fn port_ok(&self, port: u16) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|p| (p.number.0..=p.end_port.unwrap_or(p.number).0).contains(&port))
    }

    fn any_destination(&self) -> bool {
        self.hosts.is_empty() && self.ip_addresses.is_empty()
    }

    /// Whether the rule lets out a connection to `ip:port` (`host`: the name it was asked
    /// for, when it was asked for by name or the node proxy sniffed one).
    pub fn allows(&self, ip: IpAddr, port: u16, host: Option<&str>) -> bool {
        self.port_ok(port)
            && (self.any_destination()
                || self.ip_addresses.iter().any(|c| c.contains(ip))
                || host.is_some_and(|h| self.hosts.iter().any(|p| p.matches(h))))
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayServerSpec {
    pub listeners: Vec<Listener>,
    /// Source address of outgoing connections (the address destinations see).
    #[serde(default)]
    pub egress_address: Option<IpAddr>,
    /// What the gateway lets out; nothing when empty.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Seconds,
    /// How long a client has to finish its SOCKS5 or CONNECT handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Seconds,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Seconds,
    /// Tunnels at once (each HTTP/2 stream counts); more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_connect_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_handshake_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_idle_timeout() -> Seconds {
    Seconds(Duration::from_secs(3600))
}
fn default_max_connections() -> u32 {
    16_384
}

impl GatewayServerSpec {
    /// The rule that allows `ip:port` (index), if any.
    pub fn allowed(&self, ip: IpAddr, port: u16, host: Option<&str>) -> Option<usize> {
        self.allow.iter().position(|r| r.allows(ip, port, host))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServerDocument {
    #[serde(default)]
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: GatewayServerSpec,
}

/// A parsed gateway file.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayServer {
    pub name: String,
    pub spec: GatewayServerSpec,
}

pub fn load(path: &Path) -> Result<GatewayServer, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
    parse(&text, &file)
}

pub fn parse(text: &str, file: &str) -> Result<GatewayServer, ConfigError> {
    let err =
        |object: &str, field: &str, reason: String| ConfigError::new(file, object, field, reason);
    let mut found: Option<GatewayServer> = None;
    for doc in documents(text, file)? {
        if doc.kind != "GatewayServer" {
            return Err(err(
                &format!("document {}", doc.index),
                "kind",
                format!(
                    "{:?} is not GatewayServer (the gateway's file holds one GatewayServer)",
                    doc.kind
                ),
            ));
        }
        let label = doc.label();
        let d: ServerDocument = doc.typed(file)?;
        if let Some(api) = d.api_version.as_deref().filter(|a| *a != API_VERSION) {
            return Err(err(
                &label,
                "apiVersion",
                format!("{api:?} is not {API_VERSION:?}"),
            ));
        }
        if let Some(prev) = &found {
            return Err(err(
                &label,
                "",
                format!("a second GatewayServer (the first is {:?})", prev.name),
            ));
        }
        let s = &d.spec;
        if s.listeners.is_empty() {
            return Err(err(
                &label,
                "spec.listeners",
                "at least one listener is required".into(),
            ));
        }
        for (i, l) in s.listeners.iter().enumerate() {
            if s.listeners[..i].iter().any(|p| p.address == l.address) {
                return Err(err(
                    &label,
                    &format!("spec.listeners[{i}].address"),
                    format!("{} is already a listener", l.address),
                ));
            }
        }
        for (i, r) in s.allow.iter().enumerate() {
            for (j, p) in r.ports.iter().enumerate() {
                if p.end_port.is_some_and(|e| e < p.number) {
                    return Err(err(
                        &label,
                        &format!("spec.allow[{i}].ports[{j}].endPort"),
                        "endPort is below number".into(),
                    ));
                }
            }
        }
        if s.max_connections == 0 {
            return Err(err(
                &label,
                "spec.maxConnections",
                "must be at least 1".into(),
            ));
        }
        found = Some(GatewayServer {
            name: d.metadata.name,
            spec: d.spec,
        });
    }
    found.ok_or_else(|| err("file", "", "no GatewayServer document".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kind: GatewayServer
metadata: {name: gw}
spec:
  listeners:
    - {address: 127.0.8.1:1080, protocol: socks5}
    - {address: "[::1]:8080", protocol: http}
  egressAddress: 127.0.8.1
  allow:
    - {ipAddresses: [127.41.0.0/16], ports: [{number: 80}, {number: 8000, endPort: 8100}]}
    - {hosts: ["*.example.com"], ports: [{number: 443}]}
  connectTimeout: 2s
"#;

    fn err(text: &str) -> String {
        parse(text, "gw.yaml").unwrap_err().to_string()
    }

    #[test]
    fn parses_and_allows() {
        let g = parse(GOOD, "gw.yaml").unwrap();
        assert_eq!(g.name, "gw");
        assert_eq!(g.spec.listeners[1].protocol, ListenerProtocol::Http);
        assert_eq!(g.spec.connect_timeout.0, Duration::from_secs(2));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(g.spec.allowed(ip("127.41.0.9"), 80, None), Some(0));
        assert_eq!(g.spec.allowed(ip("127.41.0.9"), 8050, None), Some(0));
        assert_eq!(g.spec.allowed(ip("127.41.0.9"), 81, None), None);
        assert_eq!(g.spec.allowed(ip("127.42.0.9"), 80, None), None);
        assert_eq!(
            g.spec.allowed(ip("1.2.3.4"), 443, Some("a.example.com")),
            Some(1)
        );
        assert_eq!(
            g.spec.allowed(ip("1.2.3.4"), 443, Some("a.b.example.com")),
            None
        );
        assert_eq!(g.spec.allowed(ip("1.2.3.4"), 443, None), None);
    }

    #[test]
    fn errors_name_file_object_and_field() {
        assert_eq!(
            err(&GOOD.replace("protocol: socks5", "protocol: socks4")),
            "gw.yaml: GatewayServer gw: spec.listeners[0].protocol: unknown variant `socks4`, expected `socks5` or `http`"
        );
        let e = err(&GOOD.replace("connectTimeout", "connectTimout"));
        assert!(
            e.starts_with("gw.yaml: GatewayServer gw: spec.connectTimout: unknown field"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.41.0.0/16", "127.41.0.1/16"));
        assert!(
            e.contains("spec.allow[0].ipAddresses[0]: invalid CIDR"),
            "{e}"
        );
        let e = err(&GOOD.replace("[::1]:8080", "127.0.8.1:1080"));
        assert!(
            e.contains("spec.listeners[1].address: 127.0.8.1:1080 is already a listener"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind: GatewayServer", "kind: Egress"));
        assert!(
            e.contains("document 1: kind: \"Egress\" is not GatewayServer"),
            "{e}"
        );
        let e = err(&format!("{GOOD}---\n{GOOD}"));
        assert!(e.contains("a second GatewayServer"), "{e}");
        let e = err("");
        assert_eq!(e, "gw.yaml: file: no GatewayServer document");
        let e = err(&GOOD.replace("endPort: 8100", "endPort: 7000"));
        assert!(
            e.contains("spec.allow[0].ports[1].endPort: endPort is below number"),
            "{e}"
        );
    }
}
