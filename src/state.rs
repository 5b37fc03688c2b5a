//! The migration's state directory: its journal, its lock, its log.
//!
//! Layout: `journal/` (RocksDB), `lock` (flock held by the one process that may write the
//! journal), `ferryfs.log` (the background daemon's log). `prepare` creates it; everything else
//! opens it. Never holds credentials.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::journal::rocks::RocksJournal;
use crate::journal::{Batch, JournalError, Records};
use crate::store::StoreSpec;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub old: StoreSpec,
    pub new: StoreSpec,
}

/// Totals of OLD as scanned at prepare time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
    /// Set-id programs (set-uid, or set-gid and group-executable) and device files in OLD:
    /// what a `nosuid,nodev` view takes the powers of (see `mount -o`). 0 when not counted
    /// (an S3 OLD, a journal from before they were).
    #[serde(default)]
    pub setid: u64,
    #[serde(default)]
    pub devices: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.dirs += o.dirs;
        self.files += o.files;
        self.bytes += o.bytes;
        self.setid += o.setid;
        self.devices += o.devices;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The migration's lifecycle (DESIGN "Lifecycle"); each transition is one durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prepared,
    Executing,
    /// Nothing needs OLD any more (the last pass found everything in NEW and equal to OLD).
    Executed,
    Committed,
    Aborted,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 5] = [
        Phase::Prepared,
        Phase::Executing,
        Phase::Executed,
        Phase::Committed,
        Phase::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Executing => "executing",
            Phase::Executed => "executed",
            Phase::Committed => "committed",
            Phase::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn phase(journal: &Records) -> Result<Phase, crate::error::Error> {
    let raw = journal
        .meta("phase")?
        .unwrap_or_else(|| b"prepared".to_vec());
    let s = String::from_utf8_lossy(&raw);
    Phase::parse(&s).ok_or_else(|| crate::error::Error::Journal(format!("unknown phase {s:?}")))
}

pub fn set_phase(journal: &Records, p: Phase) -> Result<(), crate::error::Error> {
    let mut b = Batch::new();
    b.meta("phase", p.as_str().as_bytes());
    journal.commit(b, true)?;
    Ok(())
}

/// The copier's current rate, for status readers in other processes (not synced: it is only
/// news).
pub fn record_rate(journal: &Records, bytes_per_sec: u64) -> Result<(), crate::error::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut b = Batch::new();
    b.meta(
        "rate",
        &serde_json::to_vec(&(bytes_per_sec, now)).expect("rate serializes"),
    );
    journal.commit(b, false)?;
    Ok(())
}

/// Before commit or abort forgets which entries were copies: how many were the view's own, so
/// `status` keeps reporting it.
pub fn record_final_local(
    journal: &Records,
    new_root: std::os::fd::BorrowedFd<'_>,
) -> Result<(), crate::error::Error> {
    let copies: std::collections::HashSet<(u64, u64)> =
        journal.copies()?.into_iter().map(|(k, _)| k).collect();
    let root = std::path::PathBuf::from(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        new_root.as_raw_fd()
    }));
    let n = local_entries(&root, &copies).map_err(|e| crate::error::Error::Store {
        op: "count NEW entries",
        source: e,
    })?;
    let mut b = Batch::new();
    b.meta("final_local", &n.to_le_bytes());
    journal.commit(b, true)?;
    Ok(())
}

/// OLD's totals as scanned at prepare (zeros when none were recorded).
pub fn totals(journal: &Records) -> Result<Totals, JournalError> {
    Ok(journal
        .meta("totals")?
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default())
}

pub fn set_totals(journal: &Records, t: &Totals) -> Result<(), crate::error::Error> {
    let mut b = Batch::new();
    b.meta("totals", &serde_json::to_vec(t).expect("totals serialize"));
    journal.commit(b, true)?;
    Ok(())
}

/// An opened state dir holding the write lock.
pub struct Migration {
    pub dir: PathBuf,
    pub config: Config,
    pub journal: Records,
    _lock: File,
}

fn journal_dir(state: &Path) -> PathBuf {
    state.join("journal")
}

