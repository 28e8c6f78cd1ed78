//! `FakeApiServer`: a FAKE Kubernetes API server, for tests only. It is not Kubernetes: an
//! in-process HTTP/1.1 server (hyper) on 127.0.0.1, plain http, that speaks just enough of
//! the real list/watch JSON protocol for a kube client: lists with a `resourceVersion`,
//! `watch=true` streams of newline-delimited `{"type":"ADDED","object":{...}}` events
//! (a chunked body) replayed from that version, the `spec.nodeName` field selector on pods,
//! a label-exists selector (`labelSelector=KEY`), GET, POST (create) and JSON merge PATCH
//! (also on `/status`, and with a `metadata.resourceVersion` precondition), for any group and
//! version. Tests put, change and delete objects with [`FakeApiServer::put`] and
//! [`FakeApiServer::delete`], and end every open watch with [`FakeApiServer::end_watches`] as
//! an API server does at its timeout.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full, Limited, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot, watch},
};

/// One stored change: (resourceVersion, collection, event type, object).
type Event = (u64, String, &'static str, Value);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The largest request body the fake reads.
const MAX_BODY: usize = 1 << 20;

#[derive(Default)]
struct State {
    rv: u64,
    /// collection ("pods", "nodes", "meshconfigs", ...) → (namespace, name) → object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Event>,
    requests: Vec<String>,
    /// Collections whose CRD is "not installed": every request to them is a 404.
    missing: std::collections::BTreeSet<String>,
}

/// What the test side and the server side share.
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch, as an API server does at its timeout or restart.
    ends: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a change in the history and tells the watches.
    fn publish(&self, st: &mut State, collection: &str, kind: &'static str, obj: Value) {
        let ev = (st.rv, collection.to_string(), kind, obj);
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
    }
}

/// A fake API server (see the module documentation). Stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1 (an ephemeral port) on a thread of its own, so that it
    /// serves whatever runtime (or none) the test uses.
    pub fn start() -> FakeApiServer {
        Self::start_at("127.0.0.1:0".parse().unwrap())
    }

    /// [`FakeApiServer::start`] on `addr` (an API server that comes back where it was).
    pub fn start_at(addr: SocketAddr) -> FakeApiServer {
        let l = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::serve(l)
    }

    /// [`FakeApiServer::start`], listening on 127.0.0.1 of network namespace `netns` (a test's
    /// "node", where its agent runs).
    pub fn start_in(netns: &std::path::Path) -> FakeApiServer {
        let l = crate::net::in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0 in the node namespace");
        Self::serve(l)
    }

    fn serve(std_listener: std::net::TcpListener) -> FakeApiServer {
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events: broadcast::channel(4096).0,
            ends: watch::channel(0).0,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                let serve = async {
                    while let Ok((s, _)) = listener.accept().await {
                        let shared = server.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        });
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
            shared,
            stop: Some(stop),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// Adds or replaces an object of `collection` ("pods", "nodes", "meshconfigs",
    /// "egresses", "egressgateways", ...); sets uid, resourceVersion and generation as the
    /// API server would. Returns the stored object.
    pub fn put(&self, collection: &str, obj: Value) -> Value {
        let mut st = self.shared.lock();
        let (obj, kind) = upsert(&mut st, collection, obj, None);
        self.shared.publish(&mut st, collection, kind, obj.clone());
        obj
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut obj) = st.objects.get_mut(collection).and_then(|m| m.remove(&key)) else {
            return false;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::from(st.rv.to_string());
        self.shared.publish(&mut st, collection, "DELETED", obj);
        true
    }

    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(collection)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Makes `collection` absent (its CRD not installed: 404) or present again.
    pub fn set_installed(&self, collection: &str, installed: bool) {
        let mut st = self.shared.lock();
        if installed {
            st.missing.remove(collection);
        } else {
            st.missing.insert(collection.to_string());
        }
    }

    /// Ends every open watch cleanly (clients resume from their last resourceVersion).
    pub fn end_watches(&self) {
        self.shared.ends.send_modify(|n| *n += 1);
    }

    /// Every object of a collection.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every request so far: `METHOD path?query` (the query decoded, its keys sorted).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
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
    obj["metadata"]["resourceVersion"] = Value::from(st.rv.to_string());
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

/// A query string, decoded (`%XX`, `+`).
fn query(q: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
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
    // A label selector of one key alone: the label exists.
    if let Some(key) = query
        .get("labelSelector")
        .filter(|l| !l.contains(['=', '!', ',']))
    {
        if obj
            .pointer("/metadata/labels")
            .and_then(|l| l.get(key))
            .is_none()
        {
            return false;
        }
    }
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

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("response")
}

/// One request: recorded, then a watch stream or a single JSON answer.
async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = query(req.uri().query().unwrap_or(""));
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    shared
        .lock()
        .requests
        .push(format!("{method} {path}?{}", q.join("&")));
    let Some(t) = target(&path).filter(|t| !shared.lock().missing.contains(&t.collection)) else {
        let (c, b) = status(404, "NotFound", "no such path in the fake");
        return json_response(c, &b);
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if method == Method::GET && t.name.is_none() && watching {
        return watch(shared, t, query);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let (c, b) = status(413, "RequestEntityTooLarge", "the body is too large");
            return json_response(c, &b);
        }
    };
    let (code, v) = answer(shared, &t, &method, &query, &body);
    json_response(code, &v)
}

