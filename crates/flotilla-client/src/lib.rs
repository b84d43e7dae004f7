//! Typed clients of the registry's `/v1/` API and of the agents' API ([`agent`]).
//!
//! The agent, the CLI, the load balancer and the benchmarks all talk to the server the
//! same way; keeping that in one place keeps auth, error decoding and URLs consistent.
#![warn(missing_docs)]

pub mod agent;
pub mod follow;
pub mod identity;
pub mod migrate;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::HealthStatus;
pub use flotilla_core::{InstanceSpec, InstanceView, NodeView, ServiceInstances, ServiceSummary};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Default server URL when neither `--server` nor `FLOTILLA_SERVER` says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

/// What went wrong calling the registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection failed; retryable.
    #[error("registry unreachable at {url}: {message}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// The transport error.
        message: String,
    },
    /// The server answered with an error status.
    #[error("registry answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's error message (names the field when a field was wrong).
        message: String,
    },
    /// A token or CA file could not be read.
    #[error("{path}: {message}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl ClientError {
    /// HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Result of a client call.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Reads a token file, trimming whitespace.
pub fn read_token(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| ClientError::Token {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Tries of one request that the server refused as busy (`503` with `Retry-After`:
/// nothing was written), with doubling back-off from [`BUSY_FIRST_BACKOFF`]: about 3 s
/// in all before the 503 is returned to the caller.
const BUSY_TRIES: u32 = 7;
/// First back-off after a busy answer.
const BUSY_FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The `Retry-After` of a busy answer (`503` with the header), as the longest back-off.
pub fn busy_retry_after(resp: &reqwest::Response) -> Option<Duration> {
    if resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.max(1)))
}

/// The pause before try `retry` (1, 2, ...) of a request refused as busy: doubling from
/// [`BUSY_FIRST_BACKOFF`], at most `limit` (the server's `Retry-After`), times a random
/// factor in [0.5, 1.5) so writers refused together do not all come back together.
pub fn busy_backoff(retry: u32, limit: Duration) -> Duration {
    let base = BUSY_FIRST_BACKOFF.saturating_mul(1 << retry.saturating_sub(1).min(16));
    base.min(limit)
        .mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5))
}

/// The builder of every HTTP client that talks to flotilla's servers and agents: no
/// proxy, a short connect timeout, and (with `tls`) the cluster's TLS configuration —
/// the cluster CA as the only trust root, and the node certificate when there is one.
pub fn http_builder(tls: Option<Arc<rustls::ClientConfig>>) -> reqwest::ClientBuilder {
    install_crypto_provider();
    let b = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2));
    match tls {
        Some(config) => b.use_preconfigured_tls((*config).clone()),
        None => b,
    }
}

/// Makes ring the process's rustls crypto provider (once), so that clients built
/// without the cluster's configuration fail an `https://` URL with a certificate error,
/// not a panic.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The TLS configuration of a client that trusts the CA in `ca_file` (the CLI, the lb).
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read_to_string(ca_file).map_err(|e| ClientError::Token {
        path: ca_file.display().to_string(),
        message: e.to_string(),
    })?;
    flotilla_tls::client_config(&pem, None).map_err(|e| ClientError::Token {
        path: ca_file.display().to_string(),
        message: format!("{e:#}"),
    })
}

/// Stateful replicas' assignments by `STACK/SERVICE/REPLICA`.
pub type Assignments =
    std::collections::BTreeMap<String, flotilla_core::recovery::AssignmentRecord>;

/// One node's archives as `GET /v1/backups` lists them.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct InventoryEntry {
    /// The node.
    pub node: String,
    /// ms since the server stored the inventory.
    pub age_ms: u64,
    /// Whether the node holds a lease now.
    pub live: bool,
    /// The archives.
    #[serde(flatten)]
    pub inventory: flotilla_core::BackupInventory,
}

