//! Reproducible Docker image archives (the `docker save` / `docker load` format).
//!
//! flotilla builds images without a Dockerfile and without a registry: it writes the
//! layer tars itself — entries sorted, owner root, mtime zero — and the image config
//! JSON, so the same inputs give the same layer digests and, with the same build time,
//! the same image id on every host. A host that lacks an image can then be handed the
//! archive and `docker load` it.
//!
//! Nothing here holds an image whole in memory: layers are written to files (hashed on
//! the way), a base image's layers stay byte ranges of its `docker save` file, and the
//! `docker load` archive is a list of parts — small headers and JSON in memory, layers
//! as file ranges — read out in order by [`Archive::reader`]. Files put into a layer
//! from the host ([`Node::HostFile`]) are read while the layer is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One filesystem entry of a layer, at an absolute path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with a mode.
    Dir {
        /// Absolute path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Absolute path.
        path: String,
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file whose contents are a host file's, read when the layer is written
    /// (not before: a large file is never held in memory).
    HostFile {
        /// Absolute path in the image.
        path: String,
        /// The host file.
        src: PathBuf,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Absolute path.
        path: String,
        /// Link target as written.
        target: String,
    },
}

impl Node {
    fn path(&self) -> &str {
        match self {
            Node::Dir { path, .. }
            | Node::File { path, .. }
            | Node::HostFile { path, .. }
            | Node::Symlink { path, .. } => path,
        }
    }
}

/// Writes a layer tar: parents created as needed (mode 0755), entries in path order,
/// owner 0:0, mtime 0. Later nodes for the same path replace earlier ones.
pub fn layer(nodes: &[Node]) -> Vec<u8> {
    write_layer(nodes, Vec::new()).expect("only a host file can fail, and none was read")
}

/// [`layer`] written to `out`. A [`Node::HostFile`] that cannot be read, or whose size
/// changes while it is read, is an error naming it.
pub fn write_layer<W: Write>(nodes: &[Node], out: W) -> io::Result<W> {
    let mut by_path: BTreeMap<String, &Node> = BTreeMap::new();
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    for n in nodes {
        let rel = n
            .path()
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_owned();
        let mut acc = String::new();
        let comps: Vec<&str> = rel.split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            dirs.entry(acc.clone()).or_insert(0o755);
        }
        if let Node::Dir { mode, .. } = n {
            dirs.insert(rel.clone(), *mode);
        }
        by_path.insert(rel, n);
    }
    let mut b = tar::Builder::new(out);
    let mut all: BTreeMap<String, Option<&Node>> = BTreeMap::new();
    for d in dirs.keys() {
        all.insert(d.clone(), None);
    }
    for (p, n) in &by_path {
        all.insert(p.clone(), Some(n));
    }
    for (path, node) in all {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match node {
            None | Some(Node::Dir { .. }) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(dirs[&path]);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), io::empty())?;
            }
            Some(Node::File { data, mode, .. }) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &path, &data[..])?;
            }
            Some(Node::HostFile { src, mode, .. }) => {
                let named =
                    |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", src.display()));
                let f = File::open(src).map_err(named)?;
                let len = f.metadata().map_err(named)?.len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(len);
                b.append_data(&mut h, &path, Exact::whole(f, len, src))?;
            }
            Some(Node::Symlink { target, .. }) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, &path, target)?;
            }
        }
    }
    b.into_inner()
}

/// Reads exactly `left` bytes of a file from where it stands, and fails if the file
/// ends first or — when `whole` — goes on after them: a tar entry's size is written
/// before its data, so a file that changes size while it is copied would otherwise make
/// a corrupt layer.
struct Exact {
    file: File,
    left: u64,
    path: PathBuf,
    whole: bool,
}

impl Exact {
    /// A whole file of `len` bytes: more or fewer is an error.
    fn whole(file: File, len: u64, path: &Path) -> Self {
        Self::new(file, len, path, true)
    }

    /// `len` bytes from where `file` stands (a range of it): fewer is an error.
    fn range(file: File, len: u64, path: &Path) -> Self {
        Self::new(file, len, path, false)
    }

    fn new(file: File, len: u64, path: &Path, whole: bool) -> Self {
        Exact {
            file,
            left: len,
            path: path.to_owned(),
            whole,
        }
    }

