//! One function per subcommand: what it does, in the daemon that serves the state dir when
//! one does (over the control socket), else in this process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::CliError;
use super::args::{ExecuteArgs, PrepareArgs};
use super::progress::{self, Reporter, draw, human, progress_line};
use super::target::{Offline, Target, ask, daemon_state, print_answer};
use crate::control::{Aborted, Request};
use crate::copier::{self, CheckReport};
use crate::daemon::{self, MountArgs};
use crate::lifecycle;
use crate::state;
use crate::store::StoreSpec;

pub fn prepare(p: &PrepareArgs) -> Result<(), CliError> {
    let mut old = StoreSpec::parse(&p.old).map_err(CliError::Usage)?;
    let mut new = StoreSpec::parse(&p.new).map_err(CliError::Usage)?;
    if let Some(profile) = &p.old_s3_profile {
        old = old
            .with_s3_profile(profile, "OLD", "--old-s3-profile")
            .map_err(CliError::Usage)?;
    }
    if let Some(style) = &p.s3_metadata {
        new = new
            .with_s3_metadata(style, "NEW")
            .map_err(CliError::Usage)?;
    }
    if let Some(profile) = &p.new_s3_profile {
        new = new
            .with_s3_profile(profile, "NEW", "--new-s3-profile")
            .map_err(CliError::Usage)?;
    }
    let filter = crate::copier::filter::Filter::new(p.rules.clone()).map_err(CliError::Usage)?;
    if p.dry_run {
        return dry_run(&old, &new, &p.state, &filter);
    }
    if p.if_absent
        && let Some(c) = state::already_prepared(&old, &new, &p.state)?
    {
        println!(
            "already prepared: OLD {} -> NEW {}; state in {} (nothing changed)",
            c.old,
            c.new,
            p.state.display()
        );
        return Ok(());
    }
    // The scan of OLD can take minutes on a big or remote tree: how far it is, every second.
    let shower = Reporter::start(1, || {
        let t = crate::copier::scan::SCAN_PROGRESS.get();
        Some(format!(
            "prepare: scanning OLD: {} dirs, {} files, {} so far",
            t.dirs,
            t.files,
            human(t.bytes)
        ))
    });
    let t = state::prepare(
        old.clone(),
        new.clone(),
        &p.state,
        p.allow_nonempty_new,
        &filter,
        p.chunk_size.unwrap_or(crate::journal::DEFAULT_CHUNK_SIZE),
    );
    drop(shower);
    let (t, caps) = t?;
    println!(
        "prepared: OLD {old} ({} dirs, {} files, {} bytes) -> NEW {new}; state in {}",
        t.dirs,
        t.files,
        t.bytes,
        p.state.display()
    );
    if !filter.is_empty() {
        println!(
            "filter: {}; it leaves out {} dirs, {} files, {} ({} bytes): shown from OLD until \
             commit, never copied",
            crate::copier::filter::rules_display(&filter),
            t.excluded_dirs,
            t.excluded_files,
            human(t.excluded_bytes),
            t.excluded_bytes
        );
    }
    print!("{}", caps.table());
    for w in capability_warnings(&caps, &t) {
        println!("warning: {w}");
    }
    if t.setid > 0 || t.devices > 0 {
        println!(
            "note: OLD holds {} set-id program(s) and {} device file(s); the view is \
             nosuid,nodev unless mounted with -o suid,dev (docs/CONFIGURATION.md)",
            t.setid, t.devices
        );
    }
    Ok(())
}

/// What NEW cannot hold as OLD has it, with the count of OLD entries concerned where the scan
/// counted them: each such entry fails to copy later, with an error naming it.
fn capability_warnings(
    caps: &crate::store::probe::Capabilities,
    t: &crate::journal::Totals,
) -> Vec<String> {
    caps.new
        .iter()
        .filter(|c| !c.ok && c.degrades)
        // Nothing in OLD that NEW's lack of hard links would change.
        .filter(|c| c.name != "hard_links" || t.hardlinks > 0)
        .map(|c| {
            let count = match c.name.as_str() {
                "hard_links" => format!(" ({} names of hard-linked files in OLD)", t.hardlinks),
                _ => String::new(),
            };
            format!("NEW lacks {}{count}: {}; {}", c.name, c.detail, c.fallback)
        })
        .collect()
}

