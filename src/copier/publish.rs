//! An S3 NEW: the view's NEW is a staging tree in the state dir, and the publisher makes the
//! bucket hold what the staging tree holds.
//!
//! Every change through the view lands in the staging tree (`<state>/stage`), a plain POSIX
//! directory: the view, the copier, copy-up, the takeover and abort work on it exactly as on a
//! POSIX NEW, and an fsync there is as durable as on any local file. The publisher runs passes
//! that compare the staging tree with what it put into the bucket (the journal's `Published`
//! records) and close the difference:
//! - a new or changed file is PUT whole, with its Content-MD5 and POSIX metadata in s3fs's and
//!   rclone's names (`mode`, `uid`, `gid`, `mtime`);
//! - a file whose bytes are already in the bucket under another key (a rename, a second hard
//!   link) is copied there by the server (CopyObject; UploadPartCopy above 5 GiB), and a file whose metadata alone changed
//!   is copied onto itself with the new metadata; the bytes are compared by MD5 first;
//! - a directory is a `dir/` marker carrying its metadata (s3fs's convention); a symlink an
//!   object holding its target with an `S_IFLNK` mode; a fifo or device node an empty object;
//! - keys the staging tree no longer has are deleted, after the pass's uploads and copies, so a
//!   renamed file's bytes are copied before its old key goes.
//!
//! A record is written `pending` before each request, so a crash between a request and its
//! record leaves no object nobody knows of (abort deletes pending keys too). A file that
//! changes while it uploads is recorded as it was before and found changed by the next pass.
//! Nothing of ferryfs's goes into the bucket: the staging tree's work dir is skipped.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use rustix::fs::OFlags;

use crate::journal::{Batch, CopyError, Meta, Published, Records};
use crate::store::posix::{
    PosixStore, open_child, read_dir_names, reopen, stat_at, stat_fd, vanished,
};
use crate::store::s3::{PosixMeta, S3Error, S3Store};

/// Uploads in flight: S3 requests are latency-bound (see the copier's S3 default).
pub const DEFAULT_WORKERS: usize = 64;

/// Longest key S3 takes, in bytes.
pub const KEY_MAX: usize = 1024;

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PassReport {
    /// Keys the bucket must hold (files, symlinks, directory markers...).
    pub objects: u64,
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    /// Server-side copies: renames, second links, metadata changes.
    pub copied: u64,
    /// Server-side copies from an S3 OLD's bucket (objects the copier brought unchanged).
    pub from_old: u64,
    pub from_old_bytes: u64,
    pub deleted: u64,
    /// Keys gone from the staging tree whose deletion waits for a pass that saw no failure,
    /// no file changing and no entry vanishing (see [`Publisher::pass`]).
    pub held: u64,
    /// Files that changed while they uploaded (the next pass takes them again).
    pub changed: u64,
    /// (key, error) of what failed this pass.
    pub errors: Vec<(String, String)>,
    /// The pass did not run to its end (abort, a takeover): nothing can be concluded.
    pub interrupted: bool,
    /// Files partly copied into the staging tree, not published until the copier has filled
    /// them in.
    pub waiting: u64,
    /// Bytes the staging tree held when the pass walked it.
    pub staged_bytes: u64,
    /// Files whose bytes this pass removed from the staging tree (uploaded, closed).
    pub evicted: u64,
    /// Files uploaded but kept in the staging tree as they changed less than a second before
    /// (a pass a second later evicts them).
    pub evict_later: u64,
    /// How long the pass took to find what differs (its walk of the staging tree and the
    /// records), what every pass costs however little changed.
    #[serde(skip)]
    pub walk: std::time::Duration,
}

impl PassReport {
    /// One key brought up to date (anything but [`Done::Changed`], which the pass counts
    /// with the keys it holds back).
    fn count(&mut self, done: Done) {
        match done {
            Done::Uploaded(n) => {
                self.uploaded += 1;
                self.uploaded_bytes += n;
            }
            Done::Copied => self.copied += 1,
            Done::FromOld(n) => {
                self.from_old += 1;
                self.from_old_bytes += n;
            }
            Done::Evicted(inner, n) => {
                self.evicted += 1;
                self.staged_bytes = self.staged_bytes.saturating_sub(n);
                self.count(*inner);
            }
            Done::Recorded | Done::Changed => {}
        }
    }

    /// The bucket held what the staging tree held: the pass had nothing to do.
    pub fn clean(&self) -> bool {
        self.uploaded
            + self.copied
            + self.from_old
            + self.deleted
            + self.held
            + self.changed
            + self.waiting
            == 0
            && self.errors.is_empty()
            && !self.interrupted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A staged entry and the key it must have.
struct Want {
    key: String,
    /// Below the staging tree's root (opened again without following any symlink).
    path: PathBuf,
    /// st_dev of the staged entry (with `rec.ino`, the key of its copy record).
    dev: u64,
    kind: Kind,
    /// st_nlink: a file with other names may have its bytes under another key already.
    links: u64,
    /// Bytes it takes in the staging tree (st_blocks).
    staged: u64,
    rec: Published,
}

#[allow(clippy::unnecessary_cast)]
fn stamp(st: &rustix::fs::Stat) -> Published {
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    Published {
        pending: false,
        ino: st.st_ino as u64,
        size: if is_dir { 0 } else { st.st_size as u64 },
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
        mode: st.st_mode as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        etag: String::new(),
        md5: String::new(),
        racy: false,
    }
}

fn meta_of(r: &Published) -> PosixMeta {
    PosixMeta {
        mode: Some(r.mode),
        uid: Some(r.uid),
        gid: Some(r.gid),
        mtime: Some(r.mtime),
    }
}

/// The same bytes as recorded (same inode, size, mtime and ctime: nothing wrote it since).
fn same_stat(a: &Published, b: &Published) -> bool {
    a.ino == b.ino && a.size == b.size && a.mtime == b.mtime && a.ctime == b.ctime
}

fn same_meta(a: &Published, b: &Published) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtime == b.mtime
}

/// Records that may hold a staged file's bytes under another key, by (ino, size, mtime): those
/// of keys gone or changed since their record (a rename, a file replaced) and of files with
/// several names. Only those: unchanged keys of files with one name cannot serve another key.
type Sources = HashMap<(u64, u64, (i64, u32)), Vec<(String, Published)>>;

fn add_source(sources: &mut Sources, key: &str, r: &Published) {
    if !r.pending && !key.ends_with('/') {
        sources
            .entry((r.ino, r.size, r.mtime))
            .or_default()
            .push((key.to_string(), r.clone()));
    }
}

/// Records read from the journal in key order, a page at a time.
struct Cursor<'a> {
    journal: &'a Records,
    page: std::collections::VecDeque<(String, Published)>,
    last: String,
    end: bool,
}

/// Records read per journal scan.
const RECORDS_PAGE: usize = 1024;

