//! The HTTP API under `/v1/` (see docs/api.md).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use flotilla_core::record::unix_ms;
use flotilla_core::{
    validate_instance_id, validate_node_name, validate_service_name, InstanceRecord, InstanceSpec,
    NodeRecord, RECORD_VERSION,
};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;

use crate::catalog::CheckinRecord;
use crate::duty::{remove_instance, remove_node};
use crate::keys;
use crate::state::Shared;

/// Header carrying the catalog index of a response (for the next blocking query).
pub const INDEX_HEADER: &str = "x-flotilla-index";
/// Longest time a write waits for its own change to reach this server's catalog.
const APPLY_WAIT: Duration = Duration::from_secs(5);

pub use flotilla_http::{parse_json, ApiError, JsonBody};

/// A store error: 503, with `Retry-After` when the store refused the write as busy
/// (nothing was written; the client backs off and sends it again).
pub(crate) fn store_error(e: flotilla_store::StoreError) -> ApiError {
    let busy = matches!(e, flotilla_store::StoreError::Busy { .. });
    let err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}"));
    if busy {
        err.retry_after(1)
    } else {
        err
    }
}

/// Builds the router with auth, body limit and metrics layers; `more` (the stacks API)
/// is served under the same auth and limits. Taking it as an argument keeps this file
/// from naming the files that build on it.
pub fn router(shared: Arc<Shared>, more: Router<Arc<Shared>>) -> Router {
    let v1 = Router::new()
        .route("/v1/instances", get(list_instances))
        .route(
            "/v1/instances/{id}",
            put(put_instance).get(get_instance).delete(delete_instance),
        )
        .route("/v1/instances/{id}/renew", put(renew_instance))
        .route("/v1/instances/{id}/load", put(put_load))
        .route("/v1/instances/{id}/health", put(report_health))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/v1/services/{name}/weights", put(put_weights))
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{name}",
            put(put_node).get(get_node).delete(delete_node),
        )
        .route("/v1/nodes/{name}/renew", put(renew_node))
        .route("/v1/events", get(events))
        .merge(more)
        .route("/v1/status", get(status))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            admit_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(
            shared.config.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.metrics.http.clone(),
            flotilla_http::metrics::record,
        ))
        .with_state(shared)
}

/// Admission control for writes: past `max_inflight_writes` being worked on, a write is
/// refused at once (`503`, `Retry-After: 1`, nothing written). Lease and TTL renewals
/// always pass: refusing them under load would expire healthy nodes.
async fn admit_writes(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    use std::sync::atomic::Ordering;
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    if !write || req.uri().path().ends_with("/renew") {
        return next.run(req).await;
    }
    let before = shared.writes_in_flight.fetch_add(1, Ordering::Relaxed);
    let _done = scopeguard(|| {
        shared.writes_in_flight.fetch_sub(1, Ordering::Relaxed);
    });
    if before >= shared.config.max_inflight_writes {
        shared.metrics.busy_writes.inc();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("server busy: {before} writes in flight; retry shortly"),
        )
        .retry_after(1)
        .into_response();
    }
    next.run(req).await
}

/// Who made a request, as the auth layer found; in every authorised request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Presented the cluster token: may do everything.
    Admin,
    /// Presented node `N`'s certificate and no token: may speak for node `N` only.
    Node(String),
    /// Presented a scoped token (`flotilla token create`): may do what its role allows.
    Token(flotilla_core::token::TokenView),
    /// Presented nothing (open reads, the CA certificate).
    Anonymous,
}

impl Caller {
    /// Refuses (403) anyone but the cluster token's holder: `doing` says what needs it
    /// ("writing secrets", …). For what no scoped role may do at all.
    pub(crate) fn admin_only(&self, doing: &str) -> Result<(), ApiError> {
        if *self == Caller::Admin {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("{doing} needs an admin token"),
            ))
        }
    }
}

