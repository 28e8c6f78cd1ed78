//! Verdict events from the kernel's ring buffer, as structured tracing events
//! (target `egress::flow`). Identical flows read in one batch are logged once, with a count;
//! `pid` is that of the first.

use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use egress_common::{proto, Outcome, VerdictEvent};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{policy::Compiled, proxy::socket_addr};

/// Names for the ids in events.
pub struct Names {
    pub workloads: Vec<String>,
    pub rules: Vec<String>,
}

impl Names {
    pub fn new(c: &Compiled) -> Self {
        Self {
            workloads: c.workloads.iter().map(|(w, _)| w.to_string()).collect(),
            rules: c.rules.iter().map(|r| r.egress.to_string()).collect(),
        }
    }

    fn get(v: &[String], id: u32) -> &str {
        id.checked_sub(1)
            .and_then(|i| v.get(i as usize))
            .map(String::as_str)
            .unwrap_or("")
    }
}

pub fn protocol_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "other",
    }
}

fn log(ev: &VerdictEvent, count: u64, names: &Names) {
    let Some(outcome) = Outcome::from_u8(ev.outcome) else {
        warn!(target: "egress::flow", outcome = ev.outcome, "event with an unknown outcome");
        return;
    };
    let workload = Names::get(&names.workloads, ev.workload_id);
    let rule = Names::get(&names.rules, ev.rule_id);
    let dst = socket_addr(&ev.dst);
    let protocol = protocol_name(ev.proto);
    let pid = (ev.pid_tgid >> 32) as u32;
    let verdict = outcome.name();
    if matches!(outcome, Outcome::Allow | Outcome::Pass) {
        debug!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, count, "flow");
    } else {
        info!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, count, "flow");
    }
}

fn readable<T: std::os::fd::AsRawFd>(inner: T) -> Option<AsyncFd<T>> {
    // SAFETY: both ring buffers own their fd, which stays open and the same for their lifetime.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }.ok()
}

/// Reads events until the task is dropped.
pub async fn run(ring: RingBuf<MapData>, names: Names) {
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
                    drain(guard.get_inner_mut(), &names);
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "verdict event ring buffer failed; no flow log");
                    return;
                }
            },
            _ = tick.tick() => drain(fd.get_mut(), &names),
        }
    }
}

/// How often pending verdict events are read when the kernel did not wake us.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads every pending event and logs each distinct flow once with its count, so that a
/// workload hammering a denied destination costs one log line per batch, not one per connect.
fn drain(ring: &mut RingBuf<MapData>, names: &Names) {
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
        log(&ev, count, names);
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