impl<'a> Cursor<'a> {
    fn new(journal: &'a Records) -> Cursor<'a> {
        Cursor {
            journal,
            page: Default::default(),
            last: String::new(),
            end: false,
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<&(String, Published)>> {
        if self.page.is_empty() && !self.end {
            let page = self
                .journal
                .published_after(&self.last, RECORDS_PAGE)
                .map_err(std::io::Error::other)?;
            self.end = page.len() < RECORDS_PAGE;
            if let Some((k, _)) = page.last() {
                self.last = k.clone();
            }
            self.page.extend(page);
        }
        Ok(self.page.front())
    }

    fn next(&mut self) -> std::io::Result<Option<(String, Published)>> {
        self.peek()?;
        Ok(self.page.pop_front())
    }
}

/// Makes an S3 NEW hold the staging tree; see the module docs.
pub struct Publisher {
    pub store: Arc<S3Store>,
    stage: PathBuf,
    journal: Records,
    workers: usize,
    stop: AtomicBool,
    /// An S3 OLD on the same service: unchanged copies of its objects are copied from its
    /// bucket by the server instead of uploaded (until a copy is refused: other credentials).
    old: Option<Arc<S3Store>>,
    from_old_ok: AtomicBool,
    /// Held by a takeover under way: no request until it is released (or the process ends).
    held: AtomicBool,
    /// One pass at a time (the daemon's loop, commit, abort).
    running: Mutex<()>,
    /// Failed uploads of the last pass, counted for the metrics and status.
    last: Mutex<PassReport>,
    passes: AtomicU64,
    /// The bucket keeps `key/` directory markers (prepare's probe); without them only an empty
    /// directory would need one, and it is an error instead.
    markers: bool,
    /// The view over the staging tree: uploaded files are evicted through it, and evicted
    /// files read through it (none: nothing is evicted).
    view: Option<Arc<crate::view::View>>,
    /// Keys being published now.
    in_flight: AtomicU64,
    /// Files evicted since start.
    evictions: AtomicU64,
    /// Files this pass uploaded but kept staged, as they changed too recently.
    evict_later: AtomicU64,
}

impl Publisher {
    pub fn new(store: Arc<S3Store>, stage: PathBuf, journal: Records, workers: usize) -> Publisher {
        let markers = journal.capabilities().map_or(true, |c| c.new_dir_markers());
        Publisher {
            store,
            stage,
            journal,
            workers: workers.max(1),
            stop: AtomicBool::new(false),
            old: None,
            from_old_ok: AtomicBool::new(true),
            markers,
            held: AtomicBool::new(false),
            running: Mutex::new(()),
            last: Mutex::new(PassReport::default()),
            passes: AtomicU64::new(0),
            view: None,
            in_flight: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evict_later: AtomicU64::new(0),
        }
    }

    /// Evict what is uploaded from the staging tree, through `view` (whose NEW the staging
    /// tree is), which reads evicted files from this bucket from then on.
    pub fn with_view(mut self, view: Arc<crate::view::View>) -> Publisher {
        view.set_new_bucket(self.store.clone());
        self.view = Some(view);
        self
    }

    /// Connect to the NEW bucket of `url` for the staging tree `stage`.
    pub fn connect(
        url: &crate::store::s3::S3Url,
        stage: PathBuf,
        journal: Records,
        workers: usize,
    ) -> Result<Publisher, S3Error> {
        Ok(Publisher::new(
            Arc::new(S3Store::connect(url)?),
            stage,
            journal,
            workers,
        ))
    }

    /// Copy unchanged copies of `old`'s objects from its bucket, server-side, when both
    /// stores are on the same service (else this does nothing).
    pub fn with_old(mut self, old: Arc<S3Store>) -> Publisher {
        if self.store.same_service(&old) {
            self.old = Some(old);
        }
        self
    }

    /// The OLD object the staged file `w` (open as `f`) is an unchanged copy of, as it is now
    /// in OLD's bucket (its key and ETag), when the server can copy it instead of an upload.
    fn old_source(&self, w: &Want, f: &std::fs::File, now: &Published) -> Option<(String, String)> {
        let old = self.old.as_ref()?;
        if !self.from_old_ok.load(Ordering::Relaxed) || now.size < SERVER_COPY_MIN {
            return None;
        }
        let rec = self.journal.copy(w.dev, now.ino).ok()??;
        if rec.is_dir {
            return None;
        }
        // The record is of this very file, not of an earlier one whose inode number the
        // staging file system gave again (a file renamed over the copy frees its number, and
        // the next file may get it): else OLD's bytes would take the place of the new ones.
        let handle = crate::store::posix::file_handle(std::os::fd::AsFd::as_fd(f)).ok()?;
        if rec.handle.is_empty() || rec.handle != handle {
            return None;
        }
        let rel = String::from_utf8(rec.origin).ok()?;
        let rel = rel.trim_start_matches('/').to_string();
        let info = old.head(&rel).ok()??;
        // The very version the copier copied (the fingerprint's inode is the hash of key and
        // ETag), else the staged bytes are uploaded.
        (info.size == now.size
            && crate::store::s3::tree::ino_of(&rel, Some(&info.etag)) == rec.fp.ino)
            .then_some((rel, info.etag))
    }

    /// At mount, before any request of this daemon: abort every multipart upload below the
    /// prefix that was begun and never completed (by a daemon killed, or handed over, in the
    /// middle of one). Only ferryfs writes below the prefix (prepare found it empty), and no
    /// upload of this daemon has begun yet. Gives how many were aborted.
    pub fn abort_unfinished_uploads(&self) -> Result<usize, S3Error> {
        let left = self.store.unfinished_uploads()?;
        for (key, id) in &left {
            tracing::info!(key = %key, "aborting a multipart upload a previous daemon left unfinished");
            self.store.abort_upload(key, id)?;
        }
        Ok(left.len())
    }

    /// Stop the pass under way at its next entry (abort, shutdown), and every later one.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stop_draining();
    }

    /// Writes waiting for staging room no longer wait: no pass makes room now.
    fn stop_draining(&self) {
        if let Some(v) = &self.view {
            v.set_stage_draining(false);
        }
    }

    /// No new request until [`release`](Self::release): a takeover under way. Requests in
    /// flight are not waited for (applications' requests are parked meanwhile); the process
    /// exits before the next daemon opens the journal, and their `pending` records make that
    /// daemon redo them.
    pub fn hold(&self) {
        self.held.store(true, Ordering::Release);
        self.stop_draining();
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::Release);
    }

    /// Held by a takeover (see [`hold`](Self::hold)).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    fn halted(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.held.load(Ordering::Acquire)
    }

