//! POSIX stores: a directory on any mounted file system.
//!
//! Owns every path resolution inside a store. The one rule: nothing here ever follows a symlink
//! that lives inside the store, so no view operation can reach outside a store's root whatever
//! links OLD or NEW contain (DESIGN rule 9). Paths are resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, and single names with `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW` relative
//! to a directory fd that was itself resolved that way.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// The first `user.` extended attribute of `f`, if it has one (what no S3 object can hold).
pub fn first_user_xattr(f: &std::fs::File) -> Option<String> {
    first_user_name(|buf| rustix::fs::flistxattr(f, buf).map_err(io_err))
        .ok()
        .flatten()
}

/// The first `user.` name of the xattr names `list` gives (listxattr's calling convention).
/// Most entries have a few names or none: a small buffer on the stack first, the largest list
/// the kernel returns only when that is too small (ERANGE).
pub fn first_user_name(
    list: impl Fn(&mut [u8]) -> io::Result<usize>,
) -> io::Result<Option<String>> {
    let first = |names: &[u8]| {
        names
            .split(|b| *b == 0)
            .find(|n| n.starts_with(b"user."))
            .map(|n| String::from_utf8_lossy(n).into_owned())
    };
    let mut small = [0u8; 1024];
    match list(&mut small) {
        Ok(n) => Ok(first(&small[..n])),
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
            let mut buf = vec![0u8; 64 << 10];
            let n = list(&mut buf)?;
            Ok(first(&buf[..n]))
        }
        Err(e) => Err(e),
    }
}

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

    /// A store whose root is already open (handed over by a previous daemon: with the view
    /// mounted in place, `path` is the view itself now).
    pub fn from_root(root: OwnedFd, path: PathBuf) -> PosixStore {
        PosixStore { root, path }
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

/// Fill `buf` from OLD's file `f` at `off`; a file cut short since it was looked at (its
/// size handed out) is a changed file: ESTALE, as a replaced S3 object is.
pub fn read_old_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::from_raw_os_error(libc::ESTALE)
        } else {
            e
        }
    })
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

/// getxattrat(2) and listxattrat(2) (Linux 6.13): an entry's xattrs read relative to its
/// directory fd, never following a symlink, without walking a /proc path (the kernel asks for
/// `security.capability` at every write to a file, so this is on the write path). `None` where
/// the kernel lacks them: the caller then goes through /proc, and so does every later call.
mod xattrat {
    use std::ffi::{CString, OsStr};
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    // One number on every architecture (the unified table, from 424 on).
    const SYS_GETXATTRAT: libc::c_long = 464;
    const SYS_LISTXATTRAT: libc::c_long = 465;

    static MISSING: AtomicBool = AtomicBool::new(false);

    /// The kernel's `struct xattr_args`.
    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    fn done(r: libc::c_long) -> Option<io::Result<usize>> {
        if r >= 0 {
            return Some(Ok(r as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) => {
                MISSING.store(true, Ordering::Relaxed);
                None
            }
            // A seccomp filter or LSM that does not know the call: the /proc way, this time.
            Some(libc::EPERM) => None,
            _ => Some(Err(e)),
        }
    }

    fn cstr(s: &OsStr) -> CString {
        CString::new(s.as_bytes()).expect("names hold no NUL")
    }

    pub(super) fn get(
        dir: BorrowedFd<'_>,
        entry: &OsStr,
        name: &OsStr,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>> {
        if MISSING.load(Ordering::Relaxed) {
            return None;
        }
        let (entry, name) = (cstr(entry), cstr(name));
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: buf.len() as u32,
            flags: 0,
        };
        // SAFETY: valid NUL-terminated strings, `args` points at `buf` with its length, and
        // the kernel writes at most that many bytes there.
        let r = unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir.as_raw_fd(),
                entry.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
                &mut args as *mut XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        };
        done(r)
    }

