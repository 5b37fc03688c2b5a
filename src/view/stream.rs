//! An S3 NEW: the copier's copy of an OLD file goes straight into the bucket, never through
//! the staging tree.
//!
//! The object is written under the entry's key as it is when the copy starts: from a POSIX
//! OLD the file is read and sent (Content-MD5 on every request, a multipart upload above
//! 64 MiB, the file checked unchanged before anything is sent and before the upload is
//! completed); from an S3 OLD on the same service the server copies it (CopyObject, part
//! copies above 5 GiB, conditional on the ETag); from an S3 OLD elsewhere it is read by ranged
//! GETs and sent in parts, at most [`crate::store::s3::BUFFER_BUDGET`] bytes held across all
//! uploads. The staging tree then gets an evicted file for it (see `evict.rs`): its name, size
//! and metadata, no data, its record pointing at the object. No partial object is ever under
//! the key (a single PUT or a completed multipart upload), and the key is recorded `pending`
//! before the first request, so one left by a crash or by a copy that gave way is deleted by
//! the next publish pass. Until the evicted file has its name the key is in
//! [`View::streaming`], which the publisher never deletes.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::View;
use crate::journal::{Batch, Fingerprint, PartialFile, Published};
use crate::store::posix;
use crate::store::s3::{PosixMeta, S3Error, S3Store};
use crate::view::error::{Context, Error, Result, errno_err};

/// Objects up to this size from an S3 OLD on another service are read whole and sent in one
/// PUT; larger ones go in parts.
const STREAM_PUT_MAX: u64 = 8 << 20;

/// What a copy sent into the bucket.
pub(crate) struct Streamed {
    pub key: String,
    pub etag: String,
    /// Quoted hex MD5 of the bytes, when known (a multipart or server-side copy's is not).
    pub md5: String,
    /// The key kept from the publisher's deletions while this lives.
    _hold: KeyHold,
}

impl Streamed {
    /// A copy sent to `key` (whose hold is `hold`) as an object of ETag `etag`, MD5 unknown
    /// (a multipart upload's).
    pub(crate) fn new(key: &str, etag: String, hold: KeyHold) -> Streamed {
        Streamed {
            key: key.to_string(),
            etag,
            md5: String::new(),
            _hold: hold,
        }
    }
}

/// How a copy into the bucket went.
pub(crate) enum Stream {
    Sent(Streamed),
    /// OLD changed while it was read.
    Changed,
    /// The key is held (another copy of the entry waits for its name, or the publisher is
    /// deleting it): nothing was sent.
    Busy,
}

/// A key in the view's set of held keys until dropped (see [`View::hold_key`]).
pub struct KeyHold {
    set: Arc<std::sync::Mutex<rustc_hash::FxHashSet<String>>>,
    key: String,
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

pub(crate) fn s3_err(op: &'static str) -> impl Fn(S3Error) -> Error {
    move |e| Error::Store {
        op,
        source: e.into(),
    }
}

impl View {
    /// The key the copier's copy of `inode` (OLD's file open as `src`, if POSIX) goes to
    /// straight in NEW's bucket; `None` when it goes through the staging tree: a POSIX NEW,
    /// a name no key can hold (the publisher reports it), or a file with `user.` extended
    /// attributes (which no object holds: the publisher reports it).
    pub(crate) fn stream_key(
        &self,
        inode: &super::inode::Inode,
        src: Option<&File>,
    ) -> Result<Option<String>> {
        let Some(bucket) = self.bucket.get() else {
            return Ok(None);
        };
        if src.is_some_and(|f| posix::first_user_xattr(f).is_some()) {
            return Ok(None);
        }
        let path = self.new_path(inode)?;
        let Ok(key) = String::from_utf8(path) else {
            return Ok(None);
        };
        let key = key.trim_start_matches('/').to_string();
        if key.is_empty() || key.len() + bucket.url.prefix.len() > 1024 {
            return Ok(None);
        }
        Ok(Some(key))
    }

    /// `key` held against the copier's copies into the bucket (the publisher, to delete it),
    /// if no copy is being sent to it or waits for its name (`None`: keep it). Released when
    /// dropped.
    pub fn hold_key(&self, key: &str) -> Option<KeyHold> {
        let mut set = self.streaming.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.to_string()).then(|| KeyHold {
            set: self.streaming.clone(),
            key: key.to_string(),
        })
    }