    pub fn last(&self) -> PassReport {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keys being uploaded or copied now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Files evicted from the staging tree since the daemon started.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Passes until one finds nothing to do (at most `max`); the last pass's report.
    pub fn settle(&self, max: usize) -> std::io::Result<PassReport> {
        let mut r = self.pass()?;
        for _ in 1..max {
            if r.clean() || r.interrupted {
                break;
            }
            // Errors stay errors until their cause is fixed: one more pass to retry them, no
            // more.
            if r.uploaded + r.copied + r.from_old + r.deleted + r.changed == 0 {
                break;
            }
            r = self.pass()?;
        }
        Ok(r)
    }

    /// What a pass would do now, without doing it, one line per key: to upload or copy, to
    /// delete, and names no key can hold (verify's mismatches).
    pub fn plan(&self) -> std::io::Result<Vec<String>> {
        let d = self.diff()?;
        let root = PosixStore::open(&self.stage)?;
        let mut keys: Vec<String> = d
            .todo
            .iter()
            .filter(|(w, had)| match had {
                // Recorded moments after its last change, and unchanged since by stat: the
                // bytes decide.
                Some(r)
                    if r.racy
                        && !r.pending
                        && same_stat(r, &w.rec)
                        && same_meta(r, &w.rec)
                        && w.kind == Kind::File =>
                {
                    root.open_path(&w.path)
                        .and_then(|fd| reopen(fd.as_fd(), OFlags::RDONLY | OFlags::NONBLOCK))
                        .and_then(|f| crate::store::s3::file_md5(&f))
                        .map_or(true, |m| crate::store::s3::md5_etag(&m) != md5_of(r))
                }
                _ => true,
            })
            .map(|(w, _)| format!("{}: not in the NEW bucket yet", w.key))
            .collect();
        keys.extend(
            d.gone
                .iter()
                .map(|(k, _)| format!("{k}: still in the NEW bucket, no longer in the view")),
        );
        keys.extend(d.bad.into_iter().map(|(k, e)| format!("{k}: {e}")));
        keys.sort();
        Ok(keys)
    }

    /// The staging tree against the records, in one merge: the tree walked in key order
    /// beside the records read in pages in key order. What it keeps grows with what differs,
    /// not with the number of entries.
    fn diff(&self) -> std::io::Result<Diff> {
        let root = PosixStore::open(&self.stage)?;
        let mut d = Diff::default();
        let mut cursor = Cursor::new(&self.journal);
        // The store's prefix is part of every key.
        let room = KEY_MAX.saturating_sub(self.store.url.prefix.len());
        let mut last = String::new();
        let mut partial = false;
        let mut bad = Vec::new();
        walk(
            root.root(),
            Path::new(""),
            "",
            Walk {
                bad: &mut bad,
                partial: &mut partial,
                markers: self.markers,
            },
            &mut |w: Want| {
                // The merge needs keys in order; a walk out of order would take wanted keys
                // for gone ones (and delete them): refused, nothing concluded.
                if w.key <= last {
                    return Err(std::io::Error::other(format!(
                        "staging tree walked out of key order ({:?} after {last:?})",
                        w.key
                    )));
                }
                last.clone_from(&w.key);
                if w.key.len() > room {
                    d.bad.push((
                        w.key,
                        format!(
                            "with the prefix, longer than {KEY_MAX} bytes, S3's limit for a key"
                        ),
                    ));
                    return Ok(());
                }
                d.objects += 1;
                d.staged_bytes += w.staged;
                // A file partly copied (its chunks still in OLD are holes here) is published
                // with those chunks read from OLD through the view (or copied by the server
                // from an S3 OLD's object), never with holes for data; one with several names
                // waits for the copier to fill it in. (An evicted file's absent chunks are the
                // bucket's: published as any file.)
                let partial_file = w.kind == Kind::File
                    && self.journal.has_partial(w.dev, w.rec.ino)
                    && !self.journal.is_stub(w.dev, w.rec.ino)
                    && (w.links > 1 || self.view.is_none());
                while let Some((k, _)) = cursor.peek()? {
                    if *k >= w.key {
                        break;
                    }
                    let (k, r) = cursor.next()?.expect("peeked");
                    d.gone(k, r);
                }
                let had = match cursor.peek()? {
                    Some((k, _)) if *k == w.key => cursor.next()?.map(|(_, r)| r),
                    _ => None,
                };
                let differs = match &had {
                    Some(r) => {
                        r.pending || r.racy || !same_stat(r, &w.rec) || !same_meta(r, &w.rec)
                    }
                    None => true,
                };
                if let Some(r) = &had {
                    if differs || (w.kind == Kind::File && w.links > 1) {
                        add_source(&mut d.sources, &w.key, r);
                    }
                }
                if partial_file {
                    d.waiting += 1;
                } else if differs {
                    d.todo.push((w, had));
                }
                Ok(())
            },
        )?;
        while let Some((k, r)) = cursor.next()? {
            d.gone(k, r);
        }
        d.bad.extend(bad);
        d.partial = partial;
        Ok(d)
    }

    /// One pass: walk the staging tree, upload and copy what differs, delete what is gone.
    pub fn pass(&self) -> std::io::Result<PassReport> {
        let _one = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if self.halted() {
            return Ok(PassReport {
                interrupted: true,
                ..Default::default()
            });
        }
        let began = std::time::Instant::now();
        let root = PosixStore::open(&self.stage)?;
        let mut b = Batch::new();
        b.meta(Meta::PublishSettled, b"0");
        self.journal
            .commit(b, false)
            .map_err(std::io::Error::other)?;
        let mut report = PassReport::default();
        // (Writes through the view from here on may or may not show in the walk's measure:
        // counted on top of it, an estimate that errs high.)
        let stage_mark = self.view.as_ref().map_or(0, |v| v.stage_mark());
        let walk_began = std::time::Instant::now();
        let Diff {
            todo,
            bad,
            gone,
            sources,
            objects,
            partial,
            waiting,
            staged_bytes,
        } = self.diff()?;
        report.walk = walk_began.elapsed();
        report.objects = objects;
        report.waiting = waiting;
        report.staged_bytes = staged_bytes;
        // Keys new to the bucket are recorded `pending` first, in one durable batch: after a
        // crash (power loss included) no object can be there that the journal does not know.
        let mut b = Batch::new();
        for (w, _) in todo.iter().filter(|(_, had)| had.is_none()) {
            b.published(
                &w.key,
                &Published {
                    pending: true,
                    ..w.rec.clone()
                },
            );
        }
        if !b.is_empty() {
            self.journal
                .commit(b, true)
                .map_err(std::io::Error::other)?;
        }
        let out = Mutex::new(&mut report);
        let next = AtomicU64::new(0);
        // Indices into `todo` of the keys this pass failed to bring up to date.
        let unsure: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..self.workers.min(todo.len()) {
                s.spawn(|| {
                    loop {
                        if self.halted() {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((w, had)) = todo.get(i) else { return };
                        self.in_flight.fetch_add(1, Ordering::Relaxed);
                        let r = self.publish(&root, w, had.as_ref(), &sources);
                        self.in_flight.fetch_sub(1, Ordering::Relaxed);
                        if let Ok(Done::Evicted(_, staged)) = &r {
                            self.evictions.fetch_add(1, Ordering::Relaxed);
                            if let Some(v) = &self.view {
                                v.stage_freed(*staged);
                            }
                        }
                        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                        match r {
                            Ok(Done::Changed) => {
                                o.changed += 1;
                                unsure.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                            }
                            Ok(done) => o.count(done),
                            Err(e) => {
                                o.errors.push((w.key.clone(), e.to_string()));
                                unsure.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                            }
                        }
                    }
                });
            }
        });
        // Deletions last: a renamed file's bytes were copied to its new key above. Held where
        // that may not hold, as a key gone from the tree may then be the only copy in the
        // bucket of what another key should hold: every one, when the walk met an entry that
        // vanished (a directory renamed while it was listed, whose new name it never saw);
        // else those of the inode and size of a key this pass failed to bring up to date (an
        // error, a file changing). They wait for a later pass; this one is not clean.
        let unsure: HashSet<(u64, u64)> = unsure
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|i| (todo[i].0.rec.ino, todo[i].0.rec.size))
            .collect();
        #[allow(clippy::unnecessary_cast)]
        let stage_dev = stat_fd(root.root()).map(|st| st.st_dev as u64)?;
        let (held, gone): (Vec<_>, Vec<_>) = gone
            .into_iter()
            .partition(|(_, r)| partial || unsure.contains(&(r.ino, r.size)));
        report.held = held.len() as u64;
        if !held.is_empty() {
            tracing::debug!(keys = ?held.iter().take(5).map(|(k, _)| k).collect::<Vec<_>>(), "deletions held for a later pass");
        }
        for (key, why) in bad {
            report.errors.push((key, why));
        }
        if !self.halted() {
            for (key, seen) in &gone {
                // Deleted only as the walk saw it: not while the copier sends a copy to the
                // key (held), nor once it recorded one there since (another record), nor
                // while an evicted file still reads its bytes from it (renamed, and not
                // pointed at its new key yet).
                let _hold = match &self.view {
                    Some(v) => match v.hold_key(key) {
                        Some(h) => Some(h),
                        None => {
                            tracing::debug!(key, "not deleted: a copy is being sent to it");
                            report.held += 1;
                            continue;
                        }
                    },
                    None => None,
                };
                let now = self
                    .journal
                    .published_one(key)
                    .map_err(std::io::Error::other)?;
                if now.as_ref() != Some(seen) || self.stub_reads(stage_dev, seen.ino, key) {
                    tracing::debug!(
                        key,
                        recorded_again = now.as_ref() != Some(seen),
                        "not deleted: recorded again, or an evicted file reads it"
                    );
                    report.held += 1;
                    continue;
                }
                match self.store.delete(key) {
                    Ok(()) => {
                        let mut b = Batch::new();
                        b.clear_published(key).clear_pub_error(key);
                        self.journal
                            .commit(b, false)
                            .map_err(std::io::Error::other)?;
                        report.deleted += 1;
                    }
                    Err(e) => report.errors.push((key.clone(), e.to_string())),
                }
            }
        }
        report.interrupted = self.halted();
        report.evict_later = self.evict_later.swap(0, Ordering::Relaxed);
        self.record_errors(&report)?;
        let mut b = Batch::new();
        b.meta(
            Meta::PublishSettled,
            if report.clean() { b"1" } else { b"0" },
        );
        b.meta(Meta::StagedBytes, &report.staged_bytes.to_le_bytes());
        self.journal
            .commit(b, false)
            .map_err(std::io::Error::other)?;
        if let Some(v) = &self.view {
            v.stage_measured(report.staged_bytes, stage_mark);
        }
        self.passes.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
        // What the pass held (its changes: every entry on a first pass) is freed now; give
        // the pages back to the system rather than keep the RSS at every pass's peak.
        // SAFETY: malloc_trim only returns free memory; no pointer is invalidated.
        unsafe {
            libc::malloc_trim(0);
        }
        if !report.clean() {
            tracing::info!(
                objects = report.objects,
                ms = began.elapsed().as_millis() as u64,
                walk_ms = report.walk.as_millis() as u64,
                uploaded = report.uploaded,
                copied = report.copied,
                from_old = report.from_old,
                deleted = report.deleted,
                held = report.held,
                waiting = report.waiting,
                changed = report.changed,
                errors = report.errors.len(),
                "publish pass"
            );
        }
        Ok(report)
    }

    /// Whether the staged file (`dev`, `ino`) is an evicted file whose bytes are read from
    /// `key`.
    fn stub_reads(&self, dev: u64, ino: u64, key: &str) -> bool {
        self.journal.is_stub(dev, ino)
            && match self.journal.partial(dev, ino) {
                Ok(Some((rec, _))) => rec.bucket && rec.origin == key.as_bytes(),
                // (Unreadable: kept, to be sure.)
                _ => true,
            }
    }

    /// The pass's errors replace the recorded ones (a key that published is no error now).
    fn record_errors(&self, report: &PassReport) -> std::io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let known: HashMap<String, CopyError> = self
            .journal
            .pub_errors()
            .map_err(std::io::Error::other)?
            .into_iter()
            .collect();
        let failed: HashSet<&str> = report.errors.iter().map(|(k, _)| k.as_str()).collect();
        let mut b = Batch::new();
        for k in known.keys().filter(|k| !failed.contains(k.as_str())) {
            b.clear_pub_error(k);
        }
        for (k, e) in &report.errors {
            tracing::warn!(key = %k, error = %e, "upload into NEW failed");
            b.pub_error(
                k,
                &CopyError {
                    error: format!("upload into NEW: {e}"),
                    errno: libc::EIO,
                    attempts: known.get(k).map_or(0, |c| c.attempts) + 1,
                    at: now,
                    conflict: false,
                },
            );
        }
        self.journal.commit(b, false).map_err(std::io::Error::other)
    }

    fn record(&self, key: &str, r: &Published) -> std::io::Result<()> {
        let mut b = Batch::new();
        b.published(key, r);
        self.journal.commit(b, false).map_err(std::io::Error::other)
    }

    /// Bring one key up to date with its staged entry.
    fn publish(
        &self,
        root: &PosixStore,
        w: &Want,
        had: Option<&Published>,
        sources: &Sources,
    ) -> Result<Done, S3Error> {
        // (The `pending` record of a key new to the bucket was written, durably, before the
        // pass's first request.)
        match w.kind {
            // Only an empty directory is wanted without markers: the bucket cannot hold it.
            Kind::Dir if !self.markers => Err(S3Error::new(
                format!("directory {}", w.path.display()),
                libc::ENOTSUP,
                "the NEW bucket refuses directory markers (prepare's probe): an empty \
                 directory cannot be kept in it; remove it, or put a file in it",
            )),
            Kind::Dir | Kind::Other | Kind::Symlink => self.publish_object(root, w),
            Kind::File => self.publish_file(root, w, had, sources),
        }
    }

    /// A directory's marker, a special file's empty object, or a symlink's object holding
    /// its target.
    fn publish_object(&self, root: &PosixStore, w: &Want) -> Result<Done, S3Error> {
        let io = |what: &str, e| io_err(w, what, e);
        // A marker or an empty object; a symlink's object holds its target.
        let data = if w.kind == Kind::Symlink {
            let fd = match root.open_path(&w.path) {
                Ok(fd) => fd,
                Err(e) if vanished(&e) => return Ok(Done::Changed),
                Err(e) => return Err(io("open", e)),
            };
            rustix::fs::readlinkat(&fd, "", Vec::new())
                .map_err(|e| io("readlink", e.into()))?
                .into_bytes()
        } else {
            Vec::new()
        };
        let n = data.len() as u64;
        let o = self.store.put(&w.key, data, &meta_of(&w.rec))?;
        self.record(
            &w.key,
            &Published {
                pending: false,
                etag: o.etag,
                ..w.rec.clone()
            },
        )
        .map_err(|e| io("journal", e))?;
        Ok(Done::Uploaded(n))
    }

    /// A file: its bytes copied by the server when the bucket (or an S3 OLD on the same
    /// service) holds them already, else uploaded; recorded as the file was when it was
    /// looked at, unless it changed since.
    fn publish_file(
        &self,
        root: &PosixStore,
        w: &Want,
        had: Option<&Published>,
        sources: &Sources,
    ) -> Result<Done, S3Error> {
        let io = |what: &str, e| io_err(w, what, e);
        // By a path resolved below the root with no symlink followed: whatever the
        // view did meanwhile, nothing outside the staging tree is read. Only a regular
        // file is opened (a FIFO swapped in since the walk would block the open).
        let fd = match root.open_path(&w.path) {
            Ok(fd) => fd,
            Err(e) if vanished(&e) => return Ok(Done::Changed),
            Err(e) => return Err(io("open", e)),
        };
        let st = stat_fd(fd.as_fd()).map_err(|e| io("stat", e))?;
        if stamp(&st).ino != w.rec.ino || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(Done::Changed);
        }
        let f = reopen(fd.as_fd(), OFlags::RDONLY | OFlags::NONBLOCK).map_err(|e| io("open", e))?;
        let fstat = |f: &File| {
            rustix::fs::fstat(f)
                .map(|st| stamp(&st))
                .map_err(|e| io("stat", e.into()))
        };
        // (Before the look: a change through the view after it counts past this.)
        let mark = crate::view::write_mark();
        let now = fstat(&f)?;
        if now.ino != w.rec.ino {
            return Ok(Done::Changed);
        }
        if let Some(x) = crate::store::posix::first_user_xattr(&f) {
            return Err(S3Error::new(
                w.path.display().to_string(),
                libc::EOPNOTSUPP,
                format!(
                    "has the extended attribute {x:?}, which an S3 NEW cannot hold \
                     (remove it through the view, or abort)"
                ),
            ));
        }
        let started = wall_clock();
        // An evicted file (the bucket's object, and what was written through the view since)
        // or a file partly copied from OLD (OLD's file, and what was written).
        if let Some(view) = &self.view
            && self.journal.has_partial(w.dev, now.ino)
        {
            let rw = reopen(fd.as_fd(), OFlags::RDONLY).map_err(|e| io("open", e))?;
            if let Some(stub) = view
                .stub_upload(rw)
                .map_err(|e| io("read", std::io::Error::from_raw_os_error(e.errno())))?
            {
                return self.publish_stub(w, had, &f, &now, &stub);
            }
        }
        // Recorded as it is now; a write in the same timestamp tick as this look
        // cannot be told from none by stat, so a record this recent is checked by MD5
        // at the next pass (`racy`).
        // The object now holds the file as `now` saw it, unless the file changed since.
        let keep = |etag: String, md5: String, done: Done| -> Result<Done, S3Error> {
            if !same_stat(&fstat(&f)?, &now) {
                return self.changed_while_sent(w, had, &done);
            }
            let rec = Published {
                etag,
                racy: recent(&now, started),
                md5,
                ..now.clone()
            };
            self.record(&w.key, &rec).map_err(|e| io("journal", e))?;
            self.evict_after(w, &f, &rec, done, mark)
        };
        if let Some((etag, md5, done)) = self.reuse_bytes(w, had, sources, &f, &now)? {
            return keep(etag, md5, done);
        }
        if let Some((etag, md5, done)) = self.copy_from_old(w, &f, &now) {
            return keep(etag, md5, done);
        }
        let (o, md5) = match self.store.put_file_md5(&w.key, &f, &meta_of(&now)) {
            Ok(r) => r,
            // Written while it was read (the server refuses a body other than its MD5): the
            // next pass takes it as it is then.
            Err(_) if !same_stat(&fstat(&f)?, &now) => return Ok(Done::Changed),
            Err(e) => return Err(e),
        };
        keep(
            o.etag,
            crate::store::s3::md5_etag(&md5),
            Done::Uploaded(o.size),
        )
    }

    /// `w`'s file changed while it was sent: the key holds what was sent, not what its record
    /// says, if anything was sent (`done`): the record becomes pending (never taken for what
    /// the bucket holds), so that a file changed back to the recorded bytes is sent again
    /// rather than recorded as there. The next pass takes the file as it is then.
    fn changed_while_sent(
        &self,
        w: &Want,
        had: Option<&Published>,
        done: &Done,
    ) -> Result<Done, S3Error> {
        if let Some(h) = had.filter(|_| !matches!(done, Done::Recorded)) {
            let rec = Published {
                pending: true,
                ..h.clone()
            };
            self.record(&w.key, &rec)
                .map_err(|e| io_err(w, "journal", e))?;
        }
        Ok(Done::Changed)
    }

    /// The staged file `f`, just recorded as `rec` for `w`'s key, leaves the staging tree when
    /// nobody has it open through the view (or the staging tree is near its bound) and
    /// nothing can have written it unseen: its record is not racy (its last change was a
    /// second or more before the upload looked at it, so any later write shows in its mtime),
    /// or, near the bound, the view counted no change of it since `mark` (taken before the
    /// look). Its record is stamped again (the punch changed its ctime).
    fn evict_after(
        &self,
        w: &Want,
        f: &File,
        rec: &Published,
        done: Done,
        mark: u64,
    ) -> Result<Done, S3Error> {
        let Some(view) = &self.view else {
            return Ok(done);
        };
        if rec.size == 0 || w.links > 1 || rec.etag.is_empty() {
            return Ok(done);
        }
        let later = |done| {
            // (A later pass, once its last change is a second old.)
            self.evict_later.fetch_add(1, Ordering::Relaxed);
            Ok(done)
        };
        let by_mark = rec.racy && view.stage_pressed();
        if rec.racy && !by_mark {
            return later(done);
        }
        let staged = rustix::fs::fstat(f).map_or(0, |st| st.st_blocks as u64 * 512);
        let unchanged = crate::view::Unchanged {
            size_mtime: (rec.size, rec.mtime),
            mark: if by_mark { mark } else { u64::MAX },
        };
        match self.point_stub(w, f, rec.size, &rec.etag, Some(unchanged))? {
            crate::view::Eviction::Evicted => {}
            _ if rec.racy => return later(done),
            _ => return Ok(done),
        }
        let io = |what: &str, e| io_err(w, what, e);
        let after = rustix::fs::fstat(f).map_err(|e| io("stat", e.into()))?;
        self.record(
            &w.key,
            &Published {
                etag: rec.etag.clone(),
                md5: rec.md5.clone(),
                racy: false,
                ..stamp(&after)
            },
        )
        .map_err(|e| io("journal", e))?;
        Ok(Done::Evicted(Box::new(done), staged))
    }

    /// The view's [`evict`](crate::view::View::evict) of the staged file `f`, uploaded to
    /// `w`'s key as `etag` (`size` bytes).
    fn point_stub(
        &self,
        w: &Want,
        f: &File,
        size: u64,
        etag: &str,
        expect: Option<crate::view::Unchanged>,
    ) -> Result<crate::view::Eviction, S3Error> {
        let Some(view) = &self.view else {
            return Ok(crate::view::Eviction::Left);
        };
        let rw = match reopen(f.as_fd(), OFlags::RDWR) {
            Ok(rw) => rw,
            Err(e) => {
                tracing::debug!(key = %w.key, error = %e, "not evicted: cannot open it for writing");
                return Ok(crate::view::Eviction::Left);
            }
        };
        view.evict(rw, &w.key, etag, size, expect)
            .map_err(|e| io_err(w, "evict", std::io::Error::from_raw_os_error(e.errno())))
    }

    /// An evicted file (its absent chunks are the bucket object `stub.source()`), or a file
    /// partly copied from OLD (its absent chunks OLD's): copied by the server when no chunk
    /// was written since and the server can (a rename, a metadata change), else uploaded with
    /// its unchanged ranges copied by the server where it can and the rest read through the
    /// view (staged chunks, and OLD's or the bucket's); then pointed at the new object and
    /// evicted (again). A file changed in the last second waits for a later pass (a write in
    /// the same timestamp tick as this look would not show in its mtime).
    fn publish_stub(
        &self,
        w: &Want,
        had: Option<&Published>,
        f: &File,
        now: &Published,
        stub: &crate::view::StubUpload,
    ) -> Result<Done, S3Error> {
        let io = |what: &str, e| io_err(w, what, e);
        let meta = meta_of(now);
        // The object the absent chunks are, when the server can copy from it: the bucket's
        // own, or an S3 OLD's on the same service.
        let source = stub.source().filter(|(s, _, _)| {
            stub.in_bucket()
                || (self.store.same_service(s)
                    && self.view.as_ref().is_some_and(|v| v.server_copy_allowed()))
        });
        let lost = |e: S3Error, src: &str, src_etag: &str| {
            if e.errno != libc::ESTALE && e.errno != libc::ENOENT {
                return e;
            }
            let what = if stub.in_bucket() {
                format!(
                    "the NEW bucket's object {src} that held this evicted file's bytes was \
                     replaced or deleted by another client after the upload (the staging tree \
                     keeps no copy): reads of it fail"
                )
            } else {
                format!(
                    "OLD's object {src}, whose bytes this partly copied file's chunks not \
                     copied yet are, was replaced or deleted behind the view: reads of them fail"
                )
            };
            S3Error::new(
                w.key.clone(),
                libc::EIO,
                format!(
                    "{what}; restore that version ({src_etag}) or remove the file through the \
                     view"
                ),
            )
        };
        let clean = source.as_ref().filter(|_| stub.clean(now.size));
        let (etag, md5, done) = if let Some((store, src, src_etag)) = clean {
            // (The copier sends its copies to their key before it names them: a pending
            // record of this very object.)
            let sent_here = || {
                self.store
                    .head(&w.key)
                    .ok()
                    .flatten()
                    .is_some_and(|o| o.etag == *src_etag)
            };
            let in_place = stub.in_bucket()
                && *src == w.key
                && had.is_some_and(|h| {
                    same_meta(h, now)
                        && (h.etag == *src_etag || h.pending)
                        && (!h.pending || sent_here())
                });
            if in_place {
                let md5 = had.map(|h| h.md5.clone()).unwrap_or_default();
                (src_etag.clone(), md5, Done::Recorded)
            } else {
                let o = match self
                    .store
                    .copy_from(store, src, src_etag, now.size, &w.key, &meta)
                {
                    Ok(o) => o,
                    // NEW's credentials may not read OLD's bucket: sent by the next pass.
                    Err(e)
                        if !stub.in_bucket() && matches!(e.errno, libc::EACCES | libc::EPERM) =>
                    {
                        if let Some(v) = &self.view {
                            v.server_copy_refused(&e);
                        }
                        return Ok(Done::Changed);
                    }
                    Err(e) => return Err(lost(e, src, src_etag)),
                };
                if !stub.in_bucket() {
                    crate::metrics::METRICS.partial_published(0, now.size);
                }
                (o.etag, String::new(), Done::Copied)
            }
        } else if now.size <= crate::store::s3::MULTIPART_THRESHOLD {
            let mut data = vec![0u8; now.size as usize];
            stub.read_exact(0, &mut data).map_err(|e| io("read", e))?;
            let o = self.store.put(&w.key, data, &meta)?;
            if !stub.in_bucket() {
                crate::metrics::METRICS.partial_published(now.size, 0);
            }
            (o.etag, String::new(), Done::Uploaded(now.size))
        } else {
            let patched = |source: Option<&(Arc<S3Store>, String, String)>| {
                self.store.put_patched(
                    &w.key,
                    now.size,
                    &meta,
                    source.map(|(s, k, e)| (&**s, k.as_str(), e.as_str())),
                    &|off, len| stub.from_source(off, len),
                    &mut |off, buf| stub.read_exact(off, buf),
                )
            };
            let (o, copied) = match patched(source.as_ref()) {
                // NEW's credentials may not read OLD's bucket: every byte through this host.
                Err(e)
                    if !stub.in_bucket()
                        && source.is_some()
                        && matches!(e.errno, libc::EACCES | libc::EPERM) =>
                {
                    if let Some(v) = &self.view {
                        v.server_copy_refused(&e);
                    }
                    patched(None)?
                }
                Err(e) => return Err(e),
                Ok(r) => r,
            };
            if !stub.in_bucket() {
                crate::metrics::METRICS.partial_published(now.size - copied, copied);
            }
            (o.etag, String::new(), Done::Uploaded(now.size))
        };
        let after = rustix::fs::fstat(f)
            .map(|st| stamp(&st))
            .map_err(|e| io("stat", e.into()))?;
        // (Every write of an evicted file goes through the view's state of it, which counts
        // it: one in the same timestamp tick as the look shows there.)
        let unchanged =
            same_stat(&after, now) && !self.view.as_ref().is_some_and(|v| v.stub_written(stub));
        // The object holds the file's absent chunks at their offsets whatever changed since:
        // they are read from it from now on (the one read before may be gone: replaced at
        // this key, or deleted at its old one once this pass is done). Evicted too if
        // unchanged since.
        let expect = unchanged.then(|| stub.unchanged((now.size, now.mtime)));
        let staged = rustix::fs::fstat(f).map_or(0, |st| st.st_blocks as u64 * 512);
        let pointed = if matches!(done, Done::Recorded) {
            crate::view::Eviction::Repointed
        } else {
            self.point_stub(w, f, now.size, &etag, expect)?
        };
        if pointed == crate::view::Eviction::Left {
            // (Not an evicted file any more, or no longer named so: the next pass.)
            return Ok(Done::Changed);
        }
        if !unchanged {
            return self.changed_while_sent(w, had, &done);
        }
        let stamped = if pointed == crate::view::Eviction::Evicted {
            rustix::fs::fstat(f)
                .map(|st| stamp(&st))
                .map_err(|e| io("stat", e.into()))?
        } else {
            now.clone()
        };
        self.record(
            &w.key,
            &Published {
                etag,
                racy: false,
                md5,
                ..stamped
            },
        )
        .map_err(|e| io("journal", e))?;
        Ok(match pointed {
            crate::view::Eviction::Evicted => Done::Evicted(Box::new(done), staged),
            _ => done,
        })
    }

    /// The bytes may be in the bucket already: at this key (a metadata change, or a record
    /// to confirm) or at another (a rename, a second link). MD5 decides. A copy is
    /// conditional on the source's recorded ETag: a source rewritten meanwhile (in this very
    /// pass, say) fails it, and the bytes are uploaded. Gives the object's ETag, MD5 and
    /// what was done, if the bytes were there.
    fn reuse_bytes(
        &self,
        w: &Want,
        had: Option<&Published>,
        sources: &Sources,
        f: &File,
        now: &Published,
    ) -> Result<Option<(String, String, Done)>, S3Error> {
        let io = |what: &str, e| io_err(w, what, e);
        let mut candidates: Vec<(&str, &Published)> = Vec::new();
        if let Some(h) = had.filter(|h| !h.pending && h.size == now.size && !md5_of(h).is_empty()) {
            candidates.push((w.key.as_str(), h));
        }
        if let Some(ks) = sources.get(&(now.ino, now.size, now.mtime)) {
            // (A racy record is a good source: its MD5 is of the bytes sent.)
            for (k, r) in ks.iter().filter(|(k, _)| *k != w.key) {
                candidates.push((k.as_str(), r));
            }
        }
        if !candidates.is_empty() {
            let md5 = crate::store::s3::file_md5(f).map_err(|e| io("read", e))?;
            let want = crate::store::s3::md5_etag(&md5);
            if let Some((from, src)) = candidates.iter().find(|(_, r)| md5_of(r) == want) {
                let in_place = *from == w.key && same_meta(src, now);
                let copied = if in_place {
                    Some(src.etag.clone())
                } else {
                    match self
                        .store
                        .copy(from, &w.key, &src.etag, now.size, &meta_of(now))
                    {
                        Ok(o) => Some(o.etag),
                        Err(e) if e.errno == libc::ESTALE || e.errno == libc::ENOENT => None,
                        Err(e) => return Err(e),
                    }
                };
                if let Some(etag) = copied {
                    let done = if in_place {
                        Done::Recorded
                    } else {
                        Done::Copied
                    };
                    return Ok(Some((etag, want, done)));
                }
            }
        }
        Ok(None)
    }

    /// An S3 OLD on the same service holding these very bytes: copied by the server.
    fn copy_from_old(&self, w: &Want, f: &File, now: &Published) -> Option<(String, String, Done)> {
        if let Some((rel, etag)) = self.old_source(w, f, now) {
            let old = self.old.as_ref().expect("old_source checked");
            match self
                .store
                .copy_from(old, &rel, &etag, now.size, &w.key, &meta_of(now))
            {
                Ok(o) => {
                    // A single PUT's ETag is the MD5 of the bytes; a multipart one's
                    // is not (then no MD5 is known: a rename uploads again).
                    let md5 = if etag.contains('-') {
                        String::new()
                    } else {
                        etag
                    };
                    return Some((o.etag, md5, Done::FromOld(now.size)));
                }
                // Replaced in OLD since the HEAD: our bytes go up instead.
                Err(e) if e.errno == libc::ESTALE || e.errno == libc::ENOENT => {}
                Err(e) if e.errno == libc::EACCES || e.errno == libc::EPERM => {
                    tracing::warn!(error = %e, "server-side copy from OLD refused; uploading instead from now on");
                    self.from_old_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "server-side copy from OLD failed; uploading instead");
                }
            }
        }
        None
    }

    /// Every key this migration put (or was putting) into the bucket, deleted: abort's "remove
    /// what ferryfs put into NEW". Keys other clients wrote are left alone.
    pub fn remove_all(&self) -> std::io::Result<u64> {
        let _one = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (key, _) in self.journal.published().map_err(std::io::Error::other)? {
            self.store.delete(&key).map_err(std::io::Error::from)?;
            let mut b = Batch::new();
            b.clear_published(&key).clear_pub_error(&key);
            self.journal
                .commit(b, false)
                .map_err(std::io::Error::other)?;
            n += 1;
        }
        Ok(n)
    }

    /// Check the bucket against the records: every recorded key is there with its size, and
    /// nothing is pending. Returns the problems found (empty: the bucket is as recorded) and
    /// the keys below the prefix that this migration did not write.
    pub fn check_bucket(&self) -> std::io::Result<(Vec<String>, Vec<String>)> {
        let records: HashMap<String, Published> = self
            .journal
            .published()
            .map_err(std::io::Error::other)?
            .into_iter()
            .collect();
        let mut listed: HashMap<String, (u64, String)> = HashMap::new();
        self.store
            .list_all_etags(&mut |k, size, etag| {
                listed.insert(k.to_string(), (size, etag.to_string()));
            })
            .map_err(std::io::Error::from)?;
        let mut problems = Vec::new();
        let mut heal = Batch::new();
        let mut keys: Vec<&String> = records.keys().collect();
        keys.sort();
        for k in keys {
            let r = &records[k];
            if r.pending {
                problems.push(format!("{k}: upload not finished"));
                continue;
            }
            // A symlink's object holds its target, whose length is the link's st_size.
            let want = if k.ends_with('/') { 0 } else { r.size };
            let problem = match listed.get(k) {
                None => Some(format!("{k}: missing from the bucket")),
                Some((s, _)) if *s != want => {
                    Some(format!("{k}: {s} bytes in the bucket, {want} staged"))
                }
                Some((_, e)) if !r.etag.is_empty() && *e != r.etag => Some(format!(
                    "{k}: another version in the bucket (ETag {e}, uploaded {})",
                    r.etag
                )),
                Some(_) => None,
            };
            if let Some(p) = problem {
                // Not what was put there (another client, a lost write): the next pass puts
                // it again.
                heal.published(
                    k,
                    &Published {
                        pending: true,
                        ..r.clone()
                    },
                );
                problems.push(p);
            }
        }
        if !heal.is_empty() {
            self.journal
                .commit(heal, true)
                .map_err(std::io::Error::other)?;
        }
        let mut foreign: Vec<String> = listed
            .into_keys()
            .filter(|k| !records.contains_key(k))
            .collect();
        foreign.sort();
        Ok((problems, foreign))
    }
}

