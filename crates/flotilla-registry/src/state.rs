//! State shared by the API, the DNS server, the catalog sync and the duty loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use flotilla_core::config::ServerConfig;
use flotilla_core::InstanceView;
use flotilla_store::{Store, StoreError};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::catalog::{Catalog, Changes};
use crate::metrics::Metrics;

/// Most events applied under one catalog lock before readers get a turn.
const BURST: usize = 4096;

/// A change notification for SSE subscribers (the lb and the dashboard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceEvent {
    /// Service that changed.
    pub service: String,
    /// Index of the change.
    pub index: u64,
    /// The service's instances after the change (all, with health).
    pub instances: Vec<InstanceView>,
}

/// Everything the registry's tasks share.
pub struct Shared {
    /// The durable store.
    pub store: Arc<dyn Store>,
    catalog: RwLock<Catalog>,
    index_tx: watch::Sender<u64>,
    /// One channel per service someone is waiting on, sent that service's index when
    /// it changes: a blocking service query wakes for its service only (with a hundred
    /// watchers, waking all of them on every change cost more than the change).
    service_tx: std::sync::Mutex<HashMap<String, watch::Sender<u64>>>,
    events: broadcast::Sender<ServiceEvent>,
    /// Bearer token for writes (and reads unless open).
    pub token: String,
    /// Settings.
    pub config: ServerConfig,
    /// Prometheus metrics.
    pub metrics: Metrics,
    leader: AtomicBool,
    synced: AtomicBool,
    /// Writes being worked on now (see `ServerConfig::max_inflight_writes`).
    pub(crate) writes_in_flight: std::sync::atomic::AtomicUsize,
    /// HTTP client for health probes.
    pub http: reqwest::Client,
    /// The cluster CA and this server's certificate; unset when serving plain HTTP.
    pub tls: std::sync::OnceLock<Arc<crate::tls::ServerTls>>,
    /// Serialises subnet allocations within this server (the store's election
    /// serialises them between servers).
    pub(crate) subnet_lock: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write of stack records within this server (a process
    /// running several servers, as the tests and benchmarks do, has one per server).
    pub(crate) stack_write: tokio::sync::Mutex<()>,
}

impl Shared {
    /// New shared state over `store`.
    pub fn new(store: Arc<dyn Store>, config: ServerConfig, token: String) -> Arc<Self> {
        let (index_tx, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let http = flotilla_check::probe_client();
        Arc::new(Shared {
            store,
            catalog: RwLock::new(Catalog::default()),
            index_tx,
            service_tx: Default::default(),
            events,
            token,
            config,
            metrics: Metrics::default(),
            leader: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            writes_in_flight: Default::default(),
            http,
            tls: Default::default(),
            subnet_lock: Default::default(),
            stack_write: Default::default(),
        })
    }

    /// Read access to the catalog (never held across an await).
    pub fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this server currently runs the checking duty.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub(crate) fn set_leader(&self, on: bool) {
        self.leader.store(on, Ordering::Relaxed);
        self.metrics.leader.set(on as i64);
    }

    /// Whether the catalog has loaded its first snapshot.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Subscribes to service change events.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.subscribe()
    }

    /// Subscribes to the catalog index.
    pub fn index_watch(&self) -> watch::Receiver<u64> {
        self.index_tx.subscribe()
    }

    /// Subscribes to one service's index (changes of that service only).
    pub fn service_watch(&self, service: &str) -> watch::Receiver<u64> {
        let mut senders = self.service_tx.lock().unwrap_or_else(|p| p.into_inner());
        match senders.get(service) {
            Some(tx) => tx.subscribe(),
            None => {
                if senders.len() >= 1024 {
                    // Queries for names that never change leave channels no one holds.
                    senders.retain(|_, tx| tx.receiver_count() > 0);
                }
                let (tx, rx) = watch::channel(self.catalog().service_index(service));
                senders.insert(service.to_owned(), tx);
                rx
            }
        }
    }

