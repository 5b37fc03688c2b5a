//! What a POSIX store really does, found by round trips at `prepare` (DESIGN "Stores are
//! probed, not trusted").
//!
//! A file system's word is not enough: JuiceFS emulates O_TMPFILE, a FUSE file system hands
//! out file handles that go stale once the kernel forgets the inode, NFS and Lustre have no
//! O_TMPFILE at all. So `prepare` tries each capability ferryfs relies on, in a scratch
//! directory that it removes again (NEW), or by reading only (OLD: never written), and records
//! the result in the journal. The view and the copier then use a fallback for each missing
//! capability, chosen here and named in prepare's table and in `status --json`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::posix;

/// Name of the scratch directory the probe makes in NEW's root (removed before it returns).
pub const PROBE_DIR: &str = ".ferryfs-probe";

/// FUSE's super block magic (statfs f_type).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// One capability of one store, as the probe found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Short name (`o_tmpfile`, `file_handles`, ...).
    pub name: String,
    pub ok: bool,
    /// What the probe saw (the errno or the value), one line.
    pub detail: String,
    /// What ferryfs does instead when `ok` is false (empty when it is true).
    #[serde(default)]
    pub fallback: String,
    /// Whether the fallback changes what the user gets (prepare warns about it).
    #[serde(default)]
    pub degrades: bool,
}

/// What the probe found of both stores: recorded at prepare, read by every later command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub old: Vec<Capability>,
    pub new: Vec<Capability>,
}

impl Capabilities {
    fn has(list: &[Capability], name: &str) -> bool {
        // A store probed by an older ferryfs (nothing recorded) is taken at its word.
        list.iter().find(|c| c.name == name).is_none_or(|c| c.ok)
    }

    /// NEW links an O_TMPFILE file under a name that then really is there.
    pub fn new_tmpfile(&self) -> bool {
        Self::has(&self.new, "o_tmpfile")
    }

    /// NEW's file handles name the same inode for as long as it lives.
    pub fn new_handles(&self) -> bool {
        Self::has(&self.new, "file_handles")
    }

    /// The table prepare prints: one line per capability, fallbacks named.
    pub fn table(&self) -> String {
        let mut out = String::from("store capabilities (probed):\n");
        for (store, list) in [("OLD", &self.old), ("NEW", &self.new)] {
            for c in list {
                let verdict = if c.ok { "yes" } else { "NO " };
                out.push_str(&format!("  {store} {:<18} {verdict} {}", c.name, c.detail));
                if !c.ok && !c.fallback.is_empty() {
                    out.push_str(&format!(" -> {}", c.fallback));
                }
                out.push('\n');
            }
        }
        out
    }
}

fn cap(name: &str, r: Result<String, String>, fallback: &str, degrades: bool) -> Capability {
    match r {
        Ok(detail) => Capability {
            name: name.into(),
            ok: true,
            detail,
            fallback: String::new(),
            degrades: false,
        },
        Err(detail) => Capability {
            name: name.into(),
            ok: false,
            detail,
            fallback: fallback.into(),
            degrades,
        },
    }
}

fn why(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// (f_type's integer type differs between architectures.)
#[allow(clippy::unnecessary_cast)]
fn is_fuse(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|s| s.f_type as i64 == FUSE_SUPER_MAGIC)
}

/// File handles: a round trip, and not a FUSE file system (whose handles name the kernel's
/// node ids, which go stale once the kernel forgets the inode, unless the server supports
/// export, which nothing tells from outside).
fn handles(dir: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<String, String> {
    let h = posix::file_handle(fd).map_err(|e| format!("name_to_handle_at: {e}"))?;
    let back = posix::open_by_handle(dir, &h).map_err(|e| format!("open_by_handle_at: {e}"))?;
    let (a, b) = (
        posix::stat_fd(fd).map_err(why)?,
        posix::stat_fd(back.as_fd()).map_err(why)?,
    );
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err("open_by_handle_at opened another inode".into());
    }
    if is_fuse(dir) {
        return Err(
            "a FUSE file system: its handles go stale when the kernel forgets an inode".into(),
        );
    }
    Ok(format!("{} bytes", h.len()))
}

