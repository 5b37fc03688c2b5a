//! The end of a migration: verify, commit, abort (DESIGN "Lifecycle").
//!
//! Each works on an open view and its copier, so the same code runs inside the daemon (asked
//! over the control socket) and in the CLI when no daemon serves the state dir.

mod abort;
mod abort_s3;

pub use abort::{OldTarget, abort, abort_rewrites_old};

use std::os::fd::BorrowedFd;

use rustix::fs::OFlags;

use crate::copier::publish::Publisher;
use crate::copier::{CheckReport, Copier};
use crate::journal::{Batch, CopyError, Phase, Records};
use crate::state;
use crate::store::posix::{self};
use crate::view::Compare;
use crate::view::error::{Context, Error, Result};

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
        let last = p.settle(5).ctx("upload into NEW")?;
        let plan = p.plan().ctx("compare NEW with the bucket")?;
        r.mismatches.extend(plan);
        // Why what is not there yet could not be put there.
        r.mismatches.extend(
            last.errors
                .iter()
                .map(|(k, e)| format!("{k}: could not be uploaded: {e}")),
        );
        let (problems, _) = p.check_bucket().ctx("list NEW")?;
        r.mismatches.extend(problems);
        r.mismatches.sort();
    }
    Ok(r)
}

/// `resolve`: keep the view's entries at `paths` (view paths, as status lists them) as they
/// are, settling each one's conflict with a removal in OLD behind the view.
pub fn resolve(copier: &Copier, paths: &[String]) -> Result<String> {
    for p in paths {
        let rel = p.trim_start_matches('/');
        copier
            .view()
            .keep_as_is(rel.as_bytes())
            .map_err(|e| Error::Lifecycle(format!("{p}: {e}")))?;
    }
    copier.kick();
    Ok(format!(
        "resolved {} entr{}: the view keeps {} as {} (no longer following OLD)",
        paths.len(),
        if paths.len() == 1 { "y" } else { "ies" },
        if paths.len() == 1 { "it" } else { "them" },
        if paths.len() == 1 {
            "it is"
        } else {
            "they are"
        }
    ))
}

/// `commit`: refuses unless executed and a final pass over OLD is clean; then NEW is made
/// durable, the journal forgets OLD, and the view serves NEW only.
pub fn commit(
    copier: &Copier,
    journal: &Records,
    new_root: BorrowedFd<'_>,
    state_dir: &std::path::Path,
    yes: bool,
) -> Result<String> {
    let phase = journal.phase()?;
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
                        conflict: false,
                    },
                );
            }
            journal.commit(b, true)?;
            journal.set_phase(Phase::Executing)?;
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
    // What the filter left out leaves the view now: said, and only with the operator's yes.
    let totals = journal.totals()?;
    if report.excluded > 0 && !yes {
        return Err(refusal(format!(
            "commit refused: the filter ({}) leaves {} entries out of the migration ({} dirs, {} \
             files, {} bytes as prepare counted them, everything below an excluded directory \
             included); they leave the view at commit (OLD keeps them): run commit again with \
             --yes to go ahead",
            crate::copier::filter::rules_display(copier.filter()),
            report.excluded,
            totals.excluded_dirs,
            totals.excluded_files,
            totals.excluded_bytes
        )));
    }
    // A file partly copied and not met by the pass (every one the view holds is): never
    // committed with chunks only OLD holds.
    let partial = journal.partial_count();
    if partial > 0 {
        copier.kick();
        return Err(refusal(format!(
            "commit refused: {partial} files are only partly copied into NEW (chunks written \
             through the view are in NEW, the rest still in OLD); the copier fills them in: run \
             `ferryfs execute --state DIR --wait` and commit again"
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
    // The per-file report, while the journal still knows where each entry came from.
    let manifest = state::report::write_manifest(journal, state_dir)
        .map_err(|e| refusal(format!("commit refused: writing the manifest: {e}")))?;
    journal.set_phase(Phase::Committed)?;
    journal.clear_view_records()?;
    copier.view().set_single();
    let left_out = if report.excluded > 0 {
        format!(
            "; {} entries the filter left out are no longer in the view (OLD keeps them)",
            report.excluded
        )
    } else {
        String::new()
    };
    Ok(match bucket {
        None => format!(
            "committed: {} entries checked against OLD; the view now serves NEW only, and NEW \
             is a plain tree usable without ferryfs{left_out}; manifest: {}",
            report.checked,
            manifest.display()
        ),
        Some(objects) => format!(
            "committed: {} entries checked against OLD; the NEW bucket ({}) holds the view's {} \
             objects, checked by listing; the view now serves NEW only, and the bucket is usable \
             without ferryfs{left_out}; manifest: {}",
            report.checked,
            manifest.display(),
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
            "commit refused: uploads into the NEW bucket are stopped (an abort or a takeover \
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
