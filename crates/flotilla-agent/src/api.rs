//! The agent's own HTTP API: what must happen on this host's engine and would be
//! wasteful to route through the server — image transfer, backup streams, restores
//! and retiring a container after a migration. Every route needs the cluster token.
//!
//! Data moves host to host (or host to CLI) directly; the server only tells who is where.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use flotilla_client::agent::{
    Applied, ApplyQuery, ArchiveEntry, BackupQuery, BackupsQuery, ContainerQuery, CopyKept,
    ExecReply, ExecRequest, ImagePresence, ImagesLoaded, LogsQuery, Orphans, PullRequest, Pulled,
    Released, RestoreQuery, Restored, RetireQuery, Retired, StackContainers, TagQuery,
};
use flotilla_http::{ApiError, JsonBody, Query};
use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::backup::{self, BackupOptions};
use crate::state::Inner;

/// Largest restore upload accepted.
pub const MAX_UPLOAD: u64 = 64 << 30;

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e)
}
fn failed(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("{e:#}"))
}

/// Binds the API's listener (none when `api_listen` is empty) and records the URL peers
/// reach it at: `api_url` when configured, else the bound address, with the advertise
/// address in place of an unspecified one.
pub(crate) async fn bind(inner: &Inner) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if inner.config.api_listen.is_empty() {
        return Ok(None);
    }
    let l = tokio::net::TcpListener::bind(&inner.config.api_listen)
        .await
        .with_context(|| format!("binding the agent API on {}", inner.config.api_listen))?;
    let bound = l.local_addr()?;
    let scheme = if inner.tls.is_some() { "https" } else { "http" };
    let url = match (&inner.config.api_url, inner.advertise) {
        (Some(u), _) => u.clone(),
        // Listening on every address: peers reach it at the advertise address.
        (None, Some(ip)) if bound.ip().is_unspecified() => {
            format!("{scheme}://{}", std::net::SocketAddr::new(ip, bound.port()))
        }
        (None, _) => format!("{scheme}://{bound}"),
    };
    let _ = inner.api_bound.set(url);
    Ok(Some(l))
}

/// Serves the API on `listener` until the task is aborted.
pub(crate) fn serve(
    inner: Arc<Inner>,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    let options = match &inner.tls {
        Some(tls) => flotilla_tls::ServeOptions::tls(tls.server.clone()),
        None => flotilla_tls::ServeOptions::plain(),
    };
    let app = router(inner);
    tokio::spawn(flotilla_tls::serve(listener, app, options))
}

/// The router; `inner` carries the engine, the registry client and the token.
pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/images", get(image_present).post(image_load))
        .route("/v1/images/save", get(image_save))
        .route("/v1/images/pull", post(image_pull))
        .route("/v1/backup", get(backup_stream))
        .route("/v1/restore", post(restore))
        .route("/v1/restore/apply", post(apply))
        .route("/v1/retire", post(retire))
        .route("/v1/stacks/{stack}/containers", get(stack_containers))
        .route("/v1/release", post(release))
        .route("/v1/orphans", get(orphans_list).delete(orphans_remove))
        .route("/v1/logs", get(logs))
        .route("/v1/exec", post(exec))
        .route("/v1/backups/{stack}/{service}", get(backups_list))
        .route(
            "/v1/backups/{stack}/{service}/{file}",
            get(backup_file).put(backup_copy),
        )
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            inner.clone(),
            authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            inner.metrics.http.clone(),
            flotilla_http::metrics::record,
        ))
        .with_state(inner)
}

