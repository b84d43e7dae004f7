//! The agent's loops: node lease, Docker events, anti-entropy resync, load reports.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bollard::system::EventsOptions;
use flotilla_client::Client;
use flotilla_core::config::AgentConfig;
use flotilla_core::InstanceSpec;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::docker;
use crate::labels::{self, instance_id, SERVICE};
use crate::state::{Inner, State};

/// A configured agent, ready to run.
pub struct Agent {
    inner: Arc<Inner>,
}

/// A running agent's tasks.
pub struct AgentHandle {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// Stops the loops and leaves the cluster: the node and its instances are removed
    /// from the registry at once instead of waiting for the lease to expire.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, t) in self.inner.state.lock().await.checks.drain() {
            t.abort();
        }
        match self.inner.client.leave_node(&self.inner.node).await {
            Ok(_) => tracing::info!(node = self.inner.node, "left the cluster"),
            Err(e) => tracing::warn!(error = %e, "could not leave cleanly; the lease will expire"),
        }
    }

    /// Prometheus text of the agent's metrics.
    pub fn metrics(&self) -> String {
        self.inner.metrics.encode()
    }
}

impl Agent {
    /// Connects to the engine; `config` must be validated and carry a node name.
    pub async fn connect(config: AgentConfig, token: String) -> anyhow::Result<Self> {
        let node = config.node.clone().context("agent needs a node name")?;
        let docker = docker::connect(&config.docker).await?;
        let tls = crate::node_tls::NodeTls::obtain(&config, &node, Some(&token)).await?;
        // With a node certificate the agent speaks for its node only: no token.
        let client = match &tls {
            Some(t) => Client::with_tls(&config.server, None, Some(t.client())),
            None => Client::new(&config.server, Some(token.clone())),
        };
        let advertise = match config.advertise {
            Some(ip) => Some(ip),
            None => {
                route_source(
                    client
                        .servers()
                        .first()
                        .map(String::as_str)
                        .unwrap_or_default(),
                )
                .await
            }
        };
        tracing::info!(node, advertise = ?advertise, "advertise address");
        Ok(Agent {
            inner: Arc::new(Inner::new(
                docker, client, config, node, advertise, token, tls,
            )?),
        })
    }

    /// Registers the node, then starts the lease, event and resync loops.
    pub async fn start(self) -> anyhow::Result<AgentHandle> {
        let inner = self.inner;
        // Bind the API first: its URL goes into the node record.
        let api = crate::api::bind(&inner).await?;
        let fence = inner.fence_from_start();
        let mut backoff = Duration::from_millis(100);
        loop {
            match inner.register_node().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "registry not reachable yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut tasks = vec![fence, tokio::spawn(inner.clone().lease_loop())];
        if let Some(cidr) = inner.config.cluster_cidr {
            let routed = crate::routed::set_up(&inner, cidr).await?;
            let _ = inner.routed.set(routed);
            tasks.push(tokio::spawn(crate::routed::route_loop(
                inner.clone(),
                routed,
            )));
        }
        if let Some(tls) = &inner.tls {
            tasks.push(tokio::spawn(
                tls.identity
                    .clone()
                    .renew_loop(inner.client.clone(), Some(inner.token.clone())),
            ));
        }
        if let Some(l) = api {
            tasks.push(crate::api::serve(inner.clone(), l));
        }
        tasks.push(tokio::spawn(inner.clone().token_watch_loop()));
        tasks.push(tokio::spawn(inner.clone().reconcile_loop()));
        tasks.push(tokio::spawn(inner.clone().backup_loop()));
        tasks.push(tokio::spawn(inner.clone().inventory_loop()));
        // Subscribe to events before the first resync, so nothing between them is lost.
        let events = inner.subscribe_events();
        tasks.push(tokio::spawn(inner.clone().event_loop(events)));
        inner.resync().await;
        tasks.push(tokio::spawn(inner.clone().resync_loop()));
        tasks.push(tokio::spawn(inner.clone().load_loop()));
        tracing::info!(
            node = inner.node,
            server = inner.client.base(),
            "agent running"
        );
        Ok(AgentHandle { inner, tasks })
    }

    /// Runs until `shutdown` resolves, then leaves the cluster.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.start().await?;
        shutdown.await;
        handle.shutdown().await;
        Ok(())
    }
}

