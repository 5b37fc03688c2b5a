//! The journal: the durable record of everything the view knows that neither store shows.
//!
//! Records are keyed like directory entries, by (parent directory id, name), never by path, so
//! renaming a directory rewrites one record however much the directory holds (rule 5). The
//! root's id is [`ROOT_DIR`]. A directory gets an id the first time something under it needs a
//! record; a directory without a record has nothing recorded beneath it.
//!
//! What a record means for the name it is keyed by:
//! - [`Dentry::Tombstone`]: OLD's entry at this name is hidden. NEW may still hold a newer entry
//!   of that name (NEW wins).
//! - [`Dentry::Dir`]: a directory; `origin` is the OLD path whose content is merged into it
//!   (`None`: nothing from OLD, an opaque directory). If NEW has no directory here, the view
//!   shows OLD's content at `origin` alone, or nothing when `origin` is `None`.
//! - [`Dentry::File`]: a non-directory whose OLD data lives at `origin` (a rename redirect);
//!   NEW's entry, if any, wins.
//!
//! [`Intent`]s are redo records for the NEW-side half of an operation whose journal half is
//! already durable; they are replayed at mount before the view serves.
//!
//! The storage contract is the [`Journal`] trait (an ordered byte map with atomic, optionally
//! synced batches), implemented by [`rocks::RocksJournal`] and, for unit tests,
//! [`mem::MemJournal`]. [`Records`] is the typed API over any `Journal`: all encoding lives
//! here, so both implementations store exactly the same bytes.

pub mod mem;
pub mod meta;
pub mod rocks;

pub use meta::{BwLimit, DEFAULT_CHUNK_SIZE, Meta, Phase, Totals};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub const ROOT_DIR: u64 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dentry {
    Tombstone,
    Dir { id: u64, origin: Option<Vec<u8>> },
    File { origin: Option<Vec<u8>> },
}

/// NEW-side work that must be finished after a crash. `ino` is NEW's inode number of the
/// source when the intent was written: redo only touches that inode, never a newer file that
/// happens to have the same name.
/// What the view knows of an OLD file that has several names (an OLD hard-link group), keyed by
/// its OLD (st_dev, st_ino). Once one name is copied up, `copy` is the NEW copy's file handle:
/// every other OLD name of the group is then linked to it when the view meets that name
/// (overlayfs's index, kept in the journal instead of NEW), so all names stay one file.
/// st_nlink in the view = NEW's count + the OLD names not yet linked up nor removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardLinkGroup {
    /// File handle of the NEW copy, once one name was copied up.
    pub copy: Option<Vec<u8>>,
    /// OLD's st_nlink when the view first recorded the group.
    pub old_nlink: u32,
    /// OLD names linked to the NEW copy since (the copied name itself not counted).
    pub linked_up: u32,
    /// OLD names removed (tombstoned or replaced) through the view while still OLD-only.
    pub removed: u32,
    /// The copy is also linked in the work dir (kept alive for OLD names not yet linked up);
    /// that link is not a name in the view.
    #[serde(default)]
    pub kept_alive: bool,
}

impl HardLinkGroup {
    /// OLD names of the group still shown from OLD (not copied, linked up or removed).
    pub fn pending_old_names(&self) -> u32 {
        let copied = u32::from(self.copy.is_some());
        self.old_nlink
            .saturating_sub(copied + self.linked_up + self.removed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// rename NEW `from` to `to` (paths relative to NEW's root).
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        ino: u64,
    },
    /// remove NEW `path` (a file, or an empty directory).
    Remove { path: Vec<u8>, ino: u64 },
}

/// What OLD's entry was when NEW took its copy: if any of it differs later, OLD changed behind
/// the view's back and the copy is stale. ctime catches every change to the inode (data, mode,
/// owner, xattrs, links); dev and ino catch a replaced entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Fingerprint {
    #[allow(clippy::unnecessary_cast)]
    pub fn of(st: &rustix::fs::Stat) -> Fingerprint {
        Fingerprint {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }
}

/// A NEW entry that is a plain copy of an OLD entry, unchanged through the view since: keyed by
/// NEW's (st_dev, st_ino), so renames through the view leave it valid. Written before the copy
/// gets its name in NEW; removed (durably) before the view first changes the entry. An entry in
/// NEW without one is the view's own ("local"): abort replays it into OLD, verify skips it.
/// Metadata changed through the view on a file whose data is still only in OLD (chmod, chown,
/// utimens, setxattr, removexattr): kept here, keyed by OLD's inode, instead of a copy of the
/// data. The view shows it on top of OLD's attributes; the copy the copier (or a write) makes
/// later carries it, and abort writes it into OLD. Each field is what the view set, `None`
/// where it set nothing (OLD's shows through).
/// A NEW file whose data is partly still OLD's (copy-before-write by chunk), keyed by NEW's
/// (st_dev, st_ino). A write touched some chunks: those were copied into NEW first and are
/// marked present in the chunk map (`K` records, [`CHUNKS_PER_SEGMENT`] chunks a record); every
/// other chunk below `extent` is read from OLD's file until the copier hydrates it. NEW's file
/// has the view's size; its absent chunks are holes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialFile {
    /// OLD's path (below OLD's root) the data comes from.
    pub origin: Vec<u8>,
    /// OLD's file when the partial copy was made: its bytes are the absent chunks' bytes.
    pub old: Fingerprint,
    /// Chunk size in bytes (a power of two).
    pub chunk: u64,
    /// Bytes from offset 0 that may still be OLD's: OLD's size, lowered by every truncate
    /// below it. Chunks at or past it hold NEW's bytes only.
    pub extent: u64,
    /// NEW's file handle of the file: the record is that file's, never another file's that
    /// NEW gave the same inode number after a crash lost this one before its name.
    pub handle: Vec<u8>,
    /// An S3 OLD's object: the ETag the chunks are read at (every GET is conditional on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// An S3 NEW's evicted file: the absent chunks are the NEW bucket's object `origin` (a
    /// key below NEW's prefix) at `etag`, not OLD's. The staging tree holds only the chunks
    /// written through the view since the last upload; nothing hydrates it, and it outlives
    /// commit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bucket: bool,
    /// An abort into an S3 OLD began rewriting OLD's object `origin` as the view's bytes: the
    /// object may be that upload's (see `View::abort_partial_s3`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_put: bool,
}

/// Chunks one chunk-map record covers (a 512-byte bitmap): a 10 TiB file in 1 MiB chunks is
/// 2,560 records, 1.3 MiB of journal.
pub const CHUNKS_PER_SEGMENT: u64 = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaChange {
    /// Permission bits (07777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// (seconds, nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<(i64, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<(i64, i64)>,
    /// When the view last changed it (every change sets the change time).
    pub ctime: (i64, i64),
    /// Extended attributes set (`Some`) or removed (`None`) through the view.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        with = "xattr_pairs"
    )]
    pub xattrs: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Attribute names are bytes, not strings: kept as a list of (name, value) pairs.
mod xattr_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    type Map = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

    pub fn serialize<S: Serializer>(m: &Map, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map, D::Error> {
        Ok(Vec::<(Vec<u8>, Option<Vec<u8>>)>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    /// Path below OLD's root the copy was taken from.
    #[serde(with = "bytes_b64")]
    pub origin: Vec<u8>,
    pub fp: Fingerprint,
    /// NEW's file handle of the copy (generation included: a reused inode number won't match).
    #[serde(with = "bytes_b64")]
    pub handle: Vec<u8>,
    pub is_dir: bool,
}

/// A copy that failed, keyed by the view path it was found at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyError {
    pub error: String,
    pub errno: i32,
    pub attempts: u32,
    /// Seconds since the epoch of the last attempt.
    pub at: u64,
    /// A change through the view and one in OLD behind it that cannot both hold (`ferryfs
    /// resolve`), not a failure to retry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
}

/// The SHA-256 of a NEW file's content as `verify --checksum` read it (equal to OLD's then),
/// valid while the file's ctime and size are still these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub sha256: String,
    pub size: u64,
    pub ctime: (i64, i64),
    /// Seconds since the epoch.
    pub at: u64,
}

