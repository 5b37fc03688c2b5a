//! Serving a view: mount orchestration, readiness, signals, unmount.
//!
//! `mount` without `--foreground` re-executes itself in the foreground as a detached child and
//! waits on a pipe until the child says the view serves (or why it could not), so the command
//! returns exactly when the mount is usable, and fails with the child's reason otherwise.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::fs::View;
use crate::fuse::FerryFs;
use crate::state::{Migration, Phase};
use crate::store::posix::PosixStore;
use crate::store::s3tree::S3Tree;
use crate::store::{OldStore, StoreSpec};

pub const READY_FD_ENV: &str = "FERRYFS_READY_FD";
pub const FS_TYPE: &str = "ferryfs";

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
}

/// A migration's view opened in this process, with the stores it serves.
pub struct Opened {
    pub view: Arc<View>,
    pub phase: Phase,
    /// OLD's root (for abort) when OLD is a POSIX store; `None` once committed (OLD may be
    /// gone).
    pub old: Option<PosixStore>,
    /// OLD when it is an S3 store (for abort); `None` once committed.
    pub old_s3: Option<Arc<S3Tree>>,
    pub new: PosixStore,
    /// An S3 NEW's publisher (`None` for a POSIX NEW, and once aborted).
    pub publisher: Option<Arc<crate::publish::Publisher>>,
}

impl Opened {
    /// Whether OLD is still part of the migration (not committed).
    pub fn has_old(&self) -> bool {
        self.old.is_some() || self.old_s3.is_some()
    }

    /// A copier of this view (with the publisher of an S3 NEW).
    pub fn copier(
        &self,
        journal: &crate::journal::Records,
        opts: crate::copier::Options,
    ) -> Arc<crate::copier::Copier> {
        let c = crate::copier::Copier::new(self.view.clone(), journal.clone(), opts);
        c.set_publisher(self.publisher.clone());
        c
    }
}

/// Open the view of a migration (the daemon's, or the CLI's when no daemon runs). After
/// commit the view is NEW alone; after abort, OLD alone.
pub fn open_view(m: &Migration) -> Result<Opened, String> {
    open_view_with(m, |what, p| {
        PosixStore::open(p).map_err(|e| format!("{what} store {}: {e}", p.display()))
    })
}

/// [`open_view`] with the POSIX stores' roots opened by `open` ("OLD" or "NEW", and its path).
fn open_view_with(
    m: &Migration,
    open: impl Fn(&str, &Path) -> Result<PosixStore, String>,
) -> Result<Opened, String> {
    let new_dir = m.new_dir();
    let new_path = new_dir.as_path();
    let phase = crate::state::phase(&m.journal).map_err(|e| e.to_string())?;
    // Entries are created on behalf of callers with the mode the kernel already masked with
    // the caller's umask; the daemon's own umask must not mask it a second time.
    rustix::process::umask(rustix::fs::Mode::empty());
    // An fd per directory the kernel knows, and two per copy waiting in a copier batch.
    raise_nofile_limit();
    let s3 = match (&m.config.old, phase) {
        (StoreSpec::S3 { .. }, Phase::Aborted) => {
            return Err(format!(
                "the migration was aborted: the dataset is in OLD ({}) again; there is no view to serve",
                m.config.old
            ));
        }
        (StoreSpec::S3 { .. }, Phase::Committed) => None,
        (StoreSpec::S3 { url }, _) => {
            Some(S3Tree::open(url).map_err(|e| format!("OLD store {}: {e}", m.config.old))?)
        }
        (StoreSpec::Posix { .. }, _) => None,
    };
    let old_path = m.config.old.posix_path();
    let old_posix = |what: &str| -> Result<PosixStore, String> {
        open(what, old_path.ok_or("internal: OLD is not a POSIX store")?)
    };
    let (vold, vnew, old, new) = match phase {
        Phase::Committed => (
            OldStore::Posix(open("NEW", new_path)?),
            open("NEW", new_path)?,
            None,
            open("NEW", new_path)?,
        ),
        Phase::Aborted => (
            OldStore::Posix(old_posix("OLD")?),
            old_posix("OLD")?,
            Some(old_posix("OLD")?),
            open("NEW", new_path)?,
        ),
        _ => match &s3 {
            Some(t) => (
                OldStore::S3(t.clone()),
                open("NEW", new_path)?,
                None,
                open("NEW", new_path)?,
            ),
            None => (
                OldStore::Posix(old_posix("OLD")?),
                open("NEW", new_path)?,
                Some(old_posix("OLD")?),
                open("NEW", new_path)?,
            ),
        },
    };
    let view =
        View::new(vold, vnew, m.journal.clone()).map_err(|e| format!("opening the view: {e}"))?;
    if matches!(phase, Phase::Committed | Phase::Aborted) {
        view.set_single();
    }
    if m.new_s3().is_some() {
        view.set_s3_new();
    }
    let publisher = match (m.new_s3(), phase) {
        (Some(url), p) if p != Phase::Aborted => {
            let p = crate::publish::Publisher::connect(
                url,
                new_dir.clone(),
                m.journal.clone(),
                crate::publish::DEFAULT_WORKERS,
            )
            .map_err(|e| format!("NEW store {}: {e}", m.config.new))?;
            Some(Arc::new(match &s3 {
                Some(t) => p.with_old(t.store.clone()),
                None => p,
            }))
        }
        _ => None,
    };
    Ok(Opened {
        view: Arc::new(view),
        phase,
        old,
        old_s3: s3,
        new,
        publisher,
    })
}

