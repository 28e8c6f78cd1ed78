//! How the proxy judges what it learns about a connection beyond its address: the text of a
//! refusal, each HTTP/1.x request of a judged connection (with its audit line), and the
//! refusal of connections into the node itself.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use prometheus_client::metrics::counter::Counter;

use super::{
    http1::{self, Judgement, RequestLog, Served},
    metrics, reset, rule_name, Proxy, Record, HOST_MISMATCH,
};
use crate::{
    gateway::Upstream,
    policy::{routes::RequestView, Action, Cidr, Compiled, HostVerdict},
};
use egress_common::wire::http;

/// What the route rules look at in a request.
fn view<'a>(r: &'a egress_common::wire::http::Request<'_, 'a>) -> RequestView<'a> {
    RequestView {
        host: r.host,
        method: r.method,
        path: r.path,
        headers: r.headers,
    }
}

/// The verdict on a connection's first bytes: its first request when they are HTTP/1.x
/// (routes apply), else its host (SNI) alone.
pub(super) fn first_verdict(
    p: &Compiled,
    workload: u32,
    dst: SocketAddr,
    host: Option<&str>,
    http_head: Option<&[u8]>,
) -> HostVerdict {
    let mut headers = [http::EMPTY_HEADER; http::MAX_HEADERS];
    match http_head.map(|h| http::request(h, &mut headers)) {
        Some(Ok(r)) => p.decide_request(workload, dst.ip(), dst.port(), &view(&r)),
        _ => p.decide_host(workload, dst.ip(), dst.port(), host),
    }
}

/// The one-line reason and the `X-Egress-Policy` value of a refused host.
pub(super) fn refusal(workload: &str, host: Option<&str>, rule: &str) -> (String, String) {
    let policy = if rule.is_empty() {
        "default-deny"
    } else {
        rule
    };
    let why = match host {
        None => format!(
            "the request names no host, and Egress policy {policy} judges hosts at this destination (workload {workload})"
        ),
        Some(h) if rule.is_empty() => {
            format!("host {h} is refused for workload {workload}: no Egress policy allows it")
        }
        Some(h) => {
            format!("host {h} is refused for workload {workload}: Egress policy {rule} denies it")
        }
    };
    (why, policy.to_string())
}

impl Proxy {
    /// Serves an HTTP/1.x connection request by request, each judged against the policy in
    /// force when it arrives.
    pub(super) async fn per_request(
        &self,
        client: TcpStream,
        upstream: Upstream,
        head: Vec<u8>,
        rec: &Record,
        workload: u32,
    ) -> Served {
        let dst = rec.dst;
        let judge = |r: &egress_common::wire::http::Request<'_, '_>| {
            self.judge(workload, dst, &rec.workload, r)
        };
        // The connection's request counters, by (method, route, verdict): a keep-alive
        // connection counts its requests without a label lookup each.
        let mut counters: Vec<(&'static str, String, &'static str, Counter)> = Vec::new();
        let log = |l: &RequestLog| {
            let method = metrics::method_label(&l.method);
            let known = counters
                .iter()
                .find(|(m, r, v, _)| *m == method && *r == l.rule && *v == l.verdict);
            match known {
                Some((.., c)) => {
                    c.inc();
                }
                None => {
                    let c = self.metrics.request_counter(method, &l.rule, l.verdict);
                    c.inc();
                    counters.push((method, l.rule.clone(), l.verdict, c));
                }
            }
            self.log_request(rec, l);
        };
        let idle = self.limits.idle_timeout;
        match upstream {
            Upstream::Tcp(u) => http1::serve(client, u, head, idle, judge, log).await,
            Upstream::H2(u) => http1::serve(client, u, head, idle, judge, log).await,
        }
    }

    /// One request of a judged connection: the policy, then (`hostBinding: strict`) whether
    /// its host resolved to the connection's address, on every request of a keep-alive
    /// connection, not only the first.
    fn judge(
        &self,
        workload: u32,
        dst: SocketAddr,
        name: &str,
        r: &egress_common::wire::http::Request<'_, '_>,
    ) -> Judgement {
        let p = self.policy();
        let v = p.decide_request(workload, dst.ip(), dst.port(), &view(r));
        match v {
            HostVerdict::Allow(id) if !self.host_bound(&p, workload, r.host, dst, id) => {
                warn!(workload = name, dst = %dst, host = r.host.unwrap_or(""), reason = HOST_MISMATCH, "refused a request: the host did not resolve to this address for the workload (hostBinding: strict)");
                Judgement::Refuse {
                    why: mismatch_why(r.host, dst),
                    policy: rule_name(&p, id),
                }
            }
            _ => judgement(&p, v, name, r),
        }
    }
    /// The audit line of one request (`egress::proxy`, message `request`): refusals and
    /// audits at info, the rest at debug. The query string is never logged.
    fn request_done(&self, rec: &Record, l: &RequestLog) {
        self.metrics.request(&l.method, &l.rule, l.verdict);
        self.log_request(rec, l);
    }

