//! The checking duty: health probes, pushed check-ins, node lease expiry and reaping,
//! and the assignments of stateful replicas (who runs them, and their recovery when a
//! node is lost). It runs on exactly one server at a time, the one elected through the
//! store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::{CheckKind, CheckSpec, HealthStatus, InstanceRecord};
use tokio::task::JoinHandle;

use crate::catalog::health_record;
use crate::keys;
use crate::lease::LeaseTable;
use crate::metrics::ProbeLabels;
use crate::state::Shared;
use flotilla_check::Hysteresis;

/// How often the duty looks at leases and the catalog.
/// How often the duty looks at leases: it bounds how late past its TTL a node expires.
const TICK: Duration = Duration::from_millis(25);
/// How often instances are scanned for orphans (a scan is O(instances)).
const ORPHAN_SCAN: Duration = Duration::from_millis(500);
/// How long an instance may point at an unknown node before it is reaped.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// Campaigns for the duty forever; runs it while elected.
pub async fn run(shared: Arc<Shared>, candidate: String) {
    loop {
        let mut leadership = match shared
            .store
            .campaign(keys::DUTY_ELECTION, &candidate, shared.config.leader_ttl)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                shared.note_store_error(&e, "campaign");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(candidate, "elected: running the checking duty");
        shared.set_leader(true);
        let mut duty = Duty::new(shared.clone());
        tokio::select! {
            _ = leadership.lost() => tracing::warn!("lost the checking duty"),
            _ = duty.run() => {}
        }
        shared.set_leader(false);
        drop(duty);
    }
}

struct Checker {
    spec: InstanceRecord,
    task: JoinHandle<()>,
}

struct Duty {
    shared: Arc<Shared>,
    checkers: HashMap<String, Checker>,
    leases: LeaseTable,
    orphans: HashMap<String, Instant>,
    /// The catalog's checks version the checkers were last planned for.
    seen_checks: u64,
    last_orphan_scan: Option<Instant>,
    last_compaction: Option<Instant>,
    /// Nodes named by an assignment but not live, and since when this duty has seen
    /// them gone (monotonic: a new duty holder starts counting afresh, so a failover
    /// can delay a recovery by up to its grace but never hurry one).
    gone_since: HashMap<String, Instant>,
    /// The desired-state and node indexes the assignments were last planned for, and
    /// when: planning clones every stack, so it runs on a change, while a node is gone
    /// (its grace is being timed) or a recover request waits, and
    /// otherwise once a second (not on every tick).
    last_assign: Option<(u64, u64, Instant)>,
}

impl Drop for Duty {
    fn drop(&mut self) {
        for c in self.checkers.values() {
            c.task.abort();
        }
    }
}

impl Duty {
    fn new(shared: Arc<Shared>) -> Self {
        Duty {
            shared,
            checkers: HashMap::new(),
            leases: LeaseTable::default(),
            orphans: HashMap::new(),
            seen_checks: u64::MAX,
            last_orphan_scan: None,
            last_compaction: None,
            gone_since: HashMap::new(),
            last_assign: None,
        }
    }

