//! Verdict events from the kernel's ring buffer, as structured tracing events
//! (target `egress::flow`): one per judged connect()/sendmsg().

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

fn log(ev: &VerdictEvent, names: &Names) {
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
        debug!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, "flow");
    } else {
        info!(target: "egress::flow", workload, %dst, protocol, verdict, rule, pid, "flow");
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
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "verdict event ring buffer failed; no flow log");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<VerdictEvent>() {
                // SAFETY: the kernel wrote a VerdictEvent (repr(C), plain integers) here;
                // read_unaligned copes with any alignment.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VerdictEvent) };
                log(&ev, &names);
            }
        }
        guard.clear_ready();
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