async fn authorize(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    let given = flotilla_core::auth::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .unwrap_or_default();
    let same = flotilla_core::auth::token_matches(given.as_bytes(), inner.token.as_bytes());
    if same {
        return next.run(req).await;
    }
    // Any other token: the registry says what it is (the agent may hold only a join
    // token, and admins make their own). Only an admin token uses this API.
    if !given.is_empty() {
        return match inner.token_role(given).await {
            Some(flotilla_core::token::Role::Admin) => next.run(req).await,
            Some(role) => ApiError::new(
                StatusCode::FORBIDDEN,
                format!("a {} token may not use the agent API", role.name()),
            )
            .into_response(),
            None => ApiError::new(StatusCode::UNAUTHORIZED, "wrong or revoked bearer token")
                .into_response(),
        };
    }
    // A peer agent (its node certificate, no token) may fetch an image it lacks, and
    // store, list and fetch the backups of replicas assigned to it — nothing else:
    // volumes, restores and retirements stay with the token's holder.
    let peer_node = req
        .extensions()
        .get::<flotilla_tls::Peer>()
        .and_then(|p| p.identity.clone());
    match peer_node {
        Some(flotilla_tls::PeerIdentity::Node(node)) if given.is_empty() => {
            let image =
                req.method() == axum::http::Method::GET && req.uri().path() == "/v1/images/save";
            if image || peer_may_use_backups(&inner, &node, req.uri().path()).await {
                next.run(req).await
            } else {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "node {node:?}'s certificate may only fetch images from this agent \
                         and reach the backups of replicas assigned to it, not {} {}",
                        req.method(),
                        req.uri().path()
                    ),
                )
                .into_response()
            }
        }
        _ => {
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response()
        }
    }
}

/// `GET /v1/logs?container=C&follow=&since=&tail=`: a container's output (stdout and
/// stderr as they came) as a stream of text; with `follow` it ends when the container
/// stops. flotilla's containers only.
async fn logs(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let info = inspect(&inner, &q.container).await?;
    let id = info.id.unwrap_or_default();
    let opts = bollard::container::LogsOptions::<String> {
        follow: q.follow,
        stdout: true,
        stderr: true,
        since: q.since.unwrap_or(0),
        tail: q
            .tail
            .map(|t| t.to_string())
            .unwrap_or_else(|| "all".to_owned()),
        ..Default::default()
    };
    let s = inner
        .docker
        .logs(&id, Some(opts))
        .map(|r| r.map(|o| o.into_bytes()).map_err(std::io::Error::other));
    let mut resp = Body::from_stream(s).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

/// Most output `POST /v1/exec` returns.
const EXEC_OUTPUT_LIMIT: usize = 1 << 20;

/// `POST /v1/exec?container=C` with `{"cmd": [...]}`: runs a command in one of
/// flotilla's running containers (admin only, like every route here) and answers
/// `{"exit_code", "output", "truncated"}` (output up to 1 MiB).
async fn exec(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<ContainerQuery>,
    JsonBody(body): JsonBody<ExecRequest>,
) -> Result<Json<ExecReply>, ApiError> {
    if body.cmd.is_empty() || body.cmd.len() > 256 || body.cmd.iter().any(|a| a.len() > 8192) {
        return Err(bad("cmd: 1..=256 arguments of at most 8192 bytes"));
    }
    let info = inspect(&inner, &q.container).await?;
    let id = info.id.unwrap_or_default();
    let r = crate::docker::exec(&inner.docker, &id, &body.cmd, EXEC_OUTPUT_LIMIT)
        .await
        .map_err(|e| failed(e.into()))?;
    tracing::info!(container = q.container, cmd = ?body.cmd, code = r.code, "exec through the agent API");
    Ok(Json(ExecReply {
        exit_code: r.code,
        output: r.output,
        truncated: r.truncated,
    }))
}

/// `GET /v1/orphans`: stale copies of recovered replicas kept on this engine.
async fn orphans_list(State(inner): State<Arc<Inner>>) -> Result<Json<Orphans>, ApiError> {
    let orphans = inner.orphans().await.map_err(failed)?;
    Ok(Json(Orphans {
        node: inner.node.clone(),
        orphans,
    }))
}

/// `DELETE /v1/orphans`: removes the stale copies with their volumes (the operator's
/// decision: their data is older than the replica's recovered copy).
async fn orphans_remove(State(inner): State<Arc<Inner>>) -> Result<Json<Orphans>, ApiError> {
    let mut removed = Vec::new();
    for o in inner.orphans().await.map_err(failed)? {
        backup::remove_with_volumes(&inner.docker, &o.id)
            .await
            .map_err(failed)?;
        tracing::warn!(
            container = o.container,
            replica = o.replica,
            "orphan removed with its volumes"
        );
        removed.push(o);
    }
    Ok(Json(Orphans {
        node: inner.node.clone(),
        orphans: removed,
    }))
}

/// Whether peer `node` may use backup route `path`: the copies and archives of a
/// replica are for the node that runs it (a fresh assignment is read from the
/// registry; the last pass's, if the registry cannot be reached).
async fn peer_may_use_backups(inner: &Inner, node: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (stack, service, replica) = match parts.as_slice() {
        ["v1", "backups", stack, service] => (*stack, *service, None),
        ["v1", "backups", stack, service, file] => {
            match crate::copies::parse_archive_name(stack, service, file) {
                Some((r, _)) => (*stack, *service, Some(r)),
                None => return false,
            }
        }
        _ => return false,
    };
    let assignments = match inner.client.assignments(0, Duration::ZERO).await {
        Ok((_, a)) => a,
        Err(_) => inner.desired_now().assignments,
    };
    let prefix = format!("{stack}/{service}/");
    assignments.iter().any(|(key, a)| {
        a.node == node
            && key.strip_prefix(&prefix).is_some_and(|r| {
                replica.is_none_or(|want| r.parse::<u32>().is_ok_and(|r| r == want))
            })
    })
}

/// The backup directory of `stack`/`service` per the registry's stack record.
async fn backup_dir(
    inner: &Inner,
    stack: &str,
    service: &str,
) -> Result<flotilla_core::stack::BackupPolicy, ApiError> {
    let stacks = inner.current_stacks().await;
    crate::copies::policy_of(&stacks, stack, service)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{stack}/{service} has no backup policy"),
            )
        })
}

