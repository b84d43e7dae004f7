//! Group commit: one durable commit for every write that queued while the last one ran.
//!
//! A commit costs about the same whether it carries one write or a hundred (an fsync in
//! redb, a raft round and an fsync on each etcd member), so committing each write on its
//! own bounds the write rate by commit latency: the registry fell off a cliff between 400
//! and 1,000 changes/s. Here every `put`/`delete` joins a queue; one committer task takes
//! what has queued (up to the backend's per-commit limits, and never two writes of the
//! same key in one batch, which etcd refuses and which would blur their order), commits
//! it as one transaction, and answers each caller once that batch is durable. A failed
//! batch answers every one of its writes with the store's error; nothing of it applied.
//!
//! The queue is bounded by the time it would take to drain: when more writes wait than
//! the committer clears in [`Limits::target_wait`] at its measured rate, a new write is
//! refused at once with [`StoreError::Busy`] (the API turns that into `503` with
//! `Retry-After`), so a burst past capacity degrades to slower writers, never to
//! unbounded latency or memory.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::{Result, StoreError};

/// One write: a put (`Some(value)`) or a delete (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOp {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
}

impl WriteOp {
    /// Bytes this write adds to a commit request.
    fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Per-commit and queue limits of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most writes in one commit (etcd refuses more than `--max-txn-ops`, 128 by default).
    pub max_ops: usize,
    /// Most key+value bytes in one commit (etcd's request limit is 1.5 MiB by default).
    pub max_bytes: usize,
    /// Writes queued before new ones are refused, whatever the measured rate.
    pub max_queue: usize,
    /// Queue length that is always allowed, before any rate is measured.
    pub min_queue: usize,
    /// The longest a write should wait in the queue; sets the queue bound at the
    /// committer's measured rate.
    pub target_wait: Duration,
}

impl Limits {
    /// Limits for the embedded (redb) store: one transaction may be large.
    pub const EMBEDDED: Limits = Limits {
        max_ops: 4096,
        max_bytes: 16 << 20,
        max_queue: 65_536,
        min_queue: 1024,
        target_wait: Duration::from_millis(100),
    };
    /// Limits for etcd with its default server limits.
    pub const ETCD: Limits = Limits {
        max_ops: 128,
        max_bytes: 1 << 20,
        max_queue: 32_768,
        min_queue: 512,
        target_wait: Duration::from_millis(100),
    };
}

/// How many writes from the front of `queue` form the next batch: at least one, at most
/// `max_ops` and (past the first) `max_bytes`, stopping before the first key already in
/// the batch so the order of writes to one key is the order of their commits.
pub fn batch_len<'a>(queue: impl IntoIterator<Item = &'a WriteOp>, limits: &Limits) -> usize {
    let mut keys = HashSet::new();
    let mut bytes = 0usize;
    let mut n = 0usize;
    for op in queue {
        if n == limits.max_ops {
            break;
        }
        if n > 0 && (bytes + op.size() > limits.max_bytes || keys.contains(op.key.as_str())) {
            break;
        }
        bytes += op.size();
        keys.insert(op.key.as_str());
        n += 1;
    }
    n
}

/// Counters of the write path, for metrics.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Commits made (batches).
    pub commits: AtomicU64,
    /// Writes committed (or failed) in those batches.
    pub writes: AtomicU64,
    /// Batches whose commit failed.
    pub failed_commits: AtomicU64,
    /// Writes refused because the queue was full.
    pub rejected: AtomicU64,
    /// Writes queued now.
    pub queued: AtomicUsize,
    /// The current queue bound.
    pub limit: AtomicUsize,
}

/// A point-in-time copy of [`WriteStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Commits made (batches).
    pub commits: u64,
    /// Writes committed (or failed) in those batches.
    pub writes: u64,
    /// Batches whose commit failed.
    pub failed_commits: u64,
    /// Writes refused because the queue was full.
    pub rejected: u64,
    /// Writes queued now.
    pub queued: usize,
    /// The current queue bound.
    pub limit: usize,
}

impl WriteStats {
    /// The counters now.
    pub fn counts(&self) -> WriteCounts {
        WriteCounts {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            failed_commits: self.failed_commits.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            limit: self.limit.load(Ordering::Relaxed),
        }
    }
}

struct Pending {
    op: WriteOp,
    reply: oneshot::Sender<Result<Option<u64>>>,
}

