//! Where the replicas of stateful services live, and what happens when their node is lost.
//!
//! A stateless replica goes wherever [`crate::stack::place`] puts it on the live nodes:
//! a node that leaves costs nothing but a restart elsewhere. A replica with volumes is
//! different — its data is on its node — so it is *assigned*: the elected server keeps
//! one [`AssignmentRecord`] per stateful replica, and agents run exactly the replicas
//! assigned to them. An assignment only moves when an operator moves it (a migration's
//! pin) or when its node has been gone for the service's `grace` and the policy says
//! what to do then ([`OnNodeLoss`]). Every move after a loss bumps the assignment's
//! generation; a copy from an older generation is stale and is never started again
//! (fencing: a returning host keeps its old copy stopped, as an orphan).
//!
//! [`plan`] is the decision, pure and clocked by its inputs; the registry's duty
//! applies it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stack::{place, ServiceSpec, StackRecord};
pub use crate::stack::{OnNodeLoss, RecoveryPolicy, MIN_GRACE};

/// How long a fenced agent gives a replica to stop before it is killed.
pub const FENCE_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The file-name prefix of replica `r`'s archives (`STACK-SERVICE-R-`).
pub fn archive_prefix(stack: &str, service: &str, r: u32) -> String {
    format!("{stack}-{service}-{r}-")
}

/// The `copies` peers that keep a replica's archives besides its own node `own`: ranked
/// by a stable hash of the archive prefix and the node (rendezvous hashing), so the same
/// peers are chosen every time while the nodes stay the same, and a node leaving moves
/// only the copies it held.
pub fn copy_holders(prefix: &str, own: &str, live: &[String], copies: u32) -> Vec<String> {
    let mut peers: Vec<(u64, &String)> = live
        .iter()
        .filter(|n| n.as_str() != own)
        .map(|n| {
            (
                crate::hash::stable_hash(format!("{prefix}{n}").as_bytes()),
                n,
            )
        })
        .collect();
    peers.sort_by(|a, b| b.cmp(a));
    peers.dedup_by(|a, b| a.1 == b.1);
    peers
        .into_iter()
        .take(copies as usize)
        .map(|(_, n)| n.clone())
        .collect()
}

/// Whether a service is stateful (has volumes): its replicas are assigned, not placed.
pub fn stateful(spec: &ServiceSpec) -> bool {
    !spec.volumes.is_empty()
}

/// The policy a service's replicas follow when their node is lost, `None` for a
/// stateless service (placed anew on the live nodes, as always).
pub fn on_node_loss(spec: &ServiceSpec) -> Option<OnNodeLoss> {
    if !stateful(spec) {
        return None;
    }
    let explicit = spec.recovery.as_ref().and_then(|r| r.on_node_loss);
    Some(explicit.unwrap_or(if spec.backup.is_some() {
        OnNodeLoss::Restore
    } else {
        OnNodeLoss::Wait
    }))
}

/// The `grace` of a service (the default when it has no recovery table).
pub fn grace(spec: &ServiceSpec) -> Duration {
    spec.recovery
        .as_ref()
        .map(|r| r.grace)
        .unwrap_or_else(crate::stack::default_grace)
}

/// Warnings for a spec that is valid but probably not what its author meant.
pub fn warnings(f: &str, spec: &ServiceSpec) -> Vec<String> {
    let mut out = Vec::new();
    if spec.recovery.is_some() && !stateful(spec) {
        out.push(format!(
            "{f}.recovery: the service has no volumes, so its replicas are simply started \
             elsewhere when a node is lost; the recovery table is ignored"
        ));
    }
    if on_node_loss(spec) == Some(OnNodeLoss::Restore)
        && spec.backup.as_ref().is_some_and(|b| b.copies == 0)
    {
        out.push(format!(
            "{f}.backup.copies is 0: backups stay on the replica's own node, so a restore \
             after losing that node needs {} to be shared storage",
            spec.backup.as_ref().map(|b| b.dir.as_str()).unwrap_or("")
        ));
    }
    out
}

