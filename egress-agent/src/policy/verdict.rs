//! The proxy's verdicts beyond the kernel's: on a connection's host (SNI, `Host`) and on each
//! HTTP/1.x request ([`super::routes`]), from the compiled rules.

use std::net::IpAddr;

use super::{
    compile::{Compiled, RuleInfo},
    model::Action,
    routes::RequestView,
    scalar,
};

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
    /// rule) unless an applicable allow rule says `allowWithoutHost`. Policies in audit mode
    /// only turn what the enforced ones let through into [`HostVerdict::Audit`].
    pub fn decide_host(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        host: Option<&str>,
    ) -> HostVerdict {
        let ip = scalar::normalize(ip);
        self.two_passes(|audited| self.host_verdict(workload, ip, port, host, audited))
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
        let ip = scalar::normalize(ip);
        self.two_passes(|audited| self.request_verdict(workload, ip, port, r, audited))
    }

    /// Over the enforced rules, then with those in audit mode too: Ok(rule) lets through,
    /// Err(rule) refuses.
    fn two_passes(&self, verdict: impl Fn(bool) -> Result<u32, u32>) -> HostVerdict {
        let audit = self.config.audit_mode != 0;
        match verdict(false) {
            Err(id) if audit => HostVerdict::Audit(id),
            Err(id) => HostVerdict::Deny(id),
            Ok(id) => match verdict(true) {
                Err(audited) => HostVerdict::Audit(audited),
                Ok(_) => HostVerdict::Allow(id),
            },
        }
    }

    fn counts(&self, r: &RuleInfo, workload: u32, ip: IpAddr, port: u16, audited: bool) -> bool {
        (audited || !r.audit) && r.applies_tcp(workload, ip, port)
    }

    fn host_verdict(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        host: Option<&str>,
        audited: bool,
    ) -> Result<u32, u32> {
        let counts = |r: &RuleInfo| self.counts(r, workload, ip, port, audited);
        let Some(host) = host else {
            if let Some((_, id)) = self.rules.iter().zip(1u32..).find(|(r, _)| {
                r.action == Action::Allow && r.without_host && !r.cidrs.is_empty() && counts(r)
            }) {
                return Ok(id);
            }
            if let Some(&i) = self.host_rules.iter().find(|&&i| counts(&self.rules[i])) {
                return Err(i as u32 + 1);
            }
            return self.address_verdict(workload, ip, port, audited);
        };
        // Without a request to look at, an allow with HTTP routes allows nothing (and refuses
        // its host); a deny with routes refuses the whole host.
        let for_host = |action: Action, routes: Option<bool>| {
            self.host_rules.iter().find_map(|&i| {
                let r = &self.rules[i];
                (r.action == action
                    && routes.is_none_or(|want| r.http.is_empty() != want)
                    && counts(r)
                    && r.hosts.iter().any(|p| p.matches(host)))
                .then_some(i as u32 + 1)
            })
        };
        if let Some(id) = for_host(Action::Deny, None) {
            return Err(id);
        }
        if let Some(id) = for_host(Action::Allow, Some(false)) {
            return Ok(id);
        }
        if let Some(id) = for_host(Action::Allow, Some(true)) {
            return Err(id);
        }
        self.address_verdict(workload, ip, port, audited)
    }

    fn request_verdict(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        r: &RequestView<'_>,
        audited: bool,
    ) -> Result<u32, u32> {
        let Some(host) = r.host else {
            return self.host_verdict(workload, ip, port, None, audited);
        };
        let for_host = || {
            self.host_rules.iter().filter_map(move |&i| {
                let rule = &self.rules[i];
                (self.counts(rule, workload, ip, port, audited)
                    && rule.hosts.iter().any(|p| p.matches(host)))
                .then_some((rule, i as u32 + 1))
            })
        };
        if let Some((_, id)) =
            for_host().find(|(rule, _)| rule.action == Action::Deny && rule.http.matches(r))
        {
            return Err(id);
        }
        let mut allows = for_host().filter(|(rule, _)| rule.action == Action::Allow);
        let first = allows.next();
        if let Some((_, id)) = first
            .into_iter()
            .chain(allows)
            .find(|(rule, _)| rule.http.matches(r))
        {
            return Ok(id);
        }
        if let Some((_, id)) = first {
            return Err(id);
        }
        self.address_verdict(workload, ip, port, audited)
    }

    /// A host no host rule decided: allows by address (an audited one lets nothing more
    /// through than the enforced ones), then `enableEgress`.
    fn address_verdict(
        &self,
        workload: u32,
        ip: IpAddr,
        port: u16,
        audited: bool,
    ) -> Result<u32, u32> {
        let by_address = self.rules.iter().zip(1u32..).find(|(r, _)| {
            !r.audit
                && r.hosts.is_empty()
                && r.action == Action::Allow
                && self.counts(r, workload, ip, port, audited)
        });
        match by_address {
            Some((_, id)) => Ok(id),
            None if self.config.enable_egress != 0 => Ok(0),
            None => Err(0),
        }
    }
}