/// `GET /v1/backups/{stack}/{service}[?replica=R]`: the archives of the service's
/// replicas this node keeps (its own and copies), oldest first.
async fn backups_list(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path((stack, service)): axum::extract::Path<(String, String)>,
    Query(q): Query<BackupsQuery>,
) -> Result<Json<Vec<ArchiveEntry>>, ApiError> {
    let policy = backup_dir(&inner, &stack, &service).await?;
    let dir = inner.config.backup_dir(&policy.dir);
    let mut list = crate::copies::archives_in(&dir, &stack, &service, q.replica).await;
    if q.verify {
        for a in &mut list {
            let path = dir.join(&a.name);
            let ok = tokio::task::spawn_blocking(move || backup::verify_file(&path).is_ok())
                .await
                .unwrap_or(false);
            a.verified = Some(ok);
        }
    }
    Ok(Json(list))
}

/// `GET /v1/backups/{stack}/{service}/{file}`: one archive, as stored.
async fn backup_file(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path((stack, service, file)): axum::extract::Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    if crate::copies::parse_archive_name(&stack, &service, &file).is_none() {
        return Err(bad(format!(
            "{file:?} is not an archive of {stack}/{service}"
        )));
    }
    let policy = backup_dir(&inner, &stack, &service).await?;
    let f = tokio::fs::File::open(inner.config.backup_dir(&policy.dir).join(&file))
        .await
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("{file}: {e}")))?;
    let s = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
    Ok(Body::from_stream(s).into_response())
}

/// `PUT /v1/backups/{stack}/{service}/{file}`: a copy of a replica's archive from the
/// node that runs it; checked whole before it is kept, then retention applies.
async fn backup_copy(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path((stack, service, file)): axum::extract::Path<(String, String, String)>,
    body: Body,
) -> Result<Json<CopyKept>, ApiError> {
    let Some((r, _)) = crate::copies::parse_archive_name(&stack, &service, &file) else {
        return Err(bad(format!(
            "{file:?} is not an archive of {stack}/{service}"
        )));
    };
    let policy = backup_dir(&inner, &stack, &service).await?;
    let spooled = spool_checked(&inner, body).await?;
    let prefix = flotilla_core::recovery::archive_prefix(&stack, &service, r);
    let kept = inner
        .keep_copy(
            &spooled.path,
            &inner.config.backup_dir(&policy.dir),
            &file,
            &prefix,
            policy.retention,
        )
        .await;
    let _ = tokio::fs::remove_dir_all(&spooled.dir).await;
    kept.map_err(failed)?;
    Ok(Json(CopyKept {
        kept: file,
        bytes: spooled.total,
    }))
}

