//! Gateways named by Service: ours, and FSM's EgressGateway read as one.

use crate::policy::{
    documents, fsm_gateway::ours, model::API_VERSION, parse_unlinked, GatewayMode, PortRef,
};

const FSM: &str = "apiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: global-egress-gateway, namespace: fsm}\nspec:\n  global:\n    - {service: fsm-egress-gateway, namespace: fsm, weight: 100}\n";

fn err(text: &str) -> String {
    let e = parse_unlinked(text, "g.yaml").unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

#[test]
fn fsm_gateway_becomes_a_service_gateway_with_its_mode() {
    let cfg = parse_unlinked(FSM, "g.yaml").unwrap();
    let g = &cfg.gateways[0];
    assert_eq!(g.id.name, "global-egress-gateway");
    assert!(g.spec.is_global());
    let ep = &g.spec.global[0];
    assert_eq!(ep.address, None);
    let svc = ep.service.as_ref().unwrap();
    assert_eq!(svc.to_string(), "fsm/fsm-egress-gateway");
    assert_eq!(svc.port, None);
    assert_eq!(ep.mode, GatewayMode::Http2tunnel, "FSM's default mode");
    let socks = FSM.replace(
        "namespace: fsm}",
        "namespace: fsm, annotations: {flomesh.io/egress-gateway-mode: sock5}}",
    );
    let cfg = parse_unlinked(&socks, "g.yaml").unwrap();
    assert_eq!(cfg.gateways[0].spec.global[0].mode, GatewayMode::Socks5);
    // The converted document is ours, cluster-scoped.
    let doc = &documents(FSM, "g.yaml").unwrap()[0];
    let o = ours(doc, "g.yaml").unwrap().unwrap();
    assert_eq!(o.body["apiVersion"], API_VERSION);
    assert!(o.body["metadata"].get("namespace").is_none());
}

#[test]
fn ours_names_a_service_by_port_name_or_number() {
    let ours = "kind: EgressGateway\nmetadata: {name: g}\nspec: {endpoints: [{service: {name: gw, namespace: fsm, port: socks}, mode: socks5}, {service: {name: gw2, namespace: fsm, port: 1080}, mode: http2tunnel}]}\n";
    let cfg = parse_unlinked(ours, "g.yaml").unwrap();
    let eps = cfg.gateways[0].spec.all();
    let port = |i: usize| eps[i].service.as_ref().unwrap().port.clone();
    assert_eq!(port(0), Some(PortRef::Name("socks".into())));
    assert_eq!(port(1), Some(PortRef::Number(1080)));
    // Standalone: no cluster to resolve it in.
    let e = crate::policy::parse(ours, "g.yaml")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "g.yaml: EgressGateway g: spec.endpoints[0].service: a gateway named by Service needs Kubernetes mode (run --kubernetes, validate --kubernetes): a standalone agent has no cluster to find its endpoints in; give its address instead");
    let e = err(&ours.replace("port: 1080", "port: 0"));
    assert!(
        e.starts_with(
            "g.yaml: EgressGateway g: spec.endpoints[1].service.port: port 0 is out of range"
        ),
        "{e}"
    );
    let e = err(&ours.replace(
        "{service: {name: gw,",
        "{address: 127.0.0.1:1, service: {name: gw,",
    ));
    assert!(
        e.starts_with("g.yaml: EgressGateway g: spec.endpoints[0].service: give either address or service, not both"),
        "{e}"
    );
    let e = err(&ours.replace("name: gw,", "name: Gw,"));
    assert!(
        e.starts_with(
            "g.yaml: EgressGateway g: spec.endpoints[0].service.name: \"Gw\" is not a valid name"
        ),
        "{e}"
    );
    let e = err("kind: EgressGateway\nmetadata: {name: g}\nspec: {global: [{mode: socks5}]}\n");
    assert!(
        e.starts_with("g.yaml: EgressGateway g: spec.global[0]: give the gateway's address"),
        "{e}"
    );
}

#[test]
fn what_fsm_has_and_we_cannot_honour_is_refused_by_name() {
    let cases = [
        (FSM.replace("spec:\n", "spec:\n  rules: [{egressPolicies: [{name: e, namespace: curl}], egressGateways: [{service: s, namespace: fsm}]}]\n"),
         "g.yaml: EgressGateway global-egress-gateway: spec.rules: FSM's gateway rules"),
        (FSM.replace("spec:\n", "spec:\n  matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: r}]\n"),
         "g.yaml: EgressGateway global-egress-gateway: spec.matches: route matches"),
        (format!("{FSM}    - {{service: other, namespace: fsm}}\n"),
         "g.yaml: EgressGateway global-egress-gateway: spec.global[1]: one Service per gateway"),
        (FSM.replace("weight: 100", "wieght: 100"),
         "g.yaml: EgressGateway global-egress-gateway: spec.global[0].wieght: unknown field `wieght`"),
        (FSM.replace("namespace: fsm}", "namespace: fsm, annotations: {flomesh.io/egress-gateway-mode: sock4}}"),
         "g.yaml: EgressGateway global-egress-gateway: metadata.annotations.flomesh.io/egress-gateway-mode: \"sock4\" is not http2tunnel or sock5"),
        ("apiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g, namespace: fsm}\n".to_string(),
         "g.yaml: EgressGateway g: spec: missing"),
    ];
    for (doc, want) in cases {
        let e = err(&doc);
        assert!(e.starts_with(want), "\n got {e}\nwant {want}");
    }
}