fn name_max(dir: BorrowedFd<'_>) -> Result<String, String> {
    let s = rustix::fs::fstatvfs(dir).map_err(why)?;
    if s.f_namemax < 255 {
        return Err(format!("{} bytes", s.f_namemax));
    }
    Ok(format!("{} bytes", s.f_namemax))
}

/// The internal files a JuiceFS mount's root lists unless mounted with `--hide-internal`
/// (`.accesslog`, `.stats`, `.config`, `.trash`), if `dir` is such a root: a FUSE file system
/// whose root holds at least three of them.
pub fn juicefs_internals(dir: &std::path::Path) -> Option<String> {
    let d = File::open(dir).ok()?;
    if !is_fuse(d.as_fd()) {
        return None;
    }
    // Listed, not looked up: `--hide-internal` hides them from listings only.
    let listed: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    let found: Vec<&str> = [".accesslog", ".stats", ".config", ".trash"]
        .into_iter()
        .filter(|n| listed.iter().any(|l| l == n))
        .collect();
    (found.len() >= 3).then(|| found.join(", "))
}

/// Probe OLD, reading only: OLD is never written before abort.
pub fn probe_old(root: BorrowedFd<'_>) -> Vec<Capability> {
    let root_path = || posix::reopen(root, OFlags::RDONLY | OFlags::DIRECTORY);
    vec![
        cap(
            "file_handles",
            root_path()
                .map_err(why)
                .and_then(|d| handles(d.as_fd(), d.as_fd())),
            "not needed of OLD (OLD is found by path)",
            false,
        ),
        cap(
            "xattrs",
            root_path().map_err(why).and_then(|d| {
                rustix::fs::flistxattr(&d, &mut [0u8; 0][..])
                    .map(|n| format!("listed ({n} bytes of names on the root)"))
                    .map_err(|e| format!("flistxattr: {e}"))
            }),
            "no xattrs are copied from OLD",
            false,
        ),
        cap("name_max", name_max(root), "", false),
    ]
}

/// The scratch directory in NEW; removed, with everything in it, when dropped.
struct Scratch<'a> {
    root: BorrowedFd<'a>,
    dir: OwnedFd,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Ok(names) = posix::read_dir_names(self.dir.as_fd()) {
            for e in names {
                let _ =
                    rustix::fs::unlinkat(&self.dir, OsStr::from_bytes(&e.name), AtFlags::empty());
            }
        }
        let _ = rustix::fs::unlinkat(self.root, PROBE_DIR, AtFlags::REMOVEDIR);
    }
}

fn create(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> Result<File, String> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("create {name}: {e}"))?;
    let mut f = File::from(fd);
    f.write_all(data)
        .map_err(|e| format!("write {name}: {e}"))?;
    Ok(f)
}

fn read_back(dir: BorrowedFd<'_>, name: &str) -> Result<Vec<u8>, String> {
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| format!("open {name} after linking: {e}"))?;
    let mut v = Vec::new();
    File::from(fd)
        .read_to_end(&mut v)
        .map_err(|e| format!("read {name}: {e}"))?;
    Ok(v)
}

/// O_TMPFILE that really links: write, link, close, then find the name in a listing and read
/// the bytes back. Not linked on a FUSE file system: JuiceFS 1.4 answers such a link with
/// success, makes a name whose inode it never stores (missing from listings, ENOENT on open)
/// and leaves the directory impossible to remove; no probe may leave that behind.
fn tmpfile(dir: BorrowedFd<'_>) -> Result<String, String> {
    let mut f = posix::anon_file(dir, 0o600).map_err(|e| format!("O_TMPFILE: {e}"))?;
    if is_fuse(dir) {
        return Err(
            "a FUSE file system: O_TMPFILE opens, but links of such files are not \
                    trusted (JuiceFS 1.4 reports links it never makes)"
                .into(),
        );
    }
    f.write_all(b"ferryfs probe")
        .map_err(|e| format!("write: {e}"))?;
    rustix::fs::fsync(&f).map_err(|e| format!("fsync: {e}"))?;
    let tp = posix::proc_path(f.as_fd());
    match rustix::fs::linkat(&f, "", dir, "tmpfile", AtFlags::EMPTY_PATH) {
        Ok(()) => {}
        Err(_) => rustix::fs::linkat(
            rustix::fs::CWD,
            tp.as_c_str(),
            dir,
            "tmpfile",
            AtFlags::SYMLINK_FOLLOW,
        )
        .map_err(|e| format!("linkat: {e}"))?,
    }
    let st = posix::stat_at(dir, OsStr::new("tmpfile"))
        .map_err(|e| format!("linkat said yes, then the name is missing: {e}"))?;
    let own = posix::stat_fd(f.as_fd()).map_err(why)?;
    if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino) {
        return Err("linkat said yes, then the name is another file".into());
    }
    drop(f);
    // A listing asks the file system itself (a lookup may be answered by the kernel's cache).
    let listed = posix::read_dir_names(dir)
        .map_err(why)?
        .iter()
        .any(|e| e.name == b"tmpfile");
    if !listed {
        return Err("linkat said yes, then a listing lacks the name".into());
    }
    if read_back(dir, "tmpfile")? != b"ferryfs probe" {
        return Err("linkat said yes, then the name holds other bytes".into());
    }
    Ok("links and reads back".into())
}