async fn authorize(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let given = flotilla_core::auth::bearer(
        req.headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let identity = req
        .extensions()
        .get::<flotilla_tls::Peer>()
        .and_then(|p| p.identity.clone());
    let caller = match (given, identity) {
        (Some(t), _)
            if flotilla_core::auth::token_matches(t.as_bytes(), shared.token.as_bytes()) =>
        {
            Caller::Admin
        }
        (Some(t), _) => match scoped_token(&shared, t) {
            Some(view) if view.role == flotilla_core::token::Role::Admin => Caller::Admin,
            Some(view) => Caller::Token(view),
            None => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "wrong or revoked bearer token")
                    .into_response()
            }
        },
        (None, Some(flotilla_tls::PeerIdentity::Node(n))) => Caller::Node(n),
        // An lb's certificate does what the lb token it joined with may do, for as long
        // as that token exists, and reports under its own name only.
        (None, Some(flotilla_tls::PeerIdentity::Lb { name, token })) => {
            let view = shared
                .catalog()
                .token(&token)
                .map(flotilla_core::token::TokenView::from);
            let Some(view) = view else {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("lb {name:?}'s certificate was issued for token {token}, which is revoked: join again with a valid lb token"),
                )
                .into_response();
            };
            if let Err(e) = lb_cert_may(&name, req.method(), req.uri().path()) {
                shared.metrics.refused_token_requests.inc();
                return e.into_response();
            }
            if req.method() == Method::POST && req.uri().path() == "/v1/certs/renew" {
                req.extensions_mut().insert(Caller::Token(view));
                return next.run(req).await;
            }
            Caller::Token(view)
        }
        // The CA certificate is public: a joining agent fetches it before it trusts the
        // connection enough to send its token.
        (None, _) if read && (shared.config.open_reads || req.uri().path() == "/v1/ca") => {
            Caller::Anonymous
        }
        (None, _) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <token>` (or a node certificate)",
            )
            .into_response()
        }
    };
    if let Caller::Node(node) = &caller {
        let issued = req
            .extensions()
            .get::<flotilla_tls::Peer>()
            .and_then(|p| p.issued);
        if let Some(e) = revoked(&shared, node, issued) {
            shared.metrics.refused_node_requests.inc();
            // Closed after this answer: a node that joins again gets a new certificate,
            // and its kept-alive connections would go on presenting the old one.
            let mut resp = e.into_response();
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
            return resp;
        }
        if let Err(e) = node_may(&shared, node, req.method(), req.uri().path()).await {
            shared.metrics.refused_node_requests.inc();
            return e.into_response();
        }
    }
    if let Caller::Token(view) = &caller {
        let (method, path) = (req.method().as_str(), req.uri().path());
        if !flotilla_core::token::allows(view.role, view.service.as_deref(), method, path) {
            shared.metrics.refused_token_requests.inc();
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a {} token ({}) may not {method} {path}",
                    view.role.name(),
                    view.id
                ),
            )
            .into_response();
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The refusal of node `node`'s certificate issued at `issued` if an admin revoked the
/// node's certificates since (`POST /v1/certs/revoke`). Certificates carry their time to
/// the second: one issued in the second of the revocation (or later) is good, so a node
/// that joins again right after is not caught by it.
fn revoked(shared: &Shared, node: &str, issued: Option<std::time::SystemTime>) -> Option<ApiError> {
    let before_ms = shared.catalog().revocation(node)?.before_ms;
    let issued_s = issued
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    (issued_s < before_ms / 1000).then(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("node {node:?}'s certificates issued before {before_ms} (unix ms) are revoked: join again with a token"),
        )
    })
}

/// What an lb certificate may do beyond its token's role: renew itself; and what it may
/// not: report under another lb's name.
fn lb_cert_may(name: &str, method: &Method, path: &str) -> Result<(), ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "lbs", other] if *method == Method::PUT && *other != name => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("lb {name:?}'s certificate may not report as lb {other:?}"),
        )),
        _ => Ok(()),
    }
}

/// The scoped token `token` names, if it exists and matches its stored hash.
fn scoped_token(shared: &Shared, token: &str) -> Option<flotilla_core::token::TokenView> {
    let id = flotilla_core::token::token_id(token)?;
    let catalog = shared.catalog();
    let record = catalog.token(id)?;
    let hash = flotilla_core::token::token_hash(token);
    flotilla_core::auth::token_matches(hash.as_bytes(), record.hash.as_bytes())
        .then(|| record.into())
}

/// What a node's certificate allows: reads; its own node record and lease; writes to
/// instances registered on it (a new instance's node is checked by `put_instance`);
/// renewing its certificate; reporting a failed rollout. Anything else is `403`, before any handler runs.
async fn node_may(
    shared: &Shared,
    node: &str,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let allowed = match segments.as_slice() {
        ["v1", "nodes", name] | ["v1", "nodes", name, "renew" | "subnet" | "backups"] => {
            *name == node
        }
        ["v1", "instances", id] | ["v1", "instances", id, "renew" | "load" | "health"] => {
            match resolve_caught_up(shared, id).await? {
                Some(full) => shared
                    .catalog()
                    .instance(&full)
                    .is_some_and(|i| i.spec.node.as_deref() == Some(node)),
                None => *method == Method::PUT && segments.len() == 3,
            }
        }
        ["v1", "certs", "renew"] => true,
        // A replica's version failed its health gate on this node: the agent reports
        // it, and the server returns the service to its previous version (only if the
        // named version is still the current one).
        ["v1", "stacks", _, "rollback"] => *method == Method::POST,
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("node {node:?}'s certificate may not {method} {path}"),
        ))
    }
}

pub(crate) fn with_index<T: Serialize>(index: u64, body: T) -> Response {
    let mut resp = Json(body).into_response();
    resp.headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    resp
}

/// Writes one versioned record to the store; returns the store revision.
pub(crate) async fn put_record<T: Serialize>(
    shared: &Shared,
    key: &str,
    rec: &T,
) -> Result<u64, ApiError> {
    shared
        .store
        .put(key, serde_json::to_vec(rec).expect("records serialise"))
        .await
        .map_err(store_error)
}

/// Waits for a write to be applied locally, so the caller's next read sees it.
pub(crate) async fn applied(shared: &Shared, revision: u64) -> Result<u64, ApiError> {
    if shared.wait_applied(revision, APPLY_WAIT).await {
        Ok(revision)
    } else {
        Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "write stored but not yet visible on this server",
        ))
    }
}

async fn put_instance(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    JsonBody(spec): JsonBody<InstanceSpec>,
) -> Result<Response, ApiError> {
    validate_instance_id("id", &id)?;
    spec.validate()?;
    let existing = {
        let catalog = shared.catalog();
        if let Caller::Node(n) = &caller {
            let other = |node: Option<&str>| node != Some(n.as_str());
            if other(spec.node.as_deref())
                || catalog
                    .instance(&id)
                    .is_some_and(|e| other(e.spec.node.as_deref()))
            {
                shared.metrics.refused_node_requests.inc();
                return Err(ApiError::field(
                    StatusCode::FORBIDDEN,
                    "node",
                    format!("node {n:?}'s certificate may register instances on {n:?} only"),
                ));
            }
        }
        if let Some(node) = &spec.node {
            if catalog.node(node).is_none() {
                return Err(ApiError::field(
                    StatusCode::CONFLICT,
                    "node",
                    format!(
                        "node {node:?} holds no lease; register it with PUT /v1/nodes/{node} first"
                    ),
                ));
            }
        }
        catalog.instance(&id).cloned()
    };
    if let Some(existing) = existing.filter(|e| e.spec == spec) {
        // Idempotent re-registration (agent resync): no write, no watcher wake-up. The
        // stored verdict goes back, so an agent that restarts resumes checking from it
        // instead of flapping its healthy instances through critical.
        let catalog = shared.catalog();
        let index = catalog.service_index(&existing.spec.service);
        let health = catalog.health_record(&id).map(|h| h.status);
        return Ok(with_index(
            index,
            json!({ "id": id, "index": index, "changed": false, "health": health }),
        ));
    }
    let rec = InstanceRecord {
        v: RECORD_VERSION,
        id: id.clone(),
        spec,
        registered_ms: unix_ms(),
    };
    let revision = put_record(&shared, &keys::instance(&id), &rec).await?;
    let index = applied(&shared, revision).await?;
    tracing::info!(id, service = rec.spec.service, address = %rec.spec.address, port = rec.spec.port, "registered");
    let health = shared.catalog().health_record(&id).map(|h| h.status);
    Ok(with_index(
        index,
        json!({ "id": id, "index": index, "changed": true, "health": health }),
    ))
}

/// Finds an instance by id or name. On a miss it asks the store whether the id exists
/// and, if so, waits until this server has applied that write: with several servers an
/// agent may register through one and check in through another a moment later, and
/// that must not be a 404 just because this server's watch is a few milliseconds behind.
async fn resolve(shared: &Shared, id_or_name: &str) -> Result<String, ApiError> {
    resolve_caught_up(shared, id_or_name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("instance {id_or_name:?}")))
}

/// [`resolve`] without the 404: `None` when the instance exists neither here nor in the store.
async fn resolve_caught_up(shared: &Shared, id_or_name: &str) -> Result<Option<String>, ApiError> {
    if let Some(id) = shared.catalog().resolve(id_or_name) {
        return Ok(Some(id));
    }
    if validate_instance_id("id", id_or_name).is_err() {
        return Ok(None);
    }
    match shared.store.get(&keys::instance(id_or_name)).await {
        Ok(Some(entry)) => {
            applied(shared, entry.revision).await?;
            Ok(shared.catalog().resolve(id_or_name))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(store_error(e)),
    }
}

async fn get_instance(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = resolve(&shared, &id).await?;
    let catalog = shared.catalog();
    let rec = catalog
        .instance(&id)
        .ok_or_else(|| ApiError::not_found("instance"))?;
    Ok(with_index(catalog.index(), catalog.view(rec)))
}

async fn delete_instance(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = resolve(&shared, &id).await?;
    let revision = remove_instance(&shared, &id).await.map_err(store_error)?;
    let index = match revision {
        Some(r) => applied(&shared, r).await?,
        None => shared.catalog().index(),
    };
    tracing::info!(id, "deregistered");
    Ok(with_index(index, json!({ "id": id, "index": index })))
}

/// Body of a renewal: optional, defaults to passing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    #[serde(default = "passing")]
    status: String,
    #[serde(default)]
    output: String,
}

fn passing() -> String {
    "passing".into()
}

async fn renew_instance(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = resolve(&shared, &id).await?;
    let body: RenewBody = if body.is_empty() {
        RenewBody {
            status: passing(),
            output: String::new(),
        }
    } else {
        parse_json(&body)?
    };
    let passing = match body.status.as_str() {
        "passing" => true,
        "critical" => false,
        other => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "status",
                format!("{other:?}: expected \"passing\" or \"critical\""),
            ))
        }
    };
    check_output(&body.output)?;
    let rec = CheckinRecord {
        v: RECORD_VERSION,
        passing,
        output: body.output,
        at_ms: unix_ms(),
    };
    let revision = put_record(&shared, &keys::checkin(&id), &rec).await?;
    Ok(with_index(revision, json!({ "id": id, "index": revision })))
}

/// A check's output as a renewal or a verdict carries it: at most 4096 bytes.
fn check_output(output: &str) -> Result<(), ApiError> {
    if output.len() > 4096 {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "output",
            "at most 4096 bytes",
        ));
    }
    Ok(())
}

/// Body of `PUT /v1/instances/{id}/health`: an agent's verdict on an instance it checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthBody {
    status: flotilla_core::HealthStatus,
    #[serde(default)]
    output: String,
}

/// An agent's verdict on one of its `node_checks` instances. Written only when the
/// status differs from the stored one (or none is stored), so an agent may repeat its
/// verdicts at every resync without costing a store write.
async fn report_health(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<HealthBody>,
) -> Result<Response, ApiError> {
    let id = resolve(&shared, &id).await?;
    check_output(&body.output)?;
    let stored = {
        let catalog = shared.catalog();
        let node_checks = catalog
            .instance(&id)
            .is_some_and(|rec| rec.spec.node_checks);
        if !node_checks {
            return Err(ApiError::field(
                StatusCode::CONFLICT,
                "node_checks",
                format!("instance {id:?} is checked by the server, not by its agent"),
            ));
        }
        catalog.health_record(&id).map(|h| h.status)
    };
    if stored == Some(body.status) {
        let index = shared.catalog().index();
        return Ok(with_index(
            index,
            json!({ "id": id, "index": index, "changed": false }),
        ));
    }
    let rec = crate::catalog::health_record(body.status, body.output.clone());
    let revision = put_record(&shared, &keys::health(&id), &rec).await?;
    let index = applied(&shared, revision).await?;
    tracing::info!(id, status = ?body.status, output = body.output, "health changed (reported by its agent)");
    shared.metrics.transitions.inc();
    Ok(with_index(
        index,
        json!({ "id": id, "index": index, "changed": true }),
    ))
}

/// Body of `PUT /v1/instances/{id}/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    cpu: f64,
    memory: f64,
}

