//! Standardized images from a stack spec, built without a Dockerfile or a registry.
//!
//! The layers are written by [`flotilla_archive::image`] (sorted, owner root, mtime 0),
//! so the same spec and files give the same layer digests on every host, and with the
//! same build time the same image id. Every image carries the standard labels —
//! service, port, health check (as `flotilla.check.*`, so even a plain `docker run` of
//! it self-registers), version, spec hash and build time — and, when the image has a
//! busybox to run it with, the matching Docker `HEALTHCHECK`.
//!
//! A build holds no image in memory: layers are written to files in a scratch
//! directory that lives as long as the [`Built`] image, and the `docker load` archive is
//! read out of them as it is sent ([`archive_stream`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bollard::image::ImportImageOptions;
use bollard::Docker;
use flotilla_archive::image::{self, Archive, Base, ImageConfig, Layer, Node};
use flotilla_core::stack::ServiceSpec;
use flotilla_core::CheckKind;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::labels;

/// A built image, ready to `docker load`.
pub struct Built {
    /// `flotilla/STACK-SERVICE:HASH12`.
    pub tag: String,
    /// Image id Docker will report.
    pub id: String,
    /// Hash of everything the image was built from (not the build time).
    pub spec_hash: String,
    /// Layer digests.
    pub diff_ids: Vec<String>,
    /// The `docker load` archive; its layers are files in `scratch` (or the spec's
    /// rootfs tar).
    pub archive: Archive,
    /// The layers written for this build: removed when the image is dropped.
    _scratch: tempfile::TempDir,
}

/// Labels a container of `service` carries so the agent registers it; they go into
/// the image, so every container of it has them.
pub fn service_labels(service: &str, spec: &ServiceSpec) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(labels::SERVICE.to_owned(), service.to_owned());
    l.insert(labels::PORT.to_owned(), spec.port.to_string());
    if let Some(w) = spec.weight {
        l.insert(labels::WEIGHT.to_owned(), w.to_string());
    }
    match &spec.health {
        None => {
            l.insert(labels::CHECK_TCP.into(), "true".into());
        }
        Some(h) => {
            let (k, v) = match &h.kind {
                CheckKind::Http { path, .. } => ("http", path.clone()),
                CheckKind::Tcp { port } => ("tcp", port.map_or("true".into(), |p| p.to_string())),
                CheckKind::Ttl { ttl } => ("ttl", humantime::format_duration(*ttl).to_string()),
                // The label is a shell command (the agent runs it with `sh -c`): each
                // argument quoted, or `sh -c "a b"` would come back as three words.
                CheckKind::Exec { command } => (
                    "exec",
                    shlex::try_join(command.iter().map(String::as_str))
                        .unwrap_or_else(|_| command.join(" ")),
                ),
                // Refused in stack specs (flotilla builds the HEALTHCHECK itself).
                CheckKind::Docker => ("docker", "true".into()),
            };
            l.insert(format!("{}{k}", labels::CHECK), v);
            l.insert(
                labels::CHECK_INTERVAL.into(),
                humantime::format_duration(h.interval).to_string(),
            );
            if let Some(t) = h.timeout {
                l.insert(
                    labels::CHECK_TIMEOUT.into(),
                    humantime::format_duration(t).to_string(),
                );
            }
            l.insert(labels::CHECK_RISE.into(), h.rise.to_string());
            l.insert(labels::CHECK_FALL.into(), h.fall.to_string());
        }
    }
    l.insert(labels::VERSION.to_owned(), spec.version.clone());
    l
}

