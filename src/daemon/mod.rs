//! Serving a view: the steps of `mount`, from opening the migration to the clean unmount.
//!
//! [`serve`] runs them in order: open the migration (or take it over from the daemon serving
//! it), open the stores before mounting (the mountpoint may be OLD's own path), start the
//! copier and its helper threads, answer the control socket and the metrics endpoint, mount,
//! say READY, serve until unmounted, and stop the copier. Each step is a function below; this
//! module owns their order and the threads, never a view rule.

pub mod background;
pub mod loops;
pub mod process;
pub mod sdnotify;
pub mod takeover;
pub mod views;

pub use background::{Ready, spawn_background};
pub use views::{clear_dead_views, unmount};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::copier::Copier;
use crate::fuse::mount::{self, FS_TYPE};
use crate::fuse::session::{MountPlan, Session};
use crate::fuse::{FerryFs, takeover::Parts};
use crate::journal::{Phase, Totals};
use crate::state::{Migration, Opened, layout};
use crate::store::posix::PosixStore;
use sdnotify::Notifier;
use takeover::Taken;

#[derive(Debug, Clone)]
pub struct MountArgs {
    pub state: PathBuf,
    pub mountpoint: PathBuf,
    pub options: Vec<String>,
    pub threads: usize,
    /// Do not start the copier at mount (an `execute` starts it later).
    pub no_copy: bool,
    /// Which open files the kernel reads and writes directly.
    pub passthrough: crate::fuse::PassthroughMode,
    /// How long the kernel caches names and attributes.
    pub metadata_ttl: Duration,
    pub copier: crate::copier::Options,
    /// Serve /metrics, /healthz and /readyz over HTTP at this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Take the live mount over from the daemon serving it (restart without unmount).
    pub takeover: bool,
    /// Whether listings carry attributes.
    pub readdirplus: crate::fuse::ReaddirPlus,
    /// How the kernel hands requests to the daemon.
    pub transport: crate::fuse::Transport,
    /// What an unlabeled entry answers for `security.selinux`.
    pub selinux_absent: crate::fuse::SelinuxAbsent,
    /// An S3 NEW: the bound on its staging tree (`None`: the default).
    pub stage_max: Option<u64>,
    /// Serve remote copy workers.
    pub workers: Option<WorkersArgs>,
}

/// How the daemon serves remote copy workers (`--workers-listen` and its companions).
#[derive(Debug, Clone)]
pub struct WorkersArgs {
    pub listen: std::net::SocketAddr,
    /// The file holding the token every request carries.
    pub token_file: PathBuf,
    /// TLS: the certificate chain and the private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// What [`serve`] has built so far, handed from step to step.
struct Serving<'a> {
    args: &'a MountArgs,
    /// The state dir, absolute (as the mount's source names it).
    state_abs: PathBuf,
    migration: Migration,
    opened: Opened,
    taken: Option<Taken>,
    notifier: Arc<Notifier>,
}

/// The copier and the threads that live as long as it does.
struct Copying {
    copier: Arc<Copier>,
    threads: Vec<JoinHandle<()>>,
    /// The inode numbers whose kernel cache the view asks to drop.
    invalidations: crossbeam_channel::Receiver<u64>,
}

