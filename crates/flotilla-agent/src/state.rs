//! The agent's shared state: what its loops (`agent.rs`), its API (`api.rs`) and the
//! stack reconciler (`reconcile.rs`) all read and change. It lives apart from all three
//! so that none of them imports another's internals.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use flotilla_client::Client;
use flotilla_core::config::AgentConfig;
use flotilla_core::InstanceSpec;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::docker;
use crate::labels::{instance_id, SERVICE};
use crate::metrics::Metrics;

/// An agent's shared state.
pub(crate) struct Inner {
    pub(crate) docker: Docker,
    pub(crate) client: Client,
    pub(crate) config: AgentConfig,
    pub(crate) node: String,
    /// The address other hosts reach this host at (`--advertise`, or the source
    /// address of the route to the first server).
    pub(crate) advertise: Option<std::net::IpAddr>,
    pub(crate) metrics: Metrics,
    /// The cluster token: the agent's API requires it, and peers' APIs accept it.
    pub(crate) token: String,
    /// HTTP client for peer agents.
    pub(crate) http: reqwest::Client,
    /// This node's place in the routed cluster network, once set up (`cluster_cidr`).
    pub(crate) routed: std::sync::OnceLock<flotilla_core::subnet::NodeNetwork>,
    /// HTTP client for health probes of this node's instances.
    pub(crate) probe_http: reqwest::Client,
    /// When the load loop last sampled every container and found each report still
    /// within its dead band (or sent it): lease renewals vouch for the loads up to then.
    pub(crate) loads_confirmed: std::sync::Mutex<Option<std::time::Instant>>,
    /// Roles of tokens presented to the API, as the registry told (kept 10 s).
    pub(crate) token_roles:
        std::sync::Mutex<HashMap<String, (flotilla_core::token::Role, std::time::Instant)>>,
    /// The node certificate and the cluster CA, when the cluster speaks TLS.
    pub(crate) tls: Option<std::sync::Arc<crate::node_tls::NodeTls>>,
    /// Containers the reconciler must not restart (on their way to another host).
    pub(crate) holds: Mutex<std::collections::HashSet<String>>,
    /// Restores under way through the API: their container exists before its id can be
    /// held, so while one runs the reconciler retires no container it does not want.
    pub(crate) restores: std::sync::atomic::AtomicUsize,
    /// The API's URL once bound (an `api_listen` port of 0 is resolved here).
    pub(crate) api_bound: std::sync::OnceLock<String>,
    /// Restart backoff per container.
    pub(crate) backoff: Mutex<HashMap<String, crate::backoff::Backoff>>,
    /// Volume snapshots of migration pre-copies, by the id the CLI gave: (taken at,
    /// container id, per volume). The final pass sends only what changed since.
    pub(crate) snapshots: Mutex<HashMap<String, crate::backup::Snapshots>>,
    /// Incremental backup chains by replica archive prefix (`schedule.rs`).
    pub(crate) chains: Mutex<HashMap<String, crate::backup::Chain>>,
    /// Serialises event handling and resyncs so their decisions never interleave.
    pub(crate) state: Mutex<State>,
    pub(crate) resync_now: Notify,
    /// Containers whose resources changed (`docker update`): the load loop reads their
    /// CPU quota again before its next sample. `None` in the set means all of them
    /// (events may have been missed).
    pub(crate) quota_changed: std::sync::Mutex<std::collections::HashSet<Option<String>>>,
    /// When the last lease renewal that succeeded was sent: past the lease TTL the
    /// registry has given this node up, and its stateful replicas must stop
    /// (`recover.rs`).
    pub(crate) renewed_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Containers stopped because the lease lapsed (started again once it holds).
    pub(crate) fenced: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The desired state of the last reconcile pass (stacks and assignments), for
    /// fencing and the backup API while the registry cannot be read.
    pub(crate) desired: std::sync::Mutex<Desired>,
}

/// Stacks and stateful replicas' assignments as last read from the registry (also
/// kept in the data dir, so an agent restarted while cut off can still fence).
#[derive(Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Desired {
    pub(crate) stacks: Vec<flotilla_core::stack::StackRecord>,
    pub(crate) assignments: flotilla_client::Assignments,
}

#[derive(Default)]
pub(crate) struct State {
    /// Instances this agent registered: id → spec.
    pub(crate) registered: HashMap<String, InstanceSpec>,
    /// Running check loops by instance id (`checks.rs`).
    pub(crate) checks: HashMap<String, JoinHandle<()>>,
}

impl Inner {
    /// The registry credentials, read from their file now (so a rotated password
    /// needs no restart); `None` when the agent has no file.
    pub(crate) fn registry_auth(
        &self,
    ) -> anyhow::Result<Option<flotilla_core::registry_auth::RegistryAuth>> {
        self.config
            .registry_auth
            .as_deref()
            .map(flotilla_core::registry_auth::RegistryAuth::load)
            .transpose()
            .map_err(anyhow::Error::msg)
    }

