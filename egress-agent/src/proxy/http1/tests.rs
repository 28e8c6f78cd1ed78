//! Request-by-request serving over in-memory pipes: pipelined requests with chunked and
//! fixed-length bodies are forwarded exactly, and a refused one stops everything after it.

use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

use super::*;

fn judge(r: &Request<'_, '_>) -> Judgement {
    if r.host == Some("denied.example") {
        Judgement::Refuse {
            why: "host denied.example is refused".into(),
            policy: "default/no".into(),
        }
    } else {
        Judgement::Allow {
            rule: "default/yes".into(),
            audit: false,
        }
    }
}

const UPLOAD: &str = "POST /up HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
const SIZED: &str = "PUT /p HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 4\r\n\r\nGET ";
const DENIED: &str = "GET /secret HTTP/1.1\r\nHost: denied.example\r\n\r\n";
const AFTER: &str = "GET /after HTTP/1.1\r\nHost: ok.example\r\n\r\n";

#[tokio::test]
async fn pipelined_requests_are_framed_exactly_and_a_refusal_stops_the_rest() {
    let (client, mut client_end) = duplex(1 << 16);
    let (upstream, mut origin) = duplex(1 << 16);
    // The origin answers each request it sees with a fixed response; it records the bytes.
    let origin_task = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let mut answered = 0;
        loop {
            let n = match tokio::time::timeout(Duration::from_millis(300), origin.read(&mut buf))
                .await
            {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            seen.extend_from_slice(&buf[..n]);
            let heads = String::from_utf8_lossy(&seen)
                .matches(" HTTP/1.1\r\n")
                .count();
            while answered < heads {
                origin.write_all(reply).await.unwrap();
                answered += 1;
            }
        }
        String::from_utf8(seen).unwrap()
    });
    let all = format!("{UPLOAD}{SIZED}{DENIED}{AFTER}");
    client_end.write_all(all.as_bytes()).await.unwrap();
    let mut logs = Vec::new();
    let served = serve(
        client,
        upstream,
        Vec::new(),
        Duration::from_secs(2),
        judge,
        |l| logs.push((l.method.clone(), l.path.clone(), l.verdict, l.status)),
    )
    .await;
    let mut got = String::new();
    client_end.read_to_string(&mut got).await.unwrap();
    let seen = origin_task.await.unwrap();
    assert_eq!(
        seen,
        format!("{UPLOAD}{SIZED}"),
        "the origin saw exactly the allowed requests"
    );
    assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
    assert!(
        got.ends_with("egress: host denied.example is refused\n"),
        "{got}"
    );
    assert!(got.contains("X-Egress-Policy: default/no"), "{got}");
    assert_eq!(
        (served.requests, served.refused, served.end),
        (3, true, "denied")
    );
    assert_eq!(
        logs,
        [
            ("POST".into(), "/up".into(), "allow", 200),
            ("PUT".into(), "/p".into(), "allow", 200),
            ("GET".into(), "/secret".into(), "deny", 403),
        ]
    );
}

#[tokio::test]
async fn smuggling_framings_get_a_400_and_reach_nobody() {
    let (client, mut client_end) = duplex(1 << 16);
    let (upstream, mut origin) = duplex(1 << 16);
    client_end
        .write_all(b"POST / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let served = serve(
        client,
        upstream,
        Vec::new(),
        Duration::from_secs(2),
        judge,
        |_| {},
    )
    .await;
    let mut got = String::new();
    client_end.read_to_string(&mut got).await.unwrap();
    assert!(got.starts_with("HTTP/1.1 400 Bad Request"), "{got}");
    assert!(
        got.contains("both Content-Length and Transfer-Encoding"),
        "{got}"
    );
    assert!(served.refused);
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(100), origin.read_to_end(&mut seen)).await;
    assert!(seen.is_empty());
}