/// Builds the image of `service` of `stack`. Files are read relative to `spec_dir`;
/// `created` is the build time (unix seconds); `docker` is needed only for an
/// `image:NAME` base.
pub async fn build_service(
    docker: Option<&Docker>,
    stack: &str,
    service: &str,
    spec: &ServiceSpec,
    spec_dir: &Path,
    created: u64,
) -> anyhow::Result<Built> {
    let Some(image_spec) = spec.image.built() else {
        bail!("service.{service}.image: a registry image is pulled by the agents, not built");
    };
    let mut hash = Sha256::new();
    hash.update(serde_json::to_vec(spec)?);
    let field = |i: usize| format!("service.{service}.image.file[{i}].src");
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-build-")
        .tempdir()
        .context("making a scratch directory for the image's layers")?;
    let mut nodes = Vec::new();
    for (i, f) in image_spec.files.iter().enumerate() {
        let path = spec_dir.join(&f.src);
        let digest = blocking({
            let path = path.clone();
            move || file_digest(&path)
        })
        .await
        .with_context(|| format!("{}: cannot read {}", field(i), path.display()))?;
        hash.update(digest);
        nodes.push(Node::HostFile {
            path: f.dest.clone(),
            src: path,
            mode: f.mode_bits(),
        });
    }
    let base_name = image_spec.base.as_str();
    let at = |name: &str| scratch.path().join(name);
    let (base, has_busybox) = match base_name {
        "scratch" => (Base::default(), false),
        "busybox" => {
            let layer = blocking({
                let to = at("busybox.tar");
                move || busybox_layer(&to)
            })
            .await?;
            hash.update(layer.digest);
            (
                Base {
                    layers: vec![layer],
                    config: serde_json::json!({"Env": ["PATH=/bin"]}),
                },
                true,
            )
        }
        "flotilla" => {
            let (busybox, own) = blocking({
                let (b, o) = (at("busybox.tar"), at("flotilla.tar"));
                move || Ok((busybox_layer(&b)?, flotilla_layer(&o)?))
            })
            .await?;
            hash.update(busybox.digest);
            hash.update(own.digest);
            (
                Base {
                    layers: vec![busybox, own],
                    config: serde_json::json!({
                        "Env": ["PATH=/usr/local/bin:/bin"],
                        "Entrypoint": ["/usr/local/bin/flotilla"],
                    }),
                },
                true,
            )
        }
        other if other.starts_with("rootfs:") => {
            let rel = &other["rootfs:".len()..];
            let path = spec_dir.join(rel);
            // The rootfs tar is the layer as it is: hashed, never copied.
            let (base, busybox) = blocking({
                let path = path.clone();
                move || {
                    let base = Base {
                        layers: vec![Layer::of_file(&path)?],
                        config: serde_json::Value::Null,
                    };
                    let busybox = base.has("bin/busybox");
                    Ok((base, busybox))
                }
            })
            .await
            .with_context(|| {
                format!(
                    "service.{service}.image.base: cannot read {}",
                    path.display()
                )
            })?;
            hash.update(base.layers[0].digest);
            (base, busybox)
        }
        other => {
            let name = other.trim_start_matches("image:");
            let docker = docker.context("an image: base needs the Docker Engine")?;
            let info = docker.inspect_image(name).await.with_context(|| {
                format!("service.{service}.image.base: no local image {name:?}")
            })?;
            hash.update(info.id.unwrap_or_default().as_bytes());
            // `docker save` to a file; its layers are used as ranges of it.
            let saved = at("base.tar");
            let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&saved).await?);
            let mut s = docker.export_image(name);
            while let Some(chunk) = s.next().await {
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk?).await?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            blocking(move || {
                let base = image::base_from_saved(&saved).map_err(|e| anyhow::anyhow!("{e}"))?;
                let busybox = base.has("bin/busybox");
                Ok((base, busybox))
            })
            .await
            .with_context(|| format!("reading base image {name}"))?
        }
    };
    let spec_hash = hex::encode(hash.finalize());
    let tag = format!("flotilla/{stack}-{service}:{}", &spec_hash[..12]);
    let mut labels = service_labels(service, spec);
    labels.insert(crate::labels::STACK.into(), stack.into());
    labels.insert(crate::labels::SPEC_HASH.into(), spec_hash.clone());
    labels.insert(crate::labels::BUILD_TIME.into(), image::rfc3339(created));
    let healthcheck = match (&spec.health, has_busybox) {
        (Some(h), true) => {
            let test = match &h.kind {
                // Through the busybox binary itself: an image may carry busybox without
                // its applet links.
                CheckKind::Http { path, port } => Some(vec![
                    "CMD".into(),
                    "/bin/busybox".into(),
                    "wget".into(),
                    "-q".into(),
                    "-O".into(),
                    "/dev/null".into(),
                    format!("http://127.0.0.1:{}{path}", port.unwrap_or(spec.port)),
                ]),
                CheckKind::Exec { command } => Some(
                    std::iter::once("CMD".to_owned())
                        .chain(command.clone())
                        .collect(),
                ),
                _ => None,
            };
            test.map(|t| {
                (
                    t,
                    h.interval.as_nanos() as u64,
                    h.effective_timeout().as_nanos() as u64,
                    h.fall,
                )
            })
        }
        _ => None,
    };
    let config = ImageConfig {
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.command.clone(),
        env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        user: spec.user.clone().unwrap_or_default(),
        workdir: spec.workdir.clone().unwrap_or_default(),
        labels,
        ports: vec![spec.port],
        healthcheck,
        created,
    };
    let layers = if nodes.is_empty() {
        vec![]
    } else {
        let to = at("files.tar");
        vec![
            blocking(move || Ok(Layer::write(&to, |w| image::write_layer(&nodes, w))?))
                .await
                .with_context(|| format!("service.{service}.image.file"))?,
        ]
    };
    if base.layers.is_empty() && layers.is_empty() {
        bail!("service.{service}: the image would be empty");
    }
    let a = image::docker_archive(&base, &layers, &config, &tag);
    Ok(Built {
        tag,
        id: a.id.clone(),
        spec_hash,
        diff_ids: a.diff_ids.clone(),
        archive: a,
        _scratch: scratch,
    })
}

