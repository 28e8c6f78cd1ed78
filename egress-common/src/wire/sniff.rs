//! Finding the host a client asks for in the first bytes it sends: the SNI of a TLS
//! ClientHello or the `Host` of an HTTP/1.x request. Both parsers work on a bounded buffer,
//! never allocate while parsing, never panic on any input (fuzzed), and tell "need more bytes"
//! apart from "this is not it".

/// What the first bytes of a connection say about its host.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed<'a> {
    /// More bytes are needed to decide.
    Incomplete,
    /// A TLS ClientHello; its SNI (None: the client sent none).
    Tls(Option<&'a str>),
    /// An HTTP/1.x request; its Host (None: no Host header, HTTP/1.0 style).
    Http(Option<&'a str>),
    /// Neither TLS nor HTTP/1.x, or malformed.
    Opaque,
}

/// Classifies `buf`, the bytes received so far.
pub fn sniff(buf: &[u8]) -> Sniffed<'_> {
    match buf.first() {
        None => Sniffed::Incomplete,
        Some(0x16) => match client_hello_sni(buf) {
            Ok(sni) => Sniffed::Tls(sni),
            Err(Error::Incomplete) => Sniffed::Incomplete,
            Err(Error::Invalid) => Sniffed::Opaque,
        },
        Some(b) if b.is_ascii_uppercase() => match http_host(buf) {
            Ok(host) => Sniffed::Http(host),
            Err(Error::Incomplete) => Sniffed::Incomplete,
            Err(Error::Invalid) => Sniffed::Opaque,
        },
        Some(_) => Sniffed::Opaque,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    Incomplete,
    Invalid,
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Invalid)?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn u24(&mut self) -> Result<usize, Error> {
        let b = self.take(3)?;
        Ok(((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// Largest ClientHello we reassemble (it must also fit the caller's buffer).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// The SNI of the TLS ClientHello at the start of `buf`. The handshake message may span
/// several TLS records; they are reassembled into a fixed stack buffer.
pub fn client_hello_sni(buf: &[u8]) -> Result<Option<&str>, Error> {
    // Fast path: the whole ClientHello in the first record (what every client does).
    let mut r = Reader::new(buf);
    let (typ, _ver, len) = (r.u8()?, r.u16()?, r.u16()?);
    if typ != 0x16 || len == 0 || len > 16384 + 2048 {
        return Err(Error::Invalid);
    }
    let first = r.take(len).or_else(|e| match e {
        // Not all of the first record yet: parse what is there if the hello fits in it.
        Error::Incomplete => Ok(r.rest()),
        e => Err(e),
    })?;
    let mut h = Reader::new(first);
    if h.u8()? != 1 {
        return Err(Error::Invalid); // not a ClientHello
    }
    let hello_len = h.u24()?;
    if hello_len > MAX_CLIENT_HELLO {
        return Err(Error::Invalid);
    }
    if hello_len <= first.len().saturating_sub(4) {
        return parse_hello(&first[4..4 + hello_len]);
    }
    if first.len() < len {
        return Err(Error::Incomplete);
    }
    // The hello continues in further handshake records: only names inside the first record
    // can be borrowed; look for the SNI there, which is where every client puts it early on.
    match parse_hello(&first[4..]) {
        Ok(sni) => Ok(sni),
        Err(Error::Incomplete) => {
            // Check that what follows is well-formed handshake records before giving up.
            let mut need = hello_len - (first.len() - 4);
            while need > 0 {
                let (typ, _v, l) = (r.u8()?, r.u16()?, r.u16()?);
                if typ != 0x16 || l == 0 {
                    return Err(Error::Invalid);
                }
                let got = r.take(l.min(need))?;
                need -= got.len();
                if l > got.len() {
                    break;
                }
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn parse_hello(body: &[u8]) -> Result<Option<&str>, Error> {
    let mut h = Reader::new(body);
    h.take(2 + 32)?; // client_version, random
    let sid = h.u8()? as usize;
    h.take(sid)?;
    let suites = h.u16()?;
    h.take(suites)?;
    let comp = h.u8()? as usize;
    h.take(comp)?;
    if h.rest().is_empty() {
        return Ok(None); // no extensions at all
    }
    let ext_len = h.u16()?;
    let mut e = Reader::new(h.take(ext_len)?);
    while !e.rest().is_empty() {
        let (typ, len) = (e.u16()?, e.u16()?);
        let data = e.take(len)?;
        if typ != 0 {
            continue;
        }
        // server_name: list length, then (type, length, name) entries; type 0 = host_name.
        let mut s = Reader::new(data);
        let list = s.u16()?;
        let mut l = Reader::new(s.take(list).map_err(|_| Error::Invalid)?);
        while !l.rest().is_empty() {
            let (kind, n) = (
                l.u8().map_err(|_| Error::Invalid)?,
                l.u16().map_err(|_| Error::Invalid)?,
            );
            let name = l.take(n).map_err(|_| Error::Invalid)?;
            if kind == 0 {
                return valid_host(name).map(Some);
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// Longest request head (request line + headers) we read before giving up.
pub const MAX_HTTP_HEAD: usize = 16 * 1024;

/// The Host of the HTTP/1.x request at the start of `buf` (port stripped), or of its
/// absolute-form target.
pub fn http_host(buf: &[u8]) -> Result<Option<&str>, Error> {
    let line_end = match find(buf, b"\r\n") {
        Some(i) => i,
        None if buf.len() >= MAX_HTTP_HEAD => return Err(Error::Invalid),
        None => {
            return if looks_like_request_start(buf) {
                Err(Error::Incomplete)
            } else {
                Err(Error::Invalid)
            }
        }
    };
    let line = &buf[..line_end];
    let mut parts = line.split(|b| *b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(Error::Invalid);
    };
    if parts.next().is_some()
        || method.is_empty()
        || !method.iter().all(|b| b.is_ascii_uppercase())
        || !(version == b"HTTP/1.1" || version == b"HTTP/1.0")
    {
        return Err(Error::Invalid);
    }
    let mut rest = &buf[line_end + 2..];
    let mut consumed = line_end + 2;
    loop {
        let Some(end) = find(rest, b"\r\n") else {
            return if consumed + rest.len() >= MAX_HTTP_HEAD {
                Err(Error::Invalid)
            } else {
                Err(Error::Incomplete)
            };
        };
        let header = &rest[..end];
        if header.is_empty() {
            break; // end of the head: no Host header
        }
        if let Some(i) = header.iter().position(|b| *b == b':') {
            if header[..i].eq_ignore_ascii_case(b"host") {
                let v = trim(&header[i + 1..]);
                return valid_host(strip_port(v)).map(Some);
            }
        } else {
            return Err(Error::Invalid);
        }
        consumed += end + 2;
        rest = &rest[end + 2..];
    }
    // Absolute-form target: http://host[:port]/path
    if let Some(t) = target.strip_prefix(b"http://") {
        let authority = t.split(|b| *b == b'/').next().unwrap_or(t);
        return valid_host(strip_port(authority)).map(Some);
    }
    Ok(None)
}

fn looks_like_request_start(buf: &[u8]) -> bool {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method_len == buf.len() || (method_len > 0 && buf[method_len] == b' ')
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &v[start..end]
}

fn strip_port(v: &[u8]) -> &[u8] {
    if v.first() == Some(&b'[') {
        // [v6]:port
        return match v.iter().position(|b| *b == b']') {
            Some(i) => &v[..=i],
            None => v,
        };
    }
    match v.iter().rposition(|b| *b == b':') {
        Some(i) if v[i + 1..].iter().all(u8::is_ascii_digit) => &v[..i],
        _ => v,
    }
}

/// Accepts a host name (or IP literal) of printable, non-space ASCII, at most 253 bytes.
fn valid_host(name: &[u8]) -> Result<&str, Error> {
    if name.is_empty() || name.len() > 255 || !name.iter().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid);
    }
    core::str::from_utf8(name).map_err(|_| Error::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{vec, vec::Vec};

    /// A minimal but real-shaped ClientHello with the given SNI.
    pub(crate) fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut sn = Vec::new();
            sn.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
            sn.push(0);
            sn.extend_from_slice(&(n.len() as u16).to_be_bytes());
            sn.extend_from_slice(n);
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(sn.len() as u16).to_be_bytes());
            ext.extend_from_slice(&sn);
        }
        // supported_versions, so the hello is not SNI-only.
        ext.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_of_a_whole_hello() {
        let h = hello(Some("api.example.com"));
        assert_eq!(sniff(&h), Sniffed::Tls(Some("api.example.com")));
        assert_eq!(sniff(&hello(None)), Sniffed::Tls(None));
    }

    #[test]
    fn every_prefix_of_a_hello_is_incomplete() {
        let h = hello(Some("api.example.com"));
        for n in 1..h.len() {
            assert_eq!(sniff(&h[..n]), Sniffed::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn hello_split_over_two_records() {
        let h = hello(Some("split.example.com"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        // The SNI lies in the second record: reported as no SNI (never guessed).
        assert_eq!(sniff(&two), Sniffed::Tls(None));
        assert_eq!(sniff(&two[..30]), Sniffed::Incomplete);
    }

    #[test]
    fn garbage_is_opaque_not_a_panic() {
        assert_eq!(sniff(b"\x16\x03\x01\x00\x00"), Sniffed::Opaque);
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Sniffed::Opaque
        );
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"\x00\x01\x02"), Sniffed::Opaque);
        let mut h = hello(Some("x.example"));
        let n = h.len();
        h[n - 12] = 0xff; // corrupt the server_name list length
        assert!(matches!(sniff(&h), Sniffed::Opaque | Sniffed::Tls(_)));
    }

    /// ClientHellos captured from real clients dialling https://golden.example/.
    const GOLDEN: [(&str, &[u8]); 3] = [
        (
            "curl 7.88",
            include_bytes!("../../../egress-agent/tests/fixtures/clienthello-curl.bin"),
        ),
        (
            "openssl 3.0 s_client",
            include_bytes!("../../../egress-agent/tests/fixtures/clienthello-openssl.bin"),
        ),
        (
            "python 3.11 ssl",
            include_bytes!("../../../egress-agent/tests/fixtures/clienthello-python.bin"),
        ),
    ];

    #[test]
    fn golden_client_hellos_from_real_clients() {
        for (client, hello) in GOLDEN {
            assert_eq!(
                sniff(hello),
                Sniffed::Tls(Some("golden.example")),
                "{client}"
            );
            for n in 0..hello.len() {
                assert_eq!(
                    sniff(&hello[..n]),
                    Sniffed::Incomplete,
                    "{client}: prefix {n}"
                );
            }
        }
    }

    /// A deterministic stand-in for the fuzz targets in the normal test run: mutated real
    /// inputs and random bytes never panic and never read out of bounds.
    #[test]
    fn mutations_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let http = b"GET /x HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n".to_vec();
        let mut inputs: Vec<Vec<u8>> = GOLDEN.iter().map(|(_, h)| h.to_vec()).collect();
        inputs.push(http);
        for input in &inputs {
            for _ in 0..3000 {
                let mut m = input.clone();
                for _ in 0..1 + rand() % 4 {
                    let i = (rand() as usize) % m.len();
                    m[i] = rand() as u8;
                }
                let cut = (rand() as usize) % (m.len() + 1);
                let _ = sniff(&m[..cut]);
                let _ = sniff(&m);
            }
        }
        for _ in 0..3000 {
            let len = (rand() % 600) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            let _ = sniff(&buf);
            if !buf.is_empty() {
                buf[0] = 0x16;
                let _ = sniff(&buf);
            }
        }
    }

    #[test]
    fn http_host_header() {
        let req = b"GET /repo.git/info/refs HTTP/1.1\r\nUser-Agent: git\r\nHOST: Example.COM:8080\r\n\r\n";
        assert_eq!(sniff(req), Sniffed::Http(Some("Example.COM")));
        // Decided as soon as the Host line is complete, not before.
        let host_end = find(req, b"8080\r\n").unwrap() + 6;
        for n in 1..req.len() {
            let want = if n < host_end {
                Sniffed::Incomplete
            } else {
                Sniffed::Http(Some("Example.COM"))
            };
            assert_eq!(sniff(&req[..n]), want, "prefix {n}");
        }
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Http(None));
        assert_eq!(
            sniff(b"GET http://a.example:81/x HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            Sniffed::Http(Some("a.example"))
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::Http(Some("[::1]"))
        );
    }

    #[test]
    fn http_garbage_and_limits() {
        assert_eq!(sniff(b"GET / HTTP/2.0\r\n\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"GET /\r\n"), Sniffed::Opaque);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nno-colon\r\n\r\n"),
            Sniffed::Opaque
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Sniffed::Opaque
        );
        assert_eq!(sniff(b"HELO mail.example\r\n"), Sniffed::Opaque);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HTTP_HEAD + 10, b'a');
        assert_eq!(sniff(&big), Sniffed::Opaque);
    }
}
