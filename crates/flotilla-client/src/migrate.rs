//! Moving one replica to another node: the workflow behind `flotilla migrate`, as a
//! library function a test can drive (and break) without the CLI.
//!
//! A stateless stack replica moves blue/green: it is pinned to the target, whose agent
//! starts it; the source's agent drains and removes the old one once the new one
//! passes. A stateful one (or a container that is not a stack replica) moves cold, in
//! three passes so that the stopped window carries as little as possible:
//! 1. the image goes to the target's engine while the source serves;
//! 2. **pre-copy**: a live backup of the volumes is restored on the target, not started
//!    (any failure here falls back to a whole copy in step 3);
//! 3. the source stops; only what changed since the pre-copy (the **final delta**)
//!    streams straight into the target, which applies it, starts the copy and waits for
//!    it to pass. If that fails, the target's copy is removed and the source started
//!    again: the replica never ends up nowhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{HealthStatus, InstanceView, NodeView};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::agent::{AgentClient, AgentError, ApplyQuery, BackupQuery, RestoreQuery};
use crate::{Client, ClientError};

/// A byte stream between two agents, as the migration relays it.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// The stream a migration relays, for a [`StreamTap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The image, source engine to target engine.
    Image,
    /// The live pre-copy of the volumes.
    PreCopy,
    /// The final pass, while the replica is stopped (a delta after a pre-copy, else
    /// everything).
    Final,
}

/// Sees (and may replace) every stream the migration relays: progress display, rate
/// limits, or a test breaking a stream the way a failing network would.
pub type StreamTap = Arc<dyn Fn(Stage, ByteStream) -> ByteStream + Send + Sync>;

/// How to reach the agents: the HTTP client (with the cluster CA) and the token.
#[derive(Clone)]
pub struct AgentConnector {
    /// The HTTP client agents are called with.
    pub http: reqwest::Client,
    /// The bearer token (admin: migrations back up, restore and remove containers).
    pub token: Option<String>,
}

impl AgentConnector {
    /// A client of `node`'s agent, if the node serves an agent API.
    pub fn to(&self, node: &NodeView) -> Result<AgentClient, MigrateError> {
        let url = node.api.clone().ok_or_else(|| {
            MigrateError::Invalid(format!("node {} serves no agent API", node.name))
        })?;
        Ok(AgentClient::new(url, self.http.clone(), self.token.clone()))
    }
}

/// What a migration may be told besides what and where.
#[derive(Clone, Default)]
pub struct MigrateOptions {
    /// Drain time before a stateless source stops (default 2 s).
    pub drain: Option<Duration>,
    /// How long a stateless replica may take to pass on the target (default 120 s).
    pub within: Option<Duration>,
    /// Sees every relayed stream.
    pub tap: Option<StreamTap>,
}

/// How a replica moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    /// Pinned to the target; the source served until the target passed.
    BlueGreen,
    /// Stopped, copied, started on the target.
    Cold,
}

/// What a migration did, for the operator (and `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// The instance moved.
    pub instance: String,
    /// Its service.
    pub service: String,
    /// `STACK/SERVICE/REPLICA` for a stack replica.
    pub replica: Option<String>,
    /// Source node.
    pub from: String,
    /// Target node.
    pub to: String,
    /// How it moved.
    pub kind: MigrationKind,
    /// Whether its volumes were state (moved cold, stopped in between).
    pub stateful: bool,
    /// The container's name on the target (cold moves).
    pub container: Option<String>,
    /// Whether the image was sent to the target before the stop.
    pub image_staged: bool,
    /// Bytes pre-copied while the source served.
    pub pre_copied_bytes: u64,
    /// Why the pre-copy failed, when it did (everything then moved while stopped).
    pub pre_copy_failed: Option<String>,
    /// Bytes moved while the replica was stopped.
    pub final_bytes: u64,
    /// Stopped on the source → passing on the target (stateful moves).
    pub downtime_s: Option<f64>,
    /// The whole migration.
    pub total_s: f64,
}

