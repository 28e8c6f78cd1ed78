//! The per-packet `cgroup_skb/egress` program: what it remembers, and what it counts.
//!
//! The socket hooks (connect, sendmsg) judge a socket when it is given a destination; the
//! per-packet program judges every packet a workload sends by the packet's real destination.
//! It stays cheap by remembering verdicts per (cgroup, destination, protocol) in an LRU
//! cache ([`DstKey`] -> [`DstVerdict`], `EGRESS_DST_VERDICTS`): the verdict is a pure function
//! of the workload, the destination and the policy generation, so a packet to a destination
//! judged under the policy in force passes (or drops) after one lookup, whichever socket sent
//! it, and nothing is written per socket or per connect(). (Writing a per-socket record at
//! every connect(), in socket-local storage or an LRU by socket cookie, was measured at about
//! 1 µs per connect() here: more than the whole decision.) The one per-socket fact kept is
//! that a socket was accepted by a listener of the workload ([`INBOUND`], socket-local
//! storage the program writes on a listener at its first SYN-ACK, and the kernel clones into
//! every socket that listener accepts): its packets are replies, not egress.

use core::mem::size_of;

use crate::{Outcome, SockAddr};

/// Socket-local flag (`EGRESS_SOCK_MARKS`): the socket was accepted by a listener of the
/// workload (a server's side of an inbound connection): its packets are replies, not egress.
pub const INBOUND: u32 = 1;

/// Key of `EGRESS_DST_VERDICTS`: who sent the packet (its cgroup) and where it really goes
/// (for a socket redirected to the proxy: the destination it asked for).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DstKey {
    pub cgroup_id: u64,
    pub dst: SockAddr,
    /// IP protocol number.
    pub proto: u8,
    /// 1: the packet goes to the proxy for `dst` (a redirected socket).
    pub redirected: u8,
    /// Padding, zero (a hash key's every byte counts). Two plain fields, not a byte array:
    /// in the kernel programs the zeroing is then two stores, not a call to `memset`.
    pub _pad0: u16,
    pub _pad1: u32,
}

