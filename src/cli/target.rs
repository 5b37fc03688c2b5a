//! Where a command's work runs: in the daemon that serves the state dir (asked over its
//! control socket), or, when none does, in this process on the migration opened offline.

use std::path::Path;
use std::sync::Arc;

use super::CliError;
use crate::control::{self, Request, Response};
use crate::copier::Copier;
use crate::state::{Migration, Opened};

/// The migration opened in this process, its view and a copier of it.
pub struct Offline {
    pub migration: Migration,
    pub opened: Opened,
    pub copier: Arc<Copier>,
}

pub enum Target {
    /// A daemon answered on the state dir's control socket.
    Daemon,
    Offline(Box<Offline>),
}

impl Target {
    /// The daemon if one serves `state`, else the migration opened here (dead views cleared
    /// first) with a copier of `opts`.
    pub fn find(state: &Path, opts: crate::copier::Options) -> Result<Target, CliError> {
        if control::daemon_serves(state)? {
            return Ok(Target::Daemon);
        }
        Ok(Target::Offline(Box::new(Offline::open(state, opts)?)))
    }
}

impl Offline {
    pub fn open(state: &Path, opts: crate::copier::Options) -> Result<Offline, CliError> {
        let migration = open_offline(state)?;
        let opened = crate::state::open_view(&migration).map_err(CliError::Daemon)?;
        let copier = opened.copier(&migration.journal, opts);
        Ok(Offline {
            migration,
            opened,
            copier,
        })
    }
}

/// Open the state dir in this process (no daemon serves it), clearing dead views first.
fn open_offline(state: &Path) -> Result<Migration, CliError> {
    let m = Migration::open(state)?;
    crate::daemon::clear_dead_views(&m).map_err(CliError::Daemon)?;
    Ok(m)
}

/// Ask the daemon serving `state`; `None` when none answers (it may have stopped since).
pub fn ask(state: &Path, req: &Request) -> Result<Option<Response>, CliError> {
    Ok(control::request(state, req)?)
}

/// The copier state of the daemon serving `state`, if one answers.
pub fn daemon_state(state: &Path) -> Option<crate::copier::CopierState> {
    control::request(state, &Request::Status)
        .ok()
        .flatten()?
        .reply()
        .ok()
}

/// Print a daemon's answer's message, or fail with its refusal.
pub fn print_answer(r: Response) -> Result<(), CliError> {
    println!("{}", r.accepted()?);
    Ok(())
}
