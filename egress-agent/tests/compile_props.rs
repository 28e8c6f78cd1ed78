//! Property test of the policy compiler: for random valid policies and random destinations,
//! what the kernel decides from the compiled map entries (a longest-prefix lookup over the
//! `(workload, prefix)` entries, then `egress_common::decide` on the value found) equals a
//! naive rule-by-rule reading of the same policy, written here from the documented semantics
//! (README "How it works" → Decision, `egress_common::decide`):
//!
//! - an IPv4-mapped IPv6 destination is judged as IPv4 (and an IPv4-mapped prefix of 96 bits
//!   or more is an IPv4 prefix);
//! - a destination in a `meshCIDRs` prefix is untouched (`Mesh`);
//! - among the rules of the workload that match the address (no `ipAddresses`: every
//!   address), the port and the protocol (no `ports`: every port and protocol; `udp` ports:
//!   UDP; `tcp`/`http`/`https`: TCP), deny wins, then proxy (`via: proxy|gateway`, or hosts),
//!   then allow; among rules of the same strength the later one is reported. Only TCP is ever
//!   proxied: a proxy rule matches nothing else;
//! - an unmatched destination passes when `enableEgress` is true and is refused otherwise;
//! - `auditMode` turns a refusal by rule or by default into an audited one.
//!
//! Runs 256 cases (`PROPTEST_CASES` overrides) from a fixed seed (`PROPTEST_RNG_SEED`
//! overrides), so a failure reproduces; proptest shrinks it to a minimal policy and prints
//! the policy's YAML.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_agent::policy::{self, compile, CompileError, Compiled, Entry, ObjectRef};
use egress_common::{decide, decide::Query, proto, Decision, Outcome, PolicyValue};
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, RngSeed, TestRunner},
};

// ---- The generated policy ----------------------------------------------------------------

/// Base addresses the prefixes and the destinations are drawn around, so that prefixes nest
/// and overlap and destinations fall on both sides of their boundaries.
const V4_POOL: [[u8; 4]; 5] = [
    [10, 1, 2, 3],
    [10, 1, 130, 7],
    [10, 200, 0, 1],
    [192, 168, 1, 1],
    [203, 0, 113, 9],
];
const V6_POOL: [&str; 5] = [
    "2001:db8::1",
    "2001:db8:0:1::5",
    "2001:db8:8000::9",
    "fd00::1",
    "::ffff:10.1.2.3", // IPv4-mapped
];
/// Ports rules start and end on, and the ports around them that destinations use.
const RULE_PORTS: [u16; 9] = [1, 22, 53, 80, 443, 8000, 8080, 15001, 65535];
const DEST_PORTS: [u16; 24] = [
    0, 1, 2, 21, 22, 23, 52, 53, 54, 79, 80, 81, 442, 443, 444, 7999, 8000, 8001, 8079, 8080, 8081,
    15001, 65534, 65535,
];

/// A prefix: a base address masked to `len` bits.
#[derive(Clone, Copy, Debug)]
struct Net {
    v6: bool,
    base: usize,
    len: u8,
}

impl Net {
    /// The network in the family it is judged in: an IPv4-mapped IPv6 prefix of 96 bits or
    /// more is the IPv4 prefix of `len - 96` bits.
    fn judged(&self) -> (IpAddr, u8) {
        if self.v6 {
            let a = u128::from(v6_base(self.base)) & mask128(self.len);
            let a = Ipv6Addr::from(a);
            match a.to_ipv4_mapped() {
                Some(v4) if self.len >= 96 => (IpAddr::V4(v4), self.len - 96),
                _ => (IpAddr::V6(a), self.len),
            }
        } else {
            let a = u32::from(Ipv4Addr::from(V4_POOL[self.base])) & mask32(self.len);
            (IpAddr::V4(Ipv4Addr::from(a)), self.len)
        }
    }

    /// As written in the policy: the masked address (in its written family) and the length.
    fn yaml(&self) -> String {
        if self.v6 {
            let a = u128::from(v6_base(self.base)) & mask128(self.len);
            format!("\"{}/{}\"", Ipv6Addr::from(a), self.len)
        } else {
            let a = u32::from(Ipv4Addr::from(V4_POOL[self.base])) & mask32(self.len);
            format!("\"{}/{}\"", Ipv4Addr::from(a), self.len)
        }
    }

    /// Whether the (normalized) destination `ip` is inside this prefix.
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.judged(), ip) {
            ((IpAddr::V4(n), len), IpAddr::V4(a)) => {
                (u32::from(n) ^ u32::from(a)) & mask32(len) == 0
            }
            ((IpAddr::V6(n), len), IpAddr::V6(a)) => {
                (u128::from(n) ^ u128::from(a)) & mask128(len) == 0
            }
            _ => false,
        }
    }
}

