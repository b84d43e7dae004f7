//! Scheduled backups: each replica of a service with a `[service.NAME.backup]` policy
//! is backed up on its own node every `interval`, keeping `retention` archives.
//!
//! The schedule lives in the archive directory itself — files are named
//! `STACK-SERVICE-REPLICA-YYYYMMDDTHHMMSS.mmmZ.flotilla-backup` (UTC; older unix-ms names are still read) — so an agent restart neither skips
//! nor repeats a backup, and an operator can see the schedule with `ls`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_core::stack::BackupPolicy;
use tokio::io::AsyncWriteExt;

use crate::backup::{self, BackupOptions, Chain};
use crate::state::Inner;

/// The file name suffix of an archive (a full backup).
pub const SUFFIX: &str = ".flotilla-backup";
/// The file name suffix of an incremental backup: what changed since the archive (full
/// or delta) its manifest names as `base`.
pub const DELTA_SUFFIX: &str = ".flotilla-delta";
/// The manifest `source` key naming the archive a delta follows.
pub const BASE_KEY: &str = "base";

/// Files of one replica in `names` ending in `suffix`, oldest first, with their times.
fn stamped(prefix: &str, names: &[String], suffix: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = names
        .iter()
        .filter_map(|n| {
            let ms = flotilla_core::record::parse_file_stamp(
                n.strip_prefix(prefix)?.strip_suffix(suffix)?,
            )?;
            Some((ms, n.clone()))
        })
        .collect();
    v.sort();
    v
}

/// Full archives of one replica in `names` (file names), oldest first, with their times.
pub fn archives_of(prefix: &str, names: &[String]) -> Vec<(u64, String)> {
    stamped(prefix, names, SUFFIX)
}

/// Deltas of one replica in `names`, oldest first, with their times.
pub fn deltas_of(prefix: &str, names: &[String]) -> Vec<(u64, String)> {
    stamped(prefix, names, DELTA_SUFFIX)
}

/// Every backup of one replica in `names`, full or delta, oldest first.
pub fn links_of(prefix: &str, names: &[String]) -> Vec<(u64, String)> {
    let mut v = archives_of(prefix, names);
    v.extend(deltas_of(prefix, names));
    v.sort();
    v
}

/// Whether the next backup of `container` may be a delta: incremental backups are on,
/// the last backup was of this container and is still in the directory (`names`), and
/// the newest full archive is younger than `full_every`.
pub(crate) fn next_is_delta(
    policy: &BackupPolicy,
    chain: Option<&Chain>,
    container: &str,
    names: &[String],
    fulls: &[(u64, String)],
    now_ms: u64,
) -> bool {
    let Some(every) = policy.full_every else {
        return false;
    };
    chain.is_some_and(|c| c.container == container && names.contains(&c.last))
        && fulls
            .last()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) < every.as_millis() as u64)
}

/// The backups of one replica to delete so that `retention` full archives remain: the
/// oldest fulls, and every delta older than the oldest full kept (nothing can restore
/// from a delta whose full is gone).
pub fn to_delete(prefix: &str, names: &[String], retention: u32) -> Vec<String> {
    let fulls = archives_of(prefix, names);
    let mut out = expired(&fulls, retention);
    let oldest_kept = fulls.get(out.len()).map(|(t, _)| *t);
    for (t, name) in deltas_of(prefix, names) {
        if oldest_kept.is_none_or(|kept| t < kept) {
            out.push(name);
        }
    }
    out
}

/// Whether a backup is due at `now_ms` given the archives so far.
pub fn due(archives: &[(u64, String)], now_ms: u64, interval: Duration) -> bool {
    due_since(archives.last().map(|(t, _)| *t), now_ms, interval)
}

/// Whether a backup is due at `now_ms` when the last one (or the last check that found
/// nothing to back up) was at `last_ms`.
pub fn due_since(last_ms: Option<u64>, now_ms: u64, interval: Duration) -> bool {
    last_ms.is_none_or(|t| now_ms.saturating_sub(t) >= interval.as_millis() as u64)
}

/// The archives to delete so that `retention` remain (the oldest go).
pub fn expired(archives: &[(u64, String)], retention: u32) -> Vec<String> {
    let keep = retention as usize;
    if archives.len() <= keep {
        return Vec::new();
    }
    archives[..archives.len() - keep]
        .iter()
        .map(|(_, n)| n.clone())
        .collect()
}