/// What the last verify found different at a view path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub detail: String,
    pub at: u64,
}

/// An entry OLD changed behind the view's back after it was copied, keyed by view path: kept
/// (as history, for status) until the migration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleRecord {
    /// Seconds since the epoch when it was found.
    pub found: u64,
    /// Whether it has been copied again since.
    pub copied_again: bool,
}

/// What the copier has done, as recorded with its copies (one batch), so a restart resumes the
/// counts where the last durable copy left them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
}

/// An object the publisher put into an S3 NEW, keyed by its key below the store's prefix: what
/// the staged entry was when it was uploaded (crate::copier::publish). `pending`: written before the
/// request, so that a crash between the request and its record leaves no object nobody knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub pending: bool,
    /// The staged entry's st_ino, size, mtime (s, ns), ctime (s, ns), mode, uid, gid.
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub etag: String,
    /// The MD5 of a file's bytes, as an ETag of a single PUT shows it (quoted hex): a
    /// multipart object's ETag is not its MD5.
    #[serde(default)]
    pub md5: String,
    /// Recorded less than a second after the file last changed: a write in that instant may
    /// not show in its stat, so the next pass compares its MD5.
    #[serde(default)]
    pub racy: bool,
}

/// Byte strings as base64 in JSON (names need not be UTF-8): the standard alphabet, padded.
pub(crate) mod bytes_b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn encode(b: &[u8]) -> String {
        STANDARD.encode(b)
    }

    pub fn decode(s: &str) -> Option<Vec<u8>> {
        STANDARD.decode(s).ok()
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).ok_or_else(|| serde::de::Error::custom("bad base64"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal backend: {0}")]
    Backend(String),
    #[error("journal record is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "state dir {0} is in use by another ferryfs process (is a mount already running? see `ferryfs status --state {0}`)"
    )]
    Busy(String),
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// The journal's storage contract: an ordered key-value store with atomic, optionally durable,
/// batches. Atomicity: a `write` applies all of its ops or none, also across a crash.
pub trait Journal: Send + Sync {
    /// Apply every op or none. With `sync`, the batch is on stable storage when this returns.
    fn write(&self, ops: Vec<KvOp>, sync: bool) -> Result<()>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// At most `limit` of the (key, value) whose key starts with `prefix`, in key order, from
    /// the first (`after`: `None`) or from the first that sorts after the whole key `after`:
    /// a scan in pages.
    fn scan_after(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Every (key, value) whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_after(prefix, None, usize::MAX)
    }
}

#[derive(Debug, Clone)]
pub enum KvOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

const P_DENTRY: u8 = b'd';
const P_HARDLINK: u8 = b'h';
const P_COPY_OF: u8 = b'H';
const P_META: u8 = b'm';
const P_INTENT: u8 = b'i';
const P_COPY: u8 = b'c';
const P_ERROR: u8 = b'e';
const P_STALE: u8 = b's';
const P_PUBLISHED: u8 = b'p';
const P_PUB_ERROR: u8 = b'u';
const P_TAKEN: u8 = b't';
/// NEW inode -> the view's number for it (an entry that came from OLD keeps OLD's number).
/// Not cleared at commit: the view keeps its numbers while it serves NEW alone.
const P_VIEW_INO: u8 = b'v';
/// NEW inode -> the OLD path an entry changed through the view came from (see
/// [`Batch::origin`]).
const P_ORIGIN: u8 = b'o';
/// NEW inode -> the SHA-256 `verify --checksum` read of its content ([`Digest`]).
const P_DIGEST: u8 = b'x';
/// View path -> what the last verify found different ([`Mismatch`]); replaced by each verify.
const P_MISMATCH: u8 = b'y';
/// OLD inode -> metadata the view changed on a file not copied yet ([`MetaChange`]).
const P_META_CHANGE: u8 = b'a';
/// NEW inode -> a file whose data is partly OLD's ([`PartialFile`]).
const P_PARTIAL: u8 = b'k';
/// NEW inode + segment -> that file's chunk map, [`CHUNKS_PER_SEGMENT`] bits a record.
const P_CHUNKS: u8 = b'K';

