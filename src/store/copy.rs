//! The copy mechanics that copy-up, the copier and abort share: a file's data (holes kept,
//! copy_file_range where the file systems allow it), an S3 object's data, xattrs, owner,
//! mode, capabilities and times. Each acts on the entries it is given and decides nothing.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, SeekFrom, Timestamps};

use super::posix::{self, Loc};

/// A failed step of a copy: which call, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct CopyError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

pub type Result<T> = std::result::Result<T, CopyError>;

/// Attach the call's name to an error.
trait Context<T> {
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|source| CopyError { op, source })
    }
}

impl<T> Context<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|e| CopyError {
            op,
            source: io::Error::from_raw_os_error(e.raw_os_error()),
        })
    }
}

fn errno_err(op: &'static str, errno: i32) -> CopyError {
    CopyError {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

/// Bytes copied between two calls of a copy's tick: the granularity of pacing and of giving way.
const CHUNK: u64 = 4 << 20;

/// Called after each chunk with its length; `false` stops the copy (it is thrown away).
pub type Tick<'a> = &'a mut dyn FnMut(u64) -> bool;

/// Copy `len` bytes from `src` to `dst` at the same offsets, with copy_file_range where the file
/// systems allow it, else plain read/write. `Ok(false)`: `tick` stopped it.
pub fn copy_range(src: &File, dst: &File, mut off: u64, end: u64, tick: Tick<'_>) -> Result<bool> {
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while off < end {
        let want = (end - off).min(CHUNK) as usize;
        if use_cfr {
            let mut so = off;
            let mut d_off = off;
            match rustix::fs::copy_file_range(src, Some(&mut so), dst, Some(&mut d_off), want) {
                Ok(0) => break, // source shrank under us; the caller truncates to the size it saw
                Ok(n) => {
                    off += n as u64;
                    if !tick(n as u64) {
                        return Ok(false);
                    }
                    continue;
                }
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS,
                ) => use_cfr = false,
                Err(e) => return Err(e).ctx("copy_file_range"),
            }
        }
        use std::os::unix::fs::FileExt;
        buf.resize(want.min(1 << 20), 0);
        let n = src.read_at(&mut buf, off).ctx("read OLD")?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off).ctx("write NEW")?;
        off += n as u64;
        if !tick(n as u64) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Copy a file's data keeping holes: only the ranges SEEK_DATA finds are copied. `Ok(false)`:
/// `tick` stopped it.
pub fn copy_data(src: &File, dst: &File, size: u64, tick: Tick<'_>) -> Result<bool> {
    let st = posix::stat_fd(src.as_fd()).ok();
    copy_data_of(src, dst, size, st.as_ref(), tick)
}

/// [`copy_data`] for a caller that has `src`'s stat already.
pub fn copy_data_of(
    src: &File,
    dst: &File,
    size: u64,
    st: Option<&rustix::fs::Stat>,
    tick: Tick<'_>,
) -> Result<bool> {
    // A file with as many blocks as bytes has no holes: one straight copy, no seeking, and
    // the copy ends at `size` by itself.
    if let Some(st) = st
        && (st.st_blocks as u64) * 512 >= size
        && st.st_size as u64 == size
    {
        // (A source that shrank meanwhile gives a shorter copy; its fingerprint changed.)
        return copy_range(src, dst, 0, size, tick);
    }
    let mut off = 0u64;
    while off < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(off)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA support: copy everything.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                if !copy_range(src, dst, off, size, tick)? {
                    return Ok(false);
                }
                break;
            }
            Err(e) => return Err(e).ctx("lseek SEEK_DATA"),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))
            .ctx("lseek SEEK_HOLE")?
            .min(size);
        if !copy_range(src, dst, data, hole, tick)? {
            return Ok(false);
        }
        off = hole;
    }
    rustix::fs::ftruncate(dst, size).ctx("ftruncate copy")?;
    Ok(true)
}

/// How a data copy ended.
pub enum Fetched {
    Done,
    /// `tick` stopped it.
    Stopped,
    /// OLD's object is not the version the copy was asked of any more.
    Changed,
}

impl From<bool> for Fetched {
    fn from(complete: bool) -> Fetched {
        if complete {
            Fetched::Done
        } else {
            Fetched::Stopped
        }
    }
}

/// The whole of an S3 OLD's object into `dst`, as long as it is still the version `e` was
/// found as.
pub fn fetch_object(
    e: &crate::store::s3::tree::Entry,
    dst: &File,
    tick: Tick<'_>,
) -> Result<Fetched> {
    let Some(info) = &e.object else {
        return Err(errno_err("copy of an S3 directory's data", libc::EISDIR));
    };
    // Fetched whole by the copier's prefetch, this very version: no second request.
    if let Some(data) = e.tree.take_prefetched(&info.rel, &info.etag) {
        use std::os::unix::fs::FileExt;
        dst.write_all_at(&data, 0).ctx("write the copy")?;
        return Ok(if tick(data.len() as u64) {
            Fetched::Done
        } else {
            Fetched::Stopped
        });
    }
    let got = if info.size >= crate::store::s3::PARALLEL_GET_MIN && !info.etag.is_empty() {
        e.tree.store.get_parallel_to_file(
            &info.rel,
            &info.etag,
            info.size,
            crate::store::s3::PARALLEL_GET_PART,
            dst,
            tick,
        )
    } else {
        e.tree
            .store
            .get_to_file(&info.rel, &info.etag, dst, tick)
            .map(|o| o.map(drop))
    };
    match got {
        Ok(Some(())) => Ok(Fetched::Done),
        Ok(None) => Ok(Fetched::Stopped),
        Err(s) if s.errno == libc::ESTALE || s.errno == libc::ENOENT => Ok(Fetched::Changed),
        Err(s) => Err(CopyError {
            op: "fetch OLD object",
            source: s.into(),
        }),
    }
}