    /// The shared state of an agent on `docker`, speaking to the registry through `client`.
    pub(crate) fn new(
        docker: Docker,
        client: Client,
        config: AgentConfig,
        node: String,
        advertise: Option<std::net::IpAddr>,
        token: String,
        tls: Option<std::sync::Arc<crate::node_tls::NodeTls>>,
    ) -> anyhow::Result<Self> {
        Ok(Inner {
            docker,
            client,
            config,
            node,
            advertise,
            metrics: Metrics::default(),
            state: Mutex::new(State::default()),
            resync_now: Notify::new(),
            quota_changed: Default::default(),
            token,
            token_roles: Default::default(),
            http: flotilla_client::http_builder(tls.as_ref().map(|t| t.client())).build()?,
            probe_http: flotilla_check::probe_client(),
            routed: Default::default(),
            loads_confirmed: std::sync::Mutex::new(None),
            tls,
            holds: Mutex::new(Default::default()),
            restores: Default::default(),
            api_bound: std::sync::OnceLock::new(),
            backoff: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            chains: Mutex::new(HashMap::new()),
            renewed_at: std::sync::Mutex::new(None),
            fenced: Default::default(),
            desired: Default::default(),
        })
    }

    /// A client of a peer agent's API at `api`: with TLS the node certificate is the
    /// credential (the token stays home); without, the cluster token.
    pub(crate) fn peer(&self, api: &str) -> flotilla_client::agent::AgentClient {
        flotilla_client::agent::AgentClient::new(
            api,
            self.http.clone(),
            self.tls.is_none().then(|| self.token.clone()),
        )
    }

    /// The desired state as the last reconcile pass read it.
    pub(crate) fn desired_now(&self) -> Desired {
        self.desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The URL peers reach this agent's API at, if it serves one.
    pub(crate) fn api_url(&self) -> Option<String> {
        self.api_bound.get().cloned()
    }

    /// Keeps the reconciler away from a container (a migration is moving it).
    pub(crate) async fn hold(&self, id: &str) {
        self.holds.lock().await.insert(id.to_owned());
    }

    /// Releases a hold.
    pub(crate) async fn unhold(&self, id: &str) {
        self.holds.lock().await.remove(id);
    }

    /// Marks a restore as under way until the returned guard is dropped (after the
    /// restored container is held, when it is to be).
    pub(crate) fn restoring(&self) -> RestoreGuard<'_> {
        self.restores
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        RestoreGuard(&self.restores)
    }

    /// The role of `token` (presented to the agent's API), asked of the registry and
    /// kept for 10 s — dropped sooner by [`Inner::token_watch_loop`] as soon as any
    /// token is made or revoked; `None` if the registry does not know it (or cannot be
    /// reached).
    pub(crate) async fn token_role(&self, token: &str) -> Option<flotilla_core::token::Role> {
        const KEEP: Duration = Duration::from_secs(10);
        let now = std::time::Instant::now();
        {
            let mut roles = self.token_roles.lock().unwrap_or_else(|p| p.into_inner());
            roles.retain(|_, (_, at)| now.duration_since(*at) < KEEP);
            if let Some((role, _)) = roles.get(token) {
                return Some(*role);
            }
        }
        let info = self.client.token_info(token).await.ok()?;
        let mut roles = self.token_roles.lock().unwrap_or_else(|p| p.into_inner());
        if roles.len() < 1024 {
            roles.insert(token.to_owned(), (info.role, now));
        }
        Some(info.role)
    }

    /// Follows the registry's token index and forgets every kept role when it moves, so
    /// a revoked token stops at this agent's API as soon as at the servers (the 10 s
    /// keep only bounds it while the registry cannot be reached).
    pub(crate) async fn token_watch_loop(self: std::sync::Arc<Self>) {
        let mut index = 0;
        let mut pause = Duration::from_millis(200);
        loop {
            match self
                .client
                .tokens_index(index, Duration::from_secs(60))
                .await
            {
                Ok(now) => {
                    pause = Duration::from_millis(200);
                    if now != index {
                        self.token_roles
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clear();
                        index = now;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "token index watch failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    index = 0;
                }
            }
        }
    }

    /// Whether a restore is under way.
    pub(crate) fn is_restoring(&self) -> bool {
        self.restores.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Whether the agent registers this container (it carries a service label).
    pub(crate) async fn registers(&self, id: &str) -> bool {
        docker::inspect(&self.docker, id, self.advertise)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.labels.contains_key(SERVICE))
    }

    /// Waits up to `within` (zero: checks once) for the container's instance to pass.
    pub(crate) async fn wait_passing(&self, id: &str, within: Duration) -> bool {
        let iid = instance_id(&self.node, id);
        crate::backup::wait_until(within, || async {
            self.client
                .instances_of_node(&self.node)
                .await
                .map(|l| {
                    l.iter()
                        .any(|i| i.id == iid && i.health == flotilla_core::HealthStatus::Passing)
                })
                .unwrap_or(false)
        })
        .await
    }

    /// Deregisters, drains, then removes a container and its volumes (after a migration).
    pub(crate) async fn retire(&self, id: &str, drain: Duration) -> anyhow::Result<()> {
        let _ = self.client.deregister(&instance_id(&self.node, id)).await;
        if !drain.is_zero() {
            tokio::time::sleep(drain).await;
        }
        crate::backup::remove_with_volumes(&self.docker, id).await?;
        self.holds.lock().await.remove(id);
        Ok(())
    }
}

/// Ends a restore's mark on drop (see [`Inner::restoring`]).
pub(crate) struct RestoreGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