/// `GET /metrics`: OpenMetrics when the scraper asks for it, else Prometheus text.
async fn metrics(State(inner): State<Arc<Inner>>, headers: axum::http::HeaderMap) -> Response {
    flotilla_http::metrics::exposition(&headers, inner.metrics.encode())
}

async fn image_present(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<TagQuery>,
) -> Json<ImagePresence> {
    let id = inner
        .docker
        .inspect_image(&q.tag)
        .await
        .ok()
        .and_then(|i| i.id);
    Json(ImagePresence {
        present: id.is_some(),
        tag: q.tag,
        id,
    })
}

async fn image_save(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<TagQuery>,
) -> Result<Response, ApiError> {
    if inner.docker.inspect_image(&q.tag).await.is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {:?}", q.tag),
        ));
    }
    let s = inner
        .docker
        .export_image(&q.tag)
        .map(|r| r.map_err(std::io::Error::other));
    Ok(Body::from_stream(s).into_response())
}

async fn image_pull(
    State(inner): State<Arc<Inner>>,
    JsonBody(req): JsonBody<PullRequest>,
) -> Result<Json<Pulled>, ApiError> {
    let image: flotilla_core::stack::ImageRef = req.image.parse().map_err(bad)?;
    let auth = inner.registry_auth().map_err(failed)?;
    // The registry's refusal (unknown manifest, bad credentials, unreachable) is the
    // caller's to fix, not a fault of this agent.
    let pulled = crate::docker::pull(&inner.docker, &image, auth.as_ref())
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("{e:#}")))?;
    tracing::info!(image = %image, pinned = pulled.pinned, "image pulled");
    Ok(Json(Pulled {
        pinned: pulled.pinned,
        id: pulled.id,
    }))
}

async fn image_load(
    State(inner): State<Arc<Inner>>,
    body: Body,
) -> Result<Json<ImagesLoaded>, ApiError> {
    let s = body
        .into_data_stream()
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()));
    let mut out = inner.docker.import_image_stream(
        bollard::image::ImportImageOptions { quiet: true },
        s,
        None,
    );
    let mut loaded = Vec::new();
    while let Some(item) = out.next().await {
        let info = item.map_err(|e| bad(format!("docker load: {e}")))?;
        if let Some(e) = info.error {
            return Err(bad(format!("docker load: {e}")));
        }
        if let Some(s) = info.stream {
            loaded.push(s.trim().to_owned());
        }
    }
    Ok(Json(ImagesLoaded { loaded }))
}

/// Pre-copy snapshots older than this are dropped.
const SNAPSHOT_TTL: Duration = Duration::from_secs(3600);

