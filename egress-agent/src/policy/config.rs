//! The policy file: MeshConfig, Workload, Egress and EgressGateway objects as YAML documents.
//!
//! Parsing is strict (unknown kinds and fields are errors) and complete: every object is
//! validated before anything is compiled, and the first error names the file, the object and
//! the field path, e.g. `policy.yaml: Egress default/web-out: spec.ports[0].number: port 0 is
//! out of range 1-65535`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::Path,
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

pub const API_VERSION: &str = "policy.egress.dev/v1alpha1";
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// An invalid policy file. Displays as one line.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {object}{sep}{field}: {reason}", sep = if field.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    /// `Kind namespace/name`, or `document N` when the kind or name is unknown.
    pub object: String,
    /// Dotted field path, empty when the whole object is at fault.
    pub field: String,
    pub reason: String,
}

/// The whole policy of a standalone agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub mesh: MeshSpec,
    pub workloads: Vec<Workload>,
    pub egresses: Vec<Egress>,
    pub gateways: Vec<EgressGateway>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// `NAME` or `NAMESPACE/NAME` (namespace "default" when omitted), as the CLI takes it.
impl std::str::FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, name) = s.split_once('/').unwrap_or(("default", s));
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if valid(ns) && valid(name) {
            Ok(ObjectRef {
                namespace: ns.into(),
                name: name.into(),
            })
        } else {
            Err(format!("{s:?} is not NAME or NAMESPACE/NAME"))
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object<S> {
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: Option<S>,
}

// ---- MeshConfig -------------------------------------------------------------------------

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MeshSpec {
    pub traffic: TrafficSpec,
    pub proxy: ProxySpec,
    pub fail_mode: FailMode,
    pub audit_mode: bool,
    /// Standalone mode: addresses of workloads with `network: pod`.
    pub pod_network: Option<PodNetwork>,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            traffic: TrafficSpec::default(),
            proxy: ProxySpec::default(),
            fail_mode: FailMode::Closed,
            audit_mode: false,
            pod_network: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TrafficSpec {
    /// true: unmatched external traffic passes; false: only what an Egress allows.
    pub enable_egress: bool,
    #[serde(rename = "meshCIDRs")]
    pub mesh_cidrs: Vec<Cidr>,
}

impl Default for TrafficSpec {
    fn default() -> Self {
        Self {
            enable_egress: true,
            mesh_cidrs: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProxySpec {
    pub port: Port,
    /// How long a client has to name its host (SNI, Host) when a rule needs it.
    pub sniff_timeout: Seconds,
    /// A relayed connection with no bytes either way for this long is closed.
    pub idle_timeout: Seconds,
    /// Connections the proxy relays at once.
    pub max_connections: u32,
    /// When a policy change refuses a destination, close the relayed connections to it.
    pub close_on_tighten: bool,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            port: Port(DEFAULT_PROXY_PORT),
            sniff_timeout: Seconds(std::time::Duration::from_secs(5)),
            idle_timeout: Seconds(std::time::Duration::from_secs(3600)),
            max_connections: 16_384,
            close_on_tighten: true,
        }
    }
}

/// A duration written as `500ms`, `5s`, `10m` or `1h` (Kubernetes style), at least 1ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub std::time::Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("invalid duration {s:?} (like 500ms, 5s, 10m, 1h)"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            _ => None,
        }
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("invalid duration {s:?} (like 500ms, 5s, 10m, 1h)"))?;
        Ok(Seconds(std::time::Duration::from_millis(ms)))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Standalone mode: the network of workloads that own a network namespace, as a CNI would
/// set it up on a Kubernetes node (see `podnet`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodNetwork {
    /// Pod addresses are taken from here in the order the workloads are declared (.2 on).
    pub ipv4: Option<Cidr>,
    pub ipv6: Option<Cidr>,
    /// Network namespaces are `/run/netns/<prefix><namespace>-<name>`.
    pub netns_prefix: String,
}