fn rename_noreplace(dir: BorrowedFd<'_>) -> Result<String, String> {
    create(dir, "rn-a", b"a")?;
    create(dir, "rn-b", b"b")?;
    match rustix::fs::renameat_with(dir, "rn-a", dir, "rn-b", rustix::fs::RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::EXIST) => {}
        Ok(()) => return Err("RENAME_NOREPLACE replaced the target".into()),
        Err(e) => return Err(format!("renameat2(RENAME_NOREPLACE): {e}")),
    }
    Ok("refuses to replace".into())
}

fn hard_links(dir: BorrowedFd<'_>) -> Result<String, String> {
    create(dir, "link-a", b"x")?;
    rustix::fs::linkat(dir, "link-a", dir, "link-b", AtFlags::empty())
        .map_err(|e| format!("link: {e}"))?;
    let st = posix::stat_at(dir, OsStr::new("link-a")).map_err(why)?;
    let other = posix::stat_at(dir, OsStr::new("link-b")).map_err(why)?;
    if st.st_nlink != 2 || st.st_ino != other.st_ino {
        return Err(format!(
            "link made, then st_nlink {} / st_ino differ",
            st.st_nlink
        ));
    }
    // Removing a name must drop the count, as the file system itself says (not the kernel's
    // cache): JuiceFS's trash keeps removed names, and counts them.
    rustix::fs::unlinkat(dir, "link-b", AtFlags::empty()).map_err(|e| format!("unlink: {e}"))?;
    let n = rustix::fs::statx(
        dir,
        "link-a",
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_FORCE_SYNC,
        rustix::fs::StatxFlags::NLINK,
    )
    .map_err(|e| format!("statx: {e}"))?
    .stx_nlink;
    if n != 1 {
        return Err(format!(
            "a removed name still counts (st_nlink {n} after unlink: a trash keeps it?)"
        ));
    }
    Ok("two names, one inode".into())
}

fn xattrs(dir: BorrowedFd<'_>) -> Result<String, String> {
    let f = create(dir, "xattr", b"")?;
    rustix::fs::fsetxattr(
        &f,
        "user.ferryfs.probe",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| format!("setxattr user.*: {e}"))?;
    let mut v = [0u8; 4];
    let n = rustix::fs::fgetxattr(&f, "user.ferryfs.probe", &mut v[..])
        .map_err(|e| format!("getxattr: {e}"))?;
    if &v[..n] != b"1" {
        return Err("getxattr returned other bytes".into());
    }
    Ok("user.* set and read back".into())
}

fn copy_file_range(dir: BorrowedFd<'_>) -> Result<String, String> {
    let a = create(dir, "cfr-a", &[7u8; 4096])?;
    let b = create(dir, "cfr-b", b"")?;
    let (mut ia, mut ib) = (0u64, 0u64);
    let n = rustix::fs::copy_file_range(&a, Some(&mut ia), &b, Some(&mut ib), 4096)
        .map_err(|e| format!("copy_file_range: {e}"))?;
    if n != 4096 {
        return Err(format!("copy_file_range copied {n} of 4096 bytes"));
    }
    Ok("in-kernel copy".into())
}

