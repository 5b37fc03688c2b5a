//! `ferryfs prepare`: check both stores, scan OLD for its totals, make the state dir and the
//! journal that records the migration. Refuses a state dir that already holds one, and a NEW
//! that is not empty unless told otherwise.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Config, StateError, io_at, layout, read_config, take_lock};
use crate::copier::filter::Filter;
use crate::journal::rocks::RocksJournal;
use crate::journal::{Batch, Meta, Phase, Records, Totals};
use crate::store::StoreSpec;
use crate::store::probe::{self, Capabilities};

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
            crate::store::s3::tree::S3Tree::open(url)
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
    if let Some(names) = crate::store::probe::juicefs_internals(path) {
        return Err(StateError::Invalid(format!(
            "{what} store {} is the root of a JuiceFS mount that lists JuiceFS's internal              files ({names}): they are not data (reading .accesslog never ends), so mount the              volume with --hide-internal, or use a directory inside it",
            path.display()
        )));
    }
    Ok(())
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
    crate::store::copy::copy_xattrs(&ol, &nl)
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
    if !layout::journal_dir(state).exists() {
        return Ok(None);
    }
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(
        &layout::journal_dir(state),
    )?))?;
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
    filter: &Filter,
    chunk_size: u64,
) -> Result<(Totals, Capabilities), StateError> {
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
    // An S3 NEW: probed by requests under a scratch prefix (deleted again).
    let s3_caps = match &new {
        StoreSpec::S3 { url } => {
            let store = crate::store::s3::S3Store::connect(url)
                .map_err(|e| StateError::Invalid(format!("NEW store {new}: {e}")))?;
            probe::probe_s3_new(&store)
        }
        StoreSpec::Posix { .. } => Vec::new(),
    };
    let np = match &new {
        StoreSpec::Posix { path } => fs::canonicalize(path).map_err(io_at(path))?,
        // An S3 NEW: the view's NEW is the staging tree in the state dir (crate::copier::publish).
        StoreSpec::S3 { .. } => make_stage(state)?,
    };
    let old = match old {
        StoreSpec::S3 { mut url } => {
            // Directories of an S3 OLD have no times of their own: they show the time of
            // prepare, recorded here so that it never changes.
            url.defaults.dir_mtime = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            return prepare_from_s3(
                url,
                np,
                new,
                state,
                allow_nonempty_new,
                s3_caps,
                filter,
                chunk_size,
            );
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
    let totals = crate::copier::scan::scan_totals(&op, filter).map_err(io_at(&op))?;
    root_meta_from_old(&op, &np)?;
    let mut caps = Capabilities {
        old: probe_old_at(&op)?,
        new: probe_new_at(&np)?,
    };
    caps.new.extend(s3_caps);
    let ost = rustix::fs::stat(&op).map_err(|e| io_at(&op)(e.into()))?;
    let config = Config {
        old: StoreSpec::Posix { path: op.clone() },
        new: match new {
            StoreSpec::Posix { .. } => StoreSpec::Posix { path: np.clone() },
            s3 => s3,
        },
    };
    record_migration(
        &config,
        &totals,
        &caps,
        &ost,
        &np,
        state,
        new_was_empty,
        filter,
        chunk_size,
    )?;
    Ok((totals, caps))
}

/// [`probe::probe_old`] of the directory `op`.
fn probe_old_at(op: &Path) -> Result<Vec<probe::Capability>, StateError> {
    let o = crate::store::posix::PosixStore::open(op).map_err(io_at(op))?;
    Ok(probe::probe_old(o.root()))
}

/// [`probe::probe_new`] of the directory `np` (a scratch directory in it, removed again).
fn probe_new_at(np: &Path) -> Result<Vec<probe::Capability>, StateError> {
    let n = crate::store::posix::PosixStore::open(np).map_err(io_at(np))?;
    probe::probe_new(n.root()).map_err(|e| StateError::Io {
        path: np.join(probe::PROBE_DIR),
        source: e,
    })
}

/// `prepare` of a migration out of an S3 bucket (OLD) into the POSIX directory `np`.
#[allow(clippy::too_many_arguments)]
fn prepare_from_s3(
    url: crate::store::s3::S3Url,
    np: PathBuf,
    new: StoreSpec,
    state: &Path,
    allow_nonempty_new: bool,
    s3_caps: Vec<probe::Capability>,
    filter: &Filter,
    chunk_size: u64,
) -> Result<(Totals, Capabilities), StateError> {
    check_new_and_state(&np, state, allow_nonempty_new, &[&np])?;
    let _lock = take_lock(state)?;
    let new_was_empty = fs::read_dir(&np).map_err(io_at(&np))?.next().is_none();
    let spec = StoreSpec::S3 { url: url.clone() };
    let tree = crate::store::s3::tree::S3Tree::open(&url)
        .map_err(|e| StateError::Invalid(format!("OLD store {spec}: {e}")))?;
    let totals = crate::copier::scan::scan_totals_s3(&tree, filter)
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
        nl.utimens(&crate::store::copy::timestamps(&ost))
            .map_err(io_at(&np))?;
    }
    let config = Config {
        old: spec,
        new: match new {
            StoreSpec::Posix { .. } => StoreSpec::Posix { path: np.clone() },
            s3 => s3,
        },
    };
    let mut caps = Capabilities {
        old: Vec::new(),
        new: probe_new_at(&np)?,
    };
    caps.new.extend(s3_caps);
    record_migration(
        &config,
        &totals,
        &caps,
        &ost,
        &np,
        state,
        new_was_empty,
        filter,
        chunk_size,
    )?;
    Ok((totals, caps))
}

/// The staging tree of an S3 NEW, made (empty) in a state dir that holds no migration yet.
fn make_stage(state: &Path) -> Result<PathBuf, StateError> {
    if layout::journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "state dir {} already holds a migration",
            state.display()
        )));
    }
    let stage = layout::stage_dir(state);
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
    if layout::journal_dir(state).exists() {
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
#[allow(clippy::too_many_arguments)]
fn record_migration(
    config: &Config,
    totals: &Totals,
    caps: &Capabilities,
    ost: &rustix::fs::Stat,
    np: &Path,
    state: &Path,
    new_was_empty: bool,
    filter: &Filter,
    chunk_size: u64,
) -> Result<(), StateError> {
    let kv = RocksJournal::open(&layout::journal_dir(state), true)?;
    let journal = Records::new(Arc::new(kv))?;
    let mut b = Batch::new();
    crate::copier::filter::record(&mut b, filter);
    b.meta(Meta::ChunkSize, &chunk_size.to_le_bytes());
    b.meta(
        Meta::Config,
        &serde_json::to_vec(config).expect("config serializes"),
    )
    .meta(
        Meta::Totals,
        &serde_json::to_vec(totals).expect("totals serialize"),
    )
    .meta(
        Meta::Capabilities,
        &serde_json::to_vec(caps).expect("capabilities serialize"),
    )
    .meta(Meta::Phase, Phase::Prepared.as_str().as_bytes())
    .meta(Meta::NewWasEmpty, if new_was_empty { b"1" } else { b"0" });
    let n = fs::File::open(np).map_err(io_at(np))?;
    let nst = rustix::fs::fstat(&n).map_err(|e| io_at(np)(e.into()))?;
    b.copy(
        nst.st_dev,
        nst.st_ino,
        &crate::journal::CopyRecord {
            origin: Vec::new(),
            fp: crate::journal::Fingerprint::of(ost),
            // NEW's root by its handle where NEW's handles last (by st_dev/st_ino otherwise).
            handle: if caps.new_handles() {
                crate::store::posix::file_handle(std::os::fd::AsFd::as_fd(&n)).map_err(io_at(np))?
            } else {
                Vec::new()
            },
            is_dir: true,
        },
    );
    journal.commit(b, true)?;
    Ok(())
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
}

/// What `prepare --dry-run` found: what would move and what NEW could not hold. Nothing was
/// written anywhere to find it.
#[derive(Debug)]
pub struct DryRun {
    /// OLD's entries as the filter leaves them (excluded counts and names NEW could not
    /// hold included).
    pub totals: Totals,
    /// NEW's longest name, and for an S3 NEW its longest key below the prefix.
    pub limits: crate::copier::scan::NameLimits,
    /// Free space in a POSIX NEW (bytes an unprivileged writer may use).
    pub new_free: Option<u64>,
    /// NEW is an S3 bucket: hard links become objects of their own, and special files are
    /// not held.
    pub new_is_s3: bool,
    /// The state dir already holds a migration (prepare would refuse).
    pub state_taken: bool,
}

/// `prepare --dry-run`: OLD walked with the filter, NEW and the state dir only looked at.
pub fn dry_run(
    old: &StoreSpec,
    new: &StoreSpec,
    state: &Path,
    filter: &Filter,
) -> Result<DryRun, StateError> {
    use crate::copier::scan::NameLimits;
    check_dir("OLD", old)?;
    let (limits, new_free, new_is_s3) = match new {
        StoreSpec::Posix { path } => {
            let md = fs::metadata(path)
                .map_err(|e| StateError::Invalid(format!("NEW store {}: {e}", path.display())))?;
            if !md.is_dir() {
                return Err(StateError::Invalid(format!(
                    "NEW store {} is not a directory",
                    path.display()
                )));
            }
            let vfs = rustix::fs::statvfs(path).map_err(|e| io_at(path)(e.into()))?;
            (
                NameLimits {
                    name: vfs.f_namemax as usize,
                    path: usize::MAX,
                },
                Some(vfs.f_bavail.saturating_mul(vfs.f_frsize)),
                false,
            )
        }
        StoreSpec::S3 { url } => {
            // S3 keys hold at most 1,024 bytes, the prefix included.
            let room = 1024usize.saturating_sub(url.prefix.len());
            (
                NameLimits {
                    name: room,
                    path: room,
                },
                None,
                true,
            )
        }
    };
    let totals = match old {
        StoreSpec::Posix { path } => {
            crate::copier::scan::scan_totals_within(path, filter, limits).map_err(io_at(path))?
        }
        StoreSpec::S3 { url } => {
            let tree = crate::store::s3::tree::S3Tree::open(url)
                .map_err(|e| StateError::Invalid(format!("OLD store {old}: {e}")))?;
            crate::copier::scan::scan_totals_s3(&tree, filter)
                .map_err(|e| StateError::Invalid(format!("listing OLD store {old}: {e}")))?
        }
    };
    Ok(DryRun {
        totals,
        limits,
        new_free,
        new_is_s3,
        state_taken: layout::journal_dir(state).exists(),
    })
}