/// Serve the view in this process until it is unmounted. `ready` is told once the kernel has
/// accepted the mount (or why it was not).
pub fn serve(args: &MountArgs, mut ready: Ready) -> Result<(), String> {
    if !args.takeover {
        args.transport.check().map_err(|e| ready.fail(e))?;
    }
    let s = open(args).map_err(|e| ready.fail(e))?;
    let copying = start_copier(&s).map_err(|e| ready.fail(e))?;
    let fs = FerryFs::new(s.opened.view.clone(), args.passthrough, args.metadata_ttl)
        .with_readdirplus(args.readdirplus)
        .with_selinux_absent(args.selinux_absent)
        // A takeover serves the transport the first daemon negotiated, whatever this command
        // line asks: INIT is only replayed (without io_uring), and handed rings are adopted.
        .with_transport(if args.takeover {
            crate::fuse::Transport::Dev
        } else {
            args.transport
        });
    let parts = fs.takeover_parts();
    let mut plan = MountPlan::parse(&args.options);
    let mut s = s;
    if let Some(t) = s.taken.as_mut() {
        plan.set_acl_name(t.acl());
        let dev = t.fuse[0]
            .try_clone()
            .map_err(|e| ready.fail(format!("dup /dev/fuse: {e}")))?;
        parts.import_passthrough(std::mem::take(&mut t.handed.passthrough), dev);
    } else {
        let scanned = copying.copier.journal().totals().unwrap_or_default();
        for w in powers_lost(&plan, &scanned) {
            tracing::warn!("{w}");
            ready.warn(&w);
        }
    }
    answer_control(&s, &copying.copier, &parts, &plan).map_err(|e| ready.fail(e))?;
    let observed = crate::observe::Observed::new(
        copying.copier.clone(),
        s.migration.journal.clone(),
        args.mountpoint.clone(),
        s.state_abs.clone(),
        s.opened.has_old(),
        parts.gate.clone(),
    );
    if let Some(addr) = args.metrics_addr {
        let bound = crate::observe::serve(addr, observed.clone())
            .map_err(|e| ready.fail(format!("--metrics-addr {addr}: {e}")))?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    }
    let coordinator = match &args.workers {
        Some(w) => Some(serve_workers(&s, &copying.copier, w).map_err(|e| ready.fail(e))?),
        None => None,
    };
    let session = mount_view(&mut s, fs, &plan).map_err(|e| ready.fail(e))?;
    record_transport(&s, &session, &parts).map_err(|e| ready.fail(e))?;
    let view = s.opened.view.clone();
    if let Some(dev) = mount::mount_dev(&args.mountpoint, &s.state_abs) {
        view.set_mount_dev(dev);
    }
    session
        .spawn_invalidator(view.clone(), copying.invalidations.clone())
        .map_err(|e| e.to_string())?;
    tracing::info!(mountpoint = %args.mountpoint.display(), state = %s.state_abs.display(), "view serving");
    observed.set_ready();
    watch(&s, &observed).map_err(|e| ready.fail(e))?;
    ready.ready();
    let status = loops::service_status(&copying.copier, &args.mountpoint);
    s.notifier.notify(&format!("READY=1\nSTATUS={status}"));
    if s.notifier.enabled() {
        loops::spawn_notify_loop(
            s.notifier.clone(),
            observed.clone(),
            copying.copier.clone(),
            args.mountpoint.clone(),
        );
    }
    spawn_signal_thread(&args.mountpoint, &s.notifier, &observed)?;
    let res = session.run();
    observed.set_stopping();
    s.notifier.notify("STOPPING=1\nSTATUS=view stopped");
    if let Some(c) = &coordinator {
        c.shutdown();
    }
    copying.copier.shutdown();
    for t in copying.threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(layout::socket_path(&args.state));
    drop(s);
    tracing::info!("view stopped");
    res.map_err(|e| format!("serving: {e}"))
}

/// Open the migration (or take it over) and its view, with the stores opened before anything
/// is mounted.
fn open(args: &MountArgs) -> Result<Serving<'_>, String> {
    let mut notifier = Notifier::from_env();
    let state_abs = std::fs::canonicalize(&args.state).unwrap_or(args.state.clone());
    let (migration, mut taken) = if args.takeover {
        let (m, t) = take_over(args, &notifier)?;
        if let Some(us) = t.handed.watchdog_usec {
            notifier.adopt_watchdog(Duration::from_micros(us));
        }
        (m, Some(t))
    } else {
        (
            Migration::open(&args.state).map_err(|e| e.to_string())?,
            None,
        )
    };
    refuse_when_abort_rewrites_old(&migration, &args.state)?;
    let opened = match &taken {
        Some(t) => open_handed_stores(&migration, t)?,
        None => open_stores(args, &migration, &state_abs)?,
    };
    if let Some(t) = taken.as_mut() {
        let st = std::mem::take(&mut t.handed.view);
        let files = std::mem::take(&mut t.files);
        let got = opened.view.import_state(st, files);
        // Open files the previous daemon let the kernel pass through to NEW's files stay so
        // until closed: never evicted while open (the kernel would read the holes).
        for o in &t.handed.passthrough.inodes {
            if matches!(o.backing, Some((_, true))) {
                opened.view.passes_through(o.ino);
            }
        }
        tracing::info!(
            inodes = got.inodes,
            detached = got.detached,
            open_files = got.files,
            open_dirs = got.dirs,
            from_pid = t.handed.pid,
            from_version = %t.handed.version,
            "took over the kernel's inodes and open files"
        );
    }
    if opened.publisher.is_some() {
        bound_staging(args, &migration, &opened.view);
    }
    Ok(Serving {
        args,
        state_abs,
        migration,
        opened,
        taken,
        notifier: Arc::new(notifier),
    })
}

