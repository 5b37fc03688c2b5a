//! `abort`: OLD becomes exactly what the view shows now, every change made through the view
//! included; then what ferryfs put into NEW goes. Into a POSIX OLD here, into an S3 OLD in
//! `abort_s3`.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::copier::publish::Publisher;
use crate::journal::{Batch, Meta, Phase, Records};
use crate::state;
use crate::store::posix::{self, Loc};
use crate::store::s3::tree::S3Tree;
use crate::view::error::{Context, Error, Result};
use crate::view::inode::Inode;
use crate::view::{Kind, View};

use super::abort_s3::{STEP_S3_DELETING, STEP_S3_PLACING, abort_s3};
use super::{refusal, syncfs};

/// Names ferryfs uses in OLD's root while aborting; removed when abort finishes.
pub(super) const STAGING: &str = ".ferryfs-abort";
const TRASH: &str = ".ferryfs-abort-trash";

/// Where an interrupted abort got to (journal meta `abort_step`).
const STEP_STAGING: &str = "staging";
const STEP_EMPTYING: &str = "emptying";
const STEP_FILLING: &str = "filling";

/// `abort`: OLD becomes exactly what the view shows now, then what ferryfs put into NEW goes
/// (unless `keep_new`). Needs the view unmounted (nothing may change while it runs).
///
/// 1. staging: the whole view is built in `OLD/.ferryfs-abort`: OLD-only files are hard-linked
///    (no data copied, hard links kept), NEW's files are copied, directories get the view's
///    metadata. OLD itself is untouched; a crash here restarts the step from scratch.
/// 2. emptying: OLD's own entries move into `OLD/.ferryfs-abort-trash`.
/// 3. filling: the staged entries move into OLD's root; the trash and staging dirs go.
///
/// Steps 2 and 3 are recorded before they start and are idempotent, so a crash anywhere is
/// finished by running abort again.
pub fn abort(
    view: &View,
    journal: &Records,
    old: OldTarget<'_>,
    new_root: BorrowedFd<'_>,
    keep_new: bool,
    publisher: Option<&Publisher>,
) -> Result<String> {
    match journal.phase()? {
        Phase::Committed => {
            return Err(refusal(
                "the migration is committed: NEW is the dataset now; abort is no longer possible"
                    .into(),
            ));
        }
        Phase::Aborted => return Ok("already aborted".into()),
        _ => {}
    }
    let old_root = match old {
        OldTarget::Posix(fd) => fd,
        OldTarget::S3(tree) => {
            return abort_s3(view, journal, tree, new_root, keep_new, publisher);
        }
    };
    let step = journal
        .meta(Meta::AbortStep)?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    let mut stats = AbortStats::default();
    // An earlier run took the abort past its staging: this one finishes it.
    let resumed = step.clone().filter(|s| s != STEP_STAGING);
    if step.is_none() {
        state::record_final_local(journal, new_root)?;
    }
    if step.is_none() || step.as_deref() == Some(STEP_STAGING) {
        set_step(journal, STEP_STAGING)?;
        remove_tree_at(old_root, OsStr::new(STAGING), Path::new("OLD"))?;
        rustix::fs::mkdirat(old_root, STAGING, Mode::from_raw_mode(0o700))
            .ctx("mkdir the abort staging dir in OLD")?;
        let staging = posix::open_child(old_root, OsStr::new(STAGING)).ctx("open staging")?;
        let mut links = std::collections::HashMap::new();
        stage_dir(view, &view.root(), &staging, &mut links, &mut stats)?;
        syncfs(old_root).ctx("syncfs OLD")?;
        set_step(journal, STEP_EMPTYING)?;
    }
    let step = journal
        .meta(Meta::AbortStep)?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    if step.as_deref() == Some(STEP_EMPTYING) {
        match rustix::fs::mkdirat(old_root, TRASH, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir the abort trash dir in OLD"),
        }
        let trash = posix::open_child(old_root, OsStr::new(TRASH)).ctx("open trash")?;
        for e in posix::read_dir_names(old_root).ctx("read OLD root")? {
            if e.name == STAGING.as_bytes() || e.name == TRASH.as_bytes() {
                continue;
            }
            let name = OsStr::from_bytes(&e.name);
            rustix::fs::renameat(old_root, name, &trash, name)
                .ctx("move OLD entry to trash")
                .map_err(|e| named(e, Path::new("OLD").join(name).display()))?;
        }
        syncfs(old_root).ctx("syncfs OLD")?;
        set_step(journal, STEP_FILLING)?;
    }
    // filling
    if let Ok(staging) = posix::open_child(old_root, OsStr::new(STAGING)) {
        for e in posix::read_dir_names(staging.as_fd()).ctx("read staging")? {
            let name = OsStr::from_bytes(&e.name);
            rustix::fs::renameat(&staging, name, old_root, name)
                .ctx("move staged entry into OLD")
                .map_err(|e| named(e, Path::new("OLD").join(name).display()))?;
        }
        // The root itself: the view's root metadata.
        copy_meta(&Loc::Fd(Arc::new(staging)), &dup_loc(old_root)?)?;
    }
    remove_tree_at(old_root, OsStr::new(TRASH), Path::new("OLD"))?;
    let _ = rustix::fs::unlinkat(old_root, STAGING, AtFlags::REMOVEDIR);
    syncfs(old_root).ctx("syncfs OLD")?;
    let new_note = end_abort(journal, new_root, keep_new, publisher)?;
    Ok(match resumed {
        Some(step) => format!(
            "aborted: OLD now holds the view as it was (an earlier run staged it and was \
             stopped at its {step} step; this run finished it); {new_note}"
        ),
        None => format!(
            "aborted: OLD now holds the view as it was ({} dirs, {} files linked from OLD \
             ({} of them with metadata changed through the view), {} files partly copied \
             that took back only their changed chunks ({} bytes written into OLD), {} files \
             copied back from NEW); {new_note}",
            stats.dirs, stats.linked, stats.meta, stats.partial, stats.partial_bytes, stats.copied
        ),
    })
}

