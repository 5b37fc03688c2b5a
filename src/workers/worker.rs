//! `ferryfs worker`: copies the files a coordinator (a mount daemon started with
//! `--workers-listen`) hands out, from OLD to NEW, reaching both stores itself.
//!
//! Each lease's files are copied by a few threads into NEW's work dir under the temporary
//! names the lease gives, with OLD's xattrs, owner, mode and times, made durable (fsync),
//! checked against OLD's size and mtime before and after, and reported. The lease is renewed
//! while the copies run. A coordinator that cannot be reached is retried with backoff (it may
//! be restarting); one that refuses the token ends the worker at once, non-zero.

use std::fs::File;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

use super::http;
use super::protocol::{self, Grant, Item, Outcome, Store};
use crate::copier::limits::Limiter;
use crate::store::{copy, posix};

/// How a worker is run.
pub struct Options {
    /// `http://HOST:PORT` of the coordinator.
    pub coordinator: String,
    pub token: String,
    /// The worker's id (`JOB_COMPLETION_INDEX` under an Indexed Job, else host and pid).
    pub id: String,
    /// Where this host sees OLD and NEW, when not at the coordinator's paths.
    pub old: Option<PathBuf>,
    pub new: Option<PathBuf>,
    /// Files copied at once.
    pub threads: usize,
    /// This worker's own bandwidth limit (bytes/s, 0: none).
    pub bwlimit: u64,
}

/// Why a worker stopped.
#[derive(Debug)]
pub enum Stop {
    /// The coordinator refused the token: not a transient error.
    Refused(String),
    /// Anything else that cannot go on (a store that cannot be opened, a bad URL).
    Failed(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Refused(s) | Stop::Failed(s) => f.write_str(s),
        }
    }
}

/// The id a worker takes by default: the Indexed Job's completion index, else host and pid.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_string(), |h| h.trim().to_string());
    match std::env::var("JOB_COMPLETION_INDEX") {
        Ok(i) if !i.is_empty() => format!("index-{i}"),
        _ => format!("{host}-{}", std::process::id()),
    }
}

/// The coordinator as a client sees it.
struct Client {
    host: String,
    token: String,
}

/// What a request came to.
enum Answer {
    Ok(Vec<u8>),
    /// 409: the lease is not current.
    Gone(String),
}

