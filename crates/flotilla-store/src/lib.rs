//! The registry's durable key-value store.
//!
//! The registry keeps its catalog as keys and values in a [`Store`]: the embedded redb
//! file for a single server, or an etcd v3 cluster so that several servers share one
//! catalog and survive the loss of a machine. Both backends give the same guarantees,
//! proven by one conformance suite (`tests/conformance.rs`): a global revision that grows
//! with every write, an atomic snapshot plus a gap-free stream of the changes after it,
//! and leader election so periodic duties run on exactly one server.
//!
//! Writes are group-committed (`group.rs`): every write that queues while a commit is in
//! flight goes into the next one, so the write rate is bounded by commit throughput, not
//! by commit latency, and a full queue refuses new writes with [`StoreError::Busy`].
#![warn(missing_docs)]

mod embedded;
mod etcd;
mod group;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::watch;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdStore, EtcdTls};
pub use group::{batch_len, Limits, WriteCounts, WriteOp};

/// One key with its value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that produced this value.
    pub revision: u64,
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Key created or overwritten.
    Put(Entry),
    /// Key removed at `revision`.
    Delete {
        /// The key.
        key: String,
        /// Revision of the delete.
        revision: u64,
    },
}

impl Event {
    /// Revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(e) => e.revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// All entries under a prefix as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries, sorted by key.
    pub entries: Vec<Entry>,
    /// The store revision the snapshot reflects.
    pub revision: u64,
}

/// Changes after a snapshot, in revision order. An `Err` ends the stream: the consumer
/// takes a fresh snapshot (e.g. after [`StoreError::Lagged`]).
pub type EventStream = BoxStream<'static, Result<Event, StoreError>>;

/// What can go wrong talking to a store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed; retrying may help (etcd member down, leader election...).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded database failed (disk full, corruption).
    #[error("store database error: {0}")]
    Database(String),
    /// A watcher fell too far behind; take a new snapshot.
    #[error("watcher lagged behind; resync needed")]
    Lagged,
    /// A key or value is not acceptable to the store.
    #[error("invalid key or value: {0}")]
    Invalid(String),
    /// More writes are queued than the store commits within its target wait; nothing
    /// was written. Retry after a short back-off.
    #[error("store busy: {queued} writes queued; retry shortly")]
    Busy {
        /// Writes queued when this one was refused.
        queued: usize,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Lagged | StoreError::Busy { .. }
        )
    }
}

/// Store result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Held while this process is the elected leader.
pub struct Leadership {
    /// `true` while leadership is held; turns `false` (or closes) when it is lost.
    pub held: watch::Receiver<bool>,
    resign: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Leadership {
    /// Resolves when leadership is lost.
    pub async fn lost(&mut self) {
        while *self.held.borrow_and_update() {
            if self.held.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives leadership up at once so another candidate takes over without waiting for
    /// the lease to expire.
    pub fn resign(mut self) {
        if let Some(tx) = self.resign.take() {
            let _ = tx.send(());
        }
    }
}

/// The operations the registry needs from its store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<Entry>>;
    /// Writes one key; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64>;
    /// Removes one key; returns the revision of the delete, or `None` if it was absent.
    async fn delete(&self, key: &str) -> Result<Option<u64>>;
    /// Every entry under `prefix`, and the revision they reflect.
    async fn list(&self, prefix: &str) -> Result<Snapshot>;
    /// An atomic snapshot of `prefix` plus every later change under it, without gaps.
    async fn snapshot_and_watch(&self, prefix: &str) -> Result<(Snapshot, EventStream)>;
    /// Waits until this candidate leads `election`; leadership lasts while the process
    /// lives and keeps its lease (`ttl`) alive.
    async fn campaign(&self, election: &str, candidate: &str, ttl: Duration) -> Result<Leadership>;
    /// Short backend name for logs and metrics.
    fn kind(&self) -> &'static str;
    /// The write path's counters (commits, batched writes, refusals, queue).
    fn write_counts(&self) -> WriteCounts;
    /// Discards the history of changes older than the newest `keep` revisions, so a
    /// long-running cluster never fills its store (etcd keeps every revision until it is
    /// compacted, up to its space quota). Returns the revision compacted to, or `None`
    /// when there was nothing to discard or the backend keeps no history. A watch that
    /// wants a discarded revision fails and its consumer takes a fresh snapshot.
    async fn compact(&self, keep: u64) -> Result<Option<u64>>;
}
