//! The serving daemon's background threads besides the copier's own: the S3 publisher's
//! loop, the copy-rate sampler, and systemd's status and watchdog.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sdnotify::Notifier;
use crate::copier::Copier;
use crate::copier::publish::Publisher;
use crate::journal::Records;
use crate::observe::Observed;

/// systemd's one-line status: where the view serves and how far the copy is.
pub fn service_status(copier: &Copier, mp: &Path) -> String {
    let d = copier.view().done();
    let t = copier.journal().totals().unwrap_or_default();
    let phase = copier
        .journal()
        .phase()
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
pub fn spawn_notify_loop(
    notifier: Arc<Notifier>,
    observed: Arc<Observed>,
    copier: Arc<Copier>,
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
/// last pass at unmount. No pass while the copier is paused (by an operator, or by a
/// takeover: the next daemon publishes) or halted (abort).
pub fn spawn_publish_loop(
    p: Arc<Publisher>,
    copier: Arc<Copier>,
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
                // Writes over the staging bound wait only while passes can make room.
                copier
                    .view()
                    .set_stage_draining(!idle && !stopping && !p.held());
                let rested = Instant::now() >= rest_until;
                if !idle && ((rested && (seen != Some(g) || retry)) || stopping) {
                    seen = Some(g);
                    retry_at = None;
                    let r = p.pass();
                    if let Ok(r) = &r {
                        rest_until = Instant::now() + r.walk * 3;
                    }
                    // Files uploaded but too recently changed to evict: a pass once they
                    // are a second old (they would wait for the next change else).
                    let evict_later = r.as_ref().is_ok_and(|r| r.evict_later > 0);
                    match r {
                        // Cut short (a takeover that was then cancelled): run it again.
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
                    if evict_later {
                        let soon = Instant::now() + Duration::from_millis(1100);
                        retry_at = Some(retry_at.map_or(soon, |t| t.min(soon)));
                    }
                }
                if stopping {
                    return;
                }
                // (Sooner while writes wait for room.)
                let nap = if copier.view().stage_waiting() {
                    20
                } else {
                    500
                };
                std::thread::sleep(Duration::from_millis(nap));
            }
        })
        .map_err(|e| e.to_string())
}

/// Every second while the copier runs: the copy rate over the last ten seconds, into the
/// journal for `status` (a reader in another process).
pub fn spawn_rate_sampler(
    copier: Arc<Copier>,
    journal: Records,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("rate".into())
        .spawn(move || {
            let mut rate = crate::copier::RateMeter::default();
            while !copier.stopping() {
                std::thread::sleep(Duration::from_secs(1));
                let bps = rate.sample(copier.view().done().bytes);
                crate::metrics::METRICS.set_copy_rate(bps);
                if let Err(e) = journal.record_rate(bps) {
                    tracing::warn!(error = %e, "recording the copy rate");
                }
            }
        })
        .map_err(|e| e.to_string())
}
