//! What `status` reports, read from the journal without taking the state dir's lock, so it
//! works while a daemon serves the view.

use std::io;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use std::fs::{self, File};

use super::{StateError, io_at, layout, new_dir, read_config};
use crate::journal::rocks::RocksJournal;
use crate::journal::{Batch, Meta, Records, Totals};
use crate::store::StoreSpec;

/// Before commit or abort forgets which entries were copies: how many were the view's own, so
/// `status` keeps reporting it.
pub fn record_final_local(
    journal: &Records,
    new_root: std::os::fd::BorrowedFd<'_>,
) -> Result<(), crate::view::error::Error> {
    let copies: std::collections::HashSet<(u64, u64)> =
        journal.copies()?.into_iter().map(|(k, _)| k).collect();
    let root = std::path::PathBuf::from(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        new_root.as_raw_fd()
    }));
    let n = local_entries(&root, &copies).map_err(|e| crate::view::error::Error::Store {
        op: "count NEW entries",
        source: e,
    })?;
    let mut b = Batch::new();
    b.meta(Meta::FinalLocal, &n.to_le_bytes());
    journal.commit(b, true)?;
    Ok(())
}

/// What `status` reports.
/// See [`Status::partial`].
#[derive(Debug, Default, Serialize)]
pub struct PartialStatus {
    pub files: u64,
    pub chunks_present: u64,
    pub chunks_total: u64,
    /// The migration's chunk size in bytes (0: whole files only).
    pub chunk_size: u64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub phase: String,
    pub old: String,
    pub new: String,
    pub mounted: bool,
    pub files: Progress,
    pub dirs: Progress,
    pub bytes: Progress,
    /// Entries born or changed through the view (entries in NEW that are not plain copies).
    pub local: u64,
    /// OLD-only files whose metadata the view changed without copying their data (chmod,
    /// chown, utimens, xattrs): NEW takes each, with its change, when it copies it.
    pub metadata_only: u64,
    /// Big files a write through the view copied only in part (copy-before-write by chunk):
    /// how many, and their chunks in NEW out of all their chunks of OLD's data.
    pub partial: PartialStatus,
    pub tombstones: u64,
    pub redirects: u64,
    pub errors: Vec<ErrorEntry>,
    /// Entries changed through the view whose OLD origin OLD removed behind the view (also
    /// in `errors`): commit refuses until each is settled (`ferryfs resolve`, or a removal
    /// through the view).
    pub conflicts: Vec<ErrorEntry>,
    /// Entries OLD changed behind the view's back after they were copied (found by a pass
    /// or by commit's final check), and whether each was copied again.
    pub changed_in_old: Vec<StaleEntry>,
    /// Copy rate over the last seconds (0 when the copier is not copying).
    pub rate_bytes_per_sec: u64,
    /// Seconds until every byte is copied at that rate; `null` when unknown.
    pub eta_seconds: Option<u64>,
    /// An S3 NEW only: the objects the bucket holds from the staging tree, and the uploads
    /// under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
    /// What prepare's probe found each store does, with the fallback for each missing
    /// capability.
    pub capabilities: crate::store::probe::Capabilities,
    /// prepare's filter rules in order (`- PATTERN` excludes, `+ PATTERN` includes); empty:
    /// everything moves. Fixed for the migration's life.
    pub filter: Vec<String>,
    /// What the filter leaves out, as prepare's scan counted it (everything below an excluded
    /// directory included): shown from OLD until commit, never copied.
    pub excluded: Excluded,
    /// The copier's bandwidth limit in force (bytes/s, 0: none) and the timetable it follows,
    /// as the copier last recorded it.
    pub bwlimit: crate::journal::BwLimit,
    /// Remote copy workers the coordinator (`mount --workers-listen`) has known: what each
    /// copied, its pace, when it was last heard from.
    pub workers: Vec<crate::workers::coordinator::WorkerStatus>,
    /// While mounted: how the kernel hands the view's requests to the daemon (`mount
    /// --transport`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<FuseTransport>,
}

/// The FUSE transport a mount is served over (`mount --transport`), as its daemon recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FuseTransport {
    pub transport: TransportKind,
    /// io_uring: the kernel's queues (one per possible CPU).
    pub queues: usize,
    /// io_uring: bytes of each ring entry's payload buffer.
    pub payload_bytes: usize,
}