/// `mount`: serve in this process (`--foreground`), or start the daemon in the background
/// and return once it serves. `raw`: the command's own arguments, for the background child.
pub fn mount(
    args: &MountArgs,
    foreground: bool,
    log_format: super::LogFormat,
    raw: &[OsString],
) -> Result<(), CliError> {
    if foreground {
        let ready = daemon::Ready::from_env();
        daemon::process::block_termination_signals();
        super::init_logging("info", log_format);
        daemon::serve(args, ready).map_err(CliError::Daemon)
    } else {
        daemon::spawn_background(args, raw).map_err(CliError::Daemon)
    }
}

pub fn status(state: &Path, json: bool, watch: bool) -> Result<(), CliError> {
    loop {
        // The progress line shows no `local`: no walk of NEW every second.
        let s = if watch && !json {
            state::progress(state)
        } else {
            state::status(state)
        }?;
        if json {
            println!("{}", serde_json::to_string(&s).expect("status serializes"));
        } else if watch {
            draw(&progress_line(&s), true);
        } else {
            progress::print_status(&s);
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `pause`, `resume`, `limits`: the running copier's, so only with a daemon.
pub fn daemon_only(state: &Path, req: Request) -> Result<(), CliError> {
    match ask(state, &req)? {
        Some(r) => print_answer(r),
        None => Err(CliError::Failed(format!(
            "no daemon serves {} (mount it first; its copier is what this command controls)",
            state.display()
        ))),
    }
}

/// `limits`'s request from its flags.
pub fn limits_request(
    bwlimit: Option<&str>,
    ops_limit: Option<u64>,
    workers: Option<usize>,
) -> Result<Request, CliError> {
    let (bwlimit, bwlimit_timetable) = bw_request(bwlimit)?;
    Ok(Request::Limits {
        bwlimit,
        bwlimit_timetable,
        ops_limit,
        workers,
    })
}

/// `--bwlimit` for a request: a fixed rate, or a timetable (sent as written, checked here).
fn bw_request(bwlimit: Option<&str>) -> Result<(Option<u64>, Option<String>), CliError> {
    let Some(s) = bwlimit else {
        return Ok((None, None));
    };
    let t = copier::limits::Timetable::parse(s).map_err(CliError::Usage)?;
    Ok(if t.varies() {
        (None, Some(t.text))
    } else {
        (Some(t.rate_at(0)), None)
    })
}

pub fn execute(e: &ExecuteArgs) -> Result<(), CliError> {
    let state = e.state.as_path();
    let (bwlimit, bwlimit_timetable) = bw_request(e.bwlimit.as_deref())?;
    if e.workers.is_some() || e.bwlimit.is_some() || e.ops_limit.is_some() {
        let limits = Request::Limits {
            bwlimit,
            bwlimit_timetable: bwlimit_timetable.clone(),
            ops_limit: e.ops_limit,
            workers: e.workers,
        };
        if let Some(r) = ask(state, &limits)? {
            r.accepted()?;
        }
    }
    if e.recopy_lost
        && let Some(r) = ask(state, &Request::RecopyLost)?
    {
        r.accepted()?;
    }
    if let Some(r) = ask(state, &Request::Execute)? {
        println!("{}", r.accepted()?);
        return if e.wait { wait_executed(state) } else { Ok(()) };
    }
    // No daemon: copy in this process until done.
    let opts = copier::Options {
        workers: e.workers.map_or(0, |w| w.max(1)),
        bwlimit: bwlimit.unwrap_or(0),
        bw_timetable: bwlimit_timetable
            .map(|t| copier::limits::Timetable::parse(&t).map_err(CliError::Usage))
            .transpose()?,
        ops_limit: e.ops_limit.unwrap_or(0),
        recheck: None,
    };
    let o = Offline::open(state, opts)?;
    if e.recopy_lost {
        o.copier.recopy_lost();
    }
    execute_here(state, &o)
}

/// `execute --wait` with a daemon: progress until the migration is executed (and an S3 NEW's
/// bucket holds it all), or until the daemon's passes keep failing.
fn wait_executed(state: &Path) -> Result<(), CliError> {
    // The daemon's passes so far: it retries failing entries for ever, but this command
    // stops waiting once ERROR_PASSES passes in a row since it began ended with errors.
    let passes = |state: &Path| daemon_state(state).map(|s| (s.passes, s.error_passes));
    // Counted from the first answer (a daemon busy at the first ask is asked again).
    let mut first = passes(state).map(|p| p.0);
    let tty = || std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = state::progress(state)?;
        draw(&progress_line(&s), true);
        if s.phase != "executed"
            && let Some((n, failing)) = passes(state)
            && failing >= copier::ERROR_PASSES
            && n.saturating_sub(*first.get_or_insert(n)) >= copier::ERROR_PASSES
        {
            if tty() {
                println!();
            }
            for e in &s.errors {
                eprintln!("  {}: {}", e.path, e.error);
            }
            return Err(CliError::Failed(format!(
                "not executed: {} entries failed in each of the last {failing} passes; the \
                 daemon goes on retrying them (back-off up to a minute): fix the cause, then \
                 run execute again",
                s.errors.len()
            )));
        }
        // An S3 NEW: done once the bucket holds it all, too, or failed uploads say why it
        // cannot (once the copier is done, the errors left are the publisher's).
        if s.phase == "executed" {
            let settled = s.published.is_none_or(|p| p.settled);
            if (settled || !s.errors.is_empty()) && tty() {
                println!();
            }
            if settled {
                return Ok(());
            }
            if !s.errors.is_empty() {
                for e in &s.errors {
                    eprintln!("  {}: {}", e.path, e.error);
                }
                return Err(CliError::Failed(format!(
                    "executed, but {} entries could not be uploaded into NEW (they are \
                     retried every 30 s; fix the cause, then run execute again)",
                    s.errors.len()
                )));
            }
        }
        if !s.mounted {
            return Err(CliError::Failed(
                "the daemon stopped before the migration was executed".into(),
            ));
        }
    }
}

/// `execute` without a daemon: the copier in this process until everything is copied.
fn execute_here(state: &Path, o: &Offline) -> Result<(), CliError> {
    let (c, journal) = (&o.copier, &o.migration.journal);
    c.execute()?;
    let shower = {
        let (c, journal, state) = (c.clone(), journal.clone(), state.to_path_buf());
        let mut meter = copier::RateMeter::default();
        // Plain lines every 10 s off a terminal.
        Reporter::start(10, move || {
            let bps = meter.sample(c.view().done().bytes);
            let _ = journal.record_rate(bps);
            let s = state::status_of(&journal, &state, false).ok()?;
            Some(progress_line(&s))
        })
    };
    let res = c.run_until_executed(copier::ERROR_PASSES as u32);
    drop(shower);
    let summary = res?;
    if let Some(p) = &o.opened.publisher {
        // An S3 NEW: the staging tree into the bucket before this process ends.
        let r = p
            .settle(5)
            .map_err(|e| CliError::Failed(format!("uploading into NEW: {e}")))?;
        println!(
            "NEW {}: {} objects, {} uploaded ({} bytes), {} copied by the server, {} deleted",
            o.migration.config.new, r.objects, r.uploaded, r.uploaded_bytes, r.copied, r.deleted
        );
        if !r.errors.is_empty() {
            for (k, e) in &r.errors {
                eprintln!("  {k}: {e}");
            }
            return Err(CliError::Failed(format!(
                "{} objects could not be uploaded into NEW (run execute again once the cause is fixed)",
                r.errors.len()
            )));
        }
    }
    let s = state::status_of(journal, state, false)?;
    draw(&progress_line(&s), false);
    if s.phase == "executed" {
        println!("executed: nothing needs OLD any more; verify, then commit");
        Ok(())
    } else {
        for e in &s.errors {
            eprintln!("  {}: {}", e.path, e.error);
        }
        Err(CliError::Failed(format!(
            "not executed: {} entries failed in the last pass (run execute again once the cause is fixed)",
            summary.errors
        )))
    }
}

/// The mounted daemon's count of entries checked by the check it runs, if it runs one.
fn daemon_checked(state: PathBuf) -> impl Fn() -> Option<u64> + Send + 'static {
    move || {
        let s = daemon_state(&state)?;
        s.checking.then_some(s.checked)
    }
}

/// The count of entries checked by a check in this process's copier.
fn offline_checked(o: &Offline) -> impl Fn() -> Option<u64> + Send + 'static {
    let c = o.copier.clone();
    move || {
        let s = c.state();
        s.checking.then_some(s.checked)
    }
}