/// Key of one replica's assignment: `STACK/SERVICE/REPLICA` (the wire and store form
/// of a [`ReplicaKey`]).
pub fn replica_key(stack: &str, service: &str, replica: u32) -> String {
    ReplicaKey::new(stack, service, replica).to_string()
}

/// One replica of a stack's service: the identity the agents, the planner and the CLI
/// share. Its text form `STACK/SERVICE/REPLICA` keys assignments in the store; stack and
/// service names never hold a `/` (both are validated names), so it parses back whole.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaKey {
    /// The stack's name.
    pub stack: String,
    /// The service's name within the stack.
    pub service: String,
    /// The replica's number, from 0.
    pub replica: u32,
}

impl ReplicaKey {
    /// The key of replica `replica` of `stack`'s `service`.
    pub fn new(stack: &str, service: &str, replica: u32) -> ReplicaKey {
        ReplicaKey {
            stack: stack.to_owned(),
            service: service.to_owned(),
            replica,
        }
    }

    /// The key of the replica a registered instance is, from the metadata a stack's
    /// agent sets (`stack`, `replica`); `None` for an instance outside any stack.
    pub fn of_instance(service: &str, meta: &BTreeMap<String, String>) -> Option<ReplicaKey> {
        Some(ReplicaKey::new(
            meta.get("stack")?,
            service,
            meta.get("replica")?.parse().ok()?,
        ))
    }
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.stack, self.service, self.replica)
    }
}

impl std::str::FromStr for ReplicaKey {
    type Err = crate::FieldError;

    fn from_str(s: &str) -> Result<ReplicaKey, crate::FieldError> {
        let bad = || {
            crate::FieldError::new(
                "replica",
                format!("{s:?} is not STACK/SERVICE/REPLICA (REPLICA a number)"),
            )
        };
        let mut parts = s.splitn(3, '/');
        let (Some(stack), Some(service), Some(r)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if stack.is_empty() || service.is_empty() {
            return Err(bad());
        }
        Ok(ReplicaKey::new(
            stack,
            service,
            r.parse().map_err(|_| bad())?,
        ))
    }
}

/// Where one stateful replica lives, as the elected server decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// Record version.
    pub v: u32,
    /// The node that runs the replica.
    pub node: String,
    /// Bumped each time the replica is moved off a lost node: copies created under an
    /// older generation are stale and never started again.
    pub generation: u64,
    /// When (unix ms) the node was first seen gone, while it is gone (display only:
    /// grace is timed on the server's monotonic clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_at_ms: Option<u64>,
    /// Set when this generation was made by a recovery: how, from which node, and when
    /// that node was lost. The node's agent restores (or starts empty) accordingly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovered>,
    /// When (unix ms) the assignment last moved.
    pub since_ms: u64,
}

/// How an assignment came to be after a node loss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// `restore` or `empty`.
    pub how: OnNodeLoss,
    /// The node that was lost.
    pub from_node: String,
    /// When (unix ms) it was first seen gone.
    pub lost_at_ms: u64,
    /// A specific archive to restore (`flotilla recover --from`), instead of the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
}

/// One change to the assignments: the record to write, or `None` to delete it.
pub type AssignmentChange = (String, Option<AssignmentRecord>);

