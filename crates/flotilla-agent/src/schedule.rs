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

use crate::backup::{self, BackupOptions};
use crate::state::Inner;

/// The file name suffix of an archive.
pub const SUFFIX: &str = ".flotilla-backup";

/// Archives of one replica in `names` (file names), oldest first, with their times.
pub fn archives_of(prefix: &str, names: &[String]) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = names
        .iter()
        .filter_map(|n| {
            let ms = flotilla_core::record::parse_file_stamp(
                n.strip_prefix(prefix)?.strip_suffix(SUFFIX)?,
            )?;
            Some((ms, n.clone()))
        })
        .collect();
    v.sort();
    v
}

/// Whether a backup is due at `now_ms` given the archives so far.
pub fn due(archives: &[(u64, String)], now_ms: u64, interval: Duration) -> bool {
    archives
        .last()
        .is_none_or(|(t, _)| now_ms.saturating_sub(*t) >= interval.as_millis() as u64)
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
        if !due(&archives_of(prefix, &names), now, policy.interval) {
            return Ok(None);
        }
        let stamp = flotilla_core::record::file_stamp(now);
        let file = dir.join(format!("{prefix}{stamp}{SUFFIX}"));
        let t0 = std::time::Instant::now();
        let m = self
            .backup_to_file(
                id,
                &file,
                BackupOptions {
                    consistency: policy.consistency,
                    include_image: true,
                    leave_stopped: false,
                    include_secrets: false,
                },
            )
            .await?;
        tracing::info!(
            file = %file.display(),
            bytes = m.total_size(),
            consistency = m.consistency,
            ms = t0.elapsed().as_millis() as u64,
            "scheduled backup written"
        );
        let names = list_dir(&dir).await?;
        for old in expired(&archives_of(prefix, &names), policy.retention) {
            let _ = tokio::fs::remove_file(dir.join(&old)).await;
        }
        Ok(Some(file))
    }

    /// Writes a backup of container `id` to `file` (via a `.partial` file, so a crash
    /// never leaves something that looks complete).
    pub(crate) async fn backup_to_file(
        &self,
        id: &str,
        file: &Path,
        opts: BackupOptions,
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
        let mut whole = backup::Delta::default();
        let (m, w) = tokio::join!(
            backup::backup(&self.docker, id, source, opts, &mut whole, tx),
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
}
