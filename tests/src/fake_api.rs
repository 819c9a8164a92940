//! An in-process fake of the Kubernetes API, enough for kube-rs watchers:
//! list (with `limit`/`continue` pages) and watch of v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and v1 Nodes, with resourceVersions,
//! ADDED/MODIFIED/DELETED and BOOKMARK events, streaming lists (a watch
//! with `sendInitialEvents=true`: an ADDED event per object, then a
//! BOOKMARK annotated `k8s.io/initial-events-end`, as Kubernetes 1.34
//! serves them by default; [`FakeApi::set_watch_list`] turns them off and
//! the fake then refuses them with 422 Invalid, as a server with the
//! WatchList feature gate off does), 410 Gone for watches from a
//! compacted resourceVersion, dropped connections and an "unavailable"
//! switch (every request answers 500).
//!
//! Objects are kept serialized, as the API server's watch cache keeps
//! their encodings: a list or an initial event stream copies bytes, so the
//! fake's own cost (it runs in the benchmark's process, on the agent's
//! CPUs) stays small next to the client's.
//!
//! Neither kube's `tower-test` mocking (one scripted request/response at a
//! time) nor the `kube-fake-client` crate (no watch) covers watch
//! semantics, so this is a small HTTP/1.1 server on tokio. It listens on
//! 127.0.0.1 with plain HTTP, or (`start_tls`, for in-cluster clients) with
//! HTTPS and a bearer token on a listener the caller bound, for example in
//! a test node's namespace. Every response closes its connection (no
//! keep-alive to get wrong); watch bodies are chunked, one JSON event per
//! chunk.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::broadcast,
    task::JoinHandle,
};

/// The kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn index(self) -> usize {
        self as usize
    }

    fn collection_path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// The annotation of the BOOKMARK that ends a streaming list's initial
/// events (`metav1.InitialEventsAnnotationKey`).
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// What a watch connection is told.
#[derive(Clone, Debug)]
enum Msg {
    Event {
        kind: Kind,
        rv: u64,
        name: String,
        line: Arc<str>,
    },
    Bookmark {
        rv: u64,
    },
    /// Close every open watch abruptly (no final chunk), like a broken
    /// connection.
    DropAll,
}

/// Requests the fake saw, for assertions.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Completed list requests (pages) per kind.
    pub lists: BTreeMap<&'static str, u64>,
    /// The resourceVersion of every watch request, per kind, in order
    /// (streaming lists included).
    pub watches: BTreeMap<&'static str, Vec<String>>,
    /// Streaming lists served (watches with `sendInitialEvents=true`
    /// answered with their initial events), per kind.
    pub initial_events: BTreeMap<&'static str, u64>,
    /// Requests refused with 422 Invalid (streaming lists while they are
    /// off, invalid combinations of the list/watch options).
    pub invalid: u64,
    /// Watches answered with 410 Gone.
    pub gone: u64,
    /// Requests answered 500 while unavailable.
    pub unavailable: u64,
    /// Requests answered 401 for a missing or wrong bearer token (HTTPS
    /// mode).
    pub unauthorized: u64,
    /// The label selectors of list and watch requests, per kind (the fake
    /// does not apply them).
    pub label_selectors: BTreeMap<&'static str, BTreeSet<String>>,
}

struct State {
    rv: u64,
    /// Each object serialized, by `namespace/name`.
    objects: [BTreeMap<String, Arc<str>>; 3],
    /// Every change after the last compaction: (rv, kind, object name, event line).
    history: Vec<(u64, Kind, String, Arc<str>)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    unavailable: bool,
    /// Streaming lists (`sendInitialEvents`) are served.
    watch_list: bool,
    seen: Seen,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<Msg>,
    /// The bearer token every request must carry (HTTPS mode only).
    token: Option<String>,
}

