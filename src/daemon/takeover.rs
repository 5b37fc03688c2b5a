//! Restart without unmount: `mount --takeover` hands a live view from the daemon serving it
//! to a new process (an upgraded binary, new flags), and applications see a pause of well
//! under a second instead of an error.
//!
//! Over the state dir's control socket the new daemon asks for the mount. The old one parks
//! every FUSE request (no answer), waits for the ones being answered, pauses the copier, and
//! sends what the kernel holds of it (inode numbers and names, open files and their fds,
//! passthrough backing ids), its /dev/fuse fds, the store roots and the state dir's locked
//! lock file. When the new daemon says it has everything, the old one exits without
//! unmounting; the kernel connection lives on in the fds the new one holds. The new daemon
//! opens the journal, puts the state back, and has the kernel queue the parked requests again.
//!
//! Until the new daemon says "taken", the old one can go back to serving as if nothing
//! happened (the new one failed, or sent nothing): a failed takeover loses nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::copier::Copier;
use crate::fuse::takeover::{AdoptedRings, KernelInit, Parts, PassthroughState, UringHanded};
use crate::journal::{Meta, Records};
use crate::view::{View, ViewState};

/// Bumped whenever [`Handed`] changes incompatibly: a daemon refuses a takeover in a format
/// it does not know, and the old daemon keeps serving. 2: directory offsets are places by
/// name (see `placed` in src/fs/handles.rs), no longer positions in a snapshot, and a
/// directory handle may be handed over before its first listing (`listed`), which a daemon
/// of format 1 would serve as an empty directory.
pub const FORMAT: u32 = 2;
/// The format of a mount served over FUSE io_uring: format 2 and its ring entries
/// ([`Handed::uring`]). Daemons that know only format 2 refuse it (they cannot serve rings)
/// and the old daemon serves on.
pub const FORMAT_URING: u32 = 3;

/// How long the old daemon waits for the requests being answered to finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long the old daemon waits for the new one to say it has everything.
const TAKEN_LIMIT: Duration = Duration::from_secs(60);
/// How long the new daemon waits for the old one to exit.
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// How long the old daemon waits for its free ring entries to fill (io_uring).
const FILL_LIMIT: Duration = Duration::from_secs(5);
/// The most bytes of held requests a handover carries (every ring entry full: 1 MiB each).
const MAX_RING_BYTES: u64 = 1 << 34;
/// fds per SCM_RIGHTS message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 200;

/// What a daemon hands over, besides its fds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handed {
    pub format: u32,
    /// The old daemon's version.
    pub version: String,
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    /// Who may use the mount (fuser's access check): "owner", "all" or "root".
    pub acl: String,
    pub kernel: KernelInit,
    pub fuse_fds: usize,
    /// Whether an OLD store root is among the fds (not once committed).
    pub has_old: bool,
    pub view: ViewState,
    pub passthrough: PassthroughState,
    pub copier: CopierCarry,
    /// The systemd watchdog period the old daemon kept, which the new one keeps up.
    #[serde(default)]
    pub watchdog_usec: Option<u64>,
    /// A mount served over io_uring (format 3): its ring entries. The requests they hold
    /// follow the fds, in one frame.
    #[serde(default)]
    pub uring: Option<UringHanded>,
}

/// The copier's live settings, kept across the takeover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopierCarry {
    pub executing: bool,
    pub paused: bool,
    pub workers: usize,
    pub bwlimit: u64,
    /// The timetable the limit follows (an older daemon hands none).
    #[serde(default)]
    pub bwlimit_timetable: Option<String>,
    pub ops_limit: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Refused(String),
    Handed(Box<Handed>),
}

/// What the serving daemon keeps for a takeover.
pub struct Source {
    pub parts: Parts,
    pub view: Arc<View>,
    pub copier: Arc<Copier>,
    pub journal: Records,
    pub lock: OwnedFd,
    pub old_root: Option<OwnedFd>,
    pub new_root: OwnedFd,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    /// Who may use the mount (see `fuse::session::MountPlan::acl_name`).
    pub acl: &'static str,
    /// The systemd watchdog period this daemon keeps up, if any.
    pub watchdog: Option<Duration>,
    busy: AtomicBool,
    /// Control requests being answered (verify, commit...): a takeover waits for none.
    control: std::sync::atomic::AtomicUsize,
}