/// The queue in front of one backend's commits.
pub struct Committer {
    tx: mpsc::Sender<Pending>,
    stats: Arc<WriteStats>,
}

impl Committer {
    /// Starts the committer task on the current Tokio runtime. `commit` applies a batch
    /// atomically and returns, per write, the revision it made (`None` for a delete of an
    /// absent key).
    pub fn start<F, Fut>(limits: Limits, commit: F) -> Self
    where
        F: FnMut(Vec<WriteOp>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Option<u64>>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(limits.max_queue);
        let stats = Arc::new(WriteStats::default());
        stats.limit.store(limits.min_queue, Ordering::Relaxed);
        tokio::spawn(run(rx, limits, stats.clone(), commit));
        Committer { tx, stats }
    }

    /// The write path's counters.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Queues one write and waits until its batch is durable.
    pub async fn write(&self, op: WriteOp) -> Result<Option<u64>> {
        let queued = self.stats.queued.load(Ordering::Relaxed);
        let limit = self.stats.limit.load(Ordering::Relaxed);
        if queued >= limit {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Busy { queued });
        }
        let (reply, answer) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(Pending { op, reply }) {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    StoreError::Busy { queued }
                }
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Unavailable("the store's committer has stopped".into())
                }
            });
        }
        answer.await.map_err(|_| {
            StoreError::Unavailable("the store's committer stopped before answering".into())
        })?
    }
}