/// Why a migration failed. Every failure after the source stopped has already put the
/// source back into service when this is returned (the message says so).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request cannot be carried out as asked (same node, no agent API, …).
    #[error("{0}")]
    Invalid(String),
    /// The registry failed a call.
    #[error("registry: {0}")]
    Registry(#[from] ClientError),
    /// An agent failed a step.
    #[error("{step}: {source}")]
    Agent {
        /// What the migration was doing.
        step: String,
        /// The agent's error.
        #[source]
        source: AgentError,
    },
    /// The replica did not converge in time.
    #[error("{0}")]
    Timeout(String),
}

fn agent_step(step: impl Into<String>) -> impl FnOnce(AgentError) -> MigrateError {
    let step = step.into();
    move |source| MigrateError::Agent { step, source }
}

/// The instances of `stack`'s `service` that pass and run version `hash`.
pub fn passing_of<'a>(
    list: &'a [InstanceView],
    stack: &str,
    service: &str,
    hash: &str,
) -> Vec<&'a InstanceView> {
    list.iter()
        .filter(|i| {
            i.service == service
                && i.meta.get("stack").map(String::as_str) == Some(stack)
                && i.meta
                    .get("spec")
                    .is_some_and(|s| hash.starts_with(s.as_str()))
                && i.health == HealthStatus::Passing
        })
        .collect()
}

/// The container an instance stands for (its id, else its name).
pub fn container_of(i: &InstanceView) -> Option<String> {
    i.meta
        .get("container_id")
        .or_else(|| i.meta.get("container_name"))
        .cloned()
}

/// Relays a response body through the tap, as an upload body.
fn relay(tap: &Option<StreamTap>, stage: Stage, resp: reqwest::Response) -> reqwest::Body {
    let s: ByteStream = resp.bytes_stream().map_err(std::io::Error::other).boxed();
    let s = match tap {
        Some(t) => t(stage, s),
        None => s,
    };
    reqwest::Body::wrap_stream(s)
}