pub fn verify(state: &Path, checksum: bool) -> Result<(), CliError> {
    let report: CheckReport = match Target::find(state, Default::default())? {
        Target::Daemon => {
            let _progress = Reporter::checking("verify", state, daemon_checked(state.into()));
            match ask(state, &Request::Verify { checksum })? {
                Some(r) => r.reply()?,
                None => verify_here(state, checksum, &Offline::open(state, Default::default())?)?,
            }
        }
        Target::Offline(o) => verify_here(state, checksum, &o)?,
    };
    for l in report
        .mismatches
        .iter()
        .chain(&report.stale)
        .chain(&report.errors)
    {
        println!("MISMATCH {l}");
    }
    println!(
        "verify: {} entries checked, {} mismatches, {} changed in OLD since copied, {} errors, {} not copied yet",
        report.checked,
        report.mismatches.len(),
        report.stale.len(),
        report.errors.len(),
        report.pending.len()
    );
    if report.mismatches.is_empty() && report.stale.is_empty() && report.errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed("verification failed".into()))
    }
}

fn verify_here(state: &Path, checksum: bool, o: &Offline) -> Result<CheckReport, CliError> {
    let _progress = Reporter::checking("verify", state, offline_checked(o));
    Ok(lifecycle::verify(&o.copier, checksum)?)
}