/// Runs blocking file work (hashing, writing layers) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a build step panicked")?
}

/// SHA-256 of a file, read in pieces.
fn file_digest(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = image::Hashing::new(std::io::sink());
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(h.finish().1)
}

/// An archive's bytes as a stream of 256 KiB chunks, read from its files on a blocking
/// thread a few chunks ahead of the consumer (so at most ~1 MiB of it is in memory).
/// A read error ends the stream with that error.
pub fn archive_stream(
    archive: &Archive,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    const CHUNK: usize = 256 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let mut r = archive.reader();
    tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        let sent = loop {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break None,
                Ok(n) => {
                    filled += n;
                    if filled == CHUNK {
                        break None;
                    }
                }
                Err(e) => break Some(e),
            }
        };
        let done = filled < CHUNK;
        buf.truncate(filled);
        if filled > 0 && tx.blocking_send(Ok(buf.into())).is_err() {
            return;
        }
        if let Some(e) = sent {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        if done {
            return;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// Loads an image archive into the engine (`docker load`), streamed from its files.
pub async fn load(docker: &Docker, archive: &Archive) -> anyhow::Result<()> {
    let body = archive_stream(archive).filter_map(|c| async move {
        // bollard's body takes bytes only: a read error ends the upload short, and the
        // engine refuses the truncated archive; the error is logged here.
        c.map_err(|e| tracing::error!(error = %e, "reading the image archive"))
            .ok()
    });
    let mut s = docker.import_image_stream(ImportImageOptions { quiet: true }, body, None);
    while let Some(item) = s.next().await {
        let info = item.context("docker load")?;
        if let Some(e) = info.error {
            bail!("docker load: {e}");
        }
    }
    Ok(())
}

/// The busybox base layer: the host's static busybox, a link per applet, `/tmp`, and
/// minimal `/etc/passwd` and `/etc/group` so `user = "nobody"` works; written to `to`.
pub fn busybox_layer(to: &Path) -> anyhow::Result<Layer> {
    let path = Path::new("/bin/busybox");
    std::fs::metadata(path)
        .context("reading /bin/busybox for a busybox base (install busybox-static)")?;
    let out = std::process::Command::new(path)
        .arg("--list")
        .output()
        .context("running /bin/busybox --list")?;
    let mut nodes = vec![
        Node::HostFile {
            path: "/bin/busybox".into(),
            src: path.into(),
            mode: 0o755,
        },
        Node::Dir {
            path: "/tmp".into(),
            mode: 0o1777,
        },
        Node::File {
            path: "/etc/passwd".into(),
            data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
            mode: 0o644,
        },
        Node::File {
            path: "/etc/group".into(),
            data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
            mode: 0o644,
        },
    ];
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            nodes.push(Node::Symlink {
                path: format!("/bin/{applet}"),
                target: "busybox".into(),
            });
        }
    }
    write_layer(to, &nodes)
}

