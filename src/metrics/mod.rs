//! Process-wide counters and latency histograms, rendered as Prometheus text by `observe`.
//!
//! Everything here is a plain atomic in one static, so the hot paths (every FUSE request, every
//! journal write) pay a clock read and a few relaxed adds, never a lock or an allocation. Gauges
//! that describe the migration (copied, pending, errors) are not kept here: `observe` reads
//! them from the copier and the journal when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in nanoseconds (10 µs to 10 s; the last bucket, +Inf,
/// is implicit). FUSE requests served from the page cache of a store take tens of µs; a durable
/// journal write about a millisecond; anything in seconds is a store that hangs.
const BOUNDS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// A latency histogram: per-bucket counts (not cumulative; `render` sums them), a count and a
/// sum, as Prometheus's histogram type wants them.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_NS.len() + 1],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// `name_bucket{labels,le=..}`, `name_sum`, `name_count` lines. `labels` is either empty or
    /// `key="value"` pairs joined by commas.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = match BOUNDS_NS.get(i) {
                Some(ns) => format!("{}", *ns as f64 / 1e9),
                None => "+Inf".into(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(labels),
            self.sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count());
    }
}

/// Declares [`Op`] and its label names from one list, so the two cannot drift apart.
macro_rules! fuse_ops {
    ($($op:ident => $name:literal),+ $(,)?) => {
        /// The FUSE operations the view serves; the label of `ferryfs_fuse_*` series.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Op {
            $($op),+
        }

        const OP_NAMES: &[&str] = &[$($name),+];
    };
}

fuse_ops! {
    Lookup => "lookup",
    Forget => "forget",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Create => "create",
    Fallocate => "fallocate",
    Lseek => "lseek",
    Ioctl => "ioctl",
}

impl Op {
    pub fn name(self) -> &'static str {
        OP_NAMES[self as usize]
    }
}

struct OpStats {
    latency: Histogram,
    errors: AtomicU64,
}

/// Where an open file's data path goes.
#[derive(Debug, Clone, Copy)]
pub enum OpenPath {
    /// The kernel reads and writes NEW's file itself.
    PassthroughNew,
    /// The kernel reads OLD's file itself (`--passthrough all`).
    PassthroughOld,
    /// Every read and write is a request to the daemon.
    Daemon,
}

