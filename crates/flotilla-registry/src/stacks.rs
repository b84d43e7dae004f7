//! Desired state: stacks as `flotilla deploy` leaves them, for agents to reconcile.
//!
//! The server only stores and validates; placement is computed by every agent from the
//! same record ([`flotilla_core::stack::place`]), so there is no scheduler to fail over.
//! Writes are read-modify-write under one lock per server; the last deploy wins.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use flotilla_core::stack::{DeployedService, StackRecord, MAX_REPLICAS, MAX_SERVICES};
use flotilla_core::{validate_node_name, validate_service_name, RECORD_VERSION};
use serde::Deserialize;
use serde_json::json;

use crate::api::{applied, block_until, put_record, with_index, ApiError, Blocking, JsonBody};
use crate::keys;
use crate::state::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/stacks", get(list))
        .route("/v1/stacks/{name}", put(deploy).get(get_one).delete(remove))
        .route("/v1/stacks/{name}/services/{svc}/replicas", put(scale))
        .route("/v1/stacks/{name}/services/{svc}/pins", put(pin))
        .route("/v1/stacks/{name}/rollback", post(rollback))
        .route("/v1/assignments", get(assignments))
        .route(
            "/v1/assignments/{stack}/{service}/{replica}/recover",
            post(recover),
        )
}

/// Body of `POST /v1/assignments/{stack}/{service}/{replica}/recover`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverBody {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    archive: Option<String>,
}

/// An operator's `flotilla recover`: checked here (the replica has an assignment and
/// backups, the node is live, the archive is a plain archive name), then left for the
/// duty, which moves the assignment (`202`).
async fn recover(
    State(shared): State<Arc<Shared>>,
    Path((stack, service, replica)): Path<(String, String, u32)>,
    JsonBody(body): JsonBody<RecoverBody>,
) -> Result<Response, ApiError> {
    let key = flotilla_core::recovery::replica_key(&stack, &service, replica);
    {
        let c = shared.catalog();
        if !c.assignments().contains_key(&key) {
            return Err(ApiError::not_found(&format!(
                "stateful replica {key:?} (no assignment)"
            )));
        }
        let has_backups = c
            .stack(&stack)
            .and_then(|s| s.services.get(&service))
            .is_some_and(|s| s.spec.backup.is_some());
        if !has_backups {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "service",
                format!("{stack}/{service} has no backups to restore from"),
            ));
        }
        if let Some(to) = &body.to {
            validate_node_name("to", to)?;
            if c.node(to).is_none() {
                return Err(ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "to",
                    format!("node {to:?} is not live"),
                ));
            }
        }
    }
    if let Some(a) = &body.archive {
        let plain = a.len() <= 255
            && a.ends_with(".flotilla-backup")
            && a.starts_with(&format!("{stack}-{service}-{replica}-"))
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "archive",
                format!("{a:?} is not an archive name of replica {key}"),
            ));
        }
    }
    let request = flotilla_core::recovery::RecoverRequest {
        v: RECORD_VERSION,
        to: body.to,
        archive: body.archive,
        at_ms: flotilla_core::record::unix_ms(),
    };
    let revision = put_record(&shared, &keys::recovery(&key), &request).await?;
    let index = applied(&shared, revision).await?;
    let mut resp = with_index(index, json!({ "requested": key }));
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// `GET /v1/assignments` → `{"assignments": {"STACK/SERVICE/REPLICA": record}}`: where
/// each stateful replica lives. Blocking queries wait on the desired state's index
/// (stacks and assignments move it together), so one watch covers both.
async fn assignments(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| {
        s.catalog().stacks_index()
    })
    .await?;
    let c = shared.catalog();
    Ok(with_index(
        c.watch_index(c.stacks_index()),
        json!({ "assignments": c.assignments() }),
    ))
}

