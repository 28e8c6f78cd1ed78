//! Every map the programs share with the agent, and the lookups over them. The map names
//! (`EGRESS_*`) are what the agent opens and pins; they must not change.

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::bpf_get_current_ancestor_cgroup_id,
    helpers::bpf_get_current_pid_tgid,
    helpers::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use egress_common::{
    capacity, fqdn::NameKey, mesh_key, policy_key, policy_scope, skb, tc, workload_key, MeshConfig,
    MeshKeyV4, MeshKeyV6, OrigDst, OrigKey, PolicyKeyV4, PolicyKeyV6, PolicyValue, SockAddr,
    WorkloadInfo, COUNTERS_LEN,
};

/// Which policy set (0 or 1) the programs read; see `egress_common::workload_key`.
#[map(name = "EGRESS_ACTIVE")]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// The mesh settings of each policy set.
#[map(name = "EGRESS_CONFIG")]
pub static CONFIG: Array<MeshConfig> = Array::with_max_entries(2, 0);

#[map(name = "EGRESS_WORKLOADS")]
pub static WORKLOADS: HashMap<u64, WorkloadInfo> =
    HashMap::with_max_entries(capacity::WORKLOAD_CGROUPS, 0);

// LPM tries need BPF_F_NO_PREALLOC.
const NO_PREALLOC: u32 = 1;

#[map(name = "EGRESS_POLICY_V4")]
static POLICY_V4: LpmTrie<PolicyKeyV4, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_POLICY_V6")]
static POLICY_V6: LpmTrie<PolicyKeyV6, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_MESH_V4")]
static MESH_V4: LpmTrie<MeshKeyV4, u32> =
    LpmTrie::with_max_entries(capacity::MESH_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_MESH_V6")]
static MESH_V6: LpmTrie<MeshKeyV6, u32> =
    LpmTrie::with_max_entries(capacity::MESH_PREFIXES, NO_PREALLOC);

#[map(name = "EGRESS_ORIG_TUPLE")]
pub static ORIG_BY_TUPLE: LruHashMap<OrigKey, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map(name = "EGRESS_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "EGRESS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map(name = "EGRESS_TC_COUNTERS")]
pub static TC_COUNTERS: PerCpuArray<tc::TcCount> =
    PerCpuArray::with_max_entries(capacity::MAX_WORKLOADS * tc::TC_SLOTS, 0);

#[map(name = "EGRESS_REPLIES")]
pub static REPLIES: LruHashMap<tc::FlowKey, u8> =
    LruHashMap::with_max_entries(capacity::REPLIES, 0);

/// Fragmented datagrams leaving a workload whose first fragment was let through: their later
/// fragments pass, others are dropped.
#[map(name = "EGRESS_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<tc::FragKey, u8> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

/// The addresses of the pod behind each veth (key: ifindex of the host side).
#[map(name = "EGRESS_POD_ADDRS")]
pub static POD_ADDRS: HashMap<u32, tc::PodAddrs> =
    HashMap::with_max_entries(capacity::POD_IFACES, 0);

/// Sockets accepted by a listener of a workload (`skb::INBOUND`): socket-local storage,
/// freed with the socket, and cloned by the kernel from a listener into each socket it
/// accepts (`BPF_F_CLONE`).
#[btf_map(name = "EGRESS_SOCK_MARKS")]
static SOCK_MARKS: ClonedSkStorage<u32> = ClonedSkStorage::new();

/// The original destination of a redirected socket: socket-local storage, freed with the
/// socket (nothing to clean up at close, nothing an LRU could evict from a live connection).
#[btf_map(name = "EGRESS_SOCK_ORIG")]
static SOCK_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// `BPF_F_NO_PREALLOC | BPF_F_CLONE`.
const CLONED_STORAGE_FLAGS: usize = 1 | (1 << 9);

/// A socket storage map whose values the kernel copies into the sockets a listener accepts
/// (aya's `SkStorage` has no way to set `BPF_F_CLONE`). The fields are the BTF map definition
/// the loader reads; they are never dereferenced.
#[repr(C)]
pub struct ClonedSkStorage<T> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; CLONED_STORAGE_FLAGS],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}

