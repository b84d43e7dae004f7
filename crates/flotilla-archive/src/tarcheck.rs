//! An incremental tar validator: feed it the bytes of a tar stream in any chunking and
//! it rejects, before anything is extracted, what a restore must never write.
//!
//! Checked: every header's checksum; entry paths (no absolute path, no `..`, all under
//! one top directory — the volume's); symbolic links whose target leaves the volume;
//! hard links to something not earlier in the archive; device nodes; entries whose data
//! runs past the end of the stream (truncation and size lies); the total unpacked size
//! against a declared limit. PAX (`x`) and GNU long-name (`L`, `K`) records are
//! understood, because Docker writes them for long paths.

use std::collections::HashSet;

/// Why a tar stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarCheckError {
    /// A header block's checksum does not match its contents.
    #[error("entry {index}: header checksum mismatch")]
    HeaderChecksum {
        /// 0-based entry number.
        index: u64,
    },
    /// A header field could not be parsed.
    #[error("entry {index}: malformed header: {what}")]
    Malformed {
        /// 0-based entry number.
        index: u64,
        /// Which field.
        what: String,
    },
    /// An entry's path is absolute, climbs with `..`, or is outside the top directory.
    #[error("entry {path:?}: path {why}")]
    BadPath {
        /// The path as written in the archive.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A link points outside the volume (or, for hard links, at nothing seen before).
    #[error("entry {path:?}: link target {target:?} {why}")]
    BadLink {
        /// The link's own path.
        path: String,
        /// Its target as written.
        target: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Device nodes and other special files are not restored.
    #[error("entry {path:?}: type {kind:?} is not allowed in a volume archive")]
    BadType {
        /// The entry's path.
        path: String,
        /// Its tar type flag.
        kind: char,
    },
    /// The stream ended inside an entry or before the end-of-archive marker.
    #[error("archive is truncated ({0})")]
    Truncated(String),
    /// The entries unpack to more bytes than the manifest declared.
    #[error("entries unpack to more than the declared {declared} bytes")]
    TooLarge {
        /// The declared limit.
        declared: u64,
    },
}

#[derive(Debug)]
enum Phase {
    /// Collecting a 512-byte header.
    Header,
    /// Skipping `left` bytes of entry data plus padding.
    Data { left: u64 },
    /// Collecting `len` bytes of a PAX or GNU long-name record (padded to 512).
    Record { kind: u8, len: usize, padded: usize },
    /// Two zero blocks seen: the rest must be zeros.
    End,
}

/// Incremental checker; see the module documentation.
#[derive(Debug)]
pub struct TarChecker {
    mount: String,
    top: Option<String>,
    limit: u64,
    unpacked: u64,
    index: u64,
    phase: Phase,
    buf: Vec<u8>,
    zero_blocks: u8,
    next_path: Option<String>,
    next_link: Option<String>,
    seen: HashSet<String>,
}

impl TarChecker {
    /// A checker for the archive of a volume mounted at `mount` (an absolute path in
    /// the container; symbolic links may point under it), whose entries may unpack to
    /// at most `limit` bytes.
    pub fn new(mount: &str, limit: u64) -> Self {
        TarChecker {
            mount: mount.trim_end_matches('/').to_owned(),
            top: None,
            limit,
            unpacked: 0,
            index: 0,
            phase: Phase::Header,
            buf: Vec::with_capacity(512),
            zero_blocks: 0,
            next_path: None,
            next_link: None,
            seen: HashSet::new(),
        }
    }

    /// Number of entries (files, directories, links) checked so far.
    pub fn entries(&self) -> u64 {
        self.index
    }

    /// Bytes of file data the entries declare.
    pub fn unpacked(&self) -> u64 {
        self.unpacked
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarCheckError> {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Data { left } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.phase = Phase::Header;
                    }
                }
                Phase::End => {
                    if data.iter().any(|&b| b != 0) {
                        return Err(self.malformed("data after the end-of-archive marker"));
                    }
                    return Ok(());
                }
                Phase::Header => {
                    let n = (512 - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == 512 {
                        let block = std::mem::take(&mut self.buf);
                        self.header(&block)?;
                    }
                }
                Phase::Record { kind, len, padded } => {
                    let (kind, len, padded) = (*kind, *len, *padded);
                    let n = (padded - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == padded {
                        let rec = std::mem::take(&mut self.buf);
                        self.record(kind, &rec[..len])?;
                        self.phase = Phase::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// Declares the end of the stream; fails if it ended early.
    pub fn finish(&self) -> Result<(), TarCheckError> {
        match self.phase {
            Phase::End => Ok(()),
            Phase::Header if self.buf.is_empty() && self.zero_blocks == 1 => Ok(()),
            Phase::Header if self.buf.is_empty() => Err(TarCheckError::Truncated(
                "no end-of-archive marker".to_owned(),
            )),
            _ => Err(TarCheckError::Truncated(format!(
                "stream ends inside entry {}",
                self.index
            ))),
        }
    }

    fn malformed(&self, what: &str) -> TarCheckError {
        TarCheckError::Malformed {
            index: self.index,
            what: what.to_owned(),
        }
    }

    fn header(&mut self, h: &[u8]) -> Result<(), TarCheckError> {
        if h.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks == 2 {
                self.phase = Phase::End;
            }
            return Ok(());
        }
        if self.zero_blocks > 0 {
            return Err(self.malformed("zero block inside the archive"));
        }
        let stored = octal(&h[148..156]).ok_or_else(|| self.malformed("checksum field"))?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        if sum != stored {
            return Err(TarCheckError::HeaderChecksum { index: self.index });
        }
        let size = size_field(&h[124..136]).ok_or_else(|| self.malformed("size field"))?;
        let kind = h[156];
        if matches!(kind, b'x' | b'L' | b'K') {
            if size > 1 << 20 {
                return Err(self.malformed("extended header larger than 1 MiB"));
            }
            let len = size as usize;
            self.phase = if len == 0 {
                Phase::Header
            } else {
                Phase::Record {
                    kind,
                    len,
                    padded: len.div_ceil(512) * 512,
                }
            };
            return Ok(());
        }
        if kind == b'g' {
            // A global PAX header applies to no entry of its own; skip its data.
            self.phase = data_phase(size);
            return Ok(());
        }
        let path = match self.next_path.take() {
            Some(p) => p,
            None => {
                let name = cstr(&h[0..100]);
                let prefix = if &h[257..262] == b"ustar" {
                    cstr(&h[345..500])
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let link = self.next_link.take().unwrap_or_else(|| cstr(&h[157..257]));
        let norm = self.check_path(&path)?;
        match kind {
            b'0' | 0 | b'7' => {
                self.unpacked = self.unpacked.saturating_add(size);
                if self.unpacked > self.limit {
                    return Err(TarCheckError::TooLarge {
                        declared: self.limit,
                    });
                }
            }
            b'5' | b'6' => {}
            b'2' => self.check_symlink(&path, &norm, &link)?,
            b'1' => {
                let target = normalise(&link).filter(|t| self.seen.contains(t));
                if target.is_none() {
                    return Err(TarCheckError::BadLink {
                        path,
                        target: link,
                        why: "is not an earlier entry of the archive",
                    });
                }
            }
            other => {
                return Err(TarCheckError::BadType {
                    path,
                    kind: other as char,
                })
            }
        }
        self.seen.insert(norm);
        self.index += 1;
        // Links and directories carry no data whatever their size field says.
        self.phase = if matches!(kind, b'0' | 0 | b'7') {
            data_phase(size)
        } else {
            Phase::Header
        };
        Ok(())
    }

    fn record(&mut self, kind: u8, rec: &[u8]) -> Result<(), TarCheckError> {
        match kind {
            b'L' => self.next_path = Some(cstr(rec)),
            b'K' => self.next_link = Some(cstr(rec)),
            _ => {
                // PAX: "LEN key=value\n" records.
                let mut rest = rec;
                while !rest.is_empty() {
                    let sp = rest
                        .iter()
                        .position(|&b| b == b' ')
                        .ok_or_else(|| self.malformed("PAX record length"))?;
                    let len: usize = std::str::from_utf8(&rest[..sp])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .filter(|&l| l > sp + 1 && l <= rest.len())
                        .ok_or_else(|| self.malformed("PAX record length"))?;
                    let kv = &rest[sp + 1..len - 1];
                    if let Some(eq) = kv.iter().position(|&b| b == b'=') {
                        let value = String::from_utf8_lossy(&kv[eq + 1..]).into_owned();
                        match &kv[..eq] {
                            b"path" => self.next_path = Some(value),
                            b"linkpath" => self.next_link = Some(value),
                            b"size" => return Err(self.malformed("PAX size override")),
                            _ => {}
                        }
                    }
                    rest = &rest[len..];
                }
            }
        }
        Ok(())
    }

    /// Checks a path and returns it normalised (no `.`, no trailing `/`).
    fn check_path(&mut self, path: &str) -> Result<String, TarCheckError> {
        let bad = |why| TarCheckError::BadPath {
            path: path.to_owned(),
            why,
        };
        if path.starts_with('/') {
            return Err(bad("is absolute"));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(bad("contains `..`"));
        }
        let norm = normalise(path).ok_or_else(|| bad("is empty"))?;
        let top = norm.split('/').next().unwrap_or_default().to_owned();
        match &self.top {
            None => self.top = Some(top),
            Some(t) if *t == top => {}
            Some(_) => return Err(bad("is outside the volume's top directory")),
        }
        Ok(norm)
    }

    fn check_symlink(&self, path: &str, norm: &str, target: &str) -> Result<(), TarCheckError> {
        let bad = |why| TarCheckError::BadLink {
            path: path.to_owned(),
            target: target.to_owned(),
            why,
        };
        if target.is_empty() {
            return Err(bad("is empty"));
        }
        if let Some(abs) = target.strip_prefix('/') {
            // Absolute targets are resolved in the container: they must stay under
            // the volume's mount point.
            let mount = self.mount.trim_start_matches('/');
            return match resolve(&[], abs) {
                Some(p)
                    if !mount.is_empty() && (p == mount || p.starts_with(&format!("{mount}/"))) =>
                {
                    Ok(())
                }
                _ => Err(bad("leaves the volume")),
            };
        }
        let mut base: Vec<&str> = norm.split('/').collect();
        base.pop();
        match resolve(&base, target) {
            // The first component is the volume's top directory: staying inside means
            // still having it after resolving.
            Some(p)
                if self
                    .top
                    .as_deref()
                    .is_some_and(|t| p == t || p.starts_with(&format!("{t}/"))) =>
            {
                Ok(())
            }
            _ => Err(bad("leaves the volume")),
        }
    }
}

fn data_phase(size: u64) -> Phase {
    if size == 0 {
        Phase::Header
    } else {
        Phase::Data {
            left: size.div_ceil(512) * 512,
        }
    }
}

/// Resolves `rel` against `base` components lexically; `None` if it climbs above root.
fn resolve(base: &[&str], rel: &str) -> Option<String> {
    let mut parts: Vec<&str> = base.to_vec();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn normalise(path: &str) -> Option<String> {
    let p = resolve(&[], path)?;
    (!p.is_empty()).then_some(p)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = cstr(field);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Size fields are octal, or base-256 (high bit set) for sizes over 8 GiB.
fn size_field(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    octal(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        b.append_link(&mut h, path, target).unwrap();
    }

    fn check(bytes: &[u8], chunk: usize) -> Result<TarChecker, TarCheckError> {
        let mut c = TarChecker::new("/data", 1 << 30);
        for part in bytes.chunks(chunk.max(1)) {
            c.feed(part)?;
        }
        c.finish()?;
        Ok(c)
    }

    /// Writes a raw header with an arbitrary name (the tar crate refuses `..`).
    fn raw_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn with_end(mut v: Vec<u8>) -> Vec<u8> {
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    #[test]
    fn accepts_a_normal_volume_in_any_chunking() {
        let long = format!("data/{}/file", "d".repeat(150));
        let bytes = tar_of(|b| {
            file(b, "data/a.txt", b"hello");
            file(b, &long, &vec![7u8; 3000]);
            link(b, tar::EntryType::Symlink, "data/ln", "a.txt");
            link(b, tar::EntryType::Symlink, "data/abs", "/data/a.txt");
            link(b, tar::EntryType::Link, "data/hard", "data/a.txt");
        });
        for chunk in [1, 7, 512, 4096, bytes.len()] {
            let c = check(&bytes, chunk).unwrap();
            assert_eq!(c.entries(), 5);
            assert_eq!(c.unpacked(), 3005);
        }
    }

    #[test]
    fn refuses_traversal_absolute_and_foreign_paths() {
        let e = check(
            &with_end(raw_entry("data/../../etc/passwd", b'0', "", b"x")),
            512,
        );
        assert!(
            matches!(
                e,
                Err(TarCheckError::BadPath {
                    why: "contains `..`",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = check(&with_end(raw_entry("/etc/passwd", b'0', "", b"x")), 512);
        assert!(matches!(
            e,
            Err(TarCheckError::BadPath {
                why: "is absolute",
                ..
            })
        ));
        let mut two = raw_entry("data/a", b'0', "", b"x");
        two.extend(raw_entry("other/b", b'0', "", b"x"));
        assert!(matches!(
            check(&with_end(two), 512),
            Err(TarCheckError::BadPath { .. })
        ));
    }

    #[test]
    fn refuses_links_out_of_the_volume() {
        for (kind, target) in [
            (b'2', "../../etc/shadow"),
            (b'2', "/etc/shadow"),
            (b'2', "/database"),
            (b'1', "etc/passwd"),
        ] {
            let bytes = with_end(raw_entry("data/l", kind, target, b""));
            let e = check(&bytes, 512);
            assert!(
                matches!(e, Err(TarCheckError::BadLink { .. })),
                "{target}: {e:?}"
            );
        }
        // A device node is refused too.
        let e = check(&with_end(raw_entry("data/sda", b'4', "", b"")), 512);
        assert!(matches!(e, Err(TarCheckError::BadType { kind: '4', .. })));
    }

    #[test]
    fn refuses_truncation_size_lies_and_tampered_headers() {
        let bytes = tar_of(|b| file(b, "data/big", &vec![1u8; 10_000]));
        for cut in [100, 512, 5000, 10_752] {
            assert!(
                matches!(check(&bytes[..cut], 512), Err(TarCheckError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut c = TarChecker::new("/data", 9_999);
        assert_eq!(
            c.feed(&bytes),
            Err(TarCheckError::TooLarge { declared: 9_999 })
        );
        let mut bad = bytes.clone();
        bad[130] ^= 1; // inside the size field
        assert!(matches!(
            check(&bad, 512),
            Err(TarCheckError::HeaderChecksum { .. })
        ));
    }

    proptest::proptest! {
        /// Whatever a byte flip does to a valid archive, the checker never panics, and
        /// it never accepts a path or link it would refuse in a clean archive.
        #[test]
        fn flipped_bytes_never_panic(pos in 0usize..4096, bit in 0u8..8) {
            let bytes = tar_of(|b| {
                file(b, "data/a.txt", b"hello");
                link(b, tar::EntryType::Symlink, "data/ln", "a.txt");
                file(b, "data/b", &[9u8; 1500]);
            });
            let mut bytes = bytes;
            let p = pos % bytes.len();
            bytes[p] ^= 1 << bit;
            let _ = check(&bytes, 333);
        }
    }
}
