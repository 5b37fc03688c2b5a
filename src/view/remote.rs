//! Copies made by remote workers (`ferryfs worker`): what the coordinator hands out of the
//! view, and how a worker's copy takes its name.
//!
//! A worker makes its copy of OLD's file under a temporary name the coordinator chose in
//! NEW's work dir, makes it durable, and reports it. The coordinator names it exactly as the
//! copier names its own copies ([`View::finish_copies`]): under the namespace lock, only if
//! the view did not take the entry over meanwhile (its changes always win), only if OLD's file
//! is still the one leased (its fingerprint), never over a name NEW got meanwhile. A copy
//! refused is removed. Nothing a worker sends names a path of its own choosing: it is checked
//! against what was handed out.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::fs::{AtFlags, OFlags};

use super::copyup::Pending;
use super::inode::Inode;
use super::scratch::Scratch;
use super::{Kind, View};
use crate::journal::Fingerprint;
use crate::store::posix;
use crate::view::error::{Context, Result};

/// Prefix of the temporary names remote workers' copies have in NEW's work dir.
pub const REMOTE_FILE_PREFIX: &str = "remote-";

/// A file a remote worker may copy: OLD's path (below OLD's root) and stat when handed out.
pub struct RemoteItem {
    pub path: String,
    pub st: rustix::fs::Stat,
}

impl View {
    /// Whether NEW is a POSIX directory remote workers can write into (not an S3 NEW, not a
    /// single-store view).
    pub fn takes_remote_copies(&self) -> bool {
        !self.is_single() && self.bucket.get().is_none() && !self.old_is_s3()
    }

    /// `inode` as a remote worker's item, if one may copy it: a regular file only in OLD, one
    /// OLD name, no metadata change waiting, a UTF-8 path. (The others are the daemon's to
    /// copy: hard links, metadata changes, names JSON cannot carry.)
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
        if old.loc.object().is_some() {
            return Ok(None);
        }
        let Ok(path) = String::from_utf8(old.path.clone()) else {
            return Ok(None);
        };
        let st = old.loc.stat().ctx("stat OLD file")?;
        if st.st_nlink != 1 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        Ok(Some(RemoteItem { path, st }))
    }

    /// The copy a remote worker made of `inode` under `tmp` in NEW's work dir, from OLD's
    /// file as leased (`leased`), ready for [`View::finish_copies`]; `Err(why)` when it cannot
    /// be taken (then it is removed): the entry is no longer OLD's only, OLD's file changed,
    /// the copy is missing or has another size.
    pub fn remote_pending(
        &self,
        inode: &Arc<Inode>,
        leased: &Fingerprint,
        work: &Arc<std::os::fd::OwnedFd>,
        tmp: &str,
    ) -> Result<std::result::Result<Pending, String>> {
        let work = work.clone();
        let gone = |why: String| {
            let _ = rustix::fs::unlinkat(&work, tmp, AtFlags::empty());
            Ok(Err(why))
        };
        let old = {
            let n = inode.node();
            if n.new.is_some() || n.meta.is_some() {
                drop(n);
                return gone("changed through the view meanwhile (the view's change wins)".into());
            }
            n.old.clone()
        };
        let Some(old) = old else {
            return gone("no longer in OLD".into());
        };
        let src = match old.loc.open(OFlags::RDONLY | OFlags::NOATIME) {
            Ok(f) => f,
            Err(_) => match old.loc.open(OFlags::RDONLY) {
                Ok(f) => f,
                Err(e) => return gone(format!("OLD's file cannot be opened: {e}")),
            },
        };
        let st = posix::stat_fd(src.as_fd()).ctx("stat OLD file")?;
        if Fingerprint::of(&st) != *leased {
            return gone("OLD's file changed since it was handed out".into());
        }
        let file = match rustix::fs::openat(
            &work,
            tmp,
            // (Never a symlink, and never a FIFO to block on: checked as a plain file next.)
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => std::fs::File::from(fd),
            Err(e) => return gone(format!("the copy is not in NEW's work dir: {e}")),
        };
        let tst = posix::stat_fd(file.as_fd()).ctx("stat a worker's copy")?;
        if tst.st_mode & libc::S_IFMT != libc::S_IFREG || tst.st_nlink != 1 {
            return gone("the copy is not a plain file".into());
        }
        if tst.st_size != st.st_size {
            return gone(format!(
                "the copy has {} bytes, OLD's file {}",
                tst.st_size, st.st_size
            ));
        }
        Ok(Ok(Pending::remote(
            inode.clone(),
            src,
            st,
            Scratch::named(file, work, OsStr::new(tmp).to_owned()),
            old.path,
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

    /// Remove a remote worker's copy `tmp` from NEW's work dir (a lease that expired or a
    /// copy refused), if it is there.
    pub fn remove_remote_copy(&self, tmp: &str) {
        if let Ok(work) = self.work_dir() {
            let _ = rustix::fs::unlinkat(&work, tmp, AtFlags::empty());
        }
    }
}
