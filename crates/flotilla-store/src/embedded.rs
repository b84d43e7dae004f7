//! The embedded backend: one redb file, one process.
//!
//! Writes are serialised by a mutex that also orders the broadcast of their events, so a
//! snapshot taken under the same mutex plus a subscription made there see every change
//! exactly once.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;

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
}

struct Inner {
    db: Database,
    write: Mutex<broadcast::Sender<Event>>,
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
            }),
        })
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

    /// Applies one change in its own durable transaction and broadcasts it in order.
    fn write(&self, key: &str, value: Option<&[u8]>) -> Result<Option<u64>> {
        let events = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(db_err)?;
        let revision;
        {
            let mut kv = tx.open_table(KV).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let current = meta
                .get(REVISION)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            revision = current + 1;
            match value {
                Some(v) => {
                    kv.insert(key, encode(revision, v).as_slice())
                        .map_err(db_err)?;
                }
                None => {
                    if kv.remove(key).map_err(db_err)?.is_none() {
                        return Ok(None);
                    }
                }
            }
            meta.insert(REVISION, revision).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let event = match value {
            Some(v) => Event::Put(Entry {
                key: key.to_owned(),
                value: v.to_vec(),
                revision,
            }),
            None => Event::Delete {
                key: key.to_owned(),
                revision,
            },
        };
        let _ = events.send(event);
        Ok(Some(revision))
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
        let key = key.to_owned();
        self.blocking(move |inner| {
            inner
                .write(&key, Some(&value))
                .map(|r| r.expect("put always writes"))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<Option<u64>> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.write(&key, None)).await
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
}
