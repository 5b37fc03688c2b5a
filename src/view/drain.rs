//! What the copier asks of the view: walk it, copy what is still only in OLD, check what was
//! copied against OLD, and keep copy records honest when the view changes an entry.
//!
//! The copier walks the view itself, not OLD: so it copies exactly what applications see
//! (redirects followed, tombstoned names skipped), places each copy where the entry is now,
//! and shares each inode's claim with copy-up (one copy of a file at a time, the view's first).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::inode::{CopyState, Inode, ROOT_INO};
use super::{Kind, View, WORK_DIR};
use crate::journal::{Batch, CopyRecord, Done, Fingerprint};
use crate::store::copy::{self, Tick, apply_meta, copy_data, copy_xattrs};
use crate::store::posix::{self, Loc};
use crate::view::error::{Context, Error, Result};

/// What [`View::check_s3_new`] checks.
pub(crate) enum S3Refusal<'a> {
    Link,
    Xattr,
    Name(&'a std::ffi::OsStr),
}

/// Prefix of the temporary names a recopy uses in [`WORK_DIR`]; leftovers of a crash are
/// removed when the view opens.
/// A recopy built aside (see [`View::recopy`]): the namespace lock it holds, the work dir,
/// and the copy's st_dev, st_ino, file handle and bytes.
type Recopied<'a> = (
    std::sync::RwLockWriteGuard<'a, ()>,
    OwnedFd,
    (u64, u64, Vec<u8>, u64),
);

const RECOPY_PREFIX: &str = "recopy-";

/// What checking a NEW entry against OLD found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The entry is the view's own (created or changed through the view): nothing to check.
    Local,
    /// Still an exact copy: OLD did not change since.
    Same,
    /// OLD changed since the copy; `recopied` when the copy was just taken again.
    Stale { origin: Vec<u8>, recopied: bool },
    /// OLD's entry is gone since the copy: the copier's pass removed the copy from the view
    /// and NEW (or will, once what is below a directory has gone).
    Gone { origin: Vec<u8> },
}

impl View {
    pub fn root(&self) -> Arc<Inode> {
        self.inode(ROOT_INO)
            .expect("the root inode is never forgotten")
    }