/// One lb as `GET /v1/lbs` lists it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LbEntry {
    /// The lb's name.
    pub name: String,
    /// ms since the server stored its report.
    pub age_ms: u64,
    /// Older than three of its periods: the lb stopped reporting.
    pub stale: bool,
    /// The report.
    #[serde(flatten)]
    pub report: flotilla_core::LbReport,
}

/// A registry client.
#[derive(Clone)]
pub struct Client {
    servers: Arc<Servers>,
    token: Option<String>,
    http: reqwest::Client,
    busy_retries: bool,
}

/// The servers a client may use, and the one it uses now.
struct Servers {
    bases: Vec<String>,
    current: AtomicUsize,
}

impl Servers {
    /// `url` (made for any server of the list) with server `i`'s scheme, host and port.
    fn url_on(&self, i: usize, url: &reqwest::Url) -> reqwest::Url {
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        reqwest::Url::parse(&format!("{}{}", self.bases[i], path)).unwrap_or_else(|_| url.clone())
    }
}

pub use flotilla_core::config::parse_server_list as parse_servers;

impl Client {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:7700`), or of several
    /// (`http://a:7700,http://b:7700`): requests go to one of them and move to the next
    /// when it cannot be reached or answers 5xx. Check a list from a user with
    /// [`parse_servers`] first; here entries are only split.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_tls(base, token, None)
    }

    /// Like [`Client::new`], speaking TLS with `tls` (see [`tls_config`]) to `https://`
    /// servers. Without it an `https://` server is refused (no trust roots).
    pub fn with_tls(
        base: &str,
        token: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let http = http_builder(tls)
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .expect("HTTP client");
        let mut bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(DEFAULT_SERVER.to_owned());
        }
        Client {
            servers: Arc::new(Servers {
                bases,
                current: AtomicUsize::new(0),
            }),
            token,
            http,
            busy_retries: true,
        }
    }

    /// This client, returning a busy answer (`503` with `Retry-After`) to the caller at
    /// once instead of backing off and sending again (for callers that measure or pace
    /// their own retries).
    pub fn without_busy_retries(mut self) -> Self {
        self.busy_retries = false;
        self
    }

    /// Base URL of the server in use now.
    pub fn base(&self) -> &str {
        let s = &self.servers;
        &s.bases[s.current.load(Ordering::Relaxed) % s.bases.len()]
    }

    /// Every server this client may use, in order.
    pub fn servers(&self) -> &[String] {
        &self.servers.bases
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        self.request_as(method, path, timeout, self.token.as_deref())
    }

    /// A request carrying `bearer` (instead of this client's own token).
    fn request_as(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
        bearer: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base(), path))
            .timeout(timeout);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        self.send_with_index(req).await.map(|(_, v)| v)
    }

    /// Sends to one server, backing off and resending while it answers busy.
    async fn execute_on(&self, mut req: reqwest::Request) -> Result<reqwest::Response> {
        let mut tries = 1;
        loop {
            // A body that cannot be copied (a stream) is sent once, without retries.
            let again = req.try_clone();
            let url = req.url().to_string();
            let resp = self
                .http
                .execute(req)
                .await
                .map_err(|e| ClientError::Unreachable {
                    url,
                    message: flotilla_core::error::chain(&e),
                })?;
            match (busy_retry_after(&resp), again) {
                (Some(limit), Some(again)) if self.busy_retries && tries < BUSY_TRIES => {
                    tokio::time::sleep(busy_backoff(tries, limit)).await;
                    tries += 1;
                    req = again;
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Sends a request to the current server; when that one cannot be reached or
    /// answers 5xx (not a busy answer: that one is retried on the same server), to the
    /// next of the list, each at most once, and remembers the one that answered.
    async fn execute(&self, req: reqwest::Request) -> Result<reqwest::Response> {
        let n = self.servers.bases.len();
        if n == 1 {
            // One server: nothing to fail over to, no copy of the request to make.
            return self.execute_on(req).await;
        }
        let start = self.servers.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let on_server = match req.try_clone() {
                Some(mut r) => {
                    *r.url_mut() = self.servers.url_on(i, req.url());
                    r
                }
                // A streamed body is sent once, to the current server.
                None if k == 0 => return self.execute_on(req).await,
                None => break,
            };
            let failed_over = match self.execute_on(on_server).await {
                Ok(resp)
                    if resp.status().is_server_error() && busy_retry_after(&resp).is_none() =>
                {
                    Err(Ok(resp))
                }
                Ok(resp) => Ok(resp),
                Err(e @ ClientError::Unreachable { .. }) => Err(Err(e)),
                Err(e) => return Err(e),
            };
            match failed_over {
                Ok(resp) => {
                    self.servers.current.store(i, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(outcome) => {
                    self.servers.current.store((i + 1) % n, Ordering::Relaxed);
                    last = Some(outcome);
                }
            }
        }
        match last {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(e)) => Err(e),
            None => Err(ClientError::Unreachable {
                url: self.base().to_owned(),
                message: "no server left to try".into(),
            }),
        }
    }

    /// Like `send`, also returning the `X-Flotilla-Index` header (0 if absent).
    async fn send_with_index<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u64, T)> {
        let req = req.build().map_err(|e| ClientError::Unreachable {
            url: self.base().to_owned(),
            message: e.to_string(),
        })?;
        let resp = self.execute(req).await?;
        let url = resp.url().to_string();
        let index = resp
            .headers()
            .get("x-flotilla-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url,
            message: flotilla_core::error::chain(&e),
        })?;
        if !status.is_success() {
            let message = flotilla_core::error::ErrorBody::message_of(&bytes);
            return Err(ClientError::Status {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes)
            .map(|v| (index, v))
            .map_err(|e| ClientError::Status {
                status: status.as_u16(),
                message: format!("undecodable response: {e}"),
            })
    }

    const SHORT: Duration = Duration::from_secs(10);

    /// `PUT /v1/nodes/{name}`: registers (or renews) a node lease.
    pub async fn register_node(
        &self,
        name: &str,
        ttl: Duration,
        address: Option<&str>,
        api: Option<&str>,
    ) -> Result<serde_json::Value> {
        let body =
            json!({ "ttl": format!("{}ms", ttl.as_millis()), "address": address, "api": api });
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/nodes/{name}"),
                Self::SHORT,
            )
            .json(&body),
        )
        .await
    }

    /// `PUT /v1/nodes/{name}/renew`; a 404 means the lease expired: register again.
    /// `loads_age`: how long ago the agent last confirmed every load report still holds.
    pub async fn renew_node(
        &self,
        name: &str,
        timeout: Duration,
        loads_age: Option<Duration>,
    ) -> Result<serde_json::Value> {
        let mut req = self.request(
            reqwest::Method::PUT,
            &format!("/v1/nodes/{name}/renew"),
            timeout,
        );
        if let Some(age) = loads_age {
            req = req.json(&json!({ "loads_age_ms": age.as_millis() as u64 }));
        }
        self.send(req).await
    }

    /// `PUT /v1/nodes/{name}/subnet`: this node's /24 of the routed cluster network.
    pub async fn claim_subnet(
        &self,
        name: &str,
        cluster_cidr: flotilla_core::subnet::Ipv4Net,
    ) -> Result<flotilla_core::subnet::Ipv4Net> {
        #[derive(serde::Deserialize)]
        struct Claimed {
            subnet: flotilla_core::subnet::Ipv4Net,
        }
        let claimed: Claimed = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    &format!("/v1/nodes/{name}/subnet"),
                    Self::SHORT,
                )
                .json(&json!({ "cluster_cidr": cluster_cidr })),
            )
            .await?;
        Ok(claimed.subnet)
    }

    /// `GET /v1/subnets`: every node's share of the routed cluster network.
    pub async fn subnets(&self) -> Result<Vec<flotilla_core::subnet::SubnetView>> {
        #[derive(serde::Deserialize)]
        struct List {
            subnets: Vec<flotilla_core::subnet::SubnetView>,
        }
        let list: List = self
            .send(self.request(reqwest::Method::GET, "/v1/subnets", Self::SHORT))
            .await?;
        Ok(list.subnets)
    }

    /// `DELETE /v1/nodes/{name}`: leaves gracefully, removing the node's instances.
    pub async fn leave_node(&self, name: &str) -> Result<serde_json::Value> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/nodes/{name}"),
            Self::SHORT,
        ))
        .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.send(self.request(reqwest::Method::GET, "/v1/nodes", Self::SHORT))
            .await
    }

    /// `PUT /v1/lbs/{name}`: an lb's own report (VRRP state, traffic).
    pub async fn report_lb(
        &self,
        name: &str,
        report: &flotilla_core::LbReport,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/lbs/{name}"),
                Self::SHORT,
            )
            .json(report),
        )
        .await
    }

    /// `PUT /v1/nodes/{node}/backups`: the archives this node keeps.
    pub async fn report_backups(
        &self,
        node: &str,
        inventory: &flotilla_core::BackupInventory,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/nodes/{node}/backups"),
                Self::SHORT,
            )
            .json(inventory),
        )
        .await
    }

    /// `GET /v1/backups`: every node's archives, with the inventory's age.
    pub async fn backup_inventories(&self) -> Result<Vec<InventoryEntry>> {
        self.send(self.request(reqwest::Method::GET, "/v1/backups", Self::SHORT))
            .await
    }

    /// `GET /v1/lbs`: every lb's latest report, with its age.
    pub async fn lbs(&self) -> Result<Vec<LbEntry>> {
        self.send(self.request(reqwest::Method::GET, "/v1/lbs", Self::SHORT))
            .await
    }

    /// `PUT /v1/instances/{id}`.
    pub async fn register(&self, id: &str, spec: &InstanceSpec) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/instances/{id}"),
                Self::SHORT,
            )
            .json(spec),
        )
        .await
    }

    /// `DELETE /v1/instances/{id}` (id or container name).
    pub async fn deregister(&self, id: &str) -> Result<serde_json::Value> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/instances/{id}"),
            Self::SHORT,
        ))
        .await
    }

    /// `PUT /v1/instances/{id}/renew` with a pushed check result.
    pub async fn check_in(
        &self,
        id: &str,
        passing: bool,
        output: &str,
    ) -> Result<serde_json::Value> {
        let body =
            json!({ "status": if passing { "passing" } else { "critical" }, "output": output });
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/instances/{id}/renew"),
                Self::SHORT,
            )
            .json(&body),
        )
        .await
    }

    /// `PUT /v1/services/{name}/weights`: publishes feedback weights by `ip:port`.
    pub async fn publish_weights(
        &self,
        service: &str,
        from: &str,
        weights: &std::collections::BTreeMap<String, f64>,
    ) -> Result<serde_json::Value> {
        let body = json!({ "weights": weights, "from": from });
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/services/{service}/weights"),
                Self::SHORT,
            )
            .json(&body),
        )
        .await
    }

    /// `PUT /v1/instances/{id}/load`: an agent's load report.
    pub async fn report_load(&self, id: &str, cpu: f64, memory: f64) -> Result<serde_json::Value> {
        let body = json!({ "cpu": cpu, "memory": memory });
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/instances/{id}/load"),
                Self::SHORT,
            )
            .json(&body),
        )
        .await
    }

    /// `PUT /v1/instances/{id}/health`: an agent's verdict on an instance it checks.
    pub async fn report_health(
        &self,
        id: &str,
        status: HealthStatus,
        output: &str,
    ) -> Result<serde_json::Value> {
        let body = json!({ "status": status, "output": output });
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/instances/{id}/health"),
                Self::SHORT,
            )
            .json(&body),
        )
        .await
    }

    /// `GET /v1/instances?node=NODE`.
    pub async fn instances_of_node(&self, node: &str) -> Result<Vec<InstanceView>> {
        self.send(
            self.request(reqwest::Method::GET, "/v1/instances", Self::SHORT)
                .query(&[("node", node)]),
        )
        .await
    }

    /// `GET /v1/instances`.
    pub async fn instances(&self) -> Result<Vec<InstanceView>> {
        self.send(self.request(reqwest::Method::GET, "/v1/instances", Self::SHORT))
            .await
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> Result<Vec<ServiceSummary>> {
        self.send(self.request(reqwest::Method::GET, "/v1/services", Self::SHORT))
            .await
    }

    /// `GET /v1/services/{name}`, blocking while the service's index is still `index`
    /// (at most `wait`). `index = 0` answers at once.
    pub async fn service(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
        passing_only: bool,
    ) -> Result<ServiceInstances> {
        self.service_query(name, index, wait, passing_only, false)
            .await
    }

    /// Like [`Client::service`], but the answer may be a delta: with `delta` set in the
    /// reply, `instances` holds only what changed since `index` and `removed` the ids
    /// gone (see [`follow::ServiceFollower`], which keeps the whole set).
    pub async fn service_changes(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
        passing_only: bool,
    ) -> Result<ServiceInstances> {
        self.service_query(name, index, wait, passing_only, true)
            .await
    }

    async fn service_query(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
        passing_only: bool,
        delta: bool,
    ) -> Result<ServiceInstances> {
        let mut query = vec![("passing", passing_only.to_string())];
        if delta {
            query.push(("delta", "true".into()));
        }
        let req = self
            .blocking_get(&format!("/v1/services/{name}"), index, wait)
            .query(&query);
        self.send(req).await
    }

    /// A blocking GET of `path`: answered once its index moves past `index`, or after
    /// `wait` (the request's own timeout a little longer).
    fn blocking_get(&self, path: &str, index: u64, wait: Duration) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path, wait + Duration::from_secs(10))
            .query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ])
    }

    /// `GET /v1/stacks`, blocking while the stacks' index is still `index` (at most
    /// `wait`); returns the new index and every stack's desired state.
    pub async fn stacks(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<flotilla_core::stack::StackRecord>)> {
        let req = self.blocking_get("/v1/stacks", index, wait);
        self.send_with_index(req).await
    }

    /// `GET /v1/assignments`: where each stateful replica lives, by
    /// `STACK/SERVICE/REPLICA`; blocking on the desired state's index like
    /// [`Client::stacks`].
    pub async fn assignments(&self, index: u64, wait: Duration) -> Result<(u64, Assignments)> {
        #[derive(serde::Deserialize)]
        struct Reply {
            assignments: Assignments,
        }
        let req = self.blocking_get("/v1/assignments", index, wait);
        let (i, r): (u64, Reply) = self.send_with_index(req).await?;
        Ok((i, r.assignments))
    }

    /// `GET /v1/stacks/{name}`.
    pub async fn stack(&self, name: &str) -> Result<flotilla_core::stack::StackRecord> {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/v1/stacks/{name}"),
            Self::SHORT,
        ))
        .await
    }

    /// `PUT /v1/stacks/{name}`: the new desired state of a stack's services.
    pub async fn deploy(
        &self,
        name: &str,
        services: &std::collections::BTreeMap<String, flotilla_core::stack::DeployedService>,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/stacks/{name}"),
                Self::SHORT,
            )
            .json(&json!({ "services": services })),
        )
        .await
    }

    /// `DELETE /v1/stacks/{name}`.
    pub async fn remove_stack(&self, name: &str) -> Result<serde_json::Value> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/stacks/{name}"),
            Self::SHORT,
        ))
        .await
    }

    /// `PUT /v1/stacks/{name}/services/{svc}/replicas`.
    pub async fn scale(
        &self,
        stack: &str,
        service: &str,
        replicas: u32,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/stacks/{stack}/services/{service}/replicas"),
                Self::SHORT,
            )
            .json(&json!({ "replicas": replicas })),
        )
        .await
    }

    /// `PUT /v1/stacks/{name}/services/{svc}/pins`: pins a replica to a node (`None` unpins).
    pub async fn pin(
        &self,
        stack: &str,
        service: &str,
        replica: u32,
        node: Option<&str>,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/stacks/{stack}/services/{service}/pins"),
                Self::SHORT,
            )
            .json(&json!({ "replica": replica, "node": node })),
        )
        .await
    }

    /// `POST /v1/stacks/{name}/rollback`: the version `spec_hash` of `service` failed.
    pub async fn rollback(
        &self,
        stack: &str,
        service: &str,
        spec_hash: &str,
        reason: &str,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/stacks/{stack}/rollback"),
                Self::SHORT,
            )
            .json(&json!({ "service": service, "spec_hash": spec_hash, "reason": reason })),
        )
        .await
    }

    /// `POST /v1/assignments/{stack}/{service}/{replica}/recover`: restore a stateful
    /// replica now (on `to`, from `archive`; defaults: placement, the newest that
    /// verifies). The elected server carries it out.
    pub async fn recover(
        &self,
        replica_key: &str,
        to: Option<&str>,
        archive: Option<&str>,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/assignments/{replica_key}/recover"),
                Self::SHORT,
            )
            .json(&json!({ "to": to, "archive": archive })),
        )
        .await
    }

    /// `PUT /v1/stacks/{stack}/secrets/{service}`: a service's secret values (admin).
    pub async fn put_secrets(
        &self,
        stack: &str,
        service: &str,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<serde_json::Value> {
        self.send(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/stacks/{stack}/secrets/{service}"),
                Self::SHORT,
            )
            .json(&json!({ "values": values })),
        )
        .await
    }

    /// `GET /v1/stacks/{stack}/secrets/{service}`: an admin's, or the agent of a node
    /// a replica is placed on.
    pub async fn secrets(
        &self,
        stack: &str,
        service: &str,
    ) -> Result<flotilla_core::stack::SecretsRecord> {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/v1/stacks/{stack}/secrets/{service}"),
            Self::SHORT,
        ))
        .await
    }

    /// `POST /v1/tokens`: a new scoped token (shown once: the reply holds it).
    pub async fn create_token(
        &self,
        role: flotilla_core::token::Role,
        service: Option<&str>,
        node: Option<&str>,
    ) -> Result<CreatedToken> {
        self.send(
            self.request(reqwest::Method::POST, "/v1/tokens", Self::SHORT)
                .json(&json!({ "role": role, "service": service, "node": node })),
        )
        .await
    }

    /// `GET /v1/tokens`: every scoped token, without secrets.
    pub async fn tokens(&self) -> Result<Vec<flotilla_core::token::TokenView>> {
        self.send(self.request(reqwest::Method::GET, "/v1/tokens", Self::SHORT))
            .await
    }

    /// `POST /v1/certs/revoke`: node `node`'s certificates issued until now stop working.
    pub async fn revoke_node_certs(&self, node: &str) -> Result<serde_json::Value> {
        self.send(
            self.request(reqwest::Method::POST, "/v1/certs/revoke", Self::SHORT)
                .json(&json!({ "node": node })),
        )
        .await
    }

    /// `GET /v1/certs/revoked`: the node certificate revocations in force.
    pub async fn cert_revocations(&self) -> Result<Vec<flotilla_core::CertRevocation>> {
        self.send(self.request(reqwest::Method::GET, "/v1/certs/revoked", Self::SHORT))
            .await
    }

    /// `DELETE /v1/tokens/{id}`.
    pub async fn revoke_token(&self, id: &str) -> Result<serde_json::Value> {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/tokens/{id}"),
            Self::SHORT,
        ))
        .await
    }

    /// `GET /v1/tokens/self` with `token` as the bearer (not this client's own): what
    /// that token is. The agents ask this about tokens presented to their APIs.
    pub async fn token_info(&self, token: &str) -> Result<flotilla_core::token::TokenView> {
        self.send(self.request_as(
            reqwest::Method::GET,
            "/v1/tokens/self",
            Self::SHORT,
            Some(token),
        ))
        .await
    }

    /// `GET /v1/tokens/index`, blocking while the revision of the last token change is
    /// still `index` (at most `wait`); returns the revision.
    pub async fn tokens_index(&self, index: u64, wait: Duration) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Reply {
            index: u64,
        }
        let req = self.blocking_get("/v1/tokens/index", index, wait);
        let r: Reply = self.send(req).await?;
        Ok(r.index)
    }

    /// `POST /v1/certs`: a node certificate for `node` from `csr_pem` (needs the cluster
    /// token). Answers the certificate and the CA's, PEM.
    pub async fn join_node(&self, node: &str, csr_pem: &str) -> Result<CertReply> {
        self.send(
            self.request(reqwest::Method::POST, "/v1/certs", Self::SHORT)
                .json(&json!({ "node": node, "csr": csr_pem })),
        )
        .await
    }

    /// `POST /v1/certs` as an lb: a certificate for lb `name`, bound to the lb token this
    /// client holds.
    pub async fn join_lb(&self, name: &str, csr_pem: &str) -> Result<CertReply> {
        self.send(
            self.request(reqwest::Method::POST, "/v1/certs", Self::SHORT)
                .json(&json!({ "lb": name, "csr": csr_pem })),
        )
        .await
    }

    /// `POST /v1/certs/renew`: a new certificate for the node (or lb) whose certificate
    /// this client presents.
    pub async fn renew_cert(&self, csr_pem: &str) -> Result<CertReply> {
        self.send(
            self.request(reqwest::Method::POST, "/v1/certs/renew", Self::SHORT)
                .json(&json!({ "csr": csr_pem })),
        )
        .await
    }
}

