//! Scalar values with their own syntax and checks: ports, IP prefixes, host patterns,
//! durations. They parse from strings (or numbers) wherever a document holds them.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer};

/// A duration written as `500ms`, `5s`, `10m` or `1h` (Kubernetes style), at least 1ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub std::time::Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("invalid duration {s:?} (like 500ms, 5s, 10m, 1h)"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            _ => None,
        }
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("invalid duration {s:?} (like 500ms, 5s, 10m, 1h)"))?;
        Ok(Seconds(std::time::Duration::from_millis(ms)))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A TCP/UDP port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=65535).contains(&n) {
            Ok(Port(n as u16))
        } else {
            Err(serde::de::Error::custom(format_args!(
                "port {n} is out of range 1-65535"
            )))
        }
    }
}

/// An IP prefix. IPv4-mapped IPv6 prefixes are stored as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub const ALL_V4: Cidr = Cidr {
        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    pub const ALL_V6: Cidr = Cidr {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalize(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                mask(&n.octets(), self.len) == mask(&a.octets(), self.len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                mask(&n.octets(), self.len) == mask(&a.octets(), self.len)
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The first `len` bits of `bytes`, the rest zeroed.
pub fn mask<const N: usize>(bytes: &[u8; N], len: u8) -> [u8; N] {
    let mut out = *bytes;
    for (i, b) in out.iter_mut().enumerate() {
        let bit = (i * 8) as u32;
        let len = len as u32;
        *b &= if len >= bit + 8 {
            0xff
        } else if len <= bit {
            0
        } else {
            !(0xffu8 >> (len - bit))
        };
    }
    out
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 0-{max}"))?,
        };
        let (addr, len) = match ip {
            IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (normalize(ip), len - 96)
            }
            _ => (ip, len),
        };
        let canonical = match addr {
            IpAddr::V4(a) => IpAddr::from(mask(&a.octets(), len)),
            IpAddr::V6(a) => IpAddr::from(mask(&a.octets(), len)),
        };
        if canonical != addr {
            return Err(format!(
                "invalid CIDR {s:?}: host bits are set (the network is {canonical}/{len})"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A host rule: `example.com`, `*.example.com` (exactly one more label) or `**.example.com`
/// (one or more). Stored lower-case without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPattern(pub String);

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let base = lower
            .strip_prefix("**.")
            .or_else(|| lower.strip_prefix("*."))
            .unwrap_or(&lower);
        let bad = |why: &str| Err(format!("invalid host {s:?}: {why}"));
        if base.is_empty() {
            return bad("empty name");
        }
        if lower.len() > 253 {
            return bad("longer than 253 characters");
        }
        for label in base.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("each label must be 1-63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("only letters, digits, '-' and '_' are allowed, and '*.' or '**.' only as the first label");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label cannot start or end with '-'");
            }
        }
        Ok(HostPattern(lower))
    }
}

impl HostPattern {
    /// Whether `host` matches: exact, `*.` exactly one more label, `**.` one or more;
    /// case-insensitive, a trailing dot ignored.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let p = self.0.as_str();
        let suffix_match = |base: &str| -> Option<usize> {
            // The labels of `host` before ".base", if host ends with it.
            let hl = host.len();
            let bl = base.len();
            (hl > bl + 1
                && host[hl - bl..].eq_ignore_ascii_case(base)
                && host.as_bytes()[hl - bl - 1] == b'.')
                .then(|| host[..hl - bl - 1].split('.').count())
        };
        if let Some(base) = p.strip_prefix("**.") {
            suffix_match(base).is_some_and(|labels| labels >= 1 && !host.starts_with('.'))
        } else if let Some(base) = p.strip_prefix("*.") {
            suffix_match(base) == Some(1)
        } else {
            host.eq_ignore_ascii_case(p)
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<Seconds>().unwrap().0.as_millis(), 250);
        assert_eq!("2m".parse::<Seconds>().unwrap().0.as_secs(), 120);
        for bad in ["", "5", "0s", "1d", "-1s", "s"] {
            assert!(bad.parse::<Seconds>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::".parse().unwrap()));
        let c: Cidr = "127.1.2.3".parse().unwrap();
        assert_eq!(c.len, 32);
        assert!(c.contains("::ffff:127.1.2.3".parse().unwrap()));
        assert!("1.2.3.4/x".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn host_matching() {
        let p = |s: &str| s.parse::<HostPattern>().unwrap();
        assert!(p("github.com").matches("GitHub.com."));
        assert!(!p("github.com").matches("api.github.com"));
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(!p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("aexample.com"));
        assert!(p("**.example.com").matches("a.b.example.com"));
        assert!(p("**.example.com").matches("A.example.COM"));
        assert!(!p("**.example.com").matches("example.com"));
        assert!(!p("**.example.com").matches("badexample.com"));
        assert!(!p("*.example.com").matches(".example.com"));
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            "GitHub.COM.".parse::<HostPattern>().unwrap().0,
            "github.com"
        );
        assert!("**.example.com".parse::<HostPattern>().is_ok());
        assert!("a.*.example.com".parse::<HostPattern>().is_err());
        assert!("*".parse::<HostPattern>().is_err());
        assert!("-a.com".parse::<HostPattern>().is_err());
    }
}
