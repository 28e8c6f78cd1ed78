use egress_common::{fqdn::decide_named, proto, Outcome};

use super::*;
use crate::policy::{compile, parse, HostBinding, ObjectRef};

const POLICY: &str = r#"
kind: MeshConfig
metadata: {name: m}
spec:
  traffic: {enableEgress: false}
  dns: {enabled: true, minTtl: 2s, grace: 1s}
---
kind: Workload
metadata: {name: web}
---
kind: Workload
metadata: {name: other}
---
kind: Egress
metadata: {name: db}
spec:
  sources: [{name: web}]
  hosts: [db.test.example, "*.cdn.example"]
  ports: [{number: 5432}, {number: 5353, protocol: udp}]
---
kind: Egress
metadata: {name: api}
spec:
  sources: [{name: web}]
  hosts: [api.test.example]
  ports: [{number: 443, protocol: https}]
"#;

fn setup() -> (Compiled, u32, u32) {
    let c = compile(&parse(POLICY, "t.yaml").unwrap()).unwrap();
    let id = |n: &str| {
        c.workload_id(&ObjectRef {
            namespace: "default".into(),
            name: n.into(),
        })
        .unwrap()
    };
    let (web, other) = (id("web"), id("other"));
    (c, web, other)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn chain(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn name_rules_compile_to_no_address_entries() {
    let (c, web, _) = setup();
    assert_eq!(c.name_rules, vec![0]);
    assert_eq!(c.host_rules, vec![1], "the https rule stays with the proxy");
    assert_eq!(c.config.dns_port, 15053);
    assert_eq!(c.host_binding, HostBinding::Strict);
    let d = c.decide(web, ip("192.0.2.1"), 5432, proto::TCP);
    assert_eq!(
        d.outcome,
        Outcome::DenyDefault,
        "no address is allowed by name alone"
    );
}

#[test]
fn learned_addresses_allow_the_rules_ports_for_that_workload_only() {
    let (c, web, other) = setup();
    let mut cache = Cache::default();
    let chain = chain(&["db.test.example"]);
    assert!(wanted(&c, web, &chain));
    assert!(!wanted(&c, other, &chain));
    cache.learn(web, &chain, &[(ip("192.0.2.7"), 10_000)], 2, 0, 1000);
    let v = cache.value(&c, web, ip("192.0.2.7")).expect("an entry");
    let q = |p, port| egress_common::decide::Query {
        proto: p,
        port,
        in_mesh: false,
        to_proxy: false,
    };
    let d = decide_named(&c.config, &q(proto::TCP, 5432), None, Some(&v));
    assert_eq!((d.outcome, d.rule_id), (Outcome::Allow, 1));
    let u = decide_named(&c.config, &q(proto::UDP, 5353), None, Some(&v));
    assert_eq!(u.outcome, Outcome::Allow);
    let no = decide_named(&c.config, &q(proto::TCP, 22), None, Some(&v));
    assert_eq!(no.outcome, Outcome::DenyDefault);
    assert!(cache.value(&c, other, ip("192.0.2.7")).is_none());
    assert!(cache.value(&c, web, ip("192.0.2.8")).is_none());
}

#[test]
fn cname_targets_and_wildcards_count() {
    let (c, web, _) = setup();
    let mut cache = Cache::default();
    let ch = chain(&["www.elsewhere.example", "edge.cdn.example"]);
    assert!(wanted(&c, web, &ch), "the chain reaches *.cdn.example");
    cache.learn(web, &ch, &[(ip("198.51.100.1"), 10_000)], 60, 0, 1000);
    assert!(cache.value(&c, web, ip("198.51.100.1")).is_some());
    assert!(
        !wanted(&c, web, &chain(&["a.b.cdn.example"])),
        "* is one label"
    );
}

#[test]
fn expiry_after_ttl_and_grace() {
    let (c, web, _) = setup();
    let mut cache = Cache::default();
    let ch = chain(&["db.test.example"]);
    cache.learn(web, &ch, &[(ip("192.0.2.7"), 2_000)], 2, 0, 1000);
    assert!(cache.bound(web, "DB.test.example.", ip("192.0.2.7"), 2_500, 1_000));
    assert!(cache.expire(2_999, 1_000).is_empty());
    assert_eq!(cache.expire(3_000, 1_000), vec![(web, ip("192.0.2.7"))]);
    assert!(cache.is_empty());
    assert!(cache.value(&c, web, ip("192.0.2.7")).is_none());
    assert!(!cache.bound(web, "db.test.example", ip("192.0.2.7"), 3_000, 1_000));
}

#[test]
fn per_name_bound_keeps_the_latest() {
    let (_, web, _) = setup();
    let mut cache = Cache::default();
    let ch = chain(&["db.test.example"]);
    let addrs: Vec<(IpAddr, u64)> = (0..1200u32)
        .map(|i| {
            (
                IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
                1_000 + i as u64,
            )
        })
        .collect();
    cache.learn(web, &ch, &addrs, 60, 0, 1000);
    assert_eq!(cache.addresses().count(), 1000);
    assert!(!cache.bound(web, "db.test.example", addrs[0].0, 0, 0));
    assert!(cache.bound(web, "db.test.example", addrs[1199].0, 0, 0));
}

#[test]
fn binding_is_per_workload_and_name() {
    let (_, web, other) = setup();
    let mut cache = Cache::default();
    cache.learn(
        web,
        &chain(&["api.test.example"]),
        &[(ip("127.0.0.2"), 5_000)],
        5,
        0,
        1000,
    );
    assert!(cache.bound(web, "api.test.example", ip("127.0.0.2"), 0, 0));
    assert!(cache.bound(web, "api.test.example", ip("::ffff:127.0.0.2"), 0, 0));
    assert!(!cache.bound(web, "api.test.example", ip("127.0.0.3"), 0, 0));
    assert!(!cache.bound(web, "good.test.example", ip("127.0.0.2"), 0, 0));
    assert!(!cache.bound(other, "api.test.example", ip("127.0.0.2"), 0, 0));
}

#[test]
fn restore_drops_the_expired() {
    let (_, web, _) = setup();
    let mut cache = Cache::default();
    cache.learn(
        web,
        &chain(&["db.test.example"]),
        &[(ip("192.0.2.7"), 5_000)],
        5,
        0,
        9,
    );
    cache.learn(
        web,
        &chain(&["x.cdn.example"]),
        &[(ip("192.0.2.8"), 1_000)],
        1,
        0,
        9,
    );
    let saved: Vec<NameEntry> = cache.entries().cloned().collect();
    let mut back = Cache::default();
    back.restore(saved, 3_000, 0);
    assert_eq!(back.len(), 1);
    assert!(back.bound(web, "db.test.example", ip("192.0.2.7"), 3_000, 0));
}

const HEAD: &str = "kind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: e}\nspec:\n  sources: [{name: web}]\n  hosts: [db.example]\n  ports: [{number: 5353, protocol: udp}]\n---\n";

#[test]
fn udp_hosts_need_dns_and_strict_binding_needs_dns() {
    let off = format!("{HEAD}kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{}}\n");
    let e = parse(&off, "f.yaml").unwrap_err().to_string();
    assert!(
        e.contains("spec.ports[0].protocol") && e.contains("spec.dns.enabled"),
        "{e}"
    );
    let on = format!(
        "{HEAD}kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{dns: {{enabled: true}}}}\n"
    );
    let cfg = parse(&on, "f.yaml").unwrap();
    assert!(cfg.egresses[0].spec.is_name_rule());
    let strict = "kind: MeshConfig\nmetadata: {name: m}\nspec: {hostBinding: strict}\n";
    let e = parse(strict, "f.yaml").unwrap_err().to_string();
    assert!(e.contains("spec.hostBinding"), "{e}");
    let bad = "kind: MeshConfig\nmetadata: {name: m}\nspec: {dns: {enabled: true, minTtl: 0s}}\n";
    assert!(parse(bad, "f.yaml").is_err());
}

#[test]
fn dns_is_accepted_with_standalone_pods() {
    let text = "kind: MeshConfig\nmetadata: {name: m}\nspec:\n  dns: {enabled: true}\n  podNetwork: {ipv4: 10.200.0.0/24}\n---\nkind: Workload\nmetadata: {name: p}\nspec: {network: pod}\n";
    let cfg = parse(text, "f.yaml").unwrap();
    assert!(cfg.mesh.dns.enabled);
}

#[test]
fn dns_is_steered_only_to_the_port_the_proxy_serves() {
    use crate::dns::steered_port;
    assert_eq!(steered_port(15053, Some(&15053)), 15053);
    // Turned on, or moved, after the start: not steered (nobody serves that port).
    assert_eq!(steered_port(15053, None), 0);
    assert_eq!(steered_port(15054, Some(&15053)), 0);
    // Turned off.
    assert_eq!(steered_port(0, Some(&15053)), 0);
    assert_eq!(steered_port(0, None), 0);
}
