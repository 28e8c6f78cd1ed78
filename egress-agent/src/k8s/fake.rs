//! `FakeApiServer`: a FAKE Kubernetes API server, for tests only. It is not Kubernetes: an
//! in-process HTTP/1.1 server on 127.0.0.1 (plain http) that speaks just enough of the real
//! list/watch JSON protocol for the agent's kube client: lists with a `resourceVersion`,
//! `watch=true` streams of newline-delimited `{"type":"ADDED","object":{...}}` events (chunked)
//! replayed from that version, the `spec.nodeName` field selector on pods, GET, POST (create)
//! and JSON merge PATCH (also on `/status`, and with a `metadata.resourceVersion`
//! precondition), for any group and version. Tests put,
//! change and delete objects with [`FakeApiServer::put`] and [`FakeApiServer::delete`].

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

/// One stored change: (resourceVersion, collection, event type, object).
type Event = (u64, String, &'static str, Value);

#[derive(Default)]
struct State {
    rv: u64,
    /// collection ("pods", "nodes", "meshconfigs", ...) → (namespace, name) → object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Event>,
    requests: Vec<String>,
}

/// A fake API server (see the module documentation). Stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch, as an API server does at its timeout or restart.
    ends: tokio::sync::watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1 (an ephemeral port) on a thread of its own.
    pub fn start() -> FakeApiServer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let (events, _) = broadcast::channel(4096);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ends = tokio::sync::watch::channel(0).0;
        let (st, ev, end) = (state.clone(), events.clone(), ends.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                let serve = async {
                    while let Ok((s, _)) = listener.accept().await {
                        tokio::spawn(connection(s, st.clone(), ev.clone(), end.subscribe()));
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        FakeApiServer {
            addr,
            state,
            events,
            ends,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file pointing at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces an object of `collection` ("pods", "nodes", "meshconfigs",
    /// "egresses", "egressgateways"); sets uid, resourceVersion and generation as the API
    /// server would. Returns the stored object.
    pub fn put(&self, collection: &str, obj: Value) -> Value {
        let mut st = self.lock();
        let stored = upsert(&mut st, collection, obj, None);
        self.emit(&mut st, collection, stored.1, stored.0.clone());
        stored.0
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.lock();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut obj) = st.objects.get_mut(collection).and_then(|m| m.remove(&key)) else {
            return false;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::from(st.rv.to_string());
        self.emit(&mut st, collection, "DELETED", obj);
        true
    }

    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(collection)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Ends every open watch cleanly (clients resume from their last resourceVersion).
    pub fn end_watches(&self) {
        self.ends.send_modify(|n| *n += 1);
    }

    /// Every object of a collection.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every request so far: `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn emit(&self, st: &mut State, collection: &str, kind: &'static str, obj: Value) {
        publish(st, &self.events, collection, kind, obj);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Stores `obj` in place of `old` (default: the stored object of the same name), as the API
/// server would: new resourceVersion, generation bumped when the spec changed, uid kept.
/// Returns it and the event type.
fn upsert(
    st: &mut State,
    collection: &str,
    mut obj: Value,
    old: Option<&Value>,
) -> (Value, &'static str) {
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let key = (ns, name);
    let prev = old.cloned().or_else(|| {
        st.objects
            .get(collection)
            .and_then(|m| m.get(&key))
            .cloned()
    });
    st.rv += 1;
    let meta = &mut obj["metadata"];
    meta["resourceVersion"] = Value::from(st.rv.to_string());
    let prev_gen = prev
        .as_ref()
        .and_then(|p| p["metadata"]["generation"].as_i64())
        .unwrap_or(0);
    let spec_changed = prev.as_ref().map(|p| p.get("spec")) != Some(obj.get("spec"));
    let generation = if spec_changed { prev_gen + 1 } else { prev_gen };
    let uid = prev
        .as_ref()
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        .or_else(|| obj["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("00000000-0000-4000-8000-{:012x}", st.rv));
    obj["metadata"]["generation"] = Value::from(generation.max(1));
    obj["metadata"]["uid"] = Value::from(uid);
    st.objects
        .entry(collection.to_string())
        .or_default()
        .insert(key, obj.clone());
    (obj, if prev.is_some() { "MODIFIED" } else { "ADDED" })
}

/// Stores a change in the history and tells the watches.
fn publish(
    st: &mut State,
    events: &broadcast::Sender<Event>,
    collection: &str,
    kind: &'static str,
    obj: Value,
) {
    let ev = (st.rv, collection.to_string(), kind, obj);
    st.history.push(ev.clone());
    let _ = events.send(ev);
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; len.min(1 << 20)];
    r.read_exact(&mut body).await.ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request names: a collection, maybe one object of it, maybe its status.
struct Target {
    collection: String,
    name: Option<String>,
    status: bool,
    namespace: Option<String>,
    api_version: String,
}

fn target(path: &str) -> Option<Target> {
    let (rest, api_version) = if let Some(r) = path.strip_prefix("/api/v1/") {
        (r, "v1".to_string())
    } else {
        // /apis/<group>/<version>/...
        let r = path.strip_prefix("/apis/")?;
        let mut it = r.splitn(3, '/');
        let (group, version, rest) = (it.next()?, it.next()?, it.next()?);
        (rest, format!("{group}/{version}"))
    };
    let mut seg: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let mut namespace = None;
    if seg.first() == Some(&"namespaces") && seg.len() >= 3 {
        namespace = Some(seg[1].to_string());
        seg.drain(..2); // namespaced paths: objects are found by name alone here
    }
    Some(Target {
        collection: seg.first()?.to_string(),
        name: seg.get(1).map(|s| s.to_string()),
        status: seg.get(2) == Some(&"status"),
        namespace,
        api_version,
    })
}

fn matches(collection: &str, obj: &Value, query: &BTreeMap<String, String>) -> bool {
    match query.get("fieldSelector").and_then(|f| f.split_once('=')) {
        Some(("spec.nodeName", node)) if collection == "pods" => {
            obj["spec"]["nodeName"].as_str() == Some(node)
        }
        _ => true,
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

async fn connection(
    s: TcpStream,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    end: tokio::sync::watch::Receiver<u64>,
) {
    let mut r = BufReader::new(s);
    while let Some(req) = read_request(&mut r).await {
        let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .push(format!("{} {}?{}", req.method, req.path, q.join("&")));
        let Some(t) = target(&req.path) else {
            let (c, b) = status(404, "NotFound", "no such path in the fake");
            if respond(r.get_mut(), c, &b).await.is_err() {
                return;
            }
            continue;
        };
        let watching = matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
        if req.method == "GET" && t.name.is_none() && watching {
            watch(r.into_inner(), &t, &req, state, events, end).await;
            return;
        }
        let (code, body) = answer(&state, &events, &t, &req);
        if respond(r.get_mut(), code, &body).await.is_err() {
            return;
        }
    }
}

fn answer(
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<Event>,
    t: &Target,
    req: &Request,
) -> (u16, Value) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let find = |st: &State, name: &str| {
        st.objects.get(&t.collection).and_then(|m| {
            m.iter()
                .find(|((_, n), _)| n == name)
                .map(|(_, v)| v.clone())
        })
    };
    match (req.method.as_str(), &t.name) {
        ("GET", None) => {
            let items: Vec<Value> = st
                .objects
                .get(&t.collection)
                .map(|m| {
                    m.values()
                        .filter(|o| matches(&t.collection, o, &req.query))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (
                200,
                json!({"apiVersion": &t.api_version, "kind": "List",
                       "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        ("GET", Some(name)) => match find(&st, name) {
            Some(o) => (200, o),
            None => status(
                404,
                "NotFound",
                &format!("{} {name} not found", t.collection),
            ),
        },
        ("PATCH", Some(name)) => {
            let Some(cur) = find(&st, name) else {
                return status(
                    404,
                    "NotFound",
                    &format!("{} {name} not found", t.collection),
                );
            };
            let Ok(mut patch) = serde_json::from_slice::<Value>(&req.body) else {
                return status(400, "BadRequest", "the patch is not JSON");
            };
            if let Some(want) = patch.pointer("/metadata/resourceVersion").cloned() {
                if !want.is_null() && Some(&want) != cur.pointer("/metadata/resourceVersion") {
                    return status(409, "Conflict", "the object has been modified");
                }
                if let Some(m) = patch["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
            }
            let mut next = cur.clone();
            if t.status {
                // The status subresource changes status only.
                merge(&mut next["status"], &patch["status"]);
            } else {
                if let Some(p) = patch.as_object_mut() {
                    p.remove("status");
                }
                merge(&mut next, &patch);
            }
            let (obj, kind) = upsert(&mut st, &t.collection, next, Some(&cur));
            publish(&mut st, events, &t.collection, kind, obj.clone());
            (200, obj)
        }
        ("POST", None) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&req.body) else {
                return status(400, "BadRequest", "the object is not JSON");
            };
            if let (Some(ns), true) = (&t.namespace, obj["metadata"]["namespace"].is_null()) {
                obj["metadata"]["namespace"] = Value::from(ns.clone());
            }
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if name.is_empty() || find(&st, &name).is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{} {name:?} exists or has no name", t.collection),
                );
            }
            let (obj, kind) = upsert(&mut st, &t.collection, obj, None);
            publish(&mut st, events, &t.collection, kind, obj.clone());
            (201, obj)
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

async fn respond(s: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        match code {
            200 => "OK",
            201 => "Created",
            _ => "Error",
        },
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await
}

async fn chunk(s: &mut TcpStream, ev: &Event) -> std::io::Result<()> {
    let line = format!("{}\n", json!({"type": ev.2, "object": ev.3}));
    s.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await
}

/// A watch: the stored events after the requested resourceVersion, then live ones, until
/// the client goes away.
async fn watch(
    mut s: TcpStream,
    t: &Target,
    req: &Request,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    mut end: tokio::sync::watch::Receiver<u64>,
) {
    end.mark_unchanged();
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (backlog, mut live) = {
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        let b: Vec<Event> = st
            .history
            .iter()
            .filter(|e| e.0 > from && e.1 == t.collection && matches(&e.1, &e.3, &req.query))
            .cloned()
            .collect();
        (b, events.subscribe())
    };
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut last = from;
    for ev in &backlog {
        if chunk(&mut s, ev).await.is_err() {
            return;
        }
        last = ev.0;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            ev = live.recv() => match ev {
                Ok(ev) if ev.0 > last && ev.1 == t.collection && matches(&ev.1, &ev.3, &req.query) => {
                    last = ev.0;
                    if chunk(&mut s, &ev).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            },
            n = s.read(&mut probe) => if matches!(n, Ok(0) | Err(_)) { return },
            _ = end.changed() => {
                // The chunked body's end: the watch is over, the connection can be reused.
                let _ = s.write_all(b"0\r\n\r\n").await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_and_unescape() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
        assert_eq!(unescape("spec.nodeName%3Dnode-1"), "spec.nodeName=node-1");
        assert_eq!(unescape("%3"), "%3");
    }
}