    /// Whether NEW's credentials may copy an S3 OLD's objects by the server (until refused
    /// once: from then on every byte is streamed through this host).
    pub fn server_copy_allowed(&self) -> bool {
        self.server_copy_ok.load(Ordering::Relaxed)
    }

    /// NEW's service refused to copy an S3 OLD's object (`e`): stream from now on.
    pub fn server_copy_refused(&self, e: &S3Error) {
        if self.server_copy_ok.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "server-side copy from OLD refused; streaming the bytes through this host from now on");
        }
    }

    /// Send OLD's file (`src`, a POSIX file, or `obj`, an S3 object) of stat `st` into the
    /// bucket at `key`, for the staged file `tmp` (which will be its evicted file). Nothing is
    /// left under the key that the journal does not know, whatever the outcome. Once sent the
    /// key stays held ([`Self::hold_key`]) until the [`Streamed`] is dropped.
    pub(crate) fn stream_copy(
        &self,
        key: &str,
        tmp: &File,
        src: Option<&File>,
        obj: Option<&crate::store::s3::tree::Entry>,
        st: &rustix::fs::Stat,
    ) -> Result<Stream> {
        let bucket = self.bucket.get().expect("a bucket to stream to").clone();
        // Another copy of the entry sent to the key waits for its name, or the publisher is
        // deleting what was there: this copy gives way (the next pass takes the entry).
        let Some(hold) = self.hold_key(key) else {
            return Ok(Stream::Busy);
        };
        // Known before the first request: after a crash, a key no entry holds is deleted.
        self.record_pending_key(key, tmp, st)?;
        Ok(match self.send(&bucket, key, src, obj, st)? {
            Some((etag, md5)) => Stream::Sent(Streamed {
                key: key.to_string(),
                etag,
                md5,
                _hold: hold,
            }),
            None => Stream::Changed,
        })
    }

    /// Record `key` as `pending` in the publisher's records, for the evicted file `tmp` of
    /// OLD's file of stat `st`, before a request may put an object under it: after a crash, a
    /// key no entry holds is deleted.
    pub(crate) fn record_pending_key(
        &self,
        key: &str,
        tmp: &File,
        st: &rustix::fs::Stat,
    ) -> Result<()> {
        let tst = posix::stat_fd(std::os::fd::AsFd::as_fd(tmp)).ctx("stat the evicted copy")?;
        let mut b = Batch::new();
        #[allow(clippy::unnecessary_cast)]
        b.published(
            key,
            &Published {
                pending: true,
                ino: tst.st_ino as u64,
                size: st.st_size as u64,
                mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
                ctime: (0, 0),
                mode: st.st_mode,
                uid: st.st_uid,
                gid: st.st_gid,
                etag: String::new(),
                md5: String::new(),
                racy: false,
            },
        );
        self.journal.commit(b, false)?;
        Ok(())
    }

    fn send(
        &self,
        bucket: &Arc<S3Store>,
        key: &str,
        src: Option<&File>,
        obj: Option<&crate::store::s3::tree::Entry>,
        st: &rustix::fs::Stat,
    ) -> Result<Option<(String, String)>> {
        let meta = PosixMeta::of_stat(st);
        #[allow(clippy::unnecessary_cast)]
        let size = st.st_size as u64;
        let stale = |e: &S3Error| e.errno == libc::ESTALE || e.errno == libc::ENOENT;
        if let Some(f) = src {
            let was = Fingerprint::of(st);
            let still = || {
                posix::stat_fd(std::os::fd::AsFd::as_fd(f))
                    .is_ok_and(|now| Fingerprint::of(&now) == was)
            };
            return match bucket.put_file_md5_if(key, f, &meta, &still) {
                Ok((o, md5)) => {
                    crate::metrics::METRICS.bucket_copy(size, false);
                    Ok(Some((o.etag, crate::store::s3::md5_etag(&md5))))
                }
                Err(e) if stale(&e) || !still() => Ok(None),
                Err(e) => Err(s3_err("upload into NEW")(e)),
            };
        }
        let e =
            obj.ok_or_else(|| errno_err("a copy of neither a file nor an object", libc::EIO))?;
        let info = e
            .object
            .as_ref()
            .ok_or_else(|| errno_err("copy of an S3 directory's data", libc::EISDIR))?;
        let old = &e.tree.store;
        if bucket.same_service(old) && self.server_copy_ok.load(Ordering::Relaxed) {
            match bucket.copy_from(old, &info.rel, &info.etag, size, key, &meta) {
                Ok(o) => {
                    // A single PUT's ETag is its MD5; a multipart one's is not.
                    let md5 = if info.etag.contains('-') {
                        String::new()
                    } else {
                        info.etag.clone()
                    };
                    crate::metrics::METRICS.bucket_copy(size, true);
                    return Ok(Some((o.etag, md5)));
                }
                Err(e) if stale(&e) => return Ok(None),
                Err(e) if e.errno == libc::EACCES || e.errno == libc::EPERM => {
                    self.server_copy_refused(&e);
                }
                Err(e) => return Err(s3_err("server-side copy into NEW")(e)),
            }
        }
        let sent = if size <= STREAM_PUT_MAX {
            let _held = crate::store::s3::BUFFERS.take(size);
            // Fetched whole by the copier's prefetch, this very version: no second request.
            let got = match e.tree.take_prefetched(&info.rel, &info.etag) {
                Some(d) if d.len() as u64 == size => {
                    Ok(Arc::try_unwrap(d).unwrap_or_else(|d| (*d).clone()))
                }
                _ => old.get_range(&info.rel, &info.etag, 0, size),
            };
            got.and_then(|data| {
                use md5::Digest;
                let md5: [u8; 16] = md5::Md5::digest(&data).into();
                bucket
                    .put_md5(key, data, &meta, Some(&md5))
                    .map(|o| (o.etag, crate::store::s3::md5_etag(&md5)))
            })
        } else {
            bucket
                .put_patched(key, size, &meta, None, &|_, _| false, &mut |off, buf| {
                    old.get_range_into(&info.rel, &info.etag, off, buf)
                        .map_err(std::io::Error::from)
                })
                .map(|(o, _)| (o.etag, String::new()))
        };
        match sent {
            Ok(r) => {
                crate::metrics::METRICS.bucket_copy(size, false);
                Ok(Some(r))
            }
            Err(e) if stale(&e) => Ok(None),
            Err(e) => Err(s3_err("upload into NEW")(e)),
        }
    }

    /// The evicted file's record of a copy sent as `s`, for the staged file (open as `tmp`)
    /// of OLD's file of stat `st`.
    pub(crate) fn streamed_record(
        &self,
        s: &Streamed,
        tmp: &File,
        st: &rustix::fs::Stat,
    ) -> Result<PartialFile> {
        #[allow(clippy::unnecessary_cast)]
        let size = st.st_size as u64;
        Ok(PartialFile {
            origin: s.key.as_bytes().to_vec(),
            old: Fingerprint {
                size,
                ..Default::default()
            },
            chunk: self.stub_chunk(),
            extent: size,
            handle: self.new_identity(std::os::fd::AsFd::as_fd(tmp))?,
            etag: Some(s.etag.clone()),
            bucket: true,
            abort_put: false,
        })
    }

    /// The evicted file just named for `inode` (NEW's `key`, record `rec`, open as `file`):
    /// the view's state of it.
    pub(crate) fn hold_streamed(
        &self,
        inode: &super::inode::Inode,
        key: (u64, u64),
        rec: &PartialFile,
        file: &File,
    ) -> Result<()> {
        let src = self.bucket_source(
            &String::from_utf8_lossy(&rec.origin),
            rec.etag.as_deref().unwrap_or(""),
            rec.old.size,
        )?;
        let file = file.try_clone().ctx("dup the evicted copy")?;
        let p = super::partial::Partial::new(key, rec.clone(), src, file, Vec::new());
        self.hold_partial(inode, Arc::new(p));
        Ok(())
    }

    /// The publisher's record of the key `s` once its evicted file has its name (`tst`: its
    /// stat then): the bucket holds it as staged.
    pub(crate) fn streamed_published(s: &Streamed, tst: &rustix::fs::Stat) -> Published {
        #[allow(clippy::unnecessary_cast)]
        Published {
            pending: false,
            ino: tst.st_ino as u64,
            size: tst.st_size as u64,
            mtime: (tst.st_mtime as i64, tst.st_mtime_nsec as u32),
            ctime: (tst.st_ctime as i64, tst.st_ctime_nsec as u32),
            mode: tst.st_mode,
            uid: tst.st_uid,
            gid: tst.st_gid,
            etag: s.etag.clone(),
            md5: s.md5.clone(),
            racy: false,
        }
    }
}