/// Changes made under the fake's lock, so a group of them is atomic with
/// respect to watchers (see [`FakeApi::batch`]).
pub struct Tx<'a> {
    state: MutexGuard<'a, State>,
    events: &'a broadcast::Sender<Msg>,
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or("")
    )
}

/// One watch event's line. `type` comes first, as the API server (Go,
/// `metav1.WatchEvent`'s field order) writes it: serde reads an
/// adjacently tagged event whose tag comes last by buffering the object.
fn event_line(type_: &str, object: &str) -> String {
    format!("{{\"type\":\"{type_}\",\"object\":{object}}}\n")
}

impl Tx<'_> {
    fn record(&mut self, kind: Kind, type_: &str, obj: &Value) {
        let rv = self.state.rv;
        let line: Arc<str> = event_line(type_, &obj.to_string()).into();
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        self.state.history.push((rv, kind, name.clone(), line.clone()));
        // No receiver is fine: nobody watches yet.
        let _ = self.events.send(Msg::Event { kind, rv, name, line });
    }

    /// Creates or replaces an object (kind, apiVersion and resourceVersion
    /// are filled in) and sends ADDED or MODIFIED.
    pub fn apply(&mut self, kind: Kind, mut obj: Value) -> u64 {
        self.state.rv += 1;
        let rv = self.state.rv;
        obj["kind"] = json!(kind.name());
        obj["apiVersion"] = json!(kind.api_version());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&obj);
        let old = self.state.objects[kind.index()].insert(key, obj.to_string().into());
        self.record(kind, if old.is_some() { "MODIFIED" } else { "ADDED" }, &obj);
        rv
    }

    /// Deletes `namespace/name` (namespace "" for Nodes) and sends DELETED.
    /// Returns false when there was no such object.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        let Some(stored) = self.state.objects[kind.index()].remove(&format!("{namespace}/{name}")) else {
            return false;
        };
        let mut obj: Value = serde_json::from_str(&stored).expect("the fake stores valid JSON");
        self.state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.state.rv.to_string());
        self.record(kind, "DELETED", &obj);
        true
    }

    /// Breaks every open watch connection.
    pub fn drop_connections(&mut self) {
        let _ = self.events.send(Msg::DropAll);
    }

    /// Forgets the change history, as etcd compaction does, and expires the
    /// current resourceVersion too: every watch from a resourceVersion up to
    /// now, even one that has seen everything, gets 410 Gone and must
    /// relist. Open watches are dropped first, so they cannot see later
    /// changes either.
    pub fn expire(&mut self) {
        self.drop_connections();
        self.state.compacted = self.state.rv + 1;
        self.state.history.clear();
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch
    /// that asked for bookmarks. Returns that resourceVersion.
    pub fn bookmark(&mut self) -> u64 {
        let rv = self.state.rv;
        let _ = self.events.send(Msg::Bookmark { rv });
        rv
    }

    /// Serves streaming lists (the default, as Kubernetes 1.34 does) or
    /// refuses them with 422 Invalid, as a server with the WatchList
    /// feature gate off (the default before 1.34) does.
    pub fn set_watch_list(&mut self, on: bool) {
        self.state.watch_list = on;
    }

    /// Makes every request fail with 500 (or stops doing so).
    pub fn set_unavailable(&mut self, unavailable: bool) {
        self.state.unavailable = unavailable;
        if unavailable {
            self.drop_connections();
        }
    }
}

/// A connection the fake serves: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A certificate authority and a server certificate it signed for one IP
/// address: what in-cluster clients need (`ca.crt`) and what the fake
/// serves HTTPS with.
pub struct Tls {
    /// The CA certificate (PEM), as a pod's service-account `ca.crt`.
    pub ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    /// A fresh CA and a certificate for `ip` signed by it.
    pub fn for_ip(ip: std::net::IpAddr) -> Result<Tls> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(Vec::<String>::new())?;
        leaf.subject_alt_names = vec![SanType::IpAddress(ip)];
        let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        Ok(Tls {
            ca_pem: ca.pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// The fake API server; stops on drop.
pub struct FakeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    https: bool,
    server: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
        // Open watch connections end with their next message.
        let _ = self.inner.events.send(Msg::DropAll);
    }
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 (an ephemeral port) in the current
    /// tokio runtime.
    pub async fn start() -> Result<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake API server")?;
        Self::serve(listener, None, None)
    }

