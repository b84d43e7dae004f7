//! Desired state → containers on this host: the executor of [`crate::plan`].
//!
//! Every pass reads the stacks, the live nodes, the assignments and this engine's
//! containers; [`plan::plan`] decides which replicas belong here (every agent computes
//! the same), [`plan::step`] what each needs, [`plan::retirements`] what goes; this file
//! makes the engine agree: start what is missing, restart what exited (with backoff, per
//! the restart policy), replace replicas whose spec changed — the new one first, the old
//! one only after the new one passes its health check, deregistered and drained — and
//! roll the service back when a new replica does not pass. A replica placed elsewhere is
//! removed here only once it passes there, so a move is blue/green, never a gap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::container::{Config, CreateContainerOptions, ListContainersOptions};
use bollard::models::{HostConfig, Mount, MountTypeEnum};
use bollard::network::CreateNetworkOptions;
use flotilla_core::recovery;
use flotilla_core::recovery::ReplicaKey;
use flotilla_core::stack::{DeployedService, Publish, StackRecord};
use futures::StreamExt;

use crate::labels::{
    instance_id, GENERATION, META_REPLICA, META_SPEC, META_STACK, META_VERSION, NETWORK, OWNER,
    REPLICA, SECRET_ENV, SERVICE, SPEC_HASH, STACK,
};
use crate::plan::{self, Local, NodeFacts, Step, Wanted};
use crate::state::Inner;

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

    /// One pass over every stack: read, [`plan`](crate::plan::plan), execute.
    pub(crate) async fn reconcile(&self, stacks: &[StackRecord]) -> anyhow::Result<()> {
        let nodes = self.client.nodes().await?;
        let live: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let instances = self.client.instances().await?;
        let passing = plan::passing_replicas(&instances);
        let (_, assignments) = self.client.assignments(0, Duration::ZERO).await?;
        self.remember_desired(stacks, &assignments);
        let locals = self.stack_containers().await?;
        let plan = plan::plan(&self.node, stacks, &live, &assignments, locals);
        self.keep_stale(plan.stale).await;
        // Services one after another; a service's replicas `parallelism` at a time. Each
        // replica's step is decided on facts read just before it (a migration may hold
        // a container while an earlier replica's rolling update waits).
        for group in plan.groups {
            futures::stream::iter(group.members)
                .for_each_concurrent(group.parallelism, |w| async move {
                    let facts = self.node_facts().await;
                    let step = plan::step(&w, &facts);
                    if let Err(e) = self.execute(&w, step).await {
                        tracing::warn!(
                            replica = %w.key,
                            error = format!("{e:#}"),
                            "could not converge"
                        );
                    }
                })
                .await;
        }
        let held = self.holds.lock().await.clone();
        let retire = plan::retirements(
            &self.node,
            stacks,
            plan.leftovers,
            &passing,
            &held,
            self.is_restoring(),
        );
        for r in retire {
            tracing::info!(
                container = r.local.name,
                "replica not wanted here: retiring"
            );
            if let Err(e) = self.retire_keep_volumes(&r.local.id, r.drain).await {
                tracing::warn!(
                    container = r.local.name,
                    error = format!("{e:#}"),
                    "retire failed"
                );
            }
        }
        self.remove_unwanted_networks(stacks).await;
        Ok(())
    }

    /// What a replica's step is decided on, read now.
    async fn node_facts(&self) -> NodeFacts {
        NodeFacts {
            lease_lapsed: self.fenced_now(),
            held: self.holds.lock().await.clone(),
            fenced: self
                .fenced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
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

    /// Does what [`plan::step`] decided for one replica.
    async fn execute(&self, w: &Wanted<'_>, step: Step) -> anyhow::Result<()> {
        let (st, name, svc, r) = (w.stack, w.service, w.svc, w.key.replica);
        match step {
            Step::Nothing => Ok(()),
            Step::Restart { id, fenced } => {
                if self.backoff_allows(&id).await {
                    let exit = w.have.iter().find(|l| l.id == id).map(|l| l.exit_code);
                    tracing::info!(container = id, exit, fenced, "restarting replica");
                    self.metrics.restarts.inc();
                    self.docker.start_container::<String>(&id, None).await?;
                    // Its fence mark goes only once it runs again: a restart the
                    // backoff put off keeps it, so a later pass still starts it.
                    self.unfence(&id);
                }
                Ok(())
            }
            Step::RetireOldOncePassing { current, old } => {
                if self.wait_passing(&current, Duration::ZERO).await {
                    for o in &old {
                        self.retire_keep_volumes(o, svc.spec.update.drain).await?;
                    }
                }
                Ok(())
            }
            Step::Create {
                restore,
                replaces,
                stop_first,
            } => {
                self.ensure_image(svc).await?;
                if stop_first {
                    tracing::info!(
                        replica = %w.key,
                        "fixed host port: the old version goes before the new one starts"
                    );
                    for o in &replaces {
                        self.retire_keep_volumes(o, svc.spec.update.drain).await?;
                    }
                }
                if let Publish::Port(port) = svc.spec.publish {
                    self.host_port_free(port, &w.key).await?;
                }
                let generation = w.assigned.map(|a| a.generation).unwrap_or(1);
                let id = match restore {
                    Some(rc) if !self.has_volumes(&st.name, name, svc, r, generation).await => {
                        self.restore_replica(st, name, svc, r, generation, &rc)
                            .await?
                    }
                    _ => {
                        self.create_replica(&st.name, name, svc, r, generation, Vec::new())
                            .await?
                    }
                };
                if let Err(e) = self.docker.start_container::<String>(&id, None).await {
                    // Nothing half-made stays: a container that cannot start (its host
                    // port taken, say) is removed; its volumes stay.
                    let _ = self.docker.remove_container(&id, None).await;
                    return Err(e).with_context(|| format!("starting replica {}", w.key));
                }
                self.metrics.containers_started.inc();
                match (replaces.is_empty(), stop_first) {
                    (true, _) => Ok(()),
                    // Nothing left to retire, but a new version that does not pass is
                    // still removed and rolled back.
                    (false, true) => self.roll(w, &id, &[]).await,
                    (false, false) => self.roll(w, &id, &replaces).await,
                }
            }
        }
    }

    /// Refuses to create a replica whose fixed host port is already in use on this host
    /// (by a process, or another container), naming the port: the engine would create
    /// it and then fail to start it, or, without its userland proxy, start it while
    /// another listener answers on that port.
    async fn host_port_free(&self, port: u16, key: &ReplicaKey) -> anyhow::Result<()> {
        let ip = self
            .advertise
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        match tokio::net::TcpListener::bind((ip, port)).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.metrics.port_conflicts.inc();
                anyhow::bail!(
                    "publish port {port} of replica {key} is already in use on this host \
                     ({ip}:{port}: {e}): free it, or set another `publish` for the service"
                )
            }
        }
    }

    /// A rolling update's second half: the old containers keep serving until the new
    /// one passes; one that does not pass in time is removed and the service rolled back.
    async fn roll(&self, w: &Wanted<'_>, id: &str, replaces: &[String]) -> anyhow::Result<()> {
        let update = &w.svc.spec.update;
        let t0 = Instant::now();
        if self.wait_passing(id, update.health_timeout).await {
            tracing::info!(
                replica = %w.key,
                after_ms = t0.elapsed().as_millis() as u64,
                "new version passes; retiring the old one"
            );
            for o in replaces {
                self.retire_keep_volumes(o, update.drain).await?;
            }
            return Ok(());
        }
        tracing::warn!(
            replica = %w.key,
            "new version did not pass its health check: removing it"
        );
        self.retire_keep_volumes(id, Duration::ZERO).await?;
        if update.rollback {
            self.metrics.rollbacks.inc();
            let reason = format!(
                "replica {} on {} did not pass its health check within {}",
                w.key.replica,
                self.node,
                humantime::format_duration(update.health_timeout)
            );
            if let Err(e) = self
                .client
                .rollback(&w.stack.name, w.service, &w.svc.spec_hash, &reason)
                .await
            {
                tracing::warn!(error = %e, "rollback request failed");
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
        // The operator's labels first: flotilla's own (refused in the spec) win anyway.
        let mut labels: HashMap<String, String> = svc.spec.labels.clone().into_iter().collect();
        labels.extend(crate::build::service_labels(name, &svc.spec));
        labels.insert(STACK.into(), stack.into());
        labels.insert(OWNER.into(), self.node.clone());
        labels.insert(REPLICA.into(), r.to_string());
        labels.insert(SPEC_HASH.into(), svc.spec_hash.clone());
        labels.insert(NETWORK.into(), network.clone());
        labels.insert(META_STACK.into(), stack.into());
        labels.insert(META_REPLICA.into(), r.to_string());
        labels.insert(META_VERSION.into(), svc.spec.version.clone());
        labels.insert(
            META_SPEC.into(),
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
                SECRET_ENV.into(),
                svc.spec
                    .secret_env
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            );
            env = Some(vars);
        }
        // A built image carries the spec's command, environment, user and directory;
        // a registry image does not know them, so its container is given them.
        let from_registry = svc.spec.image.registry().is_some();
        let or_none = |v: &Vec<String>| (from_registry && !v.is_empty()).then(|| v.clone());
        if from_registry && !svc.spec.env.is_empty() {
            let plain = svc.spec.env.iter().map(|(k, v)| format!("{k}={v}"));
            env = Some(plain.chain(env.unwrap_or_default()).collect());
        }
        let aliases = crate::docker::service_aliases(stack, name, &network);
        let networking = bollard::container::NetworkingConfig {
            endpoints_config: HashMap::from([(
                network.clone(),
                bollard::models::EndpointSettings {
                    aliases: Some(aliases),
                    ..Default::default()
                },
            )]),
        };
        let config = Config {
            image: Some(svc.image.clone()),
            networking_config: Some(networking),
            entrypoint: or_none(&svc.spec.entrypoint),
            cmd: or_none(&svc.spec.command),
            user: svc.spec.user.clone().filter(|_| from_registry),
            working_dir: svc.spec.workdir.clone().filter(|_| from_registry),
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
        // A registry image comes from its registry (pinned to the digest the deploy
        // resolved); a peer's copy is the fallback when the registry cannot be reached.
        let mut pull_error = None;
        if svc.spec.image.registry().is_some() {
            let pulled = match svc.image.parse::<flotilla_core::stack::ImageRef>() {
                Ok(r) => match self.registry_auth() {
                    Ok(auth) => crate::docker::pull(&self.docker, &r, auth.as_ref()).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(anyhow::anyhow!(e)),
            };
            match pulled {
                Ok(p) => {
                    tracing::info!(image = p.pinned, "image pulled from its registry");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(image = svc.image, error = %format!("{e:#}"), "pull failed; asking peers");
                    pull_error = Some(e);
                }
            }
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
        match pull_error {
            Some(e) => Err(e.context(format!("no peer has {} either", svc.image))),
            None => anyhow::bail!(
                "image {} is not on this engine and no peer has it",
                svc.image
            ),
        }
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