/// Copy every xattr of `src` onto `dst`.
pub fn copy_xattrs(src: &Loc, dst: &Loc) -> Result<()> {
    copy_xattrs_with(
        |buf| src.listxattr(buf),
        |name, buf| src.getxattr(name, buf),
        |name, val| dst.setxattr(name, val, rustix::fs::XattrFlags::empty()),
    )
}

/// [`copy_xattrs`] between two open files (no path walk per call).
pub fn copy_xattrs_fd(src: &File, dst: &File) -> Result<()> {
    let e = std::io::Error::from;
    copy_xattrs_with(
        |buf| rustix::fs::flistxattr(src, buf).map_err(e),
        |name, buf| rustix::fs::fgetxattr(src, name, buf).map_err(e),
        |name, val| {
            rustix::fs::fsetxattr(dst, name, val, rustix::fs::XattrFlags::empty()).map_err(e)
        },
    )
}

fn copy_xattrs_with(
    list: impl Fn(&mut [u8]) -> std::io::Result<usize>,
    get: impl Fn(&OsStr, &mut [u8]) -> std::io::Result<usize>,
    set: impl Fn(&OsStr, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let mut names = [0u8; 4096];
    let mut big;
    let listed: &[u8] = match list(&mut names[..]) {
        Ok(0) => return Ok(()),
        Ok(n) => &names[..n],
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
            big = vec![0u8; 64 * 1024];
            let n = list(&mut big[..]).ctx("listxattr OLD")?;
            &big[..n]
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e).ctx("listxattr OLD"),
    };
    let mut val = vec![0u8; 64 * 1024];
    for name in listed.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
        let len = match get(name, &mut val[..]) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e).ctx("getxattr OLD"),
        };
        match set(name, &val[..len]) {
            Ok(()) => {}
            // security.* / system.* that NEW's file system refuses: nothing we can carry.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM))
                    && !name.as_encoded_bytes().starts_with(b"user.") =>
            {
                tracing::warn!(?name, error = %e, "xattr not carried into NEW");
            }
            Err(e) => return Err(e).ctx("setxattr NEW"),
        }
    }
    Ok(())
}

/// A stat's access and modification times, as utimensat takes them.
pub fn timestamps(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Give the NEW entry `name` in `dir` OLD's owner, mode and times (after the data and xattrs,
/// and chmod after chown, because chown clears set-id bits).
pub fn apply_meta(dir: BorrowedFd<'_>, name: &OsStr, st: &rustix::fs::Stat) -> Result<()> {
    let kind = st.st_mode & libc::S_IFMT;
    let file = if kind == libc::S_IFREG {
        Some(
            rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ctx("open NEW file")?,
        )
    } else {
        None
    };
    let caps = match &file {
        Some(f) => file_caps(f.as_fd())?,
        None => None,
    };
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .ctx("chown NEW")?;
    if kind != libc::S_IFLNK {
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            AtFlags::empty(),
        )
        .ctx("chmod NEW")?;
    }
    if let Some(f) = &file {
        restore_caps(f.as_fd(), caps)?;
    }
    rustix::fs::utimensat(dir, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)
        .ctx("utimens NEW")?;
    Ok(())
}

/// The xattr holding a file's capabilities.
const CAPS: &str = "security.capability";

/// A regular file's capabilities (`security.capability`), which the kernel drops whenever the
/// file's owner is set, even to the owner it has: read before a chown, to be put back after
/// (rule 10; `setcap`'d programs keep their capabilities across copy-up and the copier).
fn file_caps(f: BorrowedFd<'_>) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 64];
    match rustix::fs::fgetxattr(f, CAPS, &mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Ok(None),
        Err(e) => Err(std::io::Error::from(e)).ctx("read file capabilities"),
    }
}

fn restore_caps(f: BorrowedFd<'_>, caps: Option<Vec<u8>>) -> Result<()> {
    match caps {
        Some(c) => rustix::fs::fsetxattr(f, CAPS, &c, rustix::fs::XattrFlags::empty())
            .map_err(std::io::Error::from)
            .ctx("put file capabilities back"),
        None => Ok(()),
    }
}

/// Run `f`, which adds an entry to the NEW directory `dir` on ferryfs's own behalf (a copy, a
/// link-up), and give `dir` back the times it had: bringing an entry over from OLD is not a
/// change of the directory as applications see it (overlayfs does the same after copy-up).
/// Caller holds `ns` write, so no change through the view interleaves.
pub fn keeping_dir_times<T, E: From<CopyError>>(
    dir: &Arc<OwnedFd>,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let before = posix::stat_fd(dir.as_fd()).ctx("stat NEW dir")?;
    let r = f()?;
    Loc::Fd(dir.clone())
        .utimens(&timestamps(&before))
        .ctx("restore NEW dir times")?;
    Ok(r)
}

/// OLD's owner, then OLD's mode (chown clears set-id bits, so chmod comes after).
pub fn set_owner_and_mode(f: &File, st: &rustix::fs::Stat) -> Result<()> {
    let caps = file_caps(f.as_fd())?;
    rustix::fs::fchown(
        f,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    )
    .ctx("fchown copy")?;
    rustix::fs::fchmod(f, Mode::from_raw_mode(st.st_mode & 0o7777)).ctx("fchmod copy")?;
    restore_caps(f.as_fd(), caps)
}
