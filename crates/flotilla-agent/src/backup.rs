//! Backup and restore of one container through the Docker Engine API.
//!
//! A backup streams out as a [`flotilla_archive::backup`] archive: the container's
//! config, its image (`docker save`), and every named volume (read through the engine's
//! archive endpoint, so it works on any engine the agent can reach). A restore first
//! reads the whole archive to check it — digests, sizes, every volume path and link —
//! and only then creates anything: image, volumes, container, volume contents. If any
//! step after that fails, what was created is removed again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bollard::container::{
    Config, CreateContainerOptions, DownloadFromContainerOptions, RemoveContainerOptions,
    StopContainerOptions, UploadToContainerOptions,
};
use bollard::models::{EndpointSettings, HostConfig, Mount, MountTypeEnum};
use bollard::network::CreateNetworkOptions;
use bollard::volume::CreateVolumeOptions;
use bollard::Docker;
use bytes::Bytes;
use flotilla_archive::backup::{self, Encoder, Manifest, PartHeader, PartKind, Piece};
use flotilla_core::stack::Consistency;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The container settings a restore needs, saved as the archive's config part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedContainer {
    /// Container name at the source.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Image id.
    pub image_id: String,
    /// Environment.
    pub env: Vec<String>,
    /// CMD.
    pub cmd: Option<Vec<String>>,
    /// ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    /// User.
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// Labels (the `flotilla.*` ones make the restored container register itself).
    pub labels: BTreeMap<String, String>,
    /// CPU limit in nano-CPUs.
    pub nano_cpus: Option<i64>,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// User-defined networks it was attached to.
    pub networks: Vec<String>,
    /// Named volumes: (volume name, mount point), in archive order.
    pub volumes: Vec<(String, String)>,
    /// Whether Docker's init runs as PID 1 (forwards signals, reaps zombies).
    #[serde(default)]
    pub init: bool,
}

/// What `backup` was asked to do.
#[derive(Debug, Clone, Copy)]
pub struct BackupOptions {
    /// How the data is kept consistent.
    pub consistency: Consistency,
    /// Include the image (a restore on an engine without it needs it).
    pub include_image: bool,
    /// Leave the container stopped afterwards (the first step of a cold migration).
    pub leave_stopped: bool,
}

