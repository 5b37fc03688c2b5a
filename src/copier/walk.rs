//! A pass's walk of the view: this thread lists directories depth first and brings each into
//! NEW before its entries; files, symlinks and special files go to N workers over a bounded
//! channel; the workers hand their copies, in batches, to one namer thread, which makes every
//! queued batch durable with a single `syncfs` of NEW and only then names the copies.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel as chan;

use super::{BATCH_AGE, BATCH_BYTES, BATCH_FILES, Copier, DirGuard, Job, NamerBatch};
use crate::view::error::Error;
use crate::view::inode::Inode;
use crate::view::{Kind, Pending};

/// What a walk does with each entry it meets (see [`Copier::walk`]).
pub(super) struct Visitor<'a> {
    /// Copy or check one entry (`true`: the walk's visit of a name, counted once); a plain
    /// file's copy may come back pending, to be named with its batch.
    pub visit: &'a (dyn Fn(&Arc<Inode>, bool) -> Option<Pending> + Sync),
    /// Name a batch of pending copies.
    pub flush: &'a (dyn Fn(Vec<(Pending, bool)>) + Sync),
    /// An entry that could not be looked up or listed, by its view path.
    pub fail: &'a (dyn Fn(Vec<u8>, &Error) + Sync),
    /// Counts the entries the filter leaves out (still only in OLD; a directory once).
    pub excluded: &'a std::sync::atomic::AtomicU64,
}

/// A worker's copies waiting to be named, and the lookups that keep their entries (and
/// parents) known until then.
#[derive(Default)]
struct WorkerBatch {
    copies: Vec<(Pending, bool)>,
    held: Vec<(Arc<Inode>, Arc<DirGuard>)>,
    bytes: u64,
    since: Option<Instant>,
}

impl WorkerBatch {
    /// Full, or waiting long enough (slow under a bandwidth limit): name it, so progress
    /// shows steadily.
    fn due(&self) -> bool {
        self.copies.len() >= BATCH_FILES
            || self.bytes >= BATCH_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= BATCH_AGE)
    }
}

