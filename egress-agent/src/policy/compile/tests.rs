//! How policies compile: precedence per prefix, port and protocol; hosts; gateways; ids.

use super::*;
use egress_common::Outcome;

use crate::policy::HostVerdict;

use crate::policy::parse::parse;

fn compiled(text: &str) -> Compiled {
    compile(&parse(text, "t.yaml").unwrap()).unwrap()
}

const BASE: &str = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: false, meshCIDRs: [10.0.0.0/8]}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Workload\nmetadata: {name: db}\n";

fn with(rules: &str) -> Compiled {
    compiled(&format!("{BASE}{rules}"))
}

#[test]
fn gateway_choice_per_rule_then_global() {
    let gw = "---\nkind: EgressGateway\nmetadata: {name: g1}\nspec: {endpoints: [{address: 127.0.8.1:1080, mode: socks5}]}\n---\nkind: Egress\nmetadata: {name: one}\nspec: {sources: [{name: web}], ipAddresses: [127.41.0.0/16], gateway: g1}\n---\nkind: Egress\nmetadata: {name: two}\nspec: {sources: [{name: web}], ipAddresses: [127.42.0.0/16], via: proxy}\n";
    let c = with(gw);
    let w = c
        .workload_id(&ObjectRef {
            namespace: "default".into(),
            name: "web".into(),
        })
        .unwrap();
    let d = c.decide(w, ip("127.41.0.1"), 80, proto::TCP);
    assert_eq!(d.outcome, Outcome::Proxy);
    assert_eq!(c.gateway_for(1).map(|g| g.id.name.as_str()), Some("g1"));
    assert!(
        c.gateway_for(2).is_none(),
        "via: proxy without a global gateway is direct"
    );
    assert!(c.gateway_for(0).is_none());
    let global = gw.to_string()
        + "---\nkind: EgressGateway\nmetadata: {name: all}\nspec: {global: [{address: 127.0.8.2:1080, mode: socks5}]}\n";
    let c = with(&global);
    assert_eq!(c.gateway_for(1).map(|g| g.id.name.as_str()), Some("g1"));
    assert_eq!(c.gateway_for(2).map(|g| g.id.name.as_str()), Some("all"));
    assert_eq!(c.gateway_for(0).map(|g| g.id.name.as_str()), Some("all"));
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn cidr_boundaries() {
    let c = with("---\nkind: Egress\nmetadata: {name: a}\nspec: {sources: [{name: web}], ipAddresses: [127.1.2.0/24], ports: [{number: 80}]}\n");
    let web = c
        .workload_id(&ObjectRef {
            namespace: "default".into(),
            name: "web".into(),
        })
        .unwrap();
    for (addr, want) in [
        ("127.1.1.255", Outcome::DenyDefault),
        ("127.1.2.0", Outcome::Allow),
        ("127.1.2.255", Outcome::Allow),
        ("127.1.3.0", Outcome::DenyDefault),
        ("::ffff:127.1.2.7", Outcome::Allow),
    ] {
        assert_eq!(
            c.decide(web, ip(addr), 80, proto::TCP).outcome,
            want,
            "{addr}"
        );
    }
    assert_eq!(
        c.decide(web, ip("127.1.2.1"), 81, proto::TCP).outcome,
        Outcome::DenyDefault
    );
    assert_eq!(
        c.decide(web, ip("127.1.2.1"), 80, proto::UDP).outcome,
        Outcome::DenyDefault
    );
    // The other workload has no rules.
    let db = c
        .workload_id(&ObjectRef {
            namespace: "default".into(),
            name: "db".into(),
        })
        .unwrap();
    assert_ne!(db, web);
    assert_eq!(
        c.decide(db, ip("127.1.2.1"), 80, proto::TCP).outcome,
        Outcome::DenyDefault
    );
    // Mesh destinations are untouched.
    assert_eq!(
        c.decide(web, ip("10.9.9.9"), 80, proto::TCP).outcome,
        Outcome::Mesh
    );
}

#[test]
fn broad_deny_beats_narrow_allow() {
    let c = with("---\nkind: Egress\nmetadata: {name: allow-one}\nspec: {sources: [{name: web}], ipAddresses: [127.1.2.3/32]}\n---\nkind: Egress\nmetadata: {name: deny-all}\nspec: {sources: [{name: web}], ipAddresses: [127.0.0.0/8], action: deny}\n");
    let d = c.decide(2, ip("127.1.2.3"), 80, proto::TCP);
    assert_eq!(d.outcome, Outcome::DenyRule);
    assert_eq!(c.rule(d.rule_id).unwrap().egress.name, "deny-all");
    let e = c.v4.iter().find(|e| e.cidr_len == 32).unwrap();
    // The /32 carries the /8's deny: one segment per protocol class, all denied.
    assert_eq!(e.value.counts, [1, 1, 1]);
    assert_eq!(e.key_len(), 64);
}

#[test]
fn segments_resolve_precedence_per_port_and_protocol() {
    let r = |lo, hi, p, a, id| port_rule(lo, hi, p, a, id);
    let v = segments(
        &[
            r(0, 65535, proto::ANY, action::ALLOW, 1),
            r(443, 443, proto::TCP, action::PROXY, 2),
            r(8000, 8100, proto::TCP, action::DENY, 3),
            r(53, 53, proto::UDP, action::ALLOW, 4),
            r(443, 443, proto::UDP, action::PROXY, 5), // never for UDP
        ],
        |_| false,
    )
    .unwrap();
    let segs: Vec<(u16, u16, u8, u32)> = v.segs[..v.counts.iter().map(|c| *c as usize).sum()]
        .iter()
        .map(|s| (s.lo, s.hi, s.action, s.rule_id))
        .collect();
    let (a, p, d) = (action::ALLOW, action::PROXY, action::DENY);
    assert_eq!(v.counts, [5, 3, 1]);
    assert_eq!(
        segs,
        [
            (0, 442, a, 1),
            (443, 443, p, 2),
            (444, 7999, a, 1),
            (8000, 8100, d, 3),
            (8101, 65535, a, 1),
            (0, 52, a, 1),
            (53, 53, a, 4),
            (54, 65535, a, 1),
            (0, 65535, a, 1),
        ]
    );
    // Adjacent ranges of the same rule merge; nothing at all is an empty value.
    let v = segments(
        &[r(80, 80, proto::TCP, a, 7), r(81, 90, proto::TCP, a, 7)],
        |_| false,
    )
    .unwrap();
    assert_eq!((v.counts, v.segs[0].lo, v.segs[0].hi), ([1, 0, 0], 80, 90));
    assert_eq!(segments(&[], |_| false).unwrap().counts, [0, 0, 0]);
}

#[test]
fn hosts_route_tcp_to_the_proxy_everywhere() {
    let c = with("---\nkind: Egress\nmetadata: {name: h}\nspec: {sources: [{name: web}], hosts: [example.com], ports: [{number: 80, protocol: http}]}\n");
    assert_eq!(
        c.decide(2, ip("127.9.9.9"), 80, proto::TCP).outcome,
        Outcome::Proxy
    );
    assert_eq!(
        c.decide(2, ip("2001:db8::1"), 80, proto::TCP).outcome,
        Outcome::Proxy
    );
    assert_eq!(
        c.decide(2, ip("127.9.9.9"), 443, proto::TCP).outcome,
        Outcome::DenyDefault
    );
    assert_eq!(c.rules[0].hosts[0].0, "example.com");
}

#[test]
fn host_verdicts() {
    let c = with(concat!(
        "---\nkind: Egress\nmetadata: {name: gh}\nspec: {sources: [{name: web}], hosts: [github.com, '*.githubusercontent.com'], ports: [{number: 443, protocol: https}]}\n",
        "---\nkind: Egress\nmetadata: {name: no-gist}\nspec: {sources: [{name: web}], hosts: ['**.gist.github.com'], ports: [{number: 443}], action: deny}\n",
        "---\nkind: Egress\nmetadata: {name: by-ip}\nspec: {sources: [{name: web}], ipAddresses: [127.7.0.1/32], ports: [{number: 443}], via: proxy}\n",
    ));
    let (web, ip, other) = (2, ip("127.9.9.9"), ip("127.7.0.1"));
    assert!(c.needs_host(web, ip, 443));
    assert!(!c.needs_host(web, ip, 80));
    assert!(!c.needs_host(1, ip, 443), "db has no host rules");
    assert_eq!(
        c.decide_host(web, ip, 443, Some("GitHub.com")),
        HostVerdict::Allow(1)
    );
    assert_eq!(
        c.decide_host(web, ip, 443, Some("raw.githubusercontent.com")),
        HostVerdict::Allow(1)
    );
    assert_eq!(
        c.decide_host(web, ip, 443, Some("a.b.githubusercontent.com")),
        HostVerdict::Deny(0)
    );
    assert_eq!(
        c.decide_host(web, ip, 443, Some("x.y.gist.github.com")),
        HostVerdict::Deny(2)
    );
    assert_eq!(
        c.decide_host(web, ip, 443, Some("evil.com")),
        HostVerdict::Deny(0)
    );
    // No host where host rules apply: refused, naming the first host rule.
    assert_eq!(c.decide_host(web, ip, 443, None), HostVerdict::Deny(1));
    // An address-level allow lets any host through to that address, but host denies win.
    assert_eq!(
        c.decide_host(web, other, 443, Some("evil.com")),
        HostVerdict::Allow(3)
    );
    assert_eq!(
        c.decide_host(web, other, 443, Some("a.gist.github.com")),
        HostVerdict::Deny(2)
    );
    // Fail closed: an address allow does not let out a connection that names no host.
    assert_eq!(c.decide_host(web, other, 443, None), HostVerdict::Deny(1));
}

#[test]
fn no_host_passes_by_address_only_when_a_rule_says_so() {
    let c = with(concat!(
        "---\nkind: Egress\nmetadata: {name: gh}\nspec: {sources: [{name: web}], hosts: [github.com], ports: [{number: 443}]}\n",
        "---\nkind: Egress\nmetadata: {name: raw}\nspec: {sources: [{name: web}], ipAddresses: [127.7.0.0/24], ports: [{number: 443}], via: proxy, allowWithoutHost: true}\n",
    ));
    let web = 2;
    assert_eq!(
        c.decide_host(web, ip("127.7.0.1"), 443, None),
        HostVerdict::Allow(2)
    );
    assert_eq!(
        c.decide_host(web, ip("127.8.0.1"), 443, None),
        HostVerdict::Deny(1)
    );
    let bad = parse(
        "kind: Egress\nmetadata: {name: x}\nspec: {sources: [{name: web}], hosts: [a.example], allowWithoutHost: true}\n",
        "t.yaml",
    );
    let e = bad.unwrap_err().to_string();
    assert!(e.contains("spec.allowWithoutHost"), "{e}");
}

#[test]
fn selectors_and_ids() {
    let c = compiled("kind: Workload\nmetadata: {name: b, labels: {app: x}}\n---\nkind: Workload\nmetadata: {name: a}\n---\nkind: Egress\nmetadata: {name: e}\nspec: {sources: [{podSelector: {matchLabels: {app: x}}}], ipAddresses: ['::1/128'], action: deny}\n");
    assert_eq!(c.workloads[0].0.name, "a");
    assert_eq!(
        c.workloads[1],
        (
            ObjectRef {
                namespace: "default".into(),
                name: "b".into()
            },
            2
        )
    );
    assert_eq!(c.v6.len(), 1);
    assert_eq!(c.v6[0].workload, 2);
    assert_eq!(
        c.decide(2, ip("::1"), 1, proto::UDP).outcome,
        Outcome::DenyRule
    );
    assert_eq!(c.decide(1, ip("::1"), 1, proto::UDP).outcome, Outcome::Pass);
}

#[test]
fn workload_ids_stay_with_their_workloads() {
    let c1 = compiled(
        "kind: Workload\nmetadata: {name: web}\n---\nkind: Workload\nmetadata: {name: zed}\n",
    );
    let web = ObjectRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    let zed = ObjectRef {
        namespace: "default".into(),
        name: "zed".into(),
    };
    assert_eq!(
        (c1.workload_id(&web), c1.workload_id(&zed)),
        (Some(1), Some(2))
    );
    // Adding "abc" (sorting first) and removing "web" moves no id; the freed id is reused.
    let cfg = parse(
        "kind: Workload\nmetadata: {name: abc}\n---\nkind: Workload\nmetadata: {name: zed}\n",
        "t",
    )
    .unwrap();
    let c2 = compile_stable(&cfg, &c1.ids()).unwrap();
    assert_eq!(c2.workload_id(&zed), Some(2));
    assert_eq!(c2.workload(1).unwrap().name, "abc");
}

#[test]
fn too_many_rules_is_an_error_naming_the_workload() {
    // 17 separate ports: 17 ranges (adjacent ones would merge).
    let ports: Vec<String> = (1..=17).map(|p| format!("{{number: {}}}", p * 2)).collect();
    let text = format!("{BASE}---\nkind: Egress\nmetadata: {{name: many}}\nspec: {{sources: [{{name: web}}], ports: [{}]}}\n", ports.join(", "));
    let e = compile(&parse(&text, "t.yaml").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "workload default/web: the rules for 0.0.0.0/0 (from default/many) split its ports into 17 ranges"
        ),
        "{e}"
    );
}
