//! Compiles a validated [`Config`] into the entries of the kernel's maps.
//!
//! An LPM trie returns only the longest matching prefix, but a deny on a shorter prefix must
//! still win over an allow on a longer one. So each (workload, prefix) entry carries its own
//! rules plus those of every shorter prefix of the same workload that contains it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use egress_common::{
    action, decide::Query, policy_key, policy_scope, proto, Decision, MeshConfig, PolicyValue,
    PortRule, MAX_SEGMENTS,
};

use super::{
    model::{Action, Config, EgressGateway, FailMode, Mode, ObjectRef, Via},
    scalar::{self, Cidr, HostPattern},
    tiers::{Prefixes, Tiers},
};

/// What one Egress object compiled to; `rule_id` is its index + 1. The proxy judges hosts
/// with these.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleInfo {
    /// The object: an Egress, or a NetworkPolicy (see [`RuleInfo::kind`]).
    pub egress: ObjectRef,
    /// "Egress" or "NetworkPolicy".
    pub kind: &'static str,
    pub action: Action,
    pub via: Via,
    pub hosts: Vec<HostPattern>,
    /// Workload ids the rule applies to.
    pub workloads: BTreeSet<u32>,
    /// Empty: every address.
    pub cidrs: Vec<Cidr>,
    /// (first, last, protocol); empty: every port and protocol.
    pub ports: Vec<(u16, u16, u8)>,
    /// Index into [`Compiled::gateways`] of the gateway this rule names (`gateway: NAME`).
    pub gateway: Option<usize>,
    /// `allowWithoutHost`: connections naming no host pass by this rule's addresses.
    pub without_host: bool,
    /// HTTP routes (empty: every request to its hosts).
    pub http: super::routes::Routes,
    /// `spec.mode: audit`: what the rule would refuse is reported, not refused.
    pub audit: bool,
}

impl RuleInfo {
    /// How logs, `check` and `list` name its object: `ns/name` for an Egress,
    /// `NetworkPolicy ns/name`, `AdminNetworkPolicy name` for the others.
    pub fn name(&self) -> String {
        match self.kind {
            "Egress" => self.egress.to_string(),
            k if self.egress.namespace.is_empty() => format!("{k} {}", self.egress.name),
            k => format!("{k} {}", self.egress),
        }
    }

    /// Whether the rule applies to a TCP connection of `workload` to `ip:port`.
    pub fn applies_tcp(&self, workload: u32, ip: IpAddr, port: u16) -> bool {
        self.workloads.contains(&workload)
            && (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip)))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&(lo, hi, p)| p != proto::UDP && (lo..=hi).contains(&port)))
    }
}

/// One LPM entry of a workload: a CIDR (address bytes, length) and its flattened rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<const N: usize> {
    pub workload: u32,
    pub cidr_len: u8,
    pub addr: [u8; N],
    pub value: PolicyValue,
}

impl<const N: usize> Entry<N> {
    /// The LPM key's prefix length: 32 bits of workload scope, then the CIDR.
    pub fn key_len(&self) -> u32 {
        32 + self.cidr_len as u32
    }

    /// The LPM key data for policy set `set` (`M` = 4 + N).
    pub fn key<const M: usize>(&self, set: u32) -> [u8; M] {
        policy_key::<M, N>(policy_scope(self.workload, set), &self.addr)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// The mesh settings; the agent adds its cgroup, the root level and the proxy address.
    pub config: MeshConfig,
    /// Workload ids, 1-based, in (namespace, name) order.
    pub workloads: Vec<(ObjectRef, u32)>,
    /// The large parts are shared: a change of `config` alone (`egress enable|disable`)
    /// makes a new `Compiled` without copying them.
    pub v4: Arc<Vec<Entry<4>>>,
    pub v6: Arc<Vec<Entry<16>>>,
    pub mesh: Vec<Cidr>,
    pub rules: Arc<Vec<RuleInfo>>,
    /// Indices into `rules` of the rules that name hosts (what the proxy checks on every
    /// redirected connection; usually few among many address rules).
    pub host_rules: Vec<usize>,
    /// Indices into `rules` of the name rules (`spec.dns` on: hosts on plain tcp/udp ports),
    /// which the kernel enforces on the addresses the names resolved to (`crate::dns`).
    pub name_rules: Vec<usize>,
    /// `spec.dns` and the effective `spec.hostBinding`.
    pub dns: super::DnsSpec,
    pub host_binding: super::HostBinding,
    /// The EgressGateways, in file order.
    pub gateways: Vec<EgressGateway>,
    /// Index into `gateways` of the global one.
    pub global_gateway: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("workload {workload}: the rules for {prefix} (from {egresses}) split its ports into {count} ranges, more than the {max} one destination can hold; merge port ranges or split the CIDR")]
    TooManyRules {
        workload: ObjectRef,
        prefix: Cidr,
        count: usize,
        max: usize,
        egresses: String,
    },
    #[error("{count} workloads is more than the {max} this agent supports")]
    TooManyWorkloads { count: usize, max: u32 },
}

