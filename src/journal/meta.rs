//! The journal's single-valued records about the migration as a whole (its phase, OLD's
//! totals, the copier's rate, an abort's step...), each named by one [`Meta`] key.
//!
//! The key strings are stored in every journal: never rename one (a journal written by an
//! older ferryfs must read the same); add a new variant instead.

use serde::{Deserialize, Serialize};

use super::{Batch, JournalError, Records, Result};

/// Every single-valued record, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// The stores, as `prepare` recorded them (JSON of the state dir's config).
    Config,
    /// The lifecycle's [`Phase`].
    Phase,
    /// OLD's [`Totals`] as scanned at prepare (and recounted once executed).
    Totals,
    /// Whether NEW was empty at prepare (`1`/`0`): abort then empties it again.
    NewWasEmpty,
    /// The copier's rate and when it was sampled (not synced: it is only news).
    Rate,
    /// How many NEW entries were the view's own when commit or abort forgot the copy records.
    FinalLocal,
    /// What the copier has copied (`Done`).
    Done,
    /// The next directory id.
    NextId,
    /// Whether the last publish pass found the bucket holding all of the staging tree.
    PublishSettled,
    /// Bytes the S3 NEW's staging tree held at the last publish pass's walk (u64 LE).
    StagedBytes,
    /// The bound on the S3 NEW's staging tree the daemon serves with (`mount --stage-max`;
    /// u64 LE).
    StageMax,
    /// The remote copy workers the coordinator knows (JSON list of `WorkerStatus`).
    Workers,
    /// When the mount was last taken over (seconds since the epoch).
    LastTakeover,
    /// How far an abort has come (`AbortStep` names; `done` at the end).
    AbortStep,
    /// An abort into an S3 OLD: the planned placements, the hidden keys and the deletes.
    AbortS3Plan,
    AbortS3Hidden,
    AbortS3Deletes,
    /// What prepare's probe found each store does (JSON of `store::probe::Capabilities`).
    Capabilities,
    /// The copier's bandwidth limit in force and the timetable it follows ([`BwLimit`]; not
    /// synced: it is only news).
    BwLimit,
    /// prepare's filter rules, in order (JSON of `[copier::filter::Rule]`); none: no filter.
    Filter,
    /// The FUSE transport the daemon serving the view uses (JSON of
    /// `state::status::FuseTransport`; not synced: it is only news).
    FuseTransport,
    /// The chunk size of copy-before-write (`prepare --chunk-size`; 8 bytes LE; 0: whole
    /// files only). Absent: [`DEFAULT_CHUNK_SIZE`].
    ChunkSize,
}

/// The chunk size when prepare was given none: 1 MiB (see docs/CONFIGURATION.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

impl Meta {
    /// The stored key. Never change one (see the module doc).
    pub fn key(self) -> &'static str {
        match self {
            Meta::Config => "config",
            Meta::Phase => "phase",
            Meta::Totals => "totals",
            Meta::NewWasEmpty => "new_was_empty",
            Meta::Rate => "rate",
            Meta::FinalLocal => "final_local",
            Meta::Done => "done",
            Meta::NextId => "next_id",
            Meta::PublishSettled => "publish_settled",
            Meta::StagedBytes => "staged_bytes",
            Meta::StageMax => "stage_max",
            Meta::Workers => "workers",
            Meta::LastTakeover => "last_handover",
            Meta::AbortStep => "abort_step",
            Meta::AbortS3Plan => "abort_s3_plan",
            Meta::AbortS3Hidden => "abort_s3_hidden",
            Meta::AbortS3Deletes => "abort_s3_deletes",
            Meta::Capabilities => "capabilities",
            Meta::Filter => "filter",
            Meta::ChunkSize => "chunk_size",
            Meta::BwLimit => "bwlimit",
            Meta::FuseTransport => "fuse_transport",
        }
    }
}

/// The copier's bandwidth limit, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BwLimit {
    /// Bytes per second (0: none).
    pub in_force: u64,
    /// The timetable it follows, as given.
    pub timetable: Option<String>,
}

