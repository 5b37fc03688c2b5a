//! Open files and directories.
//!
//! A read-only open of an OLD-only file reads OLD directly (rule 2). A write open copies up
//! first and then works on NEW. A handle opened on OLD that sees its inode copied up by someone
//! else switches to NEW at its next read, so every open of a file sees one file.

use rustc_hash::FxHashMap as HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustix::fs::OFlags;

use super::inode::Inode;
use super::{DirEntry, Kind, View};
use crate::metrics::METRICS;
use crate::store::{Source, posix};
use crate::view::error::{Context, Error, Result};

pub(crate) struct FileHandle {
    pub(super) inode: Arc<Inode>,
    /// The open file (or S3 object), and whether it is NEW's.
    pub(super) file: RwLock<(Source, bool)>,
    pub(super) flags: i32,
}

pub(crate) enum Handle {
    File(FileHandle),
    Dir(DirHandle),
}

/// An open directory: the listing it reads, each entry at its offset ([`placed`]). Taken at
/// each read from offset 0 (the first read, and every rewind), never at open: the kernel may
/// fill its shared listing cache (`FOPEN_CACHE_DIR`) from any open handle, so what a handle
/// lists from the start must be the directory as it is then, not as it was when the handle
/// was opened.
pub(crate) struct DirHandle {
    /// The directory's inode; 0 for a handle a previous daemon handed over without it (its
    /// snapshot is then the one it had, never taken again).
    pub(crate) ino: u64,
    pub(crate) entries: Mutex<Option<Arc<Listing>>>,
}

/// A directory's entries, each with its offset ([`placed`]).
pub(crate) type Listing = Vec<(u64, DirEntry)>;

/// A directory's listing in the order, and at the offsets, that every listing of that
/// directory uses: "." at 1, ".." at 2, every other name at [`name_offset`] of its bytes,
/// ascending. An offset so means one place in any snapshot of the directory. The kernel's
/// listing cache is shared by the directory's handles: a handle that read its first entries
/// from a cache another handle's snapshot filled asks the daemon for the rest (once a change
/// dropped the cache) with an offset from that other snapshot. Were offsets positions, a name
/// removed or added ahead of it would make that handle skip or repeat a name that was there
/// throughout (rule 7); by name they cannot. Names of one hash (about one directory in 10^8
/// at a million names) take consecutive offsets; only across snapshots could those few be
/// repeated or skipped.
pub(crate) fn placed(entries: Vec<DirEntry>) -> Listing {
    let mut out = Vec::with_capacity(entries.len());
    let mut rest = Vec::with_capacity(entries.len());
    for e in entries {
        match e.name.as_encoded_bytes() {
            b"." => out.push((1, e)),
            b".." => out.push((2, e)),
            n => rest.push((name_offset(n), e)),
        }
    }
    out.sort_unstable_by_key(|(off, _)| *off);
    spread(&mut rest);
    out.extend(rest);
    out
}

/// Order names by offset (then by name), and move each name whose offset an earlier one took
/// to the next free one.
fn spread(entries: &mut [(u64, DirEntry)]) {
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let mut last = 2;
    for (off, _) in entries {
        *off = (*off).max(last + 1);
        last = *off;
    }
}

/// Where a name sits in its directory's listings: FNV-1a of its bytes, mixed by splitmix64's
/// finalizer, in 3 ..= 2^63 - 2^32 + 2 (below i64::MAX, with room above for names of one
/// hash). Fixed across builds and versions: a daemon that takes the mount over answers the
/// offsets the kernel got from the one before it.
pub(crate) fn name_offset(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    3 + h % ((1 << 63) - (1 << 32))
}

#[derive(Default)]
pub(crate) struct HandleTable {
    map: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
}