pub fn compile(cfg: &Config) -> Result<Compiled, CompileError> {
    compile_stable(cfg, &BTreeMap::new())
}

/// [`compile`], keeping the workload ids of `previous` (a workload's id scopes its policy
/// entries and its counters, so it must not move to another workload across changes). New
/// workloads get the smallest free ids.
pub fn compile_stable(
    cfg: &Config,
    previous: &BTreeMap<ObjectRef, u32>,
) -> Result<Compiled, CompileError> {
    let mut workloads: Vec<_> = cfg.workloads.iter().map(|w| w.id.clone()).collect();
    workloads.sort();
    let max = egress_common::capacity::MAX_WORKLOADS - 1;
    if workloads.len() > max as usize {
        return Err(CompileError::TooManyWorkloads {
            count: workloads.len(),
            max,
        });
    }
    let mut ids: BTreeMap<&ObjectRef, u32> = workloads
        .iter()
        .filter_map(|w| Some((w, *previous.get(w)?)))
        .filter(|(_, id)| (1..=max).contains(id))
        .collect();
    let mut used: BTreeSet<u32> = ids.values().copied().collect();
    let mut next = 1u32;
    for w in &workloads {
        if ids.contains_key(w) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        ids.insert(w, next);
    }

    let mut v4: Prefixes<4> = BTreeMap::new();
    let mut v6: Prefixes<16> = BTreeMap::new();
    let mut rules = Vec::with_capacity(cfg.egresses.len());
    for (idx, e) in cfg.egresses.iter().enumerate() {
        let rule_id = idx as u32 + 1;
        let s = &e.spec;
        rules.push(RuleInfo {
            egress: e.id.clone(),
            kind: "Egress",
            action: s.action,
            via: s.route(),
            hosts: s.hosts.clone(),
            workloads: e
                .sources_in(&cfg.workloads, &cfg.namespaces)
                .map(|w| ids[&w.id])
                .collect(),
            cidrs: s.ip_addresses.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| {
                    let pr = if p.protocol.is_tcp() {
                        proto::TCP
                    } else {
                        proto::UDP
                    };
                    (p.number.0, p.end_port.unwrap_or(p.number).0, pr)
                })
                .collect(),
            gateway: s
                .gateway
                .as_ref()
                .and_then(|g| cfg.gateways.iter().position(|x| &x.id.name == g)),
            without_host: s.allow_without_host,
            // Validated before (routes::check): compiles.
            http: super::routes::Routes::compile(&s.http).unwrap_or_default(),
            audit: s.mode == Mode::Audit,
        });
        if cfg.mesh.dns.enabled && s.is_name_rule() {
            continue; // only on the addresses its names resolve to (crate::dns)
        }
        // Host rules are judged by the proxy, whatever their action; the kernel only routes.
        let act = match (s.route(), s.action) {
            (Via::Proxy | Via::Gateway, _) => action::PROXY,
            (Via::Direct, Action::Deny) => action::DENY,
            (Via::Direct, Action::Allow) => action::ALLOW,
        };
        let port_rules: Vec<PortRule> = if s.ports.is_empty() {
            let p = if act == action::PROXY {
                proto::TCP
            } else {
                proto::ANY
            };
            vec![port_rule(0, 65535, p, act, rule_id)]
        } else {
            s.ports
                .iter()
                .map(|p| {
                    let pr = if p.protocol.is_tcp() {
                        proto::TCP
                    } else {
                        proto::UDP
                    };
                    port_rule(
                        p.number.0,
                        p.end_port.unwrap_or(p.number).0,
                        pr,
                        act,
                        rule_id,
                    )
                })
                .collect()
        };
        let cidrs: Vec<Cidr> = if s.ip_addresses.is_empty() {
            vec![Cidr::ALL_V4, Cidr::ALL_V6]
        } else {
            s.ip_addresses.clone()
        };
        for w in e.sources_in(&cfg.workloads, &cfg.namespaces) {
            let wid = ids[&w.id];
            for c in &cidrs {
                match c.addr {
                    IpAddr::V4(a) => v4
                        .entry((wid, c.len, scalar::mask(&a.octets(), c.len)))
                        .or_default()
                        .extend(&port_rules),
                    IpAddr::V6(a) => v6
                        .entry((wid, c.len, scalar::mask(&a.octets(), c.len)))
                        .or_default()
                        .extend(&port_rules),
                }
            }
        }
    }

    let first = rules.len() as u32 + 1;
    let (tiers, objects) = Tiers::new(cfg, &ids, first, &mut v4, &mut v6);
    rules.extend(objects.into_iter().map(|o| RuleInfo {
        egress: o.id,
        kind: o.kind,
        action: Action::Deny,
        via: Via::Direct,
        hosts: Vec::new(),
        workloads: o.workloads,
        cidrs: o.cidrs,
        ports: o.ports,
        gateway: None,
        without_host: false,
        http: Default::default(),
        audit: false,
    }));
    let names = |wid: u32| {
        ids.iter()
            .find(|(_, id)| **id == wid)
            .map(|(w, _)| (*w).clone())
            .unwrap_or_default()
    };
    let v4 = flatten(&v4, &rules, names, |w, l, a| tiers.denials(w, l, a))?
        .into_iter()
        .map(|(workload, cidr_len, addr, value)| Entry {
            workload,
            cidr_len,
            addr,
            value,
        })
        .collect();
    let v6 = flatten(&v6, &rules, names, |w, l, a| tiers.denials(w, l, a))?
        .into_iter()
        .map(|(workload, cidr_len, addr, value)| Entry {
            workload,
            cidr_len,
            addr,
            value,
        })
        .collect();

    let m = &cfg.mesh;
    let name_rules: Vec<usize> = cfg
        .egresses
        .iter()
        .enumerate()
        .filter(|(_, e)| m.dns.enabled && e.spec.is_name_rule())
        .map(|(i, _)| i)
        .collect();
    let config = MeshConfig {
        enable_egress: m.traffic.enable_egress as u32,
        fail_open: (m.fail_mode == FailMode::Open) as u32,
        audit_mode: m.audit_mode as u32,
        proxy_port: m.proxy.port.0,
        dns_port: if m.dns.enabled { m.dns.port.0 } else { 0 },
        sockets_allowed: m.sockets.allowed_bits(),
        ..Default::default()
    };
    Ok(Compiled {
        config,
        workloads: workloads.iter().map(|w| (w.clone(), ids[w])).collect(),
        v4: Arc::new(v4),
        v6: Arc::new(v6),
        mesh: m.traffic.mesh_cidrs.clone(),
        host_rules: (0..rules.len())
            .filter(|&i| !rules[i].hosts.is_empty() && !name_rules.contains(&i))
            .collect(),
        name_rules,
        dns: m.dns.clone(),
        host_binding: super::HostBinding::effective(m.host_binding, &m.dns),
        rules: Arc::new(rules),
        gateways: cfg.gateways.clone(),
        global_gateway: cfg.gateways.iter().position(|g| g.spec.is_global()),
    })
}