impl Client {
    fn new(url: &str, token: String) -> Result<Client, Stop> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| {
                Stop::Failed(format!(
                    "--coordinator {url:?}: expected http://HOST:PORT (the mount's \
                     --workers-listen address)"
                ))
            })?
            .trim_end_matches('/')
            .to_string();
        if host.is_empty() || host.contains('/') {
            return Err(Stop::Failed(format!(
                "--coordinator {url:?}: expected http://HOST:PORT"
            )));
        }
        Ok(Client { host, token })
    }

    /// One request; transport errors and 5xx are retried with backoff, forever (the
    /// coordinator may be restarting) unless `stop` is set.
    fn call(&self, path: &str, body: &[u8], stop: &AtomicBool) -> Result<Answer, Stop> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.once(path, body) {
                Ok((200, b)) => return Ok(Answer::Ok(b)),
                Ok((401, b)) => {
                    return Err(Stop::Refused(format!(
                        "the coordinator at {} refused this worker's token ({}): check \
                         --token-file against the mount's --workers-token-file",
                        self.host,
                        error_of(&b)
                    )));
                }
                Ok((409, b)) => return Ok(Answer::Gone(error_of(&b))),
                Ok((s, b)) if s < 500 => {
                    return Err(Stop::Failed(format!(
                        "the coordinator answered {path} with {s}: {}",
                        error_of(&b)
                    )));
                }
                Ok((s, b)) => {
                    tracing::warn!(status = s, error = %error_of(&b), "coordinator busy; retrying");
                }
                Err(e) => {
                    tracing::warn!(coordinator = %self.host, error = %e, "coordinator unreachable; retrying");
                }
            }
            if stop.load(Ordering::Relaxed) {
                return Err(Stop::Failed("stopped".into()));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn once(&self, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let addr = self
            .host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{} resolves to nothing", self.host)))?;
        let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        conn.set_read_timeout(Some(http::IO_TIMEOUT))?;
        conn.set_write_timeout(Some(http::IO_TIMEOUT))?;
        http::post(conn, &self.host, path, &self.token, body)
    }
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<protocol::Failure>(body)
        .map(|f| f.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

fn path_of(p: &str) -> String {
    format!("/{}/{p}", protocol::VERSION)
}

/// Run the worker until the coordinator says the copy is done.
pub fn run(o: &Options) -> Result<(), Stop> {
    let client = Arc::new(Client::new(&o.coordinator, o.token.clone())?);
    let stop = AtomicBool::new(false);
    let hello = serde_json::to_vec(&protocol::Hello {
        worker: o.id.clone(),
    })
    .expect("hello serializes");
    let Answer::Ok(b) = client.call(&path_of("hello"), &hello, &stop)? else {
        return Err(Stop::Failed("the coordinator refused hello".into()));
    };
    let welcome: protocol::Welcome = serde_json::from_slice(&b)
        .map_err(|e| Stop::Failed(format!("the coordinator's welcome: {e}")))?;
    let root = |given: &Option<PathBuf>, store: &Store, which: &str| match (given, store) {
        (Some(p), _) => Ok(p.clone()),
        (None, Store::Posix(p)) => Ok(PathBuf::from(p)),
        (None, Store::S3(u)) => Err(Stop::Failed(format!(
            "{which} is the bucket {u}: this worker copies between POSIX stores"
        ))),
    };
    let old_root = root(&o.old, &welcome.old, "OLD")?;
    let new_root = root(&o.new, &welcome.new, "NEW")?;
    let open_dir = |p: &Path, which: &str| {
        posix::PosixStore::open(p)
            .map_err(|e| Stop::Failed(format!("{which} at {}: {e}", p.display())))
    };
    let old = Arc::new(open_dir(&old_root, "OLD")?);
    let new = open_dir(&new_root, "NEW")?;
    // (Opened for each lease: the coordinator makes it before it hands one out, and removes
    // it when the migration no longer needs it.)
    let work_dir = || {
        posix::open_child(new.root(), std::ffi::OsStr::new(&welcome.work_dir))
            .map(Arc::new)
            .map_err(|e| {
                Stop::Failed(format!(
                    "NEW's work dir {}/{}: {e} (is NEW the store the coordinator serves, \
                     mounted here at the same path or given with --new?)",
                    new_root.display(),
                    welcome.work_dir
                ))
            })
    };
    tracing::info!(worker = %o.id, old = %old_root.display(), new = %new_root.display(), "worker started");
    let limiter = Arc::new(Limiter::new(o.bwlimit));
    let ask = serde_json::to_vec(&protocol::LeaseRequest {
        worker: o.id.clone(),
    })
    .expect("lease request serializes");
    loop {
        let Answer::Ok(b) = client.call(&path_of("lease"), &ask, &stop)? else {
            continue;
        };
        let grant: Grant = serde_json::from_slice(&b)
            .map_err(|e| Stop::Failed(format!("the coordinator's lease: {e}")))?;
        let (id, secs, items) = match grant {
            Grant::Done => {
                tracing::info!(worker = %o.id, "the coordinator says the copy is done");
                return Ok(());
            }
            Grant::Wait { ms } => {
                std::thread::sleep(Duration::from_millis(ms.clamp(50, 10_000)));
                continue;
            }
            Grant::Lease { id, secs, items } => (id, secs, items),
        };
        let work = work_dir()?;
        let lost = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let outcomes = std::thread::scope(|s| {
            // Renew while the copies run.
            s.spawn(|| {
                let every = Duration::from_secs((secs / 3).max(1));
                let body = serde_json::to_vec(&protocol::Renew {
                    worker: o.id.clone(),
                    lease: id,
                })
                .expect("renew serializes");
                let mut waited = Duration::ZERO;
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(100));
                    waited += Duration::from_millis(100);
                    if waited < every {
                        continue;
                    }
                    waited = Duration::ZERO;
                    match client.call(&path_of("renew"), &body, &done) {
                        Ok(Answer::Ok(_)) => {}
                        Ok(Answer::Gone(e)) => {
                            tracing::warn!(lease = id, error = %e, "lease lost; its copies are dropped");
                            lost.store(true, Ordering::Release);
                            return;
                        }
                        Err(_) => return,
                    }
                }
            });
            let out = copy_all(&items, &old, &work, o.threads.max(1), &limiter, &lost);
            done.store(true, Ordering::Release);
            out
        });
        if lost.load(Ordering::Acquire) {
            remove_copies(&work, &items);
            continue;
        }
        let report = serde_json::to_vec(&protocol::Report {
            worker: o.id.clone(),
            lease: id,
            outcomes,
        })
        .expect("report serializes");
        match client.call(&path_of("report"), &report, &stop)? {
            Answer::Ok(b) => {
                let v: protocol::Verdict = serde_json::from_slice(&b).unwrap_or_default();
                tracing::info!(
                    lease = id,
                    copied = v.accepted.len(),
                    refused = v.refused.len(),
                    "lease reported"
                );
                for (n, why) in v.refused.iter().take(3) {
                    tracing::info!(lease = id, n, why = %why, "copy refused");
                }
            }
            Answer::Gone(e) => {
                tracing::warn!(lease = id, error = %e, "report refused; its copies are dropped");
                remove_copies(&work, &items);
            }
        }
    }
}

