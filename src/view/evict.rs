//! An S3 NEW's staging tree keeps only what is not in the bucket yet.
//!
//! Once the publisher has uploaded a file and nobody has it open, the staging tree keeps the
//! file (its name, size, mode, owner, times) but not its bytes: the data is punched out (a
//! sparse file of the same size) and a [`PartialFile`] record with `bucket` set says that
//! every chunk is the bucket object's, read by ranged GETs conditional on its ETag (an
//! *evicted* file, a *stub*). From then on the file is a partial file like those of
//! copy-before-write (see `partial.rs`), except that its absent chunks come from NEW's bucket,
//! not from OLD, and are never hydrated: a read of it goes to the bucket, a write stages only
//! the chunks it touches again, and the next upload (server-side part copies for the chunks
//! still in the bucket) makes it whole in the bucket again, after which those chunks go too.
//!
//! Order, the invariant a crash relies on: the record is durable before any byte is punched,
//! so a crash leaves at worst a file whose bytes are both staged and in the bucket.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::View;
use super::inode::{Identity, Inode};
use super::partial::{Partial, Unchanged};
use crate::journal::{Batch, Fingerprint, PartialFile};
use crate::store::{Source, posix};
use crate::view::error::{Context, Result, errno_err};

/// Bytes an evicted file's reads fetch from the bucket at a time (and one such piece ahead
/// when reading sequentially).
const STUB_READ_CHUNK: u64 = 4 << 20;

impl View {
    /// NEW is an S3 bucket: evicted files are read from `store`.
    pub fn set_new_bucket(&self, store: Arc<crate::store::s3::S3Store>) {
        let _ = self.bucket.set(store);
    }

    /// The bucket's object `key` at version `etag` (`size` bytes), as a source of chunks.
    pub(crate) fn bucket_source(&self, key: &str, etag: &str, size: u64) -> Result<Source> {
        let store = self.bucket.get().ok_or_else(|| {
            errno_err(
                "an evicted file of an S3 NEW, read without the NEW bucket connected",
                libc::EIO,
            )
        })?;
        Ok(Source::Object(Arc::new(
            crate::store::s3::ObjectReader::new(
                store.clone(),
                crate::store::s3::ObjectInfo::at(key, size, etag),
                STUB_READ_CHUNK,
            ),
        )))
    }

    /// Whether NEW's file (dev, ino) is not being evicted now, waiting for an eviction under
    /// way to end first (a lookup then finds its record). Always `true`.
    pub(crate) fn eviction_done(&self, dev: u64, ino: u64) -> bool {
        if self.evictions.load(Ordering::Acquire) == 0 {
            return true;
        }
        let mut set = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        while set.contains(&(dev, ino)) {
            set = self.evicted.wait(set).unwrap_or_else(|p| p.into_inner());
        }
        true
    }

