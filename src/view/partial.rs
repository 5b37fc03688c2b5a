//! Copy-before-write by chunk (rule 3): the first change to the data of a big file still in
//! OLD does not copy the whole file first.
//!
//! The copy-up makes NEW's file with OLD's size and metadata but no data (a sparse file), its
//! [`PartialFile`] record journaled durably before the file gets its name. From then on the
//! file's data is split in chunks (`prepare --chunk-size`): a chunk NEW holds is *present* in
//! the chunk map; every other chunk below the map's extent is read from OLD's file. A write
//! copies the chunks it touches only partly from OLD into NEW first (copy-before-write), makes
//! them durable, marks them present, and then writes; a chunk it covers whole is written and
//! marked without a copy. The copier hydrates the absent chunks in the background; once none
//! is absent the record goes and the file is an ordinary NEW file (passthrough applies again).
//!
//! Order of durability, the invariant a crash relies on: a chunk is marked present only after
//! NEW's bytes for it are on stable storage (fdatasync), so a mark the journal kept always
//! names NEW bytes that survived too. A mark lost (kill -9 before the journal wrote it) leaves
//! the chunk read from OLD, which is what it held before the unacknowledged write.
//!
//! Only what applications cannot tell apart is simplified: a partial file reports no holes
//! (SEEK_DATA / SEEK_HOLE see it as all data), as an S3 object does.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::View;
use super::inode::Inode;
use crate::journal::{Batch, CHUNKS_PER_SEGMENT, Fingerprint, PartialFile, Records};
use crate::store::copy::Tick;
use crate::store::{Source, posix};
use crate::view::error::{Context, Error, Result, errno_err};

/// Chunks hydrated between two fdatasyncs of NEW's file (and one journal write of their marks).
const HYDRATE_BATCH_BYTES: u64 = 64 << 20;

/// Order of the last write to each partial file: the copier hydrates the latest first.
static WRITES: AtomicU64 = AtomicU64::new(1);

/// A mark in the order of writes: a partial file whose [`Partial::written_after`] this is
/// false for was not written (through the view) since it was taken.
pub fn write_mark() -> u64 {
    WRITES.fetch_add(1, Ordering::Relaxed)
}

/// A file whose data is partly still OLD's, as the view holds it while the file is in use.
pub(crate) struct Partial {
    /// NEW's (st_dev, st_ino): the journal's key.
    pub(crate) key: (u64, u64),
    pub(crate) chunk: u64,
    /// What the journal records (its extent follows `map`; an S3 NEW's evicted file's origin
    /// and ETag follow its uploads, see [`Self::repoint`]).
    rec: std::sync::Mutex<PartialFile>,
    /// OLD's file, open read-only, or an S3 object (read by ranged GETs conditional on the
    /// ETag it was opened at): the absent chunks' bytes. Replaced only under the map's write
    /// lock, by [`Self::repoint`].
    old: RwLock<Source>,
    /// NEW's file, open read-write (never O_APPEND): every read and write of the file's
    /// bytes goes through it, under the map's lock.
    new: File,
    map: RwLock<Map>,
    /// OLD's file as the chunks read from it must find it (the record's, until an abort
    /// writes the view's chunks into it).
    old_fp: std::sync::Mutex<Fingerprint>,
    /// The file left NEW (its last name removed, its record dropped): nothing more is
    /// journaled for it; open files keep reading and writing it as it is.
    detached: AtomicBool,
    /// Marks were journaled without a sync since the last [`Self::sync_marks`].
    unsynced: AtomicBool,
    /// [`WRITES`] at the file's last write through the view.
    pub(crate) last_write: AtomicU64,
}

/// The chunk map: which chunks NEW holds.
struct Map {
    /// Bytes from 0 that may still be OLD's (see [`PartialFile::extent`]).
    extent: u64,
    /// One bit a chunk (bit i of byte j: chunk 8j + i).
    bits: Vec<u8>,
    /// Chunks below the extent that NEW does not hold yet.
    missing: u64,
}

impl Map {
    fn needed(&self, chunk: u64) -> u64 {
        self.extent.div_ceil(chunk)
    }
    fn present(&self, c: u64) -> bool {
        self.bits
            .get((c / 8) as usize)
            .is_some_and(|b| b & (1 << (c % 8)) != 0)
    }
    /// Whether chunk `c` must still come from OLD.
    fn absent(&self, c: u64, chunk: u64) -> bool {
        c < self.needed(chunk) && !self.present(c)
    }
    fn set(&mut self, c: u64, chunk: u64) {
        let i = (c / 8) as usize;
        if self.bits.len() <= i {
            self.bits.resize(i + 1, 0);
        }
        if self.absent(c, chunk) {
            self.missing -= 1;
        }
        self.bits[i] |= 1 << (c % 8);
    }
    fn recount(&mut self, chunk: u64) {
        let n = self.needed(chunk);
        self.missing = (0..n).filter(|&c| !self.present(c)).count() as u64;
    }
    /// The bytes of chunk-map record `seg` (512 bytes, zero-padded).
    fn segment(&self, seg: u64) -> Vec<u8> {
        let len = (CHUNKS_PER_SEGMENT / 8) as usize;
        let from = seg as usize * len;
        let mut out = vec![0; len];
        if from < self.bits.len() {
            let n = (self.bits.len() - from).min(len);
            out[..n].copy_from_slice(&self.bits[from..from + n]);
        }
        out
    }
}

/// What an upload read of a file, for an eviction after it: the file is evicted only if it
/// still has this size and mtime, and was not written through the view after `mark` (a write
/// in the same timestamp tick as the upload's look would not show in the mtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unchanged {
    pub size_mtime: (u64, (i64, u32)),
    pub mark: u64,
}

/// A partial file's chunk progress, for status: (chunks NEW holds, chunks of OLD's data).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkProgress {
    pub files: u64,
    pub present: u64,
    pub total: u64,
}

