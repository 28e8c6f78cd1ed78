//! `policy preview`: judges the flow history under the policy in force and under a candidate,
//! with the same compiled policy and `decide()` the kernel and the proxy use, and lists the
//! flows whose verdict would change (allowed -> refused, refused -> allowed, direct ->
//! proxied, ...), with the rule that would decide.

use std::{collections::HashMap, net::IpAddr};

use egress_common::{proto, Outcome};
use serde::Serialize;

use super::{compile::Compiled, verdict::HostVerdict};
use crate::telemetry::history::FlowRecord;

/// Where a connection goes, in the terms of a preview.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Let through to its destination (allowed, passthrough, mesh, audited).
    Allowed,
    /// Redirected to the proxy and let through there.
    Proxied,
    Refused,
    /// The workload is not in that policy (its connections are not judged).
    NoWorkload,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Allowed => "allowed",
            Route::Proxied => "proxied",
            Route::Refused => "refused",
            Route::NoWorkload => "no-workload",
        }
    }
}

/// One judgement: the route, the deciding Egress (empty: none) and the verdict's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judged {
    pub route: Route,
    pub rule: String,
    pub verdict: &'static str,
}

/// A history entry whose verdict the candidate changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub workload: String,
    pub destination: String,
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Connections the history holds for this flow, and when it was last seen (Unix ms).
    pub count: u64,
    pub last_ms: u64,
    pub before: Judged,
    pub after: Judged,
}

impl Change {
    /// The candidate would refuse what the policy in force lets through.
    pub fn is_new_deny(&self) -> bool {
        self.after.route == Route::Refused && self.before.route != Route::Refused
    }
}

/// Workload ids by name, resolved once per preview.
struct Ids<'a> {
    policy: &'a Compiled,
    by_name: HashMap<String, u32>,
}

impl<'a> Ids<'a> {
    fn new(policy: &'a Compiled) -> Self {
        let by_name = policy
            .workloads
            .iter()
            .map(|(w, id)| (w.to_string(), *id))
            .collect();
        Self { policy, by_name }
    }

    /// How `policy` judges one history entry: the kernel's decision, then the proxy's for a
    /// redirected connection whose rules name hosts (with the host the proxy saw, if any).
    fn judge(&self, r: &FlowRecord) -> Judged {
        let Some(&wid) = self.by_name.get(&r.key.workload) else {
            return Judged {
                route: Route::NoWorkload,
                rule: String::new(),
                verdict: "no-workload",
            };
        };
        let c = self.policy;
        let (ip, port) = (r.key.ip, r.key.port);
        let d = c.decide(wid, ip, port, r.key.proto);
        let (route, rule_id, verdict) = if d.outcome.is_denied() {
            (Route::Refused, d.rule_id, d.outcome.name())
        } else if d.outcome != Outcome::Proxy {
            (Route::Allowed, d.rule_id, d.outcome.name())
        } else if r.key.proto == proto::TCP && c.needs_host(wid, ip, port) {
            match c.decide_host(wid, ip, port, r.key.host.as_deref()) {
                HostVerdict::Allow(id) => (Route::Proxied, id, "proxy"),
                HostVerdict::Audit(id) => (Route::Proxied, id, "audit-host"),
                HostVerdict::Deny(id) => (Route::Refused, id, "deny-host"),
            }
        } else {
            (Route::Proxied, d.rule_id, "proxy")
        };
        Judged {
            route,
            rule: c
                .rule(rule_id)
                .map(|r| r.egress.to_string())
                .unwrap_or_default(),
            verdict,
        }
    }
}

/// The entries of `history` (of `workload` only, when given) whose route differs between
/// `current` and `candidate`, in the history's order.
pub fn preview(
    current: &Compiled,
    candidate: &Compiled,
    history: &[FlowRecord],
    workload: Option<&str>,
) -> Vec<Change> {
    let (before, after) = (Ids::new(current), Ids::new(candidate));
    history
        .iter()
        .filter(|r| workload.is_none_or(|w| r.key.workload == w))
        .filter_map(|r| {
            let (b, a) = (before.judge(r), after.judge(r));
            (b.route != a.route).then(|| Change {
                workload: r.key.workload.clone(),
                destination: std::net::SocketAddr::new(r.key.ip, r.key.port).to_string(),
                protocol: proto::name(r.key.proto),
                host: r.key.host.clone(),
                count: r.count,
                last_ms: r.last_ms,
                before: b,
                after: a,
            })
        })
        .collect()
}

/// What `policy preview` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Preview {
    /// History entries judged.
    pub flows: usize,
    pub changes: Vec<Change>,
    /// Changes to refused.
    pub new_denies: usize,
    /// How long judging took (both policies, every flow), milliseconds.
    pub judge_ms: f64,
}

impl Preview {
    pub fn new(flows: usize, changes: Vec<Change>) -> Self {
        let new_denies = changes.iter().filter(|c| c.is_new_deny()).count();
        Self {
            flows,
            changes,
            new_denies,
            judge_ms: 0.0,
        }
    }
}

/// A history entry (for tests and the benchmark).
pub fn record(
    workload: &str,
    ip: IpAddr,
    port: u16,
    protocol: u8,
    host: Option<&str>,
) -> FlowRecord {
    FlowRecord {
        key: crate::telemetry::history::FlowKey {
            workload: workload.into(),
            ip,
            port,
            proto: protocol,
            host: host.map(String::from),
        },
        first_ms: 0,
        last_ms: 0,
        count: 1,
        verdict: String::new(),
        rule: String::new(),
    }
}

#[cfg(test)]
mod tests;
