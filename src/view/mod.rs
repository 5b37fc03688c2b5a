//! The view: one namespace over OLD and NEW (DESIGN "The view's rules").
//!
//! Owns the decisions: what a name resolves to, when an entry is copied up, what the journal
//! records and in which order relative to NEW. Returns plain values; nothing here knows FUSE.
//!
//! Ordering invariant: the journal half of an operation is durable before the NEW half starts,
//! and a journal record without its NEW half always means the same view as before the operation
//! (or an [`Intent`] finishes the NEW half at the next mount). So a crash at any point leaves
//! either the old or the new state of every acknowledged operation.
//!
//! Locking: `ns` is held shared by resolution and exclusively by every namespace change, so a
//! rename is atomic as applications see it. Data I/O takes no namespace lock; copy-up copies
//! data under the inode's claim only and takes `ns` just to link the copy into place.

pub mod attr;
mod copyup;
mod drain;
pub mod error;
mod evict;
mod handles;
pub mod inode;
mod metachange;
mod remote;
mod stream;
pub(crate) use metachange::apply as apply_meta_change;
mod ops;
mod partial;
pub use evict::{Eviction, StubUpload};
pub use partial::ChunkProgress;
pub use partial::{Unchanged, write_mark};
pub use remote::{REMOTE_FILE_PREFIX, RemoteItem};
pub use stage::{StageUse, default_stage_max};
mod scratch;
mod stage;
mod takeover;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::{Arc, RwLock};

pub use attr::{Attr, Kind};
pub use copyup::{Copied, Outcome, Pending};
pub use drain::{Check, Compare};

pub use handles::{OpenFile, wants_write};
use inode::{Identity, Inode, InodeTable, Node, OldRef, ROOT_INO};
pub use ops::{SetAttr, SetTime, XattrReply};
pub use takeover::{Imported, ViewState};

use crate::journal::{self, Dentry, Intent, ROOT_DIR, Records};
use crate::store::OldStore;
use crate::store::posix::{self, Loc, PosixStore};
use crate::view::error::{Context, Error, Result};

/// How long a merged directory's counted subdirectories are trusted without a change through
/// the view (the kernel's attribute TTL: the same bound on seeing changes made in OLD).
const SUBDIR_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest name a directory entry may have (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// ferryfs's private directory at NEW's root, hidden from the view. It holds, between copy-up
/// and link-up, the NEW copy of an OLD hard-link group whose last NEW name was removed while
/// OLD names of the group remain (their data must live on). Empty and removed again once every
/// such name is linked up; never in NEW after commit.
pub const WORK_DIR: &str = ".ferryfs-work";

/// Who is asking: new entries belong to the caller (rule 8).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl From<journal::JournalError> for Error {
    fn from(e: journal::JournalError) -> Self {
        Error::Journal(e.to_string())
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: Kind,
    /// The entry's number; 0 until `dir_snapshot` gives it (a NEW entry the kernel does not
    /// know yet: its number may need a journal read, which only a listing for the kernel pays).
    pub ino: u64,
    /// NEW's (st_dev, st_ino) of an entry not numbered yet.
    pub(crate) new_id: Option<(u64, u64)>,
}

/// What the view shows at one name, before an inode is attached to it.
pub(crate) struct Resolved {
    pub kind: Kind,
    /// NEW's entry and its stat, when NEW has the name.
    pub new: Option<(Loc, rustix::fs::Stat)>,
    /// OLD's entry: for OLD-only entries and for the OLD half of merged directories.
    pub old: Option<(Vec<u8>, Loc, rustix::fs::Stat)>,
    pub record: Option<Dentry>,
}

impl Resolved {
    fn identity(&self) -> Identity {
        match (&self.new, &self.old) {
            (Some((_, st)), _) => Identity::New(st.st_dev, st.st_ino),
            (None, Some((_, _, st))) => Identity::Old(st.st_dev, st.st_ino),
            (None, None) => unreachable!("a resolved entry has a backing"),
        }
    }
    fn stat(&self) -> &rustix::fs::Stat {
        match (&self.new, &self.old) {
            (Some((_, st)), _) => st,
            (None, Some((_, _, st))) => st,
            (None, None) => unreachable!("a resolved entry has a backing"),
        }
    }
}

pub struct View {
    old: OldStore,
    new: PosixStore,
    journal: Records,
    inodes: InodeTable,
    handles: handles::HandleTable,
    ns: RwLock<()>,
    /// What has been brought from OLD into NEW (copier and copy-up), as last recorded.
    done: std::sync::Mutex<journal::Done>,
    /// After commit (or abort) the view shows one store only: OLD is no longer consulted.
    single: std::sync::atomic::AtomicBool,
    /// When an application last read or wrote through the view (ns since `epoch`): the
    /// copier backs off while applications do I/O.
    last_io: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// Entries applications touched while still OLD-only: the copier takes them first.
    touched: crossbeam_channel::Sender<Arc<Inode>>,
    touched_rx: crossbeam_channel::Receiver<Arc<Inode>>,
    /// Namespace changes made through the view so far.
    ns_changes: std::sync::atomic::AtomicU64,
    /// Changes of any kind made through the view so far (each change's gate hold, each
    /// release of a file open for writing, each fsync): the publisher of an S3 NEW watches it.
    edits: std::sync::atomic::AtomicU64,
    /// NEW is an S3 bucket behind the staging tree: what no object can be (a hard link, an
    /// xattr, a name that is not UTF-8) is refused when asked for.
    s3_new: std::sync::atomic::AtomicBool,
    /// Held shared by every change through the view (namespace, metadata, data writes) and
    /// exclusively by an abort, which must see the view still.
    gate: RwLock<()>,
    /// Copies the kernel looked up, for the copier to check against OLD.
    rechecks: crossbeam_channel::Sender<Arc<Inode>>,
    rechecks_rx: crossbeam_channel::Receiver<Arc<Inode>>,
    /// The FUSE mount's st_dev, once mounted: how the view recognises its own files in
    /// /proc/*/exe (see `open`, O_RDONLY|O_TRUNC of a running program).
    mount_dev: std::sync::OnceLock<u64>,
    /// Where to send the inodes whose kernel-cached attributes and data must go (see
    /// [`View::invalidate`]): the mount's notifier thread.
    invalidator: std::sync::OnceLock<crossbeam_channel::Sender<u64>>,
    /// Whether notifications may go to the kernel now: not while a takeover parks requests
    /// (a notification would wait on page locks the parked requests hold). Held while one is
    /// sent.
    invalidations_open: std::sync::Mutex<bool>,
    /// A takeover asks to hold notifications: none starts from now on.
    invalidations_held: std::sync::atomic::AtomicBool,
    /// What NEW's file system can do (prepare's probe): where copies are made, how they are
    /// known.
    caps: scratch::NewCaps,
    /// The chunk size of copy-before-write (`prepare --chunk-size`; 0: whole files only).
    chunk: u64,
    /// The inode numbers of partly copied files the view holds, by NEW's (dev, ino): for
    /// the copier (latest written first) and status.
    partials: std::sync::Mutex<rustc_hash::FxHashMap<(u64, u64), u64>>,
    /// An S3 NEW's bucket: evicted files' chunks are read from it.
    bucket: std::sync::OnceLock<Arc<crate::store::s3::S3Store>>,
    /// NEW's files (dev, ino) being evicted now: a lookup finding one waits for its record
    /// (see [`View::evict`]).
    evicting: std::sync::Mutex<rustc_hash::FxHashSet<(u64, u64)>>,
    evicted: std::sync::Condvar,
    /// How many are in `evicting` (a lookup reads this, not the set, when it is 0).
    evictions: std::sync::atomic::AtomicU64,
    /// Keys of the bucket the copier is sending copies to, or whose evicted file waits for its
    /// name: the publisher deletes none of them.
    streaming: Arc<std::sync::Mutex<rustc_hash::FxHashSet<String>>>,
    /// An S3 OLD on NEW's service lets NEW's credentials copy its objects (until refused).
    server_copy_ok: std::sync::atomic::AtomicBool,
    /// An S3 NEW's bound on its staging tree (`mount --stage-max`).
    stage: stage::StageRoom,
}

fn check_name(name: &OsStr) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::refused(
            libc::ENAMETOOLONG,
            "name longer than 255 bytes",
        ));
    }
    if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
        return Err(Error::refused(libc::EINVAL, "not a plain name"));
    }
    Ok(())
}

