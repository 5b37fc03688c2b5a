//! `ferryfs worker`: copies the files a coordinator (a mount daemon started with
//! `--workers-listen`) hands out, from OLD to NEW, reaching both stores itself.
//!
//! Each lease's files are copied by a few threads: from OLD's POSIX file (checked against
//! OLD's size and mtime before and after) or OLD's S3 object (read at the ETag handed out),
//! either into a POSIX NEW's work dir under the temporary names the lease gives, with OLD's
//! xattrs, owner, mode and times, made durable (fsync), or, for an S3 NEW, as the parts of a
//! multipart upload to the entry's key (copied by the server when OLD is a bucket of the same
//! service) that only the coordinator completes. Then the lease is reported. The lease is
//! renewed while the copies run. A coordinator that cannot be reached is retried with backoff
//! (it may be restarting); one that refuses the token ends the worker at once, non-zero.
//! Credentials for S3 stores come from this host's environment or profile, never from the
//! coordinator.

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
use crate::store::s3::{PosixMeta, S3Store, S3Url};
use crate::store::{copy, posix};

/// How a worker is run.
pub struct Options {
    /// `http://HOST:PORT` of the coordinator (`https://` over TLS).
    pub coordinator: String,
    /// The CA certificates (PEM) to check an `https://` coordinator's certificate against
    /// (`None`: the system's).
    pub ca_file: Option<PathBuf>,
    pub token: String,
    /// The worker's id (`JOB_COMPLETION_INDEX` under an Indexed Job, else host and pid).
    pub id: String,
    /// Where this host sees OLD and NEW, when not at the coordinator's paths (or URLs: an
    /// `s3://` URL names a bucket).
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
    /// Over TLS: the client's settings, and the name the coordinator's certificate carries.
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// What a request came to.
enum Answer {
    Ok(Vec<u8>),
    /// 409: the lease is not current.
    Gone(String),
}

impl Client {
    fn new(url: &str, token: String, ca_file: Option<&Path>) -> Result<Client, Stop> {
        let (rest, secure) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => {
                return Err(Stop::Failed(format!(
                    "--coordinator {url:?}: expected http://HOST:PORT or https://HOST:PORT (the \
                     mount's --workers-listen address)"
                )));
            }
        };
        let host = rest.trim_end_matches('/').to_string();
        if host.is_empty() || host.contains('/') {
            return Err(Stop::Failed(format!(
                "--coordinator {url:?}: expected http(s)://HOST:PORT"
            )));
        }
        if !secure && ca_file.is_some() {
            return Err(Stop::Failed(format!(
                "--ca-file is for an https:// coordinator, not {url:?}"
            )));
        }
        let tls = if secure {
            let fail = |e: String| Stop::Failed(format!("--coordinator {url:?}: {e}"));
            Some((
                super::tls::client_config(ca_file).map_err(fail)?,
                super::tls::server_name(&host).map_err(fail)?,
            ))
        } else {
            None
        };
        Ok(Client { host, token, tls })
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
                Err(e) if super::tls::refused_certificate(&e) => {
                    return Err(Stop::Failed(format!(
                        "the coordinator at {}: its TLS certificate was refused ({e}): check \
                         --ca-file against the mount's --workers-tls-cert (which must name the \
                         address workers use, and be a server's certificate: a self-signed one \
                         with basicConstraints CA:FALSE, or one a CA in --ca-file signed)",
                        self.host
                    )));
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
        match &self.tls {
            None => http::post(conn, &self.host, path, &self.token, body),
            Some((cfg, name)) => {
                let mut s = super::tls::client(cfg, name, conn)?;
                http::post(&mut s, &self.host, path, &self.token, body)
            }
        }
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
    let client = Arc::new(Client::new(
        &o.coordinator,
        o.token.clone(),
        o.ca_file.as_deref(),
    )?);
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
    let old = reach(&o.old, &welcome.old, "OLD")?;
    let new = reach(&o.new, &welcome.new, "NEW")?;
    // (A POSIX NEW's work dir is opened for each lease: the coordinator makes it before it
    // hands one out, and removes it when the migration no longer needs it.)
    let dest = || match &new {
        Reached::S3(b) => Ok(Dest::Bucket(b)),
        Reached::Posix(new, root) => {
            posix::open_child(new.root(), std::ffi::OsStr::new(&welcome.work_dir))
                .map(|fd| Dest::Work(Arc::new(fd)))
                .map_err(|e| {
                    Stop::Failed(format!(
                        "NEW's work dir {}/{}: {e} (is NEW the store the coordinator serves, \
                 mounted here at the same path or given with --new?)",
                        root.display(),
                        welcome.work_dir
                    ))
                })
        }
    };
    tracing::info!(worker = %o.id, old = %old, new = %new, "worker started");
    let server_copy = AtomicBool::new(true);
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
        let dest = dest()?;
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
            let out = copy_all(
                &items,
                &Copying {
                    old: &old,
                    dest: &dest,
                    limiter: &limiter,
                    lost: &lost,
                    server_copy: &server_copy,
                },
                o.threads.max(1),
            );
            done.store(true, Ordering::Release);
            out
        });
        if lost.load(Ordering::Acquire) {
            discard(&dest, &items, &outcomes);
            continue;
        }
        let report = protocol::Report {
            worker: o.id.clone(),
            lease: id,
            outcomes,
        };
        let body = serde_json::to_vec(&report).expect("report serializes");
        let report_outcomes = report.outcomes;
        match client.call(&path_of("report"), &body, &stop)? {
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
                discard(&dest, &items, &report_outcomes);
            }
        }
    }
}

