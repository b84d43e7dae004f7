//! Certificates for agents and lbs: the CA's certificate (public, for the joiner to
//! check against its pinned hash), node certificates for a CSR with the cluster token
//! or an agent token (a join), lb certificates for a CSR with an lb token (bound to
//! that token: revoking it revokes them), and renewals made with the certificate
//! itself.

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

use crate::api::{applied, put_record, with_index, ApiError, Caller, JsonBody};
use crate::state::Shared;
use crate::tls::ServerTls;

/// The certificate routes (merged under the API's auth and limits).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/certs", post(join))
        .route("/v1/certs/renew", post(renew))
        .route("/v1/certs/revoke", post(revoke))
        .route("/v1/certs/revoked", get(revoked))
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

/// A join: the node's (or the lb's) name and a CSR for its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    lb: Option<String>,
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

/// An lb certificate for `name`, bound to the lb token `token_id`.
fn sign_lb(shared: &Shared, name: &str, token_id: &str, csr: &str) -> Result<Response, ApiError> {
    let tls = tls(shared)?;
    let cert = tls
        .ca
        .sign_lb_csr(
            csr,
            name,
            token_id,
            SystemTime::now(),
            shared.config.node_cert_lifetime,
        )
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "csr", format!("{e:#}")))?;
    shared.metrics.node_certs_issued.inc();
    tracing::info!(lb = name, token = token_id, "issued an lb certificate");
    Ok(Json(json!({ "cert": cert, "ca": tls.ca.cert_pem() })).into_response())
}

/// An lb's join: only with an lb token, whose id the certificate carries.
fn join_lb(shared: &Shared, caller: &Caller, name: &str, csr: &str) -> Result<Response, ApiError> {
    validate_node_name("lb", name)?;
    if !flotilla_tls::ca::valid_node_name(name) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "lb",
            format!("{name:?} cannot name an lb certificate (letters, digits, `-`, `_`)"),
        ));
    }
    match caller {
        Caller::Token(t) if t.role == flotilla_core::token::Role::Lb => {
            sign_lb(shared, name, &t.id, csr)
        }
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "an lb joins as {name:?} with an lb token (`flotilla token create --role lb`), \
                 which its certificate is bound to"
            ),
        )),
    }
}

async fn join(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<JoinBody>,
) -> Result<Response, ApiError> {
    let (node, csr) = match (body.node, body.lb) {
        (Some(node), None) => (node, body.csr),
        (None, Some(lb)) => return join_lb(&shared, &caller, &lb, &body.csr),
        _ => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "node",
                "a join names either a node or an lb (one of `node`, `lb`)",
            ))
        }
    };
    validate_node_name("node", &node)?;
    let allowed = match &caller {
        Caller::Admin => true,
        Caller::Token(t) => {
            t.role == flotilla_core::token::Role::Agent
                && t.node.as_ref().is_none_or(|n| *n == node)
        }
        _ => false,
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("joining as {node:?} needs the cluster token or an agent token for that node"),
        ));
    }
    if !flotilla_tls::ca::valid_node_name(&node) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "node",
            format!("{node:?} cannot name a node certificate (letters, digits, `-`, `_`)"),
        ));
    }
    sign(&shared, &node, &csr)
}

async fn renew(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    peer: Option<Extension<flotilla_tls::Peer>>,
    JsonBody(body): JsonBody<RenewBody>,
) -> Result<Response, ApiError> {
    let lb = peer.and_then(|Extension(p)| match p.identity {
        Some(flotilla_tls::PeerIdentity::Lb { name, token }) => Some((name, token)),
        _ => None,
    });
    match (caller, lb) {
        (Caller::Node(node), _) => sign(&shared, &node, &body.csr),
        // The auth layer let this lb certificate through: its token is still valid.
        (Caller::Token(_), Some((name, token))) => sign_lb(&shared, &name, &token, &body.csr),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "renewal needs the node's (or the lb's) own certificate",
        )),
    }
}

/// A revocation: the node whose certificates issued until now stop working.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    node: String,
}

/// `POST /v1/certs/revoke` (admin): every certificate of the node issued until now is
/// refused from here on, by every server; the node is back only once it joins again
/// with a token (revoke or rotate that too where it may be stolen).
async fn revoke(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Response, ApiError> {
    caller.admin_only("revoking certificates")?;
    validate_node_name("node", &body.node)?;
    let rec = flotilla_core::CertRevocation {
        v: flotilla_core::RECORD_VERSION,
        node: body.node.clone(),
        before_ms: flotilla_core::record::unix_ms(),
    };
    let revision = put_record(&shared, &crate::keys::revoked(&body.node), &rec).await?;
    let index = applied(&shared, revision).await?;
    tracing::warn!(node = body.node, "node certificates revoked");
    Ok(with_index(
        index,
        json!({ "node": body.node, "before_ms": rec.before_ms }),
    ))
}

/// `GET /v1/certs/revoked`: the revocations in force.
async fn revoked(State(shared): State<Arc<Shared>>) -> Response {
    let catalog = shared.catalog();
    let list: Vec<_> = catalog.revocations().cloned().collect();
    with_index(catalog.index(), list)
}