/// An agent's load report for an instance (soft state: served for 10 s, wakes no one).
async fn put_load(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<LoadBody>,
) -> Result<Response, ApiError> {
    let id = resolve(&shared, &id).await?;
    if !body.cpu.is_finite() || !(0.0..=1000.0).contains(&body.cpu) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "cpu",
            format!("{} is not a share in [0, 1000]", body.cpu),
        ));
    }
    if !body.memory.is_finite() || !(0.0..=100.0).contains(&body.memory) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "memory",
            format!("{} is not a share in [0, 100]", body.memory),
        ));
    }
    let rec = flotilla_core::LoadRecord {
        v: RECORD_VERSION,
        cpu: body.cpu,
        memory: body.memory,
        at_ms: unix_ms(),
    };
    let revision = put_record(&shared, &keys::load(&id), &rec).await?;
    Ok(with_index(revision, json!({ "id": id, "index": revision })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceFilter {
    node: Option<String>,
    service: Option<String>,
}

async fn list_instances(
    State(shared): State<Arc<Shared>>,
    Query(f): Query<InstanceFilter>,
) -> Response {
    let catalog = shared.catalog();
    let mut views: Vec<_> = catalog
        .instances()
        .filter(|r| {
            f.node
                .as_ref()
                .is_none_or(|n| r.spec.node.as_ref() == Some(n))
        })
        .filter(|r| f.service.as_ref().is_none_or(|s| &r.spec.service == s))
        .map(|r| catalog.view(r))
        .collect();
    views.sort_by(|a, b| a.id.cmp(&b.id));
    with_index(catalog.index(), views)
}

/// Consul-style blocking query parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Blocking {
    index: Option<u64>,
    wait: Option<String>,
    passing: Option<bool>,
    /// Services only: answer with what changed since `index` when the change log
    /// reaches back that far (see [`Catalog::service_delta_json`]).
    delta: Option<bool>,
}

impl Blocking {
    fn wait(&self, max: Duration) -> Result<Duration, ApiError> {
        match &self.wait {
            None => Ok(Duration::from_secs(60).min(max)),
            Some(w) => humantime::parse_duration(w)
                .map(|d| d.min(max))
                .map_err(|e| {
                    ApiError::field(StatusCode::BAD_REQUEST, "wait", format!("{w:?}: {e}"))
                }),
        }
    }
}

/// Blocks until `current()` moves past `index`, the wait ends, or the index went
/// backwards (a client from another catalog: answer at once so it resyncs).
///
/// `rx` says when to look again: the service's own channel for a service query (a
/// change elsewhere wakes no one waiting on it), the catalog index for the rest.
pub(crate) async fn block_until(
    shared: &Shared,
    q: &Blocking,
    mut rx: tokio::sync::watch::Receiver<u64>,
    current: impl Fn(&Shared) -> u64,
) -> Result<(), ApiError> {
    let wait = q.wait(shared.config.max_wait)?;
    let Some(index) = q.index.filter(|i| *i > 0) else {
        return Ok(());
    };
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    shared.metrics.waiting.inc();
    let _waiting = scopeguard(|| {
        shared.metrics.waiting.dec();
    });
    loop {
        rx.borrow_and_update();
        let now_index = current(shared);
        if now_index > index || shared.catalog().index() < index {
            return Ok(());
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Ok(()) },
            _ = &mut deadline => return Ok(()),
        }
    }
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

async fn list_services(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| s.catalog().index()).await?;
    let catalog = shared.catalog();
    Ok(with_index(catalog.index(), catalog.services()))
}

