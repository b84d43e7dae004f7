//! The reconciler's decisions, apart from their effects.
//!
//! A pass of the reconciler (`reconcile.rs`) reads what it needs — the desired stacks,
//! the live nodes, the stateful replicas' assignments, the containers on this engine —
//! and these pure functions decide: [`plan`] which replicas this node runs (grouped by
//! service, converged `update.parallelism` at a time), which local copies are stale
//! (recovered elsewhere: kept stopped as orphans) and which are left over; [`step`]
//! what one replica needs next from its containers; [`retirements`] which leftovers go.
//! The executor does what they say with Docker and the registry, and nothing else
//! decides. Time enters only as facts the executor gathers (whether the lease lapsed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use flotilla_core::recovery::{self, AssignmentRecord, OnNodeLoss, Recovered, ReplicaKey};
use flotilla_core::stack::{place, DeployedService, Publish, RestartPolicy, StackRecord};

/// A container of a stack on this engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Local {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) stack: String,
    pub(crate) service: String,
    pub(crate) replica: u32,
    pub(crate) hash: String,
    pub(crate) running: bool,
    pub(crate) exit_code: i64,
    /// The assignment generation it was made under (stateful replicas).
    pub(crate) generation: Option<u64>,
}

impl Local {
    /// The replica this container is a copy of.
    pub(crate) fn key(&self) -> ReplicaKey {
        ReplicaKey::new(&self.stack, &self.service, self.replica)
    }
}

/// A replica this node should run, and its containers here (any version).
#[derive(Debug)]
pub(crate) struct Wanted<'a> {
    pub(crate) key: ReplicaKey,
    pub(crate) stack: &'a StackRecord,
    /// The service's name.
    pub(crate) service: &'a str,
    pub(crate) svc: &'a DeployedService,
    /// Its assignment, for a stateful replica.
    pub(crate) assigned: Option<&'a AssignmentRecord>,
    pub(crate) have: Vec<Local>,
}

/// The wanted replicas of one service, converged `parallelism` at a time (a rolling
/// update waits for each new replica's health check).
#[derive(Debug)]
pub(crate) struct Group<'a> {
    pub(crate) parallelism: usize,
    pub(crate) members: Vec<Wanted<'a>>,
}

/// What one pass does with the containers on this engine.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    /// Copies from before their replica was recovered elsewhere: never started again,
    /// nor removed (kept stopped for an operator).
    pub(crate) stale: Vec<Local>,
    /// What this node runs, service by service, in a stable order.
    pub(crate) groups: Vec<Group<'a>>,
    /// Containers of replicas this node does not run ([`retirements`] decides).
    pub(crate) leftovers: BTreeMap<ReplicaKey, Vec<Local>>,
}

/// Which replicas `node` runs and what becomes of each container on its engine. Every
/// agent computes the same placement from the same inputs; stateful replicas run where
/// the elected server assigned them (`assignments`, keyed by [`ReplicaKey`]'s text),
/// not wherever placement would put them today. Every local container ends up in
/// exactly one of the plan's three parts.
pub(crate) fn plan<'a>(
    node: &str,
    stacks: &'a [StackRecord],
    live: &[String],
    assignments: &'a BTreeMap<String, AssignmentRecord>,
    locals: Vec<Local>,
) -> Plan<'a> {
    let mut by_key: BTreeMap<ReplicaKey, Vec<Local>> = BTreeMap::new();
    let mut stale = Vec::new();
    for l in locals {
        let key = l.key();
        if assignments
            .get(&key.to_string())
            .is_some_and(|a| l.generation.unwrap_or(1) < a.generation)
        {
            stale.push(l);
        } else {
            by_key.entry(key).or_default().push(l);
        }
    }
    let mut groups = Vec::new();
    for st in stacks {
        for (name, svc) in &st.services {
            let mut members = Vec::new();
            let mut want = |r: u32, assigned: Option<&'a AssignmentRecord>| {
                let key = ReplicaKey::new(&st.name, name, r);
                let have = by_key.remove(&key).unwrap_or_default();
                members.push(Wanted {
                    key,
                    stack: st,
                    service: name,
                    svc,
                    assigned,
                    have,
                });
            };
            if recovery::stateful(&svc.spec) {
                for r in 0..svc.spec.replicas {
                    let key = recovery::replica_key(&st.name, name, r);
                    if let Some(a) = assignments.get(&key).filter(|a| a.node == node) {
                        want(r, Some(a));
                    }
                }
            } else {
                for (r, n) in place(name, svc, live) {
                    if n == node {
                        want(r, None);
                    }
                }
            }
            if !members.is_empty() {
                groups.push(Group {
                    parallelism: svc.spec.update.parallelism.max(1) as usize,
                    members,
                });
            }
        }
    }
    Plan {
        stale,
        groups,
        leftovers: by_key,
    }
}

