//! The in-memory catalog: a materialised view of the store, rebuilt from a snapshot
//! and kept current by the store's event stream. Every server (leader or not) keeps one,
//! so reads, blocking queries and DNS never touch the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use flotilla_core::record::unix_ms;
use flotilla_core::{
    HealthRecord, HealthStatus, InstanceRecord, InstanceView, NodeRecord, NodeView, ServiceSummary,
};
use flotilla_store::{Entry, Event, Snapshot};
use serde::{Deserialize, Serialize};

use crate::keys;

/// Load reports older than this are not served (the agent reports every second).
pub const LOAD_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// How many changes each service's log keeps for delta watches. A watcher further
/// behind than this gets the whole service again (as it would without `delta`): at
/// 1,000 changes/s over 100 services that is 100 s of history per service.
pub const CHANGE_LOG_LEN: usize = 1024;

/// One service's recent changes, oldest first, so a watcher that has seen index N can be
/// sent only the instances that changed after N instead of the whole service.
#[derive(Debug, Default)]
struct ChangeLog {
    /// `(index, instance id)`; `None` means every instance (the lbs' feedback weights,
    /// which are part of every instance's view, changed).
    entries: VecDeque<(u64, Option<String>)>,
    /// The log holds every change after this index (older entries were dropped).
    floor: u64,
}

/// A pushed check result: a TTL renewal or an exec check the agent ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinRecord {
    /// Record format version.
    pub v: u32,
    /// Whether the pushed result passes.
    pub passing: bool,
    /// Output to show.
    #[serde(default)]
    pub output: String,
    /// Wall-clock time, unix milliseconds (informational).
    pub at_ms: u64,
}

/// The materialised catalog.
#[derive(Debug, Default)]
pub struct Catalog {
    instances: HashMap<String, InstanceRecord>,
    health: HashMap<String, HealthRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    checkins: HashMap<String, (CheckinRecord, u64)>,
    weights: HashMap<String, flotilla_core::WeightsRecord>,
    loads: HashMap<String, (flotilla_core::LoadRecord, std::time::Instant)>,
    by_service: BTreeMap<String, BTreeSet<String>>,
    service_index: HashMap<String, u64>,
    nodes_index: u64,
    stacks: BTreeMap<String, flotilla_core::stack::StackRecord>,
    stacks_index: u64,
    /// Stateful replicas' assignments by `STACK/SERVICE/REPLICA` (part of the desired
    /// state: they move `stacks_index`).
    assignments: BTreeMap<String, flotilla_core::recovery::AssignmentRecord>,
    /// Operators' recover requests by `STACK/SERVICE/REPLICA` (until the duty acts).
    recoveries: BTreeMap<String, flotilla_core::recovery::RecoverRequest>,
    tokens: BTreeMap<String, flotilla_core::token::TokenRecord>,
    /// Load balancers' own reports, by name.
    lbs: BTreeMap<String, flotilla_core::LbReport>,
    /// Node name → the backup archives it keeps. Both lbs and inventories move
    /// `lbs_index`: the dashboard's reports.
    backups: BTreeMap<String, flotilla_core::BackupInventory>,
    lbs_index: u64,
    /// Revision of the last change to a scoped token (agents drop the roles they keep).
    tokens_index: u64,
    /// Node certificate revocations, by node.
    revoked: BTreeMap<String, flotilla_core::CertRevocation>,
    /// Per service, what changed at which index (for delta watches). A service's log is
    /// dropped when its last instance leaves, so names that come and go do not pile up.
    change_logs: HashMap<String, ChangeLog>,
    /// The highest index at which a log was dropped: a service without a log has had
    /// no change since then only, so a watcher from before it gets the whole service.
    dropped_logs_floor: u64,
    /// The index this catalog was built at: no change log reaches before it.
    base: u64,
    index: u64,
    /// Instances that have checks (the duty runs one checker for each).
    checked: BTreeSet<String>,
    /// Moves whenever an instance with checks is added, changed or removed, so the
    /// duty re-plans its checkers only then, not on every change of the catalog.
    checks_version: u64,
    /// Records that could not be decoded, by key (a newer writer, or corruption).
    pub undecodable: BTreeSet<String>,
}

/// What one applied event changed, for notifications.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Services whose instance set or health changed.
    pub services: BTreeSet<String>,
    /// Whether the node set or a node changed.
    pub nodes: bool,
    /// Whether a check-in arrived.
    pub checkins: bool,
}

impl Changes {
    /// Adds what `other` changed to this set.
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.nodes |= other.nodes;
        self.checkins |= other.checkins;
    }
}