    /// The staged file `file` (open read-write) was just uploaded to the bucket's `key` as
    /// version `etag` (`size` bytes) from what it held at `expect` = (size, mtime), if it
    /// held that still when the upload ended. An evicted file reads its absent chunks from
    /// that object from now on (whatever changed since); a file unchanged since (`expect`
    /// given and still so) and open nowhere in the view becomes, or stays, an evicted file
    /// with no chunk staged: its record written, its bytes punched out (`Evicted`). A file
    /// partly copied from OLD (copy-before-write) becomes an evicted file the same way: its
    /// chunks still OLD's are the object's too. Left as it is: a file open through the view,
    /// changed since the upload, or with several names.
    pub fn evict(
        &self,
        file: File,
        key: &str,
        etag: &str,
        size: u64,
        expect: Option<Unchanged>,
    ) -> Result<Eviction> {
        // Not while an abort reads the view back (it holds the gate): the file it reads must
        // keep its bytes. (No waiting: an abort waits for the publisher's pass.)
        let Ok(_gate) = self.gate.try_read() else {
            return Ok(Eviction::Left);
        };
        let st = posix::stat_fd(file.as_fd()).ctx("fstat staged file")?;
        #[allow(clippy::unnecessary_cast)]
        let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
        if st.st_nlink != 1 || size == 0 {
            return Ok(Eviction::Left);
        }
        {
            let mut set = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
            if !set.insert((dev, ino)) {
                return Ok(Eviction::Left);
            }
            self.evictions.fetch_add(1, Ordering::AcqRel);
        }
        let r = self.evict_registered(file, dev, ino, key, etag, size, expect);
        {
            let mut set = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
            set.remove(&(dev, ino));
            self.evictions.fetch_sub(1, Ordering::AcqRel);
        }
        self.evicted.notify_all();
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn evict_registered(
        &self,
        file: File,
        dev: u64,
        ino: u64,
        key: &str,
        etag: &str,
        size: u64,
        expect: Option<Unchanged>,
    ) -> Result<Eviction> {
        let object = self.bucket_source(key, etag, size)?;
        let done = |punched: bool| {
            if punched {
                Eviction::Evicted
            } else {
                Eviction::Repointed
            }
        };
        let inode = self
            .inodes
            .ino_of(&Identity::New(dev, ino))
            .and_then(|i| self.inodes.get(i));
        // An evicted file, or a file partly copied from OLD (its absent chunks are the same
        // bytes in the object just uploaded): it reads them from the object from now on.
        if let Some(inode) = &inode {
            let live = inode.node().partial.clone();
            if let Some(p) = live {
                let punched = p.repoint(&self.journal, key, etag, size, object, expect)?;
                if punched {
                    self.invalidate(inode.ino);
                }
                return Ok(done(punched));
            }
        }
        // Not loaded: the journal's record, if it has one.
        if self.journal.has_partial(dev, ino) {
            let Some((rec, bits)) = self.journal.partial(dev, ino)? else {
                return Ok(Eviction::Left);
            };
            // (A lookup meanwhile waits for this; the next one loads the new record.)
            let p = Partial::new((dev, ino), rec, object.clone(), file, bits);
            let punched = p.repoint(&self.journal, key, etag, size, object, expect)?;
            return Ok(done(punched));
        }
        let Some(expect) = expect else {
            return Ok(Eviction::Left);
        };
        let rec = PartialFile {
            origin: key.as_bytes().to_vec(),
            old: Fingerprint {
                size,
                ..Default::default()
            },
            chunk: self.stub_chunk(),
            extent: size,
            handle: self.new_identity(file.as_fd())?,
            etag: Some(etag.to_string()),
            bucket: true,
            abort_put: false,
        };
        match &inode {
            // Held by the kernel: under its node's lock, and only while no handle is open
            // (an open counts itself under that lock before it opens the file), or, when the
            // staging tree is near its bound, with its data lock too: a file open through
            // the view is written through the daemon (an S3 NEW passes nothing through), by
            // changes that hold that lock shared; the first after this finds the evicted file.
            Some(inode) => {
                let _data = inode.data.write().unwrap_or_else(|p| p.into_inner());
                let mut n = inode.node();
                let open = inode.opens.load(Ordering::Acquire) > 0;
                // (A mark given: changed since by the view's count, not only by the mtime.)
                let written = expect.mark != u64::MAX
                    && inode.last_write.load(Ordering::Acquire) > expect.mark;
                if n.partial.is_some() || written || (open && !self.evict_open(inode.ino)) {
                    return Ok(Eviction::Left);
                }
                let Some(p) = self.make_stub(file, dev, ino, rec, object, expect.size_mtime)?
                else {
                    return Ok(Eviction::Left);
                };
                n.partial = Some(p);
                drop(n);
                // The kernel's cached pages are the file's bytes still; its attributes
                // (st_blocks) are not.
                self.invalidate(inode.ino);
            }
            // Unknown to the kernel, so open nowhere; a lookup of it waits for this to end. (Not
            // on a mark: what the view counted of it went with its inode.)
            None if expect.mark != u64::MAX => return Ok(Eviction::Left),
            None => {
                if self
                    .make_stub(file, dev, ino, rec, object, expect.size_mtime)?
                    .is_none()
                {
                    return Ok(Eviction::Left);
                }
            }
        }
        Ok(Eviction::Evicted)
    }

    /// The record, durably, then the bytes punched out (the file's mtime kept).
    fn make_stub(
        &self,
        file: File,
        dev: u64,
        ino: u64,
        rec: PartialFile,
        object: Source,
        expect: (u64, (i64, u32)),
    ) -> Result<Option<Arc<Partial>>> {
        let st = posix::stat_fd(file.as_fd()).ctx("fstat staged file")?;
        #[allow(clippy::unnecessary_cast)]
        let now = (
            st.st_size as u64,
            (st.st_mtime as i64, st.st_mtime_nsec as u32),
        );
        if now != expect {
            return Ok(None);
        }
        let mut b = Batch::new();
        b.partial(dev, ino, &rec);
        self.journal.commit(b, true)?;
        super::partial::punch_keeping_mtime(&file, &st)?;
        Ok(Some(Arc::new(Partial::new(
            (dev, ino),
            rec,
            object,
            file,
            Vec::new(),
        ))))
    }

    /// The chunk of evicted files: the migration's copy-before-write chunk, or 1 MiB when
    /// that is 0 (whole files only: an evicted file is still written back by chunk).
    pub(crate) fn stub_chunk(&self) -> u64 {
        match self.chunk_size() {
            0 => crate::journal::DEFAULT_CHUNK_SIZE,
            c => c,
        }
    }

    /// The bytes of `inode` as the view shows them, into `dst` from offset 0, when it is an
    /// evicted file (`Ok(false)` else: its NEW file holds its bytes).
    pub fn copy_stub_into(&self, inode: &Inode, dst: &File) -> Result<bool> {
        let Some(p) = self.partial_of(inode).filter(|p| p.is_stub()) else {
            return Ok(false);
        };
        copy_through(&p, dst)?;
        Ok(true)
    }

    /// An evicted file's reader (`None`: not one), for a comparison of its bytes.
    pub(crate) fn stub_of(&self, inode: &Inode) -> Option<Arc<Partial>> {
        self.partial_of(inode).filter(|p| p.is_stub())
    }

    /// The staged file `file` as its publisher must read it, when its bytes are partly
    /// elsewhere (`None` else): an evicted file (the rest in the bucket), or a file partly
    /// copied from OLD (the rest in OLD). The view's own state of it when the kernel holds
    /// it, else its record.
    pub fn stub_upload(&self, file: File) -> Result<Option<StubUpload>> {
        let st = posix::stat_fd(file.as_fd()).ctx("fstat staged file")?;
        #[allow(clippy::unnecessary_cast)]
        let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
        if !self.journal.has_partial(dev, ino) {
            return Ok(None);
        }
        // Before anything is read: a write after this shows (see `stub_written`).
        let mark = super::partial::write_mark();
        let live = self
            .inodes
            .ino_of(&Identity::New(dev, ino))
            .and_then(|i| self.inodes.get(i))
            .and_then(|i| i.node().partial.clone());
        let p = match live {
            Some(p) => p,
            None => {
                let Some((rec, bits)) = self.journal.partial(dev, ino)? else {
                    return Ok(None);
                };
                let src = if rec.bucket {
                    let key = String::from_utf8_lossy(&rec.origin).into_owned();
                    self.bucket_source(&key, rec.etag.as_deref().unwrap_or(""), rec.old.size)?
                } else {
                    self.partial_old_source(&rec)?
                };
                Arc::new(Partial::new((dev, ino), rec, src, file, bits))
            }
        };
        Ok(Some(StubUpload {
            p,
            key: (dev, ino),
            mark,
        }))
    }

    /// NEW's file (dev, ino) of `inode` holds every byte of the file again (the copier wrote
    /// it whole): no longer an evicted file.
    pub(crate) fn unstub(&self, inode: &Inode, dev: u64, ino: u64) {
        if !self.journal.is_stub(dev, ino) {
            return;
        }
        {
            let mut n = inode.node();
            if n.partial.as_ref().is_some_and(|p| p.key == (dev, ino)) {
                n.partial = None;
            }
        }
        self.partial_deleted(dev, ino, None);
        self.note_edit();
    }

    /// Whether the evicted file an upload read as `stub` was written through the view since
    /// the upload began reading it (by the state the upload read, or by the one the view
    /// holds now).
    pub fn stub_written(&self, stub: &StubUpload) -> bool {
        if stub.p.written_after(stub.mark) {
            return true;
        }
        self.inodes
            .ino_of(&Identity::New(stub.key.0, stub.key.1))
            .and_then(|i| self.inodes.get(i))
            .and_then(|i| i.node().partial.clone())
            .is_some_and(|p| p.written_after(stub.mark))
    }

    /// How many of NEW's files are evicted from the staging tree.
    pub fn evicted_files(&self) -> u64 {
        self.journal.stub_count()
    }
}

/// What [`View::evict`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The file's bytes left the staging tree: every chunk is read from the bucket.
    Evicted,
    /// An evicted file reads its absent chunks from the new object; its staged chunks stay.
    Repointed,
    /// Nothing changed.
    Left,
}

