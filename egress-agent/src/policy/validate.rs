//! The checks a typed object must pass: its own ([`check_egress`], [`check_gateway`]), and
//! those across the objects of a policy ([`Objects`]: one of a kind and name, one
//! MeshConfig, one global gateway; then sources and named gateways exist, pods fit their
//! network).

use std::collections::BTreeSet;

use super::{
    error::ConfigError,
    model::{
        Action, Config, Egress, EgressGateway, EgressSpec, GatewaySpec, Network, ObjectRef,
        PolicyObject, Via, Workload,
    },
};

/// Kubernetes object names: DNS-1123 labels (lower-case alphanumerics and '-', 1-63).
pub fn check_name(s: &str) -> Result<(), String> {
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

/// An Egress spec on its own: sources, ports, and how via, gateway and action combine.
pub fn check_egress(file: &str, label: &str, s: &EgressSpec) -> Result<(), ConfigError> {
    let err = |field: &str, reason: &str| ConfigError::new(file, label, field, reason);
    if s.sources.is_empty() {
        return Err(err("spec.sources", "at least one source is required"));
    }
    for (i, src) in s.sources.iter().enumerate() {
        let f = format!("spec.sources[{i}]");
        if src.namespace.is_some() && src.namespace_selector.is_some() {
            return Err(err(
                &format!("{f}.namespaceSelector"),
                "give either namespace or namespaceSelector, not both",
            ));
        }
        for (name, sel) in [
            ("podSelector", &src.pod_selector),
            ("namespaceSelector", &src.namespace_selector),
        ] {
            if let Some(Err((field, reason))) = sel.as_ref().map(|s| s.check()) {
                return Err(err(&format!("{f}.{name}.{field}"), &reason));
            }
        }
        if src.is_service_account() && src.pod_selector.is_some() {
            return Err(err(
                &format!("{f}.podSelector"),
                "a ServiceAccount source is named, not selected: remove podSelector",
            ));
        }
        match (&src.name, &src.pod_selector) {
            (Some(_), Some(_)) => return Err(err(&f, "give either name or podSelector, not both")),
            (None, None) if src.namespace_selector.is_some() => {}
            (None, None) => {
                return Err(err(
                    &f,
                    "name, podSelector or namespaceSelector is required",
                ))
            }
            (Some(n), None) => {
                if let Some(k) = &src.kind {
                    if k != "Workload" && k != "ServiceAccount" && k != "Pod" {
                        return Err(err(
                            &format!("{f}.kind"),
                            &format!(
                                "unknown source kind {k:?} (expected Workload or ServiceAccount)"
                            ),
                        ));
                    }
                }
                check_name(n).map_err(|r| err(&format!("{f}.name"), &r))?;
            }
            (None, Some(_)) => {}
        }
        if let Some(ns) = &src.namespace {
            check_name(ns).map_err(|r| err(&format!("{f}.namespace"), &r))?;
        }
    }
    for (i, p) in s.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        if let Some(end) = p.end_port {
            if end < p.number {
                return Err(err(
                    &format!("{f}.endPort"),
                    &format!("endPort {} is below number {}", end.0, p.number.0),
                ));
            }
        }
        if !s.hosts.is_empty() && !p.protocol.is_tcp() && !s.is_name_rule() {
            return Err(err(
                &format!("{f}.protocol"),
                "host rules need TCP (tcp, http or https); udp cannot carry a host name",
            ));
        }
        if (s.via == Some(Via::Proxy) || s.route() == Via::Gateway) && !p.protocol.is_tcp() {
            return Err(err(
                &format!("{f}.protocol"),
                "via: proxy and via: gateway carry TCP only",
            ));
        }
    }
    if s.action == Action::Deny && matches!(s.via, Some(Via::Proxy | Via::Gateway)) {
        return Err(err(
            "spec.via",
            "a deny rule sends nothing anywhere; remove via",
        ));
    }
    if s.gateway.is_some() && s.via.is_some_and(|v| v != Via::Gateway) {
        return Err(err(
            "spec.gateway",
            "a gateway is named but via is not gateway; remove one of them",
        ));
    }
    super::routes::check(s).map_err(|(f, why)| err(&f, &why))?;
    if s.allow_without_host && (s.ip_addresses.is_empty() || s.action == Action::Deny) {
        return Err(err(
            "spec.allowWithoutHost",
            "lets connections that name no host out by address: give ipAddresses, on an allow rule",
        ));
    }
    if let Some(g) = &s.gateway {
        check_name(g).map_err(|r| err("spec.gateway", &r))?;
        if s.action == Action::Deny {
            return Err(err(
                "spec.gateway",
                "a deny rule sends nothing anywhere; remove gateway",
            ));
        }
    }
    Ok(())
}