/// Streams a backup of `container` into `out`, chunk by chunk; returns the manifest.
pub async fn backup(
    docker: &Docker,
    container: &str,
    source: serde_json::Map<String, serde_json::Value>,
    opts: BackupOptions,
    out: mpsc::Sender<Bytes>,
) -> anyhow::Result<Manifest> {
    let info = docker
        .inspect_container(container, None)
        .await
        .with_context(|| format!("no container {container:?}"))?;
    let id = info.id.clone().unwrap_or_default();
    let saved = saved_container(&info);
    let state = info.state.clone().unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let paused = state.paused.unwrap_or(false);
    let mut enc = Encoder::new();
    let send = |b: Vec<u8>| {
        let out = out.clone();
        async move {
            if !b.is_empty() {
                out.send(Bytes::from(b))
                    .await
                    .map_err(|_| anyhow::anyhow!("the receiver went away"))?;
            }
            anyhow::Ok(())
        }
    };
    send(enc.begin(PartHeader {
        kind: PartKind::Config,
        volume: None,
        mount: None,
    })?)
    .await?;
    send(enc.write(&serde_json::to_vec_pretty(&saved)?)?).await?;
    send(enc.end()?).await?;
    if opts.include_image {
        send(enc.begin(PartHeader {
            kind: PartKind::Image,
            volume: None,
            mount: None,
        })?)
        .await?;
        let image_ref = if docker.inspect_image(&saved.image).await.is_ok() {
            saved.image.clone()
        } else {
            saved.image_id.clone()
        };
        let mut s = docker.export_image(&image_ref);
        while let Some(chunk) = s.next().await {
            send(enc.write(&chunk.context("docker save")?)?).await?;
        }
        send(enc.end()?).await?;
    }
    // Quiesce only for the volumes: config and image do not change underneath us.
    let consistency = match opts.consistency {
        _ if saved.volumes.is_empty() => "live",
        Consistency::Pause if running && !paused => {
            docker.pause_container(&id).await.context("pausing")?;
            "paused"
        }
        Consistency::Stop if running => {
            docker
                .stop_container(&id, Some(StopContainerOptions { t: 10 }))
                .await
                .context("stopping")?;
            "stopped"
        }
        Consistency::Live => "live",
        _ => "stopped",
    };
    let result = async {
        for (name, mount) in &saved.volumes {
            send(enc.begin(PartHeader {
                kind: PartKind::Volume,
                volume: Some(name.clone()),
                mount: Some(mount.clone()),
            })?)
            .await?;
            // The agent runs beside its engine: read the volume where it lies (a tar
            // written here, at disk speed) when the engine's mount point is visible,
            // else through the engine's archive endpoint (Go's tar over HTTP, slower).
            let local = docker
                .inspect_volume(name)
                .await
                .ok()
                .map(|v| PathBuf::from(v.mountpoint))
                .filter(|p| p.is_dir());
            match local {
                Some(dir) => {
                    let top = Path::new(mount)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "data".into());
                    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(8);
                    let writer = tokio::task::spawn_blocking(move || tar_dir(&dir, &top, tx));
                    while let Some(chunk) = rx.recv().await {
                        let chunk = chunk.with_context(|| format!("reading volume {mount}"))?;
                        send(enc.write(&chunk)?).await?;
                    }
                    writer.await??;
                }
                None => {
                    let mut s = docker.download_from_container(
                        &id,
                        Some(DownloadFromContainerOptions {
                            path: mount.clone(),
                        }),
                    );
                    while let Some(chunk) = s.next().await {
                        send(
                            enc.write(&chunk.with_context(|| format!("reading volume {mount}"))?)?,
                        )
                        .await?;
                    }
                }
            }
            send(enc.end()?).await?;
        }
        anyhow::Ok(())
    }
    .await;
    match consistency {
        "paused" => {
            docker.unpause_container(&id).await.context("unpausing")?;
        }
        "stopped" if running && !opts.leave_stopped => {
            docker
                .start_container::<String>(&id, None)
                .await
                .context("starting again")?;
        }
        _ => {}
    }
    result?;
    let (manifest, tail) = enc.finish(flotilla_core::record::unix_ms(), source, consistency)?;
    send(tail).await?;
    Ok(manifest)
}

/// Writes a tar of `dir` with entries under `top/` into `tx` in 1 MiB pieces: the
/// layout of the engine's archive endpoint (links kept as links, owners, modes and
/// times kept).
fn tar_dir(
    dir: &Path,
    top: &str,
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    struct Pipe {
        buf: Vec<u8>,
        tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
    }
    impl std::io::Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            if self.buf.len() >= 1 << 20 {
                self.flush()?;
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.buf.is_empty() {
                let b = std::mem::replace(&mut self.buf, Vec::with_capacity(1 << 20));
                self.tx
                    .blocking_send(Ok(b))
                    .map_err(|_| std::io::Error::other("backup stopped"))?;
            }
            Ok(())
        }
    }
    let pipe = Pipe {
        buf: Vec::with_capacity(1 << 20),
        tx: tx.clone(),
    };
    let mut b = tar::Builder::new(pipe);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    // Sparse files (a preallocated database, e.g. the registry's redb file) go in as
    // plain files, holes as zeros: the archive checker and restore know regular files
    // only, and the contents come back identical.
    b.sparse(false);
    let result = b
        .append_dir_all(top, dir)
        .and_then(|_| b.finish())
        .and_then(|_| std::io::Write::flush(b.get_mut()));
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(std::io::Error::other(format!(
            "{}: {e}",
            dir.display()
        ))));
    }
    Ok(())
}

