//! Copy-up: the first change to an OLD-only entry brings it into NEW (rule 3).
//!
//! A file is copied into an anonymous file in the right NEW directory (O_TMPFILE), its data
//! (holes kept), xattrs, owner, mode and times are set, it is fsync'ed, and only then linked
//! under its name and the directory fsync'ed. So no partial file is ever visible in NEW, and a
//! crash leaves either no copy or a complete one. The data copy runs under the inode's claim
//! only; the namespace lock is taken just to link, so a long copy does not stall the view.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, SeekFrom, Timestamps};

use super::inode::{Identity, Inode};
use super::{Kind, View};
use crate::error::{Context, Result, errno_err};
use crate::store::posix::{self, Loc};

/// Copy `len` bytes from `src` to `dst` at the same offsets, with copy_file_range where the file
/// systems allow it, else plain read/write.
pub(crate) fn copy_range(src: &File, dst: &File, mut off: u64, end: u64) -> Result<()> {
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while off < end {
        let want = (end - off).min(16 << 20) as usize;
        if use_cfr {
            let mut so = off;
            let mut d_off = off;
            match rustix::fs::copy_file_range(src, Some(&mut so), dst, Some(&mut d_off), want) {
                Ok(0) => break, // source shrank under us; the caller truncates to the size it saw
                Ok(n) => {
                    off += n as u64;
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
    }
    Ok(())
}

/// Copy a file's data keeping holes: only the ranges SEEK_DATA finds are copied.
pub(crate) fn copy_data(src: &File, dst: &File, size: u64) -> Result<()> {
    let mut off = 0u64;
    while off < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(off)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA support: copy everything.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                copy_range(src, dst, off, size)?;
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
        copy_range(src, dst, data, hole)?;
        off = hole;
    }
    rustix::fs::ftruncate(dst, size).ctx("ftruncate copy")?;
    Ok(())
}

/// Copy every xattr of `src` onto `dst`.
pub fn copy_xattrs(src: &Loc, dst: &Loc) -> Result<()> {
    let mut list = vec![0u8; 64 * 1024];
    let n = match src.listxattr(&mut list[..]) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e).ctx("listxattr OLD"),
    };
    let mut val = vec![0u8; 64 * 1024];
    for name in list[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
        let len = match src.getxattr(name, &mut val[..]) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e).ctx("getxattr OLD"),
        };
        match dst.setxattr(name, &val[..len], rustix::fs::XattrFlags::empty()) {
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

/// The OLD side of an inode being copied up (it has one: it is not in NEW yet).
fn old_side(inode: &Inode) -> Result<super::inode::OldRef> {
    inode
        .node()
        .old
        .clone()
        .ok_or_else(|| errno_err("copy-up: the entry has no OLD side", libc::ENOENT))
}

/// An open file as a [`Loc`] (for copying xattrs between open files).
fn file_loc(f: &File) -> Result<Loc> {
    let fd = f.as_fd().try_clone_to_owned().ctx("dup")?;
    Ok(Loc::Fd(Arc::new(fd)))
}

fn timestamps(st: &rustix::fs::Stat) -> Timestamps {
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
pub(crate) fn apply_meta(dir: BorrowedFd<'_>, name: &OsStr, st: &rustix::fs::Stat) -> Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .ctx("chown NEW")?;
    if Kind::from_mode(st.st_mode) != Kind::Symlink {
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            AtFlags::empty(),
        )
        .ctx("chmod NEW")?;
    }
    rustix::fs::utimensat(dir, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)
        .ctx("utimens NEW")?;
    Ok(())
}

fn fsync_dir(dir: BorrowedFd<'_>) -> Result<()> {
    let d = posix::reopen(dir, OFlags::RDONLY | OFlags::DIRECTORY).ctx("open NEW dir")?;
    rustix::fs::fsync(&d).ctx("fsync NEW dir")
}

impl View {
    /// The view name to place `inode` at: any of its live names.
    fn placement(&self, inode: &Inode) -> Result<(Arc<Inode>, std::ffi::OsString)> {
        let names = inode.node().names.clone();
        for (p, name) in names {
            if let Ok(parent) = self.inode(p) {
                return Ok((parent, name));
            }
        }
        Err(errno_err("copy-up: entry has no name left", libc::ENOENT))
    }

    /// Make sure directory `dir` exists in NEW; returns its NEW fd. Caller holds `ns` write.
    pub(crate) fn ensure_new_dir_locked(&self, dir: &Inode) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = dir.node().new.as_ref().and_then(|l| l.dir_fd().cloned()) {
            return Ok(fd);
        }
        let (parent, name) = self.placement(dir)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        let old = old_side(dir)?;
        let st = old.loc.stat().ctx("stat OLD dir")?;
        match rustix::fs::mkdirat(pfd.as_fd(), &name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir NEW"),
        }
        let fd = Arc::new(posix::open_child(pfd.as_fd(), &name).ctx("open NEW dir")?);
        copy_xattrs(&old.loc, &Loc::Fd(fd.clone()))?;
        apply_meta(pfd.as_fd(), &name, &st)?;
        let nst = posix::stat_fd(fd.as_fd()).ctx("stat NEW dir")?;
        dir.node().new = Some(Loc::Fd(fd.clone()));
        self.inodes
            .add_identity(dir, Identity::New(nst.st_dev, nst.st_ino));
        Ok(fd)
    }

    /// Copy `inode` up into NEW unless it is there already. `data: false` when the caller is
    /// about to truncate to zero (O_TRUNC): OLD's bytes are irrelevant, so none are copied.
    pub(crate) fn copy_up(&self, inode: &Inode, data: bool) -> Result<()> {
        if inode.node().new.is_some() {
            return Ok(());
        }
        let _claim = inode.claim.lock().unwrap_or_else(|p| p.into_inner());
        if inode.node().new.is_some() {
            return Ok(());
        }
        match inode.kind {
            Kind::Dir => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.ensure_new_dir_locked(inode).map(drop)
            }
            Kind::File => self.copy_up_file(inode, data),
            _ => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.copy_up_special_locked(inode)
            }
        }
    }

    fn copy_up_file(&self, inode: &Inode, data: bool) -> Result<()> {
        let old = old_side(inode)?;
        let src = old
            .loc
            .open(OFlags::RDONLY | OFlags::NOATIME)
            .or_else(|_| old.loc.open(OFlags::RDONLY))
            .ctx("open OLD file")?;
        let st = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
        let pfd = {
            let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
            let (parent, _) = self.placement(inode)?;
            self.ensure_new_dir_locked(&parent)?
        };
        // A name of an OLD hard-link group whose copy exists already: link to that copy.
        let group = if st.st_nlink > 1 {
            let g = self.journal.hardlink(st.st_dev, st.st_ino)?.unwrap_or(
                crate::journal::HardLinkGroup {
                    old_nlink: st.st_nlink as u32,
                    ..Default::default()
                },
            );
            if g.copy.is_some() {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                let (parent, name) = self.placement(inode)?;
                if self.link_up_locked(&parent, &name, st.st_dev, st.st_ino, g.clone())? {
                    let pfd = self.ensure_new_dir_locked(&parent)?;
                    fsync_dir(pfd.as_fd())?;
                    let loc = Loc::At(pfd, name);
                    let nst = loc.stat().ctx("stat NEW copy")?;
                    {
                        let mut n = inode.node();
                        n.new = Some(loc);
                        n.old_group = Some((st.st_dev, st.st_ino));
                    }
                    self.inodes
                        .add_identity(inode, Identity::New(nst.st_dev, nst.st_ino));
                    return Ok(());
                }
            }
            Some(g)
        } else {
            None
        };
        let tmp = rustix::fs::openat(
            pfd.as_fd(),
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .ctx("O_TMPFILE in NEW (the NEW file system must support it)")?;
        let tmp = File::from(tmp);
        if data {
            copy_data(&src, &tmp, st.st_size as u64)?;
        }
        copy_xattrs(&file_loc(&src)?, &file_loc(&tmp)?)?;
        rustix::fs::fchown(
            &tmp,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        )
        .ctx("fchown copy")?;
        rustix::fs::fchmod(&tmp, Mode::from_raw_mode(st.st_mode & 0o7777)).ctx("fchmod copy")?;
        rustix::fs::futimens(&tmp, &timestamps(&st)).ctx("futimens copy")?;
        rustix::fs::fsync(&tmp).ctx("fsync copy")?;

        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mut g) = group {
            // Journal the group's copy before it is visible: every other OLD name of the
            // group will be linked to it, and st_nlink counts them.
            g.copy = Some(posix::file_handle(tmp.as_fd()).ctx("file handle of the copy")?);
            let tst = posix::stat_fd(tmp.as_fd()).ctx("stat copy")?;
            let mut b = crate::journal::Batch::new();
            b.hardlink(st.st_dev, st.st_ino, &g)
                .copy_of(tst.st_dev, tst.st_ino, st.st_dev, st.st_ino);
            self.journal.commit(b, true)?;
            inode.node().old_group = Some((st.st_dev, st.st_ino));
        }
        // The entry may have been renamed while we copied: place it where it is now.
        let (parent, name) = self.placement(inode)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        let tp = posix::proc_path(tmp.as_fd());
        rustix::fs::linkat(
            rustix::fs::CWD,
            tp.as_c_str(),
            pfd.as_fd(),
            &name,
            AtFlags::SYMLINK_FOLLOW,
        )
        .ctx("link copy into NEW")?;
        fsync_dir(pfd.as_fd())?;
        let loc = Loc::At(pfd.clone(), name.clone());
        let nst = loc.stat().ctx("stat NEW copy")?;
        inode.node().new = Some(loc);
        self.inodes
            .add_identity(inode, Identity::New(nst.st_dev, nst.st_ino));
        tracing::debug!(
            ino = inode.ino,
            bytes = if data { st.st_size } else { 0 },
            "copied up"
        );
        Ok(())
    }

    /// Symlinks, FIFOs, sockets and device nodes: created in place (each creation is atomic).
    fn copy_up_special_locked(&self, inode: &Inode) -> Result<()> {
        let old = old_side(inode)?;
        let st = old.loc.stat().ctx("stat OLD entry")?;
        let (parent, name) = self.placement(inode)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        if inode.kind == Kind::Symlink {
            let target = old.loc.readlink().ctx("readlink OLD")?;
            rustix::fs::symlinkat(target.as_slice(), pfd.as_fd(), &name).ctx("symlink NEW")?;
        } else {
            rustix::fs::mknodat(
                pfd.as_fd(),
                &name,
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                Mode::from_raw_mode(st.st_mode & 0o7777),
                st.st_rdev,
            )
            .ctx("mknod NEW")?;
        }
        let loc = Loc::At(pfd.clone(), name.clone());
        copy_xattrs(&old.loc, &loc)?;
        apply_meta(pfd.as_fd(), &name, &st)?;
        fsync_dir(pfd.as_fd())?;
        let nst = loc.stat().ctx("stat NEW entry")?;
        inode.node().new = Some(loc);
        self.inodes
            .add_identity(inode, Identity::New(nst.st_dev, nst.st_ino));
        Ok(())
    }
}