impl Catalog {
    /// Builds a catalog from a full snapshot.
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        let mut c = Catalog::default();
        for e in &snapshot.entries {
            c.apply(&Event::Put(e.clone()));
        }
        c.index = snapshot.revision;
        c.base = snapshot.revision;
        c.change_logs.clear();
        c.dropped_logs_floor = 0;
        for idx in c.service_index.values_mut() {
            *idx = snapshot.revision;
        }
        c.nodes_index = snapshot.revision;
        c.stacks_index = snapshot.revision;
        c.lbs_index = snapshot.revision;
        c.tokens_index = snapshot.revision;
        // Loads from a snapshot were not just seen arriving: age them by their wall-clock
        // stamp, so a resync does not make stale reports look fresh for another TTL.
        let now_ms = unix_ms();
        let now = std::time::Instant::now();
        c.loads.retain(|_, (rec, seen)| {
            let age = std::time::Duration::from_millis(now_ms.saturating_sub(rec.at_ms));
            match now.checked_sub(age) {
                Some(t) if age <= LOAD_TTL => {
                    *seen = t;
                    true
                }
                _ => false,
            }
        });
        c
    }

    /// Index of the last applied change (the store revision).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The index a reply hands out for a part whose last change was at `part` (0: never
    /// written). A part nothing has written answers the store's revision, not 0: a
    /// blocking query with index 0 asks for no wait, so a watcher fed 0 back would be
    /// answered at once, forever (measured: an idle agent at 64 % of a core and dockerd
    /// at 42 % from reconcile passes on a cluster with no stacks). The revision is
    /// collision-free — the part's first write comes at a later revision, so the watch
    /// wakes for it — where a fixed 1 would hide a first write made at revision 1. Only a
    /// store nothing at all has written answers 0, until its first write.
    ///
    /// Blocking queries still wait on the part's own index (0 until its first write), so
    /// writes elsewhere do not wake them.
    pub fn watch_index(&self, part: u64) -> u64 {
        if part == 0 {
            self.index
        } else {
            part
        }
    }

    /// Index of the last change to `service`. A service never seen answers with the
    /// catalog index, so a blocking query on it waits for its first registration (and
    /// may wake early, harmlessly, on other changes).
    pub fn service_index(&self, service: &str) -> u64 {
        self.service_index
            .get(service)
            .copied()
            .unwrap_or(self.index)
    }

    /// Whether `service` has (or had) instances.
    pub fn knows_service(&self, service: &str) -> bool {
        self.service_index.contains_key(service)
    }

    /// Index of the last change to any node.
    pub fn nodes_index(&self) -> u64 {
        self.nodes_index
    }

    /// Index of the last change to any stack's desired state.
    pub fn stacks_index(&self) -> u64 {
        self.stacks_index
    }

    /// Every stack's desired state.
    pub fn stacks(&self) -> Vec<flotilla_core::stack::StackRecord> {
        self.stacks.values().cloned().collect()
    }

    /// Every stateful replica's assignment, by `STACK/SERVICE/REPLICA`.
    pub fn assignments(&self) -> &BTreeMap<String, flotilla_core::recovery::AssignmentRecord> {
        &self.assignments
    }

    /// Recover requests waiting for the duty.
    pub fn recoveries(&self) -> &BTreeMap<String, flotilla_core::recovery::RecoverRequest> {
        &self.recoveries
    }

    /// Load balancers' reports, by name.
    pub fn lbs(&self) -> &BTreeMap<String, flotilla_core::LbReport> {
        &self.lbs
    }

    /// The nodes' backup inventories.
    pub fn backups(&self) -> &BTreeMap<String, flotilla_core::BackupInventory> {
        &self.backups
    }

    /// Revision of the last change to the lbs' reports or the backup inventories.
    pub fn lbs_index(&self) -> u64 {
        self.lbs_index
    }

    /// One stack's desired state.
    pub fn stack(&self, name: &str) -> Option<&flotilla_core::stack::StackRecord> {
        self.stacks.get(name)
    }

    /// The revocation of node `node`'s certificates, if any.
    pub fn revocation(&self, node: &str) -> Option<&flotilla_core::CertRevocation> {
        self.revoked.get(node)
    }

    /// Every node certificate revocation.
    pub fn revocations(&self) -> impl Iterator<Item = &flotilla_core::CertRevocation> {
        self.revoked.values()
    }

    /// Revision of the last token change (a made or revoked token).
    pub fn tokens_index(&self) -> u64 {
        self.tokens_index
    }

    /// A scoped token's record by id.
    pub fn token(&self, id: &str) -> Option<&flotilla_core::token::TokenRecord> {
        self.tokens.get(id)
    }

    /// Every scoped token, without hashes.
    pub fn tokens(&self) -> Vec<flotilla_core::token::TokenView> {
        self.tokens.values().map(Into::into).collect()
    }

    /// Applies one store event and says what it changed.
    pub fn apply(&mut self, event: &Event) -> Changes {
        let mut changes = Changes::default();
        let revision = event.revision();
        self.index = self.index.max(revision);
        let (key, entry) = match event {
            Event::Put(e) => (e.key.as_str(), Some(e)),
            Event::Delete { key, .. } => (key.as_str(), None),
        };
        if let Some(id) = key.strip_prefix(keys::INSTANCES) {
            let old = self.instances.remove(id);
            if let Some(old) = &old {
                self.unindex(old);
                self.log_change(&old.spec.service, Some(id), revision);
                changes.services.insert(old.spec.service.clone());
            }
            if self.checked.remove(id) {
                self.checks_version += 1;
            }
            if let Some(rec) = entry.and_then(|e| self.decode::<InstanceRecord>(e)) {
                self.by_service
                    .entry(rec.spec.service.clone())
                    .or_default()
                    .insert(id.to_owned());
                self.log_change(&rec.spec.service, Some(id), revision);
                changes.services.insert(rec.spec.service.clone());
                // The server checks what no agent checks for it.
                if !rec.spec.checks.is_empty() && !rec.spec.node_checks {
                    self.checked.insert(id.to_owned());
                    self.checks_version += 1;
                }
                self.instances.insert(id.to_owned(), rec);
            }
            if let Some(old) = old.filter(|o| !self.by_service.contains_key(&o.spec.service)) {
                // Its last instance left: the log goes, and the floor says so.
                self.change_logs.remove(&old.spec.service);
                self.dropped_logs_floor = self.dropped_logs_floor.max(revision);
            }
        } else if let Some(id) = key.strip_prefix(keys::HEALTH) {
            match entry.and_then(|e| self.decode::<HealthRecord>(e)) {
                Some(rec) => self.health.insert(id.to_owned(), rec),
                None => self.health.remove(id),
            };
            if let Some(service) = self.instances.get(id).map(|i| i.spec.service.clone()) {
                self.log_change(&service, Some(id), revision);
                changes.services.insert(service);
            }
        } else if let Some(name) = key.strip_prefix(keys::NODES) {
            match entry.and_then(|e| self.decode::<NodeRecord>(e)) {
                Some(rec) => {
                    if let Some(loads_ms) = rec.loads_ms {
                        self.vouch_loads(name, loads_ms);
                    }
                    self.nodes.insert(name.to_owned(), rec)
                }
                None => self.nodes.remove(name),
            };
            changes.nodes = true;
            self.nodes_index = revision;
        } else if let Some(id) = key.strip_prefix(keys::LOADS) {
            // Load reports change every period: kept, served, but they wake no watcher.
            match entry.and_then(|e| self.decode::<flotilla_core::LoadRecord>(e)) {
                Some(rec) => self
                    .loads
                    .insert(id.to_owned(), (rec, std::time::Instant::now())),
                None => self.loads.remove(id),
            };
        } else if let Some(service) = key.strip_prefix(keys::WEIGHTS) {
            match entry.and_then(|e| self.decode::<flotilla_core::WeightsRecord>(e)) {
                Some(rec) => self.weights.insert(service.to_owned(), rec),
                None => self.weights.remove(service),
            };
            self.log_change(service, None, revision);
            changes.services.insert(service.to_owned());
        } else if let Some(id) = key.strip_prefix(keys::TOKENS) {
            match entry.and_then(|e| self.decode::<flotilla_core::token::TokenRecord>(e)) {
                Some(rec) => self.tokens.insert(id.to_owned(), rec),
                None => self.tokens.remove(id),
            };
            self.tokens_index = revision;
        } else if let Some(name) = key.strip_prefix(keys::STACKS) {
            match entry.and_then(|e| self.decode::<flotilla_core::stack::StackRecord>(e)) {
                Some(rec) => self.stacks.insert(name.to_owned(), rec),
                None => self.stacks.remove(name),
            };
            self.stacks_index = revision;
        } else if let Some(replica) = key.strip_prefix(keys::ASSIGNMENTS) {
            type Rec = flotilla_core::recovery::AssignmentRecord;
            match entry.and_then(|e| self.decode::<Rec>(e)) {
                Some(rec) => self.assignments.insert(replica.to_owned(), rec),
                None => self.assignments.remove(replica),
            };
            self.stacks_index = revision;
        } else if let Some(replica) = key.strip_prefix(keys::RECOVERIES) {
            type Rec = flotilla_core::recovery::RecoverRequest;
            match entry.and_then(|e| self.decode::<Rec>(e)) {
                Some(rec) => self.recoveries.insert(replica.to_owned(), rec),
                None => self.recoveries.remove(replica),
            };
        } else if let Some(name) = key.strip_prefix(keys::LBS) {
            match entry.and_then(|e| self.decode::<flotilla_core::LbReport>(e)) {
                Some(rec) => self.lbs.insert(name.to_owned(), rec),
                None => self.lbs.remove(name),
            };
            self.lbs_index = revision;
        } else if let Some(node) = key.strip_prefix(keys::BACKUPS) {
            match entry.and_then(|e| self.decode::<flotilla_core::BackupInventory>(e)) {
                Some(rec) => self.backups.insert(node.to_owned(), rec),
                None => self.backups.remove(node),
            };
            self.lbs_index = revision;
        } else if let Some(node) = key.strip_prefix(keys::REVOKED) {
            match entry.and_then(|e| self.decode::<flotilla_core::CertRevocation>(e)) {
                Some(rec) => self.revoked.insert(node.to_owned(), rec),
                None => self.revoked.remove(node),
            };
        } else if let Some(id) = key.strip_prefix(keys::CHECKINS) {
            match entry.and_then(|e| self.decode::<CheckinRecord>(e)) {
                Some(rec) => self.checkins.insert(id.to_owned(), (rec, revision)),
                None => self.checkins.remove(id),
            };
            changes.checkins = true;
        }
        for s in &changes.services {
            self.service_index.insert(s.clone(), revision);
        }
        changes
    }

    /// Notes that `id` (or, with `None`, every instance) of `service` changed at `index`.
    fn log_change(&mut self, service: &str, id: Option<&str>, index: u64) {
        let log = match self.change_logs.get_mut(service) {
            Some(log) => log,
            None => self
                .change_logs
                .entry(service.to_owned())
                .or_insert(ChangeLog {
                    entries: VecDeque::new(),
                    floor: self.base.max(self.dropped_logs_floor),
                }),
        };
        // A move between services logs the id once in each; the same id twice at one
        // index (an instance replaced in place) needs one entry.
        if log
            .entries
            .back()
            .is_some_and(|(i, e)| *i == index && e.as_deref() == id)
        {
            return;
        }
        log.entries.push_back((index, id.map(str::to_owned)));
        while log.entries.len() > CHANGE_LOG_LEN {
            if let Some((dropped, _)) = log.entries.pop_front() {
                // A watcher that has seen `dropped` needs nothing older.
                log.floor = log.floor.max(dropped);
            }
        }
    }

    /// `GET /v1/services/{name}?delta=true`'s body for a watcher that has seen `since`:
    /// only the instances whose view changed after `since` (their current view, or their
    /// id under `removed` when gone, moved to another service, or — with `passing_only` —
    /// no longer passing). `None` when the log cannot say (the watcher is from before
    /// this catalog or further behind than the log reaches, or the lbs' weights changed,
    /// which is every instance): then the whole service is the answer.
    pub fn service_delta_json(
        &self,
        name: &str,
        since: u64,
        passing_only: bool,
    ) -> Option<Vec<u8>> {
        let index = self.service_index(name);
        if since < self.base || since > index {
            return None;
        }
        let mut touched = BTreeSet::new();
        let floor = self
            .change_logs
            .get(name)
            .map_or(self.dropped_logs_floor, |log| log.floor);
        if since < floor {
            return None;
        }
        if let Some(log) = self.change_logs.get(name) {
            for (at, id) in log.entries.iter().rev() {
                if *at <= since {
                    break;
                }
                touched.insert(id.as_deref()?);
            }
        }
        let (mut current, mut removed) = (Vec::new(), Vec::new());
        for id in touched {
            match self.instances.get(id) {
                Some(rec)
                    if rec.spec.service == name
                        && (!passing_only || self.health_ref(rec).0 == HealthStatus::Passing) =>
                {
                    current.push(ViewRef { catalog: self, rec })
                }
                _ => removed.push(id),
            }
        }
        let body = DeltaRef {
            service: name,
            index,
            delta: true,
            instances: current,
            removed,
        };
        Some(serde_json::to_vec(&body).expect("catalog records serialise"))
    }

    /// A node's renewal vouches that its load reports held as of `loads_ms`: each of its
    /// instances' loads counts as seen then (never earlier than it was).
    fn vouch_loads(&mut self, node: &str, loads_ms: u64) {
        let age = std::time::Duration::from_millis(unix_ms().saturating_sub(loads_ms));
        let Some(at) = std::time::Instant::now().checked_sub(age) else {
            return;
        };
        for (id, (_, seen)) in self.loads.iter_mut() {
            let of_node = self
                .instances
                .get(id)
                .is_some_and(|r| r.spec.node.as_deref() == Some(node));
            if of_node && *seen < at {
                *seen = at;
            }
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&mut self, e: &Entry) -> Option<T> {
        match serde_json::from_slice(&e.value) {
            Ok(v) => {
                self.undecodable.remove(&e.key);
                Some(v)
            }
            Err(err) => {
                tracing::error!(key = %e.key, error = %err, "undecodable record ignored");
                self.undecodable.insert(e.key.clone());
                None
            }
        }
    }

    fn unindex(&mut self, rec: &InstanceRecord) {
        if let Some(set) = self.by_service.get_mut(&rec.spec.service) {
            set.remove(&rec.id);
            if set.is_empty() {
                self.by_service.remove(&rec.spec.service);
            }
        }
    }

    /// Makes this (fresh) catalog's checks version follow `old`'s, so a reader that
    /// saw `old` notices the swap even when both counted the same number of changes.
    pub fn follow_checks_version(&mut self, old: &Catalog) {
        self.checks_version += old.checks_version + 1;
    }

    /// Moves whenever an instance with checks is added, changed or removed.
    pub fn checks_version(&self) -> u64 {
        self.checks_version
    }

    /// The instances that have checks.
    pub fn checked_instances(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.checked.iter().filter_map(|id| self.instances.get(id))
    }

    /// Node records by name (without the per-node instance counts of [`Catalog::nodes`],
    /// which take a pass over every instance).
    pub fn node_records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// One instance by id.
    pub fn instance(&self, id: &str) -> Option<&InstanceRecord> {
        self.instances.get(id)
    }

    /// Resolves an id or a container name (meta `container_name`) to an instance id.
    pub fn resolve(&self, id_or_name: &str) -> Option<String> {
        if self.instances.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        let mut found = self.instances.values().filter(|r| {
            r.spec
                .meta
                .get("container_name")
                .is_some_and(|n| n == id_or_name)
        });
        let first = found.next()?;
        // An ambiguous name resolves to nothing rather than to an arbitrary instance.
        found.next().is_none().then(|| first.id.clone())
    }

    /// All instances.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.instances.values()
    }

    /// Instance health: no checks means passing; otherwise critical until a verdict says so.
    pub fn health_of(&self, rec: &InstanceRecord) -> (HealthStatus, String) {
        let (status, output) = self.health_ref(rec);
        (status, output.to_owned())
    }

    fn health_ref<'a>(&'a self, rec: &InstanceRecord) -> (HealthStatus, &'a str) {
        if rec.spec.checks.is_empty() {
            return (HealthStatus::Passing, "no checks");
        }
        match self.health.get(&rec.id) {
            Some(h) => (h.status, h.output.as_str()),
            None => (HealthStatus::Critical, "not yet checked"),
        }
    }

    fn feedback_weight_of(&self, rec: &InstanceRecord) -> Option<f64> {
        self.weights
            .get(&rec.spec.service)
            .and_then(|w| {
                w.weights
                    .get(&std::net::SocketAddr::new(rec.spec.address, rec.spec.port).to_string())
            })
            .copied()
    }

    fn load_of(&self, rec: &InstanceRecord) -> Option<flotilla_core::InstanceLoad> {
        self.loads.get(&rec.id).and_then(|(l, seen)| {
            let age = seen.elapsed();
            (age <= LOAD_TTL).then_some(flotilla_core::InstanceLoad {
                cpu: l.cpu,
                memory: l.memory,
                age_ms: age.as_millis() as u64,
            })
        })
    }

    /// The stored verdict of an instance, if any.
    pub fn health_record(&self, id: &str) -> Option<&HealthRecord> {
        self.health.get(id)
    }

    /// The latest check-in of an instance and the revision it arrived at.
    pub fn checkin(&self, id: &str) -> Option<&(CheckinRecord, u64)> {
        self.checkins.get(id)
    }

    /// The API view of one instance.
    pub fn view(&self, rec: &InstanceRecord) -> InstanceView {
        let (health, output) = self.health_of(rec);
        InstanceView {
            id: rec.id.clone(),
            service: rec.spec.service.clone(),
            node: rec.spec.node.clone(),
            address: rec.spec.address,
            port: rec.spec.port,
            weight: rec.spec.weight,
            meta: rec.spec.meta.clone(),
            health,
            output,
            checks: rec.spec.checks.clone(),
            feedback_weight: self.feedback_weight_of(rec),
            load: self.load_of(rec),
        }
    }

    /// `GET /v1/services/{name}`'s body (a [`flotilla_core::ServiceInstances`]) written
    /// straight from the catalog: serving a blocking watcher the whole service on every
    /// change was the registry's largest cost (a third of its CPU at 2,000 changes/s
    /// went into copying records into views), so nothing is copied here.
    pub fn service_json(&self, name: &str, passing_only: bool) -> Vec<u8> {
        let body = ServiceRef {
            catalog: self,
            name,
            index: self.service_index(name),
            passing_only,
        };
        serde_json::to_vec(&body).expect("catalog records serialise")
    }

    /// A service's instances, sorted by id; only passing ones if `passing_only`.
    pub fn service(&self, name: &str, passing_only: bool) -> Vec<InstanceView> {
        let Some(ids) = self.by_service.get(name) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| self.instances.get(id))
            .map(|r| self.view(r))
            .filter(|v| !passing_only || v.health == HealthStatus::Passing)
            .collect()
    }

    /// Every service with counts.
    pub fn services(&self) -> Vec<ServiceSummary> {
        self.by_service
            .iter()
            .map(|(name, ids)| {
                let passing = ids
                    .iter()
                    .filter_map(|id| self.instances.get(id))
                    .filter(|r| self.health_of(r).0 == HealthStatus::Passing)
                    .count();
                ServiceSummary {
                    name: name.clone(),
                    instances: ids.len(),
                    passing,
                    index: self.service_index(name),
                }
            })
            .collect()
    }

    /// Every node with its instance count.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for r in self.instances.values() {
            if let Some(n) = &r.spec.node {
                *counts.entry(n.as_str()).or_default() += 1;
            }
        }
        self.nodes
            .values()
            .map(|n| NodeView {
                name: n.name.clone(),
                address: n.address.clone(),
                api: n.api.clone(),
                ttl_ms: n.ttl_ms,
                renewed_ms: n.renewed_ms,
                renewals: n.renewals,
                instances: counts.get(n.name.as_str()).copied().unwrap_or(0),
            })
            .collect()
    }

    /// One node record.
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// Ids of the instances a node owns.
    pub fn instances_of_node(&self, name: &str) -> Vec<String> {
        self.instances
            .values()
            .filter(|r| r.spec.node.as_deref() == Some(name))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Count of instances and passing instances, for metrics.
    pub fn counts(&self) -> (usize, usize) {
        let passing = self
            .instances
            .values()
            .filter(|r| self.health_of(r).0 == HealthStatus::Passing)
            .count();
        (self.instances.len(), passing)
    }
}