/// The FUSE transport the session got: for the takeover (which hands rings over when there
/// are), the log, status and /metrics.
fn record_transport(
    s: &Serving<'_>,
    session: &Session,
    parts: &crate::fuse::takeover::Parts,
) -> Result<(), String> {
    use crate::journal::Meta;
    let t = session.transport();
    let on_uring = t.transport == crate::state::status::TransportKind::IoUring;
    if !on_uring && s.args.transport == crate::fuse::Transport::Uring && !s.args.takeover {
        // The kernel offered it, but this process could not make rings (io_uring disabled
        // by seccomp or sysctl, out of memory): fuser logged why.
        return Err(
            "--transport uring: the kernel offered FUSE over io_uring but this process \
             cannot use io_uring (see the log; seccomp profiles of container runtimes block \
             it); use --transport auto or dev"
                .into(),
        );
    }
    parts.gate.set_transport(session.rings());
    crate::metrics::METRICS.set_fuse_transport(on_uring);
    if on_uring {
        tracing::info!(
            queues = t.queues,
            entry_payload_bytes = t.payload_bytes,
            threads = s.args.threads.max(t.queues),
            "FUSE requests come over io_uring"
        );
    } else {
        tracing::info!(asked = ?s.args.transport, "FUSE requests come through /dev/fuse");
    }
    let mut b = crate::journal::Batch::new();
    b.meta(
        Meta::FuseTransport,
        &serde_json::to_vec(&t).expect("serializes"),
    );
    if let Err(e) = s.migration.journal.commit(b, false) {
        tracing::warn!(error = %e, "recording the FUSE transport for status");
    }
    Ok(())
}

