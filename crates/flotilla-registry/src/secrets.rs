//! Secret environment values of stack services: written by an admin (the CLI at
//! deploy), read only by an admin or by the agent of a node a replica of the service is
//! placed on — never by read or lb tokens, never through `open_reads`, never with the
//! stack record.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Extension, Json, Router};
use flotilla_core::stack::SecretsRecord;
use flotilla_core::{validate_service_name, RECORD_VERSION};
use serde::Deserialize;
use serde_json::json;

use crate::api::{applied, put_record, ApiError, Caller, JsonBody};
use crate::keys;
use crate::state::Shared;

/// Largest secret value accepted.
const MAX_VALUE: usize = 16 * 1024;

/// The secrets routes (merged under the API's auth and limits).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1/stacks/{name}/secrets/{svc}", put(store).get(read))
}

/// New secret values of one service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsBody {
    values: BTreeMap<String, String>,
}

async fn store(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path((name, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<SecretsBody>,
) -> Result<Response, ApiError> {
    caller.admin_only("writing secrets")?;
    validate_service_name("name", &name)?;
    validate_service_name("svc", &svc)?;
    for (k, v) in &body.values {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("values.{k}"),
                "not an environment variable name",
            ));
        }
        if v.len() > MAX_VALUE || v.contains('\0') {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                format!("values.{k}"),
                format!("at most {MAX_VALUE} bytes, no NUL"),
            ));
        }
    }
    let record = SecretsRecord {
        v: RECORD_VERSION,
        values: body.values,
    };
    let revision = put_record(&shared, &keys::secrets(&name, &svc), &record).await?;
    applied(&shared, revision).await?;
    // Names only: values never reach a log.
    tracing::info!(stack = name, service = svc, names = ?record.values.keys().collect::<Vec<_>>(), "secrets stored");
    Ok(Json(
        json!({ "stack": name, "service": svc, "names": record.values.keys().collect::<Vec<_>>() }),
    )
    .into_response())
}

/// Whether `node` runs (or is to run) a replica of `svc` in stack `name`.
fn placed_on(shared: &Shared, name: &str, svc: &str, node: &str) -> bool {
    let catalog = shared.catalog();
    let Some(deployed) = catalog.stack(name).and_then(|s| s.services.get(svc)) else {
        return false;
    };
    let live: Vec<String> = catalog.nodes().into_iter().map(|n| n.name).collect();
    flotilla_core::stack::place(svc, deployed, &live)
        .values()
        .any(|n| n == node)
}

async fn read(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path((name, svc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let allowed = match &caller {
        Caller::Admin => true,
        Caller::Node(node) => placed_on(&shared, &name, &svc, node),
        _ => false,
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("secrets of {name}/{svc} go to an admin or to a node a replica is placed on"),
        ));
    }
    let entry = shared
        .store
        .get(&keys::secrets(&name, &svc))
        .await
        .map_err(crate::api::store_error)?
        .ok_or_else(|| ApiError::not_found(&format!("secrets of {name}/{svc}")))?;
    let record: SecretsRecord = serde_json::from_slice(&entry.value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored secrets unreadable: {e}"),
        )
    })?;
    Ok(Json(record).into_response())
}
