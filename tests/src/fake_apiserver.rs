//! A fake Kubernetes API server for the Kubernetes source's tests: a real
//! HTTP server speaking list and watch JSON for Services, EndpointSlices and
//! Nodes, with resourceVersions, bookmarks, 410 Gone after a compaction,
//! and an outage switch. Objects are plain JSON, as kubectl would send them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Resource::Services => ("v1", "ServiceList", "Service"),
            Resource::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSliceList", "EndpointSlice"),
            Resource::Nodes => ("v1", "NodeList", "Node"),
        }
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

type ObjectKey = (Resource, String, String);

struct ApiState {
    resource_version: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<WatchEvent>,
    down: bool,
    /// Watch requests served so far (tests wait on reconnects with it).
    watches: u64,
    /// Requests answered 503 while down.
    refused: u64,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<ApiState>>,
    events: broadcast::Sender<WatchEvent>,
    /// Closes every open watch stream.
    hangup: broadcast::Sender<()>,
    /// Signalled on every refused request.
    refused_signal: Arc<std::sync::Condvar>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeApiServer {
    shared: Shared,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

fn key_of(obj: &Value) -> Option<ObjectKey> {
    let resource = Resource::of_kind(obj.get("kind")?.as_str()?)?;
    let meta = obj.get("metadata")?;
    let namespace = match resource {
        Resource::Nodes => String::new(),
        _ => meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string(),
    };
    Some((resource, namespace, meta.get("name")?.as_str()?.to_string()))
}

impl FakeApiServer {
    /// Serves on `listener` (bind it in the namespace the agent runs in).
    pub fn start(listener: TcpListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (events, _) = broadcast::channel(65_536);
        let (hangup, _) = broadcast::channel(4);
        let shared = Shared {
            state: Arc::new(Mutex::new(ApiState {
                resource_version: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                down: false,
                watches: 0,
                refused: 0,
            })),
            refused_signal: Arc::new(std::sync::Condvar::new()),
            events,
            hangup,
        };
        let app = Router::new()
            .route("/api/v1/services", get(handle_services))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(handle_slices))
            .route("/api/v1/nodes", get(handle_nodes))
            .with_state(shared.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeApiServer {
            shared,
            addr,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\ncurrent-context: fake\n",
            self.addr
        )
    }

    fn record(&self, kind: &'static str, key: ObjectKey, object: Option<Value>) {
        let mut st = self.shared.state();
        st.resource_version += 1;
        let rv = st.resource_version;
        let object = match object {
            Some(mut obj) => {
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.objects.insert(key.clone(), obj.clone());
                obj
            }
            None => {
                let Some(mut old) = st.objects.remove(&key) else { return };
                old["metadata"]["resourceVersion"] = json!(rv.to_string());
                old
            }
        };
        let event = WatchEvent {
            rv,
            resource: key.0,
            kind,
            object,
        };
        st.history.push(event.clone());
        let _ = self.shared.events.send(event);
    }

    /// Creates or replaces an object (ADDED or MODIFIED for watchers).
    pub fn apply(&self, object: Value) {
        let key = key_of(&object).expect("object with kind Service/EndpointSlice/Node and metadata.name");
        let kind = if self.shared.state().objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(kind, key, Some(object));
    }

    /// Applies every document of a multi-document YAML text.
    pub fn apply_yaml(&self, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            let value: Value = yaml_to_json(doc);
            if value
                .get("kind")
                .and_then(Value::as_str)
                .and_then(Resource::of_kind)
                .is_some()
            {
                self.apply(value);
            }
        }
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let resource = Resource::of_kind(kind).expect("known kind");
        let ns = if resource == Resource::Nodes {
            String::new()
        } else {
            namespace.to_string()
        };
        self.record("DELETED", (resource, ns, name.to_string()), None);
    }

    /// Compacts history past every watcher's position and drops all watch
    /// connections: clients must relist (their re-watch gets 410 Gone).
    pub fn expire_watches(&self) {
        {
            let mut st = self.shared.state();
            st.resource_version += 1;
            st.compacted = st.resource_version;
            st.history.clear();
        }
        let _ = self.shared.hangup.send(());
    }

    /// An outage: every request gets 503 and open watches are dropped.
    pub fn set_down(&self, down: bool) {
        self.shared.state().down = down;
        if down {
            let _ = self.shared.hangup.send(());
        }
    }

    /// Waits until `n` requests have been refused during outages.
    pub fn wait_refused(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let guard = self.shared.state();
        let (guard, result) = self
            .shared
            .refused_signal
            .wait_timeout_while(guard, timeout, |st| st.refused < n)
            .unwrap_or_else(|e| e.into_inner());
        if result.timed_out() {
            anyhow::bail!("only {} requests refused within {timeout:?}, wanted {n}", guard.refused);
        }
        Ok(())
    }

    /// Number of watch requests served so far.
    pub fn watch_requests(&self) -> u64 {
        self.shared.state().watches
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One YAML document (as the sandbox's manifests are written) as JSON.
fn yaml_to_json(doc: &str) -> Value {
    serde_norway::from_str::<Value>(doc).unwrap_or(Value::Null)
}

async fn handle_services(state: State<Shared>, query: Query<BTreeMap<String, String>>) -> Response {
    handle(state.0, Resource::Services, query.0).await
}
async fn handle_slices(state: State<Shared>, query: Query<BTreeMap<String, String>>) -> Response {
    handle(state.0, Resource::EndpointSlices, query.0).await
}
async fn handle_nodes(state: State<Shared>, query: Query<BTreeMap<String, String>>) -> Response {
    handle(state.0, Resource::Nodes, query.0).await
}

/// `fieldSelector=metadata.name=X` (the agent's Node watch); other
/// selectors are not evaluated (the agent filters again anyway).
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    match query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
    {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(shared: Shared, resource: Resource, query: BTreeMap<String, String>) -> Response {
    if shared.state().down {
        shared.state().refused += 1;
        shared.refused_signal.notify_all();
        let body = status(503, "ServiceUnavailable", "the fake API server is down").to_string();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let st = shared.state();
        let (api_version, list_kind, _) = resource.list_kind();
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|((r, _, _), obj)| *r == resource && selected(obj, &query))
            .map(|(_, obj)| obj)
            .collect();
        let body = json!({"apiVersion": api_version, "kind": list_kind,
                          "metadata": {"resourceVersion": st.resource_version.to_string()}, "items": items});
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }

    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut live = shared.events.subscribe();
    let mut hangup = shared.hangup.subscribe();
    let backlog: Vec<WatchEvent>;
    {
        let mut st = shared.state();
        st.watches += 1;
        if from < st.compacted {
            let line = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.try_send(Bytes::from(format!("{line}\n")));
            drop(tx);
            return stream_response(rx);
        }
        backlog = st
            .history
            .iter()
            .filter(|e| e.rv > from && e.resource == resource)
            .cloned()
            .collect();
    }
    let (api_version, _, kind) = resource.list_kind();
    tokio::spawn(async move {
        let send = |e: &WatchEvent| {
            let line = json!({"type": e.kind, "object": e.object});
            Bytes::from(format!("{line}\n"))
        };
        let mut last = from;
        for e in &backlog {
            if selected(&e.object, &query) && tx.send(send(e)).await.is_err() {
                return;
            }
            last = e.rv;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok(e) if e.resource == resource && e.rv > last => {
                        last = e.rv;
                        if selected(&e.object, &query) && tx.send(send(&e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    // Everything up to `last` has been sent on this stream.
                    let line = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                                      "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                        return;
                    }
                }
                _ = hangup.recv() => return,
                () = &mut deadline => return,
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}