    pub(super) fn list(
        dir: BorrowedFd<'_>,
        entry: &OsStr,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>> {
        if MISSING.load(Ordering::Relaxed) {
            return None;
        }
        let entry = cstr(entry);
        // SAFETY: a valid NUL-terminated string and `buf` with its length.
        let r = unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir.as_raw_fd(),
                entry.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        done(r)
    }
}

/// A new anonymous file (O_TMPFILE) on `dir`'s file system, open read-write: it has no name
/// until one is linked, so a crash leaves nothing behind.
pub fn anon_file(dir: BorrowedFd<'_>, mode: u32) -> io::Result<std::fs::File> {
    rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(mode),
    )
    .map(std::fs::File::from)
    .map_err(io_err)
}

/// Rename `from` in `fd` to `to` in `td` unless `to` exists (EEXIST then). A file system
/// without renameat2's flags (many FUSE file systems answer EINVAL) gets a look, then a
/// plain rename: callers make sure nothing else names `to` meanwhile (the view's namespace
/// lock; the view is NEW's only writer).
pub fn rename_noreplace(
    fd: BorrowedFd<'_>,
    from: &OsStr,
    td: BorrowedFd<'_>,
    to: &OsStr,
) -> rustix::io::Result<()> {
    match rustix::fs::renameat_with(fd, from, td, to, rustix::fs::RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match rustix::fs::statat(td, to, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => return Err(rustix::io::Errno::EXIST),
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
            rustix::fs::renameat(fd, from, td, to)
        }
        r => r,
    }
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
            dtype: dtype_of(ent.file_type()),
            ino: ent.ino(),
        });
    }
    Ok(out)
}

/// The d_type (`DT_*`) of a rustix directory entry's type: `DT_UNKNOWN` when the file system
/// did not say, so the caller stats the entry.
fn dtype_of(t: rustix::fs::FileType) -> u8 {
    use rustix::fs::FileType as T;
    match t {
        T::RegularFile => libc::DT_REG,
        T::Directory => libc::DT_DIR,
        T::Symlink => libc::DT_LNK,
        T::Fifo => libc::DT_FIFO,
        T::Socket => libc::DT_SOCK,
        T::CharacterDevice => libc::DT_CHR,
        T::BlockDevice => libc::DT_BLK,
        T::Unknown => libc::DT_UNKNOWN,
    }
}

pub fn as_cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn raw_errno(e: rustix::io::Errno) -> io::Error {
    io_err(e)
}