/// Body of `PUT /v1/services/{name}/weights`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsBody {
    /// Weights by `ip:port`.
    weights: std::collections::BTreeMap<String, f64>,
    /// Publisher (lb name), informational.
    #[serde(default)]
    from: String,
}

/// The active lb publishes its feedback weights so a standby starts warm and
/// `flotilla ps` and the dashboard show them.
async fn put_weights(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<WeightsBody>,
) -> Result<Response, ApiError> {
    validate_service_name("name", &name)?;
    if body.weights.len() > 4096 {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "weights",
            "at most 4096 entries",
        ));
    }
    for (addr, w) in &body.weights {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("weights.{addr}"),
                "key is not ip:port",
            ));
        }
        if !w.is_finite() || *w <= 0.0 || *w > 1e6 {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("weights.{addr}"),
                format!("{w} is not a weight in (0, 1e6]"),
            ));
        }
    }
    let rec = flotilla_core::WeightsRecord {
        v: RECORD_VERSION,
        weights: body.weights,
        from: body.from.chars().take(128).collect(),
        at_ms: unix_ms(),
    };
    let revision = put_record(&shared, &keys::weights(&name), &rec).await?;
    let index = applied(&shared, revision).await?;
    Ok(with_index(
        index,
        json!({ "service": name, "index": index }),
    ))
}