impl Partial {
    /// The partial file of journal record `rec`, with OLD's file `old` and chunk map `bits`.
    pub(crate) fn new(
        key: (u64, u64),
        rec: PartialFile,
        old: Source,
        new: File,
        bits: Vec<u8>,
    ) -> Partial {
        let mut map = Map {
            extent: rec.extent,
            bits,
            missing: 0,
        };
        map.recount(rec.chunk);
        let fp = rec.old;
        Partial {
            key,
            chunk: rec.chunk,
            rec: std::sync::Mutex::new(rec),
            old: RwLock::new(old),
            new,
            old_fp: std::sync::Mutex::new(fp),
            map: RwLock::new(map),
            detached: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            last_write: AtomicU64::new(0),
        }
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
    fn source(&self) -> Source {
        self.old.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn record(&self) -> PartialFile {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the file was written (or cut, or had a range punched) through the view since
    /// `mark` ([`write_mark`]) was taken.
    pub(crate) fn written_after(&self, mark: u64) -> bool {
        self.last_write.load(Ordering::Relaxed) > mark
    }

    /// An S3 NEW's evicted file: its absent chunks are in NEW's bucket, never hydrated.
    pub(crate) fn is_stub(&self) -> bool {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).bucket
    }

    /// Whether every chunk [off, off + len) touches is absent and below the extent.
    pub(crate) fn all_absent(&self, off: u64, len: u64) -> bool {
        let m = self.map();
        len > 0
            && off + len <= m.extent
            && (off / self.chunk..=(off + len - 1) / self.chunk).all(|c| m.absent(c, self.chunk))
    }

    /// The chunk map and record: (extent, chunk-map bytes, record).
    pub(crate) fn snapshot(&self) -> (u64, Vec<u8>, PartialFile) {
        let m = self.map();
        (m.extent, m.bits.clone(), self.record())
    }

    /// An S3 NEW's evicted file whose bytes the bucket now holds at `key` (version `etag`,
    /// `size` bytes, `object` open on it), as an upload read them: its absent chunks are read
    /// from there from now on. They are the same bytes at the same offsets whatever changed
    /// since (a chunk written meanwhile is present, a cut lowers the extent), so this holds
    /// even for a file changed during the upload. With `evict` = what the upload read, and the
    /// file still so ([`Unchanged`]), the chunks the staging tree holds go too (holes punched)
    /// and every chunk is read from the bucket (`Ok(true)`). The record first, durably: a
    /// crash before the holes leaves chunks read from the bucket that the staging tree
    /// still holds (the next eviction frees them), never a hole taken for data.
    pub(crate) fn repoint(
        &self,
        journal: &Records,
        key: &str,
        etag: &str,
        size: u64,
        object: Source,
        evict: Option<Unchanged>,
    ) -> Result<bool> {
        let mut m = self.map_mut();
        if self.detached.load(Ordering::Acquire) {
            return Ok(false);
        }
        let st = posix::stat_fd(self.new.as_fd()).ctx("fstat NEW file")?;
        #[allow(clippy::unnecessary_cast)]
        let now = (
            st.st_size as u64,
            (st.st_mtime as i64, st.st_mtime_nsec as u32),
        );
        let punch = evict.is_some_and(|u| u.size_mtime == now && !self.written_after(u.mark));
        let segs = segments(m.bits.len());
        let mut rec = self.record();
        rec.origin = key.as_bytes().to_vec();
        rec.etag = Some(etag.to_string());
        rec.old = Fingerprint {
            size,
            ..Default::default()
        };
        rec.bucket = true;
        let mut b = Batch::new();
        if punch {
            m.extent = now.0;
            m.bits.clear();
            m.recount(self.chunk);
            // (Every chunk-map record goes with the old record; the new one has none.)
            b.clear_partial(self.key.0, self.key.1, segs.max(1));
        }
        rec.extent = m.extent;
        b.partial(self.key.0, self.key.1, &rec);
        journal.commit(b, true)?;
        *self.rec.lock().unwrap_or_else(|p| p.into_inner()) = rec;
        *self.old.write().unwrap_or_else(|p| p.into_inner()) = object;
        if punch {
            punch_keeping_mtime(&self.new, &st)?;
        }
        Ok(punch)
    }

    /// The file's bytes at `off`, exactly `buf.len()` of them (ESTALE: it is shorter now).
    pub(crate) fn read_exact(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .read(off + done as u64, &mut buf[done..])
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
            }
            done += n;
        }
        Ok(())
    }

    /// The S3 object the absent chunks are read from (store, key, ETag), if they are one's.
    pub(crate) fn object_source(&self) -> Option<(Arc<crate::store::s3::S3Store>, String, String)> {
        match self.source() {
            Source::Object(o) => Some((o.store().clone(), o.info.rel.clone(), o.info.etag.clone())),
            Source::File(_) => None,
        }
    }

    /// NEW's file's link count.
    pub(crate) fn links(&self) -> u64 {
        #[allow(clippy::unnecessary_cast)]
        posix::stat_fd(self.new.as_fd()).map_or(0, |st| st.st_nlink as u64)
    }

    /// The record changed by `change`, durably, and the absent chunks read from `old` from
    /// then on when given (nothing for a file that left NEW).
    fn rerecord(
        &self,
        journal: &Records,
        change: impl FnOnce(&mut PartialFile),
        old: Option<Source>,
    ) -> Result<()> {
        let m = self.map_mut();
        if self.detached.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut rec = self.record();
        change(&mut rec);
        rec.extent = m.extent;
        let mut b = Batch::new();
        b.partial(self.key.0, self.key.1, &rec);
        journal.commit(b, true)?;
        *self.rec.lock().unwrap_or_else(|p| p.into_inner()) = rec;
        if let Some(old) = old {
            *self.old.write().unwrap_or_else(|p| p.into_inner()) = old;
        }
        Ok(())
    }

    /// Chunks still OLD's.
    pub(crate) fn missing(&self) -> u64 {
        self.map().missing
    }

    /// (present, total) chunks of OLD's data.
    pub(crate) fn progress(&self) -> (u64, u64) {
        let m = self.map();
        let n = m.needed(self.chunk);
        (n - m.missing, n)
    }

