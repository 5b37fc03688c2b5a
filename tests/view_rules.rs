//! One test (or more) per rule of DESIGN.md "The view's rules", against a real mount.
//! docs/SEMANTICS.md names these tests next to the rules they prove.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use common::*;

/// A small realistic OLD tree.
fn populate_old(old: &Path) {
    write(&old.join("a.txt"), b"alpha from OLD\n");
    write(&old.join("dir/b.txt"), b"beta from OLD\n");
    write(&old.join("dir/sub/c.txt"), b"gamma\n");
    write(&old.join("both.txt"), b"OLD version\n");
    fs::create_dir(old.join("emptydir")).unwrap();
    symlink("a.txt", old.join("link-to-a")).unwrap();
}

#[test]
fn rule01_a_name_is_in_the_view_if_new_or_old_has_it_and_new_wins() {
    let mut f = Fixture::new();
    populate_old(&f.old);
    f.prepare();
    // NEW has its own entries (written before mounting, as a pre-seeded NEW would).
    write(&f.new.join("only-new.txt"), b"NEW only\n");
    write(&f.new.join("both.txt"), b"NEW version\n");
    fs::create_dir(f.new.join("dir")).unwrap();
    write(&f.new.join("dir/new-in-dir.txt"), b"x");
    f.mount();
    assert_eq!(
        names(&f.mnt),
        [
            "a.txt",
            "both.txt",
            "dir",
            "emptydir",
            "link-to-a",
            "only-new.txt"
        ]
    );
    assert_eq!(fs::read(f.v("both.txt")).unwrap(), b"NEW version\n");
    assert_eq!(names(&f.v("dir")), ["b.txt", "new-in-dir.txt", "sub"]);
    assert!(!f.v("nonexistent").exists());
    f.unmount();
}

#[test]
fn rule02_reads_of_old_only_files_return_old_bytes_exactly() {
    let mut f = Fixture::new();
    // Bytes of every value, a size that is not a page multiple, and a larger file.
    let small: Vec<u8> = (0..=255u8).cycle().take(10_007).collect();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write(&f.old.join("small.bin"), &small);
    write(&f.old.join("d/big.bin"), &big);
    f.start();
    assert_eq!(fs::read(f.v("small.bin")).unwrap(), small);
    assert_eq!(fs::read(f.v("d/big.bin")).unwrap(), big);
    // Reads at offsets.
    let mut h = fs::File::open(f.v("d/big.bin")).unwrap();
    h.seek(SeekFrom::Start(1_234_567)).unwrap();
    let mut buf = vec![0u8; 4096];
    h.read_exact(&mut buf).unwrap();
    assert_eq!(buf, big[1_234_567..1_234_567 + 4096]);
    drop(h);
    // Nothing was copied into NEW by reading.
    assert_eq!(names(&f.new), Vec::<String>::new());
    f.unmount();
}

