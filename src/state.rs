//! The migration's state directory: its journal, its lock, its log.
//!
//! Layout: `journal/` (RocksDB), `lock` (flock held by the one process that may write the
//! journal), `ferryfs.log` (the background daemon's log). `prepare` creates it; everything else
//! opens it. Never holds credentials.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub const PHASE_PREPARED: &str = "prepared";

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
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            Err(JournalError::Busy(state.display().to_string()).into())
        }
        Err(e) => Err(io_at(&path)(io::Error::from_raw_os_error(e.raw_os_error()))),
    }
}

fn check_dir(what: &str, spec: &StoreSpec) -> Result<(), StateError> {
    let StoreSpec::Posix { path } = spec;
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

/// Walk OLD once for the totals `status` reports.
fn scan_totals(root: &Path) -> io::Result<Totals> {
    let mut t = Totals::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            if ft.is_dir() {
                t.dirs += 1;
                stack.push(ent.path());
            } else {
                t.files += 1;
                if ft.is_file() {
                    t.bytes += ent.metadata()?.len();
                }
            }
        }
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

/// `ferryfs prepare`: check both stores, record them, create the journal.
pub fn prepare(
    old: StoreSpec,
    new: StoreSpec,
    state: &Path,
    allow_nonempty_new: bool,
) -> Result<Totals, StateError> {
    check_dir("OLD", &old)?;
    check_dir("NEW", &new)?;
    let (StoreSpec::Posix { path: op }, StoreSpec::Posix { path: np }) = (&old, &new);
    let (op, np) = (
        fs::canonicalize(op).map_err(io_at(op))?,
        fs::canonicalize(np).map_err(io_at(np))?,
    );
    if op.starts_with(&np) || np.starts_with(&op) {
        return Err(StateError::Invalid(format!(
            "OLD ({}) and NEW ({}) must not contain one another",
            op.display(),
            np.display()
        )));
    }
    if !allow_nonempty_new && fs::read_dir(&np).map_err(io_at(&np))?.next().is_some() {
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
    if state.starts_with(&op) || state.starts_with(&np) {
        return Err(StateError::Invalid(
            "the state dir must not be inside OLD or NEW".into(),
        ));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .map_err(io_at(state))?;
    let _lock = take_lock(state)?;
    let totals = scan_totals(&op).map_err(io_at(&op))?;
    root_meta_from_old(&op, &np)?;
    let kv = RocksJournal::open(&journal_dir(state), true)?;
    let journal = Records::new(Arc::new(kv))?;
    let config = Config {
        old: StoreSpec::Posix { path: op },
        new: StoreSpec::Posix { path: np },
    };
    let mut b = Batch::new();
    b.meta(
        "config",
        &serde_json::to_vec(&config).expect("config serializes"),
    )
    .meta(
        "totals",
        &serde_json::to_vec(&totals).expect("totals serialize"),
    )
    .meta("phase", PHASE_PREPARED.as_bytes());
    journal.commit(b, true)?;
    Ok(totals)
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
    /// Open the state dir for writing (one process at a time).
    pub fn open(state: &Path) -> Result<Migration, StateError> {
        if !journal_dir(state).exists() {
            return Err(StateError::Invalid(format!(
                "{} holds no migration (run `ferryfs prepare` first)",
                state.display()
            )));
        }
        let lock = take_lock(state)?;
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
    /// Entries born or changed through the view (entries present in NEW).
    pub local: u64,
    pub tombstones: u64,
    pub redirects: u64,
    pub errors: Vec<ErrorEntry>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorEntry {
    pub path: String,
    pub error: String,
}

fn count_entries(root: &Path) -> io::Result<u64> {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir)? {
            let ent = ent?;
            n += 1;
            if ent.file_type()?.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok(n)
}

/// Read the state without taking the lock, so it works while a daemon serves the view.
pub fn status(state: &Path) -> Result<Status, StateError> {
    if !journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "{} holds no migration",
            state.display()
        )));
    }
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(&journal_dir(state))?))?;
    let config = read_config(&journal, state)?;
    let totals: Totals = journal
        .meta("totals")?
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default();
    let phase = journal
        .meta("phase")?
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .unwrap_or_else(|| PHASE_PREPARED.to_string());
    let counts = journal.counts()?;
    let StoreSpec::Posix { path: np } = &config.new;
    let local = count_entries(np).map_err(io_at(np))?;
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
            total: totals.files,
            done: 0,
        },
        dirs: Progress {
            total: totals.dirs,
            done: 0,
        },
        bytes: Progress {
            total: totals.bytes,
            done: 0,
        },
        local,
        tombstones: counts.tombstones,
        redirects: counts.redirects,
        errors: Vec::new(),
    })
}
