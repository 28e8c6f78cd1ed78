use super::*;
use alloc::string::String;

fn req(buf: &[u8]) -> Result<(Option<String>, String, Body, usize), Error> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let r = request(buf, &mut hs)?;
    Ok((r.host.map(Into::into), r.path.into(), r.body, r.len))
}

#[test]
fn host_from_header_or_absolute_target() {
    let (h, p, b, n) = req(b"GET /a/b?q=1 HTTP/1.1\r\nHost: Api.Example:8080\r\n\r\nrest").unwrap();
    assert_eq!(
        (h.as_deref(), p.as_str(), b, n),
        (Some("Api.Example"), "/a/b", Body::None, 49)
    );
    let (h, p, ..) = req(b"GET http://a.example:81/x?y HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!((h.as_deref(), p.as_str()), (Some("a.example"), "/x"));
    let (h, ..) = req(b"GET http://a.example HTTP/1.1\r\nHost: A.EXAMPLE:81\r\n\r\n").unwrap();
    assert_eq!(h.as_deref(), Some("a.example"));
    let (h, p, ..) = req(b"CONNECT db.example:5432 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!((h.as_deref(), p.as_str()), (Some("db.example"), ""));
    let (h, ..) = req(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").unwrap();
    assert_eq!(h.as_deref(), Some("[::1]"));
    assert_eq!(req(b"GET / HTTP/1.0\r\n\r\n").unwrap().0, None);
}

#[test]
fn evasions_are_refused() {
    for bad in [
        &b"GET http://denied.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: allowed.example\r\nHost: denied.example\r\n\r\n",
        b"GET http://user@denied.example/ HTTP/1.1\r\nHost: denied.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ] {
        assert!(
            matches!(req(bad), Err(Error::Invalid(_) | Error::Host(_))),
            "{:?}: {:?}",
            core::str::from_utf8(bad),
            req(bad)
        );
    }
}

#[test]
fn leading_crlf_is_skipped_and_prefixes_are_incomplete() {
    let r = b"\r\n\r\nGET / HTTP/1.1\r\nHost: denied.example\r\n\r\n";
    let (h, _, _, n) = req(r).unwrap();
    assert_eq!((h.as_deref(), n), (Some("denied.example"), r.len()));
    for i in 0..r.len() {
        assert_eq!(req(&r[..i]).unwrap_err(), Error::Incomplete, "prefix {i}");
    }
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.resize(MAX_HEAD + 1, b'a');
    assert!(matches!(req(&big), Err(Error::Invalid(_))));
}

#[test]
fn body_framing() {
    let (.., b, _) = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n").unwrap();
    assert_eq!(b, Body::Length(5));
    let (.., b, _) =
        req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n").unwrap();
    assert_eq!(b, Body::Chunked);
    let r = |s: &[u8], m| response(s, m).map(|r| (r.status, r.body));
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "GET"),
        Ok((200, Body::Length(3)))
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD"),
        Ok((200, Body::None))
    );
    assert_eq!(
        r(b"HTTP/1.1 304 Not Modified\r\n\r\n", "GET"),
        Ok((304, Body::None))
    );
    assert_eq!(
        r(b"HTTP/1.1 100 Continue\r\n\r\n", "POST"),
        Ok((100, Body::None))
    );
    assert_eq!(
        r(b"HTTP/1.0 200 OK\r\n\r\n", "GET"),
        Ok((200, Body::UntilClose))
    );
    assert_eq!(
        r(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET"
        ),
        Ok((200, Body::Chunked))
    );
    assert_eq!(r(b"HTTP/1.1 200 OK\r\n", "GET"), Err(Error::Incomplete));
}

#[test]
fn chunked_end_is_found_byte_by_byte_and_at_once() {
    let body = b"5;ext=1\r\nhello\r\n0A\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
    let mut c = Chunked::default();
    assert_eq!(c.feed(body), Ok(body.len() - 4));
    assert!(c.done());
    let mut c = Chunked::default();
    let mut used = 0;
    for b in body.chunks(1) {
        used += c.feed(b).unwrap();
        if c.done() {
            break;
        }
    }
    assert_eq!(used, body.len() - 4);
    for bad in [&b"x\r\n"[..], b"5\r\nhelloX", b"\r\n", b"0\r\nX\n"] {
        assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn host_problems_are_told_apart() {
    assert_eq!(
        req(b"GET http://denied.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
        Err(Error::Host(
            "the request target and Host name different hosts"
        ))
    );
    assert!(matches!(
        req(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"),
        Err(Error::Invalid(_))
    ));
}