impl Inner {
    /// Checks every second which local replicas are due a backup.
    pub(crate) async fn backup_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.scheduled_backups().await {
                tracing::debug!(error = format!("{e:#}"), "scheduled backups");
            }
        }
    }

    async fn scheduled_backups(&self) -> anyhow::Result<()> {
        let (_, stacks) = self.client.stacks(0, Duration::ZERO).await?;
        // Most stacks have no schedule: ask the engine nothing then.
        let any = stacks
            .iter()
            .any(|s| s.services.values().any(|svc| svc.spec.backup.is_some()));
        if !any {
            return Ok(());
        }
        for l in self.stack_containers().await? {
            if !l.running {
                continue;
            }
            let Some(policy) = stacks
                .iter()
                .find(|s| s.name == l.stack)
                .and_then(|s| s.services.get(&l.service))
                .and_then(|s| s.spec.backup.clone())
            else {
                continue;
            };
            let prefix = flotilla_core::recovery::archive_prefix(&l.stack, &l.service, l.replica);
            let due = self.backup_if_due(&l.id, &prefix, &policy).await;
            match due {
                Ok(Some(file)) => {
                    self.ship_copies(&l.stack, &l.service, &prefix, &file, &policy)
                        .await
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        replica = prefix,
                        error = format!("{e:#}"),
                        "scheduled backup failed"
                    )
                }
            }
        }
        Ok(())
    }

    async fn backup_if_due(
        &self,
        id: &str,
        prefix: &str,
        policy: &BackupPolicy,
    ) -> anyhow::Result<Option<PathBuf>> {
        let dir = self.config.backup_dir(&policy.dir);
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        let names = list_dir(&dir).await?;
        let now = flotilla_core::record::unix_ms();
        let mut chains = self.chains.lock().await;
        let checked = chains
            .get(prefix)
            .filter(|c| c.container == id)
            .map(|c| c.checked_ms);
        let newest = links_of(prefix, &names).last().map(|(t, _)| *t);
        if !due_since(newest.max(checked), now, policy.interval) {
            return Ok(None);
        }
        let stamp = flotilla_core::record::file_stamp(now);
        let chain = chains.remove(prefix);
        let incremental = next_is_delta(
            policy,
            chain.as_ref(),
            id,
            &names,
            &archives_of(prefix, &names),
            now,
        );
        let (file, mut delta, base) = match chain {
            Some(c) if incremental => (
                dir.join(format!("{prefix}{stamp}{DELTA_SUFFIX}")),
                backup::Delta {
                    since: Some(c.volumes),
                    taken: Default::default(),
                },
                Some(c.last),
            ),
            _ => (
                dir.join(format!("{prefix}{stamp}{SUFFIX}")),
                backup::Delta::default(),
                None,
            ),
        };
        let t0 = std::time::Instant::now();
        // On failure the chain stays removed: the next backup is a full one.
        let m = self
            .backup_to_file(
                id,
                &file,
                BackupOptions {
                    consistency: policy.consistency,
                    // A delta follows a full archive, which carries the image.
                    include_image: base.is_none(),
                    leave_stopped: false,
                    include_secrets: false,
                },
                &mut delta,
                base.as_deref(),
            )
            .await?;
        if let (Some(since), Some(base)) = (&delta.since, &base) {
            if *since == delta.taken {
                // Nothing changed: the last link already is this point in time.
                let _ = tokio::fs::remove_file(&file).await;
                tracing::debug!(replica = prefix, "no change since the last backup");
                chains.insert(
                    prefix.to_owned(),
                    Chain {
                        container: id.to_owned(),
                        last: base.clone(),
                        volumes: delta.taken,
                        checked_ms: now,
                    },
                );
                return Ok(None);
            }
        }
        tracing::info!(
            file = %file.display(),
            bytes = m.total_size(),
            consistency = m.consistency,
            delta = base.is_some(),
            ms = t0.elapsed().as_millis() as u64,
            "scheduled backup written"
        );
        if policy.full_every.is_some() {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            chains.insert(
                prefix.to_owned(),
                Chain {
                    container: id.to_owned(),
                    last: name,
                    volumes: delta.taken,
                    checked_ms: now,
                },
            );
        }
        drop(chains);
        let names = list_dir(&dir).await?;
        for old in to_delete(prefix, &names, policy.retention) {
            let _ = tokio::fs::remove_file(dir.join(&old)).await;
        }
        Ok(Some(file))
    }

    /// Writes a backup of container `id` to `file` (via a `.partial` file, so a crash
    /// never leaves something that looks complete).
    /// `delta.since` set: only what changed since (a delta whose manifest names `base`);
    /// `delta.taken` is filled with what each volume holds now.
    pub(crate) async fn backup_to_file(
        &self,
        id: &str,
        file: &Path,
        opts: BackupOptions,
        delta: &mut backup::Delta,
        base: Option<&str>,
    ) -> anyhow::Result<flotilla_archive::Manifest> {
        let part = file.with_extension("partial");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let mut out = tokio::fs::File::from_std(flotilla_archive::create_archive_file(&part)?);
        let writer = async {
            while let Some(b) = rx.recv().await {
                out.write_all(&b).await?;
            }
            out.sync_all().await?;
            anyhow::Ok(())
        };
        let mut source = serde_json::Map::new();
        source.insert("node".into(), self.node.clone().into());
        source.insert("container_id".into(), id.into());
        source.insert("scheduled".into(), true.into());
        if let Some(base) = base {
            source.insert(BASE_KEY.into(), base.into());
        }
        let (m, w) = tokio::join!(
            backup::backup(&self.docker, id, source, opts, delta, tx),
            writer
        );
        match (m, w) {
            (Ok(m), Ok(())) => {
                tokio::fs::rename(&part, file).await?;
                self.metrics.backups.inc();
                Ok(m)
            }
            (Err(e), _) | (_, Err(e)) => {
                let _ = tokio::fs::remove_file(&part).await;
                Err(e)
            }
        }
    }
}