fn saved_container(info: &bollard::models::ContainerInspectResponse) -> SavedContainer {
    let config = info.config.clone().unwrap_or_default();
    let host = info.host_config.clone().unwrap_or_default();
    let mut volumes: Vec<(String, String)> = info
        .mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.typ == Some(bollard::models::MountPointTypeEnum::VOLUME))
        .filter_map(|m| Some((m.name?, m.destination?)))
        .collect();
    volumes.sort_by(|a, b| a.1.cmp(&b.1));
    let networks = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .map(|n| {
            n.into_keys()
                .filter(|k| !matches!(k.as_str(), "bridge" | "host" | "none"))
                .collect()
        })
        .unwrap_or_default();
    SavedContainer {
        name: info
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.clone().unwrap_or_default(),
        image_id: info.image.clone().unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        cmd: config.cmd,
        entrypoint: config.entrypoint,
        user: config.user.unwrap_or_default(),
        workdir: config.working_dir.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        nano_cpus: host.nano_cpus.filter(|n| *n > 0),
        memory: host.memory.filter(|n| *n > 0),
        networks,
        volumes,
        init: host.init.unwrap_or(false),
    }
}

/// What a restore created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    /// Container name.
    pub name: String,
    /// Container id.
    pub id: String,
    /// Volumes created, by mount point.
    pub volumes: BTreeMap<String, String>,
    /// Whether the image had to be loaded from the archive.
    pub image_loaded: bool,
    /// The archive's manifest.
    pub manifest: Manifest,
}

/// How a restore names and labels what it creates.
pub struct RestoreOptions<'a> {
    /// Container name (default: the source's).
    pub name: Option<&'a str>,
    /// Start the container.
    pub start: bool,
    /// Labels the container already has are set to these values (the managing node
    /// changes with the host).
    pub relabel: &'a [(&'a str, &'a str)],
    /// Labels dropped (a restored copy is no longer a stack's replica).
    pub strip: &'a [&'a str],
}

/// Restores the archive at `path`, already checked whole by
/// [`backup::check_with_config`] (which returned `manifest` and `config`), as a new
/// container. Creates nothing before this call, and removes what it created if a later
/// step fails.
pub async fn restore_checked_archive(
    docker: &Docker,
    path: &Path,
    manifest: Manifest,
    config: &[u8],
    opts: &RestoreOptions<'_>,
) -> anyhow::Result<Restored> {
    let (name, start, relabel, strip) = (opts.name, opts.start, opts.relabel, opts.strip);
    let mut saved: SavedContainer =
        serde_json::from_slice(config).context("the archive's container config")?;
    for (k, v) in relabel {
        if let Some(old) = saved.labels.get_mut(*k) {
            *old = (*v).to_owned();
        }
    }
    saved.labels.retain(|k, _| !strip.contains(&k.as_str()));
    let volume_parts: Vec<&str> = manifest
        .parts
        .iter()
        .filter(|p| p.header.kind == PartKind::Volume)
        .filter_map(|p| p.header.mount.as_deref())
        .collect();
    let saved_mounts: Vec<&str> = saved.volumes.iter().map(|(_, m)| m.as_str()).collect();
    if volume_parts != saved_mounts {
        bail!("the archive's volumes {volume_parts:?} do not match its config {saved_mounts:?}");
    }
    let name = name.unwrap_or(&saved.name).to_owned();
    flotilla_core::validate_node_name("name", &name).map_err(|e| anyhow::anyhow!("{e}"))?;
    if docker.inspect_container(&name, None).await.is_ok() {
        bail!("a container named {name:?} already exists on this engine");
    }
    let has_image = docker.inspect_image(&saved.image_id).await.is_ok();
    if !has_image
        && !manifest
            .parts
            .iter()
            .any(|p| p.header.kind == PartKind::Image)
    {
        bail!(
            "the engine lacks image {} and the archive does not carry it",
            saved.image
        );
    }
    let mut created = Created::default();
    match restore_checked(docker, path, &saved, &name, has_image, start, &mut created).await {
        Ok(id) => Ok(Restored {
            name,
            id,
            volumes: created.volumes.clone(),
            image_loaded: !has_image,
            manifest,
        }),
        Err(e) => {
            created.undo(docker).await;
            Err(e)
        }
    }
}