    /// OLD's file must still be the one the record names, with the same data: chunks read
    /// from it are the file's bytes only then.
    fn check_old(&self) -> Result<()> {
        let Source::File(old) = self.source() else {
            // An object is read at its ETag: one replaced fails its reads with ESTALE.
            return Ok(());
        };
        let st = posix::stat_fd(old.as_fd()).ctx("stat OLD file")?;
        let now = Fingerprint::of(&st);
        let was = *self.old_fp.lock().unwrap_or_else(|p| p.into_inner());
        if (now.dev, now.ino, now.size, now.mtime) != (was.dev, was.ino, was.size, was.mtime) {
            return Err(errno_err(
                "OLD's file changed behind the view while its data was partly copied into NEW \
                 (the chunks not copied yet are no longer the file's); restore OLD's file or \
                 remove the file through the view",
                libc::EIO,
            ));
        }
        Ok(())
    }

    /// Read OLD's bytes of chunk `c` (up to the extent) at their offset into `new`.
    fn copy_chunk(&self, m: &Map, c: u64, buf: &mut Vec<u8>) -> Result<u64> {
        let start = c * self.chunk;
        let end = ((c + 1) * self.chunk).min(m.extent);
        if end <= start {
            return Ok(0);
        }
        // OLD's holes stay holes (rule 10): data ranges are copied, hole ranges punched in
        // NEW (whatever NEW's bytes there were, they read as zeros after).
        let mut at = start;
        let mut copied = 0;
        let old = self.source();
        while at < end {
            let data = match &old {
                Source::File(old) => match rustix::fs::seek(old, rustix::fs::SeekFrom::Data(at)) {
                    Ok(d) => d.min(end),
                    Err(rustix::io::Errno::NXIO) => end,
                    // (A file system without SEEK_DATA: all data.)
                    Err(_) => at,
                },
                // An object is all data.
                Source::Object(_) => at,
            };
            if data > at {
                self.zero_range(at, data - at, buf)?;
                at = data;
                continue;
            }
            let hole = match &old {
                Source::File(old) => match rustix::fs::seek(old, rustix::fs::SeekFrom::Hole(at)) {
                    Ok(h) => h.clamp(at + 1, end),
                    Err(_) => end,
                },
                Source::Object(_) => end,
            };
            let len = (hole - at) as usize;
            buf.resize(len, 0);
            self.read_old(&mut buf[..len], at)?;
            self.new
                .write_all_at(&buf[..len], at)
                .ctx("write chunk into NEW")?;
            copied += len as u64;
            at = hole;
        }
        self.check_old()?;
        Ok(copied)
    }

    /// Make NEW's bytes [at, at + len) zeros: a hole punched, or zeros written where NEW's
    /// file system punches none.
    fn zero_range(&self, at: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        match rustix::fs::fallocate(
            &self.new,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            at,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(_) => {
                let mut off = at;
                while off < at + len {
                    let n = (at + len - off).min(1 << 20) as usize;
                    buf.clear();
                    buf.resize(n, 0);
                    self.new
                        .write_all_at(&buf[..n], off)
                        .ctx("write zeros into NEW")?;
                    off += n as u64;
                }
                Ok(())
            }
        }
    }