/// `prepare --dry-run`: what would move; nothing changed.
fn dry_run(
    old: &StoreSpec,
    new: &StoreSpec,
    state: &Path,
    filter: &crate::copier::filter::Filter,
) -> Result<(), CliError> {
    let shower = Reporter::start(1, || {
        let t = crate::copier::scan::SCAN_PROGRESS.get();
        Some(format!(
            "dry run: scanning OLD: {} dirs, {} files, {} so far",
            t.dirs,
            t.files,
            human(t.bytes)
        ))
    });
    let d = state::dry_run(old, new, state, filter);
    drop(shower);
    let d = d?;
    let t = &d.totals;
    println!("dry run of OLD {old} -> NEW {new}: nothing was changed anywhere");
    println!(
        "would move: {} dirs, {} files, {} ({} bytes)",
        t.dirs,
        t.files,
        human(t.bytes),
        t.bytes
    );
    if filter.is_empty() {
        println!("filter: none (everything moves)");
    } else {
        println!(
            "filter: {}; left out: {} dirs, {} files, {} ({} bytes)",
            crate::copier::filter::rules_display(filter),
            t.excluded_dirs,
            t.excluded_files,
            human(t.excluded_bytes),
            t.excluded_bytes
        );
    }
    println!(
        "set-id programs: {}; device files: {}; hard-linked names: {}",
        t.setid, t.devices, t.hardlinks
    );
    let mut cannot = Vec::new();
    if t.too_long > 0 {
        cannot.push(if d.new_is_s3 {
            format!(
                "{} entries whose key would be longer than the {} bytes S3 allows below NEW's prefix",
                t.too_long, d.limits.path
            )
        } else {
            format!(
                "{} entries whose name is longer than NEW's limit of {} bytes",
                t.too_long, d.limits.name
            )
        });
    }
    if d.new_is_s3 && t.devices > 0 {
        cannot.push(format!(
            "{} device files (an S3 NEW holds files only)",
            t.devices
        ));
    }
    if d.new_is_s3 && t.hardlinks > 0 {
        cannot.push(format!(
            "{} hard-linked names as links (each becomes an object of its own)",
            t.hardlinks
        ));
    }
    if let Some(free) = d.new_free
        && free < t.bytes
    {
        cannot.push(format!(
            "{} of data in {} of free space",
            human(t.bytes),
            human(free)
        ));
    }
    if cannot.is_empty() {
        println!("NEW could not hold: nothing (as far as names, kinds and free space tell)");
    } else {
        for c in cannot {
            println!("NEW could not hold: {c}");
        }
    }
    if d.state_taken {
        println!(
            "note: state dir {} already holds a migration: prepare would refuse it",
            state.display()
        );
    }
    Ok(())
}

pub fn commit(state: &Path, yes: bool) -> Result<(), CliError> {
    let o = match Target::find(state, Default::default())? {
        Target::Daemon => {
            let progress = Reporter::checking("commit", state, daemon_checked(state.into()));
            let r = ask(state, &Request::Commit { yes })?;
            drop(progress);
            match r {
                Some(r) => return print_answer(r),
                // The daemon stopped meanwhile.
                None => Offline::open(state, Default::default())?,
            }
        }
        Target::Offline(o) => *o,
    };
    let progress = Reporter::checking("commit", state, offline_checked(&o));
    let msg = lifecycle::commit(
        &o.copier,
        &o.migration.journal,
        o.opened.new.root(),
        state,
        yes,
    );
    drop(progress);
    println!("{}", msg?);
    Ok(())
}

