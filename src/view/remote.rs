//! Copies made by remote workers (`ferryfs worker`): what the coordinator hands out of the
//! view, and how a worker's copy takes its name.
//!
//! A worker makes its copy of OLD's file (a POSIX file, or an S3 OLD's object at the ETag
//! handed out) either under a temporary name the coordinator chose in a POSIX NEW's work dir,
//! made durable, or, for an S3 NEW, as the parts of a multipart upload to the entry's key
//! that it never completes; then it reports. The coordinator takes the copy exactly as the
//! copier takes its own ([`View::finish_copies`]): under the namespace lock, only if the view
//! did not take the entry over meanwhile (its changes always win), only if OLD's file is
//! still the one leased (its fingerprint, or its ETag), never over a name NEW got meanwhile.
//! An upload is completed only then, with its key held and recorded `pending` first, and the
//! staging tree gets an evicted file for it, as for the copier's own copies into a bucket. A
//! copy refused is removed (a temporary file) or aborted (an upload). Nothing a worker sends
//! names a path of its own choosing: it is checked against what was handed out.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::fs::{AtFlags, OFlags};

use super::copyup::Pending;
use super::inode::Inode;
use super::scratch::Scratch;
use super::{Kind, View};
use crate::journal::Fingerprint;
use crate::store::posix;
use crate::store::s3::SentPart;
use crate::view::error::{Context, Result};

/// Prefix of the temporary names remote workers' copies have in NEW's work dir.
pub const REMOTE_FILE_PREFIX: &str = "remote-";

/// A file a remote worker may copy, as handed out: OLD's path (below OLD's root; an S3 OLD:
/// the key below its prefix), stat and, an S3 OLD's object, ETag; an S3 NEW: the key (below
/// NEW's prefix) the copy goes to.
#[derive(Clone)]
pub struct RemoteItem {
    pub path: String,
    pub st: rustix::fs::Stat,
    pub etag: Option<String>,
    pub key: Option<String>,
}

/// OLD's side of an entry found still as handed out.
struct AsHanded {
    /// OLD's file, open (a POSIX OLD).
    src: Option<File>,
    st: rustix::fs::Stat,
    origin: Vec<u8>,
}

impl View {
    /// Whether remote workers may copy for this view (it has an OLD to copy from).
    pub fn takes_remote_copies(&self) -> bool {
        !self.is_single()
    }

