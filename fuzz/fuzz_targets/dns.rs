//! libFuzzer target for the DNS message parser (egress-common/src/wire/dns.rs), which reads
//! workloads' queries and resolvers' answers in the agent's DNS proxy.
#![no_main]

use egress_common::wire::dns::{parse_answer, parse_query, read_name, MAX_CHAIN};
use libfuzzer_sys::fuzz_target;

fn check_name(n: &str) {
    assert!(n.len() <= 253 * 4, "name of {} bytes", n.len());
    assert!(
        n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.\\".contains(&b)),
        "unexpected byte in name {n:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = parse_query(data) {
        check_name(&q.name);
    }
    if let Ok(a) = parse_answer(data) {
        check_name(&a.question.name);
        assert!(!a.chain.is_empty() && a.chain.len() <= MAX_CHAIN + 1);
        assert_eq!(a.chain[0], a.question.name);
        a.chain.iter().for_each(|n| check_name(n));
        assert!(a.addrs.len() <= data.len() / 11, "more addresses than records fit");
        assert!(a.addrs.iter().all(|x| x.ttl <= i32::MAX as u32));
    }
    for at in [12usize, data.len() / 2] {
        if let Ok((n, end)) = read_name(data, at) {
            check_name(&n);
            assert!(end <= data.len() && end > at);
        }
    }
});
