//! The connection workflow and the control API.
//!
//! Connection states follow Private Link: an endpoint whose tenant is not in
//! its service's `visibility` is `rejected` and never connects; a visible
//! tenant in `auto_approve` is `approved` at once; any other starts
//! `pending` and carries nothing until an operator approves it. An endpoint
//! that leaves the config (with or without its service) becomes
//! `disconnected`. States live in the [`Store`]; the engine is told of every
//! change at once (approve lets traffic through, reject or disconnect ends
//! the endpoint's flows and returns their ports).
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

use crate::dataplane::now_since;
use crate::store::{unix_now, AuditEntry, Change, Connection, Store};
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
    pub store: Store,
    pub config: ArcSwap<Config>,
    pub started: Instant,
    /// The engine clock's epoch.
    pub epoch: Instant,
}

/// The state an endpoint's connection should have under `config`, given
/// what the store remembers.
fn desired_state(config: &Config, ep: &privlink_config::Endpoint, stored: Option<&Connection>) -> ConnectionState {
    let (Some(net), Some(svc)) = (config.network(&ep.network), config.service(&ep.service)) else {
        return ConnectionState::Disconnected;
    };
    if !svc.visible_to(&net.tenant) {
        return ConnectionState::Rejected;
    }
    match stored {
        // A pending connection of a tenant that auto-approval now covers is
        // approved, as Azure approves pending connections when a
        // subscription is added to auto-approval.
        Some(c) if c.state == "pending" && svc.auto_approves(&net.tenant) => ConnectionState::Approved,
        // The operator's word stands while the endpoint is the same link
        // (a rejection the config made for visibility is re-evaluated).
        Some(c)
            if c.service == ep.service
                && c.tenant == net.tenant
                && c.state != "disconnected"
                && !(c.state == "rejected" && c.decided_by == "config") =>
        {
            ConnectionState::parse(&c.state).unwrap_or(ConnectionState::Pending)
        }
        _ if svc.auto_approves(&net.tenant) => ConnectionState::Approved,
        _ => ConnectionState::Pending,
    }
}

/// Brings the store in line with `config` (new connections, visibility
/// changes, endpoints gone) and returns every configured endpoint's state.
pub fn reconcile(store: &Store, config: &Config) -> Result<HashMap<String, ConnectionState>> {
    let now = unix_now();
    let mut states = HashMap::new();
    let mut all: HashMap<String, Connection> = store.all()?.into_iter().map(|c| (c.endpoint.clone(), c)).collect();
    let mut changes = Vec::new();
    for ep in &config.endpoints {
        let stored = all.remove(&ep.name);
        let state = desired_state(config, ep, stored.as_ref());
        let tenant = config.network(&ep.network).map(|n| n.tenant.clone()).unwrap_or_default();
        // A connection keeps its link id for its life; a new one (or a
        // record from before link ids) gets a fresh one.
        let link_id = stored
            .as_ref()
            .filter(|c| c.state != "disconnected" && c.link_id != 0)
            .map_or_else(|| rand::random::<u64>() >> 1 | 1, |c| c.link_id);
        let same = stored.as_ref().is_some_and(|c| {
            c.state == state.as_str()
                && c.service == ep.service
                && c.network == ep.network
                && c.tenant == tenant
                && c.link_id == link_id
        });
        if !same {
            let why = match state {
                ConnectionState::Rejected => {
                    format!("tenant {tenant} is not in the visibility of service {}", ep.service)
                }
                ConnectionState::Approved => "auto-approved".to_string(),
                _ => "connection requested".to_string(),
            };
            if state == ConnectionState::Rejected {
                tracing::warn!(endpoint = %ep.name, "{why}: connection rejected");
            }
            let c = Connection {
                endpoint: ep.name.clone(),
                service: ep.service.clone(),
                network: ep.network.clone(),
                tenant,
                state: state.as_str().to_string(),
                request_message: None,
                response_message: Some(why.clone()),
                created: stored.as_ref().filter(|c| c.state != "disconnected").map_or(now, |c| c.created),
                updated: now,
                decided_by: "config".into(),
                link_id,
            };
            changes.push(Change {
                conn: c,
                from: stored.as_ref().map(|c| c.state.clone()),
                message: Some(why),
                by: "config".into(),
            });
        }
        states.insert(ep.name.clone(), state);
    }
    // What is left of the store is no longer configured.
    for c in all.into_values() {
        if c.state != "disconnected" && !states.contains_key(&c.endpoint) {
            let why = "endpoint or service removed from the config";
            let gone = Connection {
                state: "disconnected".into(),
                response_message: Some(why.into()),
                updated: now,
                decided_by: "config".into(),
                ..c.clone()
            };
            tracing::info!(endpoint = %c.endpoint, "connection disconnected");
            changes.push(Change { conn: gone, from: Some(c.state), message: Some(why.into()), by: "config".into() });
        }
    }
    store.put_all(&changes)?;
    Ok(states)
}