async fn backup_stream(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<BackupQuery>,
) -> Result<Response, ApiError> {
    let info = inspect(&inner, &q.container).await?;
    let id = info.id.unwrap_or_default();
    let name = info
        .name
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let opts = BackupOptions {
        consistency: q.consistency.unwrap_or_default(),
        include_image: q.image,
        leave_stopped: q.leave_stopped,
        include_secrets: q.secrets,
    };
    // A delta needs its snapshot, for this container: refused before anything stops.
    let mut delta = backup::Delta::default();
    if let Some(since) = &q.since {
        let mut snaps = inner.snapshots.lock().await;
        match snaps.remove(since) {
            Some(s) if s.container == id => delta.since = Some(s.volumes),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("snapshot {since:?} belongs to another container"),
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("no snapshot {since:?} (expired, used, or taken by another agent)"),
                ))
            }
        }
    }
    if opts.leave_stopped {
        // A container on its way to another host: the reconciler must not restart it.
        inner.hold(&id).await;
    }
    let mut source = serde_json::Map::new();
    source.insert("node".into(), json!(inner.node));
    source.insert("container".into(), json!(name));
    source.insert("container_id".into(), json!(id));
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let (err_tx, err_rx) = tokio::sync::oneshot::channel::<String>();
    let task_inner = inner.clone();
    let snapshot = q.snapshot.clone();
    tokio::spawn(async move {
        let container = id.clone();
        match backup::backup(&task_inner.docker, &id, source, opts, &mut delta, tx).await {
            Ok(m) => {
                if let Some(key) = snapshot {
                    let mut snaps = task_inner.snapshots.lock().await;
                    snaps.retain(|_, s| s.taken.elapsed() < SNAPSHOT_TTL);
                    snaps.insert(
                        key,
                        backup::Snapshots {
                            taken: std::time::Instant::now(),
                            container,
                            volumes: delta.taken,
                        },
                    );
                }
                task_inner.metrics.backups.inc();
                tracing::info!(
                    container = name,
                    bytes = m.total_size(),
                    consistency = m.consistency,
                    "backup streamed"
                );
            }
            Err(e) => {
                tracing::warn!(container = name, error = format!("{e:#}"), "backup failed");
                let _ = err_tx.send(format!("{e:#}"));
            }
        }
    });
    // A failure mid-stream must not look like a complete archive: end the body with an
    // error, which aborts the response instead of finishing it cleanly.
    let data = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let tail = futures::stream::once(async move {
        match err_rx.await {
            Ok(e) => Err(std::io::Error::other(e)),
            Err(_) => Ok(Bytes::new()),
        }
    });
    Ok(Body::from_stream(data.chain(tail)).into_response())
}

async fn restore(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<RestoreQuery>,
    body: Body,
) -> Result<Json<Restored>, ApiError> {
    let gate = q.health_timeout.unwrap_or(HEALTH_GATE);
    let Spooled {
        dir,
        path,
        _held,
        total,
        manifest,
        config,
    } = spool_checked(&inner, body).await?;
    let strip: &[&str] = if q.keep_stack {
        &[]
    } else {
        &crate::labels::STACK_LABELS
    };
    // From before the container exists until it is held: the reconciler must not take
    // a migration's incoming copy for a replica not wanted here and retire it.
    let restoring = inner.restoring();
    let result = backup::restore_checked_archive(
        &inner.docker,
        &path,
        manifest,
        &config,
        &backup::RestoreOptions {
            name: q.name.as_deref(),
            start: q.start,
            relabel: &[(crate::labels::OWNER, &inner.node)],
            strip,
            publish_on: inner.advertise,
        },
    )
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let restored = result.map_err(|e| match e {
        backup::RestoreError::Refused(m) => ApiError::unprocessable(m).at("restore"),
        backup::RestoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        backup::RestoreError::Failed(e) => failed(e),
    })?;
    if q.hold {
        inner.hold(&restored.id).await;
    }
    drop(restoring);
    inner.metrics.restores.inc();
    let passing_after_ms = if q.start {
        match health_gate(&inner, &restored.id, gate).await {
            Ok(ms) => ms,
            Err(e) => {
                let _ = backup::remove_with_volumes(&inner.docker, &restored.id).await;
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("restored container {e}; removed it"),
                ));
            }
        }
    } else {
        None
    };
    Ok(Json(Restored {
        name: restored.name,
        id: restored.id,
        node: inner.node.clone(),
        volumes: restored.volumes,
        image_loaded: restored.image_loaded,
        bytes: total,
        passing_after_ms,
        manifest: restored.manifest,
    }))
}

/// An upload spooled to the work directory and checked whole.
struct Spooled {
    dir: std::path::PathBuf,
    /// `/proc/self/fd/N` of `_held`.
    path: std::path::PathBuf,
    /// The spool file, open from creation to the end of the restore.
    _held: std::fs::File,
    total: u64,
    manifest: flotilla_archive::backup::Manifest,
    config: Vec<u8>,
}

