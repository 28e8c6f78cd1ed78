//! HTTP/1.x message heads as the proxy judges them, request by request: built on `httparse`
//! (no hand-written tokenizer), bounded, never a panic on any input (fuzzed). On top of the
//! tokens this module decides what the proxy needs and what an attacker could make two
//! parties read differently:
//! - the host: from an absolute-form (or authority-form) target when there is one, else from
//!   the `Host` header; a target and a `Host` that disagree, or two `Host` headers, are refused
//!   (RFC 9112 section 3.2.2: the origin follows the target);
//! - the body's framing (`Content-Length`, `chunked`), refusing the ambiguous combinations
//!   request smuggling relies on (both, several different lengths, a transfer coding other
//!   than a final `chunked`);
//! - leading empty lines before the request line (RFC 9112 section 2.2) are skipped, so a
//!   request after a CRLF is judged like any other.

pub use httparse::{Header, EMPTY_HEADER};

/// Longest message head (request or status line and headers) the proxy reads.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;
/// Empty lines skipped before a request line.
const MAX_LEADING_EMPTY_LINES: usize = 8;

/// Why a head cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// More bytes are needed.
    Incomplete,
    /// Not an HTTP/1.x head, or one the proxy refuses; the text says why (one line).
    Invalid(&'static str),
    /// An HTTP/1.x request whose host cannot be told for sure (target and `Host` disagree,
    /// two `Host` headers, a malformed host): refused like a denied host.
    Host(&'static str),
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Responses only: everything until the server closes.
    UntilClose,
}

/// One parsed request head.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    pub method: &'b str,
    /// The request target as sent.
    pub target: &'b str,
    /// The path of the target, without query (`*` for asterisk-form, "" for authority-form).
    pub path: &'b str,
    /// The host the request is for (port stripped), see the module doc; None: it names none.
    pub host: Option<&'b str>,
    pub headers: &'h [httparse::Header<'b>],
    pub body: Body,
    /// CONNECT, or an `Upgrade` request: after a 101/2xx the bytes are no longer HTTP.
    pub upgrade: bool,
    /// Bytes of the head, leading empty lines included.
    pub len: usize,
    pub minor_version: u8,
}

impl Request<'_, '_> {
    /// The value of the first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(self.headers, name)
    }
}

/// Parses the request head at the start of `buf` (after any leading empty lines).
pub fn request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> Result<Request<'h, 'b>, Error> {
    let skip = leading_empty_lines(buf)?;
    let mut req = httparse::Request::new(headers);
    let n = match req.parse(&buf[skip..]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(Error::Invalid("request head longer than 64 KiB"))
            } else {
                Err(Error::Incomplete)
            }
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many headers")),
        Err(_) => return Err(Error::Invalid("not an HTTP/1.x request")),
    };
    if skip + n > MAX_HEAD {
        return Err(Error::Invalid("request head longer than 64 KiB"));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Error::Invalid("not an HTTP/1.x request"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let host_header = single_host(headers)?;
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let (from_target, path) = if connect {
        (Some(authority_host(target)?), "")
    } else if target.starts_with('/') {
        (None, target.split(['?', '#']).next().unwrap_or(""))
    } else if target == "*" {
        (None, "*")
    } else {
        let (host, path) = absolute(target)?;
        (Some(host), path)
    };
    let host = match (from_target, host_header) {
        (Some(t), Some(h)) if !t.eq_ignore_ascii_case(h) => {
            return Err(Error::Host(
                "the request target and Host name different hosts",
            ))
        }
        (Some(t), _) => Some(t),
        (None, h) => h,
    };
    let upgrade = connect || header(headers, "upgrade").is_some();
    Ok(Request {
        method,
        target,
        path,
        host,
        headers,
        body: request_body(headers, minor)?,
        upgrade,
        len: skip + n,
        minor_version: minor,
    })
}

/// One parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Body,
    pub len: usize,
}

/// Parses the response head at the start of `buf`; `method` is the request's (a HEAD's
/// response has no body).
pub fn response(buf: &[u8], method: &str) -> Result<Response, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(Error::Invalid("response head longer than 64 KiB"))
        }
        Ok(httparse::Status::Partial) => return Err(Error::Incomplete),
        Err(_) => return Err(Error::Invalid("not an HTTP/1.x response")),
    };
    let Some(status) = resp.code else {
        return Err(Error::Invalid("not an HTTP/1.x response"));
    };
    let hs: &[httparse::Header<'_>] = resp.headers;
    let body = if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304
        || (method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&status))
    {
        Body::None
    } else {
        match framing(hs)? {
            Body::None => Body::UntilClose,
            b => b,
        }
    };
    Ok(Response {
        status,
        body,
        len: n,
    })
}

fn request_body(headers: &[httparse::Header<'_>], minor: u8) -> Result<Body, Error> {
    let b = framing(headers)?;
    if b == Body::Chunked && minor == 0 {
        return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 request"));
    }
    Ok(b)
}

/// `Content-Length` / `Transfer-Encoding`, refusing the ambiguous combinations.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Body, Error> {
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            for v in h.value.split(|b| *b == b',') {
                let v = trim(v);
                if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                    return Err(Error::Invalid("bad Content-Length"));
                }
                let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Invalid("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding counts; it must be chunked (RFC 9112 section 6.3).
            let last = h.value.split(|b| *b == b',').map(trim).next_back();
            let is_chunked = last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if !is_chunked || chunked.is_some() {
                return Err(Error::Invalid("unsupported Transfer-Encoding"));
            }
            chunked = Some(());
        }
    }
    match (length, chunked) {
        (Some(_), Some(())) => Err(Error::Invalid("both Content-Length and Transfer-Encoding")),
        (_, Some(())) => Ok(Body::Chunked),
        (Some(0), None) | (None, None) => Ok(Body::None),
        (Some(n), None) => Ok(Body::Length(n)),
    }
}

