//! The control socket: `STATE/control.sock`, owner-only, one JSON request per line and one
//! JSON response per line. The daemon serving a state dir answers it; the CLI's execute,
//! pause, resume, limits, verify and commit go through it when a daemon runs, and otherwise
//! do the work in their own process.

pub mod client;
pub mod protocol;

pub use client::{daemon_serves, request};
pub use protocol::{Aborted, ControlError, Request, Response};

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::copier::Copier;
use crate::journal::Records;
use crate::state::layout;

/// The serving daemon's side of a takeover, as the socket needs it (`daemon::takeover`
/// implements it): the socket hands a new daemon's request over, and counts the control
/// requests being answered so that a takeover waits for them.
pub trait TakeoverSource: Send + Sync {
    /// Answer a new daemon's request for the mount on `conn`.
    fn give(&self, conn: UnixStream) -> std::io::Result<()>;
    /// Count a control request while it is answered; false (not counted) while a takeover
    /// runs: its answer could come from a daemon about to exit.
    fn enter_control(&self) -> bool;
    fn leave_control(&self);
}

/// A control request being answered (see [`TakeoverSource::enter_control`]).
struct Answering<'a>(&'a dyn TakeoverSource);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.leave_control();
    }
}

/// What the daemon's socket works on.
pub struct Ctx {
    pub copier: Arc<Copier>,
    pub journal: Records,
    pub new_root: OwnedFd,
    /// OLD's root, for abort (`None` once committed).
    pub old_root: Option<OwnedFd>,
    /// OLD when it is an S3 store (not committed).
    pub old_s3: Option<Arc<crate::store::s3::tree::S3Tree>>,
    pub mountpoint: PathBuf,
    /// The state dir (commit writes the manifest there).
    pub state: PathBuf,
    /// What a takeover by a new daemon needs.
    pub takeover: Option<Arc<dyn TakeoverSource>>,
}

/// Listen on the state dir's socket (replacing a stale one: the caller holds the state lock,
/// so no other daemon can be behind it) and answer requests in background threads.
pub fn serve(state: &Path, ctx: Arc<Ctx>) -> std::io::Result<()> {
    let path = layout::socket_path(state);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &ctx) {
                            tracing::warn!(error = %e, "control connection");
                        }
                    });
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, ctx: &Ctx) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Takeover) => {
            return match &ctx.takeover {
                Some(src) => src.give(conn),
                None => Ok(()),
            };
        }
        Ok(req) => {
            let guard = ctx
                .takeover
                .as_deref()
                .map(|t| t.enter_control().then_some(Answering(t)));
            if matches!(guard, Some(None)) {
                Response::err("the mount is being handed over to a new daemon; retry in a moment")
            } else {
                tracing::info!(?req, "control request");
                handle(req, ctx)
            }
        }
        Err(e) => Response::err(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp).expect("response serializes");
    out.push(b'\n');
    (&conn).write_all(&out)
}

