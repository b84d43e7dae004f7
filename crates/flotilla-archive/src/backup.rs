//! The backup archive: one tar file holding a container's parts, each with a sha256.
//!
//! Layout, in this order:
//! ```text
//! part-00/info.json          what the part is (kind, volume, mount point)
//! part-00/00000000.chunk     the part's bytes, in chunks of at most CHUNK bytes
//! part-00/00000001.chunk
//! part-01/info.json
//! ...
//! manifest.json              versioned: every part's size, sha256, unpacked size
//! ```
//! Parts are chunked so an archive can be written while the data streams out of the
//! engine (a tar header needs the size up front) and the manifest comes last because
//! only then are the digests known. [`Encoder`] is sans-I/O (bytes in, bytes out), so
//! the same code feeds a file, an HTTP body or a pipe. [`verify`] reads a whole archive
//! and checks everything — structure, sizes, digests, and every volume's tar entries
//! — so a restore can refuse a bad archive before it writes a single byte.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tarcheck::{TarCheckError, TarChecker};

/// Version written in (and required of) `manifest.json`.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest chunk entry; parts are split into entries of this size.
pub const CHUNK: usize = 4 << 20;
/// Largest `info.json` or `manifest.json` accepted.
const MAX_JSON: u64 = 1 << 20;

/// What a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    /// The container's configuration (JSON) needed to create it again.
    Config,
    /// `docker save` output of the container's image.
    Image,
    /// A tar of one volume's contents, rooted at the mount point's last component.
    Volume,
}

/// The header of a part, written before its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartHeader {
    /// Kind of part.
    pub kind: PartKind,
    /// For volumes: the volume's name at the source (informational).
    #[serde(default)]
    pub volume: Option<String>,
    /// For volumes: the absolute mount point in the container.
    #[serde(default)]
    pub mount: Option<String>,
    /// For a volume part of a delta (the final pass of a migration, applied over a
    /// pre-copy): paths, relative to the volume, to remove first; the part's tar then
    /// holds only what changed. `None`: a whole volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<Vec<String>>,
}

/// A part as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartInfo {
    /// The header written before the part.
    #[serde(flatten)]
    pub header: PartHeader,
    /// Bytes of the part.
    pub size: u64,
    /// sha256 of the part's bytes, hex.
    pub sha256: String,
    /// For volumes: file bytes the volume tar unpacks to.
    #[serde(default)]
    pub unpacked: u64,
    /// For volumes: entries in the volume tar.
    #[serde(default)]
    pub entries: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `"flotilla-backup"`.
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// When the backup was taken, unix milliseconds.
    pub created_ms: u64,
    /// Free-form description of the source (node, container, instance id, service).
    pub source: serde_json::Map<String, serde_json::Value>,
    /// How the data was kept consistent: `"paused"`, `"stopped"` or `"live"`.
    pub consistency: String,
    /// Every part, in archive order.
    pub parts: Vec<PartInfo>,
}

impl Manifest {
    /// Total bytes of all parts.
    pub fn total_size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading failed (including a tar structure the reader cannot parse).
    #[error("reading the archive: {0}")]
    Io(#[from] std::io::Error),
    /// The archive's layout is not the one described above.
    #[error("archive layout: {0}")]
    Layout(String),
    /// The manifest is missing, unparsable or of another version.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A part's size or digest disagrees with the manifest.
    #[error("part {index} ({kind:?}): {what}")]
    Part {
        /// Part number.
        index: usize,
        /// Its kind.
        kind: PartKind,
        /// What disagreed.
        what: String,
    },
    /// A volume's tar holds something a restore must not write.
    #[error("part {index} (volume {mount}): {error}")]
    Volume {
        /// Part number.
        index: usize,
        /// Mount point.
        mount: String,
        /// What the tar check found.
        error: TarCheckError,
    },
}

/// Sans-I/O archive writer: every method returns the bytes to append to the output.
pub struct Encoder {
    parts: Vec<PartInfo>,
    current: Option<Open>,
}

struct Open {
    header: PartHeader,
    hasher: Sha256,
    size: u64,
    chunk: Vec<u8>,
    seq: u32,
    check: Option<TarChecker>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// An empty archive.
    pub fn new() -> Self {
        Encoder {
            parts: Vec::new(),
            current: None,
        }
    }

