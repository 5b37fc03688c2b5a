//! The bound on an S3 NEW's staging tree (`mount --stage-max`): back-pressure on writes.
//!
//! What the staging tree holds is measured by every publish pass (the blocks of the files it
//! walked, less what it evicted) and counted between passes from the writes through the view
//! (every byte written counts, an overwrite too: an estimate that errs high, put right by the
//! next pass). A write that would take the staging tree over the bound waits, without any
//! lock of the view held, until the publisher has uploaded and evicted enough: files closed
//! and uploaded leave the staging tree, and so does a file still open and being written
//! (uploaded as it is, then evicted like a closed one: its writer goes on into chunks staged
//! again). Only a single write larger than the whole bound fails (ENOSPC, with a log line
//! naming the flag): no amount of draining makes room for it.
//!
//! While the publisher cannot drain (paused by an operator, held by a takeover, stopping),
//! writes are not held: the bound is exceeded rather than the view wedged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::View;
use crate::view::error::{Error, Result};

/// How long a waiting write sleeps before it looks again (it is woken sooner by a pass that
/// freed room).
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// How often a write that keeps waiting says so in the log.
const WAIT_WARN_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(crate) struct StageRoom {
    /// The bound in bytes; 0: none (a POSIX NEW).
    limit: AtomicU64,
    /// Bytes the last publish pass measured, less what was evicted since.
    measured: AtomicU64,
    /// Bytes written through the view since that measure began.
    since: AtomicU64,
    /// Writes waiting for room now.
    waiting: AtomicU64,
    /// Writes that had to wait, ever.
    waits: AtomicU64,
    /// The publisher runs passes (not paused, held or stopping).
    draining: AtomicBool,
    /// Inodes whose open files the kernel passes through to NEW's file (handed over by a
    /// daemon that did so): not evicted while open.
    direct: Mutex<std::collections::HashSet<u64>>,
    lock: Mutex<()>,
    freed: Condvar,
}

/// What the staging bound stands at, for status and /metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageUse {
    pub limit: u64,
    /// Estimated bytes staged now.
    pub used: u64,
    pub waiting: u64,
    pub waits: u64,
}

impl StageRoom {
    fn used(&self) -> u64 {
        self.measured
            .load(Ordering::Acquire)
            .saturating_add(self.since.load(Ordering::Acquire))
    }
}

impl View {
    /// Bound an S3 NEW's staging tree at `limit` bytes (0: no bound).
    pub fn set_stage_max(&self, limit: u64) {
        self.stage.limit.store(limit, Ordering::Release);
        self.stage.freed.notify_all();
    }