#[derive(Default)]
struct Created {
    container: Option<String>,
    volumes: BTreeMap<String, String>,
    networks: Vec<String>,
}

impl Created {
    async fn undo(&self, docker: &Docker) {
        if let Some(id) = &self.container {
            let _ = docker
                .remove_container(
                    id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: false,
                        link: false,
                    }),
                )
                .await;
        }
        for v in self.volumes.values() {
            let _ = docker.remove_volume(v, None).await;
        }
        for n in &self.networks {
            let _ = docker.remove_network(n).await;
        }
    }
}

async fn restore_checked(
    docker: &Docker,
    path: &Path,
    saved: &SavedContainer,
    name: &str,
    has_image: bool,
    start: bool,
    created: &mut Created,
) -> anyhow::Result<String> {
    for (i, (vol, mount)) in saved.volumes.iter().enumerate() {
        // Keep the volume's name where it is free (a migration), else derive one.
        let wanted = if docker.inspect_volume(vol).await.is_err() {
            vol.clone()
        } else {
            format!("{name}-{i}")
        };
        if docker.inspect_volume(&wanted).await.is_ok() {
            bail!("volume {wanted:?} already exists on this engine");
        }
        docker
            .create_volume(CreateVolumeOptions {
                name: wanted.clone(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating volume {wanted}"))?;
        created.volumes.insert(mount.clone(), wanted);
    }
    for n in &saved.networks {
        if docker.inspect_network::<String>(n, None).await.is_err() {
            docker
                .create_network(CreateNetworkOptions {
                    name: n.clone(),
                    check_duplicate: true,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating network {n}"))?;
            created.networks.push(n.clone());
        }
    }
    // Pass 2: stream the image (if needed) and the volume contents where they belong.
    // The container must exist before its volumes can be written, and the image before
    // the container: the image part comes before the volumes in every archive.
    let (tx, mut rx) = mpsc::channel::<Msg>(16);
    let p = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&p)?;
        backup::read(std::io::BufReader::with_capacity(1 << 20, f), |piece| {
            let msg = match piece {
                Piece::Begin(_, h) => Msg::Begin(h.clone()),
                Piece::Data(d) => Msg::Data(Bytes::copy_from_slice(d)),
                Piece::End => Msg::End,
            };
            tx.blocking_send(msg)
                .map_err(|_| std::io::Error::other("restore stopped"))
        })?;
        anyhow::Ok(())
    });
    let mut container: Option<String> = None;
    let mut volume_index = 0usize;
    while let Some(msg) = rx.recv().await {
        let Msg::Begin(header) = msg else {
            bail!("archive data outside a part");
        };
        let (data_tx, data_rx) = mpsc::channel::<Bytes>(8);
        let mut body = Some(tokio_stream_from(data_rx));
        let sink: futures::future::BoxFuture<'_, anyhow::Result<()>> = match header.kind {
            PartKind::Config => Box::pin(async { Ok(()) }),
            PartKind::Image if has_image => Box::pin(async { Ok(()) }),
            PartKind::Image => {
                let body = body.take().expect("one consumer");
                Box::pin(async move {
                    let mut s = docker.import_image_stream(
                        bollard::image::ImportImageOptions { quiet: true },
                        body,
                        None,
                    );
                    while let Some(item) = s.next().await {
                        if let Some(e) = item.context("docker load")?.error {
                            bail!("docker load: {e}");
                        }
                    }
                    Ok(())
                })
            }
            PartKind::Volume => {
                if container.is_none() {
                    let id = create_container(docker, saved, name, &created.volumes).await?;
                    created.container = Some(id.clone());
                    container = Some(id);
                }
                let id = container.clone().expect("created");
                let mount = saved.volumes[volume_index].1.clone();
                volume_index += 1;
                let body = body.take().expect("one consumer");
                let parent = Path::new(&mount)
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "/".into());
                Box::pin(async move {
                    docker
                        .upload_to_container_streaming(
                            &id,
                            Some(UploadToContainerOptions {
                                path: parent,
                                no_overwrite_dir_non_dir: "true".to_owned(),
                            }),
                            body,
                        )
                        .await
                        .with_context(|| format!("writing volume {mount}"))
                })
            }
        };
        // A part nobody consumes (config, an image the engine has) is read and dropped.
        drop(body);
        let feed = async {
            loop {
                match rx.recv().await {
                    Some(Msg::Data(d)) => {
                        // A consumer that stopped early reports its error below.
                        let _ = data_tx.send(d).await;
                    }
                    Some(Msg::End) => break,
                    _ => bail!("archive part ended early"),
                }
            }
            drop(data_tx);
            Ok(())
        };
        let (fed, sunk) = tokio::join!(feed, sink);
        fed?;
        sunk?;
    }
    reader.await??;
    let id = match container {
        Some(id) => id,
        None => {
            let id = create_container(docker, saved, name, &created.volumes).await?;
            created.container = Some(id.clone());
            id
        }
    };
    if start {
        docker
            .start_container::<String>(&id, None)
            .await
            .context("starting the restored container")?;
    }
    Ok(id)
}

