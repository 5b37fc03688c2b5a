//! Metadata changes that copy no data (issue 25): a chmod, chown, utimens, setxattr or
//! removexattr of a file whose data is still only in OLD is recorded in the journal, shown at
//! once, kept across kill -9, carried by the copy NEW takes later, kept through commit, and
//! written into OLD's own file by abort (no data rewritten).

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

const MIB: usize = 1 << 20;

/// A file of `mib` MiB of real data (no holes; each MiB starts with its own index).
fn big_file(p: &Path, mib: usize) {
    let mut f = fs::File::create(p).unwrap();
    let mut block: Vec<u8> = (0..MIB).map(|j| (j * 7 + 1) as u8).collect();
    for i in 0..mib {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

/// Bytes of data every file below `root` holds on disk (st_blocks), the directories' own left
/// out: what a copy of a file's data would show.
fn file_bytes_on_disk(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// SHA-256 of a file (by sha256sum: the test binary's own would take a minute per GiB).
fn sha(p: &Path) -> String {
    let out = ok(run(std::process::Command::new("sha256sum").arg(p)));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn set_xattr(
    p: &Path,
    name: &str,
    value: &[u8],
    flags: rustix::fs::XattrFlags,
) -> rustix::io::Result<()> {
    rustix::fs::setxattr(p, name, value, flags)
}

/// The changes every test here makes through the view: on `big` (OLD-only) a set-uid chmod,
/// then a chown (which drops the set-uid bit, as Linux does), then fixed times; on `small`,
/// an attribute set, one replaced, one removed, and a chmod.
fn change_metadata(v: &Path) {
    let big = v.join("big.bin");
    fs::set_permissions(&big, fs::Permissions::from_mode(0o4750)).unwrap();
    std::os::unix::fs::chown(&big, Some(1234), Some(5678)).unwrap();
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &big,
        &fixed_times(),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    let small = v.join("dir/small.txt");
    set_xattr(&small, "user.c", b"three", rustix::fs::XattrFlags::CREATE).unwrap();
    set_xattr(
        &small,
        "user.b",
        b"two again",
        rustix::fs::XattrFlags::REPLACE,
    )
    .unwrap();
    rustix::fs::removexattr(&small, "user.a").unwrap();
    fs::set_permissions(&small, fs::Permissions::from_mode(0o600)).unwrap();
}

/// What the view must show after [`change_metadata`].
fn assert_changed(v: &Path, what: &str) {
    let m = fs::metadata(v.join("big.bin")).unwrap();
    assert_eq!(
        m.mode() & 0o7777,
        0o750,
        "{what}: big.bin's mode (chown drops set-uid)"
    );
    assert_eq!((m.uid(), m.gid()), (1234, 5678), "{what}: big.bin's owner");
    assert_eq!(
        (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()),
        (1_000_000_000, 123_456_789, 1_100_000_000, 987_654_321),
        "{what}: big.bin's times"
    );
    let small = v.join("dir/small.txt");
    assert_eq!(
        fs::metadata(&small).unwrap().mode() & 0o7777,
        0o600,
        "{what}: small.txt's mode"
    );
    let x = xattrs(&small);
    let want: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"user.b".to_vec(), b"two again".to_vec()),
        (b"user.c".to_vec(), b"three".to_vec()),
    ]
    .into();
    assert_eq!(x, want, "{what}: small.txt's xattrs");
}

fn old_dataset(old: &Path, mib: usize) {
    big_file(&old.join("big.bin"), mib);
    fs::set_permissions(old.join("big.bin"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(old.join("dir")).unwrap();
    write(&old.join("dir/small.txt"), b"small");
    set_xattr(
        &old.join("dir/small.txt"),
        "user.a",
        b"one",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    set_xattr(
        &old.join("dir/small.txt"),
        "user.b",
        b"two",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

#[test]
fn metadata_changes_of_old_only_files_copy_no_data_and_are_kept_through_crash_copy_and_commit() {
    let mut f = Fixture::new();
    old_dataset(&f.old, 1024);
    let old_sum = sha(&f.old.join("big.bin"));
    f.start();
    let before = file_bytes_on_disk(&f.new);
    change_metadata(&f.mnt);
    assert_changed(&f.mnt, "right after the changes");
    // The flags see the view's attributes, not OLD's.
    let small = f.v("dir/small.txt");
    assert_eq!(
        set_xattr(&small, "user.c", b"x", rustix::fs::XattrFlags::CREATE),
        Err(rustix::io::Errno::EXIST)
    );
    assert_eq!(
        set_xattr(&small, "user.a", b"x", rustix::fs::XattrFlags::REPLACE),
        Err(rustix::io::Errno::NODATA)
    );
    assert_eq!(
        rustix::fs::getxattr(&small, "user.a", &mut [0u8; 16]),
        Err(rustix::io::Errno::NODATA)
    );
    // No data copied: NEW holds neither file, and no more file data than before.
    let after = file_bytes_on_disk(&f.new);
    println!("NEW's file bytes on disk: {before} before the changes, {after} after");
    assert!(
        after <= before + 64 * 1024,
        "data was copied into NEW: {before} -> {after} bytes"
    );
    assert!(
        !f.new.join("big.bin").exists(),
        "big.bin was copied into NEW"
    );
    assert!(
        !f.new.join("dir/small.txt").exists(),
        "small.txt was copied into NEW"
    );
    // OLD itself is untouched; reads still fall through to it.
    let om = fs::metadata(f.old.join("big.bin")).unwrap();
    assert_eq!(
        (om.mode() & 0o7777, om.uid()),
        (0o644, 0),
        "OLD was changed"
    );
    assert_eq!(sha(&f.v("big.bin")), old_sum, "the view's data");
    let st = f.status_json();
    assert_eq!(st["metadata_only"], 2, "status: {st}");
    // Acknowledged changes survive kill -9.
    f.kill9();
    f.mount();
    assert_changed(&f.mnt, "after kill -9 and mount again");
    let view = manifest(&f.mnt, true);
    // The copier takes both files with their changes; they are the view's own from then on.
    ok(f.cmd("execute", &["--wait"]));
    assert_changed(&f.new, "NEW after execute");
    assert_eq!(
        sha(&f.new.join("big.bin")),
        old_sum,
        "NEW's copy of the data"
    );
    assert_eq!(f.status_json()["metadata_only"], 0);
    ok(f.cmd("verify", &[]));
    f.unmount();
    ok(f.cmd("commit", &[]));
    let d = diff(&view, &manifest(&f.new, true));
    assert!(d.is_empty(), "the view before commit vs NEW after:\n{d}");
}

#[test]
fn a_write_after_a_metadata_change_keeps_the_change() {
    let mut f = Fixture::new();
    old_dataset(&f.old, 4);
    f.start();
    change_metadata(&f.mnt);
    // The first write copies the file up; the copy carries the change.
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(f.v("dir/small.txt"))
        .unwrap();
    w.write_all(b" and more").unwrap();
    drop(w);
    let mut w = fs::OpenOptions::new()
        .write(true)
        .open(f.v("big.bin"))
        .unwrap();
    w.write_all(b"X").unwrap();
    w.sync_all().unwrap();
    drop(w);
    // (the write set big.bin's mtime)
    let m = fs::metadata(f.v("big.bin")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, 1234, 5678));
    assert_eq!(fs::read(f.v("dir/small.txt")).unwrap(), b"small and more");
    let x = xattrs(&f.v("dir/small.txt"));
    assert_eq!(
        x.keys().cloned().collect::<Vec<_>>(),
        vec![b"user.b".to_vec(), b"user.c".to_vec()]
    );
    let n = fs::metadata(f.new.join("big.bin")).unwrap();
    assert_eq!(
        (n.mode() & 0o7777, n.uid(), n.gid()),
        (0o750, 1234, 5678),
        "NEW's copy"
    );
    assert_eq!(f.status_json()["metadata_only"], 0);
    f.unmount();
    f.mount();
    let m = fs::metadata(f.v("big.bin")).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid()),
        (0o750, 1234, 5678),
        "after mount again"
    );
}

#[test]
fn abort_writes_metadata_changes_into_old_files_without_rewriting_their_data() {
    let mut f = Fixture::new();
    old_dataset(&f.old, 1024);
    let old_sum = sha(&f.old.join("big.bin"));
    let old_ino = fs::metadata(f.old.join("big.bin")).unwrap().ino();
    f.start();
    change_metadata(&f.mnt);
    let view = manifest(&f.mnt, true);
    f.unmount();
    let out = ok(f.cmd("abort", &[]));
    println!("{out}");
    assert!(
        out.contains("2 of them with metadata changed through the view"),
        "{out}"
    );
    assert_changed(&f.old, "OLD after abort");
    let m = fs::metadata(f.old.join("big.bin")).unwrap();
    assert_eq!(
        m.ino(),
        old_ino,
        "abort rewrote big.bin instead of keeping OLD's file"
    );
    assert_eq!(sha(&f.old.join("big.bin")), old_sum);
    let d = diff(&view, &manifest(&f.old, true));
    assert!(d.is_empty(), "the view before abort vs OLD after:\n{d}");
}

#[test]
fn a_chmod_while_the_copier_copies_the_file_is_kept_in_the_copy() {
    let mut f = Fixture::new();
    old_dataset(&f.old, 48);
    f.prepare();
    let mnt = f.mnt.clone();
    // Slow enough that the chmod lands in the middle of big.bin's copy.
    f.mount_with(&mnt, &["--bwlimit", "16M"]);
    wait_for("the copier to start on big.bin", 20, || {
        f.status_json()["bytes"]["done"].as_u64().unwrap_or(0) > 0
            || fs::read_dir(f.new.join(".ferryfs-work")).is_ok_and(|mut d| d.next().is_some())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let in_new = f.new.join("big.bin").exists();
    fs::set_permissions(f.v("big.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(f.v("big.bin")).unwrap().mode() & 0o7777, 0o640);
    ok(f.cmd("execute", &["--wait"]));
    let n = fs::metadata(f.new.join("big.bin")).unwrap();
    assert_eq!(
        n.mode() & 0o7777,
        0o640,
        "NEW's copy lost the chmod (big.bin was {}in NEW at the chmod)",
        if in_new { "" } else { "not " }
    );
    ok(f.cmd("verify", &[]));
}
