//! What the workloads' DNS answers taught the agent: per (workload, name asked), the CNAME
//! chain and the addresses with their expiry; and what that means for the kernel's
//! `EGRESS_NAMES` (the port segments of the name rules that match) and for the proxy's host
//! binding. Pure: time comes in as milliseconds since the epoch.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use egress_common::{action, fqdn::NameKey, PolicyValue, PortRule, SockAddr};
use serde::{Deserialize, Serialize};

use crate::policy::{normalize, Compiled};

/// One name a workload asked, and what the last answers said.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NameEntry {
    pub workload: u32,
    /// The name asked first, then its CNAME chain.
    pub chain: Vec<String>,
    /// Address → when its TTL (at least `minTtl`) runs out, ms since the epoch.
    pub addrs: BTreeMap<IpAddr, u64>,
    /// The TTL of the last answer's first address, seconds (for `egress-agent dns`).
    pub ttl: u32,
    /// When the last answer came, ms since the epoch.
    pub updated_ms: u64,
}

/// The learned names of every workload.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    entries: BTreeMap<(u32, String), NameEntry>,
    by_addr: BTreeMap<(u32, IpAddr), BTreeSet<String>>,
}

/// Whether a rule applying to `wid` names one of `chain` (a name rule for the kernel, or a
/// host rule for the proxy's binding).
pub fn wanted(c: &Compiled, wid: u32, chain: &[String]) -> bool {
    c.name_rules.iter().chain(&c.host_rules).any(|&i| {
        let r = &c.rules[i];
        r.workloads.contains(&wid) && chain.iter().any(|n| r.hosts.iter().any(|p| p.matches(n)))
    })
}

