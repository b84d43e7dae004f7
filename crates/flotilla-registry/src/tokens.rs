//! Scoped tokens: made (shown once), listed, revoked by an admin; `GET /v1/tokens/self`
//! tells any token holder what it is (the agents ask it about tokens presented to
//! their APIs, so they need not hold the admin token themselves).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use flotilla_core::record::unix_ms;
use flotilla_core::token::{Role, TokenRecord, TokenView};
use flotilla_core::{validate_node_name, validate_service_name, RECORD_VERSION};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;

use crate::api::{
    applied, block_until, put_record, with_index, ApiError, Blocking, Caller, JsonBody,
};
use crate::keys;
use crate::state::Shared;

/// The token routes (merged under the API's auth and limits).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/self", get(whoami))
        .route("/v1/tokens/index", get(index))
        .route("/v1/tokens/{id}", delete(revoke))
}

/// A new token's role and scope.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    role: Role,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    node: Option<String>,
}

async fn create(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    caller.admin_only("managing tokens")?;
    if let Some(s) = &body.service {
        if body.role != Role::Lb {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "service",
                "only an lb token is scoped to a service",
            ));
        }
        validate_service_name("service", s)?;
    }
    if let Some(n) = &body.node {
        if body.role != Role::Agent {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "node",
                "only an agent (join) token is scoped to a node",
            ));
        }
        validate_node_name("node", n)?;
    }
    let mut bytes = [0u8; 40];
    rand::thread_rng().fill_bytes(&mut bytes);
    let id = hex::encode(&bytes[..8]);
    let token = format!("flt_{id}_{}", hex::encode(&bytes[8..]));
    let record = TokenRecord {
        v: RECORD_VERSION,
        id: id.clone(),
        role: body.role,
        service: body.service,
        node: body.node,
        hash: flotilla_core::token::token_hash(&token),
        created_ms: unix_ms(),
    };
    let revision = put_record(&shared, &keys::token(&id), &record).await?;
    applied(&shared, revision).await?;
    tracing::info!(id, role = record.role.name(), "token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": token, "id": id, "role": record.role, "service": record.service, "node": record.node })),
    )
        .into_response())
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    caller.admin_only("managing tokens")?;
    Ok(Json(shared.catalog().tokens()).into_response())
}

async fn whoami(Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    let view = match caller {
        Caller::Admin => TokenView {
            id: "bootstrap".into(),
            role: Role::Admin,
            service: None,
            node: None,
            created_ms: 0,
        },
        Caller::Token(view) => view,
        Caller::Node(_) | Caller::Anonymous => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no token presented",
            ))
        }
    };
    Ok(Json(view).into_response())
}

/// `GET /v1/tokens/index[?index=N&wait=D]`: the revision of the last token change,
/// blocking while it is still `N`. Agents follow it to drop the token roles they keep
/// the moment a token is made or revoked; it says nothing about any token.
async fn index(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| {
        s.catalog().tokens_index()
    })
    .await?;
    let index = {
        let c = shared.catalog();
        c.watch_index(c.tokens_index())
    };
    Ok(with_index(index, json!({ "index": index })))
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.admin_only("managing tokens")?;
    if shared.catalog().token(&id).is_none() {
        return Err(ApiError::not_found(&format!("token {id:?}")));
    }
    let revision = shared
        .store
        .delete(&keys::token(&id))
        .await
        .map_err(crate::api::store_error)?;
    if let Some(r) = revision {
        applied(&shared, r).await?;
    }
    tracing::info!(id, "token revoked");
    Ok(Json(json!({ "revoked": id })).into_response())
}
