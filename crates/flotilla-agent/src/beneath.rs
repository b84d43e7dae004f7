//! Opening what is inside a volume without ever following a symlink.
//!
//! A live backup reads a running container's volume through its host path, as root.
//! The container can swap a directory for a symlink to `/` between the walk and the
//! read; a path resolved by the kernel in one go would then lead the agent into the
//! host's files. Here every component is opened relative to the directory before it
//! with `O_NOFOLLOW` (a symlink anywhere fails the open), so what is opened is inside
//! the volume or not opened at all. Regular files are opened non-blocking: a FIFO
//! swapped in for a file cannot hang the agent.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// How to open the last component.
#[derive(Debug, Clone, Copy)]
pub enum How {
    /// A directory to list.
    Dir,
    /// A regular file to read.
    File,
    /// Whatever it is, for its metadata (a symlink is opened as itself).
    Path,
}

impl How {
    fn flags(self) -> OFlags {
        let base = OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match self {
            How::Dir => base | OFlags::RDONLY | OFlags::DIRECTORY,
            How::File => base | OFlags::RDONLY | OFlags::NONBLOCK,
            How::Path => base | OFlags::PATH,
        }
    }
}

/// Opens the volume's root directory (a path the engine gave, itself trusted; not a
/// symlink).
pub fn open_root(dir: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(dir, How::Dir.flags(), Mode::empty())?;
    Ok(File::from(fd))
}

/// Opens `name` (one component) inside the directory `parent`.
pub fn open_at(parent: &File, name: &OsStr, how: How) -> io::Result<File> {
    let fd = rustix::fs::openat(parent.as_fd(), name, how.flags(), Mode::empty())?;
    Ok(File::from(fd))
}

/// Opens `rel` (relative, plain names only) under `root`, component by component.
pub fn open_beneath(root: &File, rel: &Path, how: How) -> io::Result<File> {
    let names = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect::<io::Result<Vec<_>>>()?;
    let Some((last, parents)) = names.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    };
    let mut dir: Option<File> = None;
    for p in parents {
        let next = open_at(dir.as_ref().unwrap_or(root), p, How::Dir)?;
        dir = Some(next);
    }
    open_at(dir.as_ref().unwrap_or(root), last, how)
}

/// The names in a directory opened with [`How::Dir`], without `.` and `..`.
pub fn list(dir: &File) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir.as_fd())? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// The target of a symlink opened with [`How::Path`].
pub fn read_link(link: &File) -> io::Result<PathBuf> {
    let target = rustix::fs::readlinkat(link.as_fd(), "", Vec::new())?;
    Ok(PathBuf::from(
        <OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()),
    ))
}

/// Whether an open failed because the path changed under us (gone, or a component is
/// now a symlink or not a directory): the entry is left out, as if removed.
pub fn changed_under_us(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(
            e.raw_os_error(),
            Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::ENXIO)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (vol, outside) = (d.path().join("v"), d.path().join("outside"));
        std::fs::create_dir_all(vol.join("dir")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host").unwrap();
        std::fs::write(vol.join("dir/file"), "inside").unwrap();
        std::os::unix::fs::symlink(&outside, vol.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), vol.join("dir/flink")).unwrap();
        let root = open_root(&vol).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(
            &mut open_beneath(&root, Path::new("dir/file"), How::File).unwrap(),
            &mut s,
        )
        .unwrap();
        assert_eq!(s, "inside");
        for (p, how) in [
            ("link/secret", How::File),
            ("link", How::Dir),
            ("dir/flink", How::File),
            ("../outside/secret", How::File),
        ] {
            let e = open_beneath(&root, Path::new(p), how).unwrap_err();
            assert!(
                changed_under_us(&e) || e.kind() == io::ErrorKind::InvalidInput,
                "{p}: {e}"
            );
        }
        // A symlink opened as itself: its metadata and target, never the target's.
        let l = open_beneath(&root, Path::new("dir/flink"), How::Path).unwrap();
        assert!(l.metadata().unwrap().file_type().is_symlink());
        assert_eq!(read_link(&l).unwrap(), outside.join("secret"));
        let mut names = list(&open_beneath(&root, Path::new("dir"), How::Dir).unwrap()).unwrap();
        names.sort();
        assert_eq!(names, ["file", "flink"]);
    }
}
