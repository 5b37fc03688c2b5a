//! The end of a migration: verify, commit, abort (DESIGN "Lifecycle").
//!
//! Each works on an open view and its copier, so the same code runs inside the daemon (asked
//! over the control socket) and in the CLI when no daemon serves the state dir.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::copier::{CheckReport, Copier};
use crate::error::{Context, Error, Result};
use crate::fs::inode::Inode;
use crate::fs::{Compare, Kind, View};
use crate::journal::{Batch, CopyError, Records};
use crate::publish::Publisher;
use crate::state::{self, Phase};
use crate::store::posix::{self, Loc};
use crate::store::s3::PosixMeta;
use crate::store::s3tree::S3Tree;

/// `verify`: every entry NEW took from OLD still equals OLD (metadata always, every byte with
/// `checksum`). Entries still only in OLD are listed as pending, not as mismatches.
pub fn verify(copier: &Copier, checksum: bool) -> Result<CheckReport> {
    let mut r = copier.check(Some(if checksum {
        Compare::Checksum
    } else {
        Compare::Meta
    }))?;
    if let Some(p) = copier.publisher() {
        // An S3 NEW: the bucket must hold the staging tree, as recorded and as listed. What
        // is still on its way is uploaded first (verify waits for it, as commit does).
        p.settle(5).ctx("upload into NEW")?;
        let plan = p.plan().ctx("compare NEW with the bucket")?;
        r.mismatches.extend(plan);
        let (problems, _) = p.check_bucket().ctx("list NEW")?;
        r.mismatches.extend(problems);
        r.mismatches.sort();
    }
    Ok(r)
}

/// `commit`: refuses unless executed and a final pass over OLD is clean; then NEW is made
/// durable, the journal forgets OLD, and the view serves NEW only.
pub fn commit(copier: &Copier, journal: &Records, new_root: BorrowedFd<'_>) -> Result<String> {
    let phase = state::phase(journal)?;
    match phase {
        Phase::Executed => {}
        Phase::Committed => return Ok("already committed".into()),
        p => {
            return Err(refusal(format!(
                "the migration is {p}, not executed: run `ferryfs execute --state DIR --wait` \
                 and commit once status shows phase executed"
            )));
        }
    }
    let report = copier.check(Some(Compare::Meta))?;
    if !report.clean() {
        // Stale copies go back to the copier, and status lists them until copied again.
        if !report.stale.is_empty() || !report.pending.is_empty() {
            let mut b = Batch::new();
            for s in &report.stale {
                let path = s.split(": ").next().unwrap_or(s);
                b.stale(
                    path.as_bytes(),
                    &crate::journal::StaleRecord {
                        found: now_secs(),
                        copied_again: false,
                    },
                );
                b.error(
                    path.as_bytes(),
                    &CopyError {
                        error: "changed in OLD since it was copied; to be copied again".into(),
                        errno: libc::ESTALE,
                        attempts: 0,
                        at: now_secs(),
                    },
                );
            }
            journal.commit(b, true)?;
            state::set_phase(journal, Phase::Executing)?;
            copier.kick();
        }
        return Err(refusal(format!(
            "commit refused: the final pass over OLD is not clean ({} pending, {} changed in OLD \
             since copied, {} mismatches, {} errors){}",
            report.pending.len(),
            report.stale.len(),
            report.mismatches.len(),
            report.errors.len(),
            first_lines(&report)
        )));
    }
    // Every copy's data and name on stable storage before OLD stops being the fallback.
    copier.view().clean_work_dir()?;
    syncfs(new_root).ctx("syncfs NEW")?;
    if copier.view().has_work_dir() {
        return Err(refusal(
            "commit refused: NEW still holds ferryfs's work dir (hard-link copies pending)".into(),
        ));
    }
    let bucket = match copier.publisher() {
        Some(p) => Some(settle_bucket(p)?),
        None => None,
    };
    state::record_final_local(journal, new_root)?;
    state::set_phase(journal, Phase::Committed)?;
    journal.clear_view_records()?;
    copier.view().set_single();
    Ok(match bucket {
        None => format!(
            "committed: {} entries checked against OLD; the view now serves NEW only, and NEW \
             is a plain tree usable without ferryfs",
            report.checked
        ),
        Some(objects) => format!(
            "committed: {} entries checked against OLD; the NEW bucket ({}) holds the view's {} \
             objects, checked by listing; the view now serves NEW only, and the bucket is usable \
             without ferryfs",
            report.checked,
            copier
                .publisher()
                .map(|p| p.store.url.to_string())
                .unwrap_or_default(),
            objects
        ),
    })
}