/// The per-packet program's verdict cache (see `egress_common::skb`).
#[map(name = "EGRESS_DST_VERDICTS")]
pub static DST_VERDICTS: LruHashMap<skb::DstKey, skb::DstVerdict> =
    LruHashMap::with_max_entries(capacity::DST_VERDICTS, NO_COMMON_LRU);

/// The last verdicts per CPU (see `egress_common::skb::LastVerdict`); not pinned: a fresh
/// one after a restart is only empty.
#[map(name = "EGRESS_LAST_VERDICT")]
static LAST_VERDICT: PerCpuArray<skb::LastVerdict> = PerCpuArray::with_max_entries(2, 0);

/// The verdict slot `slot` of this CPU holds for `key`, if it holds one for it.
#[inline(always)]
pub fn last_verdict(slot: u32, key: &skb::DstKey) -> Option<skb::DstVerdict> {
    let p = LAST_VERDICT.get_ptr(slot)?;
    // SAFETY: this CPU's slot of a map value.
    unsafe { skb::LastVerdict::get(p, key) }
}

/// Makes `v` the verdict slot `slot` of this CPU holds for `key`.
#[inline(always)]
pub fn remember(slot: u32, key: &skb::DstKey, v: &skb::DstVerdict) {
    if let Some(p) = LAST_VERDICT.get_ptr_mut(slot) {
        let tid = bpf_get_current_pid_tgid() as u32;
        // SAFETY: this CPU's slot of a map value.
        unsafe { skb::LastVerdict::record(p, key, v, tid) };
    }
}

/// Caches a verdict; a full map only evicts older entries. Returns it.
#[inline(always)]
pub fn cache_verdict(
    key: &skb::DstKey,
    generation: u64,
    wid: u32,
    outcome: u8,
    drop: u8,
) -> skb::DstVerdict {
    let v = skb::DstVerdict {
        generation,
        workload_id: wid,
        drop,
        outcome,
        _pad: [0; 2],
        names_epoch: names_epoch(),
        _pad1: 0,
    };
    let _ = DST_VERDICTS.insert(key, &v, 0);
    v
}

/// See `egress_common::names::NAMES_EPOCH`.
#[map(name = "EGRESS_NAMES_EPOCH")]
static NAMES_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn names_epoch() -> u32 {
    NAMES_EPOCH.get(0).copied().unwrap_or(0)
}

/// Per-CPU LRU lists: no lock shared by the CPUs on insert.
const NO_COMMON_LRU: u32 = 2;

/// `bpf_sk_storage_get(F_CREATE)`.
const SK_STORAGE_CREATE: u64 = 1;

/// Socket `sk`'s value in the socket storage map `map`, created (zeroed) first when `create`;
/// null when it has none, or when `sk` is null or not a full socket. `sk` is any socket
/// pointer the verifier accepts for `bpf_sk_storage_get`: here a sock_addr or an skb socket.
#[inline(always)]
fn sk_value<M>(map: &M, sk: *mut core::ffi::c_void, create: bool) -> *mut core::ffi::c_void {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    let map = core::ptr::from_ref(map).cast_mut().cast();
    let flags = if create { SK_STORAGE_CREATE } else { 0 };
    // SAFETY: a valid socket pointer from the context; the storage is this socket's own.
    unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) }
}

/// The marks of socket `sk`; 0 when it has none.
#[inline(always)]
pub fn sock_marks(sk: *mut core::ffi::c_void) -> u32 {
    let p = sk_value(&SOCK_MARKS, sk, false);
    if p.is_null() {
        0
    } else {
        unsafe { *(p as *const u32) }
    }
}

/// Adds `flags` to the marks of socket `sk`, creating its storage on first use. False when
/// the storage cannot be had (no memory, not a full socket).
#[inline(always)]
pub fn mark_sock(sk: *mut core::ffi::c_void, flags: u32) -> bool {
    let p = sk_value(&SOCK_MARKS, sk, true);
    if !p.is_null() {
        unsafe { *(p as *mut u32) |= flags };
    }
    !p.is_null()
}