fn remove_copies(work: &impl AsFd, items: &[Item]) {
    for i in items {
        let _ = rustix::fs::unlinkat(work, i.tmp.as_str(), rustix::fs::AtFlags::empty());
    }
}

/// Copy every item, `threads` at a time; stops early (the rest reported as not copied) when
/// the lease is `lost`.
fn copy_all(
    items: &[Item],
    old: &posix::PosixStore,
    work: &Arc<std::os::fd::OwnedFd>,
    threads: usize,
    limiter: &Limiter,
    lost: &AtomicBool,
) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if lost.load(Ordering::Acquire) {
                        break;
                    }
                    let o = copy_one(item, old, work, limiter, lost);
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(o);
                }
            });
        }
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// One item: OLD's file into NEW's work dir under its temporary name, durable.
fn copy_one(
    item: &Item,
    old: &posix::PosixStore,
    work: &Arc<std::os::fd::OwnedFd>,
    limiter: &Limiter,
    lost: &AtomicBool,
) -> Outcome {
    let mut out = Outcome {
        n: item.n,
        path: item.path.clone(),
        tmp: item.tmp.clone(),
        error: None,
        errno: 0,
        size: 0,
        mtime: (0, 0),
    };
    let fail = |mut out: Outcome, what: &str, e: io::Error| {
        out.errno = e.raw_os_error().unwrap_or(libc::EIO);
        out.error = Some(format!("{what}: {e}"));
        out
    };
    // (Beneath OLD's root, no symlink followed; never blocking on a FIFO put in its place.)
    let src = match old.open_path(Path::new(&item.path)).and_then(|fd| {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        posix::reopen(fd.as_fd(), flags | OFlags::NOATIME)
            .or_else(|_| posix::reopen(fd.as_fd(), flags))
    }) {
        Ok(f) => f,
        Err(e) => return fail(out, "open OLD's file", e),
    };
    let stat = |f: &File| posix::stat_fd(f.as_fd());
    let st = match stat(&src) {
        Ok(st) => st,
        Err(e) => return fail(out, "stat OLD's file", e),
    };
    #[allow(clippy::unnecessary_cast)]
    let seen = |st: &rustix::fs::Stat| {
        (
            st.st_size as u64,
            (st.st_mtime as i64, st.st_mtime_nsec as u32),
        )
    };
    (out.size, out.mtime) = seen(&st);
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        out.errno = libc::EINVAL;
        out.error = Some("OLD's entry is no longer a plain file".into());
        return out;
    }
    if (out.size, out.mtime) != (item.size, item.mtime) {
        // Changed since it was handed out: nothing copied; the coordinator refuses it.
        return out;
    }
    let tmp = match rustix::fs::openat(
        work,
        item.tmp.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(st.st_mode & 0o777),
    ) {
        Ok(fd) => File::from(fd),
        Err(e) => return fail(out, "create the copy in NEW's work dir", e.into()),
    };
    let r = (|| -> Result<bool, copy::CopyError> {
        let mut tick = |n: u64| {
            limiter.take(n, lost);
            !lost.load(Ordering::Acquire)
        };
        if !copy::copy_data_of(&src, &tmp, item.size, Some(&st), &mut tick)? {
            return Ok(false);
        }
        copy::copy_xattrs_fd(&src, &tmp)?;
        copy::set_owner_and_mode(&tmp, &st)?;
        rustix::fs::futimens(&tmp, &copy::timestamps(&st)).map_err(|e| copy::CopyError {
            op: "futimens copy",
            source: e.into(),
        })?;
        tmp.sync_all().map_err(|e| copy::CopyError {
            op: "fsync copy",
            source: e,
        })?;
        Ok(true)
    })();
    match r {
        Ok(true) => {}
        Ok(false) => {
            out.error = Some("the lease was lost".into());
            return out;
        }
        Err(e) => {
            let _ = rustix::fs::unlinkat(work, item.tmp.as_str(), rustix::fs::AtFlags::empty());
            let what = e.op;
            return fail(out, what, e.source);
        }
    }
    // What OLD's file is after the copy: the coordinator refuses a copy of another version.
    match stat(&src) {
        Ok(after) => (out.size, out.mtime) = seen(&after),
        Err(e) => return fail(out, "stat OLD's file", e),
    }
    out
}
