//! The proxy's metrics (`egress_proxy_*`), registered into the agent's registry: connections by
//! host and result, bytes, connect latency, active connections, and tunnels through each
//! EgressGateway. Host label values come from traffic, so they are capped: past
//! [`MAX_HOSTS`] distinct hosts, a host is counted as `other`. Refusals for a host also go to
//! the kernel's `egress_denied` (reason `host`) through [`HostDenials`].

use std::{collections::HashSet, sync::Mutex, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::telemetry::{
    kernel::HostDenials,
    labels::label_value,
    relay::{RelayHelp, RelayMetrics},
};

/// Distinct host label values of the proxy metrics; more are counted as `other`.
pub const MAX_HOSTS: usize = 200;

/// How the proxy finished with a connection (`result`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ProxyResult {
    Allowed,
    Denied,
    Audit,
    GatewayError,
    UpstreamError,
    /// Refused at once: `maxConnections` were open.
    OverLimit,
    /// The kernel did not redirect it (no original destination).
    NotRedirected,
    /// Its destination is the node itself (loopback, link-local, a node address) and no
    /// Egress names it: not dialled.
    IntoNode,
}

impl ProxyResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Audit => "audit",
            Self::GatewayError => "gateway-error",
            Self::UpstreamError => "upstream-error",
            Self::OverLimit => "over-limit",
            Self::NotRedirected => "not-redirected",
            Self::IntoNode => "into-node",
        }
    }
}

label_value!(ProxyResult);

/// `egress_proxy_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub host: String,
    pub result: ProxyResult,
}

/// Whether a tunnel through a gateway opened (`result` of
/// `egress_proxy_gateway_connections`).
#[allow(non_camel_case_types)] // the variant names are the label values
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TunnelResult {
    ok,
    error,
}

/// `egress_proxy_gateway_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub gateway: String,
    pub result: TunnelResult,
}

/// `egress_proxy_http_requests`: the route is the Egress that decided (never the URL).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub verdict: String,
}

/// Methods counted under their own name; any other is `other` (the label is bounded).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The `method` label of a request method: its name, or `other`.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .map_or("other", |m| m)
}

/// The proxy's metrics.
pub struct ProxyMetrics {
    connections: Family<ConnectionLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    relay: RelayMetrics,
    gateway: Family<GatewayLabels, Counter>,
    hosts: Mutex<HashSet<String>>,
    host_denials: HostDenials,
}