impl Records {
    pub fn bwlimit(&self) -> Result<Option<BwLimit>> {
        Ok(self
            .meta(Meta::BwLimit)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

/// The migration's lifecycle (DESIGN "Lifecycle"); each transition is one durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prepared,
    Executing,
    /// Nothing needs OLD any more (the last pass found everything in NEW and equal to OLD).
    Executed,
    Committed,
    Aborted,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 5] = [
        Phase::Prepared,
        Phase::Executing,
        Phase::Executed,
        Phase::Committed,
        Phase::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Executing => "executing",
            Phase::Executed => "executed",
            Phase::Committed => "committed",
            Phase::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Totals of OLD as scanned at prepare time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
    /// Set-id programs (set-uid, or set-gid and group-executable) and device files in OLD:
    /// what a `nosuid,nodev` view takes the powers of (see `mount -o`). 0 when not counted
    /// (an S3 OLD, a journal from before they were).
    #[serde(default)]
    pub setid: u64,
    #[serde(default)]
    pub devices: u64,
    /// Names of files with more than one name in OLD (hard links), counted at prepare: what a
    /// NEW without hard links could not hold as OLD has it.
    #[serde(default)]
    pub hardlinks: u64,
    /// What prepare's filter keeps out of the migration (not in the counts above): entries
    /// below an excluded directory included.
    #[serde(default)]
    pub excluded_dirs: u64,
    #[serde(default)]
    pub excluded_files: u64,
    #[serde(default)]
    pub excluded_bytes: u64,
    /// Entries whose name or path is longer than NEW holds (counted by `prepare --dry-run`).
    #[serde(default)]
    pub too_long: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.dirs += o.dirs;
        self.files += o.files;
        self.bytes += o.bytes;
        self.setid += o.setid;
        self.devices += o.devices;
        self.hardlinks += o.hardlinks;
        self.excluded_dirs += o.excluded_dirs;
        self.excluded_files += o.excluded_files;
        self.excluded_bytes += o.excluded_bytes;
        self.too_long += o.too_long;
    }
}

impl Records {
    /// The migration's phase (`prepared` when none is recorded yet).
    pub fn phase(&self) -> Result<Phase> {
        let raw = self
            .meta(Meta::Phase)?
            .unwrap_or_else(|| b"prepared".to_vec());
        let s = String::from_utf8_lossy(&raw);
        Phase::parse(&s).ok_or_else(|| JournalError::Corrupt(format!("unknown phase {s:?}")))
    }

    /// Move the migration to `p`: one synced write.
    pub fn set_phase(&self, p: Phase) -> Result<()> {
        let mut b = Batch::new();
        b.meta(Meta::Phase, p.as_str().as_bytes());
        self.commit(b, true)
    }

    /// OLD's totals as scanned at prepare (zeros when none were recorded).
    pub fn totals(&self) -> Result<Totals> {
        Ok(self
            .meta(Meta::Totals)?
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default())
    }

    /// What prepare's probe found the stores do (everything, for a journal from before the
    /// probe: stores are then taken at their word, as they were).
    pub fn capabilities(&self) -> Result<crate::store::probe::Capabilities> {
        Ok(self
            .meta(Meta::Capabilities)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    pub fn set_totals(&self, t: &Totals) -> Result<()> {
        let mut b = Batch::new();
        b.meta(
            Meta::Totals,
            &serde_json::to_vec(t).expect("totals serialize"),
        );
        self.commit(b, true)
    }

    /// The copier's current rate, for status readers in other processes (not synced: it is
    /// only news).
    pub fn record_rate(&self, bytes_per_sec: u64) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut b = Batch::new();
        b.meta(
            Meta::Rate,
            &serde_json::to_vec(&(bytes_per_sec, now)).expect("rate serializes"),
        );
        self.commit(b, false)
    }

    /// The last recorded rate and when (seconds since the epoch) it was sampled.
    pub fn rate(&self) -> Result<Option<(u64, u64)>> {
        Ok(self
            .meta(Meta::Rate)?
            .and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// How far an abort has come, if one began.
    pub fn abort_step(&self) -> Result<Option<Vec<u8>>> {
        self.meta(Meta::AbortStep)
    }
}