/// The lines of /proc/self/mountinfo that matter here.
struct MountLine {
    mp: PathBuf,
    fstype: String,
    source: String,
    dev: u64,
}

fn mounts() -> Vec<MountLine> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let unescape = |f: &str| -> String {
        let mut out = Vec::new();
        let b = f.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() {
                if let Ok(v) = u8::from_str_radix(&f[i + 1..i + 4], 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    s.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let (major, minor) = pre.get(2)?.split_once(':')?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next().unwrap_or("");
            Some(MountLine {
                mp: PathBuf::from(unescape(pre.get(4)?)),
                fstype: fstype.to_string(),
                source: unescape(source),
                dev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
            })
        })
        .collect()
}

/// The newest ferryfs mount at `mp` (any, or of the migration in `state`). Recognised by its
/// source (`ferryfs:<state dir>`): a direct mount(2) shows the type as plain `fuse`, without our
/// subtype.
fn ferryfs_mount_line(mp: &Path, state: Option<&Path>) -> Option<MountLine> {
    let mp = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    let want = match state {
        Some(st) => format!("{FS_TYPE}:{}", st.display()),
        None => format!("{FS_TYPE}:"),
    };
    mounts().into_iter().rev().find(|m| {
        m.mp == mp
            && m.fstype.starts_with("fuse")
            && match state {
                Some(_) => m.source == want,
                None => m.source.starts_with(&want),
            }
    })
}

/// st_dev of our own FUSE mount at `mp`, from mountinfo: a stat of `mp` would be a request to
/// this very daemon, not yet serving.
fn mount_dev(mp: &Path, state: &Path) -> Option<u64> {
    ferryfs_mount_line(mp, Some(state)).map(|m| m.dev)
}

/// Is the view of the migration in `state` (absolute) mounted at `mp`?
pub fn is_mounted(mp: &Path, state: &Path) -> bool {
    ferryfs_mount_line(mp, Some(state)).is_some()
}

/// The ferryfs mount at `mp`, if any: its source (`ferryfs:<state dir>`).
pub fn ferryfs_mount_at(mp: &Path) -> Option<String> {
    ferryfs_mount_line(mp, None).map(|m| m.source)
}

/// Is a daemon serving the migration in `state`? It holds the state dir's lock while it lives.
fn state_is_served(state: &Path) -> bool {
    match std::fs::File::open(state.join("lock")) {
        Ok(f) => rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err(),
        Err(_) => false,
    }
}

/// Detach ferryfs mounts at `path` whose daemon is gone (killed, OOM): no daemon holds their
/// state dir's lock. `own_state` is ours, locked by this process, so any mount of it is dead.
/// A live view of another migration is refused. A dead mount cannot be told apart by stat: the
/// kernel keeps answering from its attribute cache for a while after the daemon died.
fn clear_dead_mounts(path: &Path, own_state: &Path) -> Result<(), String> {
    while let Some(src) = ferryfs_mount_at(path) {
        let state = PathBuf::from(src.strip_prefix(&format!("{FS_TYPE}:")).unwrap_or(&src));
        if state != own_state && state_is_served(&state) {
            return Err(format!(
                "{} is already a live ferryfs view ({src}); unmount it first",
                path.display()
            ));
        }
        tracing::warn!(path = %path.display(), %src, "detaching a dead view left by a killed daemon");
        rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)
            .map_err(|e| format!("{}: cannot detach dead mount: {e}", path.display()))?;
    }
    Ok(())
}

