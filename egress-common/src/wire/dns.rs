//! DNS messages (RFC 1035) as the agent's DNS proxy sees them: the question of a query, and
//! the addresses an answer gives for the name asked, following the CNAME chain inside that
//! one answer.
//!
//! Bounded and total: any byte string gives `Ok` or an error, never a panic; name
//! compression pointers must point strictly backwards (so a walk always ends) and a name
//! follows at most [`MAX_POINTERS`] of them; at most [`MAX_RECORDS`] answer records and
//! [`MAX_CHAIN`] CNAME hops are looked at.

use alloc::{string::String, vec::Vec};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest DNS message (TCP length prefix is 16 bits).
pub const MAX_MESSAGE: usize = 65_535;
/// Compression pointers one name may follow.
pub const MAX_POINTERS: usize = 32;
/// Answer records read from one message.
pub const MAX_RECORDS: usize = 4096;
/// CNAME hops followed from the name asked.
pub const MAX_CHAIN: usize = 16;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("shorter than its header or a record says")]
    Truncated,
    #[error("larger than 65535 bytes")]
    TooLarge,
    #[error("a name is malformed (label, length or compression pointer)")]
    BadName,
    #[error("not exactly one question")]
    Questions,
    #[error("a query where an answer was expected, or the reverse")]
    Direction,
}

/// The question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lower case, without the trailing dot ("" for the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// An address the answer gives for the name asked (directly or through CNAMEs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub ip: IpAddr,
    /// The smallest TTL along the way (the address record's and every CNAME's before it).
    pub ttl: u32,
}

/// What an answer says about the name asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub question: Question,
    /// RCODE (0 NOERROR, 3 NXDOMAIN, ...).
    pub rcode: u8,
    /// The truncation bit (the client will retry over TCP).
    pub truncated: bool,
    /// The names from the one asked along the CNAME chain: `chain[0]` is the question's.
    pub chain: Vec<String>,
    /// The A and AAAA records of any name of the chain.
    pub addrs: Vec<Addr>,
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, DnsError> {
    match m.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(DnsError::Truncated),
    }
}

fn u32_at(m: &[u8], at: usize) -> Result<u32, DnsError> {
    match m.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(DnsError::Truncated),
    }
}

/// Reads the name at `at`; returns it (lower case, dotted, no trailing dot) and the offset
/// just past it where it starts (not where its pointers lead).
pub fn read_name(m: &[u8], at: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut pos = at;
    let mut end = None;
    let mut pointers = 0;
    // A pointer must go strictly before the position it was read at: every walk ends.
    let mut limit = at;
    loop {
        let len = *m.get(pos).ok_or(DnsError::Truncated)? as usize;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((name, end.unwrap_or(pos + 1)));
                }
                let label = m.get(pos + 1..pos + 1 + len).ok_or(DnsError::Truncated)?;
                if name.len() + len + 1 > 254 {
                    return Err(DnsError::BadName);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    // Names the policy can match are letters, digits, '-' and '_'; anything
                    // else is kept escaped so that it never matches a pattern by accident.
                    if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                        name.push(b.to_ascii_lowercase() as char);
                    } else {
                        name.push('\\');
                        name.push(char::from(b'0' + b / 100));
                        name.push(char::from(b'0' + (b / 10) % 10));
                        name.push(char::from(b'0' + b % 10));
                    }
                }
                pos += 1 + len;
            }
            0xc0 => {
                let target = (u16_at(m, pos)? & 0x3fff) as usize;
                pointers += 1;
                if pointers > MAX_POINTERS || target >= limit {
                    return Err(DnsError::BadName);
                }
                if end.is_none() {
                    end = Some(pos + 2);
                }
                limit = target;
                pos = target;
            }
            _ => return Err(DnsError::BadName),
        }
    }
}

