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

use egress_common::{proto, Outcome, EVENT_LOST};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

use crate::control::Control;

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
    pub fn new(control: Arc<Control>) -> Arc<Self> {
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
            control,
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

/// The metrics read from the kernel and the policy at scrape time.
struct KernelCollector {
    control: Arc<Control>,
    host_denials: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

const PROTOCOLS: [(u8, &str); 3] = [
    (proto::TCP, "tcp"),
    (proto::UDP, "udp"),
    (proto::ANY, "other"),
];

fn deny_reason(o: Outcome) -> Option<&'static str> {
    match o {
        Outcome::DenyRule => Some("rule"),
        Outcome::DenyDefault => Some("default"),
        Outcome::DenyProxyPort => Some("proxy-port"),
        Outcome::DenyError => Some("error"),
        _ => None,
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let policy = self.control.live.get();
        let (sums, lost, entries, generation, tc) = {
            let mut dp = self.control.datapath();
            let ids: Vec<u32> = policy.workloads.iter().map(|(_, id)| *id).collect();
            let sums = dp.counter_sums(&ids);
            let tc = dp.tc_sums(&ids);
            let lost: u64 = ids
                .iter()
                .map(|id| {
                    sums.get(&(*id, EVENT_LOST, proto::ANY))
                        .copied()
                        .unwrap_or(0)
                })
                .sum();
            let generation = dp.active().map(|(_, c)| c.generation).unwrap_or(0);
            (sums, lost, dp.map_fill(&policy), generation, tc)
        };
        let pods: Vec<crate::config::ObjectRef> = self
            .control
            .pods()
            .borrow()
            .iter()
            .map(|p| p.workload.clone())
            .collect();
        let (mut tc_packets, mut tc_bytes, mut tc_dropped) = (Vec::new(), Vec::new(), Vec::new());
        for (w, id) in &policy.workloads {
            let pod = pods.contains(w);
            for slot in 0..egress_common::tc::TC_SLOTS as u8 {
                let Some(name) = egress_common::tc::tc_slot_name(slot) else {
                    continue;
                };
                let (p, b) = tc.get(&(*id, slot)).copied().unwrap_or((0, 0));
                let base = vec![
                    ("workload", w.name.clone()),
                    ("namespace", w.namespace.clone()),
                ];
                if let Some(reason) = egress_common::tc::tc_drop_reason(slot) {
                    if pod || p > 0 {
                        let mut l = base.clone();
                        l.push(("reason", reason.into()));
                        tc_dropped.push((l, p));
                    }
                }
                if p > 0 {
                    let mut l = base;
                    l.push(("verdict", name.into()));
                    tc_packets.push((l.clone(), p));
                    tc_bytes.push((l, b));
                }
            }
        }

        let mut connections = Vec::new();
        let mut denied = Vec::new();
        for (w, id) in &policy.workloads {
            for o in Outcome::ALL {
                for (p, pname) in PROTOCOLS {
                    let v = sums.get(&(*id, o as u8, p)).copied().unwrap_or(0);
                    if v == 0
                        && !matches!(o, Outcome::Allow | Outcome::DenyDefault | Outcome::DenyRule)
                    {
                        continue; // keep the output small; the common series always exist
                    }
                    let base = vec![
                        ("workload", w.name.clone()),
                        ("namespace", w.namespace.clone()),
                    ];
                    let mut l = base.clone();
                    l.push(("verdict", o.name().into()));
                    l.push(("protocol", pname.into()));
                    connections.push((l, v));
                    if let Some(reason) = deny_reason(o) {
                        let mut l = base;
                        l.push(("reason", reason.into()));
                        l.push(("protocol", pname.into()));
                        denied.push((l, v));
                    }
                }
            }
        }
        for ((name, ns), v) in self
            .host_denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            denied.push((
                vec![
                    ("workload", name.clone()),
                    ("namespace", ns.clone()),
                    ("reason", "host".into()),
                    ("protocol", "tcp".into()),
                ],
                *v,
            ));
        }
        counter(
            &mut enc,
            "egress_connections",
            "Connections judged in the kernel, by workload, verdict and protocol",
            &connections,
        )?;
        counter(&mut enc, "egress_denied", "Connections refused, by workload and reason (rule, default, proxy-port, error in the kernel; host in the proxy)", &denied)?;
        counter(
            &mut enc,
            "egress_tc_dropped_packets",
            "Packets the tc backstop dropped on a workload's interface (they skipped the socket hooks), by reason",
            &tc_dropped,
        )?;
        counter(
            &mut enc,
            "egress_tc_packets",
            "Packets through the tc backstop on a workload's interface, by verdict (inbound: into the workload)",
            &tc_packets,
        )?;
        counter(
            &mut enc,
            "egress_tc_bytes",
            "Bytes through the tc backstop on a workload's interface, by verdict (inbound: into the workload)",
            &tc_bytes,
        )?;
        counter(
            &mut enc,
            "egress_flow_events_lost",
            "Verdict events the kernel could not hand to the agent (the counters still count their connections)",
            &[(vec![], lost)],
        )?;
        gauge(
            &mut enc,
            "egress_policy_generation",
            "Generation of the policy in force",
            &[(vec![], generation as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_policy_rules",
            "Egress objects in the policy in force",
            &[(vec![], policy.rules.len() as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_workloads",
            "Workloads in the policy in force",
            &[(vec![], policy.workloads.len() as i64)],
        )?;
        let fill: Vec<(Labels, i64)> = entries
            .iter()
            .map(|(m, n, _)| (vec![("map", m.to_string())], *n as i64))
            .collect();
        let cap: Vec<(Labels, i64)> = entries
            .iter()
            .map(|(m, _, c)| (vec![("map", m.to_string())], *c as i64))
            .collect();
        gauge(
            &mut enc,
            "egress_map_entries",
            "Entries in each BPF map (both policy sets while a change is applied)",
            &fill,
        )?;
        gauge(
            &mut enc,
            "egress_map_capacity",
            "Capacity of each BPF map",
            &cap,
        )?;
        gauge(
            &mut enc,
            "egress_ready",
            "1 once the programs are attached and the first policy is applied",
            &[(vec![], self.ready.load(Ordering::SeqCst) as i64)],
        )?;
        gauge(
            &mut enc,
            "egress_build_info",
            "Build of the agent",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").into()),
                    ("layout", egress_common::LAYOUT_VERSION.to_string()),
                ],
                1,
            )],
        )?;
        Ok(())
    }
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