/// A store as this worker reaches it.
enum Reached {
    Posix(posix::PosixStore, PathBuf),
    S3(S3Store),
}

impl std::fmt::Display for Reached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reached::Posix(_, p) => write!(f, "{}", p.display()),
            Reached::S3(s) => write!(f, "{}", s.url),
        }
    }
}

/// OLD or NEW (`which`) where this host reaches it: `given` (`--old`/`--new`: a path, or an
/// `s3://` URL), else where the coordinator's migration names it. A bucket is reached with
/// this host's own credentials (environment or profile) and checked reachable now.
fn reach(given: &Option<PathBuf>, store: &Store, which: &str) -> Result<Reached, Stop> {
    let named = match given {
        Some(p) => match p.to_str() {
            Some(u) if u.starts_with("s3://") => Store::S3(u.to_string()),
            _ => Store::Posix(p.display().to_string()),
        },
        None => store.clone(),
    };
    match named {
        Store::Posix(p) => {
            let p = PathBuf::from(p);
            posix::PosixStore::open(&p)
                .map(|s| Reached::Posix(s, p.clone()))
                .map_err(|e| Stop::Failed(format!("{which} at {}: {e}", p.display())))
        }
        Store::S3(u) => {
            let url = S3Url::parse(&u).map_err(|e| Stop::Failed(format!("{which} {u}: {e}")))?;
            let s =
                S3Store::connect(&url).map_err(|e| Stop::Failed(format!("{which} {u}: {e}")))?;
            s.reachable().map_err(|e| {
                Stop::Failed(format!(
                    "{which} {u}: {e} (credentials come from this host's environment or \
                     profile)"
                ))
            })?;
            Ok(Reached::S3(s))
        }
    }
}

/// Where one lease's copies go.
enum Dest<'a> {
    /// A POSIX NEW's work dir.
    Work(Arc<std::os::fd::OwnedFd>),
    /// An S3 NEW: multipart uploads the coordinator completes.
    Bucket(&'a S3Store),
}

/// What every copy of a lease shares.
struct Copying<'a> {
    old: &'a Reached,
    dest: &'a Dest<'a>,
    limiter: &'a Limiter,
    lost: &'a AtomicBool,
    /// Whether NEW's credentials may copy OLD's objects by the server (until refused once).
    server_copy: &'a AtomicBool,
}

/// Drop a lease's copies: its temporary files, or its uploads.
fn discard(dest: &Dest<'_>, items: &[Item], outcomes: &[Outcome]) {
    match dest {
        // (A big file's ranges share its file or upload with other workers: kept.)
        Dest::Work(work) => {
            for i in items.iter().filter(|i| i.range.is_none()) {
                let _ = rustix::fs::unlinkat(work, i.tmp.as_str(), rustix::fs::AtFlags::empty());
            }
        }
        Dest::Bucket(b) => {
            let ranged: std::collections::HashSet<u32> = items
                .iter()
                .filter(|i| i.range.is_some())
                .map(|i| i.n)
                .collect();
            for o in outcomes.iter().filter(|o| !ranged.contains(&o.n)) {
                if let (Some(key), Some(id)) = (&o.key, &o.upload) {
                    let _ = b.abort_upload(key, id);
                }
            }
        }
    }
}

