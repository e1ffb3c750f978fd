//! The connection workflow's I/O and the control API.
//!
//! What a connection's state should be is decided by the pure functions of
//! [`crate::approval`]; here their changes are written to the
//! [`ConnectionStore`] (a compare-and-swap per record, decided again from
//! fresh records when another writer got there first), appended to the
//! events file, and told to the engine at once (approve lets traffic
//! through, reject or disconnect ends the endpoint's flows and returns
//! their ports). Store errors answer as 404 (not found), 409 (changed
//! meanwhile, or not allowed), 503 (store unavailable) and 500 (corrupt).
//!
//! The API is HTTP/JSON on the unix socket `[control] socket` (mode 0600),
//! served by axum on the daemon's control runtime:
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/connections` | every connection record |
//! | `POST /v1/connections/{endpoint}/approve` | body `{"message": "..."}` (optional) |
//! | `POST /v1/connections/{endpoint}/reject` | likewise |
//! | `GET /v1/flows?endpoint=NAME` | live flows, optionally of one endpoint |
//! | `GET /v1/audit?endpoint=NAME&after=SEQ&limit=N` | the audit trail, a page at a time (entries after `SEQ`, at most `N`: default 100, at most 1,000) |
//! | `GET /v1/status` | version, uptime, config generation, counts |
//!
//! Bounded inputs: request bodies of at most 8 KiB, messages of at most
//! 1 KiB, URIs of at most 2 KiB; a connection that does not send a whole
//! request header within 5 s, or takes more than 30 s for an exchange, is
//! closed. A decision that changes nothing (approving what is approved) is
//! answered with the record as it is and not written again. Every error,
//! whatever produced it (a handler, a rejected extractor, an unknown path or
//! method, an oversized body), is answered as `{"error": "..."}`.

use crate::approval::{self, Decided, Refused};
use crate::dataplane::now_since;
use crate::store::{unix_now, AuditEntry, Change, Connection, ConnectionStore, Guard, StoreError};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use privlink_config::Config;
use privlink_core::{ConnectionState, Engine};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What the control API and the reload path share.
#[derive(Debug)]
pub struct Control {
    pub engine: Arc<Engine>,
    pub store: Arc<dyn ConnectionStore>,
    /// `[flow_logs] events_file`: each committed change is appended there
    /// as one JSON line.
    pub events_file: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Held from deciding connection states to telling the engine (a
    /// reload's reconcile through its `Engine::apply`, an API decision
    /// through `set_connection_state`), so the engine is told in the
    /// order the store was written.
    pub decisions: std::sync::Mutex<()>,
    pub config: ArcSwap<Config>,
    pub started: Instant,
    /// The engine clock's epoch.
    pub epoch: Instant,
    /// With `[store]`: whether etcd answers, since when, and the NAT
    /// addresses held (for `privlink status`).
    pub fleet: std::sync::Mutex<Option<FleetStatus>>,
}

/// A fleet host's view of its store, as `privlink status` shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FleetStatus {
    pub host: String,
    pub up: bool,
    /// Unix seconds of the last change of `up`.
    pub since: u64,
    pub held: crate::store::lease::Held,
}

impl Control {
    /// Records whether etcd answers (a change of `up` restarts `since`).
    pub fn set_store_up(&self, up: bool) {
        let mut f = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = f.as_mut() {
            if f.up != up {
                f.up = up;
                f.since = unix_now();
            }
        }
    }

    /// Records the NAT addresses held.
    pub fn set_held(&self, held: &crate::store::lease::Held) {
        if let Some(f) = self.fleet.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f.held = held.clone();
        }
    }
}

/// Times a batch is decided again from fresh records after a conflict.
const CONFLICT_RETRIES: usize = 3;

impl Control {
    /// Writes `changes` if `guards` and they are as read (see
    /// [`ConnectionStore::put_if_revision`]), then appends them to the
    /// events file.
    pub fn commit(&self, guards: &[Guard], changes: &[Change]) -> Result<(), StoreError> {
        self.store.put_if_revision(guards, changes)?;
        self.append_events(changes);
        Ok(())
    }

    /// Brings the store in line with `config` (new connections, visibility
    /// changes, endpoints gone; [`approval::plan`]) and returns every
    /// configured endpoint's state. The caller holds
    /// [`decisions`](Self::decisions) until the engine has the states.
    pub fn reconcile(&self, config: &Config) -> Result<HashMap<String, ConnectionState>, StoreError> {
        let mut tries = 0;
        loop {
            let stored = self.store.list()?;
            let plan = approval::plan(config, stored, unix_now(), &mut || privlink_core::ids::link_id(rand::random()));
            match self.commit(&plan.guards, &plan.changes) {
                Err(StoreError::Conflict(_)) if tries < CONFLICT_RETRIES => tries += 1,
                Err(e) => return Err(e),
                Ok(()) => {
                    for c in &plan.changes {
                        match c.conn.state {
                            ConnectionState::Rejected => {
                                let why = c.message.as_deref().unwrap_or("");
                                tracing::warn!(endpoint = %c.conn.endpoint, "{why}: connection rejected");
                            }
                            ConnectionState::Disconnected => {
                                tracing::info!(endpoint = %c.conn.endpoint, "connection disconnected");
                            }
                            _ => {}
                        }
                    }
                    return Ok(plan.states);
                }
            }
        }
    }

    /// Tells the engine `states` (what [`reconcile`](Self::reconcile)
    /// returned) for the endpoints it runs whose state differs, under the
    /// same hold of [`decisions`](Self::decisions) as the reconcile.
    pub fn set_states(&self, states: &HashMap<String, ConnectionState>, now: privlink_core::Now) {
        let snap = self.engine.snapshot();
        for e in &snap.endpoints {
            if let Some(&want) = states.get(&e.shared.name) {
                if e.shared.state() != want {
                    self.engine.set_connection_state(&e.shared.name, want, now);
                }
            }
        }
    }

    /// Every connection's link id, by endpoint.
    pub fn link_ids(&self) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self.store.list()?.into_iter().map(|c| (c.endpoint, c.link_id)).collect())
    }

    /// Appends every later change to `path` as JSON lines (`None`: stop).
    pub fn set_events_file(&self, path: Option<std::path::PathBuf>) {
        *self.events_file.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }

    /// Connection changes as JSON lines (approve, reject, disconnect, ...);
    /// a file that cannot be written is logged, never fatal.
    fn append_events(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let Some(path) = self.events_file.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mut text = String::new();
        for c in changes {
            let line = serde_json::json!({
                "time": c.conn.updated,
                "event": "connection_state",
                "endpoint": c.conn.endpoint,
                "service": c.conn.service,
                "network": c.conn.network,
                "tenant": c.conn.tenant,
                "link_id": c.conn.link_id,
                "from": c.from.map(ConnectionState::as_str),
                "to": c.conn.state.as_str(),
                "by": c.by,
                "message": c.message,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = r {
            tracing::warn!("cannot append connection events to {}: {e}", path.display());
        }
    }
}

/// An API error: a status and a one-line message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        let status = match e {
            Refused::NoEndpoint(_) => StatusCode::NOT_FOUND,
            Refused::NotVisible { .. } => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}

#[derive(Debug, Deserialize, Default)]
struct Decision {
    message: Option<String>,
}

/// Longest decision message kept.
pub const MAX_MESSAGE: usize = 1024;
/// Largest request body read.
const MAX_BODY: usize = 8 * 1024;
/// Longest request URI served.
const MAX_URI: usize = 2048;
/// How long a connection may take to send a request's header.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one connection may last.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct AuditQuery {
    endpoint: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EndpointFilter {
    endpoint: Option<String>,
}

/// One live flow, as `privlink flows` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlowView {
    pub protocol: String,
    pub endpoint: String,
    pub network: String,
    pub consumer: String,
    pub endpoint_addr: String,
    pub nat: String,
    pub backend: String,
    pub state: String,
    pub age_secs: u32,
    pub idle_secs: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Runs `f` (which may wait on the store) off the control runtime when the
/// store is shared (etcd: up to its request timeout), so `/metrics` and
/// other requests are not held up; in place for the local store.
async fn store_call<T: Send + 'static>(
    c: &Arc<Control>,
    f: impl FnOnce(&Control) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if !c.store.shared() {
        return f(c);
    }
    let c = c.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("store call failed: {e}")))?
}

async fn list(State(c): State<Arc<Control>>) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let mut all = store_call(&c, |c| Ok(c.store.list()?)).await?;
    all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    let config = c.config.load();
    Ok(Json(all.iter().map(|x| shown(&config, x)).collect()))
}

/// A connection as the API and `privlink connections` show it: the stored
/// record, with `link_id` in the form its service's PROXY TLV carries (a
/// string: what a backend logs, see [`privlink_core::proxy::link_id_shown`])
/// and `link_id_form` naming that form (`azure`, `aws`, `gcp`, `none`),
/// and `dns_names`, the endpoint's names in its network's resolver (none
/// when the network has no `dns`).
pub fn shown(config: &privlink_config::Config, conn: &Connection) -> serde_json::Value {
    let tlv = config.service(&conn.service).and_then(|s| s.proxy);
    let mut v = serde_json::to_value(conn).unwrap_or_default();
    v["link_id"] = privlink_core::proxy::link_id_shown(tlv, conn.link_id).into();
    v["link_id_form"] = tlv.unwrap_or(privlink_core::ProxyTlv::None).as_str().into();
    // The names its network's resolver answers with its address while
    // approved (docs/DNS.md).
    // (None where the network has no resolver: nothing answers them.)
    let names = config
        .endpoints
        .iter()
        .find(|e| e.name == conn.endpoint)
        .filter(|e| config.network(&e.network).is_some_and(|n| n.dns.is_some()))
        .map(|e| config.dns_names(e));
    v["dns_names"] = names.unwrap_or_default().into();
    v
}

fn decide(c: &Control, endpoint: &str, to: ConnectionState, body: &[u8]) -> Result<Connection, ApiError> {
    let decision: Decision = if body.iter().all(u8::is_ascii_whitespace) {
        Decision::default()
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?
    };
    if decision.message.as_ref().is_some_and(|m| m.len() > MAX_MESSAGE) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("message longer than {MAX_MESSAGE} bytes")));
    }
    let config = c.config.load();
    if !config.endpoints.iter().any(|e| e.name == endpoint) {
        if c.store.shared() {
            return decide_remote(c, &config, endpoint, to, decision.message);
        }
        return Err(Refused::NoEndpoint(endpoint.to_string()).into());
    }
    // Decided from the record as read, written only if it is still that;
    // decided again from a fresh read when another writer got there first.
    let _decisions = c.decisions.lock().unwrap_or_else(|e| e.into_inner());
    let mut tries = 0;
    let (stored, updated) = loop {
        let stored = c.store.get(endpoint)?;
        let from = stored.state;
        match approval::decide(&config, endpoint, stored, to, decision.message.clone(), unix_now())? {
            Decided::Unchanged(same) => return Ok(same),
            Decided::Change(change) => match c.commit(&[], std::slice::from_ref(&change)) {
                Err(StoreError::Conflict(_)) if tries < CONFLICT_RETRIES => tries += 1,
                Err(e) => return Err(e.into()),
                // Durable first, then the dataplane: what we answer is what
                // a restart sees.
                Ok(()) => break (from, change.conn),
            },
        }
    };
    c.engine.set_connection_state(endpoint, to, now_since(c.epoch));
    // Operator text goes into the log escaped: a newline or an escape
    // sequence in a message cannot forge a log line.
    let message: String = decision.message.as_deref().unwrap_or("").escape_default().collect();
    tracing::info!(endpoint, from = %stored, to = %to, message = %message, "connection changed by operator");
    Ok(updated)
}

/// A decision on another fleet host's endpoint: written to its record in
/// the shared store (compare-and-swap on its revision); that host's watch
/// applies it. The service (shared) says whether its tenant may see it.
fn decide_remote(
    c: &Control,
    config: &Config,
    endpoint: &str,
    to: ConnectionState,
    message: Option<String>,
) -> Result<Connection, ApiError> {
    let _decisions = c.decisions.lock().unwrap_or_else(|e| e.into_inner());
    let mut tries = 0;
    loop {
        let stored = match c.store.get(endpoint) {
            Err(StoreError::NotFound(_)) => return Err(Refused::NoEndpoint(endpoint.to_string()).into()),
            r => r?,
        };
        let visible = config.service(&stored.service).is_some_and(|s| s.visible_to(&stored.tenant));
        if to == ConnectionState::Approved && !visible {
            return Err(Refused::NotVisible { tenant: stored.tenant.clone(), service: stored.service.clone() }.into());
        }
        if stored.state == ConnectionState::Disconnected {
            // Removed from its host's config: nothing to decide.
            return Err(Refused::NoEndpoint(endpoint.to_string()).into());
        }
        if stored.state == to {
            return Ok(stored);
        }
        let from = stored.state;
        let change = approval::operator_change(stored, to, message.clone(), unix_now());
        match c.commit(&[], std::slice::from_ref(&change)) {
            Err(StoreError::Conflict(_)) if tries < CONFLICT_RETRIES => tries += 1,
            Err(e) => return Err(e.into()),
            Ok(()) => {
                let message: String = message.as_deref().unwrap_or("").escape_default().collect();
                tracing::info!(endpoint, from = %from, to = %to, message = %message, "connection of another host's endpoint changed by operator");
                return Ok(change.conn);
            }
        }
    }
}

async fn approve(
    State(c): State<Arc<Control>>,
    UrlPath(endpoint): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let x = store_call(&c, move |c| decide(c, &endpoint, ConnectionState::Approved, &body)).await?;
    Ok(Json(shown(&c.config.load(), &x)))
}

async fn reject(
    State(c): State<Arc<Control>>,
    UrlPath(endpoint): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let x = store_call(&c, move |c| decide(c, &endpoint, ConnectionState::Rejected, &body)).await?;
    Ok(Json(shown(&c.config.load(), &x)))
}

async fn flows(State(c): State<Arc<Control>>, Query(q): Query<EndpointFilter>) -> Json<Vec<FlowView>> {
    let snap = c.engine.snapshot();
    let names: HashMap<u16, String> = snap.networks_by_id().map(|(id, n)| (id.0, n.name.clone())).collect();
    let list = c.engine.flow_list(q.endpoint.as_deref(), now_since(c.epoch));
    Json(
        list.into_iter()
            .map(|f| FlowView {
                protocol: f.protocol.as_str().to_string(),
                endpoint: f.endpoint,
                network: names.get(&f.network.0).cloned().unwrap_or_default(),
                consumer: f.consumer.to_string(),
                endpoint_addr: f.endpoint_addr.to_string(),
                nat: f.nat.to_string(),
                backend: f.backend.to_string(),
                state: f.state.to_string(),
                age_secs: f.age,
                idle_secs: f.idle,
                bytes_in: f.bytes_in,
                bytes_out: f.bytes_out,
            })
            .collect(),
    )
}

async fn audit(State(c): State<Arc<Control>>, Query(q): Query<AuditQuery>) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(c.store.audit(q.endpoint.as_deref(), q.after.unwrap_or(0), limit)?))
}

async fn status(State(c): State<Arc<Control>>) -> Result<Json<serde_json::Value>, ApiError> {
    let snap = c.engine.snapshot();
    let config = c.config.load();
    let mut by_state: HashMap<String, usize> = HashMap::new();
    for conn in store_call(&c, |c| Ok(c.store.list()?)).await? {
        *by_state.entry(conn.state.as_str().to_string()).or_default() += 1;
    }
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": c.started.elapsed().as_secs(),
        "config": config.path.display().to_string(),
        "config_generation": snap.generation,
        "networks": config.networks.len(),
        "services": config.services.len(),
        "endpoints": config.endpoints.len(),
        "flows_active": c.engine.flows().len(),
        "max_flows": c.engine.flows().capacity(),
        "connections": by_state,
        "store": *c.fleet.lock().unwrap_or_else(|e| e.into_inner()),
        "backends": c.engine.backends().iter().map(|b| serde_json::json!({
            "service": b.service,
            "backend": b.backend.to_string(),
            "up": b.up,
            "flows_created": b.flows_created,
        })).collect::<Vec<_>>(),
    })))
}

pub fn router(c: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/connections", get(list))
        .route("/v1/connections/{endpoint}/approve", post(approve))
        .route("/v1/connections/{endpoint}/reject", post(reject))
        .route("/v1/flows", get(flows))
        .route("/v1/audit", get(audit))
        .route("/v1/status", get(status))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API path".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path".into())
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_request(limit_uri))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(c)
}

/// Refuses a URI longer than [`MAX_URI`].
async fn limit_uri(req: axum::extract::Request) -> Result<axum::extract::Request, ApiError> {
    let len = req.uri().path().len() + req.uri().query().map_or(0, str::len);
    if len > MAX_URI {
        return Err(ApiError(StatusCode::URI_TOO_LONG, format!("request URI longer than {MAX_URI} bytes")));
    }
    Ok(req)
}

/// Turns every error response that is not JSON already (axum's extractor
/// rejections, an oversized body) into `{"error": "..."}`.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return res;
    }
    let body = axum::body::to_bytes(res.into_body(), MAX_BODY).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    ApiError(status, message).into_response()
}

/// Serves the API on `listener`: HTTP/1 with a header read timeout, each
/// connection bounded in time, so half-open or idle clients cannot pile up.
pub async fn serve(listener: tokio::net::UnixListener, router: Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("control API: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// Which file the control socket is, so that the daemon removes its own
/// socket on stop and nothing else.
#[derive(Debug)]
pub struct SocketFile {
    path: std::path::PathBuf,
    /// (device, inode) of the socket file this daemon created.
    id: (u64, u64),
}

impl SocketFile {
    /// Removes the socket file if it is still the one this daemon made.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the control socket, mode 0600 from the moment it exists (bound
/// under a umask of 0177, never chmod'ed after), replacing only a stale
/// socket: a live one means another daemon, anything that is not a socket
/// is left alone and refused.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            anyhow::bail!("{} exists and is not a socket; refusing to replace it", path.display())
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another privlink is already serving {}", path.display());
            }
            // A stale socket of a daemon that did not stop cleanly.
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Err(_) => {}
    }
    // SAFETY: umask(2) only swaps the process's file mode mask; this runs
    // on the control thread before anything else creates files.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("cannot bind {}", path.display()))?;
    let m = std::fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok((listener, SocketFile { path: path.to_path_buf(), id: (m.dev(), m.ino()) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Endpoint `ea` of contoso, visible to everyone.
    fn config() -> Config {
        crate::approval::tests::cfg(r#"["*"]"#, false)
    }

    /// A store whose reads find one pending record of `ea` (or fail with
    /// `read`) and whose writes fail with `write`.
    #[derive(Debug)]
    struct Failing {
        read: Option<StoreError>,
        write: StoreError,
        writes: AtomicUsize,
    }

    impl ConnectionStore for Failing {
        fn get(&self, endpoint: &str) -> Result<Connection, StoreError> {
            if let Some(e) = &self.read {
                return Err(e.clone());
            }
            if endpoint != "ea" {
                return Err(StoreError::NotFound(endpoint.into()));
            }
            Ok(Connection {
                endpoint: "ea".into(),
                service: "s".into(),
                network: "na".into(),
                tenant: "contoso".into(),
                state: ConnectionState::Pending,
                request_message: None,
                response_message: None,
                created: 1,
                updated: 1,
                decided_by: "config".into(),
                link_id: 3,
                revision: 5,
            })
        }
        fn list(&self) -> Result<Vec<Connection>, StoreError> {
            Ok(vec![self.get("ea")?])
        }
        fn put_if_revision(&self, _: &[Guard], _: &[Change]) -> Result<(), StoreError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Err(self.write.clone())
        }
        fn audit(&self, _: Option<&str>, _: u64, _: usize) -> Result<Vec<AuditEntry>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn control(read: Option<StoreError>, write: StoreError) -> Control {
        control_on(Arc::new(Failing { read, write, writes: AtomicUsize::new(0) }))
    }

    fn control_on(store: Arc<Failing>) -> Control {
        Control {
            engine: Engine::new(privlink_core::Settings::default()),
            store,
            events_file: std::sync::Mutex::new(None),
            decisions: std::sync::Mutex::new(()),
            config: ArcSwap::from_pointee(config()),
            started: Instant::now(),
            epoch: Instant::now(),
            fleet: std::sync::Mutex::new(None),
        }
    }

    fn status(r: Result<Connection, ApiError>) -> StatusCode {
        r.expect_err("refused").0
    }

    #[test]
    fn store_errors_answer_as_404_409_503_and_500() {
        let busy = StoreError::Unavailable("handed over".into());
        let c = control(Some(busy.clone()), busy.clone());
        assert_eq!(status(decide(&c, "ea", ConnectionState::Approved, b"")), StatusCode::SERVICE_UNAVAILABLE);
        let c = control(None, busy);
        assert_eq!(status(decide(&c, "ea", ConnectionState::Approved, b"")), StatusCode::SERVICE_UNAVAILABLE);
        let c = control(Some(StoreError::NotFound("ea".into())), StoreError::Corrupt("x".into()));
        assert_eq!(status(decide(&c, "ea", ConnectionState::Approved, b"")), StatusCode::NOT_FOUND);
        let c = control(Some(StoreError::Corrupt("bad json".into())), StoreError::Corrupt("x".into()));
        assert_eq!(status(decide(&c, "ea", ConnectionState::Approved, b"")), StatusCode::INTERNAL_SERVER_ERROR);
        // Not configured: 404 without asking the store.
        let c = control(None, StoreError::Corrupt("x".into()));
        assert_eq!(status(decide(&c, "nope", ConnectionState::Approved, b"")), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_decision_that_keeps_losing_the_race_answers_409_after_deciding_again() {
        let f = Arc::new(Failing { read: None, write: StoreError::Conflict("ea".into()), writes: AtomicUsize::new(0) });
        let c = control_on(f.clone());
        let err = decide(&c, "ea", ConnectionState::Approved, b"").expect_err("conflict");
        assert_eq!(err.0, StatusCode::CONFLICT, "{}", err.1);
        assert!(err.1.contains("changed meanwhile"), "{}", err.1);
        assert_eq!(f.writes.load(Ordering::Relaxed), CONFLICT_RETRIES + 1);
    }

    #[test]
    fn the_engine_ends_in_the_state_the_store_holds_under_concurrent_reloads_and_decisions() {
        // A reload (reconcile, then the states to the engine) racing an
        // operator flipping one connection: whatever interleaving, once
        // both stop the engine runs what the store holds.
        let dir = std::env::temp_dir().join(format!("privlink-decisions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = config();
        let c = Arc::new(Control {
            engine: Engine::new(privlink_core::Settings::default()),
            store: Arc::new(crate::store::RedbStore::open(&dir).expect("store")),
            events_file: std::sync::Mutex::new(None),
            decisions: std::sync::Mutex::new(()),
            config: ArcSwap::from_pointee(config.clone()),
            started: Instant::now(),
            epoch: Instant::now(),
            fleet: std::sync::Mutex::new(None),
        });
        let ids = config
            .networks
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), (privlink_core::NetworkId(i as u16), n.clone())))
            .collect();
        let states = c.reconcile(&config).expect("reconcile");
        let desired = crate::daemon::to_desired(&config, &ids, &states, &c.link_ids().expect("links"));
        c.engine.apply(&desired, privlink_core::Now(0)).expect("apply");
        let engine_state = |c: &Control| {
            let snap = c.engine.snapshot();
            snap.endpoints.iter().find(|e| e.shared.name == "ea").map(|e| e.shared.state())
        };
        for round in 0..20 {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reloads = {
                let (c, config, done) = (c.clone(), config.clone(), done.clone());
                std::thread::spawn(move || {
                    // Until the operator stops: the reload in flight then
                    // may have read before the last decision.
                    while !done.load(Ordering::Relaxed) {
                        let _d = c.decisions.lock().unwrap_or_else(|e| e.into_inner());
                        let states = c.reconcile(&config).expect("reconcile");
                        // A reload's engine apply and device work take
                        // milliseconds between the two.
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        c.set_states(&states, privlink_core::Now(0));
                    }
                })
            };
            for i in 0..10 {
                let to = if (round + i) % 2 == 0 { ConnectionState::Rejected } else { ConnectionState::Approved };
                decide(&c, "ea", to, b"").expect("decided");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            done.store(true, Ordering::Relaxed);
            reloads.join().expect("reloads");
            let stored = c.store.get("ea").expect("record").state;
            assert_eq!(engine_state(&c), Some(stored), "round {round}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reconcile_retries_a_conflict_then_reports_it() {
        let c = control(None, StoreError::Conflict("ea".into()));
        assert_eq!(c.reconcile(&c.config.load()), Err(StoreError::Conflict("ea".into())));
    }
}