/// Spools an uploaded archive, checking it (digests, sizes, every volume entry) while it
/// arrives; on any failure the spool is gone and the error says why (422 "check" for a
/// refused archive).
async fn spool_checked(inner: &Inner, body: Body) -> Result<Spooled, ApiError> {
    // The upload is spooled, and checked whole (digests, sizes, every volume entry)
    // while it arrives; nothing is created unless the check passes.
    let dir = spool_dir(&inner.config.work_dir).map_err(failed)?;
    let spool_path = dir.join("upload.flotilla-backup");
    let held = match create_spool(&spool_path) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(
                anyhow::Error::new(e).context("creating the spool file"),
            ));
        }
    };
    // Everything after the check reads the file through this descriptor's /proc link:
    // the same file that was checked, whatever happens to its name meanwhile.
    let path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&held)
    ));
    let (tx, reader) = flotilla_archive::backup::ChannelReader::<bytes::Bytes>::new(16);
    let checker = std::thread::spawn(move || flotilla_archive::backup::check_with_config(reader));
    let spooled = async {
        let mut f = tokio::fs::File::from_std(held.try_clone().map_err(|e| failed(e.into()))?);
        let mut s = body.into_data_stream();
        let mut total = 0u64;
        let mut checking = true;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| bad(format!("upload interrupted: {e}")))?;
            total += chunk.len() as u64;
            if total > MAX_UPLOAD {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("larger than {MAX_UPLOAD} bytes"),
                ));
            }
            f.write_all(&chunk).await.map_err(|e| failed(e.into()))?;
            // A checker that already failed stops reading; its error is reported below.
            if checking && tx.send(chunk.clone()).is_err() {
                checking = false;
            }
        }
        f.flush().await.map_err(|e| failed(e.into()))?;
        Ok(total)
    }
    .await;
    drop(tx);
    let checked = checker.join();
    let total = match spooled {
        Ok(t) => t,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
    };
    let (manifest, config) = match checked {
        Ok(Ok(mc)) => mc,
        Ok(Err(e)) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).at("check"));
        }
        Err(_) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(failed(anyhow::anyhow!("archive checker panicked")));
        }
    };
    Ok(Spooled {
        dir,
        path,
        _held: held,
        total,
        manifest,
        config,
    })
}

/// A migration's final pass: applies an uploaded delta over the pre-copy's container,
/// starts it and waits for it to pass. Nothing is written unless the whole upload
/// checks out; if anything after fails, the container and its volumes are removed (the
/// source still has everything).
async fn apply(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<ApplyQuery>,
    body: Body,
) -> Result<Json<Applied>, ApiError> {
    let gate = q.health_timeout.unwrap_or(HEALTH_GATE);
    let target = inspect(&inner, &q.container).await?;
    let id = target.id.unwrap_or_default();
    let Spooled {
        dir,
        path,
        _held,
        total,
        manifest,
        ..
    } = match spool_checked(&inner, body).await {
        Ok(s) => s,
        Err(e) => {
            // The migration falls back to the source: the copy is of no use now.
            inner.unhold(&id).await;
            let _ = backup::remove_with_volumes(&inner.docker, &id).await;
            return Err(e);
        }
    };
    let applied = backup::apply_delta(&inner.docker, &id, &path, &manifest).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    // Each failure says what failed (the delta refused: 422; the copy not passing: 422;
    // the engine: 500), and in every case the copy goes: the source has everything.
    let outcome: Result<(), ApiError> = async {
        applied.map_err(|e| match e {
            backup::RestoreError::Failed(e) => failed(e.context("applying the delta")),
            refused => ApiError::unprocessable(refused.to_string()).at("apply"),
        })?;
        inner
            .docker
            .start_container::<String>(&id, None)
            .await
            .map_err(|e| failed(anyhow::Error::new(e).context("starting")))?;
        health_gate(&inner, &id, gate)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::unprocessable(format!("{e:#}")).at("health"))
    }
    .await;
    inner.unhold(&id).await;
    if let Err(e) = outcome {
        let _ = backup::remove_with_volumes(&inner.docker, &id).await;
        return Err(e.with_message(|m| format!("{m}; removed the copy")));
    }
    Ok(Json(Applied {
        id,
        node: inner.node.clone(),
        bytes: total,
    }))
}

