//! The copier: drains OLD into NEW in the background (DESIGN "The copier").
//!
//! A pass walks the view (not OLD: so it copies what applications see, at the names they see
//! it) depth first. Directories are brought into NEW by the walker, before their entries; files,
//! symlinks and special files go to N workers over a bounded channel. Entries applications
//! touched while still in OLD jump the queue. An entry already in NEW is checked against OLD's
//! fingerprint and copied again if OLD changed behind the view's back. A directory gets OLD's
//! times back once every entry below it is done (the last reference to its guard drops).
//!
//! Workers copy plain files into anonymous files and hand them, in batches, to one namer
//! thread, which makes every queued batch durable with a single `syncfs` of NEW and only then
//! gives the copies their names (see `fs::copyup::finish_pending`).
//!
//! Passes repeat until one finds nothing to do, or one only copied while the view's namespace
//! stood still: then the migration is `executed`. Errors are per entry: recorded in the journal with the path and
//! errno (status lists them), retried by the next pass after a backoff, cleared when the entry
//! copies or goes away. The daemon never stops on them.
//!
//! Pacing: a bytes/s and an operations/s token bucket (changeable while running), and a short
//! sleep between chunks whenever applications did I/O through the view in the last few ms.

pub mod filter;
pub mod limits;
pub mod publish;
pub mod scan;
mod walk;

pub use limits::{Limiter, RateMeter, parse_rate};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::journal::{Batch, CopyError, Phase, Records, StaleRecord};
use crate::view::error::{Error, Result};
use crate::view::inode::Inode;
use crate::view::{Check, Copied, Kind, Outcome, Pending, View};

/// How long the copier waits after a pass with errors before the next, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Application I/O this recent makes the copier pause between chunks.
const YIELD_WINDOW: Duration = Duration::from_millis(20);
const YIELD_SLEEP: Duration = Duration::from_millis(5);

/// Workers when none is asked for: POSIX stores (latency in microseconds to milliseconds;
/// more workers than this gained nothing on the bench host), and S3 (tens of milliseconds a
/// request: throughput grows with requests in flight).
pub const DEFAULT_WORKERS_POSIX: usize = 16;
pub const DEFAULT_WORKERS_S3: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// 0: the default for OLD's kind of store.
    pub workers: usize,
    /// Bytes per second; 0: unlimited. A timetable (below) overrides it.
    pub bwlimit: u64,
    /// `--bwlimit` as a timetable (rclone's syntax): the limit follows the local time.
    pub bw_timetable: Option<limits::Timetable>,
    /// Entries per second; 0: unlimited.
    pub ops_limit: u64,
    /// Once executed, check every copy against OLD again this often (`None`: only when asked).
    pub recheck: Option<Duration>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassSummary {
    pub files_copied: u64,
    pub dirs_copied: u64,
    pub bytes_copied: u64,
    /// Entries found in NEW already (copied before, or the view's own).
    pub present: u64,
    /// Copies found stale (OLD changed behind the view) and taken again.
    pub recopied: u64,
    /// Entries whose copy was thrown away: the view changed them meanwhile, or OLD did.
    pub redo: u64,
    pub errors: u64,
    pub stopped: bool,
    /// No namespace change through the view happened while the pass ran.
    pub quiet: bool,
    /// Names (non-directories), directories and bytes the view holds in NEW after the pass.
    pub tally: (u64, u64, u64),
    /// Entries the filter left out (shown from OLD, not copied; an excluded directory once).
    #[serde(default)]
    pub excluded: u64,
}

impl PassSummary {
    /// A pass after which everything is in NEW and every copy equal to OLD: one that found
    /// nothing to do, or one that only copied while nothing moved in the view (changes made
    /// in OLD behind the view meanwhile are caught by the recheck and by commit's final pass).
    pub fn clean(&self) -> bool {
        if self.stopped || self.redo + self.errors > 0 {
            return false;
        }
        self.quiet || self.files_copied + self.dirs_copied + self.recopied == 0
    }
}

/// What a pass's workers share.
struct PassCtx<'a> {
    c: &'a PassCounters,
    known: &'a std::collections::HashMap<Vec<u8>, CopyError>,
    seen: Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Copy failures of this pass by errno (the log names the first few of each).
    failed: Mutex<std::collections::BTreeMap<i32, u64>>,
    /// Copies NEW lost are copied again this pass (`execute --recopy-lost`), not reported.
    recopy_lost: bool,
}

/// Failures of one errno that a pass logs one by one; the rest are counted in one line at the
/// end of the pass (a full NEW fails every file alike: 50,000 lines a pass said nothing more).
/// Every failure is recorded in the journal either way, for `status`.
const LOGGED_PER_ERRNO: u64 = 20;