/// Writes `nodes` as a layer file at `to`.
fn write_layer(to: &Path, nodes: &[Node]) -> anyhow::Result<Layer> {
    Layer::write(to, |w| image::write_layer(nodes, w))
        .with_context(|| format!("writing the layer {}", to.display()))
}

/// The `flotilla` base's own layer: the running flotilla binary as
/// `/usr/local/bin/flotilla`, and at their host paths its ELF interpreter and every
/// shared object it has mapped (`/proc/self/maps`: exactly what it runs with, no
/// `ldd` guesswork). The dynamic loader finds them in its default directories, so the
/// image needs no `ld.so.cache`. Written to `to`.
pub fn flotilla_layer(to: &Path) -> anyhow::Result<Layer> {
    let exe = std::env::current_exe().context("locating the flotilla binary")?;
    // The ELF and program headers and the interpreter's path are at the start of the
    // file: its first MiB is read, not all of it.
    let mut head = Vec::new();
    std::fs::File::open(&exe)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut head))
        .with_context(|| format!("reading {}", exe.display()))?;
    let mut libraries = std::collections::BTreeSet::new();
    if let Some(interpreter) = elf_interpreter(&head) {
        libraries.insert(interpreter);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    for line in maps.lines() {
        if let Some(path) = line.split_whitespace().nth(5) {
            if path.starts_with('/') && path.contains(".so") {
                libraries.insert(path.to_owned());
            }
        }
    }
    let mut nodes = vec![Node::HostFile {
        path: "/usr/local/bin/flotilla".into(),
        src: exe,
        mode: 0o755,
    }];
    for path in libraries {
        nodes.push(Node::HostFile {
            src: PathBuf::from(&path),
            path,
            mode: 0o755,
        });
    }
    write_layer(to, &nodes)
}

/// The `PT_INTERP` path of a 64-bit little-endian ELF executable, if it has one.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    (0..phnum as usize).find_map(|k| {
        let ph = phoff.checked_add(k.checked_mul(phentsize as usize)?)?;
        let kind = u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?);
        if kind != PT_INTERP {
            return None;
        }
        let (offset, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 0x20)? as usize);
        let raw = elf.get(offset..offset.checked_add(size)?)?;
        Some(String::from_utf8_lossy(raw.strip_suffix(&[0]).unwrap_or(raw)).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interpreter_is_read_from_a_real_binary_and_garbage_is_none() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interpreter = elf_interpreter(&exe).expect("a dynamically linked test binary");
        assert!(
            interpreter.starts_with('/') && interpreter.contains("ld-"),
            "{interpreter}"
        );
        assert!(Path::new(&interpreter).exists(), "{interpreter}");
        assert_eq!(elf_interpreter(b"\x7fELF\x02\x01"), None, "truncated");
        assert_eq!(elf_interpreter(&exe[..0x40]), None, "headers cut off");
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None, "not ELF");
    }

    #[test]
    fn an_exec_check_label_keeps_its_arguments_apart() {
        let mut spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"port": 80, "image": "reg:5000/app:1"}))
                .unwrap();
        let argv = [
            "/bin/sh",
            "-c",
            "wget -q -O- http://127.0.0.1/ | grep -q ok",
        ];
        spec.health = Some(flotilla_core::CheckSpec::new(CheckKind::Exec {
            command: argv.map(String::from).to_vec(),
        }));
        let labels = service_labels("web", &spec);
        let label = &labels["flotilla.check.exec"];
        // The agent runs the label with `sh -c`: a shell splits it back into argv.
        assert_eq!(shlex::split(label).unwrap(), argv);
        assert_eq!(
            label,
            "/bin/sh -c 'wget -q -O- http://127.0.0.1/ | grep -q ok'"
        );
    }
}
