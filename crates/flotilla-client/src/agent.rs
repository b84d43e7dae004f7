//! The agent's HTTP API, typed: the request and reply types its handlers deserialize
//! and answer with, and [`AgentClient`], which the CLI and peer agents call it with.
//!
//! Both sides use these types, so a renamed or retyped field fails to compile instead
//! of reaching the other side as a query string it ignores or a JSON value it reads as
//! missing.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_core::error::ErrorBody;
use flotilla_core::stack::Consistency;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What went wrong calling an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached, or the connection broke.
    #[error("agent at {url}: {message}")]
    Unreachable {
        /// The agent's API URL.
        url: String,
        /// The transport error, with its causes.
        message: String,
    },
    /// The agent answered with an error status.
    #[error("agent at {url}: {message}")]
    Status {
        /// The agent's API URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
        /// The stage that failed, when the agent names one (`"check"`: an uploaded
        /// archive was refused and nothing was written).
        stage: Option<String>,
    },
}

impl AgentError {
    /// HTTP status, if the agent answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Status { status, .. } => Some(*status),
            AgentError::Unreachable { .. } => None,
        }
    }
}

/// Result of an agent call.
pub type AgentResult<T> = std::result::Result<T, AgentError>;

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `GET /v1/images?tag=`, `GET /v1/images/save?tag=`: one image, by tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagQuery {
    /// Image tag.
    pub tag: String,
}

/// Reply of `GET /v1/images`: whether the agent's engine has the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePresence {
    /// The tag asked for.
    pub tag: String,
    /// Whether the engine has it.
    pub present: bool,
    /// Its image id, when present.
    pub id: Option<String>,
}

/// Body of `POST /v1/images/pull`: a registry image for the agent to pull.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullRequest {
    /// The reference (`reg.example:5000/app:1.2`, or `…@sha256:…`).
    pub image: String,
}

/// Reply of `POST /v1/images/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pulled {
    /// The reference pinned to the pulled bytes (`REPO@sha256:…`).
    pub pinned: String,
    /// The image id.
    pub id: String,
}

/// Reply of `POST /v1/images` (a `docker save` stream as the body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagesLoaded {
    /// What the engine said it loaded.
    pub loaded: Vec<String>,
}

/// `GET /v1/backup`: stream an archive of one of flotilla's containers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupQuery {
    /// Container name or id.
    pub container: String,
    /// How the volumes are read (default: the service's own setting, else `stop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Include the image (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub image: bool,
    /// Leave the container stopped (and held from the reconciler) after a `stop` backup:
    /// a migration's final pass.
    #[serde(default, skip_serializing_if = "is_false")]
    pub leave_stopped: bool,
    /// Keep what each volume holds now under this id (a migration's pre-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Send only what changed since the snapshot with this id (its final pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Keep secret environment values in the archive (migrations; `backup --with-secrets`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub secrets: bool,
}

impl BackupQuery {
    /// A backup of `container` with the defaults (image included, no secrets).
    pub fn of(container: impl Into<String>) -> Self {
        BackupQuery {
            container: container.into(),
            consistency: None,
            image: true,
            leave_stopped: false,
            snapshot: None,
            since: None,
            secrets: false,
        }
    }
}

/// `POST /v1/restore` (the archive as the body).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreQuery {
    /// Container name (default: the archive's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Start it (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub start: bool,
    /// Keep the stack labels: the restored container is the same replica, moved (a
    /// migration). Without it the copy is a standalone container, which the stack's
    /// reconcilers leave alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_stack: bool,
    /// How long the restored instance gets to pass its health check (registered
    /// containers only; default 30 s); on failure everything created is removed. Zero
    /// skips the gate.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub health_timeout: Option<Duration>,
    /// Keep the reconciler's hands off the copy (a migration's pre-copy, stopped while
    /// the source still serves the replica) until a final pass releases it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hold: bool,
}

impl Default for RestoreQuery {
    fn default() -> Self {
        RestoreQuery {
            name: None,
            start: true,
            keep_stack: false,
            health_timeout: None,
            hold: false,
        }
    }
}