/// The header fields the proxy needs: (id, flags, qdcount, ancount).
fn header(m: &[u8]) -> Result<(u16, u16, u16, u16), DnsError> {
    if m.len() > MAX_MESSAGE {
        return Err(DnsError::TooLarge);
    }
    if m.len() < HEADER {
        return Err(DnsError::Truncated);
    }
    Ok((u16_at(m, 0)?, u16_at(m, 2)?, u16_at(m, 4)?, u16_at(m, 6)?))
}

fn question(m: &[u8], id: u16) -> Result<(Question, usize), DnsError> {
    let (name, at) = read_name(m, HEADER)?;
    let q = Question {
        id,
        name,
        qtype: u16_at(m, at)?,
        qclass: u16_at(m, at + 2)?,
    };
    Ok((q, at + 4))
}

/// The question of a query (QR clear, one question).
pub fn parse_query(m: &[u8]) -> Result<Question, DnsError> {
    let (id, flags, qd, _) = header(m)?;
    if flags & 0x8000 != 0 {
        return Err(DnsError::Direction);
    }
    if qd != 1 {
        return Err(DnsError::Questions);
    }
    Ok(question(m, id)?.0)
}

/// An answer (QR set, one question): its chain of names and their addresses.
pub fn parse_answer(m: &[u8]) -> Result<Answer, DnsError> {
    let (id, flags, qd, an) = header(m)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Direction);
    }
    if qd != 1 {
        return Err(DnsError::Questions);
    }
    let (q, mut at) = question(m, id)?;
    // (owner, kind, data): kind 0 an address, 1 a CNAME target.
    let mut cnames: Vec<(String, String, u32)> = Vec::new();
    let mut addrs: Vec<(String, IpAddr, u32)> = Vec::new();
    for _ in 0..(an as usize).min(MAX_RECORDS) {
        let (owner, next) = read_name(m, at)?;
        let rtype = u16_at(m, next)?;
        let class = u16_at(m, next + 2)?;
        let ttl = u32_at(m, next + 4)?;
        let rdlen = u16_at(m, next + 8)? as usize;
        let rdata_at = next + 10;
        let rdata = m
            .get(rdata_at..rdata_at + rdlen)
            .ok_or(DnsError::Truncated)?;
        at = rdata_at + rdlen;
        // TTLs above 2^31 - 1 are read as 0 (RFC 2181 section 8).
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        if class != CLASS_IN {
            continue;
        }
        match (rtype, rdlen) {
            (TYPE_A, 4) => {
                let ip = Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]);
                addrs.push((owner, IpAddr::V4(ip), ttl));
            }
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                addrs.push((owner, IpAddr::V6(Ipv6Addr::from(b)), ttl));
            }
            (TYPE_CNAME, _) => {
                let (target, end) = read_name(m, rdata_at)?;
                if end > at {
                    return Err(DnsError::BadName);
                }
                cnames.push((owner, target, ttl));
            }
            _ => {}
        }
    }
    // Follow the chain from the name asked.
    let mut chain = alloc::vec![q.name.clone()];
    let mut ttls = alloc::vec![u32::MAX];
    while chain.len() <= MAX_CHAIN {
        let last = &chain[chain.len() - 1];
        let Some((_, target, ttl)) = cnames.iter().find(|(o, _, _)| o == last) else {
            break;
        };
        if chain.contains(target) {
            break; // a loop
        }
        let min = ttls[ttls.len() - 1].min(*ttl);
        chain.push(target.clone());
        ttls.push(min);
    }
    let addrs = addrs
        .into_iter()
        .filter_map(|(owner, ip, ttl)| {
            let i = chain.iter().position(|n| *n == owner)?;
            Some(Addr {
                ip,
                ttl: ttl.min(ttls[i]),
            })
        })
        .collect();
    Ok(Answer {
        question: q,
        rcode: (flags & 0x000f) as u8,
        truncated: flags & 0x0200 != 0,
        chain,
        addrs,
    })
}

#[cfg(test)]
mod tests;