type EventStream = futures::stream::BoxStream<
    'static,
    Result<bollard::models::EventMessage, bollard::errors::Error>,
>;

impl Inner {
    async fn register_node(&self) -> anyhow::Result<()> {
        let address = match self.advertise {
            Some(ip) => Some(ip.to_string()),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned()),
        };
        let sent = std::time::Instant::now();
        self.client
            .register_node(
                &self.node,
                self.config.lease_ttl,
                address.as_deref(),
                self.api_url().as_deref(),
            )
            .await?;
        self.lease_held_since(sent);
        Ok(())
    }

    /// Renews the node lease several times per TTL; re-registers and resyncs if the
    /// registry forgot us (our lease expired while we were away).
    async fn lease_loop(self: Arc<Self>) {
        let period = self.config.lease_ttl / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let loads_age = self
                .loads_confirmed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|at| at.elapsed());
            let sent = std::time::Instant::now();
            match self.client.renew_node(&self.node, period, loads_age).await {
                Ok(_) => {
                    self.metrics.renewals.inc();
                    self.lease_held_since(sent);
                }
                Err(e) if e.status() == Some(404) => {
                    tracing::warn!(
                        node = self.node,
                        "lease had expired: registering again and resyncing"
                    );
                    if self.register_node().await.is_ok() {
                        self.resync_now.notify_one();
                    }
                }
                Err(e) => {
                    self.metrics.renewal_failures.inc();
                    tracing::warn!(error = %e, "lease renewal failed");
                }
            }
        }
    }

    fn subscribe_events(&self) -> EventStream {
        let mut filters = HashMap::new();
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        filters.insert("label".to_owned(), vec![SERVICE.to_owned()]);
        filters.insert(
            "event".to_owned(),
            ["start", "die", "pause", "unpause", "destroy", "update"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        self.docker
            .events(Some(EventsOptions::<String> {
                filters,
                ..Default::default()
            }))
            .boxed()
    }

    async fn event_loop(self: Arc<Self>, mut events: EventStream) {
        loop {
            while let Some(item) = events.next().await {
                match item {
                    Ok(ev) => {
                        self.metrics.docker_events.inc();
                        let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
                        match ev.action.as_deref().unwrap_or_default() {
                            "start" | "unpause" => self.register_container(&id).await,
                            "die" | "pause" | "destroy" => self.deregister_container(&id).await,
                            // A new CPU quota: load shares are relative to it.
                            "update" => self.quota_changed(Some(id)),
                            _ => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Docker event stream failed");
                        break;
                    }
                }
            }
            // Events may have been missed while the stream was down: resubscribe, resync.
            tokio::time::sleep(Duration::from_millis(500)).await;
            events = self.subscribe_events();
            self.resync_now.notify_one();
            self.quota_changed(None);
        }
    }

    /// Marks a container's CPU quota (`None`: every container's) to be read again.
    fn quota_changed(&self, container: Option<String>) {
        self.quota_changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container);
    }

    /// Samples every registered container's load each period and reports the ones that
    /// moved past the dead band; a round in which every sample worked is vouched for by
    /// the next lease renewal, which keeps the unchanged reports fresh at no store cost.
    async fn load_loop(self: Arc<Self>) {
        let mut tracker = crate::load::LoadTracker::default();
        let mut sent: HashMap<String, crate::load::Load> = HashMap::new();
        // Per container: its quota and first process (read once), and its cgroup files.
        let mut facts: HashMap<String, (docker::LoadFacts, Option<crate::cgroup::Files>)> =
            HashMap::new();
        let cgroups = crate::cgroup::CgroupReader::from_host();
        if cgroups.is_none() {
            tracing::info!(
                "no cgroup hierarchy readable here: load samples go through the engine's stats API"
            );
        }
        let mut tick = tokio::time::interval(self.config.load_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let round = std::time::Instant::now();
            let registered: Vec<(String, String)> = {
                let state = self.state.lock().await;
                state
                    .registered
                    .iter()
                    .filter_map(|(id, spec)| {
                        Some((id.clone(), spec.meta.get("container_id")?.clone()))
                    })
                    .collect()
            };
            tracker.retain(|c| registered.iter().any(|(_, rc)| rc == c));
            sent.retain(|id, _| registered.iter().any(|(rid, _)| rid == id));
            let changed =
                std::mem::take(&mut *self.quota_changed.lock().unwrap_or_else(|p| p.into_inner()));
            facts.retain(|c, _| {
                registered.iter().any(|(_, rc)| rc == c)
                    && !changed.contains(&None)
                    && !changed
                        .iter()
                        .flatten()
                        .any(|id| id.starts_with(c.as_str()) || c.starts_with(id.as_str()))
            });
            for (_, container) in &registered {
                if !facts.contains_key(container) {
                    match docker::load_facts(&self.docker, container).await {
                        Ok(f) => {
                            let files = cgroups
                                .as_ref()
                                .zip(f.pid)
                                .and_then(|(r, pid)| r.files_of_pid(pid));
                            facts.insert(container.clone(), (f, files));
                        }
                        Err(e) => {
                            tracing::debug!(container, error = %e, "inspect for the CPU quota failed")
                        }
                    }
                }
            }
            // From the cgroup files where they are readable (microseconds); else through
            // the engine, whose one-shot stats take about a second each (it waits for a
            // second sample): those are taken all at once, or a host with many
            // containers would report each one only every N seconds.
            let mut samples = Vec::with_capacity(registered.len());
            let mut from_engine = Vec::new();
            for (id, c) in &registered {
                let Some((f, files)) = facts.get_mut(c) else {
                    continue;
                };
                if let (Some(r), Some(fs)) = (&cgroups, files.as_ref()) {
                    match r.sample(fs, f.quota) {
                        Ok(s) => {
                            self.metrics.load_samples_cgroup.inc();
                            samples.push((id, c, Ok(s)));
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(container = c, error = %e, "cgroup read failed; sampling through the engine");
                            *files = None;
                        }
                    }
                }
                from_engine.push((id, c, f.quota));
            }
            self.metrics
                .load_samples_engine
                .inc_by(from_engine.len() as u64);
            samples.extend(
                futures::future::join_all(from_engine.into_iter().map(|(id, c, quota)| {
                    let docker = &self.docker;
                    async move { (id, c, docker::sample(docker, c, quota).await) }
                }))
                .await,
            );
            let mut all_held = samples.len() == registered.len();
            for (id, container, sample) in samples {
                match sample {
                    Ok(sample) => {
                        let Some(load) = tracker.observe(container, sample) else {
                            continue;
                        };
                        if sent
                            .get(id)
                            .is_some_and(|last| last.within_dead_band(&load))
                        {
                            continue;
                        }
                        match self.client.report_load(id, load.cpu, load.memory).await {
                            Ok(_) => {
                                self.metrics.load_reports.inc();
                                sent.insert(id.clone(), load);
                            }
                            Err(e) => {
                                all_held = false;
                                tracing::debug!(id, error = %e, "load report failed");
                            }
                        }
                    }
                    Err(e) => {
                        all_held = false;
                        tracing::debug!(id, error = %e, "load sample failed");
                    }
                }
            }
            if all_held {
                *self
                    .loads_confirmed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(round);
            }
        }
    }

    async fn resync_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.resync_interval) => {}
                _ = self.resync_now.notified() => {}
            }
            self.resync().await;
        }
    }

    /// The spec for a running labelled container, or `None` (not ours, gone, or bad
    /// labels — which are logged with the label named).
    async fn desired(&self, container: &str) -> Option<InstanceSpec> {
        let facts = match docker::inspect(&self.docker, container, self.advertise).await {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(container, error = %e, "inspect failed");
                return None;
            }
        };
        match labels::spec_from_container(
            &self.node,
            &facts,
            self.config.default_network.as_deref(),
            self.advertise,
        ) {
            Ok(spec) => spec,
            Err(e) => {
                self.metrics.label_errors.inc();
                tracing::error!(container = facts.name, error = %e, "container not registered: bad label");
                None
            }
        }
    }

    async fn register_container(self: &Arc<Self>, container: &str) {
        let Some(spec) = self.desired(container).await else {
            return;
        };
        let id = instance_id(&self.node, container);
        let mut state = self.state.lock().await;
        self.register(&mut state, &id, spec).await;
    }

    async fn register(self: &Arc<Self>, state: &mut State, id: &str, spec: InstanceSpec) {
        let mut result = self.client.register(id, &spec).await;
        if result.as_ref().err().and_then(|e| e.status()) == Some(409) {
            // Our node lease lapsed: take it again, then register.
            if self.register_node().await.is_ok() {
                result = self.client.register(id, &spec).await;
            }
        }
        match result {
            Ok(answer) => {
                tracing::info!(id, service = spec.service, address = %spec.address, port = spec.port, "registered");
                self.metrics.registrations.inc();
                let stored = answer
                    .get("health")
                    .and_then(|h| serde_json::from_value(h.clone()).ok());
                self.start_checks(state, id, &spec, stored);
                state.registered.insert(id.to_owned(), spec);
                self.metrics.instances.set(state.registered.len() as i64);
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "registration failed; the next resync retries")
            }
        }
    }

    async fn deregister_container(&self, container: &str) {
        let id = instance_id(&self.node, container);
        let mut state = self.state.lock().await;
        self.deregister(&mut state, &id).await;
    }

    async fn deregister(&self, state: &mut State, id: &str) {
        if let Some(t) = state.checks.remove(id) {
            t.abort();
        }
        state.registered.remove(id);
        self.metrics.instances.set(state.registered.len() as i64);
        match self.client.deregister(id).await {
            Ok(_) => {
                tracing::info!(id, "deregistered");
                self.metrics.deregistrations.inc();
            }
            Err(e) if e.status() == Some(404) => {}
            Err(e) => {
                tracing::warn!(id, error = %e, "deregistration failed; the next resync retries")
            }
        }
    }

    /// Anti-entropy: make the registry's view of this node exactly the engine's.
    async fn resync(self: &Arc<Self>) {
        // The state lock is held from before the engine is listed to the end: the event
        // loop waits, so an event that happens after the listing is applied after this
        // pass. Taken only after the listings, a container started in between was
        // registered by its event, then missing from the (older) listing, deregistered
        // here, and left out until the next pass 30 s later (a rolling update's new
        // replica then "did not pass its health check": seen once in CI).
        let mut state = self.state.lock().await;
        let containers = match docker::labelled_running(&self.docker).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "resync: cannot list containers");
                return;
            }
        };
        let mut desired = HashMap::new();
        for c in containers {
            if let Some(spec) = self.desired(&c).await {
                desired.insert(instance_id(&self.node, &c), spec);
            }
        }
        let registered = match self.client.instances_of_node(&self.node).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "resync: cannot list the registry");
                return;
            }
        };
        for view in &registered {
            if !desired.contains_key(&view.id) {
                tracing::info!(id = view.id, "resync: not backed by a running container");
                self.deregister(&mut state, &view.id).await;
            }
        }
        state.registered.retain(|id, _| desired.contains_key(id));
        for (id, spec) in desired {
            // Registration is idempotent on the server: unchanged specs cost no write.
            self.register(&mut state, &id, spec).await;
        }
        self.metrics.resyncs.inc();
    }

    /// (Re)starts an instance's check loop when its spec changed or the loop ended.
    fn start_checks(
        self: &Arc<Self>,
        state: &mut State,
        id: &str,
        spec: &InstanceSpec,
        stored: Option<flotilla_core::HealthStatus>,
    ) {
        // A registry that holds no verdict (the instance was registered anew, say after
        // our lease lapsed) gets a fresh loop, whose first verdict it then receives.
        if state.registered.get(id) == Some(spec)
            && state.checks.get(id).is_some_and(|t| !t.is_finished())
            && (stored.is_some() || !spec.node_checks)
        {
            return;
        }
        if let Some(t) = state.checks.remove(id) {
            t.abort();
        }
        if let Some(task) = crate::checks::spawn(self, id, spec, stored) {
            state.checks.insert(id.to_owned(), task);
        }
    }
}

/// The source address of this host's route to `server_url`'s host: what other hosts on
/// that network see this one as. A UDP "connect" only picks the route; nothing is sent.
async fn route_source(server_url: &str) -> Option<std::net::IpAddr> {
    let authority = server_url
        .split_once("://")
        .map_or(server_url, |(_, rest)| rest);
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let target = tokio::net::lookup_host(with_port).await.ok()?.next()?;
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    socket.connect(target).await.ok()?;
    Some(socket.local_addr().ok()?.ip())
}
