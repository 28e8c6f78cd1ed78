//! `egress-agent convert -f FILE`: OSM's and FSM's Egress objects
//! (`policy.openservicemesh.io/v1alpha1`, `policy.flomesh.io/v1alpha1`) as this project's
//! (`policy.egress.dev/v1alpha1`), for `kubectl apply`. Their fields mean the same here
//! (ServiceAccount sources, hosts, ipAddresses, ports), so only the apiVersion changes; a
//! field we cannot honour (`matches`, `sources[].mtls`) is refused by name, like every other
//! error. FSM's EgressGateway becomes ours naming the same Service (see
//! [`super::fsm_gateway`]). The other documents are checked the same way and passed through
//! unchanged.
//!
//! In Kubernetes mode the agent watches only its own group: an OSM or FSM CRD may not be
//! installed (a watch of a missing resource would never complete the first sync), and two
//! controllers acting on the same objects would each report on them. The standalone policy
//! file takes both forms directly.

use serde_json::Value;

use super::{document::documents, error::ConfigError, fsm_gateway, model::API_VERSION, parse};

/// The documents of `text` (`file` names it in errors), converted, as YAML.
pub fn convert(text: &str, file: &str) -> Result<String, ConfigError> {
    let mut out = Vec::new();
    for doc in documents(text, file)? {
        parse::object(&doc, file)?;
        if let Some(ours) = fsm_gateway::ours(&doc, file)? {
            out.push(ours.body);
            continue;
        }
        let mut body = doc.body;
        let foreign = body
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|a| parse::FOREIGN_EGRESS_APIS.contains(&a));
        if foreign {
            body["apiVersion"] = Value::from(API_VERSION);
        }
        out.push(body);
    }
    Ok(super::document::to_yaml(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn osm_and_fsm_egress_become_ours_and_what_we_cannot_honour_is_refused() {
        let osm = "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\nmetadata: {name: httpbin-80, namespace: curl}\nspec:\n  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]\n  hosts: [httpbin.org]\n  ports: [{number: 80, protocol: http}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";
        let out = convert(osm, "osm.yaml").unwrap();
        let docs = documents(&out, "out").unwrap();
        assert_eq!(docs[0].body["apiVersion"], API_VERSION);
        assert_eq!(docs[0].body["spec"]["sources"][0]["kind"], "ServiceAccount");
        assert_eq!(docs[1].body["apiVersion"], "networking.k8s.io/v1");
        let fsm = osm.replace("openservicemesh", "flomesh").replace(
            "ports: [{number: 80, protocol: http}]",
            "ports: [{number: 80, protocol: http}]\n  matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: r}]",
        );
        let e = convert(&fsm, "fsm.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with(
                "fsm.yaml: Egress curl/httpbin-80: spec.matches: unknown field `matches`"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_example_file_validates_and_converts() {
        let text = include_str!("../../../deploy/examples/policies-you-have.yaml");
        let cfg = crate::policy::parse_unlinked(text, "example").unwrap();
        assert_eq!(cfg.egresses.len(), 1);
        assert_eq!(cfg.network_policies.len(), 1);
        assert_eq!(cfg.admin_policies.len(), 2);
        assert!(cfg.gateways[0].spec.global[0].service.is_some());
        let out = convert(text, "example").unwrap();
        assert!(!out.contains("openservicemesh"), "{out}");
        assert!(!out.contains("flomesh.io/v1alpha1"), "{out}");
    }

    #[test]
    fn fsm_gateway_becomes_ours_naming_its_service() {
        let fsm = "apiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: global-egress-gateway, namespace: fsm, annotations: {flomesh.io/egress-gateway-mode: sock5}}\nspec: {global: [{service: fsm-egress-gateway, namespace: fsm}]}\n";
        let out = convert(fsm, "fsm.yaml").unwrap();
        let doc = &documents(&out, "out").unwrap()[0];
        assert_eq!(doc.body["apiVersion"], API_VERSION);
        assert_eq!(
            doc.body["spec"],
            serde_json::json!({"global": [{"service": {"name": "fsm-egress-gateway", "namespace": "fsm"}, "mode": "socks5"}]})
        );
        // What it converted to is a valid gateway in Kubernetes mode.
        let cfg = crate::policy::parse_unlinked(&out, "out").unwrap();
        assert!(cfg.gateways[0].spec.is_global());
    }
}