    fn changed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{}: changed size while it was read", self.path.display()),
        )
    }
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            if !self.whole {
                return Ok(0);
            }
            // At the end: the file must be too.
            let mut probe = [0u8; 1];
            return match self.file.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(self.changed()),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(self.changed());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A byte range of a file: where a layer's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    /// The file.
    pub path: PathBuf,
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl FileRange {
    /// A reader of exactly this range (an error if the file has become shorter).
    pub fn open(&self) -> io::Result<impl Read> {
        let mut f = File::open(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        f.seek(SeekFrom::Start(self.offset))?;
        Ok(Exact::range(f, self.len, &self.path))
    }
}

/// A layer tar on disk and its digest (the image's diff id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Where its bytes are.
    pub range: FileRange,
    /// SHA-256 of those bytes.
    pub digest: [u8; 32],
}

impl Layer {
    /// Writes a layer to the new file `path` through `write` (for example
    /// `|w| write_layer(&nodes, w)`), hashing it on the way.
    pub fn write(
        path: &Path,
        write: impl FnOnce(Hashing<io::BufWriter<File>>) -> io::Result<Hashing<io::BufWriter<File>>>,
    ) -> io::Result<Layer> {
        let f = File::create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let h = write(Hashing::new(io::BufWriter::new(f)))?;
        let (w, digest, len) = h.finish();
        w.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
        Ok(Layer {
            range: FileRange {
                path: path.to_owned(),
                offset: 0,
                len,
            },
            digest,
        })
    }

    /// A whole file that already is a layer tar (a rootfs), hashed in one read.
    pub fn of_file(path: &Path) -> io::Result<Layer> {
        let range = FileRange {
            path: path.to_owned(),
            offset: 0,
            len: std::fs::metadata(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
                .len(),
        };
        Layer::of_range(range)
    }

    /// A range of a file that is a layer tar, hashed in one read.
    pub fn of_range(range: FileRange) -> io::Result<Layer> {
        let mut h = Hashing::new(io::sink());
        io::copy(&mut range.open()?, &mut h)?;
        let (_, digest, _) = h.finish();
        Ok(Layer { range, digest })
    }

    /// `sha256:<hex>`.
    pub fn diff_id(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }

    /// Whether the layer holds an entry at `want` (relative, as `bin/busybox`).
    pub fn has(&self, want: &str) -> bool {
        let Ok(r) = self.range.open() else {
            return false;
        };
        let mut a = tar::Archive::new(r);
        let Ok(entries) = a.entries() else {
            return false;
        };
        entries.flatten().any(|e| {
            e.path()
                .map(|p| p.to_string_lossy().trim_start_matches("./") == want)
                .unwrap_or(false)
        })
    }
}

/// A writer that hashes and counts what goes through it.
pub struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the SHA-256 of everything written, and its length.
    pub fn finish(self) -> (W, [u8; 32], u64) {
        (self.inner, self.hash.finalize().into(), self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a built image runs, and its metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// User (name or uid[:gid]).
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Exposed TCP ports.
    pub ports: Vec<u16>,
    /// Docker health check: test (`["CMD", ...]` or `["CMD-SHELL", cmd]`), interval,
    /// timeout (nanoseconds), retries.
    pub healthcheck: Option<(Vec<String>, u64, u64, u32)>,
    /// Build time, unix seconds (the image's `created`).
    pub created: u64,
}

/// A base image's layers and config.
#[derive(Debug, Clone, Default)]
pub struct Base {
    /// Layer tars, bottom first.
    pub layers: Vec<Layer>,
    /// The base's `config` object (Env, Cmd, ...), inherited where the spec is silent.
    pub config: Value,
}

impl Base {
    /// Whether any layer holds an entry at `want` (reads the layers: call it off the
    /// async threads).
    pub fn has(&self, want: &str) -> bool {
        self.layers.iter().any(|l| l.has(want))
    }
}

/// Reads the first image of a `docker save` archive in the file `saved`: its config,
/// and its layers as byte ranges of that file (hashed, not copied).
pub fn base_from_saved(saved: &Path) -> Result<Base, String> {
    let name = saved.display();
    let f = File::open(saved).map_err(|e| format!("{name}: {e}"))?;
    let mut ranges: BTreeMap<String, FileRange> = BTreeMap::new();
    let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut a = tar::Archive::new(io::BufReader::new(f));
    for e in a.entries().map_err(|e| format!("{name}: {e}"))? {
        let mut e = e.map_err(|e| format!("{name}: {e}"))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let p = e
            .path()
            .map_err(|e| format!("{name}: {e}"))?
            .to_string_lossy()
            .into_owned();
        // JSON (the manifest, configs) is read; anything else may be a layer.
        if p.ends_with(".json") || !p.contains('/') {
            let mut v = Vec::new();
            e.read_to_end(&mut v)
                .map_err(|e| format!("{name}: {p}: {e}"))?;
            small.insert(p, v);
        } else {
            ranges.insert(
                p,
                FileRange {
                    path: saved.to_owned(),
                    offset: e.raw_file_position(),
                    len: e.size(),
                },
            );
        }
    }
    let read_json = |file: &str| -> Result<Value, String> {
        let bytes = small
            .get(file)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("{name}: {file} missing"))?;
        serde_json::from_slice(bytes).map_err(|e| format!("{name}: {file}: {e}"))
    };
    let manifest = read_json("manifest.json")?;
    let first = &manifest[0];
    let config_name = first["Config"].as_str().ok_or("manifest without Config")?;
    let config = match small.get(config_name) {
        Some(_) => read_json(config_name)?,
        // An OCI-layout save keeps configs as blobs without a `.json` name.
        None => {
            let r = ranges
                .get(config_name)
                .ok_or_else(|| format!("{name}: config {config_name} missing"))?;
            let mut v = Vec::new();
            r.open()
                .and_then(|mut r| r.read_to_end(&mut v))
                .map_err(|e| format!("{name}: {config_name}: {e}"))?;
            serde_json::from_slice(&v).map_err(|e| format!("{name}: {config_name}: {e}"))?
        }
    };
    let mut layers = Vec::new();
    for l in first["Layers"]
        .as_array()
        .ok_or("manifest without Layers")?
    {
        let layer = l.as_str().ok_or("bad layer name")?;
        let range = ranges
            .get(layer)
            .cloned()
            .ok_or_else(|| format!("{name}: layer {layer} missing"))?;
        layers.push(Layer::of_range(range).map_err(|e| format!("{name}: {layer}: {e}"))?);
    }
    Ok(Base {
        layers,
        config: config["config"].clone(),
    })
}

/// One piece of an [`Archive`]: bytes in memory or a range of a file.
#[derive(Debug, Clone)]
enum Part {
    Memory(Vec<u8>),
    File(FileRange),
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Memory(v) => v.len() as u64,
            Part::File(r) => r.len,
        }
    }
}