type Flat<const N: usize> = Vec<(u32, u8, [u8; N], PolicyValue)>;

/// `extra`: rules of one exact prefix that shorter prefixes do not pass on (NetworkPolicy's
/// denials).
fn flatten<const N: usize>(
    prefixes: &Prefixes<N>,
    rules: &[RuleInfo],
    names: impl Fn(u32) -> ObjectRef,
    extra: impl Fn(u32, u8, &[u8; N]) -> Vec<PortRule>,
) -> Result<Flat<N>, CompileError> {
    let mut out = Vec::with_capacity(prefixes.len());
    for &(wid, len, addr) in prefixes.keys() {
        let mut all: Vec<PortRule> = Vec::new();
        for l in 0..=len {
            if let Some(rs) = prefixes.get(&(wid, l, scalar::mask(&addr, l))) {
                for r in rs {
                    if !all.contains(r) {
                        all.push(*r);
                    }
                }
            }
        }
        all.extend(extra(wid, len, &addr));
        let value = segments(&all, |id| rules[id as usize - 1].audit);
        if let Err(count) = value {
            let egresses: BTreeSet<String> = all
                .iter()
                .map(|r| rules[r.rule_id as usize - 1].name())
                .collect();
            return Err(CompileError::TooManyRules {
                workload: names(wid),
                prefix: Cidr {
                    addr: if N == 4 {
                        IpAddr::from(<[u8; 4]>::try_from(&addr[..4]).unwrap_or_default())
                    } else {
                        IpAddr::from(<[u8; 16]>::try_from(&addr[..]).unwrap_or_default())
                    },
                    len,
                },
                count,
                max: MAX_SEGMENTS,
                egresses: egresses.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        out.push((wid, len, addr, value.unwrap_or_default()));
    }
    Ok(out)
}

/// Which action wins where several rules cover a port: deny, then proxy, then allow; among
/// equals the later rule (a stable choice, so that `check` and the kernel agree).
impl Compiled {
    /// The workload with id `id`.
    pub fn workload(&self, id: u32) -> Option<&ObjectRef> {
        self.workloads
            .iter()
            .find(|(_, i)| *i == id)
            .map(|(w, _)| w)
    }

    /// Workload ids by name, to keep them stable in the next compile.
    pub fn ids(&self) -> BTreeMap<ObjectRef, u32> {
        self.workloads.iter().cloned().collect()
    }

    pub fn workload_id(&self, w: &ObjectRef) -> Option<u32> {
        self.workloads
            .iter()
            .find(|(r, _)| r == w)
            .map(|(_, id)| *id)
    }

    /// The longest-prefix match the kernel would find, computed in userspace.
    pub fn lookup(&self, workload: u32, ip: IpAddr) -> Option<&PolicyValue> {
        match scalar::normalize(ip) {
            IpAddr::V4(a) => longest(&self.v4, workload, &a.octets()),
            IpAddr::V6(a) => longest(&self.v6, workload, &a.octets()),
        }
    }

    /// What the kernel decides for a workload's connection (`proxy_ip` is the proxy address).
    pub fn decide(&self, workload: u32, ip: IpAddr, port: u16, protocol: u8) -> Decision {
        self.decide_named(workload, ip, port, protocol, None)
    }

    /// [`Compiled::decide`] with the workload's learned name entry for `ip` (`crate::dns`),
    /// as the kernel decides with `EGRESS_NAMES`.
    pub fn decide_named(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        protocol: u8,
        named: Option<&PolicyValue>,
    ) -> Decision {
        let ip = scalar::normalize(ip);
        let q = Query {
            proto: protocol,
            port,
            in_mesh: self.mesh.iter().any(|c| c.contains(ip)),
            to_proxy: port == self.config.proxy_port && (ip.is_loopback() || ip.is_unspecified()),
        };
        egress_common::fqdn::decide_named(&self.config, &q, self.lookup(workload, ip), named)
    }

    /// The gateway a connection the proxy relays leaves through, given the rule that let it
    /// out (0: none, the mesh default): the gateway the rule names, else the global one for
    /// every relayed connection; None: direct.
    pub fn gateway_for(&self, rule_id: u32) -> Option<&EgressGateway> {
        let named = self.rule(rule_id).and_then(|r| r.gateway);
        named
            .or(self.global_gateway)
            .and_then(|i| self.gateways.get(i))
    }

    pub fn rule(&self, rule_id: u32) -> Option<&RuleInfo> {
        rule_id
            .checked_sub(1)
            .and_then(|i| self.rules.get(i as usize))
    }

    /// Whether the proxy must learn the host (SNI or Host header) before it can decide a
    /// redirected TCP connection: some rule for this destination names hosts.
    pub fn needs_host(&self, workload: u32, ip: IpAddr, port: u16) -> bool {
        let ip = scalar::normalize(ip);
        self.host_rules
            .iter()
            .any(|&i| self.rules[i].applies_tcp(workload, ip, port))
    }
}

/// The longest-prefix match among `entries`, which the compiler emits sorted by (workload,
/// prefix length, address): within the workload's entries, one binary search per prefix
/// length that is present, longest first (a workload usually has a few lengths, not 33).
fn longest<'a, const N: usize>(
    entries: &'a [Entry<N>],
    workload: u32,
    addr: &[u8; N],
) -> Option<&'a PolicyValue> {
    let start = entries.partition_point(|e| e.workload < workload);
    let end = start + entries[start..].partition_point(|e| e.workload == workload);
    let mut mine = &entries[start..end];
    while let Some(last) = mine.last() {
        let len = last.cidr_len;
        let from = mine.partition_point(|e| e.cidr_len < len);
        let want = scalar::mask(addr, len);
        if let Ok(i) = mine[from..].binary_search_by(|e| e.addr.cmp(&want)) {
            return Some(&mine[from + i].value);
        }
        mine = &mine[..from];
    }
    None
}

mod port_segments;

use port_segments::port_rule;
pub(crate) use port_segments::segments;

#[cfg(test)]
mod tests;
