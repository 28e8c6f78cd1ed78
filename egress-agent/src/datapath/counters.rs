//! What the kernel counted, for the metrics snapshot and `status`: the per-CPU verdict and tc
//! counters summed over the CPUs, map fill and capacity, and zeroing a reused workload id.

use std::path::Path;

use aya::maps::{HashMap, LpmTrie, PerCpuArray};
use egress_common::{
    names, tc::TcCount, OrigDst, OrigKey, PolicyKeyV4, PolicyKeyV6, PolicyValue, WorkloadInfo,
};

use super::{
    bpf::Datapath,
    error::{io, map_err, BpfError},
    pins::map_data,
};
use crate::policy::Compiled;

impl Datapath {
    /// Zeroes the counters of a workload id, before it is given to a new workload.
    pub fn zero_counters(&mut self, workload_id: u32) -> Result<(), BpfError> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            op: "read",
            source: e,
        })?;
        let mut c: PerCpuArray<_, u64> = self.map(names::COUNTERS)?;
        let first = egress_common::counter_index(workload_id, 0, 0);
        for i in first..first + egress_common::COUNTER_SLOTS {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]).map_err(io(
                Path::new("/sys/devices/system/cpu/possible"),
                "per-CPU values",
            ))?;
            c.set(i, zeros, 0).map_err(map_err(names::COUNTERS))?;
        }
        let mut t: PerCpuArray<_, TcCount> = self.map(names::TC_COUNTERS)?;
        let first = egress_common::tc::tc_index(workload_id, 0);
        for i in first..first + egress_common::tc::TC_SLOTS {
            let zeros =
                aya::maps::PerCpuValues::try_from(vec![TcCount::default(); ncpu]).map_err(io(
                    Path::new("/sys/devices/system/cpu/possible"),
                    "per-CPU values",
                ))?;
            t.set(i, zeros, 0).map_err(map_err(names::TC_COUNTERS))?;
        }
        let mut d: PerCpuArray<_, u64> = self.map(names::PACKET_DROPS)?;
        let first = egress_common::skb::skb_index(workload_id, 0);
        for i in first..first + egress_common::skb::SKB_SLOTS {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]).map_err(io(
                Path::new("/sys/devices/system/cpu/possible"),
                "per-CPU values",
            ))?;
            d.set(i, zeros, 0).map_err(map_err(names::PACKET_DROPS))?;
        }
        Ok(())
    }

    /// Packets the per-packet program dropped, summed over the CPUs, by (workload id, drop
    /// slot: a denying outcome or `egress_common::skb::DROP_*`). Zero slots are left out.
    pub fn packet_drop_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8), u64> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, u64>>(names::PACKET_DROPS) else {
            return out;
        };
        for &w in workloads {
            for slot in 0..egress_common::skb::SKB_SLOTS as u8 {
                if egress_common::skb::skb_drop_reason(slot).is_none() {
                    continue;
                }
                if let Ok(v) = c.get(&egress_common::skb::skb_index(w, slot), 0) {
                    let n: u64 = v.iter().sum();
                    if n > 0 {
                        out.insert((w, slot), n);
                    }
                }
            }
        }
        out
    }

    /// The tc backstop's counters of the given workloads, summed over the CPUs, keyed by
    /// (workload id, slot): (packets, bytes). Slots with nothing counted are left out.
    pub fn tc_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8), (u64, u64)> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, TcCount>>(names::TC_COUNTERS) else {
            return out;
        };
        for &w in workloads {
            for slot in 0..egress_common::tc::TC_SLOTS as u8 {
                if let Ok(v) = c.get(&egress_common::tc::tc_index(w, slot), 0) {
                    let (p, b) = v
                        .iter()
                        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                    if p > 0 {
                        out.insert((w, slot), (p, b));
                    }
                }
            }
        }
        out
    }

    /// Every counter of the given workloads, summed over the CPUs, keyed by (workload id,
    /// outcome or [`egress_common::EVENT_LOST`], protocol TCP/UDP/ANY).
    pub fn counter_sums(
        &mut self,
        workloads: &[u32],
    ) -> std::collections::HashMap<(u32, u8, u8), u64> {
        let mut out = std::collections::HashMap::new();
        let Ok(c) = self.map::<PerCpuArray<_, u64>>(names::COUNTERS) else {
            return out;
        };
        let slots = egress_common::Outcome::ALL
            .iter()
            .map(|o| *o as u8)
            .chain([egress_common::EVENT_LOST]);
        let slots: Vec<u8> = slots.collect();
        for &w in workloads {
            for &o in &slots {
                for p in [
                    egress_common::proto::TCP,
                    egress_common::proto::UDP,
                    egress_common::proto::ANY,
                ] {
                    let i = egress_common::counter_index(w, o, p);
                    if let Ok(v) = c.get(&i, 0) {
                        out.insert((w, o, p), v.iter().sum());
                    }
                }
            }
        }
        out
    }

    /// (map, entries, capacity) for the metrics. Policy entries are known from the policy
    /// in force; the LRU maps are counted.
    pub fn map_fill(&mut self, policy: &Compiled) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        let known = [
            (names::WORKLOADS, policy.workloads.len()),
            (names::POLICY_V4, policy.v4.len()),
            (names::POLICY_V6, policy.v6.len()),
        ];
        for (name, n) in known {
            if let Some(cap) = self
                .ebpf
                .map(name)
                .and_then(map_data)
                .and_then(|d| d.info().ok())
            {
                out.push((name, n, cap.max_entries()));
            }
        }
        if let Ok(m) = self.map::<HashMap<_, OrigKey, OrigDst>>(names::ORIG_BY_TUPLE) {
            let n = m.keys().count();
            out.push((names::ORIG_BY_TUPLE, n, egress_common::capacity::ORIG_DST));
        }
        out
    }

    /// Entries per map, for `status`.
    pub fn map_entries(&mut self) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        if let Ok(w) = self.map::<HashMap<_, u64, WorkloadInfo>>(names::WORKLOADS) {
            out.push((names::WORKLOADS, w.keys().count()));
        }
        if let Ok(t) = self.map::<LpmTrie<_, PolicyKeyV4, PolicyValue>>(names::POLICY_V4) {
            out.push((names::POLICY_V4, t.keys().count()));
        }
        if let Ok(t) = self.map::<LpmTrie<_, PolicyKeyV6, PolicyValue>>(names::POLICY_V6) {
            out.push((names::POLICY_V6, t.keys().count()));
        }
        out
    }
}
