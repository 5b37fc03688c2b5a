//! A file being made in NEW before it has its name (a copy, a recopy).
//!
//! Where NEW's file system really links O_TMPFILE files (prepare's probe says so) the file is
//! anonymous: a crash leaves nothing. Elsewhere (NFS, Lustre, FUSE file systems, JuiceFS
//! versions whose O_TMPFILE is emulated) it is made under a temporary name in NEW's work dir
//! (hidden from the view) and renamed into place without replacing anything; a crash leaves
//! the temporary name, which the next mount removes (`clean_work_dir`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::View;
use crate::store::posix;
use crate::view::error::{Context, Result};

/// Prefix of the temporary names of files made in the work dir (no O_TMPFILE in NEW).
pub(crate) const NEW_FILE_PREFIX: &str = "file-";

/// Tells apart the temporary names one daemon makes.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A file in NEW that has no name in the view yet.
pub(crate) struct Scratch {
    file: File,
    /// The work dir and the temporary name, when the file has one (no O_TMPFILE); `None` once
    /// the file took its place.
    named: Option<Box<(Arc<OwnedFd>, OsString)>>,
}

impl std::ops::Deref for Scratch {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl AsFd for Scratch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(named) = self.named.take() {
            let (work, name) = &*named;
            let _ = rustix::fs::unlinkat(work, name, AtFlags::empty());
        }
    }
}

impl Scratch {
    /// The file `file`, made under `name` in the work dir `work` (by a remote worker).
    pub(crate) fn named(file: File, work: Arc<OwnedFd>, name: OsString) -> Scratch {
        Scratch {
            file,
            named: Some(Box::new((work, name))),
        }
    }

    /// Give the file the name `name` in `dir`; fails with EEXIST when `dir` holds that name.
    /// Caller holds `ns` write (no change through the view interleaves).
    pub(crate) fn link_into(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> rustix::io::Result<()> {
        let Some((work, tmp)) = self.named.as_deref() else {
            return link_anon(&self.file, dir, name);
        };
        posix::rename_noreplace(work.as_fd(), tmp, dir, name)?;
        self.named = None;
        Ok(())
    }

    /// A second name for the file, `name` in the work dir `work` (an OLD hard-link group's
    /// copy kept reachable where NEW has no lasting file handles).
    pub(crate) fn keep_link(&self, work: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
        let _ = rustix::fs::unlinkat(work, name, AtFlags::empty());
        match self.named.as_deref() {
            None => link_anon(&self.file, work, name),
            Some((w, tmp)) => rustix::fs::linkat(w, tmp, work, name, AtFlags::empty()),
        }
    }

    /// Give the file the name `name` in the work dir `work`, replacing what is there (a
    /// recopy built aside).
    pub(crate) fn name_in_work(&mut self, work: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        let _ = rustix::fs::unlinkat(work, name, AtFlags::empty());
        match self.named.as_deref() {
            None => {
                let tp = posix::proc_path(self.file.as_fd());
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    tp.as_c_str(),
                    work,
                    name,
                    AtFlags::SYMLINK_FOLLOW,
                )
                .ctx("link recopy into the work dir")
            }
            Some((w, tmp)) => {
                rustix::fs::renameat(w, tmp, work, name).ctx("rename recopy in the work dir")?;
                self.named = None;
                Ok(())
            }
        }
    }
}

/// Give the anonymous file `tmp` the name `name` in `dir`: by its fd where the kernel allows
/// it (CAP_DAC_READ_SEARCH), else through its /proc path.
fn link_anon(tmp: &File, dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    match rustix::fs::linkat(tmp, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
            let tp = posix::proc_path(tmp.as_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                tp.as_c_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}

impl View {
    /// A new file in NEW, open read-write, to be named in `dir` later: anonymous in `dir`
    /// where NEW links O_TMPFILE files, else under a temporary name in the work dir.
    pub(crate) fn scratch_file(&self, dir: BorrowedFd<'_>, mode: u32) -> Result<Scratch> {
        if self.caps.tmpfile {
            let file = posix::anon_file(dir, mode).ctx("O_TMPFILE in NEW")?;
            return Ok(Scratch { file, named: None });
        }
        let work = Arc::new(self.work_dir()?);
        let name = OsString::from(format!(
            "{NEW_FILE_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let fd = rustix::fs::openat(
            &work,
            &name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .ctx("create a temporary file in NEW's work dir")?;
        Ok(Scratch {
            file: File::from(fd),
            named: Some(Box::new((work, name))),
        })
    }

    /// NEW's reference to the inode behind `fd`, kept in copy records: its file handle where
    /// NEW's handles last, else nothing (records are then found by NEW's st_dev and st_ino).
    pub(crate) fn new_identity(&self, fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
        if self.caps.handles {
            posix::file_handle(fd).ctx("file handle of the copy")
        } else {
            Ok(Vec::new())
        }
    }
}

/// What NEW's file system can do, as prepare's probe found it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewCaps {
    pub tmpfile: bool,
    pub handles: bool,
}

impl NewCaps {
    pub(crate) fn from_journal(j: &crate::journal::Records) -> crate::journal::Result<NewCaps> {
        let caps = j.capabilities()?;
        Ok(NewCaps {
            tmpfile: caps.new_tmpfile(),
            handles: caps.new_handles(),
        })
    }
}