    /// OLD's bytes at `at`, exactly: OLD's file shorter than the record says (changed behind
    /// the view) is EIO, never a short read taken for the file's end.
    fn read_old(&self, out: &mut [u8], at: u64) -> Result<()> {
        // (Borrowed, not cloned: every read of an absent chunk comes here. The map's lock,
        // which callers hold, orders this before any repoint.)
        let src = self.old.read().unwrap_or_else(|p| p.into_inner());
        let mut done = 0;
        while done < out.len() {
            let n = match src.read_at(&mut out[done..], at + done as u64) {
                Ok(n) => n,
                // The object replaced or removed since (another client): its bytes are not
                // the file's any more.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                    return Err(errno_err(
                        "the object holding this file's chunks was replaced or removed behind \
                         the view",
                        libc::EIO,
                    ));
                }
                Err(e) => return Err(e).ctx("read a chunk"),
            };
            if n == 0 {
                return Err(errno_err(
                    "OLD's file is shorter than when its copy began (changed behind the view)",
                    libc::EIO,
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Journal the chunk-map records covering chunks `cs` (already set in `m`).
    fn journal_marks(&self, journal: &Records, m: &Map, cs: &[u64]) -> Result<()> {
        if self.detached.load(Ordering::Acquire) || cs.is_empty() {
            return Ok(());
        }
        let mut segs: Vec<u64> = cs.iter().map(|c| c / CHUNKS_PER_SEGMENT).collect();
        segs.sort_unstable();
        segs.dedup();
        let mut b = Batch::new();
        for seg in segs {
            b.chunks(self.key.0, self.key.1, seg, &m.segment(seg));
        }
        self.unsynced.store(true, Ordering::Release);
        journal.commit(b, false)?;
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`: present chunks and bytes past the extent from NEW,
    /// the rest from OLD. Returns the length read (short at NEW's end of file).
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = posix::stat_fd(self.new.as_fd())
            .ctx("fstat NEW file")?
            .st_size as u64;
        let end = (offset + buf.len() as u64).min(size);
        if end <= offset {
            return Ok(0);
        }
        let m = self.map();
        let mut at = offset;
        let mut from_old = false;
        while at < end {
            let c = at / self.chunk;
            let piece_end = ((c + 1) * self.chunk).min(end);
            let out = &mut buf[(at - offset) as usize..(piece_end - offset) as usize];
            if m.absent(c, self.chunk) && at < m.extent {
                from_old = true;
                let old_end = piece_end.min(m.extent);
                let n = (old_end - at) as usize;
                self.read_old(&mut out[..n], at)?;
                if n < out.len() {
                    read_full_at(&self.new, &mut out[n..], old_end)?;
                }
            } else {
                read_full_at(&self.new, out, at)?;
            }
            at = piece_end;
        }
        drop(m);
        if from_old {
            // A change of OLD's file shows here rather than as a mix of two versions.
            self.check_old()?;
        }
        Ok((end - offset) as usize)
    }

    /// Before NEW's bytes [offset, offset + len) change (a write, a hole punched, a range
    /// zeroed): copy the absent chunks the range covers only partly from OLD, make them
    /// durable and mark them present. Returns the absent chunks the range covers whole: the
    /// caller marks them with [`Self::covered`] once its change is made.
    fn before_change(
        &self,
        journal: &Records,
        m: &mut Map,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>> {
        if len == 0 || offset >= m.extent {
            return Ok(Vec::new());
        }
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        let mut whole = Vec::new();
        let mut copied = Vec::new();
        let mut buf = Vec::new();
        for c in first..=last {
            if !m.absent(c, self.chunk) {
                continue;
            }
            let start = c * self.chunk;
            let old_end = ((c + 1) * self.chunk).min(m.extent);
            if offset <= start && offset + len >= old_end {
                whole.push(c);
            } else {
                self.copy_chunk(m, c, &mut buf)?;
                copied.push(c);
            }
        }
        if !copied.is_empty() {
            self.new.sync_data().ctx("fdatasync NEW chunks")?;
            for &c in &copied {
                m.set(c, self.chunk);
            }
            self.journal_marks(journal, m, &copied)?;
        }
        Ok(whole)
    }

    /// The chunks a change covered whole now hold NEW's bytes: durable, then marked.
    fn covered(&self, journal: &Records, m: &mut Map, whole: &[u64]) -> Result<()> {
        if whole.is_empty() {
            return Ok(());
        }
        self.new.sync_data().ctx("fdatasync NEW chunks")?;
        for &c in whole {
            m.set(c, self.chunk);
        }
        self.journal_marks(journal, m, whole)
    }

    /// Write `data` at `offset` (at NEW's end for an `O_APPEND` file).
    pub(crate) fn write(
        &self,
        journal: &Records,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> Result<()> {
        self.last_write
            .store(WRITES.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        if !append {
            // Every chunk the write touches is NEW's already: no copy, no mark, and no need
            // to keep reads of other chunks (or hydration of absent ones) waiting.
            let m = self.map();
            let len = data.len() as u64;
            let touches_old = len > 0
                && offset < m.extent
                && (offset / self.chunk..=(offset + len - 1) / self.chunk)
                    .any(|c| m.absent(c, self.chunk));
            if !touches_old {
                self.new.write_all_at(data, offset).ctx("write")?;
                return Ok(());
            }
        }
        let mut m = self.map_mut();
        let offset = if append {
            posix::stat_fd(self.new.as_fd())
                .ctx("fstat NEW file")?
                .st_size as u64
        } else {
            offset
        };
        let whole = self.before_change(journal, &mut m, offset, data.len() as u64)?;
        // (An O_APPEND write lands at the end found above: every write of a partial file
        // goes through this lock.)
        self.new.write_all_at(data, offset).ctx("write")?;
        self.covered(journal, &mut m, &whole)
    }

    /// Set NEW's size to `size`. A cut inside an absent chunk copies that chunk's head from
    /// OLD first; the extent comes down to the new size (what was past it is gone for good).
    pub(crate) fn truncate(&self, journal: &Records, size: u64) -> Result<()> {
        self.last_write
            .store(WRITES.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        let mut m = self.map_mut();
        if size < m.extent {
            let c = size / self.chunk;
            if size % self.chunk != 0 && m.absent(c, self.chunk) {
                let mut buf = Vec::new();
                self.copy_chunk(&m, c, &mut buf)?;
                self.new.sync_data().ctx("fdatasync NEW chunk")?;
                m.set(c, self.chunk);
                self.journal_marks(journal, &m, &[c])?;
            }
            // NEW first: a crash before the record's update leaves NEW shorter than the
            // extent, which the next mount reads as this truncate (see `load`).
            self.new.set_len(size).ctx("ftruncate")?;
            m.extent = size;
            m.recount(self.chunk);
            self.journal_extent(journal, m.extent, false)?;
        } else {
            self.new.set_len(size).ctx("ftruncate")?;
        }
        Ok(())
    }

    /// An fsync of the file: the chunk map on stable storage too (NEW's bytes are, and a
    /// mark lost in a power cut would read back OLD's bytes over them).
    pub(crate) fn sync_marks(&self, journal: &Records) -> Result<()> {
        if self.unsynced.swap(false, Ordering::AcqRel) {
            let extent = self.map().extent;
            self.journal_extent(journal, extent, true)?;
        }
        Ok(())
    }

    fn journal_extent(&self, journal: &Records, extent: u64, durable: bool) -> Result<()> {
        if self.detached.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut b = Batch::new();
        b.partial(
            self.key.0,
            self.key.1,
            &PartialFile {
                extent,
                old: *self.old_fp.lock().unwrap_or_else(|p| p.into_inner()),
                ..self.record()
            },
        );
        if !durable {
            self.unsynced.store(true, Ordering::Release);
        }
        journal.commit(b, durable)?;
        Ok(())
    }

    /// fallocate on NEW's file: a hole punched or a range zeroed is a change of those bytes
    /// (copy-before-write at its edges); a plain allocation changes no byte.
    pub(crate) fn fallocate(
        &self,
        journal: &Records,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<()> {
        self.last_write
            .store(WRITES.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        let mut m = self.map_mut();
        let changes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let whole = if changes {
            self.before_change(journal, &mut m, offset, len)?
        } else {
            Vec::new()
        };
        rustix::fs::fallocate(
            &self.new,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            offset,
            len,
        )
        .ctx("fallocate")?;
        self.covered(journal, &mut m, &whole)
    }

    /// Copy every absent chunk into NEW (the copier's hydration, paced by `tick`; `false`
    /// from it stops). Returns the bytes copied and whether the file is whole now.
    pub(crate) fn hydrate(&self, journal: &Records, tick: Tick<'_>) -> Result<(u64, bool)> {
        let mut bytes = 0;
        let mut pending: Vec<u64> = Vec::new();
        let mut pending_bytes = 0;
        let mut buf = Vec::new();
        let mut c = 0;
        let flush = |pending: &mut Vec<u64>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            self.new.sync_data().ctx("fdatasync NEW chunks")?;
            let mut m = self.map_mut();
            for &c in pending.iter() {
                m.set(c, self.chunk);
            }
            self.journal_marks(journal, &m, pending)?;
            pending.clear();
            Ok(())
        };
        loop {
            let (next, end) = {
                let m = self.map();
                let n = m.needed(self.chunk);
                // (Chunks below `c` were copied or are pending: never looked at again.)
                let next = (c..n).find(|&c| m.absent(c, self.chunk));
                (next, n)
            };
            let Some(next) = next else { break };
            c = next;
            if !tick(0) {
                flush(&mut pending)?;
                return Ok((bytes, false));
            }
            {
                // One chunk at a time under the map's lock: a write through the view waits at
                // most for one chunk's copy, and never meets a chunk copied half.
                let m = self.map_mut();
                if m.absent(c, self.chunk) {
                    // Filling in changes no byte the file shows: its times stay (a write
                    // through the view waits for this lock, so none is undone).
                    let st = posix::stat_fd(self.new.as_fd()).ctx("fstat NEW file")?;
                    let n = self.copy_chunk(&m, c, &mut buf)?;
                    keep_times(&self.new, &st)?;
                    bytes += n;
                    pending_bytes += n;
                    pending.push(c);
                    drop(m);
                    if !tick(n) {
                        flush(&mut pending)?;
                        return Ok((bytes, false));
                    }
                }
            }
            if pending_bytes >= HYDRATE_BATCH_BYTES {
                flush(&mut pending)?;
                pending_bytes = 0;
            }
            c += 1;
            if c >= end {
                break;
            }
        }
        flush(&mut pending)?;
        Ok((bytes, self.missing() == 0))
    }

    /// Abort: write NEW's present chunks (up to the extent) and past-extent bytes into OLD's
    /// file `dst` (OLD's own file, linked into the abort's staging), and give it NEW's size.
    /// Returns the bytes written.
    pub(crate) fn write_back(&self, dst: &File) -> Result<u64> {
        let m = self.map();
        let size = posix::stat_fd(self.new.as_fd())
            .ctx("fstat NEW file")?
            .st_size as u64;
        let mut written = 0;
        let mut buf = Vec::new();
        let mut copy = |from: u64, to: u64| -> Result<()> {
            let mut at = from;
            while at < to {
                let n = (to - at).min(8 << 20) as usize;
                buf.resize(n, 0);
                read_full_at(&self.new, &mut buf[..n], at)?;
                dst.write_all_at(&buf[..n], at)
                    .ctx("write a changed chunk into OLD")?;
                at += n as u64;
                written += n as u64;
            }
            Ok(())
        };
        let n = m.needed(self.chunk);
        let mut c = 0;
        while c < n {
            if !m.present(c) {
                c += 1;
                continue;
            }
            // A run of present chunks at once.
            let first = c;
            while c < n && m.present(c) {
                c += 1;
            }
            let from = first * self.chunk;
            let to = (c * self.chunk).min(m.extent).min(size);
            if from < to {
                copy(from, to)?;
            }
        }
        // Whatever NEW holds past the extent is the view's own.
        if size > m.extent {
            copy(m.extent, size)?;
        }
        dst.set_len(size)
            .ctx("truncate OLD file to the view's size")?;
        dst.sync_all().ctx("fsync OLD file")?;
        Ok(written)
    }
}

/// Every byte of `f` (whose stat is `st`) punched out, its size and mtime kept (an evicted
/// file's bytes are in the bucket; the punch would stamp the mtime).
pub(crate) fn punch_keeping_mtime(f: &File, st: &rustix::fs::Stat) -> Result<()> {
    // (To the end of the last block: a partial block at the end is only zeroed, not freed.)
    #[allow(clippy::unnecessary_cast)]
    let size = (st.st_size as u64).next_multiple_of((st.st_blksize as u64).max(4096));
    if size > 0 {
        rustix::fs::fallocate(
            f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            size,
        )
        .ctx("punch an evicted file's bytes out of the staging tree")?;
    }
    keep_times(f, st)
}

/// `f`'s access and modification times set back to those of `st`.
fn keep_times(f: &File, st: &rustix::fs::Stat) -> Result<()> {
    rustix::fs::futimens(f, &crate::store::copy::timestamps(st)).ctx("keep a file's times")?;
    Ok(())
}

/// Chunk-map records a map of `bytes` bytes spans.
fn segments(bytes: usize) -> u64 {
    bytes.div_ceil((CHUNKS_PER_SEGMENT / 8) as usize) as u64
}

/// Read exactly `out.len()` bytes at `at`; bytes past the end of the file read as zeros.
fn read_full_at(f: &File, out: &mut [u8], at: u64) -> Result<()> {
    let mut done = 0;
    while done < out.len() {
        let n = f
            .read_at(&mut out[done..], at + done as u64)
            .ctx("read NEW file")?;
        if n == 0 {
            out[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

impl View {
    /// The chunk size of copy-before-write for this migration (0: whole files only).
    pub(crate) fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Whether the first data change of OLD file `st` (open as `src`) makes a partial copy:
    /// a file bigger than one chunk, OLD and NEW both POSIX, not one of several OLD names.
    pub(crate) fn partial_eligible(&self, st: &rustix::fs::Stat) -> bool {
        // (NEW's file handles bind the record to its file: see `PartialFile::handle`.)
        self.chunk > 0 && self.caps.handles && st.st_nlink == 1 && st.st_size as u64 > self.chunk
    }

    /// (present, total) chunks of `inode`'s data, if it is partly copied.
    pub fn partial_progress(&self, inode: &Inode) -> Option<(u64, u64)> {
        // (An S3 NEW's evicted file is NEW's whole: its chunks are in NEW's bucket.)
        self.partial_of(inode)
            .filter(|p| !p.is_stub())
            .map(|p| p.progress())
    }

    /// The partial file behind `inode`, if its data is partly OLD's.
    pub(crate) fn partial_of(&self, inode: &Inode) -> Option<Arc<Partial>> {
        inode.node().partial.clone()
    }

    /// A partial file just named in NEW: the view's state of it.
    pub(crate) fn partial_made(
        &self,
        key: (u64, u64),
        rec: PartialFile,
        old: Source,
        new: File,
    ) -> Arc<Partial> {
        Arc::new(Partial::new(key, rec, old, new, Vec::new()))
    }

    /// The partial file of NEW's inode (dev, ino) from the journal, if it has a record: OLD's
    /// file opened again by its path and checked to be the same file. A record whose OLD file
    /// is gone or changed still loads, its reads and hydration then fail with EIO (the chunks
    /// not copied are lost), never show another file's bytes.
    pub(crate) fn load_partial(
        &self,
        dev: u64,
        ino: u64,
        new: &crate::store::posix::Loc,
    ) -> Result<Option<Arc<Partial>>> {
        let Some((mut rec, bits)) = self.journal.partial(dev, ino)? else {
            return Ok(None);
        };
        let new = new
            .open(rustix::fs::OFlags::RDWR)
            .ctx("open a partly copied NEW file")?;
        let nst = posix::stat_fd(new.as_fd()).ctx("fstat NEW file")?;
        if (nst.st_dev, nst.st_ino) != (dev, ino) || !self.partial_record_is_its_file(&rec)? {
            return Ok(None);
        }
        let new_size = nst.st_size as u64;
        // NEW shorter than the extent: a truncate that a crash kept from the record.
        if new_size < rec.extent {
            rec.extent = new_size;
            let mut b = Batch::new();
            b.partial(dev, ino, &rec);
            self.journal.commit(b, false)?;
        }
        if rec.bucket {
            let key = String::from_utf8_lossy(&rec.origin).into_owned();
            let etag = rec.etag.clone().unwrap_or_default();
            let src = self.bucket_source(&key, &etag, rec.old.size)?;
            return Ok(Some(Arc::new(Partial::new(
                (dev, ino),
                rec,
                src,
                new,
                bits,
            ))));
        }
        let old = self.partial_old_source(&rec)?;
        let p = Arc::new(Partial::new((dev, ino), rec, old, new, bits));
        if let Err(e) = p.check_old() {
            tracing::error!(error = %e, "a partly copied file");
        }
        Ok(Some(p))
    }

    /// OLD's file (or object) a partial record's absent chunks are read from, opened again
    /// by its path. One gone or replaced gives a stand-in whose every read and check fails.
    pub(crate) fn partial_old_source(&self, rec: &PartialFile) -> Result<Source> {
        let old = self
            .old
            .locate_path(&rec.origin, false)
            .and_then(|(loc, _)| {
                // An object replaced since (another ETag) is no longer the file's data.
                if let Some(e) = loc.object()
                    && e.object.as_ref().map(|o| &o.etag) != rec.etag.as_ref()
                {
                    return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
                }
                loc.open_source(rustix::fs::OFlags::RDONLY)
            });
        Ok(match old {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(
                    path = %String::from_utf8_lossy(&rec.origin),
                    error = %e,
                    "a partly copied file's OLD file cannot be opened: its chunks not copied \
                     yet cannot be read"
                );
                // A stand-in that fails every check: /dev/null is no OLD file.
                Source::File(Arc::new(File::open("/dev/null").ctx("open /dev/null")?))
            }
        })
    }

    /// Whether NEW's file the record names by handle still exists (a record a crash left
    /// for a copy that never got its name does not: its inode was freed, and a file NEW
    /// numbers alike later has another generation, so its handle is stale).
    fn partial_record_is_its_file(&self, rec: &PartialFile) -> Result<bool> {
        match posix::open_by_handle(self.new.root(), &rec.handle) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ESTALE | libc::ENOENT | libc::EINVAL)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(Error::Store {
                op: "open a partly copied NEW file by handle",
                source: e,
            }),
        }
    }

    /// At mount: drop the records of partial copies that never got their name in NEW (a
    /// crash between the record and the name), so they neither hold commit back nor ever
    /// apply to another file.
    pub(crate) fn drop_stale_partials(&self) -> Result<()> {
        for (dev, ino, rec) in self.journal.partials()? {
            if !self.partial_record_is_its_file(&rec)? {
                tracing::info!(
                    path = %String::from_utf8_lossy(&rec.origin),
                    "a partial copy a crash left without a name in NEW: its record is dropped \
                     (the file is still OLD's)"
                );
                let segs = self
                    .journal
                    .partial(dev, ino)?
                    .map_or(1, |(_, bits)| segments(bits.len()));
                let mut b = Batch::new();
                b.clear_partial(dev, ino, segs.max(1));
                self.journal.commit(b, true)?;
            }
        }
        Ok(())
    }

    /// A partial file with no chunk absent is an ordinary NEW file again: its record goes and
    /// the view forgets it.
    pub(crate) fn finish_partial(&self, inode: &Inode, p: &Partial) -> Result<()> {
        {
            let mut n = inode.node();
            if n.partial.as_ref().is_some_and(|q| std::ptr::eq(&**q, p)) {
                n.partial = None;
            }
        }
        self.partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&p.key);
        if p.detached.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let segs = segments(p.map().bits.len());
        let mut b = Batch::new();
        b.clear_partial(p.key.0, p.key.1, segs.max(1));
        self.journal.commit(b, false)?;
        // An S3 NEW's publisher uploads it now.
        self.note_edit();
        tracing::debug!(ino = inode.ino, "a partly copied file is whole in NEW");
        Ok(())
    }

    /// NEW's file (dev, ino) left NEW (its last name removed): its partial record goes; open
    /// files of it keep working on what they have.
    pub(crate) fn partial_deleted(&self, dev: u64, ino: u64, inode: Option<&Inode>) {
        if !self.journal.has_partial(dev, ino) {
            return;
        }
        let segs = match inode.and_then(|i| i.node().partial.clone()) {
            Some(p) => {
                p.detached.store(true, Ordering::Release);
                segments(p.map().bits.len())
            }
            None => self
                .journal
                .partial(dev, ino)
                .ok()
                .flatten()
                .map_or(1, |(_, bits)| segments(bits.len())),
        };
        self.partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(dev, ino));
        let mut b = Batch::new();
        b.clear_partial(dev, ino, segs.max(1));
        if let Err(e) = self.journal.commit(b, false) {
            tracing::warn!(error = %e, "dropping a removed file's partial record");
        }
    }

    /// The copier's hydration of a partial file: its absent chunks copied into NEW, under the
    /// entry's claim. `Ok(None)`: not a partial file; `Ok(Some((bytes, whole)))` else.
    pub(crate) fn hydrate(&self, inode: &Inode, tick: Tick<'_>) -> Result<Option<(u64, bool)>> {
        let Some(p) = self.partial_of(inode).filter(|p| !p.is_stub()) else {
            return Ok(None);
        };
        // An S3 NEW's publisher sends it whole into the bucket (its absent chunks from OLD,
        // copied by the server where it can) and it becomes an evicted file: filling it in
        // here first would stage the whole file. (One with several names is filled in: an
        // evicted file has one.)
        if self.bucket.get().is_some() && p.links() == 1 {
            return Ok(Some((0, false)));
        }
        let Ok(_claim) = inode.claim.try_lock() else {
            return Ok(Some((0, false)));
        };
        let (bytes, whole) = p.hydrate(&self.journal, tick)?;
        if whole {
            self.finish_partial(inode, &p)?;
        }
        Ok(Some((bytes, whole)))
    }

    /// Files partly copied (the journal's count), and the chunk progress of those the view
    /// holds now.
    pub fn chunk_progress(&self) -> ChunkProgress {
        let mut out = ChunkProgress {
            files: self.journal.partial_count(),
            ..Default::default()
        };
        for inode in self.partial_inodes() {
            if let Some(p) = self.partial_of(&inode) {
                let (present, total) = p.progress();
                out.present += present;
                out.total += total;
            }
        }
        out
    }

    /// The inodes of partly copied files the view holds, the latest written first.
    pub fn partial_inodes(&self) -> Vec<Arc<Inode>> {
        let mut all: Vec<(u64, Arc<Inode>)> = {
            let mut reg = self.partials.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::new();
            reg.retain(|key, ino| {
                let Some(i) = self.inodes.get(*ino) else {
                    return false;
                };
                // (One an S3 NEW's publisher made an evicted file is no longer OLD's.)
                let last = match i.node().partial.as_ref() {
                    Some(p) if p.key == *key && !p.is_stub() => {
                        p.last_write.load(Ordering::Relaxed)
                    }
                    _ => return false,
                };
                out.push((last, i));
                true
            });
            out
        };
        all.sort_by_key(|b| std::cmp::Reverse(b.0));
        all.into_iter().map(|(_, i)| i).collect()
    }

    /// Give `inode` its partial file state `p` (made now, or loaded from the journal).
    pub(crate) fn hold_partial(&self, inode: &Inode, p: Arc<Partial>) {
        let key = p.key;
        {
            // (Two lookups may load one file at once: the first one's state is the one.)
            let mut n = inode.node();
            if n.partial.is_some() {
                return;
            }
            let stub = p.is_stub();
            n.partial = Some(p);
            // (An S3 NEW's evicted file is never hydrated: not the copier's.)
            if stub {
                return;
            }
        }
        self.partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, inode.ino);
    }

    /// The OLD path `inode`'s chunks not copied yet are read from, if it is partly copied.
    pub fn partial_origin(&self, inode: &Inode) -> Option<Vec<u8>> {
        self.partial_of(inode)
            .filter(|p| !p.is_stub())
            .map(|p| p.record().origin)
    }

    /// Copy every chunk of `inode` still OLD's now, if it is partly copied (abort into an S3
    /// OLD, which writes objects whole).
    pub fn hydrate_partial(&self, inode: &Inode) -> Result<()> {
        match self.partial_of(inode) {
            Some(p) => self.hydrate_now(inode, &p),
            None => Ok(()),
        }
    }

    /// Copy every chunk still OLD's now, unpaced (before a change that moves bytes).
    pub(crate) fn hydrate_now(&self, inode: &Inode, p: &Partial) -> Result<()> {
        let (_, whole) = p.hydrate(&self.journal, &mut |_| true)?;
        if whole {
            self.finish_partial(inode, p)?;
        }
        Ok(())
    }

    /// Abort of a partly copied file: OLD's own file is linked as `name` in `out` (the abort's
    /// staging in OLD) and only what the view changed is written into it (the chunks NEW
    /// holds, what lies past the extent, the size). `Ok(None)`: not a partial file, or OLD's
    /// file cannot be linked there (then it is hydrated first: NEW's file is the whole file,
    /// to be copied back as any other). `Some(bytes written into OLD)` else.
    pub fn abort_partial(
        &self,
        inode: &Inode,
        out: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
    ) -> Result<Option<u64>> {
        // (An S3 NEW's evicted file is NEW's data: copied back whole, read from the bucket.)
        let Some(p) = self.partial_of(inode).filter(|p| !p.is_stub()) else {
            return Ok(None);
        };
        let linked = self
            .old
            .locate_path(&p.record().origin, false)
            .and_then(|(loc, _)| {
                let st = loc.stat()?;
                let was = p.record().old;
                if (st.st_dev, st.st_ino) != (was.dev, was.ino) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
                }
                loc.link_to(out, name)
            });
        if let Err(e) = linked {
            tracing::info!(
                path = %String::from_utf8_lossy(&p.record().origin),
                error = %e,
                "abort: a partly copied file's OLD file cannot take the view's chunks in place; \
                 copied whole instead"
            );
            self.hydrate_now(inode, &p)?;
            return Ok(None);
        }
        let dst = File::from(
            rustix::fs::openat(
                out,
                name,
                rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ctx("open OLD's file in the abort's staging")?,
        );
        let written = p.write_back(&dst)?;
        // OLD's file now holds the view's bytes: a view served again before the abort ends
        // reads it as the file it is.
        let st = posix::stat_fd(dst.as_fd()).ctx("stat OLD file")?;
        *p.old_fp.lock().unwrap_or_else(|p| p.into_inner()) = Fingerprint::of(&st);
        if !p.detached.load(Ordering::Acquire) {
            let mut b = Batch::new();
            b.partial(
                p.key.0,
                p.key.1,
                &PartialFile {
                    old: Fingerprint::of(&st),
                    extent: p.map().extent,
                    ..p.record()
                },
            );
            self.journal.commit(b, true)?;
        }
        Ok(Some(written))
    }

    /// Abort into an S3 OLD of a partly copied file still at its OLD path (`path` is the key
    /// its chunks are read from; `size` and `meta`: the view's): OLD's object there is
    /// rewritten as the view's bytes by one multipart upload whose parts no change touched
    /// are copied by the server from the object itself (at the version the chunks are read
    /// at), so only the parts holding changes are sent (a file up to
    /// [`crate::store::s3::MULTIPART_THRESHOLD`] is one PUT). `Ok(None)`: not such a file
    /// (filled in and written whole, as any other). `Some(bytes sent)` else.
    ///
    /// Crash safety: the record says, durably, that the upload began before its first
    /// request; afterwards it names the new object. A rerun that finds the mark and the key
    /// holding another version, with no upload of it still open, takes that version for this
    /// upload's (OLD is the migration's while it runs: nothing else writes it).
    pub fn abort_partial_s3(
        &self,
        inode: &Inode,
        store: &Arc<crate::store::s3::S3Store>,
        path: &str,
        size: u64,
        meta: &crate::store::s3::PosixMeta,
    ) -> Result<Option<u64>> {
        let Some(p) = self.partial_of(inode).filter(|p| !p.is_stub()) else {
            return Ok(None);
        };
        let rec = p.record();
        if rec.origin != path.as_bytes() {
            return Ok(None);
        }
        let s3 = super::stream::s3_err;
        let etag = rec.etag.clone().unwrap_or_default();
        let open_uploads = || -> Result<Vec<String>> {
            Ok(store
                .unfinished_uploads()
                .map_err(s3("list OLD's open uploads"))?
                .into_iter()
                .filter(|(k, _)| k == path)
                .map(|(_, id)| id)
                .collect())
        };
        let to_object = |info: crate::store::s3::ObjectInfo| {
            Source::Object(Arc::new(crate::store::s3::ObjectReader::new(
                store.clone(),
                info,
                4 << 20,
            )))
        };
        let rebase = |info: crate::store::s3::ObjectInfo| {
            let (etag, size) = (info.etag.clone(), info.size);
            p.rerecord(
                &self.journal,
                |r| {
                    r.etag = Some(etag);
                    r.old.size = size;
                    r.abort_put = false;
                },
                Some(to_object(info)),
            )
        };
        if rec.abort_put {
            let now = store.head(path).map_err(s3("look at OLD's object"))?;
            match now {
                Some(o) if o.etag == etag => {
                    // Not completed: what it left open goes.
                    for id in open_uploads()? {
                        store
                            .abort_upload(path, &id)
                            .map_err(s3("abort an upload into OLD"))?;
                    }
                }
                Some(o) if o.size == size && open_uploads()?.is_empty() => {
                    tracing::info!(
                        path,
                        "abort: OLD's object was rewritten as the view's by the run a crash \
                         stopped"
                    );
                    rebase(o)?;
                    return Ok(Some(0));
                }
                _ => {
                    return Err(errno_err(
                        "abort: OLD's object of a partly copied file changed behind the \
                         migration while an earlier abort rewrote it; its chunks not copied \
                         into NEW are lost (restore the object's version the migration \
                         began with, then abort again)",
                        libc::EIO,
                    ));
                }
            }
        }
        let Some((src, rel, src_etag)) = p.object_source() else {
            // (OLD's object is gone or replaced: its reads fail, saying so.)
            p.check_old()?;
            return Ok(None);
        };
        p.rerecord(&self.journal, |r| r.abort_put = true, None)?;
        let mut read = |off: u64, buf: &mut [u8]| p.read_exact(off, buf);
        let (info, sent) = if size <= crate::store::s3::MULTIPART_THRESHOLD {
            let mut data = vec![0u8; size as usize];
            read(0, &mut data).ctx("read the view's file")?;
            let o = store.put(path, data, meta).map_err(s3("write into OLD"))?;
            (o, size)
        } else {
            let (o, copied) = store
                .put_patched(
                    path,
                    size,
                    meta,
                    Some((&*src, &rel, &src_etag)),
                    &|off, len| p.all_absent(off, len),
                    &mut read,
                )
                .map_err(s3("write into OLD"))?;
            (o, size - copied)
        };
        // OLD's object now holds the view's bytes: a view served again before the abort
        // ends reads its chunks there.
        rebase(info)?;
        Ok(Some(sent))
    }

    /// After a change of a partial file: a file whose every chunk NEW now holds is whole.
    pub(crate) fn after_partial_change(&self, inode: &Inode, p: &Partial) -> Result<()> {
        if p.missing() == 0 {
            self.finish_partial(inode, p)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("key", &self.key)
            .field("chunk", &self.chunk)
            .field("missing", &self.missing())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_counts_what_is_still_old_and_records_by_segment() {
        let mut m = Map {
            extent: 10 * 4096 + 5,
            bits: Vec::new(),
            missing: 0,
        };
        m.recount(4096);
        assert_eq!(m.missing, 11, "ten whole chunks and a tail");
        assert!(m.absent(10, 4096));
        assert!(!m.absent(11, 4096), "past the extent: NEW's alone");
        m.set(3, 4096);
        m.set(3, 4096);
        m.set(10, 4096);
        assert_eq!(m.missing, 9);
        assert!(m.present(3) && !m.absent(3, 4096));
        m.set(20, 4096);
        assert_eq!(m.missing, 9, "a chunk past the extent was never missing");
        let seg = m.segment(0);
        assert_eq!(seg.len(), 512);
        assert_eq!(seg[0], 1 << 3);
        assert_eq!(seg[1], 1 << 2);
        m.extent = 3 * 4096 + 1;
        m.recount(4096);
        assert_eq!(m.missing, 3, "chunks 0, 1, 2; 3 is present");
    }
}