/// An S3 NEW's staging tree bounded: `--stage-max`, or half of the room for it on the state
/// dir's file system (see [`crate::view::default_stage_max`]); recorded for `status`.
fn bound_staging(args: &MountArgs, m: &Migration, view: &crate::view::View) {
    use crate::journal::Meta;
    let staged = m
        .journal
        .meta(Meta::StagedBytes)
        .ok()
        .flatten()
        .and_then(|v| v.as_slice().try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let limit = args.stage_max.unwrap_or_else(|| {
        let stage = crate::state::layout::stage_dir(&args.state);
        let free = rustix::fs::statvfs(&stage)
            .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
            .unwrap_or(0);
        crate::view::default_stage_max(free, staged)
    });
    view.set_stage_max(limit);
    let mut b = crate::journal::Batch::new();
    b.meta(Meta::StageMax, &limit.to_le_bytes());
    if let Err(e) = m.journal.commit(b, false) {
        tracing::warn!(error = %e, "recording the staging bound for status");
    }
    tracing::info!(
        stage_max = limit,
        given = args.stage_max.is_some(),
        "staging tree bounded (mount --stage-max)"
    );
}

/// An abort that went past its staging has begun to rewrite OLD: the view's records no
/// longer match it, and changes made through a view now would not be in OLD at the end.
fn refuse_when_abort_rewrites_old(m: &Migration, state: &Path) -> Result<(), String> {
    if let Ok(Some(step)) = m.journal.abort_step()
        && crate::lifecycle::abort_rewrites_old(&step)
    {
        return Err(format!(
            "an abort of this migration is under way and has begun to write OLD ({}): run \
             `ferryfs abort --state {}` again to finish it; the view cannot be served",
            String::from_utf8_lossy(&step),
            state.display()
        ));
    }
    Ok(())
}

/// The stores' roots as the old daemon opened them: with the view mounted in place, OLD's
/// path is the view itself now.
fn open_handed_stores(m: &Migration, t: &Taken) -> Result<Opened, String> {
    let root = |what: &str, p: &Path| -> Result<PosixStore, String> {
        let fd = match what {
            "OLD" => t.old_root.as_ref(),
            _ => Some(&t.new_root),
        }
        .ok_or_else(|| format!("the old daemon handed over no {what} store"))?;
        let fd = fd
            .try_clone()
            .map_err(|e| format!("dup {what} root: {e}"))?;
        Ok(PosixStore::from_root(fd, p.to_path_buf()))
    };
    crate::state::open_view_with(m, root)
}

/// Dead views first (also over OLD's path, when mounted in place), so the stores are the real
/// directories again; a store covered by a live view is refused. Then both stores are opened,
/// before mounting: the mountpoint may be OLD's own path (rule 11).
fn open_stores(args: &MountArgs, m: &Migration, state_abs: &Path) -> Result<Opened, String> {
    let old_path = m.config.old.posix_path();
    let new_path = m.config.new.posix_path();
    for p in [Some(&args.mountpoint), old_path, new_path]
        .into_iter()
        .flatten()
    {
        views::clear_dead_mounts(p, state_abs)?;
    }
    for (what, p) in [("OLD", old_path), ("NEW", new_path)] {
        if let Some(p) = p
            && let Some(src) = mount::ferryfs_mount_at(p)
        {
            return Err(format!(
                "{what} store {} is covered by a live ferryfs view ({src})",
                p.display()
            ));
        }
    }
    crate::state::open_view(m)
}

/// The copier, with the publisher's loop (an S3 NEW) and the rate sampler; started copying
/// unless `--no-copy`, or as the old daemon left it after a takeover (limits included).
/// The coordinator of remote workers (`--workers-listen`), serving at `addr`.
fn serve_workers(
    s: &Serving<'_>,
    copier: &Arc<Copier>,
    w: &WorkersArgs,
) -> Result<Arc<crate::workers::coordinator::Coordinator>, String> {
    use crate::workers::protocol::Store;
    let token = crate::workers::coordinator::read_token(&w.token_file)?;
    let tls = match &w.tls {
        Some((cert, key)) => Some(crate::workers::tls::server_config(cert, key)?),
        None => None,
    };
    let addr = w.listen;
    if !s.opened.view.takes_remote_copies() {
        return Err("--workers-listen: this view has no OLD to copy from".into());
    }
    let store = |spec: &crate::store::StoreSpec| match spec {
        crate::store::StoreSpec::Posix { path } => Store::Posix(path.display().to_string()),
        crate::store::StoreSpec::S3 { url } => Store::S3(url.to_string()),
    };
    let c = crate::workers::coordinator::Coordinator::new(
        s.opened.view.clone(),
        s.migration.journal.clone(),
        copier,
        token,
        store(&s.migration.config.old),
        store(&s.migration.config.new),
    );
    let secure = tls.is_some();
    let bound = c
        .serve(addr, tls)
        .map_err(|e| format!("--workers-listen {addr}: {e}"))?;
    copier.set_remote(c.clone());
    tracing::info!(addr = %bound, tls = secure, "serving remote copy workers");
    Ok(c)
}

fn start_copier(s: &Serving<'_>) -> Result<Copying, String> {
    // Multipart uploads a killed (or handed-over) daemon left unfinished go before this one
    // begins any: none is left behind in the bucket.
    if let Some(p) = &s.opened.publisher {
        match p.abort_unfinished_uploads() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                n,
                "aborted multipart uploads a previous daemon left unfinished"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "listing unfinished multipart uploads in NEW (they stay until a later mount or the bucket's lifecycle rule)")
            }
        }
    }
    let copier = s.opened.copier(&s.migration.journal, s.args.copier.clone());
    let mut threads = Vec::new();
    if let Some(p) = &s.opened.publisher {
        threads.push(loops::spawn_publish_loop(p.clone(), copier.clone())?);
    }
    let c = copier.clone();
    threads.push(
        std::thread::Builder::new()
            .name("copier".into())
            .spawn(move || c.run_background())
            .map_err(|e| e.to_string())?,
    );
    threads.push(loops::spawn_rate_sampler(
        copier.clone(),
        s.migration.journal.clone(),
    )?);
    // Taken before the copier starts, so that nothing it changes goes unsent.
    let invalidations = s.opened.view.invalidations();
    let finished = matches!(s.opened.phase, Phase::Committed | Phase::Aborted);
    let (execute, paused) = match &s.taken {
        Some(t) => {
            let c = t.handed.copier.clone();
            let table = c
                .bwlimit_timetable
                .as_deref()
                .and_then(|t| crate::copier::limits::Timetable::parse(t).ok());
            copier.set_bwlimit(
                table.unwrap_or(crate::copier::limits::Timetable::constant(c.bwlimit)),
            );
            copier.ops.set(c.ops_limit);
            copier.set_workers(c.workers);
            (c.executing, c.paused)
        }
        None => (!s.args.no_copy, false),
    };
    if execute && !finished {
        copier
            .execute()
            .map_err(|e| format!("starting the copier: {e}"))?;
    }
    if paused {
        copier.pause();
    }
    Ok(Copying {
        copier,
        threads,
        invalidations,
    })
}