/// Now, as (seconds, nanoseconds) since the epoch.
fn wall_clock() -> (i64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// Whether a stat taken at `at` could miss a write made in the same instant: its ctime is
/// less than a second before `at` (file systems stamp times from a coarse clock).
fn recent(p: &Published, at: (i64, u32)) -> bool {
    p.ctime.0 + 1 >= at.0
}

/// Below this size an upload is one request, and a copy from OLD two (HEAD and copy).
const SERVER_COPY_MIN: u64 = 1 << 20;

/// The MD5 of a recorded file (records before `md5` was kept: the ETag of a single PUT).
fn md5_of(r: &Published) -> &str {
    if r.md5.is_empty() { &r.etag } else { &r.md5 }
}

#[derive(Default)]
struct Diff {
    /// Staged entries that differ from their records (or have none), with those records.
    todo: Vec<(Want, Option<Published>)>,
    bad: Vec<(String, String)>,
    /// Recorded keys the staging tree no longer has, with their records.
    gone: Vec<(String, Published)>,
    sources: Sources,
    /// Keys the bucket must hold.
    objects: u64,
    /// The walk met an entry that vanished while it looked (renamed or removed meanwhile).
    partial: bool,
    /// Files partly copied (copy-before-write by chunk): published once filled in.
    waiting: u64,
    /// Bytes the staging tree holds (st_blocks of what the walk met).
    staged_bytes: u64,
}

impl Diff {
    /// A recorded key the staging tree no longer has: deleted after the pass's copies, which
    /// its record may serve first (a rename's bytes).
    fn gone(&mut self, key: String, r: Published) {
        add_source(&mut self.sources, &key, &r);
        self.gone.push((key, r));
    }
}

enum Done {
    Uploaded(u64),
    FromOld(u64),
    Copied,
    Recorded,
    Changed,
    /// What was done, and then the file's bytes left the staging tree (this many).
    Evicted(Box<Done>, u64),
}

/// A local failure while publishing `w`, as an S3 error naming its staged path.
fn io_err(w: &Want, what: &str, e: std::io::Error) -> S3Error {
    S3Error::new(
        format!("{what} {}", w.path.display()),
        e.raw_os_error().unwrap_or(libc::EIO),
        e.to_string(),
    )
}

/// What a walk collects besides the wanted keys, and how it wants directories.
struct Walk<'a> {
    /// Names no key can hold.
    bad: &'a mut Vec<(String, String)>,
    /// Something vanished under the walk (a change through the view): the next pass.
    partial: &'a mut bool,
    /// The bucket keeps `key/` markers: every directory wants one. Without, only an empty
    /// directory does (nothing else makes it exist), and the publisher reports it.
    markers: bool,
}