/// A token just made.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct CreatedToken {
    /// The token: shown this once.
    pub token: String,
    /// Its id (for `token revoke`).
    pub id: String,
    /// Its role.
    pub role: flotilla_core::token::Role,
    /// Its service scope.
    #[serde(default)]
    pub service: Option<String>,
    /// Its node scope.
    #[serde(default)]
    pub node: Option<String>,
}

/// A certificate the server issued.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CertReply {
    /// The node certificate, PEM.
    pub cert: String,
    /// The CA certificate, PEM.
    pub ca: String,
}

/// Fetches the CA certificate from the first of `servers` (`https://host:port`) that
/// gives one matching the pinned `sha256:HEX`, without trusting the connection (no
/// token is sent). The error says, per server, what happened: unreachable, or a
/// different CA.
pub async fn fetch_pinned_ca(
    servers: &[String],
    pinned: &str,
) -> std::result::Result<String, String> {
    let mut errors = Vec::new();
    for s in servers {
        match fetch_pinned_ca_from(s, pinned).await {
            Ok(pem) => return Ok(pem),
            Err(e) => errors.push(e),
        }
    }
    Err(format!(
        "no server gave the pinned CA: {}",
        errors.join("; ")
    ))
}

async fn fetch_pinned_ca_from(server: &str, pinned: &str) -> std::result::Result<String, String> {
    #[derive(serde::Deserialize)]
    struct CaReply {
        ca: String,
    }
    let http = http_builder(Some(flotilla_tls::unverified_fetch_config()))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/v1/ca", server.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let reply: CaReply = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    flotilla_tls::check_ca_hash(&reply.ca, pinned).map_err(|e| format!("{e:#}"))?;
    Ok(reply.ca)
}