/// The names of the entries of `dir`.
pub async fn list_dir(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut rd = tokio::fs::read_dir(dir).await?;
    while let Some(e) = rd.next_entry().await? {
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn schedule_from_file_names() {
        let files = names(&[
            "demo-notes-0-3000.flotilla-backup",
            "demo-notes-0-1000.flotilla-backup",
            "demo-notes-10-500.flotilla-backup",
            "demo-notes-0-2000.partial",
            "demo-notes-0-x.flotilla-backup",
        ]);
        let a = archives_of("demo-notes-0-", &files);
        assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1000, 3000]);
        let hour = Duration::from_secs(3600);
        assert!(!due(&a, 3000 + 3_599_999, hour));
        assert!(due(&a, 3000 + 3_600_000, hour));
        assert!(due(&[], 0, hour), "never backed up: due at once");
        assert!(expired(&a, 2).is_empty());
        assert_eq!(expired(&a, 1), vec!["demo-notes-0-1000.flotilla-backup"]);
    }

    fn policy(full_every: Option<u64>) -> BackupPolicy {
        let text = match full_every {
            Some(s) => format!("interval = \"1s\"\ndir = \"/b\"\nfull_every = \"{s}s\""),
            None => "interval = \"1s\"\ndir = \"/b\"".to_owned(),
        };
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_delta_follows_only_its_own_chain_within_full_every() {
        let names = names(&["db-n-0-1000.flotilla-backup", "db-n-0-2000.flotilla-delta"]);
        let fulls = archives_of("db-n-0-", &names);
        let chain = Chain {
            container: "c1".into(),
            last: "db-n-0-2000.flotilla-delta".into(),
            volumes: Default::default(),
            checked_ms: 2000,
        };
        let p = policy(Some(60));
        assert!(next_is_delta(&p, Some(&chain), "c1", &names, &fulls, 3000));
        // Not incremental, no chain (an agent restart), another container, the last
        // link gone from the directory, or the full too old: a full one.
        assert!(!next_is_delta(
            &policy(None),
            Some(&chain),
            "c1",
            &names,
            &fulls,
            3000
        ));
        assert!(!next_is_delta(&p, None, "c1", &names, &fulls, 3000));
        assert!(!next_is_delta(&p, Some(&chain), "c2", &names, &fulls, 3000));
        assert!(!next_is_delta(
            &p,
            Some(&chain),
            "c1",
            &names[..1],
            &fulls,
            3000
        ));
        assert!(!next_is_delta(
            &p,
            Some(&chain),
            "c1",
            &names,
            &fulls,
            61_000
        ));
        // The schedule counts deltas too.
        let links = links_of("db-n-0-", &names);
        assert_eq!(links.len(), 2);
        assert!(!due(&links, 2500, Duration::from_secs(1)));
        // A look that found nothing to keep counts as a backup for the schedule.
        let second = Duration::from_secs(1);
        assert!(due_since(Some(2000), 3000, second));
        assert!(!due_since(Some(2000).max(Some(2600)), 3000, second));
        assert!(due_since(None, 0, second));
    }

    #[test]
    fn retention_counts_fulls_and_takes_their_deltas_with_them() {
        let names = names(&[
            "db-n-0-1000.flotilla-backup",
            "db-n-0-1500.flotilla-delta",
            "db-n-0-2000.flotilla-backup",
            "db-n-0-2500.flotilla-delta",
            "db-n-0-3000.flotilla-delta",
            "db-n-1-500.flotilla-delta",
        ]);
        let mut gone = to_delete("db-n-0-", &names, 1);
        gone.sort();
        assert_eq!(
            gone,
            ["db-n-0-1000.flotilla-backup", "db-n-0-1500.flotilla-delta"]
        );
        assert!(to_delete("db-n-0-", &names, 2).is_empty());
        // Deltas with no full at all restore nothing.
        assert_eq!(
            to_delete("db-n-1-", &names, 7),
            ["db-n-1-500.flotilla-delta"]
        );
    }
}