/// Before the CLI works on a migration without a daemon: detach views a killed daemon of this
/// state dir left over its stores (OLD's own path, when it was mounted in place).
pub fn clear_dead_views(m: &Migration) -> Result<(), String> {
    let state_abs = std::fs::canonicalize(&m.dir).unwrap_or(m.dir.clone());
    for p in [m.config.old.posix_path(), m.config.new.posix_path()]
        .into_iter()
        .flatten()
    {
        clear_dead_mounts(p, &state_abs)?;
    }
    Ok(())
}

fn mount_options(opts: &[String]) -> (Vec<MountOption>, SessionACL) {
    let mut acl = SessionACL::Owner;
    let mut out = Vec::new();
    for o in opts
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        match o {
            "allow_other" => acl = SessionACL::All,
            "allow_root" => acl = SessionACL::RootAndOwner,
            "ro" => out.push(MountOption::RO),
            "rw" => out.push(MountOption::RW),
            "dev" => out.push(MountOption::Dev),
            "nodev" => out.push(MountOption::NoDev),
            "suid" => out.push(MountOption::Suid),
            "nosuid" => out.push(MountOption::NoSuid),
            "exec" => out.push(MountOption::Exec),
            "noexec" => out.push(MountOption::NoExec),
            "noatime" => out.push(MountOption::NoAtime),
            "atime" => out.push(MountOption::Atime),
            "default_permissions" => {} // always on
            other => out.push(MountOption::CUSTOM(other.to_string())),
        }
    }
    (out, acl)
}

/// What a view mounted with `opts` takes from OLD's entries that prepare counted: set-id
/// programs run without their privileges under `nosuid`, device files cannot be opened under
/// `nodev` (both FUSE's defaults). One warning each, for `mount` to print.
fn powers_lost(opts: &[MountOption], t: &crate::state::Totals) -> Vec<String> {
    let mut out = Vec::new();
    if t.setid > 0 && !opts.contains(&MountOption::Suid) {
        out.push(format!(
            "OLD holds {} set-id program(s): the view is mounted nosuid, so through it they run \
             without their privileges (-o suid keeps them; docs/CONFIGURATION.md says when \
             that is safe)",
            t.setid
        ));
    }
    if t.devices > 0 && !opts.contains(&MountOption::Dev) {
        out.push(format!(
            "OLD holds {} device file(s): the view is mounted nodev, so they cannot be opened \
             through it (-o dev allows them)",
            t.devices
        ));
    }
    out
}