fn take_lock(state: &Path) -> Result<File, StateError> {
    let path = state.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_at(&path))?;
    // A daemon killed a moment ago (kill -9, OOM) holds the lock until the kernel has closed
    // its files, a little after its memory is gone: a `mount` right behind it waits that out.
    // A live holder keeps it, and is refused after the wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(JournalError::Busy(state.display().to_string()).into());
            }
            Err(e) => return Err(io_at(&path)(io::Error::from_raw_os_error(e.raw_os_error()))),
        }
    }
}

fn check_dir(what: &str, spec: &StoreSpec) -> Result<(), StateError> {
    let path = match spec {
        StoreSpec::Posix { path } => path,
        StoreSpec::S3 { url } if what == "NEW" => {
            let store = crate::store::s3::S3Store::connect(url)
                .map_err(|e| StateError::Invalid(format!("NEW store {spec}: {e}")))?;
            let empty = store
                .is_empty()
                .map_err(|e| StateError::Invalid(format!("NEW store {spec}: {e}")))?;
            if !empty {
                return Err(StateError::Invalid(format!(
                    "NEW store {spec} is not empty: an S3 NEW must hold no object below its \
                     prefix (--allow-nonempty-new applies to a POSIX NEW only)"
                )));
            }
            return Ok(());
        }
        StoreSpec::S3 { url } => {
            crate::store::s3tree::S3Tree::open(url)
                .map_err(|e| StateError::Invalid(format!("{what} store {spec}: {e}")))?;
            return Ok(());
        }
    };
    let md = fs::metadata(path)
        .map_err(|e| StateError::Invalid(format!("{what} store {}: {e}", path.display())))?;
    if !md.is_dir() {
        return Err(StateError::Invalid(format!(
            "{what} store {} is not a directory",
            path.display()
        )));
    }
    Ok(())
}

/// The totals of an S3 OLD: the root listed by directory, then each top-level directory
/// listed recursively (1,000 keys a request), up to 16 at once. A directory is every distinct
/// prefix of a key; a `name/` marker is a directory, not a file.
fn scan_totals_s3(tree: &crate::store::s3tree::S3Tree) -> io::Result<Totals> {
    use crate::store::s3::Listed;
    let mut t = Totals::default();
    let mut tops = Vec::new();
    for l in tree.store.list_dir("")? {
        match l {
            Listed::Object(o) => {
                t.files += 1;
                t.bytes += o.size;
            }
            Listed::Dir(d) => tops.push(d),
        }
    }
    SCAN_PROGRESS.add(&t);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts: Vec<io::Result<Totals>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..tops.len().min(16))
            .map(|_| {
                s.spawn(|| -> io::Result<Totals> {
                    let mut t = Totals::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(top) = tops.get(i) else {
                            return Ok(t);
                        };
                        let mut dirs = std::collections::HashSet::new();
                        dirs.insert(top.clone());
                        tree.store
                            .list_all_below(&format!("{top}/"), &mut |rel, size| {
                                let (parents, is_marker) = match rel.strip_suffix('/') {
                                    Some(d) => (d, true),
                                    None => (rel.rsplit_once('/').map_or("", |(d, _)| d), false),
                                };
                                if !is_marker {
                                    t.files += 1;
                                    t.bytes += size;
                                    SCAN_PROGRESS.files.fetch_add(1, Ordering::Relaxed);
                                    SCAN_PROGRESS.bytes.fetch_add(size, Ordering::Relaxed);
                                }
                                let mut p = parents;
                                while !p.is_empty() && dirs.insert(p.to_string()) {
                                    p = p.rsplit_once('/').map_or("", |(d, _)| d);
                                }
                            })?;
                        t.dirs += dirs.len() as u64;
                        SCAN_PROGRESS
                            .dirs
                            .fetch_add(dirs.len() as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("scan thread panicked")))
            })
            .collect()
    });
    for p in parts {
        t.add(&p?);
    }
    Ok(t)
}

