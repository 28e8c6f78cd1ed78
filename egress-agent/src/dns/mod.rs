//! Names you can trust: the agent's DNS proxy and what it learns.
//!
//! With `spec.dns.enabled`, the kernel steers every DNS query a workload is allowed to send
//! (UDP and TCP port 53) to the DNS proxy ([`server`]), which forwards it from the agent's
//! exempt cgroup to the resolver the workload asked and reads the answer. For a name that a
//! rule of that workload names, the answer's addresses (CNAME chains followed) go into the
//! kernel's `EGRESS_NAMES` map ([`cache`]: (workload, address) → the name rules' port
//! segments) **before** the answer is released to the workload, so its first packet is never
//! refused. Entries live for the answer's TTL (at least `minTtl`) plus `grace`; connections
//! opened meanwhile stay open after. The proxy binds SNI/Host to these answers
//! (`hostBinding: strict`, [`Names::binding`]). The learned names are saved to a state file
//! next to the policy's, so a restart (even kill -9) keeps them.

pub mod cache;
pub mod metrics;
pub mod server;
pub mod upstream;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, HashMap, MapData};
use egress_common::{fqdn::NameKey, names as map_names, wire::dns::Answer, PolicyValue};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    datapath::bpf::Datapath,
    policy::{Compiled, HostBinding, Live},
};
use cache::{name_key, wanted, Cache, NameEntry};
use metrics::DnsMetrics;

/// Answers kept for `egress-agent dns`.
const RECENT: usize = 200;
/// The learned names are saved at most this often (every answer refreshes some expiry).
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Where the learned names are saved: next to the live policy's state file.
pub fn names_file(state_file: &std::path::Path) -> PathBuf {
    state_file.with_extension("dns.json")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The DNS port the kernel steers to: the one the policy asks for, when the DNS proxy serves
/// it (it is opened at start only). A policy that turns DNS on, or moves its port, after the
/// agent started leaves DNS unsteered until a restart, rather than steering queries to a
/// port nobody serves.
pub fn steered_port(wanted: u16, serving: Option<&u16>) -> u16 {
    match serving {
        Some(&p) if p == wanted => wanted,
        _ if wanted == 0 => 0,
        _ => {
            warn!(port = wanted, "spec.dns changed since the agent started (the DNS proxy opens at start): DNS is not steered until the agent restarts");
            0
        }
    }
}

/// One answer, as `egress-agent dns` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Seen {
    pub at_ms: u64,
    pub workload: String,
    pub name: String,
    pub chain: Vec<String>,
    pub answers: Vec<String>,
    pub ttl: u32,
    pub rcode: u8,
    /// The rules the answer fed (name rules: kernel; host rules: the proxy's binding).
    pub rules: Vec<String>,
    pub added_us: u64,
}

/// A learned name, as `egress-agent dns` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Learned {
    pub workload: String,
    pub name: String,
    pub chain: Vec<String>,
    /// (address, seconds left of its TTL; negative: in grace).
    pub addrs: Vec<(String, i64)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsView {
    pub enabled: bool,
    pub learned: Vec<Learned>,
    pub recent: Vec<Seen>,
}

struct State {
    cache: Cache,
    /// What `EGRESS_NAMES` holds (by this agent's writes).
    installed: BTreeMap<NameKey, PolicyValue>,
    map: HashMap<MapData, NameKey, PolicyValue>,
    /// `EGRESS_NAMES_EPOCH`: bumped after every change of the entries (see [`bump_epoch`]).
    epoch: Array<MapData, u32>,
    recent: VecDeque<Seen>,
    /// Expiries were refreshed since the last save (saved at most every [`SAVE_EVERY`]).
    dirty: bool,
    /// Names or addresses came or went since the last save (saved at the next tick, so a
    /// restart keeps what connections may already use).
    changed: bool,
    saved_at: Option<std::time::Instant>,
}

pub struct Names {
    state: Mutex<State>,
    live: Arc<Live>,
    pub metrics: DnsMetrics,
    state_file: Option<PathBuf>,
}

