//! The kernel's side of `/metrics`: the per-CPU verdict and tc counters, map fill and policy
//! generation, read into a [`KernelSnapshot`] by whoever owns the datapath ([`KernelSource`])
//! and encoded at scrape time.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use egress_common::{proto, Outcome, EVENT_LOST};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use crate::policy::{Compiled, ObjectRef};

type Labels = Vec<(&'static str, String)>;

/// What the kernel counted, read at one moment.
pub struct KernelSnapshot {
    /// The policy in force (its workloads label the counters).
    pub policy: Arc<Compiled>,
    /// Workloads with their own network namespace (their tc drop series always exist).
    pub pods: Vec<ObjectRef>,
    /// Verdict counters by (workload id, outcome or `EVENT_LOST`, protocol).
    pub sums: HashMap<(u32, u8, u8), u64>,
    /// tc backstop (packets, bytes) by (workload id, slot).
    pub tc: HashMap<(u32, u8), (u64, u64)>,
    /// Packets the per-packet program dropped, by (workload id, drop slot).
    pub packet_drops: HashMap<(u32, u8), u64>,
    /// (map, entries, capacity).
    pub entries: Vec<(&'static str, usize, u32)>,
    pub generation: u64,
}

/// Reads the kernel's counters (the control loop, which owns the datapath).
pub trait KernelSource: Send + Sync {
    fn snapshot(&self) -> KernelSnapshot;
}

/// The metrics read from the kernel and the policy at scrape time.
pub(super) struct KernelCollector {
    pub(super) kernel: Arc<dyn KernelSource>,
    pub(super) host_denials: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    pub(super) ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

const PROTOCOLS: [(u8, &str); 3] = [
    (proto::TCP, "tcp"),
    (proto::UDP, "udp"),
    (proto::ANY, "other"),
];

fn deny_reason(o: Outcome) -> Option<&'static str> {
    match o {
        Outcome::DenyRule => Some("rule"),
        Outcome::DenyDefault => Some("default"),
        Outcome::DenyProxyPort => Some("proxy-port"),
        Outcome::DenyError => Some("error"),
        _ => None,
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let KernelSnapshot {
            policy,
            pods,
            sums,
            tc,
            packet_drops,
            entries,
            generation,
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
                let base = vec![
                    ("workload", w.name.clone()),
                    ("namespace", w.namespace.clone()),
                ];
                if let Some(reason) = egress_common::tc::tc_drop_reason(slot) {
                    if pod || p > 0 {
                        let mut l = base.clone();
                        l.push(("reason", reason.into()));
                        tc_dropped.push((l, p));
                    }
                }
                if p > 0 {
                    let mut l = base;
                    l.push(("verdict", name.into()));
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
                    let l = vec![
                        ("workload", w.name.clone()),
                        ("namespace", w.namespace.clone()),
                        ("reason", reason.into()),
                    ];
                    packet_dropped.push((l, v));
                }
            }
        }

        let mut connections = Vec::new();
        let mut denied = Vec::new();
        for (w, id) in &policy.workloads {
            for o in Outcome::ALL {
                for (p, pname) in PROTOCOLS {
                    let v = sums.get(&(*id, o as u8, p)).copied().unwrap_or(0);
                    if v == 0
                        && !matches!(o, Outcome::Allow | Outcome::DenyDefault | Outcome::DenyRule)
                    {
                        continue; // keep the output small; the common series always exist
                    }
                    let base = vec![
                        ("workload", w.name.clone()),
                        ("namespace", w.namespace.clone()),
                    ];
                    let mut l = base.clone();
                    l.push(("verdict", o.name().into()));
                    l.push(("protocol", pname.into()));
                    connections.push((l, v));
                    if let Some(reason) = deny_reason(o) {
                        let mut l = base;
                        l.push(("reason", reason.into()));
                        l.push(("protocol", pname.into()));
                        denied.push((l, v));
                    }
                }
            }
        }
        for ((name, ns), v) in self
            .host_denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            denied.push((
                vec![
                    ("workload", name.clone()),
                    ("namespace", ns.clone()),
                    ("reason", "host".into()),
                    ("protocol", "tcp".into()),
                ],
                *v,
            ));
        }
        counter(
            &mut enc,
            "egress_connections",
            "Connections judged in the kernel, by workload, verdict and protocol",
            &connections,
        )?;
        counter(&mut enc, "egress_denied", "Connections refused, by workload and reason (rule, default, proxy-port, error in the kernel; host in the proxy)", &denied)?;
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
        counter(
            &mut enc,
            "egress_flow_events_lost",
            "Verdict events the kernel could not hand to the agent (the counters still count their connections)",
            &[(vec![], lost)],
        )?;
        gauge(
            &mut enc,
            "egress_policy_generation",
            "Generation of the policy in force",
            &[(vec![], generation as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_policy_rules",
            "Egress objects in the policy in force",
            &[(vec![], policy.rules.len() as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_workloads",
            "Workloads in the policy in force",
            &[(vec![], policy.workloads.len() as i64)],
        )?;
        let fill: Vec<(Labels, i64)> = entries
            .iter()
            .map(|(m, n, _)| (vec![("map", m.to_string())], *n as i64))
            .collect();
        let cap: Vec<(Labels, i64)> = entries
            .iter()
            .map(|(m, _, c)| (vec![("map", m.to_string())], *c as i64))
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
        gauge(
            &mut enc,
            "egress_ready",
            "1 once the programs are attached and the first policy is applied",
            &[(vec![], self.ready.load(Ordering::SeqCst) as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_build_info",
            "Build of the agent",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").into()),
                    ("layout", egress_common::LAYOUT_VERSION.to_string()),
                ],
                1,
            )],
        )?;
        Ok(())
    }
}
