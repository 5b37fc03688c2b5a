//! The scan of OLD that `prepare` makes for the totals `status` reports: a POSIX tree read
//! by many threads at once (a network file system answers each listing after a round trip),
//! or an S3 bucket listed by prefix.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use std::os::unix::ffi::OsStrExt;

use super::filter::Filter;
use crate::journal::Totals;

/// The totals of an S3 OLD: the root listed by directory, then each top-level directory
/// listed recursively (1,000 keys a request), up to 16 at once. A directory is every distinct
/// prefix of a key; a `name/` marker is a directory, not a file.
pub fn scan_totals_s3(
    tree: &crate::store::s3::tree::S3Tree,
    filter: &Filter,
) -> io::Result<Totals> {
    use crate::store::s3::Listed;
    let mut t = Totals::default();
    let mut tops = Vec::new();
    for l in tree.store.list_dir("")? {
        match l {
            Listed::Object(o) if filter.excludes_path(o.rel.as_bytes(), false) => {
                t.excluded_files += 1;
                t.excluded_bytes += o.size;
            }
            Listed::Object(o) => {
                t.files += 1;
                t.bytes += o.size;
            }
            Listed::Dir(d) => tops.push(d),
        }
    }
    SCAN_PROGRESS.add(&t);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts: Vec<io::Result<Totals>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..tops.len().min(16))
            .map(|_| {
                s.spawn(|| -> io::Result<Totals> {
                    let mut t = Totals::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(top) = tops.get(i) else {
                            return Ok(t);
                        };
                        // Directories are the keys' prefixes; each is judged by the filter
                        // once, when first met.
                        let mut dirs = std::collections::HashSet::new();
                        let mut xdirs = std::collections::HashSet::new();
                        tree.store
                            .list_all_below(&format!("{top}/"), &mut |rel, size| {
                                let (parents, is_marker) = match rel.strip_suffix('/') {
                                    Some(d) => (d, true),
                                    None => (rel.rsplit_once('/').map_or("", |(d, _)| d), false),
                                };
                                if !is_marker {
                                    if filter
                                        .excludes_path(rel.trim_end_matches('/').as_bytes(), false)
                                    {
                                        t.excluded_files += 1;
                                        t.excluded_bytes += size;
                                    } else {
                                        t.files += 1;
                                        t.bytes += size;
                                        SCAN_PROGRESS.files.fetch_add(1, Ordering::Relaxed);
                                        SCAN_PROGRESS.bytes.fetch_add(size, Ordering::Relaxed);
                                    }
                                }
                                let mut p = parents;
                                while !p.is_empty() && !dirs.contains(p) && !xdirs.contains(p) {
                                    if filter.excludes_path(p.as_bytes(), true) {
                                        xdirs.insert(p.to_string());
                                    } else {
                                        dirs.insert(p.to_string());
                                    }
                                    p = p.rsplit_once('/').map_or("", |(d, _)| d);
                                }
                            })?;
                        t.dirs += dirs.len() as u64;
                        t.excluded_dirs += xdirs.len() as u64;
                        SCAN_PROGRESS
                            .dirs
                            .fetch_add(dirs.len() as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("scan thread panicked")))
            })
            .collect()
    });
    for p in parts {
        t.add(&p?);
    }
    Ok(t)
}

