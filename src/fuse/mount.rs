//! The kernel's table of FUSE mounts, as far as ferryfs needs it: which ferryfs view is
//! mounted where (recognised by its source, `ferryfs:<state dir>`), its device number, and
//! unmounting one.
//!
//! Read from /proc/self/mountinfo, never by a stat of the mountpoint: a stat of a view whose
//! daemon is gone (or is this very process, not yet serving) would hang or lie.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A view's file system name prefix and subtype (`ferryfs:<state dir>`, `fuse.ferryfs`).
pub const FS_TYPE: &str = "ferryfs";

/// The lines of /proc/self/mountinfo that matter here.
pub struct MountLine {
    pub mp: PathBuf,
    pub fstype: String,
    pub source: String,
    pub dev: u64,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(f: &str) -> String {
    let mut out = Vec::new();
    let b = f.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&f[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Vec<MountLine> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let (major, minor) = pre.get(2)?.split_once(':')?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next().unwrap_or("");
            Some(MountLine {
                mp: PathBuf::from(unescape(pre.get(4)?)),
                fstype: fstype.to_string(),
                source: unescape(source),
                dev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
            })
        })
        .collect()
}

/// The newest ferryfs mount at `mp` (any, or of the migration in `state`). Recognised by its
/// source (`ferryfs:<state dir>`): a direct mount(2) shows the type as plain `fuse`, without our
/// subtype.
pub fn ferryfs_mount_line(mp: &Path, state: Option<&Path>) -> Option<MountLine> {
    let mp = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    let want = match state {
        Some(st) => format!("{FS_TYPE}:{}", st.display()),
        None => format!("{FS_TYPE}:"),
    };
    mounts().into_iter().rev().find(|m| {
        m.mp == mp
            && m.fstype.starts_with("fuse")
            && match state {
                Some(_) => m.source == want,
                None => m.source.starts_with(&want),
            }
    })
}

/// st_dev of our own FUSE mount at `mp`, from mountinfo: a stat of `mp` would be a request to
/// this very daemon, not yet serving.
pub fn mount_dev(mp: &Path, state: &Path) -> Option<u64> {
    ferryfs_mount_line(mp, Some(state)).map(|m| m.dev)
}

/// Is the view of the migration in `state` (absolute) mounted at `mp`?
pub fn is_mounted(mp: &Path, state: &Path) -> bool {
    ferryfs_mount_line(mp, Some(state)).is_some()
}

/// The ferryfs mount at `mp`, if any: its source (`ferryfs:<state dir>`).
pub fn ferryfs_mount_at(mp: &Path) -> Option<String> {
    ferryfs_mount_line(mp, None).map(|m| m.source)
}

/// The state dir a view's source (`ferryfs:<state dir>`) names.
pub fn state_of_source(source: &str) -> PathBuf {
    PathBuf::from(
        source
            .strip_prefix(&format!("{FS_TYPE}:"))
            .unwrap_or(source),
    )
}

/// The fusectl file that aborts the connection of the view at `mp` (ends its waiting requests
/// with ENOTCONN), for messages that must tell an operator how to free a mount.
pub fn connection_abort_path(mp: &Path) -> String {
    ferryfs_mount_line(mp, None)
        .map(|m| {
            format!(
                "/sys/fs/fuse/connections/{}/abort",
                rustix::fs::minor(m.dev)
            )
        })
        .unwrap_or_else(|| "/sys/fs/fuse/connections/<minor of the mount>/abort".into())
}

/// umount(2) of `mp`. EBUSY can be a path lookup of the view that is in flight at this very
/// moment (a health probe's statfs, an `ls`), so it is retried for half a second: only a busy
/// that lasts (files open in the view) is returned.
pub fn unmount_retrying_busy(mp: &Path) -> rustix::io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::mount::unmount(mp, rustix::mount::UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) if tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Detach the mount at `mp` lazily: open files keep working until closed.
pub fn detach(mp: &Path) -> rustix::io::Result<()> {
    rustix::mount::unmount(mp, rustix::mount::UnmountFlags::DETACH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(
            state_of_source("ferryfs:/var/lib/x"),
            PathBuf::from("/var/lib/x")
        );
    }
}