/// Moves instance `inst` to node `to` (see the module's text for how).
pub async fn migrate(
    registry: &Client,
    agents: &AgentConnector,
    inst: &InstanceView,
    to: &str,
    opts: &MigrateOptions,
) -> Result<MigrationReport, MigrateError> {
    let from = inst
        .node
        .clone()
        .ok_or_else(|| MigrateError::Invalid(format!("instance {} has no node", inst.id)))?;
    if from == to {
        return Err(MigrateError::Invalid(format!(
            "{} already runs on {from}",
            inst.id
        )));
    }
    let nodes = registry.nodes().await?;
    let node = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| MigrateError::Invalid(format!("no live node {name:?}")))
    };
    let src = agents.to(node(&from)?)?;
    let dst = agents.to(node(to)?)?;
    let container = container_of(inst)
        .ok_or_else(|| MigrateError::Invalid(format!("instance {} is not a container", inst.id)))?;
    let stack = inst.meta.get("stack").cloned();
    let replica: Option<u32> = inst.meta.get("replica").and_then(|r| r.parse().ok());
    let deployed = match &stack {
        Some(s) => registry
            .stack(s)
            .await?
            .services
            .get(&inst.service)
            .cloned(),
        None => None,
    };
    // Unknown (not a stack replica): its volumes, if any, are state.
    let stateful = deployed.as_ref().is_none_or(|d| !d.spec.volumes.is_empty());
    let t0 = Instant::now();
    let mut report = MigrationReport {
        instance: inst.id.clone(),
        service: inst.service.clone(),
        replica: match (&stack, replica) {
            (Some(s), Some(r)) => Some(format!("{s}/{}/{r}", inst.service)),
            _ => None,
        },
        from: from.clone(),
        to: to.to_owned(),
        kind: MigrationKind::Cold,
        stateful,
        container: None,
        image_staged: false,
        pre_copied_bytes: 0,
        pre_copy_failed: None,
        final_bytes: 0,
        downtime_s: None,
        total_s: 0.0,
    };
    if let (Some(s), Some(r), false) = (&stack, replica, stateful) {
        blue_green(registry, inst, s, r, to, opts).await?;
        report.kind = MigrationKind::BlueGreen;
        report.total_s = t0.elapsed().as_secs_f64();
        return Ok(report);
    }

    // The image goes first, while the source still serves, so the stopped window
    // carries only the state.
    if let Some(d) = &deployed {
        report.image_staged = stage_image(&src, &dst, &d.image, &opts.tap)
            .await
            .map_err(agent_step(format!("sending image {} to {to}", d.image)))?;
    }
    let image = !report.image_staged;
    // Pre-copy while the source still serves. Any trouble here falls back to a whole
    // copy while stopped.
    let precopy = if stateful {
        match pre_copy(&src, &dst, &container, image, &opts.tap).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "pre-copy failed: moving everything while stopped");
                report.pre_copy_failed = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let final_query = BackupQuery {
        consistency: Some(if stateful {
            flotilla_core::stack::Consistency::Stop
        } else {
            flotilla_core::stack::Consistency::Live
        }),
        image,
        leave_stopped: stateful,
        secrets: true,
        since: precopy.as_ref().map(|p| p.snapshot.clone()),
        ..BackupQuery::of(&container)
    };
    let resp = match src.backup(&final_query).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(p) = &precopy {
                p.discard(&dst).await;
            }
            return Err(agent_step(format!("backup on {from}"))(e));
        }
    };
    let stopped_at = Instant::now();
    let body = relay(&opts.tap, Stage::Final, resp);
    let restored = match &precopy {
        Some(p) => dst
            .apply(
                &ApplyQuery {
                    container: p.copy.clone(),
                    health_timeout: None,
                },
                body,
            )
            .await
            .map(|a| (p.name.clone(), a.bytes)),
        None => dst
            .restore(
                &RestoreQuery {
                    keep_stack: true,
                    ..Default::default()
                },
                body,
            )
            .await
            .map(|r| (r.name, r.bytes)),
    };
    let (copy_name, final_bytes) = match restored {
        Ok(r) => r,
        Err(e) => {
            // The target's copy is of no use now (its agent removes it on a failed
            // apply; removing it here too covers a target that never got that far), and
            // the source goes back into service.
            if let Some(p) = &precopy {
                p.discard(&dst).await;
            }
            let released = src.release(&container).await;
            let step = match released {
                Ok(_) => "restore on the target failed; the source was started again",
                Err(_) => "restore on the target failed, and starting the source again failed too",
            };
            if let Err(r) = released {
                tracing::error!(error = %r, container, "starting the source again");
            }
            return Err(agent_step(step)(e));
        }
    };
    report.container = Some(copy_name);
    report.pre_copied_bytes = precopy.as_ref().map_or(0, |p| p.bytes);
    report.final_bytes = final_bytes;
    let downtime = stopped_at.elapsed();
    if let (Some(s), Some(r)) = (&stack, replica) {
        registry.pin(s, &inst.service, r, Some(to)).await?;
    }
    let drain = if stateful {
        Duration::ZERO
    } else {
        opts.drain.unwrap_or(Duration::from_secs(2))
    };
    src.retire(&container, drain)
        .await
        .map_err(agent_step(format!("retiring the source on {from}")))?;
    report.downtime_s = stateful.then_some(downtime.as_secs_f64());
    report.total_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// A stateless replica: pin it to the target; the target's agent starts it, and the
