//! Namespace and metadata changes through the view.
//!
//! Each change copies up what it touches (rule 3), records in the journal what NEW cannot show
//! (tombstones, redirects), and applies the rest to NEW. The journal half is committed durably
//! before the NEW half; see the ordering invariant in `fs/mod.rs`.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use super::drain::S3Refusal;
use super::inode::{Identity, Inode, ROOT_INO};
use super::{Attr, Caller, Kind, OpenFile, Resolved, View, join, not_found};
use crate::journal::{Batch, Dentry, Intent};
use crate::store::posix::{self, Loc};
use crate::view::error::{Context, Error, Result, errno_err};

/// A time to set: a given instant or "now".
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    At(SystemTime),
    Now,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

/// `value` into `buf` as a getxattr/listxattr system call answers: the size for an empty
/// buffer, ERANGE for one too small.
fn copy_out(value: &[u8], buf: &mut [u8]) -> std::io::Result<usize> {
    if buf.is_empty() {
        return Ok(value.len());
    }
    let Some(dst) = buf.get_mut(..value.len()) else {
        return Err(std::io::Error::from_raw_os_error(libc::ERANGE));
    };
    dst.copy_from_slice(value);
    Ok(value.len())
}

fn timespec(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT as _,
        },
        Some(SetTime::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW as _,
        },
        Some(SetTime::At(t)) => {
            let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut n = -(d.subsec_nanos() as i64);
                    if n < 0 {
                        s -= 1;
                        n += 1_000_000_000;
                    }
                    (s, n)
                }
            };
            Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            }
        }
    }
}

/// The owner a new entry gets: the caller, or the directory's group when it is set-group-ID
/// (as the kernel's inode_init_owner does).
fn new_owner(caller: Caller, parent_st: &rustix::fs::Stat) -> (u32, u32) {
    let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
        parent_st.st_gid
    } else {
        caller.gid
    };
    (caller.uid, gid)
}

impl View {
    /// Give directory `dir` a journal id, recording it (and its parents) first. Caller holds
    /// `ns` write. The record only restates what the view already shows, so it is written
    /// without a sync; the durable batch that needs it syncs it too (the WAL is ordered).
    pub(crate) fn ensure_dir_id_locked(&self, dir: &Inode) -> Result<u64> {
        if let Some(id) = dir.node().dir_id {
            return Ok(id);
        }
        let (parent, name) = {
            let n = dir.node();
            n.names
                .first()
                .cloned()
                .ok_or_else(|| errno_err("record dir: no name", libc::ENOENT))?
        };
        let parent = self.inode(parent)?;
        let pid = self.ensure_dir_id_locked(&parent)?;
        let id = self.journal.alloc_id();
        let origin = dir.node().old.as_ref().map(|o| o.path.clone());
        let mut b = Batch::new();
        b.put(pid, name.as_bytes(), &Dentry::Dir { id, origin });
        self.journal.commit(b, false)?;
        dir.node().dir_id = Some(id);
        Ok(id)
    }

    /// Does OLD hold something at `name` in `dir`'s default OLD location?
    fn old_at_default(&self, dir: &Inode, name: &OsStr) -> bool {
        if self.is_single() {
            return false;
        }
        let old = dir.node().old.clone();
        old.is_some_and(|o| match o.loc.dir_fd() {
            Some(d) => posix::stat_at(d.as_fd(), name).is_ok(),
            None => super::old_child(&o.loc, name).is_ok_and(|f| f.is_some()),
        })
    }

    /// NEW-relative path of a directory inode (for redo intents only).
    pub(crate) fn new_path(&self, dir: &Inode) -> Result<Vec<u8>> {
        let mut parts: Vec<OsString> = Vec::new();
        let mut cur = self.inode(dir.ino)?;
        while cur.ino != ROOT_INO {
            let (p, name) = cur
                .node()
                .names
                .first()
                .cloned()
                .ok_or_else(|| errno_err("path of a removed dir", libc::ENOENT))?;
            parts.push(name);
            cur = self.inode(p)?;
        }
        let mut out = Vec::new();
        for name in parts.iter().rev() {
            out = join(&out, name);
        }
        Ok(out)
    }

    /// Make `name` in `parent` ready for a fresh NEW entry (creation or link): refuse a name
    /// the view shows, replace any record left at it by a tombstone (the fresh entry must not
    /// inherit an older redirect), and bring the parent into NEW. Returns the parent's NEW fd.
    /// Caller holds `ns` write.
    fn claim_new_name_locked(&self, parent: &Inode, name: &OsStr) -> Result<Arc<OwnedFd>> {
        if self.resolve(parent, name)?.is_some() {
            return Err(Error::refused(libc::EEXIST, "name exists"));
        }
        if let Some(id) = parent.node().dir_id
            && let Some(rec) = self.journal.get(id, name.as_bytes())?
            && rec != Dentry::Tombstone
        {
            let mut b = Batch::new();
            b.put(id, name.as_bytes(), &Dentry::Tombstone);
            self.journal.commit(b, true)?;
        }
        self.ensure_new_dir_locked(parent)
    }

