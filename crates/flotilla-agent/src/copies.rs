//! Backups that outlive their host: each scheduled backup of a replica is also stored
//! on `copies` other nodes (`[service.NAME.backup] copies = N`), and any node can list
//! and fetch a replica's archives from its peers when it has to restore it.
//!
//! Archives live in the service's backup `dir` on every node, under the same names
//! (`STACK-SERVICE-REPLICA-STAMP.flotilla-backup`, see [`flotilla_core::record::file_stamp`]), so retention and `ls` work the same
//! on the copies. A peer never names a path: the directory comes from the stack record
//! in the registry, the file name is checked against the replica's pattern, and an
//! arriving copy is checked whole (digests, every volume entry) before it is kept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use flotilla_core::stack::{BackupPolicy, StackRecord};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::schedule::{list_dir, to_delete, DELTA_SUFFIX, SUFFIX};
use crate::state::Inner;

pub use flotilla_client::agent::ArchiveEntry;

/// The replica and time an archive name stands for, if `file` is an archive (full or
/// delta) of a replica of `stack`/`service` (and nothing else: no separators, no other
/// suffix).
pub fn parse_archive_name(stack: &str, service: &str, file: &str) -> Option<(u32, u64)> {
    let rest = file.strip_prefix(&format!("{stack}-{service}-"))?;
    let rest = rest
        .strip_suffix(SUFFIX)
        .or_else(|| rest.strip_suffix(DELTA_SUFFIX))?;
    let (r, stamp) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(r) {
        return None;
    }
    Some((
        r.parse().ok()?,
        flotilla_core::record::parse_file_stamp(stamp)?,
    ))
}

pub use flotilla_core::recovery::copy_holders as copy_targets;

/// The backup policy of `stack`/`service` in `stacks`.
pub fn policy_of<'a>(
    stacks: &'a [StackRecord],
    stack: &str,
    service: &str,
) -> Option<&'a BackupPolicy> {
    stacks
        .iter()
        .find(|s| s.name == stack)?
        .services
        .get(service)?
        .spec
        .backup
        .as_ref()
}

/// The archives of `stack`/`service` (one replica, or all) in `dir`, oldest first.
pub async fn archives_in(
    dir: &Path,
    stack: &str,
    service: &str,
    replica: Option<u32>,
) -> Vec<ArchiveEntry> {
    let names = list_dir(dir).await.unwrap_or_default();
    let mut out = Vec::new();
    for name in names {
        let Some((r, ms)) = parse_archive_name(stack, service, &name) else {
            continue;
        };
        if replica.is_some_and(|want| want != r) {
            continue;
        }
        let Ok(meta) = tokio::fs::metadata(dir.join(&name)).await else {
            continue;
        };
        out.push(ArchiveEntry {
            delta: name.ends_with(DELTA_SUFFIX),
            name,
            replica: r,
            taken_ms: ms,
            bytes: meta.len(),
            verified: None,
        });
    }
    out.sort_by_key(|a| (a.taken_ms, a.replica));
    out
}

impl Inner {
    /// The stacks as the registry has them now, else as the last reconcile pass saw them.
    pub(crate) async fn current_stacks(&self) -> Vec<StackRecord> {
        match self.client.stacks(0, Duration::ZERO).await {
            Ok((_, s)) => s,
            Err(_) => self.desired_now().stacks,
        }
    }