    /// The kernel passes inode `ino`'s open files through to NEW's file (a takeover from a
    /// daemon that did so): while it is open, it is not evicted.
    pub fn passes_through(&self, ino: u64) {
        self.stage
            .direct
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino);
    }

    /// Whether a file open through the view may be evicted now: the staging tree is near its
    /// bound, and the kernel does not pass its open files through.
    pub(crate) fn evict_open(&self, ino: u64) -> bool {
        self.stage_bounded()
            && self.stage_pressed()
            && !self
                .stage
                .direct
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ino)
    }

    /// A change of `inode`'s NEW file's data just ended (under its data lock): marked for an
    /// eviction to see (an S3 NEW's only; no shared counter touched per write otherwise).
    pub(crate) fn wrote(&self, inode: &super::inode::Inode) {
        if self.stage_bounded() {
            inode.wrote();
        }
    }

    /// Whether NEW's staging tree has a bound (an S3 NEW).
    pub(crate) fn stage_bounded(&self) -> bool {
        self.stage.limit.load(Ordering::Acquire) > 0
    }

    /// Whether the publisher drains the staging tree now (writes over the bound wait only
    /// then).
    pub fn set_stage_draining(&self, on: bool) {
        self.stage.draining.store(on, Ordering::Release);
        if !on {
            self.stage.freed.notify_all();
        }
    }

    /// Room for a write of `len` bytes into the staging tree: at once when it fits under the
    /// bound, else once the publisher has made room. Called with no lock of the view held.
    pub(crate) fn stage_room(&self, len: u64) -> Result<()> {
        let s = &self.stage;
        let limit = s.limit.load(Ordering::Acquire);
        if limit == 0 {
            return Ok(());
        }
        if len > limit {
            tracing::error!(
                len,
                stage_max = limit,
                "a write larger than the staging bound (mount --stage-max) fails with ENOSPC: \
                 no upload can make room for it; mount with a larger --stage-max"
            );
            return Err(Error::refused(
                libc::ENOSPC,
                "a write larger than the staging bound (mount --stage-max)",
            ));
        }
        let mut since_warned: Option<Instant> = None;
        let began = Instant::now();
        let mut counted = false;
        loop {
            if s.used().saturating_add(len) <= limit || !s.draining.load(Ordering::Acquire) {
                s.since.fetch_add(len, Ordering::AcqRel);
                if counted {
                    s.waiting.fetch_sub(1, Ordering::AcqRel);
                }
                return Ok(());
            }
            if !counted {
                counted = true;
                s.waiting.fetch_add(1, Ordering::AcqRel);
                s.waits.fetch_add(1, Ordering::Relaxed);
            }
            // (The publisher's loop passes on every change it sees.)
            self.note_edit();
            let g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.freed.wait_timeout(g, WAIT_SLICE);
            if since_warned.map_or(began.elapsed(), |t| t.elapsed()) >= WAIT_WARN_EVERY {
                since_warned = Some(Instant::now());
                tracing::warn!(
                    staged = s.used(),
                    stage_max = limit,
                    waited_s = began.elapsed().as_secs(),
                    "writes wait for the staging tree to drain into the NEW bucket \
                     (mount --stage-max): uploads are not keeping up or are failing (see status)"
                );
            }
        }
    }

    /// A publish pass measured `staged` bytes in the staging tree from its walk on, which
    /// began when [`Self::stage_mark`] gave `mark`.
    pub fn stage_measured(&self, staged: u64, mark: u64) {
        let s = &self.stage;
        s.measured.store(staged, Ordering::Release);
        let _ = s
            .since
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(mark))
            });
        s.freed.notify_all();
    }

    /// The count of bytes written since the last measure, for a pass about to measure.
    pub fn stage_mark(&self) -> u64 {
        self.stage.since.load(Ordering::Acquire)
    }

    /// `n` staged bytes left the staging tree (an eviction).
    pub fn stage_freed(&self, n: u64) {
        let s = &self.stage;
        let _ = s
            .measured
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        s.freed.notify_all();
    }

    /// The staging tree is near its bound, or writes wait: the publisher then evicts files
    /// still open too.
    pub fn stage_pressed(&self) -> bool {
        let s = &self.stage;
        let limit = s.limit.load(Ordering::Acquire);
        limit > 0 && (s.waiting.load(Ordering::Acquire) > 0 || s.used() >= limit / 10 * 9)
    }

    /// Writes wait for room now.
    pub fn stage_waiting(&self) -> bool {
        self.stage.waiting.load(Ordering::Acquire) > 0
    }

    pub fn stage_use(&self) -> StageUse {
        let s = &self.stage;
        StageUse {
            limit: s.limit.load(Ordering::Acquire),
            used: s.used(),
            waiting: s.waiting.load(Ordering::Acquire),
            waits: s.waits.load(Ordering::Relaxed),
        }
    }
}

/// `--stage-max`'s default: half of what the state dir's file system has free for the
/// staging tree (free now, plus what the staging tree holds already). The other half is
/// headroom: for the journal, which grows with the dataset, for the writes in flight past the
/// bound, and for the other users of that file system.
pub fn default_stage_max(free: u64, staged: u64) -> u64 {
    (free.saturating_add(staged) / 2).max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_bound_is_half_of_the_room_and_never_nothing() {
        assert_eq!(default_stage_max(100 << 20, 20 << 20), 60 << 20);
        assert_eq!(default_stage_max(0, 0), 1 << 20);
    }
}