    async fn run(&mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut index = self.shared.index_watch();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = index.changed() => {}
            }
            let now = tokio::time::Instant::now().into_std();
            let current = self.shared.catalog().checks_version();
            if current != self.seen_checks {
                self.seen_checks = current;
                self.reconcile_checkers();
            }
            self.expire_leases(now).await;
            self.assign(now).await;
            if self
                .last_orphan_scan
                .is_none_or(|t| now.saturating_duration_since(t) >= ORPHAN_SCAN)
            {
                self.last_orphan_scan = Some(now);
                self.reap_orphans(now).await;
            }
            let every = self.shared.config.compact_interval;
            if !every.is_zero()
                && self
                    .last_compaction
                    .is_none_or(|t| now.saturating_duration_since(t) >= every)
            {
                self.last_compaction = Some(now);
                self.compact().await;
            }
        }
    }

    /// One checker task per instance with checks, restarted when its spec changes.
    fn reconcile_checkers(&mut self) {
        let catalog = self.shared.catalog();
        self.checkers.retain(|id, c| {
            let keep = catalog.instance(id).is_some_and(|r| r.spec == c.spec.spec);
            if !keep {
                c.task.abort();
            }
            keep
        });
        for rec in catalog.checked_instances() {
            if self.checkers.contains_key(&rec.id) {
                continue;
            }
            let initial = catalog
                .health_record(&rec.id)
                .map(|h| h.status)
                .unwrap_or(HealthStatus::Critical);
            let task = tokio::spawn(check_instance(self.shared.clone(), rec.clone(), initial));
            self.checkers.insert(
                rec.id.clone(),
                Checker {
                    spec: rec.clone(),
                    task,
                },
            );
        }
    }

    async fn expire_leases(&mut self, now: Instant) {
        let expired = {
            let catalog = self.shared.catalog();
            for rec in catalog.node_records() {
                self.leases.observe(
                    &rec.name,
                    Duration::from_millis(rec.ttl_ms),
                    rec.renewals,
                    now,
                );
            }
            self.leases.retain(&|name| catalog.node(name).is_some());
            self.leases.expired(now)
        };
        for node in expired {
            tracing::warn!(
                node,
                "node lease expired: removing the node and its instances"
            );
            if remove_node(&self.shared, &node).await.is_ok() {
                self.leases.remove(&node);
                self.shared.metrics.node_expirations.inc();
            }
        }
    }

    /// Brings the stateful replicas' assignments in line with the stacks and the live
    /// nodes ([`flotilla_core::recovery::plan`]); writes only what changes.
    async fn assign(&mut self, now: Instant) {
        let due = {
            let catalog = self.shared.catalog();
            let indexes = (catalog.stacks_index(), catalog.nodes_index());
            let pending = !self.gone_since.is_empty() || !catalog.recoveries().is_empty();
            let due = pending
                || self.last_assign.is_none_or(|(s, n, at)| {
                    (s, n) != indexes || now.saturating_duration_since(at) >= Duration::from_secs(1)
                });
            if due {
                self.last_assign = Some((indexes.0, indexes.1, now));
            }
            due
        };
        if !due {
            return;
        }
        let now_ms = flotilla_core::record::unix_ms();
        let (changes, consumed) = {
            let catalog = self.shared.catalog();
            let live: Vec<String> = catalog.node_records().map(|n| n.name.clone()).collect();
            let current = catalog.assignments();
            self.gone_since.retain(|n, _| !live.contains(n));
            for a in current.values() {
                if !live.contains(&a.node) {
                    self.gone_since.entry(a.node.clone()).or_insert(now);
                }
            }
            let gone = &self.gone_since;
            let gone_for = |n: &str| {
                gone.get(n)
                    .map(|t| now.saturating_duration_since(*t))
                    .unwrap_or_default()
            };
            flotilla_core::recovery::plan_with_requests(
                &catalog.stacks(),
                &live,
                &gone_for,
                current,
                catalog.recoveries(),
                now_ms,
            )
        };
        for (replica, rec) in changes {
            let key = keys::assignment(&replica);
            let result = match &rec {
                Some(r) => {
                    if let Some(how) = &r.recovered {
                        // Just moved by a recovery (not a later note on the record).
                        if r.since_ms == now_ms {
                            tracing::warn!(
                                replica,
                                from = how.from_node,
                                to = r.node,
                                generation = r.generation,
                                how = how.how.name(),
                                "node lost past its grace: replica reassigned"
                            );
                        }
                    }
                    self.shared
                        .store
                        .put(&key, serde_json::to_vec(r).expect("records serialise"))
                        .await
                        .map(|_| ())
                }
                None => self.shared.store.delete(&key).await.map(|_| ()),
            };
            if let Err(e) = result {
                self.shared.note_store_error(&e, "assignment");
                return;
            }
        }
        // Requests go once their assignment is written (a failed write above keeps
        // them for the next tick).
        for replica in consumed {
            tracing::info!(replica, "recover request carried out");
            if let Err(e) = self.shared.store.delete(&keys::recovery(&replica)).await {
                self.shared.note_store_error(&e, "recover request");
                return;
            }
        }
    }

    /// Compacts the store's history to the newest `compact_keep` revisions (on etcd;
    /// the embedded store keeps none). Runs on the leader only, so once per cluster.
    async fn compact(&mut self) {
        match self
            .shared
            .store
            .compact(self.shared.config.compact_keep)
            .await
        {
            Ok(Some(revision)) => {
                tracing::info!(revision, "store history compacted");
                self.shared.metrics.compactions.inc();
                self.shared.metrics.compacted_revision.set(revision as i64);
            }
            Ok(None) => {}
            Err(e) => self.shared.note_store_error(&e, "compaction"),
        }
    }

    async fn reap_orphans(&mut self, now: Instant) {
        let orphans: Vec<String> = {
            let catalog = self.shared.catalog();
            catalog
                .instances()
                .filter(|r| {
                    r.spec
                        .node
                        .as_deref()
                        .is_some_and(|n| catalog.node(n).is_none())
                })
                .map(|r| r.id.clone())
                .collect()
        };
        self.orphans.retain(|id, _| orphans.contains(id));
        for id in orphans {
            let since = *self.orphans.entry(id.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= ORPHAN_GRACE {
                tracing::warn!(id, "instance of an unknown node: removing");
                if remove_instance(&self.shared, &id).await.is_ok() {
                    self.shared.metrics.reaped.inc();
                    self.orphans.remove(&id);
                }
            }
        }
    }
}