impl Cache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &NameEntry> {
        self.entries.values()
    }

    /// Whether `wid` learned `name` with every one of `ips` already (a new answer would only
    /// refresh expiries).
    pub fn knows(&self, wid: u32, name: &str, ips: &[IpAddr]) -> bool {
        self.entries
            .get(&(wid, name.to_string()))
            .is_some_and(|e| ips.iter().all(|ip| e.addrs.contains_key(&normalize(*ip))))
    }

    /// Records an answer of workload `wid`: `chain` from the name asked, `addrs` with their
    /// expiry. At most `max_addrs` addresses are kept per name (those expiring first go).
    /// Returns the (workload, address) pairs whose kernel entry may change.
    pub fn learn(
        &mut self,
        wid: u32,
        chain: &[String],
        addrs: &[(IpAddr, u64)],
        ttl: u32,
        now_ms: u64,
        max_addrs: usize,
    ) -> Vec<(u32, IpAddr)> {
        let Some(name) = chain.first() else {
            return Vec::new();
        };
        let e = self
            .entries
            .entry((wid, name.clone()))
            .or_insert_with(|| NameEntry {
                workload: wid,
                ..Default::default()
            });
        e.chain = chain.to_vec();
        e.ttl = ttl;
        e.updated_ms = now_ms;
        let mut touched = Vec::new();
        for &(ip, until) in addrs {
            let ip = normalize(ip);
            let t = e.addrs.entry(ip).or_insert(0);
            *t = (*t).max(until);
            touched.push((wid, ip));
        }
        let mut dropped = Vec::new();
        while e.addrs.len() > max_addrs.max(1) {
            let Some((&oldest, _)) = e.addrs.iter().min_by_key(|(_, t)| **t) else {
                break;
            };
            e.addrs.remove(&oldest);
            dropped.push(oldest);
        }
        let kept: Vec<IpAddr> = e.addrs.keys().copied().collect();
        for ip in kept {
            self.by_addr
                .entry((wid, ip))
                .or_default()
                .insert(name.clone());
        }
        for ip in dropped {
            self.unindex(wid, ip, name);
            touched.push((wid, ip));
        }
        touched
    }

    fn unindex(&mut self, wid: u32, ip: IpAddr, name: &str) {
        if let Some(names) = self.by_addr.get_mut(&(wid, ip)) {
            names.remove(name);
            if names.is_empty() {
                self.by_addr.remove(&(wid, ip));
            }
        }
    }

    /// Forgets addresses whose TTL plus `grace_ms` passed, and names left with none.
    /// Returns the (workload, address) pairs whose kernel entry may change.
    pub fn expire(&mut self, now_ms: u64, grace_ms: u64) -> Vec<(u32, IpAddr)> {
        let mut gone = Vec::new();
        for ((wid, name), e) in self.entries.iter_mut() {
            e.addrs.retain(|ip, until| {
                let keep = until.saturating_add(grace_ms) > now_ms;
                if !keep {
                    gone.push((*wid, *ip, name.clone()));
                }
                keep
            });
        }
        self.entries.retain(|_, e| !e.addrs.is_empty());
        let mut touched = Vec::with_capacity(gone.len());
        for (wid, ip, name) in gone {
            self.unindex(wid, ip, &name);
            touched.push((wid, ip));
        }
        touched
    }

    /// Drops the names of workloads that are gone.
    pub fn retain_workloads(&mut self, live: &BTreeSet<u32>) {
        self.entries.retain(|(w, _), _| live.contains(w));
        self.by_addr.retain(|(w, _), _| live.contains(w));
    }

    /// The names whose answers gave `ip` to workload `wid`.
    fn names_at(&self, wid: u32, ip: IpAddr) -> impl Iterator<Item = &NameEntry> {
        self.by_addr
            .get(&(wid, normalize(ip)))
            .into_iter()
            .flatten()
            .filter_map(move |n| self.entries.get(&(wid, n.clone())))
    }

    /// Whether `host` resolved to `ip` for workload `wid` (as the name asked or along its
    /// chain), within TTL plus `grace_ms`.
    pub fn bound(&self, wid: u32, host: &str, ip: IpAddr, now_ms: u64, grace_ms: u64) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = normalize(ip);
        self.names_at(wid, ip).any(|e| {
            e.chain.contains(&host)
                && e.addrs
                    .get(&ip)
                    .is_some_and(|t| t.saturating_add(grace_ms) > now_ms)
        })
    }

    /// The kernel entry of (`wid`, `ip`): the segments of every name rule of the workload
    /// that matches a name that resolved to `ip`; `None` when no name rule does.
    pub fn value(&self, c: &Compiled, wid: u32, ip: IpAddr) -> Option<PolicyValue> {
        let mut rules: Vec<PortRule> = Vec::new();
        for e in self.names_at(wid, ip) {
            for &i in &c.name_rules {
                let r = &c.rules[i];
                let matches = r.workloads.contains(&wid)
                    && e.chain.iter().any(|n| r.hosts.iter().any(|p| p.matches(n)));
                if !matches {
                    continue;
                }
                for &(lo, hi, proto) in &r.ports {
                    let pr = PortRule {
                        port_lo: lo,
                        port_hi: hi,
                        proto,
                        action: action::ALLOW,
                        rule_id: i as u32 + 1,
                    };
                    if !rules.contains(&pr) {
                        rules.push(pr);
                    }
                }
            }
        }
        if rules.is_empty() {
            return None;
        }
        // Too many distinct port ranges for one entry: keep what fits (the first rules).
        let mut rules = rules.as_slice();
        loop {
            match crate::policy::compile::segments(rules, |_| false) {
                Ok(v) => return Some(v),
                Err(_) if rules.len() > 1 => rules = &rules[..rules.len() - 1],
                Err(_) => return None,
            }
        }
    }

    /// Every (workload, address) the cache knows.
    pub fn addresses(&self) -> impl Iterator<Item = (u32, IpAddr)> + '_ {
        self.by_addr.keys().copied()
    }

    /// Restores saved entries (a restart), dropping the expired ones.
    pub fn restore(&mut self, saved: Vec<NameEntry>, now_ms: u64, grace_ms: u64) {
        for e in saved {
            let addrs: Vec<(IpAddr, u64)> = e.addrs.iter().map(|(ip, t)| (*ip, *t)).collect();
            self.learn(
                e.workload,
                &e.chain,
                &addrs,
                e.ttl,
                e.updated_ms,
                usize::MAX,
            );
        }
        self.expire(now_ms, grace_ms);
    }
}

/// The kernel's key for a workload's address.
pub fn name_key(wid: u32, ip: IpAddr) -> NameKey {
    let a = match normalize(ip) {
        IpAddr::V4(v4) => SockAddr::v4(v4.octets(), 0),
        IpAddr::V6(v6) => SockAddr::v6(v6.octets(), 0),
    };
    NameKey::of(wid, &a)
}

#[cfg(test)]
mod tests;
