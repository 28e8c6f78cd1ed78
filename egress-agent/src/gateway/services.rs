//! Gateways named by Service (Kubernetes mode): the Service's EndpointSlices
//! (`discovery.k8s.io/v1`, label `kubernetes.io/service-name`), watched by
//! [`crate::k8s::watch`], kept here, and read by the node proxy at each connection: a change
//! of endpoints applies to the next connection, and a Service with no ready endpoint is an
//! error (the connection is refused and counted, never sent direct).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::RwLock,
};

use serde_json::Value;

use crate::policy::{PortRef, ServiceRef};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one EndpointSlice says, as far as gateways need it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slice {
    /// (namespace, Service name).
    pub service: (String, String),
    /// TCP ports: (name, endpoint port).
    pub ports: Vec<(String, u16)>,
    /// The ready endpoints' addresses (the first address of each).
    pub ready: Vec<IpAddr>,
}

/// (namespace, slice name).
type SliceKey = (String, String);

impl Slice {
    /// From an EndpointSlice's JSON; None without a name or the Service label. Endpoints
    /// whose `conditions.ready` is false are left out (unset means ready, as the API says).
    pub fn from_json(v: &Value) -> Option<(SliceKey, Slice)> {
        let meta = v.get("metadata")?;
        let ns = meta.get("namespace")?.as_str()?.to_string();
        let name = meta.get("name")?.as_str()?.to_string();
        let service = meta.pointer("/labels")?.get(SERVICE_NAME_LABEL)?.as_str()?;
        let ip_type = matches!(
            v.get("addressType").and_then(Value::as_str),
            Some("IPv4" | "IPv6")
        );
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let ports = list("ports")
            .iter()
            .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.get("port")?.as_u64()?).ok()?;
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                Some((name.to_string(), port))
            })
            .collect();
        let ready = list("endpoints")
            .iter()
            .filter(|_| ip_type)
            .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
            .filter_map(|e| e.pointer("/addresses/0")?.as_str()?.parse().ok())
            .collect();
        let slice = Slice {
            service: (ns.clone(), service.to_string()),
            ports,
            ready,
        };
        Some(((ns, name), slice))
    }
}

/// The addresses of `svc`'s ready endpoints, from its slices, in a stable order; an error
/// (one line) when there are none or the port is not there.
pub fn resolve<'a>(
    slices: impl IntoIterator<Item = &'a Slice>,
    svc: &ServiceRef,
) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    let mut ports_seen = Vec::new();
    for s in slices {
        if s.service.0 != svc.namespace || s.service.1 != svc.name {
            continue;
        }
        ports_seen.extend(s.ports.iter().cloned());
        let port = match &svc.port {
            Some(PortRef::Name(n)) => s.ports.iter().find(|(name, _)| name == n),
            Some(PortRef::Number(p)) => s.ports.iter().find(|(_, port)| port == p),
            None if s.ports.len() == 1 => s.ports.first(),
            None => None,
        };
        if let Some((_, port)) = port {
            out.extend(s.ready.iter().map(|ip| SocketAddr::new(*ip, *port)));
        }
    }
    out.sort();
    out.dedup();
    if !out.is_empty() {
        return Ok(out);
    }
    ports_seen.sort();
    ports_seen.dedup();
    match (&svc.port, ports_seen.len()) {
        (_, 0) => Err(format!(
            "Service {svc} has no ready endpoints (no EndpointSlice with a ready endpoint and a TCP port)"
        )),
        (None, n) if n > 1 => Err(format!(
            "Service {svc} has {n} TCP ports; name one in service.port"
        )),
        (Some(p), _) if !ports_seen.iter().any(|(n, num)| match p {
            PortRef::Name(want) => n == want,
            PortRef::Number(want) => num == want,
        }) => Err(format!("Service {svc} has no TCP port {p}")),
        _ => Err(format!("Service {svc} has no ready endpoints")),
    }
}

/// Every EndpointSlice of the cluster the watch delivered, shared with the node proxy.
#[derive(Debug, Default)]
pub struct Services {
    slices: RwLock<BTreeMap<SliceKey, Slice>>,
}

impl Services {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SliceKey, Slice>> {
        self.slices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a slice (its JSON).
    pub fn apply(&self, v: &Value) {
        if let Some((k, s)) = Slice::from_json(v) {
            self.write().insert(k, s);
        }
    }

    pub fn delete(&self, v: &Value) {
        if let Some((k, _)) = Slice::from_json(v) {
            self.write().remove(&k);
        }
    }

    /// Replaces them all (a relist).
    pub fn relist(&self, objs: &[Value]) {
        *self.write() = objs.iter().filter_map(Slice::from_json).collect();
    }

