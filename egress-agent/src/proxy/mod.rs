//! The transparent proxy behind the kernel's redirect.
//!
//! For each accepted connection it takes the original destination the kernel recorded under
//! the client's address out of the map (none: the connection was not redirected, and is
//! refused). When a rule
//! for that destination names hosts, it reads the TLS SNI or HTTP Host from the client's first
//! bytes (bounded, timed) and judges it, failing closed when it cannot tell the host; HTTP/1.x
//! connections are then judged request by request ([`http1`]). Otherwise it does not wait for
//! the client to speak, so server-first protocols (SSH, SMTP, MySQL) pass unchanged. Allowed
//! connections go to the original destination from the agent's own, exempt cgroup (never into
//! the node itself, see [`guard`]), or through the egress gateway their rule names (or the
//! global one): never direct when a gateway is chosen but down.

mod accept;
mod fd_table;
pub mod guard;
pub mod http1;
pub mod inpod;
mod judging;
pub mod kernel_relay;
pub mod metrics;
pub mod relay;
pub mod sniff;
mod spill;
mod task;
mod threads;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use egress_common::{OrigDst, OrigKey, SockAddr};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{
    gateway::{Dialer, Target, Upstream},
    policy::{normalize, Compiled, EgressGateway, HostVerdict, Live},
    telemetry::{
        audit::{AuditMetrics, Layer},
        flows::now_ms,
        history::{FlowKey, History},
    },
};
use metrics::{ProxyMetrics, ProxyResult};
use sniff::Sniffed;

/// Original destinations, keyed by the client's address in its network namespace.
pub type OrigMap = HashMap<MapData, OrigKey, OrigDst>;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections handled at once; more are reset at once.
    pub max_connections: usize,
    /// How long the client has to name its host when a rule needs it.
    pub sniff_timeout: Duration,
    /// Bytes read while looking for the host.
    pub sniff_bytes: usize,
    pub connect_timeout: Duration,
    /// A relayed connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Close relayed connections that a policy change refuses.
    pub close_on_tighten: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            sniff_timeout: Duration::from_secs(5),
            sniff_bytes: sniff::MAX_SNIFF,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            close_on_tighten: true,
        }
    }
}

pub struct Proxy {
    orig: OrigMap,
    metrics: Arc<ProxyMetrics>,
    live: Arc<Live>,
    limits: Limits,
    permits: Arc<Semaphore>,
    gateways: Dialer,
    /// The in-kernel relay (`run --relay kernel`); unset: splice.
    kernel: std::sync::OnceLock<Arc<crate::datapath::relay::KernelRelay>>,
    /// What workloads' DNS answered (`hostBinding`); unset: no binding.
    names: std::sync::OnceLock<Arc<crate::dns::Names>>,
    node: guard::NodeAddrs,
    /// Audited host verdicts are counted here, and every connection kept in the history.
    audit: AuditMetrics,
    history: Arc<History>,
}

/// Binds the proxy's listeners: 127.0.0.1 and, where the host has IPv6, [::1].
/// Several sockets per address share the port (one acceptor each), with the kernel's
/// longest accept queue ([`crate::datapath::listen`]).
pub async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let (ls, v6) = crate::datapath::listen::loopback(port)?;
    if let Some(e) = v6 {
        warn!(error = %e, "no IPv6 proxy listener on [::1]:{port}; IPv6 redirects will be refused");
    }
    info!(
        port,
        listeners = ls.len(),
        backlog = crate::datapath::listen::somaxconn().unwrap_or(0),
        "proxy listening (accept queue: net.core.somaxconn)"
    );
    ls.into_iter().map(TcpListener::from_std).collect()
}

/// One proxied connection, for the log (and later the metrics).
struct Record {
    workload: String,
    dst: SocketAddr,
    host: Option<String>,
    verdict: &'static str,
    rule: String,
    /// The EgressGateway the connection left through (empty: direct).
    gateway: String,
    started: Instant,
}

impl Proxy {
    pub fn new(
        orig: OrigMap,
        live: Arc<Live>,
        limits: Limits,
        metrics: Arc<ProxyMetrics>,
        (audit, history): (AuditMetrics, Arc<History>),
    ) -> Arc<Self> {
        Arc::new(Self {
            orig,
            metrics,
            audit,
            history,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            live,
            limits,
            gateways: Dialer::default(),
            names: std::sync::OnceLock::new(),
            kernel: std::sync::OnceLock::new(),
            node: guard::NodeAddrs::default(),
        })
    }

    /// Kubernetes mode: gateways named by Service find their endpoints in `s`.
    pub fn bind_services(&self, s: Arc<crate::gateway::services::Services>) {
        self.gateways.bind_services(s);
    }

    /// Relays plain connections (no per-request judging) in the kernel.
    pub fn bind_kernel_relay(&self, k: Arc<crate::datapath::relay::KernelRelay>) {
        let _ = self.kernel.set(k);
    }