/// An EgressGateway spec on its own: global or per-policy endpoints, one of them; each an
/// address or a Service.
pub fn check_gateway(file: &str, label: &str, spec: &GatewaySpec) -> Result<(), ConfigError> {
    let err = |field: &str, reason: &str| ConfigError::new(file, label, field, reason);
    match (spec.global.is_empty(), spec.endpoints.is_empty()) {
        (true, true) => return Err(err(
            "spec",
            "give the gateway's addresses in global (every proxied connection) or endpoints (policies that name it)",
        )),
        (false, false) => return Err(err(
            "spec.endpoints",
            "a gateway is either global or per policy: give global or endpoints, not both",
        )),
        _ => {}
    }
    for (i, ep) in spec.all().iter().enumerate() {
        let f = format!("spec.{}[{i}]", spec.field());
        match (&ep.address, &ep.service) {
            (Some(_), Some(_)) => {
                return Err(err(
                    &format!("{f}.service"),
                    "give either address or service, not both",
                ))
            }
            (None, None) => {
                return Err(err(
                    &f,
                    "give the gateway's address (host:port) or its service (name, namespace)",
                ))
            }
            (None, Some(svc)) => {
                check_name(&svc.name).map_err(|r| err(&format!("{f}.service.name"), &r))?;
                check_name(&svc.namespace)
                    .map_err(|r| err(&format!("{f}.service.namespace"), &r))?;
            }
            (Some(_), None) => {}
        }
    }
    Ok(())
}

/// The objects of one policy, gathered one by one (each checked against those before it),
/// then checked as a whole.
pub struct Objects {
    file: String,
    cfg: Config,
    /// The name of the MeshConfig, once one was added.
    mesh_seen: Option<String>,
    seen: BTreeSet<(&'static str, ObjectRef)>,
}

impl Objects {
    /// No objects yet; errors name `file`.
    pub fn new(file: &str) -> Objects {
        Objects {
            file: file.to_string(),
            cfg: Config::default(),
            mesh_seen: None,
            seen: BTreeSet::new(),
        }
    }

    fn err(&self, object: &str, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, object, field, reason)
    }

    /// Adds an object checked on its own: a second MeshConfig, a second object of the same
    /// kind and name, or a second global gateway is an error.
    pub fn add(&mut self, object: PolicyObject) -> Result<(), ConfigError> {
        let label = object.label();
        match object {
            PolicyObject::Mesh { name, spec } => {
                if let Some(prev) = &self.mesh_seen {
                    return Err(self.err(
                        &label,
                        "",
                        format!("a second MeshConfig (the first is {prev:?})"),
                    ));
                }
                self.mesh_seen = Some(name);
                self.cfg.mesh = spec;
            }
            PolicyObject::Workload(w) => {
                self.unique(&label, "Workload", &w.id)?;
                self.cfg.workloads.push(w);
            }
            PolicyObject::Egress(e) => {
                self.unique(&label, "Egress", &e.id)?;
                self.cfg.egresses.push(e);
            }
            PolicyObject::Gateway(g) => {
                self.unique(&label, "EgressGateway", &g.id)?;
                if g.spec.is_global() {
                    if let Some(first) = self.cfg.gateways.iter().find(|g| g.spec.is_global()) {
                        return Err(self.err(
                            &label,
                            "spec.global",
                            format!(
                                "a second global gateway (the first is EgressGateway {})",
                                first.id.name
                            ),
                        ));
                    }
                }
                self.cfg.gateways.push(g);
            }
            PolicyObject::Namespace { name, labels } => {
                let id = ObjectRef {
                    namespace: String::new(),
                    name: name.clone(),
                };
                self.unique(&label, "Namespace", &id)?;
                self.cfg.namespaces.insert(name, labels);
            }
            PolicyObject::NetworkPolicy(n) => {
                self.unique(&label, "NetworkPolicy", &n.id)?;
                self.cfg.network_policies.push(n);
            }
            PolicyObject::Admin(a) => {
                let id = ObjectRef {
                    namespace: String::new(),
                    name: a.name.clone(),
                };
                self.unique(&label, a.kind(), &id)?;
                self.cfg.admin_policies.push(a);
            }
        }
        Ok(())
    }

