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

use crate::beneath;

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
    /// Container ports that were published on the host. A restore publishes them again
    /// on ports the engine picks: a host port is the old host's, not the archive's.
    #[serde(default)]
    pub published: Vec<u16>,
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
    /// Keep the secret environment values (those named by the container's
    /// `flotilla.secret_env` label) in the archive: a migration within the cluster
    /// needs them; a backup leaves them out unless asked.
    pub include_secrets: bool,
}

/// Streams a backup of `container` into `out`, chunk by chunk; returns the manifest.
pub async fn backup(
    docker: &Docker,
    container: &str,
    source: serde_json::Map<String, serde_json::Value>,
    opts: BackupOptions,
    delta: &mut Delta,
    out: mpsc::Sender<Bytes>,
) -> anyhow::Result<Manifest> {
    let info = docker
        .inspect_container(container, None)
        .await
        .with_context(|| format!("no container {container:?}"))?;
    let id = info.id.clone().unwrap_or_default();
    let saved = saved_container(&info, opts.include_secrets);
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
        removed: None,
    })?)
    .await?;
    send(enc.write(&serde_json::to_vec_pretty(&saved)?)?).await?;
    send(enc.end()?).await?;
    if opts.include_image {
        send(enc.begin(PartHeader {
            kind: PartKind::Image,
            volume: None,
            mount: None,
            removed: None,
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
            // The agent runs beside its engine: read the volume where it lies (a tar
            // written here, at disk speed) when the engine's mount point is visible,
            // else through the engine's archive endpoint (Go's tar over HTTP, slower;
            // no deltas).
            let local = docker
                .inspect_volume(name)
                .await
                .ok()
                .map(|v| PathBuf::from(v.mountpoint))
                .filter(|p| p.is_dir());
            let since = delta.since.as_ref().map(|s| s.get(name));
            let Some(dir) = local else {
                if since.is_some() {
                    bail!("volume {name}: its mount point is not visible here, so no delta can be taken");
                }
                send(enc.begin(PartHeader {
                    kind: PartKind::Volume,
                    volume: Some(name.clone()),
                    mount: Some(mount.clone()),
                    removed: None,
                })?)
                .await?;
                let mut s = docker.download_from_container(
                    &id,
                    Some(DownloadFromContainerOptions {
                        path: mount.clone(),
                    }),
                );
                while let Some(chunk) = s.next().await {
                    send(enc.write(&chunk.with_context(|| format!("reading volume {mount}"))?)?)
                        .await?;
                }
                send(enc.end()?).await?;
                continue;
            };
            // Stat everything first (before any content is read: a file written while
            // it is read has a newer stamp than the one recorded, so the next delta
            // sends it again), then stream what is wanted.
            let walk_dir = dir.clone();
            let entries = tokio::task::spawn_blocking(move || walk_volume(&walk_dir))
                .await?
                .with_context(|| format!("reading volume {name}"))?;
            let (wanted, removed) = match since {
                None => (entries.clone(), None),
                Some(before) => {
                    let empty = VolumeSnapshot::new();
                    let before = before.unwrap_or(&empty);
                    let (w, r) = changed_since(before, &entries);
                    (w, Some(r))
                }
            };
            delta.taken.insert(
                name.clone(),
                entries.iter().map(|(p, st)| (p.clone(), *st)).collect(),
            );
            send(enc.begin(PartHeader {
                kind: PartKind::Volume,
                volume: Some(name.clone()),
                mount: Some(mount.clone()),
                removed,
            })?)
            .await?;
            let top = Path::new(mount)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".into());
            let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(8);
            let paths: Vec<PathBuf> = wanted.into_iter().map(|(p, _)| p).collect();
            let writer = tokio::task::spawn_blocking(move || tar_entries(&dir, &top, &paths, tx));
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk.with_context(|| format!("reading volume {mount}"))?;
                send(enc.write(&chunk)?).await?;
            }
            writer.await??;
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

/// File-type bits of `st_mode` (POSIX).
const S_IFMT: u32 = 0o170_000;
/// A directory's file-type bits.
const S_IFDIR: u32 = 0o040_000;

/// What a volume entry looked like: enough to tell whether it changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    kind: u32,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            kind: m.mode() & S_IFMT,
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            // ctime cannot be set from user space: a write that restores the mtime
            // still shows here.
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

/// A volume's entries at a pre-copy, by path relative to the volume.
pub type VolumeSnapshot = HashMap<PathBuf, Stamp>;

/// A migration pre-copy's snapshot, kept by the source agent until the final pass.
#[derive(Debug)]
pub struct Snapshots {
    /// When it was taken (old ones are dropped).
    pub taken: std::time::Instant,
    /// The container it belongs to.
    pub container: String,
    /// Per volume name.
    pub volumes: HashMap<String, VolumeSnapshot>,
}

/// What an incremental schedule remembers of a replica's last backup: a delta can
/// only follow a backup of the same container whose snapshot it holds.
#[derive(Debug)]
pub(crate) struct Chain {
    /// The container the backups were taken of.
    pub(crate) container: String,
    /// The file name of the last backup (full or delta): the next delta's base.
    pub(crate) last: String,
    /// What each volume held then.
    pub(crate) volumes: std::collections::HashMap<String, VolumeSnapshot>,
    /// When the volumes were last looked at (unix ms): a delta that would carry nothing
    /// is not kept, and the schedule counts from the look.
    pub(crate) checked_ms: u64,
}

/// Deltas across two backups of the same container (a migration's pre-copy and its
/// final pass).
#[derive(Debug, Default)]
pub struct Delta {
    /// Per volume: what it held at the pre-copy. When set, each volume part carries
    /// only what changed since, and the paths removed.
    pub since: Option<HashMap<String, VolumeSnapshot>>,
    /// Filled in by the backup: what each volume holds now.
    pub taken: HashMap<String, VolumeSnapshot>,
}

/// Every entry under `dir` (not `dir` itself), parents before children, sorted by
/// name, with their stamps. Nothing is reached through a symlink (see [`beneath`]): a
/// directory swapped for a link while we walk is listed as the link, not entered.
fn walk_volume(dir: &Path) -> std::io::Result<Vec<(PathBuf, Stamp)>> {
    fn visit(
        here: &std::fs::File,
        rel: &Path,
        out: &mut Vec<(PathBuf, Stamp)>,
    ) -> std::io::Result<()> {
        let mut names = beneath::list(here)?;
        names.sort();
        for name in names {
            let child = rel.join(&name);
            // A directory to enter, else the entry itself (a symlink as a symlink).
            let (opened, is_dir) = match beneath::open_at(here, &name, beneath::How::Dir) {
                Ok(d) => (d, true),
                Err(e) if beneath::changed_under_us(&e) => {
                    match beneath::open_at(here, &name, beneath::How::Path) {
                        Ok(f) => (f, false),
                        // Removed while we walked: it is simply not part of this copy.
                        Err(e) if beneath::changed_under_us(&e) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            let meta = opened.metadata()?;
            out.push((child.clone(), Stamp::of(&meta)));
            if is_dir {
                visit(&opened, &child, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(&beneath::open_root(dir)?, Path::new(""), &mut out)?;
    Ok(out)
}

/// What a delta against `before` carries: the entries new or changed (every directory,
/// so the tar restores their modes and times; headers only), and the paths to remove
/// first — gone, or changed kind (a file that became a directory).
fn changed_since(
    before: &VolumeSnapshot,
    now: &[(PathBuf, Stamp)],
) -> (Vec<(PathBuf, Stamp)>, Vec<String>) {
    let present: HashMap<&PathBuf, &Stamp> = now.iter().map(|(p, st)| (p, st)).collect();
    let mut removed: Vec<String> = before
        .iter()
        .filter(|(p, st)| present.get(p).is_none_or(|now| now.kind != st.kind))
        .map(|(p, _)| p.to_string_lossy().into_owned())
        .collect();
    removed.sort();
    let wanted = now
        .iter()
        .filter(|(p, st)| st.kind == S_IFDIR || before.get(p) != Some(st))
        .cloned()
        .collect();
    (wanted, removed)
}

/// Appends the entry `rel` of the volume opened as `root` under `name`: opened without
/// following any symlink, and described by the descriptor that was opened (a regular
/// file's bytes are read from that descriptor, exactly as many as its header says:
/// zeros if it shrank meanwhile, cut if it grew).
fn append_beneath<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    root: &std::fs::File,
    rel: &Path,
    name: &Path,
) -> std::io::Result<()> {
    use std::io::Read;
    let entry = beneath::open_beneath(root, rel, beneath::How::Path)?;
    let meta = entry.metadata()?;
    let mut header = tar::Header::new_gnu();
    if meta.is_file() {
        let file = beneath::open_beneath(root, rel, beneath::How::File)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            // Swapped for something else between the two opens.
            return Err(std::io::Error::from_raw_os_error(libc::ENXIO));
        }
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        let size = meta.len();
        let data = file.chain(std::io::repeat(0)).take(size);
        b.append_data(&mut header, name, data)
    } else if meta.file_type().is_symlink() {
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_size(0);
        let target = beneath::read_link(&entry)?;
        b.append_link(&mut header, name, target)
    } else {
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_size(0);
        b.append_data(&mut header, name, std::io::empty())
    }
}

/// Writes a tar of the volume at `dir` into `tx` in 1 MiB pieces: the root as `top/`,
/// then `paths` (relative, parents first) under it — the layout of the engine's archive
/// endpoint (links kept as links, owners, modes and times kept).
fn tar_entries(
    dir: &Path,
    top: &str,
    paths: &[PathBuf],
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
    let result = (|| {
        let root = beneath::open_root(dir)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&root.metadata()?, tar::HeaderMode::Complete);
        b.append_data(&mut header, top, std::io::empty())?;
        for rel in paths {
            match append_beneath(&mut b, &root, rel, &Path::new(top).join(rel)) {
                Ok(()) => {}
                // Removed, or swapped for a symlink, since the walk: left out (the next
                // delta sees what is there then).
                Err(e) if beneath::changed_under_us(&e) => {}
                Err(e) => return Err(e),
            }
        }
        b.finish()?;
        std::io::Write::flush(b.get_mut())
    })();
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(std::io::Error::other(format!(
            "{}: {e}",
            dir.display()
        ))));
    }
    Ok(())
}

fn saved_container(
    info: &bollard::models::ContainerInspectResponse,
    include_secrets: bool,
) -> SavedContainer {
    let config = info.config.clone().unwrap_or_default();
    let secret_names: Vec<String> = match (include_secrets, &config.labels) {
        (false, Some(labels)) => labels
            .get(crate::labels::SECRET_ENV)
            .map(|v| v.split(',').map(|n| format!("{n}=")).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
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
        env: config
            .env
            .unwrap_or_default()
            .into_iter()
            .filter(|kv| !secret_names.iter().any(|n| kv.starts_with(n.as_str())))
            .collect(),
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
        published: host
            .port_bindings
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, b)| b.as_ref().is_some_and(|b| !b.is_empty()))
            .filter_map(|(k, _)| k.strip_suffix("/tcp")?.parse().ok())
            .collect(),
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
    /// Host address the ports the container published are published on again (this
    /// host's advertise address); `None`: every address.
    pub publish_on: Option<std::net::IpAddr>,
}

/// Why a restore did not happen. Each kind is answered with its own status by the API:
/// the caller learns whether to fix its input, pick another name, or retry later.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The archive was refused as input (it names something outside itself, its parts
    /// disagree with its config, or it lacks an image the engine does not have):
    /// nothing was created.
    #[error("{0}")]
    Refused(String),
    /// Something of the name it would create exists on this engine: nothing was created.
    #[error("{0}")]
    Conflict(String),
    /// The engine or the disk failed on the way; what was created has been removed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
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
) -> Result<Restored, RestoreError> {
    let (name, start, relabel, strip) = (opts.name, opts.start, opts.relabel, opts.strip);
    let mut saved: SavedContainer = serde_json::from_slice(config)
        .map_err(|e| RestoreError::Refused(format!("the archive's container config: {e}")))?;
    // An archive names its own networks only: never the host's or another container's.
    for n in &saved.networks {
        flotilla_core::stack::validate_network_name("networks", n)
            .map_err(|e| RestoreError::Refused(format!("the archive's config: {e}")))?;
    }
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
        return Err(RestoreError::Refused(format!(
            "the archive's volumes {volume_parts:?} do not match its config {saved_mounts:?}"
        )));
    }
    let name = name.unwrap_or(&saved.name).to_owned();
    flotilla_core::validate_node_name("name", &name)
        .map_err(|e| RestoreError::Refused(e.to_string()))?;
    if docker.inspect_container(&name, None).await.is_ok() {
        return Err(RestoreError::Conflict(format!(
            "a container named {name:?} already exists on this engine"
        )));
    }
    let has_image = docker.inspect_image(&saved.image_id).await.is_ok();
    if !has_image
        && !manifest
            .parts
            .iter()
            .any(|p| p.header.kind == PartKind::Image)
    {
        return Err(RestoreError::Refused(format!(
            "the engine lacks image {} and the archive does not carry it",
            saved.image
        )));
    }
    let mut created = Created::default();
    let target = Target {
        name: &name,
        publish_on: opts.publish_on,
    };
    match restore_checked(
        docker,
        path,
        &saved,
        &target,
        has_image,
        start,
        &mut created,
    )
    .await
    {
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

/// The container a restore creates: its name and where its ports are published.
struct Target<'a> {
    name: &'a str,
    publish_on: Option<std::net::IpAddr>,
}

async fn restore_checked(
    docker: &Docker,
    path: &Path,
    saved: &SavedContainer,
    target: &Target<'_>,
    has_image: bool,
    start: bool,
    created: &mut Created,
) -> Result<String, RestoreError> {
    for (i, (vol, mount)) in saved.volumes.iter().enumerate() {
        // Keep the volume's name where it is free (a migration), else derive one.
        let wanted = if docker.inspect_volume(vol).await.is_err() {
            vol.clone()
        } else {
            format!("{}-{i}", target.name)
        };
        if docker.inspect_volume(&wanted).await.is_ok() {
            return Err(RestoreError::Conflict(format!(
                "volume {wanted:?} already exists on this engine"
            )));
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
    let mut parts = PartStream::open(path);
    let mut container: Option<String> = None;
    let mut volume_index = 0usize;
    while let Some(header) = parts.next().await? {
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
                    let id = create_container(docker, saved, target, &created.volumes).await?;
                    created.container = Some(id.clone());
                    container = Some(id);
                }
                let id = container.clone().expect("created");
                let mount = saved.volumes[volume_index].1.clone();
                volume_index += 1;
                let body = body.take().expect("one consumer");
                Box::pin(write_volume(docker, id, mount, body))
            }
        };
        // A part nobody consumes (config, an image the engine has) is read and dropped.
        drop(body);
        parts.pump(data_tx, sink).await?;
    }
    parts.finish().await?;
    let id = match container {
        Some(id) => id,
        None => {
            let id = create_container(docker, saved, target, &created.volumes).await?;
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

/// Fills the volumes of `container` (created from its current spec, not started) from
/// a checked archive: each volume part goes to the volume mounted at its mount point.
/// An archive whose volumes the container does not mount is refused.
pub async fn fill_volumes(docker: &Docker, container: &str, path: &Path) -> anyhow::Result<()> {
    let info = docker
        .inspect_container(container, None)
        .await
        .with_context(|| format!("no container {container:?}"))?;
    let id = info.id.clone().unwrap_or_default();
    let mounts: std::collections::HashSet<String> = info
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.typ == Some(bollard::models::MountPointTypeEnum::VOLUME))
        .filter_map(|m| m.destination)
        .collect();
    let mut parts = PartStream::open(path);
    while let Some(header) = parts.next().await? {
        let (data_tx, data_rx) = mpsc::channel::<Bytes>(8);
        let sink: futures::future::BoxFuture<'_, anyhow::Result<()>> =
            match (header.kind, &header.mount) {
                (PartKind::Volume, Some(m)) if mounts.contains(m) => Box::pin(write_volume(
                    docker,
                    id.clone(),
                    m.clone(),
                    tokio_stream_from(data_rx),
                )),
                (PartKind::Volume, m) => {
                    bail!("the archive holds volume {m:?}, which the replica does not mount")
                }
                _ => {
                    drop(data_rx);
                    Box::pin(async { Ok(()) })
                }
            };
        parts.pump(data_tx, sink).await?;
    }
    parts.finish().await
}

/// Writes a volume part's tar (entries under the mount's last component) into the
/// container through the engine, which replaces what is there; a directory never
/// silently replaces a file or the other way round.
async fn write_volume(
    docker: &Docker,
    container: String,
    mount: String,
    body: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> anyhow::Result<()> {
    let parent = Path::new(&mount)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    docker
        .upload_to_container_streaming(
            &container,
            Some(UploadToContainerOptions {
                path: parent,
                no_overwrite_dir_non_dir: "true".to_owned(),
            }),
            body,
        )
        .await
        .with_context(|| format!("writing volume {mount}"))
}

enum Msg {
    Begin(PartHeader),
    Data(Bytes),
    End,
}

/// The parts of a checked archive file, read on a blocking thread and handed over one
/// at a time: the header, then its data to whatever consumes it.
struct PartStream {
    rx: mpsc::Receiver<Msg>,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl PartStream {
    fn open(path: &Path) -> Self {
        let (tx, rx) = mpsc::channel::<Msg>(16);
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
        PartStream { rx, reader }
    }

    /// The next part's header, `None` after the last.
    async fn next(&mut self) -> anyhow::Result<Option<PartHeader>> {
        match self.rx.recv().await {
            None => Ok(None),
            Some(Msg::Begin(h)) => Ok(Some(h)),
            Some(_) => bail!("archive data outside a part"),
        }
    }

    /// Feeds the current part's data into `data` while `sink` consumes it; both must
    /// finish. A sink that stopped early reports its own error.
    async fn pump(
        &mut self,
        data: mpsc::Sender<Bytes>,
        sink: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let rx = &mut self.rx;
        let feed = async move {
            loop {
                match rx.recv().await {
                    Some(Msg::Data(d)) => {
                        let _ = data.send(d).await;
                    }
                    Some(Msg::End) => break,
                    _ => bail!("archive part ended early"),
                }
            }
            drop(data);
            Ok(())
        };
        let (fed, sunk) = tokio::join!(feed, sink);
        fed?;
        sunk
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.reader.await?
    }
}

/// Applies a checked delta archive (the final pass of a migration) over `container`,
/// a stopped copy made from the pre-copy: per volume, removes the listed paths, then
/// writes what changed. Every removal path is checked before anything is touched.
pub async fn apply_delta(
    docker: &Docker,
    container: &str,
    path: &Path,
    manifest: &Manifest,
) -> Result<(), RestoreError> {
    let info = docker
        .inspect_container(container, None)
        .await
        .map_err(|_| RestoreError::Refused(format!("no container {container:?}")))?;
    let id = info.id.clone().unwrap_or_default();
    let mounts: HashMap<String, String> = info
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| Some((m.destination?, m.name?)))
        .collect();
    // Nothing is written unless every part is a delta for a volume this container has
    // and every path to remove stays inside its volume.
    let volume_dirs = delta_targets(docker, &mounts, manifest)
        .await
        .map_err(|e| RestoreError::Refused(format!("{e:#}")))?;
    write_delta(docker, &id, path, &volume_dirs)
        .await
        .map_err(RestoreError::Failed)
}

/// Where each volume part of a delta goes, checked before anything is written: only
/// deltas, only for volumes `mounts` has, only removals inside them.
async fn delta_targets(
    docker: &Docker,
    mounts: &HashMap<String, String>,
    manifest: &Manifest,
) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut volume_dirs: HashMap<String, PathBuf> = HashMap::new();
    for part in &manifest.parts {
        let h = &part.header;
        match h.kind {
            PartKind::Config => continue,
            PartKind::Image => bail!("a delta carries no image"),
            PartKind::Volume => {}
        }
        let mount = h.mount.as_deref().context("a volume part names no mount")?;
        let removed = h
            .removed
            .as_ref()
            .with_context(|| format!("volume {mount}: a whole volume, not a delta"))?;
        let volume = mounts
            .get(mount)
            .with_context(|| format!("the container has no volume at {mount}"))?;
        check_removals(removed).with_context(|| format!("volume {mount}"))?;
        if !removed.is_empty() {
            let dir = docker
                .inspect_volume(volume)
                .await
                .ok()
                .map(|v| PathBuf::from(v.mountpoint))
                .filter(|p| p.is_dir())
                .with_context(|| {
                    format!("volume {volume}: its mount point is not visible here, so removals cannot be applied")
                })?;
            volume_dirs.insert(mount.to_owned(), dir);
        }
    }
    Ok(volume_dirs)
}

/// Writes a checked delta: per volume, removes the listed paths, then writes the parts.
async fn write_delta(
    docker: &Docker,
    id: &str,
    path: &Path,
    volume_dirs: &HashMap<String, PathBuf>,
) -> anyhow::Result<()> {
    let mut parts = PartStream::open(path);
    while let Some(header) = parts.next().await? {
        let (data_tx, data_rx) = mpsc::channel::<Bytes>(8);
        let sink: futures::future::BoxFuture<'_, anyhow::Result<()>> = match header.kind {
            PartKind::Volume => {
                let mount = header.mount.clone().unwrap_or_default();
                if let Some(dir) = volume_dirs.get(&mount) {
                    let (dir, removed) = (dir.clone(), header.removed.clone().unwrap_or_default());
                    tokio::task::spawn_blocking(move || remove_inside(&dir, &removed))
                        .await?
                        .with_context(|| format!("removing from volume {mount}"))?;
                }
                Box::pin(write_volume(
                    docker,
                    id.to_owned(),
                    mount,
                    tokio_stream_from(data_rx),
                ))
            }
            _ => {
                drop(data_rx);
                Box::pin(async { Ok(()) })
            }
        };
        parts.pump(data_tx, sink).await?;
    }
    parts.finish().await
}

/// Every removal path must name something inside the volume: relative, plain names
/// only (no `..`, no `.`, not absolute, not empty).
fn check_removals(paths: &[String]) -> anyhow::Result<()> {
    for p in paths {
        let plain = Path::new(p)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if p.is_empty() || !plain {
            bail!("removal path {p:?} leaves the volume");
        }
    }
    Ok(())
}

/// Removes `paths` (checked: relative, no `..`) under `dir`, never through a symlink: a
/// parent that is a link is refused, a link itself is removed as a link.
fn remove_inside(dir: &Path, paths: &[String]) -> anyhow::Result<()> {
    for p in paths {
        let rel = Path::new(p);
        let mut at = dir.to_path_buf();
        let mut parts = rel.components().peekable();
        while let Some(c) = parts.next() {
            at.push(c);
            if parts.peek().is_some() {
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.file_type().is_symlink() => {
                        bail!("{p:?}: {} is a symlink", at.display())
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let result = match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&at),
            Ok(_) => std::fs::remove_file(&at),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            // Already gone with a removed parent.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::from(e).context(p.clone())),
        }
    }
    Ok(())
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn create_container(
    docker: &Docker,
    saved: &SavedContainer,
    target: &Target<'_>,
    volumes: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let name = target.name;
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
        // A stack replica keeps the names its service is reached by (its own
        // labels say which service of which stack it is; nothing else is taken).
        let aliases = match (
            saved.labels.get(crate::labels::STACK),
            saved.labels.get(crate::labels::SERVICE),
        ) {
            (Some(stack), Some(service)) => Some(crate::docker::service_aliases(stack, service, n)),
            _ => None,
        };
        endpoints.insert(
            n.clone(),
            EndpointSettings {
                aliases,
                ..Default::default()
            },
        );
    }
    let mut exposed = HashMap::new();
    let mut bindings = HashMap::new();
    for port in &saved.published {
        let (e, b) = crate::docker::published_port(
            *port,
            flotilla_core::stack::Publish::Auto,
            target.publish_on,
        );
        exposed.extend(e.unwrap_or_default());
        bindings.extend(b.unwrap_or_default());
    }
    let config = Config {
        image: Some(saved.image_id.clone()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        env: Some(saved.env.clone()),
        cmd: saved.cmd.clone(),
        entrypoint: saved.entrypoint.clone(),
        user: Some(saved.user.clone()),
        working_dir: Some(saved.workdir.clone()),
        labels: Some(saved.labels.clone().into_iter().collect()),
        host_config: Some(HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(dir: &Path) -> VolumeSnapshot {
        walk_volume(dir).unwrap().into_iter().collect()
    }

    fn names(v: &[(PathBuf, Stamp)]) -> Vec<String> {
        v.iter()
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_delta_carries_what_changed_and_lists_what_went() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/same"), "same").unwrap();
        std::fs::write(root.join("edited"), "v1").unwrap();
        std::fs::write(root.join("gone"), "bye").unwrap();
        std::fs::write(root.join("becomes-dir"), "file").unwrap();
        let before = snapshot(root);
        // Same length, so only the stamps (mtime/ctime) can tell.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(root.join("edited"), "v2").unwrap();
        std::fs::remove_file(root.join("gone")).unwrap();
        std::fs::write(root.join("new"), "hi").unwrap();
        std::fs::remove_file(root.join("becomes-dir")).unwrap();
        std::fs::create_dir(root.join("becomes-dir")).unwrap();
        let now = walk_volume(root).unwrap();
        let (wanted, removed) = changed_since(&before, &now);
        assert_eq!(
            names(&wanted),
            ["becomes-dir", "dir", "edited", "new"],
            "directories always (headers only), changed and new files; not dir/same"
        );
        assert_eq!(removed, ["becomes-dir", "gone"], "gone, and changed kind");
        // Nothing changed: only directory headers, nothing to remove.
        let again = snapshot(root);
        let (wanted, removed) = changed_since(&again, &walk_volume(root).unwrap());
        assert_eq!(names(&wanted), ["becomes-dir", "dir"]);
        assert!(removed.is_empty());
    }

    /// The tar `tar_entries` writes for `paths` of the volume at `dir`.
    fn tar_of(dir: &Path, paths: &[PathBuf]) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(64);
        let dir = dir.to_owned();
        let paths = paths.to_vec();
        let t = std::thread::spawn(move || tar_entries(&dir, "data", &paths, tx).unwrap());
        let mut out = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            out.extend(chunk.unwrap());
        }
        t.join().unwrap();
        out
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_walk_leaks_nothing_outside() {
        let d = tempfile::tempdir().unwrap();
        let (vol, outside) = (d.path().join("v"), d.path().join("host"));
        std::fs::create_dir_all(vol.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(vol.join("d/secret"), "inside").unwrap();
        std::fs::write(outside.join("secret"), "HOST-SECRET").unwrap();
        std::fs::write(vol.join("plain"), "plain").unwrap();
        let walked: Vec<PathBuf> = walk_volume(&vol)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert!(walked.contains(&PathBuf::from("d/secret")));
        // The container swaps d for a link to the host's directory before the read.
        std::fs::rename(vol.join("d"), vol.join("d.old")).unwrap();
        std::os::unix::fs::symlink(&outside, vol.join("d")).unwrap();
        let tar = tar_of(&vol, &walked);
        let text = String::from_utf8_lossy(&tar);
        assert!(!text.contains("HOST-SECRET"), "host file archived");
        assert!(text.contains("plain"));
        // And a walk now lists the link as a link, without entering it.
        let again = walk_volume(&vol).unwrap();
        assert!(
            again
                .iter()
                .all(|(p, _)| !p.starts_with("d") || p == Path::new("d")),
            "{again:?}"
        );
        let mut a = tar::Archive::new(&tar[..]);
        let kinds: Vec<(String, tar::EntryType)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert!(
            kinds
                .iter()
                .any(|(p, k)| p == "data/plain" && *k == tar::EntryType::Regular),
            "{kinds:?}"
        );
    }

    #[test]
    fn removals_stay_inside_the_volume() {
        for bad in ["", "../etc/passwd", "/etc/passwd", "a/../../b", "./a"] {
            assert!(
                check_removals(&[bad.to_owned()]).is_err(),
                "{bad:?} accepted"
            );
        }
        check_removals(&["a".into(), "a/b c/d".into()]).unwrap();

        let d = tempfile::tempdir().unwrap();
        let (volume, outside) = (d.path().join("v"), d.path().join("outside"));
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep").unwrap();
        std::fs::write(volume.join("sub/x"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, volume.join("link")).unwrap();
        // Through a symlinked parent: refused, the target untouched.
        assert!(remove_inside(&volume, &["link/precious".into()]).is_err());
        assert!(outside.join("precious").exists());
        // The link itself goes as a link; a directory goes with its contents; a path
        // already gone is fine.
        remove_inside(
            &volume,
            &["link".into(), "sub".into(), "sub/x".into(), "never".into()],
        )
        .unwrap();
        assert!(outside.join("precious").exists());
        assert!(!volume.join("link").exists() && !volume.join("sub").exists());
    }
}