/// Every connection's link id, by endpoint.
pub fn link_ids(store: &Store) -> Result<HashMap<String, u64>> {
    Ok(store.all()?.into_iter().map(|c| (c.endpoint, c.link_id)).collect())
}

/// An API error: a status and a one-line message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
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

async fn list(State(c): State<Arc<Control>>) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let mut all = c.store.all()?;
    all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    let config = c.config.load();
    Ok(Json(all.iter().map(|x| shown(&config, x)).collect()))
}

/// A connection as the API and `privlink connections` show it: the stored
/// record, with `link_id` in the form its service's PROXY TLV carries (a
/// string: what a backend logs, see [`privlink_core::proxy::link_id_shown`])
/// and `link_id_form` naming that form (`azure`, `aws`, `gcp`, `none`).
pub fn shown(config: &privlink_config::Config, conn: &Connection) -> serde_json::Value {
    let tlv = config.service(&conn.service).and_then(|s| s.proxy);
    let mut v = serde_json::to_value(conn).unwrap_or_default();
    v["link_id"] = privlink_core::proxy::link_id_shown(tlv, conn.link_id).into();
    v["link_id_form"] = tlv.unwrap_or(privlink_core::ProxyTlv::None).as_str().into();
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
    let Some(ep) = config.endpoints.iter().find(|e| e.name == endpoint) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no endpoint `{endpoint}` in the running config")));
    };
    let Some(stored) = c.store.get(endpoint)? else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no connection for endpoint `{endpoint}`")));
    };
    let (net, svc) = (config.network(&ep.network), config.service(&ep.service));
    if to == ConnectionState::Approved && !net.zip(svc).is_some_and(|(n, s)| s.visible_to(&n.tenant)) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "tenant {} is not in the visibility of service {}: it cannot be approved",
                stored.tenant, ep.service
            ),
        ));
    }
    if stored.state == to.as_str() {
        // Nothing changes: nothing is written (the audit records changes).
        return Ok(stored);
    }
    let updated = Connection {
        state: to.as_str().to_string(),
        response_message: decision.message.clone(),
        updated: unix_now(),
        decided_by: "operator".into(),
        ..stored.clone()
    };
    // Durable first, then the dataplane: what we answer is what a restart sees.
    c.store.put(&updated, Some(&stored.state), decision.message.as_deref(), "operator")?;
    c.engine.set_connection_state(endpoint, to, now_since(c.epoch));
    // Operator text goes into the log escaped: a newline or an escape
    // sequence in a message cannot forge a log line.
    let message: String = decision.message.as_deref().unwrap_or("").escape_default().collect();
    tracing::info!(endpoint, from = %stored.state, to = %to, message = %message, "connection changed by operator");
    Ok(updated)
}

async fn approve(
    State(c): State<Arc<Control>>,
    UrlPath(endpoint): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    decide(&c, &endpoint, ConnectionState::Approved, &body).map(|x| Json(shown(&c.config.load(), &x)))
}

async fn reject(
    State(c): State<Arc<Control>>,
    UrlPath(endpoint): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    decide(&c, &endpoint, ConnectionState::Rejected, &body).map(|x| Json(shown(&c.config.load(), &x)))
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
                consumer: format!("{}:{}", f.consumer.0, f.consumer.1),
                endpoint_addr: format!("{}:{}", f.endpoint_addr.0, f.endpoint_addr.1),
                nat: format!("{}:{}", f.nat.0, f.nat.1),
                backend: format!("{}:{}", f.backend.0, f.backend.1),
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
    Ok(Json(c.store.audit_page(q.endpoint.as_deref(), q.after.unwrap_or(0), limit)?))
}