impl HandleTable {
    /// Every open handle, and the number after the highest given.
    pub(crate) fn export(&self) -> (Vec<(u64, Arc<Handle>)>, u64) {
        let map = self.map.lock().unwrap();
        let mut all: Vec<(u64, Arc<Handle>)> = map.iter().map(|(k, v)| (*k, v.clone())).collect();
        all.sort_by_key(|(fh, _)| *fh);
        (all, self.next.load(Ordering::Relaxed))
    }
    /// Put back a handle the kernel holds under `fh` (a takeover from the previous daemon).
    pub(crate) fn insert_at(&self, fh: u64, h: Handle) {
        if let Handle::File(f) = &h {
            let _n = f.inode.node();
            f.inode.opens.fetch_add(1, Ordering::AcqRel);
        }
        self.map.lock().unwrap().insert(fh, Arc::new(h));
        self.next.fetch_max(fh, Ordering::Relaxed);
    }
    pub(crate) fn set_next(&self, next: u64) {
        self.next.fetch_max(next, Ordering::Relaxed);
    }
    fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map.lock().unwrap().insert(fh, Arc::new(h));
        fh
    }
    pub fn insert_dir(&self, ino: u64) -> u64 {
        self.insert(Handle::Dir(DirHandle {
            ino,
            entries: Mutex::new(None),
        }))
    }
    fn get(&self, fh: u64) -> Result<Arc<Handle>> {
        self.map
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::refused(libc::EBADF, "unknown file handle"))
    }
    /// Forget handle `fh`; whether it was a file open for writing.
    pub fn remove(&self, fh: u64) -> bool {
        match self.map.lock().unwrap().remove(&fh).as_deref() {
            Some(Handle::File(f)) => {
                f.inode.opens.fetch_sub(1, Ordering::AcqRel);
                wants_write(f.flags)
            }
            _ => false,
        }
    }
    /// Entries of directory handle `fh` after `offset` (those at a greater offset, with their
    /// offsets); `list` takes the listing when the handle reads from the start, or has none
    /// yet (see [`placed`] for why that is right at any offset).
    pub fn dir_entries(
        &self,
        fh: u64,
        offset: u64,
        list: impl FnOnce(u64) -> Result<Vec<DirEntry>>,
    ) -> Result<Vec<(u64, DirEntry)>> {
        let h = self.get(fh)?;
        let Handle::Dir(d) = &*h else {
            return Err(Error::refused(libc::ENOTDIR, "not a directory handle"));
        };
        let entries = {
            let mut g = d.entries.lock().unwrap();
            match &*g {
                Some(e) if offset != 0 || d.ino == 0 => e.clone(),
                _ if d.ino == 0 => Arc::new(Vec::new()),
                _ => {
                    let e = Arc::new(placed(list(d.ino)?));
                    *g = Some(e.clone());
                    e
                }
            }
        };
        let from = entries.partition_point(|(off, _)| *off <= offset);
        Ok(entries[from..].to_vec())
    }
    /// The open file behind `fh`, if it is a file handle.
    pub fn open_file(&self, fh: u64) -> Option<Arc<File>> {
        match &*self.get(fh).ok()? {
            Handle::File(h) => h.file.read().unwrap().0.file().cloned(),
            Handle::Dir(_) => None,
        }
    }

    /// Any open file of inode `ino`: what still backs an inode whose every name was removed
    /// while it was open (fstat of an unlinked file). A scan, as this path is rare.
    pub fn open_file_of(&self, ino: u64) -> Option<Arc<File>> {
        let map = self.map.lock().unwrap();
        map.values().find_map(|h| match &**h {
            Handle::File(f) if f.inode.ino == ino => f.file.read().unwrap().0.file().cloned(),
            _ => None,
        })
    }

    fn file(&self, fh: u64) -> Result<Arc<Handle>> {
        let h = self.get(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(Error::refused(libc::EISDIR, "directory handle")),
        }
    }
}

/// An open under way, counted in [`Inode::opens`]: uncounted again if it fails (the handle
/// made takes the count over).
struct Opening<'a>(&'a Inode);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opens.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `open` tells the kernel besides the handle.
#[derive(Debug, Clone)]
pub struct OpenFile {
    pub fh: u64,
    /// The file's data did not change since the kernel last cached it: keep the page cache.
    pub keep_cache: bool,
    /// The store's file behind the handle, for the kernel to read and write directly
    /// (passthrough), and whether it is NEW's (else OLD's, opened read-only). `None` for an
    /// S3 object: the daemon serves its reads.
    pub file: Option<Arc<File>>,
    pub on_new: bool,
}

/// Open flags that were for the kernel (or are handled by the view), not for the backing file.
pub(crate) const STRIP: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_DIRECT;