/// Copy every item, `threads` at a time; stops early (the rest reported as not copied) when
/// the lease is lost.
fn copy_all(items: &[Item], c: &Copying<'_>, threads: usize) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if c.lost.load(Ordering::Acquire) {
                        break;
                    }
                    let o = copy_one(item, c);
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(o);
                }
            });
        }
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn failed(mut out: Outcome, what: &str, e: io::Error) -> Outcome {
    tracing::warn!(path = %out.path, error = %e, "{what}");
    out.errno = e.raw_os_error().unwrap_or(libc::EIO);
    out.error = Some(protocol::short_error(&format!("{what}: {e}")));
    out
}

/// [`failed`] with an S3 error, its request and message kept (as far as they fit).
fn failed_s3(mut out: Outcome, what: &str, e: crate::store::s3::S3Error) -> Outcome {
    tracing::warn!(path = %out.path, error = %e, "{what}");
    out.errno = e.errno;
    out.error = Some(protocol::short_error(&format!("{what}: {e}")));
    out
}

#[allow(clippy::unnecessary_cast)]
fn seen(st: &rustix::fs::Stat) -> (u64, (i64, u32)) {
    (
        st.st_size as u64,
        (st.st_mtime as i64, st.st_mtime_nsec as u32),
    )
}

/// One item: OLD's file into NEW's work dir under its temporary name, durable, or into an
/// upload to its key.
fn copy_one(item: &Item, c: &Copying<'_>) -> Outcome {
    let mut out = Outcome {
        n: item.n,
        path: item.path.clone(),
        tmp: item.tmp.clone(),
        error: None,
        errno: 0,
        size: item.size,
        mtime: item.mtime,
        changed: false,
        key: item.key.clone(),
        upload: None,
        parts: Vec::new(),
    };
    let src = match c.old {
        Reached::Posix(old, _) => {
            // (Beneath OLD's root, no symlink followed; never blocking on a FIFO put in its
            // place.)
            let src = match old.open_path(Path::new(&item.path)).and_then(|fd| {
                let flags = OFlags::RDONLY | OFlags::NONBLOCK;
                posix::reopen(fd.as_fd(), flags | OFlags::NOATIME)
                    .or_else(|_| posix::reopen(fd.as_fd(), flags))
            }) {
                Ok(f) => f,
                Err(e) => return failed(out, "open OLD's file", e),
            };
            let st = match posix::stat_fd(src.as_fd()) {
                Ok(st) => st,
                Err(e) => return failed(out, "stat OLD's file", e),
            };
            (out.size, out.mtime) = seen(&st);
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                out.errno = libc::EINVAL;
                out.error = Some("OLD's entry is no longer a plain file".into());
                return out;
            }
            if (out.size, out.mtime) != (item.size, item.mtime) {
                // Changed since it was handed out: nothing copied; the coordinator refuses it.
                out.changed = true;
                return out;
            }
            Some((src, st))
        }
        Reached::S3(_) => None,
    };
    let out = match (c.dest, &item.range) {
        (Dest::Work(work), None) => to_work(item, c, src.as_ref(), work, out),
        (Dest::Work(work), Some(r)) => range_to_work(item, c, src.as_ref(), work, r, out),
        (Dest::Bucket(b), _) => to_bucket(item, c, src.as_ref().map(|(f, _)| f), b, out),
    };
    if out.error.is_some() || out.changed {
        return out;
    }
    // What OLD's file is after the copy: the coordinator refuses a copy of another version.
    match &src {
        Some((f, _)) => match posix::stat_fd(f.as_fd()) {
            Ok(after) => {
                let mut out = out;
                (out.size, out.mtime) = seen(&after);
                out
            }
            Err(e) => failed(out, "stat OLD's file", e),
        },
        None => out,
    }
}

/// Whether an S3 error says OLD's object is no longer the version handed out.
fn replaced(e: &crate::store::s3::S3Error) -> bool {
    e.errno == libc::ESTALE || e.errno == libc::ENOENT
}