/// The assignment changes that bring `current` in line with `stacks` and the nodes.
///
/// - A stateful replica with no assignment is assigned where [`place`] puts it.
/// - An assigned replica stays on its node while the node is live, even when nodes
///   join (its data is there); a pin (`flotilla migrate`) to another live node moves
///   it without a new generation (the migration carried the data).
/// - While its node is gone, the record says since when (`lost_at_ms`); once gone for
///   the service's grace (`gone_for`, timed by the caller), policy `restore`/`empty`
///   moves it to a live node with the next generation; `wait` keeps it.
/// - Assignments of replicas no longer desired (scaled down, stack removed, or the
///   service became stateless) are deleted.
pub fn plan(
    stacks: &[StackRecord],
    live: &[String],
    gone_for: &dyn Fn(&str) -> Duration,
    current: &BTreeMap<String, AssignmentRecord>,
    now_ms: u64,
) -> Vec<AssignmentChange> {
    let mut out = Vec::new();
    let mut desired = std::collections::BTreeSet::new();
    for st in stacks {
        for (name, svc) in &st.services {
            let Some(policy) = on_node_loss(&svc.spec) else {
                continue;
            };
            // After a loss, a restored replica goes to a live node that holds copies of
            // its archives (it restores from its own disk instead of fetching the archive
            // over the LAN); else, and for the other policies, where placement on the live
            // nodes puts it.
            let placed = place(name, svc, live);
            let copies = match (&svc.spec.backup, policy) {
                (Some(b), OnNodeLoss::Restore) => b.copies,
                _ => 0,
            };
            for r in 0..svc.spec.replicas {
                let key = replica_key(&st.name, name, r);
                desired.insert(key.clone());
                let cur = current.get(&key);
                let holder = cur.and_then(|c| {
                    copy_holders(&archive_prefix(&st.name, name, r), &c.node, live, copies)
                        .into_iter()
                        .next()
                });
                let next = decide(
                    cur,
                    holder.as_ref().or(placed.get(&r)),
                    svc.pins.get(&r),
                    live,
                    policy,
                    grace(&svc.spec),
                    gone_for,
                    now_ms,
                );
                if next.as_ref() != cur {
                    if let Some(rec) = next {
                        out.push((key, Some(rec)));
                    }
                }
            }
        }
    }
    for key in current.keys() {
        if !desired.contains(key) {
            out.push((key.clone(), None));
        }
    }
    out
}

/// An operator's `flotilla recover`: restore a replica now, on `to` (default: where
/// placement puts it among the live nodes, its current node if that is the only one),
/// from `archive` (default: the newest that verifies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// Record version.
    #[serde(default)]
    pub v: u32,
    /// Target node.
    #[serde(default)]
    pub to: Option<String>,
    /// Archive file name to restore.
    #[serde(default)]
    pub archive: Option<String>,
    /// When it was asked for (unix ms).
    #[serde(default)]
    pub at_ms: u64,
}

/// [`plan`], then the operators' recover requests on top: each request for a replica
/// that has an assignment moves it with the next generation as a `restore` recovery
/// (the copy it leaves behind, if its node is live, becomes stale and stops). Returns
/// the changes and the request keys consumed (every request is consumed once seen:
/// one for a replica without an assignment or a service without backups is dropped,
/// the API having refused what it could tell).
pub fn plan_with_requests(
    stacks: &[StackRecord],
    live: &[String],
    gone_for: &dyn Fn(&str) -> Duration,
    current: &BTreeMap<String, AssignmentRecord>,
    requests: &BTreeMap<String, RecoverRequest>,
    now_ms: u64,
) -> (Vec<AssignmentChange>, Vec<String>) {
    let mut changes = plan(stacks, live, gone_for, current, now_ms);
    let mut consumed = Vec::new();
    for (key, req) in requests {
        consumed.push(key.clone());
        let after = changes
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| current.get(key).cloned());
        let Some(cur) = after else { continue };
        let Ok(replica) = key.parse::<ReplicaKey>() else {
            continue;
        };
        let Some((name, svc)) = stacks
            .iter()
            .find(|s| s.name == replica.stack)
            .and_then(|s| s.services.get_key_value(&replica.service))
        else {
            continue;
        };
        let r = replica.replica;
        if svc.spec.backup.is_none() {
            continue;
        }
        let others: Vec<String> = live.iter().filter(|n| **n != cur.node).cloned().collect();
        let target = match &req.to {
            Some(to) if live.contains(to) => to.clone(),
            Some(_) => continue,
            None => place(name, svc, if others.is_empty() { live } else { &others })
                .remove(&r)
                .unwrap_or_else(|| cur.node.clone()),
        };
        let rec = AssignmentRecord {
            v: crate::RECORD_VERSION,
            node: target,
            generation: cur.generation + 1,
            lost_at_ms: None,
            recovered: Some(Recovered {
                how: OnNodeLoss::Restore,
                from_node: cur.node.clone(),
                lost_at_ms: cur.lost_at_ms.unwrap_or(now_ms),
                archive: req.archive.clone(),
            }),
            since_ms: now_ms,
        };
        changes.retain(|(k, _)| k != key);
        changes.push((key.clone(), Some(rec)));
    }
    (changes, consumed)
}