/// A lost node stops its own stateful replicas once its lease has lapsed; the restore
/// elsewhere waits `grace` more. So `grace` must be at least the longest lease TTL of
/// the nodes (or a replica could start elsewhere before its old copy stops itself).
fn check_grace(shared: &Shared, name: &str, s: &DeployedService) -> Result<(), ApiError> {
    if s.spec.recovery.is_none() || !flotilla_core::recovery::stateful(&s.spec) {
        return Ok(());
    }
    let grace = flotilla_core::recovery::grace(&s.spec);
    let longest = shared
        .catalog()
        .node_records()
        .map(|n| (n.ttl_ms, n.name.clone()))
        .max();
    if let Some((ttl_ms, node)) = longest {
        if grace < std::time::Duration::from_millis(ttl_ms) {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("services.{name}.spec.recovery.grace"),
                format!(
                    "{} is shorter than node {node}'s lease TTL of {} ms: a lost node \
                     must be able to stop its own copy before the restore elsewhere",
                    humantime::format_duration(grace),
                    ttl_ms
                ),
            ));
        }
    }
    Ok(())
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| {
        s.catalog().stacks_index()
    })
    .await?;
    let c = shared.catalog();
    Ok(with_index(c.watch_index(c.stacks_index()), c.stacks()))
}

async fn get_one(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let c = shared.catalog();
    let s = c
        .stack(&name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&format!("stack {name:?}")))?;
    Ok(with_index(c.watch_index(c.stacks_index()), s))
}

/// Body of `PUT /v1/stacks/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    services: BTreeMap<String, DeployedService>,
}

fn validate_service(name: &str, s: &DeployedService) -> Result<(), ApiError> {
    let f = format!("services.{name}");
    validate_service_name(&f, name)?;
    s.spec.validate(&f)?;
    let image = s
        .image
        .parse::<flotilla_core::stack::ImageRef>()
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, format!("{f}.image"), e))?;
    // Every node must run the same bytes: a registry image is stored pinned.
    if s.spec.image.registry().is_some() && image.digest().is_none() {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            format!("{f}.image"),
            format!("{image} is a registry image without a digest (REPO@sha256:…)"),
        ));
    }
    if !s.spec_hash.bytes().all(|b| b.is_ascii_hexdigit())
        || !(12..=64).contains(&s.spec_hash.len())
    {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            format!("{f}.spec_hash"),
            "expected 12..64 hex digits",
        ));
    }
    for (r, node) in &s.pins {
        validate_node_name(&format!("{f}.pins.{r}"), node)?;
    }
    Ok(())
}

async fn write(shared: &Shared, rec: &StackRecord) -> Result<u64, ApiError> {
    let revision = put_record(shared, &keys::stack(&rec.name), rec).await?;
    applied(shared, revision).await
}

async fn deploy(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<DeployBody>,
) -> Result<Response, ApiError> {
    validate_service_name("name", &name)?;
    if body.services.is_empty() || body.services.len() > MAX_SERVICES {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "services",
            format!("1..={MAX_SERVICES} services"),
        ));
    }
    for (svc, s) in &body.services {
        validate_service(svc, s)?;
        check_grace(&shared, svc, s)?;
    }
    let _w = shared.stack_write.lock().await;
    let old = shared.catalog().stack(&name).cloned();
    let mut services = body.services;
    let (generation, previous) = match &old {
        Some(o) => {
            // Pins set by migrations survive a redeploy of the same service.
            for (svc, s) in services.iter_mut() {
                if let Some(prev) = o.services.get(svc) {
                    if s.pins.is_empty() {
                        s.pins = prev.pins.clone();
                    }
                }
            }
            let changed = o.services != services;
            (
                o.generation + 1,
                if changed {
                    Some(o.services.clone())
                } else {
                    o.previous.clone()
                },
            )
        }
        None => (1, None),
    };
    let rec = StackRecord {
        v: RECORD_VERSION,
        name: name.clone(),
        generation,
        services,
        previous,
        rolled_back: None,
    };
    let index = write(&shared, &rec).await?;
    Ok(with_index(
        index,
        json!({ "stack": name, "generation": generation, "index": index }),
    ))
}