/// Whether an open with these flags changes the file (write access or O_TRUNC).
pub fn wants_write(flags: i32) -> bool {
    (flags & libc::O_ACCMODE) != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl View {
    pub fn open(&self, ino: u64, flags: i32) -> Result<OpenFile> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::refused(libc::EISDIR, "open of a directory"));
        }
        let write = wants_write(flags);
        if flags & libc::O_ACCMODE == libc::O_RDONLY
            && flags & libc::O_TRUNC != 0
            && self.executing(&inode)
        {
            // The kernel checks a running program only after open, when the view (atomic
            // O_TRUNC) would already have truncated it: refuse as Linux does, before.
            return Err(Error::refused(
                libc::ETXTBSY,
                "O_TRUNC of a running program",
            ));
        }
        let _gate = write.then(|| self.changes());
        if write {
            self.copy_up(&inode, flags & libc::O_TRUNC == 0)?;
            self.changing(&inode)?;
        } else if !self.in_new(&inode) {
            self.note_touched(&inode);
        }
        self.open_inode(inode, flags)
    }

    /// Whether some process runs this file as its program (an executable file only; scans
    /// /proc, so kept to the rare O_RDONLY|O_TRUNC open).
    fn executing(&self, inode: &Inode) -> bool {
        let Some(&dev) = self.mount_dev.get() else {
            return false;
        };
        let executable = self
            .backing_stat(inode)
            .is_ok_and(|st| st.st_mode & 0o111 != 0 && inode.kind == Kind::File);
        if !executable {
            return false;
        }
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return false;
        };
        procs.flatten().any(|p| {
            let name = p.file_name();
            if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
                return false;
            }
            let exe = std::path::Path::new("/proc").join(&name).join("exe");
            #[allow(clippy::unnecessary_cast)]
            rustix::fs::stat(&exe)
                .is_ok_and(|st| st.st_dev as u64 == dev && st.st_ino as u64 == inode.ino)
        })
    }

    pub(crate) fn open_inode(&self, inode: Arc<Inode>, flags: i32) -> Result<OpenFile> {
        self.open_inode_with(inode, flags, None)
    }

    /// [`Self::open_inode`], with the file already open when `file` is given (NEW's file of
    /// the inode, opened with `flags`: a create's).
    pub(crate) fn open_inode_with(
        &self,
        inode: Arc<Inode>,
        flags: i32,
        file: Option<std::fs::File>,
    ) -> Result<OpenFile> {
        let (loc, on_new) = {
            let n = inode.node();
            let found = match (&n.new, &n.old) {
                (Some(l), _) => (l.clone(), true),
                (None, Some(o)) => (o.loc.clone(), false),
                (None, None) => return Err(crate::view::error::errno_err("open", libc::ENOENT)),
            };
            // Counted before NEW's file is opened, under the node's lock: an eviction (which
            // takes it) either finished before, and this open finds the file evicted, or
            // finds this open and leaves the file.
            inode.opens.fetch_add(1, Ordering::AcqRel);
            found
        };
        let counted = Opening(&inode);
        let src = match file {
            Some(f) if on_new => crate::store::Source::File(Arc::new(f)),
            _ => loc
                .open_source(OFlags::from_bits_retain((flags & !STRIP) as u32))
                .ctx(if on_new {
                    "open NEW file"
                } else {
                    "open OLD file"
                })?,
        };
        let mut partial = if on_new {
            self.partial_of(&inode)
        } else {
            None
        };
        let st = match src.file() {
            Some(file) => {
                let _data = inode.data.read().unwrap_or_else(|p| p.into_inner());
                if flags & libc::O_TRUNC != 0 && on_new {
                    match &partial {
                        Some(p) => {
                            p.truncate(&self.journal, 0)?;
                            self.after_partial_change(&inode, p)?;
                            // (Cut to nothing, the file is whole: an ordinary NEW file.)
                            partial = None;
                        }
                        None => {
                            file.set_len(0).ctx("truncate on open")?;
                            self.wrote(&inode);
                        }
                    }
                }
                posix::stat_fd(file.as_fd()).ctx("fstat open file")?
            }
            None => loc.stat().ctx("stat OLD object")?,
        };
        #[allow(clippy::unnecessary_cast)]
        let stamp = (
            st.st_mtime as i64,
            st.st_mtime_nsec as i64,
            st.st_size as i64,
            st.st_ino as u64,
        );
        let keep_cache = {
            let mut n = inode.node();
            let same = n.cache_stamp == Some(stamp);
            n.cache_stamp = Some(stamp);
            same
        };
        // A partly copied file's bytes are NEW's and OLD's: the daemon serves them (no
        // passthrough to NEW's file, which has holes where OLD's chunks are). So it does every
        // file of an S3 NEW: it bounds the staging tree by the writes it sees, and may evict a
        // file still open (its bytes then in the bucket, holes in the staging tree).
        let file = if partial.is_some() || (on_new && self.stage_bounded()) {
            None
        } else {
            src.file().cloned()
        };
        std::mem::forget(counted);
        let fh = self.handles.insert(Handle::File(FileHandle {
            inode,
            file: RwLock::new((src, on_new)),
            flags,
        }));
        Ok(OpenFile {
            fh,
            keep_cache,
            file,
            on_new,
        })
    }

    /// The handle's file, switched to NEW if the inode was copied up since it was opened, and
    /// whether it is NEW's.
    fn handle_file(&self, h: &FileHandle) -> Result<(Source, bool)> {
        {
            let g = h.file.read().unwrap();
            if g.1 {
                return Ok((g.0.clone(), true));
            }
        }
        let new = h.inode.node().new.clone();
        let mut g = h.file.write().unwrap();
        if let (Some(loc), false) = (new, g.1) {
            let f = loc
                .open(OFlags::from_bits_retain((h.flags & !STRIP) as u32))
                .ctx("reopen on NEW after copy-up")?;
            *g = (Source::File(Arc::new(f)), true);
        }
        Ok((g.0.clone(), g.1))
    }

    /// Run `f` on the handle's current file; `f` is told whether that file is NEW's. EBADF
    /// for an S3 object (open read-only: nothing but reads reach it).
    fn with_file<T>(
        &self,
        fh: u64,
        f: impl FnOnce(&File, &FileHandle, bool) -> Result<T>,
    ) -> Result<T> {
        self.with_source(fh, |src, h, on_new| match src.file() {
            Some(file) => f(file, h, on_new),
            None => Err(Error::refused(
                libc::EBADF,
                "an S3 object is open read-only",
            )),
        })
    }

    fn with_source<T>(
        &self,
        fh: u64,
        f: impl FnOnce(&Source, &FileHandle, bool) -> Result<T>,
    ) -> Result<T> {
        let h = self.handles.file(fh)?;
        let Handle::File(fhd) = &*h else {
            unreachable!()
        };
        let (src, on_new) = self.handle_file(fhd)?;
        f(&src, fhd, on_new)
    }

    /// Read up to `size` bytes at `offset` into `buf` (grown as needed, never shrunk, so a
    /// caller that keeps it pays no allocation or zeroing per request); returns the length.
    pub fn read(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize> {
        self.note_io();
        self.with_source(fh, |file, h, on_new| {
            let size = size as usize;
            if buf.len() < size {
                buf.resize(size, 0);
            }
            if on_new && let Some(p) = self.partial_of(&h.inode) {
                return p.read(offset, &mut buf[..size]);
            }
            let mut done = 0;
            while done < size {
                let n = file
                    .read_at(&mut buf[done..size], offset + done as u64)
                    .ctx("read")?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            if !on_new {
                METRICS.fallthrough_read(done);
            }
            Ok(done)
        })
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        // (Before the gate: a write waiting for staging room holds nothing of the view.)
        self.stage_room(data.len() as u64)?;
        let _gate = self.changes();
        self.note_io();
        self.with_file(fh, |file, h, on_new| {
            let _data = h.inode.data.read().unwrap_or_else(|p| p.into_inner());
            if on_new && let Some(p) = self.partial_of(&h.inode) {
                p.write(&self.journal, offset, data, h.flags & libc::O_APPEND != 0)?;
                self.after_partial_change(&h.inode, &p)?;
                return Ok(data.len() as u32);
            }
            if h.flags & libc::O_APPEND != 0 {
                // The backing file is O_APPEND too: the kernel's offset is advisory.
                use std::io::Write;
                (&*file).write_all(data).ctx("append")?;
            } else {
                file.write_all_at(data, offset).ctx("write")?;
            }
            self.wrote(&h.inode);
            Ok(data.len() as u32)
        })
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        self.note_edit();
        self.with_source(fh, |src, h, on_new| {
            // Nothing was written to an S3 object open read-only.
            let Some(file) = src.file() else {
                return Ok(());
            };
            if datasync {
                file.sync_data().ctx("fdatasync")?;
            } else {
                file.sync_all().ctx("fsync")?;
            }
            if on_new && let Some(p) = self.partial_of(&h.inode) {
                p.sync_marks(&self.journal)?;
            }
            Ok(())
        })
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        if mode == 0 {
            self.stage_room(len)?;
        }
        let _gate = self.changes();
        self.with_file(fh, |file, h, on_new| {
            let _data = h.inode.data.read().unwrap_or_else(|p| p.into_inner());
            if on_new && let Some(p) = self.partial_of(&h.inode) {
                if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                    // Bytes move: the whole file first, then the change as on any NEW file.
                    self.hydrate_now(&h.inode, &p)?;
                } else {
                    p.fallocate(&self.journal, offset, len, mode)?;
                    return self.after_partial_change(&h.inode, &p);
                }
            }
            rustix::fs::fallocate(
                file,
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                len,
            )
            .ctx("fallocate")?;
            self.wrote(&h.inode);
            Ok(())
        })
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        self.with_source(fh, |src, h, on_new| {
            let file = match src {
                // A partly copied file: all data, no holes (its holes in NEW are OLD's chunks).
                Source::File(f)
                    if on_new
                        && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
                        && self.partial_of(&h.inode).is_some() =>
                {
                    let size = posix::stat_fd(f.as_fd()).ctx("fstat")?.st_size;
                    return seek_without_holes(size, offset, whence);
                }
                Source::File(f) => f,
                // An object is all data, no holes.
                Source::Object(o) => return seek_without_holes(o.info.size as i64, offset, whence),
            };
            let pos = match whence {
                libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
                libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
                libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
                libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
                _ => return Err(Error::refused(libc::EINVAL, "lseek whence")),
            };
            rustix::fs::seek(file, pos).map(|p| p as i64).ctx("lseek")
        })
    }

    pub fn release(&self, fh: u64) {
        // What a file open for writing got (with passthrough the daemon saw none of it) is
        // final now: an S3 NEW's publisher uploads it.
        if self.handles.remove(fh) {
            self.note_edit();
        }
    }
}