fn v6_base(i: usize) -> Ipv6Addr {
    V6_POOL[i].parse().unwrap()
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - len as u32).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - len as u32).unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    first: u16,
    last: Option<u16>,
    udp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Direct,
    /// `via: proxy`
    Proxy,
    /// `hosts: [...]` (implies the proxy)
    Hosts,
    /// `gateway: gw` (implies `via: gateway`)
    Gateway,
}

#[derive(Clone, Debug)]
enum Source {
    Name(usize),
    /// `podSelector: {matchLabels: {tier: a|b}}`
    Tier(bool),
}

#[derive(Clone, Debug)]
struct Rule {
    sources: Vec<Source>,
    nets: Vec<Net>,
    ports: Vec<Ports>,
    deny: bool,
    via: Via,
}

#[derive(Clone, Debug)]
struct Policy {
    /// One workload per entry, `w<i>`, labelled `tier: a` (true) or `tier: b`.
    tiers: Vec<bool>,
    enable_egress: bool,
    audit: bool,
    mesh: Vec<Net>,
    rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug)]
struct Dest {
    workload: usize,
    ip: IpAddr,
    port: u16,
    proto: u8,
}

fn net() -> impl Strategy<Value = Net> {
    (any::<bool>(), 0..V4_POOL.len(), 0u8..=128).prop_map(|(v6, base, len)| Net {
        v6,
        base,
        len: if v6 { len } else { len % 33 },
    })
}

fn rule_port() -> impl Strategy<Value = u16> {
    prop_oneof![3 => prop::sample::select(&RULE_PORTS[..]), 1 => 1u16..=65535]
}

fn ports() -> impl Strategy<Value = Ports> {
    (rule_port(), prop::option::of(rule_port()), any::<bool>()).prop_map(|(a, b, udp)| Ports {
        first: b.map_or(a, |b| a.min(b)),
        last: b.map(|b| a.max(b)),
        udp,
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    let source = prop_oneof![
        3 => (0usize..4).prop_map(Source::Name),
        1 => any::<bool>().prop_map(Source::Tier),
    ];
    let via = prop_oneof![
        4 => Just(Via::Direct),
        2 => Just(Via::Proxy),
        1 => Just(Via::Hosts),
        1 => Just(Via::Gateway),
    ];
    (
        prop::collection::vec(source, 1..=2),
        prop::collection::vec(net(), 0..=3),
        prop::collection::vec(ports(), 0..=3),
        any::<bool>(),
        via,
    )
        .prop_map(|(sources, nets, mut ports, deny, mut via)| {
            // What validation refuses: a deny sent somewhere, a proxied or host rule on UDP.
            if deny && matches!(via, Via::Proxy | Via::Gateway) {
                via = Via::Direct;
            }
            if via != Via::Direct {
                for p in &mut ports {
                    p.udp = false;
                }
            }
            Rule {
                sources,
                nets,
                ports,
                deny,
                via,
            }
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec(any::<bool>(), 1..=4),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::collection::vec(net(), 0..=2),
        prop::collection::vec(rule(), 0..=6),
    )
        .prop_map(|(tiers, enable_egress, audit, mesh, mut rules)| {
            for r in &mut rules {
                for s in &mut r.sources {
                    if let Source::Name(i) = s {
                        *i %= tiers.len();
                    }
                }
            }
            Policy {
                tiers,
                enable_egress,
                audit,
                mesh,
                rules,
            }
        })
}

fn dest() -> impl Strategy<Value = Dest> {
    let port = prop_oneof![3 => prop::sample::select(&DEST_PORTS[..]), 1 => any::<u16>()];
    let proto = prop::sample::select(&[proto::TCP, proto::UDP, proto::ICMP][..]);
    (
        0usize..4,
        (any::<bool>(), 0..V4_POOL.len(), 0u32..=128, any::<u128>()),
        prop::bool::weighted(0.2),
        port,
        proto,
    )
        .prop_map(|(workload, (v6, base, depth, bits), mapped, port, proto)| {
            // The base address with the bits below `depth` scrambled: near it, on either
            // side of the prefixes drawn around it.
            let ip = if v6 {
                let noise = bits.checked_shr(depth).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6_base(base)) ^ noise))
            } else {
                let noise = (bits as u32).checked_shr(depth % 33).unwrap_or(0);
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::from(V4_POOL[base])) ^ noise);
                if mapped {
                    IpAddr::V6(a.to_ipv6_mapped())
                } else {
                    IpAddr::V4(a)
                }
            };
            Dest {
                workload,
                ip,
                port,
                proto,
            }
        })
}

