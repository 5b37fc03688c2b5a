//! The coordinator: the mount daemon hands the copier's file copies out to remote workers
//! (`mount --workers-listen`), by leases on batches, and names their copies.
//!
//! The copier's walk offers each file a worker may copy ([`View::remote_item`]) to a bounded
//! queue instead of copying it (the walk waits while the queue is full); at the end of its
//! walk it waits until the queue is drained and every lease settled, so the pass after sees
//! what the workers copied. A lease is a batch (bounded by files and bytes, sized from what
//! the worker copied in its last lease: fast workers take more) with an expiry the worker
//! renews while it works. A report names the lease's items by number (their paths and
//! temporary names, echoed, are checked against what was handed out); the copies are named
//! with [`View::finish_copies`], the copier's own naming: the view's changes win, a changed
//! OLD file refuses the copy. An expired lease's items go back to the queue and its copies
//! are removed. Nothing of a lease is journaled: after a coordinator restart, copies already
//! named stay named (the next walk finds them in NEW), unnamed ones are removed with NEW's
//! work dir's leftovers, and workers' requests about unknown leases get 409 and they ask
//! again.
//!
//! With no worker heard from for two lease periods, the copier copies files itself again:
//! workers speed a migration up, they are never what it waits on.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::http::{self, Refused};
use super::protocol::{self, Grant, Item, Store, Verdict};
use crate::copier::Copier;
use crate::journal::{Batch, CopyError, Fingerprint, Records};
use crate::view::inode::Inode;
use crate::view::{Copied, View};

/// Files the walk may have offered and not yet handed out.
const QUEUE_MAX: usize = 100_000;
/// A lease's length unless renewed.
pub const LEASE_SECS: u64 = 30;
/// The work one lease should be, in seconds of the worker's own pace.
const LEASE_WORK: Duration = Duration::from_secs(10);
/// Bounds of a lease: files, and bytes.
const LEASE_FILES: (usize, usize) = (16, 10_000);
const LEASE_BYTES: (u64, u64) = (64 << 20, 8 << 30);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 128;
/// Expired leases whose temporary names are remembered, to remove a late worker's copies.
const EXPIRED_KEPT: usize = 4096;

/// What the coordinator knows of one worker (status, /metrics).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub id: String,
    /// Leases handed out, files and bytes whose copies took their names.
    pub batches: u64,
    pub files: u64,
    pub bytes: u64,
    /// Copies refused (changed meanwhile, failed, or late).
    pub refused: u64,
    /// Bytes a second over its last lease.
    pub rate: u64,
    /// Seconds since the epoch of its last request.
    pub last_seen: u64,
}

struct Worker {
    status: WorkerStatus,
    seen: Instant,
    /// Files a second over its last lease.
    files_rate: f64,
}

struct Leased {
    inode: Arc<Inode>,
    item: Item,
    fp: Fingerprint,
}

struct Lease {
    worker: String,
    granted: Instant,
    expires: Instant,
    items: Vec<Leased>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Arc<Inode>>,
    /// Inode numbers queued or leased, and the inodes held for each (see `View::hold`).
    taken: HashMap<u64, Vec<Arc<Inode>>>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    workers: BTreeMap<String, Worker>,
    expired: VecDeque<(u64, Vec<String>)>,
}

pub struct Coordinator {
    view: Arc<View>,
    journal: Records,
    copier: Weak<Copier>,
    token: Vec<u8>,
    welcome: protocol::Welcome,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// When the workers' status was last written into the journal.
    recorded: Mutex<Instant>,
    /// Settled since the last drain: files named, their bytes, files not named.
    pass_named: std::sync::atomic::AtomicU64,
    pass_bytes: std::sync::atomic::AtomicU64,
    pass_other: std::sync::atomic::AtomicU64,
    /// Handed out and acknowledged (named, refused or failed) since the start: the bench's.
    pub handed: std::sync::atomic::AtomicU64,
    pub settled: std::sync::atomic::AtomicU64,
}

/// The workers' status as the coordinator last recorded it (empty when none).
pub fn recorded_workers(journal: &Records) -> Vec<WorkerStatus> {
    journal
        .meta(crate::journal::Meta::Workers)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default()
}