/// The view path of `name` in the directory at view path `base` (empty: the root).
pub fn join(base: &[u8], name: &OsStr) -> Vec<u8> {
    if base.is_empty() {
        return name.as_bytes().to_vec();
    }
    let mut p = base.to_vec();
    p.push(b'/');
    p.extend_from_slice(name.as_bytes());
    p
}

/// The view holds an O_PATH fd per directory inode the kernel knows (two for a merged
/// directory), so a process serving one needs far more fds than a login's default limit. As
/// root it may raise even the hard limit, up to the kernel's `fs.nr_open`; anything lower is
/// kept as is.
pub fn raise_nofile_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let cur = getrlimit(Resource::Nofile);
    let want = Rlimit {
        current: Some(nr_open),
        maximum: Some(nr_open),
    };
    if setrlimit(Resource::Nofile, want).is_err() {
        // Not privileged to raise the hard limit: take the soft limit up to it.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: cur.maximum,
                maximum: cur.maximum,
            },
        );
    }
    let now = getrlimit(Resource::Nofile);
    tracing::info!(open_files = ?now.current, "open-file limit");
}

/// A view path (relative, as the journal and the walkers hold it) for messages: `/a/b`.
pub fn display_path(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.is_empty() {
        "/".into()
    } else {
        format!("/{s}")
    }
}

fn not_found(op: &'static str) -> Error {
    crate::view::error::errno_err(op, libc::ENOENT)
}

impl View {
    /// Open the view over two stores and a journal, finishing any NEW-side work a crash left.
    pub fn new(old: OldStore, new: PosixStore, journal: Records) -> Result<View> {
        let (old_root, ost) = old.root().ctx("open OLD root")?;
        let new_root = new
            .open_path(std::path::Path::new(""))
            .ctx("open NEW root")?;
        let nst = posix::stat_fd(new_root.as_fd()).ctx("stat NEW root")?;
        let root = Node {
            names: vec![(ROOT_INO, OsString::new())],
            new: Some(Loc::Fd(Arc::new(new_root))),
            old: Some(OldRef {
                path: Vec::new(),
                loc: old_root,
            }),
            dir_id: Some(ROOT_DIR),
            old_group: None,
            subdirs: None,
            cache_stamp: None,
            listed_at: None,
            copy: Default::default(),
            rechecked: None,
            meta: None,
            partial: None,
            ids: vec![
                Identity::New(nst.st_dev, nst.st_ino),
                Identity::Old(ost.st_dev, ost.st_ino),
            ],
        };
        let done = journal.done()?;
        let caps = scratch::NewCaps::from_journal(&journal)?;
        let chunk = journal.chunk_size()?;
        let (touched, touched_rx) = crossbeam_channel::bounded(4096);
        let (rechecks, rechecks_rx) = crossbeam_channel::bounded(4096);
        let view = View {
            old,
            new,
            journal,
            inodes: InodeTable::new(root),
            handles: handles::HandleTable::default(),
            ns: RwLock::new(()),
            done: std::sync::Mutex::new(done),
            single: Default::default(),
            last_io: Default::default(),
            epoch: std::time::Instant::now(),
            touched,
            touched_rx,
            ns_changes: Default::default(),
            edits: Default::default(),
            s3_new: Default::default(),
            rechecks,
            rechecks_rx,
            gate: RwLock::new(()),
            mount_dev: std::sync::OnceLock::new(),
            invalidator: std::sync::OnceLock::new(),
            invalidations_open: std::sync::Mutex::new(true),
            invalidations_held: std::sync::atomic::AtomicBool::new(false),
            caps,
            chunk,
            partials: Default::default(),
            bucket: std::sync::OnceLock::new(),
            evicting: Default::default(),
            evicted: std::sync::Condvar::new(),
            evictions: Default::default(),
            streaming: Default::default(),
            server_copy_ok: std::sync::atomic::AtomicBool::new(true),
            stage: Default::default(),
        };
        view.replay_intents()?;
        view.clean_work_dir()?;
        view.drop_stale_partials()?;
        Ok(view)
    }

