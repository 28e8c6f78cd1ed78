//! `policy check`: what the kernel decides for a workload's connection, and why.

use std::net::IpAddr;

use egress_common::proto;
use serde::Serialize;

use super::{Control, ControlError};
use crate::policy::ObjectRef;

impl Control {
    /// `policy check`: what the kernel decides for a workload's connection, and why.
    pub fn check(
        &self,
        workload: &ObjectRef,
        ip: IpAddr,
        port: u16,
        protocol: u8,
    ) -> Result<Check, ControlError> {
        let c = self.live.get();
        let wid = c
            .workload_id(workload)
            .ok_or_else(|| ControlError::NotFound(format!("no Workload {workload}")))?;
        let named = self.names.get().and_then(|n| n.value(wid, ip));
        let d = c.decide_named(wid, ip, port, protocol, named.as_ref());
        let rule = c.rule(d.rule_id);
        let hosts = if d.outcome == egress_common::Outcome::Proxy
            && protocol == proto::TCP
            && c.needs_host(wid, ip, port)
        {
            c.rules
                .iter()
                .filter(|r| !r.hosts.is_empty() && r.applies_tcp(wid, ip, port))
                .flat_map(|r| {
                    r.hosts
                        .iter()
                        .map(|h| format!("{h} ({:?} by {})", r.action, r.egress).to_lowercase())
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Check {
            workload: workload.to_string(),
            destination: std::net::SocketAddr::new(ip, port).to_string(),
            protocol: egress_common::proto::name(protocol).into(),
            verdict: d.outcome.name().into(),
            refused: d.outcome.is_denied(),
            rule: rule.map(|r| r.name()).unwrap_or_default(),
            reason: crate::policy::tiers::explain(d.outcome, rule.map(|r| (r.kind, &r.egress)))
                .unwrap_or_else(|| reason(d.outcome, rule.map(|r| r.egress.to_string()))),
            hosts,
            generation: self.generation(),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub workload: String,
    pub destination: String,
    pub protocol: String,
    pub verdict: String,
    pub refused: bool,
    pub rule: String,
    pub reason: String,
    /// For a redirect that the proxy judges by host: the host rules that apply.
    pub hosts: Vec<String>,
    pub generation: u64,
}

fn reason(o: egress_common::Outcome, rule: Option<String>) -> String {
    use egress_common::Outcome::*;
    let rule = rule.unwrap_or_default();
    match o {
        Mesh => "the destination is in a mesh CIDR: not egress".into(),
        Pass => "no Egress rule matches and enableEgress is true".into(),
        Allow => format!("allowed directly by Egress {rule}"),
        Proxy => format!("redirected to the proxy by Egress {rule}"),
        DenyRule => format!("denied by Egress {rule} (deny always wins)"),
        DenyDefault => "no Egress rule matches and enableEgress is false".into(),
        DenyProxyPort => "the proxy port is never dialled directly".into(),
        DenyError => "internal error, failMode closed".into(),
        AuditRule => format!("would be denied by Egress {rule}; allowed and reported (audit mode)"),
        AuditDefault => {
            "would be denied (no rule, enableEgress false); allowed by auditMode".into()
        }
        ErrorOpen => "internal error, failMode open".into(),
    }
}