/// A new health record.
pub fn health_record(status: HealthStatus, output: String) -> HealthRecord {
    HealthRecord {
        v: flotilla_core::RECORD_VERSION,
        status,
        output,
        since_ms: unix_ms(),
    }
}

/// A service's instances, serialised as [`flotilla_core::ServiceInstances`].
struct ServiceRef<'a> {
    catalog: &'a Catalog,
    name: &'a str,
    index: u64,
    passing_only: bool,
}

impl Serialize for ServiceRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ServiceInstances", 3)?;
        st.serialize_field("service", self.name)?;
        st.serialize_field("index", &self.index)?;
        st.serialize_field("instances", &InstancesRef(self))?;
        st.end()
    }
}

struct InstancesRef<'a, 'b>(&'b ServiceRef<'a>);

impl Serialize for InstancesRef<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0.catalog;
        let records = c
            .by_service
            .get(self.0.name)
            .into_iter()
            .flatten()
            .filter_map(|id| c.instances.get(id))
            .filter(|r| !self.0.passing_only || c.health_ref(r).0 == HealthStatus::Passing);
        s.collect_seq(records.map(|rec| ViewRef { catalog: c, rec }))
    }
}

/// A delta answer, serialised as [`flotilla_core::ServiceInstances`] with `delta` set.
#[derive(Serialize)]
struct DeltaRef<'a> {
    service: &'a str,
    index: u64,
    delta: bool,
    instances: Vec<ViewRef<'a>>,
    removed: Vec<&'a str>,
}

