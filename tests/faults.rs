//! Bad conditions get an errno for the application, never a crash or a loss: a full NEW, an
//! OLD that vanishes while the view serves it.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::process::Command;

use common::*;

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {} failed", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn a_full_new_gives_enospc_and_the_view_keeps_serving() {
    let mut f = Fixture::new();
    let _small = Tmpfs::mount(&f.new, "2m");
    write(&f.old.join("old.txt"), b"still readable");
    f.start();
    write(&f.v("small"), b"fits");
    let mut h = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(f.v("big"))
        .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut err = None;
    for _ in 0..8 {
        if let Err(e) = h.write_all(&chunk).and_then(|_| h.sync_all()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("8 MiB fit in a 2 MiB NEW");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(h);
    // The daemon is up, everything acknowledged is there, OLD is still served.
    assert!(f.daemon_pid().is_some(), "the daemon died on ENOSPC");
    assert_eq!(fs::read(f.v("small")).unwrap(), b"fits");
    assert_eq!(fs::read(f.v("old.txt")).unwrap(), b"still readable");
    // Once space is freed, writes work again.
    fs::remove_file(f.v("big")).unwrap();
    write(&f.v("after"), b"space again");
    assert_eq!(fs::read(f.v("after")).unwrap(), b"space again");
    f.unmount();
}

#[test]
fn an_old_store_that_vanishes_mid_read_gives_errors_not_a_crash() {
    let mut f = Fixture::new();
    let _old = Tmpfs::mount(&f.old, "64m");
    let data: Vec<u8> = (0..4_000_000u32).map(|i| i as u8).collect();
    write(&f.old.join("big"), &data);
    write(&f.old.join("d/other"), b"o");
    f.start();
    write(&f.v("in-new"), b"kept");
    let mut h = fs::File::open(f.v("big")).unwrap();
    let mut first = vec![0u8; 1 << 20];
    h.read_exact(&mut first).unwrap();
    assert_eq!(first, data[..1 << 20]);
    // OLD's file system goes away under the view (detached, as a failed NFS mount would be).
    let st = Command::new("umount")
        .arg("-l")
        .arg(&f.old)
        .status()
        .unwrap();
    assert!(st.success());
    // The open file keeps reading what it opened (the view holds OLD's inode, not its path);
    // new lookups of OLD-only names fail cleanly; NEW content and the daemon are fine.
    let mut rest = Vec::new();
    h.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, data[1 << 20..]);
    drop(h);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let _ = fs::read(f.v("d/other")); // may still be served from the detached tree, or fail
    assert!(
        f.daemon_pid().is_some(),
        "the daemon died when OLD vanished"
    );
    assert_eq!(fs::read(f.v("in-new")).unwrap(), b"kept");
    write(&f.v("still-writable"), b"yes");
    assert_eq!(fs::read(f.v("still-writable")).unwrap(), b"yes");
    f.unmount();
}

/// An OLD directory that cannot be read (here a FUSE mount inside OLD whose server died: every
/// access fails ENOTCONN, as a dead NFS submount would) is an error of the copier's pass, listed
/// by status: the migration is not executed and commit refuses, rather than a pass that walked
/// past the directory and called itself clean (commit would then drop it from the view).
#[test]
fn an_old_directory_that_cannot_be_read_is_an_error_and_commit_refuses() {
    let f = Fixture::new();
    write(&f.old.join("a.txt"), b"a");
    let src = f.root.path().join("sub-src");
    write(&src.join("inside"), b"only reachable through the submount");
    fs::create_dir(f.old.join("sub")).unwrap();
    let mut bindfs = Command::new("bindfs")
        .arg("-f")
        .arg(&src)
        .arg(f.old.join("sub"))
        .spawn()
        .expect("bindfs is missing (scripts/setup.sh installs it)");
    wait_for("bindfs to serve OLD/sub", 10, || {
        f.old.join("sub/inside").exists()
    });
    f.prepare();
    bindfs.kill().unwrap();
    bindfs.wait().unwrap();
    let gone = fs::metadata(f.old.join("sub")).unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOTCONN), "{gone}");
    let out = f.cmd("execute", &[]);
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(f.old.join("sub"))
        .status();
    assert!(
        !out.status.success(),
        "execute called a pass that could not read OLD/sub clean: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = f.status_json();
    assert_ne!(s["phase"], "executed", "{s}");
    let errors = s["errors"].as_array().expect("errors list");
    assert!(
        errors.iter().any(|e| e["path"]
            .as_str()
            .is_some_and(|p| p.trim_start_matches('/') == "sub")),
        "status does not list OLD/sub: {s}"
    );
    let commit = f.cmd("commit", &[]);
    assert!(!commit.status.success(), "commit went ahead");
    assert_eq!(f.status_json()["phase"], "executing");
}