/// Commit's last check of an S3 NEW: publish passes until one finds nothing to do, then the
/// bucket, listed, holds every recorded object at its size. Refuses otherwise, saying why.
fn settle_bucket(p: &Publisher) -> Result<u64> {
    let r = p.settle(5).ctx("upload into NEW")?;
    if r.interrupted {
        return Err(refusal(
            "commit refused: uploads into the NEW bucket are stopped (an abort or a handover \
             under way); commit again once it is over"
                .into(),
        ));
    }
    if !r.clean() {
        let shown: Vec<String> = r
            .errors
            .iter()
            .take(10)
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        return Err(refusal(format!(
            "commit refused: the NEW bucket does not hold the view yet ({} uploads failed, {} \
             changed while uploading){}{}",
            r.errors.len(),
            r.changed,
            if shown.is_empty() { "" } else { ": " },
            shown.join("; ")
        )));
    }
    let (problems, _foreign) = p.check_bucket().ctx("list NEW")?;
    if !problems.is_empty() {
        return Err(refusal(format!(
            "commit refused: the NEW bucket does not hold what was uploaded ({} problems): {}",
            problems.len(),
            problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(r.objects)
}

/// syncfs through a real fd (store roots are O_PATH, which syncfs refuses).
fn syncfs(root: BorrowedFd<'_>) -> std::io::Result<()> {
    let d = posix::reopen(root, OFlags::RDONLY | OFlags::DIRECTORY)?;
    rustix::fs::syncfs(&d).map_err(std::io::Error::from)
}

fn refusal(msg: String) -> Error {
    Error::Lifecycle(msg)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn first_lines(r: &CheckReport) -> String {
    let mut out = String::new();
    for l in r
        .stale
        .iter()
        .chain(&r.mismatches)
        .chain(&r.errors)
        .chain(r.pending.iter())
        .take(10)
    {
        out.push_str("\n  ");
        out.push_str(l);
    }
    out
}

/// Names ferryfs uses in OLD's root while aborting; removed when abort finishes.
const STAGING: &str = ".ferryfs-abort";
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
    match state::phase(journal)? {
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
        .meta("abort_step")?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    let mut stats = AbortStats::default();
    if step.is_none() {
        state::record_final_local(journal, new_root)?;
    }
    if step.is_none() || step.as_deref() == Some(STEP_STAGING) {
        set_step(journal, STEP_STAGING)?;
        remove_tree_at(old_root, OsStr::new(STAGING))?;
        rustix::fs::mkdirat(old_root, STAGING, Mode::from_raw_mode(0o700))
            .ctx("mkdir the abort staging dir in OLD")?;
        let staging = posix::open_child(old_root, OsStr::new(STAGING)).ctx("open staging")?;
        let mut links = std::collections::HashMap::new();
        stage_dir(view, &view.root(), &staging, &mut links, &mut stats)?;
        syncfs(old_root).ctx("syncfs OLD")?;
        set_step(journal, STEP_EMPTYING)?;
    }
    let step = journal
        .meta("abort_step")?
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
            rustix::fs::renameat(old_root, name, &trash, name).ctx("move OLD entry to trash")?;
        }
        syncfs(old_root).ctx("syncfs OLD")?;
        set_step(journal, STEP_FILLING)?;
    }
    // filling
    if let Ok(staging) = posix::open_child(old_root, OsStr::new(STAGING)) {
        for e in posix::read_dir_names(staging.as_fd()).ctx("read staging")? {
            let name = OsStr::from_bytes(&e.name);
            rustix::fs::renameat(&staging, name, old_root, name)
                .ctx("move staged entry into OLD")?;
        }
        // The root itself: the view's root metadata.
        copy_meta(&Loc::Fd(Arc::new(staging)), &dup_loc(old_root)?)?;
    }
    remove_tree_at(old_root, OsStr::new(TRASH))?;
    let _ = rustix::fs::unlinkat(old_root, STAGING, AtFlags::REMOVEDIR);
    syncfs(old_root).ctx("syncfs OLD")?;
    let new_note = end_abort(journal, new_root, keep_new, publisher)?;
    Ok(format!(
        "aborted: OLD now holds the view as it was ({} dirs, {} files linked from OLD, {} \
         files copied back from NEW); {new_note}",
        stats.dirs, stats.linked, stats.copied
    ))
}

/// Entries of the view an abort has written back into OLD so far (its progress line).
pub static ABORT_WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_written() {
    ABORT_WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// OLD, as abort writes the view back into it.
pub enum OldTarget<'a> {
    Posix(BorrowedFd<'a>),
    S3(&'a Arc<S3Tree>),
}

/// Longest S3 key, in bytes.
const S3_KEY_MAX: usize = 1024;

/// `abort` into an S3 OLD: the bucket (below its prefix) becomes exactly what the view shows.
///
/// 1. Every name is checked first: an S3 key is UTF-8 and at most 1,024 bytes. A view holding
///    another name is refused, saying which, before anything is written.
/// 2. Staging: the view is walked once and what it takes is planned. A file whose bytes are
///    still OLD's object at the same key stays as it is. A file that is OLD's object under
///    another key (renamed through the view, not copied yet) is copied by the server, exactly
///    the version the view shows, to `.ferryfs-abort/<its path>` first: the writes that follow
///    may replace the key it comes from (`mv log log.1; touch log`, `mv data data.old; mkdir
///    data`). Every other file and symlink is planned from NEW, and an empty directory as a
///    `name/` marker. The plan is recorded in the journal, with OLD's objects hidden behind a
///    directory of their name (`a` beside `a/x`), which the view never showed: they are not
///    deleted while the view still shows that directory.
/// 3. Placing: the plan is carried out, from the journal, never from the view again: staged
///    copies are copied into place by the server, files from NEW are PUT with their owner,
///    mode and mtime as object metadata (s3fs's and rclone's conventions), a symlink is an
///    object holding its target (s3fs). The keys below the prefix the view does not show are
///    then listed once and recorded.
/// 4. Deleting: the recorded keys, then the staging copies, are deleted.
///
/// A crash anywhere is finished by running abort again, which goes on at the recorded step:
/// OLD's own keys are written only once the plan is durable, and deleted only from the
/// recorded list, so a rerun never reads the view over a half-written bucket. Directory
/// metadata and hard links (each name becomes an object of its own) are not kept.
fn abort_s3(
    view: &View,
    journal: &Records,
    tree: &Arc<S3Tree>,
    new_root: BorrowedFd<'_>,
    keep_new: bool,
    publisher: Option<&Publisher>,
) -> Result<String> {
    let step = journal
        .meta("abort_step")?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    let step = match step.as_deref() {
        Some(STEP_S3_PLACING | STEP_S3_DELETING) => step,
        // Not begun, begun in an earlier version's steps, or staging: (again) from the start.
        _ => None,
    };
    let mut stats = AbortStats::default();
    if step.is_none() {
        let mut bad = Vec::new();
        check_s3_names(view, &view.root(), "", &mut bad)?;
        if !bad.is_empty() {
            let shown: Vec<String> = bad.iter().take(10).cloned().collect();
            return Err(refusal(format!(
                "abort refused, nothing was changed: {} name(s) in the view are not UTF-8, \
                 make an S3 key longer than {S3_KEY_MAX} bytes, or are {STAGING} (the \
                 abort's own) at the root: {}; rename them through the view, then abort again",
                bad.len(),
                shown.join(", ")
            )));
        }
        if journal.meta("abort_step")?.is_none() {
            state::record_final_local(journal, new_root)?;
        }
        set_step(journal, STEP_S3_STAGING)?;
        // Staged copies an earlier try left: of a view that may have changed since.
        delete_staged(tree)?;
        let hidden = hidden_objects(tree)?;
        let mut b = Batch::new();
        b.meta(
            HIDDEN,
            &serde_json::to_vec(&hidden).expect("a list of keys"),
        );
        journal.commit(b, false)?;
        let mut plan = Vec::new();
        plan_s3_dir(view, tree, &view.root(), "", &mut plan)?;
        set_step_with(journal, STEP_S3_PLACING, PLAN, &plan)?;
    }
    let step = journal
        .meta("abort_step")?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    if step.as_deref() == Some(STEP_S3_PLACING) {
        let plan: Vec<Planned> = recorded(journal, PLAN)?;
        let mut keep = std::collections::HashSet::new();
        for p in &plan {
            count_written();
            place(view, tree, p, &mut stats)?;
            keep.insert(p.path().to_string());
        }
        // What the view shows, besides what was just written: OLD's own unchanged objects
        // and the markers of its directories. (A renamed entry's key is planned: never
        // looked for here.)
        view_keys(view, &view.root(), "", &mut keep)?;
        let staged_prefix = format!("{STAGING}/");
        // Objects hidden behind a directory of their name were never seen through the view.
        let hidden: std::collections::HashSet<String> = match journal.meta(HIDDEN)? {
            Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
            None => Default::default(),
        };
        let mut extra = Vec::new();
        tree.store
            .list_all(&mut |rel, _| {
                // A hidden object stays only while the view still shows the directory that
                // hides it: else OLD would show a file the view did not.
                let still_hidden = hidden.contains(rel) && keep.contains(&format!("{rel}/"));
                if !keep.contains(rel)
                    && !rel.starts_with(&staged_prefix)
                    && nameable(rel)
                    && !still_hidden
                {
                    extra.push(rel.to_string());
                }
            })
            .map_err(s3_err("list OLD"))?;
        set_step_with(journal, STEP_S3_DELETING, DELETES, &extra)?;
    }
    let extra: Vec<String> = recorded(journal, DELETES)?;
    for rel in &extra {
        tree.store.delete(rel).map_err(s3_err("delete from OLD"))?;
    }
    delete_staged(tree)?;
    let new_note = end_abort(journal, new_root, keep_new, publisher)?;
    let mut b = Batch::new();
    b.meta(PLAN, b"[]");
    b.meta(DELETES, b"[]");
    b.meta(HIDDEN, b"[]");
    journal.commit(b, false)?;
    Ok(format!(
        "aborted: OLD ({}) now holds the view as it was ({} objects written, {} of them \
         renamed through the view, {} deleted); {new_note}",
        tree.store.url,
        stats.copied,
        stats.linked,
        extra.len()
    ))
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

/// Whether a key below OLD's prefix is one a view path can name: no empty, `.` or `..`
/// component (`a//b`, `/x`, `a/./b`). The view never shows the others, so abort leaves them
/// where they are rather than delete what it never saw.
fn nameable(rel: &str) -> bool {
    let rel = rel.strip_suffix('/').unwrap_or(rel);
    !rel.is_empty()
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// OLD's objects hidden behind a directory of the same name (`a` beside `a/x` or `a/`): the
/// view shows the directory (docs/SEMANTICS.md "An S3 OLD"), so abort never saw the object and
/// does not delete it while the view still shows that directory (OLD then shows what the view
/// does, the object staying hidden). Listed before abort writes anything: a directory abort
/// makes later, where the view removed a file, does not hide that file's object.
fn hidden_objects(tree: &Arc<S3Tree>) -> Result<Vec<String>> {
    let staged_prefix = format!("{STAGING}/");
    let mut objects = std::collections::HashSet::new();
    let mut dirs = std::collections::HashSet::new();
    tree.store
        .list_all(&mut |rel, _| {
            if rel.starts_with(&staged_prefix) {
                return;
            }
            shadows_of(rel, &mut dirs);
            if !rel.ends_with('/') && nameable(rel) {
                objects.insert(rel.to_string());
            }
        })
        .map_err(s3_err("list OLD"))?;
    let mut hidden: Vec<String> = objects.intersection(&dirs).cloned().collect();
    hidden.sort();
    Ok(hidden)
}

/// Add to `dirs` the directories a key makes: its parents, and itself when it is a `name/`
/// marker.
fn shadows_of(rel: &str, dirs: &mut std::collections::HashSet<String>) {
    let body = rel.strip_suffix('/').unwrap_or(rel);
    if body.len() < rel.len() && !body.is_empty() {
        dirs.insert(body.to_string());
    }
    for (i, b) in body.bytes().enumerate() {
        if b == b'/' && i > 0 && !dirs.contains(&body[..i]) {
            dirs.insert(body[..i].to_string());
        }
    }
}

/// Journal meta keys of an abort into an S3 OLD: its plan, the objects it leaves because the
/// view never showed them, and the keys it deletes.
const PLAN: &str = "abort_s3_plan";
const HIDDEN: &str = "abort_s3_hidden";
const DELETES: &str = "abort_s3_deletes";

/// Move to `step`, with what it works from (`value`, as JSON at meta `key`), in one durable
/// write.
fn set_step_with(
    journal: &Records,
    step: &str,
    key: &str,
    value: &impl serde::Serialize,
) -> Result<()> {
    let mut b = Batch::new();
    b.meta(
        key,
        &serde_json::to_vec(value).expect("abort records serialize"),
    );
    b.meta("abort_step", step.as_bytes());
    journal.commit(b, true)?;
    Ok(())
}

/// What [`set_step_with`] recorded at `key`.
fn recorded<T: serde::de::DeserializeOwned>(journal: &Records, key: &str) -> Result<T> {
    journal
        .meta(key)?
        .and_then(|v| serde_json::from_slice(&v).ok())
        .ok_or_else(|| refusal(format!("the abort's record {key} is missing or unreadable")))
}

const STEP_S3_STAGING: &str = "s3-staging";
const STEP_S3_PLACING: &str = "s3-placing";
const STEP_S3_DELETING: &str = "s3-deleting";

/// One write of an abort into an S3 OLD (see [`abort_s3`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Planned {
    /// An empty directory's marker (`path` ends in '/').
    Marker { path: String, meta: PosixMeta },
    /// OLD's object from another key, copied to [`staged_key`] of `path`.
    Staged {
        path: String,
        size: u64,
        meta: PosixMeta,
    },
    /// The view's file or symlink at `path`, from NEW.
    New { path: String },
}

impl Planned {
    fn path(&self) -> &str {
        match self {
            Planned::Marker { path, .. } | Planned::Staged { path, .. } | Planned::New { path } => {
                path
            }
        }
    }
}

fn staged_key(path: &str) -> String {
    format!("{STAGING}/{path}")
}

fn delete_staged(tree: &Arc<S3Tree>) -> Result<()> {
    let mut staged = Vec::new();
    tree.store
        .list_all_below(&format!("{STAGING}/"), &mut |rel, _| {
            staged.push(rel.to_string())
        })
        .map_err(s3_err("list the abort's staged copies"))?;
    for rel in &staged {
        tree.store
            .delete(rel)
            .map_err(s3_err("delete a staged copy"))?;
    }
    Ok(())
}

fn s3_err(op: &'static str) -> impl Fn(crate::store::s3::S3Error) -> Error {
    move |e| {
        tracing::warn!(error = %e, "{op}");
        Error::Store {
            op,
            source: e.into(),
        }
    }
}

fn s3_join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Collect the view paths whose names no S3 key can hold.
fn check_s3_names(view: &View, dir: &Arc<Inode>, rel: &str, bad: &mut Vec<String>) -> Result<()> {
    for (name, kind) in view.children(dir)? {
        let Some(n) = name.to_str() else {
            bad.push(format!("{:?}", s3_join(rel, &name.to_string_lossy())));
            continue;
        };
        let path = s3_join(rel, n);
        if path == STAGING {
            // OLD's own `.ferryfs-abort` is an earlier try's staged copies (deleted before
            // staging again); one made through the view would be lost: refused.
            if let Some(e) = view.child(dir, &name)? {
                let in_new = view.in_new(&e);
                view.release_lookup(&e);
                if in_new {
                    bad.push(format!("{path:?}"));
                }
            }
            continue;
        }
        if path.len() + 1 + STAGING.len() + 1 > S3_KEY_MAX {
            bad.push(format!("{path:?}"));
            continue;
        }
        if kind == Kind::Dir
            && let Some(sub) = view.child(dir, &name)?
        {
            let r = check_s3_names(view, &sub, &path, bad);
            view.release_lookup(&sub);
            r?;
        }
    }
    Ok(())
}

/// Staging, for the view's directory `dir` at `rel`: `plan` gets every write it takes, and
/// the files it takes from OLD under another key are copied to their staged keys.
fn plan_s3_dir(
    view: &View,
    tree: &Arc<S3Tree>,
    dir: &Arc<Inode>,
    rel: &str,
    plan: &mut Vec<Planned>,
) -> Result<()> {
    let children = view.children(dir)?;
    if children.is_empty() && !rel.is_empty() {
        let meta = match view.backing(dir) {
            Some(l) => meta_of(&l.stat().ctx("stat view dir")?),
            None => PosixMeta::default(),
        };
        plan.push(Planned::Marker {
            path: format!("{rel}/"),
            meta,
        });
    }
    for (name, _) in children {
        if rel.is_empty() && name == STAGING {
            continue; // the abort's own (see check_s3_names)
        }
        let Some(inode) = view.child(dir, &name)? else {
            continue;
        };
        let path = s3_join(rel, &name.to_string_lossy());
        let r = if inode.kind == Kind::Dir {
            plan_s3_dir(view, tree, &inode, &path, plan)
        } else {
            plan_s3_entry(view, tree, &inode, path, plan)
        };
        view.release_lookup(&inode);
        r?;
    }
    Ok(())
}

fn plan_s3_entry(
    view: &View,
    tree: &Arc<S3Tree>,
    inode: &Arc<Inode>,
    path: String,
    plan: &mut Vec<Planned>,
) -> Result<()> {
    // OLD's own object, unchanged, at this very key: nothing to write.
    if let Some(old) = view.old_source(inode)?
        && old.object().is_some_and(|o| o.rel == path)
    {
        return Ok(());
    }
    let src = view
        .backing(inode)
        .ok_or_else(|| crate::error::errno_err("entry has no backing", libc::ENOENT))?;
    let Some(o) = src.object() else {
        plan.push(Planned::New { path });
        return Ok(());
    };
    // OLD's object under another name (renamed through the view, not copied yet): copied
    // aside, exactly the version the view shows, before any key of OLD is written.
    let info = o
        .object
        .as_ref()
        .ok_or_else(|| crate::error::errno_err("an S3 directory where a file was", libc::EISDIR))?;
    let meta = meta_of(&o.st);
    tree.store
        .copy(&info.rel, &staged_key(&path), &info.etag, info.size, &meta)
        .map_err(s3_err("copy a renamed object aside in OLD"))?;
    plan.push(Planned::Staged {
        path,
        size: info.size,
        meta,
    });
    Ok(())
}

#[allow(clippy::unnecessary_cast)]
fn meta_of(st: &rustix::fs::Stat) -> PosixMeta {
    PosixMeta {
        mode: Some(st.st_mode),
        uid: Some(st.st_uid),
        gid: Some(st.st_gid),
        mtime: Some((st.st_mtime as i64, st.st_mtime_nsec as u32)),
    }
}

/// Placing: one planned write.
fn place(view: &View, tree: &Arc<S3Tree>, p: &Planned, stats: &mut AbortStats) -> Result<()> {
    match p {
        Planned::Marker { path, meta } => {
            tree.store
                .put(path, Vec::new(), meta)
                .map_err(s3_err("write a directory marker into OLD"))?;
        }
        Planned::Staged { path, size, meta } => {
            tree.store
                .copy(&staged_key(path), path, "", *size, meta)
                .map_err(s3_err("copy a renamed object into place in OLD"))?;
            stats.linked += 1;
        }
        Planned::New { path } => {
            let inode = view_entry(view, path)?.ok_or_else(|| {
                crate::error::errno_err("a planned entry left the view", libc::ENOENT)
            })?;
            let r = put_from_new(view, tree, &inode, path);
            view.release_lookup(&inode);
            r?;
        }
    }
    stats.copied += 1;
    Ok(())
}

/// The view's entry at the S3 path `path` (looked up: release it).
fn view_entry(view: &View, path: &str) -> Result<Option<Arc<Inode>>> {
    let mut cur = view.root();
    let mut looked_up = false;
    for part in path.split('/') {
        let next = view.child(&cur, OsStr::new(part));
        if looked_up {
            view.release_lookup(&cur);
        }
        match next? {
            Some(i) => {
                cur = i;
                looked_up = true;
            }
            None => return Ok(None),
        }
    }
    Ok(looked_up.then_some(cur))
}

fn put_from_new(view: &View, tree: &Arc<S3Tree>, inode: &Arc<Inode>, path: &str) -> Result<()> {
    let src = view
        .backing(inode)
        .ok_or_else(|| crate::error::errno_err("entry has no backing", libc::ENOENT))?;
    let st = src.stat().ctx("stat view entry")?;
    let meta = meta_of(&st);
    match Kind::from_mode(st.st_mode) {
        Kind::File => {
            let f = src.open(OFlags::RDONLY).ctx("open view file")?;
            tree.store
                .put_file(path, &f, &meta)
                .map_err(s3_err("write into OLD"))?;
        }
        Kind::Symlink => {
            let target = src.readlink().ctx("readlink")?;
            tree.store
                .put(path, target, &meta)
                .map_err(s3_err("write into OLD"))?;
        }
        _ => {
            tree.store
                .put(path, Vec::new(), &meta)
                .map_err(s3_err("write into OLD"))?;
        }
    }
    Ok(())
}

/// Every key the view's directory `dir` at `rel` shows: names, and `name/` for directories
/// (a marker OLD had for a directory stays: it may carry the directory's metadata).
fn view_keys(
    view: &View,
    dir: &Arc<Inode>,
    rel: &str,
    keep: &mut std::collections::HashSet<String>,
) -> Result<()> {
    if !rel.is_empty() {
        keep.insert(format!("{rel}/"));
    }
    for (name, kind) in view.children(dir)? {
        if rel.is_empty() && name == STAGING {
            continue; // the abort's own
        }
        let path = s3_join(rel, &name.to_string_lossy());
        if kind == Kind::Dir
            && let Some(sub) = view.child(dir, &name)?
        {
            let r = view_keys(view, &sub, &path, keep);
            view.release_lookup(&sub);
            r?;
        } else {
            // (A directory keeps its `path/` marker, not an object named `path`.)
            keep.insert(path);
        }
    }
    Ok(())
}

/// The last step of every abort, once OLD holds the view: NEW emptied (unless kept, or it held
/// data before prepare), the phase `aborted`, the view's records dropped. Says what became of
/// NEW.
fn end_abort(
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
            remove_tree_at(new_root, OsStr::from_bytes(&e.name))?;
        }
        "NEW emptied".to_string()
    };
    state::set_phase(journal, Phase::Aborted)?;
    journal.clear_view_records()?;
    let mut b = Batch::new();
    b.meta("abort_step", b"done");
    journal.commit(b, true)?;
    Ok(format!("{new_note}{bucket_note}"))
}

fn set_step(journal: &Records, step: &str) -> Result<()> {
    let mut b = Batch::new();
    b.meta("abort_step", step.as_bytes());
    journal.commit(b, true)?;
    Ok(())
}

fn new_was_empty(journal: &Records) -> Result<bool> {
    Ok(journal.meta("new_was_empty")?.is_none_or(|v| v == b"1"))
}

#[derive(Default)]
struct AbortStats {
    dirs: u64,
    linked: u64,
    copied: u64,
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
    crate::fs::copy_xattrs(src, dst)?;
    dst.utimens(&crate::fs::timestamps_of(&st)).ctx("utimens")
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
    let at_root = dir.ino == crate::fs::inode::ROOT_INO;
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
        res?;
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
    count_written();
    if inode.kind == Kind::Dir {
        rustix::fs::mkdirat(out.as_fd(), name, Mode::from_raw_mode(0o700)).ctx("mkdir staged")?;
        let sub = posix::open_child(out.as_fd(), name).ctx("open staged dir")?;
        stats.dirs += 1;
        return stage_dir(view, inode, &sub, links, stats);
    }
    // Data still in OLD, or a copy NEW took that OLD still matches: OLD's own entry is linked
    // (no data moves; OLD's hard links stay links).
    if let Some(old) = view.old_source(inode)? {
        match old.link_to(out.as_fd(), name) {
            Ok(()) => {
                stats.linked += 1;
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
        .ok_or_else(|| crate::error::errno_err("entry has no backing", libc::ENOENT))?;
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
            crate::fs::copy_file_data(&from, &to, st.st_size as u64)?;
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
    stats.copied += 1;
    if st.st_nlink > 1 {
        links.insert(key, (out.clone(), name.to_owned()));
    }
    Ok(())
}

/// Remove `name` in `dir` and everything below it (nothing if absent). Never follows a symlink.
pub(crate) fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let st = match posix::stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e).ctx("stat for removal"),
    };
    if Kind::from_mode(st.st_mode) == Kind::Dir {
        let sub = posix::open_child(dir, name).ctx("open dir for removal")?;
        for e in posix::read_dir_names(sub.as_fd()).ctx("read dir for removal")? {
            remove_tree_at(sub.as_fd(), OsStr::from_bytes(&e.name))?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).ctx("rmdir")?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).ctx("unlink")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{nameable, shadows_of};

    #[test]
    fn shadows_are_the_directories_keys_make() {
        let mut d = std::collections::HashSet::new();
        for k in ["a/b/c", "m/", "x", "p//q"] {
            shadows_of(k, &mut d);
        }
        let mut got: Vec<&str> = d.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, ["a", "a/b", "m", "p", "p/"]);
    }

    #[test]
    fn abort_deletes_only_keys_a_view_path_can_name() {
        for k in ["a", "a/b", "dir/", "a b/c+d%20", "x.y/..z"] {
            assert!(nameable(k), "{k}");
        }
        for k in ["", "/", "/x", "a//b", "a/./b", "../x", "a/..", "x//"] {
            assert!(!nameable(k), "{k}");
        }
    }
}
