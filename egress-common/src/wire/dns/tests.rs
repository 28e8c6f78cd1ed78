use alloc::{vec, vec::Vec};

use super::*;

/// A name in wire form.
fn name(n: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in n.split('.').filter(|l| !l.is_empty()) {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

fn header(id: u16, flags: u16, qd: u16, an: u16) -> Vec<u8> {
    let mut h = Vec::new();
    for v in [id, flags, qd, an, 0, 0] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

fn query(id: u16, n: &str, qtype: u16) -> Vec<u8> {
    let mut m = header(id, 0x0100, 1, 0);
    m.extend(name(n));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// A record whose owner is a pointer to the question's name (offset 12).
fn record(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(rdata);
    r
}

fn answer(n: &str, records: &[Vec<u8>]) -> Vec<u8> {
    let mut m = query(7, n, TYPE_A);
    m[2] = 0x81;
    m[3] = 0x80;
    m[7] = records.len() as u8;
    for r in records {
        m.extend_from_slice(r);
    }
    m
}

const PTR_Q: [u8; 2] = [0xc0, 12];

#[test]
fn query_question() {
    let q = parse_query(&query(0x1234, "DB.Test.Example", TYPE_AAAA)).unwrap();
    assert_eq!(q.id, 0x1234);
    assert_eq!(q.name, "db.test.example");
    assert_eq!(q.qtype, TYPE_AAAA);
    assert_eq!(parse_answer(&query(1, "a.b", 1)), Err(DnsError::Direction));
}

#[test]
fn direct_addresses() {
    let m = answer(
        "db.test.example",
        &[
            record(&PTR_Q, TYPE_A, 30, &[10, 0, 0, 1]),
            record(&PTR_Q, TYPE_A, 5, &[10, 0, 0, 2]),
            record(&PTR_Q, TYPE_AAAA, 60, &[0xfd; 16]),
        ],
    );
    let a = parse_answer(&m).unwrap();
    assert_eq!(a.rcode, 0);
    assert_eq!(a.chain, vec!["db.test.example"]);
    let got: Vec<(IpAddr, u32)> = a.addrs.iter().map(|x| (x.ip, x.ttl)).collect();
    assert_eq!(
        got,
        vec![
            ("10.0.0.1".parse().unwrap(), 30),
            ("10.0.0.2".parse().unwrap(), 5),
            (IpAddr::V6(Ipv6Addr::from([0xfd; 16])), 60),
        ]
    );
}

#[test]
fn cname_chain_takes_the_smallest_ttl_and_ignores_strangers() {
    // www.example -> edge.cdn.net -> node.cdn.net (A); other.net A is not on the chain.
    let mut m = answer("www.example", &[]);
    let edge_at = m.len() + 12; // owner (2) + type/class/ttl/len (10): the CNAME's rdata
    m.extend(record(&PTR_Q, TYPE_CNAME, 100, &name("edge.cdn.net")));
    let node_at = m.len() + 12;
    m.extend(record(
        &[0xc0, edge_at as u8],
        TYPE_CNAME,
        20,
        &name("node.cdn.net"),
    ));
    m.extend(record(&[0xc0, node_at as u8], TYPE_A, 50, &[192, 0, 2, 9]));
    m.extend(record(&name("other.net"), TYPE_A, 50, &[192, 0, 2, 66]));
    m[7] = 4;
    let a = parse_answer(&m).unwrap();
    assert_eq!(a.chain, vec!["www.example", "edge.cdn.net", "node.cdn.net"]);
    assert_eq!(a.addrs.len(), 1);
    assert_eq!(a.addrs[0].ip, IpAddr::from([192, 0, 2, 9]));
    assert_eq!(a.addrs[0].ttl, 20);
}

#[test]
fn cname_loops_end() {
    let mut m = answer("a.x", &[]);
    let b_at = m.len() + 12;
    m.extend(record(&PTR_Q, TYPE_CNAME, 9, &name("b.x")));
    m.extend(record(&[0xc0, b_at as u8], TYPE_CNAME, 9, &PTR_Q));
    m[7] = 2;
    let a = parse_answer(&m).unwrap();
    assert_eq!(a.chain, vec!["a.x", "b.x"]);
    assert!(a.addrs.is_empty());
}

#[test]
fn pointers_must_go_backwards() {
    let mut m = query(1, "a.x", 1);
    // A name at the end pointing to itself, and one pointing forward.
    let at = m.len();
    m.extend_from_slice(&[0xc0, at as u8]);
    assert_eq!(read_name(&m, at), Err(DnsError::BadName));
    let mut m2 = header(1, 0, 1, 0);
    m2.extend_from_slice(&[0xc0, 20, 0, 0, 0, 0, 0, 0, 1, b'a', 0]);
    assert_eq!(parse_query(&m2), Err(DnsError::BadName));
}

#[test]
fn odd_bytes_are_escaped_and_long_names_refused() {
    let mut m = header(1, 0, 1, 0);
    m.extend_from_slice(&[3, b'a', b'.', b'B', 1, b'x', 0, 0, 1, 0, 1]);
    assert_eq!(parse_query(&m).unwrap().name, "a\\046b.x");
    let long: String = (0..60).map(|_| "abcd.").collect();
    assert_eq!(
        parse_query(&query(1, &long, 1)),
        Err(DnsError::BadName),
        "over 253 characters"
    );
    let mut bad = header(1, 0, 1, 0);
    bad.extend_from_slice(&[0x80, 0, 0, 1, 0, 1]);
    assert_eq!(parse_query(&bad), Err(DnsError::BadName));
}

#[test]
fn truncated_and_oversized() {
    let m = answer("db.x", &[record(&PTR_Q, TYPE_A, 30, &[10, 0, 0, 1])]);
    for n in 0..m.len() {
        assert!(parse_answer(&m[..n]).is_err(), "prefix of {n} bytes");
    }
    assert_eq!(parse_answer(&vec![0u8; 70_000]), Err(DnsError::TooLarge));
    // A wrong rdlength for an A record: ignored, not misread.
    let odd = answer("db.x", &[record(&PTR_Q, TYPE_A, 30, &[10, 0, 0])]);
    assert!(parse_answer(&odd).unwrap().addrs.is_empty());
}

#[test]
fn huge_ttls_read_as_zero() {
    let m = answer(
        "db.x",
        &[record(&PTR_Q, TYPE_A, 0x8000_0000, &[10, 0, 0, 1])],
    );
    assert_eq!(parse_answer(&m).unwrap().addrs[0].ttl, 0);
}

#[test]
fn garbage_never_panics() {
    // A cheap deterministic sweep (the fuzz target does the real work).
    let mut x: u32 = 0x1234_5678;
    for len in 0..600 {
        let mut m = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            m.push(x as u8);
        }
        if len > 5 {
            m[2] |= 0x80;
            m[4] = 0;
            m[5] = 1;
        }
        let _ = parse_answer(&m);
        let _ = parse_query(&m);
    }
}