async fn get_service(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    validate_service_name("name", &name)?;
    block_until(&shared, &q, shared.service_watch(&name), |s| {
        s.catalog().service_index(&name)
    })
    .await?;
    let (index, body) = {
        let catalog = shared.catalog();
        let index = catalog.service_index(&name);
        let passing = q.passing.unwrap_or(false);
        let delta = match (q.delta, q.index) {
            (Some(true), Some(since)) if since > 0 => {
                catalog.service_delta_json(&name, since, passing)
            }
            _ => None,
        };
        if delta.is_some() {
            shared.metrics.delta_answers.inc();
        }
        (
            index,
            delta.unwrap_or_else(|| catalog.service_json(&name, passing)),
        )
    };
    let mut resp = (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    Ok(resp)
}

/// Body of `PUT /v1/nodes/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeBody {
    #[serde(default = "default_node_ttl")]
    ttl: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    api: Option<String>,
}

fn default_node_ttl() -> String {
    "3s".into()
}

async fn write_node(
    shared: &Shared,
    name: &str,
    ttl_ms: u64,
    address: Option<String>,
    api: Option<String>,
    loads_ms: Option<u64>,
) -> Result<u64, ApiError> {
    let renewals = shared
        .catalog()
        .node(name)
        .map(|n| n.renewals + 1)
        .unwrap_or(0);
    let rec = NodeRecord {
        v: RECORD_VERSION,
        name: name.to_owned(),
        ttl_ms,
        address,
        api,
        renewals,
        renewed_ms: unix_ms(),
        loads_ms,
    };
    let revision = put_record(shared, &keys::node(name), &rec).await?;
    applied(shared, revision).await
}