/// `ferryfs report`: the per-file report, to stdout or a file (made aside, then renamed).
pub fn report(
    state: &Path,
    format: crate::state::report::Format,
    output: Option<&Path>,
) -> Result<(), CliError> {
    use std::io::Write;
    let mut records = crate::state::report::open(state)?;
    let io_err = |p: &Path, e: std::io::Error| CliError::Failed(format!("{}: {e}", p.display()));
    match output {
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            crate::state::report::write_records(format, &mut w, &mut records)
                .map_err(|e| io_err(Path::new("stdout"), e))?;
            w.flush().map_err(|e| io_err(Path::new("stdout"), e))?;
        }
        Some(path) => {
            let tmp = path.with_extension("partial");
            let f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            let mut w = std::io::BufWriter::new(f);
            let n = crate::state::report::write_records(format, &mut w, &mut records)
                .map_err(|e| io_err(&tmp, e))?;
            let f = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
            eprintln!("report: {n} records written to {}", path.display());
        }
    }
    Ok(())
}

/// An abort's progress words.
const ABORT_WORDS: (&str, &str, &str) = ("writing", "of the view back into OLD", "written back");

pub fn resolve(state: &Path, paths: &[String]) -> Result<(), CliError> {
    let req = Request::Resolve {
        paths: paths.to_vec(),
    };
    if let Some(r) = ask(state, &req)? {
        return print_answer(r);
    }
    let o = Offline::open(state, Default::default())?;
    println!("{}", lifecycle::resolve(&o.copier, paths)?);
    Ok(())
}

pub fn abort(state: &Path, keep_new: bool) -> Result<(), CliError> {
    if ask(state, &Request::Status)?.is_some() {
        let st = state.to_path_buf();
        let progress = Reporter::counting("abort", ABORT_WORDS, state, move || {
            daemon_state(&st)
                .map(|s| s.abort_written)
                .filter(|n| *n > 0)
        });
        let r = ask(state, &Request::Abort { keep_new })?;
        drop(progress);
        if let Some(r) = r {
            // The daemon detaches the view once it has answered: wait for that, so the caller
            // finds OLD's own path again when this returns.
            let mp = r.clone().reply::<Aborted>().ok().map(|a| a.mountpoint);
            print_answer(r)?;
            if let Some(mp) = mp {
                wait_detached(&mp);
            }
            return Ok(());
        }
    }
    let o = Offline::open(state, Default::default())?;
    let old = match (&o.opened.old, &o.opened.old_s3) {
        (Some(p), _) => lifecycle::OldTarget::Posix(p.root()),
        (None, Some(t)) => lifecycle::OldTarget::S3(t),
        (None, None) => {
            return Err(CliError::Failed(
                "the migration is committed: abort is no longer possible".into(),
            ));
        }
    };
    let progress = Reporter::counting("abort", ABORT_WORDS, state, || {
        let n = crate::metrics::METRICS.abort_written();
        (n > 0).then_some(n)
    });
    let msg = lifecycle::abort(
        &o.opened.view,
        &o.migration.journal,
        old,
        o.opened.new.root(),
        keep_new,
        o.opened.publisher.as_deref(),
    );
    drop(progress);
    println!("{}", msg?);
    Ok(())
}

/// `ferryfs worker`: copy what the coordinator hands out until it says the copy is done.
pub fn worker(w: &super::args::WorkerArgs) -> Result<(), CliError> {
    use crate::workers::worker;
    let token = crate::workers::coordinator::read_token(&w.token_file).map_err(CliError::Usage)?;
    let bwlimit = copier::limits::parse_rate(&w.bwlimit).map_err(CliError::Usage)?;
    let o = worker::Options {
        coordinator: w.coordinator.clone(),
        ca_file: w.ca_file.clone(),
        token: String::from_utf8_lossy(&token).into_owned(),
        id: w.id.clone().unwrap_or_else(worker::default_id),
        old: w.old.clone(),
        new: w.new.clone(),
        threads: w.threads,
        bwlimit,
    };
    worker::run(&o).map_err(|e| match e {
        worker::Stop::Refused(s) => CliError::Refused(format!("refused: {s}")),
        worker::Stop::Failed(s) => CliError::Failed(s),
    })
}

/// `ferryfs workers-token`: a new token on stdout.
pub fn workers_token() -> Result<(), CliError> {
    let t = crate::workers::coordinator::new_token()
        .map_err(|e| CliError::Failed(format!("reading /dev/urandom: {e}")))?;
    println!("{t}");
    Ok(())
}

pub fn unmount(mp: &Path) -> Result<(), CliError> {
    daemon::unmount(mp).map_err(CliError::Daemon)
}

/// Wait (at most 30 s) until the view at `mp` is detached.
fn wait_detached(mp: &Path) {
    let t = Instant::now();
    while crate::fuse::mount::ferryfs_mount_at(mp).is_some()
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}