    /// Starts the server with HTTPS on `listener` (bound by the caller, for
    /// example inside a network namespace), in the current tokio runtime.
    /// As an API server authenticates a pod's service account, every
    /// request must carry `Authorization: Bearer <token>`; others get 401.
    pub fn start_tls(listener: std::net::TcpListener, tls: &Tls, token: &str) -> Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        Self::serve(listener, Some(tls.acceptor.clone()), Some(token.to_string()))
    }

    fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, token: Option<String>) -> Result<FakeApi> {
        let addr = listener.local_addr()?;
        let https = tls.is_some();
        // Large enough for a benchmark's bursts; a watch that falls further
        // behind is dropped and resumes from its resourceVersion.
        let (events, _) = broadcast::channel(65536);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1,
                objects: Default::default(),
                history: Vec::new(),
                compacted: 0,
                unavailable: false,
                watch_list: true,
                seen: Seen::default(),
            }),
            events,
            token,
        });
        let i = inner.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // As the real API server's (Go sets TCP_NODELAY on every
                // connection): with Nagle, a watch event written while the
                // previous one waits for its delayed ACK is held back.
                let _ = conn.set_nodelay(true);
                let (i, tls) = (i.clone(), tls.clone());
                tokio::spawn(async move {
                    // Errors here are the client going away.
                    let _ = match tls {
                        Some(tls) => match tls.accept(conn).await {
                            Ok(conn) => handle(conn, i).await,
                            Err(e) => Err(e.into()),
                        },
                        None => handle(conn, i).await,
                    };
                });
            }
        });
        Ok(FakeApi {
            inner,
            addr,
            https,
            server,
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("a valid URL"));
        kube::Client::try_from(config).expect("a kube client for the fake API")
    }

    /// A kubeconfig that points at this server, for the agent binary.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// Runs `f` with the fake locked: its changes reach watchers as one
    /// group, in order.
    pub fn batch<R>(&self, f: impl FnOnce(&mut Tx<'_>) -> R) -> R {
        let mut tx = Tx {
            state: self.inner.state.lock().unwrap(),
            events: &self.inner.events,
        };
        f(&mut tx)
    }

    pub fn apply(&self, kind: Kind, obj: Value) -> u64 {
        self.batch(|t| t.apply(kind, obj))
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.batch(|t| t.delete(kind, namespace, name))
    }

    pub fn bookmark(&self) -> u64 {
        self.batch(|t| t.bookmark())
    }

    pub fn drop_connections(&self) {
        self.batch(|t| t.drop_connections())
    }

    pub fn expire(&self) {
        self.batch(|t| t.expire())
    }

    pub fn set_unavailable(&self, unavailable: bool) {
        self.batch(|t| t.set_unavailable(unavailable))
    }

    pub fn set_watch_list(&self, on: bool) {
        self.batch(|t| t.set_watch_list(on))
    }

    /// Forgets the history without dropping anything (keeps a large initial
    /// state from being replayed; a benchmark's setup). Unlike
    /// [`Tx::expire`], a watch from the current resourceVersion (a list made
    /// after this) still works: it needs no history.
    pub fn compact(&self) {
        self.batch(|t| {
            t.state.compacted = t.state.rv;
            t.state.history.clear();
        })
    }

    pub fn seen(&self) -> Seen {
        self.inner.state.lock().unwrap().seen.clone()
    }

    /// How many watches are connected for `kind` right now is not tracked;
    /// this waits until at least `n` watch requests for `kind` were seen.
    pub async fn wait_watches(&self, kind: Kind, n: usize, timeout: Duration) -> Result<()> {
        let start = tokio::time::Instant::now();
        loop {
            let have = self.seen().watches.get(kind.name()).map_or(0, Vec::len);
            if have >= n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{n} watch requests for {} not seen within {timeout:?} (saw {have})",
                    kind.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A parsed request: path and decoded query parameters.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    /// The `Authorization` header's value.
    authorization: Option<String>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let v = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match v {
                    Some(v) => out.push(v),
                    None => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_request<S: Stream>(conn: &mut S) -> Result<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            bail!("request head too long");
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await??;
        if n == 0 {
            bail!("closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let (path, qs) = target.split_once('?').unwrap_or((target, ""));
    let authorization = head.lines().skip(1).find_map(|h| {
        let (name, value) = h.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Request {
        method,
        path: path.to_string(),
        query,
        authorization,
    })
}

async fn respond_json<S: Stream>(conn: &mut S, code: u16, body: &Value) -> Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// The `metadata.name=X` field selector, the only one the agent uses.
fn name_selector(q: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    match q.get("fieldSelector").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => match s.strip_prefix("metadata.name=") {
            Some(n) => Ok(Some(n.to_string())),
            None => Err(format!("field selector {s:?} is not supported by the fake")),
        },
    }
}

async fn handle<S: Stream>(mut conn: S, inner: Arc<Inner>) -> Result<()> {
    let req = read_request(&mut conn).await?;
    if let Some(token) = &inner.token {
        if req.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            inner.state.lock().unwrap().seen.unauthorized += 1;
            let why = format!("{} without the service-account token", req.path);
            return respond_json(&mut conn, 401, &status(401, "Unauthorized", &why)).await;
        }
    }
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.collection_path() == req.path) else {
        return respond_json(
            &mut conn,
            404,
            &status(404, "NotFound", &format!("no route {}", req.path)),
        )
        .await;
    };
    if req.method != "GET" {
        return respond_json(&mut conn, 400, &status(400, "BadRequest", "only GET is served")).await;
    }
    let down = {
        let mut st = inner.state.lock().unwrap();
        let labels = req.query.get("labelSelector").cloned().unwrap_or_default();
        st.seen.label_selectors.entry(kind.name()).or_default().insert(labels);
        st.seen.unavailable += u64::from(st.unavailable);
        st.unavailable
    };
    if down {
        // 500, not 503: kube's client retries 503 by itself (up to 15 times),
        // which would hide the outage from the watcher and its backoff.
        return respond_json(&mut conn, 500, &status(500, "InternalError", "the fake is down")).await;
    }
    let selector = match name_selector(&req.query) {
        Ok(s) => s,
        Err(e) => return respond_json(&mut conn, 400, &status(400, "BadRequest", &e)).await,
    };
    let watch = matches!(req.query.get("watch").map(String::as_str), Some("true" | "1"));
    let watch_list = inner.state.lock().unwrap().watch_list;
    if let Err(e) = validate_options(&req.query, watch, watch_list) {
        inner.state.lock().unwrap().seen.invalid += 1;
        let message = format!("ListOptions.meta.k8s.io \"\" is invalid: {e}");
        return respond_json(&mut conn, 422, &status(422, "Invalid", &message)).await;
    }
    if watch {
        serve_watch(conn, inner, kind, &req, selector).await
    } else {
        let body = list(&inner, kind, &req, selector.as_deref());
        respond_body(&mut conn, &body).await
    }
}

/// The API server's checks of the list and watch options that streaming
/// lists involve (apimachinery's `ValidateListOptions`; the real server
/// answers 422 Invalid). `watch_list`: the WatchList feature is on.
fn validate_options(q: &BTreeMap<String, String>, watch: bool, watch_list: bool) -> Result<(), String> {
    let send_initial = q.get("sendInitialEvents");
    let matching = q.get("resourceVersionMatch").filter(|m| !m.is_empty());
    if !watch {
        return match send_initial {
            Some(_) => Err("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list".into()),
            None => Ok(()),
        };
    }
    if send_initial.is_some() {
        if matching.map(String::as_str) != Some("NotOlderThan") {
            return Err(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
                    .into(),
            );
        }
        if !watch_list {
            return Err("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled".into());
        }
    } else if matching.is_some() {
        return Err(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"
                .into(),
        );
    }
    Ok(())
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A 200 response with a JSON body that is already serialized.
async fn respond_body<S: Stream>(conn: &mut S, body: &str) -> Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await?;
    Ok(())
}

/// The name part of a `namespace/name` key.
fn name_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, n)| n)
}

