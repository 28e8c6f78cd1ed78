//! The policy file's contract: what parses, and how every error names its file, object and
//! field.

use super::*;
use crate::policy::{
    model::{FailMode, GatewayMode, Protocol, Via, DEFAULT_PROXY_PORT},
    scalar::Port,
};

const GOOD: &str = r#"
kind: MeshConfig
metadata: {name: egress}
spec:
  traffic: {enableEgress: false, meshCIDRs: [10.0.0.0/8]}
  proxy: {port: 15001}
  failMode: closed
---
kind: Workload
metadata: {name: web, namespace: default, labels: {app: web}}
---
apiVersion: policy.egress.dev/v1alpha1
kind: Egress
metadata: {name: allow-github, namespace: default}
spec:
  sources: [{kind: Workload, name: web, namespace: default}]
  hosts: [github.com, "*.githubusercontent.com"]
  ipAddresses: [140.82.112.0/20]
  ports: [{number: 443, protocol: https}]
  action: allow
---
"#;

fn err(text: &str) -> String {
    parse(text, "p.yaml").unwrap_err().to_string()
}

#[test]
fn parses_the_contract_example() {
    let c = parse(GOOD, "p.yaml").unwrap();
    assert!(!c.mesh.traffic.enable_egress);
    assert_eq!(c.mesh.traffic.mesh_cidrs[0].to_string(), "10.0.0.0/8");
    assert_eq!(c.workloads.len(), 1);
    let e = &c.egresses[0];
    assert_eq!(e.spec.route(), Via::Proxy);
    assert_eq!(e.spec.ports[0].protocol, Protocol::Https);
    assert_eq!(e.sources(&c.workloads).count(), 1);
}

#[test]
fn defaults_without_meshconfig() {
    let c = parse("kind: Workload\nmetadata: {name: a}\n", "p.yaml").unwrap();
    assert!(c.mesh.traffic.enable_egress);
    assert_eq!(c.mesh.proxy.port, Port(DEFAULT_PROXY_PORT));
    assert_eq!(c.mesh.fail_mode, FailMode::Closed);
}

#[test]
fn errors_name_file_object_and_field() {
    let bad_port = GOOD.replace("number: 443", "number: 0");
    assert_eq!(
        err(&bad_port),
        "p.yaml: Egress default/allow-github: spec.ports[0].number: port 0 is out of range 1-65535"
    );
    let e = err(&GOOD.replace("number: 443", "number: 65536"));
    assert!(
        e.contains("spec.ports[0].number: port 65536 is out of range"),
        "{e}"
    );
    let e = err(&GOOD.replace("140.82.112.0/20", "140.82.112.0/33"));
    assert!(
        e.contains("Egress default/allow-github: spec.ipAddresses[0]: invalid CIDR"),
        "{e}"
    );
    let e = err(&GOOD.replace("140.82.112.0/20", "140.82.112.1/20"));
    assert!(
        e.contains("host bits are set (the network is 140.82.112.0/20)"),
        "{e}"
    );
    let e = err(&GOOD.replace("action: allow", "action: allow\n  colour: blue"));
    assert!(
        e.contains("Egress default/allow-github: spec.colour: unknown field `colour`"),
        "{e}"
    );
    let e = err(&GOOD.replace("kind: Workload", "kind: Pod"));
    assert!(
        e.contains("Pod default/web: kind: unknown kind \"Pod\""),
        "{e}"
    );
    let e = err(&GOOD.replace(
        "name: web, namespace: default}]",
        "name: db, namespace: default}]",
    ));
    assert_eq!(e, "p.yaml: Egress default/allow-github: spec.sources[0].name: no Workload default/db in this file");
    let e = err(&format!(
        "{GOOD}\nkind: Workload\nmetadata: {{name: web}}\n"
    ));
    assert!(
        e.contains("Workload default/web: metadata.name: duplicate Workload default/web"),
        "{e}"
    );
    let e = err("kind: Egress\nmetadata: {name: x\n");
    assert!(e.starts_with("p.yaml: document 1: "), "{e}");
    let e = err(&GOOD.replace("enableEgress: false", "enableEgress: maybe"));
    assert!(
        e.contains("MeshConfig egress: spec.traffic.enableEgress: invalid type"),
        "{e}"
    );
}

#[test]
fn semantic_checks() {
    let e = err(&GOOD.replace("protocol: https", "protocol: udp"));
    assert!(
        e.contains("spec.ports[0].protocol: host rules need TCP"),
        "{e}"
    );
    let e = err(&GOOD.replace("action: allow", "action: allow\n  via: gateway"));
    assert!(
        e.contains("Egress default/allow-github: spec.via: via: gateway without gateway: NAME needs a global EgressGateway"),
        "{e}"
    );
    let e = err(&GOOD.replace("github.com,", "\"git hub.com\","));
    assert!(e.contains("spec.hosts[0]: invalid host"), "{e}");
    let e = err(&GOOD.replace(
        "{number: 443, protocol: https}",
        "{number: 443, endPort: 80}",
    ));
    assert!(
        e.contains("spec.ports[0].endPort: endPort 80 is below number 443"),
        "{e}"
    );
}