/// The copy into NEW's work dir, durable.
fn to_work(
    item: &Item,
    c: &Copying<'_>,
    src: Option<&(File, rustix::fs::Stat)>,
    work: &Arc<std::os::fd::OwnedFd>,
    mut out: Outcome,
) -> Outcome {
    let tmp = match rustix::fs::openat(
        work,
        item.tmp.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(item.mode & 0o777),
    ) {
        Ok(fd) => File::from(fd),
        Err(e) => return failed(out, "create the copy in NEW's work dir", e.into()),
    };
    let mut tick = |n: u64| {
        c.limiter.take(n, c.lost);
        !c.lost.load(Ordering::Acquire)
    };
    let err = |op: &'static str| move |e: io::Error| copy::CopyError { op, source: e };
    let r = (|| -> Result<bool, copy::CopyError> {
        match (src, c.old) {
            (Some((f, st)), _) => {
                if !copy::copy_data_of(f, &tmp, item.size, Some(st), &mut tick)? {
                    return Ok(false);
                }
                copy::copy_xattrs_fd(f, &tmp)?;
                copy::set_owner_and_mode(&tmp, st)?;
                rustix::fs::futimens(&tmp, &copy::timestamps(st))
                    .map_err(|e| err("futimens copy")(e.into()))?;
            }
            (None, Reached::S3(old)) => {
                let etag = item.etag.as_deref().unwrap_or("");
                match old.get_to_file(&item.path, etag, &tmp, &mut tick) {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(false),
                    Err(e) => return Err(err("read OLD's object")(e.into())),
                }
                rustix::fs::fchown(
                    &tmp,
                    Some(rustix::fs::Uid::from_raw(item.uid)),
                    Some(rustix::fs::Gid::from_raw(item.gid)),
                )
                .map_err(|e| err("chown copy")(e.into()))?;
                rustix::fs::fchmod(&tmp, Mode::from_raw_mode(item.mode & 0o7777))
                    .map_err(|e| err("chmod copy")(e.into()))?;
                let t = rustix::fs::Timespec {
                    tv_sec: item.mtime.0,
                    tv_nsec: item.mtime.1.into(),
                };
                rustix::fs::futimens(
                    &tmp,
                    &rustix::fs::Timestamps {
                        last_access: t,
                        last_modification: t,
                    },
                )
                .map_err(|e| err("futimens copy")(e.into()))?;
            }
            (None, Reached::Posix(..)) => unreachable!("a POSIX OLD's file is open"),
        }
        tmp.sync_all().map_err(err("fsync copy"))?;
        Ok(true)
    })();
    match r {
        Ok(true) => out,
        Ok(false) => {
            out.error = Some("the lease was lost".into());
            out
        }
        Err(e) => {
            let _ = rustix::fs::unlinkat(work, item.tmp.as_str(), rustix::fs::AtFlags::empty());
            let stale = e.source.raw_os_error().is_some_and(|n| n == libc::ESTALE);
            if src.is_none() && stale {
                // OLD's object was replaced: nothing copied; the coordinator refuses it.
                out.changed = true;
                return out;
            }
            failed(out, e.op, e.source)
        }
    }
}

/// The smallest part S3 copies by the server (UploadPartCopy).
const MIN_PART_COPY: u64 = 5 << 20;

/// Bytes read and written at once for a big file's range.
const RANGE_BUFFER: u64 = 8 << 20;

/// A big file's range into the file the coordinator made for it in NEW's work dir (other
/// workers write the other ranges), durable.
fn range_to_work(
    item: &Item,
    c: &Copying<'_>,
    src: Option<&(File, rustix::fs::Stat)>,
    work: &Arc<std::os::fd::OwnedFd>,
    range: &protocol::Range,
    mut out: Outcome,
) -> Outcome {
    use std::os::unix::fs::FileExt;
    let tmp = match rustix::fs::openat(
        work,
        item.tmp.as_str(),
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd),
        Err(e) => return failed(out, "open the big file's copy in NEW's work dir", e.into()),
    };
    let etag = item.etag.as_deref().unwrap_or("");
    let end = range.offset.saturating_add(range.len).min(item.size);
    let mut buf = vec![0u8; RANGE_BUFFER.min(range.len) as usize];
    let mut off = range.offset;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        c.limiter.take(n as u64, c.lost);
        if c.lost.load(Ordering::Acquire) {
            out.error = Some("the lease was lost".into());
            return out;
        }
        let read = match (src, c.old) {
            (Some((f, _)), _) => posix::read_old_at(f, &mut buf[..n], off),
            (None, Reached::S3(old)) => old
                .get_range_into(&item.path, etag, off, &mut buf[..n])
                .map_err(io::Error::from),
            (None, Reached::Posix(..)) => unreachable!("a POSIX OLD's file is open"),
        };
        match read {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::ESTALE)
                    || (src.is_none() && e.raw_os_error() == Some(libc::ENOENT)) =>
            {
                // Cut short, or replaced: OLD's file changed.
                out.changed = true;
                return out;
            }
            Err(e) => return failed(out, "read OLD's file", e),
        }
        if let Err(e) = tmp.write_all_at(&buf[..n], off) {
            return failed(out, "write the big file's copy", e);
        }
        off += n as u64;
    }
    if let Err(e) = tmp.sync_data() {
        return failed(out, "fsync the big file's copy", e);
    }
    out
}

