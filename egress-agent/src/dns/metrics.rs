//! The DNS proxy's metrics (`egress_dns_*`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// Why a DNS message was dropped (`reason` of `egress_dns_dropped`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// A query that is no DNS query, or an answer the parser refused (malformed, oversized).
    Malformed,
    /// A query from a socket the kernel did not steer (no original resolver known).
    NotSteered,
    /// The resolver did not answer in time (the client sees its own timeout).
    Timeout,
    /// The resolver could not be reached.
    Upstream,
    /// Too many queries in flight (of the workload, or in all).
    Busy,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::NotSteered => "not-steered",
            Dropped::Timeout => "timeout",
            Dropped::Upstream => "upstream-error",
            Dropped::Busy => "busy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtoLabel {
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

pub struct DnsMetrics {
    requests: Family<ProtoLabel, Counter>,
    answers: Counter,
    learned: Counter,
    dropped: Family<ReasonLabel, Counter>,
    pub entries: Gauge,
    pub names: Gauge,
    added: Histogram,
    pub binding_refused: Counter,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            answers: Counter::default(),
            learned: Counter::default(),
            dropped: Family::default(),
            entries: Gauge::default(),
            names: Gauge::default(),
            // 10 µs .. ~2.6 s
            added: Histogram::new(exponential_buckets(0.00001, 4.0, 10)),
            binding_refused: Counter::default(),
        };
        registry.register(
            "egress_dns_requests",
            "DNS queries of workloads the DNS proxy received, by protocol",
            m.requests.clone(),
        );
        registry.register(
            "egress_dns_answers",
            "DNS answers the DNS proxy passed back to workloads",
            m.answers.clone(),
        );
        registry.register(
            "egress_dns_learned_addresses",
            "Addresses learned from answers for names that a rule names",
            m.learned.clone(),
        );
        registry.register(
            "egress_dns_dropped",
            "DNS messages the proxy dropped, by reason (malformed, not-steered, timeout, upstream-error, busy)",
            m.dropped.clone(),
        );
        registry.register(
            "egress_dns_cache_entries",
            "Learned (workload, address) entries in the kernel's EGRESS_NAMES map",
            m.entries.clone(),
        );
        registry.register(
            "egress_dns_cache_names",
            "Learned (workload, name) pairs",
            m.names.clone(),
        );
        registry.register(
            "egress_dns_added_latency_seconds",
            "Time an answer spent in the agent (parse, map update, relay), not counting the resolver",
            m.added.clone(),
        );
        registry.register(
            "egress_proxy_host_address_mismatch",
            "Connections the proxy refused because their SNI/Host did not resolve to their destination for that workload (hostBinding: strict)",
            m.binding_refused.clone(),
        );
        m
    }

    pub fn request(&self, protocol: &str) {
        self.requests
            .get_or_create(&ProtoLabel {
                protocol: protocol.into(),
            })
            .inc();
    }

    pub fn answer(&self, added: std::time::Duration, learned: usize) {
        self.answers.inc();
        self.learned.inc_by(learned as u64);
        self.added.observe(added.as_secs_f64());
    }

    pub fn dropped(&self, why: Dropped) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: why.as_str().into(),
            })
            .inc();
    }
}