impl Source {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        parts: Parts,
        view: Arc<View>,
        copier: Arc<Copier>,
        journal: Records,
        lock: OwnedFd,
        old_root: Option<OwnedFd>,
        new_root: OwnedFd,
        mountpoint: PathBuf,
        state_dir: PathBuf,
        acl: &'static str,
    ) -> Source {
        Source {
            parts,
            view,
            copier,
            journal,
            lock,
            old_root,
            new_root,
            mountpoint,
            state_dir,
            acl,
            watchdog: None,
            busy: AtomicBool::new(false),
            control: Default::default(),
        }
    }
}

impl crate::control::TakeoverSource for Source {
    fn give(&self, conn: UnixStream) -> std::io::Result<()> {
        give(conn, self)
    }

    /// Counts a control request while it is answered; refused while a takeover runs (its
    /// answer could come from a daemon about to exit).
    fn enter_control(&self) -> bool {
        self.control.fetch_add(1, Ordering::SeqCst);
        if self.busy.load(Ordering::SeqCst) {
            self.control.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn leave_control(&self) {
        self.control.fetch_sub(1, Ordering::SeqCst);
    }
}

fn send_frame(conn: &UnixStream, a: &Answer) -> std::io::Result<()> {
    let body = serde_json::to_vec(a).map_err(std::io::Error::other)?;
    let mut w = conn;
    w.write_all(&(body.len() as u64).to_le_bytes())?;
    w.write_all(&body)
}

/// Send `fds` in messages of one byte each, so the receiver can take them one message at a
/// time (a stream socket's ancillary data rides on its bytes).
fn send_fds(conn: &UnixStream, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !anc.push(SendAncillaryMessage::ScmRights(chunk)) {
            return Err(std::io::Error::other("fd message too big"));
        }
        let n = sendmsg(
            conn,
            &[std::io::IoSlice::new(&[0])],
            &mut anc,
            SendFlags::NOSIGNAL,
        )?;
        if n != 1 {
            return Err(std::io::Error::other("short fd message"));
        }
    }
    Ok(())
}

fn recv_fds(conn: &UnixStream, want: usize) -> std::io::Result<Vec<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let r = recvmsg(
            conn,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if r.bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the old daemon closed the connection mid-takeover",
            ));
        }
        if r.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(std::io::Error::other(
                "fds lost in transit (ancillary data truncated: open-file limit?)",
            ));
        }
        for msg in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                out.extend(fds);
            }
        }
    }
    Ok(out)
}

/// The old daemon's side, on the control connection that asked for the mount. Returns only
/// when the takeover failed (the view is serving again); on success the process exits.
pub fn give(conn: UnixStream, src: &Source) -> std::io::Result<()> {
    if src.busy.swap(true, Ordering::SeqCst) {
        return send_frame(
            &conn,
            &Answer::Refused("another takeover is in progress".into()),
        );
    }
    // New control requests are refused from here; the running ones get a while to finish.
    let t = std::time::Instant::now();
    while src.control.load(Ordering::SeqCst) > 0 && t.elapsed() < DRAIN_LIMIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    if src.control.load(Ordering::SeqCst) > 0 {
        src.busy.store(false, Ordering::SeqCst);
        return send_frame(
            &conn,
            &Answer::Refused(
                "a control request (verify, commit, abort...) is running; retry once it is done"
                    .into(),
            ),
        );
    }
    let res = give_inner(&conn, src);
    src.busy.store(false, Ordering::SeqCst);
    res
}

