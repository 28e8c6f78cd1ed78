//! Host judging that cannot be fooled (issue 15), against nginx virtual hosts (HTTP/1.1,
//! TLS, h2c) with curl, python and openssl as clients: every request of a keep-alive or
//! pipelined connection is judged, absolute-form targets and leading CRLFs do not hide the
//! host, a ClientHello cut into many records or grown past 16 KiB is still judged, and when
//! the host cannot be told (no SNI, h2c prior knowledge, HTTP/1.0 without Host) the
//! connection is refused although an address rule allows the destination. nginx's access log
//! shows that no request for the denied host ever reached it.

use std::{path::Path, process::Command};

use crate::harness::{privileged_with, temp_dir, wait_listening, Agent, Stopped};
use egress_test_support::process::{self_signed, wait_listening_in};

const EVASIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/evasions.py");
const IP: &str = "127.36.0.1";

/// nginx with two virtual hosts (allowed.example, denied.example) on IP:80 (HTTP/1.1),
/// IP:443 (TLS) and IP:8080 (h2c prior knowledge); the access log records `$host`.
pub(crate) fn nginx(ip: &str) -> Stopped {
    nginx_in(
        None,
        &[ip],
        &[
            ("allowed.example", "allowed"),
            ("denied.example", "DENIED-VHOST"),
        ],
    )
}

/// nginx in network namespace `netns` (None: this one) on each of `ips`, ports 80 (HTTP/1.1),
/// 443 (TLS) and 8080 (h2c), with a virtual host per (name, reply) of `vhosts`; the access
/// log records `$host "$request" $status $server_addr`.
pub(crate) fn nginx_in(netns: Option<&Path>, ips: &[&str], vhosts: &[(&str, &str)]) -> Stopped {
    let dir = temp_dir("nginx");
    self_signed(&dir);
    let d = dir.display();
    let vhost = |name: &str, reply: &str| {
        let listen: String = ips
            .iter()
            .map(|ip| format!("listen {ip}:80; listen {ip}:443 ssl; listen {ip}:8080 http2; "))
            .collect();
        format!(
            "server {{ {listen}server_name {name};
               ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
               location / {{ return 200 \"{reply} $request_method $uri\\n\"; }} }}\n"
        )
    };
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; user root; pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format hosts '$host \"$request\" $status $server_addr';
  access_log {d}/access.log hosts;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  keepalive_requests 1000;
{}}}\n",
        vhosts.iter().map(|(n, r)| vhost(n, r)).collect::<String>(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("nginx");
            c
        }
        None => Command::new("nginx"),
    };
    let child = cmd
        .args(["-p", &dir.to_string_lossy(), "-c"])
        .arg(dir.join("nginx.conf"))
        .spawn()
        .expect("start nginx");
    let s = Stopped { child, dir };
    for ip in ips {
        for port in [80, 443, 8080] {
            let addr = format!("{ip}:{port}");
            let within = std::time::Duration::from_secs(10);
            match netns {
                Some(ns) => wait_listening_in(ns, "nginx", &addr, within),
                None => wait_listening("nginx", &addr, within),
            }
        }
    }
    s
}

pub(crate) fn access_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("access.log")).unwrap_or_default()
}

/// Host rules for allowed.example and against denied.example, and an address rule that lets
/// the workload reach IP on the same ports: the address rule must not let through what the
/// host rules refuse, nor a connection whose host the proxy cannot tell.
fn policy() -> String {
    format!(
        "kind: MeshConfig
metadata: {{name: egress}}
spec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}, sniffTimeout: 2s}}}}
---
kind: Workload
metadata: {{name: web}}
---
kind: Egress
metadata: {{name: allow-site}}
spec:
  sources: [{{name: web}}]
  hosts: [allowed.example]
  ports: [{{number: 80}}, {{number: 443}}, {{number: 8080}}]
---
kind: Egress
metadata: {{name: no-denied}}
spec:
  sources: [{{name: web}}]
  hosts: [denied.example]
  ports: [{{number: 80}}, {{number: 443}}, {{number: 8080}}]
  action: deny
---
kind: Egress
metadata: {{name: by-address}}
spec:
  sources: [{{name: web}}]
  ipAddresses: [{IP}/32]
  ports: [{{number: 80}}, {{number: 443}}, {{number: 8080}}]
  via: proxy
"
    )
}

