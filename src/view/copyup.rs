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
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::inode::{CopyState, Identity, Inode};
use super::scratch::Scratch;
use super::{Kind, View, keep_alive_name};
use crate::journal::{Batch, CopyRecord, Fingerprint};
use crate::store::copy::{
    Fetched, Tick, apply_meta, copy_data_of, copy_xattrs, copy_xattrs_fd, fetch_object,
    keeping_dir_times, set_owner_and_mode, timestamps,
};
use crate::store::posix::{self, Loc};
use crate::view::error::{Context, Result, errno_err};

/// Copies a batch names per hold of the namespace lock.
const LINKS_PER_LOCK: usize = 8;

/// Prefix of the names, in the work dir, of directories being made before they take their
/// place in NEW; leftovers of a crash are removed by `clean_work_dir`.
pub(crate) const NEW_DIR_PREFIX: &str = "dir-";

/// Prefix of the names, in the work dir, of symlinks and special files being made before they
/// take their place in NEW; leftovers of a crash are removed by `clean_work_dir`.
pub(crate) const NEW_SPECIAL_PREFIX: &str = "special-";

/// The OLD side of an inode being copied up (it has one: it is not in NEW yet).
fn old_side(inode: &Inode) -> Result<super::inode::OldRef> {
    inode
        .node()
        .old
        .clone()
        .ok_or_else(|| errno_err("copy-up: the entry has no OLD side", libc::ENOENT))
}

/// The copy record of a NEW entry (open as `fd`) copied from OLD's `origin`, whose stat was `old`.
fn record_for(origin: &[u8], old: &rustix::fs::Stat, handle: Vec<u8>, is_dir: bool) -> CopyRecord {
    CopyRecord {
        origin: origin.to_vec(),
        fp: Fingerprint::of(old),
        handle,
        is_dir,
    }
}

/// A file copy's hard-link group, as [`View::hardlink_group`] found it.
enum Group {
    /// The group's copy exists: this name is linked to it.
    Linked,
    /// The group record the copy will carry (`None`: a single name).
    Copy(Option<crate::journal::HardLinkGroup>),
}

/// A copy made in an anonymous file, ready to be named.
struct Made<'a> {
    tmp: Scratch,
    /// OLD's stat, taken before the copy.
    st: rustix::fs::Stat,
    group: Option<crate::journal::HardLinkGroup>,
    origin: &'a [u8],
    /// The metadata change made through the view that the copy carries.
    change: Option<crate::journal::MetaChange>,
    /// A partial copy (no data yet: copy-before-write by chunk): its record, and OLD's file
    /// or object.
    partial: Option<(crate::journal::PartialFile, crate::store::Source)>,
}

