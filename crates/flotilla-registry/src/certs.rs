//! Certificates for agents: the CA's certificate (public, for the joining agent to
//! check against its pinned hash), node certificates for a CSR with the cluster token
//! (a join), and renewals made with the node certificate itself.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flotilla_core::validate_node_name;
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, Caller, JsonBody};
use crate::state::Shared;
use crate::tls::ServerTls;

/// The certificate routes (merged under the API's auth and limits).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/certs", post(join))
        .route("/v1/certs/renew", post(renew))
}

fn tls(shared: &Shared) -> Result<&Arc<ServerTls>, ApiError> {
    shared.tls.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this server runs without TLS (--insecure-http): it has no CA",
        )
    })
}

async fn ca(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let tls = tls(&shared)?;
    Ok(Json(json!({ "ca": tls.ca.cert_pem(), "hash": tls.ca.hash() })).into_response())
}

/// A join: the node's name and a CSR for its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    node: String,
    csr: String,
}

/// A renewal: a CSR (for a new key or the same one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    csr: String,
}

fn sign(shared: &Shared, node: &str, csr: &str) -> Result<Response, ApiError> {
    let tls = tls(shared)?;
    let cert = tls
        .ca
        .sign_node_csr(
            csr,
            node,
            SystemTime::now(),
            shared.config.node_cert_lifetime,
        )
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "csr", format!("{e:#}")))?;
    shared.metrics.node_certs_issued.inc();
    tracing::info!(node, "issued a node certificate");
    Ok(Json(json!({ "cert": cert, "ca": tls.ca.cert_pem() })).into_response())
}

async fn join(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<JoinBody>,
) -> Result<Response, ApiError> {
    validate_node_name("node", &body.node)?;
    let allowed = match &caller {
        Caller::Admin => true,
        Caller::Token(t) => {
            t.role == flotilla_core::token::Role::Agent
                && t.node.as_ref().is_none_or(|n| *n == body.node)
        }
        _ => false,
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "joining as {:?} needs the cluster token or an agent token for that node",
                body.node
            ),
        ));
    }
    if !flotilla_tls::ca::valid_node_name(&body.node) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "node",
            format!(
                "{:?} cannot name a node certificate (letters, digits, `-`, `_`)",
                body.node
            ),
        ));
    }
    sign(&shared, &body.node, &body.csr)
}

async fn renew(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<RenewBody>,
) -> Result<Response, ApiError> {
    match caller {
        Caller::Node(node) => sign(&shared, &node, &body.csr),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "renewal needs the node's own certificate",
        )),
    }
}
