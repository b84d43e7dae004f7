//! Desired state → containers on this host.
//!
//! Every pass reads the stacks and the live nodes, computes with
//! [`flotilla_core::stack::place`] which replicas belong here (every agent computes the
//! same), and makes the engine agree: start what is missing, restart what exited (with
//! backoff, per the restart policy), replace replicas whose spec changed — the new one
//! first, the old one only after the new one passes its health check, deregistered and
//! drained — and roll the service back when a new replica does not pass. A replica
//! placed elsewhere is removed here only once it passes there, so a move is
//! blue/green, never a gap.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::container::{Config, CreateContainerOptions, ListContainersOptions};
use bollard::models::{HostConfig, Mount, MountTypeEnum};
use bollard::network::CreateNetworkOptions;
use flotilla_core::recovery::{self, replica_key, AssignmentRecord};
use flotilla_core::stack::{place, DeployedService, RestartPolicy, StackRecord};
use flotilla_core::HealthStatus;
use futures::StreamExt;

use crate::build::{REPLICA, SPEC_HASH, STACK};
use crate::labels::{instance_id, NETWORK, SERVICE};
use crate::state::Inner;

/// Label: the node whose reconciler manages the container.
pub const OWNER: &str = "flotilla.node";
/// Label: the assignment generation a stateful replica's container was made under
/// ([`flotilla_core::recovery`]); a copy from an older generation is never started.
pub const GENERATION: &str = "flotilla.generation";

/// Labels that make a container a stack's replica.
pub const STACK_LABELS: [&str; 8] = [
    STACK,
    OWNER,
    REPLICA,
    SPEC_HASH,
    GENERATION,
    "flotilla.meta.stack",
    "flotilla.meta.replica",
    "flotilla.meta.spec",
];

/// A container of a stack on this engine.
#[derive(Debug, Clone)]
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

/// Name of replica `r` of `service` in `stack` built from `hash`.
pub fn container_name(stack: &str, service: &str, r: u32, hash: &str) -> String {
    format!("{stack}-{service}-{r}-{}", &hash[..hash.len().min(8)])
}

/// Docker volume of replica `r`'s volume `vol` under assignment `generation`: the
/// first generation keeps the plain name; a replica recovered after a node loss gets
/// volumes of its own, so a stale copy left on a node (an orphan) is never reused.
pub fn volume_name(stack: &str, service: &str, r: u32, vol: &str, generation: u64) -> String {
    if generation <= 1 {
        format!("{stack}-{service}-{r}-{vol}")
    } else {
        format!("{stack}-{service}-{r}-g{generation}-{vol}")
    }
}

/// Default network of a stack.
pub fn network_of(stack: &str, svc: &DeployedService) -> String {
    svc.spec
        .network
        .clone()
        .unwrap_or_else(|| format!("flotilla-{stack}"))
}

/// A replica this node should run: its stack, service name, service, replica number,
/// and assignment (stateful replicas).
type Wanted<'a> = (
    &'a StackRecord,
    &'a str,
    &'a DeployedService,
    u32,
    Option<&'a AssignmentRecord>,
);

