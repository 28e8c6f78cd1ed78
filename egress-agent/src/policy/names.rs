//! The MeshConfig settings of DNS-aware name rules (`spec.dns`, `spec.hostBinding`); which
//! Egress objects are name rules is `EgressSpec::is_name_rule` (model).

use std::time::Duration;

use serde::Deserialize;

use super::scalar::{Port, Seconds};

pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Addresses kept per name and workload (CDN answers rotate): the oldest go first.
pub const DEFAULT_MAX_ADDRESSES: u32 = 1000;

/// `spec.dns`: workloads' DNS goes through the agent, which learns the addresses of the
/// names that name rules allow.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DnsSpec {
    pub enabled: bool,
    /// The DNS proxy's port (UDP and TCP) on 127.0.0.1 and [::1].
    pub port: Port,
    /// Learned addresses live at least this long, whatever the answer's TTL.
    pub min_ttl: Seconds,
    /// After the TTL, new connections are still allowed this long.
    pub grace: Seconds,
    /// Addresses kept per (workload, name).
    pub max_addresses_per_name: u32,
    /// How long the proxy waits for the resolver.
    pub upstream_timeout: Seconds,
}

impl Default for DnsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            port: Port(DEFAULT_DNS_PORT),
            min_ttl: Seconds(Duration::from_secs(5)),
            grace: Seconds(Duration::from_secs(5)),
            max_addresses_per_name: DEFAULT_MAX_ADDRESSES,
            upstream_timeout: Seconds(Duration::from_secs(5)),
        }
    }
}

/// `spec.hostBinding`: whether the proxy accepts an SNI/Host only on an address that name
/// resolved to for the workload.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HostBinding {
    Strict,
    #[default]
    Off,
}

impl HostBinding {
    /// The setting in force: as given; otherwise strict when the agent sees DNS, else off.
    pub fn effective(given: Option<HostBinding>, dns: &DnsSpec) -> HostBinding {
        given.unwrap_or(if dns.enabled {
            HostBinding::Strict
        } else {
            HostBinding::Off
        })
    }
}