/// Serve the view in this process until it is unmounted. `ready` is told once the kernel has
/// accepted the mount.
pub fn serve(args: &MountArgs, mut ready: Option<std::fs::File>) -> Result<(), String> {
    let fail = |ready: &mut Option<std::fs::File>, msg: String| -> String {
        if let Some(r) = ready.as_mut() {
            let _ = writeln!(r, "ERROR {msg}");
        }
        msg
    };
    let mp = &args.mountpoint;
    let mut notifier = crate::sdnotify::Notifier::from_env();
    let state_abs = std::fs::canonicalize(&args.state).unwrap_or(args.state.clone());
    let mut taken = None;
    let migration = if args.takeover {
        match take_over(args, &notifier) {
            Ok((m, t)) => {
                if let Some(us) = t.handed.watchdog_usec {
                    notifier.adopt_watchdog(Duration::from_micros(us));
                }
                taken = Some(t);
                m
            }
            Err(e) => return Err(fail(&mut ready, e)),
        }
    } else {
        match Migration::open(&args.state) {
            Ok(m) => m,
            Err(e) => return Err(fail(&mut ready, e.to_string())),
        }
    };
    // An abort that went past its staging has begun to rewrite OLD: the view's records no
    // longer match it, and changes made through a view now would not be in OLD at the end.
    if let Ok(Some(step)) = migration.journal.meta("abort_step")
        && crate::lifecycle::abort_rewrites_old(&step)
    {
        return Err(fail(
            &mut ready,
            format!(
                "an abort of this migration is under way and has begun to write OLD ({}): run \
                 `ferryfs abort --state {}` again to finish it; the view cannot be served",
                String::from_utf8_lossy(&step),
                args.state.display()
            ),
        ));
    }
    let notifier = Arc::new(notifier);
    let opened = match &taken {
        // The stores' roots as the old daemon opened them: with the view mounted in place,
        // OLD's path is the view itself now.
        Some(t) => {
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
            match open_view_with(&migration, root) {
                Ok(o) => o,
                Err(e) => return Err(fail(&mut ready, e)),
            }
        }
        None => {
            // Dead views first (also over OLD's path, when mounted in place), so the stores
            // below are the real directories again.
            let old_path = migration.config.old.posix_path();
            let new_path = migration.config.new.posix_path();
            for p in [Some(mp), old_path, new_path].into_iter().flatten() {
                if let Err(e) = clear_dead_mounts(p, &state_abs) {
                    return Err(fail(&mut ready, e));
                }
            }
            for (what, p) in [("OLD", old_path), ("NEW", new_path)]
                .into_iter()
                .filter_map(|(w, p)| p.map(|p| (w, p)))
            {
                if let Some(src) = ferryfs_mount_at(p) {
                    return Err(fail(
                        &mut ready,
                        format!(
                            "{what} store {} is covered by a live ferryfs view ({src})",
                            p.display()
                        ),
                    ));
                }
            }
            // Open both stores before mounting: the mountpoint may be OLD's own path (rule 11).
            match open_view(&migration) {
                Ok(o) => o,
                Err(e) => return Err(fail(&mut ready, e)),
            }
        }
    };
    let view = opened.view.clone();
    if let Some(t) = taken.as_mut() {
        let st = std::mem::take(&mut t.handed.view);
        let files = std::mem::take(&mut t.files);
        let got = view.import_state(st, files);
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
    let copier = opened.copier(&migration.journal, args.copier);
    let publish_thread = opened
        .publisher
        .as_ref()
        .map(|p| spawn_publish_loop(p.clone(), copier.clone()))
        .transpose()?;
    let copier_thread = {
        let c = copier.clone();
        std::thread::Builder::new()
            .name("copier".into())
            .spawn(move || c.run_background())
            .map_err(|e| e.to_string())?
    };
    let sampler = spawn_rate_sampler(copier.clone(), migration.journal.clone());
    let finished = matches!(opened.phase, Phase::Committed | Phase::Aborted);
    let (execute, paused) = match &taken {
        // The copier goes on as the old daemon left it, limits included.
        Some(t) => {
            let c = t.handed.copier;
            copier.bw.set(c.bwlimit);
            copier.ops.set(c.ops_limit);
            copier.set_workers(c.workers);
            (c.executing, c.paused)
        }
        None => (!args.no_copy, false),
    };
    let invalidations = view.invalidations();
    if execute && !finished {
        if let Err(e) = copier.execute() {
            return Err(fail(&mut ready, format!("starting the copier: {e}")));
        }
    }
    if paused {
        copier.pause();
    }
    let fs = FerryFs::new(view.clone(), args.passthrough, args.metadata_ttl)
        .with_readdirplus(args.readdirplus);
    let parts = fs.handover_parts();
    let (mut opts, mut acl) = mount_options(&args.options);
    if taken.is_none() {
        let scanned = crate::state::totals(copier.journal()).unwrap_or_default();
        for w in powers_lost(&opts, &scanned) {
            tracing::warn!("{w}");
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "WARN {w}");
            }
        }
    }
    if let Some(t) = taken.as_mut() {
        acl = t.acl();
        let dev = match t.fuse[0].try_clone() {
            Ok(d) => d,
            Err(e) => return Err(fail(&mut ready, format!("dup /dev/fuse: {e}"))),
        };
        parts.import_passthrough(std::mem::take(&mut t.handed.passthrough), dev);
    }
    let dup = |fd: BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned()
            .map_err(|e| format!("dup {what}: {e}"))
    };
    let source = (|| -> Result<_, String> {
        Ok(crate::handover::Source::new(
            parts.clone(),
            view.clone(),
            copier.clone(),
            migration.journal.clone(),
            dup(migration.lock_file().as_fd(), "the state lock")?,
            match &opened.old {
                Some(o) => Some(dup(o.root(), "OLD root")?),
                None => None,
            },
            dup(opened.new.root(), "NEW root")?,
            mp.clone(),
            state_abs.clone(),
            acl,
        ))
    })();
    let source = match source {
        Ok(mut s) => {
            s.watchdog = notifier.watchdog();
            Arc::new(s)
        }
        Err(e) => return Err(fail(&mut ready, e)),
    };
    let ctl = crate::control::Ctx {
        handover: Some(source),
        copier: copier.clone(),
        journal: migration.journal.clone(),
        new_root: match opened.new.root().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return Err(fail(&mut ready, format!("dup NEW root: {e}"))),
        },
        old_root: opened
            .old
            .as_ref()
            .and_then(|o| o.root().try_clone_to_owned().ok()),
        old_s3: opened.old_s3.clone(),
        mountpoint: mp.clone(),
    };
    if let Err(e) = crate::control::serve(&args.state, Arc::new(ctl)) {
        return Err(fail(
            &mut ready,
            format!("control socket in {}: {e}", args.state.display()),
        ));
    }
    let observed = crate::observe::Observed::new(
        copier.clone(),
        migration.journal.clone(),
        mp.clone(),
        state_abs.clone(),
        opened.has_old(),
        parts.gate.clone(),
    );
    if let Some(addr) = args.metrics_addr {
        match crate::observe::serve(addr, observed.clone()) {
            Ok(bound) => tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz"),
            Err(e) => {
                return Err(fail(&mut ready, format!("--metrics-addr {addr}: {e}")));
            }
        }
    }
    opts.push(MountOption::FSName(format!(
        "{FS_TYPE}:{}",
        state_abs.display()
    )));
    opts.push(MountOption::Subtype(FS_TYPE.into()));
    opts.push(MountOption::DefaultPermissions);
    let mut cfg = Config::default();
    cfg.mount_options = opts;
    cfg.acl = acl;
    cfg.n_threads = Some(args.threads.max(1));
    cfg.clone_fd = true;
    let session = match taken.take() {
        Some(t) => {
            let dev = t.fuse[0].as_fd();
            let s = match crate::fuse::handover::session_on(fs, dev, t.handed.kernel, acl, cfg) {
                Ok(s) => s,
                Err(e) => return Err(fail(&mut ready, format!("taking the FUSE session: {e}"))),
            };
            // The requests the old daemon parked are queued again, for our threads; then the
            // old daemon's fds can go (nothing waits on them any more).
            if let Err(e) = crate::fuse::handover::resend(dev) {
                return Err(fail(&mut ready, format!("FUSE_NOTIFY_RESEND: {e}")));
            }
            drop(t);
            s
        }
        None => match fuser::Session::new(fs, mp, &cfg) {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut ready, format!("mounting {}: {e}", mp.display()))),
        },
    };
    if let Some(dev) = mount_dev(mp, &state_abs) {
        view.set_mount_dev(dev);
    }
    spawn_invalidator(view.clone(), invalidations, session.notifier())
        .map_err(|e| e.to_string())?;
    tracing::info!(mountpoint = %mp.display(), state = %state_abs.display(), "view serving");
    observed.set_ready();
    // Probes cost a statfs through the view every few seconds: only when someone watches.
    if args.metrics_addr.is_some() || notifier.enabled() {
        let roots = (|| -> std::io::Result<_> {
            let old = match (&opened.old, &opened.old_s3) {
                (Some(o), _) => Some(crate::observe::OldProbe::Posix(
                    o.root().try_clone_to_owned()?,
                )),
                (None, Some(t)) => Some(crate::observe::OldProbe::S3(t.clone())),
                (None, None) => None,
            };
            Ok((old, opened.new.root().try_clone_to_owned()?))
        })();
        match roots {
            Ok((old, new)) => observed.start_probes(old, new),
            Err(e) => return Err(fail(&mut ready, format!("dup store roots: {e}"))),
        }
    }
    if let Some(mut r) = ready.take() {
        let _ = writeln!(r, "READY");
    }
    notifier.notify(&format!("READY=1\nSTATUS={}", service_status(&copier, mp)));
    if notifier.enabled() {
        spawn_notify_loop(
            notifier.clone(),
            observed.clone(),
            copier.clone(),
            mp.clone(),
        );
    }
    let mp_for_signal = mp.clone();
    let (notifier_sig, observed_sig) = (notifier.clone(), observed.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            wait_for_termination();
            tracing::info!(mountpoint = %mp_for_signal.display(), "signal received: unmounting");
            observed_sig.set_stopping();
            notifier_sig.notify("STOPPING=1\nSTATUS=unmounting");
            // Our own umount, not fuser's unmounter: that one forgets the mount after a
            // failed attempt, so it cannot be retried. The session loop ends when the kernel
            // detaches the mount; a busy that lasts (files open in the view) keeps serving.
            if let Err(e) = unmount_retrying_busy(&mp_for_signal) {
                tracing::error!(error = %e, "unmount on signal failed; still serving");
            }
        })
        .map_err(|e| e.to_string())?;
    let res = session.run();
    observed.set_stopping();
    notifier.notify("STOPPING=1\nSTATUS=view stopped");
    copier.shutdown();
    let _ = copier_thread.join();
    let _ = sampler.join();
    if let Some(t) = publish_thread {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(crate::control::socket_path(&args.state));
    drop(migration);
    tracing::info!("view stopped");
    res.map_err(|e| format!("serving: {e}"))
}