const GATEWAYS: &str = r#"
kind: Workload
metadata: {name: web}
---
kind: EgressGateway
metadata: {name: global}
spec:
  global: [{address: 127.0.8.1:1080, mode: socks5}]
---
kind: EgressGateway
metadata: {name: squid}
spec:
  endpoints: [{address: 127.0.8.2:3128, mode: http-connect}, {address: "[::1]:8080", mode: http2tunnel}]
---
kind: Egress
metadata: {name: via-squid}
spec: {sources: [{name: web}], ipAddresses: [127.41.0.0/16], gateway: squid}
---
kind: Egress
metadata: {name: via-global}
spec: {sources: [{name: web}], ipAddresses: [127.42.0.0/16], via: gateway}
"#;

#[test]
fn gateways_global_and_per_policy() {
    let c = parse(GATEWAYS, "p.yaml").unwrap();
    assert_eq!(c.gateways.len(), 2);
    assert!(c.gateways[0].spec.is_global());
    assert_eq!(c.gateways[1].spec.all()[0].mode, GatewayMode::HttpConnect);
    assert_eq!(c.gateways[1].spec.all()[1].mode, GatewayMode::Http2tunnel);
    assert_eq!(c.egresses[0].spec.route(), Via::Gateway);
    assert_eq!(c.egresses[0].spec.gateway.as_deref(), Some("squid"));
    assert_eq!(c.egresses[1].spec.route(), Via::Gateway);
}

#[test]
fn gateway_errors() {
    let e = err(&GATEWAYS.replace("gateway: squid", "gateway: nope"));
    assert_eq!(
        e,
        "p.yaml: Egress default/via-squid: spec.gateway: no EgressGateway \"nope\" in this policy"
    );
    let e = err(&GATEWAYS.replace("gateway: squid", "gateway: squid, via: direct"));
    assert!(
        e.contains(
            "Egress default/via-squid: spec.gateway: a gateway is named but via is not gateway"
        ),
        "{e}"
    );
    let e = err(&GATEWAYS.replace("gateway: squid", "gateway: squid, action: deny"));
    assert!(
        e.contains("spec.gateway: a deny rule sends nothing anywhere"),
        "{e}"
    );
    let e = err(&GATEWAYS.replace("mode: socks5", "mode: socks4"));
    assert!(
        e.contains("EgressGateway global: spec.global[0].mode: unknown variant `socks4`"),
        "{e}"
    );
    let e = err(&GATEWAYS.replace("endpoints: [", "global: ["));
    assert!(
        e.contains("EgressGateway squid: spec.global: a second global gateway (the first is EgressGateway global)"),
        "{e}"
    );
    let e = err(&GATEWAYS.replace(
        "global: [{address: 127.0.8.1:1080, mode: socks5}]",
        "global: []",
    ));
    assert!(
        e.contains("EgressGateway global: spec: give the gateway's addresses"),
        "{e}"
    );
    let e = err(&GATEWAYS.replace("127.0.8.1:1080", "127.0.8.1"));
    assert!(
        e.contains("EgressGateway global: spec.global[0].address:"),
        "{e}"
    );
    let e = err(&GATEWAYS.replace(
        "ipAddresses: [127.41.0.0/16], gateway: squid",
        "ipAddresses: [127.41.0.0/16], gateway: squid, ports: [{number: 53, protocol: udp}]",
    ));
    assert!(
        e.contains("spec.ports[0].protocol: via: proxy and via: gateway carry TCP only"),
        "{e}"
    );
}

#[test]
fn durations_in_a_file() {
    let e = err(&GOOD.replace(
        "proxy: {port: 15001}",
        "proxy: {port: 15001, sniffTimeout: 5}",
    ));
    assert!(
        e.contains("MeshConfig egress: spec.proxy.sniffTimeout:"),
        "{e}"
    );
}

#[test]
fn sockets_default_to_refusing_what_no_hook_judges() {
    use egress_common::sockets::kind;
    let c = parse("kind: Workload\nmetadata: {name: a}\n", "p.yaml").unwrap();
    assert_eq!(c.mesh.sockets.allowed_bits(), kind::ICMP);
    let c = parse(
        "kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  sockets: {raw: allow, icmp: deny}\n",
        "p.yaml",
    )
    .unwrap();
    assert_eq!(c.mesh.sockets.allowed_bits(), kind::RAW);
    let e = err("kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  sockets: {raw: maybe}\n");
    assert!(e.contains("MeshConfig egress: spec.sockets.raw"), "{e}");
    let e = err("kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  sockets: {sctp: allow}\n");
    assert!(e.contains("spec.sockets"), "{e}");
}