/// A `docker load` archive and the id Docker will give the image. Its bytes are read
/// out by [`Archive::reader`]; the layers stay in their files until then.
#[derive(Debug, Clone)]
pub struct Archive {
    /// `sha256:<hex>` of the config: the image id.
    pub id: String,
    /// `sha256:<hex>` of each layer tar, bottom first.
    pub diff_ids: Vec<String>,
    parts: Vec<Part>,
}

impl Archive {
    /// The archive's size in bytes.
    pub fn len(&self) -> u64 {
        self.parts.iter().map(Part::len).sum()
    }

    /// Whether the archive has no bytes (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the archive's bytes, opening each layer's file when it gets there;
    /// owns what it needs, so it can move to another thread.
    pub fn reader(&self) -> ArchiveReader {
        ArchiveReader {
            parts: self.parts.clone().into_iter(),
            current: None,
        }
    }
}

/// [`Archive::reader`].
pub struct ArchiveReader {
    parts: std::vec::IntoIter<Part>,
    current: Option<Box<dyn Read + Send>>,
}

impl Read for ArchiveReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(r) = &mut self.current {
                let n = r.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
            }
            self.current = match self.parts.next() {
                None => return Ok(0),
                Some(Part::Memory(v)) => Some(Box::new(io::Cursor::new(v))),
                Some(Part::File(r)) => Some(Box::new(r.open()?)),
            };
        }
    }
}

/// A regular-file tar header for `name` of `size` bytes (owner 0, mode 0644, mtime 0).
fn entry_header(name: &str, size: u64) -> io::Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path(name)?;
    h.set_cksum();
    Ok(h.as_bytes().to_vec())
}

/// Zeros to the next 512-byte block after `len` bytes of an entry.
fn padding(len: u64) -> Vec<u8> {
    vec![0; ((512 - len % 512) % 512) as usize]
}