/// Reply of `POST /v1/restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    /// Container name.
    pub name: String,
    /// Container id.
    pub id: String,
    /// The node that restored it.
    pub node: String,
    /// Volumes created, by mount point.
    pub volumes: BTreeMap<String, String>,
    /// Whether the image had to be loaded from the archive.
    pub image_loaded: bool,
    /// Bytes received.
    pub bytes: u64,
    /// How long after its start it passed its health check (registered and started
    /// containers only).
    pub passing_after_ms: Option<u64>,
    /// The archive's manifest.
    pub manifest: flotilla_archive::Manifest,
}

/// `POST /v1/restore/apply` (a delta archive as the body): a migration's final pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyQuery {
    /// The stopped copy made from the pre-copy.
    pub container: String,
    /// As [`RestoreQuery::health_timeout`].
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub health_timeout: Option<Duration>,
}

/// Reply of `POST /v1/restore/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// The container, started and passing.
    pub id: String,
    /// The node.
    pub node: String,
    /// Bytes of the delta received.
    pub bytes: u64,
}

/// `POST /v1/retire` (deregister, drain, remove with volumes), `POST /v1/release`
/// (undo a migration's first step: start the container again).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireQuery {
    /// Container name or id.
    pub container: String,
    /// How long in-flight requests get after deregistration (default 2 s; retire only).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain: Option<Duration>,
}

/// Reply of `POST /v1/retire`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retired {
    /// The container retired.
    pub retired: String,
}

/// Reply of `POST /v1/release`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Released {
    /// The container released.
    pub released: String,
}

/// Reply of `GET /v1/stacks/{stack}/containers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackContainers {
    /// The stack.
    pub stack: String,
    /// Its containers on this node's engine (running, draining or stopped).
    pub containers: Vec<String>,
}

/// `GET /v1/logs`: a container's output as a text stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Container name or id.
    pub container: String,
    /// Keep the stream open until the container stops.
    #[serde(default, skip_serializing_if = "is_false")]
    pub follow: bool,
    /// Only lines since this unix time (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Only the last N lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
}

/// `POST /v1/exec?container=`: which container.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerQuery {
    /// Container name or id.
    pub container: String,
}

/// Body of `POST /v1/exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (1..=256, each at most 8192 bytes).
    pub cmd: Vec<String>,
}

/// Reply of `POST /v1/exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecReply {
    /// The command's exit code.
    pub exit_code: i64,
    /// Its output (stdout and stderr as they came), at most 1 MiB.
    pub output: String,
    /// Whether the output was cut at the limit.
    pub truncated: bool,
}

/// A copy of a stateful replica left on a node after the replica was recovered
/// elsewhere (an older generation): stopped, kept with its volumes until the operator
/// removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// `STACK/SERVICE/REPLICA`.
    pub replica: String,
    /// Container name.
    pub container: String,
    /// Container id.
    pub id: String,
    /// The generation it was made under.
    pub generation: u64,
    /// The replica's generation now.
    pub current: u64,
    /// Whether it runs (only until the reconciler's next pass stops it).
    pub running: bool,
}

/// Reply of `GET /v1/orphans` (`orphans`) and `DELETE /v1/orphans` (`removed`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Orphans {
    /// The node.
    pub node: String,
    /// The orphans listed (GET) or removed with their volumes (DELETE).
    #[serde(alias = "removed")]
    pub orphans: Vec<Orphan>,
}

/// `GET /v1/backups/{stack}/{service}`: which archives.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsQuery {
    /// One replica's only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    /// Read each archive whole and say whether it verifies.
    #[serde(default, skip_serializing_if = "is_false")]
    pub verify: bool,
}

/// One archive of a replica, as a node lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveEntry {
    /// File name.
    pub name: String,
    /// Replica number.
    pub replica: u32,
    /// When it was taken (unix ms).
    pub taken_ms: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Whether it verified whole (digests, every volume entry), when asked to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// An incremental backup (`.flotilla-delta`): what changed since the archive its
    /// manifest names; restored only on top of that one.
    #[serde(default)]
    pub delta: bool,
}

/// Reply of `PUT /v1/backups/{stack}/{service}/{file}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyKept {
    /// The archive kept.
    pub kept: String,
    /// Its size.
    pub bytes: u64,
}

