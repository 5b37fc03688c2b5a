//! `abort` into an S3 OLD: the bucket (below its prefix) becomes exactly what the view shows.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use rustix::fs::OFlags;

use crate::copier::publish::Publisher;
use crate::journal::{Batch, Meta, Records};
use crate::state;
use crate::store::s3::PosixMeta;
use crate::store::s3::tree::S3Tree;
use crate::view::error::{Context, Error, Result};
use crate::view::inode::Inode;
use crate::view::{Kind, View};

use super::abort::{AbortStats, STAGING, end_abort, set_step};
use super::refusal;

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
pub(super) fn abort_s3(
    view: &View,
    journal: &Records,
    tree: &Arc<S3Tree>,
    new_root: BorrowedFd<'_>,
    keep_new: bool,
    publisher: Option<&Publisher>,
) -> Result<String> {
    let step = journal
        .meta(Meta::AbortStep)?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    let step = match step.as_deref() {
        Some(STEP_S3_PLACING | STEP_S3_DELETING) => step,
        // Not begun, begun in an earlier version's steps, or staging: (again) from the start.
        _ => None,
    };
    let mut stats = AbortStats::default();
    // An earlier run took the abort this far: this one finishes it.
    let resumed = step.clone();
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
        if journal.meta(Meta::AbortStep)?.is_none() {
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
        .meta(Meta::AbortStep)?
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    if step.as_deref() == Some(STEP_S3_PLACING) {
        let plan: Vec<Planned> = recorded(journal, PLAN)?;
        let mut keep = std::collections::HashSet::new();
        for p in &plan {
            crate::metrics::METRICS.abort_wrote();
            place(view, tree, p, &mut stats)?;
            keep.insert(p.path().to_string());
        }
        // What the view shows, besides what was just written: OLD's own unchanged objects
        // and the markers of its directories. (A renamed entry's key is planned: never
        // looked for here.)
        view_keys(view, &view.root(), "", &mut keep)?;
        let staged_prefix = format!("{STAGING}/");
        // Objects hidden behind a directory of their name were never seen through the view.
        let hidden: std::collections::HashSet<String> = match journal.meta(Meta::AbortS3Hidden)? {
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
    b.meta(Meta::AbortS3Plan, b"[]");
    b.meta(Meta::AbortS3Deletes, b"[]");
    b.meta(Meta::AbortS3Hidden, b"[]");
    journal.commit(b, false)?;
    let resumed = match resumed {
        Some(step) => format!(
            "; an earlier run had planned it and was stopped at its {step} step, this run \
             finished it"
        ),
        None => String::new(),
    };
    Ok(format!(
        "aborted: OLD ({}) now holds the view as it was ({} objects written by this run, {} \
         of them renamed through the view, {} of them files partly copied that took back only \
         their changed parts ({} bytes sent into OLD, the rest copied by the server), {} \
         deleted{resumed}); {new_note}",
        tree.store.url,
        stats.copied,
        stats.linked,
        stats.partial,
        stats.partial_bytes,
        extra.len()
    ))
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
const PLAN: Meta = Meta::AbortS3Plan;
const HIDDEN: Meta = Meta::AbortS3Hidden;
const DELETES: Meta = Meta::AbortS3Deletes;

/// Move to `step`, with what it works from (`value`, as JSON at meta `key`), in one durable
/// write.
fn set_step_with(
    journal: &Records,
    step: &str,
    key: Meta,
    value: &impl serde::Serialize,
) -> Result<()> {
    let mut b = Batch::new();
    b.meta(
        key,
        &serde_json::to_vec(value).expect("abort records serialize"),
    );
    b.meta(Meta::AbortStep, step.as_bytes());
    journal.commit(b, true)?;
    Ok(())
}

/// What [`set_step_with`] recorded at `key`.
fn recorded<T: serde::de::DeserializeOwned>(journal: &Records, key: Meta) -> Result<T> {
    journal
        .meta(key)?
        .and_then(|v| serde_json::from_slice(&v).ok())
        .ok_or_else(|| {
            refusal(format!(
                "the abort's record {} is missing or unreadable",
                key.key()
            ))
        })
}

const STEP_S3_STAGING: &str = "s3-staging";
pub(super) const STEP_S3_PLACING: &str = "s3-placing";
pub(super) const STEP_S3_DELETING: &str = "s3-deleting";

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

/// An S3 failure of an abort, with its request (which names the key and the endpoint).
fn s3_err(op: &'static str) -> impl Fn(crate::store::s3::S3Error) -> Error {
    move |e| Error::Lifecycle(format!("{op}: {e}"))
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
            Some(l) => PosixMeta::of_stat(&l.stat().ctx("stat view dir")?),
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
        .ok_or_else(|| crate::view::error::errno_err("entry has no backing", libc::ENOENT))?;
    let Some(o) = src.object() else {
        // A file partly copied into NEW under another name than its OLD key: its chunks
        // still in OLD are copied into NEW now, before any key of OLD is written (placing
        // may write that key). One still at its key is written in place (`put_from_new`).
        if view
            .partial_origin(inode)
            .is_some_and(|o| o != path.as_bytes())
        {
            view.hydrate_partial(inode)?;
        }
        plan.push(Planned::New { path });
        return Ok(());
    };
    // OLD's object under another name (renamed through the view, not copied yet): copied
    // aside, exactly the version the view shows, before any key of OLD is written.
    let info = o.object.as_ref().ok_or_else(|| {
        crate::view::error::errno_err("an S3 directory where a file was", libc::EISDIR)
    })?;
    let meta = PosixMeta::of_stat(&o.st);
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
                crate::view::error::errno_err("a planned entry left the view", libc::ENOENT)
            })?;
            let r = put_from_new(view, tree, &inode, path, stats);
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

fn put_from_new(
    view: &View,
    tree: &Arc<S3Tree>,
    inode: &Arc<Inode>,
    path: &str,
    stats: &mut AbortStats,
) -> Result<()> {
    let src = view
        .backing(inode)
        .ok_or_else(|| crate::view::error::errno_err("entry has no backing", libc::ENOENT))?;
    let st = src.stat().ctx("stat view entry")?;
    let meta = PosixMeta::of_stat(&st);
    // A file partly copied into NEW, still at its OLD key: only its changed parts are sent.
    #[allow(clippy::unnecessary_cast)]
    if Kind::from_mode(st.st_mode) == Kind::File
        && let Some(sent) =
            view.abort_partial_s3(inode, &tree.store, path, st.st_size as u64, &meta)?
    {
        stats.partial += 1;
        stats.partial_bytes += sent;
        return Ok(());
    }
    // Another one (renamed through the view): its chunks still in OLD first (an object is
    // written whole). (Filled in when planned, before any key of OLD was written; again
    // here for a run that resumed placing.)
    view.hydrate_partial(inode)?;
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