/// What `prepare`'s scan of OLD has counted so far, for its progress line.
pub struct ScanProgress {
    pub dirs: AtomicU64,
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

pub static SCAN_PROGRESS: ScanProgress = ScanProgress {
    dirs: AtomicU64::new(0),
    files: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

impl ScanProgress {
    fn add(&self, t: &Totals) {
        self.dirs.fetch_add(t.dirs, Ordering::Relaxed);
        self.files.fetch_add(t.files, Ordering::Relaxed);
        self.bytes.fetch_add(t.bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> Totals {
        Totals {
            dirs: self.dirs.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            ..Totals::default()
        }
    }
}

/// Directories read at once by the scan: a network OLD (NFS, CephFS) answers each listing and
/// stat after a round trip, so one reader at a time leaves it idle.
const SCAN_THREADS: usize = 16;

/// Walk OLD once for the totals `status` reports, [`SCAN_THREADS`] directories at a time.
/// The first error ends the scan.
fn scan_totals(root: &Path) -> io::Result<Totals> {
    let (tx, rx) = crossbeam_channel::unbounded::<PathBuf>();
    // Directories queued or being read: none left, and the scan is done.
    let pending = AtomicU64::new(1);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    tx.send(root.to_path_buf()).expect("receiver alive");
    let read_dir = |dir: &Path, t: &mut Totals| -> io::Result<()> {
        let mut sub = Totals::default();
        for ent in fs::read_dir(dir)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            if ft.is_dir() {
                sub.dirs += 1;
                pending.fetch_add(1, Ordering::SeqCst);
                tx.send(ent.path()).expect("receiver alive");
            } else {
                sub.files += 1;
                if ft.is_file() {
                    let md = ent.metadata()?;
                    sub.bytes += md.len();
                    let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions());
                    if mode & libc::S_ISUID != 0
                        || mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP
                    {
                        sub.setid += 1;
                    }
                } else if ft.is_block_device() || ft.is_char_device() {
                    sub.devices += 1;
                }
            }
        }
        SCAN_PROGRESS.add(&sub);
        t.add(&sub);
        Ok(())
    };
    let parts: Vec<Option<Totals>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..SCAN_THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut t = Totals::default();
                    loop {
                        if pending.load(Ordering::SeqCst) == 0
                            || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
                        {
                            return t;
                        }
                        let Ok(dir) = rx.recv_timeout(std::time::Duration::from_millis(5)) else {
                            continue;
                        };
                        // A panic is an error of this directory: the other threads would
                        // otherwise wait for ever on its count in `pending`.
                        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            read_dir(&dir, &mut t)
                        }))
                        .unwrap_or_else(|_| Err(io::Error::other("the scan thread panicked")));
                        if let Err(e) = read {
                            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(io::Error::new(
                                e.kind(),
                                format!("{}: {e}", dir.display()),
                            ));
                        }
                        pending.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().ok()).collect()
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut t = Totals::default();
    for p in parts {
        // A thread that panicked took its counts with it: no totals rather than wrong ones.
        let p = p.ok_or_else(|| io::Error::other("a scan thread panicked"))?;
        t.add(&p);
    }
    Ok(t)
}

/// The view's root is NEW's root directory, so it must look like OLD's: owner, mode, xattrs and
/// times, as copy-up gives every other directory. Otherwise mounting in place would change the
/// dataset root's permissions under the applications.
fn root_meta_from_old(old: &Path, new: &Path) -> Result<(), StateError> {
    use crate::store::posix::{Loc, PosixStore};
    let open = |p: &Path| PosixStore::open(p).map_err(io_at(p));
    let (o, n) = (open(old)?, open(new)?);
    let dup = |s: &PosixStore, p: &Path| {
        s.root()
            .try_clone_to_owned()
            .map(|fd| Loc::Fd(Arc::new(fd)))
            .map_err(io_at(p))
    };
    let (ol, nl) = (dup(&o, old)?, dup(&n, new)?);
    let st = ol.stat().map_err(io_at(old))?;
    crate::fs::copy_xattrs(&ol, &nl)
        .map_err(|e| StateError::Invalid(format!("{}: {e}", new.display())))?;
    nl.chown(Some(st.st_uid), Some(st.st_gid))
        .map_err(io_at(new))?;
    nl.chmod(st.st_mode).map_err(io_at(new))?;
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    nl.utimens(&ts).map_err(io_at(new))
}