    /// Finish the NEW half of operations whose journal half was durable at the crash. An
    /// entry the operation drops from NEW goes through the same keep-alive rule as at run
    /// time (the last NEW name of an OLD hard-link group's copy).
    fn replay_intents(&self) -> Result<()> {
        for (id, intent) in self.journal.intents()? {
            let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
            match &intent {
                Intent::Rename { from, to, ino } => {
                    if self
                        .new_entry(from)?
                        .is_some_and(|(_, _, st)| st.st_ino == *ino)
                    {
                        if let Some((dir, name, st)) = self.new_entry(to)? {
                            self.keep_alive_locked(&dir, &name, &st)?;
                        }
                        rustix::fs::renameat(
                            self.new.root(),
                            OsStr::from_bytes(from),
                            self.new.root(),
                            OsStr::from_bytes(to),
                        )
                        .ctx("replay rename")?;
                    }
                }
                Intent::Remove { path, ino } => {
                    if let Some((dir, name, st)) = self.new_entry(path)?
                        && st.st_ino == *ino
                        && !self.keep_alive_locked(&dir, &name, &st)?
                    {
                        let flags = if Kind::from_mode(st.st_mode) == Kind::Dir {
                            rustix::fs::AtFlags::REMOVEDIR
                        } else {
                            rustix::fs::AtFlags::empty()
                        };
                        rustix::fs::unlinkat(&*dir, &name, flags).ctx("replay remove")?;
                    }
                }
            }
            tracing::info!(?intent, "finished an operation interrupted by a crash");
            let mut b = journal::Batch::new();
            b.clear_intent(id);
            self.journal.commit(b, true)?;
        }
        Ok(())
    }