impl Inner {
    /// Runs reconcile passes: on every change of desired state, and at least every second.
    pub(crate) async fn reconcile_loop(self: Arc<Self>) {
        let mut index = 0;
        loop {
            match self.client.stacks(index, Duration::from_secs(1)).await {
                Ok((i, stacks)) => {
                    index = i;
                    if let Err(e) = self.reconcile(&stacks).await {
                        tracing::warn!(error = format!("{e:#}"), "reconcile pass failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading desired state failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// The stack replicas this node manages on its engine.
    pub(crate) async fn stack_containers(&self) -> anyhow::Result<Vec<Local>> {
        // Only replicas this node created: another cluster's agent (or another node's,
        // after a restore) may share the engine, and its containers are not ours.
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![STACK.to_owned(), format!("{OWNER}={}", self.node)],
        );
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                filters,
                ..Default::default()
            }))
            .await?;
        let mut out = Vec::new();
        for c in list {
            let labels = c.labels.unwrap_or_default();
            let (Some(stack), Some(service), Some(r), Some(hash)) = (
                labels.get(STACK),
                labels.get(SERVICE),
                labels.get(REPLICA).and_then(|r| r.parse().ok()),
                labels.get(SPEC_HASH),
            ) else {
                continue;
            };
            let status = c.status.clone().unwrap_or_default();
            out.push(Local {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.first().cloned())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                stack: stack.clone(),
                service: service.clone(),
                replica: r,
                hash: hash.clone(),
                running: c.state.as_deref() == Some("running"),
                exit_code: parse_exit(&status),
                generation: labels.get(GENERATION).and_then(|g| g.parse().ok()),
            });
        }
        Ok(out)
    }

    /// One pass over every stack.
    pub(crate) async fn reconcile(&self, stacks: &[StackRecord]) -> anyhow::Result<()> {
        let nodes = self.client.nodes().await?;
        let live: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let instances = self.client.instances().await?;
        // Where each replica passes: "stack/service/replica" → nodes.
        let mut passing: HashMap<String, Vec<String>> = HashMap::new();
        for i in &instances {
            if i.health == HealthStatus::Passing {
                if let (Some(s), Some(r)) = (i.meta.get("stack"), i.meta.get("replica")) {
                    passing
                        .entry(format!("{s}/{}/{r}", i.service))
                        .or_default()
                        .push(i.node.clone().unwrap_or_default());
                }
            }
        }
        let (_, assignments) = self.client.assignments(0, Duration::ZERO).await?;
        self.remember_desired(stacks, &assignments);
        let locals = self.stack_containers().await?;
        let mut by_key: BTreeMap<String, Vec<Local>> = BTreeMap::new();
        let mut stale = Vec::new();
        for l in locals {
            let key = replica_key(&l.stack, &l.service, l.replica);
            // A copy from before its replica was recovered elsewhere is never started
            // again, nor removed: it is kept, stopped, for an operator (an orphan).
            if assignments
                .get(&key)
                .is_some_and(|a| l.generation.unwrap_or(1) < a.generation)
            {
                stale.push(l);
                continue;
            }
            by_key.entry(key).or_default().push(l);
        }
        self.keep_stale(stale).await;
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        for st in stacks {
            for (name, svc) in &st.services {
                if recovery::stateful(&svc.spec) {
                    // Stateful replicas run where they are assigned (by the elected
                    // server), not wherever placement would put them today.
                    for r in 0..svc.spec.replicas {
                        let key = replica_key(&st.name, name, r);
                        if let Some(a) = assignments.get(&key).filter(|a| a.node == self.node) {
                            wanted.insert(key, (st, name, svc, r, Some(a)));
                        }
                    }
                    continue;
                }
                for (r, node) in place(name, svc, &live) {
                    if node == self.node {
                        wanted.insert(replica_key(&st.name, name, r), (st, name, svc, r, None));
                    }
                }
            }
        }
        // Replicas of one service converge `update.parallelism` at a time (a rolling
        // update waits for each new replica's health check); services one after another.
        let mut groups: BTreeMap<String, Vec<(String, Vec<Local>)>> = BTreeMap::new();
        for (key, (st, name, _, _, _)) in &wanted {
            let have = by_key.remove(key).unwrap_or_default();
            groups
                .entry(format!("{}/{name}", st.name))
                .or_default()
                .push((key.clone(), have));
        }
        for (_, members) in groups {
            let parallel = members
                .first()
                .map(|(k, _)| wanted[k].2.spec.update.parallelism.max(1) as usize)
                .unwrap_or(1);
            futures::stream::iter(members)
                .for_each_concurrent(parallel, |(key, have)| {
                    let (st, name, svc, r, assigned) = wanted[&key];
                    async move {
                        let converged = self
                            .converge_replica(st, name, svc, r, assigned, have)
                            .await;
                        if let Err(e) = converged {
                            tracing::warn!(
                                replica = key,
                                error = format!("{e:#}"),
                                "could not converge"
                            );
                        }
                    }
                })
                .await;
        }
        // What is left here is not wanted here. While a restore runs, its container may
        // not be held yet: retire nothing this pass (the next one will).
        if self.is_restoring() {
            return Ok(());
        }
        for (key, have) in by_key {
            let mut parts = key.splitn(3, '/');
            let (stack, service) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let still_desired = stacks
                .iter()
                .find(|s| s.name == stack)
                .and_then(|s| s.services.get(service))
                .map(|svc| have.first().is_some_and(|l| l.replica < svc.spec.replicas))
                .unwrap_or(false);
            let elsewhere = passing
                .get(&key)
                .is_some_and(|nodes| nodes.iter().any(|n| *n != self.node));
            for l in have {
                if self.is_held(&l.id).await && still_desired {
                    continue;
                }
                if !still_desired || elsewhere {
                    let drain = stacks
                        .iter()
                        .find(|s| s.name == stack)
                        .and_then(|s| s.services.get(service))
                        .map(|s| s.spec.update.drain)
                        .unwrap_or(Duration::from_secs(2));
                    tracing::info!(container = l.name, "replica not wanted here: retiring");
                    if let Err(e) = self.retire_keep_volumes(&l.id, drain).await {
                        tracing::warn!(
                            container = l.name,
                            error = format!("{e:#}"),
                            "retire failed"
                        );
                    }
                }
            }
        }
        self.remove_unwanted_networks(stacks).await;
        Ok(())
    }

    /// Removes the networks this agent made for stacks that are no longer desired
    /// (`flotilla rm`): volumes stay, networks go. Only networks carrying the stack
    /// label, which only the agent sets (a network the operator made and named in a
    /// spec is never touched); the engine refuses one that still has containers
    /// attached, and a later pass tries again.
    async fn remove_unwanted_networks(&self, stacks: &[StackRecord]) {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![STACK.to_owned()]);
        let Ok(list) = self
            .docker
            .list_networks(Some(bollard::network::ListNetworksOptions::<String> {
                filters,
            }))
            .await
        else {
            return;
        };
        for n in list {
            let stack = n.labels.as_ref().and_then(|l| l.get(STACK)).cloned();
            let (Some(name), Some(stack)) = (n.name, stack) else {
                continue;
            };
            if stacks.iter().any(|s| s.name == stack) {
                continue;
            }
            match self.docker.remove_network(&name).await {
                Ok(()) => tracing::info!(network = name, stack, "stack removed: network removed"),
                Err(e) => tracing::debug!(network = name, error = %e, "network kept (in use?)"),
            }
        }
    }

