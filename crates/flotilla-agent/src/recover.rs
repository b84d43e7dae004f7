//! The agent's side of key-node recovery ([`flotilla_core::recovery`]).
//!
//! - **Fencing**: once this node's last successful lease renewal is older than the
//!   lease TTL, the registry has given the node up (or is about to), and a stateful
//!   replica with a `restore`/`empty` policy may be started elsewhere after its grace.
//!   So the node stops those replicas itself, first: it measures from when it *sent*
//!   the renewal, the registry from when it received it, so the node always acts
//!   earlier (the timing argument is in docs/spec.md).
//! - **Orphans**: a copy made under an older assignment generation is stale (the
//!   replica was recovered elsewhere meanwhile); it is stopped and kept, never started
//!   and never removed (`flotilla rm --orphans` is the operator's call).
//! - **Restore**: the first container of a generation made by a `restore` recovery is
//!   filled from the newest archive of the replica that verifies, wherever it is (this
//!   node's backup directory, or a peer's copy); an archive that fails verification is
//!   skipped for the next older one, and the container's labels say what was used.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_core::recovery::{self, OnNodeLoss, Recovered, FENCE_STOP_TIMEOUT};
use flotilla_core::stack::{DeployedService, StackRecord};

use crate::backup;
use crate::copies::{archives_in, ArchiveEntry};
use crate::plan::Local;
use crate::reconcile::volume_name;
use crate::state::{Desired, Inner};

/// The container label that becomes instance meta `key` (what a restored replica
/// carries for `flotilla ps`: [`flotilla_core::recovery::meta`]).
fn meta_label(key: &str) -> String {
    format!("{}{key}", crate::labels::META)
}

pub use flotilla_client::agent::Orphan;

/// Writes `value` as JSON to `path` (mode 0600, via a temporary file and a rename).
fn write_private<T: serde::Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(value)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// One delta of a restore's chain, checked and ready to apply.
struct ChainLink {
    name: String,
    taken_ms: u64,
    path: PathBuf,
    /// Fetched from a peer into the work directory (removed afterwards).
    fetched: bool,
    manifest: flotilla_archive::Manifest,
}

/// The deltas a restore applies on top of its full archive.
#[derive(Default)]
struct DeltaChain {
    links: Vec<ChainLink>,
    /// Why the chain ends before the newest delta, if it does.
    broken: Option<String>,
}

impl DeltaChain {
    async fn remove_fetched(&self) {
        for l in self.links.iter().filter(|l| l.fetched) {
            let _ = tokio::fs::remove_file(&l.path).await;
        }
    }
}

/// Where an archive of a replica is.
#[derive(Debug, Clone)]
enum Source {
    /// In this node's backup directory.
    Here(PathBuf),
    /// On a peer: its name and API URL.
    Peer(String, String),
}

impl Inner {
    /// Notes that the lease held as of a request sent at `sent`.
    pub(crate) fn lease_held_since(&self, sent: Instant) {
        let mut at = self.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_none_or(|t| t < sent) {
            *at = Some(sent);
        }
    }