/// Deletes an instance with its health and check-in records; returns the last revision.
pub async fn remove_instance(
    shared: &Shared,
    id: &str,
) -> Result<Option<u64>, flotilla_store::StoreError> {
    let mut last = None;
    for key in [
        keys::load(id),
        keys::checkin(id),
        keys::health(id),
        keys::instance(id),
    ] {
        match shared.store.delete(&key).await {
            Ok(Some(r)) => last = Some(r),
            Ok(None) => {}
            Err(e) => {
                shared.note_store_error(&e, "delete instance");
                return Err(e);
            }
        }
    }
    Ok(last)
}

/// Deletes a node and every instance it owns; returns the last revision.
pub async fn remove_node(
    shared: &Shared,
    node: &str,
) -> Result<Option<u64>, flotilla_store::StoreError> {
    let ids = shared.catalog().instances_of_node(node);
    let mut last = None;
    for id in ids {
        last = remove_instance(shared, &id).await?.or(last);
    }
    match shared.store.delete(&keys::node(node)).await {
        Ok(r) => Ok(r.or(last)),
        Err(e) => {
            shared.note_store_error(&e, "delete node");
            Err(e)
        }
    }
}

/// Per-check probe state.
struct CheckRun {
    spec: CheckSpec,
    hysteresis: Hysteresis,
    next: tokio::time::Instant,
    /// Revision of the last check-in seen and when this server saw it (TTL / exec).
    checkin_seen: Option<(u64, Instant)>,
}