/// A worker names its pending copies once it holds this many, or this many bytes.
const BATCH_FILES: usize = 32;
const BATCH_BYTES: u64 = 64 << 20;
const BATCH_AGE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct PassCounters {
    files: AtomicU64,
    dirs: AtomicU64,
    bytes: AtomicU64,
    present: AtomicU64,
    recopied: AtomicU64,
    redo: AtomicU64,
    errors: AtomicU64,
    /// What the view holds in NEW, name by name, as this pass saw it.
    seen_files: AtomicU64,
    seen_dirs: AtomicU64,
    seen_bytes: AtomicU64,
}

/// What a check pass (no copying) found: the material of `verify` and `commit`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// Entries still only in OLD.
    pub pending: Vec<String>,
    /// Copies OLD changed since.
    pub stale: Vec<String>,
    /// Copies whose content or metadata differs from OLD's (verify).
    pub mismatches: Vec<String>,
    pub checked: u64,
    pub errors: Vec<String>,
    /// Entries the filter left out, still only in OLD (an excluded directory once): they
    /// leave the view at commit.
    #[serde(default)]
    pub excluded: u64,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.pending.is_empty()
            && self.stale.is_empty()
            && self.mismatches.is_empty()
            && self.errors.is_empty()
    }
}

/// Holds a directory's lookup while entries below it are in flight; when the last goes, the
/// directory gets OLD's times back (copy passes) and its lookup is given back.
struct DirGuard {
    view: Arc<View>,
    inode: Arc<Inode>,
    /// The filter excludes this directory (and so everything below it).
    excluded: bool,
    /// Its view path, when there is a filter to match its entries against (else empty).
    path: Vec<u8>,
    finish: bool,
    /// Whether the walk holds a lookup of it (all but the root).
    counted: bool,
    _parent: Option<Arc<DirGuard>>,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.finish
            && let Err(e) = self.view.finish_dir(&self.inode)
        {
            tracing::warn!(error = %e, "restoring a directory's times");
        }
        if self.counted {
            self.view.release_lookup(&self.inode);
        }
    }
}

/// A worker's batch for the namer: pending copies (and whether each counts in the tally), and
/// the lookups to give back once they are named.
type NamerBatch = (Vec<(Pending, bool)>, Vec<(Arc<Inode>, Arc<DirGuard>)>);

/// A non-directory for a worker: looked up by the worker (its stat may need the disk; the
/// workers do those in parallel), then copied or checked.
struct Job {
    dir: Arc<DirGuard>,
    name: std::ffi::OsString,
    /// The filter excludes the entry (or a directory above it).
    excluded: bool,
}

#[derive(Default)]
struct Want {
    /// Execute was asked for (mount without --no-copy, `execute`).
    run: bool,
    /// Bumped to ask for another pass now (e.g. commit found stale copies).
    kick: u64,
}

pub struct Copier {
    view: Arc<View>,
    journal: Records,
    /// prepare's filter: entries it excludes are not copied (nor pending).
    filter: filter::Filter,
    /// The timetable `bw` follows, if any; when it was last looked at (seconds).
    bw_table: Mutex<Option<limits::Timetable>>,
    bw_checked: AtomicU64,

    workers: AtomicUsize,
    pub bw: Limiter,
    pub ops: Limiter,
    paused: AtomicBool,
    stop: AtomicBool,
    want: Mutex<Want>,
    cv: Condvar,
    last: Mutex<Option<PassSummary>>,
    /// Background passes finished, and how many of the last ones in a row ended with errors.
    passes: AtomicU64,
    error_streak: AtomicU64,
    /// A check (verify, commit's final pass) under way, and the entries it has checked.
    checking: AtomicBool,
    checked: AtomicU64,
    running: AtomicBool,
    /// `execute --recopy-lost` asked for the next pass to copy again what NEW lost.
    recopy_lost: AtomicBool,
    recheck: Option<Duration>,
    /// An S3 NEW's publisher (crate::copier::publish): commit, verify and abort reach it here.
    publisher: std::sync::OnceLock<Arc<crate::copier::publish::Publisher>>,
    /// Remote workers' coordinator (`mount --workers-listen`): files go to them.
    remote: std::sync::OnceLock<Arc<dyn Remote>>,
}

/// Remote copy workers the walk hands files to (the coordinator of `crate::workers`, which
/// names their copies through the view).
pub trait Remote: Send + Sync {
    /// The walk offers `inode` (a file only in OLD): `true` when a worker will copy it (the
    /// pass waits for it at its end), `false` when the copier must copy it itself.
    fn offer(&self, inode: &Arc<Inode>) -> bool;
    /// Wait until everything offered is settled (copied, refused or failed), or `stopping()`.
    /// Gives what was settled since the last drain: (files named in NEW, their bytes, files
    /// not named: refused, failed, or taken back).
    fn drain(&self, stopping: &dyn Fn() -> bool) -> (u64, u64, u64);
    /// Whether workers were heard from lately (the walk offers them files).
    fn active(&self) -> bool;
    /// The coordinator's series for /metrics.
    fn render_metrics(&self, out: &mut String);
}