async fn run<F, Fut>(
    mut rx: mpsc::Receiver<Pending>,
    limits: Limits,
    stats: Arc<WriteStats>,
    mut commit: F,
) where
    F: FnMut(Vec<WriteOp>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<Option<u64>>>> + Send + 'static,
{
    let mut queue: VecDeque<Pending> = VecDeque::new();
    // Writes per second of commit time, smoothed: what the queue drains at.
    let mut rate: Option<f64> = None;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(p) => queue.push_back(p),
                None => return,
            }
        }
        while queue.len() < limits.max_ops {
            match rx.try_recv() {
                Ok(p) => queue.push_back(p),
                Err(_) => break,
            }
        }
        let n = batch_len(queue.iter().map(|p| &p.op), &limits);
        let (ops, replies): (Vec<WriteOp>, Vec<_>) =
            queue.drain(..n).map(|p| (p.op, p.reply)).unzip();
        let started = Instant::now();
        let result = commit(ops).await;
        let took = started.elapsed().as_secs_f64().max(1e-6);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(n as u64, Ordering::Relaxed);
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        match result {
            Ok(revisions) if revisions.len() == n => {
                for (reply, revision) in replies.into_iter().zip(revisions) {
                    let _ = reply.send(Ok(revision));
                }
            }
            Ok(revisions) => {
                stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "a commit of {n} writes answered {} results",
                    revisions.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Database(message.clone())));
                }
            }
            Err(e) => {
                stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, writes = n, "batch commit failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        // A batch's throughput is its writes over its commit time. Only full enough
        // batches say what the committer can do; a lone write says little.
        if n > 1 || rate.is_none() {
            let sample = n as f64 / took;
            rate = Some(match rate {
                Some(r) => 0.8 * r + 0.2 * sample,
                None => sample,
            });
        }
        if let Some(r) = rate {
            let bound = (r * limits.target_wait.as_secs_f64()) as usize;
            stats.limit.store(
                bound.clamp(limits.min_queue, limits.max_queue),
                Ordering::Relaxed,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(key: &str, len: usize) -> WriteOp {
        WriteOp {
            key: key.to_owned(),
            value: Some(vec![0; len]),
        }
    }

    #[test]
    fn a_batch_stops_before_a_repeated_key() {
        let q = [op("a", 1), op("b", 1), op("a", 2), op("c", 1)];
        assert_eq!(batch_len(&q, &Limits::ETCD), 2);
    }

    #[test]
    fn a_batch_keeps_within_ops_and_bytes_but_always_takes_one() {
        let limits = Limits {
            max_ops: 3,
            max_bytes: 10,
            ..Limits::ETCD
        };
        let q: Vec<_> = (0..5).map(|i| op(&i.to_string(), 1)).collect();
        assert_eq!(batch_len(&q, &limits), 3);
        let big = [op("x", 100), op("y", 1)];
        assert_eq!(batch_len(&big, &limits), 1);
        assert_eq!(batch_len(&[op("a", 4), op("b", 4), op("c", 4)], &limits), 2);
        assert_eq!(batch_len(&[], &limits), 0);
    }

    proptest! {
        #[test]
        fn batches_cover_the_queue_in_order_without_repeated_keys(
            keys in proptest::collection::vec(0u8..12, 0..200),
            max_ops in 1usize..40,
        ) {
            let limits = Limits { max_ops, max_bytes: 64, ..Limits::ETCD };
            let queue: Vec<WriteOp> = keys.iter().map(|k| op(&k.to_string(), (*k as usize) * 3)).collect();
            let mut at = 0;
            while at < queue.len() {
                let n = batch_len(&queue[at..], &limits);
                prop_assert!(n >= 1 && n <= max_ops);
                let batch = &queue[at..at + n];
                let distinct: HashSet<_> = batch.iter().map(|o| &o.key).collect();
                prop_assert_eq!(distinct.len(), n);
                let bytes: usize = batch.iter().map(WriteOp::size).sum();
                prop_assert!(n == 1 || bytes <= 64);
                at += n;
            }
        }
    }

    #[tokio::test]
    async fn writes_that_queue_during_a_commit_share_the_next_one() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let seen = batches.clone();
        let next = Arc::new(AtomicU64::new(0));
        let committer = Arc::new(Committer::start(Limits::EMBEDDED, move |ops| {
            let seen = seen.clone();
            let next = next.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock().unwrap().push(ops.len());
                Ok(ops
                    .iter()
                    .map(|_| Some(next.fetch_add(1, Ordering::Relaxed) + 1))
                    .collect())
            }
        }));
        let mut tasks = Vec::new();
        for i in 0..50 {
            let c = committer.clone();
            tasks.push(tokio::spawn(async move {
                c.write(op(&format!("k{i}"), 1)).await
            }));
        }
        let mut revisions = Vec::new();
        for t in tasks {
            revisions.push(t.await.unwrap().unwrap().unwrap());
        }
        revisions.sort();
        revisions.dedup();
        assert_eq!(revisions.len(), 50, "every write got its own revision");
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 50);
        assert!(
            batches.len() <= 3,
            "50 writes queued behind a 20 ms commit took {} commits: {batches:?}",
            batches.len()
        );
        assert_eq!(committer.stats().counts().queued, 0);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_write_in_it() {
        let committer = Arc::new(Committer::start(Limits::EMBEDDED, |ops| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if ops.iter().any(|o| o.key.starts_with("bad")) {
                Err(StoreError::Database("disk full".into()))
            } else {
                Ok(ops.iter().map(|_| Some(1)).collect())
            }
        }));
        // The first write occupies the committer; the next ten queue into one batch
        // together with a write that makes that batch fail.
        let first = {
            let c = committer.clone();
            tokio::spawn(async move { c.write(op("first", 1)).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let c = committer.clone();
            let key = if i == 5 {
                "bad".to_owned()
            } else {
                format!("k{i}")
            };
            tasks.push(tokio::spawn(async move { c.write(op(&key, 1)).await }));
        }
        assert!(first.await.unwrap().is_ok());
        for t in tasks {
            let err = t.await.unwrap().unwrap_err();
            assert!(
                matches!(&err, StoreError::Database(m) if m.contains("disk full")),
                "{err}"
            );
        }
        let counts = committer.stats().counts();
        assert_eq!((counts.commits, counts.failed_commits), (2, 1));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let limits = Limits {
            min_queue: 4,
            max_queue: 4,
            ..Limits::EMBEDDED
        };
        let (release, gate) = tokio::sync::watch::channel(false);
        let committer = Arc::new(Committer::start(limits, move |ops| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(ops.iter().map(|_| Some(1)).collect())
            }
        }));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let c = committer.clone();
            tasks.push(tokio::spawn(async move {
                c.write(op(&format!("k{i}"), 1)).await
            }));
        }
        // Wait until all four are queued (one may be in the stuck commit).
        for _ in 0..100 {
            if committer.stats().counts().queued == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = committer.write(op("late", 1)).await.unwrap_err();
        assert!(matches!(refused, StoreError::Busy { .. }), "{refused}");
        assert!(refused.is_retryable());
        release.send(true).unwrap();
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(committer.stats().counts().rejected, 1);
        assert!(committer.write(op("after", 1)).await.is_ok());
    }
}