/// source's agent drains and removes the old one once the new one passes.
async fn blue_green(
    registry: &Client,
    inst: &InstanceView,
    stack: &str,
    replica: u32,
    to: &str,
    opts: &MigrateOptions,
) -> Result<(), MigrateError> {
    let t0 = Instant::now();
    let within = opts.within.unwrap_or(Duration::from_secs(120));
    registry
        .pin(stack, &inst.service, replica, Some(to))
        .await?;
    let rec = registry.stack(stack).await?;
    let hash = rec
        .services
        .get(&inst.service)
        .map(|d| d.spec_hash.clone())
        .unwrap_or_default();
    loop {
        let list = registry.instances().await?;
        let here = passing_of(&list, stack, &inst.service, &hash)
            .iter()
            .any(|i| {
                i.node.as_deref() == Some(to) && i.meta.get("replica") == Some(&replica.to_string())
            });
        let old_gone = !list.iter().any(|i| i.id == inst.id);
        if here && old_gone {
            return Ok(());
        }
        if t0.elapsed() > within {
            return Err(MigrateError::Timeout(format!(
                "the replica did not move within {}s",
                within.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A migration's pre-copy: the source's snapshot id and the stopped copy on the target.
struct PreCopy {
    snapshot: String,
    copy: String,
    name: String,
    bytes: u64,
}

impl PreCopy {
    /// Removes the target's copy (the migration will not use it); already gone is fine.
    async fn discard(&self, dst: &AgentClient) {
        match dst.retire(&self.copy, Duration::ZERO).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => tracing::warn!(error = %e, copy = self.copy, "removing the pre-copy"),
        }
    }
}

/// Copies `container` from `src` to `dst` while it runs (a live backup, its volumes'
/// state recorded by the source under a fresh snapshot id), restored but not started.
async fn pre_copy(
    src: &AgentClient,
    dst: &AgentClient,
    container: &str,
    image: bool,
    tap: &Option<StreamTap>,
) -> Result<PreCopy, MigrateError> {
    let snapshot = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let q = BackupQuery {
        consistency: Some(flotilla_core::stack::Consistency::Live),
        image,
        snapshot: Some(snapshot.clone()),
        // A move within the cluster keeps the replica's secrets.
        secrets: true,
        ..BackupQuery::of(container)
    };
    let resp = src
        .backup(&q)
        .await
        .map_err(agent_step("pre-copy backup"))?;
    let restored = dst
        .restore(
            &RestoreQuery {
                start: false,
                keep_stack: true,
                hold: true,
                ..Default::default()
            },
            relay(tap, Stage::PreCopy, resp),
        )
        .await
        .map_err(agent_step("pre-copy restore"))?;
    Ok(PreCopy {
        snapshot,
        copy: restored.id,
        name: restored.name,
        bytes: restored.bytes,
    })
}

/// Makes sure the target engine has image `tag`, copying it from the source's engine
/// if not. Returns whether the target has it now.
async fn stage_image(
    src: &AgentClient,
    dst: &AgentClient,
    tag: &str,
    tap: &Option<StreamTap>,
) -> Result<bool, AgentError> {
    if dst.has_image(tag).await? {
        return Ok(true);
    }
    if !src.has_image(tag).await? {
        return Ok(false);
    }
    let saved = src.save_image(tag).await?;
    dst.load_image(relay(tap, Stage::Image, saved)).await?;
    dst.has_image(tag).await
}

/// A tap that breaks the stream of `stage` after `after` bytes, as a network failing
/// mid-transfer would (the receiving agent sees the upload end in an error). For tests
/// of the failure paths; other stages pass through.
pub fn break_after(stage: Stage, after: u64) -> StreamTap {
    Arc::new(move |s: Stage, stream: ByteStream| {
        if s != stage {
            return stream;
        }
        let mut sent = 0u64;
        let mut broken = false;
        stream
            .map(move |chunk| {
                let chunk = chunk?;
                if broken {
                    return Err(std::io::Error::other("stream broken (injected)"));
                }
                let room = after.saturating_sub(sent);
                if (chunk.len() as u64) < room {
                    sent += chunk.len() as u64;
                    return Ok(chunk);
                }
                broken = true;
                Err(std::io::Error::other(format!(
                    "stream broken after {after} bytes (injected)"
                )))
            })
            .boxed()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_tap_errs_at_the_byte_it_was_told_and_leaves_other_stages_alone() {
        let chunks = || {
            futures::stream::iter(
                (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 100]))),
            )
            .boxed()
        };
        let tap = break_after(Stage::Final, 350);
        let got: Vec<_> = tap(Stage::Final, chunks()).collect().await;
        let ok: usize = got
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|c| c.len())
            .sum();
        assert_eq!(ok, 300);
        assert!(got[3].is_err());
        let all: Vec<_> = tap(Stage::PreCopy, chunks()).collect().await;
        assert!(all.iter().all(|c| c.is_ok()));
        assert_eq!(all.len(), 10);
    }
}