/// One page of a list. Pages after the first carry the first page's
/// resourceVersion (in the continue token), as the real server does, so a
/// change made between pages is replayed by the watch that follows.
fn list(inner: &Inner, kind: Kind, req: &Request, selector: Option<&str>) -> String {
    let mut st = inner.state.lock().unwrap();
    *st.seen.lists.entry(kind.name()).or_default() += 1;
    let (rv, after) = match req.query.get("continue").and_then(|c| c.split_once('-')) {
        Some((rv, k)) => (rv.parse().unwrap_or(st.rv), unhex(k)),
        None => (st.rv, None),
    };
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    // From the continue token's key on, without walking the keys before
    // it (a list of 100,000 objects in pages of 500 would walk 10 million).
    use std::ops::Bound::{Excluded, Unbounded};
    let from = after.map_or(Unbounded, Excluded);
    let range = st.objects[kind.index()]
        .range::<String, _>((from, Unbounded))
        .filter(|(k, _)| selector.is_none_or(|n| name_of(k) == n));
    for (k, o) in range {
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(o.clone());
        last = Some(k.clone());
    }
    drop(st);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if more {
        meta["continue"] = json!(format!("{rv}-{}", hex(&last.unwrap_or_default())));
    }
    let head = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(), "metadata": meta});
    let head = head.to_string();
    let mut body = String::with_capacity(head.len() + 16 + items.iter().map(|i| i.len() + 1).sum::<usize>());
    // The head's closing brace gives way to the items.
    body.push_str(&head[..head.len() - 1]);
    body.push_str(",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    body
}