/// `prepare --if-absent` on a state dir that already holds a migration: `Ok(config)` when it
/// is a migration of this same OLD and NEW (nothing to do), an error saying which stores it
/// holds otherwise. `Ok(None)`: the state dir holds no migration yet. Safe while a daemon
/// serves it, and while OLD's path is covered by a dead view (paths are compared as recorded
/// before any store is touched).
pub fn already_prepared(
    old: &StoreSpec,
    new: &StoreSpec,
    state: &Path,
) -> Result<Option<Config>, StateError> {
    if !journal_dir(state).exists() {
        return Ok(None);
    }
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(&journal_dir(state))?))?;
    let config = read_config(&journal, state)?;
    // canonicalize only reads links (realpath), so it also resolves an OLD path covered by a
    // dead view, whose stat would fail with ENOTCONN (tests/observe.rs covers that case).
    let same = |want: &StoreSpec, have: &StoreSpec| match (want, have) {
        (StoreSpec::Posix { path: w }, StoreSpec::Posix { path: h }) => {
            w == h || fs::canonicalize(w).is_ok_and(|c| &c == h)
        }
        // The directories' mtime is the time of prepare, not part of what was asked.
        (StoreSpec::S3 { url: w }, StoreSpec::S3 { url: h }) => {
            let mut w = w.clone();
            w.defaults.dir_mtime = h.defaults.dir_mtime;
            &w == h
        }
        _ => false,
    };
    if same(old, &config.old) && same(new, &config.new) {
        Ok(Some(config))
    } else {
        Err(StateError::Invalid(format!(
            "state dir {} already holds a migration of OLD {} to NEW {}, not of {old} to {new}",
            state.display(),
            config.old,
            config.new
        )))
    }
}

/// Whether two S3 stores' requests go to the same endpoint, as each resolves it (the URL's
/// `endpoint=`, else the environment's or its profile's): the same bucket name on two servers
/// is two buckets. Taken as the same when either cannot say.
fn same_endpoint(a: &crate::store::s3::S3Url, b: &crate::store::s3::S3Url) -> bool {
    use crate::store::s3::S3Store;
    match (S3Store::connect(a), S3Store::connect(b)) {
        (Ok(a), Ok(b)) => {
            a.endpoint.as_deref().map(endpoint_key) == b.endpoint.as_deref().map(endpoint_key)
        }
        _ => true,
    }
}

/// An endpoint URL as compared: scheme and host in lower case, the scheme's default port
/// written out, no trailing slash (`HTTP://Host:80/` and `http://host` are one endpoint).
fn endpoint_key(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    let (scheme, rest) = e.split_once("://").unwrap_or(("https", e));
    let scheme = scheme.to_ascii_lowercase();
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.to_ascii_lowercase();
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let host = match (has_port, scheme.as_str()) {
        (false, "http") => format!("{host}:80"),
        (false, "https") => format!("{host}:443"),
        _ => host,
    };
    if path.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}/{path}")
    }
}

/// `ferryfs prepare`: check both stores, record them, create the journal.
pub fn prepare(
    old: StoreSpec,
    new: StoreSpec,
    state: &Path,
    allow_nonempty_new: bool,
) -> Result<Totals, StateError> {
    check_dir("OLD", &old)?;
    check_dir("NEW", &new)?;
    if let (StoreSpec::S3 { url: o }, StoreSpec::S3 { url: n }) = (&old, &new)
        && o.bucket == n.bucket
        && (o.prefix.starts_with(&n.prefix) || n.prefix.starts_with(&o.prefix))
        && same_endpoint(o, n)
    {
        return Err(StateError::Invalid(format!(
            "OLD ({old}) and NEW ({new}) must not contain one another: they are the same \
             bucket with nested prefixes"
        )));
    }
    let np = match &new {
        StoreSpec::Posix { path } => fs::canonicalize(path).map_err(io_at(path))?,
        // An S3 NEW: the view's NEW is the staging tree in the state dir (crate::publish).
        StoreSpec::S3 { .. } => make_stage(state)?,
    };
    let old = match old {
        StoreSpec::S3 { mut url } => {
            // Directories of an S3 OLD have no times of their own: they show the time of
            // prepare, recorded here so that it never changes.
            url.defaults.dir_mtime = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            return prepare_from_s3(url, np, new, state, allow_nonempty_new);
        }
        o => o,
    };
    let op = old.posix_path().expect("not S3");
    let op = fs::canonicalize(op).map_err(io_at(op))?;
    if op.starts_with(&np) || np.starts_with(&op) {
        return Err(StateError::Invalid(format!(
            "OLD ({}) and NEW ({}) must not contain one another",
            op.display(),
            np.display()
        )));
    }
    check_new_and_state(&np, state, allow_nonempty_new, &[&op, &np])?;
    let _lock = take_lock(state)?;
    let new_was_empty = fs::read_dir(&np).map_err(io_at(&np))?.next().is_none();
    let totals = scan_totals(&op).map_err(io_at(&op))?;
    root_meta_from_old(&op, &np)?;
    let ost = rustix::fs::stat(&op).map_err(|e| io_at(&op)(e.into()))?;
    let config = Config {
        old: StoreSpec::Posix { path: op.clone() },
        new: match new {
            StoreSpec::Posix { .. } => StoreSpec::Posix { path: np.clone() },
            s3 => s3,
        },
    };
    record_migration(&config, &totals, &ost, &np, state, new_was_empty)?;
    Ok(totals)
}