/// What a view mounted with `plan` takes from OLD's entries that prepare counted: set-id
/// programs run without their privileges under `nosuid`, device files cannot be opened under
/// `nodev` (both FUSE's defaults). One warning each, for `mount` to print.
fn powers_lost(plan: &MountPlan, t: &Totals) -> Vec<String> {
    let mut out = Vec::new();
    if t.setid > 0 && !plan.suid() {
        out.push(format!(
            "OLD holds {} set-id program(s): the view is mounted nosuid, so through it they run \
             without their privileges (-o suid keeps them; docs/CONFIGURATION.md says when \
             that is safe)",
            t.setid
        ));
    }
    if t.devices > 0 && !plan.dev() {
        out.push(format!(
            "OLD holds {} device file(s): the view is mounted nodev, so they cannot be opened \
             through it (-o dev allows them)",
            t.devices
        ));
    }
    out
}

/// The control socket, with what a takeover by a new daemon needs.
fn answer_control(
    s: &Serving<'_>,
    copier: &Arc<Copier>,
    parts: &Parts,
    plan: &MountPlan,
) -> Result<(), String> {
    let dup = |fd: BorrowedFd<'_>, what: &str| -> Result<OwnedFd, String> {
        fd.try_clone_to_owned()
            .map_err(|e| format!("dup {what}: {e}"))
    };
    let old_root = match &s.opened.old {
        Some(o) => Some(dup(o.root(), "OLD root")?),
        None => None,
    };
    let mut source = takeover::Source::new(
        parts.clone(),
        s.opened.view.clone(),
        copier.clone(),
        s.migration.journal.clone(),
        dup(s.migration.lock_file().as_fd(), "the state lock")?,
        old_root,
        dup(s.opened.new.root(), "NEW root")?,
        s.args.mountpoint.clone(),
        s.state_abs.clone(),
        plan.acl_name(),
    );
    source.watchdog = s.notifier.watchdog();
    let ctx = crate::control::Ctx {
        takeover: Some(Arc::new(source)),
        copier: copier.clone(),
        journal: s.migration.journal.clone(),
        new_root: dup(s.opened.new.root(), "NEW root")?,
        old_root: s
            .opened
            .old
            .as_ref()
            .and_then(|o| o.root().try_clone_to_owned().ok()),
        old_s3: s.opened.old_s3.clone(),
        mountpoint: s.args.mountpoint.clone(),
        state: s.args.state.clone(),
    };
    crate::control::serve(&s.args.state, Arc::new(ctx))
        .map_err(|e| format!("control socket in {}: {e}", s.args.state.display()))
}

/// Mount the view, or adopt the mount a previous daemon handed over (its parked requests are
/// queued again for this daemon's threads; then the old daemon's fds can go).
fn mount_view(s: &mut Serving<'_>, fs: FerryFs, plan: &MountPlan) -> Result<Session, String> {
    let fsname = format!("{FS_TYPE}:{}", s.state_abs.display());
    let threads = s.args.threads;
    match s.taken.take() {
        Some(mut t) => Session::adopt(
            fs,
            t.fuse[0].as_fd(),
            t.handed.kernel,
            t.rings.take(),
            plan,
            fsname,
            FS_TYPE,
            threads,
        ),
        None => Session::mount(fs, &s.args.mountpoint, plan, fsname, FS_TYPE, threads)
            .map_err(|e| format!("mounting {}: {e}", s.args.mountpoint.display())),
    }
}