/// What the executor knows about this node when it decides one replica's step.
#[derive(Debug, Default)]
pub(crate) struct NodeFacts {
    /// The node's lease lapsed: it starts no replica another node may be given.
    pub(crate) lease_lapsed: bool,
    /// Containers a migration is moving (the reconciler leaves them alone).
    pub(crate) held: HashSet<String>,
    /// Containers this node stopped itself when its lease lapsed.
    pub(crate) fenced: HashSet<String>,
}

/// What one wanted replica needs next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Nothing: its current version runs, or stays stopped by its restart policy, or
    /// is held, or this node may start nothing now.
    Nothing,
    /// Start the current version's stopped container again (restart backoff
    /// permitting). `fenced`: it was stopped by fencing, and comes back whatever its
    /// restart policy (it did not fail).
    Restart { id: String, fenced: bool },
    /// The current version runs next to older ones: once it passes, retire them
    /// (deregistered, drained, removed; volumes stay).
    RetireOldOncePassing { current: String, old: Vec<String> },
    /// No container of the current version: create one and start it. `restore`: fill
    /// it from the newest verified backup first (a replica recovered onto this node,
    /// when the volumes of its generation do not exist yet). `replaces`: a rolling
    /// update — the older containers keep serving until the new one passes; if it does
    /// not within the health timeout it is removed and the service rolled back.
    /// `stop_first`: the older containers go *before* the new one starts — a service
    /// on a fixed host port cannot run two versions on one host (the port holds one),
    /// so its update replaces each replica in place, with a gap of its start time.
    Create {
        restore: Option<Recovered>,
        replaces: Vec<String>,
        stop_first: bool,
    },
}

/// Decides what `w` needs next, given the node's facts.
pub(crate) fn step(w: &Wanted, facts: &NodeFacts) -> Step {
    if w.assigned.is_some() && facts.lease_lapsed {
        return Step::Nothing;
    }
    let (current, old): (Vec<&Local>, Vec<&Local>) =
        w.have.iter().partition(|l| l.hash == w.svc.spec_hash);
    let old: Vec<String> = old.iter().map(|l| l.id.clone()).collect();
    let Some(c) = current.first() else {
        let restore = w
            .assigned
            .and_then(|a| a.recovered.clone())
            .filter(|rc| rc.how == OnNodeLoss::Restore);
        let stop_first = matches!(w.svc.spec.publish, Publish::Port(_)) && !old.is_empty();
        return Step::Create {
            restore,
            replaces: old,
            stop_first,
        };
    };
    if !c.running {
        if facts.held.contains(&c.id) {
            return Step::Nothing;
        }
        let fenced = facts.fenced.contains(&c.id);
        let by_policy = match w.svc.spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => c.exit_code != 0,
            RestartPolicy::Never => false,
        };
        return if by_policy || fenced {
            Step::Restart {
                id: c.id.clone(),
                fenced,
            }
        } else {
            Step::Nothing
        };
    }
    if old.is_empty() {
        Step::Nothing
    } else {
        Step::RetireOldOncePassing {
            current: c.id.clone(),
            old,
        }
    }
}

/// A leftover container to retire, and how long to drain it after deregistering.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Retire {
    pub(crate) local: Local,
    pub(crate) drain: Duration,
}

/// The drain of a container whose service is gone.
const DEFAULT_DRAIN: Duration = Duration::from_secs(2);

