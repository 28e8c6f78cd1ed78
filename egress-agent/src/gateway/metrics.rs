//! The gateway server's metrics (`egress_gateway_*` and its `egress_build_info`), registered
//! into the registry its `/metrics` serves.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::telemetry::{
    labels::label_value,
    relay::{RelayHelp, RelayMetrics},
};

/// What a tunnel's client spoke (`protocol`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TunnelProtocol {
    Socks5,
    HttpConnect,
    Http2Tunnel,
}

impl TunnelProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Socks5 => "socks5",
            Self::HttpConnect => "http-connect",
            Self::Http2Tunnel => "http2tunnel",
        }
    }
}

label_value!(TunnelProtocol);

/// How a tunnel ended (`result`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TunnelResult {
    Allowed,
    /// No allow rule of the gateway matches.
    Refused,
    UpstreamError,
    /// `maxConnections` tunnels were open.
    OverLimit,
    BadRequest,
}

impl TunnelResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Refused => "refused",
            Self::UpstreamError => "upstream-error",
            Self::OverLimit => "over-limit",
            Self::BadRequest => "bad-request",
        }
    }
}

label_value!(TunnelResult);

/// `egress_gateway_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub protocol: TunnelProtocol,
    pub result: TunnelResult,
}

/// `egress_build_info` of the gateway.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// The gateway's metrics.
pub struct GatewayMetrics {
    connections: Family<TunnelLabels, Counter>,
    relay: RelayMetrics,
}

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let connections = Family::<TunnelLabels, Counter>::default();
        registry.register(
            "egress_gateway_connections",
            "Tunnels the gateway handled, by protocol (socks5, http-connect, http2tunnel) and result",
            connections.clone(),
        );
        let relay = RelayMetrics::register(
            registry,
            "egress_gateway",
            RelayHelp {
                bytes: "Bytes the gateway relayed: upstream (client to destination) and downstream",
                connect: "Time the gateway took to connect to a destination",
                active: "Tunnels the gateway is relaying now",
            },
        );
        let info = Family::<BuildLabels, Gauge>::default();
        registry.register("egress_build_info", "Build of the gateway", info.clone());
        let build = BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        };
        info.get_or_create(&build).set(1);
        Self { connections, relay }
    }

    /// One tunnel the gateway finished with.
    pub fn count(&self, protocol: TunnelProtocol, result: TunnelResult, bytes: (u64, u64)) {
        self.connections
            .get_or_create(&TunnelLabels { protocol, result })
            .inc();
        self.relay.relayed(bytes);
    }

    /// A destination answered after `took`.
    pub fn connected(&self, took: Duration) {
        self.relay.connected(took);
    }

    /// Tunnels being relayed.
    pub fn active(&self) -> &Gauge {
        self.relay.active()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::{GatewayMetrics, TunnelProtocol as P, TunnelResult as R};
    use crate::telemetry::metrics::Metrics;

    /// Names, HELP texts, labels and values as before the label sets were typed (sorted: a
    /// family's series come in hash order).
    #[test]
    fn series_are_unchanged() {
        let mut registry = Registry::default();
        let g = GatewayMetrics::register(&mut registry);
        let served = Metrics::new(registry);
        g.count(P::Socks5, R::Allowed, (3, 4));
        g.count(P::HttpConnect, R::Refused, (0, 0));
        g.count(P::Http2Tunnel, R::BadRequest, (0, 0));
        g.count(P::Socks5, R::UpstreamError, (0, 0));
        g.count(P::Socks5, R::OverLimit, (0, 0));
        g.connected(Duration::from_millis(2));
        g.active().inc();
        let mut lines: Vec<String> = served.render().lines().map(str::to_owned).collect();
        lines.sort();
        let want = r#"# HELP egress_build_info Build of the gateway.
# HELP egress_gateway_active_connections Tunnels the gateway is relaying now.
# HELP egress_gateway_bytes_total Bytes the gateway relayed: upstream (client to destination) and downstream.
# HELP egress_gateway_connect_duration_seconds Time the gateway took to connect to a destination.
# HELP egress_gateway_connections_total Tunnels the gateway handled, by protocol (socks5, http-connect, http2tunnel) and result.
# TYPE egress_build_info gauge
# TYPE egress_gateway_active_connections gauge
# TYPE egress_gateway_bytes_total counter
# TYPE egress_gateway_connect_duration_seconds histogram
# TYPE egress_gateway_connections_total counter
egress_build_info{version="0.1.0"} 1
egress_gateway_active_connections 1
egress_gateway_bytes_total{direction="downstream"} 4
egress_gateway_bytes_total{direction="upstream"} 3
egress_gateway_connect_duration_seconds_bucket{le="+Inf"} 1
egress_gateway_connect_duration_seconds_bucket{le="0.0001"} 0
egress_gateway_connect_duration_seconds_bucket{le="0.0004"} 0
egress_gateway_connect_duration_seconds_bucket{le="0.0016"} 0
egress_gateway_connect_duration_seconds_bucket{le="0.0064"} 1
egress_gateway_connect_duration_seconds_bucket{le="0.0256"} 1
egress_gateway_connect_duration_seconds_bucket{le="0.1024"} 1
egress_gateway_connect_duration_seconds_bucket{le="0.4096"} 1
egress_gateway_connect_duration_seconds_bucket{le="1.6384"} 1
egress_gateway_connect_duration_seconds_bucket{le="26.2144"} 1
egress_gateway_connect_duration_seconds_bucket{le="6.5536"} 1
egress_gateway_connect_duration_seconds_count 1
egress_gateway_connect_duration_seconds_sum 0.002
egress_gateway_connections_total{protocol="http-connect",result="refused"} 1
egress_gateway_connections_total{protocol="http2tunnel",result="bad-request"} 1
egress_gateway_connections_total{protocol="socks5",result="allowed"} 1
egress_gateway_connections_total{protocol="socks5",result="over-limit"} 1
egress_gateway_connections_total{protocol="socks5",result="upstream-error"} 1
"#;
        assert_eq!(lines.join("\n") + "\n", want);
    }
}