/// Health probes: they cost a statfs through the view every few seconds, so only when someone
/// watches (a metrics address, or systemd).
fn watch(s: &Serving<'_>, observed: &Arc<crate::observe::Observed>) -> Result<(), String> {
    if s.args.metrics_addr.is_none() && !s.notifier.enabled() {
        return Ok(());
    }
    let roots = (|| -> std::io::Result<_> {
        let old = match (&s.opened.old, &s.opened.old_s3) {
            (Some(o), _) => Some(crate::observe::OldProbe::Posix(
                o.root().try_clone_to_owned()?,
            )),
            (None, Some(t)) => Some(crate::observe::OldProbe::S3(t.clone())),
            (None, None) => None,
        };
        Ok((old, s.opened.new.root().try_clone_to_owned()?))
    })();
    let (old, new) = roots.map_err(|e| format!("dup store roots: {e}"))?;
    observed.start_probes(old, new);
    Ok(())
}

/// The thread that turns SIGTERM/SIGINT/SIGHUP into a clean unmount. Our own umount, not
/// fuser's unmounter: that one forgets the mount after a failed attempt, so it cannot be
/// retried. The session loop ends when the kernel detaches the mount; a busy that lasts
/// (files open in the view) keeps serving.
fn spawn_signal_thread(
    mp: &Path,
    notifier: &Arc<Notifier>,
    observed: &Arc<crate::observe::Observed>,
) -> Result<(), String> {
    let mp = mp.to_path_buf();
    let (notifier, observed) = (notifier.clone(), observed.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            process::wait_for_termination();
            tracing::info!(mountpoint = %mp.display(), "signal received: unmounting");
            observed.set_stopping();
            notifier.notify("STOPPING=1\nSTATUS=unmounting");
            if let Err(e) = mount::unmount_retrying_busy(&mp) {
                tracing::error!(error = %e, "unmount on signal failed; still serving");
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `mount --takeover`: receive the live mount from the daemon serving the state dir, wait for
/// it to exit, and open the journal under the lock it handed over. Everything that can be
/// refused is refused before the old daemon lets go, and it then keeps serving.
fn take_over(args: &MountArgs, notifier: &Notifier) -> Result<(Migration, Taken), String> {
    // The old daemon's fds arrive in this process: one per open file, directory and thread.
    crate::view::raise_nofile_limit();
    let mut t = takeover::take(&args.state, &args.mountpoint)?;
    // Under systemd this process becomes the service's main process before the old one
    // exits, or systemd would take that exit for the service's end and stop us with it.
    notifier.notify(&format!("MAINPID={}", std::process::id()));
    if let Err(e) = t.commit() {
        notifier.notify(&format!("MAINPID={}", t.handed.pid));
        // The old daemon has let go and this one cannot serve: nobody will answer the
        // mount's requests. Say how to end the wait (a process stuck on an unanswered FUSE
        // request cannot be killed otherwise).
        let conn = mount::connection_abort_path(&args.mountpoint);
        return Err(format!(
            "{e}; the mount at {} is left with no daemon: `echo 1 > {conn}` (mount -t fusectl \
             none /sys/fs/fuse/connections if it is missing) ends its waiting requests with \
             ENOTCONN and lets the old daemon exit; then mount again",
            args.mountpoint.display()
        ));
    }
    // The old daemon has exited; its journal's own lock goes with its process, so the first
    // open can only race its last moments.
    let mut tries = 0;
    loop {
        let lock = t
            .lock
            .try_clone()
            .map_err(|e| format!("dup the state lock: {e}"))?;
        match Migration::open_locked(&args.state, lock) {
            Ok(m) => return Ok((m, t)),
            Err(e) if tries < 50 => {
                tracing::debug!(error = %e, "journal not free yet");
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("opening the journal after the takeover: {e}")),
        }
    }
}