    /// Waits until the catalog has applied `index` (read-your-writes after a store write).
    pub async fn wait_applied(&self, index: u64, within: Duration) -> bool {
        let mut rx = self.index_tx.subscribe();
        tokio::time::timeout(within, rx.wait_for(|applied| *applied >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn publish(&self, changes: &Changes) {
        let catalog = self.catalog();
        let index = catalog.index();
        if self.events.receiver_count() > 0 {
            for service in &changes.services {
                let _ = self.events.send(ServiceEvent {
                    service: service.clone(),
                    index: catalog.service_index(service),
                    instances: catalog.service(service, false),
                });
            }
        }
        self.metrics.catalog_index.set(index as i64);
        {
            let mut senders = self.service_tx.lock().unwrap_or_else(|p| p.into_inner());
            for service in &changes.services {
                if let Some(tx) = senders.get(service) {
                    if tx.receiver_count() == 0 {
                        senders.remove(service);
                    } else {
                        tx.send_replace(catalog.service_index(service));
                    }
                }
            }
        }
        drop(catalog);
        self.index_tx.send_replace(index);
    }

    /// Sets the gauges that take a pass over the catalog, and the store's write-path
    /// counters; called when metrics are scraped, not on every change (counting 10,000
    /// instances per applied event cost more than the event).
    pub fn refresh_metrics(&self) {
        {
            let catalog = self.catalog();
            let (instances, passing) = catalog.counts();
            self.metrics.instances.set(instances as i64);
            self.metrics.passing.set(passing as i64);
            // The records alone: `nodes()` would count every instance per node first.
            self.metrics
                .nodes
                .set(catalog.node_records().count() as i64);
        }
        self.metrics.observe_store(&self.store.write_counts());
    }

    /// Keeps the catalog a faithful copy of the store, forever: snapshot, then events;
    /// on any stream error, a fresh snapshot (so nothing is missed or stale).
    pub async fn run_catalog_sync(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let (snapshot, mut stream) = match self.store.snapshot_and_watch("").await {
                Ok(s) => s,
                Err(e) => {
                    self.note_store_error(&e, "catalog snapshot");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut fresh = Catalog::from_snapshot(&snapshot);
            let mut changes = Changes::default();
            {
                let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
                for s in catalog.services().into_iter().chain(fresh.services()) {
                    changes.services.insert(s.name);
                }
                fresh.follow_checks_version(&catalog);
                *catalog = fresh;
            }
            if self.synced.swap(true, Ordering::Relaxed) {
                self.metrics.resyncs.inc();
            }
            self.publish(&changes);
            tracing::info!(
                index = snapshot.revision,
                entries = snapshot.entries.len(),
                "catalog loaded"
            );
            let mut pending = stream.next().await;
            // Apply every event that is already here under one lock, then publish once:
            // a group commit arrives as a burst, and etcd gives all writes of one
            // transaction the same revision, so the index is published only once all of
            // a revision's events are applied (read-your-writes).
            while let Some(first) = pending.take() {
                let mut changes = Changes::default();
                let (mut failure, mut ended) = (None, false);
                {
                    let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
                    let (mut item, mut applied) = (first, 0usize);
                    loop {
                        let event = match item {
                            Ok(event) => event,
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        };
                        changes.merge(catalog.apply(&event));
                        applied += 1;
                        match stream.next().now_or_never() {
                            Some(Some(more)) => {
                                let same_revision = more
                                    .as_ref()
                                    .is_ok_and(|e| e.revision() == event.revision());
                                if applied < BURST || same_revision {
                                    item = more;
                                } else {
                                    pending = Some(more);
                                    break;
                                }
                            }
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                }
                self.publish(&changes);
                if let Some(e) = failure {
                    self.note_store_error(&e, "catalog watch");
                    break;
                }
                if ended {
                    break;
                }
                if pending.is_none() {
                    pending = stream.next().await;
                }
            }
        }
    }

    /// Counts and logs a store error.
    pub fn note_store_error(&self, e: &StoreError, during: &str) {
        self.metrics.store_errors.inc();
        tracing::warn!(error = %e, during, "store error");
    }
}