    async fn converge_replica(
        &self,
        st: &StackRecord,
        name: &str,
        svc: &DeployedService,
        r: u32,
        assigned: Option<&AssignmentRecord>,
        have: Vec<Local>,
    ) -> anyhow::Result<()> {
        // A node whose lease lapsed starts no replica another node may be given.
        if assigned.is_some() && self.fenced_now() {
            return Ok(());
        }
        let (current, old): (Vec<Local>, Vec<Local>) =
            have.into_iter().partition(|l| l.hash == svc.spec_hash);
        if let Some(c) = current.first() {
            if !c.running && !self.is_held(&c.id).await {
                let restart = match svc.spec.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => c.exit_code != 0,
                    RestartPolicy::Never => false,
                };
                // A replica this node stopped itself when its lease lapsed comes back
                // whatever its restart policy (it did not fail).
                let fenced = self.unfence(&c.id);
                if (restart || fenced) && self.backoff_allows(&c.id).await {
                    tracing::info!(container = c.name, exit = c.exit_code, "restarting replica");
                    self.metrics.restarts.inc();
                    self.docker.start_container::<String>(&c.id, None).await?;
                }
            }
            if c.running && !old.is_empty() && self.wait_passing(&c.id, Duration::ZERO).await {
                for o in &old {
                    self.retire_keep_volumes(&o.id, svc.spec.update.drain)
                        .await?;
                }
            }
            return Ok(());
        }
        // No container of the current version: create one. The first one of a
        // generation recovered by restore is filled from the newest verified backup.
        self.ensure_image(svc).await?;
        let generation = assigned.map(|a| a.generation).unwrap_or(1);
        let restore = assigned
            .and_then(|a| a.recovered.as_ref())
            .filter(|rc| rc.how == recovery::OnNodeLoss::Restore);
        let id = match restore {
            Some(rc) if !self.has_volumes(&st.name, name, svc, r, generation).await => {
                self.restore_replica(st, name, svc, r, generation, rc)
                    .await?
            }
            _ => {
                self.create_replica(&st.name, name, svc, r, generation, Vec::new())
                    .await?
            }
        };
        self.docker.start_container::<String>(&id, None).await?;
        self.metrics.containers_started.inc();
        if old.is_empty() {
            return Ok(());
        }
        // A rolling update: the old replica keeps serving until the new one passes.
        let t0 = Instant::now();
        if self.wait_passing(&id, svc.spec.update.health_timeout).await {
            tracing::info!(
                replica = format!("{}/{name}/{r}", st.name),
                after_ms = t0.elapsed().as_millis() as u64,
                "new version passes; retiring the old one"
            );
            for o in &old {
                self.retire_keep_volumes(&o.id, svc.spec.update.drain)
                    .await?;
            }
        } else {
            tracing::warn!(
                replica = format!("{}/{name}/{r}", st.name),
                "new version did not pass its health check: removing it"
            );
            self.retire_keep_volumes(&id, Duration::ZERO).await?;
            if svc.spec.update.rollback {
                self.metrics.rollbacks.inc();
                let reason = format!(
                    "replica {r} on {} did not pass its health check within {}",
                    self.node,
                    humantime::format_duration(svc.spec.update.health_timeout)
                );
                if let Err(e) = self
                    .client
                    .rollback(&st.name, name, &svc.spec_hash, &reason)
                    .await
                {
                    tracing::warn!(error = %e, "rollback request failed");
                }
            }
        }
        Ok(())
    }

    /// Creates (does not start) replica `r` of `name` under assignment `generation`,
    /// with `extra` labels besides the usual ones.
    pub(crate) async fn create_replica(
        &self,
        stack: &str,
        name: &str,
        svc: &DeployedService,
        r: u32,
        generation: u64,
        extra: Vec<(String, String)>,
    ) -> anyhow::Result<String> {
        // On the routed cluster network, a stack without a network of its own uses the
        // node's routed bridge, and "auto" means its container address (reached from
        // every host without NAT) rather than a published port.
        let routed = self.routed.get().is_some();
        let network = match (&svc.spec.network, routed) {
            (None, true) => crate::routed::ROUTED_NETWORK.to_owned(),
            _ => network_of(stack, svc),
        };
        let publish = match svc.spec.publish {
            flotilla_core::stack::Publish::Auto if routed => flotilla_core::stack::Publish::None,
            p => p,
        };
        if self
            .docker
            .inspect_network::<String>(&network, None)
            .await
            .is_err()
        {
            self.docker
                .create_network(CreateNetworkOptions {
                    name: network.clone(),
                    check_duplicate: true,
                    labels: [(STACK.to_owned(), stack.to_owned())].into(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating network {network}"))?;
        }
        let mut labels: HashMap<String, String> = crate::build::service_labels(name, &svc.spec)
            .into_iter()
            .collect();
        labels.insert(STACK.into(), stack.into());
        labels.insert(OWNER.into(), self.node.clone());
        labels.insert(REPLICA.into(), r.to_string());
        labels.insert(SPEC_HASH.into(), svc.spec_hash.clone());
        labels.insert(NETWORK.into(), network.clone());
        labels.insert("flotilla.meta.stack".into(), stack.into());
        labels.insert("flotilla.meta.replica".into(), r.to_string());
        labels.insert("flotilla.meta.version".into(), svc.spec.version.clone());
        labels.insert(
            "flotilla.meta.spec".into(),
            svc.spec_hash[..svc.spec_hash.len().min(12)].to_owned(),
        );
        if recovery::stateful(&svc.spec) {
            labels.insert(GENERATION.into(), generation.to_string());
        }
        labels.extend(extra);
        let mounts = svc
            .spec
            .volumes
            .iter()
            .map(|v| Mount {
                target: Some(v.path.clone()),
                source: Some(volume_name(stack, name, r, &v.name, generation)),
                typ: Some(MountTypeEnum::VOLUME),
                ..Default::default()
            })
            .collect();
        let memory = svc.spec.resources.memory_bytes().ok().flatten();
        let (exposed, bindings) =
            crate::docker::published_port(svc.spec.port, publish, self.advertise);
        // Secret values are given to the container here, never baked into its image;
        // the label names them so backups can leave them out.
        let mut env = None;
        if !svc.spec.secret_env.is_empty() {
            let stored = self
                .client
                .secrets(stack, name)
                .await
                .with_context(|| format!("fetching the secrets of {stack}/{name}"))?;
            let mut vars = Vec::new();
            for key in svc.spec.secret_env.keys() {
                let value = stored
                    .values
                    .get(key)
                    .with_context(|| format!("secret {key} of {stack}/{name} is not stored"))?;
                vars.push(format!("{key}={value}"));
            }
            labels.insert(
                crate::build::SECRET_ENV.into(),
                svc.spec
                    .secret_env
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            );
            env = Some(vars);
        }
        let config = Config {
            image: Some(svc.image.clone()),
            env,
            labels: Some(labels),
            exposed_ports: exposed,
            host_config: Some(HostConfig {
                port_bindings: bindings,
                mounts: Some(mounts),
                nano_cpus: svc.spec.resources.cpus.map(|c| (c * 1e9) as i64),
                memory: memory.map(|m| m as i64),
                network_mode: Some(network),
                // An init as PID 1 passes SIGTERM on: a stop takes milliseconds, not
                // the 10 s grace that a signal-deaf PID 1 (busybox httpd) would cost.
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A recovered generation's containers are named apart: a stale copy of the same
        // version may sit on this engine as an orphan, and must not be replaced.
        let cname = match generation {
            0 | 1 => container_name(stack, name, r, &svc.spec_hash),
            g => format!("{}-g{g}", container_name(stack, name, r, &svc.spec_hash)),
        };
        // A leftover of an interrupted pass (created, never started) is replaced.
        let _ = self
            .docker
            .remove_container(
                &cname,
                Some(bollard::container::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: cname.clone(),
                    platform: None,
                }),
                config,
            )
            .await
            .with_context(|| format!("creating {cname}"))?;
        tracing::info!(container = cname, "created replica");
        Ok(created.id)
    }

    /// Makes sure the engine has the service's image, fetching it from another node's
    /// agent if not (the CLI pushed it to the nodes that were up at deploy time).
    async fn ensure_image(&self, svc: &DeployedService) -> anyhow::Result<()> {
        if self.docker.inspect_image(&svc.image).await.is_ok() {
            return Ok(());
        }
        let nodes = self.client.nodes().await?;
        for n in nodes.iter().filter(|n| n.name != self.node) {
            let Some(api) = &n.api else { continue };
            let Ok(resp) = self.peer(api).save_image(&svc.image).await else {
                continue;
            };
            let body = resp
                .bytes_stream()
                .take_while(|r| futures::future::ready(r.is_ok()))
                .filter_map(|r| futures::future::ready(r.ok()));
            let mut s = self.docker.import_image_stream(
                bollard::image::ImportImageOptions { quiet: true },
                body,
                None,
            );
            while let Some(item) = s.next().await {
                if let Some(e) = item?.error {
                    anyhow::bail!("loading {} from {}: {e}", svc.image, n.name);
                }
            }
            if self.docker.inspect_image(&svc.image).await.is_ok() {
                tracing::info!(
                    image = svc.image,
                    from = n.name,
                    "image fetched from a peer"
                );
                return Ok(());
            }
        }
        anyhow::bail!(
            "image {} is not on this engine and no peer has it",
            svc.image
        )
    }

    async fn backoff_allows(&self, id: &str) -> bool {
        let mut b = self.backoff.lock().await;
        b.entry(id.to_owned()).or_default().allow(Instant::now())
    }

    /// Deregisters, drains and removes a container; its volumes stay (the replica's
    /// data outlives any one container of it).
    pub(crate) async fn retire_keep_volumes(
        &self,
        id: &str,
        drain: Duration,
    ) -> anyhow::Result<()> {
        let _ = self.client.deregister(&instance_id(&self.node, id)).await;
        if !drain.is_zero() {
            tokio::time::sleep(drain).await;
        }
        self.docker
            .remove_container(
                id,
                Some(bollard::container::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await?;
        self.backoff.lock().await.remove(id);
        Ok(())
    }
}

/// Exit code from a `docker ps` status like "Exited (137) 3 seconds ago".
fn parse_exit(status: &str) -> i64 {
    status
        .strip_prefix("Exited (")
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_from_status() {
        assert_eq!(parse_exit("Exited (137) 3 seconds ago"), 137);
        assert_eq!(parse_exit("Up 2 minutes"), 0);
        assert_eq!(parse_exit("Created"), 0);
    }
}