/// Probes one instance's checks on their intervals and writes verdict changes.
async fn check_instance(shared: Arc<Shared>, rec: InstanceRecord, initial: HealthStatus) {
    let start = tokio::time::Instant::now();
    let mut runs: Vec<CheckRun> = rec
        .spec
        .checks
        .iter()
        .map(|c| CheckRun {
            spec: c.clone(),
            hysteresis: Hysteresis::new(c.rise, c.fall, initial, start.into_std()),
            next: start,
            checkin_seen: None,
        })
        .collect();
    let mut written = initial;
    loop {
        let due = runs
            .iter()
            .map(|r| r.next)
            .min()
            .expect("at least one check");
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        let mut output = String::new();
        for run in runs.iter_mut().filter(|r| r.next <= now) {
            run.next = now + run.spec.interval;
            let (ok, out) = probe(&shared, &rec, run, now.into_std()).await;
            shared
                .metrics
                .probes
                .get_or_create(&ProbeLabels {
                    kind: kind_name(&run.spec.kind).into(),
                    outcome: if ok { "ok" } else { "fail" }.into(),
                })
                .inc();
            run.hysteresis
                .observe(ok, tokio::time::Instant::now().into_std());
            if !ok || output.is_empty() {
                output = out;
            }
        }
        let status = if runs
            .iter()
            .all(|r| r.hysteresis.status() == HealthStatus::Passing)
        {
            HealthStatus::Passing
        } else {
            HealthStatus::Critical
        };
        let now_std = tokio::time::Instant::now().into_std();
        let reap = runs.iter().any(|r| {
            r.spec
                .deregister_after
                .is_some_and(|after| r.hysteresis.critical_for(after, now_std))
        });
        if reap {
            tracing::warn!(id = rec.id, "critical past deregister_after: removing");
            if remove_instance(&shared, &rec.id).await.is_ok() {
                shared.metrics.reaped.inc();
                return;
            }
        }
        let stored = shared.catalog().health_record(&rec.id).map(|h| h.status);
        if status != written || stored.is_none() {
            let value =
                serde_json::to_vec(&health_record(status, output.clone())).expect("serialisable");
            match shared.store.put(&keys::health(&rec.id), value).await {
                Ok(_) => {
                    if status != written {
                        tracing::info!(
                            id = rec.id,
                            service = rec.spec.service,
                            ?status,
                            output,
                            "health changed"
                        );
                        shared.metrics.transitions.inc();
                    }
                    written = status;
                }
                Err(e) => shared.note_store_error(&e, "write health"),
            }
        }
    }
}

fn kind_name(kind: &CheckKind) -> &'static str {
    match kind {
        CheckKind::Http { .. } => "http",
        CheckKind::Tcp { .. } => "tcp",
        CheckKind::Ttl { .. } => "ttl",
        CheckKind::Exec { .. } => "exec",
        CheckKind::Docker => "docker",
    }
}

async fn probe(
    shared: &Shared,
    rec: &InstanceRecord,
    run: &mut CheckRun,
    now: Instant,
) -> (bool, String) {
    match &run.spec.kind {
        CheckKind::Http { .. } | CheckKind::Tcp { .. } => flotilla_check::probe(
            &shared.http,
            &run.spec.kind,
            rec.spec.address,
            rec.spec.port,
            run.spec.effective_timeout(),
        )
        .await
        .unwrap_or_else(|| (false, "not a network check".into())),
        CheckKind::Ttl { ttl } => pushed(shared, rec, run, *ttl, now),
        // Judged where the container is; what the server sees is pushed to it.
        CheckKind::Exec { .. } | CheckKind::Docker => {
            let freshness = run.spec.interval * 2 + Duration::from_secs(2);
            pushed(shared, rec, run, freshness, now)
        }
    }
}

/// A pushed result passes while it is passing and was seen within `fresh`.
fn pushed(
    shared: &Shared,
    rec: &InstanceRecord,
    run: &mut CheckRun,
    fresh: Duration,
    now: Instant,
) -> (bool, String) {
    let catalog = shared.catalog();
    let Some((checkin, revision)) = catalog.checkin(&rec.id) else {
        return (false, "no check-in yet".into());
    };
    let seen = match run.checkin_seen {
        Some((r, at)) if r == *revision => at,
        _ => {
            run.checkin_seen = Some((*revision, now));
            now
        }
    };
    let age = now.saturating_duration_since(seen);
    if age > fresh {
        (
            false,
            format!(
                "no check-in for {}",
                humantime::format_duration(Duration::from_millis(age.as_millis() as u64))
            ),
        )
    } else if checkin.passing {
        (
            true,
            if checkin.output.is_empty() {
                "checked in".into()
            } else {
                checkin.output.clone()
            },
        )
    } else {
        (false, checkin.output.clone())
    }
}