    /// Binds hosts to the addresses workloads' DNS gave them (`hostBinding: strict`).
    pub fn bind_names(&self, names: Arc<crate::dns::Names>) {
        let _ = self.names.set(names);
    }

    /// `hostBinding: strict`: whether `host`, which rule `id` allowed, resolved to `dst` for
    /// the workload (see [`crate::dns::Names::binding`]).
    fn host_bound(
        &self,
        p: &Compiled,
        wid: u32,
        host: Option<&str>,
        dst: SocketAddr,
        id: u32,
    ) -> bool {
        match (self.names.get(), host) {
            (Some(n), Some(h)) => n.binding(p, wid, h, dst.ip(), id),
            _ => true,
        }
    }

    /// The policy in force (a change applies to new connections).
    fn policy(&self) -> Arc<Compiled> {
        self.live.get()
    }

    /// Serves every listener until the task is dropped, on the proxy's threads ([`threads`]):
    /// the one whose turn it is ([`spill`]) accepts, and relays what it accepted (which goes
    /// on when the listener is dropped).
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) {
        threads::serve(listeners, move |l, turn| self.clone().accept_loop(l, turn)).await
    }

    /// Everything before the relay: the original destination, the host when a rule needs it,
    /// the verdict, the upstream. None: the connection was dealt with (refused, failed, or
    /// judged request by request to its end).
    async fn handle(
        &self,
        mut client: TcpStream,
        key: OrigKey,
        peer: SocketAddr,
    ) -> Option<task::Relaying> {
        let orig = match crate::datapath::raw_map::take(&self.orig, &key) {
            Ok(o) => o,
            Err(e) => {
                self.metrics
                    .connection("", None, ProxyResult::NotRedirected, (0, 0));
                warn!(%peer, error = %e, "refused a connection that the kernel did not redirect");
                reset(client);
                return None;
            }
        };
        let policy = self.policy();
        let dst = orig.dst.socket_addr();
        let workload = policy
            .workloads
            .iter()
            .find(|(_, id)| *id == orig.workload_id)
            .map(|(w, _)| w.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut rec = Record {
            workload,
            dst,
            host: None,
            verdict: "allow",
            rule: rule_name(&policy, orig.rule_id),
            gateway: String::new(),
            started: Instant::now(),
        };
        // The rule that lets the connection out (a host rule may decide instead of the
        // kernel's); it chooses the gateway.
        let mut rule_id = orig.rule_id;
        // TCP_NODELAY: inherited from the listener ([`crate::datapath::listen`]).

        // Bytes read while sniffing, replayed to the upstream.
        let mut head = Vec::new();
        // HTTP/1.x where hosts are judged: every request is judged, not only the first.
        let mut per_request = false;
        if policy.needs_host(orig.workload_id, dst.ip(), dst.port()) {
            // Boxed, as every rarely long-lived state below: a task holds the largest state of
            // its future for as long as it lives, and most connections end up relaying idle.
            let sniffed = Box::pin(self.sniff(&mut client, &mut head)).await;
            let (is_http, host) = match &sniffed {
                Some(Sniffed::Http(h)) => (true, h.clone()),
                Some(Sniffed::Tls(h)) => (false, h.clone()),
                Some(Sniffed::BadHttp(why)) => {
                    rec.verdict = "deny";
                    rec.rule = "malformed".into();
                    let resp = http1::forbidden(&format!("request refused: {why}"), "malformed");
                    let _ = client.write_all(resp.as_bytes()).await;
                    let _ = client.shutdown().await;
                    self.finish(&rec, (head.len() as u64, 0), "denied");
                    return None;
                }
                _ => (false, None),
            };
            per_request = is_http;
            rec.host = host.clone();
            let head_if_http = is_http.then_some(&head[..]);
            match judging::first_verdict(
                &policy,
                orig.workload_id,
                dst,
                host.as_deref(),
                head_if_http,
            ) {
                HostVerdict::Allow(id)
                    if !self.host_bound(&policy, orig.workload_id, host.as_deref(), dst, id) =>
                {
                    rec.verdict = HOST_MISMATCH;
                    rec.rule = rule_name(&policy, id);
                    warn!(workload = rec.workload.as_str(), dst = %dst, host = host.as_deref().unwrap_or(""), reason = HOST_MISMATCH, "refused: the host did not resolve to this address for the workload (hostBinding: strict)");
                    let http = is_http.then(|| {
                        (
                            judging::mismatch_why(host.as_deref(), dst),
                            rec.rule.clone(),
                        )
                    });
                    refuse(client, http, matches!(sniffed, Some(Sniffed::Tls(_)))).await;
                    self.finish(&rec, (head.len() as u64, 0), HOST_MISMATCH);
                    return None;
                }
                HostVerdict::Allow(id) => {
                    rec.rule = rule_name(&policy, id);
                    rule_id = id;
                }
                HostVerdict::Audit(id) => {
                    rec.verdict = "audit";
                    rec.rule = rule_name(&policy, id);
                    rule_id = id;
                }
                HostVerdict::Deny(id) => {
                    rec.verdict = "deny";
                    rec.rule = rule_name(&policy, id);
                    let http = is_http.then(|| {
                        self.first_request_refused(&policy, orig.workload_id, &rec, &head)
                    });
                    refuse(client, http, matches!(sniffed, Some(Sniffed::Tls(_)))).await;
                    self.finish(&rec, (head.len() as u64, 0), "denied");
                    return None;
                }
            }
        }

        let connecting = Instant::now();
        if policy.gateway_for(rule_id).is_none() {
            if let Some(class) = guard::into_node(&policy, orig.workload_id, dst, &self.node.get())
            {
                return self.refuse_into_node(client, &mut rec, class);
            }
        }
        let upstream = match policy.gateway_for(rule_id) {
            Some(gw) => {
                rec.gateway = gw.id.name.clone();
                match Box::pin(self.through_gateway(gw, dst, rec.host.as_deref())).await {
                    Ok(u) => u,
                    Err(why) => return self.gateway_failed(client, &mut rec, &why),
                }
            }
            None => {
                let connect =
                    tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(dst));
                match Box::pin(connect).await {
                    Ok(Ok(s)) => Upstream::Tcp(s),
                    Ok(Err(e)) => return self.upstream_failed(client, &mut rec, &e.to_string()),
                    Err(_) => return self.upstream_failed(client, &mut rec, "connect timed out"),
                }
            }
        };
        self.metrics.connected(connecting.elapsed());
        drop(policy);
        let mut upstream = upstream;
        if let Upstream::Tcp(s) = &upstream {
            let _ = s.set_nodelay(true);
        }
        if per_request {
            let served =
                Box::pin(self.per_request(client, upstream, head, &rec, orig.workload_id)).await;
            if served.refused {
                rec.verdict = "deny";
            }
            return {
                self.finish(&rec, served.bytes, served.end);
                None
            };
        }
        if let Err(e) = upstream.send_head(&head).await {
            return self.upstream_failed(client, &mut rec, &e.to_string());
        }
        // The sniffed bytes are sent: their buffer is not kept for the connection's life.
        Some(task::Relaying {
            client,
            upstream,
            head_len: head.len() as u64,
            wid: orig.workload_id,
            rec,
        })
    }

    /// After a policy change: whether this relayed connection would still be let out. Anything
    /// the kernel would refuse now, or the proxy would refuse for its host, is closed.
    fn still_allowed(&self, workload: u32, dst: SocketAddr, host: Option<&str>) -> bool {
        let p = self.policy();
        let d = p.decide(workload, dst.ip(), dst.port(), egress_common::proto::TCP);
        if d.outcome.is_denied() {
            return false;
        }
        if d.outcome == egress_common::Outcome::Proxy
            && p.needs_host(workload, dst.ip(), dst.port())
        {
            return !matches!(
                p.decide_host(workload, dst.ip(), dst.port(), host),
                HostVerdict::Deny(_)
            );
        }
        true
    }

    /// Reads the client's first bytes until they name a host, they cannot, the buffer is
    /// full, or the timeout passes.
    async fn sniff(&self, client: &mut TcpStream, head: &mut Vec<u8>) -> Option<Sniffed> {
        let deadline = tokio::time::Instant::now() + self.limits.sniff_timeout;
        let cap = self.limits.sniff_bytes;
        head.reserve(cap.min(4096));
        loop {
            let done = match sniff::sniff(head) {
                Sniffed::Incomplete => head.len() >= cap,
                _ => true,
            };
            if done {
                break;
            }
            let mut chunk = [0u8; 4096];
            let room = (cap - head.len()).min(chunk.len());
            match tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => head.extend_from_slice(&chunk[..n]),
            }
        }
        match sniff::sniff(head) {
            Sniffed::Incomplete => None,
            s => Some(s),
        }
    }

    /// Opens a tunnel to `dst` through `gw` (the sniffed host goes along). The error names
    /// the gateway, the endpoint and its mode.
    async fn through_gateway(
        &self,
        gw: &EgressGateway,
        dst: SocketAddr,
        host: Option<&str>,
    ) -> Result<Upstream, String> {
        let target = Target::Addr(dst);
        match self
            .gateways
            .open(gw, &target, host, self.limits.connect_timeout)
            .await
        {
            Ok(u) => {
                self.metrics.gateway(&gw.id.name, true);
                Ok(u)
            }
            Err((addr, mode, e)) => {
                self.metrics.gateway(&gw.id.name, false);
                Err(format!(
                    "EgressGateway {} ({} at {addr}): {e}",
                    gw.id.name,
                    mode.name()
                ))
            }
        }
    }

    /// Fail closed: the client gets a reset, never a direct connection.
    /// (None: the connection ends here.)
    fn gateway_failed<T>(&self, client: TcpStream, rec: &mut Record, why: &str) -> Option<T> {
        rec.verdict = "gateway-error";
        warn!(workload = rec.workload.as_str(), dst = %rec.dst, host = rec.host.as_deref().unwrap_or(""), error = why, "egress gateway failed; the connection is refused (fail closed, never sent direct)");
        reset(client);
        self.finish(rec, (0, 0), "gateway failed");
        None
    }

    fn upstream_failed<T>(&self, client: TcpStream, rec: &mut Record, why: &str) -> Option<T> {
        rec.verdict = "upstream-error";
        info!(workload = rec.workload.as_str(), dst = %rec.dst, error = why, "proxy could not reach the original destination");
        reset(client);
        self.finish(rec, (0, 0), "upstream failed");
        None
    }

    fn finish(&self, rec: &Record, bytes: (u64, u64), end: &str) {
        let result = match rec.verdict {
            "allow" => ProxyResult::Allowed,
            "deny" | HOST_MISMATCH => ProxyResult::Denied,
            "audit" => ProxyResult::Audit,
            "gateway-error" => ProxyResult::GatewayError,
            "into-node" => ProxyResult::IntoNode,
            _ => ProxyResult::UpstreamError,
        };
        self.metrics
            .connection(&rec.workload, rec.host.as_deref(), result, bytes);
        self.observe(rec);
        let host = rec.host.as_deref().unwrap_or("");
        let ms = rec.started.elapsed().as_millis() as u64;
        let (workload, verdict, rule) = (rec.workload.as_str(), rec.verdict, rec.rule.as_str());
        let gateway = rec.gateway.as_str();
        if verdict == "allow" && !end.ends_with(REVOKED) {
            debug!(target: "egress::proxy", workload, dst = %rec.dst, host, verdict, rule, gateway, bytes_out = bytes.0, bytes_in = bytes.1, ms, end, "connection");
        } else {
            info!(target: "egress::proxy", workload, dst = %rec.dst, host, verdict, rule, gateway, bytes_out = bytes.0, bytes_in = bytes.1, ms, end, "connection");
        }
    }
}

