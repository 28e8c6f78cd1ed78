//! Names bound to the addresses they resolved to (`hostBinding: strict`, anti domain
//! fronting), against real origins: nginx (HTTP/1.1 and TLS) and dnsmasq in an "outside"
//! network namespace the test creates, reached from the agent's "node" namespace through a
//! veth (so the origins are not the node's own addresses, which the proxy never dials for a
//! workload). Clients: dig and curl in a host workload in the node namespace.

use std::path::Path;

use crate::{
    dns::{by_name, dig, host_record, metric, resolver_in},
    harness::{free_port, privileged_with, Agent, Daemon, Stopped},
    host_judging::{access_log, nginx_in},
    pods::{Net, ALLOW4, DENY4},
};

/// The resolver, on the outside namespace's loopback.
const RESOLVER: &str = "192.0.2.53";
/// What good.test.example resolves to.
const GOOD: &str = ALLOW4;
/// An address it does not resolve to (alt.test.example's).
const FRONT: &str = DENY4;

struct World {
    // Dropped in this order: the agent before the namespaces it runs in.
    a: Agent,
    origin: Stopped,
    _dns: Daemon,
    _net: Net,
}

/// The node and outside namespaces, dnsmasq (good.test.example → GOOD, alt.test.example →
/// FRONT), nginx on GOOD and FRONT (virtual host good.test.example and alt.test.example), and
/// the agent in the node namespace with host rules for both names on ports 80 and 443.
fn world() -> World {
    let net = Net::new();
    net.outside_addr(RESOLVER);
    let out = net.out_path();
    let dns = resolver_in(
        Some(&out),
        RESOLVER,
        60,
        &[
            host_record("good.test.example", GOOD),
            host_record("alt.test.example", FRONT),
        ],
    );
    let origin = nginx_in(
        Some(&out),
        &[GOOD, FRONT],
        &[("good.test.example", "good"), ("alt.test.example", "alt")],
    );
    let policy = by_name(
        RESOLVER,
        "names",
        "good.test.example, alt.test.example",
        "{number: 80, protocol: http}, {number: 443, protocol: https}",
    )
    .replace("{dns_port}", &free_port().to_string());
    let mut a = Agent::start_in(&policy, Some(&net.node_path()));
    a.exec_in_node = true;
    World {
        a,
        origin,
        _dns: dns,
        _net: net,
    }
}

/// curl in the workload: `scheme://good.test.example/path` with the name pinned to `ip`
/// (`--resolve`, no DNS): (stdout ending in `|<status>`, curl's exit code).
fn curl(a: &Agent, scheme: &str, ip: &str, path: &str) -> (String, i32) {
    let port = if scheme == "https" { 443 } else { 80 };
    let resolve = format!("good.test.example:{port}:{ip}");
    let url = format!("{scheme}://good.test.example{path}");
    let out = a.exec(
        "web",
        &[
            "curl",
            "-sk",
            "--max-time",
            "5",
            "--resolve",
            &resolve,
            "-w",
            "|%{http_code}",
            &url,
        ],
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn origin_log(dir: &Path) -> String {
    access_log(dir)
}

#[test]
fn dns_host_binding_refuses_domain_fronting() {
    if !privileged_with(&[
        "dnsmasq", "dig", "curl", "nginx", "ip", "nsenter", "openssl",
    ]) {
        return;
    }
    let w = world();
    let a = &w.a;
    // Not resolved yet: the name is bound to no address.
    let (before, _) = curl(a, "http", GOOD, "/before-dns");
    assert!(before.ends_with("|403"), "before DNS: {before}");
    assert!(before.contains("host-address-mismatch"), "{before}");

    assert_eq!(dig(a, RESOLVER, "good.test.example", &[]), (0, GOOD.into()));
    let (ok, _) = curl(a, "http", GOOD, "/resolved");
    assert_eq!(ok, "good GET /resolved\n|200");
    // The allowed name, sent to an address it did not resolve to: refused by the proxy.
    let (fronted, _) = curl(a, "http", FRONT, "/fronted");
    assert!(fronted.ends_with("|403"), "{fronted}");
    assert!(
        fronted.contains("host-address-mismatch: good.test.example did not resolve to 192.0.2.30"),
        "{fronted}"
    );
    // TLS: the SNI is bound the same way (curl 35: the proxy's access_denied alert).
    let (tls_ok, code) = curl(a, "https", GOOD, "/tls");
    assert_eq!((code, tls_ok.as_str()), (0, "good GET /tls\n|200"));
    let (_, code) = curl(a, "https", FRONT, "/tls-fronted");
    assert_eq!(code, 35, "TLS fronting");

    a.wait_log("reason=\"host-address-mismatch\"");
    assert_eq!(
        metric(a, "egress_proxy_host_address_mismatch_total"),
        3.0,
        "{}",
        a.http_get("/metrics").1
    );
    // The origin saw the two requests that passed, and nothing of the refused ones.
    let log = origin_log(&w.origin.dir);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(
        log.contains("\"GET /resolved HTTP/1.1\" 200 192.0.2.10"),
        "{log}"
    );
    assert!(
        log.contains("\"GET /tls HTTP/1.1\" 200 192.0.2.10"),
        "{log}"
    );
    assert!(!log.contains(FRONT) && !log.contains("before-dns"), "{log}");
}

/// hostBinding is checked on every request of a keep-alive connection: after a request for
/// good.test.example to the address it resolved to, a request on the same connection for
/// alt.test.example (allowed by name, but resolved elsewhere) is refused before the origin
/// sees it.
#[test]
fn dns_host_binding_holds_for_every_request_of_a_keep_alive_connection() {
    if !privileged_with(&[
        "dnsmasq", "dig", "curl", "nginx", "ip", "nsenter", "openssl",
    ]) {
        return;
    }
    let w = world();
    let a = &w.a;
    assert_eq!(dig(a, RESOLVER, "good.test.example", &[]).1, GOOD);
    assert_eq!(dig(a, RESOLVER, "alt.test.example", &[]).1, FRONT);
    let url = |p: &str| format!("http://{GOOD}{p}");
    let (first, second, third) = (url("/first"), url("/second"), url("/third"));
    let w_fmt = "|%{http_code}|%{num_connects}\n";
    let mut args = vec!["curl", "-s", "--max-time", "5"];
    for (u, host) in [
        (&first, "Host: good.test.example"),
        (&second, "Host: alt.test.example"),
    ] {
        args.extend([
            "-H",
            host,
            "-w",
            w_fmt,
            u.as_str(),
            "--next",
            "--max-time",
            "5",
        ]);
    }
    // A new connection after the refusal: good.test.example passes again.
    args.extend(["-H", "Host: good.test.example", "-w", w_fmt, third.as_str()]);
    let out = a.exec("web", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("good GET /first\n|200|1\n"), "{text}");
    assert!(
        text.contains("host-address-mismatch: alt.test.example did not resolve to 192.0.2.10"),
        "{text}"
    );
    assert!(
        text.contains("|403|0\n"),
        "the refusal on the same connection: {text}"
    );
    assert!(text.contains("good GET /third\n|200|1\n"), "{text}");
    let log = origin_log(&w.origin.dir);
    assert!(log.contains("/first") && log.contains("/third"), "{log}");
    assert!(
        !log.contains("/second"),
        "the origin saw the refused request:\n{log}"
    );
    assert_eq!(metric(a, "egress_proxy_host_address_mismatch_total"), 1.0);
    a.wait_log("refused a request: the host did not resolve to this address");
}