impl DstKey {
    #[inline(always)]
    pub const fn new(cgroup_id: u64, dst: SockAddr, proto: u8, redirected: u8) -> DstKey {
        DstKey {
            cgroup_id,
            dst,
            proto,
            redirected,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Value of `EGRESS_DST_VERDICTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DstVerdict {
    /// `MeshConfig::generation` of the policy that judged it; another generation is stale.
    pub generation: u64,
    pub workload_id: u32,
    /// 0: packets pass; else the drop slot (a denying outcome or `DROP_*`).
    pub drop: u8,
    /// [`Outcome`] as u8 of the decision.
    pub outcome: u8,
    pub _pad: [u8; 2],
    /// `EGRESS_NAMES_EPOCH` when it was judged: once the agent's learned names change, a
    /// cached drop is judged again (a name rule may now allow the address) and the socket
    /// hooks stop trusting a cached pass (the name may be forgotten).
    pub names_epoch: u32,
    pub _pad1: u32,
}

impl DstVerdict {
    #[inline(always)]
    pub fn outcome(&self) -> Option<Outcome> {
        Outcome::from_u8(self.outcome)
    }
}

/// The last verdict taken on one CPU (`EGRESS_LAST_VERDICT`, a per-CPU array: slot
/// [`LAST_SKB`] for the per-packet program's last pass, [`LAST_HOOK`] for the socket hooks'
/// last cached pass): consecutive packets of a flow (and of every flow to the same
/// destination from the same cgroup), and consecutive connect()s or sendto()s to one
/// destination, find their verdict by comparing their key with it, without the hash lookup
/// of `EGRESS_DST_VERDICTS`. It holds what that cache held, so it is judged the same way
/// (the generation, the names epoch, [`hook_fast_pass`]).
///
/// The slot is per CPU, but not per program run: on its CPU a program can be interrupted by
/// itself (a packet sent from process context, then one from a softirq) and, where the kernel
/// preempts, by another task's run. `seq` guards it: a writer stamps it with a token of its
/// own (a write counter and its thread, odd) before it writes the key, and makes it even only
/// if its token is still there after; a writer that finds another's token leaves the slot
/// invalid. A reader takes the key only when `seq` is even and the same before and after.
/// So a half-written or mixed key never matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastVerdict {
    pub seq: u64,
    pub key: DstKey,
    pub verdict: DstVerdict,
}

/// Slot of `EGRESS_LAST_VERDICT` the per-packet program uses.
pub const LAST_SKB: u32 = 0;
/// Slot the socket hooks (connect, sendmsg) use.
pub const LAST_HOOK: u32 = 1;

/// `LastVerdict::seq` of a slot a writer found overwritten: odd, and no writer's token (a
/// token's low 32 bits are at most 0x7fff_ffff).
const LAST_INVALID: u64 = 0xffff_ffff;

/// Whether the 16 address bytes at `p` (in a map value, 8-aligned: see the assertion below)
/// are `a`, read as two 8-byte words: in the kernel two loads, not sixteen.
///
/// # Safety
/// `p` points to the `dst.addr` of a valid `LastVerdict`'s key.
#[inline(always)]
unsafe fn same_addr(p: *const [u8; 16], a: &[u8; 16]) -> bool {
    use core::ptr::read_volatile;
    let w = p.cast::<u64>();
    let (lo, hi) = (read_volatile(w), read_volatile(w.add(1)));
    let mut x = [0u8; 8];
    let mut y = [0u8; 8];
    x.copy_from_slice(&a[..8]);
    y.copy_from_slice(&a[8..]);
    lo == u64::from_ne_bytes(x) && hi == u64::from_ne_bytes(y)
}

const _: () = assert!(
    (core::mem::offset_of!(LastVerdict, key)
        + core::mem::offset_of!(DstKey, dst)
        + core::mem::offset_of!(SockAddr, addr))
        % 8
        == 0
);

impl LastVerdict {
    /// The verdict the slot at `p` holds for `key`, if it holds one for it.
    ///
    /// # Safety
    /// `p` points to a valid, aligned `LastVerdict` (a map value).
    #[inline(always)]
    pub unsafe fn get(p: *const LastVerdict, key: &DstKey) -> Option<DstVerdict> {
        use core::ptr::{addr_of, read_volatile};
        let seq = read_volatile(addr_of!((*p).seq));
        let k = addr_of!((*p).key);
        let same = seq & 1 == 0
            && read_volatile(addr_of!((*k).cgroup_id)) == key.cgroup_id
            && same_addr(addr_of!((*k).dst.addr), &key.dst.addr)
            && read_volatile(addr_of!((*k).dst.port)) == key.dst.port
            && read_volatile(addr_of!((*k).dst.family)) == key.dst.family
            && read_volatile(addr_of!((*k).proto)) == key.proto
            && read_volatile(addr_of!((*k).redirected)) == key.redirected;
        if !same {
            return None;
        }
        let v = read_volatile(addr_of!((*p).verdict));
        (read_volatile(addr_of!((*p).seq)) == seq).then_some(v)
    }

    /// Whether the slot at `p` records `key` as passing under `generation` (the per-packet
    /// program's test).
    ///
    /// # Safety
    /// As [`LastVerdict::get`].
    #[inline(always)]
    pub unsafe fn passes(p: *const LastVerdict, key: &DstKey, generation: u64) -> bool {
        Self::get(p, key).is_some_and(|v| v.generation == generation && v.drop == 0)
    }

    /// Records `v` as the verdict for `key` in the slot at `p`, for the writer running on
    /// thread `tid` (any value that differs between tasks; a softirq may share its
    /// interrupted task's).
    ///
    /// # Safety
    /// As [`LastVerdict::get`].
    #[inline(always)]
    pub unsafe fn record(p: *mut LastVerdict, key: &DstKey, v: &DstVerdict, tid: u32) {
        let token = Self::begin(p, tid);
        Self::write(p, key, v);
        Self::finish(p, token);
    }

    /// A write's first step: stamps the slot with this writer's token (odd: readers miss).
    #[inline(always)]
    unsafe fn begin(p: *mut LastVerdict, tid: u32) -> u64 {
        use core::ptr::{addr_of_mut, read_volatile, write_volatile};
        let seq = read_volatile(addr_of_mut!((*p).seq));
        let token = (((seq >> 32) + 1) << 32) | (((tid & 0x3fff_ffff) as u64) << 1) | 1;
        write_volatile(addr_of_mut!((*p).seq), token);
        token
    }

    #[inline(always)]
    unsafe fn write(p: *mut LastVerdict, key: &DstKey, v: &DstVerdict) {
        use core::ptr::{addr_of_mut, write_volatile};
        write_volatile(addr_of_mut!((*p).verdict), *v);
        write_volatile(addr_of_mut!((*p).key), *key);
    }

    /// A write's last step: even (readable) if no other writer stamped the slot meanwhile;
    /// else invalid.
    #[inline(always)]
    unsafe fn finish(p: *mut LastVerdict, token: u64) {
        use core::ptr::{addr_of_mut, read_volatile, write_volatile};
        let now = read_volatile(addr_of_mut!((*p).seq));
        let next = if now == token {
            token + 1
        } else {
            (((now >> 32) + 1) << 32) | LAST_INVALID
        };
        write_volatile(addr_of_mut!((*p).seq), next);
    }
}

/// The socket hooks' fast path (connect, sendmsg): when a cached verdict for this cgroup,
/// destination and protocol says the destination passes untouched under the policy and the
/// names in force, the hook passes it without walking the policy tries. Returns the cached
/// pass [`Outcome`] (counted as usual), or `None` when the hook must judge in full: another
/// generation, names learned or forgotten since, a drop or a proxy verdict, every verdict
/// logged (`events_all`: the full path emits the event), or a DNS request the agent steers.
#[inline(always)]
pub fn hook_fast_pass(
    v: &DstVerdict,
    generation: u64,
    names_epoch: u32,
    events_all: bool,
    dns_steered_port: bool,
) -> Option<Outcome> {
    if v.generation != generation
        || v.names_epoch != names_epoch
        || v.drop != 0
        || events_all
        || dns_steered_port
    {
        return None;
    }
    v.outcome()
        .filter(|o| matches!(o, Outcome::Allow | Outcome::Mesh | Outcome::Pass))
}

/// Counter slots per workload of `EGRESS_PACKET_DROPS`: a dropped packet counts under the
/// denying [`Outcome`] (1..=11) or one of the parser's reasons below.
pub const SKB_SLOTS: u32 = 16;
/// An IPv4 source route option or an IPv6 routing header with segments left.
pub const DROP_SOURCE_ROUTE: u8 = 12;
/// More IPv6 extension headers than the parser walks.
pub const DROP_TOO_MANY_HEADERS: u8 = 13;
/// A header the parser could not read.
pub const DROP_MALFORMED: u8 = 14;
/// A packet straight to a destination the policy sends through the proxy (a connection made
/// before the policy said so): it would skip the proxy's judgment.
pub const DROP_PROXY_BYPASS: u8 = 15;

/// Index into the per-CPU `EGRESS_PACKET_DROPS` array.
#[inline(always)]
pub fn skb_index(workload_id: u32, slot: u8) -> u32 {
    workload_id * SKB_SLOTS + (slot as u32 & (SKB_SLOTS - 1))
}

/// The `reason` label of a drop slot (`None`: not a drop slot).
pub fn skb_drop_reason(slot: u8) -> Option<&'static str> {
    match slot {
        DROP_SOURCE_ROUTE => Some("source-route"),
        DROP_TOO_MANY_HEADERS => Some("too-many-headers"),
        DROP_MALFORMED => Some("malformed"),
        DROP_PROXY_BYPASS => Some("proxy-bypass"),
        s => Outcome::from_u8(s)
            .filter(|o| o.is_denied())
            .map(Outcome::name),
    }
}

/// The flow-log verdict of a packet the program dropped.
pub fn skb_event_verdict(slot: u8) -> Option<&'static str> {
    Some(match skb_drop_reason(slot)? {
        "source-route" => "packet-drop-source-route",
        "too-many-headers" => "packet-drop-too-many-headers",
        "malformed" => "packet-drop-malformed",
        "proxy-bypass" => "packet-drop-proxy-bypass",
        "deny-rule" => "packet-drop-deny-rule",
        "deny-default" => "packet-drop-deny-default",
        "deny-proxy-port" => "packet-drop-deny-proxy-port",
        _ => "packet-drop-error",
    })
}

#[cfg(test)]
mod last_verdict_tests {
    use super::*;

    fn key(cg: u64, port: u32) -> DstKey {
        DstKey {
            cgroup_id: cg,
            dst: SockAddr::v4([127, 60, 0, 1], port as u16),
            proto: crate::proto::TCP,
            ..Default::default()
        }
    }

    fn pass(generation: u64) -> DstVerdict {
        DstVerdict {
            generation,
            workload_id: 1,
            outcome: Outcome::Allow as u8,
            ..Default::default()
        }
    }

    #[test]
    fn a_slot_holds_only_its_key() {
        let mut slot = LastVerdict::default();
        let p = &mut slot as *mut LastVerdict;
        unsafe {
            assert!(!LastVerdict::passes(p, &key(7, 80), 1), "an empty slot");
            LastVerdict::record(p, &key(7, 80), &pass(3), 100);
            assert!(LastVerdict::passes(p, &key(7, 80), 3));
            assert_eq!(LastVerdict::get(p, &key(7, 80)), Some(pass(3)));
            assert!(
                !LastVerdict::passes(p, &key(7, 80), 4),
                "another generation"
            );
            assert!(!LastVerdict::passes(p, &key(8, 80), 3), "another cgroup");
            assert!(!LastVerdict::passes(p, &key(7, 81), 3), "another port");
            let mut redirected = key(7, 80);
            redirected.redirected = 1;
            assert!(!LastVerdict::passes(p, &redirected, 3));
            let drop = DstVerdict { drop: 1, ..pass(3) };
            LastVerdict::record(p, &key(8, 81), &drop, 100);
            assert!(!LastVerdict::passes(p, &key(8, 81), 3), "a drop is no pass");
            assert_eq!(LastVerdict::get(p, &key(8, 81)), Some(drop));
            assert_eq!(LastVerdict::get(p, &key(7, 80)), None);
            assert_eq!(slot.seq % 2, 0);
            // A write in progress (odd sequence) is never read.
            slot.seq += 1;
            assert_eq!(LastVerdict::get(&slot, &key(8, 81)), None);
        }
    }

    /// A's write interrupted (a softirq sharing A's thread, or another task) at every step by
    /// B's whole write: the slot ends holding B's key whole, or nothing; never a mix.
    #[test]
    fn an_interrupted_write_never_leaves_a_mixed_key() {
        let (a, b) = (key(7, 80), key(8, 81));
        for tid_b in [100, 200] {
            for step in 0..3 {
                let mut slot = LastVerdict::default();
                let p = &mut slot as *mut LastVerdict;
                unsafe {
                    LastVerdict::record(p, &key(9, 9), &pass(3), 5);
                    let t = LastVerdict::begin(p, 100);
                    if step == 0 {
                        LastVerdict::record(p, &b, &pass(3), tid_b);
                    }
                    // Half of A's key: its cgroup, before the rest.
                    let cg = core::ptr::addr_of_mut!((*p).key.cgroup_id);
                    core::ptr::write_volatile(cg, a.cgroup_id);
                    if step == 1 {
                        LastVerdict::record(p, &b, &pass(3), tid_b);
                    }
                    LastVerdict::write(p, &a, &pass(3));
                    if step == 2 {
                        LastVerdict::record(p, &b, &pass(3), tid_b);
                    }
                    LastVerdict::finish(p, t);
                    let mixed = DstKey {
                        cgroup_id: b.cgroup_id,
                        ..a
                    };
                    let mixed2 = DstKey {
                        cgroup_id: a.cgroup_id,
                        ..b
                    };
                    assert!(!LastVerdict::passes(p, &mixed, 3), "step {step}");
                    assert!(!LastVerdict::passes(p, &mixed2, 3), "step {step}");
                    // A interrupted after writing all of its key: B's whole key is there, and
                    // A's finish leaves it unreadable rather than claiming it.
                    assert!(!LastVerdict::passes(p, &a, 3), "step {step}: A after B");
                    // The next whole write is readable again.
                    LastVerdict::record(p, &a, &pass(3), 100);
                    assert!(LastVerdict::passes(p, &a, 3));
                }
            }
        }
    }

    /// A reader interrupted by a whole write, even one that restores the same key under a
    /// token of the same thread, sees the sequence move.
    #[test]
    fn a_write_always_moves_the_sequence() {
        let mut slot = LastVerdict::default();
        let p = &mut slot as *mut LastVerdict;
        unsafe {
            LastVerdict::record(p, &key(7, 80), &pass(3), 100);
            let before = slot.seq;
            LastVerdict::record(p, &key(7, 80), &pass(3), 100);
            assert_ne!(slot.seq, before);
            assert_eq!(slot.seq % 2, 0);
        }
    }

    #[test]
    fn an_empty_slot_matches_no_real_cgroup() {
        let slot = LastVerdict::default();
        // Cgroup ids start at 1; the zeroed slot's key names cgroup 0.
        assert_eq!(unsafe { LastVerdict::get(&slot, &key(1, 0)) }, None);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, explicit padding: every bit pattern is
    // valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::DstKey {}
    unsafe impl aya::Pod for super::DstVerdict {}
    unsafe impl aya::Pod for super::LastVerdict {}
}

const _: () = assert!(size_of::<DstKey>() == 40);
const _: () = assert!(size_of::<DstVerdict>() == 24);
const _: () = assert!(size_of::<LastVerdict>() == 72);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(outcome: Outcome, drop: u8) -> DstVerdict {
        DstVerdict {
            generation: 7,
            workload_id: 3,
            drop,
            outcome: outcome as u8,
            names_epoch: 2,
            ..DstVerdict::default()
        }
    }

    #[test]
    fn hook_fast_pass_only_for_a_current_quiet_pass() {
        for o in [Outcome::Allow, Outcome::Mesh, Outcome::Pass] {
            assert_eq!(hook_fast_pass(&verdict(o, 0), 7, 2, false, false), Some(o));
        }
        // Stale policy or names, or a verdict the hook must log or steer: judged in full.
        let v = verdict(Outcome::Allow, 0);
        assert_eq!(hook_fast_pass(&v, 8, 2, false, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 3, false, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 2, true, false), None);
        assert_eq!(hook_fast_pass(&v, 7, 2, false, true), None);
        // Denials, proxy verdicts and packet drops never take the fast path.
        for o in [
            Outcome::DenyRule,
            Outcome::DenyDefault,
            Outcome::Proxy,
            Outcome::AuditRule,
            Outcome::DenyProxyPort,
        ] {
            assert_eq!(hook_fast_pass(&verdict(o, 0), 7, 2, false, false), None);
        }
        let bypass = verdict(Outcome::Allow, DROP_PROXY_BYPASS);
        assert_eq!(hook_fast_pass(&bypass, 7, 2, false, false), None);
    }

    #[test]
    fn drop_slots_have_reasons_and_fit() {
        for s in [
            DROP_SOURCE_ROUTE,
            DROP_TOO_MANY_HEADERS,
            DROP_MALFORMED,
            DROP_PROXY_BYPASS,
        ] {
            assert!(skb_drop_reason(s).is_some());
            assert!((s as u32) < SKB_SLOTS);
            assert!(skb_event_verdict(s).is_some());
        }
        for o in Outcome::ALL {
            assert!((o as u32) < SKB_SLOTS);
            assert_eq!(skb_drop_reason(o as u8).is_some(), o.is_denied());
        }
        assert_eq!(
            skb_event_verdict(Outcome::DenyRule as u8),
            Some("packet-drop-deny-rule")
        );
        assert_eq!(skb_index(2, 12), 2 * SKB_SLOTS + 12);
        assert_eq!(DstVerdict::default().outcome(), None);
    }
}