/// What `prepare`'s scan of OLD has counted so far, for its progress line.
pub struct ScanProgress {
    pub dirs: AtomicU64,
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

pub static SCAN_PROGRESS: ScanProgress = ScanProgress {
    dirs: AtomicU64::new(0),
    files: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

impl ScanProgress {
    pub fn add(&self, t: &Totals) {
        self.dirs.fetch_add(t.dirs, Ordering::Relaxed);
        self.files.fetch_add(t.files, Ordering::Relaxed);
        self.bytes.fetch_add(t.bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> Totals {
        Totals {
            dirs: self.dirs.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            ..Totals::default()
        }
    }
}

/// Directories read at once by the scan: a network OLD (NFS, CephFS) answers each listing and
/// stat after a round trip, so one reader at a time leaves it idle.
const SCAN_THREADS: usize = 16;

/// Walk OLD once for the totals `status` reports, [`SCAN_THREADS`] directories at a time.
/// The first error ends the scan.
pub fn scan_totals(root: &Path, filter: &Filter) -> io::Result<Totals> {
    scan_totals_within(root, filter, NameLimits::default())
}

/// The longest name and path (bytes, below the root) NEW can hold: names beyond them are
/// counted in [`Totals::too_long`] (`prepare --dry-run`).
#[derive(Debug, Clone, Copy)]
pub struct NameLimits {
    pub name: usize,
    pub path: usize,
}

impl Default for NameLimits {
    fn default() -> Self {
        NameLimits {
            name: usize::MAX,
            path: usize::MAX,
        }
    }
}

/// [`scan_totals`], also counting the entries whose name or path is longer than `limits`.
pub fn scan_totals_within(root: &Path, filter: &Filter, limits: NameLimits) -> io::Result<Totals> {
    // Directories to read, and whether the filter excludes them (and so all below).
    let (tx, rx) = crossbeam_channel::unbounded::<(PathBuf, bool)>();
    // Directories queued or being read: none left, and the scan is done.
    let pending = AtomicU64::new(1);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    tx.send((root.to_path_buf(), false))
        .expect("receiver alive");
    let read_dir = |dir: &Path, excluded_dir: bool, t: &mut Totals| -> io::Result<()> {
        let mut sub = Totals::default();
        for ent in fs::read_dir(dir)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            let excluded = excluded_dir
                || (!filter.is_empty() && {
                    let path = ent.path();
                    let rel = path.strip_prefix(root).unwrap_or(&path);
                    filter.excludes(rel.as_os_str().as_bytes(), ft.is_dir())
                });
            if excluded {
                if ft.is_dir() {
                    sub.excluded_dirs += 1;
                    pending.fetch_add(1, Ordering::SeqCst);
                    tx.send((ent.path(), true)).expect("receiver alive");
                } else {
                    sub.excluded_files += 1;
                    if ft.is_file() {
                        sub.excluded_bytes += ent.metadata()?.len();
                    }
                }
                continue;
            }
            if limits.name != usize::MAX || limits.path != usize::MAX {
                let path = ent.path();
                let rel = path.strip_prefix(root).unwrap_or(&path);
                if ent.file_name().len() > limits.name || rel.as_os_str().len() > limits.path {
                    sub.too_long += 1;
                }
            }
            if ft.is_dir() {
                sub.dirs += 1;
                pending.fetch_add(1, Ordering::SeqCst);
                tx.send((ent.path(), false)).expect("receiver alive");
            } else {
                sub.files += 1;
                if ft.is_file() {
                    let md = ent.metadata()?;
                    sub.bytes += md.len();
                    if std::os::unix::fs::MetadataExt::nlink(&md) > 1 {
                        sub.hardlinks += 1;
                    }
                    let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions());
                    if mode & libc::S_ISUID != 0
                        || mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP
                    {
                        sub.setid += 1;
                    }
                } else if ft.is_block_device() || ft.is_char_device() {
                    sub.devices += 1;
                }
            }
        }
        SCAN_PROGRESS.add(&sub);
        t.add(&sub);
        Ok(())
    };
    let parts: Vec<Option<Totals>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..SCAN_THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut t = Totals::default();
                    loop {
                        if pending.load(Ordering::SeqCst) == 0
                            || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
                        {
                            return t;
                        }
                        let Ok((dir, excluded)) =
                            rx.recv_timeout(std::time::Duration::from_millis(5))
                        else {
                            continue;
                        };
                        // A panic is an error of this directory: the other threads would
                        // otherwise wait for ever on its count in `pending`.
                        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            read_dir(&dir, excluded, &mut t)
                        }))
                        .unwrap_or_else(|_| Err(io::Error::other("the scan thread panicked")));
                        if let Err(e) = read {
                            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(io::Error::new(
                                e.kind(),
                                format!("{}: {e}", dir.display()),
                            ));
                        }
                        pending.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().ok()).collect()
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut t = Totals::default();
    for p in parts {
        // A thread that panicked took its counts with it: no totals rather than wrong ones.
        let p = p.ok_or_else(|| io::Error::other("a scan thread panicked"))?;
        t.add(&p);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel scan counts what a plain walk counts: every directory below the root,
    /// every non-directory (symlinks included, not followed), and regular files' bytes.
    #[test]
    fn the_scan_counts_every_entry_once() {
        let root = tempfile::tempdir().unwrap();
        let mut want = Totals::default();
        for a in 0..7 {
            let mut d = root.path().join(format!("a{a}"));
            fs::create_dir(&d).unwrap();
            want.dirs += 1;
            for depth in 0..a {
                d = d.join(format!("deep{depth}"));
                fs::create_dir(&d).unwrap();
                want.dirs += 1;
            }
            for f in 0..(a * 13 + 1) {
                let n = (f * 977 + a) % 5000;
                fs::write(d.join(format!("f{f}")), vec![1u8; n]).unwrap();
                want.files += 1;
                want.bytes += n as u64;
            }
            std::os::unix::fs::symlink("f0", d.join("link")).unwrap();
            want.files += 1;
        }
        fs::create_dir(root.path().join("empty")).unwrap();
        want.dirs += 1;
        fs::write(root.path().join("top"), b"12345").unwrap();
        want.files += 1;
        want.bytes += 5;
        // Set-id programs (set-uid; set-gid with group exec) and device files are counted too.
        use std::os::unix::fs::PermissionsExt;
        for (name, mode, setid) in [("su", 0o4700, 1), ("sg", 0o2750, 1), ("lock", 0o2640, 0)] {
            let p = root.path().join(name);
            fs::write(&p, b"").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            want.files += 1;
            want.setid += setid;
        }
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .expect("mknod of a device file (the tests run as root)");
        want.files += 1;
        want.devices += 1;
        assert_eq!(scan_totals(root.path(), &Filter::default()).unwrap(), want);
        // An unreadable directory ends the scan with an error naming it.
        let e = scan_totals(&root.path().join("missing"), &Filter::default()).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