    /// The names the view shows in `dir`, with their kinds.
    pub fn children(&self, dir: &Inode) -> Result<Vec<(OsString, Kind)>> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .list(dir)?
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect())
    }

    /// The inode at `name` in `dir`, counting one lookup (give it back with [`View::release_lookup`]).
    /// `None` when the name went away meanwhile.
    pub fn child(&self, dir: &Inode, name: &OsStr) -> Result<Option<Arc<Inode>>> {
        match self.lookup_entry(dir.ino, name) {
            Ok((inode, _)) => Ok(Some(inode)),
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `inode`, which came by a queue, held for the caller's work: `None` when the kernel
    /// forgot it (the entry's live inode, if any, is another; the next lookup or pass finds it).
    pub fn pin<'a>(&'a self, inode: &'a Arc<Inode>) -> Option<Pinned<'a>> {
        // (`then`, not `then_some`: a guard made for a refused pin would give back, when
        // dropped, a lookup it never took.)
        self.inodes.pin(inode).then(|| Pinned { view: self, inode })
    }

    /// Give back the lookup [`View::child`] took.
    pub fn release_lookup(&self, inode: &Inode) {
        self.forget(inode.ino, 1);
    }

    /// Where the entry is in the view now (for messages and error records).
    pub fn view_path(&self, inode: &Inode) -> Vec<u8> {
        self.new_path(inode).unwrap_or_else(|_| b"?".to_vec())
    }

    /// The view path of `name` in the directory `dir`.
    pub fn child_path(&self, dir: &Inode, name: &OsStr) -> Vec<u8> {
        super::join(&self.view_path(dir), name)
    }

    /// The view path of `name` in the directory `ino`, or of `ino` itself, for a log line
    /// ("/?/name" where the directory is no longer known).
    pub fn log_path(&self, ino: u64, name: Option<&OsStr>) -> String {
        let dir = self
            .inode(ino)
            .map_or_else(|_| b"?".to_vec(), |i| self.view_path(&i));
        let p = match name {
            Some(n) => super::join(&dir, n),
            None => dir,
        };
        super::display_path(&p)
    }

    /// What backs the entry now: NEW's entry if there is one, else OLD's.
    pub fn backing(&self, inode: &Inode) -> Option<Loc> {
        let n = inode.node();
        n.new
            .clone()
            .or_else(|| n.old.as_ref().map(|o| o.loc.clone()))
    }

    /// OLD's entry holding exactly what the view shows for this non-directory, if there is
    /// one: the entry itself while it is OLD-only, or the origin of a copy OLD still matches.
    pub fn old_source(&self, inode: &Inode) -> Result<Option<Loc>> {
        if inode.kind == Kind::Dir || self.is_single() {
            return Ok(None);
        }
        let (new, old) = {
            let n = inode.node();
            (n.new.clone(), n.old.clone())
        };
        if new.is_none() {
            return Ok(old.map(|o| o.loc));
        }
        let Some((_, _, rec)) = self.copy_record(inode)? else {
            return Ok(None);
        };
        let Ok(Some(loc)) = self.old.locate_at(&rec.origin, rec.is_dir) else {
            return Ok(None);
        };
        match loc.stat() {
            Ok(st) if Fingerprint::of(&st) == rec.fp => Ok(Some(loc)),
            _ => Ok(None),
        }
    }

    pub fn in_new(&self, inode: &Inode) -> bool {
        inode.node().new.is_some()
    }

    /// A copy the view knew (`inode`'s NEW side) that is gone from NEW: the inode is shown
    /// from OLD again, for the copier to copy anew (`execute --recopy-lost`).
    pub fn drop_lost_new_side(&self, inode: &Inode) {
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let mut n = inode.node();
        if n.copy != CopyState::Copy || n.old.is_none() {
            return;
        }
        if let Some(loc) = &n.new
            && loc
                .stat()
                .is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT))
        {
            n.new = None;
            n.copy = CopyState::Local;
        }
    }

    /// Whether `inode`, shown from OLD only, is an entry NEW took from OLD and has lost since
    /// (removed or lost in NEW behind ferryfs's back): the journal marks every OLD entry whose
    /// copy took its name in NEW ([`Batch::taken`]). A further name of an OLD hard-link group
    /// whose copy NEW still holds is not lost: the view links it to that copy.
    pub fn lost_copy(&self, inode: &Inode) -> Result<bool> {
        let Some(old) = inode.node().old.clone() else {
            return Ok(false);
        };
        if self.is_single() || inode.node().new.is_some() {
            return Ok(false);
        }
        // Most entries were never taken: one journal read says so, without a stat of OLD.
        let old_id = inode.node().ids.iter().find_map(|id| match id {
            super::inode::Identity::Old(dev, ino) => Some((*dev, *ino)),
            _ => None,
        });
        if let Some((dev, ino)) = old_id
            && !self.journal.has_taken(dev, ino)?
        {
            return Ok(false);
        }
        let st = old.loc.stat().ctx("stat OLD entry")?;
        let fp = Fingerprint::of(&st);
        if !self.journal.was_taken(&fp)? {
            return Ok(false);
        }
        if inode.kind != Kind::Dir && st.st_nlink > 1 {
            let copy = self.journal.hardlink(fp.dev, fp.ino)?.and_then(|g| g.copy);
            if let Some(h) = copy
                && self.open_group_copy(fp.dev, fp.ino, &h).is_ok()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Make a batch of pending copies durable (one syncfs of NEW) and name them.
    pub fn finish_copies(
        &self,
        batch: Vec<super::Pending>,
    ) -> Vec<(Arc<Inode>, Result<super::Copied>)> {
        if batch.is_empty() {
            return Vec::new();
        }
        let synced = posix::reopen(self.new.root(), OFlags::RDONLY | OFlags::DIRECTORY)
            .and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
        if let Err(e) = synced {
            return batch
                .into_iter()
                .map(|p| {
                    (
                        p.inode_arc(),
                        Err(Error::Store {
                            op: "syncfs NEW",
                            source: std::io::Error::from_raw_os_error(
                                e.raw_os_error().unwrap_or(libc::EIO),
                            ),
                        }),
                    )
                })
                .collect();
        }
        self.finish_pending(batch)
    }

    pub fn done(&self) -> Done {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebase the done counters (after a clean pass: what is in NEW is what was moved).
    pub fn set_done(&self, d: Done) -> Result<()> {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = d;
        let mut b = Batch::new();
        b.done(&d);
        self.journal.commit(b, true)?;
        Ok(())
    }

    /// An application read or wrote through the view.
    pub(crate) fn note_io(&self) {
        // Stored at most once a millisecond: readers on every core would otherwise write the
        // same cache line on every request.
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        if now.saturating_sub(self.last_io.load(Ordering::Relaxed)) >= 1_000_000 {
            self.last_io.store(now, Ordering::Relaxed);
        }
    }

    /// How long since an application last did I/O through the view.
    pub fn idle_for(&self) -> Duration {
        let last = self.last_io.load(Ordering::Relaxed);
        if last == 0 {
            return Duration::MAX;
        }
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(last - 1))
    }

    /// How often one entry's copy is checked again because the kernel looked it up.
    const RECHECK_EVERY: Duration = Duration::from_secs(30);

    /// A kernel lookup found `inode`: if it is (or may be) a copy of OLD, queue it for a check
    /// against OLD, at most once per [`Self::RECHECK_EVERY`]. Never blocks the lookup.
    pub(crate) fn note_lookup(&self, inode: &Arc<Inode>) {
        if self.is_single() || inode.kind == Kind::Dir {
            return;
        }
        {
            let mut n = inode.node();
            if n.new.is_none()
                || n.copy == CopyState::Local
                || n.rechecked
                    .is_some_and(|t| t.elapsed() < Self::RECHECK_EVERY)
            {
                return;
            }
            n.rechecked = Some(std::time::Instant::now());
        }
        let _ = self.rechecks.try_send(inode.clone());
    }

    /// Copies the kernel looked up since, to check against OLD.
    pub fn rechecks(&self) -> crossbeam_channel::Receiver<Arc<Inode>> {
        self.rechecks_rx.clone()
    }

    /// Entries applications touched while OLD-only, for the copier to take first.
    pub fn touched(&self) -> crossbeam_channel::Receiver<Arc<Inode>> {
        self.touched_rx.clone()
    }

    pub(crate) fn note_touched(&self, inode: &Arc<Inode>) {
        if !self.is_single() {
            let _ = self.touched.try_send(inode.clone());
        }
    }

    /// Shared hold on the view's changes (see `gate`).
    pub(crate) fn changes(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.note_edit();
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn note_edit(&self) {
        self.edits.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves whenever the view or the copier may have changed NEW: changes through the view,
    /// and every entry the copier brought over.
    pub fn generation(&self) -> u64 {
        let d = self.done();
        self.edits
            .load(Ordering::Relaxed)
            .wrapping_add(self.ns_changes())
            .wrapping_add(d.files)
            .wrapping_add(d.dirs)
            .wrapping_add(d.bytes)
    }

    /// Hold every change through the view until the guard drops (applications' writes,
    /// creations, renames... wait); reads and lookups go on.
    pub fn quiesce(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// After commit or abort: one store only, OLD no longer consulted (and its fds closed).
    pub fn set_single(&self) {
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        self.single.store(true, Ordering::Release);
        self.inodes.for_each(|inode| {
            let mut n = inode.node();
            n.old = None;
            n.subdirs = None;
        });
    }

    /// Whether OLD is an S3 store.
    pub fn old_is_s3(&self) -> bool {
        self.old.is_s3()
    }

    /// For the copier, before its lookup of `name` in `dir`: an S3 OLD's object that NEW does
    /// not hold yet is asked for now, outside the namespace lock (the lookup and the copy then
    /// find the answer; see `S3Tree::prefetch`); `data`: a small one's bytes too (not when
    /// remote workers copy it).
    pub fn prefetch_old(&self, dir: &Inode, name: &std::ffi::OsStr, data: bool) {
        if self.is_single() || !self.old_is_s3() {
            return;
        }
        let (old, new) = {
            let n = dir.node();
            (
                n.old.clone(),
                n.new.as_ref().and_then(|l| l.dir_fd().cloned()),
            )
        };
        if let Some(fd) = new
            && crate::store::posix::stat_at(fd.as_fd(), name).is_ok()
        {
            return;
        }
        if let Some(crate::view::inode::OldRef {
            loc: Loc::Obj(e), ..
        }) = old
            && e.is_dir()
        {
            e.tree.prefetch(&e.rel, name, data);
        }
    }

    /// NEW is an S3 bucket (the view's NEW its staging tree).
    pub fn set_s3_new(&self) {
        self.s3_new.store(true, Ordering::Release);
    }

    /// What an S3 NEW cannot hold, refused up front (DESIGN: nothing silently lost).
    pub(crate) fn check_s3_new(&self, what: S3Refusal<'_>) -> Result<()> {
        if !self.s3_new.load(Ordering::Acquire) {
            return Ok(());
        }
        match what {
            S3Refusal::Link => Err(crate::view::error::Error::refused(
                libc::EPERM,
                "hard links cannot be kept in an S3 NEW",
            )),
            S3Refusal::Xattr => Err(crate::view::error::Error::refused(
                libc::EOPNOTSUPP,
                "extended attributes cannot be kept in an S3 NEW",
            )),
            S3Refusal::Name(n) if n.to_str().is_none() => Err(crate::view::error::Error::refused(
                libc::EINVAL,
                "an S3 NEW takes UTF-8 names only",
            )),
            S3Refusal::Name(_) => Ok(()),
        }
    }

    pub fn is_single(&self) -> bool {
        self.single.load(Ordering::Acquire)
    }

    /// Before the view changes a NEW entry's data or metadata: if it was a plain copy of OLD,
    /// its copy record goes first, durably (from now on the entry is the view's own, which
    /// abort replays into OLD and verify does not compare).
    ///
    /// A recopy of the entry in flight (OLD changed behind the view's back) finishes first, at
    /// full speed, and the change applies on top of OLD's latest bytes: the claim makes the
    /// view wait, so it never writes into a copy a recopy is about to replace or rewrite.
    pub(crate) fn changing(&self, inode: &Inode) -> Result<()> {
        if inode.node().copy == CopyState::Local {
            return Ok(());
        }
        inode.cancel.store(true, Ordering::Release);
        let _claim = inode.claim.lock().unwrap_or_else(|p| p.into_inner());
        inode.cancel.store(false, Ordering::Release);
        let (state, loc) = {
            let n = inode.node();
            (n.copy, n.new.clone())
        };
        if state == CopyState::Local {
            return Ok(());
        }
        let Some(loc) = loc else {
            return Ok(());
        };
        let st = loc.stat().ctx("stat NEW entry")?;
        if let Some(rec) = self.journal.copy(st.st_dev, st.st_ino)? {
            // Where it came from stays known: OLD removing that entry behind the view later
            // conflicts with this change (see `check_origin`).
            let mut b = Batch::new();
            b.clear_copy(st.st_dev, st.st_ino)
                .origin(st.st_dev, st.st_ino, &rec.origin);
            self.journal.commit(b, true)?;
        }
        inode.node().copy = CopyState::Local;
        Ok(())
    }

    /// An entry the view changed (no copy record) whose OLD origin OLD removed behind the
    /// view: a conflict, which the operator settles (`ferryfs resolve` keeps the view's
    /// entry; removing it through the view follows OLD).
    /// `follow`: the copier's pass (a check changes nothing).
    fn check_origin(&self, inode: &Inode, follow: bool) -> Result<()> {
        let Some(loc) = inode.node().new.clone() else {
            return Ok(());
        };
        let Ok(st) = loc.stat() else {
            return Ok(());
        };
        let Some(origin) = self.journal.origin_of(st.st_dev, st.st_ino)? else {
            return Ok(());
        };
        match self.old.locate_path(&origin, inode.kind == Kind::Dir) {
            // A directory OLD removed whose entries the view changed: it goes once they have
            // (a removal through the view, or OLD's removals followed); what the view made in
            // it keeps it.
            Err(e) if posix::vanished(&e) && inode.kind == Kind::Dir => match follow {
                true => self.follow_removal(inode, &origin),
                false => Ok(()),
            },
            Err(e) if posix::vanished(&e) => Err(Error::Conflict(format!(
                "changed through the view, and OLD's {} it came from was removed behind the \
                 view; `ferryfs resolve --state DIR PATH` keeps the view's entry, removing it \
                 through the view follows OLD",
                super::display_path(&origin)
            ))),
            _ => Ok(()),
        }
    }

    /// A plain copy whose OLD origin OLD removed behind the view: it leaves the view and NEW
    /// too (through the view's own unlink or rmdir, so nothing of it is left in the journal),
    /// unless it moved through the view since (a conflict). A directory goes once the entries
    /// below it have (a later pass).
    fn follow_removal(&self, inode: &Inode, origin: &[u8]) -> Result<()> {
        if self.view_path(inode) != origin {
            return Err(Error::Conflict(format!(
                "renamed through the view, and OLD's {} it came from was removed behind the \
                 view; `ferryfs resolve --state DIR PATH` keeps the view's entry, removing it \
                 through the view follows OLD",
                super::display_path(origin)
            )));
        }
        let (parent, name) = self.placement(inode)?;
        let r = if inode.kind == Kind::Dir {
            self.rmdir_as(parent.ino, &name, false)
        } else {
            self.unlink_as(parent.ino, &name, false)
        };
        match r {
            Ok(()) => {
                tracing::info!(
                    path = %String::from_utf8_lossy(origin),
                    "removed from OLD behind the view after it was copied: removed from the view and NEW"
                );
                self.invalidate(parent.ino);
                Ok(())
            }
            Err(e) if e.errno() == libc::ENOTEMPTY => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The entry at view path `path` (relative, as `view_path` gives it), looked up from the
    /// root; the lookups it counts are given back.
    pub fn entry_at(&self, path: &[u8]) -> Result<Arc<Inode>> {
        let mut cur = self.root();
        for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
            let (next, _) = self.lookup_entry(cur.ino, OsStr::from_bytes(name))?;
            self.release_lookup(&next);
            cur = next;
        }
        Ok(cur)
    }

    /// `ferryfs resolve`: keep the view's entry at `path` as it is, whatever OLD did to where
    /// it came from: it no longer follows OLD (no origin, no copy record), and its conflict
    /// is over.
    pub fn keep_as_is(&self, path: &[u8]) -> Result<()> {
        let inode = self.entry_at(path)?;
        self.changing(&inode)?;
        let loc = inode.node().new.clone().ok_or_else(|| {
            crate::view::error::errno_err("the entry is not in NEW", libc::ENOENT)
        })?;
        let st = loc.stat().ctx("stat NEW entry")?;
        let mut b = Batch::new();
        b.clear_origin(st.st_dev, st.st_ino)
            .clear_error(&self.view_path(&inode));
        self.journal.commit(b, true)?;
        Ok(())
    }

    /// How many namespace changes the view has made (a pass with none during it cannot have
    /// missed an entry that moved).
    pub fn ns_changes(&self) -> u64 {
        self.ns_changes.load(Ordering::Relaxed)
    }

    /// A change of OLD's followed in the view (a name OLD removed): a namespace change, but
    /// not the view's own (the directory stays a copy of OLD's).
    pub(crate) fn note_old_followed(&self, dir: &Inode) {
        self.ns_changes.fetch_add(1, Ordering::Relaxed);
        dir.node().subdirs = None;
    }

    /// The entries of `dir` changed through the view: its counted subdirectories are stale, and
    /// its times are the view's from now on (the copier no longer gives it OLD's).
    pub(crate) fn dir_changed(&self, dir: &Inode) {
        self.ns_changes.fetch_add(1, Ordering::Relaxed);
        let (state, loc) = {
            let mut n = dir.node();
            n.subdirs = None;
            (n.copy, n.new.clone())
        };
        if state == CopyState::Local {
            return;
        }
        if let Some(loc) = loc
            && let Ok(st) = loc.stat()
        {
            let mut b = Batch::new();
            b.clear_copy(st.st_dev, st.st_ino);
            // Where it came from stays known (a removal in OLD later: `check_origin`).
            if let Ok(Some(rec)) = self.journal.copy(st.st_dev, st.st_ino) {
                b.origin(st.st_dev, st.st_ino, &rec.origin);
            }
            if let Err(e) = self.journal.commit(b, false) {
                tracing::warn!(error = %e, "clearing a directory's copy record");
                return;
            }
        }
        dir.node().copy = CopyState::Local;
    }

    /// The copy record of the inode's NEW entry, if it still is a plain copy of OLD. A record
    /// whose file handle no longer matches (NEW reused the inode number) is dropped.
    fn copy_record(&self, inode: &Inode) -> Result<Option<(Loc, rustix::fs::Stat, CopyRecord)>> {
        let (state, loc) = {
            let n = inode.node();
            (n.copy, n.new.clone())
        };
        let Some(loc) = loc else { return Ok(None) };
        if state == CopyState::Local {
            return Ok(None);
        }
        let st = match loc.stat() {
            Ok(st) => st,
            // The copy is gone from NEW behind ferryfs's back (the view still knew it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && state == CopyState::Copy => {
                return Err(Error::lost());
            }
            Err(e) => return Err(e).ctx("stat NEW entry"),
        };
        let rec = match self.journal.copy(st.st_dev, st.st_ino)? {
            Some(r) if r.handle.is_empty() || loc.handle().ok().as_ref() == Some(&r.handle) => r,
            Some(_) => {
                let mut b = Batch::new();
                b.clear_copy(st.st_dev, st.st_ino);
                self.journal.commit(b, false)?;
                inode.node().copy = CopyState::Local;
                return Ok(None);
            }
            None => {
                inode.node().copy = CopyState::Local;
                return Ok(None);
            }
        };
        inode.node().copy = CopyState::Copy;
        Ok(Some((loc, st, rec)))
    }

    /// A directory the copier has finished with: if it is still a plain copy of OLD's, give
    /// it OLD's times again (linking its entries in changed them).
    pub fn finish_dir(&self, dir: &Inode) -> Result<()> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        if self.is_single() {
            return Ok(());
        }
        let Some((loc, nst, mut rec)) = self.copy_record(dir)? else {
            return Ok(());
        };
        let Some(old) = dir.node().old.clone() else {
            return Ok(());
        };
        let ost = old.loc.stat().ctx("stat OLD dir")?;
        loc.utimens(&copy::timestamps(&ost))
            .ctx("utimens NEW dir")?;
        if rec.fp != Fingerprint::of(&ost) {
            // Entries came or went in OLD behind the view: the walk merges them; the record
            // follows OLD's directory as it is now.
            rec.fp = Fingerprint::of(&ost);
            let mut b = Batch::new();
            b.copy(nst.st_dev, nst.st_ino, &rec)
                .taken(&rec.fp, nst.st_dev, nst.st_ino);
            self.journal.commit(b, false)?;
        }
        Ok(())
    }

    /// Check a NEW entry that was copied from OLD against OLD now; with `recopy`, take a
    /// stale copy again (OLD changed behind the view's back).
    pub fn check_copy(&self, inode: &Inode, recopy: bool, tick: Tick<'_>) -> Result<Check> {
        let Some((_, nst, mut rec)) = self.copy_record(inode)? else {
            self.check_origin(inode, recopy)?;
            return Ok(Check::Local);
        };
        let names_followed = recopy && inode.kind == Kind::File && nst.st_nlink > 1;
        if names_followed && self.follow_old_names(inode, &mut rec, &nst)? {
            // Names OLD removed went, and no name the view knows still names the file in
            // OLD: its other names in NEW are checked as the walk meets them.
            return Ok(Check::Gone { origin: rec.origin });
        }
        let origin = rec.origin.clone();
        let now = match self.old.locate_path(&origin, rec.is_dir) {
            Ok((_, st)) => st,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                // A hard-linked copy whose other names went meanwhile (another worker's
                // check): the names it has now tell where OLD has it.
                if recopy && inode.kind == Kind::File && !names_followed {
                    if self.follow_old_names(inode, &mut rec, &nst)? {
                        return Ok(Check::Gone { origin });
                    }
                    if rec.origin != origin {
                        return self.check_copy(inode, recopy, tick);
                    }
                }
                // Removed from OLD behind the view: the view follows (the copier's pass; a
                // check only reports it).
                if recopy {
                    self.follow_removal(inode, &origin)?;
                }
                return Ok(Check::Gone { origin });
            }
            Err(e) => {
                return Err(Error::Store {
                    op: "open OLD entry",
                    source: e,
                });
            }
        };
        if Fingerprint::of(&now) == rec.fp {
            return Ok(Check::Same);
        }
        if !recopy {
            return Ok(Check::Stale {
                origin,
                recopied: false,
            });
        }
        let recopied = self.recopy(inode, &rec, tick)?;
        if recopied {
            self.invalidate(inode.ino);
        }
        Ok(Check::Stale { origin, recopied })
    }

    /// A copy with several names in NEW (an OLD hard-link group's): each of its names in a
    /// directory that is still a plain copy of OLD's must still name the same file in OLD. A
    /// name OLD removed behind the view leaves the view and NEW; a name OLD gave to another
    /// file leaves NEW, so that the view shows OLD's file there (the copier takes it). When the
    /// record's origin no longer names the file in OLD, a name that still does becomes it.
    /// `true` when names went and none of those the view knows still names the file in OLD.
    fn follow_old_names(
        &self,
        inode: &Inode,
        rec: &mut CopyRecord,
        nst: &rustix::fs::Stat,
    ) -> Result<bool> {
        let names = inode.node().names.clone();
        let same = |st: &rustix::fs::Stat| (st.st_dev, st.st_ino) == (rec.fp.dev, rec.fp.ino);
        let mut kept = None;
        let mut origin_kept = false;
        let mut went = false;
        for (p, name) in names {
            let Ok(parent) = self.inode(p) else { continue };
            if !self.plain_copy_dir(&parent)? {
                continue;
            }
            let path = self.child_path(&parent, &name);
            match self.old.locate_path(&path, false) {
                Ok((_, st)) if same(&st) => {
                    origin_kept |= path == rec.origin;
                    kept.get_or_insert(path);
                }
                Ok(_) => {
                    went = true;
                    self.drop_replaced_name(&parent, &name, nst)?;
                    tracing::info!(
                        path = %String::from_utf8_lossy(&path),
                        "a hard link OLD gave to another file behind the view: the view shows OLD's file"
                    );
                }
                Err(e) if posix::vanished(&e) => match self.unlink_as(parent.ino, &name, false) {
                    Ok(()) => {
                        went = true;
                        tracing::info!(
                            path = %String::from_utf8_lossy(&path),
                            "removed from OLD behind the view after it was copied: removed from the view and NEW"
                        );
                        self.invalidate(parent.ino);
                    }
                    Err(e) if e.errno() == libc::ENOENT => {}
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    return Err(Error::Store {
                        op: "open OLD entry",
                        source: e,
                    });
                }
            }
        }
        let Some(kept) = kept else { return Ok(went) };
        if origin_kept {
            return Ok(false);
        }
        let origin_same = match self.old.locate_path(&rec.origin, false) {
            Ok((_, st)) => same(&st),
            Err(e) if posix::vanished(&e) => false,
            Err(e) => {
                return Err(Error::Store {
                    op: "open OLD entry",
                    source: e,
                });
            }
        };
        if !origin_same {
            rec.origin = kept;
            let mut b = Batch::new();
            b.copy(nst.st_dev, nst.st_ino, rec);
            self.journal.commit(b, false)?;
        }
        Ok(false)
    }

    /// Whether `dir`'s names are OLD's as copied: a directory still a plain copy of OLD's at
    /// the same path (prepare gives NEW's root a copy record too).
    fn plain_copy_dir(&self, dir: &Inode) -> Result<bool> {
        Ok(self
            .copy_record(dir)?
            .is_some_and(|(_, _, rec)| rec.origin == self.view_path(dir)))
    }

    /// NEW's name `name` in `parent`, a link of the copy `nst`, goes from NEW (not from the
    /// view: OLD's entry there shows through), as OLD gave the name to another file.
    fn drop_replaced_name(
        &self,
        parent: &Inode,
        name: &OsStr,
        nst: &rustix::fs::Stat,
    ) -> Result<()> {
        let _gate = self.changes();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let Some(r) = self.resolve(parent, name)? else {
            return Ok(());
        };
        let Some((_, st)) = &r.new else {
            return Ok(());
        };
        if (st.st_dev, st.st_ino) != (nst.st_dev, nst.st_ino) || st.st_nlink < 2 {
            return Ok(());
        }
        let pfd = self.new_dir(parent).ok_or_else(|| {
            crate::view::error::errno_err("NEW entry has a NEW parent", libc::EIO)
        })?;
        copy::keeping_dir_times(&pfd, || {
            rustix::fs::unlinkat(pfd.as_fd(), name, AtFlags::empty()).ctx("unlink in NEW")
        })?;
        self.forget_name(&r, parent.ino, name);
        self.invalidate(parent.ino);
        Ok(())
    }

    /// Take a stale copy again from OLD. The new copy is built aside (an anonymous file, then a
    /// name in the work dir) and renamed over the stale one: readers see the old or the new
    /// copy, never a mix. A file with several names is rewritten in place instead (a rename
    /// would split its names). `false` when the view moved or removed the entry meanwhile.
    ///
    /// Runs under the claim. A view about to change the entry waits for it ([`Self::changing`]
    /// sets `cancel`): from then on the copy runs unpaced, so the wait is as short as the copy.
    fn recopy(&self, inode: &Inode, rec: &CopyRecord, tick: Tick<'_>) -> Result<bool> {
        let Ok(_claim) = inode.claim.try_lock() else {
            return Ok(false);
        };
        // The origin the record names (a NEW file's inode keeps no OLD side of its own).
        let old = match self.old.locate_path(&rec.origin, rec.is_dir) {
            Ok((loc, _)) => super::inode::OldRef {
                path: rec.origin.clone(),
                loc,
            },
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(false);
            }
            Err(e) => {
                return Err(Error::Store {
                    op: "open OLD entry",
                    source: e,
                });
            }
        };
        let ost = old.loc.stat().ctx("stat OLD entry")?;
        if inode.kind == Kind::Dir {
            return self.recopy_dir(inode, &old.loc, &ost);
        }
        let placed_at = match &inode.node().new {
            Some(Loc::At(d, nm)) => Some((d.clone(), nm.clone())),
            _ => None,
        };
        let Some((pfd, name)) = placed_at else {
            return Ok(false);
        };
        let cur = posix::stat_at(pfd.as_fd(), &name).ctx("stat NEW copy")?;
        // The view waiting for the claim (to change the entry) wants this done now.
        let mut tick = |n| inode.cancel.load(Ordering::Acquire) || tick(n);
        // Several names share NEW's copy, or will: a rename over one name would split them. NEW's
        // link count alone can be stale (a FUSE NEW's attributes are cached), and a name OLD
        // added may be joined to the copy after this check: OLD's own count and the journal's
        // hard-link group say so too.
        let shared = cur.st_nlink > 1
            || ost.st_nlink > 1
            || self
                .journal
                .hardlink(ost.st_dev, ost.st_ino)?
                .is_some_and(|g| g.copy.is_some());
        if inode.kind == Kind::File && shared && old.loc.object().is_none() {
            return self.recopy_in_place(inode, &old.loc, &cur, &pfd, &name, &mut tick);
        }
        let tmp_name = OsString::from(format!("{RECOPY_PREFIX}{}", inode.ino));
        // Names are made in the work dir under `ns` only (see [`Self::drop_empty_work_dir`]).
        let built = if inode.kind == Kind::File {
            self.recopy_file_aside(&old.loc, &ost, &pfd, &tmp_name, &mut tick)?
        } else {
            Some(self.recopy_special_aside(inode, &old.loc, &ost, &tmp_name)?)
        };
        let Some((ns, work, (tdev, tino, handle, bytes))) = built else {
            return Ok(false);
        };
        let _ns = ns;
        // The view moved or removed the entry meanwhile: this copy goes.
        let still = self.copy_record(inode)?;
        let placed =
            matches!(&inode.node().new, Some(Loc::At(d, n)) if Arc::ptr_eq(d, &pfd) && *n == name);
        if still.is_none() || !placed {
            let _ = rustix::fs::unlinkat(&work, &tmp_name, AtFlags::empty());
            return Ok(false);
        }
        let mut b = Batch::new();
        b.clear_copy(cur.st_dev, cur.st_ino).copy(
            tdev,
            tino,
            &CopyRecord {
                origin: rec.origin.clone(),
                fp: Fingerprint::of(&ost),
                handle,
                is_dir: false,
            },
        );
        // (NEW keeps the earlier copy under the name until the rename below.)
        b.taken(&Fingerprint::of(&ost), tdev, tino);
        self.journal.commit(b, false)?;
        copy::keeping_dir_times(&pfd, || {
            rustix::fs::renameat(&work, &tmp_name, pfd.as_fd(), &name)
                .ctx("rename recopy into place")
        })?;
        let mut b = Batch::new();
        self.keep_number(&mut b, inode, tdev, tino);
        self.journal.commit(b, false)?;
        #[allow(clippy::unnecessary_cast)]
        self.unstub(inode, cur.st_dev as u64, cur.st_ino as u64);
        // The work dir goes when nothing else is in it (no litter left in NEW).
        self.remove_work_dir_if_empty();
        {
            // The copy taken before was counted: only the change in size counts now (done
            // never passes what the view holds).
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            #[allow(clippy::unnecessary_cast)]
            let before = if inode.kind == Kind::File {
                cur.st_size as u64
            } else {
                0
            };
            d.bytes = (d.bytes + bytes).saturating_sub(before);
        }
        tracing::info!(
            path = %String::from_utf8_lossy(&rec.origin),
            "copied again: changed in OLD since it was copied"
        );
        Ok(true)
    }

    /// [`Self::recopy`] of a directory: OLD's metadata again, and the record's fingerprint.
    fn recopy_dir(&self, inode: &Inode, old: &Loc, ost: &rustix::fs::Stat) -> Result<bool> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        let Some((loc, nst, mut rec)) = self.copy_record(inode)? else {
            return Ok(false);
        };
        copy_xattrs(old, &loc)?;
        loc.chown(Some(ost.st_uid), Some(ost.st_gid))
            .ctx("chown NEW dir")?;
        loc.chmod(ost.st_mode).ctx("chmod NEW dir")?;
        loc.utimens(&copy::timestamps(ost)).ctx("utimens NEW dir")?;
        rec.fp = Fingerprint::of(ost);
        let mut b = Batch::new();
        b.copy(nst.st_dev, nst.st_ino, &rec)
            .taken(&rec.fp, nst.st_dev, nst.st_ino);
        self.journal.commit(b, false)?;
        Ok(true)
    }

    /// A file's new copy, built aside: OLD's bytes into an anonymous file, named in the work
    /// dir with OLD's metadata, under `ns` (held on return). `None`: the copy was stopped.
    fn recopy_file_aside(
        &self,
        old: &Loc,
        ost: &rustix::fs::Stat,
        pfd: &Arc<OwnedFd>,
        tmp_name: &OsStr,
        tick: Tick<'_>,
    ) -> Result<Option<Recopied<'_>>> {
        let obj = old.object().cloned();
        let src = match &obj {
            Some(_) => None,
            None => Some(old.open(OFlags::RDONLY).ctx("open OLD file")?),
        };
        let st = match &src {
            Some(f) => posix::stat_fd(f.as_fd()).ctx("stat OLD file")?,
            None => *ost,
        };
        let mut tmp = self.scratch_file(pfd.as_fd(), 0o600)?;
        let fetched = match (&src, &obj) {
            (Some(f), _) => copy_data(f, &tmp, st.st_size as u64, tick)?.into(),
            (None, Some(e)) => copy::fetch_object(e, &tmp, tick)?,
            (None, None) => unreachable!("an OLD file or an OLD object"),
        };
        if !matches!(fetched, copy::Fetched::Done) {
            return Ok(None);
        }
        if let Some(src) = &src {
            copy::copy_xattrs_fd(src, &tmp)?;
        }
        rustix::fs::fsync(&tmp).ctx("fsync copy")?;
        let ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let work = self.work_dir()?;
        tmp.name_in_work(work.as_fd(), tmp_name)?;
        apply_meta(work.as_fd(), tmp_name, &st)?;
        let tst = posix::stat_fd(tmp.as_fd()).ctx("stat copy")?;
        let h = self.new_identity(tmp.as_fd())?;
        Ok(Some((
            ns,
            work,
            (tst.st_dev, tst.st_ino, h, st.st_size as u64),
        )))
    }

    /// A symlink's or special file's new copy, made in the work dir with OLD's metadata,
    /// under `ns` (held on return).
    fn recopy_special_aside(
        &self,
        inode: &Inode,
        old: &Loc,
        ost: &rustix::fs::Stat,
        tmp_name: &OsStr,
    ) -> Result<Recopied<'_>> {
        let target = if inode.kind == Kind::Symlink {
            Some(old.readlink().ctx("readlink OLD")?)
        } else {
            None
        };
        let ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let work = self.work_dir()?;
        let _ = rustix::fs::unlinkat(&work, tmp_name, AtFlags::empty());
        if let Some(target) = target {
            rustix::fs::symlinkat(target.as_slice(), &work, tmp_name)
                .ctx("symlink in the work dir")?;
        } else {
            rustix::fs::mknodat(
                &work,
                tmp_name,
                rustix::fs::FileType::from_raw_mode(ost.st_mode),
                Mode::from_raw_mode(ost.st_mode & 0o7777),
                ost.st_rdev,
            )
            .ctx("mknod in the work dir")?;
        }
        copy_xattrs(
            old,
            &Loc::At(Arc::new(work.try_clone().ctx("dup")?), tmp_name.to_owned()),
        )?;
        apply_meta(work.as_fd(), tmp_name, ost)?;
        let tst = posix::stat_at(work.as_fd(), tmp_name).ctx("stat copy")?;
        Ok((ns, work, (tst.st_dev, tst.st_ino, Vec::new(), 0)))
    }

    /// [`Self::recopy`] of a file with several names in NEW. OLD's bytes go to an anonymous
    /// file first (the slow part, paced), then over the copy's own inode through one file
    /// descriptor checked to be that inode: a rename elsewhere meanwhile cannot redirect the
    /// rewrite. Readers through another name may see the rewrite half done (as they would see
    /// OLD's own rewrite). A crash midway leaves the old fingerprint recorded, so the copy is
    /// still stale and is taken again.
    fn recopy_in_place(
        &self,
        inode: &Inode,
        old: &Loc,
        cur: &rustix::fs::Stat,
        pfd: &Arc<std::os::fd::OwnedFd>,
        name: &OsStr,
        tick: Tick<'_>,
    ) -> Result<bool> {
        let src = old.open(OFlags::RDONLY).ctx("open OLD file")?;
        let st = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
        let tmp = self.scratch_file(pfd.as_fd(), 0o600)?;
        if !copy_data(&src, &tmp, st.st_size as u64, tick)? {
            return Ok(false);
        }
        let dst = Loc::At(pfd.clone(), name.to_owned())
            .open(OFlags::WRONLY)
            .ctx("open NEW copy")?;
        let nst = posix::stat_fd(dst.as_fd()).ctx("stat NEW copy")?;
        // Still the copy's inode, and still a copy (the claim keeps the view's changes out).
        if (nst.st_dev, nst.st_ino) != (cur.st_dev, cur.st_ino) {
            return Ok(false);
        }
        let Some((_, _, mut rec)) = self.copy_record(inode)? else {
            return Ok(false);
        };
        dst.set_len(0).ctx("truncate NEW copy")?;
        copy_data(&tmp, &dst, st.st_size as u64, &mut |_| true)?;
        copy::copy_xattrs_fd(&src, &dst)?;
        copy::set_owner_and_mode(&dst, &st)?;
        rustix::fs::futimens(&dst, &copy::timestamps(&st)).ctx("futimens NEW copy")?;
        rustix::fs::fsync(&dst).ctx("fsync NEW copy")?;
        rec.fp = Fingerprint::of(&st);
        let mut b = Batch::new();
        b.copy(nst.st_dev, nst.st_ino, &rec)
            .taken(&rec.fp, nst.st_dev, nst.st_ino);
        self.journal.commit(b, false)?;
        // (Every byte is NEW's file's now.)
        #[allow(clippy::unnecessary_cast)]
        self.unstub(inode, nst.st_dev as u64, nst.st_ino as u64);
        Ok(true)
    }

    /// Remove NEW's work dir if nothing is in it, so a migration that is executed leaves no
    /// ferryfs litter in NEW. Under `ns` write: every name made in the work dir is made under
    /// `ns` (directory, special file and recopy copies), so none is being made meanwhile.
    pub fn drop_empty_work_dir(&self) {
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        self.remove_work_dir_if_empty();
    }

    /// Run `f`, which makes or removes the work dir, and give NEW's root back the times it had:
    /// ferryfs's own entry is no change of the root as applications see it.
    fn keeping_root_times(
        &self,
        f: impl FnOnce() -> rustix::io::Result<()>,
    ) -> rustix::io::Result<()> {
        let before = posix::stat_fd(self.new.root()).ok();
        let r = f();
        if let (Ok(()), Some(b)) = (&r, before) {
            let _ = rustix::fs::utimensat(
                rustix::fs::CWD,
                posix::proc_path(self.new.root()).as_c_str(),
                &copy::timestamps(&b),
                AtFlags::empty(),
            );
        }
        r
    }

    /// Make NEW's work dir if it is not there (keeping the root's times).
    fn make_work_dir(&self) -> Result<()> {
        match self.keeping_root_times(|| {
            rustix::fs::mkdirat(self.new.root(), WORK_DIR, Mode::from_raw_mode(0o700))
        }) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(e).ctx("mkdir work dir in NEW"),
        }
    }

    /// Remove NEW's work dir if it is empty (keeping the root's times).
    pub(crate) fn remove_work_dir_if_empty(&self) {
        let _ = self.keeping_root_times(|| {
            rustix::fs::unlinkat(self.new.root(), WORK_DIR, AtFlags::REMOVEDIR)
        });
    }

    /// ferryfs's work dir in NEW, created on demand (hidden from the view).
    pub(crate) fn work_dir(&self) -> Result<std::os::fd::OwnedFd> {
        // Opened first: made (a stat and a mkdir more, to keep the root's times) only when
        // it is not there.
        match posix::open_child(self.new.root(), OsStr::new(WORK_DIR)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.make_work_dir()?,
            r => return r.ctx("open work dir"),
        }
        posix::open_child(self.new.root(), OsStr::new(WORK_DIR)).ctx("open work dir")
    }

    /// Remove what a crash left of recopies in the work dir, and the work dir itself when
    /// nothing else is in it. Under `ns` write, as every maker of names there (commit calls
    /// it while a lookup's recheck may still take a copy again).
    pub(crate) fn clean_work_dir(&self) -> Result<()> {
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let Ok(work) = posix::open_child(self.new.root(), OsStr::new(WORK_DIR)) else {
            return Ok(());
        };
        for e in posix::read_dir_names(work.as_fd()).ctx("read work dir")? {
            if e.name.starts_with(RECOPY_PREFIX.as_bytes())
                || e.name
                    .starts_with(super::copyup::NEW_SPECIAL_PREFIX.as_bytes())
                || e.name
                    .starts_with(super::scratch::NEW_FILE_PREFIX.as_bytes())
                || e.name
                    .starts_with(super::remote::REMOTE_FILE_PREFIX.as_bytes())
            {
                rustix::fs::unlinkat(&work, OsStr::from_bytes(&e.name), AtFlags::empty())
                    .ctx("remove a recopy left by a crash")?;
            }
            if e.name.starts_with(super::copyup::NEW_DIR_PREFIX.as_bytes()) {
                rustix::fs::unlinkat(&work, OsStr::from_bytes(&e.name), AtFlags::REMOVEDIR)
                    .ctx("remove a directory copy left by a crash")?;
            }
        }
        self.remove_work_dir_if_empty();
        Ok(())
    }

    /// Whether NEW still holds ferryfs's work dir (kept-alive hard-link copies pending).
    pub fn has_work_dir(&self) -> bool {
        posix::stat_at(self.new.root(), OsStr::new(WORK_DIR)).is_ok()
    }
}