/// The socket of a connect/sendmsg/recvmsg/getpeername call, for its socket-local storage.
#[inline(always)]
pub fn sock(ctx: &SockAddrContext) -> *mut core::ffi::c_void {
    // SAFETY: `sk` of a sock_addr context is always a valid socket; the verifier checks it.
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) }.cast()
}

/// The original destination recorded for socket `sk`, if it was redirected.
#[inline(always)]
pub fn orig_of(sk: *mut core::ffi::c_void) -> Option<OrigDst> {
    let p = sk_value(&SOCK_ORIG, sk, false);
    if p.is_null() {
        None
    } else {
        Some(unsafe { *(p as *const OrigDst) })
    }
}

/// Records `o` as socket `sk`'s original destination. False when the storage cannot be had.
#[inline(always)]
pub fn set_orig(sk: *mut core::ffi::c_void, o: &OrigDst) -> bool {
    let p = sk_value(&SOCK_ORIG, sk, true);
    if !p.is_null() {
        unsafe { *(p as *mut OrigDst) = *o };
    }
    !p.is_null()
}

#[map(name = "EGRESS_PACKET_DROPS")]
pub static PACKET_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(capacity::MAX_WORKLOADS * skb::SKB_SLOTS, 0);

/// Addresses workloads learned from DNS answers for name rules (see `egress_common::fqdn`).
#[map(name = "EGRESS_NAMES")]
static NAMES: HashMap<NameKey, PolicyValue> = HashMap::with_max_entries(capacity::NAMES, 0);

/// The name rules' segments for a workload's destination, when its DNS gave that address.
#[inline(always)]
pub fn named(workload_id: u32, dst: &SockAddr) -> Option<&'static PolicyValue> {
    // SAFETY: the agent replaces whole values; the decision copies what it reads.
    unsafe { NAMES.get(&NameKey::of(workload_id, dst)) }
}

#[inline(always)]
pub fn active_set() -> u32 {
    ACTIVE.get(0).copied().unwrap_or(0) & 1
}

#[inline(always)]
pub fn workload(cg: u64, set: u32, root_level: Option<u32>) -> Option<WorkloadInfo> {
    workload_of(cg, set, root_level, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// [`workload`] of cgroup `cg`, whose ancestor at a level `ancestor` tells.
#[inline(always)]
pub fn workload_of(
    cg: u64,
    set: u32,
    root_level: Option<u32>,
    ancestor: impl Fn(i32) -> u64,
) -> Option<WorkloadInfo> {
    // SAFETY: values are plain data copied out at once; the agent replaces whole entries.
    if let Some(w) = unsafe { WORKLOADS.get(&workload_key(cg, set)) } {
        return Some(*w);
    }
    // A process in a cgroup nested below its workload's cgroup is still that workload.
    let mut level = root_level? + 1;
    for _ in 0..capacity::MAX_CGROUP_NESTING {
        let anc = ancestor(level as i32);
        if anc == 0 || anc == cg {
            break;
        }
        if let Some(w) = unsafe { WORKLOADS.get(&workload_key(anc, set)) } {
            return Some(*w);
        }
        level += 1;
    }
    None
}

#[inline(always)]
pub fn policy(workload_id: u32, set: u32, dst: &SockAddr) -> Option<&'static PolicyValue> {
    let scope = policy_scope(workload_id, set);
    if dst.family == 4 {
        let k: PolicyKeyV4 = policy_key(scope, &dst.ip4());
        POLICY_V4.get(Key::new(32 + 32, k))
    } else {
        let k: PolicyKeyV6 = policy_key(scope, &dst.addr);
        POLICY_V6.get(Key::new(32 + 128, k))
    }
}

#[inline(always)]
pub fn in_mesh(set: u32, dst: &SockAddr) -> bool {
    if dst.family == 4 {
        let k: MeshKeyV4 = mesh_key(set, &dst.ip4());
        MESH_V4.get(Key::new(8 + 32, k)).is_some()
    } else {
        let k: MeshKeyV6 = mesh_key(set, &dst.addr);
        MESH_V6.get(Key::new(8 + 128, k)).is_some()
    }
}