/// Where an entry of a store is, as the view holds it: a directory by an `O_PATH` fd of its own;
/// anything else by its name inside such a directory fd. So the daemon holds one fd per
/// directory the kernel knows, not one per file, however many files the kernel caches.
/// Every operation acts on exactly that entry and never follows a symlink it names.
///
/// An entry of an S3 OLD is `Obj`: its stat is what S3 said when it was found; it is read
/// through [`Loc::open_source`], and it cannot be changed through a `Loc` (EROFS).
#[derive(Debug, Clone)]
pub enum Loc {
    Fd(Arc<OwnedFd>),
    At(Arc<OwnedFd>, OsString),
    Obj(Arc<super::s3::tree::Entry>),
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Whether an error resolving a path means nothing is there any more (removed, renamed, or a
/// component that became a non-directory or a symlink), not that the store failed.
pub fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

impl Loc {
    pub fn stat(&self) -> io::Result<rustix::fs::Stat> {
        match self {
            Loc::Fd(fd) => stat_fd(fd.as_fd()),
            Loc::At(dir, name) => stat_at(dir.as_fd(), name),
            Loc::Obj(e) => Ok(e.st),
        }
    }

    /// The S3 entry, for an entry of an S3 OLD.
    pub fn object(&self) -> Option<&Arc<super::s3::tree::Entry>> {
        match self {
            Loc::Obj(e) => Some(e),
            _ => None,
        }
    }

    /// Open for reading whatever the store: a POSIX file (with `flags`), or an S3 object.
    pub fn open_source(&self, flags: OFlags) -> io::Result<super::Source> {
        match self {
            Loc::Obj(e) => Ok(super::Source::Object(Arc::new(e.reader()?))),
            _ => self.open(flags).map(|f| super::Source::File(Arc::new(f))),
        }
    }

    /// Open for I/O. `O_NOFOLLOW` on the name: a symlink swapped in behind our back fails ELOOP.
    /// Not for an S3 entry (EOPNOTSUPP): see [`Loc::open_source`].
    pub fn open(&self, flags: OFlags) -> io::Result<File> {
        match self {
            Loc::Obj(_) => Err(errno(libc::EOPNOTSUPP)),
            Loc::Fd(fd) => reopen(fd.as_fd(), flags),
            Loc::At(dir, name) => rustix::fs::openat(
                dir,
                name,
                flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map(File::from)
            .map_err(io_err),
        }
    }

    /// The entry's file handle (see [`file_handle`]).
    pub fn handle(&self) -> io::Result<Vec<u8>> {
        match self {
            Loc::Fd(fd) => file_handle(fd.as_fd()),
            Loc::At(..) => file_handle(self.open(OFlags::PATH)?.as_fd()),
            Loc::Obj(_) => Err(errno(libc::EOPNOTSUPP)),
        }
    }

    /// The directory fd to use for `*at` calls and the name in it ("" with `AT_EMPTY_PATH` for
    /// an fd of its own). EROFS for an S3 entry: nothing changes an S3 OLD through a `Loc`.
    fn at(&self) -> io::Result<(BorrowedFd<'_>, &OsStr, AtFlags)> {
        match self {
            Loc::Fd(fd) => Ok((fd.as_fd(), OsStr::new(""), AtFlags::EMPTY_PATH)),
            Loc::At(dir, name) => Ok((dir.as_fd(), name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)),
            Loc::Obj(_) => Err(errno(libc::EROFS)),
        }
    }

    /// A path naming exactly this entry, and whether path calls must use their `l*` (no
    /// follow) variants on it: a `/proc/self/fd/N` magic link is resolved to its inode whatever
    /// it is, while `/proc/self/fd/N/name` must not follow a symlink at `name`.
    /// EROFS for an S3 entry.
    pub fn path(&self) -> io::Result<(CString, bool)> {
        match self {
            Loc::Fd(fd) => Ok((proc_path(fd.as_fd()), false)),
            Loc::At(dir, name) => {
                let mut p = proc_path(dir.as_fd()).into_bytes();
                p.push(b'/');
                p.extend_from_slice(name.as_bytes());
                Ok((CString::new(p).expect("names hold no NUL"), true))
            }
            Loc::Obj(_) => Err(errno(libc::EROFS)),
        }
    }

    pub fn readlink(&self) -> io::Result<Vec<u8>> {
        if let Loc::Obj(e) = self {
            return e.readlink();
        }
        let (d, n, _) = self.at()?;
        rustix::fs::readlinkat(d, n, Vec::new())
            .map(|t| t.into_bytes())
            .map_err(io_err)
    }

    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let (d, n, f) = self.at()?;
        rustix::fs::chownat(
            d,
            n,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            f,
        )
        .map_err(io_err)
    }

    /// chmod; not for symlinks (Linux has no symlink modes).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        let m = Mode::from_raw_mode(mode & 0o7777);
        match self {
            Loc::Fd(fd) => rustix::fs::chmod(proc_path(fd.as_fd()).as_c_str(), m),
            Loc::At(dir, name) => rustix::fs::chmodat(dir, name, m, AtFlags::empty()),
            Loc::Obj(_) => return Err(errno(libc::EROFS)),
        }
        .map_err(io_err)
    }

    pub fn utimens(&self, ts: &rustix::fs::Timestamps) -> io::Result<()> {
        match self {
            Loc::Fd(fd) => rustix::fs::utimensat(
                rustix::fs::CWD,
                proc_path(fd.as_fd()).as_c_str(),
                ts,
                AtFlags::empty(),
            ),
            Loc::At(dir, name) => rustix::fs::utimensat(dir, name, ts, AtFlags::SYMLINK_NOFOLLOW),
            Loc::Obj(_) => return Err(errno(libc::EROFS)),
        }
        .map_err(io_err)
    }

    /// Hard-link this entry as `newname` in the directory `newdir`.
    pub fn link_to(&self, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
        let (d, n, f) = self.at()?;
        let f = if f.contains(AtFlags::EMPTY_PATH) {
            AtFlags::EMPTY_PATH
        } else {
            AtFlags::empty()
        };
        rustix::fs::linkat(d, n, newdir, newname, f).map_err(io_err)
    }

    /// An S3 entry has no xattrs (ENODATA).
    pub fn getxattr(&self, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
        if let Loc::Obj(_) = self {
            return Err(errno(libc::ENODATA));
        }
        if let Loc::At(dir, entry) = self
            && let Some(r) = xattrat::get(dir.as_fd(), entry, name, buf)
        {
            return r;
        }
        let (p, nofollow) = self.path()?;
        if nofollow {
            rustix::fs::lgetxattr(p.as_c_str(), name, buf)
        } else {
            rustix::fs::getxattr(p.as_c_str(), name, buf)
        }
        .map_err(io_err)
    }

    pub fn listxattr(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Loc::Obj(_) = self {
            return Ok(0);
        }
        if let Loc::At(dir, entry) = self
            && let Some(r) = xattrat::list(dir.as_fd(), entry, buf)
        {
            return r;
        }
        let (p, nofollow) = self.path()?;
        if nofollow {
            rustix::fs::llistxattr(p.as_c_str(), buf)
        } else {
            rustix::fs::listxattr(p.as_c_str(), buf)
        }
        .map_err(io_err)
    }

    pub fn setxattr(
        &self,
        name: &OsStr,
        value: &[u8],
        flags: rustix::fs::XattrFlags,
    ) -> io::Result<()> {
        let (p, nofollow) = self.path()?;
        if nofollow {
            rustix::fs::lsetxattr(p.as_c_str(), name, value, flags)
        } else {
            rustix::fs::setxattr(p.as_c_str(), name, value, flags)
        }
        .map_err(io_err)
    }

    pub fn removexattr(&self, name: &OsStr) -> io::Result<()> {
        let (p, nofollow) = self.path()?;
        if nofollow {
            rustix::fs::lremovexattr(p.as_c_str(), name)
        } else {
            rustix::fs::removexattr(p.as_c_str(), name)
        }
        .map_err(io_err)
    }

    /// The directory fd (for directories only).
    pub fn dir_fd(&self) -> Option<&Arc<OwnedFd>> {
        match self {
            Loc::Fd(fd) => Some(fd),
            Loc::At(..) | Loc::Obj(_) => None,
        }
    }
}

/// Longest file handle the kernel hands out (MAX_HANDLE_SZ).
const MAX_HANDLE_SZ: usize = 128;

/// A rename-proof reference to the inode behind `fd` (`name_to_handle_at`), serialised as the
/// handle type (i32, little endian) followed by the handle's bytes. Works on an `O_TMPFILE`
/// before it is linked, so it can be journaled before the file becomes visible.
pub fn file_handle(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    // u32 words: file_handle needs 4-byte alignment.
    let mut buf = vec![0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id = 0;
    // SAFETY: `buf` is a file_handle header (handle_bytes, handle_type) followed by
    // MAX_HANDLE_SZ bytes, as handle_bytes says; the kernel writes at most that much. The
    // empty path with AT_EMPTY_PATH names `fd` itself.
    let rc = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr() as *mut libc::file_handle,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = buf[0] as usize;
    let mut out = (buf[1] as i32).to_le_bytes().to_vec();
    // SAFETY: the kernel wrote `len` (<= MAX_HANDLE_SZ) handle bytes right after the header.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().add(2) as *const u8, len) };
    out.extend_from_slice(bytes);
    Ok(out)
}

/// Open the inode a [`file_handle`] names, on the file system of the directory `mount_dir`
/// (an `O_PATH` fd works: it is reopened, as the call refuses `O_PATH` fds), as `O_PATH`.
/// Fails with ESTALE once the inode is gone.
pub fn open_by_handle(mount_dir: BorrowedFd<'_>, handle: &[u8]) -> io::Result<OwnedFd> {
    if handle.len() < 4 || handle.len() - 4 > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mount_fd = reopen(mount_dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let bytes = &handle[4..];
    let mut buf = vec![0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = bytes.len() as u32;
    buf[1] = i32::from_le_bytes(handle[..4].try_into().expect("4 bytes")) as u32;
    // SAFETY: the payload area after the 8-byte header holds MAX_HANDLE_SZ bytes and
    // `bytes.len()` is at most that.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            buf.as_mut_ptr().add(2) as *mut u8,
            bytes.len(),
        );
    }
    // SAFETY: `buf` is a well-formed file_handle; the returned fd, if any, is ours to own.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::file_handle,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
