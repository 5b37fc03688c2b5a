//! The daemon's life: foreground serving, clean shutdown by signal, by `umount`, by
//! `fusermount3 -u`, and refusal of a mountpoint already served.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mounted(mp: &std::path::Path) -> bool {
    let mp = fs::canonicalize(mp).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()) && l.contains(" - fuse"))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lock is free again once the daemon has really let go of the state dir.
fn state_released(f: &Fixture) -> bool {
    let lock = fs::File::open(f.state.join("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

#[test]
fn foreground_serves_until_sigterm_then_unmounts_and_exits_zero() {
    let f = Fixture::new();
    write(&f.old.join("x"), b"x");
    f.prepare();
    let mut child = Command::new(BIN)
        .args(["mount", "--foreground", "--state"])
        .arg(&f.state)
        .arg(&f.mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the foreground mount", || mounted(&f.mnt));
    assert_eq!(fs::read(f.v("x")).unwrap(), b"x");
    assert!(
        child.try_wait().unwrap().is_none(),
        "--foreground must stay attached"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!mounted(&f.mnt), "SIGTERM left the mount behind");
    assert!(state_released(&f));
}

#[test]
fn plain_umount_and_fusermount3_stop_the_daemon_cleanly() {
    let mut f = Fixture::new();
    f.start();
    write(&f.v("before"), b"1");
    let st = Command::new("umount").arg(&f.mnt).status().unwrap();
    assert!(st.success());
    wait_until("the daemon to release the state dir after umount", || {
        state_released(&f)
    });
    f.mount();
    assert_eq!(fs::read(f.v("before")).unwrap(), b"1");
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&f.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    wait_until(
        "the daemon to release the state dir after fusermount3 -u",
        || state_released(&f),
    );
    assert!(!mounted(&f.mnt));
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert!(
        log.contains("view stopped"),
        "no clean stop in the log:\n{log}"
    );
}

#[test]
fn a_mountpoint_served_by_another_view_is_refused() {
    let mut a = Fixture::new();
    a.start();
    let b = Fixture::new();
    b.prepare();
    let out = ferryfs(&[
        "mount".as_ref(),
        "--state".as_ref(),
        b.state.as_os_str(),
        a.mnt.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already a live ferryfs view"),
        "unclear error: {err}"
    );
    assert!(mounted(&a.mnt), "the live view was disturbed");
    a.unmount();
}

#[test]
fn unmount_of_a_path_that_is_not_a_view_says_so() {
    let f = Fixture::new();
    let out = ferryfs(&["unmount".as_ref(), f.mnt.as_os_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a ferryfs mount"));
}

/// The per-mount options of the mount at `mp` (mountinfo's sixth field: rw,nosuid,...).
fn mount_flags(mp: &std::path::Path) -> Vec<String> {
    let mp = fs::canonicalize(mp).unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
        .unwrap_or_else(|| panic!("nothing mounted at {}", mp.display()));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Set-id programs and device files under a store keep their powers only when asked: the
/// view is `nosuid,nodev` by default (a store may hold files nobody vetted: an NFS share
/// under OLD, a bucket's metadata), and `-o suid,dev` lifts both.
#[test]
fn the_view_is_nosuid_nodev_unless_mounted_suid_dev() {
    let has = |flags: &[String], f: &str| flags.iter().any(|x| x == f);
    let mut f = Fixture::new();
    f.start();
    let flags = mount_flags(&f.mnt);
    for no in ["nosuid", "nodev"] {
        assert!(has(&flags, no), "the default view lacks {no}: {flags:?}");
    }
    f.unmount();
    let mp = f.mnt.clone();
    f.mount_with(&mp, &["--no-copy", "-o", "suid,dev"]);
    let flags = mount_flags(&f.mnt);
    for no in ["nosuid", "nodev"] {
        assert!(!has(&flags, no), "-o suid,dev still {no}: {flags:?}");
    }
    f.unmount();
}

/// `mount` says what a `nosuid,nodev` view takes from OLD: its set-id programs' privileges and
/// its device files, counted by prepare; not when `-o suid,dev` keeps them.
#[test]
fn mount_warns_when_the_view_takes_powers_from_old_set_id_programs_and_devices() {
    use std::os::unix::fs::PermissionsExt;
    let mut f = Fixture::new();
    write(&f.old.join("helper"), b"#!/bin/sh\n");
    fs::set_permissions(f.old.join("helper"), fs::Permissions::from_mode(0o4755)).unwrap();
    // A set-gid file without group exec is a locking mark, not a program: not counted.
    write(&f.old.join("locked"), b"x");
    fs::set_permissions(f.old.join("locked"), fs::Permissions::from_mode(0o2644)).unwrap();
    let st = Command::new("mknod")
        .arg(f.old.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success(), "mknod of a device file in OLD");
    f.prepare();
    let mp = f.mnt.clone();
    let out = f.try_mount(&mp, &["--no-copy"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "mount failed: {err}");
    f.unmount_at(&mp);
    assert!(
        err.contains("warning: OLD holds 1 set-id program(s)"),
        "no set-id warning: {err}"
    );
    assert!(
        err.contains("warning: OLD holds 1 device file(s)"),
        "no device warning: {err}"
    );
    let out = f.try_mount(&mp, &["--no-copy", "-o", "suid,dev"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "mount -o suid,dev failed: {err}");
    f.unmount_at(&mp);
    assert!(!err.contains("warning:"), "warned with -o suid,dev: {err}");
}

/// Terminal ioctls (Python's `open()` asks TCGETS of every file) get ENOTTY from the view, as
/// from a plain file, and the daemon logs nothing for them (fuser's default logged three
/// lines of "Not Implemented" each time).
#[test]
fn a_terminal_ioctl_gets_enotty_and_logs_nothing() {
    let mut f = Fixture::new();
    write(&f.old.join("old-only"), b"from OLD");
    f.start();
    write(&f.v("in-new"), b"written through the view");
    for name in ["old-only", "in-new"] {
        let file = fs::File::open(f.v(name)).unwrap();
        // SAFETY: termios is plain data, valid all zero.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: TCGETS writes a termios into `t`, which lives across the call; the fd is open.
        let r =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::TCGETS, &mut t) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((r, errno), (-1, Some(libc::ENOTTY)), "{name}");
    }
    let out = run(Command::new("python3").arg("-c").arg(format!(
        "open({:?}).read(); open({:?}).read()",
        f.v("old-only"),
        f.v("in-new")
    )));
    assert!(out.status.success(), "{out:?}");
    f.unmount();
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert!(
        !log.contains("Not Implemented"),
        "the daemon logged ioctls:\n{log}"
    );
}
