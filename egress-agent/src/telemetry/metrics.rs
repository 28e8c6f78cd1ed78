//! Prometheus metrics (prefix `egress_`), `/healthz` and `/readyz` on `--metrics-addr`.
//!
//! Each component registers its own metrics, with typed label sets, into the [`Registry`] it is
//! given at start (the proxy, the Kubernetes watch, the gateway server); the agent's registry
//! then gets the kernel's metrics ([`super::kernel`]), read from the per-CPU counters of the
//! programs and summed at scrape time (the counters are the truth: every judged connect
//! increments exactly one). [`Metrics`] serves a registry.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

use super::{
    kernel::{HostDenials, KernelCollector, KernelSource},
    snapshot::Snapshots,
};

pub const DEFAULT_ADDR: &str = "127.0.0.1:15090";

/// A registry served on `/metrics`, and the readiness `/readyz` reports.
pub struct Metrics {
    registry: Registry,
    ready: Arc<AtomicBool>,
    /// The kernel's snapshot, brought up to date before a scrape is encoded.
    snapshots: Option<Arc<Snapshots>>,
    /// The text of the last scrape, by (snapshot number, ready): scrapes served from the
    /// same snapshot share it.
    rendered: std::sync::Mutex<Option<(u64, bool, Arc<String>)>>,
    /// `/metrics` requests served at once (the probes do not wait for these).
    scrapes: tokio::sync::Semaphore,
}

/// `/metrics` requests served at once; more wait (within their connection's 10 s). With the
/// kernel read at most once a second this bounds what a scrape storm costs the node.
pub const MAX_SCRAPES: usize = 4;

/// Connections the endpoint serves at once; more wait in the listen backlog. Scrapes are
/// limited on their own ([`MAX_SCRAPES`]): this cap is for memory and slow clients, and leaves
/// room for the probes.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection's whole life: reading the request, the snapshot, writing the reply.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

impl Metrics {
    /// Serves `registry`, whose metrics the components registered (the gateway's).
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            registry,
            ready: Arc::new(AtomicBool::new(false)),
            snapshots: None,
            rendered: Default::default(),
            scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES),
        })
    }

    /// The node agent's: `registry` with the kernel's metrics after the components' ones,
    /// read from `kernel` at every scrape, and the proxy's refusals for a host among the
    /// kernel's refusals.
    pub fn agent(
        mut registry: Registry,
        kernel: Arc<dyn KernelSource>,
        host_denials: HostDenials,
    ) -> Arc<Self> {
        let ready = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(KernelCollector {
            kernel,
            host_denials,
            ready: ready.clone(),
        }));
        Arc::new(Self {
            registry,
            ready,
            snapshots: None,
            rendered: Default::default(),
            scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES),
        })
    }

    /// [`Metrics::agent`] with the kernel's state from `snapshots`, which a scrape brings up
    /// to date (off the runtime) before it is encoded.
    pub fn agent_snapshots(
        mut registry: Registry,
        snapshots: Arc<Snapshots>,
        host_denials: HostDenials,
    ) -> Arc<Self> {
        let ready = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(KernelCollector {
            kernel: snapshots.clone(),
            host_denials,
            ready: ready.clone(),
        }));
        Arc::new(Self {
            registry,
            ready,
            snapshots: Some(snapshots),
            rendered: Default::default(),
            scrapes: tokio::sync::Semaphore::new(MAX_SCRAPES),
        })
    }

    /// Ready: the agent's programs are attached and the first policy applied; the gateway
    /// listens.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
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

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped, at most
/// [`MAX_CONNECTIONS`] connections at once, each for at most 10 s.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_on(&listener, metrics).await
}

/// [`serve`] until `stop` fires; then hands the listener back (for the next [`Metrics`]).
/// The agent answers `/healthz` (and `/readyz`: not ready) so while it waits for the API server.
pub async fn serve_until(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> TcpListener {
    tokio::select! {
        _ = serve_on(&listener, metrics) => {}
        _ = stop => {}
    }
    listener
}

async fn serve_on(listener: &TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, answer(s, &m)).await;
            drop(slot);
        });
    }
}

/// The body of a `/metrics` scrape: encoded off the runtime, once per kernel snapshot.
async fn scrape(m: &Arc<Metrics>) -> Arc<String> {
    let Some(k) = &m.snapshots else {
        return Arc::new(m.render());
    };
    let Ok(_slot) = m.scrapes.acquire().await else {
        return Arc::new(String::new());
    };
    k.fresh().await;
    let key = (k.reads(), m.is_ready());
    let cached = m.rendered.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some((n, ready, text)) = cached {
        if (n, ready) == key {
            return text;
        }
    }
    let m2 = m.clone();
    let text = match tokio::task::spawn_blocking(move || m2.render()).await {
        Ok(t) => Arc::new(t),
        Err(_) => return Arc::new(String::new()),
    };
    *m.rendered.lock().unwrap_or_else(|e| e.into_inner()) = Some((key.0, key.1, text.clone()));
    text
}

/// One request on connection `s`.
async fn answer(mut s: tokio::net::TcpStream, m: &Arc<Metrics>) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // The request line is all we need; a slow or silent client gets 2 s.
    let read = tokio::time::timeout(Duration::from_secs(2), async {
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
            scrape(m).await,
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", text("ok\n")),
        ("GET", "/readyz") if m.is_ready() => ("200 OK", "text/plain", text("ready\n")),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            text("not ready: programs not attached or no policy applied yet\n"),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            text("not found: /metrics, /healthz, /readyz\n"),
        ),
        _ => ("405 Method Not Allowed", "text/plain", text("GET only\n")),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn text(t: &str) -> Arc<String> {
    Arc::new(t.to_string())
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