    /// Common part of every creation: claim the name, run `make` in NEW's parent, hand the
    /// entry to the caller, attach it.
    fn create_entry(
        &self,
        parent: u64,
        name: &OsStr,
        caller: Caller,
        make: impl FnOnce(BorrowedFd<'_>, &rustix::fs::Stat) -> Result<Option<u32>>,
    ) -> Result<(Arc<Inode>, Attr)> {
        self.check_s3_new(S3Refusal::Name(name))?;
        let p = self.inode(parent)?;
        let pfd = self.claim_new_name_locked(&p, name)?;
        let pst = posix::stat_fd(pfd.as_fd()).ctx("stat NEW parent")?;
        let chmod_after = make(pfd.as_fd(), &pst)?;
        self.dir_changed(&p);
        let (uid, gid) = new_owner(caller, &pst);
        rustix::fs::chownat(
            pfd.as_fd(),
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .ctx("chown new entry")?;
        if let Some(mode) = chmod_after {
            // chown clears set-id bits; put back the ones the caller asked for.
            rustix::fs::chmodat(
                pfd.as_fd(),
                name,
                Mode::from_raw_mode(mode),
                AtFlags::empty(),
            )
            .ctx("chmod new entry")?;
        }
        let r = self
            .resolve(&p, name)?
            .ok_or_else(|| errno_err("created entry vanished", libc::EIO))?;
        let (inode, attr) = self.attach(parent, name, r)?;
        // Born in the view: its own from the start, never a copy of OLD (no record to look
        // for at its first change, nothing to check against OLD at lookup).
        inode.node().copy = super::inode::CopyState::Local;
        Ok((inode, attr))
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, OpenFile)> {
        let _gate = self.changes();
        let flags = flags & !libc::O_TRUNC;
        let mut made = None;
        let (inode, attr) = {
            let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
            self.create_entry(parent, name, caller, |pfd, _| {
                let perm = mode & 0o7777;
                // Created open as the caller asked (the daemon's access is never refused), and
                // that file is the one the caller gets: no second open of the new name.
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::from_bits_retain((flags & !super::handles::STRIP) as u32)
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(perm),
                )
                .ctx("create in NEW")?;
                made = Some(std::fs::File::from(fd));
                Ok((perm & 0o6000 != 0).then_some(perm))
            })?
        };
        let of = self.open_inode_with(inode, flags, made)?;
        Ok((attr, of))
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .create_entry(parent, name, caller, |pfd, _| {
                let perm = mode & 0o7777;
                rustix::fs::mknodat(
                    pfd,
                    name,
                    rustix::fs::FileType::from_raw_mode(mode),
                    Mode::from_raw_mode(perm),
                    rdev as u64,
                )
                .ctx("mknod in NEW")?;
                Ok((perm & 0o6000 != 0).then_some(perm))
            })?
            .1)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .create_entry(parent, name, caller, |pfd, _| {
                // A set-group-ID parent passes its bit on by itself (the kernel does it, and
                // chown keeps it on directories), exactly as a native mkdir does.
                rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(mode & 0o7777))
                    .ctx("mkdir in NEW")?;
                Ok(None)
            })?
            .1)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> Result<Attr> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .create_entry(parent, name, caller, |pfd, _| {
                rustix::fs::symlinkat(target, pfd, name).ctx("symlink in NEW")?;
                Ok(None)
            })?
            .1)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let _gate = self.changes();
        self.check_s3_new(S3Refusal::Link)?;
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::refused(libc::EPERM, "hard link to a directory"));
        }
        self.copy_up(&inode, true)?;
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let np = self.inode(newparent)?;
        let pfd = self.claim_new_name_locked(&np, newname)?;
        self.new_loc(&inode)?
            .link_to(pfd.as_fd(), newname)
            .ctx("link in NEW")?;
        // A name the view made: the directory is the view's from now on (its names are no
        // longer all OLD's, nor its times).
        self.dir_changed(&np);
        let r = self
            .resolve(&np, newname)?
            .ok_or_else(|| errno_err("linked entry vanished", libc::EIO))?;
        Ok(self.attach(newparent, newname, r)?.1)
    }

    /// NEW's entry `st` was deleted: its (st_dev, st_ino) may now be given to a new entry.
    fn deleted_from_new(&self, st: &rustix::fs::Stat) {
        #[allow(clippy::unnecessary_cast)]
        let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
        let id = Identity::New(dev, ino);
        if self.journal.has_partial(dev, ino) {
            let inode = self.inodes.ino_of(&id).and_then(|i| self.inodes.get(i));
            self.partial_deleted(dev, ino, inode.as_deref());
        }
        self.inodes.unmap(id);
    }

    /// Whether removing/renaming away this resolved entry must leave a tombstone: OLD shows (or
    /// a record says) something at the name.
    fn old_visible(&self, parent: &Inode, name: &OsStr, r: &Resolved) -> bool {
        r.record.is_some() || r.old.is_some() || self.old_at_default(parent, name)
    }

    /// `name` in `parent` no longer names the resolved entry: drop it from the inode's names
    /// and move its NEW location to a name it still has.
    pub(super) fn forget_name(&self, r: &Resolved, parent: u64, name: &OsStr) {
        if let Some(ino) = self.inodes.ino_of(&r.identity())
            && let Some(inode) = self.inodes.get(ino)
        {
            inode
                .node()
                .names
                .retain(|(p, n)| !(*p == parent && n == name));
            self.relocate(&inode);
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.unlink_as(parent, name, true)
    }

    /// `unlink`, or (`by_view` false) OLD's removal of a copied name followed: the directory
    /// stays a copy of OLD's.
    pub(crate) fn unlink_as(&self, parent: u64, name: &OsStr, by_view: bool) -> Result<()> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let p = self.inode(parent)?;
        let r = self.resolve(&p, name)?.ok_or_else(|| not_found("unlink"))?;
        if r.kind == Kind::Dir {
            return Err(Error::refused(libc::EISDIR, "unlink of a directory"));
        }
        if self.old_visible(&p, name, &r) && r.record != Some(Dentry::Tombstone) {
            let pid = self.ensure_dir_id_locked(&p)?;
            let mut b = Batch::new();
            b.put(pid, name.as_bytes(), &Dentry::Tombstone);
            self.count_removed_old_link(&r, &mut b)?;
            // An OLD-only file's last name: a metadata change waiting for its copy goes too.
            if let (None, Some((_, _, st))) = (&r.new, &r.old)
                && st.st_nlink == 1
                && r.kind == Kind::File
                && self.journal.has_meta_change(st.st_dev, st.st_ino)
            {
                b.clear_meta_change(st.st_dev, st.st_ino);
            }
            self.journal.commit(b, true)?;
        }
        if r.new.is_none() {
            self.touch_dir_locked(&p)?;
        }
        if let Some((_, st)) = &r.new {
            let pfd = self
                .new_dir(&p)
                .ok_or_else(|| errno_err("NEW entry has a NEW parent", libc::EIO))?;
            if !self.keep_alive_locked(&pfd, name, st)? {
                rustix::fs::unlinkat(pfd.as_fd(), name, AtFlags::empty()).ctx("unlink in NEW")?;
                if st.st_nlink == 1 {
                    // A copy's record is written before its name appears in NEW, so a read
                    // finds it here; a file born in the view has none, and its removal then
                    // costs no journal write.
                    // Only an entry that came from OLD has an origin, and its number is OLD's:
                    // one numbered as born in the view costs no read for it.
                    #[allow(clippy::unnecessary_cast)]
                    let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
                    let born = self.inodes.ino_of(&Identity::New(dev, ino))
                        == Some(super::inode::new_born_number(ino));
                    let origin = !born && self.journal.origin_of(dev, ino)?.is_some();
                    if origin || self.journal.has_copy(st.st_dev, st.st_ino)? {
                        let mut b = Batch::new();
                        b.clear_copy(st.st_dev, st.st_ino)
                            .clear_origin(st.st_dev, st.st_ino);
                        self.journal.commit(b, false)?;
                    }
                    self.deleted_from_new(st);
                }
            }
        }
        self.forget_name(&r, parent, name);
        if by_view {
            self.dir_changed(&p);
        } else {
            self.note_old_followed(&p);
        }
        Ok(())
    }

    /// The NEW name `name` in `pfd` is going away. If it is the last NEW link of an OLD
    /// hard-link group's copy while OLD names of the group remain, move it into the work dir
    /// instead, so those names can still be linked to it. Returns whether it did.
    pub(crate) fn keep_alive_locked(
        &self,
        pfd: &OwnedFd,
        name: &OsStr,
        st: &rustix::fs::Stat,
    ) -> Result<bool> {
        if st.st_nlink != 1 || Kind::from_mode(st.st_mode) == Kind::Dir {
            return Ok(false);
        }
        let Some((dev, ino)) = self.journal.copy_of(st.st_dev, st.st_ino)? else {
            return Ok(false);
        };
        let mut g = match self.journal.hardlink(dev, ino)? {
            Some(g) if g.pending_old_names() > 0 => g,
            _ => return Ok(false),
        };
        let work = self.work_dir()?;
        rustix::fs::renameat(
            pfd.as_fd(),
            name,
            &work,
            super::keep_alive_name(dev, ino).as_str(),
        )
        .ctx("keep an OLD hard-link group's copy alive")?;
        g.kept_alive = true;
        let mut b = Batch::new();
        b.hardlink(dev, ino, &g);
        self.journal.commit(b, true)?;
        Ok(true)
    }

    /// An OLD-only name of an OLD hard-link group is going away: the group's other names lose
    /// a link. Recorded in the same batch as the tombstone.
    fn count_removed_old_link(&self, r: &Resolved, b: &mut Batch) -> Result<()> {
        if r.new.is_some() || r.kind == Kind::Dir {
            return Ok(());
        }
        if let Some((_, _, st)) = &r.old
            && st.st_nlink > 1
        {
            let mut g = self.journal.hardlink(st.st_dev, st.st_ino)?.unwrap_or(
                crate::journal::HardLinkGroup {
                    old_nlink: st.st_nlink as u32,
                    ..Default::default()
                },
            );
            g.removed += 1;
            b.hardlink(st.st_dev, st.st_ino, &g);
        }
        Ok(())
    }

    /// The merged listing of a resolved directory that may have no inode yet.
    fn is_empty_dir(&self, r: &Resolved) -> Result<bool> {
        let probe = super::inode::Node {
            names: Vec::new(),
            new: r.new.as_ref().map(|(l, _)| l.clone()),
            old: r.old.as_ref().map(|(p, l, _)| super::inode::OldRef {
                path: p.clone(),
                loc: l.clone(),
            }),
            dir_id: match &r.record {
                Some(Dentry::Dir { id, .. }) => Some(*id),
                _ => None,
            },
            ids: Vec::new(),
            old_group: None,
            subdirs: None,
            cache_stamp: None,
            listed_at: None,
            copy: Default::default(),
            rechecked: None,
            meta: None,
            partial: None,
        };
        Ok(self.list_node(&probe)?.is_empty())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.rmdir_as(parent, name, true)
    }

    /// `rmdir`, or (`by_view` false) OLD's removal of a copied directory followed.
    pub(crate) fn rmdir_as(&self, parent: u64, name: &OsStr, by_view: bool) -> Result<()> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let p = self.inode(parent)?;
        let r = self.resolve(&p, name)?.ok_or_else(|| not_found("rmdir"))?;
        if r.kind != Kind::Dir {
            return Err(Error::refused(libc::ENOTDIR, "rmdir of a non-directory"));
        }
        if !self.is_empty_dir(&r)? {
            return Err(Error::refused(libc::ENOTEMPTY, "directory not empty"));
        }
        let mut b = Batch::new();
        if let Some(Dentry::Dir { id, .. }) = &r.record {
            for (n, _) in self.journal.list(*id)? {
                b.delete(*id, &n);
            }
        }
        if self.old_visible(&p, name, &r) {
            let pid = self.ensure_dir_id_locked(&p)?;
            b.put(pid, name.as_bytes(), &Dentry::Tombstone);
        }
        if !b.is_empty() {
            self.journal.commit(b, true)?;
        }
        if r.new.is_none() {
            self.touch_dir_locked(&p)?;
        } else {
            let pfd = self
                .new_dir(&p)
                .ok_or_else(|| errno_err("NEW entry has a NEW parent", libc::EIO))?;
            rustix::fs::unlinkat(pfd.as_fd(), name, AtFlags::REMOVEDIR).ctx("rmdir in NEW")?;
            if let Some((_, st)) = &r.new {
                self.deleted_from_new(st);
            }
        }
        self.forget_name(&r, parent, name);
        if by_view {
            self.dir_changed(&p);
        } else {
            self.note_old_followed(&p);
        }
        Ok(())
    }

    /// rename (rule 5): atomic as applications see it, and O(1) whatever the entry holds: a
    /// directory keeps its journal id, so everything recorded below it moves with one record;
    /// an OLD-only file gets a redirect instead of a copy.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let _gate = self.changes();
        self.check_s3_new(S3Refusal::Name(newname))?;
        if flags & (libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT) != 0 {
            return Err(Error::refused(libc::EINVAL, "rename flag not supported"));
        }
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let sp = self.inode(parent)?;
        let dp = self.inode(newparent)?;
        let src = self
            .resolve(&sp, name)?
            .ok_or_else(|| not_found("rename"))?;
        let dst = self.resolve(&dp, newname)?;
        if let Some(d) = &dst
            && self.rename_target_refused(&src, d, flags)?
        {
            return Ok(()); // two names of one file: POSIX says do nothing
        }
        let at = RenameAt {
            sp: &sp,
            name,
            dp: &dp,
            newname,
        };
        // A rename wholly inside NEW, with nothing of OLD and no record at either name, is
        // only NEW's renameat, atomic by itself: no journal write (and so no WAL fsync).
        let journal_free = src.new.is_some()
            && src.old.is_none()
            && src.record.is_none()
            && !self.old_at_default(&sp, name)
            && dst
                .as_ref()
                .is_none_or(|d| d.record.is_none() && d.old.is_none())
            && !self.old_at_default(&dp, newname);
        let (intent_id, moved_dir_id) = if journal_free {
            self.ensure_new_dir_locked(&dp)?;
            (None, None)
        } else {
            self.rename_journal(&at, &src, dst.as_ref())?
        };
        if src.new.is_some() {
            self.rename_in_new(&at, dst.as_ref())?;
        } else {
            // An OLD-only source moves by journal records alone: both directories change.
            self.touch_dir_locked(&sp)?;
            match dst.as_ref().filter(|d| d.new.is_some()) {
                Some(d) => self.remove_renamed_over(&at, d)?,
                None if !Arc::ptr_eq(&sp, &dp) => self.touch_dir_locked(&dp)?,
                None => {}
            }
        }
        if let Some(id) = intent_id {
            let mut b = Batch::new();
            b.clear_intent(id);
            self.journal.commit(b, false)?;
        }
        if let Some(d) = &dst {
            self.forget_name(d, newparent, newname);
        }
        self.dir_changed(&sp);
        self.dir_changed(&dp);
        if let Some(ino) = self.inodes.ino_of(&src.identity())
            && let Some(inode) = self.inodes.get(ino)
        {
            let mut n = inode.node();
            for entry in n.names.iter_mut() {
                if entry.0 == parent && entry.1 == name {
                    *entry = (newparent, newname.to_owned());
                }
            }
            if let Some(id) = moved_dir_id {
                n.dir_id = Some(id);
            }
            drop(n);
            self.relocate(&inode);
        }
        Ok(())
    }

    /// `dir` lost or gained a name by journal records alone (an OLD-only entry removed or
    /// renamed): nothing changed in NEW to show it, so `dir`'s mtime and ctime are set as the
    /// kernel sets them for any change of a directory (`dir` brought into NEW first).
    fn touch_dir_locked(&self, dir: &Inode) -> Result<()> {
        let made = dir.node().new.is_none();
        let fd = self.ensure_new_dir_locked(dir)?;
        if made {
            // Directories are made in the work dir, then renamed into place: none is left
            // behind in NEW for this (the caller holds `ns`, under which names are made there).
            self.remove_work_dir_if_empty();
        }
        let now = Timestamps {
            last_access: timespec(None),
            last_modification: timespec(Some(SetTime::Now)),
        };
        Loc::Fd(fd).utimens(&now).ctx("touch NEW dir")
    }

    /// Whether a rename onto the existing `d` does nothing (`Ok(true)`: two names of one
    /// file); the refusals POSIX gives for it.
    fn rename_target_refused(&self, src: &Resolved, d: &Resolved, flags: u32) -> Result<bool> {
        if flags & libc::RENAME_NOREPLACE != 0 {
            return Err(Error::refused(libc::EEXIST, "target exists"));
        }
        if d.identity() == src.identity() {
            return Ok(true);
        }
        match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
            (true, false) => {
                return Err(Error::refused(libc::ENOTDIR, "target is not a directory"));
            }
            (false, true) => return Err(Error::refused(libc::EISDIR, "target is a directory")),
            (true, true) if !self.is_empty_dir(d)? => {
                return Err(Error::refused(
                    libc::ENOTEMPTY,
                    "target directory not empty",
                ));
            }
            _ => {}
        }
        Ok(false)
    }

    /// The journal half of a rename, durable before NEW changes: a tombstone at the old name
    /// when OLD shows something there, the record at the new name (the directory's id, or a
    /// redirect to the OLD data), and the NEW half as a redo intent. Returns the intent's id
    /// and the moved directory's journal id.
    fn rename_journal(
        &self,
        at: &RenameAt<'_>,
        src: &Resolved,
        dst: Option<&Resolved>,
    ) -> Result<(Option<u64>, Option<u64>)> {
        let (sp, name, dp, newname) = (at.sp, at.name, at.dp, at.newname);
        let sid = self.ensure_dir_id_locked(sp)?;
        let did = self.ensure_dir_id_locked(dp)?;
        let mut b = Batch::new();
        // The old name: hide whatever OLD has there.
        if self.old_visible(sp, name, src) {
            b.put(sid, name.as_bytes(), &Dentry::Tombstone);
        }
        // The new name.
        let mut moved_dir_id = None;
        let target_rec = if src.kind == Kind::Dir {
            let id = match &src.record {
                Some(Dentry::Dir { id, .. }) => *id,
                _ => self.journal.alloc_id(),
            };
            moved_dir_id = Some(id);
            Some(Dentry::Dir {
                id,
                origin: src.old.as_ref().map(|(p, _, _)| p.clone()),
            })
        } else if src.new.is_none() {
            Some(Dentry::File {
                origin: src.old.as_ref().map(|(p, _, _)| p.clone()),
            })
        } else if dst.is_some_and(|d| self.old_visible(dp, newname, d))
            || self.old_at_default(dp, newname)
        {
            Some(Dentry::Tombstone)
        } else {
            None
        };
        match &target_rec {
            Some(rec) => {
                b.put(did, newname.as_bytes(), rec);
            }
            None => {
                b.delete(did, newname.as_bytes());
            }
        }
        if let Some(d) = dst {
            self.count_removed_old_link(d, &mut b)?;
        }
        if let Some(Resolved {
            record: Some(Dentry::Dir { id, .. }),
            ..
        }) = dst
        {
            for (n, _) in self.journal.list(*id)? {
                b.delete(*id, &n);
            }
        }
        // The NEW half, as a redo intent in the same batch.
        let intent = if let Some((_, st)) = &src.new {
            self.ensure_new_dir_locked(dp)?;
            Some(Intent::Rename {
                from: join(&self.new_path(sp)?, name),
                to: join(&self.new_path(dp)?, newname),
                ino: st.st_ino,
            })
        } else if let Some(Resolved {
            new: Some((_, st)), ..
        }) = dst
        {
            Some(Intent::Remove {
                path: join(&self.new_path(dp)?, newname),
                ino: st.st_ino,
            })
        } else {
            None
        };
        let intent_id = intent.as_ref().map(|i| {
            let id = self.journal.alloc_id();
            b.intent(id, i);
            id
        });
        self.journal.commit(b, true)?;
        Ok((intent_id, moved_dir_id))
    }

    /// The NEW half of a rename whose source is in NEW: renameat.
    fn rename_in_new(&self, at: &RenameAt<'_>, dst: Option<&Resolved>) -> Result<()> {
        let (sp, name, dp, newname) = (at.sp, at.name, at.dp, at.newname);
        // A NEW entry the rename replaces may be the last NEW link of a hard-link
        // group's copy: keep it alive before renameat drops it.
        let mut replaced = None;
        if let Some(Resolved {
            new: Some((_, dst_st)),
            ..
        }) = dst
            && let Some(dfd) = self.new_dir(dp)
            && !self.keep_alive_locked(&dfd, newname, dst_st)?
            && (dst_st.st_nlink == 1 || Kind::from_mode(dst_st.st_mode) == Kind::Dir)
        {
            replaced = Some(*dst_st);
        }
        let sfd = self
            .new_dir(sp)
            .ok_or_else(|| errno_err("NEW source has a NEW parent", libc::EIO))?;
        let dfd = self
            .new_dir(dp)
            .ok_or_else(|| errno_err("NEW parent missing", libc::EIO))?;
        rustix::fs::renameat(sfd.as_fd(), name, dfd.as_fd(), newname).ctx("rename in NEW")?;
        if let Some(st) = replaced {
            self.deleted_from_new(&st);
        }
        Ok(())
    }

    /// The NEW half of a rename of an OLD-only source over `d`, which NEW holds: NEW's entry
    /// goes (unless it is kept alive for its hard-link group).
    fn remove_renamed_over(&self, at: &RenameAt<'_>, d: &Resolved) -> Result<()> {
        let (dp, newname) = (at.dp, at.newname);
        let dfd = self
            .new_dir(dp)
            .ok_or_else(|| errno_err("NEW target has a NEW parent", libc::EIO))?;
        let f = if d.kind == Kind::Dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        let kept = match &d.new {
            Some((_, dst_st)) => self.keep_alive_locked(&dfd, newname, dst_st)?,
            None => false,
        };
        if !kept {
            rustix::fs::unlinkat(dfd.as_fd(), newname, f).ctx("remove target in NEW")?;
            if let Some((_, st)) = &d.new
                && (st.st_nlink == 1 || f == AtFlags::REMOVEDIR)
            {
                self.deleted_from_new(st);
            }
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, s: SetAttr) -> Result<Attr> {
        let _gate = self.changes();
        let inode = self.inode(ino)?;
        let nothing = s.size.is_none()
            && s.mode.is_none()
            && s.uid.is_none()
            && s.gid.is_none()
            && s.atime.is_none()
            && s.mtime.is_none();
        if nothing {
            // Nothing to change (the kernel asks with only a file handle or a ctime): nothing
            // is copied or recorded.
            return self.getattr(ino, s.fh);
        }
        let at = |t: Option<SetTime>| {
            t.map(|t| match t {
                SetTime::At(t) => Some(t),
                SetTime::Now => None,
            })
        };
        // Metadata only, of a file still in OLD: recorded; no data copied.
        if s.size.is_none()
            && self.change_attrs_only(
                &inode,
                &super::metachange::AttrChange {
                    mode: s.mode,
                    uid: s.uid,
                    gid: s.gid,
                    atime: at(s.atime),
                    mtime: at(s.mtime),
                },
            )?
        {
            return self.getattr(ino, s.fh);
        }
        let only_truncating_to_zero = s.size == Some(0);
        self.copy_up(&inode, !only_truncating_to_zero)?;
        self.changing(&inode)?;
        let loc = self.new_loc(&inode)?;
        if let Some(size) = s.size {
            if inode.kind != Kind::File {
                return Err(Error::refused(libc::EINVAL, "truncate of a non-file"));
            }
            let _data = inode.data.read().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = self.partial_of(&inode) {
                p.truncate(&self.journal, size)?;
                self.after_partial_change(&inode, &p)?;
            } else {
                match s.fh.and_then(|fh| self.handles.open_file(fh)) {
                    Some(f) => f.set_len(size).ctx("ftruncate")?,
                    None => loc
                        .open(OFlags::WRONLY)
                        .ctx("open for truncate")?
                        .set_len(size)
                        .ctx("truncate")?,
                }
                self.wrote(&inode);
            }
        }
        if s.uid.is_some() || s.gid.is_some() {
            loc.chown(s.uid, s.gid).ctx("chown")?;
        }
        if let Some(mode) = s.mode {
            if inode.kind == Kind::Symlink {
                return Err(Error::refused(libc::EOPNOTSUPP, "chmod of a symlink"));
            }
            let _mode = inode.mode_lock.lock().unwrap_or_else(|p| p.into_inner());
            loc.chmod(mode).ctx("chmod")?;
        }
        if s.atime.is_some() || s.mtime.is_some() {
            let ts = Timestamps {
                last_access: timespec(s.atime),
                last_modification: timespec(s.mtime),
            };
            loc.utimens(&ts).ctx("utimens")?;
        }
        self.getattr(ino, s.fh)
    }

    /// Clear from a regular file's mode the set-id bits `kill(mode, gid)` names, reading the
    /// mode and writing it back under the inode's mode lock, so a chmod through the view is
    /// never undone. Returns whether it changed the mode. For an `O_TRUNC` open, whose
    /// clearing the kernel leaves to the daemon (src/fuse/creds.rs).
    pub fn clear_mode_bits(&self, ino: u64, kill: impl Fn(u32, u32) -> u32) -> Result<bool> {
        let _gate = self.changes();
        let inode = self.inode(ino)?;
        if inode.kind != Kind::File {
            return Ok(false);
        }
        let a = self.getattr(ino, None)?;
        if kill(u32::from(a.perm), a.gid) == 0 {
            return Ok(false);
        }
        self.copy_up(&inode, true)?;
        self.changing(&inode)?;
        let loc = self.new_loc(&inode)?;
        let _mode = inode.mode_lock.lock().unwrap_or_else(|p| p.into_inner());
        let st = loc.stat().ctx("stat NEW entry")?;
        let mode = st.st_mode & 0o7777;
        let k = kill(mode, st.st_gid);
        if k == 0 {
            return Ok(false);
        }
        loc.chmod(mode & !k).ctx("chmod")?;
        Ok(true)
    }

    /// Where the inode is in NEW (after a copy-up).
    fn new_loc(&self, inode: &Inode) -> Result<Loc> {
        inode
            .node()
            .new
            .clone()
            .ok_or_else(|| errno_err("entry no longer in the view", libc::ESTALE))
    }

    /// Where the inode's data is now: NEW if there, else OLD.
    fn backing_loc(&self, inode: &Inode) -> Result<Loc> {
        let n = inode.node();
        n.new
            .clone()
            .or_else(|| n.old.as_ref().map(|o| o.loc.clone()))
            .ok_or_else(|| not_found("entry no longer in the view"))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.backing_loc(&inode)?.readlink().ctx("readlink")
    }

    /// getxattr/listxattr answer either the size needed (`size == 0`) or the bytes.
    fn xattr_reply(
        size: u32,
        f: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<XattrReply> {
        // A size query (the kernel's, before every write to a file) needs no buffer.
        let mut buf = vec![0u8; size as usize];
        let n = f(&mut buf[..]).ctx("xattr")?;
        buf.truncate(n);
        Ok(if size == 0 {
            XattrReply::Size(n as u32)
        } else {
            XattrReply::Data(buf)
        })
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<XattrReply> {
        let inode = self.inode(ino)?;
        if let Some(changed) = self.changed_xattr(&inode, name) {
            let value = changed.ok_or_else(|| Error::refused(libc::ENODATA, "getxattr"))?;
            return Self::xattr_reply(size, |buf| copy_out(&value, buf));
        }
        let loc = self.backing_loc(&inode)?;
        Self::xattr_reply(size, |buf| loc.getxattr(name, buf)).map_err(|e| {
            // The kernel checks permissions with the ACL it reads here: a store that holds no
            // ACLs (no xattrs at all, an object) gives an entry none, not an error that would
            // refuse every access to it.
            if e.errno() == libc::EOPNOTSUPP && is_acl_name(name) {
                Error::refused(libc::ENODATA, "getxattr")
            } else {
                e
            }
        })
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply> {
        let inode = self.inode(ino)?;
        let loc = self.backing_loc(&inode)?;
        if let Some(names) = self.changed_xattr_names(&inode, &loc)? {
            return Self::xattr_reply(size, |buf| copy_out(&names, buf));
        }
        Self::xattr_reply(size, |buf| loc.listxattr(buf))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let _gate = self.changes();
        self.check_s3_new(S3Refusal::Xattr)?;
        let inode = self.inode(ino)?;
        let change = super::metachange::XattrChange::Set { value, flags };
        if self.change_xattr_only(&inode, name, change)? {
            return Ok(());
        }
        self.copy_up(&inode, true)?;
        self.changing(&inode)?;
        self.new_loc(&inode)?
            .setxattr(
                name,
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as u32),
            )
            .ctx("setxattr")
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let _gate = self.changes();
        let inode = self.inode(ino)?;
        if self.change_xattr_only(&inode, name, super::metachange::XattrChange::Remove)? {
            return Ok(());
        }
        self.copy_up(&inode, true)?;
        self.changing(&inode)?;
        self.new_loc(&inode)?.removexattr(name).ctx("removexattr")
    }

    pub fn fsyncdir(&self, ino: u64) -> Result<()> {
        let inode = self.inode(ino)?;
        if let Some(fd) = self.new_dir(&inode) {
            let d =
                posix::reopen(fd.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY).ctx("open dir")?;
            rustix::fs::fsync(&d).ctx("fsyncdir")?;
        }
        Ok(())
    }

    /// A directory's fd in NEW, if it is there.
    pub(crate) fn new_dir(&self, dir: &Inode) -> Option<Arc<OwnedFd>> {
        dir.node().new.as_ref().and_then(|l| l.dir_fd().cloned())
    }

    /// After one of an inode's names went away or moved, point its NEW location at a name
    /// that NEW still has for this very inode, else at the kept-alive copy of its hard-link
    /// group in the work dir, else at nothing (then only its open files reach it).
    fn relocate(&self, inode: &Inode) {
        let (names, ids, group) = {
            let n = inode.node();
            if !matches!(n.new, Some(Loc::At(..))) {
                return;
            }
            (n.names.clone(), n.ids.clone(), n.old_group)
        };
        let is_ours = |st: &rustix::fs::Stat| ids.contains(&Identity::New(st.st_dev, st.st_ino));
        let mut loc = None;
        for (p, name) in names {
            if let Ok(parent) = self.inode(p)
                && let Some(dfd) = self.new_dir(&parent)
                && posix::stat_at(dfd.as_fd(), &name).is_ok_and(|st| is_ours(&st))
            {
                loc = Some(Loc::At(dfd, name));
                break;
            }
        }
        if loc.is_none()
            && let Some((dev, ino)) = group
            && let Ok(work) = posix::open_child(self.new.root(), OsStr::new(super::WORK_DIR))
        {
            let kept = OsString::from(super::keep_alive_name(dev, ino));
            if posix::stat_at(work.as_fd(), &kept).is_ok_and(|st| is_ours(&st)) {
                loc = Some(Loc::At(Arc::new(work), kept));
            }
        }
        inode.node().new = loc;
    }
}

/// A rename's two places: the source's parent and name, the target's parent and name.
struct RenameAt<'a> {
    sp: &'a Arc<Inode>,
    name: &'a OsStr,
    dp: &'a Arc<Inode>,
    newname: &'a OsStr,
}

pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Whether `name` is one of the POSIX ACL xattrs, which the kernel reads to check permissions.
fn is_acl_name(name: &OsStr) -> bool {
    let n = name.as_bytes();
    n == b"system.posix_acl_access" || n == b"system.posix_acl_default"
}