    /// Starts a part. Volume parts are tar-checked as they are written, so a backup of
    /// something no restore would accept fails now rather than at restore time.
    pub fn begin(&mut self, header: PartHeader) -> Result<Vec<u8>, ArchiveError> {
        if self.current.is_some() {
            return Err(ArchiveError::Layout("a part is already open".into()));
        }
        if header.kind == PartKind::Volume && header.mount.is_none() {
            return Err(ArchiveError::Layout("a volume part needs a mount".into()));
        }
        let index = self.parts.len();
        let json = serde_json::to_vec_pretty(&header).expect("serialisable");
        let check = header
            .mount
            .as_deref()
            .filter(|_| header.kind == PartKind::Volume)
            .map(|m| TarChecker::new(m, u64::MAX));
        self.current = Some(Open {
            header,
            hasher: Sha256::new(),
            size: 0,
            chunk: fresh_chunk(),
            seq: 0,
            check,
        });
        Ok(entry(&format!("part-{index:02}/info.json"), &json))
    }

    /// Adds bytes to the open part.
    pub fn write(&mut self, mut data: &[u8]) -> Result<Vec<u8>, ArchiveError> {
        let index = self.parts.len();
        let open = self
            .current
            .as_mut()
            .ok_or_else(|| ArchiveError::Layout("no part is open".into()))?;
        open.hasher.update(data);
        open.size += data.len() as u64;
        if let Some(c) = &mut open.check {
            c.feed(data).map_err(|error| ArchiveError::Volume {
                index,
                mount: open.header.mount.clone().unwrap_or_default(),
                error,
            })?;
        }
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = (CHUNK + 512 - open.chunk.len()).min(data.len());
            open.chunk.extend_from_slice(&data[..n]);
            data = &data[n..];
            if open.chunk.len() == CHUNK + 512 {
                out.extend(flush(index, open));
            }
        }
        Ok(out)
    }

    /// Closes the open part.
    pub fn end(&mut self) -> Result<Vec<u8>, ArchiveError> {
        let index = self.parts.len();
        let mut open = self
            .current
            .take()
            .ok_or_else(|| ArchiveError::Layout("no part is open".into()))?;
        let out = if open.chunk.len() == 512 {
            Vec::new()
        } else {
            flush(index, &mut open)
        };
        let (unpacked, entries) = match &open.check {
            Some(c) => {
                c.finish().map_err(|error| ArchiveError::Volume {
                    index,
                    mount: open.header.mount.clone().unwrap_or_default(),
                    error,
                })?;
                (c.unpacked(), c.entries())
            }
            None => (0, 0),
        };
        self.parts.push(PartInfo {
            header: open.header,
            size: open.size,
            sha256: hex::encode(open.hasher.finalize()),
            unpacked,
            entries,
        });
        Ok(out)
    }

