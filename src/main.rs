//! The `ferryfs` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferryfs::control::{self, Request};
use ferryfs::daemon::{self, MountArgs};
use ferryfs::state::{self, Migration};
use ferryfs::store::StoreSpec;
use ferryfs::{copier, lifecycle};

#[derive(Parser)]
#[command(
    name = "ferryfs",
    version,
    about = "Move a live dataset from an OLD store to a NEW store with no downtime"
)]
struct Cli {
    /// Log line format on stderr (and in STATE/ferryfs.log for a background mount): `text`
    /// for people, `json` (one object per line) for log collectors. The level filter is
    /// FERRYFS_LOG (tracing's env-filter syntax, e.g. `info,ferryfs::copier=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check both stores, record them, and create the migration's journal in the state dir.
    Prepare {
        /// The store the data lives in today: an absolute directory path, posix:/path, or
        /// s3://bucket[/prefix][?endpoint=URL&region=R&profile=P&path_style=true] (credentials
        /// from the profile or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, never in the URL).
        #[arg(long)]
        old: String,
        /// The store the data moves to; must be empty unless --allow-nonempty-new.
        #[arg(long)]
        new: String,
        /// The migration's state directory (journal, lock, log). Must not be inside a store.
        #[arg(long)]
        state: PathBuf,
        /// Accept a NEW that already holds entries; they win over OLD's in the view.
        #[arg(long)]
        allow_nonempty_new: bool,
        /// Succeed without changing anything when the state dir already holds a migration of
        /// this same OLD and NEW (for service managers and init containers that run prepare
        /// on every start); one of other stores is still refused.
        #[arg(long)]
        if_absent: bool,
        /// The AWS profile (~/.aws/credentials, ~/.aws/config) an S3 OLD is reached with: its
        /// keys (they win over AWS_ACCESS_KEY_ID), and its region and endpoint_url where neither
        /// the URL nor the environment sets them. The same as profile= in the OLD URL;
        /// recorded with the store (the name, never the keys).
        #[arg(long, value_name = "PROFILE")]
        old_s3_profile: Option<String>,
        /// The AWS profile an S3 NEW is reached with (as --old-s3-profile): OLD and NEW may
        /// use different credentials and endpoints.
        #[arg(long, value_name = "PROFILE")]
        new_s3_profile: Option<String>,
    },
    /// Serve the view at MOUNTPOINT (which may be OLD's own path). Returns once it serves.
    Mount {
        #[arg(long)]
        state: PathBuf,
        mountpoint: PathBuf,
        /// Stay attached (for systemd and containers) instead of serving in the background.
        #[arg(long)]
        foreground: bool,
        /// Do not start the background copier; `ferryfs execute` starts it later.
        #[arg(long)]
        no_copy: bool,
        /// Which open files the kernel reads and writes directly, at native speed (FUSE
        /// passthrough): `new` (files whose data is in NEW), `all` (also read-only opens of
        /// OLD-only files; a write to such a file then waits for those readers, up to 2 s,
        /// else EBUSY), `off` (all data through the daemon).
        #[arg(long, value_enum, default_value_t = ferryfs::fuse::PassthroughMode::New)]
        passthrough: ferryfs::fuse::PassthroughMode,
        /// Seconds the kernel may cache names and attributes without asking the daemon. Changes
        /// made through the view show at once whatever the value; it bounds how late a change
        /// made in OLD behind the view's back shows. Raise it for big, read-mostly trees.
        #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_ttl)]
        metadata_ttl: f64,
        #[command(flatten)]
        limits: LimitArgs,
        /// Mount options, comma separated: allow_other, allow_root, ro, [no]suid, [no]dev,
        /// [no]exec, noatime. The view is nosuid,nodev unless given suid,dev.
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Serve Prometheus metrics at /metrics and the health checks /healthz (liveness) and
        /// /readyz (readiness) over HTTP at this address, e.g. 127.0.0.1:9477 (port 0: any).
        /// Off by default. The endpoints are unauthenticated and read-only: bind to loopback
        /// or a pod-internal address.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Restart without unmount: take the live view over from the daemon serving this
        /// state dir at MOUNTPOINT (after an upgrade, or to change flags). Applications keep
        /// their open files and see a pause, not an error; the old daemon exits. Mount
        /// options (-o) stay as first mounted; the copier keeps its state and limits. If
        /// anything fails before the old daemon lets go, it keeps serving. Linux 6.9 or later.
        #[arg(long)]
        takeover: bool,
        /// Whether directory listings carry each entry's attributes: `always` (a stat after a
        /// listing costs no request: ls -l, find -printf, rsync, du; a listing nobody stats
        /// costs the daemon a lookup per entry), `auto` (the kernel's heuristic: attributes
        /// for a directory's first chunk, then only while lookups follow), `off`. A takeover
        /// keeps the first daemon's choice (it is negotiated at mount).
        #[arg(long, value_enum, default_value_t = ferryfs::fuse::ReaddirPlus::Always)]
        readdirplus: ferryfs::fuse::ReaddirPlus,
    },
    /// Show the migration's phase and progress.
    Status {
        #[arg(long)]
        state: PathBuf,
        /// One JSON object, for machines.
        #[arg(long)]
        json: bool,
        /// Keep showing progress, every second, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Start or resume the copier: in the mounted daemon if one serves the state dir, else in
    /// this process until everything is copied.
    Execute {
        #[arg(long)]
        state: PathBuf,
        /// With a daemon: wait until the migration is executed, showing progress.
        #[arg(long)]
        wait: bool,
        /// Copier worker threads [default: 16 for a POSIX OLD, 64 for an S3 OLD, or the daemon's
        /// setting].
        #[arg(long)]
        workers: Option<usize>,
        /// Copier bandwidth limit in bytes/s (k, M, G suffixes); 0 is unlimited [default: 0,
        /// or the daemon's setting].
        #[arg(long)]
        bwlimit: Option<String>,
        /// Copier limit in entries/s; 0 is unlimited [default: 0, or the daemon's setting].
        #[arg(long)]
        ops_limit: Option<u64>,
    },
    /// Pause the running copier.
    Pause {
        #[arg(long)]
        state: PathBuf,
    },
    /// Resume a paused copier.
    Resume {
        #[arg(long)]
        state: PathBuf,
    },
    /// Change the running copier's limits.
    Limits {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        bwlimit: Option<String>,
        #[arg(long)]
        ops_limit: Option<u64>,
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check that every entry NEW took from OLD still equals OLD; exit 0 only if so.
    Verify {
        #[arg(long)]
        state: PathBuf,
        /// Compare every byte of data too, not only size, times, mode, owner and xattrs.
        #[arg(long)]
        checksum: bool,
    },
    /// Make NEW the dataset: only when executed and a final pass over OLD is clean.
    Commit {
        #[arg(long)]
        state: PathBuf,
    },
    /// Return everything to OLD, including every change made through the view.
    Abort {
        #[arg(long)]
        state: PathBuf,
        /// Leave what ferryfs put into NEW where it is.
        #[arg(long)]
        keep_new: bool,
    },
    /// Unmount a view and wait for its daemon to exit.
    Unmount { mountpoint: PathBuf },
}

#[derive(clap::Args, Clone)]
struct LimitArgs {
    /// Copier worker threads (each keeps up to 32 copies waiting for its batch's syncfs)
    /// [default: 16 for a POSIX OLD, 64 for an S3 OLD].
    #[arg(long)]
    workers: Option<usize>,
    /// Copier bandwidth limit in bytes/s (k, M, G suffixes: 50M); 0 is unlimited.
    #[arg(long, default_value = "0")]
    bwlimit: String,
    /// Copier limit in entries/s; 0 is unlimited.
    #[arg(long, default_value_t = 0)]
    ops_limit: u64,
    /// Once executed, check every copy against OLD again every SECS seconds (a change made in
    /// OLD behind the view is copied again); 0 checks only at commit and verify.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    recheck_interval: u64,
}

impl LimitArgs {
    fn options(&self) -> Result<copier::Options, String> {
        Ok(copier::Options {
            workers: self.workers.map_or(0, |w| w.max(1)),
            bwlimit: copier::parse_rate(&self.bwlimit)?,
            ops_limit: self.ops_limit,
            recheck: (self.recheck_interval > 0)
                .then(|| std::time::Duration::from_secs(self.recheck_interval)),
        })
    }
}

/// `--metadata-ttl`: seconds, 0 to 86400.
fn parse_ttl(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("{v} is outside 0 to 86400 seconds"));
    }
    Ok(v)
}