/// The thread that tells the kernel to drop what it caches of an inode (`View::invalidate`).
/// Its own thread: a notification can wait on the kernel's locks, which a request in flight
/// may hold while it waits for its answer.
fn spawn_invalidator(
    view: Arc<View>,
    rx: crossbeam_channel::Receiver<u64>,
    notifier: fuser::Notifier,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("invalidate".into())
        .spawn(move || {
            for ino in rx {
                let sent = view.while_invalidations_open(|| {
                    // ENOENT: the kernel holds nothing of that inode (forgotten, never known).
                    if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0)
                        && e.raw_os_error() != Some(libc::ENOENT)
                    {
                        tracing::debug!(ino, error = %e, "kernel cache invalidation");
                    }
                });
                if !sent {
                    // Handing over: the kernel's cache of it expires with the TTL.
                    tracing::debug!(ino, "kernel cache invalidation skipped during a handover");
                }
            }
        })
        .map(drop)
}

/// `mount --takeover`: receive the live mount from the daemon serving the state dir, wait for
/// it to exit, and open the journal under the lock it handed over. Everything that can be
/// refused is refused before the old daemon lets go, and it then keeps serving.
fn take_over(
    args: &MountArgs,
    notifier: &crate::sdnotify::Notifier,
) -> Result<(Migration, crate::handover::Taken), String> {
    // The old daemon's fds arrive in this process: one per open file, directory and thread.
    raise_nofile_limit();
    let mut t = crate::handover::take(&args.state, &args.mountpoint)?;
    // Under systemd this process becomes the service's main process before the old one
    // exits, or systemd would take that exit for the service's end and stop us with it.
    notifier.notify(&format!("MAINPID={}", std::process::id()));
    if let Err(e) = t.commit() {
        notifier.notify(&format!("MAINPID={}", t.handed.pid));
        // The old daemon has let go and this one cannot serve: nobody will answer the
        // mount's requests. Say how to end the wait (a process stuck on an unanswered FUSE
        // request cannot be killed otherwise).
        let conn = ferryfs_mount_line(&args.mountpoint, None)
            .map(|m| {
                format!(
                    "/sys/fs/fuse/connections/{}/abort",
                    rustix::fs::minor(m.dev)
                )
            })
            .unwrap_or_else(|| "/sys/fs/fuse/connections/<minor of the mount>/abort".into());
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
            Err(e) => return Err(format!("opening the journal after the handover: {e}")),
        }
    }
}

