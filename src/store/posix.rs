//! POSIX stores: a directory on any mounted file system.
//!
//! Owns every path resolution inside a store. The one rule: nothing here ever follows a symlink
//! that lives inside the store, so no view operation can reach outside a store's root whatever
//! links OLD or NEW contain (DESIGN rule 9). Paths are resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, and single names with `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW` relative
//! to a directory fd that was itself resolved that way.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// An open store root. The fd is taken before the view is mounted, so the view may be mounted
/// over the store's own path ("mount in place", rule 11).
#[derive(Debug)]
pub struct PosixStore {
    root: OwnedFd,
    path: PathBuf,
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl PosixStore {
    pub fn open(path: &Path) -> io::Result<PosixStore> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io_err(e).kind(),
                format!("{}: {}", path.display(), io_err(e)),
            )
        })?;
        Ok(PosixStore {
            root,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Open `rel` (relative to the root; empty means the root) as an `O_PATH` fd, refusing any
    /// symlink on the way, including the last component (an `O_PATH` fd to the link itself is
    /// returned in that case, so callers can lstat it).
    pub fn open_path(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(fd),
            Err(rustix::io::Errno::NOSYS) => self.open_path_by_components(rel),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Kernels without openat2 (< 5.6): walk one component at a time with O_NOFOLLOW.
    fn open_path_by_components(&self, rel: &Path) -> io::Result<OwnedFd> {
        let mut cur = rustix::io::dup(&self.root).map_err(io_err)?;
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            let name = match c {
                std::path::Component::Normal(n) => *n,
                std::path::Component::CurDir => continue,
                _ => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
            };
            let last = i + 1 == comps.len();
            let mut flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            if !last {
                flags |= OFlags::DIRECTORY;
            }
            cur = rustix::fs::openat(&cur, name, flags, Mode::empty()).map_err(io_err)?;
            if !last {
                let st = rustix::fs::fstat(&cur).map_err(io_err)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
            }
        }
        Ok(cur)
    }
}

/// `lstat` of `name` inside the directory `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<rustix::fs::Stat> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
    Ok(st)
}

/// `fstat` of an fd (an `O_PATH` fd works).
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<rustix::fs::Stat> {
    rustix::fs::fstat(fd).map_err(io_err)
}

/// An `O_PATH` fd for `name` inside `dir`, never following a symlink.
pub fn open_child(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)
}

/// The `/proc/self/fd/N` path of an fd: lets path-only calls (xattrs on O_PATH fds, reopen)
/// act on exactly the inode we hold, without resolving any name again.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// Reopen an `O_PATH` fd with real access flags. Never follows a symlink inside a store: the
/// fd already names the final inode.
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> io::Result<File> {
    let p = proc_path(fd);
    let f =
        rustix::fs::open(p.as_c_str(), flags | OFlags::CLOEXEC, Mode::empty()).map_err(io_err)?;
    Ok(File::from(f))
}

/// One directory entry as getdents returns it: name, `d_type`, `d_ino`.
pub struct RawEntry {
    pub name: Vec<u8>,
    pub dtype: u8,
    pub ino: u64,
}

/// The entries of a directory (given by an `O_PATH` fd), without `.` and `..`.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<RawEntry>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(&fd).map_err(io_err)?;
    while let Some(ent) = d.read() {
        let ent = ent.map_err(io_err)?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(RawEntry {
            name: name.to_vec(),
            dtype: ent.file_type() as u8,
            ino: ent.ino(),
        });
    }
    Ok(out)
}

pub fn as_cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn raw_errno(e: rustix::io::Errno) -> io::Error {
    io_err(e)
}