    /// NEW's entry at a NEW-relative path: its directory's fd, its name and its stat.
    fn new_entry(&self, path: &[u8]) -> Result<Option<(Arc<OwnedFd>, OsString, rustix::fs::Stat)>> {
        let p = std::path::Path::new(OsStr::from_bytes(path));
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return Ok(None);
        };
        let dir = match self.new.open_path(parent) {
            Ok(d) => Arc::new(d),
            Err(e) if posix::vanished(&e) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(Error::Store {
                    op: "open NEW dir",
                    source: e,
                });
            }
        };
        match posix::stat_at(dir.as_fd(), name) {
            Ok(st) => Ok(Some((dir, name.to_owned(), st))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(Error::Store {
                op: "stat NEW entry",
                source: e,
            }),
        }
    }

    pub(crate) fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        self.inodes
            .get(ino)
            .ok_or_else(|| Error::refused(libc::ESTALE, "unknown inode"))
    }

    /// Resolve `name` inside the directory `parent` (rules 1 and 9).
    pub(crate) fn resolve(&self, parent: &Inode, name: &OsStr) -> Result<Option<Resolved>> {
        check_name(name)?;
        if parent.kind != Kind::Dir {
            return Err(Error::refused(libc::ENOTDIR, "not a directory"));
        }
        let (pnew, pold, pdir) = {
            let n = parent.node();
            (n.new.clone(), n.old.clone(), n.dir_id)
        };
        let record = match pdir {
            Some(d) => self.journal.get(d, name.as_bytes())?,
            None => None,
        };
        let new = match pnew.as_ref().and_then(|l| l.dir_fd()) {
            Some(_) if parent.ino == ROOT_INO && name == WORK_DIR => None,
            Some(dfd) => locate(dfd, name).ctx("lookup in NEW")?,
            None => None,
        };
        // A non-directory in NEW hides OLD entirely; only directories merge.
        let wants_old = !self.is_single()
            && match &new {
                Some((_, st)) => Kind::from_mode(st.st_mode) == Kind::Dir,
                None => true,
            };
        let old = if wants_old {
            self.resolve_old(&record, pold.as_ref(), name)?
        } else {
            None
        };
        let old = match (&new, old) {
            // A directory merges only with an OLD directory.
            (Some(_), Some((_, _, st))) if Kind::from_mode(st.st_mode) != Kind::Dir => None,
            (_, o) => o,
        };
        let kind = match (&new, &old) {
            (Some((_, st)), _) => Kind::from_mode(st.st_mode),
            (None, Some((_, _, st))) => Kind::from_mode(st.st_mode),
            (None, None) => return Ok(None),
        };
        Ok(Some(Resolved {
            kind,
            new,
            old,
            record,
        }))
    }

    /// Where OLD's content for a name lives, following the journal's redirects.
    fn resolve_old(
        &self,
        record: &Option<Dentry>,
        parent_old: Option<&OldRef>,
        name: &OsStr,
    ) -> Result<Option<(Vec<u8>, Loc, rustix::fs::Stat)>> {
        let (path, found) = match record {
            Some(Dentry::Tombstone) | Some(Dentry::Dir { origin: None, .. }) => return Ok(None),
            Some(Dentry::File { origin: None }) => return Ok(None),
            Some(Dentry::Dir {
                origin: Some(o), ..
            })
            | Some(Dentry::File { origin: Some(o) }) => {
                let dir = matches!(record, Some(Dentry::Dir { .. }));
                (o.clone(), self.old.locate_path(o, dir).map(Some))
            }
            None => match parent_old {
                Some(po) => (join(&po.path, name), old_child(&po.loc, name)),
                None => return Ok(None),
            },
        };
        match found {
            Ok(Some((loc, st))) => {
                // A redirect names a directory or a non-directory; if OLD's entry there has
                // changed kind behind our back (a directory swapped for a symlink), the
                // redirect's content is gone, and nothing else is shown in its place.
                let is_dir = Kind::from_mode(st.st_mode) == Kind::Dir;
                match record {
                    Some(Dentry::Dir { .. }) if !is_dir => return Ok(None),
                    Some(Dentry::File { .. }) if is_dir => return Ok(None),
                    _ => {}
                }
                Ok(Some((path, loc, st)))
            }
            Ok(None) => Ok(None),
            Err(e) if posix::vanished(&e) => Ok(None),
            Err(e) => Err(Error::Store {
                op: "open OLD entry",
                source: e,
            }),
        }
    }

    /// Attach an inode to a resolved entry (counts one kernel lookup).
    pub(crate) fn attach(
        &self,
        parent: u64,
        name: &OsStr,
        r: Resolved,
    ) -> Result<(Arc<Inode>, Attr)> {
        let id = r.identity();
        let st = *r.stat();
        let dir_id = match &r.record {
            Some(Dentry::Dir { id, .. }) if r.kind == Kind::Dir => Some(*id),
            _ => None,
        };
        let old_group = self.old_group_of(&r)?;
        let want = self.number_for(&r)?;
        let Resolved { kind, new, old, .. } = r;
        let new = new.map(|(loc, _)| loc);
        let old_ids = old
            .as_ref()
            .map(|(_, _, s)| vec![Identity::Old(s.st_dev, s.st_ino)])
            .unwrap_or_default();
        let old = old.map(|(path, loc, _)| OldRef { path, loc });
        let fresh_new = new.clone();
        let inode = self
            .inodes
            .lookup_or_insert(id, kind, want, parent, name, || Node {
                names: vec![(parent, name.to_owned())],
                ids: old_ids,
                new,
                old,
                dir_id,
                old_group,
                subdirs: None,
                cache_stamp: None,
                listed_at: None,
                copy: Default::default(),
                rechecked: None,
                meta: None,
                partial: None,
            });
        {
            // An inode found again by identity: the name just resolved is a current NEW
            // location of it. For a non-directory it replaces the one held, which may be gone
            // (its names were unlinked while another link lived on, or it was the kept-alive
            // link a link-up just removed). A directory keeps its own fd.
            let mut n = inode.node();
            if fresh_new.is_some() && (n.new.is_none() || kind != Kind::Dir) {
                n.new = fresh_new;
            }
            if n.old_group.is_none() {
                n.old_group = old_group;
            }
        }
        if kind == Kind::File && !self.in_new(&inode) {
            self.load_meta_change(&inode, &st)?;
        }
        // A NEW file whose data is partly OLD's (or an S3 NEW's bucket's): its chunk map, once
        // per inode.
        if kind == Kind::File
            && let Identity::New(dev, ino) = id
            && self.eviction_done(dev, ino)
            && self.journal.has_partial(dev, ino)
            && inode.node().partial.is_none()
        {
            let loc = inode.node().new.clone();
            if let Some(loc) = loc
                && let Some(p) = self.load_partial(dev, ino, &loc)?
            {
                self.hold_partial(&inode, p);
            }
        }
        let attr = self.attr_of(&inode, &st)?;
        Ok((inode, attr))
    }

    /// The number a resolved entry should have (see [`inode::old_number`]): OLD's when OLD shows
    /// it, else the one the journal keeps for its NEW inode (it came from OLD), else the number
    /// of an entry born in the view. A journal read only for entries NEW alone shows.
    fn number_for(&self, r: &Resolved) -> Result<u64> {
        if let Some((_, _, ost)) = &r.old {
            return Ok(inode::old_number(ost.st_ino));
        }
        match &r.new {
            Some((_, nst)) => self.new_number(nst.st_dev, nst.st_ino),
            None => Ok(0),
        }
    }

    /// The number of NEW's inode (dev, ino) shown without OLD (see [`Self::number_for`]).
    fn new_number(&self, dev: u64, ino: u64) -> Result<u64> {
        Ok(self
            .journal
            .view_ino(dev, ino)?
            .unwrap_or_else(|| inode::new_born_number(ino)))
    }

    /// `inode` (its number made from OLD's) now lives in NEW as (dev, ino): it keeps its
    /// number once OLD no longer shows it (a rename, commit), recorded in `b`.
    pub(crate) fn keep_number(&self, b: &mut journal::Batch, entry: &Inode, dev: u64, ino: u64) {
        self.inodes.add_identity(entry, Identity::New(dev, ino));
        if entry.ino != ROOT_INO && entry.ino != inode::new_born_number(ino) {
            b.view_ino(dev, ino, entry.ino);
        }
    }

    /// The kernel looks `name` up: a copy it finds is queued for a check against OLD
    /// (changes made in OLD behind the view are found when applications touch the entry).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let (inode, attr) = self.lookup_entry(parent, name)?;
        self.note_lookup(&inode);
        Ok(attr)
    }

    /// Resolve and attach `name` in `parent` (one lookup counted).
    pub(crate) fn lookup_entry(&self, parent: u64, name: &OsStr) -> Result<(Arc<Inode>, Attr)> {
        {
            let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
            let p = self.inode(parent)?;
            let r = self.resolve(&p, name)?.ok_or_else(|| not_found("lookup"))?;
            if self.pending_link_up(&r)?.is_none() && self.adoptable(&r)?.is_none() {
                return self.attach(parent, name, r);
            }
        }
        // An OLD name of a hard-link group another name of which was copied up: link it to
        // the NEW copy, which changes NEW, so under the exclusive lock.
        let _ns = self.ns.write().unwrap_or_else(|p| p.into_inner());
        let p = self.inode(parent)?;
        let mut r = self.resolve(&p, name)?.ok_or_else(|| not_found("lookup"))?;
        if let Some((st, copy)) = self.adoptable(&r)? {
            self.adopt_taken_copy_locked(&st, copy)?;
        }
        if let Some((dev, ino, g)) = self.pending_link_up(&r)?
            && self.link_up_locked(&p, name, dev, ino, g)?
        {
            r = self.resolve(&p, name)?.ok_or_else(|| not_found("lookup"))?;
        }
        self.attach(parent, name, r)
    }

    /// The OLD hard-link group of a resolved non-directory, if it has one.
    fn old_group_of(&self, r: &Resolved) -> Result<Option<(u64, u64)>> {
        if r.kind == Kind::Dir {
            return Ok(None);
        }
        match (&r.new, &r.old) {
            (Some((_, st)), _) => Ok(self.journal.copy_of(st.st_dev, st.st_ino)?),
            (None, Some((_, _, st))) if st.st_nlink > 1 => Ok(Some((st.st_dev, st.st_ino))),
            _ => Ok(None),
        }
    }

    /// An OLD-only name whose hard-link group already has a NEW copy: it must become a link
    /// to that copy before the kernel learns of it.
    fn pending_link_up(&self, r: &Resolved) -> Result<Option<(u64, u64, journal::HardLinkGroup)>> {
        if r.new.is_some() || r.kind == Kind::Dir {
            return Ok(None);
        }
        let Some((_, _, st)) = &r.old else {
            return Ok(None);
        };
        if st.st_nlink <= 1 {
            return Ok(None);
        }
        Ok(self
            .journal
            .hardlink(st.st_dev, st.st_ino)?
            .filter(|g| g.copy.is_some())
            .map(|g| (st.st_dev, st.st_ino, g)))
    }

    /// An OLD-only name of a file OLD gave further names after NEW took its copy (one name
    /// then, so no group was recorded): the file's OLD stat and NEW's copy (new_dev, new_ino),
    /// which the name must join rather than be copied apart.
    fn adoptable(&self, r: &Resolved) -> Result<Option<(rustix::fs::Stat, (u64, u64))>> {
        if r.new.is_some() || r.kind == Kind::Dir {
            return Ok(None);
        }
        let Some((_, _, st)) = &r.old else {
            return Ok(None);
        };
        if st.st_nlink <= 1 || self.is_single() {
            return Ok(None);
        }
        if self
            .journal
            .hardlink(st.st_dev, st.st_ino)?
            .is_some_and(|g| g.copy.is_some())
        {
            return Ok(None);
        }
        Ok(self
            .journal
            .taken_copy(st.st_dev, st.st_ino)?
            .map(|copy| (*st, copy)))
    }

    /// Make NEW's copy `copy` of OLD file `st` its hard-link group's copy (see
    /// [`Self::adoptable`]), found by its file handle or, where NEW's handles do not last, at
    /// the name it was copied to; a copy found at neither (moved through the view on such a
    /// NEW) is left alone and the name is copied apart, logged. Caller holds `ns` write.
    fn adopt_taken_copy_locked(&self, st: &rustix::fs::Stat, copy: (u64, u64)) -> Result<()> {
        let (ndev, nino) = copy;
        let (handle, origin) = match self.journal.copy(ndev, nino)? {
            Some(rec) if (rec.fp.dev, rec.fp.ino) == (st.st_dev, st.st_ino) => {
                (rec.handle, Some(rec.origin))
            }
            Some(_) => return Ok(()),
            None => (Vec::new(), self.journal.origin_of(ndev, nino)?),
        };
        let opened = if handle.is_empty() {
            origin.and_then(|o| {
                self.new
                    .open_path(std::path::Path::new(OsStr::from_bytes(&o)))
                    .ok()
            })
        } else {
            posix::open_by_handle(self.new.root(), &handle).ok()
        };
        let fd = match opened {
            Some(fd)
                if posix::stat_fd(fd.as_fd()).is_ok_and(|n| {
                    (n.st_dev, n.st_ino) == (ndev, nino) && Kind::from_mode(n.st_mode) == Kind::File
                }) =>
            {
                fd
            }
            _ => {
                tracing::info!(
                    old_ino = st.st_ino,
                    "a file OLD linked to another name after its copy: NEW's copy was not found \
                     (moved through the view on a NEW without lasting file handles); the new \
                     name is copied as a file of its own"
                );
                return Ok(());
            }
        };
        let mut g =
            self.journal
                .hardlink(st.st_dev, st.st_ino)?
                .unwrap_or(journal::HardLinkGroup {
                    old_nlink: st.st_nlink as u32,
                    ..Default::default()
                });
        g.copy = Some(self.new_identity(fd.as_fd())?);
        g.kept_alive = !self.caps.handles;
        let mut b = journal::Batch::new();
        b.hardlink(st.st_dev, st.st_ino, &g)
            .copy_of(ndev, nino, st.st_dev, st.st_ino);
        self.journal.commit(b, true)?;
        if g.kept_alive {
            let work = self.work_dir()?;
            match rustix::fs::linkat(
                &fd,
                "",
                &work,
                keep_alive_name(st.st_dev, st.st_ino).as_str(),
                rustix::fs::AtFlags::EMPTY_PATH,
            ) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => {
                    return Err(e).ctx("keep an OLD hard-link group's copy in the work dir");
                }
            }
        }
        tracing::info!(
            old_ino = st.st_ino,
            "a file OLD linked to another name after its copy: the new name joins NEW's copy"
        );
        Ok(())
    }

    /// The NEW copy of OLD hard-link group (dev, ino), as `O_PATH`: by its file handle, or,
    /// where NEW's handles do not last (`handle` empty), by its name in the work dir, checked
    /// to be the group's copy. ENOENT or ESTALE once the copy is gone.
    pub(crate) fn open_group_copy(
        &self,
        dev: u64,
        ino: u64,
        handle: &[u8],
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        if !handle.is_empty() {
            return posix::open_by_handle(self.new.root(), handle);
        }
        let work = posix::open_child(self.new.root(), OsStr::new(WORK_DIR))?;
        let fd = rustix::fs::openat(
            &work,
            keep_alive_name(dev, ino).as_str(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let st = posix::stat_fd(fd.as_fd())?;
        match self.journal.copy_of(st.st_dev, st.st_ino) {
            Ok(Some(g)) if g == (dev, ino) => Ok(fd),
            _ => Err(std::io::Error::from_raw_os_error(libc::ESTALE)),
        }
    }

    /// Link the NEW copy of OLD group (dev, ino) in as `name` in `parent`. `false` if the copy
    /// is gone from NEW (every NEW name of it was removed). Caller holds `ns` write.
    pub(crate) fn link_up_locked(
        &self,
        parent: &Inode,
        name: &OsStr,
        dev: u64,
        ino: u64,
        mut g: journal::HardLinkGroup,
    ) -> Result<bool> {
        let Some(handle) = g.copy.clone() else {
            return Ok(false);
        };
        let fd = match self.open_group_copy(dev, ino, &handle) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                return Ok(false);
            }
            Err(e) => {
                return Err(Error::Store {
                    op: "open the NEW copy by handle",
                    source: e,
                });
            }
        };
        let pfd = self.ensure_new_dir_locked(parent)?;
        g.linked_up += 1;
        // The last OLD name of a group whose copy is kept alive in the work dir takes that name
        // over in one rename: no crash leaves both or neither, and the copy's link count never
        // passes through one too many (a FUSE NEW would keep that count in its cache).
        let last_kept = g.pending_old_names() == 0 && g.kept_alive;
        let work = if last_kept {
            posix::open_child(self.new.root(), OsStr::new(WORK_DIR)).ok()
        } else {
            None
        };
        crate::store::copy::keeping_dir_times(&pfd, || {
            if let Some(work) = &work {
                let kept = OsString::from(keep_alive_name(dev, ino));
                match posix::rename_noreplace(work.as_fd(), &kept, pfd.as_fd(), name) {
                    Err(rustix::io::Errno::NOENT) => {}
                    r => return r.ctx("rename an OLD hard link's kept-alive NEW copy into place"),
                }
            }
            rustix::fs::linkat(&fd, "", pfd.as_fd(), name, rustix::fs::AtFlags::EMPTY_PATH)
                .ctx("link an OLD hard link to its NEW copy")
        })?;
        if last_kept {
            // Every OLD name is linked: nothing of the group is left in the work dir, which
            // goes once empty (other groups may still keep copies there).
            self.remove_work_dir_if_empty();
            g.kept_alive = false;
        }
        let mut b = journal::Batch::new();
        b.hardlink(dev, ino, &g);
        {
            // One more name of the dataset is in NEW (prepare's scan counts names).
            let size = posix::stat_fd(fd.as_fd()).map_or(0, |st| st.st_size as u64);
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.files += 1;
            d.bytes += size;
            b.done(&d);
        }
        self.journal.commit(b, false)?;
        Ok(true)
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.inodes.forget(ino, count);
    }

    /// Inodes in the table (the root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Record the st_dev of the FUSE mount serving this view.
    pub fn set_mount_dev(&self, dev: u64) {
        let _ = self.mount_dev.set(dev);
    }

    /// The inode numbers [`View::invalidate`] sends, for the mount's notifier thread. Taken
    /// before the copier starts, so that nothing it takes again goes unsent.
    pub fn invalidations(&self) -> crossbeam_channel::Receiver<u64> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let _ = self.invalidator.set(tx);
        rx
    }

    /// Run `send` (one notification to the kernel) unless a takeover holds notifications;
    /// whether it ran.
    pub fn while_invalidations_open(&self, send: impl FnOnce()) -> bool {
        use std::sync::atomic::Ordering;
        let open = self
            .invalidations_open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let open = *open && !self.invalidations_held.load(Ordering::SeqCst);
        if open {
            send();
        }
        open
    }

    /// A takeover is about to park requests: no notification starts from now on, and the one
    /// being sent, if any, has reached the kernel when this returns true. False if that one
    /// is still waiting in the kernel after `limit` (on a page lock a request stuck on a hung
    /// store holds): the takeover is refused then, and `release_invalidations` undoes this.
    pub fn hold_invalidations(&self, limit: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.invalidations_held.store(true, Ordering::SeqCst);
        let start = std::time::Instant::now();
        loop {
            match self.invalidations_open.try_lock() {
                Ok(mut open) => {
                    *open = false;
                    return true;
                }
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    *p.into_inner() = false;
                    return true;
                }
                Err(std::sync::TryLockError::WouldBlock) if start.elapsed() >= limit => {
                    return false;
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Notifications go to the kernel again (a takeover was refused or failed).
    pub fn release_invalidations(&self) {
        use std::sync::atomic::Ordering;
        *self
            .invalidations_open
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
        self.invalidations_held.store(false, Ordering::SeqCst);
    }

    /// What backs inode `ino` changed without the kernel asking (the copier took a file again
    /// after OLD changed behind the view's back): the kernel drops its cached attributes and
    /// pages of it, whatever the TTL. Sent through another thread, never from a request's.
    pub(crate) fn invalidate(&self, ino: u64) {
        if let Some(tx) = self.invalidator.get() {
            let _ = tx.send(ino);
        }
    }

    /// Attributes of an inode; through the open file `fh` when the kernel gives one (the only
    /// way to reach a file whose every name was removed while it stays open).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let st = match fh.and_then(|fh| self.handles.open_file(fh)) {
            Some(file) => posix::stat_fd(file.as_fd()).ctx("fstat open file")?,
            None => match self.backing_stat(&inode) {
                // Unlinked while open: the open file still has its attributes (nlink 0).
                Err(e) if e.errno() == libc::ENOENT => match self.handles.open_file_of(ino) {
                    Some(file) => posix::stat_fd(file.as_fd()).ctx("fstat open file")?,
                    None => return Err(e),
                },
                r => r?,
            },
        };
        self.attr_of(&inode, &st)
    }

    /// stat of whatever backs the inode now: NEW if it is there, else OLD.
    pub(crate) fn backing_stat(&self, inode: &Inode) -> Result<rustix::fs::Stat> {
        let n = inode.node();
        match (&n.new, &n.old) {
            (Some(loc), _) => loc.stat().ctx("stat NEW"),
            (None, Some(o)) => o.loc.stat().ctx("stat OLD"),
            (None, None) => Err(not_found("getattr")),
        }
    }

    fn attr_of(&self, inode: &Inode, st: &rustix::fs::Stat) -> Result<Attr> {
        let mut a = Attr::from_stat(inode.ino, st);
        let (group, in_new) = {
            let n = inode.node();
            if let (None, Some(m)) = (&n.new, &n.meta) {
                metachange::show(&mut a, m);
            }
            // A partly copied or evicted file: NEW's file holds few blocks, the file is whole
            // (`du` counts it as data, as OLD's or the bucket's copy is).
            if n.partial.is_some() {
                a.blocks = a.blocks.max(a.size.div_ceil(512));
            }
            (n.old_group, n.new.is_some())
        };
        if let Some((dev, ino)) = group
            && let Some(g) = self.journal.hardlink(dev, ino)?
        {
            // OLD names of the group not yet linked to the copy still name this file; OLD
            // names removed through the view no longer do.
            a.nlink = if in_new {
                (a.nlink + g.pending_old_names()).saturating_sub(u32::from(g.kept_alive))
            } else {
                a.nlink.saturating_sub(g.removed).max(1)
            };
        }
        if inode.kind == Kind::Dir {
            // A merged directory's link count is 2 + its subdirectories in the view, which
            // neither store's count alone gives. Counted once and kept until a change through
            // the view in this directory, or the attribute TTL (for changes in OLD).
            let (merged, cached) = {
                let n = inode.node();
                (
                    n.old.is_some() && (n.new.is_some() || n.dir_id.is_some()),
                    n.subdirs,
                )
            };
            if merged {
                let subdirs = match cached {
                    Some((c, at)) if at.elapsed() < SUBDIR_COUNT_TTL => Some(c),
                    _ => match self.list(inode) {
                        Ok(l) => {
                            let c = l.iter().filter(|e| e.kind == Kind::Dir).count() as u32;
                            inode.node().subdirs = Some((c, std::time::Instant::now()));
                            Some(c)
                        }
                        // OLD unreachable (a hung NFS server, an S3 endpoint gone): a link
                        // count is no reason to fail a stat; the last count, else the backing
                        // store's own, and the listing itself reports the error.
                        Err(e) => {
                            tracing::warn!(ino = inode.ino, error = %e, "counting a merged directory's subdirectories");
                            cached.map(|(c, _)| c)
                        }
                    },
                };
                if let Some(subdirs) = subdirs {
                    a.nlink = 2 + subdirs;
                }
            }
        }
        Ok(a)
    }

    /// The merged listing of a directory (rule 7: each name once, tombstoned names hidden).
    pub(crate) fn list(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let n = dir.node();
        let sides = Node {
            names: Vec::new(),
            new: n.new.clone(),
            old: n.old.clone(),
            dir_id: n.dir_id,
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
        drop(n);
        self.list_node(&sides)
    }

    /// The merged listing of the directory whose two sides and id `sides` holds.
    pub(crate) fn list_node(&self, sides: &Node) -> Result<Vec<DirEntry>> {
        let dnew = sides.new.as_ref().and_then(|l| l.dir_fd().cloned());
        let (dold, sold) = if self.is_single() {
            (None, None)
        } else {
            let o = sides.old.as_ref();
            (
                o.and_then(|o| o.loc.dir_fd().cloned()),
                o.and_then(|o| o.loc.object().cloned()),
            )
        };
        let did = sides.dir_id;
        // Sorted: two snapshots of an unchanged directory list it in the same order (the
        // kernel's listing cache may join the start of one to the rest of another).
        let records: std::collections::BTreeMap<Vec<u8>, Dentry> = match did {
            Some(id) => self.journal.list(id)?.into_iter().collect(),
            None => Default::default(),
        };
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        let sides = [(dnew, true), (dold, false)];
        for (fd, in_new) in sides {
            let Some(fd) = fd else { continue };
            let dev = posix::stat_fd(fd.as_fd()).ctx("stat dir")?.st_dev;
            for ent in posix::read_dir_names(fd.as_fd()).ctx("readdir")? {
                // OLD's entries are hidden by NEW's and by any record at their name.
                if seen.contains(&ent.name) || (!in_new && records.contains_key(&ent.name)) {
                    continue;
                }
                if in_new && did == Some(ROOT_DIR) && ent.name == WORK_DIR.as_bytes() {
                    continue;
                }
                let kind = match Kind::from_dtype(ent.dtype) {
                    Some(k) => k,
                    None => match posix::stat_at(fd.as_fd(), OsStr::from_bytes(&ent.name)) {
                        Ok(st) => Kind::from_mode(st.st_mode),
                        // Removed since readdir read it: a concurrent change, not an error.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(e) => return Err(e).ctx("stat entry"),
                    },
                };
                // d_ino: the number the kernel knows for the entry, when it knows it; else the
                // number a lookup would give it.
                let (id, number) = if in_new {
                    (Identity::New(dev, ent.ino), None)
                } else {
                    (
                        Identity::Old(dev, ent.ino),
                        Some(inode::old_number(ent.ino)),
                    )
                };
                let (ino, new_id) = match (self.inodes.ino_of(&id), number) {
                    (Some(n), _) | (None, Some(n)) => (n, None),
                    (None, None) => (0, Some((dev, ent.ino))),
                };
                out.push(DirEntry {
                    name: OsString::from_vec(ent.name.clone()),
                    kind,
                    ino,
                    new_id,
                });
                seen.insert(ent.name);
            }
        }
        if let Some(dir) = sold.filter(|e| e.is_dir()) {
            // An S3 OLD directory: its objects and prefixes, under NEW's names and the records.
            let dev = dir.tree.dev();
            for c in dir.tree.list(&dir.rel).ctx("list OLD (S3)")? {
                let name = c.name.into_bytes();
                if seen.contains(&name) || records.contains_key(&name) {
                    continue;
                }
                out.push(DirEntry {
                    name: OsString::from_vec(name.clone()),
                    kind: if c.is_dir { Kind::Dir } else { Kind::File },
                    ino: self
                        .inodes
                        .ino_of(&Identity::Old(dev, c.ino))
                        .unwrap_or(inode::old_number(c.ino)),
                    new_id: None,
                });
                seen.insert(name);
            }
        }
        for (name, rec) in &records {
            if seen.contains(name) {
                continue;
            }
            let origin = match rec {
                Dentry::Dir {
                    origin: Some(o), ..
                }
                | Dentry::File { origin: Some(o) } => o,
                _ => continue,
            };
            // Gone from OLD (as resolution treats it): not listed. Any other failure (EIO,
            // EMFILE, a store that times out) fails the listing rather than hide the name: a
            // copier pass or commit's check walking this listing must not skip it unseen.
            let found = match self
                .old
                .locate_path(origin, matches!(rec, Dentry::Dir { .. }))
            {
                Ok(f) => Some(f),
                Err(e) if posix::vanished(&e) => None,
                Err(e) => {
                    return Err(Error::Store {
                        op: "open a renamed entry's OLD origin",
                        source: e,
                    });
                }
            };
            if let Some((_, st)) = found {
                let kind = Kind::from_mode(st.st_mode);
                // Same rule as resolution: a redirect whose OLD entry changed kind shows nothing.
                if matches!(rec, Dentry::Dir { .. }) != (kind == Kind::Dir) {
                    continue;
                }
                let id = Identity::Old(st.st_dev, st.st_ino);
                out.push(DirEntry {
                    name: OsString::from_vec(name.clone()),
                    kind,
                    ino: self
                        .inodes
                        .ino_of(&id)
                        .unwrap_or(inode::old_number(st.st_ino)),
                    new_id: None,
                });
            }
        }
        Ok(out)
    }

    /// Open directory `ino`: its handle, and whether the kernel may keep the listing it cached
    /// at an earlier open (the directory's stores are unchanged since then, see
    /// [`Self::dir_stamp`]; a change through the view the kernel sees itself). The handle's
    /// listing is taken at its first read, see [`Self::readdir`].
    pub fn opendir(&self, ino: u64, keep_for: std::time::Duration) -> Result<(u64, bool)> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(Error::refused(libc::ENOTDIR, "not a directory"));
        }
        // Taken before the listing: a change made after it shows in the next stamp.
        let stamp = self.dir_stamp(&dir);
        // Kept only while the entries the kernel got with the listing are still within their
        // TTL (`keep_for`): past it, a kept listing would make the kernel look up each entry
        // one request at a time, where a fresh READDIRPLUS answers a whole batch at once.
        let keep = {
            let mut n = dir.node();
            let now = std::time::Instant::now();
            let fresh = n
                .listed_at
                .is_some_and(|t| now.duration_since(t) < keep_for);
            let keep = stamp.is_some() && n.cache_stamp == stamp && fresh;
            n.cache_stamp = stamp;
            if !keep {
                n.listed_at = Some(now);
            }
            keep
        };
        Ok((self.handles.insert_dir(ino), keep))
    }

    /// The listing a directory handle reads: ".", "..", then the merged entries.
    fn dir_snapshot(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        let dir = self.inode(ino)?;
        let parent = dir
            .node()
            .names
            .first()
            .map(|(p, _)| *p)
            .unwrap_or(ROOT_INO);
        let mut entries = vec![
            DirEntry {
                name: ".".into(),
                kind: Kind::Dir,
                ino,
                new_id: None,
            },
            DirEntry {
                name: "..".into(),
                kind: Kind::Dir,
                ino: parent,
                new_id: None,
            },
        ];
        for mut e in self.list(&dir)? {
            if let Some((dev, ino)) = e.new_id.take() {
                e.ino = self.new_number(dev, ino)?;
            }
            entries.push(e);
        }
        Ok(entries)
    }

    /// What the listing of a directory is made from: the modification and change times of its
    /// NEW and OLD directories (a copy linked into NEW changes NEW's ctime: conservative).
    /// None when one of them cannot say (an S3 OLD's prefix has no times): never kept then.
    fn dir_stamp(&self, dir: &Inode) -> Option<(i64, i64, i64, u64)> {
        let (new, old) = {
            let n = dir.node();
            (n.new.clone(), n.old.as_ref().map(|o| o.loc.clone()))
        };
        #[allow(clippy::unnecessary_cast)]
        let times = |st: &rustix::fs::Stat| {
            (
                st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
                st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            )
        };
        let new = match new {
            Some(l) => Some(times(&l.stat().ok()?)),
            None => None,
        };
        let old = match old {
            Some(_) if self.is_single() => None,
            Some(Loc::Obj(_)) => return None,
            Some(l) => Some(times(&l.stat().ok()?)),
            None => None,
        };
        let (nm, nc) = new.unwrap_or((-1, -1));
        let (om, oc) = old.unwrap_or((-1, -1));
        Some((nm, nc, om, oc as u64))
    }

    /// Entries of an open directory from `offset` (0 = start). Each entry's own offset is its
    /// index + 1, in a snapshot taken when the handle reads from the start: offsets stay valid
    /// whatever changes while the application reads on (rule 7), and a rewind sees the
    /// directory as it is then.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>> {
        self.handles
            .dir_entries(fh, offset, |ino| self.dir_snapshot(ino))
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove(fh);
    }

    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(self.new.root()).ctx("statvfs NEW")
    }
}

