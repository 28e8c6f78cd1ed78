//! Prometheus metrics (prefix `egress_`), `/healthz` and `/readyz` on `--metrics-addr`.
//!
//! Kernel verdicts come from the per-CPU counters of the programs, summed at scrape time (the
//! counters are the truth: every judged connect increments exactly one). The proxy counts its
//! own connections, bytes and connect latency. Label values that come from traffic (hosts)
//! are capped; past the cap they are counted as `other`.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

use super::kernel::{KernelCollector, KernelSource};

pub const DEFAULT_ADDR: &str = "127.0.0.1:15090";
/// Distinct host label values of the proxy metrics; more are counted as `other`.
pub const MAX_HOSTS: usize = 200;

type Labels = Vec<(&'static str, String)>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    proxy_connections: Family<Labels, Counter>,
    proxy_bytes: Family<Labels, Counter>,
    proxy_connect: Histogram,
    proxy_active: Gauge,
    policy_rejected: Family<Labels, Counter>,
    proxy_gateway: Family<Labels, Counter>,
    hosts: Mutex<HashSet<String>>,
    /// Refusals by the proxy for a host, by (workload, namespace).
    host_denials: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new(kernel: Arc<dyn KernelSource>) -> Arc<Self> {
        let mut registry = Registry::default();
        let proxy_connections = Family::<Labels, Counter>::default();
        registry.register(
            "egress_proxy_connections",
            "Connections the proxy handled, by host (SNI or Host) and result",
            proxy_connections.clone(),
        );
        let proxy_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "egress_proxy_bytes",
            "Bytes the proxy relayed: upstream (client to destination) and downstream",
            proxy_bytes.clone(),
        );
        let proxy_connect = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "egress_proxy_connect_duration_seconds",
            "Time the proxy took to connect to the original destination",
            proxy_connect.clone(),
        );
        let proxy_active = Gauge::default();
        registry.register(
            "egress_proxy_active_connections",
            "Connections the proxy is relaying now",
            proxy_active.clone(),
        );
        let policy_rejected = Family::<Labels, Counter>::default();
        registry.register(
            "egress_policy_rejected",
            "Policy objects refused (Kubernetes mode: invalid CRD objects; the previous version stays in force), by kind",
            policy_rejected.clone(),
        );
        let proxy_gateway = Family::<Labels, Counter>::default();
        registry.register(
            "egress_proxy_gateway_connections",
            "Tunnels the proxy opened (result ok) or failed to open (result error) through each EgressGateway",
            proxy_gateway.clone(),
        );
        let host_denials = Arc::new(Mutex::new(BTreeMap::new()));
        let ready = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(KernelCollector {
            kernel,
            host_denials: host_denials.clone(),
            ready: ready.clone(),
        }));
        Arc::new(Self {
            registry,
            proxy_connections,
            proxy_bytes,
            proxy_connect,
            proxy_active,
            policy_rejected,
            proxy_gateway,
            hosts: Mutex::new(HashSet::new()),
            host_denials,
            ready,
        })
    }

    /// Programs attached and the first policy applied.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
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

    /// One connection the proxy finished with.
    pub fn proxy_connection(
        &self,
        workload: &str,
        host: Option<&str>,
        result: &'static str,
        bytes: (u64, u64),
    ) {
        let host = self.host_label(&host.unwrap_or("").to_ascii_lowercase());
        self.proxy_connections
            .get_or_create(&vec![("host", host), ("result", result.into())])
            .inc();
        self.proxy_bytes
            .get_or_create(&vec![("direction", "upstream".into())])
            .inc_by(bytes.0);
        self.proxy_bytes
            .get_or_create(&vec![("direction", "downstream".into())])
            .inc_by(bytes.1);
        if result == "denied" {
            let (ns, name) = workload.split_once('/').unwrap_or(("", workload));
            *self
                .host_denials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((name.to_string(), ns.to_string()))
                .or_default() += 1;
        }
    }

    /// A policy object of `kind` was refused.
    pub fn policy_rejected(&self, kind: &str) {
        self.policy_rejected
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }

    /// A tunnel through gateway `name` opened (or not). Gateway names come from the policy,
    /// not from traffic, so they need no cap.
    pub fn proxy_gateway(&self, name: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.proxy_gateway
            .get_or_create(&vec![("gateway", name.into()), ("result", result.into())])
            .inc();
    }

    pub fn proxy_connected(&self, took: Duration) {
        self.proxy_connect.observe(took.as_secs_f64());
    }

    pub fn proxy_active(&self) -> &Gauge {
        &self.proxy_active
    }

    /// The metrics in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "cannot encode the metrics");
        }
        prometheus_text(&out)
    }
}

/// Turns the encoder's OpenMetrics text into the classic Prometheus text format, which every
/// scraper and `promtool check metrics` read: a counter's HELP and TYPE name its `_total`
/// samples, no `# EOF`, no empty label sets.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match meta {
            Some(m) => out.push_str(m.trim_end()),
            None => out.push_str(&line.replacen("{} ", " ", 1)),
        }
        out.push('\n');
    }
    out
}

/// What `/metrics` and `/readyz` serve: the agent's metrics, or the gateway's.
pub trait Scrape: Send + Sync + 'static {
    /// The metrics in the Prometheus text format.
    fn render(&self) -> String;
    fn is_ready(&self) -> bool;
}

impl Scrape for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve<M: Scrape>(listener: TcpListener, metrics: Arc<M>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // The request line is all we need; a slow or silent client gets 5 s.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    m.render(),
                ),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                ("GET", "/readyz") if m.is_ready() => {
                    ("200 OK", "text/plain", "ready\n".to_string())
                }
                ("GET", "/readyz") => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: programs not attached or no policy applied yet\n".to_string(),
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "not found: /metrics, /healthz, /readyz\n".to_string(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                ),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Binds `--metrics-addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics cannot listen on {addr} (--metrics-addr): {e}"))
}

#[cfg(test)]
mod tests {
    use super::prometheus_text;

    #[test]
    fn counters_get_their_total_names() {
        let om = "# HELP egress_denied Refused.\n# TYPE egress_denied counter\negress_denied_total{a=\"b\"} 1\n# HELP egress_lost Lost.\n# TYPE egress_lost counter\negress_lost_total{} 0\n# TYPE egress_ready gauge\negress_ready 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP egress_denied_total Refused.\n# TYPE egress_denied_total counter\negress_denied_total{a=\"b\"} 1\n# HELP egress_lost_total Lost.\n# TYPE egress_lost_total counter\negress_lost_total 0\n# TYPE egress_ready gauge\negress_ready 1\n"
        );
    }
}
