//! The proxy's verdicts beyond the kernel's: on a connection's host (SNI, `Host`) and on each
//! HTTP/1.x request ([`super::routes`]), from the compiled rules.

use std::net::IpAddr;

use super::{compile::Compiled, model::Action, routes::RequestView, scalar};

/// The proxy's decision about a host; the number is the deciding rule id (0: none, the
/// mesh default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostVerdict {
    Allow(u32),
    Deny(u32),
    /// Audit mode: would be denied; forwarded and reported.
    Audit(u32),
}

impl Compiled {
    /// The proxy's verdict for a redirected TCP connection whose host is `host` (None: the
    /// client named none, or spoke neither TLS nor HTTP). Host denies win, then host allows,
    /// then allows by address; otherwise `enableEgress` decides, as in the kernel. Fail
    /// closed: where a host rule applies, no host is refused (the verdict names that host
    /// rule) unless an applicable allow rule says `allowWithoutHost`.
    pub fn decide_host(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        host: Option<&str>,
    ) -> HostVerdict {
        let ip = scalar::normalize(ip);
        let applicable = || {
            self.rules
                .iter()
                .zip(1u32..)
                .filter(move |(r, _)| r.applies_tcp(workload, ip, port))
        };
        // Without a request to look at, an allow with HTTP routes allows nothing; a deny with
        // routes refuses the whole host.
        let by_host = |action: Action| {
            let host = host?;
            self.host_rules.iter().find_map(|&i| {
                let r = &self.rules[i];
                (r.action == action
                    && (action == Action::Deny || r.http.is_empty())
                    && r.applies_tcp(workload, ip, port)
                    && r.hosts.iter().any(|p| p.matches(host)))
                .then_some((r, i as u32 + 1))
            })
        };
        let audit = self.config.audit_mode != 0;
        if host.is_none() {
            if let Some((_, id)) = applicable()
                .find(|(r, _)| r.action == Action::Allow && r.without_host && !r.cidrs.is_empty())
            {
                return HostVerdict::Allow(id);
            }
            if let Some(&i) = self
                .host_rules
                .iter()
                .find(|&&i| self.rules[i].applies_tcp(workload, ip, port))
            {
                let id = i as u32 + 1;
                return if audit {
                    HostVerdict::Audit(id)
                } else {
                    HostVerdict::Deny(id)
                };
            }
        }
        if let Some((_, id)) = by_host(Action::Deny) {
            return if audit {
                HostVerdict::Audit(id)
            } else {
                HostVerdict::Deny(id)
            };
        }
        if let Some((_, id)) = by_host(Action::Allow) {
            return HostVerdict::Allow(id);
        }
        if let Some(id) = host.and_then(|h| self.routes_only(workload, ip, port, h)) {
            return if audit {
                HostVerdict::Audit(id)
            } else {
                HostVerdict::Deny(id)
            };
        }
        self.decide_by_address(workload, ip, port)
    }

    /// A host no host rule decided: allows by address, then `enableEgress`.
    pub fn decide_by_address(&self, workload: u32, ip: IpAddr, port: u16) -> HostVerdict {
        let ip = scalar::normalize(ip);
        let audit = self.config.audit_mode != 0;
        let applicable = || {
            self.rules
                .iter()
                .zip(1u32..)
                .filter(move |(r, _)| r.applies_tcp(workload, ip, port))
        };
        if let Some((_, id)) =
            applicable().find(|(r, _)| r.hosts.is_empty() && r.action == Action::Allow)
        {
            return HostVerdict::Allow(id);
        }
        if self.config.enable_egress != 0 {
            HostVerdict::Allow(0)
        } else if audit {
            HostVerdict::Audit(0)
        } else {
            HostVerdict::Deny(0)
        }
    }

    /// The verdict for one HTTP/1.x request of a workload's connection to `ip:port` (see
    /// [`super::routes`]).
    pub fn decide_request(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        r: &RequestView<'_>,
    ) -> HostVerdict {
        let Some(host) = r.host else {
            return self.decide_host(workload, ip, port, None);
        };
        let ip = scalar::normalize(ip);
        let audit = self.config.audit_mode != 0;
        let refuse = |id| {
            if audit {
                HostVerdict::Audit(id)
            } else {
                HostVerdict::Deny(id)
            }
        };
        let for_host = || {
            self.host_rules.iter().filter_map(move |&i| {
                let rule = &self.rules[i];
                (rule.applies_tcp(workload, ip, port) && rule.hosts.iter().any(|p| p.matches(host)))
                    .then_some((rule, i as u32 + 1))
            })
        };
        if let Some((_, id)) =
            for_host().find(|(rule, _)| rule.action == Action::Deny && rule.http.matches(r))
        {
            return refuse(id);
        }
        let mut allows = for_host().filter(|(rule, _)| rule.action == Action::Allow);
        let first = allows.next();
        if let Some((_, id)) = first
            .into_iter()
            .chain(allows)
            .find(|(rule, _)| rule.http.matches(r))
        {
            return HostVerdict::Allow(id);
        }
        if let Some((_, id)) = first {
            return refuse(id);
        }
        self.decide_by_address(workload, ip, port)
    }

    /// The first allow rule for `host` with HTTP routes, when one exists: a connection whose
    /// requests the proxy cannot see (TLS) is refused in its name.
    fn routes_only(&self, workload: u32, ip: IpAddr, port: u16, host: &str) -> Option<u32> {
        self.host_rules.iter().find_map(|&i| {
            let r = &self.rules[i];
            (r.action == Action::Allow
                && !r.http.is_empty()
                && r.applies_tcp(workload, ip, port)
                && r.hosts.iter().any(|p| p.matches(host)))
            .then_some(i as u32 + 1)
        })
    }
}
