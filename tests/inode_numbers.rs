//! Issue 23: the view's inode numbers outlive a mount. The same entry keeps its st_ino across
//! unmount and mount, kill -9, takeover, the copier taking it, and commit: entries still only in
//! OLD, copied, copied up, born in the view, renamed, and hard links (one number per file).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

/// Every entry below `root` (the root itself excluded): relative path -> st_ino.
fn numbers(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            // A listing's d_ino is the entry's st_ino.
            assert_eq!(e.ino(), md.ino(), "d_ino of {}", p.display());
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                md.ino(),
            );
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn same(what: &str, before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) {
    assert_eq!(before.len(), after.len(), "{what}: entries differ");
    let moved: Vec<_> = before
        .iter()
        .filter(|(p, n)| after.get(*p) != Some(n))
        .take(10)
        .map(|(p, n)| format!("{p}: {n} -> {:?}", after.get(p)))
        .collect();
    assert!(moved.is_empty(), "{what}: st_ino changed: {moved:#?}");
}

fn run_ok(o: std::process::Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_thousand_entries_keep_their_st_ino_across_unmount_kill_9_takeover_copy_and_commit() {
    let mut f = Fixture::new().over("dev");
    // Copied by the copier first: 300 files, and 50 files with a second name each.
    for i in 0..300 {
        write(
            &f.old.join(format!("copied/d{}/f{i}", i % 10)),
            format!("c{i}").as_bytes(),
        );
    }
    for i in 0..50 {
        write(&f.old.join(format!("links/f{i}")), b"linked");
        fs::hard_link(
            f.old.join(format!("links/f{i}")),
            f.old.join(format!("links/g{i}")),
        )
        .unwrap();
    }
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    run_ok(f.cmd("execute", &["--wait"]));
    run_ok(f.cmd("pause", &[]));
    f.unmount();
    // Added to OLD after the copy, with the copier off: shown from OLD only.
    for i in 0..300 {
        write(
            &f.old.join(format!("oldonly/d{}/f{i}", i % 10)),
            format!("o{i}").as_bytes(),
        );
    }
    for i in 0..40 {
        write(&f.old.join(format!("oldlinks/f{i}")), b"old linked");
        fs::hard_link(
            f.old.join(format!("oldlinks/f{i}")),
            f.old.join(format!("oldlinks/g{i}")),
        )
        .unwrap();
    }
    f.mount_with(&mnt, &["--no-copy"]);
    let v = f.mnt.clone();
    // Copied up through the view (chmod copies data today, a write does in any case).
    for i in 0..100 {
        fs::set_permissions(
            v.join(format!("oldonly/d{}/f{i}", i % 10)),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    // Born in the view, with hard links of their own.
    for i in 0..170 {
        write(&v.join(format!("born/f{i}")), b"born");
    }
    for i in 0..20 {
        fs::hard_link(
            v.join(format!("born/f{i}")),
            v.join(format!("born/link{i}")),
        )
        .unwrap();
    }
    // Renamed: copies, OLD-only entries, a directory with OLD-only content.
    for i in 0..30 {
        fs::rename(
            v.join(format!("copied/d0/f{}", i * 10)),
            v.join(format!("copied/r{i}")),
        )
        .unwrap();
    }
    for i in 0..30 {
        fs::rename(
            v.join(format!("oldonly/d9/f{}", 9 + i * 10)),
            v.join(format!("oldonly/r{i}")),
        )
        .unwrap();
    }
    fs::rename(v.join("oldonly/d8"), v.join("oldonly/d8-renamed")).unwrap();
    // A second name for OLD-only files made through the view (copied up and linked).
    for i in 0..10 {
        fs::hard_link(
            v.join(format!("oldonly/d1/f{}", 101 + i * 10)),
            v.join(format!("born/old-link{i}")),
        )
        .unwrap();
    }
    let before = numbers(&v);
    assert!(before.len() >= 1000, "only {} entries", before.len());
    // One number per file: hard links share theirs.
    assert_eq!(before["links/f3"], before["links/g3"]);
    assert_eq!(before["oldlinks/f3"], before["oldlinks/g3"]);
    assert_eq!(before["born/f3"], before["born/link3"]);
    assert_eq!(before["oldonly/d1/f101"], before["born/old-link0"]);
    let distinct: std::collections::HashSet<u64> = before.values().copied().collect();
    assert_eq!(
        distinct.len(),
        before.len() - 50 - 40 - 20 - 10,
        "a number shared by two files"
    );

    f.unmount();
    f.mount_with(&mnt, &["--no-copy"]);
    same("after unmount and mount", &before, &numbers(&v));

    f.kill9();
    f.mount_with(&mnt, &["--no-copy"]);
    same("after kill -9 and mount", &before, &numbers(&v));

    run_ok(f.try_mount(&mnt, &["--takeover", "--no-copy"]));
    same("after a takeover", &before, &numbers(&v));

    // The copier takes every entry still in OLD; numbers stay.
    run_ok(f.cmd("execute", &["--wait"]));
    same("after the copier took the rest", &before, &numbers(&v));

    run_ok(f.cmd("commit", &[]));
    same("after commit", &before, &numbers(&v));
    f.unmount();
    f.mount_with(&mnt, &["--no-copy"]);
    same("after commit, unmount and mount", &before, &numbers(&v));
    f.unmount();
}