/// `prepare` of a migration out of an S3 bucket (OLD) into the POSIX directory `np`.
fn prepare_from_s3(
    url: crate::store::s3::S3Url,
    np: PathBuf,
    new: StoreSpec,
    state: &Path,
    allow_nonempty_new: bool,
) -> Result<Totals, StateError> {
    check_new_and_state(&np, state, allow_nonempty_new, &[&np])?;
    let _lock = take_lock(state)?;
    let new_was_empty = fs::read_dir(&np).map_err(io_at(&np))?.next().is_none();
    let spec = StoreSpec::S3 { url: url.clone() };
    let tree = crate::store::s3tree::S3Tree::open(&url)
        .map_err(|e| StateError::Invalid(format!("OLD store {spec}: {e}")))?;
    let totals = scan_totals_s3(&tree)
        .map_err(|e| StateError::Invalid(format!("listing OLD store {spec}: {e}")))?;
    // The view's root is NEW's root: it shows what OLD's root shows (the URL's defaults).
    let ost = tree.root().st;
    {
        use crate::store::posix::{Loc, PosixStore};
        let n = PosixStore::open(&np).map_err(io_at(&np))?;
        let nl = Loc::Fd(Arc::new(n.root().try_clone_to_owned().map_err(io_at(&np))?));
        nl.chown(Some(ost.st_uid), Some(ost.st_gid))
            .map_err(io_at(&np))?;
        nl.chmod(ost.st_mode).map_err(io_at(&np))?;
        nl.utimens(&crate::fs::timestamps_of(&ost))
            .map_err(io_at(&np))?;
    }
    let config = Config {
        old: spec,
        new: match new {
            StoreSpec::Posix { .. } => StoreSpec::Posix { path: np.clone() },
            s3 => s3,
        },
    };
    record_migration(&config, &totals, &ost, &np, state, new_was_empty)?;
    Ok(totals)
}

/// The staging tree of an S3 NEW, made (empty) in a state dir that holds no migration yet.
fn make_stage(state: &Path) -> Result<PathBuf, StateError> {
    if journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "state dir {} already holds a migration",
            state.display()
        )));
    }
    let stage = crate::publish::stage_dir(state);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&stage)
        .map_err(io_at(&stage))?;
    if fs::read_dir(&stage)
        .map_err(io_at(&stage))?
        .next()
        .is_some()
    {
        return Err(StateError::Invalid(format!(
            "{} is not empty (left by another tool?): remove it, then prepare again",
            stage.display()
        )));
    }
    fs::canonicalize(&stage).map_err(io_at(&stage))
}

/// The directory the view uses as NEW: a POSIX NEW itself, or an S3 NEW's staging tree.
pub fn new_dir(config: &Config, state: &Path) -> PathBuf {
    match &config.new {
        StoreSpec::Posix { path } => path.clone(),
        StoreSpec::S3 { .. } => crate::publish::stage_dir(state),
    }
}

