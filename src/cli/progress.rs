//! What the commands show while they work: one progress reporter (a line every second,
//! redrawn in place on a terminal, plain lines otherwise), the progress line of a migration,
//! and `status`'s report.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::state::{Progress, Status};

/// A line of progress every second until dropped: redrawn in place on a terminal, and off a
/// terminal printed every `plain_every` seconds. `line` runs every second either way (it may
/// have work of its own, such as sampling a rate), and returns the line, or `None` to skip.
pub struct Reporter {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    pub fn start(
        plain_every: u64,
        mut line: impl FnMut() -> Option<String> + Send + 'static,
    ) -> Reporter {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            let tty = std::io::stdout().is_terminal();
            let mut shown = false;
            let mut ticks = 0u64;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1))
            {
                ticks += 1;
                let Some(l) = line() else { continue };
                if tty {
                    draw(&l, true);
                    shown = true;
                } else if ticks % plain_every.max(1) == 0 {
                    draw(&l, false);
                }
            }
            if shown {
                println!();
            }
        });
        Reporter {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Progress of a check (verify, commit's final pass) or of an abort while it runs: a line
    /// when it starts, then a bar from the entries counted so far (`counted`: the mounted
    /// daemon's count, or this process's). `words`: what the first line says it does and to
    /// what, and what each entry counted is.
    pub fn counting(
        what: &'static str,
        words: (&'static str, &'static str, &'static str),
        state: &Path,
        counted: impl Fn() -> Option<u64> + Send + 'static,
    ) -> Reporter {
        let (doing, to, done) = words;
        // Entries the view is expected to hold: OLD's scanned totals (an estimate once the
        // view has changed things).
        let total = crate::state::scanned_totals(state)
            .map(|t| t.files + t.dirs)
            .unwrap_or(0);
        println!("{what}: {doing} about {total} entries {to}");
        let tty = std::io::stdout().is_terminal();
        Reporter::start(1, move || {
            let n = counted()?;
            let pct = if total > 0 {
                (n as f64 * 100.0 / total as f64).min(100.0)
            } else {
                0.0
            };
            Some(if tty {
                format!(
                    "{} {pct:>5.1}%  {what}: {n} of about {total} entries {done}",
                    bar(pct)
                )
            } else {
                format!("{what}: {n} of about {total} entries {done} ({pct:.1}%)")
            })
        })
    }

    /// A check's progress, in its usual words.
    pub fn checking(
        what: &'static str,
        state: &Path,
        checked: impl Fn() -> Option<u64> + Send + 'static,
    ) -> Reporter {
        Reporter::counting(what, ("checking", "against OLD", "checked"), state, checked)
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Show `line`: redrawn in place when `redraw` and stdout is a terminal, else as a line.
pub fn draw(line: &str, redraw: bool) {
    let mut out = std::io::stdout();
    if redraw && out.is_terminal() {
        let _ = write!(out, "\r\x1b[K{line}");
        let _ = out.flush();
    } else {
        let _ = writeln!(out, "{line}");
    }
}

fn bar(pct: f64) -> String {
    const W: usize = 24;
    let filled = ((pct / 100.0) * W as f64) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled.min(W)),
        "-".repeat(W - filled.min(W))
    )
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn pct(p: &Progress) -> f64 {
    if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    }
}

/// A migration's progress in one line.
pub fn progress_line(s: &Status) -> String {
    let eta = match s.eta_seconds {
        Some(e) => format!("{}m{:02}s", e / 60, e % 60),
        None => "?".into(),
    };
    format!(
        "{} {:>5.1}%  {}  dirs {}/{}  files {}/{}  bytes {}/{}  {}/s  eta {}  errors {}",
        bar(pct(&s.bytes)),
        pct(&s.bytes),
        s.phase,
        s.dirs.done,
        s.dirs.total,
        s.files.done,
        s.files.total,
        human(s.bytes.done),
        human(s.bytes.total),
        human(s.rate_bytes_per_sec),
        eta,
        s.errors.len()
    )
}

/// `status`'s report for people.
pub fn print_status(s: &Status) {
    println!(
        "phase:      {}{}",
        s.phase,
        if s.mounted { " (view mounted)" } else { "" }
    );
    if let Some(t) = &s.transport {
        match t.transport {
            crate::state::status::TransportKind::IoUring => println!(
                "transport:  io_uring ({} queues, {} KiB per entry)",
                t.queues,
                t.payload_bytes >> 10
            ),
            crate::state::status::TransportKind::Dev => println!("transport:  dev (/dev/fuse)"),
        }
    }
    println!("OLD:        {}", s.old);
    println!("NEW:        {}", s.new);
    println!("dirs:       {} of {} copied", s.dirs.done, s.dirs.total);
    println!("files:      {} of {} copied", s.files.done, s.files.total);
    println!(
        "bytes:      {} of {} copied ({:.1}%)",
        human(s.bytes.done),
        human(s.bytes.total),
        pct(&s.bytes)
    );
    println!(
        "rate:       {}/s, eta {}",
        human(s.rate_bytes_per_sec),
        s.eta_seconds.map_or("unknown".into(), |e| format!("{e} s"))
    );
    println!(
        "bwlimit:    {}{}",
        match s.bwlimit.in_force {
            0 => "none".to_string(),
            r => format!("{}/s", human(r)),
        },
        s.bwlimit
            .timetable
            .as_ref()
            .map_or(String::new(), |t| format!(" (timetable \"{t}\")"))
    );
    println!(
        "local:      {} entries in NEW born or changed through the view",
        s.local
    );
    if s.metadata_only > 0 {
        println!(
            "metadata:   {} files in OLD with metadata changed through the view (no data copied yet)",
            s.metadata_only
        );
    }
    if s.partial.files > 0 {
        println!(
            "partial:    {} files partly copied by writes through the view ({} of {} chunks of \
             {} in NEW; the copier fills in the rest)",
            s.partial.files,
            s.partial.chunks_present,
            s.partial.chunks_total,
            human(s.partial.chunk_size)
        );
    }
    println!("tombstones: {}", s.tombstones);
    println!("redirects:  {}", s.redirects);
    if !s.filter.is_empty() {
        println!("filter:     {}", s.filter.join(", "));
        println!(
            "excluded:   {} dirs, {} files, {} left out by the filter (shown from OLD until commit)",
            s.excluded.dirs,
            s.excluded.files,
            human(s.excluded.bytes)
        );
    }
    for (store, list) in [("OLD", &s.capabilities.old), ("NEW", &s.capabilities.new)] {
        for c in list.iter().filter(|c| !c.ok && !c.fallback.is_empty()) {
            println!("fallback:   {store} lacks {}: {}", c.name, c.fallback);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for w in &s.workers {
        println!(
            "worker:     {} copied {} files, {} in {} leases ({}/s), {} refused, last seen {}s ago",
            w.id,
            w.files,
            human(w.bytes),
            w.batches,
            human(w.rate),
            w.refused,
            now.saturating_sub(w.last_seen)
        );
    }
    if let Some(p) = &s.published {
        println!(
            "bucket:     {} objects uploaded into NEW, {} uploads under way",
            p.objects, p.pending
        );
        let bound = if p.stage_max > 0 {
            format!(" (bound {}, mount --stage-max)", human(p.stage_max))
        } else {
            String::new()
        };
        println!(
            "staging:    {} held in the state dir{bound}, {} files evicted (read from the bucket)",
            human(p.staged_bytes),
            p.evicted
        );
    }
    println!(
        "changed in OLD since copied: {} ({} copied again)",
        s.changed_in_old.len(),
        s.changed_in_old.iter().filter(|c| c.copied_again).count()
    );
    for c in &s.changed_in_old {
        let again = if c.copied_again {
            ""
        } else {
            " (to be copied again)"
        };
        println!("  {}{again}", c.path);
    }
    println!("errors:     {}", s.errors.len());
    for e in &s.errors {
        println!(
            "  {}: {} (errno {}, {} attempts)",
            e.path, e.error, e.errno, e.attempts
        );
    }
}