enum Msg {
    Begin(PartHeader),
    Data(Bytes),
    End,
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn create_container(
    docker: &Docker,
    saved: &SavedContainer,
    name: &str,
    volumes: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let mounts = saved
        .volumes
        .iter()
        .map(|(_, mount)| Mount {
            target: Some(mount.clone()),
            source: volumes.get(mount).cloned(),
            typ: Some(MountTypeEnum::VOLUME),
            ..Default::default()
        })
        .collect();
    let mut endpoints = HashMap::new();
    if let Some(n) = saved.networks.first() {
        endpoints.insert(n.clone(), EndpointSettings::default());
    }
    let config = Config {
        image: Some(saved.image_id.clone()),
        env: Some(saved.env.clone()),
        cmd: saved.cmd.clone(),
        entrypoint: saved.entrypoint.clone(),
        user: Some(saved.user.clone()),
        working_dir: Some(saved.workdir.clone()),
        labels: Some(saved.labels.clone().into_iter().collect()),
        host_config: Some(HostConfig {
            mounts: Some(mounts),
            nano_cpus: saved.nano_cpus,
            memory: saved.memory,
            network_mode: saved.networks.first().cloned(),
            init: Some(saved.init),
            ..Default::default()
        }),
        networking_config: Some(bollard::container::NetworkingConfig {
            endpoints_config: endpoints,
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_owned(),
                platform: None,
            }),
            config,
        )
        .await
        .with_context(|| format!("creating container {name}"))?;
    for n in saved.networks.iter().skip(1) {
        docker
            .connect_network(
                n,
                bollard::network::ConnectNetworkOptions {
                    container: created.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("connecting to network {n}"))?;
    }
    Ok(created.id)
}

/// Reads a whole archive file and checks it, without writing anything.
pub fn verify_file(path: &Path) -> anyhow::Result<Manifest> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    backup::verify(std::io::BufReader::with_capacity(1 << 20, f))
        .with_context(|| path.display().to_string())
}

/// Removes a container after a migration or a failed restore, with its volumes.
pub async fn remove_with_volumes(docker: &Docker, container: &str) -> anyhow::Result<()> {
    let info = docker.inspect_container(container, None).await?;
    let vols: Vec<String> = info
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.typ == Some(bollard::models::MountPointTypeEnum::VOLUME))
        .filter_map(|m| m.name)
        .collect();
    docker
        .remove_container(
            container,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await?;
    for v in vols {
        let _ = docker.remove_volume(&v, None).await;
    }
    Ok(())
}

/// A bounded wait for a condition, polled every 100 ms.
pub async fn wait_until<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