fn header<'b>(headers: &[httparse::Header<'b>], name: &str) -> Option<&'b [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The `Host` header's host (port stripped); two of them are refused.
fn single_host<'b>(headers: &[httparse::Header<'b>]) -> Result<Option<&'b str>, Error> {
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let Some(h) = hosts.next() else {
        return Ok(None);
    };
    if hosts.next().is_some() {
        return Err(Error::Host("more than one Host header"));
    }
    let v = core::str::from_utf8(trim(h.value)).map_err(|_| Error::Host("bad Host"))?;
    authority_host(v).map(Some)
}

/// `scheme://authority/path?query` → (host, path). Userinfo is refused.
fn absolute(target: &str) -> Result<(&str, &str), Error> {
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(Error::Host("bad request target"));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(Error::Host("bad request target"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let path = tail.split(['?', '#']).next().unwrap_or("");
    Ok((
        authority_host(authority)?,
        if path.is_empty() { "/" } else { path },
    ))
}

/// The host of `host[:port]` or `[v6]:port`; refuses userinfo, empty hosts and odd bytes.
fn authority_host(a: &str) -> Result<&str, Error> {
    let bad = Error::Host("bad host in the request");
    let host = if a.starts_with('[') {
        let end = a.find(']').ok_or(bad)?;
        let port = &a[end + 1..];
        if !(port.is_empty() || port.strip_prefix(':').is_some_and(all_digits)) {
            return Err(bad);
        }
        &a[..=end]
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if all_digits(p) => h,
            Some(_) => return Err(bad),
            None => a,
        }
    };
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b);
    if host.is_empty() || host.len() > 255 || !host.bytes().all(ok) {
        return Err(bad);
    }
    Ok(host)
}

fn all_digits(p: &str) -> bool {
    p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

fn leading_empty_lines(buf: &[u8]) -> Result<usize, Error> {
    let mut i = 0;
    for _ in 0..MAX_LEADING_EMPTY_LINES {
        match buf.get(i..) {
            Some([b'\r', b'\n', ..]) => i += 2,
            Some([b'\n', ..]) => i += 1,
            Some([b'\r']) | Some([]) => return Err(Error::Incomplete),
            _ => return Ok(i),
        }
    }
    Err(Error::Invalid("too many empty lines before the request"))
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b" \t".contains(b))
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b" \t".contains(b))
        .map_or(s, |i| i + 1);
    &v[s..e]
}

/// Finds the end of a chunked body in the bytes that pass by, without copying them: the
/// proxy forwards the bytes as they are and feeds them here to learn where the next message
/// starts. Chunk-size lines and trailer lines are bounded.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of the current size or trailer line seen so far.
    line: usize,
    size: u64,
    digits: u8,
    in_ext: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    Trailer,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Longest chunk-size or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunked {
    /// Feeds bytes of the body; returns how many of them belong to it. Fewer than
    /// `buf.len()` only when the body ended there ([`Chunked::done`]).
    pub fn feed(&mut self, buf: &[u8]) -> Result<usize, Error> {
        let bad = Error::Invalid("bad chunked body");
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let n = left.min((buf.len() - i) as u64) as usize;
                    i += n;
                    self.state = match left - n as u64 {
                        0 => ChunkState::DataCr,
                        l => ChunkState::Data(l),
                    };
                    continue;
                }
                ChunkState::Size => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(bad);
                    }
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if self.in_ext {
                        // chunk extensions: passed through, not interpreted.
                    } else if let Some(d) = (b as char).to_digit(16) {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(bad);
                        }
                        self.size = self.size * 16 + u64::from(d);
                    } else if (b == b';' || b == b' ' || b == b'\t') && self.digits > 0 {
                        self.in_ext = true;
                    } else {
                        return Err(bad);
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' || self.digits == 0 {
                        return Err(bad);
                    }
                    self.state = if self.size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(self.size)
                    };
                    (self.line, self.size, self.digits, self.in_ext) = (0, 0, 0, false);
                }
                ChunkState::DataCr => {
                    self.state = if b == b'\r' {
                        ChunkState::DataLf
                    } else {
                        return Err(bad);
                    };
                }
                ChunkState::DataLf => {
                    self.state = if b == b'\n' {
                        ChunkState::Size
                    } else {
                        return Err(bad);
                    };
                }
                ChunkState::Trailer => {
                    self.line = 0;
                    self.state = if b == b'\r' {
                        ChunkState::TrailerLf { empty: true }
                    } else {
                        ChunkState::TrailerLine
                    };
                }
                ChunkState::TrailerLine => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(bad);
                    }
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf { empty: false };
                    } else if b == b'\n' {
                        return Err(bad);
                    }
                }
                ChunkState::TrailerLf { empty } => {
                    if b != b'\n' {
                        return Err(bad);
                    }
                    self.state = if empty {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailer
                    };
                }
            }
            i += 1;
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests;