/// lseek in a file of `size` bytes that is all data (an S3 object, a partly copied file).
fn seek_without_holes(size: i64, offset: i64, whence: i32) -> Result<i64> {
    match whence {
        libc::SEEK_DATA if offset < size => Ok(offset),
        libc::SEEK_HOLE if offset < size => Ok(size),
        libc::SEEK_DATA | libc::SEEK_HOLE => Err(Error::refused(libc::ENXIO, "lseek past the end")),
        libc::SEEK_SET => Ok(offset),
        libc::SEEK_END => Ok(size + offset),
        _ => Err(Error::refused(libc::EINVAL, "lseek whence")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            name: name.into(),
            kind: super::super::Kind::File,
            ino: 7,
            new_id: None,
        }
    }

    #[test]
    fn name_offsets_are_fixed_and_leave_room_for_the_dots() {
        // Pinned: the kernel keeps these offsets across a takeover by another build.
        assert_eq!(name_offset(b"a"), 198_367_012_849_983_739);
        assert_eq!(name_offset(b"f000"), 6_902_134_409_761_322_597);
        for n in 0..10_000u32 {
            let off = name_offset(format!("n{n}").as_bytes());
            assert!((3..=(1 << 63) - (1 << 32) + 2).contains(&off));
        }
    }

    #[test]
    fn a_name_keeps_its_offset_whatever_else_the_directory_holds() {
        let names: Vec<String> = (0..500).map(|i| format!("f{i:03}")).collect();
        let all = placed(
            [".", ".."]
                .iter()
                .map(|n| entry(n))
                .chain(names.iter().map(|n| entry(n)))
                .collect(),
        );
        assert_eq!(all[0].0, 1);
        assert_eq!(all[1].0, 2);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "offsets ascend");
        // Every other name removed: each left keeps the offset it had.
        let half = placed(names.iter().step_by(2).map(|n| entry(n)).collect());
        for (off, e) in &half {
            let (was, _) = all.iter().find(|(_, a)| a.name == e.name).unwrap();
            assert_eq!(off, was, "{:?} moved", e.name);
        }
    }

    #[test]
    fn names_of_one_hash_take_consecutive_offsets() {
        let mut fake = vec![(10, entry("c")), (9, entry("b")), (9, entry("a"))];
        spread(&mut fake);
        let got: Vec<(u64, &str)> = fake
            .iter()
            .map(|(o, e)| (*o, e.name.to_str().unwrap()))
            .collect();
        assert_eq!(got, vec![(9, "a"), (10, "b"), (11, "c")]);
    }
}