/// The verdict and reason of a host refused by `hostBinding: strict`.
pub const HOST_MISMATCH: &str = "host-address-mismatch";
impl Proxy {
    /// Counts an audited host verdict and keeps the connection, with its host, in the flow
    /// history (the kernel leaves redirected connections to the proxy there).
    fn observe(&self, rec: &Record) {
        if rec.verdict == "audit" {
            self.audit.count(&rec.rule, &rec.workload, Layer::proxy, 1);
        }
        let verdict = match rec.verdict {
            "allow" => "proxy",
            "deny" => "deny-host",
            "audit" => "audit-host",
            other => other,
        };
        let key = FlowKey {
            workload: rec.workload.as_str().into(),
            ip: normalize(rec.dst.ip()),
            port: rec.dst.port(),
            proto: egress_common::proto::TCP,
            host: rec.host.as_ref().map(|h| h.to_ascii_lowercase()),
        };
        self.history.record(key, now_ms(), 1, verdict, &rec.rule);
    }
}

/// How a relayed connection that a policy change refused ends, in the log.
const REVOKED: &str = "closed: the policy now refuses it";

fn rule_name(p: &Compiled, id: u32) -> String {
    p.rule(id).map(|r| r.name()).unwrap_or_default()
}

/// Refuses a connection whose host is denied: HTTP gets a 403 naming the policy, TLS a fatal
/// `access_denied` alert, anything else a reset.
async fn refuse(mut client: TcpStream, http: Option<(String, String)>, tls: bool) {
    if let Some((why, policy)) = http {
        let resp = http1::forbidden(&why, &policy);
        let _ = client.write_all(resp.as_bytes()).await;
        let _ = client.shutdown().await;
    } else if tls {
        // TLS alert record: fatal (2), access_denied (49).
        let _ = client
            .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])
            .await;
        let _ = client.shutdown().await;
    } else {
        reset(client);
    }
}

/// Closes with RST, so the client sees a reset rather than a clean, empty response.
fn reset(s: TcpStream) {
    // A zero linger never blocks on drop (the deprecation is about non-zero ones).
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// The kernel's key for a client address (IPv4-mapped addresses are IPv4).
pub fn sock_addr(a: SocketAddr) -> SockAddr {
    match normalize(a.ip()) {
        IpAddr::V4(v4) => SockAddr::v4(v4.octets(), a.port()),
        IpAddr::V6(v6) => SockAddr::v6(v6.octets(), a.port()),
    }
}