#[allow(clippy::too_many_arguments)]
fn decide(
    cur: Option<&AssignmentRecord>,
    placed: Option<&String>,
    pin: Option<&String>,
    live: &[String],
    policy: OnNodeLoss,
    grace: Duration,
    gone_for: &dyn Fn(&str) -> Duration,
    now_ms: u64,
) -> Option<AssignmentRecord> {
    let is_live = |n: &str| live.iter().any(|l| l == n);
    let Some(cur) = cur else {
        return placed.map(|node| AssignmentRecord {
            v: crate::RECORD_VERSION,
            node: node.clone(),
            generation: 1,
            lost_at_ms: None,
            recovered: None,
            since_ms: now_ms,
        });
    };
    if is_live(&cur.node) {
        let mut next = cur.clone();
        next.lost_at_ms = None;
        if let Some(pin) = pin.filter(|p| **p != cur.node && is_live(p)) {
            next.node = pin.clone();
            next.since_ms = now_ms;
            next.recovered = None;
        }
        return Some(next);
    }
    // The node is gone.
    let lost_at = cur.lost_at_ms.unwrap_or(now_ms);
    let act = policy != OnNodeLoss::Wait && gone_for(&cur.node) >= grace;
    match placed.filter(|_| act) {
        Some(to) => Some(AssignmentRecord {
            v: crate::RECORD_VERSION,
            node: to.clone(),
            generation: cur.generation + 1,
            lost_at_ms: None,
            recovered: Some(Recovered {
                how: policy,
                from_node: cur.node.clone(),
                lost_at_ms: lost_at,
                archive: None,
            }),
            since_ms: now_ms,
        }),
        None => Some(AssignmentRecord {
            lost_at_ms: Some(lost_at),
            ..cur.clone()
        }),
    }
}

/// Instance meta keys a restored replica carries (its container's `flotilla.meta.*`
/// labels, set by the agent that restored it).
pub mod meta {
    /// `ARCHIVE@NODE` the volumes came from.
    pub const RESTORED_FROM: &str = "restored-from";
    /// When that archive was taken (unix ms).
    pub const RESTORED_TAKEN_MS: &str = "restored-taken-ms";
    /// When the replica's old node was lost (unix ms).
    pub const LOST_AT_MS: &str = "lost-at-ms";
    /// Newer archives refused by verification (`ARCHIVE@NODE,…`).
    pub const RESTORE_SKIPPED: &str = "restore-skipped";
    /// Why the deltas after the restored point were not applied (`DELTA: reason`).
    pub const CHAIN_BROKEN: &str = "restore-chain-broken";
}

/// What `flotilla ps` says of a stateful replica: waiting for its lost node, restored
/// from which archive with how much loss at most, or running. `meta` is the replica's
/// registered instance's meta on its assigned node, if it has one.
pub fn describe(
    a: &AssignmentRecord,
    meta: Option<&BTreeMap<String, String>>,
    spec: Option<&ServiceSpec>,
    now_ms: u64,
) -> String {
    let secs = |ms: u64| ms / 1000;
    if let Some(lost) = a.lost_at_ms {
        let ago = secs(now_ms.saturating_sub(lost));
        return match spec.and_then(on_node_loss) {
            Some(p @ (OnNodeLoss::Restore | OnNodeLoss::Empty)) => format!(
                "node {} lost {ago} s ago; {} after {} grace",
                a.node,
                p.name(),
                humantime::format_duration(spec.map(grace).unwrap_or_default())
            ),
            _ => format!("waiting for node {} (lost {ago} s ago)", a.node),
        };
    }
    let Some(rec) = &a.recovered else {
        return if meta.is_some() {
            "running".into()
        } else {
            "starting".into()
        };
    };
    let get = |k: &str| meta.and_then(|m| m.get(k));
    match (rec.how, get(meta::RESTORED_FROM)) {
        (OnNodeLoss::Restore, Some(from)) => {
            let taken: u64 = get(meta::RESTORED_TAKEN_MS)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let lost_window = secs(rec.lost_at_ms.saturating_sub(taken));
            let mut s = format!(
                "restored from {from} (taken {}, {lost_window} s of writes lost at most) after node {} was lost",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(taken)
                ),
                rec.from_node
            );
            if let Some(skipped) = get(meta::RESTORE_SKIPPED) {
                s.push_str(&format!("; newer archives failed verification: {skipped}"));
            }
            if let Some(broken) = get(meta::CHAIN_BROKEN) {
                s.push_str(&format!("; backup chain broken at {broken}"));
            }
            s
        }
        (OnNodeLoss::Restore, None) => format!(
            "restoring on {} from the newest verified backup (node {} lost)",
            a.node, rec.from_node
        ),
        (how, _) => format!(
            "started {} on {} after node {} was lost",
            if how == OnNodeLoss::Empty {
                "empty"
            } else {
                "again"
            },
            a.node,
            rec.from_node
        ),
    }
}