/// Find `name` in OLD's directory `dir`, a POSIX directory or an S3 one.
fn old_child(dir: &Loc, name: &OsStr) -> std::io::Result<Option<(Loc, rustix::fs::Stat)>> {
    if let Some(dfd) = dir.dir_fd() {
        return locate(dfd, name);
    }
    match dir.object() {
        Some(d) if d.is_dir() => Ok(d.tree.lookup(&d.rel, name)?.map(|e| {
            let st = e.st;
            (Loc::Obj(Arc::new(e)), st)
        })),
        _ => Ok(None),
    }
}

/// Find `name` in the store directory `dir`: a directory gets an fd of its own, anything else
/// is held by name in `dir` (so fds scale with directories, not files).
fn locate(dir: &Arc<OwnedFd>, name: &OsStr) -> std::io::Result<Option<(Loc, rustix::fs::Stat)>> {
    let st = match posix::stat_at(dir.as_fd(), name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    if Kind::from_mode(st.st_mode) == Kind::Dir {
        let fd = posix::open_child(dir.as_fd(), name)?;
        let st = posix::stat_fd(fd.as_fd())?;
        Ok(Some((Loc::Fd(Arc::new(fd)), st)))
    } else {
        Ok(Some((Loc::At(dir.clone(), name.to_owned()), st)))
    }
}

/// Name, in [`WORK_DIR`], of the kept-alive NEW copy of OLD hard-link group (dev, ino).
pub(crate) fn keep_alive_name(dev: u64, ino: u64) -> String {
    format!("hardlink-{dev}-{ino}")
}