/// Logs to stderr, filtered by FERRYFS_LOG (default `default`: info for the daemon, warn for
/// the CLI's own work, so progress lines stay readable).
fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRYFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Span fields (op, ino of the FUSE request) ride along in "span"/"spans".
        LogFormat::Json => fmt.json().with_current_span(true).init(),
    }
}

fn run() -> Result<(), String> {
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let cli = Cli::parse();
    let log_format = cli.log_format;
    if !matches!(cli.cmd, Cmd::Mount { .. } | Cmd::Status { .. }) {
        init_logging("warn", log_format);
    }
    if matches!(cli.cmd, Cmd::Status { .. }) {
        // `ferryfs status | head` ends quietly, as Unix tools do, instead of panicking on the
        // closed pipe. Only status: it writes to stdout and reads files, no socket, so no
        // other write can meet a closed peer.
        // SAFETY: setting a signal's disposition to the default, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.cmd {
        Cmd::Prepare {
            old,
            new,
            state,
            allow_nonempty_new,
            if_absent,
            old_s3_profile,
            new_s3_profile,
        } => {
            let mut old = StoreSpec::parse(&old)?;
            let mut new = StoreSpec::parse(&new)?;
            if let Some(p) = &old_s3_profile {
                old = old.with_s3_profile(p, "OLD", "--old-s3-profile")?;
            }
            if let Some(p) = &new_s3_profile {
                new = new.with_s3_profile(p, "NEW", "--new-s3-profile")?;
            }
            if if_absent
                && let Some(c) =
                    state::already_prepared(&old, &new, &state).map_err(|e| e.to_string())?
            {
                println!(
                    "already prepared: OLD {} -> NEW {}; state in {} (nothing changed)",
                    c.old,
                    c.new,
                    state.display()
                );
                return Ok(());
            }
            // The scan of OLD can take minutes on a big or remote tree: how far it is, every
            // second (a redrawn line on a terminal, a plain line otherwise).
            let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
            let shower = std::thread::spawn(move || {
                use std::io::{IsTerminal, Write};
                let tty = std::io::stdout().is_terminal();
                let mut shown = false;
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(std::time::Duration::from_secs(1))
                {
                    let t = state::SCAN_PROGRESS.get();
                    let line = format!(
                        "prepare: scanning OLD: {} dirs, {} files, {} so far",
                        t.dirs,
                        t.files,
                        human(t.bytes)
                    );
                    let mut out = std::io::stdout();
                    if tty {
                        let _ = write!(out, "\r\x1b[K{line}");
                        let _ = out.flush();
                        shown = true;
                    } else {
                        let _ = writeln!(out, "{line}");
                    }
                }
                if shown {
                    println!();
                }
            });
            let t = state::prepare(old.clone(), new.clone(), &state, allow_nonempty_new);
            drop(stop);
            let _ = shower.join();
            let t = t.map_err(|e| e.to_string())?;
            println!(
                "prepared: OLD {old} ({} dirs, {} files, {} bytes) -> NEW {new}; state in {}",
                t.dirs,
                t.files,
                t.bytes,
                state.display()
            );
            if t.setid > 0 || t.devices > 0 {
                println!(
                    "note: OLD holds {} set-id program(s) and {} device file(s); the view is \
                     nosuid,nodev unless mounted with -o suid,dev (docs/CONFIGURATION.md)",
                    t.setid, t.devices
                );
            }
            Ok(())
        }
        Cmd::Mount {
            state,
            mountpoint,
            foreground,
            no_copy,
            passthrough,
            metadata_ttl,
            limits,
            options,
            threads,
            metrics_addr,
            takeover,
            readdirplus,
        } => {
            let args = MountArgs {
                metrics_addr,
                takeover,
                readdirplus,
                state,
                mountpoint,
                options,
                threads,
                no_copy,
                passthrough,
                metadata_ttl: std::time::Duration::from_secs_f64(metadata_ttl),
                copier: limits.options()?,
            };
            if foreground {
                let ready = daemon::ready_pipe_from_env();
                daemon::block_termination_signals();
                init_logging("info", log_format);
                daemon::serve(&args, ready)
            } else {
                daemon::spawn_background(&args, &raw)
            }
        }
        Cmd::Status { state, json, watch } => loop {
            // The progress line shows no `local`: no walk of NEW every second.
            let s = if watch && !json {
                state::progress(&state)
            } else {
                state::status(&state)
            }
            .map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string(&s).expect("status serializes"));
            } else if watch {
                print_progress(&s, true);
            } else {
                print_status(&s);
            }
            if !watch {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        Cmd::Execute {
            state,
            wait,
            workers,
            bwlimit,
            ops_limit,
        } => execute(&state, wait, workers, bwlimit.as_deref(), ops_limit),
        Cmd::Pause { state } => daemon_only(&state, Request::Pause),
        Cmd::Resume { state } => daemon_only(&state, Request::Resume),
        Cmd::Limits {
            state,
            bwlimit,
            ops_limit,
            workers,
        } => daemon_only(
            &state,
            Request::Limits {
                bwlimit: bwlimit.as_deref().map(copier::parse_rate).transpose()?,
                ops_limit,
                workers,
            },
        ),
        Cmd::Verify { state, checksum } => verify(&state, checksum),
        Cmd::Commit { state } => {
            if control::request(&state, &Request::Status)?.is_some() {
                let st = state.clone();
                let progress = CheckProgress::start("commit", &state, move || daemon_checked(&st));
                let r = control::request(&state, &Request::Commit)?;
                drop(progress);
                if let Some(r) = r {
                    return answer(r);
                }
            }
            let m = open_offline(&state)?;
            let o = daemon::open_view(&m)?;
            let c = o.copier(&m.journal, Default::default());
            let progress = CheckProgress::start("commit", &state, offline_checked(&c));
            let msg = lifecycle::commit(&c, &m.journal, o.new.root()).map_err(|e| e.to_string());
            drop(progress);
            println!("{}", msg?);
            Ok(())
        }
        Cmd::Abort { state, keep_new } => {
            const WORDS: (&str, &str, &str) =
                ("writing", "of the view back into OLD", "written back");
            let daemon = if control::request(&state, &Request::Status)?.is_some() {
                let st = state.clone();
                let _progress = CheckProgress::with_words("abort", WORDS, &state, move || {
                    let r = control::request(&st, &Request::Status).ok()??;
                    r.data.get("abort_written")?.as_u64().filter(|n| *n > 0)
                });
                control::request(&state, &Request::Abort { keep_new })?
            } else {
                None
            };
            if let Some(r) = daemon {
                // The daemon detaches the view once it has answered: wait for that, so the
                // caller finds OLD's own path again when this returns.
                let mp = r
                    .data
                    .get("mountpoint")
                    .and_then(|m| m.as_str())
                    .map(PathBuf::from);
                answer(r)?;
                if let Some(mp) = mp {
                    let t = std::time::Instant::now();
                    while daemon::ferryfs_mount_at(&mp).is_some()
                        && t.elapsed() < std::time::Duration::from_secs(30)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
                return Ok(());
            }
            let m = open_offline(&state)?;
            let o = daemon::open_view(&m)?;
            let old = match (&o.old, &o.old_s3) {
                (Some(p), _) => lifecycle::OldTarget::Posix(p.root()),
                (None, Some(t)) => lifecycle::OldTarget::S3(t),
                (None, None) => {
                    return Err("the migration is committed: abort is no longer possible".into());
                }
            };
            let progress = CheckProgress::with_words("abort", WORDS, &state, || {
                let n = lifecycle::ABORT_WRITTEN.load(std::sync::atomic::Ordering::Relaxed);
                (n > 0).then_some(n)
            });
            let msg = lifecycle::abort(
                &o.view,
                &m.journal,
                old,
                o.new.root(),
                keep_new,
                o.publisher.as_deref(),
            )
            .map_err(|e| e.to_string());
            drop(progress);
            println!("{}", msg?);
            Ok(())
        }
        Cmd::Unmount { mountpoint } => daemon::unmount(&mountpoint),
    }
}

/// Open the state dir in this process (no daemon serves it), clearing dead views first.
fn open_offline(state: &std::path::Path) -> Result<Migration, String> {
    let m = Migration::open(state).map_err(|e| e.to_string())?;
    daemon::clear_dead_views(&m)?;
    Ok(m)
}

fn answer(r: control::Response) -> Result<(), String> {
    if r.ok {
        println!("{}", r.message);
        Ok(())
    } else {
        Err(r.message)
    }
}

fn daemon_only(state: &std::path::Path, req: Request) -> Result<(), String> {
    match control::request(state, &req)? {
        Some(r) => answer(r),
        None => Err(format!(
            "no daemon serves {} (mount it first; its copier is what this command controls)",
            state.display()
        )),
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn pct(p: &state::Progress) -> f64 {
    if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    }
}

/// One progress line: a bar on a terminal (redrawn in place), plain lines otherwise.
fn print_progress(s: &state::Status, redraw: bool) {
    use std::io::{IsTerminal, Write};
    let eta = match s.eta_seconds {
        Some(e) => format!("{}m{:02}s", e / 60, e % 60),
        None => "?".into(),
    };
    let bar_w = 24;
    let filled = ((pct(&s.bytes) / 100.0) * bar_w as f64) as usize;
    let line = format!(
        "[{}{}] {:>5.1}%  {}  dirs {}/{}  files {}/{}  bytes {}/{}  {}/s  eta {}  errors {}",
        "#".repeat(filled.min(bar_w)),
        "-".repeat(bar_w - filled.min(bar_w)),
        pct(&s.bytes),
        s.phase,
        s.dirs.done,
        s.dirs.total,
        s.files.done,
        s.files.total,
        human(s.bytes.done),
        human(s.bytes.total),
        human(s.rate_bytes_per_sec),
        eta,
        s.errors.len()
    );
    let mut out = std::io::stdout();
    if redraw && out.is_terminal() {
        let _ = write!(out, "\r\x1b[K{line}");
        let _ = out.flush();
    } else {
        let _ = writeln!(out, "{line}");
    }
}

fn print_status(s: &state::Status) {
    println!(
        "phase:      {}{}",
        s.phase,
        if s.mounted { " (view mounted)" } else { "" }
    );
    println!("OLD:        {}", s.old);
    println!("NEW:        {}", s.new);
    println!("dirs:       {} of {} copied", s.dirs.done, s.dirs.total);
    println!("files:      {} of {} copied", s.files.done, s.files.total);
    println!(
        "bytes:      {} of {} copied ({:.1}%)",
        human(s.bytes.done),
        human(s.bytes.total),
        pct(&s.bytes)
    );
    println!(
        "rate:       {}/s, eta {}",
        human(s.rate_bytes_per_sec),
        s.eta_seconds.map_or("unknown".into(), |e| format!("{e} s"))
    );
    println!(
        "local:      {} entries in NEW born or changed through the view",
        s.local
    );
    println!("tombstones: {}", s.tombstones);
    println!("redirects:  {}", s.redirects);
    if let Some(p) = &s.published {
        println!(
            "bucket:     {} objects uploaded into NEW, {} uploads under way",
            p.objects, p.pending
        );
    }
    println!(
        "changed in OLD since copied: {} ({} copied again)",
        s.changed_in_old.len(),
        s.changed_in_old.iter().filter(|c| c.copied_again).count()
    );
    for c in &s.changed_in_old {
        println!(
            "  {}{}",
            c.path,
            if c.copied_again {
                ""
            } else {
                " (to be copied again)"
            }
        );
    }
    println!("errors:     {}", s.errors.len());
    for e in &s.errors {
        println!(
            "  {}: {} (errno {}, {} attempts)",
            e.path, e.error, e.errno, e.attempts
        );
    }
}

fn execute(
    state: &std::path::Path,
    wait: bool,
    workers: Option<usize>,
    bwlimit: Option<&str>,
    ops_limit: Option<u64>,
) -> Result<(), String> {
    let bwlimit = bwlimit.map(copier::parse_rate).transpose()?;
    if workers.is_some() || bwlimit.is_some() || ops_limit.is_some() {
        let limits = Request::Limits {
            bwlimit,
            ops_limit,
            workers,
        };
        if let Some(r) = control::request(state, &limits)?
            && !r.ok
        {
            return Err(r.message);
        }
    }
    if let Some(r) = control::request(state, &Request::Execute)? {
        if !r.ok {
            return Err(r.message);
        }
        println!("{}", r.message);
        if !wait {
            return Ok(());
        }
        // The daemon's passes so far: it retries failing entries for ever, but this command
        // stops waiting once ERROR_PASSES passes in a row since it began ended with errors.
        let passes = |state: &std::path::Path| -> Option<(u64, u64)> {
            let r = control::request(state, &Request::Status).ok()??;
            let n = |k: &str| r.data.get(k).and_then(serde_json::Value::as_u64);
            Some((n("passes")?, n("error_passes")?))
        };
        // Counted from the first answer (a daemon busy at the first ask is asked again).
        let mut first = passes(state).map(|p| p.0);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let s = state::progress(state).map_err(|e| e.to_string())?;
            print_progress(&s, true);
            if s.phase != "executed"
                && let Some((n, failing)) = passes(state)
                && failing >= copier::ERROR_PASSES
                && n.saturating_sub(*first.get_or_insert(n)) >= copier::ERROR_PASSES
            {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    println!();
                }
                for e in &s.errors {
                    eprintln!("  {}: {}", e.path, e.error);
                }
                return Err(format!(
                    "not executed: {} entries failed in each of the last {failing} passes; the \
                     daemon goes on retrying them (back-off up to a minute): fix the cause, then \
                     run execute again",
                    s.errors.len()
                ));
            }
            // An S3 NEW: done once the bucket holds it all, too, or failed uploads say why
            // it cannot (once the copier is done, the errors left are the publisher's).
            if s.phase == "executed" {
                let settled = s.published.is_none_or(|p| p.settled);
                if (settled || !s.errors.is_empty())
                    && std::io::IsTerminal::is_terminal(&std::io::stdout())
                {
                    println!();
                }
                if settled {
                    return Ok(());
                }
                if !s.errors.is_empty() {
                    for e in &s.errors {
                        eprintln!("  {}: {}", e.path, e.error);
                    }
                    return Err(format!(
                        "executed, but {} entries could not be uploaded into NEW (they are \
                         retried every 30 s; fix the cause, then run execute again)",
                        s.errors.len()
                    ));
                }
            }
            if !s.mounted {
                return Err("the daemon stopped before the migration was executed".into());
            }
        }
    }
    // No daemon: copy in this process until done.
    let m = open_offline(state)?;
    let o = daemon::open_view(&m)?;
    let opts = copier::Options {
        workers: workers.map_or(0, |w| w.max(1)),
        bwlimit: bwlimit.unwrap_or(0),
        ops_limit: ops_limit.unwrap_or(0),
        recheck: None,
    };
    let c = o.copier(&m.journal, opts);
    c.execute().map_err(|e| e.to_string())?;
    // Dropped when the copier is done: the progress thread ends at once, not at its next tick.
    let (done, done_rx) = crossbeam_channel::bounded::<()>(0);
    let shower = {
        let (c, journal, state) = (c.clone(), m.journal.clone(), state.to_path_buf());
        std::thread::spawn(move || {
            let mut meter = copier::RateMeter::default();
            let mut ticks = 0u64;
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(std::time::Duration::from_millis(250))
            {
                ticks += 1;
                if ticks % 4 != 0 {
                    continue;
                }
                let bps = meter.sample(c.view().done().bytes);
                let _ = state::record_rate(&journal, bps);
                if let Ok(s) = state::status_of(&journal, &state, false) {
                    // Plain lines every 10 s off a terminal.
                    if std::io::IsTerminal::is_terminal(&std::io::stdout()) || ticks % 40 == 0 {
                        print_progress(&s, true);
                    }
                }
            }
        })
    };
    let res = c.run_until_executed(copier::ERROR_PASSES as u32);
    drop(done);
    let _ = shower.join();
    let summary = res.map_err(|e| e.to_string())?;
    if let Some(p) = &o.publisher {
        // An S3 NEW: the staging tree into the bucket before this process ends.
        let r = p
            .settle(5)
            .map_err(|e| format!("uploading into NEW: {e}"))?;
        println!(
            "NEW {}: {} objects, {} uploaded ({} bytes), {} copied by the server, {} deleted",
            m.config.new, r.objects, r.uploaded, r.uploaded_bytes, r.copied, r.deleted
        );
        if !r.errors.is_empty() {
            for (k, e) in &r.errors {
                eprintln!("  {k}: {e}");
            }
            return Err(format!(
                "{} objects could not be uploaded into NEW (run execute again once the cause is fixed)",
                r.errors.len()
            ));
        }
    }
    let s = state::status_of(&m.journal, state, false).map_err(|e| e.to_string())?;
    print_progress(&s, false);
    if s.phase == "executed" {
        println!("executed: nothing needs OLD any more; verify, then commit");
        Ok(())
    } else {
        for e in &s.errors {
            eprintln!("  {}: {}", e.path, e.error);
        }
        Err(format!(
            "not executed: {} entries failed in the last pass (run execute again once the cause is fixed)",
            summary.errors
        ))
    }
}

