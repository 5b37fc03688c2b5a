//! The state directory's layout: every name ferryfs keeps in it, in one place.
//!
//! ```text
//! STATE/
//!   journal/        RocksDB: the migration's record (src/journal)
//!   lock            flock held by the one process that may write the journal
//!   control.sock    the serving daemon's control socket (owner-only)
//!   ferryfs.log     a background daemon's log
//!   stage/          an S3 NEW's staging tree (what the view wrote, until published)
//!   manifest.jsonl  the per-file report commit writes (`ferryfs report` reads it after)
//! ```
//! Never holds credentials.

use std::path::{Path, PathBuf};

pub const JOURNAL: &str = "journal";
pub const LOCK: &str = "lock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const LOG: &str = "ferryfs.log";
pub const STAGE: &str = "stage";
pub const MANIFEST: &str = "manifest.jsonl";

pub fn journal_dir(state: &Path) -> PathBuf {
    state.join(JOURNAL)
}

pub fn lock_path(state: &Path) -> PathBuf {
    state.join(LOCK)
}

pub fn socket_path(state: &Path) -> PathBuf {
    state.join(CONTROL_SOCKET)
}

pub fn log_path(state: &Path) -> PathBuf {
    state.join(LOG)
}

/// The migration's final per-file report, written by commit.
pub fn manifest_path(state: &Path) -> PathBuf {
    state.join(MANIFEST)
}

/// The staging tree of an S3 NEW.
pub fn stage_dir(state: &Path) -> PathBuf {
    state.join(STAGE)
}

/// Is a daemon (or a CLI command) holding the migration in `state`? It holds the state dir's
/// lock while it lives.
pub fn is_held(state: &Path) -> bool {
    match std::fs::File::open(lock_path(state)) {
        Ok(f) => rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err(),
        Err(_) => false,
    }
}