    /// See [`resolve`].
    pub fn endpoints(&self, svc: &ServiceRef) -> Result<Vec<SocketAddr>, String> {
        let slices = self.slices.read().unwrap_or_else(|e| e.into_inner());
        resolve(slices.values(), svc)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn slice(name: &str, ports: Value, endpoints: Value) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": "fsm",
                            "labels": {SERVICE_NAME_LABEL: "fsm-egress-gateway"}},
               "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
    }

    fn svc(port: Option<PortRef>) -> ServiceRef {
        ServiceRef {
            name: "fsm-egress-gateway".into(),
            namespace: "fsm".into(),
            port,
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ready_endpoints_of_every_slice_on_the_chosen_port() {
        let s = Services::default();
        let one_port = json!([{"name": "egress-nat-port", "port": 1080, "protocol": "TCP"}]);
        s.relist(&[
            slice(
                "gw-a",
                one_port.clone(),
                json!([{"addresses": ["10.1.0.2"], "conditions": {"ready": true}},
                       {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "terminating": true}},
                       {"addresses": ["10.1.0.1"]}]),
            ),
            slice(
                "gw-b",
                one_port,
                json!([{"addresses": ["10.1.0.9"]}]),
            ),
        ]);
        let want = addrs(&["10.1.0.1:1080", "10.1.0.2:1080", "10.1.0.9:1080"]);
        assert_eq!(s.endpoints(&svc(None)), Ok(want.clone()));
        let by_name = svc(Some(PortRef::Name("egress-nat-port".into())));
        assert_eq!(s.endpoints(&by_name), Ok(want.clone()));
        assert_eq!(s.endpoints(&svc(Some(PortRef::Number(1080)))), Ok(want));
        assert_eq!(
            s.endpoints(&svc(Some(PortRef::Name("admin".into())))),
            Err("Service fsm/fsm-egress-gateway has no TCP port \"admin\"".into())
        );
        // A slice of another Service, or with no Service label, is not this one's.
        let mut other = slice(
            "x",
            json!([{"port": 1}]),
            json!([{"addresses": ["10.9.0.1"]}]),
        );
        other["metadata"]["labels"][SERVICE_NAME_LABEL] = json!("other");
        s.apply(&other);
        let mut unlabelled = other.clone();
        unlabelled["metadata"]["name"] = json!("y");
        unlabelled["metadata"]["labels"] = json!({});
        s.apply(&unlabelled);
        assert_eq!(s.endpoints(&svc(None)).unwrap().len(), 3);

        // The endpoints change: the next lookup sees the change; a slice goes away.
        s.apply(&slice(
            "gw-a",
            json!([{"name": "egress-nat-port", "port": 1080}]),
            json!([{"addresses": ["10.1.0.7"]}]),
        ));
        s.delete(&slice("gw-b", json!([]), json!([])));
        assert_eq!(s.endpoints(&svc(None)), Ok(addrs(&["10.1.0.7:1080"])));

        // No ready endpoint left: an error, never an empty list.
        s.apply(&slice(
            "gw-a",
            json!([{"name": "egress-nat-port", "port": 1080}]),
            json!([{"addresses": ["10.1.0.7"], "conditions": {"ready": false}}]),
        ));
        assert_eq!(
            s.endpoints(&svc(None)),
            Err("Service fsm/fsm-egress-gateway has no ready endpoints".into())
        );
        s.relist(&[]);
        assert!(s.endpoints(&svc(None)).unwrap_err().starts_with(
            "Service fsm/fsm-egress-gateway has no ready endpoints (no EndpointSlice"
        ));
    }

    #[test]
    fn two_ports_need_a_name_and_only_tcp_counts() {
        let s = Services::default();
        s.apply(&slice(
            "gw",
            json!([{"name": "socks", "port": 1080}, {"name": "h2", "port": 8080},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]),
            json!([{"addresses": ["fd00::5"]}]),
        ));
        assert_eq!(
            s.endpoints(&svc(None)),
            Err("Service fsm/fsm-egress-gateway has 2 TCP ports; name one in service.port".into())
        );
        // The slice said IPv4; an IPv6 slice is read the same way.
        let mut v6 = slice(
            "gw",
            json!([{"name": "h2", "port": 8080}]),
            json!([{"addresses": ["fd00::5"]}]),
        );
        v6["addressType"] = json!("IPv6");
        s.apply(&v6);
        assert_eq!(
            s.endpoints(&svc(Some(PortRef::Name("h2".into())))),
            Ok(addrs(&["[fd00::5]:8080"]))
        );
        assert!(s
            .endpoints(&svc(Some(PortRef::Number(53))))
            .unwrap_err()
            .contains("no TCP port 53"));
    }
}