impl Names {
    /// Opens the pinned `EGRESS_NAMES` map, restores the names saved by an earlier run
    /// (dropping expired ones) and makes the map agree with them.
    pub fn open(
        dp: &Datapath,
        live: Arc<Live>,
        metrics: DnsMetrics,
        state_file: Option<PathBuf>,
    ) -> anyhow::Result<Arc<Self>> {
        let map: HashMap<MapData, NameKey, PolicyValue> = dp.shared_map(map_names::NAMES)?;
        let epoch: Array<MapData, u32> = dp.shared_map(map_names::NAMES_EPOCH)?;
        let installed = map
            .iter()
            .filter_map(Result::ok)
            .collect::<BTreeMap<_, _>>();
        let mut cache = Cache::default();
        let grace = live.get().dns.grace.0.as_millis() as u64;
        if let Some(path) = &state_file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<NameEntry>>(&bytes) {
                    Ok(saved) => cache.restore(saved, now_ms(), grace),
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "ignoring the saved DNS names")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read the saved DNS names")
                }
            }
        }
        let names = Arc::new(Self {
            state: Mutex::new(State {
                cache,
                installed,
                map,
                epoch,
                recent: VecDeque::new(),
                dirty: false,
                changed: false,
                saved_at: None,
            }),
            live,
            metrics,
            state_file,
        });
        names.resync();
        let n = names.state().cache.len();
        if n > 0 {
            info!(names = n, "restored the learned DNS names");
        }
        Ok(names)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Learns an answer to workload `wid`; returns how many addresses went into the cache.
    /// The kernel's map holds them when this returns.
    pub fn learn(&self, wid: u32, a: &Answer, started: std::time::Instant) -> usize {
        let policy = self.live.get();
        let d = &policy.dns;
        let now = now_ms();
        let min_ttl = d.min_ttl.0.as_millis() as u64;
        let mut st = self.state();
        let want = a.rcode == 0 && !a.addrs.is_empty() && wanted(&policy, wid, &a.chain);
        let mut learned = 0;
        if want {
            let addrs: Vec<(IpAddr, u64)> = a
                .addrs
                .iter()
                .map(|x| (x.ip, now + (x.ttl as u64 * 1000).max(min_ttl)))
                .collect();
            learned = addrs.len().min(d.max_addresses_per_name as usize);
            let ttl = a.addrs.first().map(|x| x.ttl).unwrap_or(0);
            let ips: Vec<IpAddr> = a.addrs.iter().map(|x| x.ip).collect();
            let name = a.chain.first().map(String::as_str).unwrap_or("");
            st.changed |= !st.cache.knows(wid, name, &ips);
            let touched = st.cache.learn(
                wid,
                &a.chain,
                &addrs,
                ttl,
                now,
                d.max_addresses_per_name as usize,
            );
            sync_keys(&mut st, &policy, &touched);
            st.dirty = true;
        }
        let seen = Seen {
            at_ms: now,
            workload: policy
                .workload(wid)
                .map(|w| w.to_string())
                .unwrap_or_else(|| format!("#{wid}")),
            name: a.question.name.clone(),
            chain: a.chain.clone(),
            answers: a.addrs.iter().map(|x| x.ip.to_string()).collect(),
            ttl: a.addrs.first().map(|x| x.ttl).unwrap_or(0),
            rcode: a.rcode,
            rules: if want {
                rules_fed(&policy, wid, &a.chain)
            } else {
                Vec::new()
            },
            added_us: started.elapsed().as_micros() as u64,
        };
        if st.recent.len() >= RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back(seen);
        self.metrics.entries.set(st.installed.len() as i64);
        self.metrics.names.set(st.cache.len() as i64);
        learned
    }

    /// Whether the proxy may let a connection of `wid` to `ip` out under host `host`, which
    /// host rule `rule_id` allowed: with `hostBinding: strict`, only when `host` resolved to
    /// `ip` for that workload, or the rule names the address itself.
    pub fn binding(&self, p: &Compiled, wid: u32, host: &str, ip: IpAddr, rule_id: u32) -> bool {
        if p.host_binding == HostBinding::Off || rule_id == 0 {
            return true;
        }
        let Some(rule) = p.rule(rule_id) else {
            return true;
        };
        if rule.hosts.is_empty() || rule.cidrs.iter().any(|c| c.contains(ip)) {
            return true;
        }
        let grace = p.dns.grace.0.as_millis() as u64;
        let ok = self.state().cache.bound(wid, host, ip, now_ms(), grace);
        if !ok {
            self.metrics.binding_refused.inc();
        }
        ok
    }

    /// The kernel's entry for a workload's address (what `policy check` needs).
    pub fn value(&self, wid: u32, ip: IpAddr) -> Option<PolicyValue> {
        let policy = self.live.get();
        self.state().cache.value(&policy, wid, ip)
    }

    /// Forgets what expired, and saves the names when they changed (at most every
    /// [`SAVE_EVERY`]). Blocking (file I/O): call it off the async runtime.
    pub fn tick(&self) {
        let policy = self.live.get();
        let grace = policy.dns.grace.0.as_millis() as u64;
        let mut st = self.state();
        let touched = st.cache.expire(now_ms(), grace);
        if !touched.is_empty() {
            sync_keys(&mut st, &policy, &touched);
            st.changed = true;
        }
        self.metrics.entries.set(st.installed.len() as i64);
        self.metrics.names.set(st.cache.len() as i64);
        let due = st.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
        if st.changed || (st.dirty && due) {
            (st.dirty, st.changed) = (false, false);
            st.saved_at = Some(std::time::Instant::now());
            let saved: Vec<NameEntry> = st.cache.entries().cloned().collect();
            drop(st);
            self.save(&saved);
        }
    }

    fn save(&self, saved: &[NameEntry]) {
        let Some(path) = &self.state_file else { return };
        let tmp = path.with_extension("tmp");
        let res = serde_json::to_vec(saved)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, "cannot save the learned DNS names");
        }
    }

    /// After a policy change: rule ids and workloads may have moved; every entry is
    /// recomputed.
    pub fn resync(&self) {
        let policy = self.live.get();
        let mut st = self.state();
        let live: BTreeSet<u32> = policy.workloads.iter().map(|(_, id)| *id).collect();
        st.cache.retain_workloads(&live);
        let keys: Vec<(u32, IpAddr)> = st.cache.addresses().collect();
        let mut want: BTreeMap<NameKey, PolicyValue> = BTreeMap::new();
        for (wid, ip) in keys {
            if let Some(v) = st.cache.value(&policy, wid, ip) {
                want.insert(name_key(wid, ip), v);
            }
        }
        let stale: Vec<NameKey> = st
            .installed
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        let mut changed = false;
        for k in stale {
            changed |= remove(&mut st, &k);
        }
        for (k, v) in want {
            changed |= put(&mut st, k, v);
        }
        if changed {
            bump_epoch(&mut st);
        }
        st.changed = true;
    }

    /// Runs the expiry and the policy-change resync until dropped.
    pub async fn maintain(self: Arc<Self>) {
        let mut changes = self.live.subscribe();
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                // Off the runtime's workers: saving thousands of names takes milliseconds
                // that the DNS proxy's queries should not wait behind.
                _ = every.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.tick()).await;
                }
                r = changes.changed() => {
                    if r.is_err() { return; }
                    self.resync();
                }
            }
        }
    }

    /// What `egress-agent dns` shows.
    pub fn view(&self) -> DnsView {
        let policy = self.live.get();
        let st = self.state();
        let now = now_ms() as i64;
        let learned = st
            .cache
            .entries()
            .map(|e| Learned {
                workload: policy
                    .workload(e.workload)
                    .map(|w| w.to_string())
                    .unwrap_or_default(),
                name: e.chain.first().cloned().unwrap_or_default(),
                chain: e.chain.clone(),
                addrs: e
                    .addrs
                    .iter()
                    .map(|(ip, t)| (ip.to_string(), (*t as i64 - now) / 1000))
                    .collect(),
            })
            .collect();
        DnsView {
            enabled: policy.dns.enabled,
            learned,
            recent: st.recent.iter().cloned().collect(),
        }
    }
}