async fn status(State(c): State<Arc<Control>>) -> Result<Json<serde_json::Value>, ApiError> {
    let snap = c.engine.snapshot();
    let config = c.config.load();
    let mut by_state: HashMap<String, usize> = HashMap::new();
    for conn in c.store.all()? {
        *by_state.entry(conn.state).or_default() += 1;
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

    const BASE: &str = r#"
[provider]
tun = "p0"
[[network]]
name = "na"
tenant = "contoso"
tun = "a0"
[[network]]
name = "nb"
tenant = "fabrikam"
tun = "b0"
[[service]]
name = "s"
nat_ips = ["192.168.100.1"]
backends = ["192.168.50.1"]
ports = [{ protocol = "tcp", port = 80 }]
visibility = VIS
auto_approve = ["contoso"]
[[endpoint]]
name = "ea"
network = "na"
ip = "10.0.0.5"
service = "s"
"#;
    const EB: &str = "[[endpoint]]\nname = \"eb\"\nnetwork = \"nb\"\nip = \"10.0.0.5\"\nservice = \"s\"\n";

    fn cfg(vis: &str, with_b: bool) -> Config {
        let text = BASE.replace("VIS", vis) + if with_b { EB } else { "" };
        Config::parse(&text, "t.toml").expect("valid")
    }

    fn store(name: &str) -> (Store, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("privlink-reconcile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        (Store::open(&d).expect("store"), d)
    }

    #[test]
    fn states_follow_visibility_auto_approval_and_removal() {
        let (s, dir) = store("flow");
        let st = reconcile(&s, &cfg(r#"["*"]"#, true)).expect("reconcile");
        assert_eq!(st["ea"], ConnectionState::Approved);
        assert_eq!(st["eb"], ConnectionState::Pending);
        // An operator's approval is kept across reconciles.
        let mut b = s.get("eb").expect("get").expect("eb");
        b.state = "approved".into();
        b.decided_by = "operator".into();
        s.put(&b, Some("pending"), Some("ok"), "operator").expect("put");
        assert_eq!(reconcile(&s, &cfg(r#"["*"]"#, true)).expect("r")["eb"], ConnectionState::Approved);
        // Visibility narrows: rejected by the config.
        assert_eq!(reconcile(&s, &cfg(r#"["contoso"]"#, true)).expect("r")["eb"], ConnectionState::Rejected);
        // Visibility widens again: re-evaluated (fabrikam is not auto-approved).
        assert_eq!(reconcile(&s, &cfg(r#"["*"]"#, true)).expect("r")["eb"], ConnectionState::Pending);
        // The endpoint leaves the config: disconnected, and the record stays.
        let st = reconcile(&s, &cfg(r#"["*"]"#, false)).expect("r");
        assert!(!st.contains_key("eb"));
        assert_eq!(s.get("eb").expect("get").map(|c| c.state), Some("disconnected".into()));
        let trail: Vec<String> = s.audit(Some("eb")).expect("audit").into_iter().map(|e| e.to).collect();
        assert_eq!(trail, ["pending", "approved", "rejected", "pending", "disconnected"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn widening_auto_approve_approves_pending_connections_but_not_rejected_ones() {
        let (s, dir) = store("widen");
        let st = reconcile(&s, &cfg(r#"["*"]"#, true)).expect("reconcile");
        assert_eq!(st["eb"], ConnectionState::Pending);
        let widened = || {
            let text = BASE
                .replace("VIS", r#"["*"]"#)
                .replace(r#"auto_approve = ["contoso"]"#, r#"auto_approve = ["contoso", "fabrikam"]"#)
                + EB;
            Config::parse(&text, "t.toml").expect("valid")
        };
        // As Azure does when a subscription joins auto-approval: pending
        // connections of that tenant are approved.
        let st = reconcile(&s, &widened()).expect("reconcile");
        assert_eq!(st["eb"], ConnectionState::Approved);
        assert_eq!(s.get("eb").expect("get").map(|c| c.state), Some("approved".into()));
        // An operator's rejection stands.
        let mut b = s.get("eb").expect("get").expect("eb");
        b.state = "rejected".into();
        b.decided_by = "operator".into();
        s.put(&b, Some("approved"), Some("no"), "operator").expect("put");
        assert_eq!(reconcile(&s, &widened()).expect("r")["eb"], ConnectionState::Rejected);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