/// Bytes of initial events written per chunk of a streaming list.
const INITIAL_CHUNK: usize = 64 * 1024;

async fn write_chunk<S: Stream>(conn: &mut S, data: &str) -> std::io::Result<()> {
    conn.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

async fn serve_watch<S: Stream>(
    mut conn: S,
    inner: Arc<Inner>,
    kind: Kind,
    req: &Request,
    selector: Option<String>,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = matches!(
        req.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let matches = |name: &str| selector.as_deref().is_none_or(|s| s == name);
    // A streaming list: the current objects first (validated: the feature
    // is on and resourceVersionMatch is NotOlderThan, which any state of
    // the fake satisfies, so it serves the current one, as the watch cache
    // does).
    let initial_events = req.query.get("sendInitialEvents").map(String::as_str) == Some("true");

    // Subscribe and read the history (or the objects) under one lock: no
    // event is missed or sent twice.
    let (mut rx, replay, initial, gone, current) = {
        let mut st = inner.state.lock().unwrap();
        st.seen.watches.entry(kind.name()).or_default().push(from.to_string());
        let gone = !initial_events && from != 0 && from < st.compacted;
        if gone {
            st.seen.gone += 1;
        }
        let replay: Vec<Arc<str>> = match initial_events {
            true => Vec::new(),
            false => st
                .history
                .iter()
                .filter(|(rv, k, n, _)| *rv > from && *k == kind && matches(n))
                .map(|(_, _, _, l)| l.clone())
                .collect(),
        };
        let initial: Vec<Arc<str>> = match initial_events {
            true => {
                *st.seen.initial_events.entry(kind.name()).or_default() += 1;
                st.objects[kind.index()]
                    .iter()
                    .filter(|(k, _)| matches(name_of(k)))
                    .map(|(_, o)| o.clone())
                    .collect()
            }
            false => Vec::new(),
        };
        (inner.events.subscribe(), replay, initial, gone, st.rv)
    };
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    if gone {
        // What the API server sends for an expired resourceVersion: an
        // ERROR event with a 410 Status, then the end of the stream.
        let e = status(410, "Expired", &format!("too old resource version: {from} (compacted)"));
        write_chunk(&mut conn, &event_line("ERROR", &e.to_string())).await?;
        conn.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    for line in replay {
        write_chunk(&mut conn, &line).await?;
    }
    if initial_events {
        // Many events per chunk: the objects are sent as fast as the
        // client reads them.
        let mut chunk = String::with_capacity(INITIAL_CHUNK + 4096);
        for obj in initial {
            chunk.push_str(&event_line("ADDED", &obj));
            if chunk.len() >= INITIAL_CHUNK {
                write_chunk(&mut conn, &chunk).await?;
                chunk.clear();
            }
        }
        if bookmarks {
            let b = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": current.to_string(),
                             "annotations": {INITIAL_EVENTS_END: "true"}}});
            chunk.push_str(&event_line("BOOKMARK", &b.to_string()));
        }
        if !chunk.is_empty() {
            write_chunk(&mut conn, &chunk).await?;
        }
    }
    // From 0 ("any") or after the initial events: only changes after now.
    let mut last_sent = from.max(if from == 0 || initial_events { current } else { 0 });
    let deadline = tokio::time::sleep(timeout);
    let mut deadline = std::pin::pin!(deadline);
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(Msg::Event { kind: k, rv, name, line }) if k == kind && rv > last_sent && matches(&name) => {
                    write_chunk(&mut conn, &line).await?;
                    last_sent = rv;
                }
                Ok(Msg::Event { .. }) => {}
                Ok(Msg::Bookmark { rv }) if bookmarks => {
                    let b = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}});
                    write_chunk(&mut conn, &event_line("BOOKMARK", &b.to_string())).await?;
                    last_sent = last_sent.max(rv);
                }
                Ok(Msg::Bookmark { .. }) => {}
                // Abrupt end: no final chunk, the client sees a broken body.
                Ok(Msg::DropAll) | Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            // The watch's own timeout: a clean end, the client resumes.
            _ = &mut deadline => {
                conn.write_all(b"0\r\n\r\n").await?;
                return Ok(());
            }
            // The client went away.
            r = conn.read(&mut probe) => {
                if matches!(r, Ok(0) | Err(_)) {
                    return Ok(());
                }
            }
        }
    }
}

/// Object builders in the shape the API server returns.
pub mod objects {
    use std::net::Ipv4Addr;

    use serde_json::{json, Value};

    /// A ClusterIP Service with ports (name, port, protocol).
    pub fn service(ns: &str, name: &str, vip: &str, ports: &[(&str, u16, &str)]) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": p}))
            .collect();
        json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
               "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ports": ports}})
    }

    /// An EndpointSlice of Service `svc` with ready endpoints `addrs`
    /// (strings, so a test can pass an invalid one).
    pub fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, u16, &str)], addrs: &[&str]) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
            .collect();
        let eps: Vec<Value> = addrs
            .iter()
            .map(|a| {
                json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false},
                            "nodeName": "node-1"})
            })
            .collect();
        json!({"metadata": {"name": name, "namespace": ns,
                            "labels": {"kubernetes.io/service-name": svc}},
               "addressType": "IPv4", "ports": ports, "endpoints": eps})
    }

    /// A Node with one internal address.
    pub fn node(name: &str, addr: Ipv4Addr) -> Value {
        json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
               "status": {"addresses": [{"type": "InternalIP", "address": addr.to_string()}],
                          "images": [{"names": ["registry.example/big:1"], "sizeBytes": 1}]}})
    }
}