/// The copy just linked as `name` in `dir` must be there, as the inode it is (`tst`): a file
/// system that reports a link it did not make (JuiceFS's emulated O_TMPFILE does) would
/// otherwise leave the view, and the copier's counts, believing NEW holds a copy it does not.
/// Such a copy is an error of its entry (path and cause in `status`), never a copy done.
fn check_linked(dir: BorrowedFd<'_>, name: &OsStr, tst: &rustix::fs::Stat) -> Result<()> {
    match posix::stat_at(dir, name) {
        Ok(st) if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) => Ok(()),
        Ok(_) => Err(errno_err(
            "the copy linked into NEW is not under its name (NEW's file system put another \
             entry there)",
            libc::EIO,
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(errno_err(
            "the copy linked into NEW is not there (NEW's file system reported a link it did \
             not make)",
            libc::EIO,
        )),
        Err(e) => Err(e).ctx("stat the copy linked into NEW"),
    }
}

fn fsync_dir(dir: BorrowedFd<'_>) -> Result<()> {
    let d = posix::reopen(dir, OFlags::RDONLY | OFlags::DIRECTORY).ctx("open NEW dir")?;
    rustix::fs::fsync(&d).ctx("fsync NEW dir")
}

impl View {
    /// The view name to place `inode` at: any of its live names.
    pub(crate) fn placement(&self, inode: &Inode) -> Result<(Arc<Inode>, std::ffi::OsString)> {
        let names = inode.node().names.clone();
        for (p, name) in names {
            if let Ok(parent) = self.inode(p) {
                return Ok((parent, name));
            }
        }
        Err(errno_err("copy-up: entry has no name left", libc::ENOENT))
    }

    /// Make sure directory `dir` exists in NEW; returns its NEW fd. Caller holds `ns` write.
    /// A directory brought over from OLD gets a copy record (its times are OLD's again once the
    /// copier has filled it, unless the view changes it first).
    pub(crate) fn ensure_new_dir_locked(&self, dir: &Inode) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = dir.node().new.as_ref().and_then(|l| l.dir_fd().cloned()) {
            return Ok(fd);
        }
        let (parent, name) = self.placement(dir)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        let old = old_side(dir)?;
        let st = old.loc.stat().ctx("stat OLD dir")?;
        // Made whole in the work dir (mode, owner, xattrs, and its copy record), then renamed
        // into place: a crash never leaves a half-made directory under its name, which the
        // next mount would take for the view's own (0700, OLD's metadata lost).
        // OLD's xattrs, owner and mode on the NEW directory `name` in `at`, and its copy
        // record (with the done count when it is a new copy).
        let dress = |at: BorrowedFd<'_>, name: &OsStr, count: bool| -> Result<Arc<OwnedFd>> {
            let fd = Arc::new(posix::open_child(at, name).ctx("open NEW dir")?);
            copy_xattrs(&old.loc, &Loc::Fd(fd.clone()))?;
            apply_meta(at, name, &st)?;
            let nst = posix::stat_fd(fd.as_fd()).ctx("stat NEW dir")?;
            let mut b = Batch::new();
            b.copy(
                nst.st_dev,
                nst.st_ino,
                &record_for(&old.path, &st, self.new_identity(fd.as_fd())?, true),
            );
            if count {
                let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
                d.dirs += 1;
                b.done(&d);
            }
            self.journal.commit(b, false)?;
            Ok(fd)
        };
        let work = self.work_dir()?;
        let tmp = std::ffi::OsString::from(format!("{NEW_DIR_PREFIX}{}", dir.ino));
        let _ = rustix::fs::unlinkat(&work, &tmp, AtFlags::REMOVEDIR);
        rustix::fs::mkdirat(&work, &tmp, Mode::from_raw_mode(0o700)).ctx("mkdir NEW")?;
        let fd = dress(work.as_fd(), &tmp, true)?;
        // A name already there, or a parent on another file system: made in place instead.
        let placed = keeping_dir_times(&pfd, || rename_into_place(&work, &tmp, &pfd, &name, true))?;
        let fd = if placed {
            fd
        } else {
            // NEW holds a directory of that name already (left by an older build's crash):
            // it becomes this copy, with OLD's metadata.
            let _ = rustix::fs::unlinkat(&work, &tmp, AtFlags::REMOVEDIR);
            keeping_dir_times(&pfd, || {
                match rustix::fs::mkdirat(pfd.as_fd(), &name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
                    Err(e) => Err(e).ctx("mkdir NEW"),
                }
            })?;
            dress(pfd.as_fd(), &name, false)?
        };
        let nst = posix::stat_fd(fd.as_fd()).ctx("stat NEW dir")?;
        // Named in NEW: NEW took it (not synced: lost in a crash, a loss of it goes unseen).
        let mut b = Batch::new();
        b.taken(&Fingerprint::of(&st), nst.st_dev, nst.st_ino);
        self.keep_number(&mut b, dir, nst.st_dev, nst.st_ino);
        self.journal.commit(b, false)?;
        {
            let mut n = dir.node();
            n.new = Some(Loc::Fd(fd.clone()));
            n.copy = CopyState::Copy;
        }
        Ok(fd)
    }

    /// Copy `inode` up into NEW unless it is there already. `data: false` when the caller is
    /// about to truncate to zero (O_TRUNC): OLD's bytes are irrelevant, so none are copied.
    /// A background copy holding the claim gives way (its work is thrown away).
    pub(crate) fn copy_up(&self, inode: &Inode, data: bool) -> Result<()> {
        if inode.node().new.is_some() {
            return Ok(());
        }
        inode.cancel.store(true, Ordering::Release);
        let _claim = inode.claim.lock().unwrap_or_else(|p| p.into_inner());
        inode.cancel.store(false, Ordering::Release);
        if inode.node().new.is_some() {
            return Ok(());
        }
        match inode.kind {
            Kind::Dir => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.ensure_new_dir_locked(inode).map(drop)
            }
            Kind::File => self.copy_file(inode, CopyMode::View { data }).map(drop),
            _ => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.copy_special_locked(inode, false)
            }
        }?;
        crate::metrics::METRICS.copy_up();
        Ok(())
    }

    /// The copier's copy of one entry: the same copy as copy-up, but it gives way to the view
    /// (never waits for the claim, stops when the view asks for it), paces itself through
    /// `tick`, and records the copy with OLD's fingerprint before the copy gets its name.
    pub fn copy_background(&self, inode: &Arc<Inode>, tick: Tick<'_>) -> Result<Outcome> {
        let done = Outcome::Done;
        if inode.node().new.is_some() {
            return Ok(done(Copied::Present));
        }
        let Ok(_claim) = inode.claim.try_lock() else {
            return Ok(done(Copied::GaveWay));
        };
        if inode.cancel.load(Ordering::Acquire) {
            return Ok(done(Copied::GaveWay));
        }
        if inode.node().new.is_some() {
            return Ok(done(Copied::Present));
        }
        match inode.kind {
            Kind::Dir => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.ensure_new_dir_locked(inode)?;
                Ok(done(Copied::Dir))
            }
            Kind::File => {
                let mut pending = None;
                let r = self.copy_file(
                    inode,
                    CopyMode::Background {
                        tick,
                        defer: Some((inode, &mut pending)),
                    },
                )?;
                Ok(match pending {
                    Some(p) => Outcome::Pending(p),
                    None => done(r),
                })
            }
            _ => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                self.copy_special_locked(inode, true)?;
                Ok(done(Copied::File { bytes: 0 }))
            }
        }
    }

    /// Give names to copies whose data the caller has just made durable (one syncfs of NEW
    /// for the whole batch instead of an fsync per file): their copy records first, in one
    /// journal batch, then their links, each where its entry is now. A copy the view took
    /// over meanwhile, or whose OLD file changed, is thrown away.
    pub(crate) fn finish_pending(&self, batch: Vec<Pending>) -> Vec<(Arc<Inode>, Result<Copied>)> {
        let mut out = Vec::with_capacity(batch.len());
        let mut ready = Vec::new();
        let mut b = Batch::new();
        let mut durable = false;
        for p in batch {
            let check = (|| -> Result<Option<Copied>> {
                if p.inode.cancel.load(Ordering::Acquire) || p.inode.node().new.is_some() {
                    return Ok(Some(Copied::GaveWay));
                }
                // (An S3 object's copy was fetched conditional on its ETag: nothing to check.)
                if let Some(src) = &p.src {
                    let now = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
                    if Fingerprint::of(&now) != Fingerprint::of(&p.st) {
                        return Ok(Some(Copied::ChangedInOld));
                    }
                }
                Ok(None)
            })();
            match check {
                Ok(Some(c)) => out.push((p.inode, Ok(c))),
                Err(e) => out.push((p.inode, Err(e))),
                Ok(None) => {
                    let rec = posix::stat_fd(p.tmp.as_fd())
                        .ctx("stat copy")
                        .and_then(|tst| {
                            // Owner and mode as OLD's (the file was created with its permission
                            // bits; owner, set-id bits or an ACL mask may still differ).
                            let mode = |st: &rustix::fs::Stat| st.st_mode & 0o7777;
                            if (tst.st_uid, tst.st_gid) != (p.st.st_uid, p.st.st_gid)
                                || mode(&tst) != mode(&p.st)
                            {
                                set_owner_and_mode(&p.tmp, &p.st)?;
                            }
                            let h = self.new_identity(p.tmp.as_fd())?;
                            Ok((tst, record_for(&p.origin, &p.st, h, false)))
                        });
                    match rec {
                        Ok((tst, rec)) => {
                            b.copy(tst.st_dev, tst.st_ino, &rec);
                            // An evicted file (its bytes in the bucket): its record is durable
                            // before its name, which would else show a file of holes.
                            if let Some((stub, _)) = p.stream.as_deref() {
                                b.partial(tst.st_dev, tst.st_ino, stub);
                                durable = true;
                            }
                            ready.push((p, tst));
                        }
                        Err(e) => out.push((p.inode, Err(e))),
                    }
                }
            }
        }
        if let Err(e) = self.journal.commit(b, durable) {
            let msg = e.to_string();
            for (p, _) in ready {
                out.push((
                    p.inode,
                    Err(crate::view::error::Error::Journal(msg.clone())),
                ));
            }
            return out;
        }
        // Links, a few at a time under the namespace lock (no rename or removal through the
        // view interleaves with them; lookups go on between chunks). Each directory linked into
        // gets its times back before the lock is released, so neither another worker's links
        // nor a change through the view ever sees, or keeps, a time set by a copy.
        let mut orphans = Batch::new();
        // The copies that took their names: only these count as copied (a copy that gave way
        // is copied again, and counted then).
        let mut linked: Vec<u64> = Vec::new();
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
            let mut dirs: Vec<(Arc<OwnedFd>, rustix::fs::Stat)> = Vec::new();
            for (mut p, tst) in ready.by_ref().take(LINKS_PER_LOCK) {
                let r = (|| -> Result<Copied> {
                    // The view took the entry over since the checks above: its copy wins. An
                    // inode the kernel forgot meanwhile may carry stale names: the next pass
                    // copies the entry again, through its live inode.
                    if p.inode.cancel.load(Ordering::Acquire)
                        || {
                            let n = p.inode.node();
                            n.new.is_some() || n.meta.is_some()
                        }
                        || !self.inodes.is_live(&p.inode)
                    {
                        orphans.clear_copy(tst.st_dev, tst.st_ino);
                        return Ok(Copied::GaveWay);
                    }
                    let (parent, name) = self.placement(&p.inode)?;
                    let pfd = self.ensure_new_dir_locked(&parent)?;
                    if !dirs.iter().any(|(d, _)| Arc::ptr_eq(d, &pfd)) {
                        let before = posix::stat_fd(pfd.as_fd()).ctx("stat NEW dir")?;
                        dirs.push((pfd.clone(), before));
                    }
                    match p.tmp.link_into(pfd.as_fd(), &name) {
                        // NEW got an entry of that name meanwhile (through the view): it wins.
                        Err(rustix::io::Errno::EXIST) => {
                            orphans.clear_copy(tst.st_dev, tst.st_ino);
                            return Ok(Copied::GaveWay);
                        }
                        r => r.ctx("link copy into NEW")?,
                    }
                    if let Err(e) = check_linked(pfd.as_fd(), &name, &tst) {
                        orphans.clear_copy(tst.st_dev, tst.st_ino);
                        return Err(e);
                    }
                    // An evicted file from its first moment: the view reads it from the bucket.
                    if let Some((rec, _)) = p.stream.as_deref() {
                        self.hold_streamed(&p.inode, (tst.st_dev, tst.st_ino), rec, &p.tmp)?;
                    }
                    // Sent to the key it now has: the publisher's record says the bucket
                    // holds it (else the publisher copies it to its key).
                    if let Some((_, sent)) = p.stream.as_deref() {
                        let key = super::join(&self.new_path(&parent)?, &name);
                        if key.strip_prefix(b"/").unwrap_or(&key) == sent.key.as_bytes() {
                            let now = posix::stat_fd(p.tmp.as_fd()).ctx("stat evicted copy")?;
                            orphans.published(&sent.key, &View::streamed_published(sent, &now));
                        }
                    }
                    {
                        let mut n = p.inode.node();
                        n.new = Some(Loc::At(pfd, name));
                        n.copy = CopyState::Copy;
                    }
                    linked.push(p.st.st_size as u64);
                    orphans.taken(&Fingerprint::of(&p.st), tst.st_dev, tst.st_ino);
                    self.keep_number(&mut orphans, &p.inode, tst.st_dev, tst.st_ino);
                    Ok(Copied::File {
                        bytes: p.st.st_size as u64,
                    })
                })();
                // An evicted file that did not get its name: its record goes (its key in the
                // bucket is deleted by the next publish pass).
                if p.stream.is_some() && !matches!(r, Ok(Copied::File { .. })) {
                    orphans.clear_partial(tst.st_dev, tst.st_ino, 1);
                }
                out.push((p.inode, r));
            }
            for (d, before) in dirs {
                if let Err(e) = Loc::Fd(d).utimens(&timestamps(&before)) {
                    tracing::warn!(error = %e, "restoring a NEW directory's times");
                }
            }
        }
        if !linked.is_empty() {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.files += linked.len() as u64;
            d.bytes += linked.iter().sum::<u64>();
            orphans.done(&d);
        }
        if !orphans.is_empty() {
            let _ = self.journal.commit(orphans, false);
        }
        out
    }

    fn copy_file(&self, inode: &Inode, mode: CopyMode<'_>) -> Result<Copied> {
        let (data, mut tick, background, defer) = match mode {
            CopyMode::View { data } => (data, None, false, None),
            CopyMode::Background { tick, defer } => (true, Some(tick), true, defer),
        };
        let old = old_side(inode)?;
        // An S3 OLD's object is fetched by one GET, conditional on the ETag its stat was made
        // from: the copy is that version or nothing.
        let obj = old.loc.object().cloned();
        let src = match &obj {
            Some(_) => None,
            None => Some(
                old.loc
                    .open(OFlags::RDONLY | OFlags::NOATIME)
                    .or_else(|_| old.loc.open(OFlags::RDONLY))
                    .ctx("open OLD file")?,
            ),
        };
        let st = match &src {
            Some(f) => posix::stat_fd(f.as_fd()).ctx("stat OLD file")?,
            None => old.loc.stat().ctx("stat OLD object")?,
        };
        // The directory to build the copy in (the copy is named later, wherever the entry is
        // then). Usually in NEW already: a shared lock is enough to find it.
        let pfd = self.copy_dir_for(inode)?;
        // A name of an OLD hard-link group whose copy exists already: link to that copy.
        let group = match self.hardlink_group(inode, &st, background)? {
            Group::Linked => {
                return Ok(Copied::File {
                    bytes: st.st_size as u64,
                });
            }
            Group::Copy(g) => g,
        };
        // Metadata the view changed while the data was OLD's only: the copy carries it.
        let change = self.meta_change_of(inode);
        // A change of a big file's data through the view: no data now, chunk by chunk later.
        let partial = !background && data && group.is_none() && self.partial_eligible(&st);
        // The copier's plain files are named later, with their batch: they are created with
        // their final permission bits, and owner and mode are fixed then only if they differ.
        let deferred = defer.is_some() && group.is_none() && change.is_none();
        let create_mode = if deferred { st.st_mode & 0o777 } else { 0o600 };
        let tmp = self.scratch_file(pfd.as_fd(), create_mode)?;
        let size = st.st_size as u64;
        // An S3 NEW: the copier's copy goes straight into the bucket, and the staging tree
        // gets an evicted file for it (no byte of it staged).
        let stream_key = if deferred && size > 0 {
            self.stream_key(inode, src.as_ref())?
        } else {
            None
        };
        let mut streamed = None;
        let copy = |tick: Tick<'_>| -> Result<Fetched> {
            match (&src, &obj) {
                (Some(f), _) => Ok(copy_data_of(f, &tmp, size, Some(&st), tick)?.into()),
                (None, Some(e)) => Ok(fetch_object(e, &tmp, tick)?),
                (None, None) => unreachable!("an OLD file or an OLD object"),
            }
        };
        let fetched = match tick.as_mut() {
            Some(t) if let Some(key) = &stream_key => {
                rustix::fs::ftruncate(&tmp, size).ctx("size the evicted copy")?;
                match self.stream_copy(key, &tmp, src.as_ref(), obj.as_deref(), &st)? {
                    super::stream::Stream::Changed => Fetched::Changed,
                    super::stream::Stream::Busy => Fetched::Stopped,
                    // (Paced after the fact: an upload is not cut short.)
                    super::stream::Stream::Sent(s)
                        if !inode.cancel.load(Ordering::Acquire) && t(size) =>
                    {
                        streamed = Some(s);
                        Fetched::Done
                    }
                    // (The key sent is deleted by the next publish pass.)
                    super::stream::Stream::Sent(_) => Fetched::Stopped,
                }
            }
            Some(t) => copy(&mut |n| !inode.cancel.load(Ordering::Acquire) && t(n))?,
            None if partial => {
                // OLD's size, no bytes: the chunks come from OLD until copied (a sparse file).
                rustix::fs::ftruncate(&tmp, size).ctx("size the partial copy")?;
                Fetched::Done
            }
            None if data => copy(&mut |_| true)?,
            None => Fetched::Done,
        };
        match fetched {
            Fetched::Done => {}
            Fetched::Stopped => return Ok(Copied::GaveWay),
            Fetched::Changed if background => return Ok(Copied::ChangedInOld),
            // Replaced in OLD since the kernel looked it up: the application sees ESTALE and
            // its next lookup finds the new object.
            Fetched::Changed => {
                return Err(errno_err(
                    "OLD's object was replaced while being copied up",
                    libc::ESTALE,
                ));
            }
        }
        if let Some(src) = &src {
            copy_xattrs_fd(src, &tmp)?;
        }
        if !deferred {
            set_owner_and_mode(&tmp, &st)?;
        }
        rustix::fs::futimens(&tmp, &timestamps(&st)).ctx("futimens copy")?;
        if let Some(m) = &change {
            let fd = tmp.as_fd().try_clone_to_owned().ctx("dup copy")?;
            super::metachange::apply(&Loc::Fd(Arc::new(fd)), m)?;
        }
        if let Some((arc, slot)) = defer
            && deferred
        {
            // Start writing the copy back now, without waiting: the batch's syncfs then finds
            // little left to write, and the disk works while the next files are copied.
            // SAFETY: plain syscall on an fd we own; a failure only loses the head start.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(&*tmp),
                    0,
                    0,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            // The copier's plain file: named later, with its batch (see finish_pending).
            let stream = match streamed {
                Some(sent) => Some(Box::new((self.streamed_record(&sent, &tmp, &st)?, sent))),
                None => None,
            };
            *slot = Some(Pending {
                inode: arc.clone(),
                src,
                st,
                tmp,
                origin: old.path.clone(),
                stream,
            });
            return Ok(Copied::GaveWay);
        }
        rustix::fs::fsync(&tmp).ctx("fsync copy")?;
        if background && let Some(src) = &src {
            // OLD changed while we copied (an application writing to OLD behind the view):
            // this copy is not OLD's content; the next pass copies it again.
            let now = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
            if Fingerprint::of(&now) != Fingerprint::of(&st) {
                return Ok(Copied::ChangedInOld);
            }
        }

        let partial = if partial {
            let source = match src {
                Some(f) => crate::store::Source::File(Arc::new(f)),
                // The object at the ETag its stat was made from: ranged GETs conditional on it.
                None => old.loc.open_source(OFlags::RDONLY).ctx("open OLD object")?,
            };
            Some((
                crate::journal::PartialFile {
                    origin: old.path.clone(),
                    old: Fingerprint::of(&st),
                    chunk: self.chunk_size(),
                    extent: size,
                    handle: self.new_identity(tmp.as_fd())?,
                    etag: obj
                        .as_ref()
                        .and_then(|e| e.object.as_ref())
                        .map(|o| o.etag.clone()),
                    bucket: false,
                    abort_put: false,
                },
                source,
            ))
        } else {
            None
        };
        self.name_copy(
            inode,
            Made {
                tmp,
                st,
                group,
                origin: &old.path,
                change,
                partial,
            },
            background,
            data,
        )
    }

    /// The NEW directory a copy of `inode` is built in (the copy is named later, wherever the
    /// entry is then). Usually in NEW already: a shared lock is enough to find it.
    pub(super) fn copy_dir_for(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
        let existing = {
            let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
            let (parent, _) = self.placement(inode)?;
            self.new_dir(&parent)
        };
        match existing {
            Some(fd) => Ok(fd),
            None => {
                let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
                let (parent, _) = self.placement(inode)?;
                self.ensure_new_dir_locked(&parent)
            }
        }
    }

    /// A file with several OLD names (`st` its OLD stat): linked to the group's copy when one
    /// exists already (`Group::Linked`), else the group record its copy will carry.
    fn hardlink_group(
        &self,
        inode: &Inode,
        st: &rustix::fs::Stat,
        background: bool,
    ) -> Result<Group> {
        if st.st_nlink > 1 {
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
                    if !background {
                        fsync_dir(pfd.as_fd())?;
                    }
                    let loc = Loc::At(pfd, name);
                    let nst = loc.stat().ctx("stat NEW copy")?;
                    {
                        let mut n = inode.node();
                        n.new = Some(loc);
                        n.old_group = Some((st.st_dev, st.st_ino));
                        n.copy = CopyState::Unknown;
                    }
                    self.inodes
                        .add_identity(inode, Identity::New(nst.st_dev, nst.st_ino));
                    return Ok(Group::Linked);
                }
            }
            Ok(Group::Copy(Some(g)))
        } else {
            Ok(Group::Copy(None))
        }
    }

    /// Name a finished copy: under the namespace lock, unless the view or another copy got
    /// there first; its copy record (the copier's) and its hard-link group's record journaled
    /// first, then linked where the entry is now.
    fn name_copy(
        &self,
        inode: &Inode,
        m: Made<'_>,
        background: bool,
        data: bool,
    ) -> Result<Copied> {
        let Made {
            mut tmp,
            st,
            group,
            origin,
            change,
            partial,
        } = m;
        // A partial copy holds no data yet: its bytes are counted as its chunks are copied.
        let data = data && partial.is_none();
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        if !background && inode.node().new.is_some() {
            // The copier named its copy (made before the view claimed the entry) meanwhile:
            // that copy is OLD's content too, and the view's change applies to it.
            return Ok(Copied::Present);
        }
        if background
            && (inode.cancel.load(Ordering::Acquire)
                || {
                    // (One guard: a second lock of the node in this condition would wait for
                    // the first, which lives until the condition's end.)
                    let n = inode.node();
                    n.new.is_some() || n.meta.as_deref() != change.as_ref()
                }
                || !self
                    .inode(inode.ino)
                    .is_ok_and(|i| std::ptr::eq(&*i, inode)))
        {
            return Ok(Copied::GaveWay);
        }
        let tst = posix::stat_fd(tmp.as_fd()).ctx("stat copy")?;
        let mut b = Batch::new();
        // A partial copy's record is on stable storage before its name is: a NEW file of
        // OLD's size with no data must never be taken for the file.
        let durable = group.is_some() || partial.is_some();
        if let Some((rec, _)) = &partial {
            b.partial(tst.st_dev, tst.st_ino, rec);
        }
        if let Some(mut g) = group {
            // Journal the group's copy before it is visible: every other OLD name of the
            // group will be linked to it, and st_nlink counts them.
            // (No handle where NEW's do not last: the copy then keeps a name in the work dir
            // until every OLD name of the group is linked to it.)
            g.copy = Some(self.new_identity(tmp.as_fd())?);
            g.kept_alive = !self.caps.handles;
            b.hardlink(st.st_dev, st.st_ino, &g)
                .copy_of(tst.st_dev, tst.st_ino, st.st_dev, st.st_ino);
            inode.node().old_group = Some((st.st_dev, st.st_ino));
        }
        // A copy carrying a change made through the view is the view's own, as a copy-up is.
        let plain = background && change.is_none();
        if plain {
            b.copy(
                tst.st_dev,
                tst.st_ino,
                &record_for(origin, &st, self.new_identity(tmp.as_fd())?, false),
            );
        } else {
            // The view's own from the start: where it came from, for a removal in OLD later.
            b.origin(tst.st_dev, tst.st_ino, origin);
        }
        // Durable when it makes a hard-link group's copy known; a plain copy record need not
        // be: lost with its copy, the copier copies again; lost alone, the copy is the view's.
        self.journal.commit(b, durable)?;
        if durable && !self.caps.handles {
            let work = self.work_dir()?;
            tmp.keep_link(
                work.as_fd(),
                OsStr::new(&keep_alive_name(st.st_dev, st.st_ino)),
            )
            .ctx("keep an OLD hard-link group's copy in the work dir")?;
        }
        // The entry may have been renamed while we copied: place it where it is now.
        let (parent, name) = self.placement(inode)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        let linked = keeping_dir_times(&pfd, || {
            match tmp.link_into(pfd.as_fd(), &name) {
                // NEW got an entry of that name in between (created through the view): it wins.
                Err(rustix::io::Errno::EXIST) if background => Ok(false),
                r => r.ctx("link copy into NEW").map(|()| true),
            }
        })?;
        let checked = if linked {
            check_linked(pfd.as_fd(), &name, &tst)
        } else {
            Ok(())
        };
        if !linked || checked.is_err() {
            let mut b = Batch::new();
            b.clear_copy(tst.st_dev, tst.st_ino);
            if partial.is_some() {
                b.clear_partial(tst.st_dev, tst.st_ino, 1);
            }
            let _ = self.journal.commit(b, false);
            checked?;
            return Ok(Copied::GaveWay);
        }
        let done = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.files += 1;
            d.bytes += if data { st.st_size as u64 } else { 0 };
            *d
        };
        // Counted once named, and marked taken; recorded for `status` (not synced: it is only
        // news, and without the mark a later loss of the copy is copied again, unseen).
        let mut b = Batch::new();
        b.done(&done)
            .taken(&Fingerprint::of(&st), tst.st_dev, tst.st_ino);
        self.keep_number(&mut b, inode, tst.st_dev, tst.st_ino);
        if !plain {
            // Durably named before the change's record goes: the change is never in neither.
            fsync_dir(pfd.as_fd())?;
        }
        if change.is_some() {
            b.clear_meta_change(st.st_dev, st.st_ino);
        }
        let _ = self.journal.commit(b, false);
        let loc = Loc::At(pfd.clone(), name.clone());
        {
            let mut n = inode.node();
            n.new = Some(loc);
            n.meta = None;
            n.copy = if plain {
                CopyState::Copy
            } else {
                CopyState::Local
            };
        }
        if let Some((rec, src)) = partial {
            let new = File::from(
                tmp.as_fd()
                    .try_clone_to_owned()
                    .ctx("dup the partial copy")?,
            );
            let p = self.partial_made((tst.st_dev, tst.st_ino), rec, src, new);
            self.hold_partial(inode, p);
            // The copier fills it in first.
            if let Ok(arc) = self.inode(inode.ino) {
                self.note_touched(&arc);
            }
        }
        tracing::debug!(
            ino = inode.ino,
            bytes = if data { st.st_size } else { 0 },
            background,
            "copied up"
        );
        Ok(Copied::File {
            bytes: if data { st.st_size as u64 } else { 0 },
        })
    }

    /// Symlinks, FIFOs, sockets and device nodes: created in place (each creation is atomic).
    /// `record`: the copier's copy, recorded as a copy of OLD.
    fn copy_special_locked(&self, inode: &Inode, record: bool) -> Result<()> {
        let old = old_side(inode)?;
        let st = old.loc.stat().ctx("stat OLD entry")?;
        let (parent, name) = self.placement(inode)?;
        let pfd = self.ensure_new_dir_locked(&parent)?;
        // Made and dressed (xattrs, owner, mode, times) in the work dir, then renamed into
        // place: a crash never leaves a NEW entry with the wrong owner or times, which the view
        // would take for its own (no record) and keep. A crash before the rename leaves a name
        // in the work dir that `clean_work_dir` removes.
        let make = |dir: BorrowedFd<'_>, nm: &OsStr| -> Result<()> {
            if inode.kind == Kind::Symlink {
                let target = old.loc.readlink().ctx("readlink OLD")?;
                rustix::fs::symlinkat(target.as_slice(), dir, nm).ctx("symlink NEW")?;
            } else {
                rustix::fs::mknodat(
                    dir,
                    nm,
                    rustix::fs::FileType::from_raw_mode(st.st_mode),
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    st.st_rdev,
                )
                .ctx("mknod NEW")?;
            }
            let dup = Arc::new(rustix::io::fcntl_dupfd_cloexec(dir, 0).ctx("dup")?);
            copy_xattrs(&old.loc, &Loc::At(dup, nm.to_owned()))?;
            Ok(apply_meta(dir, nm, &st)?)
        };
        let work = self.work_dir()?;
        let tmp = std::ffi::OsString::from(format!("{NEW_SPECIAL_PREFIX}{}", inode.ino));
        let _ = rustix::fs::unlinkat(&work, &tmp, AtFlags::empty());
        if let Err(e) = make(work.as_fd(), &tmp) {
            // (A refused xattr or owner: nothing of this try stays in the work dir.)
            let _ = rustix::fs::unlinkat(&work, &tmp, AtFlags::empty());
            return Err(e);
        }
        // A parent on another file system (a mount inside NEW): made in place.
        let placed = keeping_dir_times(&pfd, || rename_into_place(&work, &tmp, &pfd, &name, false));
        if !matches!(placed, Ok(true)) {
            let _ = rustix::fs::unlinkat(&work, &tmp, AtFlags::empty());
        }
        drop(work);
        if !placed? {
            keeping_dir_times(&pfd, || make(pfd.as_fd(), &name))?;
        }
        let loc = Loc::At(pfd.clone(), name.clone());
        if !record {
            fsync_dir(pfd.as_fd())?;
        }
        let nst = loc.stat().ctx("stat NEW entry")?;
        let mut b = Batch::new();
        if !record {
            b.origin(nst.st_dev, nst.st_ino, &old.path);
        }
        if record {
            // Symlinks have no file handle of their own to open; the record's handle is
            // unused for them (verify finds them by walking the view).
            b.copy(
                nst.st_dev,
                nst.st_ino,
                &CopyRecord {
                    origin: old.path.clone(),
                    fp: Fingerprint::of(&st),
                    handle: Vec::new(),
                    is_dir: false,
                },
            );
        }
        {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.files += 1;
            b.done(&d);
        }
        b.taken(&Fingerprint::of(&st), nst.st_dev, nst.st_ino);
        self.keep_number(&mut b, inode, nst.st_dev, nst.st_ino);
        self.journal.commit(b, false)?;
        {
            let mut n = inode.node();
            n.new = Some(loc);
            n.copy = if record {
                CopyState::Copy
            } else {
                CopyState::Local
            };
        }
        Ok(())
    }
}