/// Which leftovers go: a replica no longer desired at all (its stack, service or
/// number gone) goes at once; one desired but placed on another node goes only once it
/// passes there (`passing`: replica → nodes where it passes), so a move is blue/green,
/// never a gap. A held container of a desired replica stays (a migration owns it), and
/// while a restore runs nothing goes: its container may not be held yet.
pub(crate) fn retirements(
    node: &str,
    stacks: &[StackRecord],
    leftovers: BTreeMap<ReplicaKey, Vec<Local>>,
    passing: &HashMap<ReplicaKey, Vec<String>>,
    held: &HashSet<String>,
    restoring: bool,
) -> Vec<Retire> {
    if restoring {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (key, have) in leftovers {
        let svc = stacks
            .iter()
            .find(|s| s.name == key.stack)
            .and_then(|s| s.services.get(&key.service));
        let still_desired = svc.is_some_and(|svc| key.replica < svc.spec.replicas);
        let elsewhere = passing
            .get(&key)
            .is_some_and(|nodes| nodes.iter().any(|n| n != node));
        let drain = svc.map_or(DEFAULT_DRAIN, |s| s.spec.update.drain);
        for local in have {
            if still_desired && (held.contains(&local.id) || !elsewhere) {
                continue;
            }
            out.push(Retire { local, drain });
        }
    }
    out
}

/// Where each replica passes: replica → the nodes whose instance of it passes.
pub(crate) fn passing_replicas(
    instances: &[flotilla_core::InstanceView],
) -> HashMap<ReplicaKey, Vec<String>> {
    let mut out: HashMap<ReplicaKey, Vec<String>> = HashMap::new();
    for i in instances {
        if i.health != flotilla_core::HealthStatus::Passing {
            continue;
        }
        if let Some(key) = ReplicaKey::of_instance(&i.service, &i.meta) {
            out.entry(key)
                .or_default()
                .push(i.node.clone().unwrap_or_default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::stack::StackSpec;
    use proptest::prelude::*;

    const HASH: &str = "aaaaaaaaaaaaaaaa";

    /// A stack `s` with a stateless `web` (3 replicas) and, when `stateful`, a `db`
    /// with a volume and backups (2 replicas).
    fn stacks(web_restart: &str) -> Vec<StackRecord> {
        let text = format!(
            r#"
name = "s"
[service.web]
port = 8080
replicas = 3
restart = "{web_restart}"
image = {{ base = "busybox" }}
update = {{ parallelism = 2, drain = "3s" }}
[service.db]
port = 5432
replicas = 2
image = {{ base = "busybox" }}
[[service.db.volume]]
name = "data"
path = "/data"
[service.db.backup]
interval = "5s"
dir = "/var/lib/flotilla/backups"
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
                        image: "flotilla/s:1".into(),
                        image_id: "sha256:1".into(),
                        spec_hash: HASH.into(),
                        pins: BTreeMap::new(),
                    },
                )
            })
            .collect();
        vec![StackRecord {
            v: 1,
            name: "s".into(),
            generation: 1,
            services,
            previous: None,
            rolled_back: None,
        }]
    }

    fn local(id: &str, service: &str, r: u32, hash: &str, running: bool) -> Local {
        Local {
            id: id.into(),
            name: id.into(),
            stack: "s".into(),
            service: service.into(),
            replica: r,
            hash: hash.into(),
            running,
            exit_code: if running { 0 } else { 1 },
            generation: None,
        }
    }

    fn assignment(node: &str, generation: u64, recovered: Option<Recovered>) -> AssignmentRecord {
        AssignmentRecord {
            v: 1,
            node: node.into(),
            generation,
            lost_at_ms: None,
            recovered,
            since_ms: 0,
        }
    }

    /// Replica 0 of `web` (stateless), with `have` on this node.
    fn web_0(stack: &StackRecord, have: Vec<Local>) -> Wanted<'_> {
        Wanted {
            key: ReplicaKey::new("s", "web", 0),
            stack,
            service: "web",
            svc: &stack.services["web"],
            assigned: None,
            have,
        }
    }

    fn nodes(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn wanted<'a>(plan: &'a Plan, key: &ReplicaKey) -> Option<&'a Wanted<'a>> {
        plan.groups
            .iter()
            .flat_map(|g| &g.members)
            .find(|w| w.key == *key)
    }

    #[test]
    fn stateful_replicas_run_where_assigned_and_stale_copies_are_kept_apart() {
        let st = stacks("always");
        let live = nodes(&["a", "b"]);
        let mut asg = BTreeMap::new();
        asg.insert("s/db/0".to_owned(), assignment("a", 2, None));
        asg.insert("s/db/1".to_owned(), assignment("b", 1, None));
        let mut old_copy = local("db0-g1", "db", 0, HASH, true);
        old_copy.generation = Some(1);
        let mut new_copy = local("db0-g2", "db", 0, HASH, true);
        new_copy.generation = Some(2);
        let db1 = local("db1", "db", 1, HASH, true);
        let p = plan("a", &st, &live, &asg, vec![old_copy.clone(), new_copy, db1]);
        assert_eq!(p.stale, vec![old_copy]);
        let w = wanted(&p, &ReplicaKey::new("s", "db", 0)).expect("db/0 runs on a");
        assert_eq!(w.have.len(), 1);
        assert_eq!(w.assigned.map(|a| a.generation), Some(2));
        assert!(wanted(&p, &ReplicaKey::new("s", "db", 1)).is_none());
        assert_eq!(
            p.leftovers.keys().collect::<Vec<_>>(),
            vec![&ReplicaKey::new("s", "db", 1)]
        );
        // Without an assignment a stateful replica runs nowhere (the server assigns).
        let unassigned = BTreeMap::new();
        let p = plan("a", &st, &live, &unassigned, Vec::new());
        assert!(p
            .groups
            .iter()
            .all(|g| g.members.iter().all(|w| w.service != "db")));
    }

    #[test]
    fn a_group_converges_its_services_parallelism_at_a_time() {
        let st = stacks("always");
        let unassigned = BTreeMap::new();
        let p = plan("a", &st, &nodes(&["a"]), &unassigned, Vec::new());
        let web = p
            .groups
            .iter()
            .find(|g| g.members[0].service == "web")
            .unwrap();
        assert_eq!(web.parallelism, 2);
        let replicas: Vec<u32> = web.members.iter().map(|w| w.key.replica).collect();
        assert_eq!(replicas, vec![0, 1, 2]);
    }

    #[test]
    fn steps_follow_the_restart_policy_holds_and_fencing() {
        let st = stacks("on-failure");
        let w = |have: Vec<Local>| web_0(&st[0], have);
        let facts = NodeFacts::default();
        // Nothing here: create.
        assert_eq!(
            step(&w(vec![]), &facts),
            Step::Create {
                restore: None,
                replaces: vec![],
                stop_first: false
            }
        );
        // Exited with a failure: restart; exited cleanly: stays stopped (on-failure).
        let failed = local("c", "web", 0, HASH, false);
        assert_eq!(
            step(&w(vec![failed.clone()]), &facts),
            Step::Restart {
                id: "c".into(),
                fenced: false
            }
        );
        let mut clean = failed.clone();
        clean.exit_code = 0;
        assert_eq!(step(&w(vec![clean.clone()]), &facts), Step::Nothing);
        // Stopped by fencing: comes back whatever the policy.
        let fenced = NodeFacts {
            fenced: ["c".to_owned()].into(),
            ..NodeFacts::default()
        };
        assert_eq!(
            step(&w(vec![clean]), &fenced),
            Step::Restart {
                id: "c".into(),
                fenced: true
            }
        );
        // Held by a migration: left alone.
        let held = NodeFacts {
            held: ["c".to_owned()].into(),
            ..NodeFacts::default()
        };
        assert_eq!(step(&w(vec![failed]), &held), Step::Nothing);
        // A new version: create it, replacing the old one; once it runs, retire the old.
        let old = local("old", "web", 0, "bbbbbbbbbbbbbbbb", true);
        assert_eq!(
            step(&w(vec![old.clone()]), &facts),
            Step::Create {
                restore: None,
                replaces: vec!["old".into()],
                stop_first: false
            }
        );
        let new = local("new", "web", 0, HASH, true);
        assert_eq!(
            step(&w(vec![old, new]), &facts),
            Step::RetireOldOncePassing {
                current: "new".into(),
                old: vec!["old".into()]
            }
        );
    }

    #[test]
    fn a_service_on_a_fixed_host_port_is_replaced_stop_first() {
        let mut st = stacks("always");
        let svc = st[0].services.get_mut("web").unwrap();
        svc.spec.publish = Publish::Port(18080);
        let w = |have: Vec<Local>| web_0(&st[0], have);
        let old = local("old", "web", 0, "bbbbbbbbbbbbbbbb", true);
        assert_eq!(
            step(&w(vec![old]), &NodeFacts::default()),
            Step::Create {
                restore: None,
                replaces: vec!["old".into()],
                stop_first: true
            }
        );
        // A first start has nothing to stop.
        assert!(matches!(
            step(&w(vec![]), &NodeFacts::default()),
            Step::Create {
                stop_first: false,
                ..
            }
        ));
    }

    #[test]
    fn a_recovered_replica_is_restored_and_a_lapsed_lease_starts_nothing() {
        let st = stacks("always");
        let svc = &st[0].services["db"];
        let recovered = Recovered {
            how: OnNodeLoss::Restore,
            from_node: "b".into(),
            lost_at_ms: 5,
            archive: Some("s-db-0-1.flotilla-backup".into()),
        };
        let a = assignment("a", 2, Some(recovered.clone()));
        let w = Wanted {
            key: ReplicaKey::new("s", "db", 0),
            stack: &st[0],
            service: "db",
            svc,
            assigned: Some(&a),
            have: vec![],
        };
        assert_eq!(
            step(&w, &NodeFacts::default()),
            Step::Create {
                restore: Some(recovered),
                replaces: vec![],
                stop_first: false
            }
        );
        let lapsed = NodeFacts {
            lease_lapsed: true,
            ..NodeFacts::default()
        };
        assert_eq!(step(&w, &lapsed), Step::Nothing);
    }

    #[test]
    fn leftovers_go_once_they_pass_elsewhere_and_at_once_when_not_desired() {
        let st = stacks("always");
        let key = ReplicaKey::new("s", "web", 1);
        let c = local("w1", "web", 1, HASH, true);
        let leftovers = || BTreeMap::from([(key.clone(), vec![c.clone()])]);
        let none = HashSet::new();
        // Placed elsewhere but not passing there yet: kept.
        assert!(retirements("a", &st, leftovers(), &HashMap::new(), &none, false).is_empty());
        // Passing only here: kept.
        let here = HashMap::from([(key.clone(), vec!["a".to_owned()])]);
        assert!(retirements("a", &st, leftovers(), &here, &none, false).is_empty());
        // Passing on b: retired, with the service's drain.
        let there = HashMap::from([(key.clone(), vec!["b".to_owned()])]);
        let r = retirements("a", &st, leftovers(), &there, &none, false);
        assert_eq!(
            r,
            vec![Retire {
                local: c.clone(),
                drain: Duration::from_secs(3)
            }]
        );
        // Held by a migration, or a restore under way: kept.
        let held = HashSet::from(["w1".to_owned()]);
        assert!(retirements("a", &st, leftovers(), &there, &held, false).is_empty());
        assert!(retirements("a", &st, leftovers(), &there, &none, true).is_empty());
        // Scaled down below it: retired at once, held or not.
        let gone = BTreeMap::from([(
            ReplicaKey::new("s", "web", 7),
            vec![local("w7", "web", 7, HASH, true)],
        )]);
        assert_eq!(
            retirements("a", &st, gone, &HashMap::new(), &held, false).len(),
            1
        );
    }

    /// Containers of arbitrary replicas, versions and generations on a node.
    fn arb_locals() -> impl Strategy<Value = Vec<Local>> {
        proptest::collection::vec(
            (
                prop_oneof![Just("web"), Just("db")],
                0u32..5,
                any::<bool>(),
                any::<bool>(),
                proptest::option::of(1u64..4),
            ),
            0..12,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (svc, r, current, running, generation))| {
                    let hash = if current { HASH } else { "bbbbbbbbbbbbbbbb" };
                    let mut l = local(&format!("c{i}"), svc, r, hash, running);
                    l.generation = generation;
                    l
                })
                .collect()
        })
    }

    proptest! {
        /// Every local container lands in exactly one part of the plan; a stale copy
        /// is always of an older generation than its assignment; the wanted replicas are
        /// exactly what placement and the assignments give this node.
        #[test]
        fn a_plan_accounts_for_every_container(
            locals in arb_locals(),
            up in proptest::collection::btree_set(0usize..3, 1..4),
            db_nodes in proptest::collection::vec((0usize..3, 1u64..4), 2),
            me in 0usize..3,
        ) {
            let all = ["a", "b", "c"];
            let live: Vec<String> = up.iter().map(|i| all[*i].to_owned()).collect();
            let node = all[me];
            let st = stacks("always");
            let mut asg = BTreeMap::new();
            for (r, (n, g)) in db_nodes.iter().enumerate() {
                asg.insert(format!("s/db/{r}"), assignment(all[*n], *g, None));
            }
            let p = plan(node, &st, &live, &asg, locals.clone());
            let mut seen: Vec<&str> = p.stale.iter().map(|l| l.id.as_str()).collect();
            for g in &p.groups {
                for w in &g.members {
                    seen.extend(w.have.iter().map(|l| l.id.as_str()));
                    prop_assert!(w.have.iter().all(|l| l.key() == w.key));
                }
            }
            for (k, have) in &p.leftovers {
                seen.extend(have.iter().map(|l| l.id.as_str()));
                prop_assert!(have.iter().all(|l| l.key() == *k));
            }
            seen.sort();
            let mut ids: Vec<&str> = locals.iter().map(|l| l.id.as_str()).collect();
            ids.sort();
            prop_assert_eq!(seen, ids);
            for l in &p.stale {
                let a = &asg[&l.key().to_string()];
                prop_assert!(l.generation.unwrap_or(1) < a.generation);
            }
            let mut expect: Vec<ReplicaKey> = place("web", &st[0].services["web"], &live)
                .into_iter()
                .filter(|(_, n)| n == node)
                .map(|(r, _)| ReplicaKey::new("s", "web", r))
                .collect();
            for (r, (n, _)) in db_nodes.iter().enumerate() {
                if all[*n] == node {
                    expect.push(ReplicaKey::new("s", "db", r as u32));
                }
            }
            expect.sort();
            let mut got: Vec<ReplicaKey> =
                p.groups.iter().flat_map(|g| g.members.iter().map(|w| w.key.clone())).collect();
            got.sort();
            prop_assert_eq!(got, expect);
        }

        /// A step never touches a held container, never starts anything stateful when
        /// the lease lapsed, creates only when no container has the current version,
        /// and names only containers of its own replica.
        #[test]
        fn steps_respect_holds_fencing_and_versions(
            locals in arb_locals(),
            lapsed in any::<bool>(),
            held_mask in any::<u16>(),
            fenced_mask in any::<u16>(),
        ) {
            let st = stacks("never");
            let a = assignment("a", 1, None);
            for (service, assigned) in [("web", None), ("db", Some(&a))] {
                let key = ReplicaKey::new("s", service, 0);
                let have: Vec<Local> =
                    locals.iter().filter(|l| l.key() == key).cloned().collect();
                let pick = |mask: u16| -> HashSet<String> {
                    have.iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, l)| l.id.clone())
                        .collect()
                };
                let facts = NodeFacts {
                    lease_lapsed: lapsed,
                    held: pick(held_mask),
                    fenced: pick(fenced_mask),
                };
                let w = Wanted {
                    key,
                    stack: &st[0],
                    service,
                    svc: &st[0].services[service],
                    assigned,
                    have: have.clone(),
                };
                let ids: HashSet<&str> = have.iter().map(|l| l.id.as_str()).collect();
                match step(&w, &facts) {
                    Step::Nothing => {}
                    Step::Restart { id, fenced } => {
                        prop_assert!(!facts.held.contains(&id));
                        prop_assert!(!(lapsed && assigned.is_some()));
                        prop_assert_eq!(fenced, facts.fenced.contains(&id));
                        // web's policy is "never": only a fenced copy comes back.
                        prop_assert!(fenced || service == "db");
                        prop_assert!(ids.contains(id.as_str()));
                    }
                    Step::RetireOldOncePassing { current, old } => {
                        prop_assert!(!(lapsed && assigned.is_some()));
                        prop_assert!(have.iter().any(|l| l.id == current && l.hash == HASH && l.running));
                        prop_assert!(old.iter().all(|o| have.iter().any(|l| l.id == *o && l.hash != HASH)));
                    }
                    Step::Create { replaces, stop_first, .. } => {
                        // Neither service here has a fixed host port.
                        prop_assert!(!stop_first);
                        prop_assert!(!(lapsed && assigned.is_some()));
                        prop_assert!(have.iter().all(|l| l.hash != HASH));
                        prop_assert!(replaces.iter().all(|o| ids.contains(o.as_str())));
                    }
                }
            }
        }
    }
}