#[test]
fn rule03_first_change_copies_up_and_the_change_lands_in_new() {
    let mut f = Fixture::new();
    for name in ["w", "t", "m", "x", "l", "a"] {
        write(&f.old.join("d").join(name), b"0123456789");
    }
    let before = manifest(&f.old, true);
    f.start();
    // write open
    let mut h = OpenOptions::new().write(true).open(f.v("d/w")).unwrap();
    h.write_all(b"AB").unwrap();
    drop(h);
    assert_eq!(fs::read(f.v("d/w")).unwrap(), b"AB23456789");
    assert_eq!(fs::read(f.new.join("d/w")).unwrap(), b"AB23456789");
    // truncate
    OpenOptions::new()
        .write(true)
        .open(f.v("d/t"))
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(fs::read(f.new.join("d/t")).unwrap(), b"0123");
    // chmod (metadata only): recorded, shown at once, no data copied (tests/metacopy.rs
    // follows such a change through the copy, commit and abort)
    fs::set_permissions(f.v("d/m"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(f.v("d/m")).unwrap().mode() & 0o7777, 0o600);
    assert!(
        !f.new.join("d/m").exists(),
        "a chmod copied the file into NEW"
    );
    assert_eq!(fs::read(f.v("d/m")).unwrap(), b"0123456789");
    // xattr: the same
    rustix::fs::setxattr(f.v("d/x"), "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap();
    assert_eq!(xattrs(&f.v("d/x")).get(b"user.k".as_slice()).unwrap(), b"v");
    assert!(
        !f.new.join("d/x").exists(),
        "a setxattr copied the file into NEW"
    );
    // ... until the data changes: the copy-up carries the change.
    OpenOptions::new()
        .append(true)
        .open(f.v("d/m"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    assert_eq!(fs::read(f.new.join("d/m")).unwrap(), b"0123456789!");
    assert_eq!(
        fs::metadata(f.new.join("d/m")).unwrap().mode() & 0o7777,
        0o600
    );
    // link
    fs::hard_link(f.v("d/l"), f.v("d/l2")).unwrap();
    assert_eq!(fs::metadata(f.new.join("d/l")).unwrap().nlink(), 2);
    // O_TRUNC open: the result is empty, whatever OLD held.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.v("d/a"))
        .unwrap();
    assert_eq!(fs::read(f.v("d/a")).unwrap(), b"");
    assert_eq!(fs::metadata(f.new.join("d/a")).unwrap().len(), 0);
    f.unmount();
    assert_eq!(
        manifest(&f.old, true),
        before,
        "OLD was modified through the view"
    );
}

#[test]
fn rule04_deleting_an_old_only_name_records_a_tombstone_and_leaves_old_untouched() {
    let mut f = Fixture::new();
    populate_old(&f.old);
    let before = manifest(&f.old, true);
    f.start();
    fs::remove_file(f.v("a.txt")).unwrap();
    fs::remove_file(f.v("dir/sub/c.txt")).unwrap();
    fs::remove_dir(f.v("dir/sub")).unwrap();
    fs::remove_dir(f.v("emptydir")).unwrap();
    assert!(!f.v("a.txt").exists());
    assert!(!names(&f.mnt).contains(&"a.txt".to_string()));
    assert_eq!(names(&f.v("dir")), ["b.txt"]);
    // NEW holds no whiteout files or markers: at most the copied-up parent directory.
    let new_entries: Vec<_> = manifest(&f.new, false).into_keys().collect();
    assert!(
        new_entries.iter().all(|k| k == b"dir"),
        "litter in NEW: {new_entries:?}"
    );
    // The tombstones survive a remount.
    f.unmount();
    // a.txt, dir/sub and emptydir: removing dir/sub dropped the tombstone recorded below it.
    assert_eq!(f.status_json()["tombstones"], 3);
    f.mount();
    assert!(!f.v("a.txt").exists());
    assert!(!f.v("dir/sub").exists());
    // A name deleted and created again shows the new entry, not OLD's.
    write(&f.v("a.txt"), b"new a");
    assert_eq!(fs::read(f.v("a.txt")).unwrap(), b"new a");
    fs::create_dir(f.v("dir/sub")).unwrap();
    assert_eq!(
        names(&f.v("dir/sub")),
        Vec::<String>::new(),
        "a recreated dir must be opaque"
    );
    f.unmount();
    assert_eq!(manifest(&f.old, true), before);
}

#[test]
fn rule05_rename_of_a_directory_holding_old_only_content_copies_no_data() {
    let mut f = Fixture::new();
    for i in 0..200 {
        write(
            &f.old.join(format!("src/deep/f{i}")),
            format!("file {i}").as_bytes(),
        );
    }
    write(&f.old.join("src/top.txt"), b"top");
    write(&f.old.join("file.txt"), b"plain file");
    f.start();
    fs::rename(f.v("src"), f.v("dst")).unwrap();
    assert!(!f.v("src").exists());
    assert_eq!(fs::read(f.v("dst/deep/f17")).unwrap(), b"file 17");
    assert_eq!(names(&f.v("dst/deep")).len(), 200);
    // Only the renamed directory itself (no file) is in NEW.
    let copied_files = manifest(&f.new, false)
        .values()
        .filter(|e| e.kind == "file")
        .count();
    assert_eq!(copied_files, 0, "rename copied data into NEW");
    // An OLD-only file renamed: a redirect, no data copy.
    fs::rename(f.v("file.txt"), f.v("dst/moved.txt")).unwrap();
    assert_eq!(fs::read(f.v("dst/moved.txt")).unwrap(), b"plain file");
    assert!(!f.new.join("dst/moved.txt").exists());
    // Changes below a renamed dir, then rename it again, then remount: all still right.
    fs::remove_file(f.v("dst/deep/f3")).unwrap();
    write(&f.v("dst/deep/new.txt"), b"born in view");
    fs::rename(f.v("dst"), f.v("again")).unwrap();
    f.unmount();
    f.mount();
    assert!(!f.v("again/deep/f3").exists());
    assert_eq!(
        fs::read(f.v("again/deep/new.txt")).unwrap(),
        b"born in view"
    );
    assert_eq!(fs::read(f.v("again/deep/f199")).unwrap(), b"file 199");
    assert_eq!(fs::read(f.v("again/moved.txt")).unwrap(), b"plain file");
    assert_eq!(names(&f.v("again/deep")).len(), 200);
    assert!(!f.v("src").exists() && !f.v("dst").exists());
    f.unmount();
}

#[test]
fn rule05_rename_over_a_nonempty_directory_looks_at_both_stores() {
    let mut f = Fixture::new();
    write(&f.old.join("target/old-only.txt"), b"x");
    fs::create_dir(f.old.join("src")).unwrap();
    f.start();
    let err = fs::rename(f.v("src"), f.v("target")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    // Empty it through the view; then the rename succeeds.
    fs::remove_file(f.v("target/old-only.txt")).unwrap();
    fs::rename(f.v("src"), f.v("target")).unwrap();
    assert!(f.v("target").is_dir() && !f.v("src").exists());
    f.unmount();
}

#[test]
fn rule06_st_ino_is_stable_across_copy_up_and_hard_links_share_an_inode() {
    let mut f = Fixture::new();
    write(&f.old.join("file"), b"data");
    write(&f.old.join("d/inner"), b"x");
    f.start();
    let ino_before = fs::metadata(f.v("file")).unwrap().ino();
    let dir_ino = fs::metadata(f.v("d")).unwrap().ino();
    // Keep the file open so the kernel keeps its inode, then copy it up.
    let _keep = fs::File::open(f.v("file")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(f.v("file"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert!(f.new.join("file").exists());
    assert_eq!(fs::metadata(f.v("file")).unwrap().ino(), ino_before);
    write(&f.v("d/new"), b"y"); // copies the directory up
    assert_eq!(fs::metadata(f.v("d")).unwrap().ino(), dir_ino);
    // Hard links: one inode, right link count, on every name.
    fs::hard_link(f.v("file"), f.v("d/file-link")).unwrap();
    let a = fs::metadata(f.v("file")).unwrap();
    let b = fs::metadata(f.v("d/file-link")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    fs::remove_file(f.v("file")).unwrap();
    assert_eq!(fs::metadata(f.v("d/file-link")).unwrap().nlink(), 1);
    assert_eq!(fs::read(f.v("d/file-link")).unwrap(), b"data+");
    drop(_keep);
    f.unmount();
}

#[test]
fn rule07_readdir_lists_each_name_once_hides_tombstones_and_survives_changes() {
    let mut f = Fixture::new();
    for i in 0..300 {
        write(&f.old.join(format!("d/old{i:03}")), b"o");
    }
    f.prepare();
    fs::create_dir(f.new.join("d")).unwrap();
    for i in 0..100 {
        // Half overlap with OLD's names.
        write(&f.new.join(format!("d/old{:03}", i * 2)), b"n");
        write(&f.new.join(format!("d/new{i:03}")), b"n");
    }
    f.mount();
    fs::remove_file(f.v("d/old001")).unwrap();
    fs::remove_file(f.v("d/old002")).unwrap(); // in both stores
    let listed = names(&f.v("d"));
    let mut dedup = listed.clone();
    dedup.dedup();
    assert_eq!(listed, dedup, "a name listed twice");
    assert_eq!(listed.len(), 300 + 100 - 2);
    assert!(!listed.contains(&"old001".into()) && !listed.contains(&"old002".into()));
    // Concurrent changes while reading: offsets stay valid, nothing listed twice, every name
    // that existed throughout is listed.
    let mut rd = fs::read_dir(f.v("d")).unwrap();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.push(rd.next().unwrap().unwrap().file_name());
    }
    for i in 0..50 {
        write(&f.v(&format!("d/late{i}")), b"l");
        let _ = fs::remove_file(f.v(&format!("d/old{:03}", 250 + i)));
    }
    for e in rd {
        seen.push(e.unwrap().file_name());
    }
    let mut s = seen.clone();
    s.sort();
    s.dedup();
    assert_eq!(
        s.len(),
        seen.len(),
        "a name listed twice during concurrent changes"
    );
    for i in 3..250 {
        assert!(
            seen.contains(&format!("old{i:03}").into()),
            "old{i:03} missing"
        );
    }
    f.unmount();
}

/// One getdents64 call on `dir` with a buffer of `len` bytes: the names it returned.
fn getdents(dir: &fs::File, len: usize) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; len];
    // SAFETY: the buffer is `len` bytes long and lives across the call.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), len) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    let mut at = 0;
    while at < n as usize {
        // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        let name = &buf[at + 19..at + reclen];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push(String::from_utf8_lossy(&name[..end]).into_owned());
        at += reclen;
    }
    out
}

/// Rule 7 with the kernel's listing cache, which every handle of a directory shares: a handle
/// that read its first entries from the cache another handle's listing filled goes on, once a
/// change and a listing from the start dropped that cache, by asking the daemon for what comes
/// after its offset, an offset from the other handle's listing. Every name there throughout
/// is listed once (with offsets as positions in a listing, the removal of a name ahead of that
/// offset made the handle skip one).
#[test]
fn rule07_a_listing_begun_from_the_kernels_cache_goes_on_right_after_a_change() {
    let mut f = Fixture::new();
    for i in 0..400 {
        write(&f.old.join(format!("d/f{i:03}")), b"o");
    }
    f.prepare();
    f.mount();
    let d = f.v("d");
    // A whole listing, which the kernel keeps.
    let all = names(&d);
    assert_eq!(all.len(), 400);
    // A handle opened while the listing is kept reads a few entries (from the kernel's cache).
    let b = fs::File::open(&d).unwrap();
    let mut seen = getdents(&b, 400);
    seen.retain(|n| n != "." && n != "..");
    assert!(!seen.is_empty() && seen.len() < 50, "first read: {seen:?}");
    // A name it has read goes away; a listing from the start drops the kernel's cache.
    let gone = seen[0].clone();
    fs::remove_file(d.join(&gone)).unwrap();
    assert_eq!(names(&d).len(), 399);
    loop {
        let more = getdents(&b, 400);
        if more.is_empty() {
            break;
        }
        seen.extend(more.into_iter().filter(|n| n != "." && n != ".."));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "a name listed twice");
    let missing: Vec<&String> = all.iter().filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "never listed: {missing:?}");
    drop(b);
    f.unmount();
}

#[test]
fn rule08_permissions_are_checked_and_new_entries_belong_to_the_caller() {
    let mut f = Fixture::new();
    write(&f.old.join("private"), b"secret");
    fs::set_permissions(f.old.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(f.old.join("shared")).unwrap();
    fs::set_permissions(f.old.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(f.old.join("locked")).unwrap();
    fs::set_permissions(f.old.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    f.start();
    fs::set_permissions(&f.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let v = f.mnt.display().to_string();
    let out = sh_as(65534, 65534, &format!("cat {v}/private"));
    assert!(!out.status.success(), "nobody read a 0600 root file");
    let out = sh_as(65534, 65534, &format!("touch {v}/locked/x"));
    assert!(!out.status.success(), "nobody created in a 0755 root dir");
    let out = sh_as(
        65534,
        65534,
        &format!("echo hi > {v}/shared/mine && mkdir {v}/shared/d"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in ["shared/mine", "shared/d"] {
        let md = fs::metadata(f.v(p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (65534, 65534),
            "{p} not owned by its creator"
        );
        let md = fs::metadata(f.new.join(p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (65534, 65534),
            "{p} in NEW not owned by its creator"
        );
    }
    f.unmount();
}

/// `system.posix_acl_access` holding `entries` (tag, permission bits, id), as setfacl writes
/// it: version 2, then 8 bytes per entry.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

/// Rule 8 with POSIX ACLs: the kernel checks an entry's ACL, as on a local file system. The
/// ACL `u::rw, u:65534:rw, g::r, m::rw, o::-` of a 0640 file shows as mode 0660 (the group
/// bits are the mask): the named user reads it, and a member of the owning group reads it but
/// may not write it (the mode bits alone would let it). For a file only in OLD, and for one
/// made through the view and given its ACL there.
#[test]
fn rule08_acls_are_enforced_as_on_a_local_file_system() {
    const ANY: u32 = u32::MAX;
    let acl = acl_xattr(&[
        (0x01, 6, ANY),   // owner: rw
        (0x02, 6, 65534), // user 65534: rw
        (0x04, 4, ANY),   // owning group: r
        (0x10, 6, ANY),   // mask: rw
        (0x20, 0, ANY),   // others: none
    ]);
    let set_acl = |p: &Path| {
        rustix::fs::setxattr(
            p,
            "system.posix_acl_access",
            &acl,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("setting an ACL on {}: {e}", p.display()))
    };
    let mut f = Fixture::new();
    write(&f.old.join("old-only"), b"data");
    fs::set_permissions(f.old.join("old-only"), fs::Permissions::from_mode(0o640)).unwrap();
    set_acl(&f.old.join("old-only"));
    f.start();
    fs::set_permissions(&f.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    write(&f.v("made"), b"data");
    fs::set_permissions(f.v("made"), fs::Permissions::from_mode(0o640)).unwrap();
    set_acl(&f.v("made"));
    for name in ["old-only", "made"] {
        let p = f.v(name).display().to_string();
        assert_eq!(
            fs::metadata(&p).unwrap().mode() & 0o7777,
            0o660,
            "{name}: the group bits are the mask"
        );
        let out = sh_as(65534, 65534, &format!("cat {p}"));
        assert!(
            out.status.success() && out.stdout == b"data",
            "{name}: the user the ACL names could not read it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = sh_as(1234, 0, &format!("cat {p}"));
        assert!(
            out.status.success(),
            "{name}: the owning group could not read it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = sh_as(1234, 0, &format!("echo more >> {p}"));
        assert!(
            !out.status.success(),
            "{name}: the owning group wrote to it, which its ACL entry (r) refuses"
        );
        assert_eq!(fs::read(f.v(name)).unwrap(), b"data", "{name}");
        let out = sh_as(4321, 4321, &format!("cat {p}"));
        assert!(!out.status.success(), "{name}: others read it");
    }
    // The refused writer changed nothing: the file only in OLD is still only there.
    assert!(
        !f.new.join("old-only").exists(),
        "a refused write copied it"
    );
    f.unmount();
}

/// An entry of a store that holds no xattrs (ramfs: every getxattr is EOPNOTSUPP) has no
/// ACL: the kernel checks its mode bits, and nobody is refused for the store's lack of ACLs.
#[test]
fn rule08_an_entry_of_a_store_without_xattrs_has_no_acl() {
    struct Ramfs(std::path::PathBuf);
    impl Drop for Ramfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let mut f = Fixture::new();
    let out = run(Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&f.old));
    assert!(out.status.success(), "mount -t ramfs: {out:?}");
    let _old = Ramfs(f.old.clone());
    write(&f.old.join("open"), b"data");
    fs::set_permissions(f.old.join("open"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut buf = [0u8; 64];
    let e = rustix::fs::getxattr(f.old.join("open"), "system.posix_acl_access", &mut buf)
        .expect_err("ramfs answered an ACL");
    assert_eq!(e.raw_os_error(), libc::EOPNOTSUPP, "{e}");
    f.start();
    fs::set_permissions(&f.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let p = f.v("open").display().to_string();
    let out = sh_as(65534, 65534, &format!("cat {p}"));
    assert!(
        out.status.success() && out.stdout == b"data",
        "reading a 0644 file of a store without xattrs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sh_as(65534, 65534, &format!("echo x >> {p}"));
    assert!(!out.status.success(), "nobody wrote to a 0644 root file");
    f.unmount();
}

#[test]
fn rule09_symlinks_inside_stores_are_never_followed() {
    let mut f = Fixture::new();
    let outside = f.root.path().join("outside");
    fs::create_dir(&outside).unwrap();
    write(&outside.join("secret"), b"outside data");
    write(&f.old.join("victim/file"), b"inside");
    symlink(&outside, f.old.join("escape")).unwrap();
    f.start();
    // A symlink in OLD is shown as a symlink, never resolved by the view.
    assert!(
        fs::symlink_metadata(f.v("escape"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(!names(&f.mnt).is_empty());
    // The view records a redirect to OLD's "victim" (a rename), so it will resolve that OLD
    // path by itself from now on.
    fs::rename(f.v("victim"), f.v("renamed")).unwrap();
    f.unmount();
    // Behind the view's back, OLD's directory becomes a symlink to a directory outside OLD.
    fs::remove_dir_all(f.old.join("victim")).unwrap();
    symlink(&outside, f.old.join("victim")).unwrap();
    f.mount();
    // The redirect's OLD directory is gone (it is a symlink now): the view shows nothing at
    // the renamed name, and nothing outside OLD can be read through it ...
    assert!(
        fs::symlink_metadata(f.v("renamed")).is_err(),
        "a redirect followed a symlink"
    );
    assert!(
        fs::read(f.v("renamed/secret")).is_err(),
        "read outside OLD through the view"
    );
    // ... or written.
    let _ = fs::write(f.v("renamed/planted"), b"x");
    assert_eq!(
        names(&outside),
        ["secret"],
        "wrote outside OLD through the view"
    );
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"outside data");
    // A directory the kernel already holds, swapped behind the view's back: the view keeps
    // working on the directory it resolved, never on the link that replaced it.
    write(&f.old.join("held/inside"), b"in");
    let held = fs::File::open(f.v("held")).unwrap();
    assert_eq!(names(&f.v("held")), ["inside"]);
    fs::rename(f.old.join("held"), f.root.path().join("held-moved-away")).unwrap();
    symlink(&outside, f.old.join("held")).unwrap();
    assert!(
        !names(&f.v("held")).contains(&"secret".to_string()),
        "listed outside OLD"
    );
    drop(held);
    f.unmount();
}

/// Rule 10 for file capabilities (`setcap`): the kernel drops `security.capability` whenever
/// a file's owner is set, so a copy that set the owner after the xattrs lost them. Checked on
/// a copy-up (a chmod through the view) and on the copier's copy, of files not owned by root.
#[test]
fn rule10_file_capabilities_survive_copy_up_and_the_copier() {
    let mut f = Fixture::new();
    // vfs_cap_data revision 2: CAP_NET_RAW permitted.
    let caps: [u8; 20] = [
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    for name in ["cap-up", "cap-copied"] {
        let p = f.old.join(name);
        write(&p, b"#!/bin/sh\n");
        rustix::fs::chown(
            &p,
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(4321)),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        rustix::fs::setxattr(
            &p,
            "security.capability",
            &caps,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let got = |p: &Path| {
        let mut buf = [0u8; 64];
        rustix::fs::getxattr(p, "security.capability", &mut buf)
            .map(|n| buf[..n].to_vec())
            .unwrap_or_else(|e| panic!("{}: no capabilities: {e}", p.display()))
    };
    let want = got(&f.old.join("cap-up"));
    f.prepare();
    f.mount_with(&f.mnt.clone(), &["--no-copy"]);
    // A write open copies the file up (a chmod alone would copy nothing).
    OpenOptions::new().append(true).open(f.v("cap-up")).unwrap();
    assert_eq!(got(&f.new.join("cap-up")), want, "lost by copy-up");
    assert_eq!(fs::metadata(f.new.join("cap-up")).unwrap().uid(), 1234);
    f.unmount();
    ok(f.cmd("execute", &[]));
    assert_eq!(got(&f.new.join("cap-copied")), want, "lost by the copier");
    assert_eq!(fs::metadata(f.new.join("cap-copied")).unwrap().uid(), 1234);
    ok(f.cmd("verify", &[]));
}

#[test]
fn rule10_copy_up_preserves_links_holes_xattrs_mode_owner_and_ns_times() {
    let mut f = Fixture::new();
    // A sparse file: 1 MiB hole, 4 KiB data, 1 MiB hole, data.
    {
        let mut h = fs::File::create(f.old.join("sparse")).unwrap();
        h.seek(SeekFrom::Start(1 << 20)).unwrap();
        h.write_all(&[7u8; 4096]).unwrap();
        h.seek(SeekFrom::Start(2 << 20)).unwrap();
        h.write_all(b"tail").unwrap();
    }
    write(&f.old.join("meta"), b"m");
    rustix::fs::setxattr(
        f.old.join("meta"),
        "user.one",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::chown(
        f.old.join("meta"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(4321)),
    )
    .unwrap();
    fs::set_permissions(f.old.join("meta"), fs::Permissions::from_mode(0o4750)).unwrap();
    let t = fixed_times();
    rustix::fs::utimensat(
        rustix::fs::CWD,
        f.old.join("meta"),
        &t,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    symlink("some/target", f.old.join("sym")).unwrap();
    write(&f.old.join("d/x"), b"x");
    let old_meta = entry_info(&f.old.join("meta"), true);
    f.start();
    // Copy up by opening for write without writing: data, metadata and holes must survive
    // (the sparse file, bigger than a chunk, is copied by chunk: the copier fills it in).
    OpenOptions::new().write(true).open(f.v("sparse")).unwrap();
    OpenOptions::new().write(true).open(f.v("meta")).unwrap();
    assert_eq!(f.status_json()["partial"]["files"], 1);
    ok(f.cmd("execute", &["--wait"]));
    let new_sparse = fs::metadata(f.new.join("sparse")).unwrap();
    assert_eq!(
        fs::read(f.new.join("sparse")).unwrap(),
        fs::read(f.old.join("sparse")).unwrap()
    );
    assert!(
        new_sparse.blocks() * 512 < 64 * 1024,
        "holes were filled: {} blocks",
        new_sparse.blocks()
    );
    let copied = entry_info(&f.new.join("meta"), true);
    assert_eq!(copied, old_meta);
    // Symlink copy-up (by chown of the link itself).
    rustix::fs::chownat(
        rustix::fs::CWD,
        f.v("sym"),
        Some(rustix::fs::Uid::from_raw(7)),
        None,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    assert_eq!(
        fs::read_link(f.new.join("sym")).unwrap(),
        Path::new("some/target")
    );
    assert_eq!(fs::symlink_metadata(f.new.join("sym")).unwrap().uid(), 7);
    f.unmount();
}

#[test]
fn rule11_the_view_can_be_mounted_in_place_over_the_old_path() {
    let mut f = Fixture::new();
    write(&f.old.join("data.txt"), b"served from OLD under the mount");
    let old_path = f.old.clone();
    f.prepare();
    f.mount_at(&old_path);
    // The view now covers OLD's path and still serves OLD's data.
    assert_eq!(
        fs::read(old_path.join("data.txt")).unwrap(),
        b"served from OLD under the mount"
    );
    write(&old_path.join("written.txt"), b"lands in NEW");
    assert_eq!(
        fs::read(f.new.join("written.txt")).unwrap(),
        b"lands in NEW"
    );
    f.unmount_at(&old_path);
    assert!(
        !old_path.join("written.txt").exists(),
        "the write went to OLD"
    );
    assert_eq!(
        fs::read(old_path.join("data.txt")).unwrap(),
        b"served from OLD under the mount"
    );
}

#[test]
fn names_longer_than_255_bytes_get_enametoolong() {
    let mut f = Fixture::new();
    f.start();
    let long = "x".repeat(256);
    let err = fs::write(f.v(&long), b"").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    let err = fs::metadata(f.v(&long)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    write(&f.v(&"y".repeat(255)), b"ok");
    f.unmount();
}

#[test]
fn old_is_never_modified_through_the_view() {
    let mut f = Fixture::new();
    populate_old(&f.old);
    write(&f.old.join("dir/sub/deeper/e"), b"e");
    let before = manifest(&f.old, true);
    f.start();
    // A bit of everything.
    write(&f.v("a.txt"), b"overwritten");
    fs::rename(f.v("dir"), f.v("renamed")).unwrap();
    fs::remove_file(f.v("renamed/b.txt")).unwrap();
    fs::set_permissions(f.v("renamed/sub/c.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::create_dir(f.v("renamed/sub/deeper/newdir")).unwrap();
    fs::hard_link(f.v("both.txt"), f.v("both-link")).unwrap();
    fs::remove_dir(f.v("emptydir")).unwrap();
    rustix::fs::setxattr(
        f.v("renamed/sub/deeper/e"),
        "user.t",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TRUNC)
        .open(f.v("link-to-a"))
        .unwrap();
    f.unmount();
    assert_eq!(manifest(&f.old, true), before, "OLD changed");
}

#[test]
fn a_second_daemon_on_the_same_state_dir_gets_a_clear_error() {
    let mut f = Fixture::new();
    f.start();
    let other = f.root.path().join("mnt2");
    fs::create_dir(&other).unwrap();
    let out = ferryfs(&[
        "mount".as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
        other.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another ferryfs process"),
        "unclear error: {err}"
    );
    f.unmount();
}

#[test]
fn mounting_again_over_a_dead_mount_after_kill9_needs_no_cleanup() {
    let mut f = Fixture::new();
    write(&f.old.join("keep"), b"k");
    f.start();
    write(&f.v("acked"), b"acknowledged before the crash");
    fs::remove_file(f.v("keep")).unwrap();
    f.kill9();
    f.mount();
    assert_eq!(
        fs::read(f.v("acked")).unwrap(),
        b"acknowledged before the crash"
    );
    assert!(!f.v("keep").exists());
    f.unmount();
}

#[test]
fn bad_input_gets_clear_errors() {
    let f = Fixture::new();
    let missing = f.root.path().join("nope");
    let out = ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        missing.as_os_str(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OLD store"));
    let out = ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        "relative/path".as_ref(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("absolute"));
    write(&f.new.join("x"), b"x");
    let out = ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        f.old.as_os_str(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    fs::remove_file(f.new.join("x")).unwrap();
    f.prepare();
    let out = ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        f.old.as_os_str(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a migration"));
    let out = ferryfs(&[
        "mount".as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
        missing.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_json_reports_phase_totals_local_and_tombstones() {
    let mut f = Fixture::new();
    populate_old(&f.old);
    f.start();
    write(&f.v("newfile"), b"n");
    fs::remove_file(f.v("a.txt")).unwrap();
    let s = f.status_json();
    assert_eq!(s["phase"], "prepared");
    assert_eq!(s["files"]["total"], 5);
    assert_eq!(s["dirs"]["total"], 3);
    assert_eq!(s["local"], 1);
    assert_eq!(s["tombstones"], 1);
    assert!(s["errors"].as_array().unwrap().is_empty());
    assert_eq!(s["mounted"], true);
    f.unmount();
}

/// Pages of `p` resident in the page cache (opens the file once more, through the view).
fn resident_pages(p: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped before return;
    // mincore writes one byte per page into `vec`, which has room for every page.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    vec.iter().filter(|b| **b & 1 == 1).count()
}

#[test]
fn unchanged_files_keep_the_page_cache_across_opens_and_changed_ones_are_read_fresh() {
    let mut f = Fixture::new();
    let first = vec![1u8; 1 << 20];
    write(&f.old.join("f"), &first);
    f.start();
    assert_eq!(fs::read(f.v("f")).unwrap(), first);
    assert_eq!(
        resident_pages(&f.v("f")),
        256,
        "reopening an unchanged file dropped its page cache"
    );
    // OLD changes behind the view's back: same size, other bytes, newer mtime.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&f.old.join("f"), &vec![2u8; 1 << 20]);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // the kernel's attribute TTL
    assert_eq!(
        fs::read(f.v("f")).unwrap(),
        vec![2u8; 1 << 20],
        "stale page cache served after OLD changed"
    );
    f.unmount();
}

#[test]
fn the_daemon_holds_fds_for_directories_not_for_files() {
    let mut f = Fixture::new();
    for d in 0..10 {
        for i in 0..500 {
            write(&f.old.join(format!("d{d}/f{i}")), b"x");
        }
    }
    f.start();
    // stat every file: the kernel now knows 5,000 file inodes and 10 directories.
    for d in 0..10 {
        for i in 0..500 {
            fs::symlink_metadata(f.v(&format!("d{d}/f{i}"))).unwrap();
        }
    }
    let pid = f.daemon_pid().expect("daemon running");
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(
        fds < 500,
        "the daemon holds {fds} fds for 5,000 known files: fds must scale with directories"
    );
    f.unmount();
}

#[test]
fn rule06_old_hard_links_stay_one_file_across_copy_up_and_remount() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"shared");
    fs::create_dir(f.old.join("d")).unwrap();
    fs::hard_link(f.old.join("a"), f.old.join("d/b")).unwrap();
    fs::hard_link(f.old.join("a"), f.old.join("c")).unwrap();
    let before = manifest(&f.old, true);
    f.start();
    let ino = fs::metadata(f.v("a")).unwrap().ino();
    assert_eq!(fs::metadata(f.v("d/b")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(f.v("a")).unwrap().nlink(), 3);
    // Change the file through one name: every name shows it, one inode, three links.
    OpenOptions::new()
        .append(true)
        .open(f.v("a"))
        .unwrap()
        .write_all(b"+1")
        .unwrap();
    assert_eq!(fs::read(f.v("d/b")).unwrap(), b"shared+1");
    assert_eq!(fs::metadata(f.v("c")).unwrap().nlink(), 3);
    // After a remount the other names still show the changed file, and are the same inode.
    f.unmount();
    f.mount();
    assert_eq!(fs::read(f.v("c")).unwrap(), b"shared+1");
    assert_eq!(fs::read(f.v("d/b")).unwrap(), b"shared+1");
    let (a, b, c) = (
        fs::metadata(f.v("a")).unwrap(),
        fs::metadata(f.v("d/b")).unwrap(),
        fs::metadata(f.v("c")).unwrap(),
    );
    assert!(
        a.ino() == b.ino() && b.ino() == c.ino(),
        "names split into several files"
    );
    assert_eq!((a.nlink(), b.nlink(), c.nlink()), (3, 3, 3));
    // Removing names lowers the count on the others.
    fs::remove_file(f.v("c")).unwrap();
    assert_eq!(fs::metadata(f.v("a")).unwrap().nlink(), 2);
    f.unmount();
    f.mount();
    fs::remove_file(f.v("d/b")).unwrap();
    assert_eq!(fs::metadata(f.v("a")).unwrap().nlink(), 1);
    assert_eq!(fs::read(f.v("a")).unwrap(), b"shared+1");
    f.unmount();
    assert_eq!(manifest(&f.old, true), before, "OLD changed");
}

#[test]
fn rule06_removing_an_old_hard_link_before_any_copy_up_lowers_the_count() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"x");
    fs::hard_link(f.old.join("a"), f.old.join("b")).unwrap();
    f.start();
    fs::remove_file(f.v("b")).unwrap();
    assert_eq!(fs::metadata(f.v("a")).unwrap().nlink(), 1);
    // and stays right once the remaining name is copied up
    OpenOptions::new().append(true).open(f.v("a")).unwrap();
    assert_eq!(fs::metadata(f.v("a")).unwrap().nlink(), 1);
    f.unmount();
}

#[test]
fn a_merged_directory_counts_its_subdirectories_from_both_stores() {
    let mut f = Fixture::new();
    fs::create_dir_all(f.old.join("m/old1")).unwrap();
    fs::create_dir_all(f.old.join("m/old2")).unwrap();
    write(&f.old.join("m/file"), b"f");
    f.start();
    let nlink = |f: &Fixture| fs::metadata(f.v("m")).unwrap().nlink();
    assert_eq!(nlink(&f), 4);
    fs::create_dir(f.v("m/new1")).unwrap(); // m is now in both stores
    assert_eq!(nlink(&f), 5);
    fs::create_dir(f.v("m/new2")).unwrap(); // counted before: the count must follow
    assert_eq!(nlink(&f), 6);
    fs::remove_dir(f.v("m/new2")).unwrap();
    assert_eq!(nlink(&f), 5);
    fs::remove_dir(f.v("m/old1")).unwrap();
    assert_eq!(nlink(&f), 4);
    fs::rename(f.v("m/old2"), f.v("elsewhere")).unwrap();
    assert_eq!(nlink(&f), 3);
    fs::rename(f.v("elsewhere"), f.v("m/back")).unwrap();
    assert_eq!(nlink(&f), 4);
    // Root: 2 + m (and nothing else).
    assert_eq!(fs::metadata(&f.mnt).unwrap().nlink(), 3);
    f.unmount();
}

#[test]
fn new_entries_get_the_callers_mode_whatever_the_daemons_umask() {
    let mut f = Fixture::new();
    f.start(); // the daemon inherits this test's umask (typically 022)
    let v = f.mnt.display().to_string();
    let out = run(Command::new("/bin/sh").arg("-c").arg(format!(
        "umask 0 && touch {v}/f0 && mkdir {v}/d0 && mkfifo {v}/p0 && \
         umask 027 && touch {v}/f27 && mkdir {v}/d27"
    )));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| fs::symlink_metadata(f.v(p)).unwrap().mode() & 0o7777;
    assert_eq!(
        [mode("f0"), mode("d0"), mode("p0"), mode("f27"), mode("d27")],
        [0o666, 0o777, 0o666, 0o640, 0o750]
    );
    f.unmount();
}

#[test]
fn the_view_root_keeps_the_owner_and_mode_of_olds_root() {
    let mut f = Fixture::new();
    fs::set_permissions(&f.old, fs::Permissions::from_mode(0o2775)).unwrap();
    rustix::fs::chown(
        &f.old,
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    f.start();
    let root = fs::metadata(&f.mnt).unwrap();
    assert_eq!(
        (root.mode() & 0o7777, root.uid(), root.gid()),
        (0o2775, 1234, 65534)
    );
    // and a set-group-ID root passes its group and bit on to new directories, as natively
    fs::create_dir(f.v("d")).unwrap();
    write(&f.v("file"), b"x");
    let d = fs::metadata(f.v("d")).unwrap();
    assert_eq!((d.mode() & 0o2000, d.gid()), (0o2000, 65534));
    assert_eq!(fs::metadata(f.v("file")).unwrap().gid(), 65534);
    f.unmount();
}

#[test]
fn metadata_ttl_bounds_how_late_a_change_in_old_shows() {
    // --metadata-ttl 0: the kernel asks every time, so a change made in OLD behind the view's
    // back shows at once; a long TTL keeps the kernel's cached size until it expires.
    for (ttl, fresh) in [("0", true), ("30", false)] {
        let mut f = Fixture::new();
        write(&f.old.join("file"), b"1234");
        f.prepare();
        let mp = f.mnt.clone();
        f.mount_with(&mp, &["--no-copy", "--metadata-ttl", ttl]);
        assert_eq!(fs::metadata(f.v("file")).unwrap().len(), 4);
        OpenOptions::new()
            .append(true)
            .open(f.old.join("file"))
            .unwrap()
            .write_all(b"5678")
            .unwrap();
        let len = fs::metadata(f.v("file")).unwrap().len();
        assert_eq!(
            len == 8,
            fresh,
            "--metadata-ttl {ttl}: size {len} right after OLD changed"
        );
        f.unmount();
    }
    let out = ferryfs(&[
        "mount".as_ref(),
        "--state".as_ref(),
        "/nonexistent".as_ref(),
        "/tmp".as_ref(),
        "--metadata-ttl".as_ref(),
        "100000".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("outside 0 to 86400"),
        "{err}"
    );
}

/// Removing or renaming an OLD-only entry through the view changes its directories' mtime and
/// ctime, as a change of a directory does on any file system, although only the journal
/// records it (NEW's copy of the directory carries the times). OLD is untouched.
#[test]
fn removing_or_renaming_an_old_only_entry_updates_its_directories_times() {
    let mut f = Fixture::new();
    for p in ["a/gone", "a/moved", "b/kept"] {
        write(&f.old.join(p), b"x");
    }
    fs::create_dir_all(f.old.join("c/empty")).unwrap();
    for d in ["a", "b", "c"] {
        rustix::fs::utimensat(
            rustix::fs::CWD,
            f.old.join(d),
            &fixed_times(),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
    }
    f.start();
    let old_mtime = fixed_times().last_modification.tv_sec;
    let mtime = |f: &Fixture, d: &str| fs::metadata(f.v(d)).unwrap().mtime();
    for d in ["a", "b", "c"] {
        assert_eq!(mtime(&f, d), old_mtime, "{d} before");
    }
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 1;
    fs::remove_file(f.v("a/gone")).unwrap();
    let a = fs::metadata(f.v("a")).unwrap();
    assert!(a.mtime() >= start && a.ctime() >= start, "unlink: {a:?}");
    fs::rename(f.v("a/moved"), f.v("b/moved")).unwrap();
    for d in ["a", "b"] {
        let m = fs::metadata(f.v(d)).unwrap();
        assert!(
            m.mtime() >= start && m.ctime() >= start,
            "rename, {d}: {m:?}"
        );
    }
    fs::remove_dir(f.v("c/empty")).unwrap();
    let c = fs::metadata(f.v("c")).unwrap();
    assert!(c.mtime() >= start && c.ctime() >= start, "rmdir: {c:?}");
    // Across a remount (times are NEW's, not a cache), and OLD as it was.
    f.unmount();
    f.mount();
    for d in ["a", "b", "c"] {
        assert!(mtime(&f, d) >= start, "{d} after a remount");
        assert_eq!(
            fs::metadata(f.old.join(d)).unwrap().mtime(),
            old_mtime,
            "OLD's {d}"
        );
    }
    f.unmount();
}