/// A snapshot for progress displays and the control socket.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CopierState {
    pub running: bool,
    pub paused: bool,
    pub workers: usize,
    /// The bandwidth limit in force (bytes/s, 0: none).
    pub bwlimit: u64,
    /// The timetable the limit follows, as given (`None`: a fixed limit).
    #[serde(default)]
    pub bwlimit_timetable: Option<String>,
    pub ops_limit: u64,
    pub last_pass: Option<PassSummary>,
    /// Background passes finished since the daemon started.
    pub passes: u64,
    /// How many of the last passes in a row ended with errors (0 after one without): `execute
    /// --wait` gives up at [`ERROR_PASSES`] of them, as a foreground execute does.
    pub error_passes: u64,
    /// A check (verify, commit's final pass) is under way, and has checked this many entries.
    pub checking: bool,
    pub checked: u64,
    /// Entries an abort under way has written back into OLD.
    pub abort_written: u64,
}

/// Passes in a row that end with errors before `execute` stops waiting for them (the entries
/// are still retried, with back-off, by a daemon).
pub const ERROR_PASSES: u64 = 5;

impl Copier {
    pub fn new(view: Arc<View>, journal: Records, opts: Options) -> Arc<Copier> {
        let workers = match opts.workers {
            0 if view.old_is_s3() => DEFAULT_WORKERS_S3,
            0 => DEFAULT_WORKERS_POSIX,
            n => n,
        };
        let filter = filter::load(&journal).unwrap_or_else(|e| {
            // Checked at prepare: a record that no longer reads is a damaged journal. Nothing
            // is left out then (a copy too many, never one too few), and it says so.
            tracing::error!(error = %e, "the migration's filter does not read; nothing is excluded");
            filter::Filter::default()
        });
        let c = Arc::new(Copier {
            view,
            journal,
            workers: AtomicUsize::new(workers),
            bw: Limiter::new(opts.bwlimit),
            ops: Limiter::new(opts.ops_limit),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            recopy_lost: AtomicBool::new(false),
            want: Mutex::new(Want::default()),
            cv: Condvar::new(),
            last: Mutex::new(None),
            passes: AtomicU64::new(0),
            error_streak: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            checked: AtomicU64::new(0),
            running: AtomicBool::new(false),
            recheck: opts.recheck,
            publisher: std::sync::OnceLock::new(),
            remote: std::sync::OnceLock::new(),
            filter,
            bw_table: Mutex::new(None),
            bw_checked: AtomicU64::new(0),
        });
        c.set_bwlimit(
            opts.bw_timetable
                .unwrap_or(limits::Timetable::constant(opts.bwlimit)),
        );
        c
    }

    /// Set the bandwidth limit: a fixed rate, or a timetable the limit then follows (checked
    /// every few seconds by the copier's pacing). Recorded for `status`.
    pub fn set_bwlimit(&self, t: limits::Timetable) {
        let rate = t.rate_now();
        let text = t.varies().then(|| t.text.clone());
        *self.bw_table.lock().unwrap_or_else(|p| p.into_inner()) = t.varies().then_some(t);
        self.bw.set(rate);
        self.record_limits(rate, text);
    }