impl Default for PodNetwork {
    fn default() -> Self {
        Self {
            ipv4: None,
            ipv6: None,
            netns_prefix: "egress-".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The workload shares the agent's network namespace.
    #[default]
    Host,
    /// The workload has its own network namespace behind a veth pair, like a pod.
    Pod,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Closed,
    Open,
}

// ---- Workload ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub id: ObjectRef,
    pub labels: BTreeMap<String, String>,
    pub network: Network,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSpec {
    #[serde(default)]
    network: Network,
}

// ---- Egress -----------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Egress {
    pub id: ObjectRef,
    pub spec: EgressSpec,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressSpec {
    pub sources: Vec<Source>,
    #[serde(default)]
    pub hosts: Vec<HostPattern>,
    #[serde(default)]
    pub ip_addresses: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub via: Option<Via>,
    /// The EgressGateway (by name) this policy's connections leave through; implies
    /// `via: gateway`. Without it, `via: gateway` means the global gateway.
    #[serde(default)]
    pub gateway: Option<String>,
}

impl EgressSpec {
    /// Where matching connections go: hosts imply the proxy, a named gateway implies
    /// `via: gateway`.
    pub fn route(&self) -> Via {
        match self.via {
            Some(v) => v,
            None if self.gateway.is_some() => Via::Gateway,
            None if !self.hosts.is_empty() => Via::Proxy,
            None => Via::Direct,
        }
    }
}

/// A source: one workload by name, or workloads by label.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub number: Port,
    /// Last port of a range (inclusive), as in Kubernetes NetworkPolicy.
    #[serde(default)]
    pub end_port: Option<Port>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Https,
    Udp,
}

impl Protocol {
    pub fn is_tcp(self) -> bool {
        !matches!(self, Protocol::Udp)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Direct,
    Proxy,
    Gateway,
}

// ---- EgressGateway ----------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct EgressGateway {
    pub id: ObjectRef,
    pub spec: GatewaySpec,
}

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
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayEndpoint {
    pub address: std::net::SocketAddr,
    pub mode: GatewayMode,
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

// ---- Scalar types with their own validation ----------------------------------------------

/// A TCP/UDP port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=65535).contains(&n) {
            Ok(Port(n as u16))
        } else {
            Err(serde::de::Error::custom(format_args!(
                "port {n} is out of range 1-65535"
            )))
        }
    }
}

/// An IP prefix. IPv4-mapped IPv6 prefixes are stored as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub const ALL_V4: Cidr = Cidr {
        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    pub const ALL_V6: Cidr = Cidr {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalize(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                mask(&n.octets(), self.len) == mask(&a.octets(), self.len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                mask(&n.octets(), self.len) == mask(&a.octets(), self.len)
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The first `len` bits of `bytes`, the rest zeroed.
pub fn mask<const N: usize>(bytes: &[u8; N], len: u8) -> [u8; N] {
    let mut out = *bytes;
    for (i, b) in out.iter_mut().enumerate() {
        let bit = (i * 8) as u32;
        let len = len as u32;
        *b &= if len >= bit + 8 {
            0xff
        } else if len <= bit {
            0
        } else {
            !(0xffu8 >> (len - bit))
        };
    }
    out
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 0-{max}"))?,
        };
        let (addr, len) = match ip {
            IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (normalize(ip), len - 96)
            }
            _ => (ip, len),
        };
        let canonical = match addr {
            IpAddr::V4(a) => IpAddr::from(mask(&a.octets(), len)),
            IpAddr::V6(a) => IpAddr::from(mask(&a.octets(), len)),
        };
        if canonical != addr {
            return Err(format!(
                "invalid CIDR {s:?}: host bits are set (the network is {canonical}/{len})"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A host rule: `example.com`, `*.example.com` (exactly one more label) or `**.example.com`
/// (one or more). Stored lower-case without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPattern(pub String);

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let base = lower
            .strip_prefix("**.")
            .or_else(|| lower.strip_prefix("*."))
            .unwrap_or(&lower);
        let bad = |why: &str| Err(format!("invalid host {s:?}: {why}"));
        if base.is_empty() {
            return bad("empty name");
        }
        if lower.len() > 253 {
            return bad("longer than 253 characters");
        }
        for label in base.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("each label must be 1-63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("only letters, digits, '-' and '_' are allowed, and '*.' or '**.' only as the first label");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label cannot start or end with '-'");
            }
        }
        Ok(HostPattern(lower))
    }
}

impl HostPattern {
    /// Whether `host` matches: exact, `*.` exactly one more label, `**.` one or more;
    /// case-insensitive, a trailing dot ignored.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let p = self.0.as_str();
        let suffix_match = |base: &str| -> Option<usize> {
            // The labels of `host` before ".base", if host ends with it.
            let hl = host.len();
            let bl = base.len();
            (hl > bl + 1
                && host[hl - bl..].eq_ignore_ascii_case(base)
                && host.as_bytes()[hl - bl - 1] == b'.')
                .then(|| host[..hl - bl - 1].split('.').count())
        };
        if let Some(base) = p.strip_prefix("**.") {
            suffix_match(base).is_some_and(|labels| labels >= 1 && !host.starts_with('.'))
        } else if let Some(base) = p.strip_prefix("*.") {
            suffix_match(base) == Some(1)
        } else {
            host.eq_ignore_ascii_case(p)
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---- Loading ----------------------------------------------------------------------------

/// Kubernetes object names: DNS-1123 labels (lower-case alphanumerics and '-', 1-63).
fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid name (lower-case letters, digits and '-', 1-63 characters)"
        ))
    }
}

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        object: "file".into(),
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates the text of a policy file (`file` names it in errors).
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    parse_objects(text, file)?.finish()
}