/// A client of one agent's API: its URL, the HTTP client (with the cluster CA and, for
/// a peer agent, the node certificate) and the bearer token, if this caller uses one.
#[derive(Clone)]
pub struct AgentClient {
    url: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// Longest an upload or a download of an archive or image may take.
const TRANSFER: Duration = Duration::from_secs(3600);

impl AgentClient {
    /// A client of the agent at `url` (its advertised API URL, without a trailing `/`).
    pub fn new(url: impl Into<String>, http: reqwest::Client, token: Option<String>) -> Self {
        AgentClient {
            url: url.into().trim_end_matches('/').to_owned(),
            http,
            token,
        }
    }

    /// The agent's API URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> AgentError {
        AgentError::Unreachable {
            url: self.url.clone(),
            message: flotilla_core::error::chain(e),
        }
    }

    /// Sends `req`; a success answer is returned as it is (for streams), an error
    /// answer decoded into [`AgentError::Status`].
    async fn send(&self, req: reqwest::RequestBuilder) -> AgentResult<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        let stage = serde_json::from_slice::<ErrorBody>(&bytes)
            .ok()
            .and_then(|b| b.stage);
        let message = ErrorBody::message_of(&bytes);
        Err(AgentError::Status {
            url: self.url.clone(),
            status: status.as_u16(),
            message: if message.is_empty() {
                status.to_string()
            } else {
                message
            },
            stage,
        })
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> AgentResult<T> {
        let resp = self.send(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Status {
            url: self.url.clone(),
            status,
            message: format!("undecodable answer: {e}"),
            stage: None,
        })
    }

    /// `GET /v1/images`: whether the engine has image `tag`.
    pub async fn has_image(&self, tag: &str) -> AgentResult<bool> {
        let q = TagQuery { tag: tag.into() };
        let p: ImagePresence = self
            .json(self.request(reqwest::Method::GET, "/v1/images").query(&q))
            .await?;
        Ok(p.present)
    }