/// The checks of NEW and of the state dir every `prepare` makes, then the state dir is made.
/// `stores`: directories the state dir must not be inside.
fn check_new_and_state(
    np: &Path,
    state: &Path,
    allow_nonempty_new: bool,
    stores: &[&Path],
) -> Result<(), StateError> {
    if !allow_nonempty_new && fs::read_dir(np).map_err(io_at(np))?.next().is_some() {
        return Err(StateError::Invalid(format!(
            "NEW store {} is not empty; pass --allow-nonempty-new to merge into it (its entries \
             then win over OLD's)",
            np.display()
        )));
    }
    if journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "state dir {} already holds a migration",
            state.display()
        )));
    }
    if stores.iter().any(|p| state.starts_with(p)) {
        return Err(StateError::Invalid(
            "the state dir must not be inside OLD or NEW".into(),
        ));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .map_err(io_at(state))
}

/// Create the journal of a prepared migration: its stores, OLD's totals, the phase, and the
/// copy record of NEW's root (a copy of OLD's root `ost`, whose times the copier restores once
/// it has filled the root, until the view changes the root itself).
fn record_migration(
    config: &Config,
    totals: &Totals,
    ost: &rustix::fs::Stat,
    np: &Path,
    state: &Path,
    new_was_empty: bool,
) -> Result<(), StateError> {
    let kv = RocksJournal::open(&journal_dir(state), true)?;
    let journal = Records::new(Arc::new(kv))?;
    let mut b = Batch::new();
    b.meta(
        "config",
        &serde_json::to_vec(config).expect("config serializes"),
    )
    .meta(
        "totals",
        &serde_json::to_vec(totals).expect("totals serialize"),
    )
    .meta("phase", Phase::Prepared.as_str().as_bytes())
    .meta("new_was_empty", if new_was_empty { b"1" } else { b"0" });
    let n = fs::File::open(np).map_err(io_at(np))?;
    let nst = rustix::fs::fstat(&n).map_err(|e| io_at(np)(e.into()))?;
    b.copy(
        nst.st_dev,
        nst.st_ino,
        &crate::journal::CopyRecord {
            origin: Vec::new(),
            fp: crate::journal::Fingerprint::of(ost),
            handle: crate::store::posix::file_handle(std::os::fd::AsFd::as_fd(&n))
                .map_err(io_at(np))?,
            is_dir: true,
        },
    );
    journal.commit(b, true)?;
    Ok(())
}

fn read_config(journal: &Records, state: &Path) -> Result<Config, StateError> {
    let raw = journal.meta("config")?.ok_or_else(|| {
        StateError::Invalid(format!(
            "{}: journal has no migration config",
            state.display()
        ))
    })?;
    serde_json::from_slice(&raw)
        .map_err(|e| StateError::Invalid(format!("{}: bad config record: {e}", state.display())))
}

impl Migration {
    /// The directory the view uses as NEW (see [`new_dir`]).
    pub fn new_dir(&self) -> PathBuf {
        new_dir(&self.config, &self.dir)
    }

    /// The S3 NEW's URL, when NEW is a bucket.
    pub fn new_s3(&self) -> Option<&crate::store::s3::S3Url> {
        match &self.config.new {
            StoreSpec::S3 { url } => Some(url),
            StoreSpec::Posix { .. } => None,
        }
    }

    /// The state dir's lock file, held for as long as this `Migration` lives.
    pub fn lock_file(&self) -> &File {
        &self._lock
    }

    /// Open the state dir for writing (one process at a time).
    pub fn open(state: &Path) -> Result<Migration, StateError> {
        if !journal_dir(state).exists() {
            return Err(StateError::Invalid(format!(
                "{} holds no migration (run `ferryfs prepare` first)",
                state.display()
            )));
        }
        let lock = take_lock(state)?;
        Migration::open_locked(state, lock)
    }

    /// Open the state dir with its lock already held: the lock file, locked by the daemon
    /// that handed its mount over to this process (`mount --takeover`).
    pub fn open_locked(state: &Path, lock: File) -> Result<Migration, StateError> {
        let journal = Records::new(Arc::new(RocksJournal::open(&journal_dir(state), false)?))?;
        let config = read_config(&journal, state)?;
        Ok(Migration {
            dir: state.to_path_buf(),
            config,
            journal,
            _lock: lock,
        })
    }
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub phase: String,
    pub old: String,
    pub new: String,
    pub mounted: bool,
    pub files: Progress,
    pub dirs: Progress,
    pub bytes: Progress,
    /// Entries born or changed through the view (entries in NEW that are not plain copies).
    pub local: u64,
    pub tombstones: u64,
    pub redirects: u64,
    pub errors: Vec<ErrorEntry>,
    /// Entries OLD changed behind the view's back after they were copied (found by a pass
    /// or by commit's final check), and whether each was copied again.
    pub changed_in_old: Vec<StaleEntry>,
    /// Copy rate over the last seconds (0 when the copier is not copying).
    pub rate_bytes_per_sec: u64,
    /// Seconds until every byte is copied at that rate; `null` when unknown.
    pub eta_seconds: Option<u64>,
    /// An S3 NEW only: the objects the bucket holds from the staging tree, and the uploads
    /// under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Published {
    pub objects: u64,
    pub pending: u64,
    /// The last publish pass found nothing to do: the bucket held the staging tree.
    pub settled: bool,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
}