fn give_inner(conn: &UnixStream, src: &Source) -> std::io::Result<()> {
    let refuse = |why: String| {
        tracing::warn!(reason = %why, "takeover refused; still serving");
        send_frame(conn, &Answer::Refused(why))
    };
    if !crate::fuse::takeover::kernel_can_resend() {
        return refuse(
            "this kernel cannot queue parked requests again (FUSE_NOTIFY_RESEND needs Linux 6.9); \
             restart with an unmount instead"
                .into(),
        );
    }
    let (Some(kernel), Some(rings)) = (src.parts.gate.kernel(), src.parts.gate.transport()) else {
        return refuse("the FUSE session is not serving yet".into());
    };
    // Rings the kernel refused: the connection is served through /dev/fuse.
    let rings = rings.filter(|r| r.active());
    // Over io_uring, free ring entries are filled with requests of the daemon's own, made
    // through the mount's root (opened now, while requests are answered).
    let root = match &rings {
        Some(_) => match rustix::fs::open(
            &src.mountpoint,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => Some(fd),
            Err(e) => return refuse(format!("opening the mount's root: {e}")),
        },
        None => None,
    };
    tracing::info!("takeover asked for: parking FUSE requests");
    // First: a cache notification must not wait on a page lock a parked request holds.
    if !src.view.hold_invalidations(DRAIN_LIMIT) {
        src.view.release_invalidations();
        return refuse(format!(
            "a kernel cache notification still waiting after {} s (a hung store?)",
            DRAIN_LIMIT.as_secs()
        ));
    }
    let gate = &src.parts.gate;
    let running = |what: &str| {
        format!(
            "{what} still running after {} s (a hung store?)",
            DRAIN_LIMIT.as_secs()
        )
    };
    // Over io_uring a request is held by its ring thread before it reaches the view, with
    // its entry: the daemon's own requests stop first (a thread of this process waiting on
    // a held request would keep it from exiting), then new requests are held, then the ones
    // being answered finish.
    let mut free = Vec::new();
    if let Some(r) = &rings {
        if !gate.hold_own(DRAIN_LIMIT) {
            gate.unpark();
            src.view.release_invalidations();
            return refuse(running("the daemon's own requests through the mount"));
        }
        r.hold();
        match r.settle(DRAIN_LIMIT) {
            Ok(f) => free = f,
            Err(e) => {
                r.release();
                gate.unpark();
                src.view.release_invalidations();
                return refuse(format!(
                    "holding the io_uring requests: {e} (a hung store?)"
                ));
            }
        }
    }
    if !gate.park(DRAIN_LIMIT) {
        if let Some(r) = &rings {
            r.release();
        }
        gate.unpark();
        src.view.release_invalidations();
        return refuse(running("requests"));
    }
    let c = src.copier.state();
    let carry = CopierCarry {
        executing: src.copier.executing(),
        paused: c.paused,
        workers: c.workers,
        bwlimit: c.bwlimit,
        bwlimit_timetable: c.bwlimit_timetable.clone(),
        ops_limit: c.ops_limit,
    };
    src.copier.pause();
    if let Some(p) = src.copier.publisher() {
        p.hold();
    }
    let ring = match (&rings, &root) {
        (Some(r), Some(root)) => {
            match r.fill_and_hand_over(root.as_fd(), &free, DRAIN_LIMIT, FILL_LIMIT) {
                Ok(h) => Some(h),
                Err(e) => return cancel(conn, src, &carry, e),
            }
        }
        _ => None,
    };
    let fuse = match crate::fuse::takeover::fuse_fds() {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => return cancel(conn, src, &carry, "no /dev/fuse fd found".into()),
        Err(e) => return cancel(conn, src, &carry, format!("listing fds: {e}")),
    };
    let (view, files) = src.view.export_state();
    let (uring, blob) = match ring {
        Some((meta, blob)) => (Some(meta), blob),
        None => (None, Vec::new()),
    };
    let handed = Handed {
        format: if uring.is_some() {
            FORMAT_URING
        } else {
            FORMAT
        },
        uring,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        mountpoint: src.mountpoint.clone(),
        state_dir: src.state_dir.clone(),
        acl: src.acl.into(),
        kernel,
        fuse_fds: fuse.len(),
        has_old: src.old_root.is_some(),
        passthrough: src.parts.export_passthrough(),
        copier: carry.clone(),
        watchdog_usec: src.watchdog.map(|d| d.as_micros() as u64),
        view,
    };
    let (inodes, nfiles) = (handed.view.inodes.len(), files.len());
    let has_ring = handed.uring.is_some();
    let ring_entries = handed.uring.as_ref().map_or(0, |u| u.entries.len());
    let mut fds: Vec<BorrowedFd<'_>> = vec![src.lock.as_fd(), src.new_root.as_fd()];
    if let Some(o) = &src.old_root {
        fds.push(o.as_fd());
    }
    fds.extend(fuse.iter().copied());
    fds.extend(files.iter().map(|f| f.as_fd()));
    let sent = send_frame(conn, &Answer::Handed(Box::new(handed)))
        .and_then(|()| send_fds(conn, &fds))
        .and_then(|()| match has_ring {
            true => {
                let mut w = conn;
                w.write_all(&(blob.len() as u64).to_le_bytes())?;
                w.write_all(&blob)
            }
            false => Ok(()),
        });
    if let Err(e) = sent {
        return cancel(conn, src, &carry, format!("sending the state: {e}"));
    }
    if let Err(e) = conn.set_read_timeout(Some(TAKEN_LIMIT)) {
        return cancel(conn, src, &carry, format!("socket timeout: {e}"));
    }
    let mut line = String::new();
    let _ = BufReader::new(conn).read_line(&mut line);
    if line.trim() != "taken" {
        return cancel(
            conn,
            src,
            &carry,
            "the new daemon did not take the mount".into(),
        );
    }
    // A durable write syncs the journal's log, with every write before it.
    let mut b = crate::journal::Batch::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    b.meta(Meta::LastTakeover, &now.to_le_bytes());
    if let Err(e) = src.journal.commit(b, true) {
        tracing::warn!(error = %e, "syncing the journal before handing over");
    }
    tracing::info!(
        inodes,
        open_files = nfiles,
        ring_entries,
        held_request_bytes = blob.len(),
        "mount handed over to the new daemon; exiting without unmount"
    );
    // No destructor runs: nothing may unmount, close backing ids or touch the journal now.
    std::process::exit(0);
}

