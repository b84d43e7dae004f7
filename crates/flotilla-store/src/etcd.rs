//! The etcd v3 backend: several servers share one catalog, and leader election runs on
//! an etcd lease so a crashed leader's duty moves within the lease TTL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::{oneshot, watch};

use crate::group::{Committer, Limits, WriteCounts, WriteOp};
use crate::{Entry, Event, EventStream, Leadership, Result, Snapshot, Store, StoreError};

/// TLS to etcd (`etcds://`): the CA of the members' certificates and, when etcd asks
/// for client certificates, this client's certificate and key (all PEM).
#[derive(Clone)]
pub struct EtcdTls {
    /// CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// Client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// A store in an etcd v3 cluster, with every key under `namespace`. Writes are
/// group-committed: each batch is one etcd `Txn` (all its writes share one revision).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
    committer: Arc<Committer>,
    /// The highest revision this process compacted to.
    compacted: Arc<std::sync::atomic::AtomicU64>,
}

/// Retries of one call before giving up (20 ms doubling: ~1.2 s in all).
const RETRIES: u32 = 6;

fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EtcdStore {
    /// Connects to the cluster (any reachable member will do) and keeps every key under
    /// `namespace` so several flotilla clusters (or test runs) can share one etcd.
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self> {
        Self::connect_with(endpoints, namespace, None).await
    }

    /// Like [`EtcdStore::connect`]; with `tls`, over TLS to members whose certificates
    /// `tls.ca_pem` signed, presenting `tls.identity` when given (etcd's
    /// `--client-cert-auth`).
    pub async fn connect_with(
        endpoints: &[String],
        namespace: &str,
        tls: Option<EtcdTls>,
    ) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        let committer = {
            let (client, namespace) = (client.clone(), namespace.to_owned());
            Committer::start(Limits::ETCD, move |ops| {
                commit_txn(client.clone(), namespace.clone(), ops)
            })
        };
        Ok(EtcdStore {
            client,
            namespace: namespace.to_owned(),
            committer: Arc::new(committer),
            compacted: Default::default(),
        })
    }

    async fn retry<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        retry(&self.client, call).await
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.namespace, key)
    }

    fn strip(&self, raw: &[u8]) -> Result<String> {
        let s = std::str::from_utf8(raw)
            .map_err(|_| StoreError::Invalid("non-UTF-8 key in etcd".into()))?;
        Ok(s.strip_prefix(&self.namespace).unwrap_or(s).to_owned())
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Result<Entry> {
        Ok(Entry {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            revision: kv.mod_revision() as u64,
        })
    }

    async fn list_at(&self, prefix: &str) -> Result<Snapshot> {
        let key = self.full(prefix);
        let resp = self
            .retry(|c| {
                let key = key.clone();
                async move {
                    c.kv_client()
                        .get(key, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| self.entry(kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(Snapshot { entries, revision })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let key = self.full(key);
        let resp = self
            .retry(|c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.entry(kv)).transpose()
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        self.committer
            .write(WriteOp {
                key: key.to_owned(),
                value: Some(value),
            })
            .await
            .map(|r| r.unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> Result<Option<u64>> {
        self.committer
            .write(WriteOp {
                key: key.to_owned(),
                value: None,
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Snapshot> {
        self.list_at(prefix).await
    }

    async fn snapshot_and_watch(&self, prefix: &str) -> Result<(Snapshot, EventStream)> {
        let snapshot = self.list_at(prefix).await?;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(snapshot.revision as i64 + 1);
        let key = self.full(prefix);
        let (watcher, stream) = self
            .retry(|c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.watch_client().watch(key, Some(options)).await }
            })
            .await?;
        let this = self.clone();
        let events = stream
            .map(move |msg| -> Vec<Result<Event>> {
                // Holding the watcher keeps the server-side watch open for the stream's life.
                let _keep = &watcher;
                match msg {
                    Err(e) => vec![Err(unavailable(e))],
                    Ok(resp) if resp.canceled() => {
                        vec![Err(StoreError::Unavailable(format!(
                            "watch canceled: {}",
                            resp.cancel_reason()
                        )))]
                    }
                    Ok(resp) => resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            Some(match ev.event_type() {
                                EventType::Put => this.entry(kv).map(Event::Put),
                                EventType::Delete => {
                                    this.strip(kv.key()).map(|key| Event::Delete {
                                        key,
                                        revision: kv.mod_revision() as u64,
                                    })
                                }
                            })
                        })
                        .collect(),
                }
            })
            .flat_map(futures::stream::iter)
            .chain(futures::stream::once(async {
                Err(StoreError::Unavailable("watch stream ended".into()))
            }))
            .boxed();
        Ok((snapshot, events))
    }

    async fn campaign(&self, election: &str, candidate: &str, ttl: Duration) -> Result<Leadership> {
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let mut lease_client = self.client.lease_client();
        let lease = lease_client
            .grant(ttl_secs, None)
            .await
            .map_err(unavailable)?
            .id();
        let (mut keeper, mut responses) =
            lease_client.keep_alive(lease).await.map_err(unavailable)?;
        let (held_tx, held) = watch::channel(false);
        let (resign_tx, mut resign_rx) = oneshot::channel::<()>();
        let period = Duration::from_millis((ttl_secs as u64 * 1000) / 4);

        // The lease must be kept alive while we wait in the campaign, and after. A broken
        // keep-alive stream (its etcd member died) is reopened on another member; the
        // leadership counts as lost only when no renewal succeeded for a whole TTL.
        let alive = {
            let held_tx = held_tx.clone();
            let mut lease_client = self.client.lease_client();
            let ttl = Duration::from_secs(ttl_secs as u64);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                let mut last_ok = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let ok = match keeper.keep_alive().await {
                                Ok(()) => matches!(
                                    tokio::time::timeout(period, responses.message()).await,
                                    Ok(Ok(Some(r))) if r.ttl() > 0
                                ),
                                Err(_) => false,
                            };
                            if ok {
                                last_ok = tokio::time::Instant::now();
                                continue;
                            }
                            if last_ok.elapsed() + Duration::from_millis(200) >= ttl {
                                tracing::warn!(lease, "leadership lease lost");
                                break;
                            }
                            if let Ok(Ok((k, r))) = tokio::time::timeout(period, lease_client.keep_alive(lease)).await {
                                keeper = k;
                                responses = r;
                            }
                        }
                        _ = &mut resign_rx => {
                            let _ = lease_client.revoke(lease).await;
                            break;
                        }
                    }
                }
                let _ = held_tx.send(false);
            })
        };

        let mut election_client = self.client.election_client();
        let key = self.full(election);
        let won = tokio::select! {
            r = election_client.campaign(key, candidate, lease) => r.map_err(unavailable),
            _ = wait_finished(&alive) => Err(StoreError::Unavailable("lease lost during campaign".into())),
        };
        if let Err(e) = won {
            alive.abort();
            let _ = self.client.lease_client().revoke(lease).await;
            return Err(e);
        }
        let _ = held_tx.send(true);
        Ok(Leadership {
            held,
            resign: Some(resign_tx),
        })
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn write_counts(&self) -> WriteCounts {
        self.committer.stats().counts()
    }

    async fn compact(&self, keep: u64) -> Result<Option<u64>> {
        // The current revision, from the header of the smallest read there is.
        let key = self.full("");
        let resp = self
            .retry(|c| {
                let key = key.clone();
                async move {
                    c.kv_client()
                        .get(key, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        let current = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        let target = current.saturating_sub(keep);
        if target == 0 || target <= self.compacted.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        match self.client.kv_client().compact(target as i64, None).await {
            Ok(_) => {}
            // Another server (or an operator) compacted past it already.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                self.compacted
                    .fetch_max(target, std::sync::atomic::Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(unavailable(e)),
        }
        self.compacted
            .fetch_max(target, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(target))
    }
}

/// Runs one etcd call, retrying transport failures: the client balances over all
/// endpoints, and a call that landed on a dead member succeeds on a live one.
async fn retry<T, F, Fut>(client: &Client, mut call: F) -> Result<T>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(20);
    let mut attempt = 0;
    loop {
        match call(client.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < RETRIES && is_transient(&e) => {
                tracing::debug!(error = %e, attempt, "etcd call failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
}

/// Commits a batch as one `Txn` (no compares: it always applies). Every write in it
/// gets the transaction's revision; a delete that found nothing answers `None`. The
/// batcher keeps keys distinct within a batch, as etcd requires.
async fn commit_txn(
    client: Client,
    namespace: String,
    ops: Vec<WriteOp>,
) -> Result<Vec<Option<u64>>> {
    let txn_ops: Vec<TxnOp> = ops
        .iter()
        .map(|op| {
            let key = format!("{namespace}{}", op.key);
            match &op.value {
                Some(v) => TxnOp::put(key, v.clone(), None),
                None => TxnOp::delete(key, None),
            }
        })
        .collect();
    let resp = retry(&client, |c| {
        let txn = Txn::new().and_then(txn_ops.clone());
        async move { c.kv_client().txn(txn).await }
    })
    .await?;
    let revision = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
    Ok(resp
        .op_responses()
        .iter()
        .map(|r| match r {
            TxnOpResponse::Delete(d) => (d.deleted() > 0).then_some(revision),
            _ => Some(revision),
        })
        .collect())
}

async fn wait_finished(task: &tokio::task::JoinHandle<()>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