fn run(agent: &Agent, args: &[&str]) -> String {
    let out = agent.exec("web", args);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !text.is_empty() || !out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// curl in the workload for `http://<url>` with its host resolved to `ip`: "<body>|<status>".
fn curl(agent: &Agent, ip: &str, url: &str, extra: &[&str]) -> String {
    let host_port = url.split('/').next().unwrap_or(url);
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "80"));
    let resolve = format!("{host}:{port}:{ip}");
    let url = format!("http://{url}");
    let mut args = vec![
        "curl",
        "-s",
        "--max-time",
        "10",
        "--resolve",
        &resolve,
        "-w",
        "|%{http_code}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = agent.exec("web", &args);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn py(agent: &Agent, mode: &str, port: u16, rest: &[&str]) -> String {
    let port = port.to_string();
    let mut args = vec!["python3", EVASIONS, mode, IP, &port];
    args.extend_from_slice(rest);
    run(agent, &args)
}

#[test]
fn every_http_request_is_judged_and_the_host_cannot_be_hidden() {
    if !privileged_with(&["nginx", "curl", "openssl"]) {
        return;
    }
    let origin = nginx(IP);
    let agent = Agent::start(&policy());

    // curl: the allowed host passes, the denied one gets a 403 naming the policy.
    let get = |host: &str| curl(&agent, IP, &format!("{host}/x"), &[]);
    assert_eq!(get("allowed.example"), "allowed GET /x\n|200");
    let denied = get("denied.example");
    assert!(
        denied.ends_with("403")
            && denied.contains("host denied.example is refused for workload default/web: Egress policy default/no-denied denies it"),
        "{denied}"
    );

    // Keep-alive: the second request of the connection, for the denied host, is refused.
    let out = py(
        &agent,
        "keepalive",
        80,
        &["allowed.example", "denied.example", "allowed.example"],
    );
    assert!(
        out.starts_with(
            "200:allowed GET /allowed.example | 403:egress: host denied.example is refused"
        ),
        "{out}"
    );
    assert!(!out.contains("DENIED-VHOST"), "{out}");
    // Pipelined: judged one by one, answered in order.
    let out = py(
        &agent,
        "pipeline",
        80,
        &[
            "allowed.example",
            "allowed.example",
            "denied.example",
            "allowed.example",
        ],
    );
    assert!(
        out.starts_with(
            "200:allowed GET /allowed.example | 200:allowed GET /allowed.example | 403:"
        ),
        "{out}"
    );
    // Absolute form: the origin follows the target, so the proxy does too; a Host that
    // disagrees with it is refused.
    for (text, want) in [
        ("GET http://denied.example/abs HTTP/1.1\\r\\nHost: allowed.example\\r\\n\\r\\n", "403:egress: request refused: the request target and Host name different hosts"),
        ("GET http://denied.example/abs HTTP/1.1\\r\\nHost: denied.example\\r\\n\\r\\n", "403:egress: host denied.example is refused"),
        ("GET http://allowed.example/abs HTTP/1.1\\r\\nHost: allowed.example\\r\\nConnection: close\\r\\n\\r\\n", "200:allowed GET /abs"),
        // After leading empty lines, still judged.
        ("\\r\\n\\r\\nGET /crlf HTTP/1.1\\r\\nHost: denied.example\\r\\n\\r\\n", "403:egress: host denied.example is refused"),
        // HTTP/1.0 without Host: the host is unknown, refused although the address rule
        // allows the destination.
        ("GET /nohost HTTP/1.0\\r\\n\\r\\n", "403:egress: the request names no host, and Egress policy default/allow-site judges hosts"),
        // Two Host headers.
        ("GET / HTTP/1.1\\r\\nHost: allowed.example\\r\\nHost: denied.example\\r\\n\\r\\n", "403:egress: request refused: more than one Host header"),
    ] {
        let out = py(&agent, "raw", 80, &[text]);
        assert!(out.starts_with(want), "{text}: {out}");
    }

    // TLS: the SNI in any record of a ClientHello cut into many (each its own segment).
    for size in ["7", "40", "200"] {
        let out = py(&agent, "tls-split", 443, &["allowed.example", size]);
        assert_eq!(out, "HTTP/1.1 200 OK allowed GET /", "records of {size}");
        let out = py(&agent, "tls-split", 443, &["denied.example", size]);
        assert!(out.starts_with("refused"), "records of {size}: {out}");
    }
    // A ClientHello past 16 KiB (post-quantum sized) is judged too; past 64 KiB refused.
    // (nginx's own answer to the padded hello, whatever it is, shows that it reached nginx;
    // the proxy's refusal is an access_denied alert, 49.)
    let out = py(&agent, "tls-big", 443, &["allowed.example", "30000"]);
    assert!(
        out == "server hello" || out.starts_with("alert 4") && out != "alert 49",
        "{out}"
    );
    assert_eq!(
        py(&agent, "tls-big", 443, &["denied.example", "30000"]),
        "alert 49"
    );
    assert!(py(&agent, "tls-big", 443, &["allowed.example", "max"]).starts_with("refused"));
    // No SNI: refused, although the address rule allows IP:443.
    let out = agent.exec(
        "web",
        &[
            "openssl",
            "s_client",
            "-connect",
            &format!("{IP}:443"),
            "-noservername",
            "-brief",
        ],
    );
    assert!(!out.status.success(), "openssl without SNI got through");
    let out = agent.exec(
        "web",
        &["sh", "-c", &format!("printf 'GET / HTTP/1.1\\r\\nHost: allowed.example\\r\\nConnection: close\\r\\n\\r\\n' | openssl s_client -quiet -connect {IP}:443 -servername allowed.example 2>/dev/null")],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("allowed GET /"),
        "{out:?}"
    );

    // h2c with prior knowledge: not HTTP/1.x, so no host the proxy can judge: refused, for
    // the allowed host too (documented).
    for host in ["denied.example", "allowed.example"] {
        let out = curl(
            &agent,
            IP,
            &format!("{host}:8080/h2c"),
            &["--http2-prior-knowledge"],
        );
        assert_eq!(out, "|000", "h2c to {host}");
    }

    let log = access_log(&origin.dir);
    assert!(
        log.contains("allowed.example \"GET /x HTTP/1.1\" 200"),
        "{log}"
    );
    assert!(
        !log.contains("denied.example"),
        "the origin saw the denied host:\n{log}"
    );
    assert!(!log.contains("/h2c") && !log.contains("/nohost"), "{log}");
    let alog = agent.wait_log("method=\"GET\" host=\"denied.example\" path=\"/denied.example\" rule=\"default/no-denied\" verdict=\"deny\" status=403");
    assert!(!alog.contains("panicked"), "{alog}");
}

