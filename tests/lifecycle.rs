//! The migration lifecycle end to end, through real mounts and the real binary: execute,
//! status, verify, commit, abort, crashes while copying, OLD changing behind the view,
//! applications writing while the copier copies, and copy errors (EACCES, ENOSPC).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The source of the ferryfs mount at `mp`, if one is there.
fn ferryfs_mount_source(mp: &Path) -> Option<String> {
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == mp && f.get(sep + 2)?.starts_with("ferryfs:"))
            .then(|| f[sep + 2].to_string())
    })
}

/// A dataset with everything rule 10 names and awkward names: nested dirs, `small` small
/// files, large and sparse files, symlinks, hard links, xattrs, owners and modes.
fn build_dataset(old: &Path, small: usize) {
    for i in 0..small {
        let d = old.join(format!("tree/d{:02}/e{}", i % 40, i % 3));
        if i % 40 < 3 || !d.exists() {
            fs::create_dir_all(&d).unwrap();
        }
        let len = 1 + (i * 7919) % 3000;
        let data: Vec<u8> = (0..len).map(|j| (i + j * 31) as u8).collect();
        fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    // Large files.
    let big: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    write(&old.join("large/one.bin"), &big);
    write(&old.join("large/two.bin"), &big[..5 << 20]);
    // Sparse: holes at the start, middle and end.
    let f = fs::File::create(old.join("sparse.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", 20 << 20).unwrap();
    f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
    drop(f);
    // Symlinks (relative, absolute, dangling) and hard links.
    symlink("tree/d01/e1/f1", old.join("rel-link")).unwrap();
    symlink("/etc/hostname", old.join("abs-link")).unwrap();
    symlink("nowhere", old.join("dangling")).unwrap();
    links_and_xattrs(old);
    write(&old.join("owned/secret"), b"s");
    std::os::unix::fs::chown(old.join("owned/secret"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(old.join("owned/secret"), fs::Permissions::from_mode(0o4750)).unwrap();
    std::os::unix::fs::chown(old.join("owned"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(old.join("owned"), fs::Permissions::from_mode(0o2775)).unwrap();
    // Awkward names: spaces, a newline, non-UTF-8 bytes, 255 bytes.
    let awk = old.join("awkward");
    fs::create_dir(&awk).unwrap();
    for name in [
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        b"bytes\xff\xfe".to_vec(),
        vec![b'n'; 255],
    ] {
        fs::write(awk.join(OsStr::from_bytes(&name)), &name).unwrap();
    }
    fs::create_dir(awk.join(OsStr::from_bytes(b"dir \xc3\x28"))).unwrap();
    // Times set last, to the nanosecond, on a file and a directory.
    let ts = fixed_times();
    for p in ["large/two.bin", "awkward"] {
        rustix::fs::utimensat(
            rustix::fs::CWD,
            old.join(p),
            &ts,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
    }
}

/// Changes an application makes through the view.
fn change_through_view(v: &Path) {
    write(&v.join("born/new-file"), b"made in the view");
    fs::rename(v.join("tree/d05"), v.join("tree/d05-renamed")).unwrap();
    fs::remove_file(v.join("tree/d06/e0/f6")).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(v.join("tree/d07/e1/f7"))
        .unwrap()
        .write_all(b"appended")
        .unwrap();
    fs::set_permissions(v.join("links/b"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(v.join("awkward/with space"), v.join("awkward/moved here")).unwrap();
}

fn wait_executed(f: &Fixture, secs: u64) {
    wait_for("phase executed", secs, || {
        f.status_json()["phase"] == "executed"
    });
}

fn assert_ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "command failed: {}", out_text(&o));
    out_text(&o)
}

#[test]
fn end_to_end_execute_verify_commit_makes_new_equal_the_view_exactly() {
    let mut f = Fixture::new();
    build_dataset(&f.old, 10_000);
    let old_before = full_manifest(&f.old);
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy"]);
    change_through_view(&f.mnt);
    f.unmount();
    // The view as applications left it (a fresh mount: no cached attributes).
    f.mount();
    let view_before = full_manifest(&f.mnt);
    let st = f.status_json();
    assert_eq!(st["phase"], "prepared");
    assert!(st["files"]["total"].as_u64().unwrap() >= 10_000, "{st}");
    assert!(st["local"].as_u64().unwrap() > 0, "{st}");
    // Execute through the running daemon, and wait.
    let out = assert_ok(f.cmd("execute", &["--wait"]));
    assert!(out.contains("executing"), "{out}");
    let st = f.status_json();
    assert_eq!(st["phase"], "executed");
    assert_eq!(st["files"]["done"], st["files"]["total"], "{st}");
    assert_eq!(st["bytes"]["done"], st["bytes"]["total"], "{st}");
    assert_eq!(st["errors"].as_array().unwrap().len(), 0, "{st}");
    assert_eq!(st["eta_seconds"], 0, "{st}");
    // Copying changed nothing applications see.
    f.unmount();
    f.mount();
    let view_after = full_manifest(&f.mnt);
    assert!(
        view_before == view_after,
        "{}",
        diff(&view_before, &view_after)
    );
    let out = assert_ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    // Long checks say what they do, then how far they are, every second.
    assert!(out.starts_with("verify: checking about "), "{out}");
    let out = assert_ok(f.cmd("commit", &[]));
    assert!(out.contains("committed"), "{out}");
    assert!(out.starts_with("commit: checking about "), "{out}");
    assert_eq!(f.status_json()["phase"], "committed");
    // The view now serves NEW alone, unchanged.
    assert!(full_manifest(&f.mnt) == view_before);
    f.unmount();
    // NEW is a plain tree equal to the view, with no ferryfs litter; OLD is untouched.
    let new = full_manifest(&f.new);
    assert!(new == view_before, "{}", diff(&view_before, &new));
    assert!(names(&f.new).iter().all(|n| !n.starts_with(".ferryfs")));
    assert!(rustix::fs::llistxattr(&f.new, &mut [0u8; 1024][..]).unwrap() == 0);
    let old_after = full_manifest(&f.old);
    assert!(old_after == old_before, "{}", diff(&old_before, &old_after));
    // Once committed, a mount serves NEW even with OLD gone.
    fs::rename(&f.old, f.root.path().join("old-gone")).unwrap();
    f.mount();
    assert_eq!(fs::read(f.v("born/new-file")).unwrap(), b"made in the view");
    f.unmount();
}

#[test]
fn commit_refuses_before_executed_and_says_why() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    f.start();
    let o = f.cmd("commit", &[]);
    assert!(!o.status.success());
    assert!(out_text(&o).contains("not executed"), "{}", out_text(&o));
    f.unmount();
    // Without a daemon, the same refusal from the CLI itself.
    let o = f.cmd("commit", &[]);
    assert!(!o.status.success());
    assert!(out_text(&o).contains("not executed"), "{}", out_text(&o));
    assert_eq!(f.status_json()["phase"], "prepared");
}

#[test]
fn abort_returns_old_to_the_view_as_it_was_including_every_change() {
    let mut f = Fixture::new();
    build_dataset(&f.old, 300);
    f.prepare();
    // Mount in place, with the copier running slowly so some files are copied and some not.
    let old = f.old.clone();
    f.mount_with(&old, &["--bwlimit", "2M"]);
    std::thread::sleep(Duration::from_millis(500));
    let v = &f.old;
    change_through_view(v);
    write(&v.join("tree/d09/e0/f9"), b"rewritten entirely");
    fs::remove_dir_all(v.join("tree/d10")).unwrap();
    fs::create_dir_all(v.join("fresh/deep/er")).unwrap();
    write(&v.join("fresh/deep/er/x"), b"x");
    fs::rename(v.join("large"), v.join("fresh/large-moved")).unwrap();
    fs::rename(v.join("links/a"), v.join("links/a-renamed")).unwrap();
    fs::set_permissions(v.join("tree/d11"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::hard_link(v.join("born/new-file"), v.join("born/second-name")).unwrap();
    symlink("born/new-file", v.join("born-link")).unwrap();
    std::thread::sleep(Duration::from_millis(1200)); // cached attributes expire
    let snapshot = full_manifest(v);
    // Abort with the view still mounted in place: the daemon stops its copier, holds every
    // change while it rebuilds OLD, then detaches the view, so OLD's own path shows OLD again.
    let out = assert_ok(f.cmd("abort", &[]));
    assert!(out.contains("aborted"), "{out}");
    assert!(
        out.starts_with("abort: writing about "),
        "no progress line first: {out}"
    );
    assert!(
        ferryfs_mount_source(&f.old).is_none(),
        "the view is still mounted over OLD after abort"
    );
    let after = full_manifest(&f.old);
    assert!(after == snapshot, "{}", diff(&snapshot, &after));
    assert!(names(&f.old).iter().all(|n| !n.starts_with(".ferryfs")));
    assert_eq!(names(&f.new), Vec::<String>::new(), "NEW keeps nothing");
    assert_eq!(f.status_json()["phase"], "aborted");
    // A second abort is a no-op; a commit is refused.
    wait_for("the daemon to exit", 30, || f.daemon_pid().is_none());
    assert_ok(f.cmd("abort", &[]));
    assert!(!f.cmd("commit", &[]).status.success());
}

#[test]
fn abort_without_a_daemon_after_unmount_and_keep_new() {
    let mut f = Fixture::new();
    write(&f.old.join("d/a"), b"a");
    write(&f.old.join("d/b"), b"b");
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy"]);
    write(&f.v("d/a"), b"a, changed");
    fs::rename(f.v("d"), f.v("e")).unwrap();
    write(&f.v("e/c"), b"new");
    std::thread::sleep(Duration::from_millis(1200));
    let snapshot = full_manifest(&f.mnt);
    f.unmount();
    let out = assert_ok(f.cmd("abort", &["--keep-new"]));
    assert!(out.starts_with("abort: writing about "), "{out}");
    assert!(out.contains("NEW kept"), "{out}");
    let after = full_manifest(&f.old);
    assert!(after == snapshot, "{}", diff(&snapshot, &after));
    assert!(!names(&f.new).is_empty(), "--keep-new emptied NEW");
}

#[test]
fn kill_9_while_copying_symlinks_and_fifos_leaves_none_with_the_wrong_owner_or_times() {
    let mut f = Fixture::new();
    // Many entries whose copy is all metadata: a kill lands inside one copy's making.
    for d in 0..10 {
        let dir = f.old.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..1500 {
            let p = dir.join(format!("l{i:04}"));
            symlink(format!("target-{d}-{i}"), &p).unwrap();
            std::os::unix::fs::lchown(&p, Some(4321), Some(4322)).unwrap();
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &fixed_times(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        for i in 0..300 {
            let p = dir.join(format!("p{i:03}"));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o640),
                0,
            )
            .unwrap();
            std::os::unix::fs::lchown(&p, Some(4321), Some(4322)).unwrap();
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &fixed_times(),
                rustix::fs::AtFlags::empty(),
            )
            .unwrap();
        }
    }
    let old_manifest = full_manifest(&f.old);
    f.prepare();
    let mnt = f.mnt.clone();
    let mut kills = 0;
    for ms in [600u64, 900, 450, 1200, 750] {
        f.mount_with(&mnt, &[]);
        std::thread::sleep(Duration::from_millis(ms));
        if f.status_json()["phase"] == "executed" {
            f.unmount();
            break;
        }
        f.kill9();
        kills += 1;
    }
    assert!(kills >= 2, "the copier finished before a second kill");
    f.mount_with(&mnt, &[]);
    wait_executed(&f, 300);
    f.unmount();
    assert!(
        !f.new.join(ferryfs::view::WORK_DIR).exists(),
        "an executed migration left ferryfs's work dir in NEW"
    );
    // Making and removing the work dir is ferryfs's own business: NEW's root keeps OLD's times.
    let mtime = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    assert_eq!(mtime(&f.new), mtime(&f.old), "NEW's root times");
    assert_ok(f.cmd("commit", &[]));
    let new = full_manifest(&f.new);
    assert!(new == old_manifest, "{}", diff(&old_manifest, &new));
}

#[test]
fn kill_9_while_copying_resumes_without_copying_finished_files_again() {
    let mut f = Fixture::new();
    let files = 3_000;
    build_dataset(&f.old, files);
    let old_manifest = full_manifest(&f.old);
    let total_files = old_manifest
        .values()
        .filter(|(i, _, _)| i.kind != "dir")
        .count() as u64;
    // Hard links are one file in NEW but several names; the copier counts names.
    f.prepare();
    let mnt = f.mnt.clone();
    let mut seen = Vec::new();
    for (round, ms) in [700u64, 1900, 1300].into_iter().enumerate() {
        f.mount_with(&mnt, &["--ops-limit", "400"]);
        std::thread::sleep(Duration::from_millis(ms));
        let done = f.status_json()["files"]["done"].as_u64().unwrap();
        f.kill9();
        let after = f.status_json()["files"]["done"].as_u64().unwrap();
        eprintln!("round {round}: killed at {done} files done, journal says {after}");
        assert!(after >= done, "done went back: {done} -> {after}");
        seen.push(after);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        *seen.last().unwrap() < total_files,
        "the copier finished before the last kill"
    );
    let log_from = fs::metadata(f.state.join("ferryfs.log")).unwrap().len() as usize;
    f.mount_with(&mnt, &[]);
    wait_executed(&f, 300);
    let st = f.status_json();
    eprintln!("final: {st}");
    assert_eq!(st["files"]["done"].as_u64().unwrap(), total_files, "{st}");
    // The copy counter (every copy made, across the kills) against what NEW holds: the
    // difference is files copied twice, which may only be files in flight at a kill (at most
    // one batch per worker: 16 workers by default, 64 files per batch), or copies named just
    // before a kill whose count (journaled after the batch's links, unsynced: it is only
    // news) the kill took with it, again at most a batch per worker.
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    let line = log[log_from..]
        .lines()
        .find(|l| l.contains("copy counts at executed"))
        .unwrap_or_else(|| panic!("no count line in the log:\n{}", &log[log_from..]));
    let num = |key: &str| -> u64 {
        let at = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (counted, held) = (num("counted_files"), num("view_files"));
    eprintln!(
        "copies made over 3 kills and a resume: {counted}; names in NEW: {held}; \
         difference: {}",
        counted as i64 - held as i64
    );
    assert_eq!(held, total_files);
    assert!(counted.abs_diff(held) <= 3 * 16 * 64, "{line}");
    f.unmount();
    // Without a daemon: the check runs in the command, with the same progress lines.
    let out = assert_ok(f.cmd("verify", &["--checksum"]));
    assert!(out.starts_with("verify: checking about "), "{out}");
    assert_ok(f.cmd("commit", &[]));
    let new = full_manifest(&f.new);
    assert!(new == old_manifest, "{}", diff(&old_manifest, &new));
}

#[test]
fn a_file_changed_in_old_after_its_copy_blocks_commit_until_copied_again() {
    let mut f = Fixture::new();
    write(&f.old.join("d/changes"), b"version one");
    write(&f.old.join("d/stays"), b"same");
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    wait_executed(&f, 60);
    // Behind the view's back (OLD is not covered here).
    std::thread::sleep(Duration::from_millis(20));
    fs::write(f.old.join("d/changes"), b"version two, longer").unwrap();
    let o = f.cmd("commit", &[]);
    assert!(!o.status.success(), "commit accepted a stale copy");
    assert!(out_text(&o).contains("changed in OLD"), "{}", out_text(&o));
    let st = f.status_json();
    assert!(
        st["changed_in_old"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/d/changes"),
        "status does not show the stale file: {st}"
    );
    // The copier takes it again (the refused commit woke it), then commit goes through.
    assert_ok(f.cmd("execute", &["--wait"]));
    wait_for("errors cleared", 30, || {
        f.status_json()["errors"].as_array().unwrap().is_empty()
    });
    assert_ok(f.cmd("commit", &[]));
    let st = f.status_json();
    assert_eq!(
        st["changed_in_old"][0]["copied_again"], true,
        "status: {st}"
    );
    f.unmount();
    assert_eq!(
        fs::read(f.new.join("d/changes")).unwrap(),
        b"version two, longer"
    );
}

/// Rewrite OLD's `d/a` (`size` bytes of '2') behind the executed view, limit the copier to
/// `bwlimit`, and start the pass that takes the file again (the refused commit finds it).
fn start_a_slow_recopy(f: &Fixture, size: usize, bwlimit: &str) {
    std::thread::sleep(Duration::from_millis(20));
    fs::write(f.old.join("d/a"), vec![b'2'; size]).unwrap();
    assert_ok(f.cmd("limits", &["--bwlimit", bwlimit]));
    assert!(!f.cmd("commit", &[]).status.success());
    assert_ok(f.cmd("execute", &[]));
}

#[test]
fn a_write_through_the_view_during_a_recopy_of_a_hard_linked_file_is_kept() {
    let mut f = Fixture::new();
    let size = 32usize << 20;
    write(&f.old.join("d/a"), &vec![b'1'; size]);
    fs::hard_link(f.old.join("d/a"), f.old.join("d/b")).unwrap();
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--recheck-interval", "0"]);
    wait_executed(&f, 60);
    let new = f.new.clone();
    let ino = |p: &str| fs::metadata(new.join(p)).unwrap().ino();
    assert_eq!(ino("d/a"), ino("d/b"), "NEW split the hard link");
    // Behind the view's back: OLD rewritten in place (both names), then a slow copier (8 MiB/s:
    // about 4 s to take the file again, rewriting NEW's one inode in place).
    start_a_slow_recopy(&f, size, "8M");
    std::thread::sleep(Duration::from_millis(1500));
    // Mid-recopy, an application writes the last bytes through the other name.
    let h = fs::OpenOptions::new().write(true).open(f.v("d/b")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&h, b"APPENDIX", size as u64 - 8).unwrap();
    h.sync_all().unwrap();
    drop(h);
    assert_ok(f.cmd("limits", &["--bwlimit", "0"]));
    assert_ok(f.cmd("execute", &["--wait"]));
    let mut want = vec![b'2'; size - 8];
    want.extend_from_slice(b"APPENDIX");
    let got = fs::read(f.v("d/a")).unwrap();
    assert!(
        got == want,
        "the view's write or OLD's new bytes were lost: size {}, tail {:?}, head {:?}",
        got.len(),
        String::from_utf8_lossy(&got[got.len().saturating_sub(8)..]),
        got.first().map(|b| *b as char)
    );
    assert_ok(f.cmd("commit", &[]));
    f.unmount();
    assert_eq!(ino("d/a"), ino("d/b"), "NEW split the hard link");
    assert!(fs::read(f.new.join("d/b")).unwrap() == want);
}

#[test]
fn a_write_waiting_for_a_recopy_is_not_held_by_a_paused_copier() {
    let mut f = Fixture::new();
    let size = 32usize << 20;
    write(&f.old.join("d/a"), &vec![b'1'; size]);
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--recheck-interval", "0"]);
    wait_executed(&f, 60);
    // OLD rewritten behind the view; the copier takes it again at 4 MiB/s (about 8 s), and is
    // paused a second into that.
    start_a_slow_recopy(&f, size, "4M");
    std::thread::sleep(Duration::from_millis(1000));
    assert_ok(f.cmd("pause", &[]));
    // A write through the view waits for the recopy, which no pause or limit holds back now.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = f.v("d/a");
    std::thread::spawn(move || {
        let r = fs::OpenOptions::new().write(true).open(&p).and_then(|h| {
            std::os::unix::fs::FileExt::write_all_at(&h, b"END", size as u64 - 3)?;
            h.sync_all()
        });
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    assert_ok(f.cmd("resume", &[]));
    assert!(
        matches!(got, Ok(Ok(()))),
        "the write waited on the paused copier: {got:?}"
    );
    let data = fs::read(f.v("d/a")).unwrap();
    assert!(
        data[..size - 3].iter().all(|b| *b == b'1') || data[..size - 3].iter().all(|b| *b == b'2')
    );
    assert_eq!(&data[size - 3..], b"END");
    f.unmount();
}

#[test]
fn a_file_the_copier_takes_again_is_read_fresh_through_the_view_whatever_the_ttl() {
    let mut f = Fixture::new();
    write(&f.old.join("d/changes"), b"version one");
    f.prepare();
    let mnt = f.mnt.clone();
    // A TTL far longer than the test: only an invalidation can make the kernel ask again.
    f.mount_with(&mnt, &["--metadata-ttl", "600"]);
    wait_executed(&f, 60);
    // The kernel now caches the file's attributes and pages.
    assert_eq!(fs::read(f.v("d/changes")).unwrap(), b"version one");
    assert_eq!(fs::metadata(f.v("d/changes")).unwrap().len(), 11);
    std::thread::sleep(Duration::from_millis(20));
    fs::write(f.old.join("d/changes"), b"version two, longer").unwrap();
    // The refused commit finds the change; the copier takes the file again.
    assert!(!f.cmd("commit", &[]).status.success());
    assert_ok(f.cmd("execute", &["--wait"]));
    wait_for("the file copied again", 30, || {
        f.status_json()["changed_in_old"][0]["copied_again"] == true
    });
    assert_eq!(
        fs::metadata(f.v("d/changes")).unwrap().len(),
        19,
        "the kernel kept the size it cached before the copy was taken again"
    );
    assert_eq!(
        fs::read(f.v("d/changes")).unwrap(),
        b"version two, longer",
        "the view serves the stale bytes"
    );
    f.unmount();
}

#[test]
fn an_application_appending_while_the_copier_copies_loses_no_byte() {
    let mut f = Fixture::new();
    let original: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8).collect();
    write(&f.old.join("log"), &original);
    f.prepare();
    let mnt = f.mnt.clone();
    // 8 MiB/s: the copier needs ~6 s for this file.
    f.mount_with(&mnt, &["--bwlimit", "8M"]);
    std::thread::sleep(Duration::from_millis(1000));
    let mut appended = Vec::new();
    let mut h = fs::OpenOptions::new()
        .append(true)
        .open(f.v("log"))
        .unwrap();
    for i in 0..50u32 {
        let line = format!("line {i}\n");
        h.write_all(line.as_bytes()).unwrap();
        appended.extend_from_slice(line.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    h.sync_all().unwrap();
    drop(h);
    wait_executed(&f, 120);
    let mut expect = original.clone();
    expect.extend_from_slice(&appended);
    assert!(
        fs::read(f.v("log")).unwrap() == expect,
        "the view lost bytes"
    );
    f.unmount();
    assert_ok(f.cmd("commit", &[]));
    assert!(
        fs::read(f.new.join("log")).unwrap() == expect,
        "NEW lost bytes"
    );
}

fn mounted_tmpfs(dir: &Path, size: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs at {} failed", dir.display());
}

/// Give the tmpfs at `dir` room (or take it away) without unmounting it.
fn resize_tmpfs(dir: &Path, size: &str) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(dir)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "resizing the tmpfs at {} failed",
        dir.display()
    );
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        detach_view(&self.0, false);
    }
}

/// Put NEW on a tmpfs of `size`, prepare, and mount the view; the tmpfs goes with the guard.
fn mount_with_new_on_tmpfs(f: &mut Fixture, size: &str) -> Unmount {
    mounted_tmpfs(&f.new, size);
    let guard = Unmount(f.new.clone());
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    guard
}

#[test]
fn a_full_new_is_listed_retried_and_completes_once_space_is_freed() {
    let mut f = Fixture::new();
    for i in 0..6 {
        write(&f.old.join(format!("big{i}")), &vec![i as u8; 1 << 20]);
    }
    let _u = mount_with_new_on_tmpfs(&mut f, "3M");
    wait_for("an ENOSPC error in status", 60, || {
        f.status_json()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["errno"] == libc::ENOSPC)
    });
    let o = f.cmd("commit", &[]);
    assert!(
        !o.status.success(),
        "commit accepted a migration with errors"
    );
    // The daemon is up and serves every file (from OLD where the copy failed).
    assert_eq!(fs::read(f.v("big5")).unwrap(), vec![5u8; 1 << 20]);
    resize_tmpfs(&f.new, "64M");
    wait_executed(&f, 180);
    assert!(f.status_json()["errors"].as_array().unwrap().is_empty());
    assert_ok(f.cmd("commit", &[]));
    f.unmount();
    for i in 0..6 {
        assert_eq!(
            fs::read(f.new.join(format!("big{i}"))).unwrap(),
            vec![i as u8; 1 << 20]
        );
    }
}

#[test]
fn a_full_new_logs_a_few_failures_a_pass_and_counts_the_rest_while_status_lists_all() {
    let mut f = Fixture::new();
    for i in 0..80 {
        write(&f.old.join(format!("d/f{i:02}")), &vec![i as u8; 64 << 10]);
    }
    let _u = mount_with_new_on_tmpfs(&mut f, "1M");
    let log = f.state.join("ferryfs.log");
    wait_for(
        "a pass's summary of its ENOSPC failures in the log",
        60,
        || fs::read_to_string(&log).is_ok_and(|l| l.contains("copies failed alike this pass")),
    );
    let errors = f.status_json()["errors"].as_array().unwrap().len();
    assert!(
        errors > 40,
        "status lists {errors} errors, want every failed file"
    );
    let text = fs::read_to_string(&log).unwrap();
    let one_by_one = text.matches("copy failed; will retry").count();
    let summaries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("copies failed alike this pass"))
        .collect();
    assert!(
        summaries[0].contains("errno=28") && summaries[0].contains("not_logged="),
        "{}",
        summaries[0]
    );
    // 20 lines a pass at most, the pass under way included.
    assert!(
        one_by_one <= 20 * (summaries.len() + 1),
        "{one_by_one} failure lines for {} passes",
        summaries.len()
    );
    resize_tmpfs(&f.new, "64M");
    wait_executed(&f, 180);
    assert!(f.status_json()["errors"].as_array().unwrap().is_empty());
    f.unmount();
}

#[test]
fn an_unreadable_old_file_is_listed_retried_and_completes_once_readable() {
    // Root reads everything; a daemon without DAC override (as under NFS root squash, or a
    // confined service) does not. setpriv drops those capabilities from the daemon.
    let setpriv = Command::new("setpriv").arg("--help").output();
    assert!(
        setpriv.is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is missing: it is needed to run the daemon without DAC override"
    );
    let f = Fixture::new();
    write(&f.old.join("open/readable"), b"fine");
    write(&f.old.join("open/locked"), b"secret bytes");
    std::os::unix::fs::chown(f.old.join("open/locked"), Some(4321), Some(4321)).unwrap();
    fs::set_permissions(f.old.join("open/locked"), fs::Permissions::from_mode(0o000)).unwrap();
    f.prepare();
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--inh-caps",
            "-dac_override,-dac_read_search",
        ])
        .arg(BIN)
        .args(["mount", "--state"])
        .arg(&f.state)
        .arg(&f.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let mnt = f.mnt.clone();
    let _u = Unmount(mnt.clone());
    wait_for("an EACCES error in status", 60, || {
        f.status_json()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["errno"] == libc::EACCES && e["path"] == "/open/locked")
    });
    // `execute --wait` does not wait for ever on an entry that keeps failing: after five
    // passes in a row with errors it says which and exits non-zero; the daemon goes on.
    let t = std::time::Instant::now();
    let mut child = Command::new(BIN)
        .args(["execute", "--wait", "--state"])
        .arg(&f.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("execute --wait still waiting after 120 s on an entry that keeps failing");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "execute --wait passed: {}",
        out_text(&out)
    );
    assert!(
        err.contains("/open/locked") && err.contains("not executed"),
        "{err}"
    );
    assert!(f.daemon_pid().is_some(), "the daemon went away");
    assert!(!f.cmd("commit", &[]).status.success());
    assert_eq!(fs::read(f.v("open/readable")).unwrap(), b"fine");
    fs::set_permissions(f.old.join("open/locked"), fs::Permissions::from_mode(0o644)).unwrap();
    wait_executed(&f, 180);
    assert_ok(f.cmd("commit", &[]));
    assert_ok(ferryfs(&["unmount".as_ref(), mnt.as_os_str()]));
    let md = fs::metadata(f.new.join("open/locked")).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (4321, 0o644));
    assert_eq!(
        fs::read(f.new.join("open/locked")).unwrap(),
        b"secret bytes"
    );
}

#[test]
fn a_file_changed_in_old_is_found_and_copied_again_when_an_application_looks_it_up() {
    let mut f = Fixture::new();
    write(&f.old.join("d/f"), b"one");
    f.prepare();
    let mnt = f.mnt.clone();
    // No periodic recheck: only the lookup can find the change before commit.
    f.mount_with(&mnt, &["--recheck-interval", "0"]);
    wait_executed(&f, 60);
    std::thread::sleep(Duration::from_millis(20));
    fs::write(f.old.join("d/f"), b"two, in OLD behind the view").unwrap();
    // The view was never asked for d/f: this stat is the kernel's first lookup of it.
    std::thread::sleep(Duration::from_millis(1200));
    fs::metadata(f.v("d/f")).unwrap();
    wait_for("the lookup's check to copy d/f again", 30, || {
        f.status_json()["changed_in_old"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/d/f" && e["copied_again"] == true)
    });
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        fs::read(f.v("d/f")).unwrap(),
        b"two, in OLD behind the view"
    );
    assert_ok(f.cmd("commit", &[]));
    f.unmount();
    assert_eq!(
        fs::read(f.new.join("d/f")).unwrap(),
        b"two, in OLD behind the view"
    );
}

#[test]
fn files_applications_read_are_copied_first() {
    let mut f = Fixture::new();
    for d in 0..30 {
        for i in 0..100 {
            write(
                &f.old.join(format!("d{d:02}/f{i:03}")),
                format!("{d}/{i}").as_bytes(),
            );
        }
    }
    f.prepare();
    let mnt = f.mnt.clone();
    // 40 entries/s: the whole tree takes over a minute.
    f.mount_with(&mnt, &["--ops-limit", "40"]);
    std::thread::sleep(Duration::from_millis(1000));
    // Files the walk has not reached yet: an application reads them through the view.
    let targets: Vec<String> = (0..30)
        .map(|d| format!("d{d:02}/f050"))
        .filter(|p| !f.new.join(p).exists())
        .take(3)
        .collect();
    assert_eq!(
        targets.len(),
        3,
        "the copier reached every directory already"
    );
    for p in &targets {
        let (d, i) = (&p[1..3], &p[5..8]);
        let want = format!(
            "{}/{}",
            d.parse::<u32>().unwrap(),
            i.parse::<u32>().unwrap()
        );
        assert_eq!(fs::read(f.v(p)).unwrap(), want.as_bytes());
    }
    wait_for("the files read to be copied", 10, || {
        targets.iter().all(|p| f.new.join(p).exists())
    });
    let done = f.status_json()["files"]["done"].as_u64().unwrap();
    assert!(
        done < 1500,
        "the copier copied half the tree first ({done} files)"
    );
    f.unmount();
}

/// OLD holding `a` and a directory `m` (a mountpoint later, which abort cannot move aside),
/// the view mounted without the copier, and `fresh` made through it.
fn view_over_old_with_a_dir_m() -> (Fixture, PathBuf) {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    fs::create_dir(f.old.join("m")).unwrap();
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy"]);
    write(&f.v("fresh"), b"new");
    (f, mnt)
}

/// An abort that failed after it began to rewrite OLD (here: OLD holds a mountpoint, which
/// cannot be moved aside, EBUSY) leaves the view unservable: `mount` refuses, saying to run
/// abort again, instead of serving a view whose records no longer match OLD. Once the cause
/// is gone, abort again finishes, and OLD equals the view as it was.
#[test]
fn a_mount_is_refused_while_an_abort_that_began_rewriting_old_is_unfinished() {
    let (mut f, mnt) = view_over_old_with_a_dir_m();
    write(&f.v("a"), b"a, changed");
    let snapshot = full_manifest(&f.mnt);
    f.unmount();
    let m = f.old.join("m");
    mounted_tmpfs(&m, "1m");
    let guard = Unmount(m.clone());
    let busy = f.cmd("abort", &[]);
    drop(guard);
    assert!(
        !busy.status.success(),
        "abort moved a mountpoint aside: {}",
        out_text(&busy)
    );
    let refused = f.try_mount(&mnt, &["--no-copy"]);
    assert!(!refused.status.success(), "mounted mid-abort");
    let says = out_text(&refused);
    assert!(says.contains("abort") && says.contains("again"), "{says}");
    assert_ok(f.cmd("abort", &[]));
    // (`m` itself took the tmpfs root's mode and times while mounted over: left out.)
    let mut after = full_manifest(&f.old);
    let mut snapshot = snapshot;
    for m in [&mut after, &mut snapshot] {
        m.remove(b"m".as_slice());
    }
    assert!(after == snapshot, "{}", diff(&snapshot, &after));
    assert!(f.old.join("m").is_dir());
}

/// The same stop during an abort asked of the mounted daemon: once OLD is partly rewritten,
/// the daemon detaches the view (as a finished abort does) instead of serving changes that
/// would never reach OLD; abort run again finishes.
#[test]
fn an_online_abort_stopped_after_it_began_rewriting_old_detaches_the_view() {
    let (f, mnt) = view_over_old_with_a_dir_m();
    let m = f.old.join("m");
    mounted_tmpfs(&m, "1m");
    let guard = Unmount(m.clone());
    let busy = f.cmd("abort", &[]);
    assert!(!busy.status.success(), "{}", out_text(&busy));
    let says = out_text(&busy);
    assert!(says.contains("detached"), "{says}");
    wait_for("the view to be detached", 10, || {
        ferryfs_mount_source(&mnt).is_none()
    });
    drop(guard);
    wait_for("the daemon to exit", 10, || f.daemon_pid().is_none());
    assert_ok(f.cmd("abort", &[]));
    assert_eq!(fs::read(f.old.join("fresh")).unwrap(), b"new");
    assert_eq!(fs::read(f.old.join("a")).unwrap(), b"a");
}

/// Once committed, the daemon's copier has nothing left to do and idles: no pass, so no
/// "copier pass failed: the migration is committed" line every few seconds for as long as
/// the view serves NEW.
#[test]
fn a_committed_view_keeps_serving_without_copier_passes_or_errors() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    f.start();
    assert_ok(f.cmd("execute", &["--wait"]));
    assert_ok(f.cmd("commit", &[]));
    let log_from = fs::metadata(f.state.join("ferryfs.log")).unwrap().len() as usize;
    // Asked to execute again (refused or not), the copier must still run no pass.
    let _ = f.cmd("execute", &[]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(fs::read(f.v("a")).unwrap(), b"a");
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    let after = &log[log_from..];
    assert!(
        !after.contains("copier pass failed") && !after.contains("copier pass done"),
        "the copier still runs passes after commit:\n{after}"
    );
    f.unmount();
}

/// A paused copier holds copying, not an operator's check: verify, and commit's last pass,
/// run to the end while it is paused (verify used to wait until the copier was resumed).
#[test]
fn verify_and_commit_run_while_the_copier_is_paused() {
    let mut f = Fixture::new();
    write(&f.old.join("d/a"), b"a");
    write(&f.old.join("d/e/b"), b"b");
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    wait_executed(&f, 60);
    assert_ok(f.cmd("pause", &[]));
    for cmd in ["verify", "commit"] {
        let mut c = Command::new("timeout");
        c.args(["30", BIN, cmd, "--state"]).arg(&f.state);
        let o = run(&mut c);
        assert!(
            o.status.success(),
            "{cmd} while the copier is paused: {}",
            out_text(&o)
        );
    }
    assert_eq!(f.status_json()["phase"], "committed");
    f.unmount();
}

/// An abort that fails says where: here NEW holds a file it cannot remove (immutable), and
/// the error names it. Run again once the cause is gone, abort finishes, and says it finished
/// what an earlier run began instead of counting nothing written.
#[test]
fn a_failed_abort_names_the_path_and_a_rerun_says_it_finished_the_earlier_one() {
    let mut f = Fixture::new();
    write(&f.old.join("d/a"), b"a");
    f.start();
    write(&f.v("d/stuck"), b"written through the view");
    let snapshot = full_manifest(&f.mnt);
    f.unmount();
    let stuck = f.new.join("d/stuck");
    let chattr = |flag: &str| {
        let o = run(Command::new("chattr").arg(flag).arg(&stuck));
        assert!(o.status.success(), "chattr {flag}: {}", out_text(&o));
    };
    chattr("+i");
    let o = f.cmd("abort", &[]);
    chattr("-i");
    assert!(
        !o.status.success(),
        "abort removed an immutable file: {}",
        out_text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("NEW/d/stuck"),
        "the error names no path: {err}"
    );
    let out = assert_ok(f.cmd("abort", &[]));
    assert!(out.contains("this run finished it"), "{out}");
    assert!(!out.contains("0 dirs"), "{out}");
    let after = full_manifest(&f.old);
    assert!(after == snapshot, "{}", diff(&snapshot, &after));
    assert!(names(&f.new).is_empty(), "NEW was not emptied");
    assert_eq!(f.status_json()["phase"], "aborted");
}

/// DESIGN "Stores are probed, not trusted": `verify reads NEW itself`. Files NEW took from OLD
/// and then lost behind ferryfs's back (one the view had open in the kernel's cache, one it did
/// not, and a whole directory) are errors of execute, mismatches of verify and block commit,
/// until `execute --recopy-lost` takes them again.
#[test]
fn copies_new_loses_behind_the_view_fail_execute_verify_and_commit_until_copied_again() {
    let mut f = Fixture::new();
    write(&f.old.join("d/cached"), b"read through the view");
    write(&f.old.join("d/uncached"), b"never looked at");
    write(&f.old.join("d/stays"), b"same");
    write(&f.old.join("gone/inner"), b"in a lost directory");
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    assert_ok(f.cmd("execute", &["--wait"]));
    assert_eq!(fs::read(f.v("d/cached")).unwrap(), b"read through the view");
    // NEW loses them (an operator's mistake, a store's fault).
    fs::remove_file(f.new.join("d/cached")).unwrap();
    fs::remove_file(f.new.join("d/uncached")).unwrap();
    fs::remove_dir_all(f.new.join("gone")).unwrap();
    let o = f.cmd("verify", &[]);
    let text = out_text(&o);
    assert!(
        !o.status.success(),
        "verify passed while NEW lacks copies: {text}"
    );
    for p in ["d/cached", "d/uncached", "gone", "gone/inner"] {
        assert!(
            text.lines().any(
                |l| l.starts_with(&format!("MISMATCH {p}: ")) && l.contains("missing from NEW")
            ),
            "verify does not name {p}: {text}"
        );
    }
    let o = f.cmd("execute", &["--wait"]);
    let text = out_text(&o);
    assert!(
        !o.status.success(),
        "execute --wait succeeded while NEW lacks copies: {text}"
    );
    assert!(
        text.contains("d/uncached") && text.contains("--recopy-lost"),
        "{text}"
    );
    assert_ne!(f.status_json()["phase"], "executed");
    let o = f.cmd("commit", &[]);
    assert!(!o.status.success(), "commit accepted: {}", out_text(&o));
    // Nothing was copied again behind the operator's back.
    assert!(!f.new.join("d/uncached").exists());
    assert_ok(f.cmd("execute", &["--wait", "--recopy-lost"]));
    let out = assert_ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    assert_ok(f.cmd("commit", &[]));
    f.unmount();
    assert_eq!(
        fs::read(f.new.join("d/cached")).unwrap(),
        b"read through the view"
    );
    assert_eq!(
        fs::read(f.new.join("d/uncached")).unwrap(),
        b"never looked at"
    );
    assert_eq!(
        fs::read(f.new.join("gone/inner")).unwrap(),
        b"in a lost directory"
    );
}

/// Issue 23: OLD changed behind the view after the copy, completely. Names removed from OLD
/// leave the view and NEW; renamed ones move; new ones are copied. An entry the view changed
/// (or renamed) whose OLD origin OLD removed is a conflict: listed by status, refused by
/// commit, until `ferryfs resolve` keeps it or a removal through the view follows OLD.
#[test]
fn removals_renames_and_new_names_in_old_after_the_copy_are_followed_and_conflicts_wait() {
    let mut f = Fixture::new();
    for (p, d) in [
        ("d/a", "a"),
        ("d/b", "b"),
        ("d/c", "c"),
        ("gone-dir/x", "x"),
        ("gone-dir/sub/y", "y"),
        ("keep/k", "k"),
        ("changed/v", "v"),
        ("moved-in-view/r", "r"),
    ] {
        write(&f.old.join(p), d.as_bytes());
    }
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    assert_ok(f.cmd("execute", &["--wait"]));
    // Through the view: one copy changed, one renamed.
    fs::write(f.v("changed/v"), b"the view's version").unwrap();
    fs::rename(f.v("moved-in-view/r"), f.v("moved-in-view/r2")).unwrap();
    // Behind the view, in OLD.
    std::thread::sleep(Duration::from_millis(20));
    fs::remove_file(f.old.join("d/a")).unwrap();
    fs::rename(f.old.join("d/b"), f.old.join("d/b-moved")).unwrap();
    write(&f.old.join("d/new"), b"new in OLD");
    fs::remove_dir_all(f.old.join("gone-dir")).unwrap();
    fs::remove_file(f.old.join("changed/v")).unwrap();
    fs::remove_file(f.old.join("moved-in-view/r")).unwrap();
    // verify reports what OLD removed (a check changes nothing).
    let o = f.cmd("verify", &[]);
    let text = out_text(&o);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("d/a: removed from OLD since it was copied"),
        "{text}"
    );
    // The copier follows; the two conflicts stay, listed.
    assert_ok(f.cmd("execute", &[]));
    wait_for("two conflicts listed", 60, || {
        let st = f.status_json();
        let c: Vec<String> = st["conflicts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect();
        c.contains(&"/changed/v".to_string()) && c.contains(&"/moved-in-view/r2".to_string())
    });
    let o = f.cmd("commit", &[]);
    assert!(
        !o.status.success(),
        "commit accepted with conflicts: {}",
        out_text(&o)
    );
    // Settled: one kept as the view has it, one removed through the view (OLD's way).
    let out = assert_ok(f.cmd("resolve", &["/changed/v"]));
    assert!(out.contains("resolved 1 entry"), "{out}");
    fs::remove_file(f.v("moved-in-view/r2")).unwrap();
    assert_ok(f.cmd("execute", &["--wait"]));
    assert!(f.status_json()["conflicts"].as_array().unwrap().is_empty());
    // A fresh mount (no kernel caches): the view is OLD's new tree plus the view's change.
    f.unmount();
    f.mount_with(&mnt, &[]);
    let view = manifest(&f.mnt, false);
    let names: Vec<String> = view
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "changed",
            "changed/v",
            "d",
            "d/b-moved",
            "d/c",
            "d/new",
            "keep",
            "keep/k",
            "moved-in-view"
        ],
        "the view after OLD's changes"
    );
    assert_eq!(fs::read(f.v("changed/v")).unwrap(), b"the view's version");
    assert_eq!(fs::read(f.v("d/b-moved")).unwrap(), b"b");
    assert_ok(f.cmd("verify", &["--checksum"]));
    assert_ok(f.cmd("commit", &[]));
    f.unmount();
    let new = manifest(&f.new, false);
    assert!(new == view, "NEW after commit: {}", diff(&view, &new));
}

/// OLD's hard links changed behind the view after the copy are followed (NEW a local dir).
#[test]
fn hard_links_changed_in_old_after_the_copy_are_followed() {
    let mut f = Fixture::new();
    let new = f.new.clone();
    old_hard_link_changes_followed(&mut f, &new);
}