fn answer(
    shared: &Shared,
    t: &Target,
    method: &Method,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> (u16, Value) {
    let mut st = shared.lock();
    let find = |st: &State, name: &str| {
        st.objects.get(&t.collection).and_then(|m| {
            m.iter()
                .find(|((_, n), _)| n == name)
                .map(|(_, v)| v.clone())
        })
    };
    let not_found = |name: &str| {
        status(
            404,
            "NotFound",
            &format!("{} {name} not found", t.collection),
        )
    };
    match (method.as_str(), &t.name) {
        ("GET", None) => {
            let items: Vec<Value> = st
                .objects
                .get(&t.collection)
                .map(|m| {
                    m.values()
                        .filter(|o| matches(&t.collection, o, query))
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
            None => not_found(name),
        },
        ("PATCH", Some(name)) => {
            let Some(cur) = find(&st, name) else {
                return not_found(name);
            };
            let Ok(mut patch) = serde_json::from_slice::<Value>(body) else {
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
            shared.publish(&mut st, &t.collection, kind, obj.clone());
            (200, obj)
        }
        ("POST", None) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
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
            shared.publish(&mut st, &t.collection, kind, obj.clone());
            (201, obj)
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

fn event_line(ev: &Event) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": ev.2, "object": ev.3})))
}

/// A watch: the stored events after the requested resourceVersion, then live ones, until
/// the client goes away or [`FakeApiServer::end_watches`] (then the chunked body ends and
/// the connection can be reused, as with a real API server).
fn watch(shared: &Arc<Shared>, t: Target, query: BTreeMap<String, String>) -> Response<Body> {
    let mut end = shared.ends.subscribe();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The backlog and the subscription under one lock: no change is missed or sent twice.
    let (backlog, mut live) = {
        let st = shared.lock();
        let b: Vec<Event> = st
            .history
            .iter()
            .filter(|e| e.0 > from && e.1 == t.collection && matches(&e.1, &e.3, &query))
            .cloned()
            .collect();
        (b, shared.events.subscribe())
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut last = from;
        for ev in &backlog {
            if tx.send(event_line(ev)).await.is_err() {
                return;
            }
            last = ev.0;
        }
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(ev) if ev.0 > last && ev.1 == t.collection && matches(&ev.1, &ev.3, &query) => {
                        last = ev.0;
                        if tx.send(event_line(&ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                // The client went away (hyper dropped the body).
                _ = tx.closed() => return,
                // Dropping `tx` ends the body.
                _ = end.changed() => return,
            }
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("response")
}

#[cfg(test)]
mod tests;