pub struct Metrics {
    fuse: [OpStats; OP_NAMES.len()],
    /// Read requests the daemon served from OLD's file, and their bytes.
    fallthrough_reads: AtomicU64,
    fallthrough_bytes: AtomicU64,
    /// Copy-ups (first change through the view to an OLD-only entry), and how many of them
    /// copied no data (O_TRUNC, directories, metadata of special files).
    copy_ups: AtomicU64,
    /// The copier's copies sent straight into an S3 NEW's bucket: by this host, and by the
    /// server (copies of an S3 OLD's objects on the same service), each with its bytes.
    bucket_sent: AtomicU64,
    bucket_sent_bytes: AtomicU64,
    bucket_server_copied: AtomicU64,
    bucket_server_copied_bytes: AtomicU64,
    partial_published: AtomicU64,
    partial_published_sent: AtomicU64,
    partial_published_copied: AtomicU64,
    meta_changes: AtomicU64,
    /// Opens by data path: passthrough to NEW, passthrough to OLD, through the daemon.
    opens: [AtomicU64; 3],
    /// Journal batches written, by durability: [not synced, synced].
    journal_writes: [Histogram; 2],
    /// The copier's rate over its last ten seconds (sampled every second).
    copy_rate: AtomicU64,
    /// Entries of the view an abort has written back into OLD so far (its progress line).
    abort_written: AtomicU64,
    /// The FUSE transport the mount is served over: 0 not mounted, 1 /dev/fuse, 2 io_uring.
    fuse_transport: AtomicU64,
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            fuse: [const {
                OpStats {
                    latency: Histogram::new(),
                    errors: AtomicU64::new(0),
                }
            }; OP_NAMES.len()],
            fallthrough_reads: AtomicU64::new(0),
            fallthrough_bytes: AtomicU64::new(0),
            copy_ups: AtomicU64::new(0),
            bucket_sent: AtomicU64::new(0),
            bucket_sent_bytes: AtomicU64::new(0),
            bucket_server_copied: AtomicU64::new(0),
            bucket_server_copied_bytes: AtomicU64::new(0),
            partial_published: AtomicU64::new(0),
            partial_published_sent: AtomicU64::new(0),
            partial_published_copied: AtomicU64::new(0),
            meta_changes: AtomicU64::new(0),
            opens: [const { AtomicU64::new(0) }; 3],
            journal_writes: [const { Histogram::new() }; 2],
            copy_rate: AtomicU64::new(0),
            abort_written: AtomicU64::new(0),
            fuse_transport: AtomicU64::new(0),
        }
    }

    pub fn fuse_done(&self, op: Op, took: Duration) {
        self.fuse[op as usize].latency.observe(took);
    }

    pub fn fuse_error(&self, op: Op) {
        self.fuse[op as usize].errors.fetch_add(1, Relaxed);
    }

    pub fn fuse_requests(&self, op: Op) -> u64 {
        self.fuse[op as usize].latency.count()
    }

    pub fn fallthrough_read(&self, bytes: usize) {
        self.fallthrough_reads.fetch_add(1, Relaxed);
        self.fallthrough_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn copy_up(&self) {
        self.copy_ups.fetch_add(1, Relaxed);
    }

    /// A copy of `bytes` sent straight into an S3 NEW's bucket; `by_server`: copied there by
    /// the server from an S3 OLD's bucket (no byte through this host).
    pub fn bucket_copy(&self, bytes: u64, by_server: bool) {
        let (n, b) = if by_server {
            (&self.bucket_server_copied, &self.bucket_server_copied_bytes)
        } else {
            (&self.bucket_sent, &self.bucket_sent_bytes)
        };
        n.fetch_add(1, Relaxed);
        b.fetch_add(bytes, Relaxed);
    }

    /// A file partly copied from OLD published into an S3 NEW's bucket: `sent` bytes sent
    /// by this host, `copied` copied by the server from an S3 OLD's object.
    pub fn partial_published(&self, sent: u64, copied: u64) {
        self.partial_published.fetch_add(1, Relaxed);
        self.partial_published_sent.fetch_add(sent, Relaxed);
        self.partial_published_copied.fetch_add(copied, Relaxed);
    }

    /// (copies sent, copies made by the server) into an S3 NEW's bucket so far.
    pub fn bucket_copies(&self) -> (u64, u64) {
        (
            self.bucket_sent.load(Relaxed),
            self.bucket_server_copied.load(Relaxed),
        )
    }

    /// A metadata change of an OLD-only file recorded without copying its data.
    pub fn meta_change(&self) {
        self.meta_changes.fetch_add(1, Relaxed);
    }

    pub fn opened(&self, path: OpenPath) {
        self.opens[path as usize].fetch_add(1, Relaxed);
    }

    pub fn journal_write(&self, durable: bool, took: Duration) {
        self.journal_writes[usize::from(durable)].observe(took);
    }

    /// The mount is served over io_uring (`true`) or /dev/fuse.
    pub fn set_fuse_transport(&self, io_uring: bool) {
        self.fuse_transport
            .store(if io_uring { 2 } else { 1 }, Relaxed);
    }

    pub fn set_copy_rate(&self, bytes_per_sec: u64) {
        self.copy_rate.store(bytes_per_sec, Relaxed);
    }

    /// An abort wrote one more entry of the view back into OLD.
    pub fn abort_wrote(&self) {
        self.abort_written.fetch_add(1, Relaxed);
    }

    pub fn abort_written(&self) -> u64 {
        self.abort_written.load(Relaxed)
    }

    /// The process-wide series, in Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let per_op = |out: &mut String, name: &str, help: &str, v: &dyn Fn(&OpStats) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (i, s) in self.fuse.iter().enumerate() {
                let _ = writeln!(out, "{name}{{op=\"{}\"}} {}", OP_NAMES[i], v(s));
            }
        };
        per_op(
            out,
            "ferryfs_fuse_requests_total",
            "FUSE requests served, by operation.",
            &|s| s.latency.count(),
        );
        per_op(
            out,
            "ferryfs_fuse_errors_total",
            "FUSE requests answered with an errno, by operation.",
            &|s| s.errors.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP ferryfs_fuse_request_duration_seconds Time the daemon took to serve a FUSE request, by operation.\n\
             # TYPE ferryfs_fuse_request_duration_seconds histogram"
        );
        for (i, s) in self.fuse.iter().enumerate() {
            // Operations never requested are left out: 30 x 19 empty lines say nothing.
            if s.latency.count() > 0 {
                let labels = format!("op=\"{}\"", OP_NAMES[i]);
                s.latency
                    .render(out, "ferryfs_fuse_request_duration_seconds", &labels);
            }
        }
        counter(
            out,
            "ferryfs_fallthrough_reads_total",
            "Read requests the daemon served from OLD (data not yet in NEW).",
            self.fallthrough_reads.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_fallthrough_read_bytes_total",
            "Bytes the daemon read from OLD for applications.",
            self.fallthrough_bytes.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_bucket_sent_total",
            "The copier's copies sent straight into an S3 NEW's bucket by this host.",
            self.bucket_sent.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_bucket_sent_bytes_total",
            "Bytes of those copies.",
            self.bucket_sent_bytes.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_bucket_server_copied_total",
            "The copier's copies made in an S3 NEW's bucket by the server (from an S3 OLD on the same service).",
            self.bucket_server_copied.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_bucket_server_copied_bytes_total",
            "Bytes of those copies.",
            self.bucket_server_copied_bytes.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_partial_published_total",
            "Files partly copied from OLD (copy-before-write) published into an S3 NEW's bucket without being filled in first.",
            self.partial_published.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_partial_published_sent_bytes_total",
            "Bytes of those uploads sent by this host (written chunks, and OLD's chunks read through it).",
            self.partial_published_sent.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_partial_published_server_copied_bytes_total",
            "Bytes of those uploads copied by the server from an S3 OLD's object on the same service.",
            self.partial_published_copied.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_copy_ups_total",
            "Entries copied up to NEW by their first change through the view.",
            self.copy_ups.load(Relaxed),
        );
        counter(
            out,
            "ferryfs_meta_changes_total",
            "Metadata changes (chmod, chown, utimens, xattrs) of OLD-only files recorded \
             without copying their data.",
            self.meta_changes.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP ferryfs_opens_total Files opened through the view, by data path \
             (passthrough_new, passthrough_old: the kernel reads the store's file; daemon: every read is a request).\n\
             # TYPE ferryfs_opens_total counter"
        );
        for (i, path) in ["passthrough_new", "passthrough_old", "daemon"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "ferryfs_opens_total{{path=\"{path}\"}} {}",
                self.opens[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferryfs_journal_write_duration_seconds Time to write one journal batch (sync: fsync'ed before return).\n\
             # TYPE ferryfs_journal_write_duration_seconds histogram"
        );
        for (i, sync) in ["false", "true"].iter().enumerate() {
            self.journal_writes[i].render(
                out,
                "ferryfs_journal_write_duration_seconds",
                &format!("sync=\"{sync}\""),
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferryfs_copy_rate_bytes_per_second The copier's rate over the last ten seconds.\n\
             # TYPE ferryfs_copy_rate_bytes_per_second gauge\n\
             ferryfs_copy_rate_bytes_per_second {}",
            self.copy_rate.load(Relaxed)
        );
        let transport = self.fuse_transport.load(Relaxed);
        if transport != 0 {
            let _ = writeln!(
                out,
                "# HELP ferryfs_fuse_transport How the kernel hands FUSE requests to the daemon: 1 \
                 on the transport in use (io_uring, or dev: read/writev on /dev/fuse).\n\
                 # TYPE ferryfs_fuse_transport gauge\n\
                 ferryfs_fuse_transport{{transport=\"io_uring\"}} {}\n\
                 ferryfs_fuse_transport{{transport=\"dev\"}} {}",
                u8::from(transport == 2),
                u8::from(transport == 1)
            );
        }
    }
}

/// Times one FUSE request: made by the adapter when the request arrives, recorded when dropped
/// (after the reply was sent).
pub struct Timer {
    op: Op,
    start: Instant,
}

impl Timer {
    pub fn start(op: Op) -> Timer {
        Timer {
            op,
            start: Instant::now(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        METRICS.fuse_done(self.op, self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_follow_the_enum() {
        assert_eq!(Op::Lookup.name(), "lookup");
        assert_eq!(Op::Lseek.name(), "lseek");
        assert_eq!(Op::Removexattr as usize, 27);
        assert_eq!(OP_NAMES[Op::Create as usize], "create");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(5)); // first bucket
        h.observe(Duration::from_micros(10)); // exactly on the first bound: still the first
        h.observe(Duration::from_millis(3)); // le=0.005
        h.observe(Duration::from_secs(60)); // +Inf only
        let mut s = String::new();
        h.render(&mut s, "x", "op=\"read\"");
        assert!(
            s.contains("x_bucket{op=\"read\",le=\"0.00001\"} 2\n"),
            "{s}"
        );
        assert!(s.contains("x_bucket{op=\"read\",le=\"0.0025\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{op=\"read\",le=\"0.005\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{op=\"read\",le=\"10\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{op=\"read\",le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count{op=\"read\"} 4\n"), "{s}");
        assert!(s.contains("x_sum{op=\"read\"} 60.003015\n"), "{s}");
    }
}