impl Copier {
    /// Walk the whole view: directories visited by this thread before their entries, the rest
    /// by the workers. Returns whether it was stopped before the end. `copying`: a copy pass,
    /// which gives directories OLD's times back once filled and waits while the copier is
    /// paused; a check (verify, commit's last pass) does neither: a paused copier must not
    /// hold an operator's verify.
    pub(super) fn walk(&self, copying: bool, v: &Visitor<'_>) -> bool {
        let workers = self.workers.load(Ordering::Relaxed);
        let (tx, rx) = chan::bounded::<Job>(1024);
        // At most one batch per worker waits for the namer (backpressure, and a bound on
        // open fds).
        let (ntx, nrx) = chan::bounded::<NamerBatch>(workers);
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("copier-namer".into())
                .spawn_scoped(s, || self.name_batches(nrx, v))
                .expect("spawn copier namer");
            for i in 0..workers {
                let (rx, ntx) = (rx.clone(), ntx.clone());
                std::thread::Builder::new()
                    .name(format!("copier-{i}"))
                    .spawn_scoped(s, move || self.work(rx, ntx, v))
                    .expect("spawn copier worker");
            }
            drop(rx);
            drop(ntx);
            self.walk_dirs(copying, tx, v)
        })
    }

    /// The namer: everything queued made durable with one syncfs and named, while the
    /// workers go on copying.
    fn name_batches(&self, nrx: chan::Receiver<NamerBatch>, v: &Visitor<'_>) {
        while let Ok(first) = nrx.recv() {
            let (mut batch, mut held) = first;
            while let Ok((b, h)) = nrx.try_recv() {
                batch.extend(b);
                held.extend(h);
            }
            (v.flush)(batch);
            for (inode, _dir) in held {
                self.view.release_lookup(&inode);
            }
        }
    }

    /// Hand a worker's batch to the namer (or name it here if the namer is gone).
    fn name_batch(&self, b: &mut WorkerBatch, ntx: &chan::Sender<NamerBatch>, v: &Visitor<'_>) {
        let (copies, held) = (std::mem::take(&mut b.copies), std::mem::take(&mut b.held));
        *b = WorkerBatch::default();
        if copies.is_empty() {
            for (inode, _dir) in held {
                self.view.release_lookup(&inode);
            }
            return;
        }
        if let Err(chan::SendError((copies, held))) = ntx.send((copies, held)) {
            (v.flush)(copies);
            for (inode, _dir) in held {
                self.view.release_lookup(&inode);
            }
        }
    }

    /// A worker: entries applications touched first, then the walk's jobs, until the walk
    /// is over.
    fn work(&self, rx: chan::Receiver<Job>, ntx: chan::Sender<NamerBatch>, v: &Visitor<'_>) {
        let touched = self.view.touched();
        let mut batch = WorkerBatch::default();
        loop {
            // Entries applications touched go first; the walk meets them again later and
            // counts them then (one count per name).
            if let Ok(t) = touched.try_recv() {
                // One the kernel forgot meanwhile: the walk meets its entry.
                let Some(_pinned) = self.view.pin(&t) else {
                    continue;
                };
                if !self.view.in_new(&t)
                    && !self.excluded_entry(&t)
                    && let Some(p) = (v.visit)(&t, false)
                {
                    batch.copies.push((p, false));
                }
                continue;
            }
            let job = match rx.try_recv() {
                Ok(j) => Ok(j),
                Err(chan::TryRecvError::Empty) => {
                    // Nothing queued: name what is pending before waiting.
                    self.name_batch(&mut batch, &ntx, v);
                    rx.recv_timeout(Duration::from_millis(50))
                }
                Err(chan::TryRecvError::Disconnected) => Err(chan::RecvTimeoutError::Disconnected),
            };
            match job {
                Ok(job) => {
                    self.do_job(job, &mut batch, v);
                    if batch.due() {
                        self.name_batch(&mut batch, &ntx, v);
                    }
                }
                Err(chan::RecvTimeoutError::Timeout) => {}
                Err(chan::RecvTimeoutError::Disconnected) => {
                    self.name_batch(&mut batch, &ntx, v);
                    return;
                }
            }
        }
    }

    /// One non-directory the walk listed: looked up, then copied or checked.
    fn do_job(&self, job: Job, batch: &mut WorkerBatch, v: &Visitor<'_>) {
        if self.stopping() {
            return;
        }
        // An S3 OLD: the lookup's request (and a small object's copy) made here, outside the
        // view's locks. (While remote workers copy, a small object's bytes are theirs to
        // fetch.)
        if self.view.old_is_s3() {
            let workers = self.remote().is_some_and(|r| r.active());
            self.view.prefetch_old(&job.dir.inode, &job.name, !workers);
        }
        let inode = match self.view.child(&job.dir.inode, &job.name) {
            Ok(Some(i)) => i,
            Ok(None) => return,
            // Removed since the listing: nothing to copy.
            Err(e) if e.errno() == libc::ENOENT => return,
            Err(e) => {
                (v.fail)(self.view.child_path(&job.dir.inode, &job.name), &e);
                return;
            }
        };
        if job.excluded && !self.view.in_new(&inode) {
            // Left out by the filter: shown from OLD until commit, never copied.
            v.excluded.fetch_add(1, Ordering::Relaxed);
            self.view.release_lookup(&inode);
            return;
        }
        match (v.visit)(&inode, true) {
            Some(p) => {
                batch.since.get_or_insert_with(Instant::now);
                batch.bytes += p.bytes();
                batch.copies.push((p, true));
                batch.held.push((inode, job.dir));
            }
            None => self.view.release_lookup(&inode),
        }
    }

    /// This thread's part: directories depth first, each visited (brought into NEW) before
    /// its entries are listed; non-directories sent to the workers over `tx`.
    fn walk_dirs(&self, copying: bool, tx: chan::Sender<Job>, v: &Visitor<'_>) -> bool {
        let root = Arc::new(DirGuard {
            view: self.view.clone(),
            inode: self.view.root(),
            excluded: false,
            path: Vec::new(),
            finish: copying,
            counted: false,
            _parent: None,
        });
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            while copying && self.paused.load(Ordering::Relaxed) && !self.stopping() {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.stopping() {
                return true;
            }
            let names = match self.view.children(&dir.inode) {
                Ok(n) => n,
                Err(e) => {
                    // Not listed, not walked: an error, so the pass is not clean and commit's
                    // check does not pass over the subtree unseen.
                    if e.errno() != libc::ENOENT {
                        (v.fail)(self.view.view_path(&dir.inode), &e);
                    }
                    if let Some(p) = (v.visit)(&dir.inode, true) {
                        (v.flush)(vec![(p, true)]);
                    }
                    continue;
                }
            };
            for (name, kind) in names {
                if self.stopping() {
                    return true;
                }
                let excluded = self.excluded_child(&dir, &name, kind == Kind::Dir);
                if kind != Kind::Dir {
                    let job = Job {
                        dir: dir.clone(),
                        name,
                        excluded,
                    };
                    if tx.send(job).is_err() {
                        break;
                    }
                    continue;
                }
                let inode = match self.view.child(&dir.inode, &name) {
                    Ok(Some(i)) => i,
                    Ok(None) => continue,
                    Err(e) if e.errno() == libc::ENOENT => continue,
                    Err(e) => {
                        (v.fail)(self.view.child_path(&dir.inode, &name), &e);
                        continue;
                    }
                };
                if inode.kind != Kind::Dir {
                    // Became a non-directory since the listing: a worker's job after all.
                    self.view.release_lookup(&inode);
                    let excluded = self.excluded_child(&dir, &name, false);
                    let _ = tx.send(Job {
                        dir: dir.clone(),
                        name,
                        excluded,
                    });
                    continue;
                }
                if excluded && !self.view.in_new(&inode) {
                    // Left out by the filter, with everything below it.
                    v.excluded.fetch_add(1, Ordering::Relaxed);
                    self.view.release_lookup(&inode);
                    continue;
                }
                if let Some(p) = (v.visit)(&inode, true) {
                    (v.flush)(vec![(p, true)]);
                }
                let path = if self.filter().is_empty() {
                    Vec::new()
                } else {
                    crate::view::join(&dir.path, &name)
                };
                stack.push(Arc::new(DirGuard {
                    view: self.view.clone(),
                    inode,
                    excluded,
                    path,
                    finish: copying,
                    counted: true,
                    _parent: Some(dir.clone()),
                }));
            }
        }
        false
    }
}

impl Copier {
    /// Whether the filter leaves out `name` in the walked directory `dir` (or `dir` itself
    /// is left out). The directory's path was taken once, when the walk met it.
    fn excluded_child(&self, dir: &DirGuard, name: &std::ffi::OsStr, is_dir: bool) -> bool {
        dir.excluded
            || (!self.filter().is_empty()
                && self
                    .filter()
                    .excludes(&crate::view::join(&dir.path, name), is_dir))
    }
}