    /// `POST /v1/images/pull`: the agent pulls a registry image with its own
    /// credentials for that registry.
    pub async fn pull_image(&self, image: &str) -> AgentResult<Pulled> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/images/pull")
                .timeout(TRANSFER)
                .json(&PullRequest {
                    image: image.into(),
                }),
        )
        .await
    }

    /// `GET /v1/images/save`: the image as a `docker save` stream.
    pub async fn save_image(&self, tag: &str) -> AgentResult<reqwest::Response> {
        let q = TagQuery { tag: tag.into() };
        self.send(
            self.request(reqwest::Method::GET, "/v1/images/save")
                .query(&q)
                .timeout(TRANSFER),
        )
        .await
    }

    /// `POST /v1/images`: loads a `docker save` stream into the engine.
    pub async fn load_image(&self, body: reqwest::Body) -> AgentResult<ImagesLoaded> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/images")
                .timeout(TRANSFER)
                .body(body),
        )
        .await
    }

    /// `GET /v1/backup`: the archive stream (a broken stream means a failed backup).
    pub async fn backup(&self, q: &BackupQuery) -> AgentResult<reqwest::Response> {
        self.send(
            self.request(reqwest::Method::GET, "/v1/backup")
                .query(q)
                .timeout(TRANSFER),
        )
        .await
    }

    /// `POST /v1/restore`: creates a container from the archive in `body`.
    pub async fn restore(&self, q: &RestoreQuery, body: reqwest::Body) -> AgentResult<Restored> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/restore")
                .query(q)
                .timeout(TRANSFER)
                .body(body),
        )
        .await
    }

    /// `POST /v1/restore/apply`: applies a delta over a pre-copy, starts it.
    pub async fn apply(&self, q: &ApplyQuery, body: reqwest::Body) -> AgentResult<Applied> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/restore/apply")
                .query(q)
                .timeout(TRANSFER)
                .body(body),
        )
        .await
    }

    /// `POST /v1/retire`: deregisters, drains and removes a container with its volumes.
    pub async fn retire(&self, container: &str, drain: Duration) -> AgentResult<Retired> {
        let q = RetireQuery {
            container: container.into(),
            drain: Some(drain),
        };
        self.json(self.request(reqwest::Method::POST, "/v1/retire").query(&q))
            .await
    }

    /// `POST /v1/release`: gives a held container back to the reconciler and starts it.
    pub async fn release(&self, container: &str) -> AgentResult<Released> {
        let q = RetireQuery {
            container: container.into(),
            drain: None,
        };
        self.json(self.request(reqwest::Method::POST, "/v1/release").query(&q))
            .await
    }

    /// `GET /v1/stacks/{stack}/containers`.
    pub async fn stack_containers(&self, stack: &str) -> AgentResult<StackContainers> {
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/v1/stacks/{stack}/containers"),
            )
            .timeout(Duration::from_secs(10)),
        )
        .await
    }

    /// `GET /v1/logs`: the output stream (no timeout: `follow` may run for long).
    pub async fn logs(&self, q: &LogsQuery) -> AgentResult<reqwest::Response> {
        self.send(self.request(reqwest::Method::GET, "/v1/logs").query(q))
            .await
    }

    /// `POST /v1/exec`: runs `cmd` in a container.
    pub async fn exec(&self, container: &str, cmd: Vec<String>) -> AgentResult<ExecReply> {
        let q = ContainerQuery {
            container: container.into(),
        };
        self.json(
            self.request(reqwest::Method::POST, "/v1/exec")
                .query(&q)
                .json(&ExecRequest { cmd }),
        )
        .await
    }

    /// `GET /v1/orphans`.
    pub async fn orphans(&self) -> AgentResult<Orphans> {
        self.json(self.request(reqwest::Method::GET, "/v1/orphans"))
            .await
    }

    /// `DELETE /v1/orphans`: removes them with their volumes; answers what it removed.
    pub async fn remove_orphans(&self) -> AgentResult<Orphans> {
        self.json(self.request(reqwest::Method::DELETE, "/v1/orphans"))
            .await
    }

    /// `GET /v1/backups/{stack}/{service}`: the archives this node keeps, oldest first.
    pub async fn backups(
        &self,
        stack: &str,
        service: &str,
        q: &BackupsQuery,
    ) -> AgentResult<Vec<ArchiveEntry>> {
        // Verifying reads every archive whole: that may take a while.
        let timeout = if q.verify {
            TRANSFER
        } else {
            Duration::from_secs(10)
        };
        self.json(
            self.request(
                reqwest::Method::GET,
                &format!("/v1/backups/{stack}/{service}"),
            )
            .query(q)
            .timeout(timeout),
        )
        .await
    }

    /// `GET /v1/backups/{stack}/{service}/{file}`: one archive, as a stream.
    pub async fn backup_file(
        &self,
        stack: &str,
        service: &str,
        file: &str,
    ) -> AgentResult<reqwest::Response> {
        self.send(
            self.request(
                reqwest::Method::GET,
                &format!("/v1/backups/{stack}/{service}/{file}"),
            )
            .timeout(TRANSFER),
        )
        .await
    }

    /// `PUT /v1/backups/{stack}/{service}/{file}`: stores a copy of a replica's archive.
    pub async fn put_copy(
        &self,
        stack: &str,
        service: &str,
        file: &str,
        body: reqwest::Body,
    ) -> AgentResult<CopyKept> {
        self.json(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/backups/{stack}/{service}/{file}"),
            )
            .timeout(TRANSFER)
            .body(body),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query<T: Serialize>(q: &T) -> String {
        let req = reqwest::Client::new()
            .get("http://agent.test/")
            .query(q)
            .build()
            .unwrap();
        req.url().query().unwrap_or_default().to_owned()
    }

    #[test]
    fn queries_carry_only_what_differs_from_the_defaults() {
        assert_eq!(query(&BackupQuery::of("web-0")), "container=web-0");
        let q = BackupQuery {
            consistency: Some(Consistency::Live),
            image: false,
            snapshot: Some("s1".into()),
            secrets: true,
            ..BackupQuery::of("web-0")
        };
        assert_eq!(
            query(&q),
            "container=web-0&consistency=live&image=false&snapshot=s1&secrets=true"
        );
        assert_eq!(query(&RestoreQuery::default()), "");
        let q = RestoreQuery {
            start: false,
            keep_stack: true,
            hold: true,
            health_timeout: Some(Duration::from_millis(1500)),
            ..Default::default()
        };
        assert_eq!(
            query(&q),
            "start=false&keep_stack=true&health_timeout=1s+500ms&hold=true"
        );
    }
}