/// One instance, serialised exactly as [`InstanceView`] (a test holds them equal).
struct ViewRef<'a> {
    catalog: &'a Catalog,
    rec: &'a InstanceRecord,
}

impl Serialize for ViewRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let (rec, c) = (self.rec, self.catalog);
        let (health, output) = c.health_ref(rec);
        let mut st = s.serialize_struct("InstanceView", 13)?;
        st.serialize_field("id", &rec.id)?;
        st.serialize_field("service", &rec.spec.service)?;
        st.serialize_field("node", &rec.spec.node)?;
        st.serialize_field("address", &rec.spec.address)?;
        st.serialize_field("port", &rec.spec.port)?;
        st.serialize_field("weight", &rec.spec.weight)?;
        st.serialize_field("meta", &rec.spec.meta)?;
        st.serialize_field("health", &health)?;
        st.serialize_field("output", output)?;
        st.serialize_field("checks", &rec.spec.checks)?;
        match c.feedback_weight_of(rec) {
            Some(w) => st.serialize_field("feedback_weight", &w)?,
            None => st.skip_field("feedback_weight")?,
        }
        match c.load_of(rec) {
            Some(l) => st.serialize_field("load", &l)?,
            None => st.skip_field("load")?,
        }
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::{CheckKind, CheckSpec, InstanceSpec};

    fn put(key: &str, value: impl Serialize, revision: u64) -> Event {
        Event::Put(Entry {
            key: key.into(),
            value: serde_json::to_vec(&value).unwrap(),
            revision,
        })
    }

    fn instance(id: &str, service: &str, checks: bool) -> InstanceRecord {
        InstanceRecord {
            v: 1,
            id: id.into(),
            spec: InstanceSpec {
                service: service.into(),
                node: Some("n1".into()),
                address: "198.18.0.2".parse().unwrap(),
                port: 80,
                weight: 100,
                meta: [("container_name".to_string(), format!("c-{id}"))].into(),
                checks: if checks {
                    vec![CheckSpec::new(CheckKind::Tcp { port: None })]
                } else {
                    vec![]
                },
                node_checks: false,
            },
            registered_ms: 0,
        }
    }

    #[test]
    fn service_json_is_the_service_view_serialised() {
        let mut c = Catalog::default();
        c.apply(&put("instances/a", instance("a", "web", true), 1));
        c.apply(&put("instances/b", instance("b", "web", false), 2));
        c.apply(&put("instances/x", instance("x", "api", false), 3));
        c.apply(&put(
            "health/a",
            health_record(HealthStatus::Passing, "ok \"quoted\"".into()),
            4,
        ));
        c.apply(&put(
            &keys::weights("web"),
            flotilla_core::WeightsRecord {
                v: 1,
                weights: [("198.18.0.2:80".to_string(), 1.5)].into(),
                from: "lb".into(),
                at_ms: unix_ms(),
            },
            5,
        ));
        c.apply(&put(
            &keys::load("b"),
            flotilla_core::LoadRecord {
                v: 1,
                cpu: 0.25,
                memory: 0.5,
                at_ms: unix_ms(),
            },
            6,
        ));
        // The load's age is read from the clock on each serialisation.
        let strip_age = |mut v: serde_json::Value| {
            for i in v["instances"].as_array_mut().unwrap() {
                if let Some(load) = i.get_mut("load").and_then(|l| l.as_object_mut()) {
                    load.remove("age_ms");
                }
            }
            v
        };
        for passing in [false, true] {
            let direct: serde_json::Value =
                serde_json::from_slice(&c.service_json("web", passing)).unwrap();
            let viewed = serde_json::to_value(flotilla_core::ServiceInstances {
                service: "web".into(),
                index: c.service_index("web"),
                instances: c.service("web", passing),
                delta: false,
                removed: Vec::new(),
            })
            .unwrap();
            assert_eq!(strip_age(direct), strip_age(viewed), "passing={passing}");
        }
        let none: serde_json::Value =
            serde_json::from_slice(&c.service_json("nope", false)).unwrap();
        assert_eq!(none["instances"], serde_json::json!([]));
    }

    #[test]
    fn an_unwritten_part_hands_out_the_store_revision_never_a_colliding_index() {
        let mut c = Catalog::default();
        // Nothing written at all: 0 (answered at once until the first write).
        assert_eq!(c.watch_index(c.stacks_index()), 0);
        c.apply(&put("instances/a", instance("a", "web", false), 1));
        // Stacks and tokens never written: the revision, not 0 (which asks for no wait).
        assert_eq!(c.stacks_index(), 0);
        assert_eq!(c.watch_index(c.stacks_index()), 1);
        assert_eq!(c.watch_index(c.tokens_index()), 1);
        // A written part answers its own last change, even below the revision.
        c.apply(&put("instances/b", instance("b", "web", false), 2));
        assert_eq!(c.watch_index(c.service_index("web")), 2);
        assert_eq!(c.watch_index(1), 1);
    }

    #[test]
    fn new_checked_instance_is_critical_until_verdict() {
        let mut c = Catalog::default();
        let ch = c.apply(&put("instances/a", instance("a", "web", true), 5));
        assert_eq!(ch.services, BTreeSet::from(["web".to_string()]));
        assert_eq!(c.service_index("web"), 5);
        assert!(c.service("web", true).is_empty());
        assert_eq!(c.service("web", false)[0].health, HealthStatus::Critical);
        c.apply(&put(
            "health/a",
            health_record(HealthStatus::Passing, "ok".into()),
            6,
        ));
        assert_eq!(c.service("web", true).len(), 1);
        assert_eq!(c.service_index("web"), 6);
    }

    #[test]
    fn moving_an_instance_between_services_touches_both() {
        let mut c = Catalog::default();
        c.apply(&put("instances/a", instance("a", "web", false), 1));
        let ch = c.apply(&put("instances/a", instance("a", "api", false), 2));
        assert_eq!(ch.services.len(), 2);
        assert!(c.service("web", false).is_empty());
        assert_eq!(c.service("api", false).len(), 1);
        let ch = c.apply(&Event::Delete {
            key: "instances/a".into(),
            revision: 3,
        });
        assert!(ch.services.contains("api"));
        assert!(c.services().is_empty());
        assert_eq!(
            c.service_index("api"),
            3,
            "index survives the service's removal"
        );
    }

    #[test]
    fn resolves_container_names_unambiguously() {
        let mut c = Catalog::default();
        c.apply(&put("instances/a", instance("a", "web", false), 1));
        assert_eq!(c.resolve("a").as_deref(), Some("a"));
        assert_eq!(c.resolve("c-a").as_deref(), Some("a"));
        assert_eq!(c.resolve("nope"), None);
    }

    #[test]
    fn undecodable_records_are_noted_not_fatal() {
        let mut c = Catalog::default();
        c.apply(&Event::Put(Entry {
            key: "instances/x".into(),
            value: b"{bad".to_vec(),
            revision: 1,
        }));
        assert!(c.instance("x").is_none());
        assert!(c.undecodable.contains("instances/x"));
    }

    /// One step of the delta property test.
    #[derive(Debug, Clone)]
    enum Step {
        Put { id: u8, service: u8, checks: bool },
        Delete { id: u8 },
        Health { id: u8, passing: bool },
        Weights { service: u8 },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0..12u8, 0..2u8, any::<bool>()).prop_map(|(id, service, checks)| Step::Put {
                id,
                service,
                checks
            }),
            (0..12u8).prop_map(|id| Step::Delete { id }),
            (0..12u8, any::<bool>()).prop_map(|(id, passing)| Step::Health { id, passing }),
            (0..2u8).prop_map(|service| Step::Weights { service }),
        ]
    }

    fn event(step: &Step, revision: u64) -> Event {
        let service = |s: u8| ["web", "api"][s as usize];
        match step {
            Step::Put {
                id,
                service: s,
                checks,
            } => put(
                &format!("instances/i{id}"),
                instance(&format!("i{id}"), service(*s), *checks),
                revision,
            ),
            Step::Delete { id } => Event::Delete {
                key: format!("instances/i{id}"),
                revision,
            },
            Step::Health { id, passing } => {
                let status = if *passing {
                    HealthStatus::Passing
                } else {
                    HealthStatus::Critical
                };
                put(
                    &format!("health/i{id}"),
                    health_record(status, format!("r{revision}")),
                    revision,
                )
            }
            Step::Weights { service: s } => put(
                &keys::weights(service(*s)),
                flotilla_core::WeightsRecord {
                    v: 1,
                    weights: [("198.18.0.2:80".to_string(), revision as f64)].into(),
                    from: "lb".into(),
                    at_ms: 0,
                },
                revision,
            ),
        }
    }

    /// Instances of one answer by id.
    fn by_id(body: &[u8]) -> (serde_json::Value, BTreeMap<String, serde_json::Value>) {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let map = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["id"].as_str().unwrap().to_owned(), i.clone()))
            .collect();
        (v, map)
    }

    proptest::proptest! {
        /// A watcher that saw the whole service at any earlier index and applies the
        /// delta answer holds exactly what a whole answer would give now — across
        /// moves between services, deletes, health flips (with and without
        /// `passing`), weight changes (which force a whole answer) and a log that
        /// drops its oldest entries.
        #[test]
        fn a_delta_applied_to_an_earlier_view_is_the_current_view(
            steps in proptest::collection::vec(step(), 1..80),
            base in 0..3u64,
            small_log in proptest::prelude::any::<bool>(),
        ) {
            let mut c = Catalog {
                base,
                ..Default::default()
            };
            // What a watcher holds: each service's index when it read, and its views
            // (web, web passing, api, api passing).
            type Views = [BTreeMap<String, serde_json::Value>; 4];
            const QUERIES: [(&str, bool); 4] =
                [("web", false), ("web", true), ("api", false), ("api", true)];
            let views = |c: &Catalog| -> Views {
                let mut out: Views = Default::default();
                for (k, (name, passing)) in QUERIES.iter().enumerate() {
                    out[k] = by_id(&c.service_json(name, *passing)).1;
                }
                out
            };
            let mut seen: Vec<([u64; 2], Views)> =
                vec![([c.service_index("web"), c.service_index("api")], views(&c))];
            for (n, st) in steps.iter().enumerate() {
                let revision = base + 1 + n as u64;
                c.apply(&event(st, revision));
                if small_log {
                    // Exercise the dropped-history path with a short log.
                    for log in c.change_logs.values_mut() {
                        while log.entries.len() > 5 {
                            let (dropped, _) = log.entries.pop_front().unwrap();
                            log.floor = log.floor.max(dropped);
                        }
                    }
                }
                let now = views(&c);
                for (indexes, then) in &seen {
                    for (k, (name, passing)) in QUERIES.iter().enumerate() {
                        let since = indexes[k / 2];
                        let Some(body) = c.service_delta_json(name, since, *passing) else {
                            continue;
                        };
                        let (v, delta) = by_id(&body);
                        proptest::prop_assert_eq!(v["delta"].as_bool(), Some(true));
                        proptest::prop_assert_eq!(v["index"].as_u64(), Some(c.service_index(name)));
                        let mut view = then[k].clone();
                        for id in v["removed"].as_array().unwrap() {
                            view.remove(id.as_str().unwrap());
                        }
                        view.extend(delta);
                        proptest::prop_assert_eq!(&view, &now[k], "{} passing={} since {}", name, passing, since);
                    }
                }
                seen.push(([c.service_index("web"), c.service_index("api")], now));
            }
        }
    }

    #[test]
    fn a_delta_is_refused_where_the_log_cannot_answer() {
        let mut c = Catalog::default();
        c.apply(&put("instances/a", instance("a", "web", false), 1));
        c.apply(&put("instances/b", instance("b", "web", false), 2));
        let (v, ids) = by_id(&c.service_delta_json("web", 1, false).unwrap());
        assert_eq!(ids.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(v["removed"], serde_json::json!([]));
        // Ahead of the catalog (a watcher from another catalog): whole answer.
        assert!(c.service_delta_json("web", 9, false).is_none());
        // The lbs' weights are in every instance's view: whole answer.
        c.apply(&put(
            &keys::weights("web"),
            flotilla_core::WeightsRecord {
                v: 1,
                weights: Default::default(),
                from: "lb".into(),
                at_ms: 0,
            },
            3,
        ));
        assert!(c.service_delta_json("web", 2, false).is_none());
        assert!(c.service_delta_json("web", 3, false).is_some());
        // A catalog rebuilt from a snapshot at 3 knows nothing older.
        let fresh = Catalog::from_snapshot(&Snapshot {
            revision: 3,
            entries: vec![],
        });
        assert!(fresh.service_delta_json("web", 2, false).is_none());
        assert!(fresh.service_delta_json("web", 3, false).is_some());
        // Past the log's length the oldest changes are gone.
        for r in 4..(4 + CHANGE_LOG_LEN as u64 + 1) {
            c.apply(&put("instances/a", instance("a", "web", r % 2 == 0), r));
        }
        assert!(c.service_delta_json("web", 3, false).is_none());
        assert!(c.service_delta_json("web", 5, false).is_some());
    }

    #[test]
    fn a_service_whose_last_instance_left_keeps_no_log_and_answers_from_then_on() {
        let mut c = Catalog::default();
        c.apply(&put("instances/a", instance("a", "web", false), 1));
        c.apply(&put("instances/b", instance("b", "api", false), 2));
        c.apply(&Event::Delete {
            key: "instances/a".into(),
            revision: 3,
        });
        assert!(
            !c.change_logs.contains_key("web"),
            "dropped with web's last instance"
        );
        assert!(c.change_logs.contains_key("api"));
        // Before the drop nothing can be said; from it on, nothing changed.
        assert!(c.service_delta_json("web", 2, false).is_none());
        let (v, ids) = by_id(&c.service_delta_json("web", 3, false).unwrap());
        assert!(ids.is_empty());
        assert_eq!(v["removed"], serde_json::json!([]));
        // A logless service inherits the floor; one with a log keeps its own.
        assert!(c.service_delta_json("api", 1, false).is_some());
        // web comes back: its new log starts at the floor.
        c.apply(&put("instances/c", instance("c", "web", false), 4));
        assert!(c.service_delta_json("web", 2, false).is_none());
        let (_, ids) = by_id(&c.service_delta_json("web", 3, false).unwrap());
        assert_eq!(ids.keys().collect::<Vec<_>>(), ["c"]);
    }
}
