//! cgroup/sock_create and the `socket_create` LSM (cgroup) hook: refuse, at `socket()`, the
//! kinds of sockets no destination hook judges (raw IP, packet sockets, ping sockets,
//! protocols other than TCP/UDP/MPTCP) unless the MeshConfig allows them (`spec.sockets`,
//! `MeshConfig.sockets_allowed`). The decision is `egress_common::sockets::refused`.
//! cgroup/setsockopt refuses, under the same rule, the options that would send a packet
//! socket's frames past the node interfaces' tc programs (where the LSM cannot refuse the
//! socket itself, those programs drop its frames: `tc_node`).
//!
//! Identity is the sock_addr hooks': the agent's own cgroup is exempt by cgroup id; a cgroup
//! that is no workload is untouched, except in Kubernetes mode (`refuse_unenrolled`), where a
//! pod not enrolled yet gets the mesh-wide socket rules (they do not depend on the workload).

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::SockoptContext,
};
use egress_common::{
    hook,
    sockets::{self, kind_of, sockopt_kind},
    Outcome, VerdictEvent,
};

use crate::{
    events::emit,
    maps::{active_set, workload, CONFIG, COUNTERS},
};

/// Return values of cgroup/sock_create and of a `lsm_cgroup` program.
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0; // socket() fails with EPERM

/// Judges `socket(family, ty, protocol)` by the current task; only `only_kind` (when not 0)
/// is considered, the rest allowed.
#[inline(always)]
pub fn judge(family: u32, ty: u32, protocol: u32, only_kind: u32, hook: u8) -> i32 {
    let Some(k) = kind_of(family, ty, protocol) else {
        return ALLOW;
    };
    if only_kind != 0 && k != only_kind {
        return ALLOW;
    }
    refuse_kind(k, sockets::event_addr(family, ty, protocol), hook)
}

/// cgroup/setsockopt: an option that would carry a packet socket's frames past every hook
/// (`egress_common::sockets::sockopt_kind`) is refused (EPERM) like the socket itself;
/// every other option passes untouched.
#[inline(always)]
pub fn setsockopt(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the context; the verifier checks every field read.
    let (level, optname) = unsafe { (read_volatile(&(*so).level), read_volatile(&(*so).optname)) };
    let Some(k) = sockopt_kind(level, optname) else {
        return ALLOW;
    };
    let sk = unsafe { read_volatile(&(*so).__bindgen_anon_1.sk) };
    let (f, t, p) = if sk.is_null() {
        (0, 0, 0)
    } else {
        // SAFETY: a socket of the context, checked for null.
        unsafe {
            (
                read_volatile(&(*sk).family),
                read_volatile(&(*sk).type_),
                read_volatile(&(*sk).protocol),
            )
        }
    };
    refuse_kind(k, sockets::event_addr(f, t, p), hook::SETSOCKOPT)
}

/// Refuses socket kind `k` to the current task unless it is allowed (`event`: the socket as
/// the flow event shows it).
#[inline(always)]
fn refuse_kind(k: u32, event: egress_common::SockAddr, hook: u8) -> i32 {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let set = active_set();
    let cfg = CONFIG.get(set);
    let (wid, allowed, audit, generation) = match cfg {
        Some(c) => {
            if cg == c.agent_cgroup_id {
                return ALLOW;
            }
            let wid = match workload(cg, set, Some(c.root_level)) {
                Some(w) => w.id,
                // Kubernetes mode: a pod not enrolled yet; the socket rules are mesh-wide.
                None if c.refuse_unenrolled != 0 => 0,
                None => return ALLOW,
            };
            (wid, c.sockets_allowed, c.audit_mode != 0, c.generation)
        }
        // No mesh config (cannot happen with an array map): fail closed for workloads.
        None => match workload(cg, set, None) {
            Some(w) => (w.id, 0, false, 0),
            None => return ALLOW,
        },
    };
    if allowed & k != 0 {
        return ALLOW;
    }
    if !audit {
        if let Some(c) = COUNTERS.get_ptr_mut(sockets::counter_index(wid, k)) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *c += 1 };
        }
    }
    let outcome = if audit {
        Outcome::AuditRule
    } else {
        Outcome::DenyRule
    };
    emit(&VerdictEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: cg,
        pid_tgid: bpf_get_current_pid_tgid(),
        dst: event,
        workload_id: wid,
        rule_id: 0,
        generation: generation as u32,
        outcome: outcome as u8,
        proto: k as u8,
        hook,
        _pad0: 0,
    });
    if audit {
        ALLOW
    } else {
        REFUSE
    }
}