/// A pod's connection to its own 127.0.0.1, or to a link-local address, on a port a host
/// rule covers is redirected to the proxy, which dials from the node's namespace: it would
/// reach the node's loopback (or the metadata endpoint with the node's identity). Refused and
/// counted, unless an Egress names the address.
#[test]
fn a_pod_cannot_reach_the_node_through_the_proxy() {
    use crate::pods::{metric, Net};
    if !privileged_with(&["ip", "nsenter"]) {
        return;
    }
    const P: u16 = 9315;
    let net = Net::new();
    let node = net.node_path();
    let name = node.file_name().unwrap().to_string_lossy().into_owned();
    crate::harness::ip(&[
        "-n",
        &name,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    let on_node_lo = crate::harness::TcpServer::start_in(&node, "127.0.0.1", P);
    let metadata = crate::harness::TcpServer::start_in(&node, "169.254.169.254", P);
    let hosts = format!("---\nkind: Egress\nmetadata: {{name: site}}\nspec: {{sources: [{{name: web}}], hosts: [allowed.example], ports: [{{number: {P}}}]}}\n");
    let policy = format!("{}{hosts}", net.policy(true));
    let a = Agent::start_in(&policy, Some(&node));
    let req = "GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n";
    let p = P.to_string();
    for dst in ["127.0.0.1", "169.254.169.254"] {
        let out = a.client("web", &["tcp", dst, &p, req]);
        assert!(
            !out.contains("reply=127") && !out.contains("reply=169"),
            "{dst}: {out}"
        );
    }
    assert_eq!(
        on_node_lo.accepted(),
        0,
        "the pod reached the node's loopback"
    );
    assert_eq!(
        metadata.accepted(),
        0,
        "the pod reached a link-local address via the node"
    );
    assert_eq!(
        metric(
            &a,
            "egress_proxy_connections_total",
            &["result=\"into-node\""]
        ),
        2
    );
    a.wait_log("the proxy does not dial the node's own addresses");

    // Named explicitly, the link-local address is dialled.
    let named = format!("---\nkind: Egress\nmetadata: {{name: metadata}}\nspec: {{sources: [{{name: web}}], ipAddresses: [169.254.169.254/32], ports: [{{number: {P}}}], via: proxy}}\n");
    a.reload(&format!("{policy}{named}"));
    let out = a.client("web", &["tcp", "169.254.169.254", &p, req]);
    assert!(out.starts_with("ok peer=169.254.169.254"), "{out}");
    assert_eq!(metadata.accepted(), 1);
}

/// Route rules (OSM/FSM HTTPRouteGroup matches, inline): method, path, header; deny wins; a
/// refused request is a 403 naming the policy, and the origin never sees it.
#[test]
fn routes_allow_and_deny_requests_by_method_path_and_header() {
    if !privileged_with(&["nginx", "curl"]) {
        return;
    }
    let ip = "127.37.0.1";
    let origin = nginx(ip);
    let agent = Agent::start(&format!(
        r#"kind: MeshConfig
metadata: {{name: egress}}
spec: {{traffic: {{enableEgress: false}}, proxy: {{port: {{proxy_port}}}}}}
---
kind: Workload
metadata: {{name: web}}
---
kind: Egress
metadata: {{name: api}}
spec:
  sources: [{{name: web}}]
  hosts: [allowed.example]
  ipAddresses: [{ip}/32]
  ports: [{{number: 80, protocol: http}}]
  http:
    - {{methods: [GET], paths: [{{exact: /status}}, {{prefix: /v1/public/}}, {{regex: "/items/[0-9]+"}}]}}
    - {{methods: [POST], paths: [{{exact: /upload}}], headers: {{x-tenant: acme}}}}
---
kind: Egress
metadata: {{name: no-admin}}
spec:
  sources: [{{name: web}}]
  hosts: [allowed.example]
  ports: [{{number: 80}}]
  http: [{{paths: [{{prefix: /v1/public/admin}}]}}]
  action: deny
"#
    ));
    let request = |method: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["-X", method];
        args.extend_from_slice(extra);
        curl(&agent, ip, &format!("allowed.example{path}"), &args)
    };
    for (method, path, extra, want) in [
        ("GET", "/status", &[][..], "allowed GET /status\n|200"),
        ("GET", "/v1/public/docs", &[], "allowed GET /v1/public/docs\n|200"),
        ("GET", "/items/7?q=1", &[], "allowed GET /items/7\n|200"),
        ("POST", "/upload", &["-H", "X-Tenant: acme", "-d", "x=1"], "allowed POST /upload\n|200"),
        ("GET", "/private", &[], "egress: GET /private on host allowed.example is refused for workload default/web: no route of Egress policy default/api allows it\n|403"),
        ("DELETE", "/status", &[], "egress: DELETE /status on host allowed.example is refused for workload default/web: no route of Egress policy default/api allows it\n|403"),
        ("POST", "/upload", &["-H", "X-Tenant: evil", "-d", "x=1"], "egress: POST /upload on host allowed.example is refused for workload default/web: no route of Egress policy default/api allows it\n|403"),
        ("GET", "/v1/public/admin/users", &[], "egress: GET /v1/public/admin/users on host allowed.example is refused for workload default/web: Egress policy default/no-admin denies it\n|403"),
    ] {
        assert_eq!(request(method, path, extra), want, "{method} {path} {extra:?}");
    }
    // Keep-alive: an allowed request, then a refused one on the same connection.
    let resolve = format!("allowed.example:80:{ip}");
    let out = agent.exec(
        "web",
        &[
            "curl",
            "-s",
            "--resolve",
            &resolve,
            "-w",
            "|%{http_code}|%{num_connects}\n",
            "http://allowed.example/status",
            "http://allowed.example/v1/public/admin/x",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("|200|1") && text.contains("|403|0"), "{text}");
    let log = access_log(&origin.dir);
    for seen in ["/status", "/v1/public/docs", "/items/7", "POST /upload"] {
        assert!(log.contains(seen), "{seen}: {log}");
    }
    for never in ["/private", "DELETE", "/admin"] {
        assert!(!log.contains(never), "the origin saw {never}:\n{log}");
    }
    assert_eq!(log.matches("POST /upload").count(), 1, "{log}");
    agent.wait_log("method=\"DELETE\" host=\"allowed.example\" path=\"/status\" rule=\"default/api\" verdict=\"deny\" status=403");
}