/// OLD, as abort writes the view back into it.
pub enum OldTarget<'a> {
    Posix(BorrowedFd<'a>),
    S3(&'a Arc<S3Tree>),
}

/// Whether an abort at `step` has begun to change OLD's own entries (past its staging, not
/// done): a view over OLD cannot be served then, only the abort finished.
pub fn abort_rewrites_old(step: &[u8]) -> bool {
    [
        STEP_EMPTYING,
        STEP_FILLING,
        STEP_S3_PLACING,
        STEP_S3_DELETING,
    ]
    .iter()
    .any(|s| s.as_bytes() == step)
}

/// The last step of every abort, once OLD holds the view: NEW emptied (unless kept, or it held
/// data before prepare), the phase `aborted`, the view's records dropped. Says what became of
/// NEW.
pub(super) fn end_abort(
    journal: &Records,
    new_root: BorrowedFd<'_>,
    keep_new: bool,
    publisher: Option<&Publisher>,
) -> Result<String> {
    let mut bucket_note = String::new();
    if let Some(p) = publisher {
        // An S3 NEW: no more uploads; what this migration put into the bucket goes (unless
        // kept). Objects other clients wrote there are left alone.
        p.stop();
        bucket_note = if keep_new {
            format!("; the NEW bucket ({}) kept as it is", p.store.url)
        } else {
            let n = p.remove_all().ctx("empty the NEW bucket")?;
            format!(
                "; {n} objects removed from the NEW bucket ({})",
                p.store.url
            )
        };
    }
    let new_note = if keep_new || !new_was_empty(journal)? {
        "NEW kept as it is".to_string()
    } else {
        for e in posix::read_dir_names(new_root).ctx("read NEW root")? {
            remove_tree_at(new_root, OsStr::from_bytes(&e.name), Path::new("NEW"))?;
        }
        "NEW emptied".to_string()
    };
    journal.set_phase(Phase::Aborted)?;
    journal.clear_view_records()?;
    let mut b = Batch::new();
    b.meta(Meta::AbortStep, b"done");
    journal.commit(b, true)?;
    Ok(format!("{new_note}{bucket_note}"))
}

pub(super) fn set_step(journal: &Records, step: &str) -> Result<()> {
    let mut b = Batch::new();
    b.meta(Meta::AbortStep, step.as_bytes());
    journal.commit(b, true)?;
    Ok(())
}

fn new_was_empty(journal: &Records) -> Result<bool> {
    Ok(journal.meta(Meta::NewWasEmpty)?.is_none_or(|v| v == b"1"))
}

#[derive(Default)]
pub(super) struct AbortStats {
    pub(super) dirs: u64,
    pub(super) linked: u64,
    pub(super) copied: u64,
    /// Files linked from OLD that took metadata changed through the view.
    pub(super) meta: u64,
    /// Files partly copied into NEW whose changed chunks were written into OLD's file.
    pub(super) partial: u64,
    /// The bytes written into them.
    pub(super) partial_bytes: u64,
}

fn dup_loc(fd: BorrowedFd<'_>) -> Result<Loc> {
    Ok(Loc::Fd(Arc::new(fd.try_clone_to_owned().ctx("dup")?)))
}

/// Owner, mode, xattrs and times from `src` onto `dst` (times last: the others change ctime
/// only, but xattrs on some file systems touch mtime).
fn copy_meta(src: &Loc, dst: &Loc) -> Result<()> {
    let st = src.stat().ctx("stat source")?;
    dst.chown(Some(st.st_uid), Some(st.st_gid)).ctx("chown")?;
    if Kind::from_mode(st.st_mode) != Kind::Symlink {
        dst.chmod(st.st_mode).ctx("chmod")?;
    }
    // After the chown, which drops a file's capabilities.
    crate::store::copy::copy_xattrs(src, dst)?;
    dst.utimens(&crate::store::copy::timestamps(&st))
        .ctx("utimens")
}

/// Build the view's directory `dir` inside `out` (an empty directory in OLD).
fn stage_dir(
    view: &View,
    dir: &Arc<Inode>,
    out: &OwnedFd,
    links: &mut std::collections::HashMap<(u64, u64), (Arc<OwnedFd>, OsString)>,
    stats: &mut AbortStats,
) -> Result<()> {
    let out = Arc::new(out.try_clone().ctx("dup")?);
    let at_root = dir.ino == crate::view::inode::ROOT_INO;
    for (name, _) in view.children(dir)? {
        // ferryfs's own dirs in OLD's root (this abort's, or an interrupted one's).
        if at_root && (name == STAGING || name == TRASH) {
            continue;
        }
        let Some(inode) = view.child(dir, &name)? else {
            continue;
        };
        let res = stage_entry(view, &inode, &out, &name, links, stats);
        view.release_lookup(&inode);
        res.map_err(|e| {
            let path = crate::view::display_path(&view.child_path(dir, &name));
            named(e, format_args!("staging {path} of the view into OLD"))
        })?;
    }
    if let Some(src) = view.backing(dir) {
        copy_meta(&src, &Loc::Fd(out))?;
    }
    Ok(())
}

fn stage_entry(
    view: &View,
    inode: &Arc<Inode>,
    out: &Arc<OwnedFd>,
    name: &OsStr,
    links: &mut std::collections::HashMap<(u64, u64), (Arc<OwnedFd>, OsString)>,
    stats: &mut AbortStats,
) -> Result<()> {
    crate::metrics::METRICS.abort_wrote();
    if inode.kind == Kind::Dir {
        rustix::fs::mkdirat(out.as_fd(), name, Mode::from_raw_mode(0o700)).ctx("mkdir staged")?;
        let sub = posix::open_child(out.as_fd(), name).ctx("open staged dir")?;
        stats.dirs += 1;
        return stage_dir(view, inode, &sub, links, stats);
    }
    // A file partly copied into NEW: OLD's own file takes only what the view changed.
    if inode.kind == Kind::File
        && let Some(bytes) = view.abort_partial(inode, out.as_fd(), name)?
    {
        let dst = Loc::At(out.clone(), name.to_owned());
        if let Some(src) = view.backing(inode) {
            copy_meta(&src, &dst)?;
        }
        stats.partial += 1;
        stats.partial_bytes += bytes;
        return Ok(());
    }
    // Data still in OLD, or a copy NEW took that OLD still matches: OLD's own entry is linked
    // (no data moves; OLD's hard links stay links).
    if let Some(old) = view.old_source(inode)? {
        match old.link_to(out.as_fd(), name) {
            Ok(()) => {
                stats.linked += 1;
                // Metadata changed through the view while the data stayed OLD's: written
                // into OLD's file (no data moves).
                if let Some(m) = view.meta_change_of(inode) {
                    crate::view::apply_meta_change(&Loc::At(out.clone(), name.to_owned()), &m)?;
                    stats.meta += 1;
                }
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP)
                ) => {}
            Err(e) => return Err(e).ctx("link OLD entry into staging"),
        }
    }
    let src = view
        .backing(inode)
        .ok_or_else(|| crate::view::error::errno_err("entry has no backing", libc::ENOENT))?;
    let st = src.stat().ctx("stat view entry")?;
    let key = (st.st_dev, st.st_ino);
    if st.st_nlink > 1
        && let Some((d, n)) = links.get(&key)
    {
        let first = Loc::At(d.clone(), n.clone());
        first
            .link_to(out.as_fd(), name)
            .ctx("link staged hard link")?;
        return Ok(());
    }
    let dst = Loc::At(out.clone(), name.to_owned());
    match Kind::from_mode(st.st_mode) {
        Kind::File => {
            let from = src.open(OFlags::RDONLY).ctx("open view file")?;
            let to = std::fs::File::from(
                rustix::fs::openat(
                    out.as_fd(),
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .ctx("create staged file")?,
            );
            // An S3 NEW's evicted file: its bytes from the bucket (the staged file has none).
            if !view.copy_stub_into(inode, &to)? {
                crate::store::copy::copy_data(&from, &to, st.st_size as u64, &mut |_| true)?;
            }
            rustix::fs::fsync(&to).ctx("fsync staged file")?;
        }
        Kind::Symlink => {
            let target = src.readlink().ctx("readlink")?;
            rustix::fs::symlinkat(target.as_slice(), out.as_fd(), name).ctx("symlink staged")?;
        }
        _ => {
            rustix::fs::mknodat(
                out.as_fd(),
                name,
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                Mode::from_raw_mode(st.st_mode & 0o7777),
                st.st_rdev,
            )
            .ctx("mknod staged")?;
        }
    }
    copy_meta(&src, &dst)?;
    if let Some(m) = view.meta_change_of(inode) {
        crate::view::apply_meta_change(&dst, &m)?;
        stats.meta += 1;
    }
    stats.copied += 1;
    if st.st_nlink > 1 {
        links.insert(key, (out.clone(), name.to_owned()));
    }
    Ok(())
}

/// Remove `name` in `dir` and everything below it (nothing if absent). Never follows a symlink.
/// Remove `name` in `dir` and everything below it (nothing if absent). Never follows a symlink.
/// `at`: where `dir` is, for the error's message (`NEW`, `OLD/.ferryfs-abort-trash/a`).
fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, at: &Path) -> Result<()> {
    let here = at.join(name);
    let named_here = |e: Error| named(e, here.display());
    let st = match posix::stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e).ctx("stat for removal").map_err(named_here),
    };
    if Kind::from_mode(st.st_mode) == Kind::Dir {
        let sub = posix::open_child(dir, name)
            .ctx("open dir for removal")
            .map_err(named_here)?;
        for e in posix::read_dir_names(sub.as_fd())
            .ctx("read dir for removal")
            .map_err(named_here)?
        {
            remove_tree_at(sub.as_fd(), OsStr::from_bytes(&e.name), &here)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
            .ctx("rmdir")
            .map_err(named_here)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .ctx("unlink")
            .map_err(named_here)?;
    }
    Ok(())
}

/// An abort's failure, naming where it happened (a path in OLD or NEW, an S3 key). An error
/// named deeper down (or a refusal, which says what it is about) is kept as it is.
pub(super) fn named(e: Error, what: impl std::fmt::Display) -> Error {
    match e {
        Error::Lifecycle(_) => e,
        other => Error::Lifecycle(format!("{what}: {other}")),
    }
}