/// The copy as the parts of a multipart upload to the item's key in NEW's bucket, begun
/// here and left for the coordinator to complete (aborted here on any failure).
fn to_bucket(
    item: &Item,
    c: &Copying<'_>,
    src: Option<&File>,
    new: &S3Store,
    mut out: Outcome,
) -> Outcome {
    let Some(key) = item.key.as_deref() else {
        out.errno = libc::EINVAL;
        out.error = Some("an item for an S3 NEW without its key".into());
        return out;
    };
    let meta = PosixMeta {
        mode: Some(item.mode),
        uid: Some(item.uid),
        gid: Some(item.gid),
        mtime: Some(item.mtime),
    };
    // A big file's range goes into the upload the coordinator began for the whole file
    // (never aborted here: other workers fill it too).
    let (id, span, shared) = match &item.range {
        Some(r) => match &r.upload {
            Some(id) => (id.clone(), (r.offset, r.len), true),
            None => {
                out.errno = libc::EINVAL;
                out.error = Some("a range for an S3 NEW without its upload".into());
                return out;
            }
        },
        None => match new.begin_multipart(key, &meta) {
            Ok(id) => (id, (0, item.size), false),
            Err(e) => return failed_s3(out, "begin the upload into NEW", e),
        },
    };
    let etag = item.etag.as_deref().unwrap_or("");
    let lost = || io::Error::other("the lease was lost");
    let pace = |n: usize| {
        c.limiter.take(n as u64, c.lost);
        if c.lost.load(Ordering::Acquire) {
            Err(lost())
        } else {
            Ok(())
        }
    };
    let sent = match (src, c.old) {
        (Some(f), _) => new.send_parts_of(
            key,
            &id,
            item.size,
            span,
            None,
            &|_, _| false,
            &mut |off, buf| {
                pace(buf.len())?;
                posix::read_old_at(f, buf, off)
            },
        ),
        (None, Reached::S3(old)) => {
            // Parts of 5 MiB or more are copied by the server from OLD's object when NEW is
            // the same service (S3 copies no smaller part); the rest pass through here.
            let send = |by_server: bool| {
                let source = by_server.then_some((old, item.path.as_str(), etag));
                new.send_parts_of(
                    key,
                    &id,
                    item.size,
                    span,
                    source,
                    &|_, len| len >= MIN_PART_COPY,
                    &mut |off, buf| {
                        pace(buf.len())?;
                        old.get_range_into(&item.path, etag, off, buf)
                            .map_err(io::Error::from)
                    },
                )
            };
            let by_server = new.same_service(old) && c.server_copy.load(Ordering::Relaxed);
            match send(by_server) {
                Err(e) if by_server && (e.errno == libc::EACCES || e.errno == libc::EPERM) => {
                    if c.server_copy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "server-side copy from OLD refused; streaming the bytes through this worker from now on");
                    }
                    send(false)
                }
                r => r,
            }
        }
        (None, Reached::Posix(..)) => unreachable!("a POSIX OLD's file is open"),
    };
    match sent {
        Ok((parts, _)) => {
            out.upload = Some(id);
            out.parts = parts;
            out
        }
        Err(e) => {
            if !shared {
                let _ = new.abort_upload(key, &id);
            }
            if c.lost.load(Ordering::Acquire) {
                out.error = Some("the lease was lost".into());
                return out;
            }
            if replaced(&e) {
                // OLD's file or object changed while it was read: the coordinator refuses it.
                out.changed = true;
                return out;
            }
            failed_s3(out, "send the copy into NEW", e)
        }
    }
}
