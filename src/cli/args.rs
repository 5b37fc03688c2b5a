//! The command line's words: every subcommand and flag, with its help text (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::CliError;
use crate::copier;

#[derive(Parser)]
#[command(
    name = "ferryfs",
    version,
    about = "Move a live dataset from an OLD store to a NEW store with no downtime"
)]
pub struct Cli {
    /// Log line format on stderr (and in STATE/ferryfs.log for a background mount): `text`
    /// for people, `json` (one object per line) for log collectors. The level filter is
    /// FERRYFS_LOG (tracing's env-filter syntax, e.g. `info,crate::copier=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Check both stores, record them, and create the migration's journal in the state dir.
    Prepare(PrepareArgs),
    /// Serve the view at MOUNTPOINT (which may be OLD's own path). Returns once it serves.
    Mount {
        #[arg(long)]
        state: PathBuf,
        mountpoint: PathBuf,
        /// Stay attached (for systemd and containers) instead of serving in the background.
        #[arg(long)]
        foreground: bool,
        /// Do not start the background copier; `ferryfs execute` starts it later.
        #[arg(long)]
        no_copy: bool,
        /// Which open files the kernel reads and writes directly, at native speed (FUSE
        /// passthrough): `new` (files whose data is in NEW), `all` (also read-only opens of
        /// OLD-only files; a write to such a file then waits for those readers, up to 2 s,
        /// else EBUSY), `off` (all data through the daemon).
        #[arg(long, value_enum, default_value_t = crate::fuse::PassthroughMode::New)]
        passthrough: crate::fuse::PassthroughMode,
        /// Seconds the kernel may cache names and attributes without asking the daemon. Changes
        /// made through the view show at once whatever the value; it bounds how late a change
        /// made in OLD behind the view's back shows. Raise it for big, read-mostly trees.
        #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_ttl)]
        metadata_ttl: f64,
        #[command(flatten)]
        limits: LimitArgs,
        /// Mount options, comma separated: allow_other, allow_root, ro, [no]suid, [no]dev,
        /// [no]exec, noatime. The view is nosuid,nodev unless given suid,dev.
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Serve Prometheus metrics at /metrics and the health checks /healthz (liveness) and
        /// /readyz (readiness) over HTTP at this address, e.g. 127.0.0.1:9477 (port 0: any).
        /// Off by default. The endpoints are unauthenticated and read-only: bind to loopback
        /// or a pod-internal address.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Restart without unmount: take the live view over from the daemon serving this
        /// state dir at MOUNTPOINT (after an upgrade, or to change flags). Applications keep
        /// their open files and see a pause, not an error; the old daemon exits. Mount
        /// options (-o) stay as first mounted; the copier keeps its state and limits. If
        /// anything fails before the old daemon lets go, it keeps serving. Linux 6.9 or later.
        #[arg(long)]
        takeover: bool,
        /// Whether directory listings carry each entry's attributes: `always` (a stat after a
        /// listing costs no request: ls -l, find -printf, rsync, du; a listing nobody stats
        /// costs the daemon a lookup per entry), `auto` (the kernel's heuristic: attributes
        /// for a directory's first chunk, then only while lookups follow), `off`. A takeover
        /// keeps the first daemon's choice (it is negotiated at mount).
        #[arg(long, value_enum, default_value_t = crate::fuse::ReaddirPlus::Always)]
        readdirplus: crate::fuse::ReaddirPlus,
        /// How the kernel hands requests to the daemon: `auto` (FUSE over io_uring when the
        /// kernel offers it, Linux 6.14+ with the fuse module's enable_uring on, else
        /// /dev/fuse), `uring` (io_uring or the mount fails), `dev` (/dev/fuse). Shown in
        /// status and /metrics. A mount served over io_uring cannot be taken over
        /// (--takeover): mount with `dev` where restarts without unmount matter.
        #[arg(long, value_enum, default_value_t = crate::fuse::Transport::Auto)]
        transport: crate::fuse::Transport,
        /// What getxattr of `security.selinux` answers for an entry without a label (on hosts
        /// where no security module answers for it): `eopnotsupp` (as a file system without
        /// labels: `ls -l` then asks once per listing, not once per entry, and lists at native
        /// speed when warm) or `enodata` (what the stores answer). Entries with a label give it.
        #[arg(long, value_enum, default_value_t = crate::fuse::SelinuxAbsent::Eopnotsupp)]
        selinux_absent: crate::fuse::SelinuxAbsent,
        /// An S3 NEW: the most bytes its staging tree (in the state dir) holds of what
        /// applications write through the view before it is uploaded (k, M, G, T suffixes).
        /// Writes that would go past it wait for uploads to make room (a file still open is
        /// uploaded as it is and evicted too); a single write larger than it fails with
        /// ENOSPC. [default: half of the space free for it on the state dir's file system at
        /// mount]
        #[arg(long, value_name = "SIZE", value_parser = parse_stage_max)]
        stage_max: Option<u64>,
        /// Hand the copier's file copies to remote workers (`ferryfs worker`) that connect to
        /// this address (IP:PORT; port 0: any), while any is connected; the daemon names
        /// their copies. Needs --workers-token-file.
        #[arg(long, value_name = "IP:PORT", requires = "workers_token_file")]
        workers_listen: Option<std::net::SocketAddr>,
        /// The file holding the token every worker request must carry (one line, at least
        /// 128 random bits: `ferryfs workers-token > FILE`).
        #[arg(long, value_name = "FILE", requires = "workers_listen")]
        workers_token_file: Option<PathBuf>,
        /// Serve workers over TLS with this certificate chain (PEM, the server's first; it
        /// must name the address workers use). Needs --workers-tls-key.
        #[arg(long, value_name = "FILE", requires_all = ["workers_listen", "workers_tls_key"])]
        workers_tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --workers-tls-cert.
        #[arg(long, value_name = "FILE", requires = "workers_tls_cert")]
        workers_tls_key: Option<PathBuf>,
    },
    /// Copy files a coordinator hands out (a daemon mounted with --workers-listen), from OLD
    /// to NEW, until the copy is done. Each worker reaches both stores itself.
    Worker(WorkerArgs),
    /// Print a new random token for --workers-token-file and --token-file (256 bits).
    WorkersToken,
    /// Show the migration's phase and progress.
    Status {
        #[arg(long)]
        state: PathBuf,
        /// One JSON object, for machines.
        #[arg(long)]
        json: bool,
        /// Keep showing progress, every second, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Start or resume the copier: in the mounted daemon if one serves the state dir, else in
    /// this process until everything is copied.
    Execute(ExecuteArgs),
    /// Pause the running copier.
    Pause {
        #[arg(long)]
        state: PathBuf,
    },
    /// Resume a paused copier.
    Resume {
        #[arg(long)]
        state: PathBuf,
    },
    /// Change the running copier's limits.
    Limits {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        bwlimit: Option<String>,
        #[arg(long)]
        ops_limit: Option<u64>,
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check that every entry NEW took from OLD still equals OLD; exit 0 only if so.
    Verify {
        #[arg(long)]
        state: PathBuf,
        /// Compare every byte of data too, not only size, times, mode, owner and xattrs.
        #[arg(long)]
        checksum: bool,
    },
    /// Make NEW the dataset: only when executed and a final pass over OLD is clean.
    Commit {
        #[arg(long)]
        state: PathBuf,
        /// Go ahead although entries the filter excluded (prepare --exclude) will leave the
        /// view (they stay in OLD): commit says how many, and refuses without this.
        #[arg(long)]
        yes: bool,
    },
    /// One record per entry of the migration: its path, type, size, where it came from
    /// (copied, copied_again, renamed, written, born, removed, excluded), OLD's fingerprint,
    /// the SHA-256 `verify --checksum` read, and the verdict (ok, mismatch, error) with when.
    /// Streamed (memory does not grow with the number of entries); safe while a daemon
    /// serves. After commit it prints the manifest commit wrote.
    Report {
        #[arg(long)]
        state: PathBuf,
        /// jsonl: one JSON object a line; csv: a header line, then one row an entry.
        #[arg(long, value_enum, default_value_t = crate::state::report::Format::Jsonl)]
        format: crate::state::report::Format,
        /// Write to FILE (made anew, then renamed into place) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Return everything to OLD, including every change made through the view.
    Abort {
        #[arg(long)]
        state: PathBuf,
        /// Leave what ferryfs put into NEW where it is.
        #[arg(long)]
        keep_new: bool,
    },
    /// Settle conflicts (entries changed through the view whose OLD origin was removed behind
    /// it): keep each entry at PATH as the view shows it. To follow OLD instead, remove the
    /// entry through the view.
    Resolve {
        #[arg(long)]
        state: PathBuf,
        /// View paths, as `status` lists them (e.g. /dir/file).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Unmount a view and wait for its daemon to exit.
    Unmount { mountpoint: PathBuf },
}

#[derive(clap::Args, Clone)]
pub struct LimitArgs {
    /// Copier worker threads (each keeps up to 32 copies waiting for its batch's syncfs)
    /// [default: 16 for a POSIX OLD, 64 for an S3 OLD].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Copier bandwidth limit in bytes/s (k, M, G suffixes: 50M); 0 or off is unlimited. Or
    /// a timetable, as rclone writes it: "08:00,20M 18:00,off" (every day), "Mon-08:00,20M
    /// Sat-00:00,off" (by weekday), local time; `ferryfs limits` changes it while running.
    #[arg(long, default_value = "0")]
    pub bwlimit: String,
    /// Copier limit in entries/s; 0 is unlimited.
    #[arg(long, default_value_t = 0)]
    pub ops_limit: u64,
    /// Once executed, check every copy against OLD again every SECS seconds (a change made in
    /// OLD behind the view is copied again); 0 checks only at commit and verify.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub recheck_interval: u64,
}

impl LimitArgs {
    /// The copier's options these flags ask for.
    pub fn options(&self) -> Result<copier::Options, CliError> {
        let bw = copier::limits::Timetable::parse(&self.bwlimit).map_err(CliError::Usage)?;
        Ok(copier::Options {
            workers: self.workers.map_or(0, |w| w.max(1)),
            bwlimit: bw.rate_now(),
            bw_timetable: bw.varies().then_some(bw),
            ops_limit: self.ops_limit,
            recheck: (self.recheck_interval > 0)
                .then(|| std::time::Duration::from_secs(self.recheck_interval)),
        })
    }
}

/// `--metadata-ttl`: seconds, 0 to 86400.
fn parse_ttl(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("{v} is outside 0 to 86400 seconds"));
    }
    Ok(v)
}

// `prepare`'s arguments (the subcommand's help is the variant's doc).
#[derive(clap::Args, Clone)]
pub struct PrepareArgs {
    /// The store the data lives in today: an absolute directory path, posix:/path, or
    /// s3://bucket[/prefix][?endpoint=URL&region=R&profile=P&path_style=true] (credentials
    /// from the profile or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, never in the URL).
    #[arg(long)]
    pub old: String,
    /// The store the data moves to; must be empty unless --allow-nonempty-new.
    #[arg(long)]
    pub new: String,
    /// The migration's state directory (journal, lock, log). Must not be inside a store.
    #[arg(long)]
    pub state: PathBuf,
    /// Accept a NEW that already holds entries; they win over OLD's in the view.
    #[arg(long)]
    pub allow_nonempty_new: bool,
    /// Succeed without changing anything when the state dir already holds a migration of
    /// this same OLD and NEW (for service managers and init containers that run prepare
    /// on every start); one of other stores is still refused.
    #[arg(long)]
    pub if_absent: bool,
    /// The AWS profile (~/.aws/credentials, ~/.aws/config) an S3 OLD is reached with: its
    /// keys (they win over AWS_ACCESS_KEY_ID), and its region and endpoint_url where neither
    /// the URL nor the environment sets them. The same as profile= in the OLD URL;
    /// recorded with the store (the name, never the keys).
    #[arg(long, value_name = "PROFILE")]
    pub old_s3_profile: Option<String>,
    /// The AWS profile an S3 NEW is reached with (as --old-s3-profile): OLD and NEW may
    /// use different credentials and endpoints.
    #[arg(long, value_name = "PROFILE")]
    pub new_s3_profile: Option<String>,
    /// How an S3 NEW records each object's owner, mode and mtime in its metadata: `s3fs`
    /// (mode in decimal: what s3fs-fuse and most S3 file systems read), `rclone` (mode in
    /// octal: what `rclone copy --metadata` applies), `none` (bytes only). The same as
    /// metadata= in the NEW URL. Both conventions are read whatever is written.
    /// [default: s3fs]
    #[arg(long, value_name = "STYLE")]
    pub s3_metadata: Option<String>,
    /// Leave entries matching PATTERN out of the migration (rsync's rules: `*`, `**`, `?`,
    /// `[...]`; a leading `/` anchors at the root; a trailing `/` matches directories only;
    /// first matching rule wins, in command-line order with --include and --filter-from).
    /// Excluded entries are not copied; the view shows them from OLD until commit.
    /// Repeatable; recorded with the migration.
    #[arg(long, value_name = "PATTERN", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub exclude: Vec<std::ffi::OsString>,
    /// Keep entries matching PATTERN in the migration even if a later rule excludes them.
    /// Repeatable.
    #[arg(long, value_name = "PATTERN", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub include: Vec<std::ffi::OsString>,
    /// Read rules from FILE, one a line: `- PATTERN` (exclude) or `+ PATTERN` (include);
    /// blank lines and lines starting with # or ; are skipped. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub filter_from: Vec<PathBuf>,
    /// Walk OLD with the filter and print what would move (directories, files, bytes, what
    /// the filter leaves out, set-id programs, device files, entries NEW could not hold);
    /// change nothing anywhere (no state dir, nothing written to NEW).
    #[arg(long)]
    pub dry_run: bool,
    /// The unit of copy-before-write: the first write into a big file still in OLD copies
    /// only the chunks it touches into NEW, and the copier fills in the rest. A power of two
    /// from 4k to 1G (k, M, G as for --bwlimit), or 0: every first write copies its whole
    /// file first. Recorded with the migration. [default: 1M]
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    pub chunk_size: Option<u64>,
    /// The rules of --exclude, --include and --filter-from, in command-line order (filled
    /// from the parsed command line by [`PrepareArgs::order_rules`]).
    #[arg(skip)]
    pub rules: Vec<crate::copier::filter::Rule>,
}

impl PrepareArgs {
    /// Put the filter rules in the order they were given (clap keeps each option's values
    /// apart; rsync's first-match rule needs them interleaved as written).
    pub fn order_rules(&mut self, m: &clap::ArgMatches) -> Result<(), String> {
        use crate::copier::filter::{read_filter_file, rule_arg};
        let at =
            |id: &str| -> Vec<usize> { m.indices_of(id).map(|i| i.collect()).unwrap_or_default() };
        let mut ordered: Vec<(usize, Vec<crate::copier::filter::Rule>)> = Vec::new();
        for (i, p) in at("exclude").into_iter().zip(&self.exclude) {
            ordered.push((i, vec![rule_arg(false, p)]));
        }
        for (i, p) in at("include").into_iter().zip(&self.include) {
            ordered.push((i, vec![rule_arg(true, p)]));
        }
        for (i, f) in at("filter_from").into_iter().zip(&self.filter_from) {
            ordered.push((i, read_filter_file(f)?));
        }
        ordered.sort_by_key(|(i, _)| *i);
        self.rules = ordered.into_iter().flat_map(|(_, r)| r).collect();
        Ok(())
    }
}

// `execute`'s arguments (the subcommand's help is the variant's doc).
#[derive(clap::Args, Clone)]
pub struct ExecuteArgs {
    #[arg(long)]
    pub state: PathBuf,
    /// With a daemon: wait until the migration is executed, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Copier worker threads [default: 16 for a POSIX OLD, 64 for an S3 OLD, or the daemon's
    /// setting].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Copier bandwidth limit in bytes/s (k, M, G suffixes); 0 is unlimited [default: 0,
    /// or the daemon's setting].
    #[arg(long)]
    pub bwlimit: Option<String>,
    /// Copier limit in entries/s; 0 is unlimited [default: 0, or the daemon's setting].
    #[arg(long)]
    pub ops_limit: Option<u64>,
    /// Copy again every entry NEW took from OLD and has lost since (removed or lost in NEW
    /// behind ferryfs's back); until then each is an error, and the migration is not executed.
    #[arg(long)]
    pub recopy_lost: bool,
}

// `worker`'s arguments.
#[derive(clap::Args, Clone)]
pub struct WorkerArgs {
    /// The coordinator: http://IP:PORT, the mount's --workers-listen address (https:// when
    /// it serves TLS: --workers-tls-cert).
    #[arg(long)]
    pub coordinator: String,
    /// The CA certificates (PEM) that signed an https:// coordinator's certificate [default:
    /// the system's].
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The file holding the coordinator's token (its --workers-token-file's content).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// This worker's name in status [default: index-$JOB_COMPLETION_INDEX under a Kubernetes
    /// Indexed Job, else HOST-PID].
    #[arg(long)]
    pub id: Option<String>,
    /// Where this host sees OLD (a path), or reaches its bucket (an s3:// URL), when not as
    /// the coordinator's migration names it.
    #[arg(long, value_name = "PATH|URL")]
    pub old: Option<PathBuf>,
    /// Where this host sees NEW (a path), or reaches its bucket (an s3:// URL), when not as
    /// the coordinator's migration names it.
    #[arg(long, value_name = "PATH|URL")]
    pub new: Option<PathBuf>,
    /// Files copied at once.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// This worker's own bandwidth limit in bytes/s (k, M, G suffixes; 0: none). The
    /// coordinator's --bwlimit and --ops-limit bound all workers together.
    #[arg(long, default_value = "0")]
    pub bwlimit: String,
}

/// `--stage-max`: a size of at least 1 MiB.
fn parse_stage_max(s: &str) -> Result<u64, String> {
    let v = crate::copier::limits::parse_rate(s).map_err(|e| e.replace("rate", "size"))?;
    if v < 1 << 20 {
        return Err(format!(
            "bad staging bound {s:?}: at least 1M (a write through the view is up to 1 MiB)"
        ));
    }
    Ok(v)
}

/// `--chunk-size`: 0, or a power of two from 4 KiB to 1 GiB.
fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let v = crate::copier::limits::parse_rate(s).map_err(|e| e.replace("rate", "size"))?;
    if v != 0 && (!v.is_power_of_two() || !(4096..=1 << 30).contains(&v)) {
        return Err(format!(
            "bad chunk size {s:?}: a power of two from 4k to 1G, or 0 (whole files only)"
        ));
    }
    Ok(v)
}