/// Deregisters a container, waits for in-flight requests (drain), then removes it with
/// its volumes: the last step of a migration.
async fn retire(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<RetireQuery>,
) -> Result<Json<Retired>, ApiError> {
    let drain = q.drain.unwrap_or(Duration::from_secs(2));
    let info = inspect(&inner, &q.container).await?;
    let id = info.id.unwrap_or_default();
    inner.hold(&id).await;
    inner.retire(&id, drain).await.map_err(failed)?;
    Ok(Json(Retired {
        retired: q.container,
    }))
}

/// `GET /v1/stacks/{stack}/containers`: the containers of `stack` this node's agent
/// made that still exist on its engine (running, draining or stopped); `flotilla rm`
/// waits until every node answers none.
async fn stack_containers(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path(stack): axum::extract::Path<String>,
) -> Result<Json<StackContainers>, ApiError> {
    let names: Vec<String> = inner
        .stack_containers()
        .await
        .map_err(failed)?
        .into_iter()
        .filter(|l| l.stack == stack)
        .map(|l| l.name)
        .collect();
    Ok(Json(StackContainers {
        stack,
        containers: names,
    }))
}

/// Undoes the first step of a failed migration: lets the reconciler manage the
/// container again and starts it.
async fn release(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<RetireQuery>,
) -> Result<Json<Released>, ApiError> {
    let info = inspect(&inner, &q.container).await?;
    let id = info.id.unwrap_or_default();
    inner.unhold(&id).await;
    let running = info.state.and_then(|s| s.running).unwrap_or(false);
    if !running {
        inner
            .docker
            .start_container::<String>(&id, None)
            .await
            .map_err(|e| failed(e.into()))?;
    }
    Ok(Json(Released {
        released: q.container,
    }))
}

/// How long a restored or migrated container gets to pass its health check.
const HEALTH_GATE: Duration = Duration::from_secs(30);

/// Waits for a started container that registers itself to pass (a zero `gate` or an
/// unregistered container passes at once). Returns how long it took, or what failed.
async fn health_gate(inner: &Inner, id: &str, gate: Duration) -> anyhow::Result<Option<u64>> {
    if gate.is_zero() || !inner.registers(id).await {
        return Ok(None);
    }
    let t0 = std::time::Instant::now();
    if !inner.wait_passing(id, gate).await {
        anyhow::bail!(
            "did not pass its health check within {}",
            humantime::format_duration(gate)
        );
    }
    Ok(Some(t0.elapsed().as_millis() as u64))
}

/// A container flotilla manages, by name or id: 404 naming it if there is none, 403 if
/// it carries neither a service nor a stack label (the API backs up, restores over and
/// removes containers: never one the operator runs beside flotilla).
async fn inspect(
    inner: &Inner,
    container: &str,
) -> Result<bollard::models::ContainerInspectResponse, ApiError> {
    let info = inner
        .docker
        .inspect_container(container, None)
        .await
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no container {container:?}")))?;
    let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
    let managed = labels.is_some_and(|l| {
        l.contains_key(crate::labels::SERVICE) || l.contains_key(crate::labels::STACK)
    });
    if !managed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "container {container:?} is not flotilla's (no {} or {} label): the agent API acts on flotilla's containers only",
                crate::labels::SERVICE,
                crate::labels::STACK
            ),
        ));
    }
    Ok(info)
}

/// A new private spool directory under `base`: made with `mkdtemp` (a fresh, unguessable
/// name, mode 0700), so nothing another user placed there is reused or followed.
fn spool_dir(base: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(tempfile::Builder::new()
        .prefix("flotilla-restore-")
        .tempdir_in(base)
        .with_context(|| format!("making a spool directory in {}", base.display()))?
        .keep())
}

/// Creates the spool file: new (`O_EXCL`), not through a symlink (`O_NOFOLLOW`), 0600.
fn create_spool(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
}
