//! What a command can fail with. Each variant prints as the one line `ferryfs: ...` that the
//! command ends with (exit status 1).

use crate::control::ControlError;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag's value or a store argument that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The state dir or its journal.
    #[error(transparent)]
    State(#[from] StateError),
    /// Talking to the daemon that serves the state dir (or its refusal).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The view, the copier or a store, working in this process.
    #[error(transparent)]
    View(#[from] crate::view::error::Error),
    /// Serving, mounting, unmounting or opening the migration's stores.
    #[error("{0}")]
    Daemon(String),
    /// The command ran and its answer is no: not executed, verification failed, nothing to
    /// control.
    #[error("{0}")]
    Failed(String),
    /// A worker whose token the coordinator refused (exit status 3: not worth a retry).
    #[error("{0}")]
    Refused(String),
}

impl From<crate::journal::JournalError> for CliError {
    fn from(e: crate::journal::JournalError) -> CliError {
        CliError::State(StateError::Journal(e))
    }
}