impl ProxyMetrics {
    /// Registers the proxy's metrics in `registry`; refusals for a host are also counted into
    /// `host_denials`.
    pub fn register(registry: &mut Registry, host_denials: HostDenials) -> Self {
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "egress_proxy_connections",
            "Connections the proxy handled, by host (SNI or Host) and result",
            connections.clone(),
        );
        let relay = RelayMetrics::register(
            registry,
            "egress_proxy",
            RelayHelp {
                bytes: "Bytes the proxy relayed: upstream (client to destination) and downstream",
                connect: "Time the proxy took to connect to the original destination",
                active: "Connections the proxy is relaying now",
            },
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "egress_proxy_http_requests",
            "HTTP/1.x requests the proxy judged one by one, by method, deciding Egress (route) and verdict",
            requests.clone(),
        );
        let gateway = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "egress_proxy_gateway_connections",
            "Tunnels the proxy opened (result ok) or failed to open (result error) through each EgressGateway",
            gateway.clone(),
        );
        let threads = super::spill::get(super::threads::count());
        registry.register(
            "egress_proxy_thread_connections",
            "Connections each proxy thread holds",
            threads.connections.clone(),
        );
        registry.register(
            "egress_proxy_thread_accepted",
            "Connections each proxy thread accepted",
            threads.accepted.clone(),
        );
        registry.register(
            "egress_proxy_thread_accepting",
            "1 for the proxy threads that accept new connections now (the first with room that is not busy)",
            threads.accepting.clone(),
        );
        Self {
            connections,
            requests,
            relay,
            gateway,
            hosts: Mutex::new(HashSet::new()),
            host_denials,
        }
    }

    fn host_label(&self, host: &str) -> String {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.contains(host) {
            host.to_string()
        } else if hosts.len() < MAX_HOSTS {
            hosts.insert(host.to_string());
            host.to_string()
        } else {
            "other".into()
        }
    }

    /// One connection the proxy finished with, of `workload` (`namespace/name`).
    pub fn connection(
        &self,
        workload: &str,
        host: Option<&str>,
        result: ProxyResult,
        bytes: (u64, u64),
    ) {
        let host = self.host_label(&host.unwrap_or("").to_ascii_lowercase());
        self.connections
            .get_or_create(&ConnectionLabels { host, result })
            .inc();
        self.relay.relayed(bytes);
        if result == ProxyResult::Denied {
            self.host_denials.add(workload);
        }
    }

    /// One judged HTTP request. Routes come from the policy, methods are bounded.
    pub fn request(&self, method: &str, route: &str, verdict: &str) {
        self.request_counter(method_label(method), route, verdict)
            .inc();
    }

    /// The counter of judged requests with these labels (`method` from [`method_label`]): a
    /// handle on the series, which a connection keeps to count its next requests without a
    /// lookup.
    pub fn request_counter(&self, method: &'static str, route: &str, verdict: &str) -> Counter {
        let labels = RequestLabels {
            method: method.into(),
            route: route.into(),
            verdict: verdict.into(),
        };
        self.requests.get_or_create(&labels).clone()
    }

    /// A tunnel through gateway `name` opened (or not). Gateway names come from the policy,
    /// not from traffic, so they need no cap.
    pub fn gateway(&self, name: &str, ok: bool) {
        let result = if ok {
            TunnelResult::ok
        } else {
            TunnelResult::error
        };
        let labels = GatewayLabels {
            gateway: name.into(),
            result,
        };
        self.gateway.get_or_create(&labels).inc();
    }

    /// The original destination (or the gateway) answered after `took`.
    pub fn connected(&self, took: Duration) {
        self.relay.connected(took);
    }

    /// Connections being relayed.
    pub fn active(&self) -> &Gauge {
        self.relay.active()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::{ProxyMetrics, ProxyResult};
    use crate::telemetry::{kernel::HostDenials, metrics::Metrics};

    /// Names, HELP texts, labels and values as before the label sets were typed (sorted: a
    /// family's series come in hash order).
    #[test]
    fn series_are_unchanged() {
        let mut registry = Registry::default();
        let m = ProxyMetrics::register(&mut registry, HostDenials::default());
        let served = Metrics::new(registry);
        m.connection(
            "shop/web",
            Some("A.Example"),
            ProxyResult::Allowed,
            (10, 20),
        );
        m.connection("shop/web", Some("b.example"), ProxyResult::Denied, (5, 0));
        m.connection("shop/web", Some("b.example"), ProxyResult::Denied, (5, 0));
        m.connection("", None, ProxyResult::OverLimit, (0, 0));
        m.connection("shop/db", None, ProxyResult::GatewayError, (0, 0));
        m.gateway("gw1", true);
        m.gateway("gw1", false);
        m.request("get", "shop/api", "allow");
        m.request("BREW", "shop/api", "deny");
        m.connected(Duration::from_millis(3));
        m.active().inc();
        let mut lines: Vec<String> = served.render().lines().map(str::to_owned).collect();
        lines.sort();
        let want = r#"# HELP egress_proxy_active_connections Connections the proxy is relaying now.
# HELP egress_proxy_bytes_total Bytes the proxy relayed: upstream (client to destination) and downstream.
# HELP egress_proxy_connect_duration_seconds Time the proxy took to connect to the original destination.
# HELP egress_proxy_connections_total Connections the proxy handled, by host (SNI or Host) and result.
# HELP egress_proxy_gateway_connections_total Tunnels the proxy opened (result ok) or failed to open (result error) through each EgressGateway.
# HELP egress_proxy_http_requests_total HTTP/1.x requests the proxy judged one by one, by method, deciding Egress (route) and verdict.
# HELP egress_proxy_thread_accepted_total Connections each proxy thread accepted.
# HELP egress_proxy_thread_accepting 1 for the proxy threads that accept new connections now (the first with room that is not busy).
# HELP egress_proxy_thread_connections Connections each proxy thread holds.
# TYPE egress_proxy_active_connections gauge
# TYPE egress_proxy_bytes_total counter
# TYPE egress_proxy_connect_duration_seconds histogram
# TYPE egress_proxy_connections_total counter
# TYPE egress_proxy_gateway_connections_total counter
# TYPE egress_proxy_http_requests_total counter
# TYPE egress_proxy_thread_accepted_total counter
# TYPE egress_proxy_thread_accepting gauge
# TYPE egress_proxy_thread_connections gauge
egress_proxy_active_connections 1
egress_proxy_bytes_total{direction="downstream"} 20
egress_proxy_bytes_total{direction="upstream"} 20
egress_proxy_connect_duration_seconds_bucket{le="+Inf"} 1
egress_proxy_connect_duration_seconds_bucket{le="0.0001"} 0
egress_proxy_connect_duration_seconds_bucket{le="0.0004"} 0
egress_proxy_connect_duration_seconds_bucket{le="0.0016"} 0
egress_proxy_connect_duration_seconds_bucket{le="0.0064"} 1
egress_proxy_connect_duration_seconds_bucket{le="0.0256"} 1
egress_proxy_connect_duration_seconds_bucket{le="0.1024"} 1
egress_proxy_connect_duration_seconds_bucket{le="0.4096"} 1
egress_proxy_connect_duration_seconds_bucket{le="1.6384"} 1
egress_proxy_connect_duration_seconds_bucket{le="26.2144"} 1
egress_proxy_connect_duration_seconds_bucket{le="6.5536"} 1
egress_proxy_connect_duration_seconds_count 1
egress_proxy_connect_duration_seconds_sum 0.003
egress_proxy_connections_total{host="",result="gateway-error"} 1
egress_proxy_connections_total{host="",result="over-limit"} 1
egress_proxy_connections_total{host="a.example",result="allowed"} 1
egress_proxy_connections_total{host="b.example",result="denied"} 2
egress_proxy_gateway_connections_total{gateway="gw1",result="error"} 1
egress_proxy_gateway_connections_total{gateway="gw1",result="ok"} 1
egress_proxy_http_requests_total{method="GET",route="shop/api",verdict="allow"} 1
egress_proxy_http_requests_total{method="other",route="shop/api",verdict="deny"} 1
egress_proxy_thread_accepted_total{thread="0"} 0
egress_proxy_thread_accepted_total{thread="1"} 0
egress_proxy_thread_accepting{thread="0"} 0
egress_proxy_thread_accepting{thread="1"} 0
egress_proxy_thread_connections{thread="0"} 0
egress_proxy_thread_connections{thread="1"} 0
"#;
        assert_eq!(lines.join("\n") + "\n", want);
    }

    #[test]
    fn hosts_past_the_cap_are_other_and_host_denials_are_counted() {
        let denials = HostDenials::default();
        let m = ProxyMetrics::register(&mut Registry::default(), denials.clone());
        for i in 0..super::MAX_HOSTS {
            assert_eq!(m.host_label(&format!("h{i}")), format!("h{i}"));
        }
        assert_eq!(m.host_label("h0"), "h0");
        assert_eq!(m.host_label("one-too-many"), "other");
        m.connection("shop/web", Some("x"), ProxyResult::Denied, (0, 0));
        m.connection("shop/web", Some("x"), ProxyResult::Allowed, (0, 0));
        assert_eq!(denials.get("shop/web"), 1);
        assert_eq!(denials.get("shop/db"), 0);
    }
}