    /// The timetable the bandwidth limit follows, if any.
    pub fn bw_timetable(&self) -> Option<String> {
        self.bw_table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.text.clone())
    }

    /// Follow the timetable: the limit in force now (looked at every 5 seconds at most).
    fn follow_timetable(&self) {
        let now = now_secs();
        let last = self.bw_checked.load(Ordering::Relaxed);
        if now < last + 5
            || self
                .bw_checked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let table = self.bw_table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = table.as_ref() {
            let rate = t.rate_now();
            if rate != self.bw.get() {
                tracing::info!(bwlimit = rate, timetable = %t.text, "bandwidth limit changed by its timetable");
                self.bw.set(rate);
                let text = Some(t.text.clone());
                drop(table);
                self.record_limits(rate, text);
            }
        }
    }

    /// The limit in force, for `status` (not synced: it is only news).
    fn record_limits(&self, rate: u64, timetable: Option<String>) {
        let mut b = Batch::new();
        b.meta(
            crate::journal::Meta::BwLimit,
            &serde_json::to_vec(&crate::journal::BwLimit {
                in_force: rate,
                timetable,
            })
            .expect("limits serialize"),
        );
        if let Err(e) = self.journal.commit(b, false) {
            tracing::warn!(error = %e, "recording the bandwidth limit");
        }
    }

    /// What prepare's filter leaves out of the migration.
    pub fn filter(&self) -> &filter::Filter {
        &self.filter
    }

    /// Whether the filter leaves the view's entry out (or a directory above it).
    fn excluded_entry(&self, inode: &Inode) -> bool {
        !self.filter.is_empty()
            && self.filter.excludes_path(
                &self.view.view_path(inode),
                inode.kind == crate::view::Kind::Dir,
            )
    }

    /// The publisher of an S3 NEW, for commit, verify and abort.
    pub fn set_publisher(&self, p: Option<Arc<crate::copier::publish::Publisher>>) {
        if let Some(p) = p {
            let _ = self.publisher.set(p);
        }
    }

    /// Hand files to remote workers through `c` (while any is heard from).
    pub fn set_remote(&self, c: Arc<dyn Remote>) {
        let _ = self.remote.set(c);
    }

    /// The remote workers' coordinator, if the daemon serves one.
    pub fn remote(&self) -> Option<&Arc<dyn Remote>> {
        self.remote.get()
    }

    pub fn publisher(&self) -> Option<&Arc<crate::copier::publish::Publisher>> {
        self.publisher.get()
    }

    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    pub fn journal(&self) -> &Records {
        &self.journal
    }

    pub fn state(&self) -> CopierState {
        CopierState {
            running: self.running.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
            workers: self.workers.load(Ordering::Relaxed),
            bwlimit: self.bw.get(),
            bwlimit_timetable: self.bw_timetable(),
            ops_limit: self.ops.get(),
            last_pass: *self.last.lock().unwrap_or_else(|p| p.into_inner()),
            passes: self.passes.load(Ordering::Relaxed),
            error_passes: self.error_streak.load(Ordering::Relaxed),
            checking: self.checking.load(Ordering::Relaxed),
            checked: self.checked.load(Ordering::Relaxed),
            abort_written: crate::metrics::METRICS.abort_written(),
        }
    }

    pub fn set_workers(&self, n: usize) {
        self.workers.store(n.max(1), Ordering::Relaxed);
    }

    /// Whether executing was asked for (`execute`, or a mount without --no-copy).
    pub fn executing(&self) -> bool {
        self.want.lock().unwrap_or_else(|p| p.into_inner()).run
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Start (or resume) executing: the background loop runs passes until executed.
    pub fn execute(&self) -> Result<()> {
        let phase = self.journal.phase()?;
        if matches!(phase, Phase::Committed | Phase::Aborted) {
            return Err(Error::Lifecycle(format!(
                "the migration is {phase}: nothing left to copy"
            )));
        }
        let mut w = self.want.lock().unwrap_or_else(|p| p.into_inner());
        w.run = true;
        w.kick += 1;
        self.paused.store(false, Ordering::Relaxed);
        self.cv.notify_all();
        Ok(())
    }

    /// The next pass copies again every entry NEW took from OLD and lost since (each is an
    /// error until then, so that nothing reports the migration executed while NEW lacks it).
    pub fn recopy_lost(&self) {
        self.recopy_lost.store(true, Ordering::Release);
        self.kick();
    }

    /// Ask for another pass soon (after something found work for it).
    pub fn kick(&self) {
        let mut w = self.want.lock().unwrap_or_else(|p| p.into_inner());
        w.kick += 1;
        self.cv.notify_all();
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Stop copying for good and wait (up to `limit`) until the current pass has ended.
    pub fn halt(&self, limit: Duration) -> bool {
        self.shutdown();
        let t = Instant::now();
        while self.running.load(Ordering::Relaxed) {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The daemon's background loop: idle until executing is wanted, then passes until a clean
    /// one (executed), then idle again until kicked. Errors back off, doubling up to a minute.
    pub fn run_background(self: &Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        let mut seen_kick = 0;
        let mut last_pass = Instant::now();
        loop {
            {
                let mut w = self.want.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if self.stopping() {
                        return;
                    }
                    let phase = self.journal.phase().ok();
                    // Committed or aborted: nothing is left to copy, and a pass would only
                    // refuse. The copier idles until the daemon stops.
                    let finished = matches!(phase, Some(Phase::Committed | Phase::Aborted));
                    let executed = phase == Some(Phase::Executed);
                    let recheck_due = self.recheck.is_some_and(|r| last_pass.elapsed() >= r);
                    if w.run
                        && !finished
                        && !self.paused.load(Ordering::Relaxed)
                        && (!executed || w.kick != seen_kick || recheck_due)
                    {
                        break;
                    }
                    w = self
                        .cv
                        .wait_timeout(w, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    if w.run && !finished && !self.paused.load(Ordering::Relaxed) {
                        drop(w);
                        self.drain_rechecks();
                        w = self.want.lock().unwrap_or_else(|p| p.into_inner());
                    }
                }
                if w.kick != seen_kick {
                    // Asked for again (`execute`, commit, a lookup's recheck): retry errors
                    // soon, not after a back-off grown while nobody waited.
                    backoff = Duration::from_secs(1);
                }
                seen_kick = w.kick;
            }
            last_pass = Instant::now();
            let r = self.run_pass();
            let failed = r.as_ref().map_or(true, |s| s.errors > 0);
            let streak = if failed {
                self.error_streak.load(Ordering::Relaxed) + 1
            } else {
                0
            };
            self.error_streak.store(streak, Ordering::Relaxed);
            self.passes.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(s) if s.clean() => {
                    backoff = Duration::from_secs(1);
                    if let Err(e) = self.mark_executed(&s) {
                        tracing::error!(error = %e, "recording phase executed");
                    }
                }
                Ok(s) if s.errors > 0 => {
                    tracing::warn!(errors = s.errors, retry_in = ?backoff, "copier pass had errors");
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Ok(s) if s.redo > 0 => {
                    // Copies thrown away (the view or OLD changed meanwhile): try again soon,
                    // but never spin.
                    self.sleep(Duration::from_millis(200));
                }
                Ok(_) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "copier pass failed");
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Between passes: check the copies applications looked up against OLD, and copy again
    /// those OLD changed behind the view (listed in status as changed in OLD).
    fn drain_rechecks(&self) {
        let rx = self.view.rechecks();
        while let Ok(inode) = rx.try_recv() {
            if self.stopping() || self.paused.load(Ordering::Relaxed) {
                return;
            }
            // Held while checked and copied again: else the kernel could forget it, and a
            // write through the entry's next inode would not wait for the new copy.
            let Some(_pinned) = self.view.pin(&inode) else {
                continue;
            };
            if !self.view.in_new(&inode) {
                continue;
            }
            match self
                .view
                .check_copy(&inode, true, &mut |n| self.tick_for(n, Some(&inode.cancel)))
            {
                Ok(Check::Stale { recopied, .. }) => {
                    let path = self.view.view_path(&inode);
                    tracing::info!(
                        path = %crate::view::display_path(&path),
                        recopied,
                        "changed in OLD since it was copied (found at lookup)"
                    );
                    let mut b = Batch::new();
                    b.stale(
                        &path,
                        &StaleRecord {
                            found: now_secs(),
                            copied_again: recopied,
                        },
                    );
                    if let Err(e) = self.journal.commit(b, false) {
                        tracing::warn!(error = %e, "recording a stale copy");
                    }
                    if !recopied {
                        self.kick();
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    path = %crate::view::display_path(&self.view.view_path(&inode)),
                    error = %e,
                    "checking a copy against OLD"
                ),
            }
        }
    }

    fn sleep(&self, d: Duration) {
        let w = self.want.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout(w, d);
    }

    /// Passes until a clean one, in this thread (the foreground `execute`). Gives up after
    /// `max_error_passes` passes in a row with errors, returning the last summary.
    pub fn run_until_executed(&self, max_error_passes: u32) -> Result<PassSummary> {
        let mut backoff = Duration::from_secs(1);
        let mut failed = 0;
        loop {
            let s = self.run_pass()?;
            if s.stopped {
                return Ok(s);
            }
            if s.clean() {
                self.mark_executed(&s)?;
                return Ok(s);
            }
            if s.errors > 0 {
                failed += 1;
                if failed >= max_error_passes {
                    return Ok(s);
                }
                tracing::warn!(errors = s.errors, retry_in = ?backoff, "copier pass had errors");
                self.sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                failed = 0;
                if s.redo > 0 {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn mark_executed(&self, s: &PassSummary) -> Result<()> {
        // Totals and done follow what the view holds now, as the clean pass counted it:
        // entries removed through the view leave the migration, entries born in it or gained
        // by OLD behind it join it.
        let (files, dirs, bytes) = s.tally;
        let counted = self.view.done();
        let done = crate::journal::Done { dirs, files, bytes };
        if self.journal.phase()? != Phase::Executed {
            // `counted` is every copy made over the migration's life, restarts included; more
            // than the view holds means copies redone (in flight at a crash, or thrown away).
            tracing::info!(
                counted_files = counted.files,
                view_files = files,
                counted_bytes = counted.bytes,
                view_bytes = bytes,
                "copy counts at executed"
            );
        }
        self.view.set_done(done)?;
        // Nothing left to copy: the work dir's copies-in-making are gone with it.
        self.view.drop_empty_work_dir();
        // What prepare counted of OLD's set-id programs and devices stays (mount's warning).
        let scanned = self.journal.totals()?;
        self.journal.set_totals(&crate::journal::Totals {
            dirs,
            files,
            bytes,
            ..scanned
        })?;
        if self.journal.phase()? != Phase::Executed {
            self.journal.set_phase(Phase::Executed)?;
            tracing::info!(?done, "executed: nothing needs OLD any more");
        }
        Ok(())
    }

    /// One copy pass over the whole view.
    pub fn run_pass(&self) -> Result<PassSummary> {
        let phase = self.journal.phase()?;
        match phase {
            Phase::Committed | Phase::Aborted => {
                return Err(Error::Lifecycle(format!("the migration is {phase}")));
            }
            Phase::Prepared | Phase::Executed => self.journal.set_phase(Phase::Executing)?,
            Phase::Executing => {}
        }
        self.running.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let known_errors: std::collections::HashMap<Vec<u8>, CopyError> =
            self.journal.errors()?.into_iter().collect();
        let c = PassCounters::default();
        let ns_at_start = self.view.ns_changes();
        let recopy_lost = self.recopy_lost.load(Ordering::Acquire);
        let ctx = PassCtx {
            recopy_lost,
            c: &c,
            known: &known_errors,
            seen: Mutex::new(std::collections::HashSet::new()),
            failed: Mutex::new(Default::default()),
        };
        // Files partly copied by writes through the view first, the latest written first.
        for inode in self.view.partial_inodes() {
            if self.stopping() {
                break;
            }
            self.copy_one(&inode, &ctx, false);
        }
        let visit = |inode: &Arc<Inode>, counts: bool| self.copy_one(inode, &ctx, counts);
        let flush = |batch: Vec<(Pending, bool)>| self.flush(batch, &ctx);
        let fail = |path: Vec<u8>, e: &Error| self.record_error(&ctx, path, e);
        let excluded = AtomicU64::new(0);
        let stopped = self.walk(
            true,
            &walk::Visitor {
                visit: &visit,
                flush: &flush,
                fail: &fail,
                excluded: &excluded,
            },
        );
        // What the walk handed to remote workers is copied (or refused) before the pass ends,
        // and counts as this pass's copies (a refused one as a copy to do again).
        if let Some(r) = self.remote.get() {
            let (named, bytes, other) = r.drain(&|| self.stopping());
            c.files.fetch_add(named, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            c.seen_files.fetch_add(named, Ordering::Relaxed);
            c.seen_bytes.fetch_add(bytes, Ordering::Relaxed);
            if !self.stopping() {
                c.redo.fetch_add(other, Ordering::Relaxed);
            }
        }
        // Nothing changed the view's namespace during the pass: no entry can have moved out
        // of the walk's way, so a pass that only copied is complete (no confirming pass).
        let quiet = self.view.ns_changes() == ns_at_start;
        // Errors recorded by earlier passes at paths this pass did not fail on are over.
        let seen = ctx.seen.into_inner().unwrap_or_else(|p| p.into_inner());
        for (errno, n) in ctx.failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            if n > LOGGED_PER_ERRNO {
                tracing::warn!(
                    errno,
                    error = %std::io::Error::from_raw_os_error(errno),
                    failed = n,
                    not_logged = n - LOGGED_PER_ERRNO,
                    "copies failed alike this pass; `ferryfs status` lists every one; will retry"
                );
            }
        }
        if recopy_lost && !stopped {
            self.recopy_lost.store(false, Ordering::Release);
        }
        let mut b = Batch::new();
        for path in known_errors.keys().filter(|p| !seen.contains(*p)) {
            b.clear_error(path);
        }
        {
            let d = self.view.done();
            b.done(&d);
        }
        self.journal.commit(b, false)?;
        let s = PassSummary {
            files_copied: c.files.into_inner(),
            dirs_copied: c.dirs.into_inner(),
            bytes_copied: c.bytes.into_inner(),
            present: c.present.into_inner(),
            recopied: c.recopied.into_inner(),
            redo: c.redo.into_inner(),
            errors: c.errors.into_inner(),
            stopped,
            quiet,
            tally: (
                c.seen_files.into_inner(),
                c.seen_dirs.into_inner(),
                c.seen_bytes.into_inner(),
            ),
            excluded: excluded.into_inner(),
        };
        // (An S3 NEW: copies sent straight into the bucket so far, by this host and by the
        // server.)
        let (bucket_sent, bucket_server_copied) = crate::metrics::METRICS.bucket_copies();
        tracing::info!(
            ?s,
            secs = started.elapsed().as_secs_f64(),
            bucket_sent,
            bucket_server_copied,
            "copier pass done"
        );
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        self.running.store(false, Ordering::Relaxed);
        Ok(s)
    }

    /// The pacing between chunks: bandwidth, pause, yielding to applications; `false` stops.
    fn tick(&self, n: u64) -> bool {
        self.tick_for(n, None)
    }

    /// [`Copier::tick`] for the copy of one entry: once the view waits for that entry (its
    /// `cancel` set: a change through the view waiting for a recopy), no limit, pause or
    /// yield holds the copy back any longer, so the application's request waits only for the
    /// copy itself.
    fn tick_for(&self, n: u64, hurry: Option<&AtomicBool>) -> bool {
        let hurried = || hurry.is_some_and(|h| h.load(Ordering::Acquire));
        self.follow_timetable();
        self.bw.take_unless(n, &|| self.stopping() || hurried());
        while self.paused.load(Ordering::Relaxed) && !self.stopping() && !hurried() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.view.idle_for() < YIELD_WINDOW && !hurried() {
            std::thread::sleep(YIELD_SLEEP);
        }
        !self.stopping()
    }

    /// Copy or check one entry. A plain file's copy may come back pending: the worker names
    /// it with its batch (see [`Copier::flush`]).
    fn copy_one(&self, inode: &Arc<Inode>, p: &PassCtx<'_>, counts: bool) -> Option<Pending> {
        let mut tick = |n| self.tick_for(n, Some(&inode.cancel));
        if p.recopy_lost && self.view.in_new(inode) {
            // A copy NEW lost while the view kept its inode: shown from OLD again, to copy.
            self.view.drop_lost_new_side(inode);
        }
        if !p.recopy_lost && !self.view.in_new(inode) {
            match self.view.lost_copy(inode) {
                Ok(false) => {}
                Ok(true) => {
                    self.account(inode, Err(crate::view::error::Error::lost()), p, counts);
                    return None;
                }
                Err(e) => {
                    self.account(inode, Err(e), p, counts);
                    return None;
                }
            }
        }
        if self.view.in_new(inode) {
            // A file partly copied by a write through the view: its missing chunks.
            match self.view.hydrate(inode, &mut tick) {
                Ok(None) => {}
                Ok(Some((bytes, whole))) => {
                    p.c.bytes.fetch_add(bytes, Ordering::Relaxed);
                    let r = Ok(if whole {
                        Copied::Present
                    } else {
                        Copied::GaveWay
                    });
                    self.account(inode, r, p, counts);
                    return None;
                }
                Err(e) => {
                    self.account(inode, Err(e), p, counts);
                    return None;
                }
            }
        }
        let r = if self.view.in_new(inode) {
            self.view
                .check_copy(inode, true, &mut tick)
                .and_then(|chk| match chk {
                    Check::Local | Check::Same => Ok(Copied::Present),
                    // Removed from the view with OLD's entry (or, a directory, about to be).
                    Check::Gone { .. } => Ok(Copied::GaveWay),
                    Check::Stale { recopied, .. } => {
                        let mut b = Batch::new();
                        b.stale(
                            &self.view.view_path(inode),
                            &StaleRecord {
                                found: now_secs(),
                                copied_again: recopied,
                            },
                        );
                        self.journal.commit(b, false)?;
                        if recopied {
                            p.c.recopied.fetch_add(1, Ordering::Relaxed);
                            Ok(Copied::Present)
                        } else {
                            Ok(Copied::GaveWay)
                        }
                    }
                })
        } else {
            // A remote worker's (the pass waits for it at its end): not copied yet.
            if inode.kind == Kind::File
                && let Some(c) = self.remote.get()
                && c.offer(inode)
            {
                // (Counted when the pass drains what it offered.)
                return None;
            }
            self.ops.take(1, &self.stop);
            if !self.tick(0) {
                return None;
            }
            match self.view.copy_background(inode, &mut tick) {
                Ok(Outcome::Pending(pending)) => return Some(pending),
                Ok(Outcome::Done(d)) => Ok(d),
                Err(e) => Err(e),
            }
        };
        self.account(inode, r, p, counts);
        None
    }

    /// Name a worker's pending copies (one syncfs for all), then count what each became.
    fn flush(&self, batch: Vec<(Pending, bool)>, p: &PassCtx<'_>) {
        let counts: std::collections::HashMap<*const Inode, bool> = batch
            .iter()
            .map(|(pd, c)| (Arc::as_ptr(&pd.inode_arc()), *c))
            .collect();
        let pendings = batch.into_iter().map(|(pd, _)| pd).collect();
        for (inode, r) in self.view.finish_copies(pendings) {
            let c = counts.get(&Arc::as_ptr(&inode)).copied().unwrap_or(true);
            self.account(&inode, r, p, c);
        }
    }

    /// Count what happened to one entry; record its error if it failed. `counts`: the walk's
    /// visit of a name (the tally counts each name once).
    fn account(&self, inode: &Inode, r: Result<Copied>, p: &PassCtx<'_>, counts: bool) {
        let c = p.c;
        match r {
            Ok(done) => {
                match done {
                    Copied::File { bytes } => {
                        c.files.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Copied::Dir => {
                        c.dirs.fetch_add(1, Ordering::Relaxed);
                    }
                    Copied::Present => {
                        c.present.fetch_add(1, Ordering::Relaxed);
                    }
                    Copied::GaveWay | Copied::ChangedInOld => {
                        if !self.stopping() {
                            c.redo.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if counts && self.view.in_new(inode) {
                    if inode.kind == Kind::Dir {
                        c.seen_dirs.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.seen_files.fetch_add(1, Ordering::Relaxed);
                        if inode.kind == Kind::File {
                            let size = match done {
                                Copied::File { bytes } => Some(bytes),
                                _ => self
                                    .view
                                    .backing(inode)
                                    .and_then(|l| l.stat().ok())
                                    .map(|st| st.st_size as u64),
                            };
                            c.seen_bytes.fetch_add(size.unwrap_or(0), Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(e) if e.errno() == libc::ENOENT && self.view.new_path(inode).is_err() => {
                // Removed from the view (unlinked, or its directory renamed away and back)
                // while queued: nothing left to copy. Any new name is found by the next pass.
                tracing::debug!(error = %e, "entry left the view before its copy");
                if !self.stopping() {
                    c.redo.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => self.record_error(p, self.view.view_path(inode), &e),
        }
    }

    /// An entry this pass could not copy, look up or list: counted (the pass is not clean),
    /// logged, and recorded for status with its attempts, retried by the next pass.
    fn record_error(&self, p: &PassCtx<'_>, path: Vec<u8>, e: &Error) {
        p.c.errors.fetch_add(1, Ordering::Relaxed);
        let attempts = p.known.get(&path).map_or(0, |k| k.attempts) + 1;
        let nth = {
            let mut f = p.failed.lock().unwrap_or_else(|p| p.into_inner());
            let n = f.entry(e.errno()).or_default();
            *n += 1;
            *n
        };
        if nth <= LOGGED_PER_ERRNO {
            tracing::warn!(
                path = %String::from_utf8_lossy(&path),
                errno = e.errno(),
                attempts,
                error = %e,
                "copy failed; will retry"
            );
        }
        let rec = CopyError {
            error: e.to_string(),
            errno: e.errno(),
            attempts,
            at: now_secs(),
            conflict: matches!(e, Error::Conflict(_)),
        };
        let mut b = Batch::new();
        b.error(&path, &rec);
        if let Err(e) = self.journal.commit(b, false) {
            tracing::error!(error = %e, "recording a copy error");
        }
        p.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path);
    }

    /// A pass that copies nothing: what is still pending, which copies are stale, and (with
    /// `compare`) which copies differ from OLD in content or metadata.
    pub fn check(&self, compare: Option<crate::view::Compare>) -> Result<CheckReport> {
        struct Checking<'a>(&'a AtomicBool);
        impl Drop for Checking<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.checked.store(0, Ordering::Relaxed);
        self.checking.store(true, Ordering::Relaxed);
        let _checking = Checking(&self.checking);
        // What this check finds replaces what the last one found.
        self.journal.clear_mismatches()?;
        let report = Mutex::new(CheckReport::default());
        let visit = |inode: &Arc<Inode>, counts: bool| -> Option<Pending> {
            if !counts {
                return None; // entries applications touched: the walk meets them anyway
            }
            self.checked.fetch_add(1, Ordering::Relaxed);
            let vpath = self.view.view_path(inode);
            let path = String::from_utf8_lossy(&vpath).into_owned();
            let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
            r.checked += 1;
            drop(r);
            if !self.view.in_new(inode) {
                // An entry NEW took and lost is a mismatch, not one still to copy.
                let lost = self.view.lost_copy(inode);
                let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                match lost {
                    Ok(false) => r.pending.push(path),
                    Ok(true) => r
                        .mismatches
                        .push(format!("{path}: {}", crate::view::error::LOST)),
                    Err(e) => r.errors.push(format!("{path}: {e}")),
                }
                return None;
            }
            if let Some(pr) = self.view.partial_progress(inode) {
                report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pending
                    .push(format!(
                        "{path}: partly copied ({} of {} chunks in NEW)",
                        pr.0, pr.1
                    ));
                return None;
            }
            let mut digest = None;
            let res = self
                .view
                .check_copy(inode, false, &mut |_| !self.stopping())
                .and_then(|chk| match (chk, compare) {
                    (Check::Stale { .. }, _) => {
                        Ok(Some(format!("{path}: changed in OLD since it was copied")))
                    }
                    (Check::Gone { .. }, _) => Ok(Some(format!(
                        "{path}: removed from OLD since it was copied"
                    ))),
                    (Check::Same, Some(how)) => self
                        .view
                        .compare_copy(inode, how, &mut digest)
                        .map(|d| d.map(|d| format!("{path}: {d}"))),
                    _ => Ok(None),
                });
            // For the per-file report: what a checksum read, what differs.
            let mut b = Batch::new();
            if let Some(d) = &digest {
                b.digest(d.dev, d.ino, &d.digest);
            }
            if let Ok(Some(m)) = &res {
                let detail = m.strip_prefix(&format!("{path}: ")).unwrap_or(m);
                b.mismatch(
                    &vpath,
                    &crate::journal::Mismatch {
                        detail: detail.to_string(),
                        at: now_secs(),
                    },
                );
            }
            if !b.is_empty()
                && let Err(e) = self.journal.commit(b, false)
            {
                tracing::warn!(error = %e, "recording what verify found");
            }
            let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
            match res {
                Ok(None) => {}
                Ok(Some(m)) if m.ends_with("since it was copied") => r.stale.push(m),
                Ok(Some(m)) => r.mismatches.push(m),
                Err(e) => r.errors.push(format!("{path}: {e}")),
            }
            None
        };
        let fail = |path: Vec<u8>, e: &Error| {
            report
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .errors
                .push(format!("{}: {e}", String::from_utf8_lossy(&path)));
        };
        let excluded = AtomicU64::new(0);
        self.walk(
            false,
            &walk::Visitor {
                visit: &visit,
                flush: &|_| {},
                fail: &fail,
                excluded: &excluded,
            },
        );
        let mut r = report.into_inner().unwrap_or_else(|p| p.into_inner());
        r.excluded = excluded.into_inner();
        for (path, e) in self.journal.errors()? {
            r.errors.push(format!(
                "{}: {} (copier, {} attempts)",
                String::from_utf8_lossy(&path),
                e.error,
                e.attempts
            ));
        }
        r.pending.sort();
        r.stale.sort();
        r.mismatches.sort();
        Ok(r)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
