//! Counting verdicts and telling the agent about them (per-CPU counters, the ring buffer).

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
};
use egress_common::{
    capacity, counter_index, Decision, MeshConfig, Outcome, SockAddr, VerdictEvent, EVENT_LOST,
};

use crate::maps::{COUNTERS, EVENTS};

#[inline(always)]
pub fn record(
    cfg: Option<&MeshConfig>,
    cg: u64,
    wid: u32,
    dst: &SockAddr,
    proto: u8,
    hook: u8,
    d: Decision,
) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(wid, d.outcome as u8, proto)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
    let quiet = matches!(d.outcome, Outcome::Mesh | Outcome::Allow | Outcome::Pass);
    if quiet && cfg.map(|c| c.events_all) != Some(1) {
        return;
    }
    let ev = VerdictEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: cg,
        pid_tgid: bpf_get_current_pid_tgid(),
        dst: *dst,
        workload_id: wid,
        rule_id: d.rule_id,
        generation: cfg.map(|c| c.generation as u32).unwrap_or(0),
        outcome: d.outcome as u8,
        proto,
        hook,
        _pad0: 0,
    };
    emit(&ev);
}

#[inline(always)]
pub fn emit(ev: &VerdictEvent) {
    let wid = ev.workload_id;
    // Wake the agent only when a batch has piled up (it also polls): a wake-up per connect
    // would cost more than the whole decision. A full ring buffer loses the event, never the
    // verdict; the counters still count it.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > capacity::EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<VerdictEvent>(ev, flags as u64).is_err() {
        if let Some(c) = COUNTERS.get_ptr_mut(counter_index(wid, EVENT_LOST, 0)) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *c += 1 };
        }
    }
}