fn dentry_key(dir: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.push(P_DENTRY);
    k.extend_from_slice(&dir.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn hardlink_key(dev: u64, ino: u64) -> Vec<u8> {
    let mut k = vec![P_HARDLINK];
    k.extend_from_slice(&dev.to_be_bytes());
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

fn copy_of_key(dev: u64, ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(dev, ino);
    k[0] = P_COPY_OF;
    k
}

fn taken_key(dev: u64, ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(dev, ino);
    k[0] = P_TAKEN;
    k
}

fn digest_key(new_dev: u64, new_ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_DIGEST;
    k
}

fn origin_key(new_dev: u64, new_ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_ORIGIN;
    k
}

fn meta_change_key(dev: u64, ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(dev, ino);
    k[0] = P_META_CHANGE;
    k
}

fn partial_key(new_dev: u64, new_ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_PARTIAL;
    k
}

fn chunks_key(new_dev: u64, new_ino: u64, segment: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_CHUNKS;
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

fn view_ino_key(new_dev: u64, new_ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_VIEW_INO;
    k
}

fn copy_key(new_dev: u64, new_ino: u64) -> Vec<u8> {
    let mut k = hardlink_key(new_dev, new_ino);
    k[0] = P_COPY;
    k
}

fn error_key(path: &[u8]) -> Vec<u8> {
    let mut k = vec![P_ERROR];
    k.extend_from_slice(path);
    k
}

fn meta_key(key: Meta) -> Vec<u8> {
    let name = key.key();
    let mut k = vec![P_META];
    k.extend_from_slice(name.as_bytes());
    k
}

fn intent_key(id: u64) -> Vec<u8> {
    let mut k = vec![P_INTENT];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn put_opt(out: &mut Vec<u8>, v: &Option<Vec<u8>>) {
    match v {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn get_opt(b: &[u8]) -> Result<(Option<Vec<u8>>, &[u8])> {
    let bad = || JournalError::Corrupt("truncated origin".into());
    match b.first() {
        Some(0) => Ok((None, &b[1..])),
        Some(1) => {
            let len = u32::from_le_bytes(b.get(1..5).ok_or_else(bad)?.try_into().unwrap()) as usize;
            let v = b.get(5..5 + len).ok_or_else(bad)?;
            Ok((Some(v.to_vec()), &b[5 + len..]))
        }
        _ => Err(bad()),
    }
}

impl Dentry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Dentry::Tombstone => out.push(0),
            Dentry::Dir { id, origin } => {
                out.push(1);
                out.extend_from_slice(&id.to_le_bytes());
                put_opt(&mut out, origin);
            }
            Dentry::File { origin } => {
                out.push(2);
                put_opt(&mut out, origin);
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Dentry> {
        match b.first() {
            Some(0) => Ok(Dentry::Tombstone),
            Some(1) => {
                let id = b
                    .get(1..9)
                    .ok_or_else(|| JournalError::Corrupt("short dir record".into()))?;
                let id = u64::from_le_bytes(id.try_into().unwrap());
                let (origin, _) = get_opt(&b[9..])?;
                Ok(Dentry::Dir { id, origin })
            }
            Some(2) => Ok(Dentry::File {
                origin: get_opt(&b[1..])?.0,
            }),
            _ => Err(JournalError::Corrupt(format!(
                "unknown record tag {:?}",
                b.first()
            ))),
        }
    }
}

/// A set of journal changes applied atomically (one WriteBatch per transition).
#[derive(Default, Debug)]
pub struct Batch {
    ops: Vec<KvOp>,
    max_id: Option<u64>,
    records_group: bool,
    /// OLD inodes whose metadata change this batch records (`true`) or drops (`false`).
    meta_keys: Vec<((u64, u64), bool)>,
    /// NEW inodes whose partial-file record this batch writes (`true`) or drops (`false`).
    partial_keys: Vec<((u64, u64), bool)>,
    /// The same, for the records that are an S3 NEW's evicted files ([`PartialFile::bucket`]).
    stub_keys: Vec<((u64, u64), bool)>,
    /// The view numbers this batch records: (new_dev, new_ino, number), for the cache.
    numbers: Vec<(u64, u64, u64)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn put(&mut self, dir: u64, name: &[u8], d: &Dentry) -> &mut Self {
        if let Dentry::Dir { id, .. } = d {
            self.max_id = Some(self.max_id.map_or(*id, |m| m.max(*id)));
        }
        self.ops.push(KvOp::Put(dentry_key(dir, name), d.encode()));
        self
    }
    pub fn delete(&mut self, dir: u64, name: &[u8]) -> &mut Self {
        self.ops.push(KvOp::Delete(dentry_key(dir, name)));
        self
    }
    pub fn intent(&mut self, id: u64, intent: &Intent) -> &mut Self {
        let v = serde_json::to_vec(intent).expect("intent serializes");
        self.ops.push(KvOp::Put(intent_key(id), v));
        self
    }
    pub fn clear_intent(&mut self, id: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(intent_key(id)));
        self
    }
    pub fn hardlink(&mut self, dev: u64, ino: u64, g: &HardLinkGroup) -> &mut Self {
        self.records_group = true;
        let v = serde_json::to_vec(g).expect("group serializes");
        self.ops.push(KvOp::Put(hardlink_key(dev, ino), v));
        self
    }
    /// Record that NEW's inode (new_dev, new_ino) is the copy of OLD's group (dev, ino).
    pub fn copy_of(&mut self, new_dev: u64, new_ino: u64, dev: u64, ino: u64) -> &mut Self {
        let mut v = dev.to_le_bytes().to_vec();
        v.extend_from_slice(&ino.to_le_bytes());
        self.ops.push(KvOp::Put(copy_of_key(new_dev, new_ino), v));
        self
    }
    pub fn meta(&mut self, key: Meta, value: &[u8]) -> &mut Self {
        self.ops.push(KvOp::Put(meta_key(key), value.to_vec()));
        self
    }
    /// NEW's entry (new_dev, new_ino) is a copy of OLD's `rec.origin`.
    pub fn copy(&mut self, new_dev: u64, new_ino: u64, rec: &CopyRecord) -> &mut Self {
        let v = serde_json::to_vec(rec).expect("copy record serializes");
        self.ops.push(KvOp::Put(copy_key(new_dev, new_ino), v));
        self
    }
    /// NEW took OLD's entry `old` (its copy is named in NEW): written once the name exists,
    /// kept while the migration lives. An OLD entry with this mark that NEW lacks is a copy NEW
    /// lost behind ferryfs's back, never an entry still to copy. The mark names NEW's copy
    /// (new_dev, new_ino): a name OLD links to the same file later joins that copy.
    pub fn taken(&mut self, old: &Fingerprint, new_dev: u64, new_ino: u64) -> &mut Self {
        let mut v = old.ctime.0.to_le_bytes().to_vec();
        v.extend_from_slice(&old.ctime.1.to_le_bytes());
        v.extend_from_slice(&new_dev.to_le_bytes());
        v.extend_from_slice(&new_ino.to_le_bytes());
        self.ops.push(KvOp::Put(taken_key(old.dev, old.ino), v));
        self
    }
    /// `verify --checksum` read NEW's file (new_dev, new_ino) as `d`.
    pub fn digest(&mut self, new_dev: u64, new_ino: u64, d: &Digest) -> &mut Self {
        self.ops.push(KvOp::Put(
            digest_key(new_dev, new_ino),
            serde_json::to_vec(d).expect("digest serializes"),
        ));
        self
    }
    /// The last verify found the entry at view path `path` different.
    pub fn mismatch(&mut self, path: &[u8], m: &Mismatch) -> &mut Self {
        let mut k = vec![P_MISMATCH];
        k.extend_from_slice(path);
        self.ops.push(KvOp::Put(
            k,
            serde_json::to_vec(m).expect("mismatch serializes"),
        ));
        self
    }
    /// The view numbers NEW's inode (new_dev, new_ino) `ino`: the number the entry had while
    /// it was shown from OLD, kept once NEW holds it.
    pub fn view_ino(&mut self, new_dev: u64, new_ino: u64, ino: u64) -> &mut Self {
        self.ops.push(KvOp::Put(
            view_ino_key(new_dev, new_ino),
            ino.to_le_bytes().to_vec(),
        ));
        self.numbers.push((new_dev, new_ino, ino));
        self
    }
    /// NEW's entry (new_dev, new_ino), changed through the view, came from OLD's `origin`: if
    /// OLD removes that entry behind the view, the two changes conflict.
    pub fn origin(&mut self, new_dev: u64, new_ino: u64, origin: &[u8]) -> &mut Self {
        self.ops
            .push(KvOp::Put(origin_key(new_dev, new_ino), origin.to_vec()));
        self
    }
    pub fn clear_origin(&mut self, new_dev: u64, new_ino: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(origin_key(new_dev, new_ino)));
        self
    }
    /// Forget that NEW took OLD's entry (dev, ino): it is to be copied again.
    pub fn clear_taken(&mut self, dev: u64, ino: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(taken_key(dev, ino)));
        self
    }
    /// The view changed metadata of OLD's file (dev, ino), whose data NEW does not hold yet.
    pub fn meta_change(&mut self, dev: u64, ino: u64, m: &MetaChange) -> &mut Self {
        self.ops.push(KvOp::Put(
            meta_change_key(dev, ino),
            serde_json::to_vec(m).expect("metadata change serializes"),
        ));
        self.meta_keys.push(((dev, ino), true));
        self
    }
    /// NEW's file (new_dev, new_ino) is partly OLD's (see [`PartialFile`]).
    pub fn partial(&mut self, new_dev: u64, new_ino: u64, p: &PartialFile) -> &mut Self {
        self.ops.push(KvOp::Put(
            partial_key(new_dev, new_ino),
            serde_json::to_vec(p).expect("partial file serializes"),
        ));
        self.partial_keys.push(((new_dev, new_ino), true));
        self.stub_keys.push(((new_dev, new_ino), p.bucket));
        self
    }
    /// One record of a partial file's chunk map: bit i of `bits` is chunk
    /// `segment * CHUNKS_PER_SEGMENT + i`, set when NEW holds it.
    pub fn chunks(&mut self, new_dev: u64, new_ino: u64, segment: u64, bits: &[u8]) -> &mut Self {
        self.ops.push(KvOp::Put(
            chunks_key(new_dev, new_ino, segment),
            bits.to_vec(),
        ));
        self
    }
    /// NEW's file is whole (or gone): its partial record and every chunk-map record
    /// (`segments` of them at most) go.
    pub fn clear_partial(&mut self, new_dev: u64, new_ino: u64, segments: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(partial_key(new_dev, new_ino)));
        for seg in 0..segments {
            self.ops
                .push(KvOp::Delete(chunks_key(new_dev, new_ino, seg)));
        }
        self.partial_keys.push(((new_dev, new_ino), false));
        self.stub_keys.push(((new_dev, new_ino), false));
        self
    }
    /// The change is in NEW's copy now (or OLD's file is gone).
    pub fn clear_meta_change(&mut self, dev: u64, ino: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(meta_change_key(dev, ino)));
        self.meta_keys.push(((dev, ino), false));
        self
    }
    pub fn clear_copy(&mut self, new_dev: u64, new_ino: u64) -> &mut Self {
        self.ops.push(KvOp::Delete(copy_key(new_dev, new_ino)));
        self
    }
    pub fn error(&mut self, path: &[u8], e: &CopyError) -> &mut Self {
        let v = serde_json::to_vec(e).expect("error serializes");
        self.ops.push(KvOp::Put(error_key(path), v));
        self
    }
    pub fn stale(&mut self, path: &[u8], r: &StaleRecord) -> &mut Self {
        let mut k = vec![P_STALE];
        k.extend_from_slice(path);
        let v = serde_json::to_vec(r).expect("stale record serializes");
        self.ops.push(KvOp::Put(k, v));
        self
    }
    pub fn clear_error(&mut self, path: &[u8]) -> &mut Self {
        self.ops.push(KvOp::Delete(error_key(path)));
        self
    }
    pub fn published(&mut self, key: &str, p: &Published) -> &mut Self {
        let mut k = vec![P_PUBLISHED];
        k.extend_from_slice(key.as_bytes());
        let v = serde_json::to_vec(p).expect("published record serializes");
        self.ops.push(KvOp::Put(k, v));
        self
    }
    /// An upload into an S3 NEW that failed, keyed by the object's key (apart from the
    /// copier's errors, which each copier pass settles).
    pub fn pub_error(&mut self, key: &str, e: &CopyError) -> &mut Self {
        let mut k = vec![P_PUB_ERROR];
        k.extend_from_slice(key.as_bytes());
        let v = serde_json::to_vec(e).expect("error serializes");
        self.ops.push(KvOp::Put(k, v));
        self
    }
    pub fn clear_pub_error(&mut self, key: &str) -> &mut Self {
        let mut k = vec![P_PUB_ERROR];
        k.extend_from_slice(key.as_bytes());
        self.ops.push(KvOp::Delete(k));
        self
    }
    pub fn clear_published(&mut self, key: &str) -> &mut Self {
        let mut k = vec![P_PUBLISHED];
        k.extend_from_slice(key.as_bytes());
        self.ops.push(KvOp::Delete(k));
        self
    }
    pub fn done(&mut self, d: &Done) -> &mut Self {
        self.meta(Meta::Done, &serde_json::to_vec(d).expect("done serializes"))
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Counts of records, for `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordCounts {
    pub tombstones: u64,
    pub dirs: u64,
    pub redirects: u64,
}

/// The typed records (dentries, intents, metadata) over any [`Journal`].
#[derive(Clone)]
pub struct Records {
    kv: Arc<dyn Journal>,
    next_id: Arc<AtomicU64>,
    /// Whether any OLD hard-link group was ever recorded: until one is, lookups skip the
    /// group queries entirely (most datasets have no hard links).
    has_groups: Arc<std::sync::atomic::AtomicBool>,
    /// The OLD inodes that have a [`MetaChange`] (read at open, kept by `commit`): a lookup
    /// of any other OLD file reads nothing for it. A few dozen bytes per changed file.
    meta_keys: Arc<Mutex<rustc_hash::FxHashSet<(u64, u64)>>>,
    /// The NEW inodes that have a [`PartialFile`] record (read at open, kept by `commit`).
    partial_keys: Arc<Mutex<rustc_hash::FxHashSet<(u64, u64)>>>,
    /// Those of them that are an S3 NEW's evicted files ([`PartialFile::bucket`]).
    stub_keys: Arc<Mutex<rustc_hash::FxHashSet<(u64, u64)>>>,
    /// The view numbers of NEW's inodes, read a block of neighbouring inodes at a time.
    numbers: Arc<Mutex<NumberCache>>,
}

/// In-memory sets of journal keys ([`Records::meta_keys`], [`Records::partial_keys`]) kept
/// in step with a batch: a key is known before the write that adds it (a reader never skips a
/// record that is there) and forgotten after the write that drops it.
struct KeySet;

impl KeySet {
    /// What the batch leaves for each key (its last op on the key).
    fn last_of(ops: Vec<((u64, u64), bool)>) -> Vec<((u64, u64), bool)> {
        ops.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect()
    }
    fn add(set: &Mutex<rustc_hash::FxHashSet<(u64, u64)>>, ops: &[((u64, u64), bool)]) {
        if ops.iter().any(|(_, put)| *put) {
            let mut k = set.lock().unwrap_or_else(|p| p.into_inner());
            k.extend(ops.iter().filter(|(_, put)| *put).map(|(key, _)| *key));
        }
    }
    fn remove(set: &Mutex<rustc_hash::FxHashSet<(u64, u64)>>, ops: &[((u64, u64), bool)]) {
        if ops.iter().any(|(_, put)| !*put) {
            let mut k = set.lock().unwrap_or_else(|p| p.into_inner());
            for (key, _) in ops.iter().filter(|(_, put)| !*put) {
                k.remove(key);
            }
        }
    }
}

/// Inode numbers of NEW's inodes that neighbour each other in NEW (one block) share one
/// cached read of the journal.
const NUMBER_BLOCK_BITS: u32 = 8;
/// Blocks kept: at most 2,048 x 256 numbers (8 MiB when every block is full).
const NUMBER_BLOCKS: usize = 2048;

/// The view's numbers for NEW's inodes (the `v` records), cached by block of 256 neighbouring
/// NEW inode numbers. A lookup of an entry NEW holds needs its number; a cold walk of a tree
/// the copier filled meets NEW's inodes roughly in the order NEW allocated them, so one read
/// of a block's records (a single ordered scan) serves its neighbours' lookups too.
///
/// Coherence: every record is written through [`Records::commit`], which updates a cached
/// block after the write; a block is read from the journal under the same lock, so a write
/// lands either before the read (which sees it) or after it (and updates the block).
struct NumberCache {
    blocks: lru::LruCache<(u64, u64), Vec<(u8, u64)>>,
}

impl NumberCache {
    fn new() -> NumberCache {
        NumberCache {
            blocks: lru::LruCache::new(
                std::num::NonZeroUsize::new(NUMBER_BLOCKS).expect("non-zero"),
            ),
        }
    }

    fn block_of(dev: u64, ino: u64) -> ((u64, u64), u8) {
        ((dev, ino >> NUMBER_BLOCK_BITS), ino as u8)
    }

    /// Record a number written to the journal, if its block is cached.
    fn note(&mut self, dev: u64, ino: u64, number: u64) {
        let (block, low) = Self::block_of(dev, ino);
        if let Some(b) = self.blocks.peek_mut(&block) {
            match b.binary_search_by_key(&low, |&(l, _)| l) {
                Ok(i) => b[i].1 = number,
                Err(i) => b.insert(i, (low, number)),
            }
        }
    }
}

impl Records {
    pub fn new(kv: Arc<dyn Journal>) -> Result<Records> {
        let next = match kv.get(&meta_key(Meta::NextId))? {
            Some(v) => u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| JournalError::Corrupt("next_id".into()))?,
            ),
            None => ROOT_DIR + 1,
        };
        let has_groups = !kv.scan(&[P_HARDLINK])?.is_empty();
        let keys_of = |prefix: u8| -> Result<rustc_hash::FxHashSet<(u64, u64)>> {
            Ok(kv
                .scan(&[prefix])?
                .into_iter()
                .filter_map(|(k, _)| {
                    let dev = u64::from_be_bytes(k.get(1..9)?.try_into().ok()?);
                    let ino = u64::from_be_bytes(k.get(9..17)?.try_into().ok()?);
                    Some((dev, ino))
                })
                .collect())
        };
        let meta_keys = keys_of(P_META_CHANGE)?;
        let partial_keys = keys_of(P_PARTIAL)?;
        let mut stub_keys = rustc_hash::FxHashSet::default();
        for (k, v) in kv.scan(&[P_PARTIAL])? {
            let p: PartialFile = serde_json::from_slice(&v)
                .map_err(|e| JournalError::Corrupt(format!("partial file: {e}")))?;
            if p.bucket
                && let (Some(dev), Some(ino)) = (
                    k.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                    k.get(9..17).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                )
            {
                stub_keys.insert((u64::from_be_bytes(dev), u64::from_be_bytes(ino)));
            }
        }
        Ok(Records {
            kv,
            next_id: Arc::new(AtomicU64::new(next)),
            has_groups: Arc::new(std::sync::atomic::AtomicBool::new(has_groups)),
            meta_keys: Arc::new(Mutex::new(meta_keys)),
            partial_keys: Arc::new(Mutex::new(partial_keys)),
            stub_keys: Arc::new(Mutex::new(stub_keys)),
            numbers: Arc::new(Mutex::new(NumberCache::new())),
        })
    }

    /// An id for a directory that is about to get its first record. It becomes durable with the
    /// batch that records the directory.
    pub fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn get(&self, dir: u64, name: &[u8]) -> Result<Option<Dentry>> {
        self.kv
            .get(&dentry_key(dir, name))?
            .map(|v| Dentry::decode(&v))
            .transpose()
    }

    /// Every record directly under `dir`.
    pub fn list(&self, dir: u64) -> Result<Vec<(Vec<u8>, Dentry)>> {
        let mut prefix = vec![P_DENTRY];
        prefix.extend_from_slice(&dir.to_be_bytes());
        self.kv
            .scan(&prefix)?
            .into_iter()
            .map(|(k, v)| Ok((k[9..].to_vec(), Dentry::decode(&v)?)))
            .collect()
    }

    /// Apply a batch atomically. `durable`: the records are on stable storage before return
    /// (required for every record that makes a copy-up, tombstone or rename visible).
    pub fn commit(&self, mut batch: Batch, durable: bool) -> Result<()> {
        if let Some(max) = batch.max_id {
            let next = self.next_id.load(Ordering::Relaxed).max(max + 1);
            batch.meta(Meta::NextId, &next.to_le_bytes());
        }
        if batch.ops.is_empty() {
            return Ok(());
        }
        let groups = batch.records_group;
        // Known before the write (a reader never skips a record that is there) and forgotten
        // after it.
        // (The last op on a key is what the batch leaves.)
        let meta_keys = KeySet::last_of(std::mem::take(&mut batch.meta_keys));
        let partial_keys = KeySet::last_of(std::mem::take(&mut batch.partial_keys));
        let stub_keys = KeySet::last_of(std::mem::take(&mut batch.stub_keys));
        KeySet::add(&self.meta_keys, &meta_keys);
        KeySet::add(&self.partial_keys, &partial_keys);
        KeySet::add(&self.stub_keys, &stub_keys);
        let t = std::time::Instant::now();
        self.kv.write(batch.ops, durable)?;
        crate::metrics::METRICS.journal_write(durable, t.elapsed());
        KeySet::remove(&self.meta_keys, &meta_keys);
        KeySet::remove(&self.partial_keys, &partial_keys);
        KeySet::remove(&self.stub_keys, &stub_keys);
        if !batch.numbers.is_empty() {
            let mut c = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
            for (dev, ino, number) in batch.numbers {
                c.note(dev, ino, number);
            }
        }
        if groups {
            self.has_groups.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The record of the OLD hard-link group of (dev, ino), if the view has one.
    pub fn hardlink(&self, dev: u64, ino: u64) -> Result<Option<HardLinkGroup>> {
        if !self.has_groups.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.get_json(&hardlink_key(dev, ino), "hard-link group")
    }

    /// The OLD hard-link group whose NEW copy is (new_dev, new_ino), if it is one.
    pub fn copy_of(&self, new_dev: u64, new_ino: u64) -> Result<Option<(u64, u64)>> {
        if !self.has_groups.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match self.kv.get(&copy_of_key(new_dev, new_ino))? {
            Some(v) if v.len() == 16 => Ok(Some((
                u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
            ))),
            Some(_) => Err(JournalError::Corrupt("copy-of record".into())),
            None => Ok(None),
        }
    }

    pub fn meta(&self, key: Meta) -> Result<Option<Vec<u8>>> {
        self.kv.get(&meta_key(key))
    }

    pub fn intents(&self) -> Result<Vec<(u64, Intent)>> {
        self.kv
            .scan(&[P_INTENT])?
            .into_iter()
            .map(|(k, v)| {
                let id = u64::from_be_bytes(
                    k[1..]
                        .try_into()
                        .map_err(|_| JournalError::Corrupt("intent key".into()))?,
                );
                let i = serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corrupt(format!("intent {id}: {e}")))?;
                Ok((id, i))
            })
            .collect()
    }

    /// The copy record of NEW's entry (new_dev, new_ino), if it is an unchanged copy of OLD.
    pub fn copy(&self, new_dev: u64, new_ino: u64) -> Result<Option<CopyRecord>> {
        self.get_json(&copy_key(new_dev, new_ino), "copy record")
    }

    /// Whether NEW's entry (new_dev, new_ino) has a copy record (a read, no write: most entries
    /// removed through the view were born there and have none).
    pub fn has_copy(&self, new_dev: u64, new_ino: u64) -> Result<bool> {
        Ok(self.kv.get(&copy_key(new_dev, new_ino))?.is_some())
    }

    /// Metadata the view changed on OLD's file (dev, ino) before NEW took its data.
    pub fn meta_change(&self, dev: u64, ino: u64) -> Result<Option<MetaChange>> {
        if !self.has_meta_change(dev, ino) {
            return Ok(None);
        }
        self.get_json(&meta_change_key(dev, ino), "metadata change")
    }

    /// Whether OLD's file (dev, ino) has a metadata change (no journal read).
    pub fn has_meta_change(&self, dev: u64, ino: u64) -> bool {
        self.meta_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(dev, ino))
    }

    /// How many OLD files carry metadata changed through the view, their data not copied yet.
    pub fn meta_changes(&self) -> Result<u64> {
        Ok(self
            .meta_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64)
    }

    /// NEW's file (new_dev, new_ino) if its data is partly OLD's, with its chunk map (bit i of
    /// byte j: chunk 8j + i), as long as the highest segment recorded needs.
    pub fn partial(&self, new_dev: u64, new_ino: u64) -> Result<Option<(PartialFile, Vec<u8>)>> {
        if !self.has_partial(new_dev, new_ino) {
            return Ok(None);
        }
        let Some(p) =
            self.get_json::<PartialFile>(&partial_key(new_dev, new_ino), "partial file")?
        else {
            return Ok(None);
        };
        let seg_bytes = (CHUNKS_PER_SEGMENT / 8) as usize;
        let mut bits = Vec::new();
        let prefix = partial_key(new_dev, new_ino);
        let mut prefix = prefix;
        prefix[0] = P_CHUNKS;
        for (k, v) in self.kv.scan(&prefix)? {
            let seg = k
                .get(17..25)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| JournalError::Corrupt("chunk map key".into()))?;
            let at = seg as usize * seg_bytes;
            if bits.len() < at + seg_bytes {
                bits.resize(at + seg_bytes, 0);
            }
            let n = v.len().min(seg_bytes);
            bits[at..at + n].copy_from_slice(&v[..n]);
        }
        Ok(Some((p, bits)))
    }

    /// Whether NEW's file (new_dev, new_ino) is partly OLD's (no journal read).
    pub fn has_partial(&self, new_dev: u64, new_ino: u64) -> bool {
        self.partial_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(new_dev, new_ino))
    }

    /// Every file whose data is partly OLD's: (NEW dev, NEW ino, record).
    pub fn partials(&self) -> Result<Vec<(u64, u64, PartialFile)>> {
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(&[P_PARTIAL])? {
            let (Some(dev), Some(ino)) = (
                k.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                k.get(9..17).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            ) else {
                return Err(JournalError::Corrupt("partial file key".into()));
            };
            let p: PartialFile = serde_json::from_slice(&v)
                .map_err(|e| JournalError::Corrupt(format!("partial file: {e}")))?;
            out.push((u64::from_be_bytes(dev), u64::from_be_bytes(ino), p));
        }
        Ok(out)
    }

    /// Files partly OLD's and their chunks: (files, chunks NEW holds, chunks of OLD's data).
    pub fn partial_progress(&self) -> Result<(u64, u64, u64)> {
        let (mut files, mut present, mut total) = (0, 0, 0);
        for (dev, ino, _) in self.partials()? {
            let Some((p, bits)) = self.partial(dev, ino)? else {
                continue;
            };
            if p.bucket {
                continue;
            }
            let n = p.extent.div_ceil(p.chunk.max(1));
            let held = (0..n)
                .filter(|c| {
                    bits.get((c / 8) as usize)
                        .is_some_and(|b| b & (1 << (c % 8)) != 0)
                })
                .count() as u64;
            files += 1;
            present += held;
            total += n;
        }
        Ok((files, present, total))
    }

    /// The migration's chunk size of copy-before-write (`prepare --chunk-size`; 0: whole
    /// files only), [`DEFAULT_CHUNK_SIZE`] when prepare recorded none.
    pub fn chunk_size(&self) -> Result<u64> {
        match self.kv.get(&meta_key(Meta::ChunkSize))? {
            Some(v) => Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| JournalError::Corrupt("the chunk size record is not 8 bytes".into()),
            )?)),
            None => Ok(DEFAULT_CHUNK_SIZE),
        }
    }

    /// How many files are partly OLD's (no journal read; an S3 NEW's evicted files are not).
    pub fn partial_count(&self) -> u64 {
        let all = self
            .partial_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        all.saturating_sub(self.stub_count())
    }

    /// How many of an S3 NEW's files are evicted from the staging tree (no journal read).
    pub fn stub_count(&self) -> u64 {
        self.stub_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64
    }

    /// Whether NEW's file (new_dev, new_ino) is an S3 NEW's evicted file (no journal read).
    pub fn is_stub(&self, new_dev: u64, new_ino: u64) -> bool {
        self.stub_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(new_dev, new_ino))
    }

    /// The OLD path NEW's entry (new_dev, new_ino), changed through the view, came from.
    pub fn origin_of(&self, new_dev: u64, new_ino: u64) -> Result<Option<Vec<u8>>> {
        self.kv.get(&origin_key(new_dev, new_ino))
    }

    /// The view's number for NEW's inode (new_dev, new_ino), if it came from OLD (see
    /// [`Batch::view_ino`]).
    pub fn view_ino(&self, new_dev: u64, new_ino: u64) -> Result<Option<u64>> {
        let (block, low) = NumberCache::block_of(new_dev, new_ino);
        let mut c = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        if c.blocks.get(&block).is_none() {
            // The block's records share the key's first 16 bytes (prefix, dev, ino's high
            // bytes): one ordered scan, under the lock (see [`NumberCache`]).
            let key = view_ino_key(new_dev, new_ino);
            let prefix = &key[..key.len() - 1];
            let mut read = Vec::new();
            for (k, v) in self.kv.scan_after(prefix, None, 1 << NUMBER_BLOCK_BITS)? {
                let (Some(&l), Ok(n)) = (k.last(), <[u8; 8]>::try_from(v.as_slice())) else {
                    return Err(JournalError::Corrupt("view number record".into()));
                };
                read.push((l, u64::from_le_bytes(n)));
            }
            c.blocks.put(block, read);
        }
        let b = c.blocks.get(&block).expect("just cached");
        Ok(b.binary_search_by_key(&low, |&(l, _)| l)
            .ok()
            .map(|i| b[i].1))
    }

    /// Whether NEW took OLD's inode (dev, ino) at any time (whatever OLD did to it since).
    pub fn has_taken(&self, dev: u64, ino: u64) -> Result<bool> {
        Ok(self.kv.get(&taken_key(dev, ino))?.is_some())
    }

    /// Whether NEW took OLD's entry as `old` is now (same inode, same ctime): see
    /// [`Batch::taken`].
    pub fn was_taken(&self, old: &Fingerprint) -> Result<bool> {
        Ok(self.kv.get(&taken_key(old.dev, old.ino))?.is_some_and(|v| {
            v.len() >= 16
                && v[..8] == old.ctime.0.to_le_bytes()
                && v[8..16] == old.ctime.1.to_le_bytes()
        }))
    }

    /// NEW's copy (new_dev, new_ino) of OLD's inode (dev, ino), whatever OLD did to the inode
    /// since (a mark of an earlier version names none).
    pub fn taken_copy(&self, dev: u64, ino: u64) -> Result<Option<(u64, u64)>> {
        Ok(self.kv.get(&taken_key(dev, ino))?.and_then(|v| {
            let v: [u8; 32] = v.try_into().ok()?;
            let num = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
            Some((num(16), num(24)))
        }))
    }

    /// Every copy record: ((new_dev, new_ino), record).
    pub fn copies(&self) -> Result<Vec<((u64, u64), CopyRecord)>> {
        self.kv
            .scan(&[P_COPY])?
            .into_iter()
            .map(|(k, v)| {
                if k.len() != 17 {
                    return Err(JournalError::Corrupt("copy key".into()));
                }
                let dev = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
                let ino = u64::from_be_bytes(k[9..17].try_into().expect("8 bytes"));
                let r = serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corrupt(format!("copy record: {e}")))?;
                Ok(((dev, ino), r))
            })
            .collect()
    }

    /// Every JSON record under a one-byte prefix: (key without the prefix, record).
    /// The record at `key`, decoded (`what` names it in a corruption error).
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &str,
    ) -> Result<Option<T>> {
        self.kv
            .get(key)?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corrupt(format!("{what}: {e}")))
            })
            .transpose()
    }

    fn scan_json<T: serde::de::DeserializeOwned>(
        &self,
        prefix: u8,
        what: &str,
    ) -> Result<Vec<(Vec<u8>, T)>> {
        self.kv
            .scan(&[prefix])?
            .into_iter()
            .map(|(k, v)| {
                let r = serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corrupt(format!("{what}: {e}")))?;
                Ok((k[1..].to_vec(), r))
            })
            .collect()
    }

    /// The digest `verify --checksum` recorded for NEW's file (new_dev, new_ino).
    pub fn digest_of(&self, new_dev: u64, new_ino: u64) -> Result<Option<Digest>> {
        self.get_json(&digest_key(new_dev, new_ino), "digest record")
    }

    /// What the last verify found different: (view path, record).
    pub fn mismatches(&self) -> Result<Vec<(Vec<u8>, Mismatch)>> {
        self.scan_json(P_MISMATCH, "mismatch record")
    }

    /// Forget the last verify's differences (a new verify records its own).
    pub fn clear_mismatches(&self) -> Result<()> {
        let ops = self
            .kv
            .scan(&[P_MISMATCH])?
            .into_iter()
            .map(|(k, _)| KvOp::Delete(k))
            .collect();
        self.kv.write(ops, false)
    }

    /// Every recorded copy error: (view path, error).
    pub fn errors(&self) -> Result<Vec<(Vec<u8>, CopyError)>> {
        self.scan_json(P_ERROR, "error record")
    }

    /// Every entry found changed in OLD after its copy: (view path, record).
    pub fn stales(&self) -> Result<Vec<(Vec<u8>, StaleRecord)>> {
        self.scan_json(P_STALE, "stale record")
    }

    /// Every object the publisher put (or is putting) into an S3 NEW: (key, record).
    pub fn published(&self) -> Result<Vec<(String, Published)>> {
        Ok(self
            .scan_json(P_PUBLISHED, "published record")?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k).into_owned(), r))
            .collect())
    }

    /// At most `limit` publisher records whose keys sort after `after` ("" for the first),
    /// in key order (byte order, as S3 lists keys).
    /// The publisher's record of `key`, if any.
    pub fn published_one(&self, key: &str) -> Result<Option<Published>> {
        let mut k = vec![P_PUBLISHED];
        k.extend_from_slice(key.as_bytes());
        self.get_json::<Published>(&k, "published record")
    }

    pub fn published_after(&self, after: &str, limit: usize) -> Result<Vec<(String, Published)>> {
        let mut from = vec![P_PUBLISHED];
        from.extend_from_slice(after.as_bytes());
        let from = (!after.is_empty()).then_some(from.as_slice());
        self.kv
            .scan_after(&[P_PUBLISHED], from, limit)?
            .into_iter()
            .map(|(k, v)| {
                let r = serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corrupt(format!("published record: {e}")))?;
                Ok((String::from_utf8_lossy(&k[1..]).into_owned(), r))
            })
            .collect()
    }

    /// Every failed upload into an S3 NEW: (key, error).
    pub fn pub_errors(&self) -> Result<Vec<(String, CopyError)>> {
        Ok(self
            .scan_json(P_PUB_ERROR, "upload error record")?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k).into_owned(), r))
            .collect())
    }

    pub fn done(&self) -> Result<Done> {
        match self.meta(Meta::Done)? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| JournalError::Corrupt(format!("done counters: {e}"))),
            None => Ok(Done::default()),
        }
    }

    /// Remove every record that refers to OLD (dentries, hard-link groups, copy records,
    /// errors, intents): after commit or abort the view has one store only.
    pub fn clear_view_records(&self) -> Result<()> {
        let mut ops = Vec::new();
        for p in [
            P_DENTRY,
            P_HARDLINK,
            P_COPY_OF,
            P_COPY,
            P_ERROR,
            P_INTENT,
            P_TAKEN,
            P_DIGEST,
            P_MISMATCH,
            P_META_CHANGE,
            P_PARTIAL,
            P_CHUNKS,
        ] {
            for (k, _) in self.kv.scan(&[p])? {
                // An S3 NEW's evicted files are NEW's own, read from its bucket after commit
                // too.
                if matches!(p, P_PARTIAL | P_CHUNKS)
                    && let (Some(dev), Some(ino)) = (
                        k.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                        k.get(9..17).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                    )
                    && self.is_stub(u64::from_be_bytes(dev), u64::from_be_bytes(ino))
                {
                    continue;
                }
                ops.push(KvOp::Delete(k));
                if ops.len() >= 10_000 {
                    self.kv.write(std::mem::take(&mut ops), false)?;
                }
            }
        }
        self.kv.write(ops, true)?;
        self.has_groups.store(false, Ordering::Relaxed);
        self.meta_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        {
            let stubs = self.stub_keys.lock().unwrap_or_else(|p| p.into_inner());
            self.partial_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|k| stubs.contains(k));
        }
        Ok(())
    }

    pub fn counts(&self) -> Result<RecordCounts> {
        let mut c = RecordCounts::default();
        for (_, v) in self.kv.scan(&[P_DENTRY])? {
            match Dentry::decode(&v)? {
                Dentry::Tombstone => c.tombstones += 1,
                Dentry::Dir { .. } => c.dirs += 1,
                Dentry::File { .. } => c.redirects += 1,
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dentry_roundtrip() {
        for d in [
            Dentry::Tombstone,
            Dentry::Dir {
                id: 7,
                origin: None,
            },
            Dentry::Dir {
                id: u64::MAX,
                origin: Some(b"a/b\n\xff".to_vec()),
            },
            Dentry::File {
                origin: Some(vec![]),
            },
            Dentry::File { origin: None },
        ] {
            assert_eq!(Dentry::decode(&d.encode()).unwrap(), d);
        }
        assert!(Dentry::decode(&[9]).is_err());
        assert!(Dentry::decode(&[1, 0]).is_err());
    }

    #[test]
    fn batch_is_atomic_and_ids_survive_reopen() {
        let kv: Arc<dyn Journal> = Arc::new(mem::MemJournal::default());
        let j = Records::new(kv.clone()).unwrap();
        let id = j.alloc_id();
        let mut b = Batch::new();
        b.put(
            ROOT_DIR,
            b"d",
            &Dentry::Dir {
                id,
                origin: Some(b"d".to_vec()),
            },
        )
        .put(id, b"x", &Dentry::Tombstone);
        j.commit(b, true).unwrap();
        assert_eq!(
            j.list(id).unwrap(),
            vec![(b"x".to_vec(), Dentry::Tombstone)]
        );
        // A reopened journal never hands out an id already recorded.
        let j2 = Records::new(kv).unwrap();
        assert!(j2.alloc_id() > id);
        assert_eq!(j2.counts().unwrap().tombstones, 1);
    }

    #[test]
    fn partial_files_and_their_chunk_maps_survive_reopen_and_go_whole() {
        let kv: Arc<dyn Journal> = Arc::new(mem::MemJournal::default());
        let j = Records::new(kv.clone()).unwrap();
        let rec = PartialFile {
            origin: b"big.bin".to_vec(),
            old: Fingerprint::default(),
            chunk: 4096,
            extent: 4096 * 5000 + 1,
            handle: vec![1, 2, 3],
            etag: None,
            bucket: false,
            abort_put: false,
        };
        assert!(!j.has_partial(9, 10));
        let mut b = Batch::new();
        b.partial(9, 10, &rec);
        j.commit(b, true).unwrap();
        // Chunk 3 and chunk 4097 (the second segment).
        let mut seg0 = vec![0u8; 512];
        seg0[0] = 1 << 3;
        let mut seg1 = vec![0u8; 512];
        seg1[0] = 1 << 1;
        let mut b = Batch::new();
        b.chunks(9, 10, 0, &seg0).chunks(9, 10, 1, &seg1);
        j.commit(b, false).unwrap();
        // Another file's records stay apart.
        let mut b = Batch::new();
        b.partial(9, 11, &rec);
        j.commit(b, false).unwrap();
        let again = Records::new(kv.clone()).unwrap();
        assert!(again.has_partial(9, 10) && again.has_partial(9, 11));
        assert_eq!(again.partial_count(), 2);
        let (got, bits) = again.partial(9, 10).unwrap().unwrap();
        assert_eq!(got, rec);
        assert_eq!(bits.len(), 1024);
        assert_eq!((bits[0], bits[512]), (1 << 3, 1 << 1));
        assert_eq!(again.partial_progress().unwrap(), (2, 2, 2 * 5001));
        let mut b = Batch::new();
        b.clear_partial(9, 10, 2);
        again.commit(b, false).unwrap();
        assert!(!again.has_partial(9, 10));
        assert!(again.partial(9, 10).unwrap().is_none());
        let last = Records::new(kv).unwrap();
        assert_eq!(last.partials().unwrap().len(), 1);
        assert_eq!(last.partial_progress().unwrap(), (1, 0, 5001));
    }

    #[test]
    fn evicted_files_are_not_partial_copies_and_outlive_commit() {
        let kv: Arc<dyn Journal> = Arc::new(mem::MemJournal::default());
        let j = Records::new(kv.clone()).unwrap();
        let rec = |bucket| PartialFile {
            origin: b"k".to_vec(),
            old: Fingerprint::default(),
            chunk: 4096,
            extent: 10_000,
            handle: vec![1],
            etag: Some("e".into()),
            bucket,
            abort_put: false,
        };
        let mut b = Batch::new();
        b.partial(1, 1, &rec(false)).partial(1, 2, &rec(true));
        b.chunks(1, 2, 0, &[1]);
        j.commit(b, true).unwrap();
        assert_eq!((j.partial_count(), j.stub_count()), (1, 1));
        assert!(j.is_stub(1, 2) && !j.is_stub(1, 1));
        // Counted again from the records by the next open.
        let again = Records::new(kv.clone()).unwrap();
        assert_eq!((again.partial_count(), again.stub_count()), (1, 1));
        assert_eq!(again.partial_progress().unwrap().0, 1);
        again.clear_view_records().unwrap();
        assert_eq!((again.partial_count(), again.stub_count()), (0, 1));
        let (kept, bits) = again
            .partial(1, 2)
            .unwrap()
            .expect("the evicted file's record");
        assert!(kept.bucket && bits.first() == Some(&1));
        assert!(again.partial(1, 1).unwrap().is_none());
        let last = Records::new(kv).unwrap();
        assert_eq!((last.partial_count(), last.stub_count()), (0, 1));
        // Dropped (the file made whole, or removed): neither count keeps it.
        let mut b = Batch::new();
        b.clear_partial(1, 2, 1);
        last.commit(b, true).unwrap();
        assert_eq!((last.partial_count(), last.stub_count()), (0, 0));
    }

    #[test]
    fn base64_roundtrip() {
        for len in 0..40 {
            let v: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(bytes_b64::decode(&bytes_b64::encode(&v)).unwrap(), v);
        }
        assert_eq!(bytes_b64::encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(bytes_b64::encode(b"fo"), "Zm8=");
    }

    #[test]
    fn copy_records_roundtrip_and_clear() {
        let j = Records::new(Arc::new(mem::MemJournal::default())).unwrap();
        let rec = CopyRecord {
            origin: b"a/\xff\n".to_vec(),
            fp: Fingerprint {
                size: 9,
                ..Default::default()
            },
            handle: vec![1, 2, 3],
            is_dir: false,
        };
        let mut b = Batch::new();
        b.copy(1, 2, &rec).done(&Done {
            dirs: 0,
            files: 1,
            bytes: 9,
        });
        j.commit(b, false).unwrap();
        assert_eq!(j.copy(1, 2).unwrap(), Some(rec.clone()));
        assert_eq!(j.copies().unwrap(), vec![((1, 2), rec)]);
        assert_eq!(j.done().unwrap().bytes, 9);
        j.clear_view_records().unwrap();
        assert!(j.copies().unwrap().is_empty());
    }

    #[test]
    fn list_does_not_leak_into_neighbour_dirs() {
        let j = Records::new(Arc::new(mem::MemJournal::default())).unwrap();
        let mut b = Batch::new();
        b.put(1, b"a", &Dentry::Tombstone)
            .put(2, b"b", &Dentry::Tombstone)
            .put(256, b"c", &Dentry::Tombstone);
        j.commit(b, false).unwrap();
        assert_eq!(j.list(1).unwrap().len(), 1);
        assert_eq!(j.list(2).unwrap()[0].0, b"b");
    }

    #[test]
    fn metadata_changes_are_known_by_old_inode_across_a_reopen_until_cleared() {
        let kv = Arc::new(mem::MemJournal::default());
        let j = Records::new(kv.clone()).unwrap();
        assert_eq!(j.meta_change(3, 4).unwrap(), None);
        let m = MetaChange {
            mode: Some(0o600),
            ctime: (5, 6),
            xattrs: [
                (b"user.a".to_vec(), None),
                (b"user.b".to_vec(), Some(b"v".to_vec())),
            ]
            .into(),
            ..MetaChange::default()
        };
        let mut b = Batch::new();
        b.meta_change(3, 4, &m).meta_change(3, 5, &m);
        j.commit(b, true).unwrap();
        assert_eq!(j.meta_change(3, 4).unwrap(), Some(m.clone()));
        assert_eq!(j.meta_changes().unwrap(), 2);
        // A reader opened later knows them from the journal alone.
        let again = Records::new(kv.clone()).unwrap();
        assert_eq!(again.meta_change(3, 5).unwrap(), Some(m.clone()));
        assert_eq!(again.meta_changes().unwrap(), 2);
        let mut b = Batch::new();
        b.clear_meta_change(3, 4);
        j.commit(b, false).unwrap();
        assert_eq!(j.meta_change(3, 4).unwrap(), None);
        assert_eq!(j.meta_changes().unwrap(), 1);
        j.clear_view_records().unwrap();
        assert_eq!(j.meta_change(3, 5).unwrap(), None);
        assert_eq!(Records::new(kv).unwrap().meta_changes().unwrap(), 0);
    }

    #[test]
    fn view_numbers_read_by_block_follow_every_later_write() {
        let kv = Arc::new(mem::MemJournal::default());
        let j = Records::new(kv.clone()).unwrap();
        let mut b = Batch::new();
        // Neighbours in one block, the blocks on each side, and another device.
        b.view_ino(5, 0x1ff, 1)
            .view_ino(5, 0x200, 2)
            .view_ino(5, 0x2ff, 3)
            .view_ino(5, 0x300, 4)
            .view_ino(6, 0x200, 5);
        j.commit(b, false).unwrap();
        assert_eq!(j.view_ino(5, 0x200).unwrap(), Some(2));
        assert_eq!(j.view_ino(5, 0x201).unwrap(), None);
        assert_eq!(j.view_ino(5, 0x2ff).unwrap(), Some(3));
        assert_eq!(j.view_ino(5, 0x1ff).unwrap(), Some(1));
        assert_eq!(j.view_ino(5, 0x300).unwrap(), Some(4));
        assert_eq!(j.view_ino(6, 0x200).unwrap(), Some(5));
        assert_eq!(j.view_ino(6, 0x2ff).unwrap(), None);
        // Written after its block was read: the cached block follows.
        let mut b = Batch::new();
        b.view_ino(5, 0x201, 7).view_ino(5, 0x200, 8);
        j.commit(b, false).unwrap();
        assert_eq!(j.view_ino(5, 0x201).unwrap(), Some(7));
        assert_eq!(j.view_ino(5, 0x200).unwrap(), Some(8));
        // What the cache answers is what the journal holds (a fresh reader agrees).
        let fresh = Records::new(kv).unwrap();
        for ino in [0x1ff, 0x200, 0x201, 0x202, 0x2ff, 0x300] {
            assert_eq!(fresh.view_ino(5, ino).unwrap(), j.view_ino(5, ino).unwrap());
        }
    }

    #[test]
    fn an_entry_taken_is_known_by_its_old_inode_and_ctime_until_cleared() {
        let j = Records::new(Arc::new(mem::MemJournal::default())).unwrap();
        let fp = Fingerprint {
            dev: 7,
            ino: 42,
            size: 3,
            mtime: (10, 1),
            ctime: (11, 2),
        };
        assert!(!j.was_taken(&fp).unwrap());
        assert_eq!(j.taken_copy(7, 42).unwrap(), None);
        let mut b = Batch::new();
        b.taken(&fp, 9, 99);
        j.commit(b, false).unwrap();
        assert!(j.was_taken(&fp).unwrap());
        assert_eq!(j.taken_copy(7, 42).unwrap(), Some((9, 99)));
        // The same inode number changed since (another file, or OLD changed it): not taken.
        assert!(
            !j.was_taken(&Fingerprint {
                ctime: (11, 3),
                ..fp
            })
            .unwrap()
        );
        assert!(!j.was_taken(&Fingerprint { ino: 43, ..fp }).unwrap());
        let mut b = Batch::new();
        b.clear_taken(7, 42);
        j.commit(b, false).unwrap();
        assert!(!j.was_taken(&fp).unwrap());
        let mut b = Batch::new();
        b.taken(&fp, 9, 99);
        j.commit(b, false).unwrap();
        j.clear_view_records().unwrap();
        assert!(!j.was_taken(&fp).unwrap());
    }
}