/// Whether a copy of a replica made under `generation` may run on `node`, given the
/// replica's assignment: only the assigned node's copy of the current generation. A
/// copy with no generation label predates assignments and counts as generation 1.
pub fn may_run(assignment: &AssignmentRecord, node: &str, generation: Option<u64>) -> bool {
    assignment.node == node && generation.unwrap_or(1) >= assignment.generation
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{DeployedService, StackSpec};
    use proptest::prelude::*;

    fn stack(policy: &str, replicas: u32) -> StackRecord {
        let text = format!(
            r#"
name = "db"
[service.notes]
port = 8080
replicas = {replicas}
image = {{ base = "busybox" }}
[[service.notes.volume]]
name = "data"
path = "/data"
[service.notes.backup]
interval = "5s"
dir = "/var/lib/flotilla/backups"
copies = 1
{policy}
"#
        );
        let spec: StackSpec = toml::from_str(&text).unwrap();
        let services = spec
            .services
            .into_iter()
            .map(|(n, s)| {
                (
                    n,
                    DeployedService {
                        spec: s,
                        image: "flotilla/db-notes:1".into(),
                        image_id: "sha256:1".into(),
                        spec_hash: "0123456789abcdef".into(),
                        pins: BTreeMap::new(),
                    },
                )
            })
            .collect();
        StackRecord {
            v: 1,
            name: "db".into(),
            generation: 1,
            services,
            previous: None,
            rolled_back: None,
        }
    }

    fn nodes(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Plans and applies the changes to `current`.
    fn step(
        stacks: &[StackRecord],
        live: &[String],
        gone_for: &dyn Fn(&str) -> Duration,
        current: &mut BTreeMap<String, AssignmentRecord>,
        now_ms: u64,
    ) {
        for (k, rec) in plan(stacks, live, gone_for, current, now_ms) {
            match rec {
                Some(r) => current.insert(k, r),
                None => current.remove(&k),
            };
        }
    }

    #[test]
    fn a_replica_stays_on_its_node_when_nodes_join() {
        let st = [stack("", 1)];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a"]), &|_| Duration::ZERO, &mut cur, 1);
        assert_eq!(cur["db/notes/0"].node, "a");
        assert_eq!(cur["db/notes/0"].generation, 1);
        // Whatever joins, the replica keeps its node (and nothing is written).
        let more = nodes(&["a", "b", "c", "d", "e"]);
        assert!(plan(&st, &more, &|_| Duration::ZERO, &cur, 2).is_empty());
    }

    #[test]
    fn a_lost_node_is_noted_then_after_grace_the_replica_moves_with_a_new_generation() {
        let st = [stack("[service.notes.recovery]\ngrace = \"10s\"", 1)];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a", "b"]), &|_| Duration::ZERO, &mut cur, 1);
        let home = cur["db/notes/0"].node.clone();
        let other = if home == "a" { "b" } else { "a" };
        let live = nodes(&[other]);
        // Gone for 9 s: noted, not moved.
        step(&st, &live, &|_| Duration::from_secs(9), &mut cur, 1_000);
        let r = &cur["db/notes/0"];
        assert_eq!((r.node.as_str(), r.generation), (home.as_str(), 1));
        assert_eq!(r.lost_at_ms, Some(1_000));
        // Gone for 10 s: restored on the other node, generation 2, loss time kept.
        step(&st, &live, &|_| Duration::from_secs(10), &mut cur, 11_000);
        let r = &cur["db/notes/0"];
        assert_eq!((r.node.as_str(), r.generation), (other, 2));
        let rec = r.recovered.as_ref().unwrap();
        assert_eq!(rec.how, OnNodeLoss::Restore, "the default with backups");
        assert_eq!(
            (rec.from_node.as_str(), rec.lost_at_ms),
            (home.as_str(), 1_000)
        );
        // The old node returns: the replica stays where it was restored.
        let both = nodes(&["a", "b"]);
        assert!(plan(&st, &both, &|_| Duration::ZERO, &cur, 12_000).is_empty());
        assert!(!may_run(r, &home, Some(1)), "the returning copy is stale");
        assert!(may_run(r, other, Some(2)));
    }

    #[test]
    fn a_restored_replica_goes_to_the_node_that_holds_its_copies() {
        // Among many nodes, placement alone would often pick one without the copy; the
        // copy holder is preferred (it restores from its own disk), for every replica
        // number and whichever node held it.
        let st = [stack("[service.notes.recovery]\ngrace = \"2s\"", 8)];
        let all = nodes(&["a", "b", "c", "d", "e", "f"]);
        let mut cur = BTreeMap::new();
        step(&st, &all, &|_| Duration::ZERO, &mut cur, 1);
        let mut moved_off_placement = 0;
        for lost in ["a", "b", "c"] {
            let mut after = cur.clone();
            let live: Vec<String> = all.iter().filter(|n| *n != lost).cloned().collect();
            step(&st, &live, &|_| Duration::from_secs(2), &mut after, 10);
            let placed = place("notes", &st[0].services["notes"], &live);
            for r in 0..8u32 {
                let key = format!("db/notes/{r}");
                if cur[&key].node != lost {
                    assert_eq!(after[&key], cur[&key], "{key} was not on {lost}");
                    continue;
                }
                // The copy holder chosen while `lost` was live, as its agent chose it.
                let holder = &copy_holders(&archive_prefix("db", "notes", r), lost, &all, 1)[0];
                assert_eq!(&after[&key].node, holder, "{key}");
                assert_eq!(after[&key].generation, 2);
                if placed[&r] != *holder {
                    moved_off_placement += 1;
                }
            }
        }
        assert!(
            moved_off_placement > 0,
            "the test never distinguished the two"
        );
        // With the `empty` policy there is nothing to restore: placement decides.
        let st = [stack(
            "[service.notes.recovery]\ngrace = \"2s\"\non_node_loss = \"empty\"",
            8,
        )];
        let mut cur = BTreeMap::new();
        step(&st, &all, &|_| Duration::ZERO, &mut cur, 1);
        let live: Vec<String> = all.iter().filter(|n| *n != "a").cloned().collect();
        let placed = place("notes", &st[0].services["notes"], &live);
        let before = cur.clone();
        step(&st, &live, &|_| Duration::from_secs(2), &mut cur, 10);
        for r in 0..8u32 {
            let key = format!("db/notes/{r}");
            if before[&key].node == "a" {
                assert_eq!(cur[&key].node, placed[&r], "{key}");
            }
        }
    }

    #[test]
    fn a_node_back_within_grace_keeps_its_replica() {
        let st = [stack("", 1)];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a"]), &|_| Duration::ZERO, &mut cur, 1);
        step(
            &st,
            &nodes(&["b"]),
            &|_| Duration::from_secs(3),
            &mut cur,
            5,
        );
        assert_eq!(cur["db/notes/0"].lost_at_ms, Some(5));
        step(&st, &nodes(&["a", "b"]), &|_| Duration::ZERO, &mut cur, 6);
        let r = &cur["db/notes/0"];
        assert_eq!(
            (r.node.as_str(), r.generation, r.lost_at_ms),
            ("a", 1, None)
        );
    }

    #[test]
    fn policy_wait_never_moves_and_a_pin_moves_without_a_new_generation() {
        let st = [stack(
            "[service.notes.recovery]\non_node_loss = \"wait\"",
            1,
        )];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a"]), &|_| Duration::ZERO, &mut cur, 1);
        step(
            &st,
            &nodes(&["b"]),
            &|_| Duration::from_secs(3600),
            &mut cur,
            9,
        );
        let r = &cur["db/notes/0"];
        assert_eq!(
            (r.node.as_str(), r.generation, r.lost_at_ms),
            ("a", 1, Some(9))
        );
        // Back, then an operator migrates it.
        let mut st = st;
        st[0]
            .services
            .get_mut("notes")
            .unwrap()
            .pins
            .insert(0, "b".into());
        step(&st, &nodes(&["a", "b"]), &|_| Duration::ZERO, &mut cur, 10);
        let r = &cur["db/notes/0"];
        assert_eq!((r.node.as_str(), r.generation), ("b", 1));
    }

    #[test]
    fn stateless_services_get_no_assignments_and_removed_replicas_lose_theirs() {
        let st = [stack("", 2)];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a", "b"]), &|_| Duration::ZERO, &mut cur, 1);
        assert_eq!(cur.len(), 2);
        let one = [stack("", 1)];
        let changes = plan(&one, &nodes(&["a", "b"]), &|_| Duration::ZERO, &cur, 2);
        assert_eq!(changes, vec![("db/notes/1".to_string(), None)]);
        let mut stateless = stack("", 1);
        stateless
            .services
            .get_mut("notes")
            .unwrap()
            .spec
            .volumes
            .clear();
        let changes = plan(&[stateless], &nodes(&["a"]), &|_| Duration::ZERO, &cur, 3);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes.iter().all(|(_, r)| r.is_none()));
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = stack("[service.notes.recovery]\ngrace = \"1s\"", 1);
        let spec = &s.services["notes"].spec;
        let e = spec.validate("service.notes").unwrap_err();
        assert_eq!(e.field, "service.notes.recovery.grace");
        let svc = s.services.get_mut("notes").unwrap();
        svc.spec.recovery = Some(RecoveryPolicy {
            on_node_loss: Some(OnNodeLoss::Restore),
            grace: Duration::from_secs(5),
        });
        svc.spec.backup = None;
        let e = svc.spec.validate("service.notes").unwrap_err();
        assert_eq!(e.field, "service.notes.recovery.on_node_loss");
        svc.spec.volumes.clear();
        svc.spec.recovery.as_mut().unwrap().on_node_loss = Some(OnNodeLoss::Empty);
        assert!(warnings("service.notes", &svc.spec)[0].contains("no volumes"));
    }

    #[test]
    fn ps_says_why_a_replica_waits_and_what_a_restore_lost() {
        let st = stack("[service.notes.recovery]\non_node_loss = \"wait\"", 1);
        let spec = &st.services["notes"].spec;
        let mut a = AssignmentRecord {
            v: 1,
            node: "a".into(),
            generation: 1,
            lost_at_ms: Some(1_000),
            recovered: None,
            since_ms: 0,
        };
        assert_eq!(
            describe(&a, None, Some(spec), 43_000),
            "waiting for node a (lost 42 s ago)"
        );
        a.lost_at_ms = None;
        a.node = "b".into();
        a.generation = 2;
        a.recovered = Some(Recovered {
            how: OnNodeLoss::Restore,
            from_node: "a".into(),
            lost_at_ms: 60_000,
            archive: None,
        });
        let meta: BTreeMap<String, String> = [
            (meta::RESTORED_FROM, "db-notes-0-55000.flotilla-backup@c"),
            (meta::RESTORED_TAKEN_MS, "55000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = describe(&a, Some(&meta), Some(spec), 70_000);
        assert!(
            s.starts_with("restored from db-notes-0-55000.flotilla-backup@c (taken 1970-01-01T00:00:55Z, 5 s of writes lost at most)"),
            "{s}"
        );
        assert!(describe(&a, None, Some(spec), 70_000).starts_with("restoring on b"));
    }

    #[test]
    fn a_recover_request_moves_a_waiting_replica_now_and_is_consumed() {
        let st = [stack(
            "[service.notes.recovery]\non_node_loss = \"wait\"",
            1,
        )];
        let mut cur = BTreeMap::new();
        step(&st, &nodes(&["a"]), &|_| Duration::ZERO, &mut cur, 1);
        step(
            &st,
            &nodes(&["b"]),
            &|_| Duration::from_secs(60),
            &mut cur,
            5,
        );
        let req = RecoverRequest {
            v: 1,
            to: None,
            archive: Some("db-notes-0-3.flotilla-backup".into()),
            at_ms: 6,
        };
        let requests: BTreeMap<String, RecoverRequest> = [
            ("db/notes/0".to_string(), req.clone()),
            ("db/gone/0".to_string(), req),
        ]
        .into();
        let (changes, consumed) =
            plan_with_requests(&st, &nodes(&["b"]), &|_| Duration::ZERO, &cur, &requests, 7);
        assert_eq!(consumed.len(), 2, "both consumed, the unknown one dropped");
        assert_eq!(changes.len(), 1);
        let r = changes[0].1.as_ref().unwrap();
        assert_eq!((r.node.as_str(), r.generation), ("b", 2));
        let how = r.recovered.as_ref().unwrap();
        assert_eq!(how.archive.as_deref(), Some("db-notes-0-3.flotilla-backup"));
        assert_eq!((how.from_node.as_str(), how.lost_at_ms), ("a", 5));
    }

    #[test]
    fn a_replica_key_refuses_what_is_not_stack_service_number() {
        for bad in ["", "a", "a/b", "a/b/x", "/b/1", "a//1", "a/b/-1"] {
            let e = bad.parse::<ReplicaKey>().unwrap_err();
            assert_eq!(e.field, "replica", "{bad:?}");
        }
        let mut meta = BTreeMap::new();
        assert_eq!(ReplicaKey::of_instance("web", &meta), None);
        meta.insert("stack".to_owned(), "shop".to_owned());
        meta.insert("replica".to_owned(), "2".to_owned());
        assert_eq!(
            ReplicaKey::of_instance("web", &meta),
            Some(ReplicaKey::new("shop", "web", 2))
        );
    }

    proptest! {
        /// A key's text form parses back to the same key, and is what `replica_key`
        /// writes (the store's keys of assignments).
        #[test]
        fn replica_keys_round_trip(
            stack in "[a-z][a-z0-9-]{0,20}",
            service in "[a-z][a-z0-9_-]{0,20}",
            replica in any::<u32>(),
        ) {
            let key = ReplicaKey::new(&stack, &service, replica);
            let text = key.to_string();
            prop_assert_eq!(&text, &replica_key(&stack, &service, replica));
            prop_assert_eq!(text.parse::<ReplicaKey>().unwrap(), key);
        }

        /// Whatever nodes come and go, a stateful replica is assigned to at most one
        /// node, its generation never goes down, and it only moves off a node that is
        /// gone (or to a pin).
        #[test]
        fn assignments_only_move_off_gone_nodes(
            steps in proptest::collection::vec((proptest::collection::btree_set(0usize..4, 0..4), 0u64..20), 1..30)
        ) {
            let st = [stack("[service.notes.recovery]\ngrace = \"5s\"", 3)];
            let all = ["a", "b", "c", "d"];
            let mut cur = BTreeMap::new();
            for (i, (up, gone_secs)) in steps.iter().enumerate() {
                let live: Vec<String> = up.iter().map(|i| all[*i].to_string()).collect();
                let before = cur.clone();
                let gone = Duration::from_secs(*gone_secs);
                step(&st, &live, &|_| gone, &mut cur, i as u64);
                for (k, r) in &cur {
                    if let Some(b) = before.get(k) {
                        prop_assert!(r.generation >= b.generation);
                        if r.node != b.node {
                            prop_assert!(!live.contains(&b.node), "moved off a live node");
                            prop_assert!(gone >= Duration::from_secs(5));
                            prop_assert!(live.contains(&r.node));
                            prop_assert_eq!(r.generation, b.generation + 1);
                        }
                    } else {
                        prop_assert!(live.contains(&r.node));
                    }
                }
            }
        }
    }
}
