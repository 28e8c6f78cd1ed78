//! The policy model: what a validated policy holds (MeshConfig, Workload, Egress and
//! EgressGateway objects), as the compiler and the rest of the agent use it. The document
//! shapes are the `Deserialize` impls; [`mod@super::parse`] reads documents into these types and
//! [`super::validate`] checks them.

use std::{collections::BTreeMap, fmt};

use serde::Deserialize;

pub use super::gateway_spec::{GatewayEndpoint, GatewayMode, GatewaySpec, PortRef, ServiceRef};
pub use super::http_route::{HttpRoute, PathMatch};
use super::scalar::{Cidr, HostPattern, Port, Seconds};
pub use super::selector::{LabelSelector, Labels};
pub use super::sockets_spec::{SocketRule, SocketsSpec};

pub const API_VERSION: &str = "policy.egress.dev/v1alpha1";
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// The whole policy of a standalone agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub mesh: MeshSpec,
    pub workloads: Vec<Workload>,
    pub egresses: Vec<Egress>,
    pub gateways: Vec<EgressGateway>,
    /// Namespace labels (`kind: Namespace` objects; watched in Kubernetes mode), for
    /// `namespaceSelector`s.
    pub namespaces: BTreeMap<String, Labels>,
    /// Kubernetes NetworkPolicies (their egress part; see [`super::netpol`]).
    pub network_policies: Vec<NetworkPolicy>,
    /// AdminNetworkPolicies and the BaselineAdminNetworkPolicy.
    pub admin_policies: Vec<AdminPolicy>,
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
    /// Socket kinds that no destination hook judges: refused at `socket()` unless allowed.
    pub sockets: SocketsSpec,
    /// Workloads' DNS through the agent, for name rules on any protocol.
    pub dns: super::names::DnsSpec,
    /// strict | off (default: strict when `dns.enabled`).
    pub host_binding: Option<super::names::HostBinding>,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            traffic: TrafficSpec::default(),
            proxy: ProxySpec::default(),
            fail_mode: FailMode::Closed,
            audit_mode: false,
            pod_network: None,
            sockets: SocketsSpec::default(),
            dns: Default::default(),
            host_binding: None,
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
    /// The ServiceAccount it runs as (a pod's `spec.serviceAccountName`), for sources of
    /// `kind: ServiceAccount`.
    pub service_account: Option<String>,
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
    /// Where host rules apply, a connection that names no host (TLS without SNI, a protocol
    /// other than TLS or HTTP/1.x, HTTP/1.0 without Host) is refused; with this, it is let out
    /// by this rule's `ipAddresses` instead (an allow rule with addresses only).
    #[serde(default)]
    pub allow_without_host: bool,
    /// HTTP routes ([`super::routes`]): with `hosts`, the requests this rule allows or denies.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// `enforce` (the default) or `audit`: what this policy would refuse is reported
    /// (`audit-rule` flows, `egress_audit_total`) and let through; the others keep enforcing.
    #[serde(default)]
    pub mode: Mode,
}

/// `spec.mode` of an Egress.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl EgressSpec {
    /// An allow with hosts on plain tcp/udp ports, no route: a name rule with `spec.dns`.
    pub fn is_name_rule(&self) -> bool {
        !self.hosts.is_empty()
            && self.via.is_none()
            && self.gateway.is_none()
            && self.action == Action::Allow
            && !self.ports.is_empty()
            && self
                .ports
                .iter()
                .all(|p| matches!(p.protocol, Protocol::Tcp | Protocol::Udp))
    }

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

/// A source: one workload by name, every workload of a ServiceAccount (`kind:
/// ServiceAccount`, as OSM and FSM mean it), or workloads by label, in the policy's namespace,
/// the one named, or those a `namespaceSelector` selects.
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
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
}

impl Source {
    pub fn is_service_account(&self) -> bool {
        self.kind.as_deref() == Some("ServiceAccount")
    }