/// An evicted file as an upload reads it (see [`View::stub_upload`]).
pub struct StubUpload {
    p: Arc<Partial>,
    /// NEW's (dev, ino).
    key: (u64, u64),
    /// [`super::partial::write_mark`] before the upload read anything.
    mark: u64,
}

impl StubUpload {
    /// What an eviction after the upload must find unchanged: `size_mtime` as the upload's
    /// stat saw it, and no write through the view since the upload began reading.
    pub fn unchanged(&self, size_mtime: (u64, (i64, u32))) -> Unchanged {
        Unchanged {
            size_mtime,
            mark: self.mark,
        }
    }

    /// Whether its absent chunks are NEW's bucket's (an evicted file), not OLD's.
    pub fn in_bucket(&self) -> bool {
        self.p.is_stub()
    }

    /// The object its absent chunks are (its store, key below that store's prefix, ETag):
    /// NEW's bucket's for an evicted file, an S3 OLD's for a file partly copied from it;
    /// `None` for a POSIX OLD's file.
    pub fn source(&self) -> Option<(Arc<crate::store::s3::S3Store>, String, String)> {
        self.p.object_source()
    }

    /// No chunk staged and the size the object has: the bucket's object is the file.
    pub fn clean(&self, size: u64) -> bool {
        let (extent, bits, rec) = self.p.snapshot();
        extent == size && rec.old.size == size && bits.iter().all(|b| *b == 0)
    }

    /// Whether bytes [off, off + len) are the source object's at the same offsets (every
    /// chunk they touch absent, below the extent).
    pub fn from_source(&self, off: u64, len: u64) -> bool {
        self.p.all_absent(off, len)
    }

    /// The file's bytes at `off`, exactly `buf.len()` of them.
    pub fn read_exact(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.p.read_exact(off, buf)
    }
}

/// Every byte `p` reads, written into `dst` at the same offsets; `dst` cut to the length.
fn copy_through(p: &Partial, dst: &File) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    loop {
        let n = p.read(off, &mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off).ctx("write a copy")?;
        off += n as u64;
    }
    dst.set_len(off).ctx("ftruncate a copy")?;
    Ok(())
}
