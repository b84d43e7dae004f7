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

/// A report a component puts about itself: checked, then stamped by the server.
trait Report: Serialize {
    fn check(&self) -> Result<(), flotilla_core::FieldError>;
    fn stamp(&mut self, at_ms: u64);
}

impl Report for LbReport {
    fn check(&self) -> Result<(), flotilla_core::FieldError> {
        self.validate()
    }
    fn stamp(&mut self, at_ms: u64) {
        (self.v, self.at_ms) = (flotilla_core::RECORD_VERSION, at_ms);
    }
}

impl Report for BackupInventory {
    fn check(&self) -> Result<(), flotilla_core::FieldError> {
        self.validate()
    }
    fn stamp(&mut self, at_ms: u64) {
        (self.v, self.at_ms) = (flotilla_core::RECORD_VERSION, at_ms);
    }
}

/// Stores `body`, the report of `name` (a node name), under `key`; answers
/// `{WHO: name, "index"}` once it is applied.
async fn store<T: Report>(
    shared: &Shared,
    who: &str,
    name: &str,
    key: String,
    mut body: T,
) -> Result<Response, ApiError> {
    validate_node_name("name", name)?;
    body.check()?;
    body.stamp(unix_ms());
    let revision = put_record(shared, &key, &body).await?;
    let index = applied(shared, revision).await?;
    Ok(with_index(
        index,
        serde_json::json!({ who: name, "index": index }),
    ))
}

/// Waits (`?index=`) for the reports to change, then returns the catalog.
async fn reports_after<'a>(
    shared: &'a Arc<Shared>,
    q: &Blocking,
) -> Result<std::sync::RwLockReadGuard<'a, crate::catalog::Catalog>, ApiError> {
    block_until(shared, q, shared.index_watch(), |s| s.catalog().lbs_index()).await?;
    Ok(shared.catalog())
}

async fn report_backups(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<BackupInventory>,
) -> Result<Response, ApiError> {
    let key = keys::backups(&name);
    store(&shared, "node", &name, key, body).await
}

async fn list_backups(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    let c = reports_after(&shared, &q).await?;
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
    Ok(with_index(c.watch_index(c.lbs_index()), views))
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
    JsonBody(body): JsonBody<LbReport>,
) -> Result<Response, ApiError> {
    let key = keys::lb(&name);
    store(&shared, "lb", &name, key, body).await
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<Blocking>,
) -> Result<Response, ApiError> {
    let c = reports_after(&shared, &q).await?;
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
    Ok(with_index(c.watch_index(c.lbs_index()), views))
}