async fn put_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<NodeBody>,
) -> Result<Response, ApiError> {
    validate_node_name("name", &name)?;
    let ttl = humantime::parse_duration(&body.ttl).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "ttl",
            format!("{:?}: {e}", body.ttl),
        )
    })?;
    if ttl < Duration::from_millis(500) || ttl > Duration::from_secs(600) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "ttl",
            "must be 500ms..=10m",
        ));
    }
    if body.address.as_ref().is_some_and(|a| a.len() > 256) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "address",
            "at most 256 bytes",
        ));
    }
    if let Some(api) = &body.api {
        if api.len() > 256 || !(api.starts_with("http://") || api.starts_with("https://")) {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "api",
                format!("{api:?} is not an http(s) URL of at most 256 bytes"),
            ));
        }
    }
    let index = write_node(
        &shared,
        &name,
        ttl.as_millis() as u64,
        body.address,
        body.api,
        None,
    )
    .await?;
    Ok(with_index(index, json!({ "node": name, "index": index })))
}

/// Optional body of a node lease renewal.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewNodeBody {
    /// How long ago the agent last sampled every container's load and found each within
    /// its dead band of the last report (so the reports still hold).
    #[serde(default)]
    loads_age_ms: Option<u64>,
}

async fn renew_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: RenewNodeBody = if body.is_empty() {
        RenewNodeBody::default()
    } else {
        parse_json(&body)?
    };
    let Some(rec) = shared.catalog().node(&name).cloned() else {
        return Err(ApiError::not_found(&format!(
            "node {name:?} (lease expired or never registered)"
        )));
    };
    let loads_ms = body
        .loads_age_ms
        .filter(|age| Duration::from_millis(*age) <= crate::catalog::LOAD_TTL)
        .map(|age| unix_ms().saturating_sub(age));
    let index = write_node(&shared, &name, rec.ttl_ms, rec.address, rec.api, loads_ms).await?;
    Ok(with_index(index, json!({ "node": name, "index": index })))
}