/// Progress of a check (verify, commit's final pass) while it runs: a line when it starts,
/// then every second a bar redrawn on a terminal or a plain line otherwise, from the entries
/// checked so far (`checked`: the mounted daemon's count, or this process's copier's).
struct CheckProgress {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckProgress {
    fn start(
        what: &'static str,
        state: &std::path::Path,
        checked: impl Fn() -> Option<u64> + Send + 'static,
    ) -> CheckProgress {
        CheckProgress::with_words(what, ("checking", "against OLD", "checked"), state, checked)
    }

    /// `words`: what the first line says it does and to what, and what each entry counted is.
    fn with_words(
        what: &'static str,
        words: (&'static str, &'static str, &'static str),
        state: &std::path::Path,
        checked: impl Fn() -> Option<u64> + Send + 'static,
    ) -> CheckProgress {
        let (doing, to, done) = words;
        use std::io::{IsTerminal, Write};
        // Entries the view is expected to hold: OLD's scanned totals (an estimate once the
        // view has changed things).
        let total = state::scanned_totals(state)
            .map(|t| t.files + t.dirs)
            .unwrap_or(0);
        let (stop, rx) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            let tty = std::io::stdout().is_terminal();
            println!("{what}: {doing} about {total} entries {to}");
            let mut shown = false;
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                rx.recv_timeout(std::time::Duration::from_secs(1))
            {
                let Some(n) = checked() else { continue };
                let pct = if total > 0 {
                    (n as f64 * 100.0 / total as f64).min(100.0)
                } else {
                    0.0
                };
                let mut out = std::io::stdout();
                if tty {
                    let filled = (pct / 100.0 * 24.0) as usize;
                    let _ = write!(
                        out,
                        "\r\x1b[K[{}{}] {pct:>5.1}%  {what}: {n} of about {total} entries {done}",
                        "#".repeat(filled),
                        "-".repeat(24 - filled)
                    );
                    let _ = out.flush();
                    shown = true;
                } else {
                    let _ = writeln!(
                        out,
                        "{what}: {n} of about {total} entries {done} ({pct:.1}%)"
                    );
                }
            }
            if shown {
                println!();
            }
        });
        CheckProgress {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for CheckProgress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mounted daemon's count of entries checked by the check it runs, if it runs one.
fn daemon_checked(state: &std::path::Path) -> Option<u64> {
    let r = control::request(state, &Request::Status).ok()??;
    if r.data.get("checking")?.as_bool()? {
        r.data.get("checked")?.as_u64()
    } else {
        None
    }
}

/// A check in this process's copier, with progress.
fn offline_checked(
    c: &std::sync::Arc<copier::Copier>,
) -> impl Fn() -> Option<u64> + Send + 'static {
    let c = c.clone();
    move || {
        let s = c.state();
        s.checking.then_some(s.checked)
    }
}

fn verify(state: &std::path::Path, checksum: bool) -> Result<(), String> {
    // In the mounted daemon if one serves the state dir, else in this process.
    let answer = if control::request(state, &Request::Status)?.is_some() {
        let st = state.to_path_buf();
        let _progress = CheckProgress::start("verify", state, move || daemon_checked(&st));
        control::request(state, &Request::Verify { checksum })?
    } else {
        None
    };
    let report: copier::CheckReport = match answer {
        Some(r) if r.ok => serde_json::from_value(r.data).map_err(|e| e.to_string())?,
        Some(r) => return Err(r.message),
        None => {
            let m = open_offline(state)?;
            let o = daemon::open_view(&m)?;
            let c = o.copier(&m.journal, Default::default());
            let _progress = CheckProgress::start("verify", state, offline_checked(&c));
            lifecycle::verify(&c, checksum).map_err(|e| e.to_string())?
        }
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
        Err("verification failed".into())
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryfs: {e}");
            ExitCode::FAILURE
        }
    }
}