impl Policy {
    fn yaml(&self) -> String {
        let list = |v: Vec<String>| v.join(", ");
        let mut y = format!(
            "kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{traffic: {{enableEgress: {}, meshCIDRs: [{}]}}, auditMode: {}}}\n",
            self.enable_egress,
            list(self.mesh.iter().map(Net::yaml).collect()),
            self.audit,
        );
        for (i, a) in self.tiers.iter().enumerate() {
            let tier = if *a { "a" } else { "b" };
            y += &format!(
                "---\nkind: Workload\nmetadata: {{name: w{i}, labels: {{tier: {tier}}}}}\n"
            );
        }
        y += "---\nkind: EgressGateway\nmetadata: {name: gw}\nspec: {endpoints: [{address: \"127.0.8.1:1080\", mode: socks5}]}\n";
        for (i, r) in self.rules.iter().enumerate() {
            let sources = list(
                r.sources
                    .iter()
                    .map(|s| match s {
                        Source::Name(w) => format!("{{name: w{w}}}"),
                        Source::Tier(a) => format!(
                            "{{podSelector: {{matchLabels: {{tier: {}}}}}}}",
                            if *a { "a" } else { "b" }
                        ),
                    })
                    .collect(),
            );
            let mut spec = format!("sources: [{sources}]");
            if !r.nets.is_empty() {
                spec += &format!(
                    ", ipAddresses: [{}]",
                    list(r.nets.iter().map(Net::yaml).collect())
                );
            }
            if !r.ports.is_empty() {
                let ports = r.ports.iter().map(|p| {
                    let mut s = format!("{{number: {}", p.first);
                    if let Some(l) = p.last {
                        s += &format!(", endPort: {l}");
                    }
                    s += if p.udp {
                        ", protocol: udp}"
                    } else {
                        ", protocol: tcp}"
                    };
                    s
                });
                spec += &format!(", ports: [{}]", list(ports.collect()));
            }
            if r.deny {
                spec += ", action: deny";
            }
            spec += match r.via {
                Via::Direct => ", via: direct",
                Via::Proxy => ", via: proxy",
                Via::Hosts => ", hosts: [example.com]",
                Via::Gateway => ", gateway: gw",
            };
            y += &format!("---\nkind: Egress\nmetadata: {{name: r{i}}}\nspec: {{{spec}}}\n");
        }
        y
    }
}

// ---- (b) the naive reading ---------------------------------------------------------------

/// `::ffff:a.b.c.d` → `a.b.c.d`.
fn judged_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The outcome and the index of the deciding rule in `p.rules`.
fn naive(p: &Policy, d: &Dest) -> (Outcome, Option<usize>) {
    let ip = judged_ip(d.ip);
    if p.mesh.iter().any(|m| m.contains(ip)) {
        return (Outcome::Mesh, None);
    }
    // (strength, rule index): deny 3, proxy 2, allow 1; the later rule among equals.
    let mut best: Option<(u8, usize)> = None;
    for (i, r) in p.rules.iter().enumerate() {
        let applies = r.sources.iter().any(|s| match s {
            Source::Name(w) => *w == d.workload,
            Source::Tier(a) => p.tiers[d.workload] == *a,
        });
        let addr = r.nets.is_empty() || r.nets.iter().any(|n| n.contains(ip));
        let port = r.ports.is_empty()
            || r.ports.iter().any(|pr| {
                let proto = if pr.udp { proto::UDP } else { proto::TCP };
                d.proto == proto && (pr.first..=pr.last.unwrap_or(pr.first)).contains(&d.port)
            });
        let strength = match (r.deny, r.via) {
            (true, Via::Direct) => 3,
            (_, Via::Proxy | Via::Hosts | Via::Gateway) => 2,
            (false, Via::Direct) => 1,
        };
        let proxiable = strength != 2 || d.proto == proto::TCP;
        if applies && addr && port && proxiable && best.is_none_or(|(s, _)| strength >= s) {
            best = Some((strength, i));
        }
    }
    let outcome = match best {
        Some((3, _)) if p.audit => Outcome::AuditRule,
        Some((3, _)) => Outcome::DenyRule,
        Some((2, _)) => Outcome::Proxy,
        Some(_) => Outcome::Allow,
        None if p.enable_egress => Outcome::Pass,
        None if p.audit => Outcome::AuditDefault,
        None => Outcome::DenyDefault,
    };
    (outcome, best.map(|(_, i)| i))
}

// ---- (a) the kernel's reading of the compiled entries --------------------------------------

