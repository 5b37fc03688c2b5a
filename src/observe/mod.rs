//! Watching a serving daemon from outside: `mount --metrics-addr ADDR` serves `/metrics`
//! (Prometheus text), `/healthz` (liveness) and `/readyz` (readiness) over plain HTTP/1.1.
//!
//! Health comes from probe threads, one per thing that can fail on its own (the mount, OLD,
//! NEW, the view end to end), each re-checking every `PROBE_EVERY` and stamping its result;
//! a probe that stops answering (a hung NFS server, a wedged daemon) shows as a stale stamp.
//! A request to an endpoint never touches a store itself, so a probe can neither hang nor pile
//! up threads. This module must never change the migration: it only reads.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::copier::Copier;
use crate::journal::Phase;
use crate::journal::Records;
use crate::metrics::METRICS;

/// How often each probe checks again.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A probe silent for this long is failing: what it checks does not answer.
const STALE_AFTER: Duration = Duration::from_secs(10);

/// `PROBE_EVERY`, or `FERRYFS_PROBE_INTERVAL_MS` from the environment (tests: a probe that
/// never rests finds the races a probe every 2 s would hit once a day).
fn probe_every() -> Duration {
    static EVERY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("FERRYFS_PROBE_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(PROBE_EVERY, Duration::from_millis)
    })
}

/// At most this many HTTP connections are served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// The things the probes check, in the order the health pages list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Our FUSE mount is still attached at the mountpoint (mountinfo).
    Mount,
    /// `statfs` through the kernel to this daemon's view answers.
    View,
    /// OLD's root answers `fstatvfs` (absent once committed: OLD is no longer needed).
    Old,
    /// NEW's root answers `fstatvfs`.
    New,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Mount => "mount",
            Target::View => "view",
            Target::Old => "old_store",
            Target::New => "new_store",
        }
    }
}

/// One probe's check: `Ok(detail)` passes, `Err(detail)` fails, `None` did not check (the
/// last result stands, and goes stale if this lasts).
type Check = Box<dyn Fn(&Observed) -> Option<Result<String, String>> + Send>;

#[derive(Debug, Clone)]
struct Probe {
    ok: bool,
    detail: String,
    at: Instant,
}

/// Everything the endpoints read: the daemon's copier and journal, and the probes' results.
pub struct Observed {
    copier: Arc<Copier>,
    journal: Records,
    mountpoint: PathBuf,
    state: PathBuf,
    ready: AtomicBool,
    stopping: AtomicBool,
    probes: Mutex<Vec<(Target, Option<Probe>)>>,
    started: Instant,
    /// The FUSE request gate: the view probe's statfs asks it first (see `Gate::own_use`).
    gate: Arc<crate::fuse::takeover::Gate>,
}

#[derive(Serialize)]
struct CheckJson {
    name: &'static str,
    ok: bool,
    detail: String,
    age_seconds: f64,
}

#[derive(Serialize)]
struct HealthJson {
    status: &'static str,
    checks: Vec<CheckJson>,
}

/// What the OLD probe checks.
pub enum OldProbe {
    /// A POSIX store's root: fstatvfs.
    Posix(OwnedFd),
    /// An S3 store: a LIST of one key.
    S3(Arc<crate::store::s3::tree::S3Tree>),
}

impl Observed {
    /// `old_root` is `None` once committed.
    pub fn new(
        copier: Arc<Copier>,
        journal: Records,
        mountpoint: PathBuf,
        state: PathBuf,
        has_old: bool,
        gate: Arc<crate::fuse::takeover::Gate>,
    ) -> Arc<Observed> {
        let mut targets = vec![Target::Mount, Target::View];
        if has_old {
            targets.push(Target::Old);
        }
        targets.push(Target::New);
        Arc::new(Observed {
            copier,
            journal,
            mountpoint,
            state,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            probes: Mutex::new(targets.into_iter().map(|t| (t, None)).collect()),
            started: Instant::now(),
            gate,
        })
    }