/// Kubernetes mode: like [`parse`], but an Egress may name a source that is not among the
/// objects (a pod of another node, or one not scheduled yet): it applies to nobody here.
pub fn parse_unlinked(text: &str, file: &str) -> Result<Config, ConfigError> {
    parse_objects(text, file)?.finish_unlinked()
}

fn parse_objects(text: &str, file: &str) -> Result<Parser, ConfigError> {
    let mut p = Parser {
        file: file.to_string(),
        cfg: Config::default(),
        mesh_seen: None,
        seen: BTreeSet::new(),
    };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| p.err_doc(i, "", e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        p.object(i, value)?;
    }
    Ok(p)
}

struct Parser {
    file: String,
    cfg: Config,
    mesh_seen: Option<String>,
    seen: BTreeSet<(String, ObjectRef)>,
}

impl Parser {
    fn err(&self, object: &str, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            object: object.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn err_doc(&self, i: usize, field: &str, reason: String) -> ConfigError {
        self.err(&format!("document {}", i + 1), field, reason)
    }

    fn object(&mut self, i: usize, value: serde_yaml::Value) -> Result<(), ConfigError> {
        let kind = match value.get("kind") {
            Some(serde_yaml::Value::String(k)) => k.clone(),
            Some(_) => return Err(self.err_doc(i, "kind", "must be a string".into())),
            None => return Err(self.err_doc(i, "kind", "missing".into())),
        };
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let label = match kind.as_str() {
            "MeshConfig" | "EgressGateway" if !name.is_empty() => format!("{kind} {name}"),
            _ if !name.is_empty() => format!("{kind} {namespace}/{name}"),
            _ => format!("{kind} (document {})", i + 1),
        };
        let id = ObjectRef { namespace, name };
        match kind.as_str() {
            "MeshConfig" => {
                let o: Object<MeshSpec> = self.typed(&label, value)?;
                self.header(&label, &o.metadata, o.api_version.as_deref())?;
                if let Some(prev) = &self.mesh_seen {
                    return Err(self.err(&label, "", format!("a second MeshConfig (the first is {prev:?})")));
                }
                self.mesh_seen = Some(id.name.clone());
                self.cfg.mesh = o.spec.unwrap_or_default();
            }
            "Workload" => {
                let o: Object<WorkloadSpec> = self.typed(&label, value)?;
                self.header(&label, &o.metadata, o.api_version.as_deref())?;
                self.unique(&label, &kind, &id)?;
                self.cfg.workloads.push(Workload {
                    id,
                    labels: o.metadata.labels,
                    network: o.spec.map(|s| s.network).unwrap_or_default(),
                });
            }
            "Egress" => {
                let o: Object<EgressSpec> = self.typed(&label, value)?;
                self.header(&label, &o.metadata, o.api_version.as_deref())?;
                self.unique(&label, &kind, &id)?;
                let spec = o.spec.ok_or_else(|| self.err(&label, "spec", "missing"))?;
                self.check_egress(&label, &spec)?;
                self.cfg.egresses.push(Egress { id, spec });
            }
            "EgressGateway" => {
                let o: Object<GatewaySpec> = self.typed(&label, value)?;
                self.header(&label, &o.metadata, o.api_version.as_deref())?;
                self.unique(&label, &kind, &id)?;
                let spec = o.spec.ok_or_else(|| self.err(&label, "spec", "missing"))?;
                match (spec.global.is_empty(), spec.endpoints.is_empty()) {
                    (true, true) => {
                        return Err(self.err(
                            &label,
                            "spec",
                            "give the gateway's addresses in global (every proxied connection) or endpoints (policies that name it)",
                        ))
                    }
                    (false, false) => {
                        return Err(self.err(
                            &label,
                            "spec.endpoints",
                            "a gateway is either global or per policy: give global or endpoints, not both",
                        ))
                    }
                    _ => {}
                }
                if spec.is_global() {
                    if let Some(g) = self.cfg.gateways.iter().find(|g| g.spec.is_global()) {
                        return Err(self.err(
                            &label,
                            "spec.global",
                            format!("a second global gateway (the first is EgressGateway {})", g.id.name),
                        ));
                    }
                }
                self.cfg.gateways.push(EgressGateway { id, spec });
            }
            other => {
                return Err(self.err(
                    &label,
                    "kind",
                    format!("unknown kind {other:?} (expected MeshConfig, Workload, Egress or EgressGateway)"),
                ))
            }
        }
        Ok(())
    }

    fn typed<T: for<'de> Deserialize<'de>>(
        &self,
        label: &str,
        value: serde_yaml::Value,
    ) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            self.err(label, &field, e.into_inner().to_string())
        })
    }

    fn header(&self, label: &str, m: &Metadata, api: Option<&str>) -> Result<(), ConfigError> {
        if let Some(api) = api {
            if api != API_VERSION {
                return Err(self.err(
                    label,
                    "apiVersion",
                    format!("{api:?} is not {API_VERSION:?}"),
                ));
            }
        }
        check_name(&m.name).map_err(|r| self.err(label, "metadata.name", r))?;
        if let Some(ns) = &m.namespace {
            check_name(ns).map_err(|r| self.err(label, "metadata.namespace", r))?;
        }
        Ok(())
    }

    fn unique(&mut self, label: &str, kind: &str, id: &ObjectRef) -> Result<(), ConfigError> {
        if !self.seen.insert((kind.to_string(), id.clone())) {
            return Err(self.err(label, "metadata.name", format!("duplicate {kind} {id}")));
        }
        Ok(())
    }

    fn check_egress(&self, label: &str, s: &EgressSpec) -> Result<(), ConfigError> {
        if s.sources.is_empty() {
            return Err(self.err(label, "spec.sources", "at least one source is required"));
        }
        for (i, src) in s.sources.iter().enumerate() {
            let f = format!("spec.sources[{i}]");
            match (&src.name, &src.pod_selector) {
                (Some(_), Some(_)) => {
                    return Err(self.err(label, &f, "give either name or podSelector, not both"))
                }
                (None, None) => return Err(self.err(label, &f, "name or podSelector is required")),
                (Some(n), None) => {
                    if let Some(k) = &src.kind {
                        if k != "Workload" && k != "ServiceAccount" && k != "Pod" {
                            return Err(self.err(
                                label,
                                &format!("{f}.kind"),
                                format!("unknown source kind {k:?} (expected Workload)"),
                            ));
                        }
                    }
                    check_name(n).map_err(|r| self.err(label, &format!("{f}.name"), r))?;
                }
                (None, Some(_)) => {}
            }
            if let Some(ns) = &src.namespace {
                check_name(ns).map_err(|r| self.err(label, &format!("{f}.namespace"), r))?;
            }
        }
        for (i, p) in s.ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            if let Some(end) = p.end_port {
                if end < p.number {
                    return Err(self.err(
                        label,
                        &format!("{f}.endPort"),
                        format!("endPort {} is below number {}", end.0, p.number.0),
                    ));
                }
            }
            if !s.hosts.is_empty() && !p.protocol.is_tcp() {
                return Err(self.err(
                    label,
                    &format!("{f}.protocol"),
                    "host rules need TCP (tcp, http or https); udp cannot carry a host name",
                ));
            }
            if (s.via == Some(Via::Proxy) || s.route() == Via::Gateway) && !p.protocol.is_tcp() {
                return Err(self.err(
                    label,
                    &format!("{f}.protocol"),
                    "via: proxy and via: gateway carry TCP only",
                ));
            }
        }
        if s.action == Action::Deny && matches!(s.via, Some(Via::Proxy | Via::Gateway)) {
            return Err(self.err(
                label,
                "spec.via",
                "a deny rule sends nothing anywhere; remove via",
            ));
        }
        if s.gateway.is_some() && s.via.is_some_and(|v| v != Via::Gateway) {
            return Err(self.err(
                label,
                "spec.gateway",
                "a gateway is named but via is not gateway; remove one of them",
            ));
        }
        if let Some(g) = &s.gateway {
            check_name(g).map_err(|r| self.err(label, "spec.gateway", r))?;
            if s.action == Action::Deny {
                return Err(self.err(
                    label,
                    "spec.gateway",
                    "a deny rule sends nothing anywhere; remove gateway",
                ));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Config, ConfigError> {
        // Every source must name an existing workload (selectors may match none: that is a
        // policy that applies to nobody yet, as in Kubernetes).
        let names: BTreeSet<&ObjectRef> = self.cfg.workloads.iter().map(|w| &w.id).collect();
        for e in &self.cfg.egresses {
            for (i, src) in e.spec.sources.iter().enumerate() {
                if let Some(n) = &src.name {
                    let want = ObjectRef {
                        namespace: src
                            .namespace
                            .clone()
                            .unwrap_or_else(|| e.id.namespace.clone()),
                        name: n.clone(),
                    };
                    if !names.contains(&want) {
                        return Err(self.err(
                            &format!("Egress {}", e.id),
                            &format!("spec.sources[{i}].name"),
                            format!("no Workload {want} in this file"),
                        ));
                    }
                }
            }
        }
        self.finish_unlinked()
    }

    /// The checks across objects that hold in Kubernetes mode too: named gateways exist,
    /// pods fit their network.
    fn finish_unlinked(self) -> Result<Config, ConfigError> {
        for e in &self.cfg.egresses {
            // A named gateway must exist; `via: gateway` without a name needs a global one.
            if e.spec.route() == Via::Gateway {
                let label = format!("Egress {}", e.id);
                match &e.spec.gateway {
                    Some(g) if !self.cfg.gateways.iter().any(|x| &x.id.name == g) => {
                        return Err(self.err(
                            &label,
                            "spec.gateway",
                            format!("no EgressGateway {g:?} in this policy"),
                        ))
                    }
                    None if !self.cfg.gateways.iter().any(|x| x.spec.is_global()) => {
                        return Err(self.err(
                            &label,
                            "spec.via",
                            "via: gateway without gateway: NAME needs a global EgressGateway (spec.global), and there is none",
                        ))
                    }
                    _ => {}
                }
            }
        }
        self.check_pods()?;
        Ok(self.cfg)
    }

    /// Workloads with `network: pod` need a pod network with room for all of them.
    fn check_pods(&self) -> Result<(), ConfigError> {
        let pods: Vec<&Workload> = self
            .cfg
            .workloads
            .iter()
            .filter(|w| w.network == Network::Pod)
            .collect();
        let mesh = format!("MeshConfig {}", self.mesh_seen.as_deref().unwrap_or(""));
        let mesh = mesh.trim_end();
        let Some(net) = &self.cfg.mesh.pod_network else {
            return match pods.first() {
                Some(w) => Err(self.err(
                    &format!("Workload {}", w.id),
                    "spec.network",
                    "pod needs spec.podNetwork (ipv4 and/or ipv6) in the MeshConfig",
                )),
                None => Ok(()),
            };
        };
        let field = "spec.podNetwork";
        if net.ipv4.is_none() && net.ipv6.is_none() {
            return Err(self.err(mesh, field, "give ipv4 and/or ipv6"));
        }
        for (f, cidr, v4) in [("ipv4", net.ipv4, true), ("ipv6", net.ipv6, false)] {
            let Some(c) = cidr else { continue };
            let bits = if v4 { 32 } else { 128 };
            if c.addr.is_ipv4() != v4 {
                return Err(self.err(
                    mesh,
                    &format!("{field}.{f}"),
                    format!("{c} is not an {f} prefix"),
                ));
            }
            let room = 1u128
                .checked_shl((bits - c.len as u32).min(127))
                .unwrap_or(u128::MAX);
            if room < pods.len() as u128 + 3 {
                return Err(self.err(
                    mesh,
                    &format!("{field}.{f}"),
                    format!("{c} has no room for {} pod addresses", pods.len()),
                ));
            }
        }
        let p = &net.netns_prefix;
        if p.len() > 32
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err(
                mesh,
                &format!("{field}.netnsPrefix"),
                "at most 32 letters, digits, '-' or '_'",
            ));
        }
        Ok(())
    }
}

