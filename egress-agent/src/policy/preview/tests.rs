//! Previews: exactly the flows whose route changes are listed, with the deciding rule; and the
//! per-policy audit mode as the compiler and the proxy's host verdict see it.

use super::*;
use crate::policy::{compile, parse::parse, HostVerdict};

fn compiled(rules: &str) -> Compiled {
    let base = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: false}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Workload\nmetadata: {name: db}\n";
    compile(&parse(&format!("{base}{rules}"), "t.yaml").unwrap()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const ALLOW_A: &str = "---\nkind: Egress\nmetadata: {name: a}\nspec: {sources: [{name: web}], ipAddresses: [127.1.0.1/32]}\n";
const ALLOW_B: &str = "---\nkind: Egress\nmetadata: {name: b}\nspec: {sources: [{name: web}], ipAddresses: [127.1.0.2/32]}\n";
const HOSTS: &str = "---\nkind: Egress\nmetadata: {name: h}\nspec: {sources: [{name: web}], hosts: [ok.example], ipAddresses: [127.1.0.3/32], ports: [{number: 443, protocol: https}]}\n";
const DENY_DB: &str = "---\nkind: Egress\nmetadata: {name: d}\nspec: {sources: [{name: db}], action: deny, ipAddresses: [127.1.0.4/32]}\n";

fn history() -> Vec<FlowRecord> {
    let tcp = proto::TCP;
    vec![
        record("default/web", ip("127.1.0.1"), 80, tcp, None),
        record("default/web", ip("127.1.0.2"), 80, tcp, None),
        record("default/web", ip("127.1.0.3"), 443, tcp, Some("ok.example")),
        record(
            "default/web",
            ip("127.1.0.3"),
            443,
            tcp,
            Some("bad.example"),
        ),
        record("default/db", ip("127.1.0.4"), 5432, tcp, None),
        record("default/db", ip("127.1.0.5"), 5432, tcp, None),
        record("default/gone", ip("127.1.0.1"), 80, tcp, None),
    ]
}

#[test]
fn only_the_flows_whose_route_changes() {
    let current = compiled(&format!("{ALLOW_A}{ALLOW_B}{HOSTS}"));
    // Removes allow b, adds a deny for db, adds an allow that routes 127.1.0.5 via the proxy.
    let via = "---\nkind: Egress\nmetadata: {name: p}\nspec: {sources: [{name: db}], ipAddresses: [127.1.0.5/32], via: proxy}\n";
    let candidate = compiled(&format!("{ALLOW_A}{HOSTS}{DENY_DB}{via}"));
    let changes = preview(&current, &candidate, &history(), None);
    let got: Vec<(&str, &str, &str, &str, &str)> = changes
        .iter()
        .map(|c| {
            (
                c.workload.as_str(),
                c.destination.as_str(),
                c.before.route.name(),
                c.after.route.name(),
                c.after.rule.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("default/web", "127.1.0.2:80", "allowed", "refused", ""),
            (
                "default/db",
                "127.1.0.4:5432",
                "refused",
                "refused",
                "default/d"
            ),
            (
                "default/db",
                "127.1.0.5:5432",
                "refused",
                "proxied",
                "default/p"
            ),
        ]
        .into_iter()
        .filter(|(_, _, b, a, _)| b != a)
        .collect::<Vec<_>>()
    );
    assert_eq!(Preview::new(7, changes).new_denies, 1);
    // The same policy changes nothing; a workload filter keeps to that workload.
    assert!(preview(&current, &current, &history(), None).is_empty());
    let only_db = preview(&current, &candidate, &history(), Some("default/db"));
    assert_eq!(only_db.len(), 1);
}

#[test]
fn a_deny_that_adds_a_refusal_names_its_rule() {
    let open = "---\nkind: Egress\nmetadata: {name: all}\nspec: {sources: [{name: db}], ipAddresses: [127.0.0.0/8]}\n";
    let current = compiled(open);
    let candidate = compiled(&format!("{open}{DENY_DB}"));
    let changes = preview(&current, &candidate, &history(), None);
    assert_eq!(changes.len(), 1);
    let c = &changes[0];
    assert_eq!(c.destination, "127.1.0.4:5432");
    assert_eq!((c.before.verdict, c.after.verdict), ("allow", "deny-rule"));
    assert_eq!(c.after.rule, "default/d");
    assert!(c.is_new_deny());
}

#[test]
fn hosts_are_judged_with_what_the_proxy_saw() {
    let current = compiled(HOSTS);
    let deny_ok = "---\nkind: Egress\nmetadata: {name: x}\nspec: {sources: [{name: web}], action: deny, hosts: [ok.example], ports: [{number: 443, protocol: https}]}\n";
    let candidate = compiled(&format!("{HOSTS}{deny_ok}"));
    let changes = preview(&current, &candidate, &history(), None);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].host.as_deref(), Some("ok.example"));
    assert_eq!(
        (changes[0].before.route, changes[0].after.route),
        (Route::Proxied, Route::Refused)
    );
    assert_eq!(changes[0].after.verdict, "deny-host");
}

#[test]
fn audited_policies_report_and_leave_the_others_enforcing() {
    let open = "---\nkind: Egress\nmetadata: {name: all}\nspec: {sources: [{name: web}, {name: db}], ipAddresses: [127.0.0.0/8]}\n";
    let audited = "---\nkind: Egress\nmetadata: {name: aud}\nspec: {sources: [{name: web}], action: deny, ipAddresses: [127.1.0.1/32], mode: audit}\n";
    let c = compiled(&format!("{open}{audited}{DENY_DB}"));
    let (web, db) = (2, 1); // ids in (namespace, name) order
    let d = c.decide(web, ip("127.1.0.1"), 80, proto::TCP);
    assert_eq!((d.outcome, d.rule_id), (Outcome::AuditRule, 2));
    assert_eq!(
        c.decide(web, ip("127.1.0.2"), 80, proto::TCP).outcome,
        Outcome::Allow
    );
    assert_eq!(
        c.decide(db, ip("127.1.0.4"), 80, proto::TCP).outcome,
        Outcome::DenyRule
    );
    // Audited where nothing enforced matches: enableEgress (false here) still refuses.
    let lone = compiled(audited);
    assert_eq!(
        lone.decide(web, ip("127.1.0.1"), 80, proto::TCP).outcome,
        Outcome::DenyDefault
    );
    // An audited allow lets nothing more through.
    let aud_allow = "---\nkind: Egress\nmetadata: {name: aa}\nspec: {sources: [{name: web}], ipAddresses: [127.1.0.9/32], mode: audit}\n";
    assert_eq!(
        compiled(aud_allow)
            .decide(web, ip("127.1.0.9"), 80, proto::TCP)
            .outcome,
        Outcome::DenyDefault
    );
    // Hosts: an audited host deny over an enforced host allow is an audit, not a refusal.
    let host_deny = "---\nkind: Egress\nmetadata: {name: hd}\nspec: {sources: [{name: web}], action: deny, hosts: [ok.example], ports: [{number: 443, protocol: https}], mode: audit}\n";
    let h = compiled(&format!("{HOSTS}{host_deny}"));
    let v = |host| h.decide_host(web, ip("127.1.0.3"), 443, Some(host));
    assert_eq!(v("ok.example"), HostVerdict::Audit(2));
    assert_eq!(v("bad.example"), HostVerdict::Deny(0));
}
