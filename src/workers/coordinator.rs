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
use crate::view::{Copied, RemoteItem, View};

/// Files the walk may have offered and not yet handed out.
const QUEUE_MAX: usize = 100_000;
/// A lease's length unless renewed.
pub const LEASE_SECS: u64 = 30;
/// The work one lease should be, in seconds of the worker's own pace.
const LEASE_WORK: Duration = Duration::from_secs(10);
/// Bounds of a lease: files, and bytes.
const LEASE_FILES: (usize, usize) = (16, 10_000);
const LEASE_BYTES: (u64, u64) = (64 << 20, 8 << 30);
/// The JSON a lease's report and its verdict may take, at worst: each must fit in one body
/// ([`http::MAX_BODY`]), so a lease of many short-named files ends at some hundreds.
const LEASE_JSON: usize = http::MAX_BODY * 3 / 4;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 128;
/// The bytes of a big file's range: files of twice this or more are copied by ranges, by
/// several workers at once.
pub const RANGE_BYTES: u64 = 1 << 30;
/// Uploads a report's copies into an S3 NEW are completed at once.
const UPLOADS_COMPLETED_AT_ONCE: usize = 16;
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
    /// OLD's file as offered.
    remote: RemoteItem,
    /// A big file's range: its number.
    range: Option<u32>,
    /// A big file whose ranges are all in (not handed out: taken as a whole).
    assembled: bool,
}

/// What the queue holds: a file, or a range of a big file copied by ranges.
enum Queued {
    File(Arc<Inode>, Box<RemoteItem>),
    Range(u64, u32),
}

/// A big file copied by ranges, by several workers at once: where the ranges go (a file the
/// coordinator made in NEW's work dir, or an upload it began), and which are in.
struct Ranged {
    inode: Arc<Inode>,
    remote: RemoteItem,
    /// The file's name in the work dir (a POSIX NEW), or the copy's name (an S3 NEW).
    tmp: String,
    upload: Option<String>,
    /// (offset, length) of each range.
    ranges: Vec<(u64, u64)>,
    done: Vec<bool>,
    /// An S3 NEW: the parts the ranges sent.
    parts: Vec<crate::store::s3::SentPart>,
}