    /// Whether workload `w` is this source of a policy of namespace `policy_ns`.
    pub fn selects(
        &self,
        w: &Workload,
        policy_ns: &str,
        namespaces: &BTreeMap<String, Labels>,
    ) -> bool {
        let in_ns = match &self.namespace_selector {
            Some(sel) => {
                let empty = Labels::new();
                sel.matches(namespaces.get(&w.id.namespace).unwrap_or(&empty))
            }
            None => w.id.namespace == self.namespace.as_deref().unwrap_or(policy_ns),
        };
        in_ns
            && match (&self.name, &self.pod_selector) {
                (Some(n), _) if self.is_service_account() => {
                    w.service_account.as_deref().unwrap_or("default") == n
                }
                (Some(n), _) => &w.id.name == n,
                (None, Some(sel)) => sel.matches(&w.labels),
                // A namespaceSelector alone: every workload of those namespaces.
                (None, None) => self.namespace_selector.is_some(),
            }
    }
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

// ---- NetworkPolicy (see super::netpol) ---------------------------------------------

/// The egress part of a NetworkPolicy, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkPolicy {
    pub id: ObjectRef,
    pub pod_selector: LabelSelector,
    /// None: `Egress` is not among its policy types (it does not isolate for egress).
    pub egress: Option<Vec<Allow>>,
}

/// What one egress rule allows outside the mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct Allow {
    /// None: every destination (`to` empty or missing).
    pub blocks: Option<Vec<Block>>,
    /// None: every port and protocol. (first, last, protocol)
    pub ports: Option<Vec<(u16, u16, u8)>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

/// An AdminNetworkPolicy or the BaselineAdminNetworkPolicy (`policy.networking.k8s.io`),
/// their egress part, validated (see `super::tiers` for how they decide).
#[derive(Clone, Debug, PartialEq)]
pub struct AdminPolicy {
    pub name: String,
    /// The BaselineAdminNetworkPolicy (after NetworkPolicy) rather than an AdminNetworkPolicy.
    pub baseline: bool,
    /// 0-1000, lower first (0 for the baseline).
    pub priority: u32,
    /// Namespaces, and pods in them (None: every pod of those namespaces).
    pub namespaces: LabelSelector,
    pub pods: Option<LabelSelector>,
    /// In order; the first that matches a connection decides.
    pub rules: Vec<AdminRule>,
}

impl AdminPolicy {
    pub fn kind(&self) -> &'static str {
        if self.baseline {
            "BaselineAdminNetworkPolicy"
        } else {
            "AdminNetworkPolicy"
        }
    }

    /// Whether it applies to a workload of namespace `ns` (whose labels are `ns_labels`)
    /// labelled `labels`.
    pub fn selects(&self, ns_labels: &Labels, labels: &Labels) -> bool {
        self.namespaces.matches(ns_labels) && self.pods.as_ref().is_none_or(|p| p.matches(labels))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminRule {
    pub action: AdminAction,
    /// Where it applies (`networks` peers as blocks without exceptions).
    pub to: Allow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAction {
    Allow,
    Deny,
    /// Leave the decision to NetworkPolicy (then the baseline).
    Pass,
}

// ---- EgressGateway ----------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct EgressGateway {
    pub id: ObjectRef,
    pub spec: GatewaySpec,
}

impl Egress {
    /// The workloads this policy applies to.
    pub fn sources<'a>(
        &'a self,
        workloads: &'a [Workload],
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        static NO_NAMESPACES: BTreeMap<String, Labels> = BTreeMap::new();
        self.sources_in(workloads, &NO_NAMESPACES)
    }

    /// The workloads this policy applies to, given the namespaces' labels.
    pub fn sources_in<'a>(
        &'a self,
        workloads: &'a [Workload],
        namespaces: &'a BTreeMap<String, Labels>,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        workloads.iter().filter(move |w| {
            self.spec
                .sources
                .iter()
                .any(|s| s.selects(w, &self.id.namespace, namespaces))
        })
    }
}

/// One object of a policy, validated on its own (not yet against the others).
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyObject {
    Mesh {
        name: String,
        spec: MeshSpec,
    },
    Workload(Workload),
    Egress(Egress),
    Gateway(EgressGateway),
    /// A namespace's labels.
    Namespace {
        name: String,
        labels: Labels,
    },
    NetworkPolicy(NetworkPolicy),
    Admin(AdminPolicy),
}

impl PolicyObject {
    /// How errors name it: `Egress ns/name`, `MeshConfig name`.
    pub fn label(&self) -> String {
        match self {
            PolicyObject::Mesh { name, .. } => format!("MeshConfig {name}"),
            PolicyObject::Workload(w) => format!("Workload {}", w.id),
            PolicyObject::Egress(e) => format!("Egress {}", e.id),
            PolicyObject::Gateway(g) => format!("EgressGateway {}", g.id.name),
            PolicyObject::Namespace { name, .. } => format!("Namespace {name}"),
            PolicyObject::NetworkPolicy(n) => format!("NetworkPolicy {}", n.id),
            PolicyObject::Admin(a) => format!("{} {}", a.kind(), a.name),
        }
    }
}
