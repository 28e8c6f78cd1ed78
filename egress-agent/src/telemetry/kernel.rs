//! The kernel's side of `/metrics`: the per-CPU verdict and tc counters, map fill and policy
//! generation, read into a [`KernelSnapshot`] by whoever owns the datapath ([`KernelSource`])
//! and encoded at scrape time, with the proxy's refusals for a host ([`HostDenials`]).

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use egress_common::{proto, Outcome, EVENT_LOST};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::labels::label_value;
use crate::policy::{Compiled, ObjectRef};

/// The kernel's verdict (`verdict` of `egress_connections`): [`Outcome::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict(pub Outcome);

impl Verdict {
    fn as_str(&self) -> &'static str {
        self.0.name()
    }
}

impl Hash for Verdict {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.0 as u8).hash(state)
    }
}

label_value!(Verdict);

/// `protocol` of the kernel's series.
#[allow(non_camel_case_types)] // the variant names are the label values
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Protocol {
    tcp,
    udp,
    other,
}

/// Why a connection was refused (`reason` of `egress_denied`): in the kernel, or by the
/// proxy for its host.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DenyReason {
    Rule,
    Default,
    ProxyPort,
    Error,
    Host,
    Unenrolled,
}

impl DenyReason {
    fn of(o: Outcome) -> Option<Self> {
        match o {
            Outcome::DenyRule => Some(Self::Rule),
            Outcome::DenyDefault => Some(Self::Default),
            Outcome::DenyProxyPort => Some(Self::ProxyPort),
            Outcome::DenyError => Some(Self::Error),
            _ => None,
        }
    }

    fn as_str(&self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::Default => "default",
            Self::ProxyPort => "proxy-port",
            Self::Error => "error",
            Self::Host => "host",
            Self::Unenrolled => "unenrolled",
        }
    }
}

label_value!(DenyReason);

/// `egress_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub workload: String,
    pub namespace: String,
    pub verdict: Verdict,
    pub protocol: Protocol,
}

/// `egress_denied`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub workload: String,
    pub namespace: String,
    pub reason: DenyReason,
    pub protocol: Protocol,
}

/// `egress_tc_dropped_packets`: the reason is [`egress_common::tc::tc_drop_reason`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcDropLabels {
    pub workload: String,
    pub namespace: String,
    pub reason: &'static str,
}

/// `egress_packet_dropped`: the reason is [`egress_common::skb::skb_drop_reason`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketDropLabels {
    pub workload: String,
    pub namespace: String,
    pub reason: &'static str,
}

/// `egress_tc_packets` and `egress_tc_bytes`: the verdict is
/// [`egress_common::tc::tc_slot_name`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcLabels {
    pub workload: String,
    pub namespace: String,
    pub verdict: &'static str,
}

/// `egress_sockets_refused`: the kind is [`egress_common::sockets::kind_name`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub workload: String,
    pub namespace: String,
    pub kind: &'static str,
}

/// `egress_map_entries` and `egress_map_capacity`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// `egress_build_info` of the agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub layout: u32,
}

/// Refusals the proxy made for a host, by (workload, namespace): `egress_denied` reports them
/// beside the kernel's, with reason `host`. The proxy counts into a clone.
#[derive(Clone, Debug, Default)]
pub struct HostDenials(Arc<Mutex<BTreeMap<(String, String), u64>>>);

impl HostDenials {
    /// One refusal for `workload` (`namespace/name`).
    pub fn add(&self, workload: &str) {
        let (ns, name) = workload.split_once('/').unwrap_or(("", workload));
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), ns.to_string()))
            .or_default() += 1;
    }

    /// The refusals counted for `workload` (`namespace/name`).
    pub fn get(&self, workload: &str) -> u64 {
        let (ns, name) = workload.split_once('/').unwrap_or(("", workload));
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (name.to_string(), ns.to_string());
        counts.get(&key).copied().unwrap_or(0)
    }

    fn samples(&self) -> Vec<(DeniedLabels, u64)> {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .iter()
            .map(|((name, ns), v)| {
                let l = DeniedLabels {
                    workload: name.clone(),
                    namespace: ns.clone(),
                    reason: DenyReason::Host,
                    protocol: Protocol::tcp,
                };
                (l, *v)
            })
            .collect()
    }
}

