//! The metrics every relay has, the node proxy's and the gateway's alike: bytes each way, the
//! time the far side took to answer, and the connections being relayed now. Each component
//! registers them under its own prefix (`egress_proxy`, `egress_gateway`).

use std::time::Duration;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use super::labels::DirectionLabels;

/// HELP texts of one relay's metrics.
pub struct RelayHelp {
    pub bytes: &'static str,
    pub connect: &'static str,
    pub active: &'static str,
}

pub struct RelayMetrics {
    bytes: Family<DirectionLabels, Counter>,
    connect: Histogram,
    active: Gauge,
}

impl RelayMetrics {
    /// Registers `<prefix>_bytes`, `<prefix>_connect_duration_seconds` and
    /// `<prefix>_active_connections`.
    pub fn register(registry: &mut Registry, prefix: &str, help: RelayHelp) -> Self {
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(format!("{prefix}_bytes"), help.bytes, bytes.clone());
        let connect = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            format!("{prefix}_connect_duration_seconds"),
            help.connect,
            connect.clone(),
        );
        let active = Gauge::default();
        registry.register(
            format!("{prefix}_active_connections"),
            help.active,
            active.clone(),
        );
        Self {
            bytes,
            connect,
            active,
        }
    }

    /// Bytes relayed (upstream, downstream) by a connection that ended.
    pub fn relayed(&self, bytes: (u64, u64)) {
        for (labels, n) in DirectionLabels::both(bytes) {
            self.bytes.get_or_create(&labels).inc_by(n);
        }
    }

    /// The far side answered after `took`.
    pub fn connected(&self, took: Duration) {
        self.connect.observe(took.as_secs_f64());
    }

    /// Connections being relayed.
    pub fn active(&self) -> &Gauge {
        &self.active
    }
}