    /// Whether this node's lease has lapsed by its own clock (no renewal sent within
    /// the last TTL succeeded): it must not run replicas another node may be given.
    pub(crate) fn fenced_now(&self) -> bool {
        self.renewed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= self.config.lease_ttl)
    }

    /// Forgets that `id` was stopped by fencing; says whether it was.
    pub(crate) fn unfence(&self, id: &str) -> bool {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Keeps the desired state a reconcile pass read, for fencing while the registry
    /// cannot be reached.
    pub(crate) fn remember_desired(
        &self,
        stacks: &[StackRecord],
        assignments: &flotilla_client::Assignments,
    ) {
        let next = Desired {
            stacks: stacks.to_vec(),
            assignments: assignments.clone(),
        };
        let mut held = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        if *held == next {
            return;
        }
        // Kept on disk too (when it changes): an agent restarted while its host is cut
        // off has no registry to ask what to fence.
        if let Err(e) = write_private(&self.desired_file(), &next) {
            tracing::debug!(
                error = format!("{e:#}"),
                "keeping the desired state on disk"
            );
        }
        *held = next;
    }

    fn desired_file(&self) -> PathBuf {
        self.config.data_dir.join("desired.json")
    }

    /// Starts fencing before the node has registered: with the desired state kept on
    /// disk, and the lease counted as held from now for one TTL (a restarted agent
    /// that cannot reach the registry within a TTL stops what would be recovered
    /// elsewhere, as if its lease had lapsed — which, for the registry, it has).
    pub(crate) fn fence_from_start(self: &std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        if let Ok(text) = std::fs::read(self.desired_file()) {
            match serde_json::from_slice::<Desired>(&text) {
                Ok(d) => *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = d,
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable desired.json"),
            }
        }
        self.lease_held_since(Instant::now());
        tokio::spawn(self.clone().fence_loop())
    }

    /// Stops every running stateful replica that would be recovered elsewhere, as soon
    /// as this node's lease has lapsed; checks every 100 ms.
    pub(crate) async fn fence_loop(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.fenced_now() {
                continue;
            }
            if let Err(e) = self.fence().await {
                tracing::warn!(error = format!("{e:#}"), "fencing failed");
            }
        }
    }

    async fn fence(&self) -> anyhow::Result<()> {
        let desired = self.desired_now();
        for l in self.stack_containers().await? {
            if !l.running {
                continue;
            }
            let policy = desired
                .stacks
                .iter()
                .find(|s| s.name == l.stack)
                .and_then(|s| s.services.get(&l.service))
                .and_then(|s| recovery::on_node_loss(&s.spec));
            if !matches!(policy, Some(OnNodeLoss::Restore | OnNodeLoss::Empty)) {
                continue;
            }
            tracing::warn!(
                container = l.name,
                ttl_ms = self.config.lease_ttl.as_millis() as u64,
                "lease lapsed: stopping this stateful replica before it is recovered elsewhere"
            );
            self.fenced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(l.id.clone());
            self.stop_quickly(&l.id)
                .await
                .with_context(|| format!("stopping {}", l.name))?;
            self.metrics.fenced.inc();
        }
        Ok(())
    }

    /// Stops stale copies (made under an older assignment generation) and keeps them.
    pub(crate) async fn keep_stale(&self, stale: Vec<Local>) {
        for l in stale {
            if !l.running {
                continue;
            }
            tracing::warn!(
                container = l.name,
                generation = l.generation.unwrap_or(1),
                "stale copy of a replica recovered elsewhere: stopped and kept as an orphan"
            );
            match self.stop_quickly(&l.id).await {
                Ok(()) => {
                    self.metrics.orphans_kept.inc();
                }
                Err(e) => tracing::warn!(container = l.name, error = %e, "stopping a stale copy"),
            }
        }
    }

    /// Copies on this engine made under an older generation than their replica's
    /// assignment (the registry's now, else the last pass's): kept, stopped, until an
    /// operator removes them.
    pub(crate) async fn orphans(&self) -> anyhow::Result<Vec<Orphan>> {
        let assignments = match self.client.assignments(0, Duration::ZERO).await {
            Ok((_, a)) => a,
            Err(_) => self.desired_now().assignments,
        };
        let mut out = Vec::new();
        for l in self.stack_containers().await? {
            let key = recovery::replica_key(&l.stack, &l.service, l.replica);
            let Some(a) = assignments.get(&key) else {
                continue;
            };
            let generation = l.generation.unwrap_or(1);
            if generation < a.generation {
                out.push(Orphan {
                    replica: key,
                    container: l.name,
                    id: l.id,
                    generation,
                    current: a.generation,
                    running: l.running,
                });
            }
        }
        Ok(out)
    }

    /// Stops a container, killing it after [`FENCE_STOP_TIMEOUT`]: the bound the
    /// fencing argument counts on.
    async fn stop_quickly(&self, id: &str) -> Result<(), bollard::errors::Error> {
        let t = FENCE_STOP_TIMEOUT.as_secs() as i64;
        self.docker
            .stop_container(id, Some(bollard::container::StopContainerOptions { t }))
            .await
    }

    /// Whether replica `r`'s volumes of `generation` already exist on this engine.
    pub(crate) async fn has_volumes(
        &self,
        stack: &str,
        service: &str,
        svc: &DeployedService,
        r: u32,
        generation: u64,
    ) -> bool {
        for v in &svc.spec.volumes {
            let name = volume_name(stack, service, r, &v.name, generation);
            if self.docker.inspect_volume(&name).await.is_err() {
                return false;
            }
        }
        !svc.spec.volumes.is_empty()
    }

    /// Every archive of replica `r` of `stack`/`service` this node and its peers hold,
    /// newest first.
    async fn archives_everywhere(
        &self,
        stack: &str,
        service: &str,
        r: u32,
        dir: &str,
    ) -> Vec<(ArchiveEntry, Source)> {
        let dir = self.config.backup_dir(dir);
        let mut out: Vec<(ArchiveEntry, Source)> = archives_in(&dir, stack, service, Some(r))
            .await
            .into_iter()
            .map(|a| {
                let path = dir.join(&a.name);
                (a, Source::Here(path))
            })
            .collect();
        let nodes = self.client.nodes().await.unwrap_or_default();
        for n in nodes.iter().filter(|n| n.name != self.node) {
            let Some(api) = &n.api else { continue };
            let q = flotilla_client::agent::BackupsQuery {
                replica: Some(r),
                verify: false,
            };
            match self.peer(api).backups(stack, service, &q).await {
                Ok(list) => out.extend(
                    list.into_iter()
                        .filter(|a| a.replica == r)
                        .map(|a| (a, Source::Peer(n.name.clone(), api.clone()))),
                ),
                Err(e) => tracing::warn!(node = n.name, error = %e, "listing a peer's backups"),
            }
        }
        // Newest first; a copy here before the same archive on a peer.
        out.sort_by(|a, b| {
            b.0.taken_ms
                .cmp(&a.0.taken_ms)
                .then_with(|| matches!(b.1, Source::Here(_)).cmp(&matches!(a.1, Source::Here(_))))
        });
        out
    }

    /// Creates replica `r` of generation `generation` with its volumes filled from the
    /// newest archive that verifies (or the one `recovered.archive` names); nothing is
    /// left behind when none does.
    pub(crate) async fn restore_replica(
        &self,
        st: &StackRecord,
        name: &str,
        svc: &DeployedService,
        r: u32,
        generation: u64,
        recovered: &Recovered,
    ) -> anyhow::Result<String> {
        let policy = svc
            .spec
            .backup
            .as_ref()
            .context("the service has no backup policy to restore from")?;
        let everything = self
            .archives_everywhere(&st.name, name, r, &policy.dir)
            .await;
        let (deltas, mut candidates): (Vec<_>, Vec<_>) =
            everything.into_iter().partition(|(a, _)| a.delta);
        // `--from` a full archive restores exactly that point; `--from` a delta, the
        // chain up to it (on the newest full before it).
        let mut until = None;
        if let Some(wanted) = &recovered.archive {
            match deltas.iter().find(|(a, _)| &a.name == wanted) {
                Some((d, _)) => {
                    until = Some(d.taken_ms);
                    candidates.retain(|(a, _)| a.taken_ms < d.taken_ms);
                }
                None => {
                    until = Some(0);
                    candidates.retain(|(a, _)| &a.name == wanted);
                }
            }
        }
        // Archives refused (`NAME@NODE`): a copy of the same archive on another node is
        // a separate file and is tried on its own.
        let mut skipped: Vec<String> = Vec::new();
        for (archive, source) in candidates {
            let (path, fetched, from) = match &source {
                Source::Here(p) => (p.clone(), false, self.node.clone()),
                Source::Peer(node, api) => {
                    match self.fetch_archive(api, &st.name, name, &archive.name).await {
                        Ok(p) => (p, true, node.clone()),
                        Err(e) => {
                            tracing::warn!(
                                archive = archive.name,
                                node,
                                error = format!("{e:#}"),
                                "fetching a backup failed; trying the next"
                            );
                            continue;
                        }
                    }
                }
            };
            let check = path.clone();
            let verified = tokio::task::spawn_blocking(move || backup::verify_file(&check)).await?;
            let result = match verified {
                Err(e) => Err(e),
                Ok(_) => {
                    use flotilla_core::recovery::meta;
                    // The deltas that follow this archive, checked before anything is
                    // created: the container's labels say what it was restored to.
                    let chain = self
                        .delta_chain(&st.name, name, &archive, &deltas, until)
                        .await;
                    let (restored, taken_ms) = match chain.links.last() {
                        Some(last) => (
                            format!(
                                "{}@{from} + {} deltas to {}",
                                archive.name,
                                chain.links.len(),
                                last.name
                            ),
                            last.taken_ms,
                        ),
                        None => (format!("{}@{from}", archive.name), archive.taken_ms),
                    };
                    let extra = vec![
                        (meta_label(meta::RESTORED_FROM), restored),
                        (meta_label(meta::RESTORED_TAKEN_MS), taken_ms.to_string()),
                        (
                            meta_label(meta::LOST_AT_MS),
                            recovered.lost_at_ms.to_string(),
                        ),
                    ]
                    .into_iter()
                    .chain(
                        (!skipped.is_empty())
                            .then(|| (meta_label(meta::RESTORE_SKIPPED), skipped.join(","))),
                    )
                    .chain(
                        chain
                            .broken
                            .as_ref()
                            .map(|why| (meta_label(meta::CHAIN_BROKEN), why.clone())),
                    )
                    .collect();
                    let made = self
                        .restore_into_new(st, name, svc, r, generation, extra, &path)
                        .await;
                    let applied = match made {
                        Ok(id) => match self.apply_chain(&id, &chain).await {
                            Ok(()) => Ok(id),
                            Err(e) => {
                                // Half a chain is no point in time: nothing stays, and
                                // the next older archive is tried.
                                let _ = backup::remove_with_volumes(&self.docker, &id).await;
                                Err(e)
                            }
                        },
                        Err(e) => Err(e),
                    };
                    chain.remove_fetched().await;
                    applied
                }
            };
            if fetched {
                let _ = tokio::fs::remove_file(&path).await;
            }
            match result {
                Ok(id) => {
                    self.metrics.recoveries.inc();
                    tracing::warn!(
                        replica = recovery::replica_key(&st.name, name, r),
                        archive = archive.name,
                        from,
                        taken_ms = archive.taken_ms,
                        lost_at_ms = recovered.lost_at_ms,
                        skipped = skipped.len(),
                        "replica restored from its newest verified backup"
                    );
                    return Ok(id);
                }
                Err(e) => {
                    self.metrics.recovery_refused.inc();
                    tracing::warn!(
                        archive = archive.name,
                        from,
                        error = format!("{e:#}"),
                        "backup refused; trying the next older one"
                    );
                    skipped.push(format!("{}@{from}", archive.name));
                }
            }
        }
        anyhow::bail!(
            "no verified backup of replica {} to restore (refused: {:?}); not starting it empty",
            recovery::replica_key(&st.name, name, r),
            skipped
        )
    }

    /// The deltas that follow `full` in order (taken after it, up to `until` if set),
    /// each fetched if it is on a peer, verified whole, and checked to name the link
    /// before it as its base; the chain ends at the first that fails, and says why.
    async fn delta_chain(
        &self,
        stack: &str,
        service: &str,
        full: &ArchiveEntry,
        deltas: &[(ArchiveEntry, Source)],
        until: Option<u64>,
    ) -> DeltaChain {
        // By time, then name; each with every place it is found (here first).
        let mut by_name: std::collections::BTreeMap<(u64, String), Vec<&Source>> =
            Default::default();
        for (a, src) in deltas {
            if a.taken_ms > full.taken_ms && until.is_none_or(|u| a.taken_ms <= u) {
                by_name
                    .entry((a.taken_ms, a.name.clone()))
                    .or_default()
                    .push(src);
            }
        }
        let mut chain = DeltaChain::default();
        let mut base = full.name.clone();
        for ((taken_ms, name), sources) in by_name {
            let mut last_error = String::from("not found");
            let mut link = None;
            for src in sources {
                let (path, fetched) = match src {
                    Source::Here(p) => (p.clone(), false),
                    Source::Peer(_, api) => {
                        match self.fetch_archive(api, stack, service, &name).await {
                            Ok(p) => (p, true),
                            Err(e) => {
                                last_error = format!("fetching: {e:#}");
                                continue;
                            }
                        }
                    }
                };
                let check = path.clone();
                let verified = tokio::task::spawn_blocking(move || backup::verify_file(&check))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                let manifest = match verified {
                    Ok(m) => m,
                    Err(e) => {
                        last_error = format!("{e:#}");
                        if fetched {
                            let _ = tokio::fs::remove_file(&path).await;
                        }
                        continue;
                    }
                };
                let named = manifest
                    .source
                    .get(crate::schedule::BASE_KEY)
                    .and_then(|b| b.as_str())
                    .unwrap_or_default()
                    .to_owned();
                if named != base {
                    last_error = format!("it follows {named:?}, not {base:?}");
                    if fetched {
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                    continue;
                }
                link = Some(ChainLink {
                    name: name.clone(),
                    taken_ms,
                    path,
                    fetched,
                    manifest,
                });
                break;
            }
            match link {
                Some(l) => {
                    base = l.name.clone();
                    chain.links.push(l);
                }
                None => {
                    tracing::warn!(
                        delta = name,
                        error = last_error,
                        restored_to = base,
                        "backup chain broken: restoring to the newest intact point"
                    );
                    chain.broken = Some(format!("{name}: {last_error}"));
                    break;
                }
            }
        }
        chain
    }

    /// Applies a checked chain of deltas, in order, to the restored container `id`.
    async fn apply_chain(&self, id: &str, chain: &DeltaChain) -> anyhow::Result<()> {
        for l in &chain.links {
            backup::apply_delta(&self.docker, id, &l.path, &l.manifest)
                .await
                .map_err(|e| anyhow::anyhow!("applying {}: {e}", l.name))?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_into_new(
        &self,
        st: &StackRecord,
        name: &str,
        svc: &DeployedService,
        r: u32,
        generation: u64,
        extra: Vec<(String, String)>,
        archive: &std::path::Path,
    ) -> anyhow::Result<String> {
        let id = self
            .create_replica(&st.name, name, svc, r, generation, extra)
            .await?;
        if let Err(e) = backup::fill_volumes(&self.docker, &id, archive).await {
            let _ = backup::remove_with_volumes(&self.docker, &id).await;
            return Err(e);
        }
        Ok(id)
    }
}
