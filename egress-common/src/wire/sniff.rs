//! Finding the host a client asks for in the first bytes it sends: the SNI of a TLS
//! ClientHello (reassembled across TLS records up to [`MAX_CLIENT_HELLO`]) or the host of an
//! HTTP/1.x request ([`super::http`]). Both parsers work on a bounded buffer, never panic on
//! any input (fuzzed), and tell "need more bytes" apart from "this is not it". A ClientHello
//! split over several records is copied once into one buffer; nothing else allocates.

use alloc::{borrow::Cow, string::String, vec::Vec};

use super::http;

/// What the first bytes of a connection say about its host.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// More bytes are needed to decide.
    Incomplete,
    /// A TLS ClientHello; its SNI (None: the client sent none).
    Tls(Option<String>),
    /// An HTTP/1.x request; its host (None: it names none, HTTP/1.0 style).
    Http(Option<String>),
    /// An HTTP/1.x request the proxy refuses whatever the policy: its host cannot be told
    /// for sure (target and Host disagree, two Hosts) or its framing is ambiguous.
    BadHttp(&'static str),
    /// Neither TLS nor HTTP/1.x, malformed, or over the bounds.
    Opaque,
}

/// Bytes the proxy reads at most while looking for the host: a ClientHello of
/// [`MAX_CLIENT_HELLO`] in records of at least 4 KiB each, or an HTTP head.
pub const MAX_SNIFF: usize = MAX_CLIENT_HELLO + 4096;

/// Classifies `buf`, the bytes received so far.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::Incomplete,
        Some(0x16) => match client_hello_sni(buf) {
            Ok(sni) => Sniffed::Tls(sni),
            Err(Error::Incomplete) if buf.len() < MAX_SNIFF => Sniffed::Incomplete,
            Err(_) => Sniffed::Opaque,
        },
        Some(b) if b.is_ascii_uppercase() || *b == b'\r' || *b == b'\n' => {
            let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
            match http::request(buf, &mut headers) {
                Ok(r) => Sniffed::Http(r.host.map(String::from)),
                Err(http::Error::Incomplete) if looks_like_request_start(buf) => {
                    Sniffed::Incomplete
                }
                Err(http::Error::Host(why)) => Sniffed::BadHttp(why),
                Err(http::Error::Invalid(why)) if http1_request_line(buf) => Sniffed::BadHttp(why),
                Err(_) => Sniffed::Opaque,
            }
        }
        Some(_) => Sniffed::Opaque,
    }
}

/// Whether `buf` starts (after empty lines) with an HTTP/1.x request line.
fn http1_request_line(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let line = buf[start..].split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")
}