#[derive(Debug, Serialize)]
pub struct StaleEntry {
    pub path: String,
    pub copied_again: bool,
}

#[derive(Debug, Serialize)]
pub struct ErrorEntry {
    pub path: String,
    pub error: String,
    pub errno: i32,
    pub attempts: u32,
}

/// Entries in NEW that are not plain copies of OLD (no copy record for their inode).
fn local_entries(root: &Path, copies: &std::collections::HashSet<(u64, u64)>) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir)? {
            let ent = ent?;
            if dir == root && ent.file_name() == crate::fs::WORK_DIR {
                continue;
            }
            let md = ent.metadata()?;
            if !copies.contains(&(md.dev(), md.ino())) {
                n += 1;
            }
            if md.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok(n)
}

/// Read the state without taking the lock, so it works while a daemon serves the view.
pub fn status(state: &Path) -> Result<Status, StateError> {
    read_status(state, true)
}

fn read_status(state: &Path, count_local: bool) -> Result<Status, StateError> {
    if !journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "{} holds no migration",
            state.display()
        )));
    }
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(&journal_dir(state))?))?;
    status_of(&journal, state, count_local)
}

/// Status for progress lines, without the walk of NEW that counts `local` (0 here): cheap
/// enough to read every second whatever the size of NEW.
pub fn progress(state: &Path) -> Result<Status, StateError> {
    read_status(state, false)
}

/// OLD's totals as scanned at prepare, read without the lock.
pub fn scanned_totals(state: &Path) -> Result<Totals, StateError> {
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(&journal_dir(state))?))?;
    Ok(totals(&journal)?)
}

