//! Route rules: methods, paths (exact, prefix, regex), headers; deny wins; TLS sees no routes.

use super::*;
use crate::policy::{compile, parse::parse, Compiled, HostVerdict};
use egress_common::wire::http::EMPTY_HEADER;

const BASE: &str = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: false}}\n---\nkind: Workload\nmetadata: {name: web}\n";

fn policy(rules: &str) -> Compiled {
    compile(&parse(&format!("{BASE}{rules}"), "t.yaml").unwrap()).unwrap()
}

fn ip() -> std::net::IpAddr {
    "192.0.2.1".parse().unwrap()
}

fn req(
    c: &Compiled,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&'static str, &'static str)],
) -> HostVerdict {
    let mut hs = [EMPTY_HEADER; 4];
    for (h, (n, v)) in hs.iter_mut().zip(headers) {
        h.name = n;
        h.value = v.as_bytes();
    }
    let r = RequestView {
        host: Some(host),
        method,
        path,
        headers: &hs[..headers.len()],
    };
    c.decide_request(1, ip(), 80, &r)
}

const RULES: &str = r#"---
kind: Egress
metadata: {name: api}
spec:
  sources: [{name: web}]
  hosts: [api.example]
  ports: [{number: 80}, {number: 443}]
  http:
    - {methods: [GET, head], paths: [{exact: /status}, {prefix: /v1/public/}, {regex: "/items/[0-9]+"}]}
    - {methods: [POST], paths: [{exact: /upload}], headers: {x-tenant: "acme|umbrella"}}
---
kind: Egress
metadata: {name: no-admin}
spec:
  sources: [{name: web}]
  hosts: ["*.example"]
  ports: [{number: 80}, {number: 443}]
  http: [{paths: [{prefix: /v1/public/admin}]}]
  action: deny
---
kind: Egress
metadata: {name: other}
spec: {sources: [{name: web}], hosts: [free.example], ports: [{number: 80}]}
"#;

#[test]
fn requests_are_judged_by_method_path_and_headers() {
    let c = policy(RULES);
    use HostVerdict::*;
    for (method, host, path, headers, want) in [
        ("GET", "api.example", "/status", &[][..], Allow(1)),
        ("HEAD", "api.example", "/v1/public/a/b", &[], Allow(1)),
        ("GET", "api.example", "/items/42", &[], Allow(1)),
        ("GET", "api.example", "/items/42/x", &[], Deny(1)),
        ("GET", "api.example", "/status/x", &[], Deny(1)),
        ("DELETE", "api.example", "/status", &[], Deny(1)),
        (
            "POST",
            "api.example",
            "/upload",
            &[("X-Tenant", "acme")],
            Allow(1),
        ),
        (
            "POST",
            "api.example",
            "/upload",
            &[("X-Tenant", "acme-evil")],
            Deny(1),
        ),
        ("POST", "api.example", "/upload", &[], Deny(1)),
        // Deny wins over the allowed prefix.
        ("GET", "api.example", "/v1/public/admin/users", &[], Deny(2)),
        ("GET", "free.example", "/anything", &[], Allow(3)),
        ("GET", "free.example", "/v1/public/admin", &[], Deny(2)),
        ("GET", "unknown.example", "/", &[], Deny(0)),
    ] {
        assert_eq!(
            req(&c, method, host, path, headers),
            want,
            "{method} {host}{path} {headers:?}"
        );
    }
    // Over TLS there is no request: the route-only allow does not let api.example out, and
    // the deny with routes refuses its hosts whole.
    assert_eq!(c.decide_host(1, ip(), 443, Some("api.example")), Deny(2));
    let c = policy(&RULES.replace("\"*.example\"", "deny.example"));
    assert_eq!(c.decide_host(1, ip(), 443, Some("api.example")), Deny(1));
}

#[test]
fn bad_routes_are_refused_with_the_field() {
    for (rule, field) in [
        ("http: [{paths: [{exact: nope}]}]", "spec.http[0].paths[0]"),
        (
            "http: [{paths: [{exact: /a, prefix: /b}]}]",
            "spec.http[0].paths[0]",
        ),
        (
            "http: [{paths: [{regex: '(unclosed'}]}]",
            "spec.http[0].paths[0]",
        ),
        ("http: [{methods: ['GE T']}]", "spec.http[0].methods"),
        (
            "http: [{headers: {'bad name': x}}]",
            "spec.http[0].headers.bad name",
        ),
    ] {
        let text = format!("{BASE}---\nkind: Egress\nmetadata: {{name: x}}\nspec: {{sources: [{{name: web}}], hosts: [a.example], {rule}}}\n");
        let e = parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains(field), "{rule}: {e}");
    }
    let text = format!("{BASE}---\nkind: Egress\nmetadata: {{name: x}}\nspec: {{sources: [{{name: web}}], ipAddresses: [10.0.0.0/8], http: [{{methods: [GET]}}]}}\n");
    let e = parse(&text, "t.yaml").unwrap_err().to_string();
    assert!(e.contains("spec.http") && e.contains("give hosts"), "{e}");
}