/// How closely `verify` compares a copy with OLD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Type, size, mode, owner, mtime, xattrs, symlink target.
    Meta,
    /// All of that and every byte of data.
    Checksum,
}

fn xattr_map(loc: &Loc) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut list = vec![0u8; 64 * 1024];
    let n = match loc.listxattr(&mut list[..]) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(e).ctx("listxattr"),
    };
    let mut val = vec![0u8; 64 * 1024];
    for name in list[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let len = match loc.getxattr(OsStr::from_bytes(name), &mut val[..]) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e).ctx("getxattr"),
        };
        out.insert(name.to_vec(), val[..len].to_vec());
    }
    Ok(out)
}

/// Whether OLD's bytes (a file or an object) and NEW's file's are the same.
/// Whether OLD's and NEW's files hold the same bytes; when they do, the SHA-256 of them.
/// Reads into a buffer at an offset, giving the length read (short only at the end).
type ReadAt = dyn Fn(&mut [u8], u64) -> Result<usize>;

fn same_bytes(a: &crate::store::Source, b: &ReadAt) -> Result<Option<[u8; 32]>> {
    use sha2::Digest as _;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut hash = sha2::Sha256::new();
    loop {
        let n = a.read_at(&mut ba, off).ctx("read OLD")?;
        let mut m = 0;
        while m < n {
            let k = b(&mut bb[m..n], off + m as u64)?;
            if k == 0 {
                return Ok(None);
            }
            m += k;
        }
        if ba[..n] != bb[..n] {
            return Ok(None);
        }
        if n == 0 {
            let end = b(&mut bb[..1], off)? == 0;
            return Ok(end.then(|| hash.finalize().into()));
        }
        hash.update(&bb[..n]);
        off += n as u64;
    }
}