/// How the kernel hands a mount's requests to its daemon; `io_uring` or `dev` in status JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum TransportKind {
    /// FUSE over io_uring.
    #[serde(rename = "io_uring")]
    IoUring,
    /// read/writev on /dev/fuse.
    #[serde(rename = "dev")]
    Dev,
}

#[derive(Debug, Serialize, Clone, Copy, Default)]
pub struct Excluded {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Published {
    pub objects: u64,
    pub pending: u64,
    /// The last publish pass found nothing to do: the bucket held the staging tree.
    pub settled: bool,
    /// Bytes the staging tree held at the last publish pass (what is not uploaded yet, or
    /// still open through the view).
    pub staged_bytes: u64,
    /// Files uploaded and evicted from the staging tree (read from the bucket).
    pub evicted: u64,
    /// The bound on the staging tree the daemon last mounted with (`mount --stage-max`; 0:
    /// never mounted).
    pub stage_max: u64,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
}

#[derive(Debug, Serialize)]
pub struct StaleEntry {
    pub path: String,
    pub copied_again: bool,
}

#[derive(Debug, Serialize)]
pub struct ErrorEntry {
    pub path: String,
    pub error: String,
    pub errno: i32,
    pub attempts: u32,
}

/// Entries in NEW that are not plain copies of OLD (no copy record for their inode).
fn local_entries(root: &Path, copies: &std::collections::HashSet<(u64, u64)>) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    // Applications change NEW while it is walked: an entry or directory gone by the time it
    // is looked at is not counted, not an error.
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if gone(&e) && dir != root => continue,
            Err(e) => return Err(e),
        };
        for ent in entries {
            let ent = ent?;
            if dir == root && ent.file_name() == crate::view::WORK_DIR {
                continue;
            }
            let md = match ent.metadata() {
                Ok(md) => md,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if !copies.contains(&(md.dev(), md.ino())) {
                n += 1;
            }
            if md.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok(n)
}

/// Read the state without taking the lock, so it works while a daemon serves the view.
pub fn status(state: &Path) -> Result<Status, StateError> {
    read_status(state, true)
}

fn read_status(state: &Path, count_local: bool) -> Result<Status, StateError> {
    status_of(&read_journal(state)?, state, count_local)
}

/// The journal of the migration in `state`, opened read-only (a daemon may be serving it).
pub(crate) fn read_journal(state: &Path) -> Result<Records, StateError> {
    if !layout::journal_dir(state).exists() {
        return Err(StateError::Invalid(format!(
            "{} holds no migration",
            state.display()
        )));
    }
    Ok(Records::new(Arc::new(RocksJournal::open_read_only(
        &layout::journal_dir(state),
    )?))?)
}

/// Status for progress lines, without the walk of NEW that counts `local` (0 here): cheap
/// enough to read every second whatever the size of NEW.
pub fn progress(state: &Path) -> Result<Status, StateError> {
    read_status(state, false)
}

/// OLD's totals as scanned at prepare, read without the lock.
pub fn scanned_totals(state: &Path) -> Result<Totals, StateError> {
    let journal = Records::new(Arc::new(RocksJournal::open_read_only(
        &layout::journal_dir(state),
    )?))?;
    Ok(journal.totals()?)
}

/// Status from a journal this process has open. `count_local` walks NEW (skip it for
/// progress lines: `local` is then 0).
pub fn status_of(journal: &Records, state: &Path, count_local: bool) -> Result<Status, StateError> {
    let journal = journal.clone();
    let config = read_config(&journal, state)?;
    let totals = journal.totals()?;
    let phase = journal
        .phase()
        .map_err(|e| StateError::Invalid(format!("{}: {e}", state.display())))?
        .to_string();
    let counts = journal.counts()?;
    let np = &new_dir(&config, state);
    let final_local = journal
        .meta(Meta::FinalLocal)?
        .and_then(|v| v.try_into().ok().map(u64::from_le_bytes));
    let local = if let Some(n) = final_local.filter(|_| phase == "committed" || phase == "aborted")
    {
        n
    } else if count_local {
        let copies: std::collections::HashSet<(u64, u64)> =
            journal.copies()?.into_iter().map(|(k, _)| k).collect();
        local_entries(np, &copies).map_err(io_at(np))?
    } else {
        0
    };
    let done = journal.done()?;
    let recorded = journal.errors()?;
    let conflicts: Vec<ErrorEntry> = recorded
        .iter()
        .filter(|(_, e)| e.conflict)
        .map(|(p, e)| ErrorEntry {
            path: crate::view::display_path(p),
            error: e.error.clone(),
            errno: e.errno,
            attempts: e.attempts,
        })
        .collect();
    let mut errors: Vec<ErrorEntry> = recorded
        .into_iter()
        .map(|(p, e)| ErrorEntry {
            path: crate::view::display_path(&p),
            error: e.error,
            errno: e.errno,
            attempts: e.attempts,
        })
        .collect();
    // An S3 NEW's failed uploads, by the view path of the object's key.
    errors.extend(journal.pub_errors()?.into_iter().map(|(k, e)| ErrorEntry {
        path: format!("/{}", k.trim_end_matches('/')),
        error: e.error,
        errno: e.errno,
        attempts: e.attempts,
    }));
    let published = match &config.new {
        StoreSpec::S3 { .. } => {
            let recs = journal.published()?;
            Some(Published {
                objects: recs.iter().filter(|(_, r)| !r.pending).count() as u64,
                pending: recs.iter().filter(|(_, r)| r.pending).count() as u64,
                settled: journal.meta(Meta::PublishSettled)?.as_deref() == Some(b"1"),
                staged_bytes: journal
                    .meta(Meta::StagedBytes)?
                    .and_then(|v| v.as_slice().try_into().ok())
                    .map_or(0, u64::from_le_bytes),
                evicted: journal.stub_count(),
                stage_max: journal
                    .meta(Meta::StageMax)?
                    .and_then(|v| v.as_slice().try_into().ok())
                    .map_or(0, u64::from_le_bytes),
            })
        }
        StoreSpec::Posix { .. } => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rate = match journal.rate()? {
        Some((bps, at)) if now.saturating_sub(at) <= 5 && phase == "executing" => bps,
        _ => 0,
    };
    let left = totals.bytes.saturating_sub(done.bytes);
    let eta_seconds = match phase.as_str() {
        "executed" | "committed" | "aborted" => Some(0),
        _ if rate > 0 => Some(left / rate),
        _ => None,
    };
    let mounted = match File::open(layout::lock_path(state)) {
        Ok(f) => rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err(),
        Err(_) => false,
    };
    let capabilities = journal.capabilities()?;
    let filter = crate::copier::filter::load(&journal)
        .map(|f| f.rules().iter().map(|r| r.to_string()).collect())
        .unwrap_or_else(|e| vec![format!("(unreadable: {e})")]);
    Ok(Status {
        bwlimit: journal.bwlimit()?.unwrap_or_default(),
        capabilities,
        filter,
        excluded: Excluded {
            dirs: totals.excluded_dirs,
            files: totals.excluded_files,
            bytes: totals.excluded_bytes,
        },
        conflicts,
        phase,
        old: config.old.to_string(),
        new: config.new.to_string(),
        mounted,
        files: Progress {
            total: totals.files.max(done.files),
            done: done.files,
        },
        dirs: Progress {
            total: totals.dirs.max(done.dirs),
            done: done.dirs,
        },
        bytes: Progress {
            total: totals.bytes.max(done.bytes),
            done: done.bytes,
        },
        local,
        metadata_only: journal.meta_changes()?,
        partial: {
            let (files, chunks_present, chunks_total) = journal.partial_progress()?;
            PartialStatus {
                files,
                chunks_present,
                chunks_total,
                chunk_size: journal.chunk_size()?,
            }
        },
        tombstones: counts.tombstones,
        redirects: counts.redirects,
        errors,
        changed_in_old: journal
            .stales()?
            .into_iter()
            .map(|(p, r)| StaleEntry {
                path: crate::view::display_path(&p),
                copied_again: r.copied_again,
            })
            .collect(),
        rate_bytes_per_sec: rate,
        eta_seconds,
        published,
        workers: crate::workers::coordinator::recorded_workers(&journal),
        transport: mounted
            .then(|| journal.meta(Meta::FuseTransport).ok().flatten())
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok()),
    })
}