    /// Sends the archive `file` of replica `prefix` to the peers that keep its copies.
    /// A copy that fails is logged and tried again with the next backup; the archive
    /// itself is safe on this node either way.
    pub(crate) async fn ship_copies(
        &self,
        stack: &str,
        service: &str,
        prefix: &str,
        file: &Path,
        policy: &BackupPolicy,
    ) {
        if policy.copies == 0 {
            return;
        }
        let Ok(nodes) = self.client.nodes().await else {
            tracing::warn!(
                replica = prefix,
                "backup copies: the registry is not reachable"
            );
            return;
        };
        let live: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let targets = copy_targets(prefix, &self.node, &live, policy.copies);
        if (targets.len() as u32) < policy.copies {
            tracing::warn!(
                replica = prefix,
                wanted = policy.copies,
                peers = targets.len(),
                "fewer other nodes than backup copies: keeping what it can"
            );
        }
        let Some(name) = file.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return;
        };
        for node in targets {
            let Some(api) = nodes
                .iter()
                .find(|n| n.name == node)
                .and_then(|n| n.api.clone())
            else {
                tracing::warn!(node, "backup copies: the node serves no agent API");
                continue;
            };
            let sent = async {
                let f = tokio::fs::File::open(file).await?;
                self.peer(&api)
                    .put_copy(stack, service, &name, reqwest::Body::from(f))
                    .await?;
                anyhow::Ok(())
            };
            match sent.await {
                Ok(()) => {
                    self.metrics.copies_sent.inc();
                    tracing::debug!(node, archive = name, "backup copy stored");
                }
                Err(e) => tracing::warn!(
                    node,
                    archive = name,
                    error = format!("{e:#}"),
                    "backup copy failed"
                ),
            }
        }
    }

    /// Keeps a copy that arrived (already checked whole, spooled at `spool`) as
    /// `dir/name`, then applies the replica's retention to the copies here.
    pub(crate) async fn keep_copy(
        &self,
        spool: &Path,
        dir: &Path,
        name: &str,
        prefix: &str,
        retention: u32,
    ) -> anyhow::Result<()> {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        // Copied (the spool may be on another file system), synced, then renamed: a
        // crash never leaves something that looks like a whole archive.
        let partial = dir.join(format!("{name}.partial"));
        let mut from = tokio::fs::File::open(spool).await?;
        let mut to = tokio::fs::File::create(&partial).await?;
        tokio::io::copy(&mut from, &mut to).await?;
        to.flush().await?;
        to.sync_all().await?;
        tokio::fs::rename(&partial, dir.join(name)).await?;
        self.metrics.copies_received.inc();
        let names = list_dir(dir).await?;
        for old in to_delete(prefix, &names, retention) {
            let _ = tokio::fs::remove_file(dir.join(&old)).await;
        }
        Ok(())
    }

    /// Downloads `name` of `stack`/`service` from the peer agent at `api` into this
    /// node's work directory; the caller verifies it and removes it.
    pub(crate) async fn fetch_archive(
        &self,
        api: &str,
        stack: &str,
        service: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let resp = self.peer(api).backup_file(stack, service, name).await?;
        let dir = PathBuf::from(&self.config.work_dir).join("recovery");
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("{}-{name}", std::process::id()));
        let mut out = tokio::fs::File::create(&path).await?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => out.write_all(&c).await?,
                Err(e) => {
                    drop(out);
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(e.into());
                }
            }
        }
        out.flush().await?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_parsed_strictly() {
        assert_eq!(
            parse_archive_name("db", "notes", "db-notes-2-1700000000000.flotilla-backup"),
            Some((2, 1_700_000_000_000))
        );
        assert_eq!(
            parse_archive_name(
                "db",
                "notes",
                "db-notes-2-20231114T221320.000Z.flotilla-backup"
            ),
            Some((2, 1_700_000_000_000))
        );
        assert_eq!(
            parse_archive_name(
                "db",
                "notes",
                "db-notes-2-20231114T221320.000Z.flotilla-delta"
            ),
            Some((2, 1_700_000_000_000))
        );
        for bad in [
            "db-notes-2-1700.flotilla-backup.partial",
            "db-notes-2-1700.flotilla-delta.partial",
            "db-notes-2-1700.flotilla-deltas",
            "db-notes--1700.flotilla-backup",
            "db-notes-x-1700.flotilla-backup",
            "db-notes-2-17/00.flotilla-backup",
            "db-other-2-1700.flotilla-backup",
            "../db-notes-2-1700.flotilla-backup",
            "db-notes-2-1700-1.flotilla-backup",
            "db-notes-2-20231114T221320Z.flotilla-backup",
            "db-notes-2-20231114T22:13:20.000Z.flotilla-backup",
        ] {
            assert_eq!(parse_archive_name("db", "notes", bad), None, "{bad}");
        }
    }

    #[test]
    fn copies_go_to_other_nodes_and_stay_put_while_the_nodes_do() {
        let live: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let t = copy_targets("db-notes-0-", "a", &live, 2);
        assert_eq!(t.len(), 2);
        assert!(!t.contains(&"a".to_string()));
        assert_eq!(t, copy_targets("db-notes-0-", "a", &live, 2));
        // Asking for more copies than peers keeps what it can.
        assert_eq!(copy_targets("db-notes-0-", "a", &live, 9).len(), 3);
        // A node leaving moves only the copies it held.
        let fewer: Vec<String> = live.iter().filter(|n| **n != t[1]).cloned().collect();
        assert_eq!(copy_targets("db-notes-0-", "a", &fewer, 2)[0], t[0]);
    }
}