    /// Writes the manifest and the end of the archive.
    pub fn finish(
        self,
        created_ms: u64,
        source: serde_json::Map<String, serde_json::Value>,
        consistency: &str,
    ) -> Result<(Manifest, Vec<u8>), ArchiveError> {
        if self.current.is_some() {
            return Err(ArchiveError::Layout("a part is still open".into()));
        }
        let manifest = Manifest {
            format: "flotilla-backup".into(),
            version: MANIFEST_VERSION,
            created_ms,
            source,
            consistency: consistency.into(),
            parts: self.parts,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("serialisable");
        let mut out = entry("manifest.json", &json);
        out.extend_from_slice(&[0u8; 1024]);
        Ok((manifest, out))
    }
}

/// A chunk buffer: room for the tar header first, so a full chunk becomes its entry
/// in place — the data is copied once, into the buffer, and never again.
fn fresh_chunk() -> Vec<u8> {
    let mut v = Vec::with_capacity(512 + CHUNK + 512);
    v.resize(512, 0);
    v
}

fn flush(index: usize, open: &mut Open) -> Vec<u8> {
    let name = format!("part-{index:02}/{:08}.chunk", open.seq);
    open.seq += 1;
    let mut out = std::mem::replace(&mut open.chunk, fresh_chunk());
    let len = out.len() - 512;
    out[..512].copy_from_slice(header(&name, len as u64).as_bytes());
    out.resize(512 + len.div_ceil(512) * 512, 0);
    out
}

fn header(name: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short ASCII name");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// One tar entry (header, data, padding) with fixed metadata.
fn entry(name: &str, data: &[u8]) -> Vec<u8> {
    let h = header(name, data.len() as u64);
    let mut out = Vec::with_capacity(512 + data.len().div_ceil(512) * 512);
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(512 + data.len().div_ceil(512) * 512, 0);
    out
}

/// One piece of an archive as [`read`] hands it over.
pub enum Piece<'a> {
    /// A new part starts.
    Begin(usize, &'a PartHeader),
    /// The next bytes of the current part.
    Data(&'a [u8]),
    /// The current part ended.
    End,
}

/// Reads an archive, checking structure, sizes, digests and volume contents, and
/// returns its manifest. `sink` sees each part's bytes as they are read; a caller that
/// must not write before everything is checked passes a no-op sink, then reads again.
pub fn read(
    input: impl Read,
    sink: impl FnMut(Piece<'_>) -> std::io::Result<()>,
) -> Result<Manifest, ArchiveError> {
    read_with(input, true, sink)
}

/// Reads an archive checking everything but the digests: structure, sizes, volume
/// contents, a complete manifest. For a writer that has just received the archive from
/// the agent that computed the digests (a restore checks them all again).
pub fn check_structure(input: impl Read) -> Result<Manifest, ArchiveError> {
    read_with(input, false, |_| Ok(()))
}

fn read_with(
    input: impl Read,
    digests: bool,
    mut sink: impl FnMut(Piece<'_>) -> std::io::Result<()>,
) -> Result<Manifest, ArchiveError> {
    struct Cur {
        header: PartHeader,
        hasher: Sha256,
        size: u64,
        seq: u32,
        check: Option<TarChecker>,
    }
    struct Done {
        header: PartHeader,
        sha256: String,
        size: u64,
        unpacked: u64,
        entries: u64,
    }
    let mut archive = tar::Archive::new(input);
    let mut done: Vec<Done> = Vec::new();
    let mut cur: Option<Cur> = None;
    let mut manifest: Option<Manifest> = None;
    let mut buf = vec![0u8; 256 * 1024];
    let close = |cur: Option<Cur>,
                 done: &mut Vec<Done>,
                 sink: &mut dyn FnMut(Piece<'_>) -> std::io::Result<()>|
     -> Result<(), ArchiveError> {
        if let Some(c) = cur {
            let index = done.len();
            let (unpacked, entries) = match &c.check {
                Some(k) => {
                    k.finish().map_err(|error| ArchiveError::Volume {
                        index,
                        mount: c.header.mount.clone().unwrap_or_default(),
                        error,
                    })?;
                    (k.unpacked(), k.entries())
                }
                None => (0, 0),
            };
            sink(Piece::End)?;
            done.push(Done {
                header: c.header,
                sha256: hex::encode(c.hasher.finalize()),
                size: c.size,
                unpacked,
                entries,
            });
        }
        Ok(())
    };
    for e in archive.entries()? {
        let mut e = e?;
        if manifest.is_some() {
            return Err(ArchiveError::Layout("entries after manifest.json".into()));
        }
        let path = e.path()?.to_string_lossy().into_owned();
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(ArchiveError::Layout(format!("{path}: not a regular file")));
        }
        if path == "manifest.json" {
            close(cur.take(), &mut done, &mut sink)?;
            let m: Manifest = serde_json::from_slice(&read_small(&mut e, &path)?)
                .map_err(|err| ArchiveError::Manifest(err.to_string()))?;
            manifest = Some(m);
            continue;
        }
        let (dir, file) = path
            .split_once('/')
            .ok_or_else(|| ArchiveError::Layout(format!("unexpected entry {path:?}")))?;
        let expected_dir = |n: usize| format!("part-{n:02}");
        if file == "info.json" {
            close(cur.take(), &mut done, &mut sink)?;
            if dir != expected_dir(done.len()) {
                return Err(ArchiveError::Layout(format!(
                    "{path}: expected {}/info.json",
                    expected_dir(done.len())
                )));
            }
            let header: PartHeader = serde_json::from_slice(&read_small(&mut e, &path)?)
                .map_err(|err| ArchiveError::Layout(format!("{path}: {err}")))?;
            let check = match (header.kind, &header.mount) {
                (PartKind::Volume, Some(m)) => Some(TarChecker::new(m, u64::MAX)),
                (PartKind::Volume, None) => {
                    return Err(ArchiveError::Layout(format!(
                        "{path}: volume without mount"
                    )))
                }
                _ => None,
            };
            sink(Piece::Begin(done.len(), &header))?;
            cur = Some(Cur {
                header,
                hasher: Sha256::new(),
                size: 0,
                seq: 0,
                check,
            });
            continue;
        }
        let index = done.len();
        let c = cur
            .as_mut()
            .filter(|_| dir == expected_dir(index))
            .ok_or_else(|| ArchiveError::Layout(format!("chunk {path:?} outside its part")))?;
        if file != format!("{:08}.chunk", c.seq) {
            return Err(ArchiveError::Layout(format!(
                "{path}: expected chunk {:08}",
                c.seq
            )));
        }
        c.seq += 1;
        loop {
            let n = e.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if digests {
                c.hasher.update(&buf[..n]);
            }
            c.size += n as u64;
            if let Some(k) = &mut c.check {
                k.feed(&buf[..n]).map_err(|error| ArchiveError::Volume {
                    index,
                    mount: c.header.mount.clone().unwrap_or_default(),
                    error,
                })?;
            }
            sink(Piece::Data(&buf[..n]))?;
        }
    }
    let manifest = manifest.ok_or_else(|| {
        ArchiveError::Manifest("missing: the archive is truncated or not a backup".into())
    })?;
    if manifest.format != "flotilla-backup" || manifest.version != MANIFEST_VERSION {
        return Err(ArchiveError::Manifest(format!(
            "format {:?} version {} (expected flotilla-backup version {MANIFEST_VERSION})",
            manifest.format, manifest.version
        )));
    }
    if manifest.parts.len() != done.len() {
        return Err(ArchiveError::Manifest(format!(
            "lists {} parts, the archive holds {}",
            manifest.parts.len(),
            done.len()
        )));
    }
    for (index, (want, got)) in manifest.parts.iter().zip(&done).enumerate() {
        let fail = |what: String| ArchiveError::Part {
            index,
            kind: got.header.kind,
            what,
        };
        if want.header != got.header {
            return Err(fail("header differs from the manifest".into()));
        }
        if want.size != got.size {
            return Err(fail(format!(
                "size {} but the manifest says {}",
                got.size, want.size
            )));
        }
        if digests && want.sha256 != got.sha256 {
            return Err(fail(format!(
                "sha256 {} but the manifest says {}",
                got.sha256, want.sha256
            )));
        }
        if want.unpacked != got.unpacked || want.entries != got.entries {
            return Err(fail(format!(
                "unpacks to {} bytes in {} entries but the manifest says {} in {}",
                got.unpacked, got.entries, want.unpacked, want.entries
            )));
        }
    }
    Ok(manifest)
}

/// Checks an archive and returns its manifest and its config part (at most 1 MiB).
pub fn check_with_config(input: impl Read) -> Result<(Manifest, Vec<u8>), ArchiveError> {
    let mut config = Vec::new();
    let mut in_config = false;
    let m = read(input, |piece| {
        match piece {
            Piece::Begin(_, h) => in_config = h.kind == PartKind::Config,
            Piece::Data(d) if in_config => {
                if config.len() + d.len() > MAX_JSON as usize {
                    return Err(std::io::Error::other("config part larger than 1 MiB"));
                }
                config.extend_from_slice(d)
            }
            Piece::End => in_config = false,
            Piece::Data(_) => {}
        }
        Ok(())
    })?;
    Ok((m, config))
}

/// A `Read` over chunks sent from another thread (or async code), so an archive can be
/// checked while it streams past on its way to a file.
/// Chunks are any owned bytes (`Vec<u8>`, `bytes::Bytes`): no copy on the way in.
pub struct ChannelReader<B> {
    rx: std::sync::mpsc::Receiver<B>,
    cur: Option<B>,
    pos: usize,
}

impl<B: AsRef<[u8]>> ChannelReader<B> {
    /// A reader of what is sent into the returned sender; dropping the sender is EOF.
    pub fn new(bound: usize) -> (std::sync::mpsc::SyncSender<B>, ChannelReader<B>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(bound);
        (
            tx,
            ChannelReader {
                rx,
                cur: None,
                pos: 0,
            },
        )
    }
}

impl<B: AsRef<[u8]>> Read for ChannelReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(cur) = &self.cur {
                let cur = cur.as_ref();
                if self.pos < cur.len() {
                    let n = buf.len().min(cur.len() - self.pos);
                    buf[..n].copy_from_slice(&cur[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match self.rx.recv() {
                Ok(b) => {
                    self.cur = Some(b);
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
    }
}

/// Reads an archive only to check it; see [`read`].
pub fn verify(input: impl Read) -> Result<Manifest, ArchiveError> {
    read(input, |_| Ok(()))
}

fn read_small(e: &mut impl Read, path: &str) -> Result<Vec<u8>, ArchiveError> {
    let mut v = Vec::new();
    e.take(MAX_JSON + 1).read_to_end(&mut v)?;
    if v.len() as u64 > MAX_JSON {
        return Err(ArchiveError::Layout(format!("{path}: larger than 1 MiB")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume_tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, d) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, p, &d[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sample(big: usize) -> (Manifest, Vec<u8>) {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        out.extend(
            enc.begin(PartHeader {
                kind: PartKind::Config,
                volume: None,
                mount: None,
                removed: None,
            })
            .unwrap(),
        );
        out.extend(enc.write(br#"{"image":"x"}"#).unwrap());
        out.extend(enc.end().unwrap());
        let vt = volume_tar(&[("data/a", vec![1; big]), ("data/b", b"bee".to_vec())]);
        out.extend(
            enc.begin(PartHeader {
                kind: PartKind::Volume,
                volume: Some("v1".into()),
                mount: Some("/data".into()),
                removed: None,
            })
            .unwrap(),
        );
        for piece in vt.chunks(100_000) {
            out.extend(enc.write(piece).unwrap());
        }
        out.extend(enc.end().unwrap());
        let (m, tail) = enc.finish(1, Default::default(), "paused").unwrap();
        out.extend(tail);
        (m, out)
    }

    #[test]
    fn round_trip_hands_back_every_byte() {
        let (m, bytes) = sample(9 << 20);
        assert_eq!(m.parts.len(), 2);
        assert_eq!(m.parts[1].unpacked, (9 << 20) + 3);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let read_m = read(&bytes[..], |p| {
            match p {
                Piece::Begin(..) => got.push(Vec::new()),
                Piece::Data(d) => got.last_mut().unwrap().extend_from_slice(d),
                Piece::End => {}
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(read_m, m);
        assert_eq!(got[0], br#"{"image":"x"}"#);
        assert_eq!(hex::encode(Sha256::digest(&got[1])), m.parts[1].sha256);
    }

    #[test]
    fn tampered_truncated_and_lying_archives_are_refused() {
        let (_, bytes) = sample(1 << 20);
        // Flip one byte of volume data (well inside the second part's chunk).
        let mut t = bytes.clone();
        let at = bytes.len() / 2;
        t[at] ^= 0xff;
        assert!(verify(&t[..]).is_err());
        // Every truncation point is refused.
        for cut in [
            0,
            100,
            1024,
            bytes.len() / 3,
            bytes.len() - 2048,
            bytes.len() - 1500,
        ] {
            assert!(verify(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A manifest that lies about a size.
        let (mut m, _) = sample(1 << 20);
        m.parts[1].size += 1;
        let mut enc_bytes = bytes[..bytes.len() - 1024].to_vec();
        // Drop the real manifest entry (the last one) and append the lying one.
        let pos = find_entry(&enc_bytes, "manifest.json");
        enc_bytes.truncate(pos);
        enc_bytes.extend(entry("manifest.json", &serde_json::to_vec(&m).unwrap()));
        enc_bytes.extend_from_slice(&[0u8; 1024]);
        let e = verify(&enc_bytes[..]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
    }

    fn find_entry(bytes: &[u8], name: &str) -> usize {
        (0..bytes.len())
            .step_by(512)
            .find(|&i| bytes[i..].starts_with(name.as_bytes()))
            .unwrap()
    }

    #[test]
    fn a_structure_check_skips_digests_only() {
        let (_, bytes) = sample(1 << 20);
        let mut t = bytes.clone();
        let at = bytes.len() / 2;
        t[at] ^= 0xff;
        assert!(check_structure(&bytes[..]).is_ok());
        assert!(
            check_structure(&t[..]).is_ok(),
            "a flipped data byte needs the digest"
        );
        assert!(verify(&t[..]).is_err());
        assert!(
            check_structure(&bytes[..bytes.len() / 2]).is_err(),
            "truncation is structure"
        );
    }

    #[test]
    fn traversal_inside_a_volume_is_refused_on_write_and_read() {
        let mut evil = Vec::new();
        let mut h = [0u8; 512];
        let name = b"data/../../etc/cron.d/x";
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        evil.extend_from_slice(&h);
        evil.extend_from_slice(&[0u8; 1024]);
        let mut enc = Encoder::new();
        enc.begin(PartHeader {
            kind: PartKind::Volume,
            volume: None,
            mount: Some("/data".into()),
            removed: None,
        })
        .unwrap();
        assert!(matches!(enc.write(&evil), Err(ArchiveError::Volume { .. })));
    }
}
