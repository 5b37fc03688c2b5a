//! The migration's state directory: its layout (`layout`), making it (`prepare`), opening
//! it under its write lock ([`Migration`]) and its view (`open`), and reading it without the
//! lock (`status`). Never holds credentials.

pub mod layout;
pub mod open;
pub mod prepare;
pub mod report;
pub mod status;

pub use open::{Opened, open_view, open_view_with};
pub use prepare::{DryRun, already_prepared, dry_run, prepare};
pub use status::{
    ErrorEntry, Progress, Published, StaleEntry, Status, progress, record_final_local,
    scanned_totals, status, status_of,
};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::journal::rocks::RocksJournal;
use crate::journal::{JournalError, Meta, Records};
use crate::store::StoreSpec;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub old: StoreSpec,
    pub new: StoreSpec,
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

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An opened state dir holding the write lock.
pub struct Migration {
    pub dir: PathBuf,
    pub config: Config,
    pub journal: Records,
    _lock: File,
}

pub(crate) fn take_lock(state: &Path) -> Result<File, StateError> {
    let path = layout::lock_path(state);
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

/// The directory the view uses as NEW: a POSIX NEW itself, or an S3 NEW's staging tree.
pub fn new_dir(config: &Config, state: &Path) -> PathBuf {
    match &config.new {
        StoreSpec::Posix { path } => path.clone(),
        StoreSpec::S3 { .. } => layout::stage_dir(state),
    }
}

pub(crate) fn read_config(journal: &Records, state: &Path) -> Result<Config, StateError> {
    let raw = journal.meta(Meta::Config)?.ok_or_else(|| {
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
        if !layout::journal_dir(state).exists() {
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
        let journal = Records::new(Arc::new(RocksJournal::open(
            &layout::journal_dir(state),
            false,
        )?))?;
        let config = read_config(&journal, state)?;
        Ok(Migration {
            dir: state.to_path_buf(),
            config,
            journal,
            _lock: lock,
        })
    }
}
