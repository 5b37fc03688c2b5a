//! Opening a prepared migration's view in this process, with the stores it serves: for the
//! daemon, and for the CLI's commands when no daemon serves the state dir.

use std::path::Path;
use std::sync::Arc;

use super::Migration;
use crate::copier::Copier;
use crate::copier::publish::{self, Publisher};
use crate::journal::{Phase, Records};
use crate::store::posix::PosixStore;
use crate::store::s3::tree::S3Tree;
use crate::store::{OldStore, StoreSpec};
use crate::view::View;

/// A migration's view opened in this process, with the stores it serves.
pub struct Opened {
    pub view: Arc<View>,
    pub phase: Phase,
    /// OLD's root (for abort) when OLD is a POSIX store; `None` once committed (OLD may be
    /// gone).
    pub old: Option<PosixStore>,
    /// OLD when it is an S3 store (for abort); `None` once committed.
    pub old_s3: Option<Arc<S3Tree>>,
    pub new: PosixStore,
    /// An S3 NEW's publisher (`None` for a POSIX NEW, and once aborted).
    pub publisher: Option<Arc<Publisher>>,
}

impl Opened {
    /// Whether OLD is still part of the migration (not committed).
    pub fn has_old(&self) -> bool {
        self.old.is_some() || self.old_s3.is_some()
    }

    /// A copier of this view (with the publisher of an S3 NEW).
    pub fn copier(&self, journal: &Records, opts: crate::copier::Options) -> Arc<Copier> {
        let c = Copier::new(self.view.clone(), journal.clone(), opts);
        c.set_publisher(self.publisher.clone());
        c
    }
}

/// Open the view of a migration (the daemon's, or the CLI's when no daemon runs). After
/// commit the view is NEW alone; after abort, OLD alone.
pub fn open_view(m: &Migration) -> Result<Opened, String> {
    open_view_with(m, |what, p| {
        PosixStore::open(p).map_err(|e| format!("{what} store {}: {e}", p.display()))
    })
}

/// [`open_view`] with the POSIX stores' roots opened by `open` ("OLD" or "NEW", and its path):
/// a takeover opens them from the fds the previous daemon handed over.
pub fn open_view_with(
    m: &Migration,
    open: impl Fn(&str, &Path) -> Result<PosixStore, String>,
) -> Result<Opened, String> {
    let new_dir = m.new_dir();
    let new_path = new_dir.as_path();
    let phase = m.journal.phase().map_err(|e| e.to_string())?;
    // Entries are created on behalf of callers with the mode the kernel already masked with
    // the caller's umask; the daemon's own umask must not mask it a second time.
    rustix::process::umask(rustix::fs::Mode::empty());
    // An fd per directory the kernel knows, and two per copy waiting in a copier batch.
    crate::view::raise_nofile_limit();
    let s3 = match (&m.config.old, phase) {
        (StoreSpec::S3 { .. }, Phase::Aborted) => {
            return Err(format!(
                "the migration was aborted: the dataset is in OLD ({}) again; there is no view to serve",
                m.config.old
            ));
        }
        (StoreSpec::S3 { .. }, Phase::Committed) => None,
        (StoreSpec::S3 { url }, _) => {
            Some(S3Tree::open(url).map_err(|e| format!("OLD store {}: {e}", m.config.old))?)
        }
        (StoreSpec::Posix { .. }, _) => None,
    };
    let old_path = m.config.old.posix_path();
    let old_posix = |what: &str| -> Result<PosixStore, String> {
        open(what, old_path.ok_or("internal: OLD is not a POSIX store")?)
    };
    let (vold, vnew, old, new) = match phase {
        Phase::Committed => (
            OldStore::Posix(open("NEW", new_path)?),
            open("NEW", new_path)?,
            None,
            open("NEW", new_path)?,
        ),
        Phase::Aborted => (
            OldStore::Posix(old_posix("OLD")?),
            old_posix("OLD")?,
            Some(old_posix("OLD")?),
            open("NEW", new_path)?,
        ),
        _ => match &s3 {
            Some(t) => (
                OldStore::S3(t.clone()),
                open("NEW", new_path)?,
                None,
                open("NEW", new_path)?,
            ),
            None => (
                OldStore::Posix(old_posix("OLD")?),
                open("NEW", new_path)?,
                Some(old_posix("OLD")?),
                open("NEW", new_path)?,
            ),
        },
    };
    let view = Arc::new(
        View::new(vold, vnew, m.journal.clone()).map_err(|e| format!("opening the view: {e}"))?,
    );
    if matches!(phase, Phase::Committed | Phase::Aborted) {
        view.set_single();
    }
    if m.new_s3().is_some() {
        view.set_s3_new();
    }
    let publisher = match (m.new_s3(), phase) {
        (Some(url), p) if p != Phase::Aborted => {
            let p = Publisher::connect(
                url,
                new_dir.clone(),
                m.journal.clone(),
                publish::DEFAULT_WORKERS,
            )
            .map_err(|e| format!("NEW store {}: {e}", m.config.new))?;
            // (Evicted files are read from the bucket, so the view needs it, committed or
            // not.)
            let p = p.with_view(view.clone());
            Some(Arc::new(match &s3 {
                Some(t) => p.with_old(t.store.clone()),
                None => p,
            }))
        }
        _ => None,
    };
    Ok(Opened {
        view,
        phase,
        old,
        old_s3: s3,
        new,
        publisher,
    })
}
