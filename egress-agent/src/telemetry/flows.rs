//! Verdict events from the kernel's ring buffer, as structured tracing events
//! (target `egress::flow`). Identical flows read in one batch are logged once, with a count;
//! `pid` is that of the first.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, RingBuf};
use egress_common::{proto, Outcome, VerdictEvent};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use serde::Serialize;
use tokio::sync::broadcast;

use super::{
    audit::{AuditMetrics, Layer},
    history::{FlowKey as HistoryKey, History},
};
use crate::policy::{Compiled, Live};

/// One logged flow: a distinct (workload, destination, protocol, verdict, rule) seen in one
/// batch of kernel events, with how many connections it stands for.
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub workload: String,
    pub destination: String,
    pub protocol: &'static str,
    pub verdict: &'static str,
    pub rule: String,
    pub pid: u32,
    pub count: u64,
}

/// Recent flows and a live feed of new ones, for `egress-agent flows`; and where the kernel's
/// verdicts are also counted (audits) and kept (the flow history).
pub struct Hub {
    recent: Mutex<VecDeque<Flow>>,
    tx: broadcast::Sender<Flow>,
    pub audit: AuditMetrics,
    pub history: Arc<History>,
}

const RECENT: usize = 1000;

impl Hub {
    pub fn new(audit: AuditMetrics, history: Arc<History>) -> Arc<Self> {
        Arc::new(Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            tx: broadcast::channel(4096).0,
            audit,
            history,
        })
    }

    fn push(&self, f: Flow) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(f.clone());
        let _ = self.tx.send(f);
    }

    pub fn recent(&self) -> Vec<Flow> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.tx.subscribe()
    }
}

fn log(ev: &VerdictEvent, count: u64, policy: &Compiled, hub: &Hub) {
    let socket = matches!(
        ev.hook,
        egress_common::hook::SOCK_CREATE | egress_common::hook::LSM_SOCKET_CREATE
    );
    let verdict = if ev.hook == egress_common::hook::TC {
        egress_common::tc::tc_event_verdict(ev.outcome)
    } else if socket {
        // socket() of a kind spec.sockets does not allow (reported only, in audit mode).
        Some(match Outcome::from_u8(ev.outcome) {
            Some(Outcome::AuditRule) => "audit-socket",
            _ => "deny-socket",
        })
    } else if ev.hook == egress_common::hook::SKB {
        egress_common::skb::skb_event_verdict(ev.outcome)
    } else {
        Outcome::from_u8(ev.outcome).map(Outcome::name)
    };
    let Some(verdict) = verdict else {
        warn!(target: "egress::flow", outcome = ev.outcome, "event with an unknown outcome");
        return;
    };
    let workload = policy
        .workload(ev.workload_id)
        .map(|w| w.to_string())
        .unwrap_or_default();
    let rule = policy
        .rule(ev.rule_id)
        .map(|r| r.name())
        .unwrap_or_default();
    let (workload, rule) = (workload.as_str(), rule.as_str());
    let (dst, protocol) = if socket {
        use egress_common::sockets::{event_socket, family_name, kind_name};
        let (f, t, p) = event_socket(&ev.dst);
        let what = format!("socket({}, type {t}, protocol {p})", family_name(f));
        (what, kind_name(ev.proto as u32))
    } else {
        (ev.dst.socket_addr().to_string(), proto::name(ev.proto))
    };
    let pid = (ev.pid_tgid >> 32) as u32;
    if matches!(verdict, "allow" | "passthrough") {
        debug!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, count, "flow");
    } else {
        info!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, count, "flow");
    }
    let time_ms = now_ms();
    observe(ev, count, verdict, workload, rule, time_ms, hub);
    hub.push(Flow {
        time_ms,
        workload: workload.into(),
        destination: dst.clone(),
        protocol,
        verdict,
        rule: rule.into(),
        pid,
        count,
    });
}

/// Unix time, milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counts audited verdicts and keeps connection verdicts in the history. Redirected
/// connections are kept by the proxy instead, which also knows their host.
fn observe(
    ev: &VerdictEvent,
    count: u64,
    verdict: &str,
    workload: &str,
    rule: &str,
    time_ms: u64,
    hub: &Hub,
) {
    use egress_common::hook;
    if !matches!(
        ev.hook,
        hook::CONNECT4 | hook::CONNECT6 | hook::SENDMSG4 | hook::SENDMSG6
    ) {
        return;
    }
    let outcome = Outcome::from_u8(ev.outcome);
    if matches!(outcome, Some(Outcome::AuditRule | Outcome::AuditDefault)) {
        hub.audit.count(rule, workload, Layer::kernel, count);
    }
    if outcome == Some(Outcome::Proxy) || workload.is_empty() {
        return;
    }
    let key = HistoryKey {
        workload: workload.into(),
        ip: ev.dst.socket_addr().ip(),
        port: ev.dst.port as u16,
        proto: ev.proto,
        host: None,
    };
    hub.history.record(key, time_ms, count, verdict, rule);
}

fn readable<T: std::os::fd::AsRawFd>(inner: T) -> Option<AsyncFd<T>> {
    // SAFETY: both ring buffers own their fd, which stays open and the same for their lifetime.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }.ok()
}

/// Reads events until the task is dropped.
pub async fn run(ring: RingBuf<MapData>, live: Arc<Live>, hub: Arc<Hub>) {
    let Some(mut fd) = readable(ring) else {
        warn!("cannot poll the verdict event ring buffer; no flow log");
        return;
    };
    // The kernel wakes us only when a batch has piled up; otherwise we poll.
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = fd.readable_mut() => match r {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &live.get(), &hub);
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "verdict event ring buffer failed; no flow log");
                    return;
                }
            },
            _ = tick.tick() => drain(fd.get_mut(), &live.get(), &hub),
        }
    }
}

/// How often pending verdict events are read when the kernel did not wake us.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads every pending event and logs each distinct flow once with its count, so that a
/// workload hammering a denied destination costs one log line per batch, not one per connect.
fn drain(ring: &mut RingBuf<MapData>, policy: &Compiled, hub: &Hub) {
    let mut batch: HashMap<FlowKey, (VerdictEvent, u64)> = HashMap::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<VerdictEvent>() {
            // SAFETY: the kernel wrote a VerdictEvent (repr(C), plain integers) here;
            // read_unaligned copes with any alignment.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VerdictEvent) };
            batch.entry(FlowKey::of(&ev)).or_insert((ev, 0)).1 += 1;
        }
    }
    let mut flows: Vec<_> = batch.into_values().collect();
    flows.sort_by_key(|(ev, _)| ev.ts_ns);
    for (ev, count) in flows {
        log(&ev, count, policy, hub);
    }
}

/// What makes two events the same flow for the log.
#[derive(PartialEq, Eq, Hash)]
struct FlowKey {
    workload: u32,
    dst: egress_common::SockAddr,
    proto: u8,
    outcome: u8,
    rule: u32,
}

impl FlowKey {
    fn of(ev: &VerdictEvent) -> Self {
        Self {
            workload: ev.workload_id,
            dst: ev.dst,
            proto: ev.proto,
            outcome: ev.outcome,
            rule: ev.rule_id,
        }
    }
}

/// Forwards aya-log records from the programs to `log` (and from there to tracing).
pub async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Some(mut fd) = readable(logger) else {
        warn!("cannot poll the eBPF log ring buffer; kernel log lines are lost");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