    /// The audit line of one request alone (its metric counted by the caller).
    fn log_request(&self, rec: &Record, l: &RequestLog) {
        let ms = l.started.map_or(0, |t| t.elapsed().as_millis() as u64);
        let (workload, method, host, path) = (
            &rec.workload,
            l.method.as_str(),
            l.host.as_str(),
            l.path.as_str(),
        );
        let (rule, verdict, status) = (l.rule.as_str(), l.verdict, l.status);
        let (bytes_out, bytes_in) = l.bytes;
        if verdict == "allow" {
            debug!(target: "egress::proxy", workload, dst = %rec.dst, method, host, path, rule, verdict, status, bytes_out, bytes_in, ms, "request");
        } else {
            info!(target: "egress::proxy", workload, dst = %rec.dst, method, host, path, rule, verdict, status, bytes_out, bytes_in, ms, "request");
        }
    }

    /// Refuses to dial an address of the node itself for a workload (see [`super::guard`]).
    /// (None: the connection ends here.)
    pub(super) fn refuse_into_node<T>(
        &self,
        client: TcpStream,
        rec: &mut Record,
        class: Cidr,
    ) -> Option<T> {
        rec.verdict = "into-node";
        warn!(target: "egress::proxy", workload = rec.workload.as_str(), dst = %rec.dst, class = %class, "refused: the proxy does not dial the node's own addresses (loopback, link-local, its interfaces) unless an Egress names the address");
        reset(client);
        self.finish(rec, (0, 0), "refused: a node address");
        None
    }
}

/// The one-line reason of a `host-address-mismatch` refusal.
pub(super) fn mismatch_why(host: Option<&str>, dst: SocketAddr) -> String {
    format!(
        "{HOST_MISMATCH}: {} did not resolve to {} for this workload",
        host.unwrap_or("(none)"),
        dst.ip()
    )
}

/// The verdict on one request, with the 403's text when refused.
fn judgement(
    p: &Compiled,
    v: HostVerdict,
    name: &str,
    r: &egress_common::wire::http::Request<'_, '_>,
) -> Judgement {
    match v {
        HostVerdict::Allow(id) => Judgement::Allow {
            rule: rule_name(p, id),
            audit: false,
        },
        HostVerdict::Audit(id) => Judgement::Allow {
            rule: rule_name(p, id),
            audit: true,
        },
        HostVerdict::Deny(id) => {
            let rule = rule_name(p, id);
            let (mut why, policy) = refusal(name, r.host, &rule);
            if let (Some(info), Some(host)) = (p.rule(id).filter(|i| !i.http.is_empty()), r.host) {
                let verb = if info.action == Action::Allow {
                    format!("no route of Egress policy {rule} allows it")
                } else {
                    format!("Egress policy {rule} denies it")
                };
                why = format!(
                    "{} {} on host {host} is refused for workload {name}: {verb}",
                    r.method, r.path
                );
            }
            Judgement::Refuse { why, policy }
        }
    }
}

impl Proxy {
    /// The 403's (reason, policy) for a connection whose first request `head` is refused;
    /// its audit line too.
    pub(super) fn first_request_refused(
        &self,
        p: &Compiled,
        workload: u32,
        rec: &Record,
        head: &[u8],
    ) -> (String, String) {
        let mut headers = [http::EMPTY_HEADER; http::MAX_HEADERS];
        if let Ok(r) = http::request(head, &mut headers) {
            let v = p.decide_request(workload, rec.dst.ip(), rec.dst.port(), &view(&r));
            if let Judgement::Refuse { why, policy } = judgement(p, v, &rec.workload, &r) {
                let log = RequestLog {
                    method: r.method.into(),
                    host: r.host.unwrap_or("").into(),
                    path: r.path.into(),
                    rule: policy.clone(),
                    verdict: "deny",
                    status: 403,
                    bytes: (r.len as u64, 0),
                    started: Some(rec.started),
                };
                self.request_done(rec, &log);
                return (why, policy);
            }
        }
        refusal(&rec.workload, rec.host.as_deref(), &rec.rule)
    }
}