/// What the kernel counted, read at one moment.
#[derive(Clone)]
pub struct KernelSnapshot {
    /// The policy in force (its workloads label the counters).
    pub policy: Arc<Compiled>,
    /// Workloads with their own network namespace (their tc drop series always exist).
    pub pods: Vec<ObjectRef>,
    /// Verdict counters by (workload id, outcome or `EVENT_LOST`, protocol).
    pub sums: HashMap<(u32, u8, u8), u64>,
    /// tc backstop (packets, bytes) by (workload id, slot).
    pub tc: HashMap<(u32, u8), (u64, u64)>,
    /// `socket()` calls refused, by (workload id, socket kind).
    pub sockets: HashMap<(u32, u32), u64>,
    /// Packets the per-packet program dropped, by (workload id, drop slot).
    pub packet_drops: HashMap<(u32, u8), u64>,
    /// (map, entries, capacity).
    pub entries: Vec<(&'static str, usize, u32)>,
    pub generation: u64,
    /// Kubernetes mode (cgroups below the root that are no workload are refused): the
    /// refusals of such cgroups (pods not enrolled yet), by protocol TCP, UDP, other.
    pub unenrolled: Option<[u64; 3]>,
}

/// Reads the kernel's counters (the control loop, which owns the datapath).
pub trait KernelSource: Send + Sync {
    fn snapshot(&self) -> KernelSnapshot;
}

/// The metrics read from the kernel and the policy at scrape time.
pub(super) struct KernelCollector {
    pub(super) kernel: Arc<dyn KernelSource>,
    pub(super) host_denials: HostDenials,
    pub(super) ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

const PROTOCOLS: [(u8, Protocol); 3] = [
    (proto::TCP, Protocol::tcp),
    (proto::UDP, Protocol::udp),
    (proto::ANY, Protocol::other),
];

fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(L, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(L, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter without labels.
fn counter1(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge without labels.
fn gauge1(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let KernelSnapshot {
            policy,
            pods,
            sums,
            tc,
            sockets,
            packet_drops,
            entries,
            generation,
            unenrolled,
        } = self.kernel.snapshot();
        let lost: u64 = policy
            .workloads
            .iter()
            .map(|(_, id)| {
                sums.get(&(*id, EVENT_LOST, proto::ANY))
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let (mut tc_packets, mut tc_bytes, mut tc_dropped) = (Vec::new(), Vec::new(), Vec::new());
        for (w, id) in &policy.workloads {
            let pod = pods.contains(w);
            for slot in 0..egress_common::tc::TC_SLOTS as u8 {
                let Some(name) = egress_common::tc::tc_slot_name(slot) else {
                    continue;
                };
                let (p, b) = tc.get(&(*id, slot)).copied().unwrap_or((0, 0));
                if let Some(reason) = egress_common::tc::tc_drop_reason(slot) {
                    if pod || p > 0 {
                        let l = TcDropLabels {
                            workload: w.name.clone(),
                            namespace: w.namespace.clone(),
                            reason,
                        };
                        tc_dropped.push((l, p));
                    }
                }
                if p > 0 {
                    let l = TcLabels {
                        workload: w.name.clone(),
                        namespace: w.namespace.clone(),
                        verdict: name,
                    };
                    tc_packets.push((l.clone(), p));
                    tc_bytes.push((l, b));
                }
            }
        }

        // Every workload has its deny-rule and deny-default series; other reasons once seen.
        let mut packet_dropped = Vec::new();
        for (w, id) in &policy.workloads {
            for slot in 0..egress_common::skb::SKB_SLOTS as u8 {
                let Some(reason) = egress_common::skb::skb_drop_reason(slot) else {
                    continue;
                };
                let v = packet_drops.get(&(*id, slot)).copied().unwrap_or(0);
                let always = slot == Outcome::DenyRule as u8 || slot == Outcome::DenyDefault as u8;
                if v > 0 || always {
                    let l = PacketDropLabels {
                        workload: w.name.clone(),
                        namespace: w.namespace.clone(),
                        reason,
                    };
                    packet_dropped.push((l, v));
                }
            }
        }

        let mut connections = Vec::new();
        let mut denied = Vec::new();
        for (w, id) in &policy.workloads {
            for o in Outcome::ALL {
                for (p, protocol) in PROTOCOLS {
                    let v = sums.get(&(*id, o as u8, p)).copied().unwrap_or(0);
                    if v == 0
                        && !matches!(o, Outcome::Allow | Outcome::DenyDefault | Outcome::DenyRule)
                    {
                        continue; // keep the output small; the common series always exist
                    }
                    let l = ConnectionLabels {
                        workload: w.name.clone(),
                        namespace: w.namespace.clone(),
                        verdict: Verdict(o),
                        protocol,
                    };
                    connections.push((l, v));
                    if let Some(reason) = DenyReason::of(o) {
                        let l = DeniedLabels {
                            workload: w.name.clone(),
                            namespace: w.namespace.clone(),
                            reason,
                            protocol,
                        };
                        denied.push((l, v));
                    }
                }
            }
        }
        denied.extend(self.host_denials.samples());
        // Pods not enrolled yet have no workload: their series has no workload labels.
        for (v, (_, protocol)) in unenrolled.iter().flatten().zip(PROTOCOLS) {
            let l = DeniedLabels {
                workload: String::new(),
                namespace: String::new(),
                reason: DenyReason::Unenrolled,
                protocol,
            };
            denied.push((l, *v));
        }
        counter(
            &mut enc,
            "egress_connections",
            "Connections judged in the kernel, by workload, verdict and protocol",
            &connections,
        )?;
        counter(&mut enc, "egress_denied", "Connections refused, by workload and reason (rule, default, proxy-port, error in the kernel; host in the proxy; unenrolled: a pod not enrolled yet, Kubernetes mode, no workload label)", &denied)?;
        counter(
            &mut enc,
            "egress_tc_dropped_packets",
            "Packets the tc backstop dropped on a workload's interface (they skipped the socket hooks), by reason",
            &tc_dropped,
        )?;
        counter(
            &mut enc,
            "egress_packet_dropped",
            "Packets of workloads' sockets the per-packet program dropped (source routes, connections the policy in force refuses), by reason",
            &packet_dropped,
        )?;
        counter(
            &mut enc,
            "egress_tc_packets",
            "Packets through the tc backstop on a workload's interface, by verdict (inbound: into the workload)",
            &tc_packets,
        )?;
        counter(
            &mut enc,
            "egress_tc_bytes",
            "Bytes through the tc backstop on a workload's interface, by verdict (inbound: into the workload)",
            &tc_bytes,
        )?;
        let refused: Vec<(SocketLabels, u64)> = policy
            .workloads
            .iter()
            .flat_map(|(w, id)| {
                let sockets = &sockets;
                egress_common::sockets::KINDS.into_iter().map(move |k| {
                    let l = SocketLabels {
                        workload: w.name.clone(),
                        namespace: w.namespace.clone(),
                        kind: egress_common::sockets::kind_name(k),
                    };
                    (l, sockets.get(&(*id, k)).copied().unwrap_or(0))
                })
            })
            .collect();
        counter(
            &mut enc,
            "egress_sockets_refused",
            "socket() calls refused in the kernel because spec.sockets does not allow their kind (raw, packet, icmp, other)",
            &refused,
        )?;
        counter1(
            &mut enc,
            "egress_flow_events_lost",
            "Verdict events the kernel could not hand to the agent (the counters still count their connections)",
            lost,
        )?;
        gauge1(
            &mut enc,
            "egress_policy_generation",
            "Generation of the policy in force",
            generation as i64,
        )?;
        gauge1(
            &mut enc,
            "egress_policy_rules",
            "Egress objects in the policy in force",
            policy.rules.len() as i64,
        )?;
        gauge1(
            &mut enc,
            "egress_workloads",
            "Workloads in the policy in force",
            policy.workloads.len() as i64,
        )?;
        let fill: Vec<(MapLabels, i64)> = entries
            .iter()
            .map(|&(map, n, _)| (MapLabels { map }, n as i64))
            .collect();
        let cap: Vec<(MapLabels, i64)> = entries
            .iter()
            .map(|&(map, _, c)| (MapLabels { map }, c as i64))
            .collect();
        gauge(
            &mut enc,
            "egress_map_entries",
            "Entries in each BPF map (both policy sets while a change is applied)",
            &fill,
        )?;
        gauge(
            &mut enc,
            "egress_map_capacity",
            "Capacity of each BPF map",
            &cap,
        )?;
        gauge1(
            &mut enc,
            "egress_ready",
            "1 once the programs are attached and the first policy is applied",
            self.ready.load(Ordering::SeqCst) as i64,
        )?;
        let build = BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            layout: egress_common::LAYOUT_VERSION,
        };
        gauge(
            &mut enc,
            "egress_build_info",
            "Build of the agent",
            &[(build, 1)],
        )?;
        Ok(())
    }
}
