//! The backup inventory: which archives this node keeps — its replicas' own and the
//! copies it holds for other nodes — reported to the registry (`PUT
//! /v1/nodes/{node}/backups`) for the dashboard's backups page. Each archive is read
//! whole once (digests and every entry, as a restore would) and reported verified or
//! not; a file whose size changes is read again. The report goes when the set
//! changes, and only then: a store write per change, none in a steady state (whether
//! the node is still there is its lease's to say). Verdicts are kept in the data
//! directory with each file's size and modification time, so a restarted agent reads
//! again only what changed (it used to read every archive it keeps after each start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::{BackupInventory, HeldArchive};

use crate::state::Inner;

/// How often the archive directories are looked at.
const PASS: Duration = Duration::from_secs(5);
/// Archives read whole per pass at most (the rest wait for the next).
const VERIFY_PER_PASS: usize = 4;
/// The verdicts kept across restarts, in the agent's data directory.
const VERDICTS_FILE: &str = "archive-verdicts.json";

/// What reading an archive whole said, and of which file state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Verdict {
    bytes: u64,
    /// Modification time, ns since the epoch (0 when the file system gives none).
    mtime_ns: u64,
    verified: bool,
}

/// The size and modification time of `path` now.
fn file_state(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Some((m.len(), mtime))
}

/// Loads the kept verdicts (none if the file is missing or unreadable).
fn load_verdicts(file: &Path) -> HashMap<PathBuf, Verdict> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice::<HashMap<PathBuf, Verdict>>(&b).ok())
        .unwrap_or_default()
}

/// Keeps the verdicts (written whole to a temporary file, then renamed over).
fn save_verdicts(file: &Path, verdicts: &HashMap<PathBuf, Verdict>) {
    let tmp = file.with_extension("json.tmp");
    // Without TLS nothing else makes the data directory.
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let written = serde_json::to_vec(verdicts)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        tracing::debug!(file = %file.display(), error = %e, "keeping archive verdicts failed");
    }
}

impl Inner {
    /// Runs until the task is aborted.
    pub(crate) async fn inventory_loop(self: Arc<Self>) {
        let verdicts_file = self.config.data_dir.join(VERDICTS_FILE);
        let mut checked = load_verdicts(&verdicts_file);
        let mut sent: Option<Vec<HeldArchive>> = None;
        let mut failing = false;
        let mut tick = tokio::time::interval(PASS);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut archives = Vec::new();
            let mut paths = Vec::new();
            // The desired state the reconciler already follows: no registry read per pass.
            for stack in self.desired_now().stacks {
                for (service, d) in &stack.services {
                    let Some(policy) = &d.spec.backup else {
                        continue;
                    };
                    let dir = self.config.backup_dir(&policy.dir);
                    for a in crate::copies::archives_in(&dir, &stack.name, service, None).await {
                        let path = dir.join(&a.name);
                        let now = file_state(&path);
                        let verified = checked
                            .get(&path)
                            .filter(|v| now == Some((v.bytes, v.mtime_ns)))
                            .map(|v| v.verified);
                        paths.push(path);
                        archives.push(HeldArchive {
                            stack: stack.name.clone(),
                            service: service.clone(),
                            replica: a.replica,
                            name: a.name,
                            taken_ms: a.taken_ms,
                            bytes: a.bytes,
                            delta: a.delta,
                            verified,
                        });
                    }
                }
            }
            let unread: Vec<usize> = (0..archives.len())
                .filter(|&i| archives[i].verified.is_none())
                .take(VERIFY_PER_PASS)
                .collect();
            let mut changed = !unread.is_empty();
            for i in unread {
                let path = paths[i].clone();
                // The state before the read: a file that changes while it is read is
                // read again next pass.
                let (bytes, mtime_ns) = file_state(&path).unwrap_or((archives[i].bytes, 0));
                let ok =
                    tokio::task::spawn_blocking(move || crate::backup::verify_file(&path).is_ok())
                        .await
                        .unwrap_or(false);
                checked.insert(
                    paths[i].clone(),
                    Verdict {
                        bytes,
                        mtime_ns,
                        verified: ok,
                    },
                );
                archives[i].verified = Some(ok);
            }
            let listed: std::collections::HashSet<&PathBuf> = paths.iter().collect();
            let before = checked.len();
            // Forget deleted files only: right after a start the desired state may not
            // be known yet, and the kept verdicts must survive that pass.
            checked.retain(|p, _| listed.contains(p) || p.exists());
            changed |= checked.len() != before;
            if changed {
                save_verdicts(&verdicts_file, &checked);
            }
            if sent.as_ref() == Some(&archives) {
                continue;
            }
            let inventory = BackupInventory {
                v: flotilla_core::RECORD_VERSION,
                archives: archives.clone(),
                at_ms: 0,
            };
            match self.client.report_backups(&self.node, &inventory).await {
                Ok(_) => {
                    if failing {
                        tracing::info!("backup inventory reported again");
                    }
                    failing = false;
                    sent = Some(archives);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "backup inventory report failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_survive_a_restart_and_a_changed_file_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.flotilla-backup");
        std::fs::write(&archive, b"bytes").unwrap();
        let (bytes, mtime_ns) = file_state(&archive).unwrap();
        assert_eq!(bytes, 5);
        let file = dir.path().join(VERDICTS_FILE);
        let verdicts = HashMap::from([(
            archive.clone(),
            Verdict {
                bytes,
                mtime_ns,
                verified: true,
            },
        )]);
        save_verdicts(&file, &verdicts);
        assert_eq!(load_verdicts(&file), verdicts);
        std::fs::write(&archive, b"other bytes").unwrap();
        assert_ne!(file_state(&archive), Some((bytes, mtime_ns)));
        std::fs::write(&file, b"{not json").unwrap();
        assert!(load_verdicts(&file).is_empty(), "a damaged file is ignored");
    }
}