/// The LPM trie's lookup: among the entries of the workload whose prefix contains `addr`,
/// the longest. Written independently of `Compiled::lookup` (a plain scan, no ordering
/// assumed).
fn lpm<'a, const N: usize>(
    entries: &'a [Entry<N>],
    workload: u32,
    addr: &[u8; N],
) -> Option<&'a PolicyValue> {
    let bits = |b: &[u8; N]| b.iter().fold(0u128, |acc, x| (acc << 8) | *x as u128);
    let (a, width) = (bits(addr), (N * 8) as u32);
    entries
        .iter()
        .filter(|e| e.workload == workload)
        .filter(|e| {
            let m = u128::MAX
                .checked_shl(width - e.cidr_len as u32)
                .unwrap_or(0)
                & (u128::MAX >> (128 - width));
            (bits(&e.addr) ^ a) & m == 0
        })
        .max_by_key(|e| e.cidr_len)
        .map(|e| &e.value)
}

fn kernel(c: &Compiled, workload: u32, d: &Dest) -> Decision {
    let ip = judged_ip(d.ip);
    // The mesh trie: any prefix of the destination's family that contains it.
    let in_mesh = c.mesh.iter().any(|m| match (m.addr, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) ^ u32::from(a)) & mask32(m.len) == 0,
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n) ^ u128::from(a)) & mask128(m.len) == 0,
        _ => false,
    });
    let value = match ip {
        IpAddr::V4(a) => lpm(&c.v4, workload, &a.octets()),
        IpAddr::V6(a) => lpm(&c.v6, workload, &a.octets()),
    };
    let q = Query {
        proto: d.proto,
        port: d.port,
        in_mesh,
        to_proxy: false,
    };
    decide(&c.config, &q, value)
}

/// The compiled entries are what an LPM trie can hold: one per key, host bits zero.
fn check_entries<const N: usize>(entries: &[Entry<N>]) -> Result<(), TestCaseError> {
    let mut keys = std::collections::BTreeSet::new();
    for e in entries {
        prop_assert!(
            keys.insert((e.workload, e.cidr_len, e.addr)),
            "duplicate key {e:?}"
        );
        prop_assert!(e.cidr_len as usize <= N * 8);
        prop_assert_eq!(
            policy::mask(&e.addr, e.cidr_len),
            e.addr,
            "host bits set in {:?}",
            e
        );
    }
    Ok(())
}

// ---- The property ----------------------------------------------------------------------

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 256;
    }
    if matches!(c.rng_seed, RngSeed::Random) {
        c.rng_seed = RngSeed::Fixed(0x5eed_e9e5_5c0d_e001);
    }
    // The seed reproduces a failure; no regression files in the tree.
    c.failure_persistence = None;
    c
}

fn check(p: &Policy, dests: &[Dest], too_many: &mut usize) -> Result<(), TestCaseError> {
    let text = p.yaml();
    let cfg = policy::parse(&text, "prop.yaml")
        .map_err(|e| TestCaseError::fail(format!("generated policy refused: {e}\n{text}")))?;
    let c = match compile(&cfg) {
        Ok(c) => c,
        // More port ranges for one prefix than an entry holds: refused, as documented.
        Err(CompileError::TooManyRules { .. }) => {
            *too_many += 1;
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
    };
    check_entries(&c.v4)?;
    check_entries(&c.v6)?;
    for d in dests {
        let Some(d) = (d.workload < p.tiers.len()).then_some(d) else {
            continue;
        };
        let name = format!("w{}", d.workload);
        let wid = c
            .workload_id(&ObjectRef {
                namespace: "default".into(),
                name,
            })
            .expect("every workload has an id");
        let got = kernel(&c, wid, d);
        let (want, rule) = naive(p, d);
        let got_rule = c.rule(got.rule_id).map(|r| r.egress.name.clone());
        let want_rule = rule.map(|i| format!("r{i}"));
        prop_assert_eq!(
            (got.outcome, &got_rule),
            (want, &want_rule),
            "destination {:?}\npolicy:\n{}",
            d,
            text
        );
        // The agent's own userspace lookup (`policy check`) agrees with the kernel's.
        if !d.ip.is_loopback() && !judged_ip(d.ip).is_loopback() && !d.ip.is_unspecified() {
            prop_assert_eq!(c.decide(wid, d.ip, d.port, d.proto), got, "{:?}", d);
        }
    }
    Ok(())
}

#[test]
fn compiled_entries_decide_as_the_rules_say() {
    let cfg = config();
    let cases = cfg.cases;
    let mut runner = TestRunner::new(cfg);
    let too_many = std::cell::Cell::new(0usize);
    let strategy = (policy(), prop::collection::vec(dest(), 1..=48));
    let result = runner.run(&strategy, |(p, dests)| {
        let mut n = too_many.get();
        let r = check(&p, &dests, &mut n);
        too_many.set(n);
        r
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Most generated policies must compile, or the property says little.
    let skipped = too_many.get();
    eprintln!("{cases} cases, {skipped} refused as too many port ranges");
    assert!(
        skipped * 4 < cases as usize,
        "{skipped} of {cases} policies refused"
    );
}