/// Assembles a loadable image archive tagged `tag` from `base` plus `layers`: headers
/// and JSON in memory, the layers as ranges of their files.
pub fn docker_archive(base: &Base, layers: &[Layer], config: &ImageConfig, tag: &str) -> Archive {
    let all: Vec<&Layer> = base.layers.iter().chain(layers).collect();
    let digests: Vec<String> = all.iter().map(|l| hex::encode(l.digest)).collect();
    let inherit = |key: &str| base.config.get(key).cloned().unwrap_or(Value::Null);
    let or_inherit = |v: &Vec<String>, key: &str| {
        if v.is_empty() {
            inherit(key)
        } else {
            json!(v)
        }
    };
    let mut env: Vec<String> = inherit("Env")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for e in &config.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let mut c = json!({
        "Entrypoint": or_inherit(&config.entrypoint, "Entrypoint"),
        "Cmd": or_inherit(&config.cmd, "Cmd"),
        "Env": env,
        "User": config.user,
        "WorkingDir": if config.workdir.is_empty() { inherit("WorkingDir") } else { json!(config.workdir) },
        "Labels": config.labels,
    });
    if !config.ports.is_empty() {
        let ports: BTreeMap<String, Value> = config
            .ports
            .iter()
            .map(|p| (format!("{p}/tcp"), json!({})))
            .collect();
        c["ExposedPorts"] = json!(ports);
    }
    if let Some((test, interval, timeout, retries)) = &config.healthcheck {
        c["Healthcheck"] = json!({"Test": test, "Interval": interval, "Timeout": timeout, "Retries": retries, "StartPeriod": 0});
    }
    let image = json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "created": rfc3339(config.created),
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": digests.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()},
        "history": all.iter().map(|_| json!({"created": rfc3339(config.created), "created_by": "flotilla build"})).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&image).expect("serialisable");
    let id = hex::encode(Sha256::digest(&config_bytes));
    let manifest = json!([{
        "Config": format!("{id}.json"),
        "RepoTags": [tag],
        "Layers": digests.iter().map(|d| format!("{d}/layer.tar")).collect::<Vec<_>>(),
    }]);
    // Names are at most 75 bytes (a 64-digit hex digest and `/layer.tar`): they fit a
    // plain header, so no long-name entries are needed.
    let header = |name: &str, len: u64| entry_header(name, len).expect("a short name");
    let mut parts = Vec::new();
    for (d, l) in digests.iter().zip(&all) {
        parts.push(Part::Memory(header(&format!("{d}/layer.tar"), l.range.len)));
        parts.push(Part::File(l.range.clone()));
        parts.push(Part::Memory(padding(l.range.len)));
    }
    let mut tail = Vec::new();
    for (name, data) in [
        (format!("{id}.json"), config_bytes),
        (
            "manifest.json".to_owned(),
            serde_json::to_vec(&manifest).expect("serialisable"),
        ),
    ] {
        let len = data.len() as u64;
        tail.extend(header(&name, len));
        tail.extend(data);
        tail.extend(padding(len));
    }
    // The end of a tar: two zero blocks.
    tail.extend([0u8; 1024]);
    parts.push(Part::Memory(tail));
    Archive {
        id: format!("sha256:{id}"),
        diff_ids: digests.into_iter().map(|d| format!("sha256:{d}")).collect(),
        parts,
    }
}

/// Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm, public domain arithmetic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Node> {
        vec![
            Node::File {
                path: "/www/index.html".into(),
                data: b"hi".to_vec(),
                mode: 0o644,
            },
            Node::Symlink {
                path: "/bin/sh".into(),
                target: "busybox".into(),
            },
            Node::Dir {
                path: "/tmp".into(),
                mode: 0o1777,
            },
        ]
    }

    /// `bytes` as a layer file in `dir`.
    fn on_disk(dir: &Path, name: &str, bytes: &[u8]) -> Layer {
        Layer::write(&dir.join(name), |mut w| {
            w.write_all(bytes)?;
            Ok(w)
        })
        .unwrap()
    }

    fn bytes_of(a: &Archive) -> Vec<u8> {
        let mut v = Vec::new();
        a.reader().read_to_end(&mut v).unwrap();
        assert_eq!(v.len() as u64, a.len());
        v
    }

    #[test]
    fn layers_are_reproducible_whatever_the_input_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut rev = nodes();
        rev.reverse();
        assert_eq!(layer(&nodes()), layer(&rev));
        let l = on_disk(dir.path(), "a", &layer(&nodes()));
        let r = on_disk(dir.path(), "b", &layer(&rev));
        assert_eq!(l.digest, r.digest);
        let a = docker_archive(
            &Base::default(),
            std::slice::from_ref(&l),
            &ImageConfig::default(),
            "t:1",
        );
        let b = docker_archive(&Base::default(), &[r], &ImageConfig::default(), "t:1");
        assert_eq!(a.id, b.id);
        assert_eq!(bytes_of(&a), bytes_of(&b));
        let later = ImageConfig {
            created: 1,
            ..Default::default()
        };
        let c = docker_archive(&Base::default(), &[l], &later, "t:1");
        assert_ne!(a.id, c.id);
        assert_eq!(a.diff_ids, c.diff_ids);
    }

    #[test]
    fn the_archive_read_from_its_parts_is_the_tar_a_tar_writer_makes() {
        let dir = tempfile::tempdir().unwrap();
        // Sizes on and off a 512-byte block.
        let layers = [
            on_disk(dir.path(), "one", &layer(&nodes())),
            on_disk(dir.path(), "two", &[7u8; 1000]),
            on_disk(dir.path(), "three", &[]),
        ];
        let a = docker_archive(&Base::default(), &layers, &ImageConfig::default(), "t:1");
        let got = bytes_of(&a);
        // The same entries, in the same order, through the tar crate's writer.
        let mut read = tar::Archive::new(&got[..]);
        let mut want = tar::Builder::new(Vec::new());
        let mut names = Vec::new();
        for e in read.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            want.append_data(&mut h, &name, &data[..]).unwrap();
            names.push(name);
        }
        assert_eq!(got, want.into_inner().unwrap());
        assert_eq!(names.len(), 5, "{names:?}");
        assert_eq!(
            names[1],
            format!("{}/layer.tar", hex::encode(layers[1].digest))
        );
        assert_eq!(names[4], "manifest.json");
    }

    #[test]
    fn a_host_file_is_read_when_the_layer_is_written_and_must_keep_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let from_memory = layer(&[Node::File {
            path: "/srv/big".into(),
            data: data.clone(),
            mode: 0o600,
        }]);
        let from_host = write_layer(
            &[Node::HostFile {
                path: "/srv/big".into(),
                src: src.clone(),
                mode: 0o600,
            }],
            Vec::new(),
        )
        .unwrap();
        assert_eq!(from_memory, from_host);
        let missing = write_layer(
            &[Node::HostFile {
                path: "/x".into(),
                src: dir.path().join("absent"),
                mode: 0o600,
            }],
            Vec::new(),
        )
        .err()
        .unwrap();
        assert!(missing.to_string().contains("absent"), "{missing}");
        // A file that grows while it is copied is refused, not cut.
        let mut short = Exact::whole(std::fs::File::open(&src).unwrap(), 10, &src);
        let err = io::copy(&mut short, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("changed size"), "{err}");
        let mut long = Exact::whole(std::fs::File::open(&src).unwrap(), 400_000, &src);
        assert!(io::copy(&mut long, &mut io::sink()).is_err());
    }

    #[test]
    fn a_saved_image_reads_back_as_a_base_of_file_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let l = on_disk(dir.path(), "l", &layer(&nodes()));
        let a = docker_archive(
            &Base::default(),
            std::slice::from_ref(&l),
            &ImageConfig {
                env: vec!["A=1".into()],
                ..Default::default()
            },
            "t:1",
        );
        let saved = dir.path().join("saved.tar");
        std::fs::write(&saved, bytes_of(&a)).unwrap();
        let base = base_from_saved(&saved).unwrap();
        assert_eq!(base.layers.len(), 1);
        assert_eq!(base.layers[0].digest, l.digest);
        assert_eq!(
            base.layers[0].range.path, saved,
            "a range of the saved file"
        );
        assert!(base.layers[0].has("www/index.html"));
        assert!(!base.layers[0].has("bin/busybox"));
        assert_eq!(base.config["Env"][0], "A=1");
        let empty = on_disk(dir.path(), "e", &layer(&[]));
        let child = docker_archive(
            &base,
            &[empty],
            &ImageConfig {
                env: vec!["A=2".into(), "B=3".into()],
                ..Default::default()
            },
            "t:2",
        );
        let saved2 = dir.path().join("saved2.tar");
        std::fs::write(&saved2, bytes_of(&child)).unwrap();
        let back = base_from_saved(&saved2).unwrap();
        assert_eq!(back.layers.len(), 2);
        assert_eq!(back.config["Env"], json!(["A=2", "B=3"]));
        std::fs::write(&saved2, b"not a tar").unwrap();
        let err = base_from_saved(&saved2).unwrap_err();
        assert!(err.contains("saved2.tar"), "{err}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
