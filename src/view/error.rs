//! The one errno policy of the view.
//!
//! Every failure inside `fs/` is an [`Error`]; [`Error::errno`] is the single place where a
//! failure becomes the errno an application sees, and [`Error::level`] decides how loudly it is
//! logged (ENOENT on lookup is normal traffic and must not flood the log).

use std::io;

/// A failure of a view operation, with enough context to log it usefully.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a store failed; carries the raw errno.
    #[error("{op}: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The journal could not record a transition. The operation did not happen.
    #[error("journal: {0}")]
    Journal(String),
    /// A plain POSIX refusal decided by the view itself (EEXIST, ENOTEMPTY, ...).
    #[error("{0}")]
    Refused(&'static str, i32),
    /// A lifecycle step refused, saying why (commit before executed, abort while mounted...).
    #[error("{0}")]
    Lifecycle(String),
    /// An entry changed through the view whose OLD origin was removed behind the view: which
    /// wins is the operator's call (`ferryfs resolve`).
    #[error("conflict: {0}")]
    Conflict(String),
}

/// What [`Error::lost`] says.
pub const LOST: &str = "copied into NEW earlier, now missing from NEW (lost or removed there \
     behind ferryfs's back); `ferryfs execute --state DIR --recopy-lost` copies it again";

/// Shorthand used throughout `fs/`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn refused(errno: i32, why: &'static str) -> Self {
        Error::Refused(why, errno)
    }

    /// An entry NEW took from OLD is missing from NEW now: NEW lost it behind ferryfs's back.
    pub fn lost() -> Self {
        Error::Store {
            op: LOST,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        }
    }

    /// The errno the application gets.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Store { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            // A journal failure means the change could not be made durable: EIO, never success.
            Error::Journal(_) => libc::EIO,
            Error::Refused(_, e) => *e,
            Error::Lifecycle(_) => libc::EBUSY,
            Error::Conflict(_) => libc::EEXIST,
        }
    }

    /// How loudly to log: expected refusals at debug, store faults at warn, journal at error.
    pub fn level(&self) -> tracing::Level {
        match self {
            Error::Journal(_) => tracing::Level::ERROR,
            Error::Lifecycle(_) => tracing::Level::WARN,
            Error::Store { .. } => match self.errno() {
                libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENODATA
                | libc::ERANGE
                | libc::ENAMETOOLONG
                | libc::EACCES
                | libc::EPERM
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::ELOOP
                | libc::EOPNOTSUPP
                | libc::EINVAL => tracing::Level::DEBUG,
                _ => tracing::Level::WARN,
            },
            Error::Refused(..) => tracing::Level::DEBUG,
            Error::Conflict(_) => tracing::Level::WARN,
        }
    }
}

/// Attach the syscall name to an `io::Error` (or a rustix errno) coming from a store.
pub trait Context<T> {
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Store { op, source })
    }
}

impl<T> Context<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::Store {
            op,
            source: io::Error::from_raw_os_error(e.raw_os_error()),
        })
    }
}

impl From<crate::store::copy::CopyError> for Error {
    fn from(e: crate::store::copy::CopyError) -> Error {
        Error::Store {
            op: e.op,
            source: e.source,
        }
    }
}

pub fn errno_err(op: &'static str, errno: i32) -> Error {
    Error::Store {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}