/// systemd's one-line status: where the view serves and how far the copy is.
fn service_status(copier: &crate::copier::Copier, mp: &Path) -> String {
    let d = copier.view().done();
    let t = crate::state::totals(copier.journal()).unwrap_or_default();
    let phase = crate::state::phase(copier.journal())
        .map(|p| p.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let pct = if t.bytes == 0 {
        100.0
    } else {
        (d.bytes as f64 * 100.0 / t.bytes as f64).min(100.0)
    };
    format!(
        "serving {}; {phase}; {} of {} files, {pct:.1}% of bytes in NEW",
        mp.display(),
        d.files,
        t.files.max(d.files)
    )
}

/// Under systemd: the status line every few seconds, and the watchdog's keep-alive while the
/// health checks pass (a wedged view then gets restarted by systemd's WatchdogSec=).
fn spawn_notify_loop(
    notifier: Arc<crate::sdnotify::Notifier>,
    observed: Arc<crate::observe::Observed>,
    copier: Arc<crate::copier::Copier>,
    mp: PathBuf,
) {
    let every = notifier
        .watchdog()
        .map_or(crate::observe::PROBE_EVERY, |w| {
            (w / 3).clamp(Duration::from_millis(100), crate::observe::PROBE_EVERY)
        });
    let _ = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || {
            while !copier.stopping() {
                std::thread::sleep(every);
                let mut msg = format!("STATUS={}", service_status(&copier, &mp));
                if notifier.watchdog().is_some() && observed.healthy() {
                    msg.push_str("\nWATCHDOG=1");
                }
                notifier.notify(&msg);
            }
        });
}