async fn remove(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let _w = shared.stack_write.lock().await;
    let Some(services) = shared
        .catalog()
        .stack(&name)
        .map(|s| s.services.keys().cloned().collect::<Vec<_>>())
    else {
        return Err(ApiError::not_found(&format!("stack {name:?}")));
    };
    // Its secrets go with it (first: a failure leaves the stack, to be removed again).
    for svc in services {
        shared
            .store
            .delete(&keys::secrets(&name, &svc))
            .await
            .map_err(crate::api::store_error)?;
    }
    let revision = shared
        .store
        .delete(&keys::stack(&name))
        .await
        .map_err(crate::api::store_error)?
        .unwrap_or(0);
    let index = applied(&shared, revision).await?;
    Ok(with_index(
        index,
        json!({ "removed": name, "index": index }),
    ))
}

/// Applies `f` to one service of a stack and stores the result.
async fn modify(
    shared: &Shared,
    name: &str,
    svc: &str,
    f: impl FnOnce(&mut StackRecord) -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let _w = shared.stack_write.lock().await;
    let mut rec = shared
        .catalog()
        .stack(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&format!("stack {name:?}")))?;
    if !rec.services.contains_key(svc) {
        return Err(ApiError::not_found(&format!(
            "service {svc:?} in stack {name:?}"
        )));
    }
    f(&mut rec)?;
    rec.generation += 1;
    let index = write(shared, &rec).await?;
    Ok(with_index(
        index,
        json!({ "stack": name, "generation": rec.generation, "index": index }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    replicas: u32,
}

async fn scale(
    State(shared): State<Arc<Shared>>,
    Path((name, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<ScaleBody>,
) -> Result<Response, ApiError> {
    if body.replicas > MAX_REPLICAS {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "replicas",
            format!("{} is more than {MAX_REPLICAS}", body.replicas),
        ));
    }
    modify(&shared, &name, &svc, |rec| {
        rec.services.get_mut(&svc).expect("checked").spec.replicas = body.replicas;
        Ok(())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    replica: u32,
    /// `None` removes the pin.
    node: Option<String>,
}

async fn pin(
    State(shared): State<Arc<Shared>>,
    Path((name, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<PinBody>,
) -> Result<Response, ApiError> {
    if let Some(n) = &body.node {
        validate_node_name("node", n)?;
    }
    modify(&shared, &name, &svc, |rec| {
        let s = rec.services.get_mut(&svc).expect("checked");
        if body.replica >= s.spec.replicas {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "replica",
                format!(
                    "{} is not below replicas = {}",
                    body.replica, s.spec.replicas
                ),
            ));
        }
        match body.node {
            Some(n) => s.pins.insert(body.replica, n),
            None => s.pins.remove(&body.replica),
        };
        Ok(())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    service: String,
    /// The spec hash that failed; a rollback for an older hash is refused (409).
    spec_hash: String,
    reason: String,
}

async fn rollback(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Response, ApiError> {
    let svc = body.service.clone();
    modify(&shared, &name, &svc, |rec| {
        let current = rec.services[&svc].clone();
        if current.spec_hash != body.spec_hash {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "that version is no longer the desired one",
            ));
        }
        let Some(prev) = rec.previous.as_mut().and_then(|p| p.remove(&svc)) else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no previous version to roll back to",
            ));
        };
        let mut restored = prev;
        restored.spec.replicas = current.spec.replicas;
        restored.pins = current.pins;
        rec.services.insert(svc.clone(), restored);
        let reason: String = body.reason.chars().take(512).collect();
        rec.rolled_back = Some(format!(
            "{svc} {}: {reason}",
            &body.spec_hash[..body.spec_hash.len().min(12)]
        ));
        Ok(())
    })
    .await
}