/// A lease's length: [`LEASE_SECS`], or `FERRYFS_LEASE_SECS` (for tests of expiry).
fn lease_secs() -> u64 {
    std::env::var("FERRYFS_LEASE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &u64| s > 0)
        .unwrap_or(LEASE_SECS)
}

/// Read the token file: one line of at least 128 bits' worth (22 characters of base64, 32
/// of hex), what `ferryfs workers-token` writes.
pub fn read_token(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path)
        .map_err(|e| format!("the workers' token file {}: {e}", path.display()))?;
    let token: Vec<u8> = raw.trim_ascii().to_vec();
    if token.len() < 22 || token.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "the workers' token file {} must hold one line of at least 22 printable \
             characters (128 random bits: `ferryfs workers-token > FILE`)",
            path.display()
        ));
    }
    Ok(token)
}

/// A new token: 256 random bits, base64 (URL-safe, no padding).
pub fn new_token() -> std::io::Result<String> {
    use base64::Engine;
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

impl Coordinator {
    pub fn new(
        view: Arc<View>,
        journal: Records,
        copier: &Arc<Copier>,
        token: Vec<u8>,
        old: Store,
        new: Store,
    ) -> Arc<Coordinator> {
        let known = recorded_workers(&journal);
        Arc::new(Coordinator {
            view,
            journal,
            copier: Arc::downgrade(copier),
            token,
            welcome: protocol::Welcome {
                old,
                new,
                work_dir: crate::view::WORK_DIR.to_string(),
                lease_secs: lease_secs(),
            },
            state: Mutex::new(State {
                next_lease: 1,
                // Known from before a restart: their counts go on.
                workers: known
                    .into_iter()
                    .map(|status| {
                        (
                            status.id.clone(),
                            Worker {
                                status,
                                seen: Instant::now() - Duration::from_secs(3600),
                                files_rate: 0.0,
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            recorded: Mutex::new(Instant::now()),
            pass_named: Default::default(),
            pass_bytes: Default::default(),
            pass_other: Default::default(),
            handed: Default::default(),
            settled: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bind `addr` now (so `mount` fails with the reason) and serve from background threads;
    /// a reaper expires leases. Gives the address bound.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let active = Arc::new(AtomicUsize::new(0));
        let me = self.clone();
        std::thread::Builder::new()
            .name("workers".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if me.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        active.fetch_sub(1, Ordering::AcqRel);
                        let _ = http::write_response(&conn, 503, br#"{"error":"busy"}"#);
                        continue;
                    }
                    let (c, active) = (me.clone(), active.clone());
                    let spawned = std::thread::Builder::new()
                        .name("workers-conn".into())
                        .spawn(move || {
                            c.answer(conn);
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        tracing::warn!("cannot start a thread for a worker's connection");
                    }
                }
            })?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("workers-reaper".into())
            .spawn(move || {
                while !me.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(500));
                    me.expire(Instant::now());
                }
            })?;
        Ok(bound)
    }

    /// Stop handing out work (the daemon stops): workers are told to wait (the next daemon
    /// serves them); the walk stops waiting.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    fn answer(&self, conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(http::IO_TIMEOUT));
        let _ = conn.set_write_timeout(Some(http::IO_TIMEOUT));
        let (status, body) = match http::read_request(&conn) {
            Ok(req) => self.handle(req),
            Err(Refused(status, why)) => (status, failure(&why)),
        };
        if let Err(e) = http::write_response(&conn, status, &body) {
            tracing::debug!(error = %e, "answering a worker");
        }
        let _ = (&conn).flush();
    }

    /// One request: authenticated, routed, its body parsed. (status, JSON body)
    fn handle(&self, req: http::Request) -> (u16, Vec<u8>) {
        // (The token is never logged, nor echoed.)
        let authorized = req
            .token
            .as_deref()
            .is_some_and(|t| http::same_token(t.as_bytes(), &self.token));
        if !authorized {
            return (
                401,
                failure("a missing or wrong token (the coordinator's --workers-token-file)"),
            );
        }
        if req.method != "POST" {
            return (405, failure("only POST"));
        }
        let v = protocol::VERSION;
        let path = req.path.as_str();
        macro_rules! parse {
            ($t:ty) => {
                match serde_json::from_slice::<$t>(&req.body) {
                    Ok(x) => x,
                    Err(e) => return (400, failure(&format!("malformed request: {e}"))),
                }
            };
        }
        let r = if path == format!("/{v}/hello") {
            let h = parse!(protocol::Hello);
            if let Err(e) = check_worker(&h.worker) {
                return (400, failure(&e));
            }
            self.seen(&h.worker, true);
            Ok(json(&self.welcome))
        } else if path == format!("/{v}/lease") {
            let l = parse!(protocol::LeaseRequest);
            if let Err(e) = check_worker(&l.worker) {
                return (400, failure(&e));
            }
            Ok(json(&self.lease(&l.worker)))
        } else if path == format!("/{v}/renew") {
            let r = parse!(protocol::Renew);
            self.renew(&r)
                .map(|secs| json(&serde_json::json!({ "secs": secs })))
        } else if path == format!("/{v}/report") {
            let r = parse!(protocol::Report);
            self.report(r).map(|v| json(&v))
        } else {
            return (
                404,
                failure("unknown path: the protocol is /v1/{hello,lease,renew,report}"),
            );
        };
        match r {
            Ok(body) => (200, body),
            Err((status, why)) => (status, failure(&why)),
        }
    }

    /// `worker` was heard from: known from now on when `joins` (hello, lease), else only
    /// if it was known.
    fn seen(&self, worker: &str, joins: bool) {
        let mut s = self.lock();
        let new = !s.workers.contains_key(worker);
        if new && !joins {
            return;
        }
        let w = s
            .workers
            .entry(worker.to_string())
            .or_insert_with(|| Worker {
                status: WorkerStatus {
                    id: worker.to_string(),
                    batches: 0,
                    files: 0,
                    bytes: 0,
                    refused: 0,
                    rate: 0,
                    last_seen: 0,
                },
                seen: Instant::now(),
                files_rate: 0.0,
            });
        w.seen = Instant::now();
        w.status.last_seen = now_secs();
        let stale = {
            let mut last = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            let stale = last.elapsed() >= Duration::from_secs(1);
            if stale || new {
                *last = Instant::now();
            }
            stale
        };
        drop(s);
        if new {
            tracing::info!(worker, "a remote worker joined");
        }
        // (What status shows of them: at most once a second.)
        if new || stale {
            self.record_workers();
        }
    }

    /// The copier's walk offers `inode` (a file in OLD only): `true` when it is queued for a
    /// worker (or leased already), `false` when the copier must copy it itself. Waits while
    /// the queue is full.
    fn offer_file(&self, inode: &Arc<Inode>) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        if !self.has_workers_locked(&s) {
            return false;
        }
        while s.queue.len() >= QUEUE_MAX && !s.taken.contains_key(&inode.ino) {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if s.taken.contains_key(&inode.ino) {
            return true;
        }
        // Known to the view until it is settled (the walk, which holds it now, lets go).
        let Some(held) = self.view.hold(inode) else {
            return false;
        };
        s.taken.insert(inode.ino, held);
        s.queue.push_back(inode.clone());
        true
    }

    /// Wait until every file offered is settled (copied, refused or failed) or the workers
    /// went away, or `stopping()`.
    fn drain_offered(&self, stopping: &dyn Fn() -> bool) -> (u64, u64, u64) {
        let mut s = self.lock();
        while !s.taken.is_empty() && !stopping() && !self.stop.load(Ordering::Acquire) {
            if s.leases.is_empty() && !self.has_workers_locked(&s) {
                // Nobody left to take them: the copier's next pass copies them itself.
                let dropped: Vec<Arc<Inode>> = s.queue.drain(..).collect();
                self.pass_other
                    .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                for i in dropped {
                    self.settle(&mut s, i.ino);
                }
                break;
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (
            self.pass_named.swap(0, Ordering::Relaxed),
            self.pass_bytes.swap(0, Ordering::Relaxed),
            self.pass_other.swap(0, Ordering::Relaxed),
        )
    }

    /// Whether a worker was heard from lately (else the copier copies files itself).
    fn has_workers_locked(&self, s: &State) -> bool {
        let recent = Duration::from_secs(2 * self.welcome.lease_secs);
        s.workers.values().any(|w| w.seen.elapsed() < recent)
    }

    /// A lease for `worker`: files from the queue, as many as its pace says.
    fn lease(&self, worker: &str) -> Grant {
        self.seen(worker, true);
        // (A daemon going away is not the copy being done: workers wait for the next one.)
        if self.stop.load(Ordering::Acquire) {
            return Grant::Wait { ms: 1000 };
        }
        let copier = self.copier.upgrade();
        if copier.as_ref().is_none_or(|c| c.state().paused) {
            return Grant::Wait { ms: 1000 };
        }
        // Everything is copied: the workers may go (an Indexed Job completes).
        let executed = matches!(
            self.journal.phase(),
            Ok(crate::journal::Phase::Executed
                | crate::journal::Phase::Committed
                | crate::journal::Phase::Aborted)
        );
        if executed && {
            let s = self.lock();
            s.queue.is_empty() && s.leases.is_empty()
        } {
            return Grant::Done;
        }
        let (max_files, max_bytes) = {
            let s = self.lock();
            let w = &s.workers[worker];
            let secs = LEASE_WORK.as_secs_f64();
            let files = if w.files_rate > 0.0 {
                (w.files_rate * secs) as usize
            } else {
                64
            };
            let bytes = if w.status.rate > 0 {
                (w.status.rate as f64 * secs) as u64
            } else {
                LEASE_BYTES.0
            };
            // (Under an overall bandwidth limit, a lease is what it lets through in the same
            // ten seconds: it is paid for when handed out.)
            let limit = copier.as_ref().map_or(0, |c| c.bw.get());
            let bytes = bytes.clamp(LEASE_BYTES.0, LEASE_BYTES.1);
            let bytes = if limit > 0 {
                bytes.min((limit as f64 * secs) as u64).max(1)
            } else {
                bytes
            };
            (files.clamp(LEASE_FILES.0, LEASE_FILES.1), bytes)
        };
        // NEW's work dir, where the copies are made (made now if it is not there).
        if let Err(e) = self.view.open_work_dir() {
            tracing::warn!(error = %e, "NEW's work dir for remote workers");
            return Grant::Wait { ms: 1000 };
        }
        let id = {
            let mut s = self.lock();
            let id = s.next_lease;
            s.next_lease += 1;
            id
        };
        let mut items = Vec::new();
        let mut bytes = 0;
        while items.len() < max_files && bytes < max_bytes {
            let Some(inode) = self.lock().queue.pop_front() else {
                break;
            };
            let item = match self.view.remote_item(&inode) {
                Ok(Some(i)) => i,
                // The view or the copier took it meanwhile, or it is not a worker's.
                Ok(None) | Err(_) => {
                    self.settle(&mut self.lock(), inode.ino);
                    self.pass_other.fetch_add(1, Ordering::Relaxed);
                    self.changed.notify_all();
                    continue;
                }
            };
            #[allow(clippy::unnecessary_cast)]
            let size = item.st.st_size as u64;
            bytes += size;
            let n = items.len() as u32;
            items.push(Leased {
                item: Item {
                    n,
                    path: item.path,
                    size,
                    #[allow(clippy::unnecessary_cast)]
                    mtime: (item.st.st_mtime as i64, item.st.st_mtime_nsec as u32),
                    etag: None,
                    tmp: format!("{}{id}-{n}", crate::view::REMOTE_FILE_PREFIX),
                },
                fp: Fingerprint::of(&item.st),
                inode,
            });
        }
        self.changed.notify_all();
        if items.is_empty() {
            // (Soon while a pass may still offer files; the walk fills the queue fast.)
            let running = copier.as_ref().is_some_and(|c| c.state().running);
            return Grant::Wait {
                ms: if running { 50 } else { 500 },
            };
        }
        // The copier's overall limits (`--bwlimit`, `--ops-limit`): paid for when handed out.
        if let Some(c) = &copier {
            c.ops.take(items.len() as u64, &self.stop);
            c.bw.take(bytes, &self.stop);
        }
        let now = Instant::now();
        let out: Vec<Item> = items.iter().map(|l| l.item.clone()).collect();
        let mut s = self.lock();
        s.leases.insert(
            id,
            Lease {
                worker: worker.to_string(),
                granted: now,
                expires: now + Duration::from_secs(self.welcome.lease_secs),
                items,
            },
        );
        if let Some(w) = s.workers.get_mut(worker) {
            w.status.batches += 1;
        }
        drop(s);
        self.handed.fetch_add(out.len() as u64, Ordering::Relaxed);
        Grant::Lease {
            id,
            secs: self.welcome.lease_secs,
            items: out,
        }
    }

    fn renew(&self, r: &protocol::Renew) -> Result<u64, (u16, String)> {
        self.seen(&r.worker, false);
        let mut s = self.lock();
        match s.leases.get_mut(&r.lease) {
            Some(l) if l.worker == r.worker => {
                l.expires = Instant::now() + Duration::from_secs(self.welcome.lease_secs);
                Ok(self.welcome.lease_secs)
            }
            _ => Err((
                409,
                format!("lease {} is not current (expired, or ended)", r.lease),
            )),
        }
    }

    /// A worker's report: every outcome checked before anything changes, then the copies
    /// named (or refused and removed), the lease ended.
    fn report(&self, r: protocol::Report) -> Result<Verdict, (u16, String)> {
        self.seen(&r.worker, false);
        {
            let s = self.lock();
            let Some(l) = s.leases.get(&r.lease).filter(|l| l.worker == r.worker) else {
                drop(s);
                self.remove_late(r.lease, &r.outcomes);
                return Err((
                    409,
                    format!(
                        "lease {} is not current (expired, or ended): its copies were removed",
                        r.lease
                    ),
                ));
            };
            let mut seen = HashSet::new();
            for o in &r.outcomes {
                protocol::check_path(&o.path).map_err(|e| (400, e))?;
                protocol::check_tmp(&o.tmp).map_err(|e| (400, e))?;
                let Some(it) = l.items.get(o.n as usize) else {
                    return Err((400, format!("item {} is not in lease {}", o.n, r.lease)));
                };
                if it.item.path != o.path || it.item.tmp != o.tmp {
                    return Err((
                        400,
                        format!(
                            "item {} of lease {} was handed out as another path",
                            o.n, r.lease
                        ),
                    ));
                }
                if !seen.insert(o.n) {
                    return Err((400, format!("item {} reported twice", o.n)));
                }
            }
        }
        // (Where the copies are; not there: nothing changes, the worker reports again.)
        let work = self
            .view
            .open_work_dir()
            .map_err(|e| (503, format!("NEW's work dir: {e}")))?;
        let Some(lease) = self.lock().leases.remove(&r.lease) else {
            return Err((409, format!("lease {} is not current", r.lease)));
        };
        let mut verdict = Verdict::default();
        let mut by_n: HashMap<u32, &protocol::Outcome> =
            r.outcomes.iter().map(|o| (o.n, o)).collect();
        let mut pendings = Vec::new();
        let mut sizes: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut back = Vec::new();
        let mut errors = Batch::new();
        for l in &lease.items {
            let Some(o) = by_n.remove(&l.item.n) else {
                // Not reported: handed out again.
                back.push(l.inode.clone());
                self.view.remove_remote_copy(&l.item.tmp);
                continue;
            };
            if let Some(e) = &o.error {
                // (A worker's words: kept short in the log and the journal.)
                let e: String = e.chars().take(500).collect();
                self.view.remove_remote_copy(&l.item.tmp);
                let path = self.view.view_path(&l.inode);
                tracing::warn!(
                    worker = %r.worker,
                    path = %String::from_utf8_lossy(&path),
                    error = %e,
                    "a worker's copy failed; will retry"
                );
                errors.error(
                    &path,
                    &CopyError {
                        error: format!("worker {}: {e}", r.worker),
                        errno: if o.errno > 0 { o.errno } else { libc::EIO },
                        attempts: 1,
                        at: now_secs(),
                        conflict: false,
                    },
                );
                verdict.refused.push((o.n, format!("failed: {e}")));
                continue;
            }
            if (o.size, o.mtime) != (l.item.size, l.item.mtime) {
                self.view.remove_remote_copy(&l.item.tmp);
                verdict
                    .refused
                    .push((o.n, "OLD's file changed while it was copied".into()));
                continue;
            }
            match self
                .view
                .remote_pending(&l.inode, &l.fp, &work, &l.item.tmp)
            {
                Ok(Ok(p)) => {
                    sizes.insert(l.inode.ino, (o.n, l.item.size));
                    pendings.push(p);
                }
                Ok(Err(why)) => verdict.refused.push((o.n, why)),
                Err(e) => {
                    self.view.remove_remote_copy(&l.item.tmp);
                    verdict.refused.push((o.n, e.to_string()));
                }
            }
        }
        let mut named = (0u64, 0u64);
        for (inode, res) in self.view.finish_copies(pendings) {
            let Some(&(n, size)) = sizes.get(&inode.ino) else {
                continue;
            };
            match res {
                Ok(Copied::File { .. }) => {
                    verdict.accepted.push(n);
                    named.0 += 1;
                    named.1 += size;
                }
                Ok(other) => verdict.refused.push((n, format!("{other:?}"))),
                Err(e) => verdict.refused.push((n, e.to_string())),
            }
        }
        if !errors.is_empty()
            && let Err(e) = self.journal.commit(errors, false)
        {
            tracing::error!(error = %e, "recording a worker's copy errors");
        }
        let elapsed = lease.granted.elapsed().as_secs_f64().max(0.001);
        self.pass_named.fetch_add(named.0, Ordering::Relaxed);
        self.pass_bytes.fetch_add(named.1, Ordering::Relaxed);
        self.pass_other.fetch_add(
            (lease.items.len() - back.len()) as u64 - named.0,
            Ordering::Relaxed,
        );
        let mut s = self.lock();
        let back_inos: HashSet<u64> = back.iter().map(|i| i.ino).collect();
        for l in &lease.items {
            if !back_inos.contains(&l.inode.ino) {
                self.settle(&mut s, l.inode.ino);
            }
        }
        for i in back {
            s.queue.push_front(i);
        }
        if let Some(w) = s.workers.get_mut(&r.worker) {
            w.status.files += named.0;
            w.status.bytes += named.1;
            w.status.refused += verdict.refused.len() as u64;
            w.status.rate = (named.1 as f64 / elapsed) as u64;
            w.files_rate = r.outcomes.len() as f64 / elapsed;
        }
        drop(s);
        self.settled
            .fetch_add(r.outcomes.len() as u64, Ordering::Relaxed);
        self.changed.notify_all();
        self.record_workers();
        Ok(verdict)
    }

    /// `ino` is settled: no longer queued or leased, its inodes let go.
    fn settle(&self, s: &mut State, ino: u64) {
        if let Some(held) = s.taken.remove(&ino) {
            self.view.unhold(held);
        }
    }

    /// A report for a lease that ended: its copies go (the worker may have made them after
    /// the lease expired).
    fn remove_late(&self, lease: u64, outcomes: &[protocol::Outcome]) {
        let s = self.lock();
        let Some((_, tmps)) = s.expired.iter().find(|(id, _)| *id == lease) else {
            return;
        };
        let tmps: HashSet<&String> = tmps.iter().collect();
        for o in outcomes {
            if tmps.contains(&o.tmp) {
                self.view.remove_remote_copy(&o.tmp);
            }
        }
    }

    /// Leases past their expiry: their items go back to the queue, their copies go.
    fn expire(&self, now: Instant) {
        let mut s = self.lock();
        let gone: Vec<u64> = s
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let l = s.leases.remove(&id).expect("listed");
            tracing::warn!(
                lease = id,
                worker = %l.worker,
                files = l.items.len(),
                "a worker's lease expired: its files go to another worker"
            );
            let tmps: Vec<String> = l.items.iter().map(|i| i.item.tmp.clone()).collect();
            for i in l.items.into_iter().rev() {
                self.view.remove_remote_copy(&i.item.tmp);
                s.queue.push_front(i.inode);
            }
            s.expired.push_back((id, tmps));
            if s.expired.len() > EXPIRED_KEPT {
                s.expired.pop_front();
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Every worker's status.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.lock()
            .workers
            .values()
            .map(|w| w.status.clone())
            .collect()
    }

    /// The coordinator's series for /metrics: leases, the queue, and each worker's counts
    /// (labelled by its id).
    fn metrics_into(&self, out: &mut String) {
        use std::fmt::Write;
        let (queued, leased, leases) = {
            let s = self.lock();
            (
                s.queue.len(),
                s.leases.values().map(|l| l.items.len()).sum::<usize>(),
                s.leases.len(),
            )
        };
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "ferryfs_workers_queued_files",
            "gauge",
            "Files the copier offered to remote workers, not handed out yet.",
            queued as u64,
        );
        one(
            "ferryfs_workers_leased_files",
            "gauge",
            "Files in remote workers' current leases.",
            leased as u64,
        );
        one(
            "ferryfs_workers_leases",
            "gauge",
            "Remote workers' current leases.",
            leases as u64,
        );
        one(
            "ferryfs_workers_handed_out_total",
            "counter",
            "Files handed out to remote workers (again after an expiry).",
            self.handed.load(Ordering::Relaxed),
        );
        one(
            "ferryfs_workers_settled_total",
            "counter",
            "Files remote workers reported on (copied, refused or failed).",
            self.settled.load(Ordering::Relaxed),
        );
        let all = self.workers();
        let now = now_secs();
        for (name, help, kind, get) in [
            (
                "ferryfs_worker_files_total",
                "Files each remote worker copied (their copies named).",
                "counter",
                (|w: &WorkerStatus, _| w.files) as fn(&WorkerStatus, u64) -> u64,
            ),
            (
                "ferryfs_worker_bytes_total",
                "Bytes of those files.",
                "counter",
                |w, _| w.bytes,
            ),
            (
                "ferryfs_worker_leases_total",
                "Leases each remote worker was handed.",
                "counter",
                |w, _| w.batches,
            ),
            (
                "ferryfs_worker_refused_total",
                "Copies of each remote worker refused (changed meanwhile, failed, late).",
                "counter",
                |w, _| w.refused,
            ),
            (
                "ferryfs_worker_rate_bytes_per_second",
                "Each remote worker's pace over its last lease.",
                "gauge",
                |w, _| w.rate,
            ),
            (
                "ferryfs_worker_last_seen_seconds",
                "Seconds since each remote worker was last heard from.",
                "gauge",
                |w, now| now.saturating_sub(w.last_seen),
            ),
        ] {
            if all.is_empty() {
                break;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for w in &all {
                // (Ids are printable ASCII, checked at hello; quotes and backslashes escaped.)
                let id = w.id.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{worker=\"{id}\"}} {}", get(w, now));
            }
        }
    }

    /// The workers' status into the journal, for `ferryfs status`.
    fn record_workers(&self) {
        let all = self.workers();
        let mut b = Batch::new();
        b.meta(
            crate::journal::Meta::Workers,
            &serde_json::to_vec(&all).expect("workers serialize"),
        );
        if let Err(e) = self.journal.commit(b, false) {
            tracing::warn!(error = %e, "recording the workers' status");
        }
    }
}

impl crate::copier::Remote for Coordinator {
    fn offer(&self, inode: &Arc<Inode>) -> bool {
        self.offer_file(inode)
    }
    fn drain(&self, stopping: &dyn Fn() -> bool) -> (u64, u64, u64) {
        self.drain_offered(stopping)
    }
    fn render_metrics(&self, out: &mut String) {
        self.metrics_into(out)
    }
}

/// A worker id: 1 to 128 printable characters.
fn check_worker(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a worker id of 1 to 128 printable characters, not {id:?}"
        ));
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("answers serialize")
}

fn failure(why: &str) -> Vec<u8> {
    json(&protocol::Failure {
        error: why.to_string(),
    })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