struct Lease {
    worker: String,
    granted: Instant,
    expires: Instant,
    items: Vec<Leased>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Big files copied by ranges, by inode number.
    ranged: HashMap<u64, Ranged>,
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
    /// The bytes of a big file's range.
    range_bytes: u64,
    /// Big files split so far (their copies' names).
    next_big: std::sync::atomic::AtomicU64,
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

/// A big file's range: [`RANGE_BYTES`], or `FERRYFS_RANGE_BYTES` (for tests: whole MiB).
fn range_bytes() -> u64 {
    std::env::var("FERRYFS_RANGE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&b: &u64| b >= 1 << 20)
        .map_or(RANGE_BYTES, |b| b & !((1 << 20) - 1))
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
            range_bytes: range_bytes(),
            next_big: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bind `addr` now (so `mount` fails with the reason) and serve from background threads,
    /// over TLS with `tls`; a reaper expires leases. Gives the address bound.
    pub fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<SocketAddr> {
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
                        // (Over TLS, the connection is dropped: the worker retries alike.)
                        if tls.is_none() {
                            let _ = http::write_response(&conn, 503, br#"{"error":"busy"}"#);
                        }
                        continue;
                    }
                    let (c, active, tls) = (me.clone(), active.clone(), tls.clone());
                    let spawned = std::thread::Builder::new()
                        .name("workers-conn".into())
                        .spawn(move || {
                            c.answer(conn, tls.as_ref());
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

    fn answer(&self, conn: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) {
        let _ = conn.set_read_timeout(Some(http::IO_TIMEOUT));
        let _ = conn.set_write_timeout(Some(http::IO_TIMEOUT));
        match tls {
            None => self.exchange(&conn),
            Some(cfg) => match super::tls::server(cfg, conn) {
                Ok(mut s) => {
                    self.exchange(&mut s);
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
                Err(e) => tracing::debug!(error = %e, "a worker's TLS session"),
            },
        }
    }

    /// One request read from `conn` and answered.
    fn exchange(&self, mut conn: impl std::io::Read + Write) {
        let (status, body) = match http::read_request(&mut conn) {
            Ok(req) => self.handle(req),
            Err(Refused(status, why)) => (status, failure(&why)),
        };
        if let Err(e) = http::write_response(&mut conn, status, &body) {
            tracing::debug!(error = %e, "answering a worker");
        }
        let _ = conn.flush();
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
        drop(s);
        // (Hard links, metadata changes, names no key holds...: the copier's own.)
        let Ok(Some(item)) = self.view.remote_item(inode) else {
            return false;
        };
        #[allow(clippy::unnecessary_cast)]
        let big = item.st.st_size as u64 >= 2 * self.range_bytes;
        // A big file: its copy's file or upload made now, its ranges queued.
        let ranged = if big {
            match self.split(inode, &item) {
                Some(r) => Some(r),
                None => return false,
            }
        } else {
            None
        };
        let mut s = self.lock();
        let held = if s.taken.contains_key(&inode.ino) {
            None
        } else {
            // Known to the view until it is settled (the walk, which holds it now, lets go).
            self.view.hold(inode)
        };
        let Some(held) = held else {
            let queued = s.taken.contains_key(&inode.ino);
            drop(s);
            if let Some(r) = ranged {
                self.discard_ranged(&r);
            }
            return queued;
        };
        s.taken.insert(inode.ino, held);
        match ranged {
            Some(r) => {
                for i in 0..r.ranges.len() {
                    s.queue.push_back(Queued::Range(inode.ino, i as u32));
                }
                s.ranged.insert(inode.ino, r);
            }
            None => s
                .queue
                .push_back(Queued::File(inode.clone(), Box::new(item))),
        }
        true
    }

    /// Wait until every file offered is settled (copied, refused or failed) or the workers
    /// went away, or `stopping()`.
    fn drain_offered(&self, stopping: &dyn Fn() -> bool) -> (u64, u64, u64) {
        let mut s = self.lock();
        while !s.taken.is_empty() && !stopping() && !self.stop.load(Ordering::Acquire) {
            if s.leases.is_empty() && !self.has_workers_locked(&s) {
                // Nobody left to take them: the copier's next pass copies them itself.
                let dropped: HashSet<u64> = s
                    .queue
                    .drain(..)
                    .map(|q| match q {
                        Queued::File(i, _) => i.ino,
                        Queued::Range(ino, _) => ino,
                    })
                    .collect();
                self.pass_other
                    .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                let mut gone = Vec::new();
                for ino in dropped {
                    gone.extend(s.ranged.remove(&ino));
                    self.settle(&mut s, ino);
                }
                drop(s);
                for r in &gone {
                    self.discard_ranged(r);
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
        let (mut bytes, mut json) = (0, 0);
        while items.len() < max_files && bytes < max_bytes {
            let Some(q) = self.lock().queue.pop_front() else {
                break;
            };
            let n = items.len() as u32;
            let leased = match q {
                Queued::File(inode, remote) => {
                    #[allow(clippy::unnecessary_cast)]
                    let size = remote.st.st_size as u64;
                    let leased = Leased {
                        item: item_of(
                            n,
                            &remote,
                            format!("{}{id}-{n}", crate::view::REMOTE_FILE_PREFIX),
                            None,
                        ),
                        remote: *remote,
                        inode,
                        range: None,
                        assembled: false,
                    };
                    (leased, size)
                }
                Queued::Range(ino, r) => {
                    let s = self.lock();
                    // (Given up meanwhile: its ranges are nobody's.)
                    let Some(g) = s.ranged.get(&ino) else {
                        continue;
                    };
                    let (offset, len) = g.ranges[r as usize];
                    let range = protocol::Range {
                        offset,
                        len,
                        upload: g.upload.clone(),
                    };
                    let leased = Leased {
                        item: item_of(n, &g.remote, g.tmp.clone(), Some(range)),
                        remote: g.remote.clone(),
                        inode: g.inode.clone(),
                        range: Some(r),
                        assembled: false,
                    };
                    (leased, len)
                }
            };
            let (leased, size) = leased;
            // The view took it meanwhile: not a worker's any more.
            let taken_over = {
                let n = leased.inode.node();
                n.new.is_some() || n.meta.is_some()
            };
            if taken_over {
                self.give_up(leased.inode.ino);
                continue;
            }
            let cost = protocol::report_bound(&leased.item, protocol::json_len(&leased.item));
            if !items.is_empty() && json + cost > LEASE_JSON {
                // (Its report would not fit: the next lease's.)
                let q = match leased.range {
                    Some(r) => Queued::Range(leased.inode.ino, r),
                    None => Queued::File(leased.inode, Box::new(leased.remote)),
                };
                self.lock().queue.push_front(q);
                break;
            }
            json += cost;
            bytes += size;
            items.push(leased);
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
                if it.item.path != o.path || it.item.tmp != o.tmp || it.item.key != o.key {
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
        let mut back = Vec::new();
        let mut errors = Batch::new();
        let mut to_take: Vec<(&Leased, &protocol::Outcome)> = Vec::new();
        let mut ranges_in: Vec<(&Leased, &protocol::Outcome)> = Vec::new();
        // Files settled without a copy; big files whose ranges failed.
        let mut other = 0u64;
        let mut failed_big = Vec::new();
        for l in &lease.items {
            let Some(o) = by_n.remove(&l.item.n) else {
                // Not reported: handed out again.
                back.push(match l.range {
                    Some(i) => Queued::Range(l.inode.ino, i),
                    None => Queued::File(l.inode.clone(), Box::new(l.remote.clone())),
                });
                self.discard(&l.item, None);
                continue;
            };
            let refused = if let Some(e) = &o.error {
                // (A worker's words: kept short in the log and the journal.)
                let e: String = e.chars().take(500).collect();
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
                Some(format!("failed: {e}"))
            } else if o.changed || (o.size, o.mtime) != (l.item.size, l.item.mtime) {
                Some("OLD's file changed while it was copied".to_string())
            } else {
                None
            };
            match (refused, l.range) {
                (Some(why), None) => {
                    self.discard(&l.item, Some(o));
                    verdict.refused.push((o.n, why));
                    other += 1;
                }
                // A range that failed: the whole big file is given up (the next pass offers
                // it again).
                (Some(why), Some(_)) => {
                    failed_big.push(l.inode.ino);
                    verdict.refused.push((o.n, why));
                }
                (None, None) => to_take.push((l, o)),
                (None, Some(_)) => ranges_in.push((l, o)),
            }
        }
        for ino in failed_big {
            if self.lock().ranged.contains_key(&ino) {
                self.give_up(ino);
            }
        }
        // Ranges in: recorded; a big file whose ranges are all in is taken whole.
        let mut range_bytes = 0u64;
        let mut assembled: Vec<(Leased, protocol::Outcome)> = Vec::new();
        {
            let mut s = self.lock();
            for (l, o) in ranges_in {
                let i = l.range.expect("a range") as usize;
                let Some(g) = s
                    .ranged
                    .get_mut(&l.inode.ino)
                    .filter(|g| g.tmp == l.item.tmp)
                else {
                    verdict
                        .refused
                        .push((o.n, "the big file's copy was given up".into()));
                    continue;
                };
                if !g.done[i] {
                    g.done[i] = true;
                    range_bytes += g.ranges[i].1;
                }
                for p in &o.parts {
                    g.parts.retain(|q| q.number != p.number);
                    g.parts.push(p.clone());
                }
                verdict.accepted.push(o.n);
                if g.done.iter().all(|d| *d) {
                    let g = s.ranged.remove(&l.inode.ino).expect("found");
                    let mut parts = g.parts;
                    parts.sort_by_key(|p| p.number);
                    let whole = Leased {
                        item: item_of(u32::MAX, &g.remote, g.tmp, None),
                        inode: g.inode,
                        remote: g.remote,
                        range: None,
                        assembled: true,
                    };
                    let out = protocol::Outcome {
                        n: u32::MAX,
                        path: whole.item.path.clone(),
                        tmp: whole.item.tmp.clone(),
                        error: None,
                        errno: 0,
                        size: whole.item.size,
                        mtime: whole.item.mtime,
                        changed: false,
                        key: whole.item.key.clone(),
                        upload: g.upload,
                        parts,
                    };
                    assembled.push((whole, out));
                }
            }
        }
        to_take.extend(assembled.iter().map(|(l, o)| (l, o)));
        let mut pendings = Vec::new();
        let mut taking: HashMap<u64, (&Leased, &protocol::Outcome)> = HashMap::new();
        for ((l, o), taken) in to_take.iter().zip(self.take_all(&work, &to_take)) {
            match taken {
                Ok(Ok(p)) => {
                    taking.insert(l.inode.ino, (l, o));
                    pendings.push(p);
                }
                Ok(Err(why)) => {
                    other += 1;
                    if !l.assembled {
                        verdict.refused.push((o.n, why));
                    }
                }
                Err(e) => {
                    other += 1;
                    self.discard(&l.item, Some(o));
                    if !l.assembled {
                        verdict.refused.push((o.n, e.to_string()));
                    }
                }
            }
        }
        // (files named, their bytes, bytes copied by this lease)
        let mut named = (0u64, 0u64, range_bytes);
        for (inode, res) in self.view.finish_copies(pendings) {
            let Some(&(l, o)) = taking.get(&inode.ino) else {
                continue;
            };
            match res {
                Ok(Copied::File { .. }) => {
                    named.0 += 1;
                    named.1 += l.item.size;
                    if !l.assembled {
                        verdict.accepted.push(o.n);
                        named.2 += l.item.size;
                    }
                }
                Ok(other_outcome) => {
                    other += 1;
                    if !l.assembled {
                        verdict.refused.push((o.n, format!("{other_outcome:?}")));
                    }
                }
                Err(e) => {
                    other += 1;
                    if !l.assembled {
                        verdict.refused.push((o.n, e.to_string()));
                    }
                }
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
        self.pass_other.fetch_add(other, Ordering::Relaxed);
        let mut s = self.lock();
        let again: HashSet<u64> = back
            .iter()
            .map(|q| match q {
                Queued::File(i, _) => i.ino,
                Queued::Range(ino, _) => *ino,
            })
            .collect();
        // Files settled (a big file's: once taken whole, or given up).
        for l in lease.items.iter().chain(assembled.iter().map(|(l, _)| l)) {
            if l.range.is_none() && !again.contains(&l.inode.ino) {
                self.settle(&mut s, l.inode.ino);
            }
        }
        for q in back {
            s.queue.push_front(q);
        }
        if let Some(w) = s.workers.get_mut(&r.worker) {
            w.status.files += named.0;
            w.status.bytes += named.2;
            w.status.refused += verdict.refused.len() as u64;
            w.status.rate = (named.2 as f64 / elapsed) as u64;
            w.files_rate = r.outcomes.len() as f64 / elapsed;
        }
        drop(s);
        self.settled
            .fetch_add(r.outcomes.len() as u64, Ordering::Relaxed);
        self.changed.notify_all();
        self.record_workers();
        for (_, why) in &mut verdict.refused {
            *why = protocol::short_error(why);
        }
        Ok(verdict)
    }

    /// Take the copies of `list` (checked, in NEW's work dir `work` or in uploads), each
    /// ready to be named or refused; uploads (a request each to complete them) a few at once.
    fn take_all(
        &self,
        work: &Arc<std::os::fd::OwnedFd>,
        list: &[(&Leased, &protocol::Outcome)],
    ) -> Vec<crate::view::error::Result<Result<crate::view::Pending, String>>> {
        let take = |(l, o): &(&Leased, &protocol::Outcome)| {
            let fp = Fingerprint::of(&l.remote.st);
            let etag = l.item.etag.as_deref();
            match (&l.item.key, &o.upload) {
                (Some(key), Some(upload)) => self
                    .view
                    .remote_upload(&l.inode, &fp, etag, key, upload, &o.parts),
                (Some(_), None) => Ok(Err("reported without its upload".into())),
                (None, _) => {
                    self.view
                        .remote_pending(&l.inode, &fp, etag, work, &l.item.tmp, l.assembled)
                }
            }
        };
        if list.iter().all(|(l, _)| l.item.key.is_none()) {
            return list.iter().map(take).collect();
        }
        let next = AtomicUsize::new(0);
        let out = Mutex::new((0..list.len()).map(|_| None).collect::<Vec<_>>());
        std::thread::scope(|sc| {
            for _ in 0..UPLOADS_COMPLETED_AT_ONCE.min(list.len()) {
                sc.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(one) = list.get(i) else { break };
                        let r = take(one);
                        out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                    }
                });
            }
        });
        out.into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|r| r.expect("every item taken"))
            .collect()
    }

    /// Drop a copy not taken: its temporary file, or its upload (when reported: `o`).
    fn discard(&self, item: &Item, o: Option<&protocol::Outcome>) {
        // (A big file's range: its copy is the file's, dropped with it.)
        if item.range.is_some() {
            return;
        }
        match &item.key {
            None => self.view.remove_remote_copy(&item.tmp),
            Some(key) => {
                if let Some(id) = o.and_then(|o| o.upload.as_deref()) {
                    self.view.abort_remote_upload(key, id);
                }
            }
        }
    }

    /// A big file's copy made ready for its ranges: a file of its size in NEW's work dir, or
    /// an upload begun to its key; `None` when that fails (the copier copies it itself).
    fn split(&self, inode: &Arc<Inode>, item: &RemoteItem) -> Option<Ranged> {
        #[allow(clippy::unnecessary_cast)]
        let size = item.st.st_size as u64;
        let big = self.next_big.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("{}big-{}-{big}", crate::view::REMOTE_FILE_PREFIX, inode.ino);
        let made = match &item.key {
            Some(key) => self
                .view
                .begin_remote_upload(key, &item.st)
                .map(|id| (Some(id), crate::store::s3::part_size(size))),
            None => self
                .view
                .make_remote_file(&tmp, size)
                .map(|()| (None, 1 << 20)),
        };
        let (upload, unit) = match made {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %item.path, error = %e, "a big file's copy for workers; the daemon copies it");
                return None;
            }
        };
        let len = (self.range_bytes / unit).max(1) * unit;
        let ranges: Vec<(u64, u64)> = (0..size)
            .step_by(len as usize)
            .map(|o| (o, len.min(size - o)))
            .collect();
        tracing::info!(path = %item.path, size, ranges = ranges.len(), "a big file copied by ranges");
        Some(Ranged {
            inode: inode.clone(),
            remote: item.clone(),
            tmp,
            upload,
            done: vec![false; ranges.len()],
            ranges,
            parts: Vec::new(),
        })
    }

    /// Drop a big file's copy: its file in the work dir, or its upload.
    fn discard_ranged(&self, r: &Ranged) {
        match (&r.remote.key, &r.upload) {
            (Some(key), Some(id)) => self.view.abort_remote_upload(key, id),
            _ => self.view.remove_remote_copy(&r.tmp),
        }
    }

    /// `ino` is no worker's to copy any more (the view took it, a range failed): settled as
    /// not copied, a big file's copy dropped (its ranges still leased are refused).
    fn give_up(&self, ino: u64) {
        let gone = {
            let mut s = self.lock();
            let gone = s.ranged.remove(&ino);
            self.settle(&mut s, ino);
            gone
        };
        if let Some(r) = gone {
            self.discard_ranged(&r);
        }
        self.pass_other.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
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
            match (&o.key, &o.upload) {
                (Some(key), Some(id)) if tmps.contains(key) => {
                    self.view.abort_remote_upload(key, id)
                }
                (None, _) if tmps.contains(&o.tmp) => self.view.remove_remote_copy(&o.tmp),
                _ => {}
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
        let mut keys = Vec::new();
        for id in gone {
            let l = s.leases.remove(&id).expect("listed");
            tracing::warn!(
                lease = id,
                worker = %l.worker,
                files = l.items.len(),
                "a worker's lease expired: its files go to another worker"
            );
            // (Names of the copies: temporary names, or keys.)
            // (A big file's ranges: its copy stays, for the workers of its other ranges.)
            let tmps: Vec<String> = l
                .items
                .iter()
                .filter(|i| i.range.is_none())
                .map(|i| i.item.key.clone().unwrap_or_else(|| i.item.tmp.clone()))
                .collect();
            for i in l.items.into_iter().rev() {
                match (i.range, &i.item.key) {
                    (Some(r), _) => {
                        s.queue.push_front(Queued::Range(i.inode.ino, r));
                        continue;
                    }
                    (None, None) => self.view.remove_remote_copy(&i.item.tmp),
                    (None, Some(key)) => keys.push(key.clone()),
                }
                s.queue
                    .push_front(Queued::File(i.inode, Box::new(i.remote)));
            }
            s.expired.push_back((id, tmps));
            if s.expired.len() > EXPIRED_KEPT {
                s.expired.pop_front();
            }
        }
        drop(s);
        self.changed.notify_all();
        // The uploads the worker began for them (its ids unknown here: found by key).
        for key in keys {
            self.view.abort_uploads_of(&key);
        }
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
    fn active(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && self.has_workers_locked(&self.lock())
    }
    fn render_metrics(&self, out: &mut String) {
        self.metrics_into(out)
    }
}

/// The item `n` of a lease for OLD's file `remote`: its copy under `tmp` (a POSIX NEW) or
/// its key (an S3 NEW); `range`: a big file's range only.
fn item_of(n: u32, remote: &RemoteItem, tmp: String, range: Option<protocol::Range>) -> Item {
    #[allow(clippy::unnecessary_cast)]
    Item {
        n,
        path: remote.path.clone(),
        size: remote.st.st_size as u64,
        mtime: (remote.st.st_mtime as i64, remote.st.st_mtime_nsec as u32),
        etag: remote.etag.clone(),
        tmp,
        key: remote.key.clone(),
        mode: remote.st.st_mode,
        uid: remote.st.st_uid,
        gid: remote.st.st_gid,
        range,
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
