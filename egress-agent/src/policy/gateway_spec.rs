//! An EgressGateway's spec: where the node proxy sends the connections that leave through
//! it. Each entry is a gateway `address`, or a Kubernetes `service` whose ready endpoints
//! the agent follows (Kubernetes mode only: see [`crate::gateway::services`]).
//!
//! ```yaml
//! spec:
//!   global:
//!     - service: {name: fsm-egress-gateway, namespace: fsm, port: egress-nat-port}
//!       mode: http2tunnel
//! ```

use std::{fmt, net::SocketAddr};

use serde::{de, Deserialize, Deserializer};

/// A gateway is either global (FSM semantics: every connection the proxy relays leaves
/// through it, unless its policy names another gateway) or per policy (`endpoints`: used only
/// by the Egress policies that name it with `gateway:`). Endpoints are tried in order.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub global: Vec<GatewayEndpoint>,
    #[serde(default)]
    pub endpoints: Vec<GatewayEndpoint>,
}

impl GatewaySpec {
    pub fn is_global(&self) -> bool {
        !self.global.is_empty()
    }

    /// The endpoints, whichever list holds them.
    pub fn all(&self) -> &[GatewayEndpoint] {
        if self.is_global() {
            &self.global
        } else {
            &self.endpoints
        }
    }

    /// The field name of the list in use (`global` or `endpoints`), for errors.
    pub fn field(&self) -> &'static str {
        if self.is_global() {
            "global"
        } else {
            "endpoints"
        }
    }
}

/// One way to the gateway: an `address`, or a `service` (exactly one of them).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayEndpoint {
    #[serde(default)]
    pub address: Option<SocketAddr>,
    #[serde(default)]
    pub service: Option<ServiceRef>,
    pub mode: GatewayMode,
}

/// A Service whose ready endpoints (its EndpointSlices') are the gateway's addresses.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
    /// Which of the Service's ports: its name, or the endpoints' port number. Unset: the
    /// Service must have exactly one TCP port.
    #[serde(default)]
    pub port: Option<PortRef>,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A port of a Service, by name or by number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortRef, E> {
                match u16::try_from(n) {
                    Ok(p) if p > 0 => Ok(PortRef::Number(p)),
                    _ => Err(E::custom(format!("port {n} is out of range 1-65535"))),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortRef, E> {
                self.visit_u64(u64::try_from(n).unwrap_or(u64::MAX))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRef, E> {
                if s.is_empty() {
                    return Err(E::custom("an empty port name"));
                }
                Ok(PortRef::Name(s.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// How the node proxy talks to a gateway.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
pub enum GatewayMode {
    /// HTTP/2 CONNECT, one stream per connection over one reused h2c connection.
    #[serde(rename = "http2tunnel")]
    Http2tunnel,
    /// SOCKS5 CONNECT (RFC 1928, no authentication).
    #[serde(rename = "socks5")]
    Socks5,
    /// HTTP/1.1 CONNECT, one TCP connection per tunnel (squid, tinyproxy and friends).
    #[serde(rename = "http-connect")]
    HttpConnect,
}

impl GatewayMode {
    pub fn name(self) -> &'static str {
        match self {
            GatewayMode::Http2tunnel => "http2tunnel",
            GatewayMode::Socks5 => "socks5",
            GatewayMode::HttpConnect => "http-connect",
        }
    }
}