/// An S3 NEW: a publish pass whenever the view or the copier changed the staging tree (at most
/// one every half second, and never sooner than three times the last pass's walk after it: a
/// pass walks the whole staging tree, so on a large tree under steady writes the publisher
/// spends at most a quarter of its time walking), failed uploads retried every 30 s, and a
/// last pass at unmount. No
/// pass while the copier is paused (by an operator, or by a handover: the next daemon
/// publishes) or halted (abort).
fn spawn_publish_loop(
    p: Arc<crate::publish::Publisher>,
    copier: Arc<crate::copier::Copier>,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || {
            let mut seen = None;
            // When to try again a pass that failed, or had failed uploads.
            let mut retry_at: Option<Instant> = None;
            // No pass before this (the last pass's walk, three times over, after it).
            let mut rest_until = Instant::now();
            loop {
                let stopping = copier.stopping();
                let g = copier.view().generation();
                let retry = retry_at.is_some_and(|t| Instant::now() >= t);
                let idle = copier.state().paused;
                let rested = Instant::now() >= rest_until;
                if !idle && ((rested && (seen != Some(g) || retry)) || stopping) {
                    seen = Some(g);
                    retry_at = None;
                    let r = p.pass();
                    if let Ok(r) = &r {
                        rest_until = Instant::now() + r.walk * 3;
                    }
                    match r {
                        // Cut short (a handover that was then cancelled): run it again.
                        Ok(r) if r.interrupted => seen = None,
                        // It had work: one more pass confirms the bucket holds it all (and
                        // says so, for `status` and `execute --wait`).
                        Ok(r) if r.errors.is_empty() && !r.clean() => seen = None,
                        Ok(r) if !r.errors.is_empty() => {
                            retry_at = Some(Instant::now() + Duration::from_secs(30));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "publish pass failed");
                            retry_at = Some(Instant::now() + Duration::from_secs(30));
                        }
                    }
                }
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .map_err(|e| e.to_string())
}

/// Every second while the copier runs: the copy rate over the last ten seconds, into the
/// journal for `status` (a reader in another process).
fn spawn_rate_sampler(
    copier: Arc<crate::copier::Copier>,
    journal: crate::journal::Records,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rate".into())
        .spawn(move || {
            let mut rate = crate::copier::RateMeter::default();
            while !copier.stopping() {
                std::thread::sleep(Duration::from_secs(1));
                let bps = rate.sample(copier.view().done().bytes);
                crate::metrics::METRICS.set_copy_rate(bps);
                if let Err(e) = crate::state::record_rate(&journal, bps) {
                    tracing::warn!(error = %e, "recording the copy rate");
                }
            }
        })
        .expect("spawn rate sampler")
}

/// Block SIGTERM/SIGINT/SIGHUP in every thread (call before spawning any), so only the signal
/// thread's sigwait sees them and the view shuts down through a clean unmount.
pub fn block_termination_signals() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_termination() {
    // SAFETY: as above; sigwait writes the received signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

/// The view holds an O_PATH fd per inode the kernel knows (as virtiofsd does; two for a merged
/// directory), so the daemon needs far more fds than a login's default limit. As root it may
/// raise even the hard limit, up to the kernel's `fs.nr_open`; anything lower is kept as is.
fn raise_nofile_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let cur = getrlimit(Resource::Nofile);
    let want = Rlimit {
        current: Some(nr_open),
        maximum: Some(nr_open),
    };
    if setrlimit(Resource::Nofile, want).is_err() {
        // Not privileged to raise the hard limit: take the soft limit up to it.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: cur.maximum,
                maximum: cur.maximum,
            },
        );
    }
    let now = getrlimit(Resource::Nofile);
    tracing::info!(open_files = ?now.current, "open-file limit");
}

