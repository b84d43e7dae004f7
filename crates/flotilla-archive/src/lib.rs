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
#![warn(missing_docs)]

pub mod backup;
pub mod image;
pub mod tarcheck;

pub use backup::{ArchiveError, Manifest, PartInfo, PartKind, MANIFEST_VERSION};
pub use tarcheck::{TarCheckError, TarChecker};

/// Creates (or truncates) the file a backup archive is written to, readable by its
/// owner only (0600, also when the file was there before): an archive holds a
/// container's volumes, and a registry's holds its token. Never through a symlink.
pub fn create_archive_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}
