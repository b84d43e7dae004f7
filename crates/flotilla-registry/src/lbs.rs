//! What components report for the dashboard, beyond the catalog: each lb (with an `lb`
//! or admin token) puts its VRRP state and per-listener traffic every few seconds
//! (`/v1/lbs`), and each agent (its node certificate, for its own node only) the backup
//! archives its node keeps (`/v1/nodes/{node}/backups`, listed at `/v1/backups`).
//! Readers block on `?index=` like the other lists. Soft state: the server stamps each
//! report when it stores it, and a reader sees how old it is.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, put};
use axum::Router;
use flotilla_core::record::unix_ms;
use flotilla_core::{validate_node_name, BackupInventory, LbReport};
use serde::Serialize;

use crate::api::{applied, block_until, put_record, with_index, ApiError, Blocking, JsonBody};
use crate::keys;
use crate::state::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/lbs", get(list))
        .route("/v1/lbs/{name}", put(report))
        .route("/v1/nodes/{name}/backups", put(report_backups))
        .route("/v1/backups", get(list_backups))
}

/// One node's archives as `GET /v1/backups` lists them.
#[derive(Debug, Serialize)]
struct InventoryView<'a> {
    node: &'a str,
    /// ms since the server stored the inventory.
    age_ms: u64,
    /// Whether the node holds a lease now (a lost node's archives are out of reach).
    live: bool,
    #[serde(flatten)]
    inventory: &'a BackupInventory,
}

async fn report_backups(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(mut body): JsonBody<BackupInventory>,
) -> Result<Response, ApiError> {
    validate_node_name("name", &name)?;
    body.validate()?;
    body.v = flotilla_core::RECORD_VERSION;
    body.at_ms = unix_ms();
    let revision = put_record(&shared, &keys::backups(&name), &body).await?;
    let index = applied(&shared, revision).await?;
    Ok(with_index(
        index,
        serde_json::json!({ "node": name, "index": index }),
    ))
}

async fn list_backups(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| {
        s.catalog().lbs_index()
    })
    .await?;
    let c = shared.catalog();
    let now = unix_ms();
    let views: Vec<InventoryView> = c
        .backups()
        .iter()
        .map(|(node, inventory)| InventoryView {
            node,
            age_ms: now.saturating_sub(inventory.at_ms),
            live: c.node(node).is_some(),
            inventory,
        })
        .collect();
    Ok(with_index(c.lbs_index(), views))
}

/// One lb as `GET /v1/lbs` lists it.
#[derive(Debug, Serialize)]
struct LbView<'a> {
    name: &'a str,
    /// ms since the server stored the report.
    age_ms: u64,
    /// Older than three of its periods: the lb stopped reporting (down, or cut off).
    stale: bool,
    #[serde(flatten)]
    report: &'a LbReport,
}

async fn report(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(mut body): JsonBody<LbReport>,
) -> Result<Response, ApiError> {
    validate_node_name("name", &name)?;
    body.validate()?;
    body.v = flotilla_core::RECORD_VERSION;
    body.at_ms = unix_ms();
    let revision = put_record(&shared, &keys::lb(&name), &body).await?;
    let index = applied(&shared, revision).await?;
    Ok(with_index(
        index,
        serde_json::json!({ "lb": name, "index": index }),
    ))
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    block_until(&shared, &q, shared.index_watch(), |s| {
        s.catalog().lbs_index()
    })
    .await?;
    let c = shared.catalog();
    let now = unix_ms();
    let views: Vec<LbView> = c
        .lbs()
        .iter()
        .map(|(name, report)| {
            let age_ms = now.saturating_sub(report.at_ms);
            LbView {
                name,
                age_ms,
                stale: age_ms > 3 * report.period_ms,
                report,
            }
        })
        .collect();
    Ok(with_index(c.lbs_index(), views))
}
