//! The fake API server answers as a real one does: list, watch replay and live events, watch
//! ends, merge PATCH with resourceVersion preconditions.

use super::*;

#[test]
fn merge_patch_and_query_decoding() {
    let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
    merge(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
    assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    let q = query("fieldSelector=spec.nodeName%3Dnode-1&watch=true&x=%3");
    assert_eq!(q["fieldSelector"], "spec.nodeName=node-1");
    assert_eq!(q["watch"], "true");
    assert_eq!(q["x"], "%3");
}

#[test]
fn paths_of_any_group_namespaced_or_not() {
    let t =
        target("/apis/policy.egress.dev/v1alpha1/namespaces/shop/egresses/web-out/status").unwrap();
    assert_eq!(
        (t.collection.as_str(), t.name.as_deref(), t.status),
        ("egresses", Some("web-out"), true)
    );
    assert_eq!(
        (t.namespace.as_deref(), t.api_version.as_str()),
        (Some("shop"), "policy.egress.dev/v1alpha1")
    );
    let t = target("/api/v1/nodes/node-a").unwrap();
    assert_eq!(
        (t.collection.as_str(), t.api_version.as_str()),
        ("nodes", "v1")
    );
    assert!(target("/version").is_none());
}

/// Over plain HTTP/1.1: a list, a watch replayed from its resourceVersion, a live event,
/// the watch ended by the server with the connection kept, a PATCH with a stale
/// precondition refused.
#[test]
fn list_watch_end_and_patch_over_http() {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let fake = FakeApiServer::start();
    fake.put("nodes", json!({"metadata": {"name": "a"}, "spec": {}}));
    let s = std::net::TcpStream::connect(fake.url().trim_start_matches("http://")).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let head = |r: &mut BufReader<std::net::TcpStream>| {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l == "\r\n" {
                return lines;
            }
            lines.push(l.trim_end().to_ascii_lowercase());
        }
    };
    let chunk = |r: &mut BufReader<std::net::TcpStream>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let n = usize::from_str_radix(l.trim(), 16).unwrap();
        let mut b = vec![0; n + 2];
        r.read_exact(&mut b).unwrap();
        String::from_utf8(b[..n].to_vec()).unwrap()
    };
    w.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let h = head(&mut r);
    assert!(h[0].starts_with("http/1.1 200"), "{h:?}");
    let len: usize = h
        .iter()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut b = vec![0; len];
    r.read_exact(&mut b).unwrap();
    let list: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(list["metadata"]["resourceVersion"], "1");

    w.write_all(b"GET /api/v1/nodes?watch=true&resourceVersion=0 HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let h = head(&mut r);
    assert!(
        h.contains(&"transfer-encoding: chunked".to_string()),
        "{h:?}"
    );
    let ev: Value = serde_json::from_str(&chunk(&mut r)).unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
    fake.put(
        "nodes",
        json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
    );
    let ev: Value = serde_json::from_str(&chunk(&mut r)).unwrap();
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["metadata"]["generation"], 2);
    fake.end_watches();
    assert_eq!(chunk(&mut r), "", "the watch's body ends");

    // The same connection serves the next request.
    let patch = br#"{"metadata":{"resourceVersion":"1"},"spec":{"y":2}}"#;
    w.write_all(
        format!(
            "PATCH /api/v1/nodes/a HTTP/1.1\r\nhost: x\r\ncontent-type: application/merge-patch+json\r\ncontent-length: {}\r\n\r\n",
            patch.len()
        )
        .as_bytes(),
    )
    .unwrap();
    w.write_all(patch).unwrap();
    let h = head(&mut r);
    assert!(h[0].starts_with("http/1.1 409"), "{h:?}");
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(
        fake.requests()[1],
        "GET /api/v1/nodes?resourceVersion=0&watch=true"
    );
}
