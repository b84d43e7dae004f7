//! The embedded backend: one redb file, one process.
//!
//! Writes are group-committed: each batch is one redb write transaction, and each write
//! in it gets its own revision. Commits are serialised by a mutex that also orders the
//! broadcast of their events, so a snapshot taken under the same mutex plus a
//! subscription made there see every change exactly once.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;

use crate::group::{Committer, Limits, WriteCounts, WriteOp};
use crate::{Entry, Event, EventStream, Leadership, Result, Snapshot, Store, StoreError};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Events buffered per watcher before it is told to resync.
const WATCH_BUFFER: usize = 65_536;

/// A store in a redb file under the server's data dir.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// Started on the first write, on the runtime that makes it (opening needs none).
    committer: Arc<OnceLock<Committer>>,
}

struct Inner {
    db: Database,
    write: Mutex<broadcast::Sender<Event>>,
    /// Commits left to fail on purpose (tests of the failure path).
    fail_commits: std::sync::atomic::AtomicUsize,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

fn encode(revision: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&revision.to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn decode(key: &str, raw: &[u8]) -> Result<Entry> {
    if raw.len() < 8 {
        return Err(StoreError::Database(format!("entry {key:?} is truncated")));
    }
    let revision = u64::from_be_bytes(raw[..8].try_into().unwrap());
    Ok(Entry {
        key: key.to_owned(),
        value: raw[8..].to_vec(),
        revision,
    })
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/catalog.redb`. redb locks the file, so a second server on
    /// the same data dir fails here instead of corrupting it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(db_err)?;
        let db = Database::create(dir.join("catalog.redb")).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(KV).map_err(db_err)?;
            tx.open_table(META).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                write: Mutex::new(events),
                fail_commits: Default::default(),
            }),
            committer: Arc::new(OnceLock::new()),
        })
    }

    /// Makes the next `n` commits fail after their writes were staged, as a full disk
    /// would: for tests that a failed batch answers every writer and changes nothing.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, n: usize) {
        self.inner
            .fail_commits
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn committer(&self) -> &Committer {
        self.committer.get_or_init(|| {
            // Weak: dropping the last store handle closes the database at once (a reopen
            // right after must not find it still locked by the committer task).
            let inner = Arc::downgrade(&self.inner);
            Committer::start(Limits::EMBEDDED, move |ops| {
                let inner = inner.upgrade();
                async move {
                    let inner = inner.ok_or_else(|| {
                        StoreError::Unavailable("the store has been closed".into())
                    })?;
                    tokio::task::spawn_blocking(move || inner.write_batch(&ops))
                        .await
                        .map_err(db_err)?
                }
            })
        })
    }

    async fn write(&self, key: &str, value: Option<Vec<u8>>) -> Result<Option<u64>> {
        self.committer()
            .write(WriteOp {
                key: key.to_owned(),
                value,
            })
            .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(db_err)?
    }
}

impl Inner {
    fn read_prefix(&self, prefix: &str) -> Result<Snapshot> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let kv = tx.open_table(KV).map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        let revision = meta
            .get(REVISION)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut entries = Vec::new();
        for item in kv.range(prefix..).map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            entries.push(decode(k.value(), v.value())?);
        }
        Ok(Snapshot { entries, revision })
    }

    /// Applies a batch of writes in one durable transaction, each with its own revision,
    /// and broadcasts their events in order once it is durable. All or nothing.
    fn write_batch(&self, ops: &[WriteOp]) -> Result<Vec<Option<u64>>> {
        let events = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(db_err)?;
        let mut revisions = Vec::with_capacity(ops.len());
        let mut changes = Vec::with_capacity(ops.len());
        {
            let mut kv = tx.open_table(KV).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let mut revision = meta
                .get(REVISION)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            for op in ops {
                match &op.value {
                    Some(v) => {
                        revision += 1;
                        kv.insert(op.key.as_str(), encode(revision, v).as_slice())
                            .map_err(db_err)?;
                        revisions.push(Some(revision));
                        changes.push(Event::Put(Entry {
                            key: op.key.clone(),
                            value: v.clone(),
                            revision,
                        }));
                    }
                    None => {
                        if kv.remove(op.key.as_str()).map_err(db_err)?.is_none() {
                            revisions.push(None);
                            continue;
                        }
                        revision += 1;
                        revisions.push(Some(revision));
                        changes.push(Event::Delete {
                            key: op.key.clone(),
                            revision,
                        });
                    }
                }
            }
            meta.insert(REVISION, revision).map_err(db_err)?;
        }
        let injected = self
            .fail_commits
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if injected {
            tx.abort().map_err(db_err)?;
            return Err(StoreError::Database(
                "commit failed (injected for a test)".into(),
            ));
        }
        tx.commit().map_err(db_err)?;
        for event in changes {
            let _ = events.send(event);
        }
        Ok(revisions)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            let tx = inner.db.begin_read().map_err(db_err)?;
            let kv = tx.open_table(KV).map_err(db_err)?;
            let got = kv.get(key.as_str()).map_err(db_err)?;
            got.map(|v| decode(&key, v.value())).transpose()
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        self.write(key, Some(value))
            .await
            .map(|r| r.expect("a put always writes"))
    }

    async fn delete(&self, key: &str) -> Result<Option<u64>> {
        self.write(key, None).await
    }

    async fn list(&self, prefix: &str) -> Result<Snapshot> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.read_prefix(&prefix)).await
    }

    async fn snapshot_and_watch(&self, prefix: &str) -> Result<(Snapshot, EventStream)> {
        let prefix = prefix.to_owned();
        let (snapshot, rx) = self
            .blocking({
                let prefix = prefix.clone();
                move |inner| {
                    let events = inner.write.lock().unwrap_or_else(|p| p.into_inner());
                    let rx = events.subscribe();
                    Ok((inner.read_prefix(&prefix)?, rx))
                }
            })
            .await?;
        let after = snapshot.revision;
        let stream = BroadcastStream::new(rx)
            .filter_map(move |item| {
                let prefix = prefix.clone();
                async move {
                    match item {
                        Ok(ev) => {
                            let key = match &ev {
                                Event::Put(e) => &e.key,
                                Event::Delete { key, .. } => key,
                            };
                            (key.starts_with(&prefix) && ev.revision() > after).then_some(Ok(ev))
                        }
                        Err(_) => Some(Err(StoreError::Lagged)),
                    }
                }
            })
            .boxed();
        Ok((snapshot, stream))
    }

    async fn campaign(
        &self,
        _election: &str,
        _candidate: &str,
        _ttl: Duration,
    ) -> Result<Leadership> {
        // redb's file lock already makes this process the only one serving this catalog.
        let (tx, held) = watch::channel(true);
        tokio::spawn(async move {
            // Keep the sender alive for the life of the process: leadership is never lost.
            tx.closed().await;
        });
        Ok(Leadership { held, resign: None })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn compact(&self, _keep: u64) -> Result<Option<u64>> {
        // redb keeps the current value of each key only: there is no history to discard.
        Ok(None)
    }

    fn write_counts(&self) -> WriteCounts {
        self.committer
            .get()
            .map(|c| c.stats().counts())
            .unwrap_or_default()
    }
}