fn handle(req: Request, ctx: &Ctx) -> Response {
    let c = &ctx.copier;
    match req {
        Request::Status => Response::ok("copier state", c.state()),
        Request::Execute => match c.execute() {
            Ok(()) => Response::ok("executing: the copier runs in the mounted daemon", ()),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Resolve { paths } => match crate::lifecycle::resolve(c, &paths) {
            Ok(m) => Response::ok(m, ()),
            Err(e) => Response::err(e.to_string()),
        },
        Request::RecopyLost => {
            c.recopy_lost();
            Response::ok("the next pass copies again what NEW lost", ())
        }
        Request::Pause => {
            c.pause();
            Response::ok("copier paused", ())
        }
        Request::Resume => {
            c.resume();
            Response::ok("copier resumed", ())
        }
        Request::Limits {
            bwlimit,
            bwlimit_timetable,
            ops_limit,
            workers,
        } => {
            if let Some(t) = bwlimit_timetable {
                match crate::copier::limits::Timetable::parse(&t) {
                    Ok(t) => c.set_bwlimit(t),
                    Err(e) => return Response::err(e),
                }
            } else if let Some(b) = bwlimit {
                c.set_bwlimit(crate::copier::limits::Timetable::constant(b));
            }
            if let Some(o) = ops_limit {
                c.ops.set(o);
            }
            if let Some(w) = workers {
                c.set_workers(w);
            }
            Response::ok("limits set", c.state())
        }
        Request::Verify { checksum } => match crate::lifecycle::verify(c, checksum) {
            Ok(r) => Response::ok(
                if r.mismatches.is_empty() && r.stale.is_empty() && r.errors.is_empty() {
                    "verified"
                } else {
                    "mismatches found"
                },
                r,
            ),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Commit { yes } => {
            match crate::lifecycle::commit(
                c,
                &ctx.journal,
                std::os::fd::AsFd::as_fd(&ctx.new_root),
                &ctx.state,
                yes,
            ) {
                Ok(m) => Response::ok(m, ()),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Abort { keep_new } => abort(ctx, keep_new),
        Request::Takeover => Response::err("takeover is answered on its own"),
    }
}

/// Abort while the view is mounted: the copier stops, every change through the view waits
/// while OLD is rebuilt as the view shows it, then the view is detached (lazily: open files
/// keep working until closed) and the daemon exits once the kernel lets go. With the view
/// mounted in place, OLD's path then shows OLD again, equal to what the view showed.
fn abort(ctx: &Ctx, keep_new: bool) -> Response {
    let old = match (&ctx.old_root, &ctx.old_s3) {
        (Some(fd), _) => crate::lifecycle::OldTarget::Posix(std::os::fd::AsFd::as_fd(fd)),
        (None, Some(t)) => crate::lifecycle::OldTarget::S3(t),
        (None, None) => {
            return Response::err("the migration is committed: abort is no longer possible");
        }
    };
    let c = &ctx.copier;
    if !c.halt(std::time::Duration::from_secs(60)) {
        return Response::err("the copier did not stop within 60 s; try again");
    }
    let res = {
        let _still = c.view().quiesce();
        crate::lifecycle::abort(
            c.view(),
            &ctx.journal,
            old,
            std::os::fd::AsFd::as_fd(&ctx.new_root),
            keep_new,
            c.publisher().map(|p| p.as_ref()),
        )
    };
    match res {
        Ok(msg) => {
            detach_soon(ctx.mountpoint.clone(), "aborted");
            Response::ok(
                format!(
                    "{msg}; the view at {} is detached",
                    ctx.mountpoint.display()
                ),
                Aborted {
                    mountpoint: ctx.mountpoint.clone(),
                },
            )
        }
        // Stopped after it began to rewrite OLD: the view's records no longer match OLD, and
        // a change made through it now would not reach OLD. Detached as after an abort
        // (`mount` refuses until abort is run again).
        Err(e)
            if ctx
                .journal
                .abort_step()
                .ok()
                .flatten()
                .is_some_and(|s| crate::lifecycle::abort_rewrites_old(&s)) =>
        {
            detach_soon(ctx.mountpoint.clone(), "abort stopped part way");
            Response::err(format!(
                "{e} (OLD is partly rewritten, so the view at {} is detached; run `ferryfs \
                 abort` again to finish)",
                ctx.mountpoint.display()
            ))
        }
        Err(e) => Response::err(format!(
            "{e} (the copier is stopped; run `ferryfs abort` again to finish)"
        )),
    }
}

/// Detach the view lazily (open files keep working until closed) once the answer has had a
/// moment to reach the client; the daemon exits once the kernel lets go.
fn detach_soon(mp: std::path::PathBuf, why: &'static str) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        tracing::info!(mountpoint = %mp.display(), why, "detaching the view");
        if let Err(e) = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH) {
            tracing::error!(error = %e, "detaching the view");
        }
    });
}