    /// `inode` as a remote worker's item, if one may copy it: a regular file only in OLD, one
    /// OLD name, no metadata change waiting, a UTF-8 path; for an S3 NEW, not empty, a name a
    /// key can hold and no `user.` extended attribute (what the copier's own copies into a
    /// bucket take). (The others are the daemon's to copy: hard links, metadata changes,
    /// names JSON cannot carry.)
    pub fn remote_item(&self, inode: &Inode) -> Result<Option<RemoteItem>> {
        if inode.kind != Kind::File || !self.takes_remote_copies() {
            return Ok(None);
        }
        let old = {
            let n = inode.node();
            if n.new.is_some() || n.meta.is_some() {
                return Ok(None);
            }
            n.old.clone()
        };
        let Some(old) = old else {
            return Ok(None);
        };
        let (path, st, etag) = match old.loc.object() {
            Some(e) => match &e.object {
                Some(o) => (e.rel.clone(), e.st, Some(o.etag.clone())),
                None => return Ok(None),
            },
            None => {
                let Ok(path) = String::from_utf8(old.path.clone()) else {
                    return Ok(None);
                };
                (path, old.loc.stat().ctx("stat OLD file")?, None)
            }
        };
        if st.st_nlink != 1 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        let key = if self.bucket.get().is_some() {
            if st.st_size == 0 || (etag.is_none() && has_user_xattrs(&old.loc)) {
                return Ok(None);
            }
            match self.stream_key(inode, None)? {
                Some(k) => Some(k),
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some(RemoteItem {
            path,
            st,
            etag,
            key,
        }))
    }

    /// OLD's side of `inode` if the entry is still OLD's only and OLD's file the one handed
    /// out (fingerprint `leased`, ETag `etag` for an S3 OLD); `Err(why)` else.
    fn as_handed(
        &self,
        inode: &Inode,
        leased: &Fingerprint,
        etag: Option<&str>,
    ) -> Result<std::result::Result<AsHanded, String>> {
        let old = {
            let n = inode.node();
            if n.new.is_some() || n.meta.is_some() {
                return Ok(Err(
                    "changed through the view meanwhile (the view's change wins)".into(),
                ));
            }
            n.old.clone()
        };
        let Some(old) = old else {
            return Ok(Err("no longer in OLD".into()));
        };
        if let Some(e) = old.loc.object() {
            let now = e.object.as_ref().map(|o| o.etag.as_str());
            if now != etag || Fingerprint::of(&e.st) != *leased {
                return Ok(Err("OLD's object changed since it was handed out".into()));
            }
            return Ok(Ok(AsHanded {
                src: None,
                st: e.st,
                origin: old.path,
            }));
        }
        let src = match old.loc.open(OFlags::RDONLY | OFlags::NOATIME) {
            Ok(f) => f,
            Err(_) => match old.loc.open(OFlags::RDONLY) {
                Ok(f) => f,
                Err(e) => return Ok(Err(format!("OLD's file cannot be opened: {e}"))),
            },
        };
        let st = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
        if Fingerprint::of(&st) != *leased {
            return Ok(Err("OLD's file changed since it was handed out".into()));
        }
        Ok(Ok(AsHanded {
            src: Some(src),
            st,
            origin: old.path,
        }))
    }

    /// The copy a remote worker made of `inode` under `tmp` in NEW's work dir, from OLD's
    /// file as leased (`leased`, `etag`), ready for [`View::finish_copies`]; `Err(why)` when
    /// it cannot be taken (then it is removed): the entry is no longer OLD's only, OLD's file
    /// changed, the copy is missing or has another size. `dress`: a big file's copy that
    /// several workers wrote by ranges, given OLD's xattrs, owner, mode and times here.
    pub fn remote_pending(
        &self,
        inode: &Arc<Inode>,
        leased: &Fingerprint,
        etag: Option<&str>,
        work: &Arc<std::os::fd::OwnedFd>,
        tmp: &str,
        dress: bool,
    ) -> Result<std::result::Result<Pending, String>> {
        let work = work.clone();
        let gone = |why: String| {
            let _ = rustix::fs::unlinkat(&work, tmp, AtFlags::empty());
            Ok(Err(why))
        };
        let old = match self.as_handed(inode, leased, etag)? {
            Ok(o) => o,
            Err(why) => return gone(why),
        };
        let file = match rustix::fs::openat(
            &work,
            tmp,
            // (Never a symlink, and never a FIFO to block on: checked as a plain file next.)
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(e) => return gone(format!("the copy is not in NEW's work dir: {e}")),
        };
        let tst = posix::stat_fd(file.as_fd()).ctx("stat a worker's copy")?;
        if tst.st_mode & libc::S_IFMT != libc::S_IFREG || tst.st_nlink != 1 {
            return gone("the copy is not a plain file".into());
        }
        if tst.st_size != old.st.st_size {
            return gone(format!(
                "the copy has {} bytes, OLD's file {}",
                tst.st_size, old.st.st_size
            ));
        }
        if dress {
            let dressed = (|| -> std::result::Result<(), crate::store::copy::CopyError> {
                if let Some(src) = &old.src {
                    crate::store::copy::copy_xattrs_fd(src, &file)?;
                }
                crate::store::copy::set_owner_and_mode(&file, &old.st)?;
                rustix::fs::futimens(&file, &crate::store::copy::timestamps(&old.st)).map_err(|e| {
                    crate::store::copy::CopyError {
                        op: "futimens copy",
                        source: e.into(),
                    }
                })
            })();
            if let Err(e) = dressed {
                return gone(format!("{}: {}", e.op, e.source));
            }
        }
        Ok(Ok(Pending::remote(
            inode.clone(),
            old.src,
            old.st,
            Scratch::named(file, work, OsStr::new(tmp).to_owned()),
            old.origin,
            None,
        )))
    }

    /// The copy a remote worker sent into NEW's bucket for `inode`, as the parts `parts` of
    /// the multipart upload `upload` to `key`, from OLD's file as leased (`leased`, `etag`):
    /// the upload completed (the key held and recorded `pending` first) and an evicted file
    /// made for it in the staging tree, ready for [`View::finish_copies`]; `Err(why)` when it
    /// cannot be taken (then the upload is aborted): the entry is no longer OLD's only or has
    /// another key, OLD's file changed, the parts do not add up to its size, a copy of the
    /// key is being sent or named already.
    pub fn remote_upload(
        &self,
        inode: &Arc<Inode>,
        leased: &Fingerprint,
        etag: Option<&str>,
        key: &str,
        upload: &str,
        parts: &[SentPart],
    ) -> Result<std::result::Result<Pending, String>> {
        let bucket = self
            .bucket
            .get()
            .ok_or_else(|| crate::view::error::errno_err("an upload to no bucket", libc::EIO))?
            .clone();
        let gone = |why: String| {
            self.abort_remote_upload(key, upload);
            Ok(Err(why))
        };
        let old = match self.as_handed(inode, leased, etag)? {
            Ok(o) => o,
            Err(why) => return gone(why),
        };
        if self.stream_key(inode, None)?.as_deref() != Some(key) {
            return gone("renamed through the view meanwhile".into());
        }
        #[allow(clippy::unnecessary_cast)]
        let size = old.st.st_size as u64;
        let sent: u64 = parts.iter().map(|p| p.len).sum();
        if sent != size || parts.is_empty() {
            return gone(format!(
                "the upload has {sent} bytes in {} parts, OLD's file {size}",
                parts.len()
            ));
        }
        let pfd = self.copy_dir_for(inode)?;
        let tmp = self.scratch_file(pfd.as_fd(), old.st.st_mode & 0o777)?;
        rustix::fs::ftruncate(&tmp, size).ctx("size the evicted copy")?;
        rustix::fs::futimens(&tmp, &crate::store::copy::timestamps(&old.st))
            .ctx("futimens evicted copy")?;
        let Some(hold) = self.hold_key(key) else {
            return gone("a copy of its key is being sent or named already".into());
        };
        self.record_pending_key(key, &tmp, &old.st)?;
        let etag = match bucket.complete_upload(key, upload, parts) {
            Ok(e) => e,
            Err(e) => return gone(format!("completing the upload: {e}")),
        };
        let sent = super::stream::Streamed::new(key, etag, hold);
        let rec = self.streamed_record(&sent, &tmp, &old.st)?;
        Ok(Ok(Pending::remote(
            inode.clone(),
            old.src,
            old.st,
            tmp,
            old.origin,
            Some(Box::new((rec, sent))),
        )))
    }

    /// Keep `inode` and the directories above it known while a remote worker copies it (the
    /// walk that found them lets go of them; naming the copy needs its directory): the
    /// inodes held, `None` when the kernel forgot one already. Give them back with
    /// [`View::unhold`].
    pub fn hold(&self, inode: &Arc<Inode>) -> Option<Vec<Arc<Inode>>> {
        let mut held: Vec<Arc<Inode>> = Vec::new();
        let mut cur = inode.clone();
        loop {
            if !self.inodes.pin(&cur) {
                self.unhold(held);
                return None;
            }
            held.push(cur.clone());
            let parent = cur.node().names.first().map(|(p, _)| *p);
            match parent {
                Some(p) if p != cur.ino => match self.inode(p) {
                    Ok(i) => cur = i,
                    Err(_) => {
                        self.unhold(held);
                        return None;
                    }
                },
                _ => return Some(held),
            }
        }
    }

    /// Give back what [`View::hold`] held.
    pub fn unhold(&self, held: Vec<Arc<Inode>>) {
        for i in held {
            self.release_lookup(&i);
        }
    }

    /// NEW's work dir, where remote workers make their copies, open (made if it is not
    /// there; under `ns`, as every maker and remover of it).
    pub fn open_work_dir(&self) -> Result<Arc<std::os::fd::OwnedFd>> {
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        self.work_dir().map(Arc::new)
    }

    /// Begin the upload of a big file's copy to `key` in NEW's bucket (OLD's stat `st` as its
    /// metadata), which remote workers fill by ranges: its id. Completed by
    /// [`View::remote_upload`], aborted by [`View::abort_remote_upload`].
    pub fn begin_remote_upload(&self, key: &str, st: &rustix::fs::Stat) -> Result<String> {
        let bucket = self
            .bucket
            .get()
            .ok_or_else(|| crate::view::error::errno_err("an upload to no bucket", libc::EIO))?;
        bucket
            .begin_multipart(key, &crate::store::s3::PosixMeta::of_stat(st))
            .map_err(super::stream::s3_err("begin an upload into NEW"))
    }

    /// Make `tmp` in NEW's work dir, a file of `size` bytes (holes) that remote workers fill
    /// by ranges (a big file's copy).
    pub fn make_remote_file(&self, tmp: &str, size: u64) -> Result<()> {
        let work = self.open_work_dir()?;
        let fd = rustix::fs::openat(
            &*work,
            tmp,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .ctx("create a big file's copy in NEW's work dir")?;
        rustix::fs::ftruncate(&fd, size).ctx("size a big file's copy")?;
        Ok(())
    }

    /// Abort a remote worker's upload `id` to `key` in NEW's bucket (a copy refused, or late).
    pub fn abort_remote_upload(&self, key: &str, id: &str) {
        if let Some(b) = self.bucket.get()
            && let Err(e) = b.abort_upload(key, id)
        {
            tracing::warn!(key, error = %e, "aborting a worker's upload (the next mount aborts it)");
        }
    }

    /// Abort every unfinished upload to `key` in NEW's bucket (those of a worker whose lease
    /// expired: it may have begun them without reporting).
    pub fn abort_uploads_of(&self, key: &str) {
        let Some(b) = self.bucket.get() else { return };
        match b.unfinished_uploads_of(key) {
            Ok(ids) => {
                for id in ids {
                    self.abort_remote_upload(key, &id);
                }
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "listing a lost worker's uploads (the next mount aborts them)")
            }
        }
    }

    /// Remove a remote worker's copy `tmp` from NEW's work dir (a lease that expired or a
    /// copy refused), if it is there.
    pub fn remove_remote_copy(&self, tmp: &str) {
        if let Ok(work) = self.work_dir() {
            let _ = rustix::fs::unlinkat(&work, tmp, AtFlags::empty());
        }
    }
}

/// Whether OLD's file at `loc` has `user.` extended attributes (which no object holds).
fn has_user_xattrs(loc: &posix::Loc) -> bool {
    match posix::first_user_name(|buf| loc.listxattr(buf)) {
        Ok(found) => found.is_some(),
        // (No xattrs on this file system.)
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        // (Too many to list here: not a worker's to copy.)
        Err(_) => true,
    }
}