    /// The view serves (the kernel accepted the mount): readiness may pass from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The view is shutting down: readiness fails, probes stop.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn record(&self, t: Target, ok: bool, detail: String) {
        let mut p = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = p.iter_mut().find(|(x, _)| *x == t) {
            slot.1 = Some(Probe {
                ok,
                detail,
                at: Instant::now(),
            });
        }
    }

    /// Start one probe thread per target. `old`: OLD's root fd or S3 store (`None` once
    /// committed); `new_root`: NEW's root fd.
    pub fn start_probes(self: &Arc<Self>, old: Option<OldProbe>, new_root: OwnedFd) {
        let spawn = |t: Target, check: Check| {
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name(format!("probe-{}", t.name()))
                .spawn(move || {
                    while !me.stopping.load(Ordering::Relaxed) {
                        match check(&me) {
                            Some(Ok(d)) => me.record(t, true, d),
                            Some(Err(d)) => me.record(t, false, d),
                            None => {}
                        }
                        std::thread::sleep(probe_every());
                    }
                });
        };
        spawn(
            Target::Mount,
            Box::new(|o| {
                Some(if crate::fuse::mount::is_mounted(&o.mountpoint, &o.state) {
                    Ok(format!("attached at {}", o.mountpoint.display()))
                } else {
                    Err(format!("no ferryfs mount at {}", o.mountpoint.display()))
                })
            }),
        );
        spawn(
            Target::View,
            Box::new(|o| {
                if !o.ready.load(Ordering::Relaxed) {
                    return Some(Err("not serving yet".into()));
                }
                // Not while the mount is being handed over: its answer could be parked.
                let _own = o.gate.own_use()?;
                // A round trip through the kernel to this daemon's FUSE workers (statfs is
                // never answered from a kernel cache).
                let t = Instant::now();
                Some(
                    rustix::fs::statvfs(&o.mountpoint)
                        .map(|_| format!("statfs answered in {:.1} ms", ms(t.elapsed())))
                        .map_err(|e| format!("statfs of {}: {e}", o.mountpoint.display())),
                )
            }),
        );
        let store = |fd: OwnedFd| -> Check {
            Box::new(move |_| {
                let t = Instant::now();
                Some(
                    rustix::fs::fstatvfs(&fd)
                        .map(|v| {
                            format!(
                                "answered in {:.1} ms; {} of {} blocks free",
                                ms(t.elapsed()),
                                v.f_bavail,
                                v.f_blocks
                            )
                        })
                        .map_err(|e| format!("fstatvfs of the store's root: {e}")),
                )
            })
        };
        match old {
            Some(OldProbe::Posix(fd)) => spawn(Target::Old, store(fd)),
            // One LIST of at most one key: the endpoint answers and the bucket is readable.
            Some(OldProbe::S3(tree)) => spawn(
                Target::Old,
                Box::new(move |_| {
                    let t = Instant::now();
                    Some(
                        tree.store
                            .reachable()
                            .map(|()| {
                                format!("{} answered in {:.1} ms", tree.store.url, ms(t.elapsed()))
                            })
                            .map_err(|e| e.to_string()),
                    )
                }),
            ),
            None => {}
        }
        spawn(Target::New, store(new_root));
    }

    /// The probes' results; a probe silent for STALE_AFTER (or never run, past that long after
    /// start) fails.
    fn checks(&self) -> Vec<CheckJson> {
        let probes = self
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        probes
            .into_iter()
            .map(|(t, p)| match p {
                Some(p) if p.at.elapsed() <= STALE_AFTER => CheckJson {
                    name: t.name(),
                    ok: p.ok,
                    detail: p.detail,
                    age_seconds: p.at.elapsed().as_secs_f64(),
                },
                Some(p) => CheckJson {
                    name: t.name(),
                    ok: false,
                    detail: format!(
                        "no answer for {:.0} s (last: {})",
                        p.at.elapsed().as_secs_f64(),
                        p.detail
                    ),
                    age_seconds: p.at.elapsed().as_secs_f64(),
                },
                // Its first check has not returned: a store that hung before it ever answered
                // is as stale as one that stopped answering.
                None if self.started.elapsed() <= STALE_AFTER => CheckJson {
                    name: t.name(),
                    ok: true,
                    detail: "not checked yet".into(),
                    age_seconds: 0.0,
                },
                None => CheckJson {
                    name: t.name(),
                    ok: false,
                    detail: format!(
                        "no answer for {:.0} s (never answered since the daemon started)",
                        self.started.elapsed().as_secs_f64()
                    ),
                    age_seconds: self.started.elapsed().as_secs_f64(),
                },
            })
            .collect()
    }

    /// Liveness: the mount is attached and the view answers through the kernel. Failing it
    /// means the daemon is wedged or its mount is gone: a restart is the cure. A store that
    /// fails is a readiness matter (restarting cannot mend OLD's NFS server), unless it is NEW
    /// hanging, which the view's own statfs then shows.
    fn healthz(&self) -> (bool, HealthJson) {
        let checks: Vec<CheckJson> = self
            .checks()
            .into_iter()
            .filter(|c| c.name == Target::Mount.name() || c.name == Target::View.name())
            .collect();
        let ok = checks.iter().all(|c| c.ok);
        (ok, health_json(ok, checks))
    }

    /// Readiness: serving, not stopping, and every check passes (both stores answer).
    fn readyz(&self) -> (bool, HealthJson) {
        let mut checks = self.checks();
        let serving = self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed);
        checks.insert(
            0,
            CheckJson {
                name: "serving",
                ok: serving,
                detail: if serving {
                    "the view serves".into()
                } else if self.stopping.load(Ordering::Relaxed) {
                    "the view is shutting down".into()
                } else {
                    "the view is not mounted yet".into()
                },
                age_seconds: 0.0,
            },
        );
        let ok = checks.iter().all(|c| c.ok);
        (ok, health_json(ok, checks))
    }

    /// Is everything healthy right now (for systemd's watchdog)?
    pub fn healthy(&self) -> bool {
        self.healthz().0
    }

    /// `/metrics`: the migration's gauges, then the process-wide series.
    pub fn metrics(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let _ = writeln!(
            out,
            "# HELP ferryfs_info The daemon's version.\n# TYPE ferryfs_info gauge\n\
             ferryfs_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        gauge(
            &mut out,
            "ferryfs_ready",
            "1 while the view serves and every health check passes.",
            u64::from(self.readyz().0),
        );
        let phase = self.journal.phase().ok();
        let _ = writeln!(
            out,
            "# HELP ferryfs_phase The migration's phase (1 for the current one).\n# TYPE ferryfs_phase gauge"
        );
        for p in Phase::ALL {
            let _ = writeln!(
                out,
                "ferryfs_phase{{phase=\"{p}\"}} {}",
                u64::from(phase == Some(p))
            );
        }
        let done = self.copier.view().done();
        let totals = self.journal.totals().unwrap_or_default();
        for (what, d, t) in [
            ("files", done.files, totals.files),
            ("dirs", done.dirs, totals.dirs),
            ("bytes", done.bytes, totals.bytes),
        ] {
            gauge(
                &mut out,
                &format!("ferryfs_copied_{what}"),
                &format!("OLD's {what} that are in NEW (copied, or made in NEW through the view)."),
                d,
            );
            gauge(
                &mut out,
                &format!("ferryfs_total_{what}"),
                &format!("OLD's {what} to migrate (scanned at prepare)."),
                t.max(d),
            );
            gauge(
                &mut out,
                &format!("ferryfs_pending_{what}"),
                &format!("OLD's {what} not yet in NEW."),
                t.saturating_sub(d),
            );
        }
        let errors = self.journal.errors().map(|e| e.len()).unwrap_or(0);
        gauge(
            &mut out,
            "ferryfs_copy_errors",
            "Entries whose last copy attempt failed (listed with path and errno by status).",
            errors as u64,
        );
        let stale = self.journal.stales().map(|s| s.len()).unwrap_or(0);
        gauge(
            &mut out,
            "ferryfs_changed_in_old",
            "Entries found changed in OLD behind the view after they were copied.",
            stale as u64,
        );
        let cp = self.copier.view().chunk_progress();
        gauge(
            &mut out,
            "ferryfs_partial_files",
            "Files a write through the view copied only in part (copy-before-write by chunk).",
            cp.files,
        );
        gauge(
            &mut out,
            "ferryfs_partial_chunks_present",
            "Chunks NEW holds of the partly copied files the daemon has open or looked up.",
            cp.present,
        );
        gauge(
            &mut out,
            "ferryfs_partial_chunks_total",
            "Chunks of OLD's data of those files.",
            cp.total,
        );
        if let Some(p) = self.copier.publisher() {
            gauge(
                &mut out,
                "ferryfs_staged_bytes",
                "Bytes an S3 NEW's staging tree held at the last publish pass.",
                p.last().staged_bytes,
            );
            gauge(
                &mut out,
                "ferryfs_uploads_in_flight",
                "Files and objects the publisher is uploading or copying into the NEW bucket now.",
                p.in_flight(),
            );
            gauge(
                &mut out,
                "ferryfs_evicted_files",
                "An S3 NEW's files evicted from the staging tree (read from the bucket).",
                self.copier.view().evicted_files(),
            );
            let _ = writeln!(
                out,
                "# HELP ferryfs_evictions_total Files whose bytes the publisher removed from the \
                 staging tree after their upload.\n# TYPE ferryfs_evictions_total counter\n\
                 ferryfs_evictions_total {}",
                p.evictions()
            );
            let stage = self.copier.view().stage_use();
            gauge(
                &mut out,
                "ferryfs_stage_max_bytes",
                "The bound on an S3 NEW's staging tree (mount --stage-max).",
                stage.limit,
            );
            gauge(
                &mut out,
                "ferryfs_stage_writes_waiting",
                "Writes through the view waiting for the staging tree to drain below its bound.",
                stage.waiting,
            );
            let _ = writeln!(
                out,
                "# HELP ferryfs_stage_waits_total Writes through the view that waited for \
                 staging room (back-pressure).\n# TYPE ferryfs_stage_waits_total counter\n\
                 ferryfs_stage_waits_total {}",
                stage.waits
            );
        }
        let cs = self.copier.state();
        gauge(
            &mut out,
            "ferryfs_copier_running",
            "1 while the copier runs a pass.",
            u64::from(cs.running),
        );
        gauge(
            &mut out,
            "ferryfs_copier_paused",
            "1 while the copier is paused.",
            u64::from(cs.paused),
        );
        gauge(
            &mut out,
            "ferryfs_copier_bwlimit_bytes_per_second",
            "The copier's bandwidth limit (0: none).",
            cs.bwlimit,
        );
        if let Some(c) = self.copier.remote() {
            c.render_metrics(&mut out);
        }
        gauge(
            &mut out,
            "ferryfs_inodes",
            "Inodes the daemon keeps for the kernel (those it looked up and has not forgotten).",
            self.copier.view().inode_count() as u64,
        );
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut out,
                "ferryfs_resident_memory_bytes",
                "The daemon's resident memory.",
                rss,
            );
        }
        METRICS.render(&mut out);
        out
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn health_json(ok: bool, checks: Vec<CheckJson>) -> HealthJson {
    HealthJson {
        status: if ok { "ok" } else { "fail" },
        checks,
    }
}

fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Bind `addr` now (so `mount` fails with the reason when the address is taken) and serve the
/// endpoints from a background thread.
pub fn serve(addr: SocketAddr, observed: Arc<Observed>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    continue; // dropped: closed at once
                }
                let (o, active) = (observed.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &o) {
                            tracing::debug!(error = %e, "metrics connection");
                        }
                        active.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a thread for a metrics connection");
                }
            }
        })?;
    Ok(bound)
}

/// One request per connection (`Connection: close`): GET or HEAD of a known path.
fn answer(conn: TcpStream, o: &Observed) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(16 << 10);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers (bounded by `take`): a client may wait until they are read.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            o.metrics(),
        ),
        ("GET" | "HEAD", "/healthz" | "/readyz") => {
            let (ok, report) = if path == "/healthz" {
                o.healthz()
            } else {
                o.readyz()
            };
            let mut body = serde_json::to_string_pretty(&report).expect("health serializes");
            body.push('\n');
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "application/json",
                body,
            )
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut out = conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}