/// Back to serving: the parked requests go on.
fn cancel(
    conn: &UnixStream,
    src: &Source,
    carry: &CopierCarry,
    why: String,
) -> std::io::Result<()> {
    tracing::warn!(reason = %why, "takeover failed; serving again");
    if let Some(Some(r)) = src.parts.gate.transport() {
        r.release();
    }
    src.parts.gate.unpark();
    src.view.release_invalidations();
    if let Some(p) = src.copier.publisher() {
        p.release();
    }
    if !carry.paused {
        src.copier.resume();
    }
    let _ = send_frame(conn, &Answer::Refused(why));
    Ok(())
}

/// What the new daemon received.
pub struct Taken {
    pub handed: Handed,
    pub lock: std::fs::File,
    pub new_root: OwnedFd,
    pub old_root: Option<OwnedFd>,
    pub fuse: Vec<OwnedFd>,
    pub files: Vec<std::fs::File>,
    /// A mount served over io_uring: its entries, mapped where the kernel has them.
    pub rings: Option<AdoptedRings>,
    conn: UnixStream,
    pidfd: OwnedFd,
}

/// The new daemon's side: ask the daemon serving `state` for its mount at `mountpoint`.
pub fn take(state: &Path, mountpoint: &Path) -> Result<Taken, String> {
    let path = crate::state::layout::socket_path(state);
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "--takeover: no daemon answers on {} ({e}); mount without --takeover",
            path.display()
        )
    })?;
    let mut req = serde_json::to_vec(&crate::control::Request::Takeover).expect("serializes");
    req.push(b'\n');
    (&conn)
        .write_all(&req)
        .map_err(|e| format!("asking for the mount: {e}"))?;
    let mut len = [0u8; 8];
    (&conn)
        .read_exact(&mut len)
        .map_err(|e| format!("the serving daemon did not answer the takeover: {e}"))?;
    let len = u64::from_le_bytes(len) as usize;
    if len > 1 << 30 {
        return Err(
            "the serving daemon does not speak the takeover protocol (an older ferryfs?); \
             it keeps serving"
                .into(),
        );
    }
    let mut body = vec![0u8; len];
    (&conn)
        .read_exact(&mut body)
        .map_err(|e| format!("reading the takeover state: {e}"))?;
    let handed = match serde_json::from_slice::<Answer>(&body) {
        Ok(Answer::Handed(h)) => *h,
        Ok(Answer::Refused(why)) => {
            return Err(format!(
                "the serving daemon refused the takeover: {why} (it keeps serving)"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the serving daemon speaks another takeover format ({e}); it keeps serving"
            ));
        }
    };
    // Before the old daemon can exit, so the pid cannot be another process's.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(handed.pid as i32)
            .ok_or("the serving daemon sent a bad pid")?,
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| format!("pidfd_open of the serving daemon: {e}"))?;
    // An open S3 object travels without an fd.
    let nfiles = handed.view.files.iter().filter(|f| !f.object).count();
    let want = 2 + usize::from(handed.has_old) + handed.fuse_fds + nfiles;
    let mut fds = recv_fds(&conn, want)
        .map_err(|e| format!("receiving the mount's fds: {e}"))?
        .into_iter();
    if handed.format != FORMAT && !(handed.format == FORMAT_URING && handed.uring.is_some()) {
        return Err(format!(
            "the serving daemon hands over in format {} and this one takes {FORMAT} and \
             {FORMAT_URING}; it keeps serving",
            handed.format
        ));
    }
    // Mapped before the old daemon lets go: a failure leaves it serving.
    let rings = match &handed.uring {
        Some(u) => Some(adopt_rings(&conn, u)?),
        None => None,
    };
    let same = |a: &Path, b: &Path| {
        std::fs::canonicalize(a).unwrap_or(a.to_path_buf())
            == std::fs::canonicalize(b).unwrap_or(b.to_path_buf())
    };
    if handed.mountpoint != mountpoint && !same(&handed.mountpoint, mountpoint) {
        return Err(format!(
            "the daemon of {} serves {}, not {}; it keeps serving",
            state.display(),
            handed.mountpoint.display(),
            mountpoint.display()
        ));
    }
    let mut next = || fds.next().expect("counted above");
    let lock = std::fs::File::from(next());
    let new_root = next();
    let old_root = handed.has_old.then(&mut next);
    let fuse = (0..handed.fuse_fds).map(|_| next()).collect();
    let files = (0..nfiles).map(|_| std::fs::File::from(next())).collect();
    Ok(Taken {
        handed,
        lock,
        new_root,
        old_root,
        fuse,
        files,
        rings,
        conn,
        pidfd,
    })
}

