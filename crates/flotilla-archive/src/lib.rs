//! The tar-based formats flotilla writes and reads, with no Docker in sight.
//!
//! Operators lose data when a restore writes half an archive, trusts a path that climbs
//! out of its volume, or believes a size the archive lies about. So every byte that
//! comes back into a container passes through here first: [`tarcheck`] validates a
//! tar stream incrementally (paths, links, sizes, header checksums) while it is hashed,
//! [`backup`] defines the versioned backup archive (manifest + parts, each with a
//! sha256) and verifies a whole archive before the caller writes anything, and
//! [`image`] builds byte-for-byte reproducible Docker image archives from a spec's
//! files, so the same spec gives the same image on every host.

pub mod backup;
pub mod image;
pub mod tarcheck;

pub use backup::{ArchiveError, Manifest, PartInfo, PartKind, MANIFEST_VERSION};
pub use tarcheck::{TarCheckError, TarChecker};