/// The digest a checksum comparison read of a NEW file, to record (see [`Batch::digest`]).
pub struct ReadDigest {
    pub dev: u64,
    pub ino: u64,
    pub digest: crate::journal::Digest,
}

impl View {
    /// How a copy differs from OLD's entry now, if it does (`None`: equal, or not a copy).
    /// With [`Compare::Checksum`], an equal file's content digest is put in `digest`.
    pub fn compare_copy(
        &self,
        inode: &Inode,
        how: Compare,
        digest: &mut Option<ReadDigest>,
    ) -> Result<Option<String>> {
        let Some((loc, nst, rec)) = self.copy_record(inode)? else {
            return Ok(None);
        };
        let old = match self.old.locate_path(&rec.origin, rec.is_dir) {
            Ok((loc, _)) => loc,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(Some("gone from OLD".into()));
            }
            Err(e) => {
                return Err(Error::Store {
                    op: "open OLD entry",
                    source: e,
                });
            }
        };
        let ost = old.stat().ctx("stat OLD entry")?;
        let kind = Kind::from_mode(nst.st_mode);
        if Kind::from_mode(ost.st_mode) != kind {
            return Ok(Some("type differs".into()));
        }
        if ost.st_mode & 0o7777 != nst.st_mode & 0o7777 && kind != Kind::Symlink {
            return Ok(Some(format!(
                "mode {:o} in NEW, {:o} in OLD",
                nst.st_mode & 0o7777,
                ost.st_mode & 0o7777
            )));
        }
        if (ost.st_uid, ost.st_gid) != (nst.st_uid, nst.st_gid) {
            return Ok(Some(format!(
                "owner {}:{} in NEW, {}:{} in OLD",
                nst.st_uid, nst.st_gid, ost.st_uid, ost.st_gid
            )));
        }
        if (ost.st_mtime, ost.st_mtime_nsec) != (nst.st_mtime, nst.st_mtime_nsec) {
            return Ok(Some("mtime differs".into()));
        }
        match kind {
            Kind::File if ost.st_size != nst.st_size => {
                return Ok(Some(format!(
                    "size {} in NEW, {} in OLD",
                    nst.st_size, ost.st_size
                )));
            }
            Kind::Symlink
                if old.readlink().ctx("readlink OLD")? != loc.readlink().ctx("readlink NEW")? =>
            {
                return Ok(Some("symlink target differs".into()));
            }
            Kind::CharDev | Kind::BlockDev if ost.st_rdev != nst.st_rdev => {
                return Ok(Some("device number differs".into()));
            }
            _ => {}
        }
        if kind != Kind::Symlink && xattr_map(&old)? != xattr_map(&loc)? {
            return Ok(Some("xattrs differ".into()));
        }
        if how == Compare::Checksum && kind == Kind::File {
            let a = old.open_source(OFlags::RDONLY).ctx("open OLD file")?;
            // An S3 NEW's evicted file: its bytes as the view reads them (the bucket's).
            let b: Box<ReadAt> = match self.stub_of(inode) {
                Some(p) => Box::new(move |buf, off| p.read(off, buf)),
                None => {
                    let f = loc.open(OFlags::RDONLY).ctx("open NEW file")?;
                    Box::new(move |buf, off| {
                        use std::os::unix::fs::FileExt;
                        f.read_at(buf, off).ctx("read NEW")
                    })
                }
            };
            let Some(sum) = same_bytes(&a, &*b)? else {
                return Ok(Some("content differs".into()));
            };
            #[allow(clippy::unnecessary_cast)]
            let ctime = (nst.st_ctime as i64, nst.st_ctime_nsec as i64);
            *digest = Some(ReadDigest {
                dev: nst.st_dev,
                ino: nst.st_ino,
                digest: crate::journal::Digest {
                    sha256: sum.iter().map(|b| format!("{b:02x}")).collect(),
                    size: nst.st_size as u64,
                    ctime,
                    at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                },
            });
        }
        Ok(None)
    }
}

/// A lookup counted by [`View::pin`], given back when dropped.
pub struct Pinned<'a> {
    view: &'a View,
    inode: &'a Arc<Inode>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.view.release_lookup(self.inode);
    }
}