/// Rename `tmp`, made whole in the work dir, to `name` in `pfd` without replacing anything.
/// `Ok(false)` when it must be made in place instead: `pfd` is on another file system (a mount
/// inside NEW), or, with `exist_in_place`, `name` is there already.
fn rename_into_place(
    work: &OwnedFd,
    tmp: &OsStr,
    pfd: &OwnedFd,
    name: &OsStr,
    exist_in_place: bool,
) -> Result<bool> {
    match posix::rename_noreplace(work.as_fd(), tmp, pfd.as_fd(), name) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::XDEV) => Ok(false),
        Err(rustix::io::Errno::EXIST) if exist_in_place => Ok(false),
        Err(e) => Err(e).ctx("rename into place in NEW"),
    }
}

/// How a file copy runs: for the view (holding the claim; `data: false` for O_TRUNC), or in
/// the background for the copier.
pub(crate) enum CopyMode<'a> {
    View {
        data: bool,
    },
    Background {
        tick: Tick<'a>,
        /// Where to leave a plain file's finished copy for the batch to name, instead of
        /// fsyncing and naming it now.
        defer: Option<(&'a Arc<Inode>, &'a mut Option<Pending>)>,
    },
}

/// A background copy whose data and metadata are written but not yet durable nor named.
pub struct Pending {
    inode: Arc<Inode>,
    /// OLD's file (kept open to check it did not change); `None` for an S3 object.
    src: Option<File>,
    st: rustix::fs::Stat,
    tmp: Scratch,
    origin: Vec<u8>,
    /// Sent straight into an S3 NEW's bucket: the evicted file's record, and what was sent.
    stream: Option<Box<(crate::journal::PartialFile, super::stream::Streamed)>>,
}