    fn unique(
        &mut self,
        label: &str,
        kind: &'static str,
        id: &ObjectRef,
    ) -> Result<(), ConfigError> {
        if !self.seen.insert((kind, id.clone())) {
            return Err(self.err(label, "metadata.name", format!("duplicate {kind} {id}")));
        }
        Ok(())
    }

    /// A whole policy file: every source names a Workload of the file, and the checks of
    /// [`Objects::finish_unlinked`].
    pub fn finish(self) -> Result<Config, ConfigError> {
        // A Service is found in a cluster; a standalone agent has none.
        for g in &self.cfg.gateways {
            if let Some(i) = g.spec.all().iter().position(|e| e.service.is_some()) {
                return Err(self.err(
                    &format!("EgressGateway {}", g.id.name),
                    &format!("spec.{}[{i}].service", g.spec.field()),
                    "a gateway named by Service needs Kubernetes mode (run --kubernetes, validate --kubernetes): a standalone agent has no cluster to find its endpoints in; give its address instead",
                ));
            }
        }
        // Every source must name an existing workload (selectors may match none: that is a
        // policy that applies to nobody yet, as in Kubernetes).
        let names: BTreeSet<&ObjectRef> = self.cfg.workloads.iter().map(|w| &w.id).collect();
        for e in &self.cfg.egresses {
            for (i, src) in e.spec.sources.iter().enumerate() {
                // A ServiceAccount may have no workload yet, like a selector.
                if let Some(n) = src.name.as_ref().filter(|_| !src.is_service_account()) {
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
    pub fn finish_unlinked(self) -> Result<Config, ConfigError> {
        let m = &self.cfg.mesh;
        if m.host_binding == Some(super::names::HostBinding::Strict) && !m.dns.enabled {
            let mesh = format!("MeshConfig {}", self.mesh_seen.as_deref().unwrap_or(""));
            return Err(self.err(
                mesh.trim_end(),
                "spec.hostBinding",
                "strict needs spec.dns.enabled: true (names are bound to the addresses DNS gave them)",
            ));
        }
        for e in &self.cfg.egresses {
            self.check_gateway_named(e)?;
            let udp = e.spec.ports.iter().position(|p| !p.protocol.is_tcp());
            if let (true, false, Some(i)) = (e.spec.is_name_rule(), m.dns.enabled, udp) {
                return Err(self.err(
                    &format!("Egress {}", e.id),
                    &format!("spec.ports[{i}].protocol"),
                    "host rules need TCP (tcp, http or https); names on udp need the MeshConfig's spec.dns.enabled: true (the agent learns their addresses from DNS)",
                ));
            }
        }
        self.check_pods()?;
        Ok(self.cfg)
    }

    /// A named gateway must exist; `via: gateway` without a name needs a global one.
    fn check_gateway_named(&self, e: &Egress) -> Result<(), ConfigError> {
        if e.spec.route() != Via::Gateway {
            return Ok(());
        }
        let label = format!("Egress {}", e.id);
        let gateways: &[EgressGateway] = &self.cfg.gateways;
        match &e.spec.gateway {
            Some(g) if !gateways.iter().any(|x| &x.id.name == g) => Err(self.err(
                &label,
                "spec.gateway",
                format!("no EgressGateway {g:?} in this policy"),
            )),
            None if !gateways.iter().any(|x| x.spec.is_global()) => Err(self.err(
                &label,
                "spec.via",
                "via: gateway without gateway: NAME needs a global EgressGateway (spec.global), and there is none",
            )),
            _ => Ok(()),
        }
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