/// Hand `want` every wanted key below the directory `dir` (at `rel` below the root, key path
/// `key_dir`: "" for the root, else ending in '/'), in key order (byte order, as S3 lists
/// keys), by fd, never following a symlink; returns how many. Names no key can hold go to
/// `w.bad`.
///
/// Key order is a walk taking each directory's entries sorted by their keys (a directory's
/// is its name and '/'), the directory's own key before what is below it: every key below
/// `a/` starts with it, so sorts after it and before any sibling that sorts after it. (An
/// empty directory's key, wanted after its walk without markers, has nothing below it.)
fn walk(
    dir: BorrowedFd<'_>,
    rel: &Path,
    key_dir: &str,
    w: Walk<'_>,
    want: &mut dyn FnMut(Want) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let gone = |e: &std::io::Error, partial: &mut bool| {
        let g = e.raw_os_error() == Some(libc::ENOENT);
        if g {
            *partial = true;
        }
        g
    };
    let names = match read_dir_names(dir) {
        Ok(n) => n,
        // Removed since it was listed (through the view): the next pass.
        Err(e) if gone(&e, &mut *w.partial) && !key_dir.is_empty() => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut here = Vec::with_capacity(names.len());
    for ent in names {
        let name = OsStr::from_bytes(&ent.name);
        if key_dir.is_empty() && name == OsStr::new(crate::view::WORK_DIR) {
            continue;
        }
        let Some(n) = name.to_str() else {
            w.bad.push((
                format!("{key_dir}{}", String::from_utf8_lossy(&ent.name)),
                "the name is not UTF-8, which no S3 key can hold".into(),
            ));
            continue;
        };
        let st = match stat_at(dir, name) {
            Ok(st) => st,
            Err(e) if gone(&e, &mut *w.partial) => continue,
            Err(e) => return Err(e),
        };
        let (key, kind) = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => (format!("{key_dir}{n}/"), Kind::Dir),
            libc::S_IFREG => (format!("{key_dir}{n}"), Kind::File),
            libc::S_IFLNK => (format!("{key_dir}{n}"), Kind::Symlink),
            _ => (format!("{key_dir}{n}"), Kind::Other),
        };
        if key.len() > KEY_MAX {
            w.bad.push((
                key,
                format!("longer than {KEY_MAX} bytes, S3's limit for a key"),
            ));
            continue;
        }
        #[allow(clippy::unnecessary_cast)]
        here.push(Want {
            key,
            path: rel.join(name),
            dev: st.st_dev as u64,
            kind,
            links: st.st_nlink as u64,
            staged: st.st_blocks as u64 * 512,
            rec: stamp(&st),
        });
    }
    here.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    // A name listed twice (renamed away and back between two getdents calls): once.
    here.dedup_by(|a, b| a.key == b.key);
    let mut wanted = 0;
    for d in here {
        if d.kind != Kind::Dir {
            want(d)?;
            wanted += 1;
            continue;
        }
        let (path, key) = (d.path.clone(), d.key.clone());
        let mut marker = Some(d);
        if w.markers {
            want(marker.take().expect("the marker"))?;
            wanted += 1;
        }
        let Some(name) = path.file_name() else {
            continue;
        };
        let sub = match open_child(dir, name) {
            Ok(fd) => fd,
            Err(e) if gone(&e, &mut *w.partial) => continue,
            Err(e) => return Err(e),
        };
        // Replaced by something else since the stat: the next pass sees what it is.
        if stat_fd(sub.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFDIR {
            continue;
        }
        let below = walk(
            sub.as_fd(),
            &path,
            &key,
            Walk {
                bad: &mut *w.bad,
                partial: &mut *w.partial,
                markers: w.markers,
            },
            want,
        )?;
        wanted += below;
        if below == 0
            && let Some(m) = marker
        {
            want(m)?;
            wanted += 1;
        }
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn keys_walked(root: &Path) -> Vec<String> {
        keys_walked_with(root, true)
    }

    fn keys_walked_with(root: &Path, markers: bool) -> Vec<String> {
        let store = PosixStore::open(root).unwrap();
        let (mut bad, mut partial, mut keys) = (Vec::new(), false, Vec::new());
        walk(
            store.root(),
            Path::new(""),
            "",
            Walk {
                bad: &mut bad,
                partial: &mut partial,
                markers,
            },
            &mut |w| {
                keys.push(w.key);
                Ok(())
            },
        )
        .unwrap();
        assert!(bad.is_empty() && !partial);
        keys
    }

    #[test]
    fn the_walk_hands_out_keys_in_the_order_s3_lists_them() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        // '-' and '.' sort before '/', '0' after it: a directory's key is not its name.
        for d in ["a", "b/c", "a-d"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        for f in ["a/x", "a.b", "a-c", "a0", "b/c/d", "B", "a-d/e"] {
            std::fs::write(r.join(f), b"").unwrap();
        }
        std::fs::create_dir(r.join(crate::view::WORK_DIR)).unwrap();
        let keys = keys_walked(r);
        assert_eq!(
            keys,
            [
                "B", "a-c", "a-d/", "a-d/e", "a.b", "a/", "a/x", "a0", "b/", "b/c/", "b/c/d"
            ]
        );
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    fn record_of(p: &Path) -> Published {
        let st = rustix::fs::lstat(p).unwrap();
        Published {
            etag: "\"e\"".into(),
            md5: "\"e\"".into(),
            ..stamp(&st)
        }
    }

    #[test]
    fn the_merge_keeps_what_differs_and_what_may_serve_it_not_every_record() {
        let t = tempfile::tempdir().unwrap();
        let stage = t.path().join("stage");
        std::fs::create_dir(&stage).unwrap();
        for f in ["same", "renamed-to", "link1", "changed"] {
            std::fs::write(stage.join(f), f.as_bytes()).unwrap();
        }
        std::fs::hard_link(stage.join("link1"), stage.join("link2")).unwrap();
        let journal = Records::new(Arc::new(crate::journal::mem::MemJournal::default())).unwrap();
        let mut b = Batch::new();
        b.published("same", &record_of(&stage.join("same")));
        // A rename: the old key's record has the staged file's inode, size and mtime.
        b.published("renamed-from", &record_of(&stage.join("renamed-to")));
        b.published("link1", &record_of(&stage.join("link1")));
        b.published("changed", &record_of(&stage.join("changed")));
        b.published("zz-removed", &record_of(&stage.join("same")));
        journal.commit(b, true).unwrap();
        std::fs::write(stage.join("changed"), b"longer than before").unwrap();
        let url = crate::store::s3::S3Url::parse("s3://bkt?endpoint=http://127.0.0.1:9&region=x")
            .unwrap();
        let p = Publisher::new(
            Arc::new(S3Store::connect(&url).unwrap()),
            stage.clone(),
            journal,
            1,
        );
        let d = p.diff().unwrap();
        let todo: Vec<&str> = d.todo.iter().map(|(w, _)| w.key.as_str()).collect();
        assert_eq!(todo, ["changed", "link2", "renamed-to"]);
        assert!(
            d.todo
                .iter()
                .all(|(w, had)| had.is_some() == (w.key == "changed"))
        );
        let gone: Vec<&str> = d.gone.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(gone, ["renamed-from", "zz-removed"]);
        assert_eq!(d.objects, 5);
        let source_keys = |p: &Path| -> Vec<String> {
            let r = record_of(p);
            let mut k: Vec<String> = d
                .sources
                .get(&(r.ino, r.size, r.mtime))
                .map(|v| v.iter().map(|(k, _)| k.clone()).collect())
                .unwrap_or_default();
            k.sort();
            k
        };
        // The renamed file's bytes are at its old key; the second link's at the first's.
        assert_eq!(source_keys(&stage.join("renamed-to")), ["renamed-from"]);
        assert_eq!(source_keys(&stage.join("link2")), ["link1"]);
        // An unchanged file with one name serves no other key; a removed one may.
        assert_eq!(source_keys(&stage.join("same")), ["zz-removed"]);
        assert_eq!(
            std::fs::metadata(stage.join("same")).unwrap().nlink(),
            1,
            "the test's premise"
        );
    }

    #[test]
    fn the_cursor_reads_every_record_once_in_order_across_pages() {
        let dir = tempfile::tempdir().unwrap();
        let kv: Arc<dyn crate::journal::Journal> = Arc::new(
            crate::journal::rocks::RocksJournal::open(&dir.path().join("j"), true).unwrap(),
        );
        let journal = Records::new(kv).unwrap();
        let mut want: Vec<String> = (0..RECORDS_PAGE * 2 + 7).map(|i| format!("k{i}")).collect();
        let mut b = Batch::new();
        for k in &want {
            b.published(k, &record_of(dir.path()));
        }
        // Other prefixes' records, before ('m') and after ('u') the publisher's, are not its.
        b.meta(crate::journal::Meta::Config, b"1");
        b.pub_error(
            "k0",
            &CopyError {
                error: "e".into(),
                errno: 5,
                attempts: 1,
                at: 0,
                conflict: false,
            },
        );
        journal.commit(b, true).unwrap();
        want.sort();
        let mut c = Cursor::new(&journal);
        let mut got = Vec::new();
        while let Some((k, _)) = c.next().unwrap() {
            got.push(k);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn without_markers_only_empty_directories_want_a_key_still_in_key_order() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/b/f", "a/c/", "a/c2/", "d/", "e"] {
            let p = d.path().join(p);
            if p.to_str().unwrap().ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, b"x").unwrap();
            }
        }
        assert_eq!(
            keys_walked_with(d.path(), false),
            ["a/b/f", "a/c/", "a/c2/", "d/", "e"]
        );
        assert_eq!(
            keys_walked_with(d.path(), true),
            ["a/", "a/b/", "a/b/f", "a/c/", "a/c2/", "d/", "e"]
        );
    }
}