impl Pending {
    /// A remote worker's copy `tmp` of OLD's file `src` (`None`: an S3 OLD's object; stat
    /// `st`, path `origin`); `stream`: sent into an S3 NEW's bucket (`tmp` its evicted file).
    pub(crate) fn remote(
        inode: Arc<Inode>,
        src: Option<File>,
        st: rustix::fs::Stat,
        tmp: Scratch,
        origin: Vec<u8>,
        stream: Option<Box<(crate::journal::PartialFile, super::stream::Streamed)>>,
    ) -> Pending {
        Pending {
            inode,
            src,
            st,
            tmp,
            origin,
            stream,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.st.st_size as u64
    }
    pub fn inode_arc(&self) -> Arc<Inode> {
        self.inode.clone()
    }
}

/// What the copier's copy of one entry left.
pub enum Outcome {
    Done(Copied),
    /// A copy waiting for its batch: made durable by one syncfs, then named.
    Pending(Pending),
}

/// What a background copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// A file, symlink or special file now in NEW; `bytes` of data copied.
    File { bytes: u64 },
    /// A directory now in NEW.
    Dir,
    /// NEW had it already.
    Present,
    /// The view took the entry over (a change through the view wins); nothing was kept.
    GaveWay,
    /// OLD changed during the copy; nothing was kept, copy again later.
    ChangedInOld,
}