impl Egress {
    /// The workloads this policy applies to.
    pub fn sources<'a>(
        &'a self,
        workloads: &'a [Workload],
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        workloads.iter().filter(move |w| {
            self.spec.sources.iter().any(|s| {
                let ns = s.namespace.as_deref().unwrap_or(&self.id.namespace);
                if w.id.namespace != ns {
                    return false;
                }
                match (&s.name, &s.pod_selector) {
                    (Some(n), _) => &w.id.name == n,
                    (None, Some(sel)) => sel
                        .match_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v)),
                    (None, None) => false,
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kind: MeshConfig
metadata: {name: egress}
spec:
  traffic: {enableEgress: false, meshCIDRs: [10.0.0.0/8]}
  proxy: {port: 15001}
  failMode: closed
---
kind: Workload
metadata: {name: web, namespace: default, labels: {app: web}}
---
apiVersion: policy.egress.dev/v1alpha1
kind: Egress
metadata: {name: allow-github, namespace: default}
spec:
  sources: [{kind: Workload, name: web, namespace: default}]
  hosts: [github.com, "*.githubusercontent.com"]
  ipAddresses: [140.82.112.0/20]
  ports: [{number: 443, protocol: https}]
  action: allow
---
"#;

    fn err(text: &str) -> String {
        parse(text, "p.yaml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_contract_example() {
        let c = parse(GOOD, "p.yaml").unwrap();
        assert!(!c.mesh.traffic.enable_egress);
        assert_eq!(c.mesh.traffic.mesh_cidrs[0].to_string(), "10.0.0.0/8");
        assert_eq!(c.workloads.len(), 1);
        let e = &c.egresses[0];
        assert_eq!(e.spec.route(), Via::Proxy);
        assert_eq!(e.spec.ports[0].protocol, Protocol::Https);
        assert_eq!(e.sources(&c.workloads).count(), 1);
    }

    #[test]
    fn defaults_without_meshconfig() {
        let c = parse("kind: Workload\nmetadata: {name: a}\n", "p.yaml").unwrap();
        assert!(c.mesh.traffic.enable_egress);
        assert_eq!(c.mesh.proxy.port, Port(DEFAULT_PROXY_PORT));
        assert_eq!(c.mesh.fail_mode, FailMode::Closed);
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let bad_port = GOOD.replace("number: 443", "number: 0");
        assert_eq!(
            err(&bad_port),
            "p.yaml: Egress default/allow-github: spec.ports[0].number: port 0 is out of range 1-65535"
        );
        let e = err(&GOOD.replace("number: 443", "number: 65536"));
        assert!(
            e.contains("spec.ports[0].number: port 65536 is out of range"),
            "{e}"
        );
        let e = err(&GOOD.replace("140.82.112.0/20", "140.82.112.0/33"));
        assert!(
            e.contains("Egress default/allow-github: spec.ipAddresses[0]: invalid CIDR"),
            "{e}"
        );
        let e = err(&GOOD.replace("140.82.112.0/20", "140.82.112.1/20"));
        assert!(
            e.contains("host bits are set (the network is 140.82.112.0/20)"),
            "{e}"
        );
        let e = err(&GOOD.replace("action: allow", "action: allow\n  colour: blue"));
        assert!(
            e.contains("Egress default/allow-github: spec.colour: unknown field `colour`"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind: Workload", "kind: Pod"));
        assert!(
            e.contains("Pod default/web: kind: unknown kind \"Pod\""),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "name: web, namespace: default}]",
            "name: db, namespace: default}]",
        ));
        assert_eq!(e, "p.yaml: Egress default/allow-github: spec.sources[0].name: no Workload default/db in this file");
        let e = err(&format!(
            "{GOOD}\nkind: Workload\nmetadata: {{name: web}}\n"
        ));
        assert!(
            e.contains("Workload default/web: metadata.name: duplicate Workload default/web"),
            "{e}"
        );
        let e = err("kind: Egress\nmetadata: {name: x\n");
        assert!(e.starts_with("p.yaml: document 1: "), "{e}");
        let e = err(&GOOD.replace("enableEgress: false", "enableEgress: maybe"));
        assert!(
            e.contains("MeshConfig egress: spec.traffic.enableEgress: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn semantic_checks() {
        let e = err(&GOOD.replace("protocol: https", "protocol: udp"));
        assert!(
            e.contains("spec.ports[0].protocol: host rules need TCP"),
            "{e}"
        );
        let e = err(&GOOD.replace("action: allow", "action: allow\n  via: gateway"));
        assert!(
            e.contains("Egress default/allow-github: spec.via: via: gateway without gateway: NAME needs a global EgressGateway"),
            "{e}"
        );
        let e = err(&GOOD.replace("github.com,", "\"git hub.com\","));
        assert!(e.contains("spec.hosts[0]: invalid host"), "{e}");
        let e = err(&GOOD.replace(
            "{number: 443, protocol: https}",
            "{number: 443, endPort: 80}",
        ));
        assert!(
            e.contains("spec.ports[0].endPort: endPort 80 is below number 443"),
            "{e}"
        );
    }

    const GATEWAYS: &str = r#"
kind: Workload
metadata: {name: web}
---
kind: EgressGateway
metadata: {name: global}
spec:
  global: [{address: 127.0.8.1:1080, mode: socks5}]
---
kind: EgressGateway
metadata: {name: squid}
spec:
  endpoints: [{address: 127.0.8.2:3128, mode: http-connect}, {address: "[::1]:8080", mode: http2tunnel}]
---
kind: Egress
metadata: {name: via-squid}
spec: {sources: [{name: web}], ipAddresses: [127.41.0.0/16], gateway: squid}
---
kind: Egress
metadata: {name: via-global}
spec: {sources: [{name: web}], ipAddresses: [127.42.0.0/16], via: gateway}
"#;

    #[test]
    fn gateways_global_and_per_policy() {
        let c = parse(GATEWAYS, "p.yaml").unwrap();
        assert_eq!(c.gateways.len(), 2);
        assert!(c.gateways[0].spec.is_global());
        assert_eq!(c.gateways[1].spec.all()[0].mode, GatewayMode::HttpConnect);
        assert_eq!(c.gateways[1].spec.all()[1].mode, GatewayMode::Http2tunnel);
        assert_eq!(c.egresses[0].spec.route(), Via::Gateway);
        assert_eq!(c.egresses[0].spec.gateway.as_deref(), Some("squid"));
        assert_eq!(c.egresses[1].spec.route(), Via::Gateway);
    }

    #[test]
    fn gateway_errors() {
        let e = err(&GATEWAYS.replace("gateway: squid", "gateway: nope"));
        assert_eq!(
            e,
            "p.yaml: Egress default/via-squid: spec.gateway: no EgressGateway \"nope\" in this policy"
        );
        let e = err(&GATEWAYS.replace("gateway: squid", "gateway: squid, via: direct"));
        assert!(
            e.contains(
                "Egress default/via-squid: spec.gateway: a gateway is named but via is not gateway"
            ),
            "{e}"
        );
        let e = err(&GATEWAYS.replace("gateway: squid", "gateway: squid, action: deny"));
        assert!(
            e.contains("spec.gateway: a deny rule sends nothing anywhere"),
            "{e}"
        );
        let e = err(&GATEWAYS.replace("mode: socks5", "mode: socks4"));
        assert!(
            e.contains("EgressGateway global: spec.global[0].mode: unknown variant `socks4`"),
            "{e}"
        );
        let e = err(&GATEWAYS.replace("endpoints: [", "global: ["));
        assert!(
            e.contains("EgressGateway squid: spec.global: a second global gateway (the first is EgressGateway global)"),
            "{e}"
        );
        let e = err(&GATEWAYS.replace(
            "global: [{address: 127.0.8.1:1080, mode: socks5}]",
            "global: []",
        ));
        assert!(
            e.contains("EgressGateway global: spec: give the gateway's addresses"),
            "{e}"
        );
        let e = err(&GATEWAYS.replace("127.0.8.1:1080", "127.0.8.1"));
        assert!(
            e.contains("EgressGateway global: spec.global[0].address:"),
            "{e}"
        );
        let e = err(&GATEWAYS.replace(
            "ipAddresses: [127.41.0.0/16], gateway: squid",
            "ipAddresses: [127.41.0.0/16], gateway: squid, ports: [{number: 53, protocol: udp}]",
        ));
        assert!(
            e.contains("spec.ports[0].protocol: via: proxy and via: gateway carry TCP only"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<Seconds>().unwrap().0.as_millis(), 250);
        assert_eq!("2m".parse::<Seconds>().unwrap().0.as_secs(), 120);
        for bad in ["", "5", "0s", "1d", "-1s", "s"] {
            assert!(bad.parse::<Seconds>().is_err(), "{bad}");
        }
        let e = err(&GOOD.replace(
            "proxy: {port: 15001}",
            "proxy: {port: 15001, sniffTimeout: 5}",
        ));
        assert!(
            e.contains("MeshConfig egress: spec.proxy.sniffTimeout:"),
            "{e}"
        );
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::".parse().unwrap()));
        let c: Cidr = "127.1.2.3".parse().unwrap();
        assert_eq!(c.len, 32);
        assert!(c.contains("::ffff:127.1.2.3".parse().unwrap()));
        assert!("1.2.3.4/x".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn host_matching() {
        let p = |s: &str| s.parse::<HostPattern>().unwrap();
        assert!(p("github.com").matches("GitHub.com."));
        assert!(!p("github.com").matches("api.github.com"));
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(!p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("aexample.com"));
        assert!(p("**.example.com").matches("a.b.example.com"));
        assert!(p("**.example.com").matches("A.example.COM"));
        assert!(!p("**.example.com").matches("example.com"));
        assert!(!p("**.example.com").matches("badexample.com"));
        assert!(!p("*.example.com").matches(".example.com"));
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            "GitHub.COM.".parse::<HostPattern>().unwrap().0,
            "github.com"
        );
        assert!("**.example.com".parse::<HostPattern>().is_ok());
        assert!("a.*.example.com".parse::<HostPattern>().is_err());
        assert!("*".parse::<HostPattern>().is_err());
        assert!("-a.com".parse::<HostPattern>().is_err());
    }
}