fn sparse(dir: BorrowedFd<'_>) -> Result<String, String> {
    let mut f = create(dir, "sparse", b"")?;
    f.seek(std::io::SeekFrom::Start(8 << 20)).map_err(why)?;
    f.write_all(b"end").map_err(why)?;
    rustix::fs::fsync(&f).map_err(why)?;
    let st = posix::stat_fd(f.as_fd()).map_err(why)?;
    let used = st.st_blocks as u64 * 512;
    if used >= 8 << 20 {
        return Err(format!("an 8 MiB hole took {used} bytes"));
    }
    Ok("holes kept".into())
}

fn subsecond_times(dir: BorrowedFd<'_>) -> Result<String, String> {
    let f = create(dir, "times", b"")?;
    let t = rustix::fs::Timespec {
        tv_sec: 1_600_000_000,
        tv_nsec: 123_456_789,
    };
    rustix::fs::futimens(
        &f,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
    .map_err(|e| format!("futimens: {e}"))?;
    let st = posix::stat_at(dir, OsStr::new("times")).map_err(why)?;
    if st.st_mtime_nsec as i64 != 123_456_789 {
        return Err(format!(
            "mtime .123456789 read back as .{:09}",
            st.st_mtime_nsec
        ));
    }
    Ok("nanoseconds kept".into())
}

fn ino_stable(dir: BorrowedFd<'_>) -> Result<String, String> {
    let f = create(dir, "ino", b"")?;
    let a = posix::stat_fd(f.as_fd()).map_err(why)?;
    drop(f);
    rustix::fs::renameat(dir, "ino", dir, "ino-renamed").map_err(why)?;
    let b = posix::stat_at(dir, OsStr::new("ino-renamed")).map_err(why)?;
    if a.st_ino != b.st_ino {
        return Err(format!(
            "st_ino {} became {} across a rename",
            a.st_ino, b.st_ino
        ));
    }
    Ok("kept across close and rename".into())
}

/// Probe NEW with real round trips in a scratch directory under its root (removed again).
pub fn probe_new(root: BorrowedFd<'_>) -> std::io::Result<Vec<Capability>> {
    let _ = rustix::fs::unlinkat(root, PROBE_DIR, AtFlags::REMOVEDIR);
    rustix::fs::mkdirat(root, PROBE_DIR, Mode::from_raw_mode(0o700))?;
    let dir = posix::open_child(root, OsStr::new(PROBE_DIR))?;
    let s = Scratch { root, dir };
    let d = posix::reopen(s.dir.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)?;
    let d = d.as_fd();
    let handle_probe = create(d, "handle", b"h").and_then(|f| handles(d, f.as_fd()));
    Ok(vec![
        cap(
            "o_tmpfile",
            tmpfile(d),
            "copies are made under a temporary name in NEW's work dir, then renamed into place",
            false,
        ),
        cap(
            "file_handles",
            handle_probe,
            "copies are known by NEW's (st_dev, st_ino) and path; hard-link copies keep a name in the work dir until every OLD name is linked",
            false,
        ),
        cap(
            "rename_noreplace",
            rename_noreplace(d),
            "a look for the name, then a plain rename, under the view's namespace lock",
            false,
        ),
        cap(
            "hard_links",
            hard_links(d),
            "none: OLD hard links that NEW cannot hold fail to copy, each named; counts of \
             links are NEW's own",
            true,
        ),
        cap(
            "xattrs",
            xattrs(d),
            "none: an OLD entry with xattrs fails to copy, with an error naming it",
            true,
        ),
        cap(
            "copy_file_range",
            copy_file_range(d),
            "copies read and write through user space",
            false,
        ),
        cap(
            "sparse_files",
            sparse(d),
            "holes read back as zeros but take disk space in NEW",
            true,
        ),
        cap(
            "subsecond_times",
            subsecond_times(d),
            "none: NEW rounds times (verify reports each rounded time as a mismatch)",
            true,
        ),
        cap(
            "ino_stable",
            ino_stable(d),
            "none: NEW's inode numbers move (the view's own numbers do not)",
            true,
        ),
        cap(
            "name_max",
            name_max(d),
            "none: longer OLD names fail to copy (ENAMETOOLONG), each named",
            true,
        ),
    ])
}

/// Probe an S3 NEW with real requests under a scratch prefix (deleted again): a directory
/// marker (`key/`: several gateways refuse them), the POSIX metadata ferryfs writes read back,
/// and a conditional GET (If-Match) refused for another version.
pub fn probe_s3_new(store: &super::s3::S3Store) -> Vec<Capability> {
    use super::s3::PosixMeta;
    let base = format!(
        ".ferryfs-probe-{}-{}/",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let (file, marker) = (format!("{base}object"), format!("{base}dir/"));
    let meta = PosixMeta {
        mode: Some(0o100640),
        uid: Some(1234),
        gid: Some(5678),
        mtime: Some((1_600_000_000, 123_456_789)),
    };
    let put = store.put(&file, b"ferryfs probe".to_vec(), &meta);
    let metadata = match (&put, store.url.metadata) {
        (Err(e), _) => Err(format!("PUT: {e}")),
        (Ok(_), super::s3::MetaStyle::None) => Ok("not written (--s3-metadata none)".into()),
        (Ok(_), style) => match store.head(&file) {
            Ok(Some(info)) if info.meta.as_ref() == Some(&meta) => {
                Ok(format!("mode, owner, mtime read back ({})", style.as_str()))
            }
            Ok(Some(info)) => Err(format!("wrote {meta:?}, read back {:?}", info.meta)),
            Ok(None) => Err("HEAD after PUT found nothing".into()),
            Err(e) => Err(format!("HEAD: {e}")),
        },
    };
    let conditional = match &put {
        Err(e) => Err(format!("PUT: {e}")),
        Ok(_) => match store.get_range(&file, "\"ferryfs-not-this-version\"", 0, 1) {
            Err(e) if e.errno == libc::ESTALE => Ok("If-Match refuses another version".into()),
            Err(e) => Err(format!("GET If-Match: {e}")),
            Ok(_) => Err("GET If-Match another version answered with data".into()),
        },
    };
    let dir_meta = PosixMeta {
        mode: Some(0o040755),
        ..meta
    };
    let markers = match store.put(&marker, Vec::new(), &dir_meta) {
        Ok(_) => match store.head(&marker) {
            Ok(Some(_)) => Ok("a `key/` object kept".into()),
            Ok(None) => Err("PUT of `key/` said yes, HEAD finds nothing".into()),
            Err(e) => Err(format!("HEAD `key/`: {e}")),
        },
        Err(e) => Err(format!("PUT `key/`: {e}")),
    };
    for k in [&file, &marker] {
        if let Err(e) = store.delete(k) {
            tracing::warn!(key = %k, error = %e, "removing a probe object from NEW");
        }
    }
    vec![
        cap(
            "s3_dir_markers",
            markers,
            "no directory markers: directories exist through their objects; an empty \
             directory cannot be kept (an error naming it until it is removed or filled), \
             directories' mode, owner and times are not kept",
            true,
        ),
        cap(
            "s3_metadata",
            metadata,
            "none: objects' mode, owner and mtime are not kept",
            true,
        ),
        cap(
            "s3_conditional_get",
            conditional,
            "none needed today: the view reads an S3 NEW through its staging tree, never \
             from the bucket",
            false,
        ),
    ]
}

impl Capabilities {
    /// NEW (an S3 bucket) keeps `key/` directory markers.
    pub fn new_dir_markers(&self) -> bool {
        Self::has(&self.new, "s3_dir_markers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_directory_can_do_everything_and_the_probe_leaves_nothing_behind() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = File::open(d.path()).unwrap();
        let caps = probe_new(root.as_fd()).unwrap();
        let names: Vec<&str> = caps.iter().map(|c| c.name.as_str()).collect();
        for n in [
            "o_tmpfile",
            "file_handles",
            "hard_links",
            "xattrs",
            "rename_noreplace",
        ] {
            let c = caps
                .iter()
                .find(|c| c.name == n)
                .unwrap_or_else(|| panic!("{n}: {names:?}"));
            assert!(c.ok, "{c:?}");
        }
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "probe litter"
        );
        let table = Capabilities {
            old: probe_old(root.as_fd()),
            new: caps,
        }
        .table();
        assert!(
            table.contains("NEW o_tmpfile") && table.contains("OLD file_handles"),
            "{table}"
        );
    }
}