/// Start the daemon in the background and wait until it serves (or fails).
pub fn spawn_background(args: &MountArgs, raw_args: &[OsString]) -> Result<(), String> {
    let (rd, wr) = rustix::pipe::pipe().map_err(|e| format!("pipe: {e}"))?;
    // The child inherits only the write end.
    rustix::io::fcntl_setfd(&wr, rustix::io::FdFlags::empty()).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&args.state).ok();
    let log_path = args.state.join("ferryfs.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(raw_args)
        .arg("--foreground")
        .env(READY_FD_ENV, wr.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null());
    // Started by a systemd unit (its ExecReload runs `mount --takeover`): the daemon logs to
    // the journal as the one it replaces did, not to a file.
    if std::env::var_os("JOURNAL_STREAM").is_none() {
        cmd.stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let ready_fd = wr.as_raw_fd();
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (close_range, fcntl) and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // The daemon keeps stdio and the readiness pipe only. Any other fd the caller left
            // open (a shell's `exec 3<file` in the view, during `mount --takeover`) would be
            // a file open in the view for the daemon's whole life: the mount could never
            // unmount.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if libc::fcntl(ready_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    drop(wr);
    let mut line = String::new();
    let mut reader = BufReader::new(std::fs::File::from(rd));
    // Warnings first (what the view takes away, say), then READY or ERROR.
    loop {
        line.clear();
        let _ = reader.read_line(&mut line);
        match line.trim_end().strip_prefix("WARN ") {
            Some(w) => eprintln!("warning: {w}"),
            None => break,
        }
    }
    let line = line.trim_end();
    if line == "READY" {
        return Ok(());
    }
    let _ = child.wait();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    Err(match line.strip_prefix("ERROR ") {
        Some(msg) => msg.to_string(),
        None => format!(
            "the daemon exited before serving; see {}",
            log_path.display()
        ),
    })
}

/// The readiness pipe given by a parent `mount`, if any.
pub fn ready_pipe_from_env() -> Option<std::fs::File> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: the parent put this fd number in our environment for exactly this purpose and
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: removing our own variable before any thread is spawned.
    unsafe { std::env::remove_var(READY_FD_ENV) };
    Some(std::fs::File::from(owned))
}

/// umount(2) of `mp`. EBUSY can be a path lookup of the view that is in flight at this very
/// moment (a health probe's statfs, an `ls`), so it is retried for half a second: only a busy
/// that lasts (files open in the view) is returned.
fn unmount_retrying_busy(mp: &Path) -> rustix::io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::mount::unmount(mp, rustix::mount::UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) if tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// `ferryfs unmount`: unmount, then wait until the daemon has released its state dir.
pub fn unmount(mp: &Path) -> Result<(), String> {
    let source =
        ferryfs_mount_at(mp).ok_or_else(|| format!("{} is not a ferryfs mount", mp.display()))?;
    unmount_retrying_busy(mp).map_err(|e| {
        if e == rustix::io::Errno::BUSY {
            format!(
                "{}: busy (files are open in the view); close them and retry",
                mp.display()
            )
        } else {
            format!("{}: {e}", mp.display())
        }
    })?;
    if let Some(state) = source.strip_prefix(&format!("{FS_TYPE}:")) {
        let lock = Path::new(state).join("lock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(f) = std::fs::File::open(&lock)
                && rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(format!(
            "unmounted, but the daemon for {state} has not exited after 30 s"
        ));
    }
    Ok(())
}