/// Status from a journal this process has open. `count_local` walks NEW (skip it for
/// progress lines: `local` is then 0).
pub fn status_of(journal: &Records, state: &Path, count_local: bool) -> Result<Status, StateError> {
    let journal = journal.clone();
    let config = read_config(&journal, state)?;
    let totals = totals(&journal)?;
    let phase = phase(&journal)
        .map_err(|e| StateError::Invalid(format!("{}: {e}", state.display())))?
        .to_string();
    let counts = journal.counts()?;
    let np = &new_dir(&config, state);
    let final_local = journal
        .meta("final_local")?
        .and_then(|v| v.try_into().ok().map(u64::from_le_bytes));
    let local = if let Some(n) = final_local.filter(|_| phase == "committed" || phase == "aborted")
    {
        n
    } else if count_local {
        let copies: std::collections::HashSet<(u64, u64)> =
            journal.copies()?.into_iter().map(|(k, _)| k).collect();
        local_entries(np, &copies).map_err(io_at(np))?
    } else {
        0
    };
    let done = journal.done()?;
    let mut errors: Vec<ErrorEntry> = journal
        .errors()?
        .into_iter()
        .map(|(p, e)| ErrorEntry {
            path: crate::copier::display_path(&p),
            error: e.error,
            errno: e.errno,
            attempts: e.attempts,
        })
        .collect();
    // An S3 NEW's failed uploads, by the view path of the object's key.
    errors.extend(journal.pub_errors()?.into_iter().map(|(k, e)| ErrorEntry {
        path: format!("/{}", k.trim_end_matches('/')),
        error: e.error,
        errno: e.errno,
        attempts: e.attempts,
    }));
    let published = match &config.new {
        StoreSpec::S3 { .. } => {
            let recs = journal.published()?;
            Some(Published {
                objects: recs.iter().filter(|(_, r)| !r.pending).count() as u64,
                pending: recs.iter().filter(|(_, r)| r.pending).count() as u64,
                settled: journal.meta(crate::publish::SETTLED)?.as_deref() == Some(b"1"),
            })
        }
        StoreSpec::Posix { .. } => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rate = match journal.meta("rate")? {
        Some(v) => match serde_json::from_slice::<(u64, u64)>(&v) {
            Ok((bps, at)) if now.saturating_sub(at) <= 5 && phase == "executing" => bps,
            _ => 0,
        },
        None => 0,
    };
    let left = totals.bytes.saturating_sub(done.bytes);
    let eta_seconds = match phase.as_str() {
        "executed" | "committed" | "aborted" => Some(0),
        _ if rate > 0 => Some(left / rate),
        _ => None,
    };
    let mounted = match File::open(state.join("lock")) {
        Ok(f) => rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err(),
        Err(_) => false,
    };
    Ok(Status {
        phase,
        old: config.old.to_string(),
        new: config.new.to_string(),
        mounted,
        files: Progress {
            total: totals.files.max(done.files),
            done: done.files,
        },
        dirs: Progress {
            total: totals.dirs.max(done.dirs),
            done: done.dirs,
        },
        bytes: Progress {
            total: totals.bytes.max(done.bytes),
            done: done.bytes,
        },
        local,
        tombstones: counts.tombstones,
        redirects: counts.redirects,
        errors,
        changed_in_old: journal
            .stales()?
            .into_iter()
            .map(|(p, r)| StaleEntry {
                path: crate::copier::display_path(&p),
                copied_again: r.copied_again,
            })
            .collect(),
        rate_bytes_per_sec: rate,
        eta_seconds,
        published,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_endpoint_written_two_ways_compares_equal() {
        let k = endpoint_key;
        assert_eq!(k("http://127.0.0.1:3900/"), k("http://127.0.0.1:3900"));
        assert_eq!(k("HTTP://Garage.Local"), k("http://garage.local:80/"));
        assert_eq!(k("https://s3.example.com"), k("https://s3.example.com:443"));
        assert_eq!(k("http://[::1]"), "http://[::1]:80");
        assert_eq!(k("http://[::1]:3900/"), "http://[::1]:3900");
        assert_ne!(k("http://127.0.0.1:3900"), k("http://127.0.0.1:3901"));
        assert_ne!(k("http://h:3900"), k("https://h:3900"));
    }

    /// The parallel scan counts what a plain walk counts: every directory below the root,
    /// every non-directory (symlinks included, not followed), and regular files' bytes.
    #[test]
    fn the_scan_counts_every_entry_once() {
        let root = tempfile::tempdir().unwrap();
        let mut want = Totals::default();
        for a in 0..7 {
            let mut d = root.path().join(format!("a{a}"));
            fs::create_dir(&d).unwrap();
            want.dirs += 1;
            for depth in 0..a {
                d = d.join(format!("deep{depth}"));
                fs::create_dir(&d).unwrap();
                want.dirs += 1;
            }
            for f in 0..(a * 13 + 1) {
                let n = (f * 977 + a) % 5000;
                fs::write(d.join(format!("f{f}")), vec![1u8; n]).unwrap();
                want.files += 1;
                want.bytes += n as u64;
            }
            std::os::unix::fs::symlink("f0", d.join("link")).unwrap();
            want.files += 1;
        }
        fs::create_dir(root.path().join("empty")).unwrap();
        want.dirs += 1;
        fs::write(root.path().join("top"), b"12345").unwrap();
        want.files += 1;
        want.bytes += 5;
        // Set-id programs (set-uid; set-gid with group exec) and device files are counted too.
        use std::os::unix::fs::PermissionsExt;
        for (name, mode, setid) in [("su", 0o4700, 1), ("sg", 0o2750, 1), ("lock", 0o2640, 0)] {
            let p = root.path().join(name);
            fs::write(&p, b"").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            want.files += 1;
            want.setid += setid;
        }
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .expect("mknod of a device file (the tests run as root)");
        want.files += 1;
        want.devices += 1;
        assert_eq!(scan_totals(root.path()).unwrap(), want);
        // An unreadable directory ends the scan with an error naming it.
        let e = scan_totals(&root.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