/// The rules (Egress names) an answer feeds.
fn rules_fed(p: &Compiled, wid: u32, chain: &[String]) -> Vec<String> {
    p.name_rules
        .iter()
        .chain(&p.host_rules)
        .filter(|&&i| {
            let r = &p.rules[i];
            r.workloads.contains(&wid) && chain.iter().any(|n| r.hosts.iter().any(|h| h.matches(n)))
        })
        .map(|&i| p.rules[i].egress.to_string())
        .collect()
}

/// Brings the kernel entries of `touched` in line with the cache.
fn sync_keys(st: &mut State, p: &Compiled, touched: &[(u32, IpAddr)]) {
    let mut changed = false;
    for &(wid, ip) in touched {
        let k = name_key(wid, ip);
        changed |= match st.cache.value(p, wid, ip) {
            Some(v) => put(st, k, v),
            None => remove(st, &k),
        };
    }
    if changed {
        bump_epoch(st);
    }
}

/// Bumps `EGRESS_NAMES_EPOCH` after the entries changed (never before: a hook judging in
/// between would cache a verdict under the new epoch from the old entries). Cached drops are
/// judged again (a new address may now pass), and the socket hooks stop trusting cached
/// passes (a forgotten address no longer does).
fn bump_epoch(st: &mut State) {
    let next = st.epoch.get(&0, 0).unwrap_or(0).wrapping_add(1);
    if let Err(e) = st.epoch.set(0, next, 0) {
        warn!(error = %e, "cannot bump EGRESS_NAMES_EPOCH; verdicts cached before this DNS change stand until the policy changes");
    }
}

/// Writes one entry; true when the map changed.
fn put(st: &mut State, k: NameKey, v: PolicyValue) -> bool {
    if st.installed.get(&k) == Some(&v) {
        return false;
    }
    match st.map.insert(k, v, 0) {
        Ok(()) => {
            st.installed.insert(k, v);
            true
        }
        Err(e) => {
            warn!(error = %e, "cannot write a learned address into EGRESS_NAMES (full?); connections to it are refused");
            false
        }
    }
}

/// Deletes one entry; true when the map changed.
fn remove(st: &mut State, k: &NameKey) -> bool {
    if st.installed.remove(k).is_none() {
        return false;
    }
    let _ = st.map.remove(k);
    true
}