/// Read the requests the old daemon's ring entries hold, and map the entries here.
fn adopt_rings(conn: &UnixStream, u: &UringHanded) -> Result<AdoptedRings, String> {
    let mut len = [0u8; 8];
    (&*conn)
        .read_exact(&mut len)
        .map_err(|e| format!("reading the io_uring requests: {e}"))?;
    let len = u64::from_le_bytes(len);
    let want: u64 = u.entries.iter().map(|e| e.2).sum();
    if len != want || len > MAX_RING_BYTES {
        return Err(format!(
            "the serving daemon sent {len} bytes of io_uring requests for entries of {want}; \
             it keeps serving"
        ));
    }
    let mut blob = vec![0u8; len as usize];
    (&*conn)
        .read_exact(&mut blob)
        .map_err(|e| format!("reading the io_uring requests: {e}"))?;
    AdoptedRings::map(u, &blob)
        .map_err(|e| format!("taking the io_uring entries: {e}; the serving daemon keeps serving"))
}

impl Taken {
    /// Who may use the mount, as the old daemon had it.
    pub fn acl(&self) -> &str {
        &self.handed.acl
    }

    /// Tell the old daemon the mount is ours, and wait until it has exited (its journal and
    /// its fds closed). From here the mount lives or dies with this process.
    pub fn commit(&mut self) -> Result<(), String> {
        (&self.conn)
            .write_all(b"taken\n")
            .map_err(|e| format!("telling the old daemon: {e}"))?;
        // A pidfd turns readable when the process has exited, after its fds were closed.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.pidfd),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut killed = false;
        loop {
            // SAFETY: one pollfd, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, EXIT_LIMIT.as_millis() as i32) };
            match n {
                n if n > 0 => return Ok(()),
                0 if !killed => {
                    // It said yes to "taken" and serves nothing any more (its requests are
                    // parked); the mount is ours: end it.
                    tracing::warn!(
                        pid = self.handed.pid,
                        "the old daemon did not exit within {} s; killing it",
                        EXIT_LIMIT.as_secs()
                    );
                    rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL)
                        .map_err(|e| format!("killing the old daemon: {e}"))?;
                    killed = true;
                }
                0 => {
                    return Err(format!(
                        "the old daemon (pid {}) did not exit, even after SIGKILL",
                        self.handed.pid
                    ));
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(format!("waiting for the old daemon: {e}"));
                    }
                }
            }
        }
    }
}
