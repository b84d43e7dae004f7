//! The routed cluster network's allocations: each node asks for its /24 of the
//! cluster CIDR and gets the one it held before or the lowest free one — never one
//! another node holds, even with several servers answering at once (the store's
//! election serialises allocations between servers, a mutex within one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, put};
use axum::Router;
use flotilla_core::subnet::{allocate, validate_cluster_cidr, Ipv4Net};
use flotilla_core::{validate_node_name, RECORD_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::{applied, put_record, with_index, ApiError, JsonBody};
use crate::keys;
use crate::state::Shared;

/// One node's share of the routed cluster network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRecord {
    /// Record format version.
    pub v: u32,
    /// The node.
    pub node: String,
    /// Its /24.
    pub subnet: Ipv4Net,
    /// The cluster CIDR it was cut from.
    pub cluster_cidr: Ipv4Net,
}

/// The subnet routes (merged under the API's auth and limits).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/nodes/{name}/subnet", put(claim))
        .route("/v1/subnets", get(list))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    cluster_cidr: Ipv4Net,
}

/// Every allocation, read from the store (linearizable on etcd).
async fn stored(shared: &Shared) -> Result<(Vec<SubnetRecord>, u64), ApiError> {
    let snapshot = shared
        .store
        .list(keys::SUBNETS)
        .await
        .map_err(crate::api::store_error)?;
    let records = snapshot
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<SubnetRecord>(&e.value).ok())
        .collect();
    Ok((records, snapshot.revision))
}

/// `PUT /v1/nodes/{name}/subnet` — `{"cluster_cidr": "10.244.0.0/16"}` → the node's /24.
async fn claim(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ClaimBody>,
) -> Result<Response, ApiError> {
    validate_node_name("name", &name)?;
    validate_cluster_cidr("cluster_cidr", &body.cluster_cidr)?;
    if shared.catalog().node(&name).is_none() {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "node",
            format!("node {name:?} holds no lease; register it first"),
        ));
    }
    let _local = shared.subnet_lock.lock().await;
    let election = shared
        .store
        .campaign(
            keys::SUBNET_ELECTION,
            &format!("subnets-{name}"),
            Duration::from_secs(5),
        )
        .await
        .map_err(crate::api::store_error)?;
    let result = allocate_locked(&shared, &name, body.cluster_cidr).await;
    election.resign();
    let (record, revision) = result?;
    let index = match revision {
        Some(r) => applied(&shared, r).await?,
        None => shared.catalog().index(),
    };
    Ok(with_index(
        index,
        json!({ "node": name, "subnet": record.subnet, "cluster_cidr": record.cluster_cidr }),
    ))
}

async fn allocate_locked(
    shared: &Shared,
    name: &str,
    cidr: Ipv4Net,
) -> Result<(SubnetRecord, Option<u64>), ApiError> {
    let (records, _) = stored(shared).await?;
    if let Some(other) = records.iter().find(|r| r.cluster_cidr != cidr) {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "cluster_cidr",
            format!(
                "{cidr} is not this cluster's routed network ({}, as node {:?} holds it): every agent names the same cluster_cidr",
                other.cluster_cidr, other.node
            ),
        ));
    }
    if let Some(own) = records.iter().find(|r| r.node == name) {
        return Ok((own.clone(), None));
    }
    let taken: BTreeMap<String, Ipv4Net> =
        records.iter().map(|r| (r.node.clone(), r.subnet)).collect();
    let Some(subnet) = allocate(&cidr, &taken, name) else {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "cluster_cidr",
            format!("{cidr} has no free /24 left for node {name:?}"),
        ));
    };
    let record = SubnetRecord {
        v: RECORD_VERSION,
        node: name.to_owned(),
        subnet,
        cluster_cidr: cidr,
    };
    let revision = put_record(shared, &format!("{}{name}", keys::SUBNETS), &record).await?;
    tracing::info!(node = name, %subnet, "routed subnet allocated");
    Ok((record, Some(revision)))
}

/// `GET /v1/subnets` → `{"subnets": [{"node", "subnet", "cluster_cidr", "address"}]}`
/// (`address`: the node's advertise address while it holds a lease, else `null`).
async fn list(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let (records, revision) = stored(&shared).await?;
    let catalog = shared.catalog();
    let subnets: Vec<_> = records
        .iter()
        .map(|r| {
            let address = catalog.node(&r.node).and_then(|n| n.address.clone());
            json!({ "node": r.node, "subnet": r.subnet, "cluster_cidr": r.cluster_cidr, "address": address })
        })
        .collect();
    Ok(with_index(revision, json!({ "subnets": subnets })))
}