async fn get_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let catalog = shared.catalog();
    let node = catalog
        .nodes()
        .into_iter()
        .find(|n| n.name == name)
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(with_index(catalog.watch_index(catalog.nodes_index()), node))
}

async fn delete_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if shared.catalog().node(&name).is_none() {
        return Err(ApiError::not_found("node"));
    }
    let revision = remove_node(&shared, &name).await.map_err(store_error)?;
    let index = match revision {
        Some(r) => applied(&shared, r).await?,
        None => shared.catalog().index(),
    };
    tracing::info!(node = name, "node left");
    Ok(with_index(index, json!({ "node": name, "index": index })))
}

async fn list_nodes(State(shared): State<Arc<Shared>>) -> Response {
    let catalog = shared.catalog();
    with_index(catalog.watch_index(catalog.nodes_index()), catalog.nodes())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFilter {
    service: Option<String>,
}

/// Server-sent events: one `service` event per change, with the service's instances.
/// A client that falls behind gets a `resync` event and should re-read the services.
async fn events(
    State(shared): State<Arc<Shared>>,
    Query(f): Query<EventFilter>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = shared.subscribe();
    let stream = BroadcastStream::new(rx).filter_map(move |item| {
        let keep = match &item {
            Ok(ev) => f.service.as_ref().is_none_or(|s| s == &ev.service),
            Err(_) => true,
        };
        let out = keep.then(|| {
            Ok(match item {
                Ok(ev) => SseEvent::default()
                    .event("service")
                    .id(ev.index.to_string())
                    .json_data(&ev)
                    .unwrap_or_default(),
                Err(_) => SseEvent::default().event("resync").data("lagged"),
            })
        });
        async move { out }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let catalog = shared.catalog();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "store": shared.store.kind(),
        "leader": shared.is_leader(),
        "synced": shared.is_synced(),
        "index": catalog.index(),
        "undecodable_records": catalog.undecodable.len(),
    }))
}

async fn healthz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.is_synced() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "catalog not loaded\n")
    }
}

/// `GET /metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the
/// Prometheus text format (`promtool check metrics`, curl).
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    shared.refresh_metrics();
    flotilla_http::metrics::exposition(&headers, shared.metrics.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<InstanceSpec>(
            br#"{"service":"web","address":"198.18.0.1","port":"eighty"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field_name(), Some("port"));
        let e = parse_json::<InstanceSpec>(br#"{"service":"web","address":"198.18.0.1","port":1,"checks":[{"type":"http","path":"/","interval":"fast"}]}"#).unwrap_err();
        assert!(e.field_name().unwrap().starts_with("checks[0]"), "{e:?}");
        let e = parse_json::<InstanceSpec>(br#"{"service":"web","port":1}"#).unwrap_err();
        assert_eq!(e.field_name(), Some("address"));
        let e = parse_json::<InstanceSpec>(
            br#"{"service":"web","address":"198.18.0.1","port":1,"bogus":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.field_name(), Some("bogus"));
        let e = parse_json::<InstanceSpec>(b"{not json").unwrap_err();
        assert_eq!(e.field_name(), Some("body"));
    }

    #[test]
    fn a_busy_store_answers_503_with_retry_after_and_other_store_errors_without() {
        let busy = store_error(flotilla_store::StoreError::Busy { queued: 9 }).into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            busy.headers().get(axum::http::header::RETRY_AFTER).unwrap(),
            "1"
        );
        let down =
            store_error(flotilla_store::StoreError::Unavailable("etcd".into())).into_response();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(down
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .is_none());
    }
}