/// Whether `buf` (incomplete) can still become a request: empty lines, then a method token.
fn looks_like_request_start(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    let method_len = rest.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method_len == rest.len() || (method_len > 0 && (rest[method_len] == b' '))
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

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// Largest ClientHello we reassemble (post-quantum key shares make them grow past 16 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// Largest TLS record (plaintext 2^14 plus the allowed expansion).
const MAX_RECORD: usize = 16384 + 2048;

/// The SNI of the TLS ClientHello at the start of `buf`. The handshake message may span any
/// number of TLS records (and so TCP segments); it is reassembled up to [`MAX_CLIENT_HELLO`],
/// beyond which it is `Invalid`. Every strict prefix of a valid hello is `Incomplete`.
pub fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Error> {
    let body = client_hello(buf)?;
    Ok(parse_hello(&body)?.map(String::from))
}

/// The ClientHello body (after the 4-byte handshake header) at the start of `buf`, borrowed
/// when it fits in the first record, else reassembled from the following ones.
fn client_hello(buf: &[u8]) -> Result<Cow<'_, [u8]>, Error> {
    let mut r = Reader::new(buf);
    let mut joined: Vec<u8> = Vec::new();
    let mut first: &[u8] = &[];
    let mut records = 0usize;
    loop {
        let typ = r.u8()?;
        let _ver = r.u16()?;
        let len = r.u16()?;
        if typ != 0x16 || len == 0 || len > MAX_RECORD {
            return Err(Error::Invalid);
        }
        if records == 0 {
            // Refuse what cannot be a ClientHello before waiting for the whole record.
            let partial = &r.rest()[..len.min(r.rest().len())];
            if let Some(h) = partial.get(..4) {
                let hello_len = ((h[1] as usize) << 16) | ((h[2] as usize) << 8) | h[3] as usize;
                if h[0] != 1 || hello_len > MAX_CLIENT_HELLO {
                    return Err(Error::Invalid);
                }
            }
        }
        let frag = r.take(len)?;
        records += 1;
        if records == 1 {
            first = frag;
        } else {
            if records == 2 {
                joined.extend_from_slice(first);
            }
            joined.extend_from_slice(frag);
        }
        let hs: &[u8] = if records == 1 { first } else { &joined };
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(Error::Invalid); // not a ClientHello
            }
            let hello_len = ((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize;
            if hello_len > MAX_CLIENT_HELLO {
                return Err(Error::Invalid);
            }
            if hs.len() >= 4 + hello_len {
                return Ok(if records == 1 {
                    Cow::Borrowed(&first[4..4 + hello_len])
                } else {
                    joined.truncate(4 + hello_len);
                    joined.drain(..4);
                    Cow::Owned(joined)
                });
            }
        }
        if r.pos > MAX_SNIFF {
            return Err(Error::Invalid);
        }
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

    fn tls(name: &str) -> Sniffed {
        Sniffed::Tls(Some(name.into()))
    }

    fn http(name: &str) -> Sniffed {
        Sniffed::Http(Some(name.into()))
    }

    /// `hs` (a handshake message) cut into TLS records of at most `size` bytes.
    fn records(hs: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in hs.chunks(size) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn sni_of_a_whole_hello() {
        let h = hello(Some("api.example.com"));
        assert_eq!(sniff(&h), tls("api.example.com"));
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
    fn hello_reassembled_across_records() {
        let h = hello(Some("split.example.com"));
        let hs = &h[5..];
        for size in [1, 3, 20, 60] {
            let split = records(hs, size);
            // The SNI may lie in any record, even straddle two: it is found.
            assert_eq!(sniff(&split), tls("split.example.com"), "records of {size}");
            for n in 0..split.len() {
                assert_eq!(
                    sniff(&split[..n]),
                    Sniffed::Incomplete,
                    "{size}: prefix {n}"
                );
            }
        }
    }

    /// A ClientHello padded to `len` bytes of handshake body (a padding extension first,
    /// then the SNI last, as a hello with big post-quantum key shares looks).
    fn big_hello(len: usize, sni: &str) -> Vec<u8> {
        let small = hello(Some(sni));
        let body = &small[9..];
        let pad = len - body.len() - 4;
        // Rebuild: version..compression, then extensions = padding(21) + the original ones.
        let fixed = 2 + 32 + 1 + 4 + 2;
        let old_ext = &body[fixed + 2..];
        let mut ext = vec![0, 21];
        ext.extend_from_slice(&(pad as u16).to_be_bytes());
        ext.resize(ext.len() + pad, 0);
        ext.extend_from_slice(old_ext);
        let mut b = body[..fixed].to_vec();
        b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        b.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&b);
        hs
    }

    #[test]
    fn hellos_up_to_64_kib_are_judged_and_bigger_refused() {
        let hs = big_hello(40_000, "pq.example");
        assert_eq!(sniff(&records(&hs, 16384)), tls("pq.example"));
        let hs = big_hello(MAX_CLIENT_HELLO - 100, "pq.example");
        assert_eq!(sniff(&records(&hs, 16384)), tls("pq.example"));
        // A handshake header announcing more than the bound: refused at once.
        let mut hs = big_hello(MAX_CLIENT_HELLO - 100, "pq.example");
        hs[1..4].copy_from_slice(&((MAX_CLIENT_HELLO + 1) as u32).to_be_bytes()[1..]);
        assert_eq!(sniff(&records(&hs, 16384)[..100]), Sniffed::Opaque);
        // Tiny records fill the proxy's buffer before the hello is whole: refused.
        let hs = big_hello(40_000, "pq.example");
        let tiny = records(&hs, 4);
        assert_eq!(sniff(&tiny[..MAX_SNIFF]), Sniffed::Opaque);
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
            assert_eq!(sniff(hello), tls("golden.example"), "{client}");
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
        assert_eq!(sniff(req), http("Example.COM"));
        // Decided when the head is complete, not before.
        for n in 1..req.len() {
            assert_eq!(sniff(&req[..n]), Sniffed::Incomplete, "prefix {n}");
        }
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Http(None));
        assert_eq!(
            sniff(b"GET http://a.example:81/x HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            http("a.example")
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            http("[::1]")
        );
        // After leading empty lines, the request is judged like any other.
        assert_eq!(
            sniff(b"\r\n\r\nGET / HTTP/1.1\r\nHost: denied.example\r\n\r\n"),
            http("denied.example")
        );
        assert_eq!(sniff(b"\r\n"), Sniffed::Incomplete);
    }

    #[test]
    fn http_garbage_and_limits() {
        assert_eq!(sniff(b"GET / HTTP/2.0\r\n\r\n"), Sniffed::Opaque);
        // HTTP/2 prior knowledge (h2c): not HTTP/1.x, so no host: refused where one is needed.
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"GET /\r\n"), Sniffed::Opaque);
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\nno-colon\r\n\r\n"),
            Sniffed::BadHttp(_)
        ));
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Sniffed::BadHttp(_)
        ));
        assert_eq!(
            sniff(b"GET http://denied.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
            Sniffed::BadHttp("the request target and Host name different hosts")
        );
        assert_eq!(sniff(b"HELO mail.example\r\n"), Sniffed::Opaque);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(super::http::MAX_HEAD + 10, b'a');
        assert_eq!(
            sniff(&big),
            Sniffed::BadHttp("request head longer than 64 KiB")
        );
    }
}
