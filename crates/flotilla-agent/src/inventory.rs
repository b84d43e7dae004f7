//! The backup inventory: which archives this node keeps — its replicas' own and the
//! copies it holds for other nodes — reported to the registry (`PUT
//! /v1/nodes/{node}/backups`) for the dashboard's backups page. Each archive is read
//! whole once (digests and every entry, as a restore would) and reported verified or
//! not; a file whose size changes is read again. The report goes when the set
//! changes, and only then: a store write per change, none in a steady state (whether
//! the node is still there is its lease's to say).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::{BackupInventory, HeldArchive};

use crate::state::Inner;

/// How often the archive directories are looked at.
const PASS: Duration = Duration::from_secs(5);
/// Archives read whole per pass at most (the rest wait for the next).
const VERIFY_PER_PASS: usize = 4;

impl Inner {
    /// Runs until the task is aborted.
    pub(crate) async fn inventory_loop(self: Arc<Self>) {
        // Path → (size when read, verified).
        let mut checked: HashMap<PathBuf, (u64, bool)> = HashMap::new();
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
                        let verified = checked
                            .get(&path)
                            .filter(|(bytes, _)| *bytes == a.bytes)
                            .map(|(_, ok)| *ok);
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
            for i in unread {
                let path = paths[i].clone();
                let ok =
                    tokio::task::spawn_blocking(move || crate::backup::verify_file(&path).is_ok())
                        .await
                        .unwrap_or(false);
                checked.insert(paths[i].clone(), (archives[i].bytes, ok));
                archives[i].verified = Some(ok);
            }
            let listed: std::collections::HashSet<&PathBuf> = paths.iter().collect();
            checked.retain(|p, _| listed.contains(p));
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
