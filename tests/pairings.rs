//! The lifecycle over the four pairings of stores (issue 6): posix to posix, s3 to posix,
//! posix to s3, s3 to s3, against a real Garage on 127.0.0.1 and a real FUSE mount.
//!
//! The same dataset goes into OLD (a directory, or a bucket in s3fs's convention), the same
//! changes are made through the view (create + fsync, append, chmod, rename of an OLD-only file
//! and of a directory holding OLD-only content, delete, symlink), then either
//! execute / verify / commit, after which NEW (the directory, or the bucket as another client
//! lists and reads it) must hold exactly what the view showed; or abort, after which OLD must
//! hold exactly what the view showed and NEW nothing of ferryfs's.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use common::garage::Garage;
use common::trees::{Entry, assert_same, set_mtime, tree_of_bucket, tree_of_dir};
use common::{Fixture, ferryfs, ok};
use ferryfs::store::s3::{ObjectReader, PosixMeta, S3Store, S3Url};

fn server() -> &'static Garage {
    common::garage::shared()
}

fn store(bucket: &str) -> Arc<S3Store> {
    Arc::new(S3Store::connect(&S3Url::parse(&format!("s3://{bucket}")).unwrap()).unwrap())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Posix,
    S3,
}

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// The dataset: (path, bytes, permission bits, mtime).
fn dataset() -> Vec<(&'static str, Vec<u8>, u32, i64)> {
    vec![
        ("a/one.txt", b"one".to_vec(), 0o644, 1_500_000_000),
        ("a/two.txt", pattern(70_000, 2), 0o640, 1_500_000_100),
        ("b/deep/x.bin", pattern(9 << 20, 3), 0o600, 1_500_000_200),
        ("b/y.txt", b"y".to_vec(), 0o644, 1_500_000_300),
        ("c.txt", b"to be deleted".to_vec(), 0o644, 1_500_000_400),
        ("top.txt", b"stays".to_vec(), 0o444, 1_500_000_500),
    ]
}

/// Fill OLD with the dataset and a symlink; returns the OLD store argument.
fn fill_old(f: &Fixture, side: Side, bucket: &str) -> String {
    match side {
        Side::Posix => {
            for (rel, data, perm, mtime) in dataset() {
                let p = f.old.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, &data).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(perm)).unwrap();
                set_mtime(&p, mtime);
            }
            std::os::unix::fs::symlink("top.txt", f.old.join("old-link")).unwrap();
            f.old.to_str().unwrap().to_string()
        }
        Side::S3 => {
            server().bucket(bucket);
            let s = store(bucket);
            for (rel, data, perm, mtime) in dataset() {
                let meta = PosixMeta {
                    mode: Some(0o100000 | perm),
                    uid: Some(0),
                    gid: Some(0),
                    mtime: Some((mtime, 0)),
                };
                s.put(rel, data, &meta).unwrap();
            }
            let link = PosixMeta {
                mode: Some(0o120777),
                uid: Some(0),
                gid: Some(0),
                mtime: Some((1_500_000_600, 0)),
            };
            s.put("old-link", b"top.txt".to_vec(), &link).unwrap();
            format!("s3://{bucket}")
        }
    }
}

/// The NEW store argument (the bucket made empty, or the fixture's directory).
fn new_arg(f: &Fixture, side: Side, bucket: &str) -> String {
    match side {
        Side::Posix => f.new.to_str().unwrap().to_string(),
        Side::S3 => {
            server().bucket(bucket);
            format!("s3://{bucket}")
        }
    }
}

/// `ferryfs prepare` of OLD and NEW (store arguments) into the fixture's state dir.
fn prepare(f: &Fixture, old: &str, new: &str) {
    ok(prepare_with(f, old, new, &[]));
}

/// `prepare` with more arguments, as it went.
fn prepare_with(f: &Fixture, old: &str, new: &str, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "prepare".as_ref(),
        "--old".as_ref(),
        old.as_ref(),
        "--new".as_ref(),
        new.as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    ferryfs(&args)
}

fn tree_of(side: Side, dir: &Path, bucket: &str) -> BTreeMap<String, Entry> {
    match side {
        Side::Posix => tree_of_dir(dir),
        Side::S3 => tree_of_bucket(&store(bucket)),
    }
}

/// The same changes through the view, for every pairing.
fn change_through_the_view(f: &Fixture) {
    fs::create_dir(f.v("born")).unwrap();
    let mut h = fs::File::create(f.v("born/new.txt")).unwrap();
    h.write_all(b"born in the view").unwrap();
    h.sync_all().unwrap();
    drop(h);
    let mut h = fs::OpenOptions::new()
        .append(true)
        .open(f.v("a/one.txt"))
        .unwrap();
    h.write_all(b" and more").unwrap();
    drop(h);
    fs::set_permissions(f.v("a/one.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    // A metadata change of a file still only in OLD (recorded, no data copied, where OLD is
    // POSIX), which then moves with its directory: the copy carries it.
    fs::set_permissions(f.v("b/y.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(f.v("a/two.txt"), f.v("a/two-renamed.txt")).unwrap();
    fs::rename(f.v("b"), f.v("b2")).unwrap();
    fs::remove_file(f.v("c.txt")).unwrap();
    std::os::unix::fs::symlink("a/one.txt", f.v("new-link")).unwrap();
    fs::create_dir(f.v("empty")).unwrap();
}

/// Changes to entries NEW already holds.
fn change_again(f: &Fixture) {
    fs::rename(f.v("a/two-renamed.txt"), f.v("a/two-again.txt")).unwrap();
    fs::rename(f.v("b2"), f.v("b3")).unwrap();
    fs::remove_file(f.v("top.txt")).unwrap();
    fs::set_permissions(f.v("born/new.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(f.v("a/one.txt"), b"rewritten, longer than before").unwrap();
}

/// What the view shows after [`change_through_the_view`], as the stores must show it.
fn expected_after_changes(f: &Fixture) -> BTreeMap<String, Entry> {
    let seen = tree_of_dir(&f.mnt);
    assert!(seen.contains_key("born/new.txt") && !seen.contains_key("c.txt"));
    // (b renamed to b2, and to b3 by `change_again`)
    let x = seen
        .iter()
        .find(|(k, _)| k.starts_with("b") && k.ends_with("/y.txt"))
        .map(|(_, e)| e);
    assert!(
        matches!(x, Some(Entry::File { perm: 0o640, .. })),
        "the chmod through the view: {:?}",
        x.map(|e| match e {
            Entry::File { perm, .. } => format!("mode {perm:o}"),
            e => format!("{e:?}"),
        })
    );
    seen
}

fn lifecycle(old: Side, new: Side, name: &str) {
    let mut f = Fixture::new();
    let (ob, nb) = (format!("{name}-old"), format!("{name}-new"));
    let old_arg = fill_old(&f, old, &ob);
    let new_arg = new_arg(&f, new, &nb);
    prepare(&f, &old_arg, &new_arg);
    // prepare's scan: files (a symlink is one) and directories, whatever OLD is.
    let st = f.status_json();
    assert_eq!(st["files"]["total"], 7, "{st}");
    assert_eq!(st["dirs"]["total"], 3, "{st}");
    f.mount();
    change_through_the_view(&f);
    if new == Side::S3 {
        // What S3 cannot hold is refused when asked for, with a clear errno.
        let e = fs::hard_link(f.v("top.txt"), f.v("hard")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "link: {e}");
        let e = rustix::fs::setxattr(
            f.v("top.txt").as_path(),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap_err();
        assert_eq!(e, rustix::io::Errno::OPNOTSUPP, "setxattr");
    }
    ok(f.cmd("execute", &["--wait"]));
    if new == Side::S3 {
        // execute --wait returns once the bucket holds the view, too.
        let st = f.status_json();
        assert_eq!(st["published"]["settled"], true, "{st}");
        assert_same(
            "the bucket after execute --wait",
            &tree_of_bucket(&store(&nb)),
            &tree_of_dir(&f.mnt),
        );
    }
    // Everything is in NEW now: change it again, so that what NEW already holds is renamed,
    // deleted, rewritten and chmod-ed.
    ok(f.cmd("verify", &[]));
    change_again(&f);
    let want = expected_after_changes(&f);
    let out = ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    let out = ok(f.cmd("commit", &[]));
    assert!(out.contains("committed"), "{out}");
    // The view serves NEW only, and still shows the same.
    assert_same("the view after commit", &tree_of_dir(&f.mnt), &want);
    f.unmount();
    assert_same("NEW after commit", &tree_of(new, &f.new, &nb), &want);
    if new == Side::S3 {
        // Another client lists exactly the objects expected and reads the same bytes.
        let out =
            common::run(
                server()
                    .rclone()
                    .args(["lsf", "-R", "--files-only", &format!("g:{nb}")]),
            );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        listed.sort();
        let mut files: Vec<String> = want
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Dir))
            .map(|(k, _)| k.clone())
            .collect();
        files.sort();
        assert_eq!(listed, files, "rclone lsf of the NEW bucket");
        let out = common::run(
            server()
                .rclone()
                .args(["cat", &format!("g:{nb}/b3/deep/x.bin")]),
        );
        assert!(
            out.stdout == pattern(9 << 20, 3),
            "rclone cat of a copied object"
        );
        let st = ferryfs::state::status(&f.state).unwrap();
        assert_eq!(st.published.unwrap().pending, 0);
        // The renames of what the bucket held were copies made by the server, not uploads.
        let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
        let copied: u64 = log
            .lines()
            .filter(|l| l.contains("publish pass"))
            .filter_map(|l| l.split("copied=").nth(1))
            .filter_map(|v| {
                v.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(copied >= 3, "server-side copies: {copied}\n{log}");
        if old == Side::S3 {
            // Same service: what the copier brought from OLD's bucket went into NEW's by a
            // server-side copy, not through this host (the copier's running count, logged
            // with each of its passes).
            let by_server: u64 = log
                .lines()
                .filter(|l| l.contains("copier pass done"))
                .filter_map(|l| l.split("bucket_server_copied=").nth(1))
                .filter_map(|v| {
                    v.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0);
            assert!(
                by_server >= 3,
                "server-side copies from OLD: {by_server}\n{log}"
            );
        }
    }
}

fn abort(old: Side, new: Side, name: &str) {
    let mut f = Fixture::new();
    let (ob, nb) = (format!("{name}-old"), format!("{name}-new"));
    let old_arg = fill_old(&f, old, &ob);
    let new_arg = new_arg(&f, new, &nb);
    prepare(&f, &old_arg, &new_arg);
    // The copier runs meanwhile: some of OLD is in NEW (and, for an S3 NEW, in the bucket).
    f.mount_with(&f.mnt.clone(), &[]);
    change_through_the_view(&f);
    ok(f.cmd("execute", &["--wait"]));
    // Directories compare by being there: a bucket keeps no mode for a directory that is not
    // empty (abort writes markers for empty ones only).
    let want = expected_after_changes(&f);
    let out = ok(f.cmd("abort", &[]));
    assert!(out.contains("aborted"), "{out}");
    assert_same("OLD after abort", &tree_of(old, &f.old, &ob), &want);
    match new {
        Side::Posix => assert!(
            fs::read_dir(&f.new).unwrap().next().is_none(),
            "NEW not emptied"
        ),
        Side::S3 => {
            let mut keys = Vec::new();
            store(&nb)
                .list_all(&mut |k, _| keys.push(k.to_string()))
                .unwrap();
            assert!(keys.is_empty(), "the NEW bucket still holds {keys:?}");
        }
    }
    assert_eq!(f.status_json()["phase"], "aborted");
}

#[test]
fn lifecycle_posix_to_posix() {
    lifecycle(Side::Posix, Side::Posix, "pp");
}

#[test]
fn lifecycle_s3_to_posix() {
    lifecycle(Side::S3, Side::Posix, "sp");
}

#[test]
fn lifecycle_posix_to_s3() {
    lifecycle(Side::Posix, Side::S3, "ps");
}

#[test]
fn lifecycle_s3_to_s3() {
    lifecycle(Side::S3, Side::S3, "ss");
}

#[test]
fn abort_posix_to_posix() {
    abort(Side::Posix, Side::Posix, "app");
}

#[test]
fn abort_s3_to_posix() {
    abort(Side::S3, Side::Posix, "asp");
}

#[test]
fn abort_posix_to_s3() {
    abort(Side::Posix, Side::S3, "aps");
}

#[test]
fn abort_s3_to_s3() {
    abort(Side::S3, Side::S3, "ass");
}

/// An S3 NEW: what the bucket cannot hold (an OLD file's user xattr) is an error status lists
/// and commit refuses, with the daemon up; once the cause is gone the migration completes.
/// Then a file written and fsync-ed through the view survives kill -9 of the daemon and reaches
/// the bucket from the next mount.
#[test]
fn an_s3_new_lists_what_it_cannot_hold_and_survives_kill_9() {
    let mut f = Fixture::new();
    let old_arg = fill_old(&f, Side::Posix, "unused");
    rustix::fs::setxattr(
        f.old.join("b/y.txt").as_path(),
        "user.tag",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    // Big enough for a multipart upload (parts of 16 MiB, 8 in flight).
    let big = pattern((70 << 20) + 12345, 4);
    fs::write(f.old.join("big.bin"), &big).unwrap();
    let nb = "xattr-new";
    let new_arg = new_arg(&f, Side::S3, nb);
    prepare(&f, &old_arg, &new_arg);
    f.mount();
    let out = f.cmd("execute", &["--wait"]);
    assert!(
        !out.status.success(),
        "execute --wait passed with an upload failing"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("b/y.txt") && err.contains("could not be uploaded"),
        "{err}"
    );
    let out = f.cmd("verify", &[]);
    assert!(
        !out.status.success(),
        "verify passed with an upload failing"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("b/y.txt"), "{text}");
    let st = f.status_json();
    let errors = st["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["path"] == "/b/y.txt"
            && e["error"].as_str().unwrap().contains("extended attribute")),
        "status errors: {errors:?}"
    );
    let out = f.cmd("commit", &[]);
    assert!(
        !out.status.success(),
        "commit passed with an upload failing"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b/y.txt"), "{err}");
    assert!(f.daemon_pid().is_some(), "the daemon went down");
    // The cause removed through the view: the next pass uploads it.
    rustix::fs::removexattr(f.v("b/y.txt").as_path(), "user.tag").unwrap();
    ok(f.cmd("verify", &[]));
    // The multipart object, renamed: copied by the server (its MD5 kept in the journal, as a
    // multipart ETag is not one), and read back whole by another client.
    let etag = store(nb).head("big.bin").unwrap().expect("uploaded").etag;
    assert!(etag.contains('-'), "not a multipart upload: ETag {etag}");
    fs::rename(f.v("big.bin"), f.v("big-renamed.bin")).unwrap();
    ok(f.cmd("verify", &[]));
    let out = common::run(
        server()
            .rclone()
            .args(["cat", &format!("g:{nb}/big-renamed.bin")]),
    );
    assert!(out.stdout == big, "the multipart object read back differs");
    // Another client overwrites an uploaded object (same size, other bytes) of a file open
    // through the view (so still staged): verify reports it by its ETag, and the next pass
    // puts the view's bytes back.
    let mut held = fs::File::create(f.v("held.txt")).unwrap();
    held.write_all(b"view's").unwrap();
    held.sync_all().unwrap();
    ok(f.cmd("verify", &[]));
    store(nb)
        .put("held.txt", b"XXXXXX".to_vec(), &PosixMeta::default())
        .unwrap();
    let out = f.cmd("verify", &[]);
    assert!(
        !out.status.success(),
        "verify passed with held.txt overwritten"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held.txt: another version"), "{text}");
    ok(f.cmd("verify", &[]));
    drop(held);
    let out = common::run(server().rclone().args(["cat", &format!("g:{nb}/held.txt")]));
    assert_eq!(out.stdout, b"view's");
    // An evicted file's object (the only copy of its bytes) overwritten by another client:
    // reported, its reads fail rather than show other bytes, and it stays an error until the
    // file is removed through the view (or the version restored).
    let evicted = f.status_json()["published"]["evicted"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        evicted > 0,
        "nothing evicted: {}",
        f.status_json()["published"]
    );
    store(nb)
        .put("top.txt", b"XXXXX".to_vec(), &PosixMeta::default())
        .unwrap();
    let out = f.cmd("verify", &[]);
    assert!(
        !out.status.success(),
        "verify passed with top.txt overwritten"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("top.txt: another version"), "{text}");
    let out = f.cmd("verify", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("replaced"),
        "verify after an evicted file's object was replaced: {text}"
    );
    let e = fs::read(f.v("top.txt")).expect_err("read the bytes of a replaced object");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    fs::remove_file(f.v("top.txt")).unwrap();
    ok(f.cmd("verify", &[]));
    let mut keys = Vec::new();
    store(nb)
        .list_all(&mut |k, _| keys.push(k.to_string()))
        .unwrap();
    assert!(
        !keys.iter().any(|k| k == "big.bin"),
        "the old key stayed: {keys:?}"
    );
    // Written and fsync-ed, then the daemon killed before any pass may have run.
    let mut h = fs::File::create(f.v("durable.bin")).unwrap();
    h.write_all(&pattern(300_000, 9)).unwrap();
    h.sync_all().unwrap();
    drop(h);
    f.kill9();
    f.mount();
    assert!(fs::read(f.v("durable.bin")).unwrap() == pattern(300_000, 9));
    ok(f.cmd("commit", &[]));
    let got = tree_of_bucket(&store(nb));
    match got.get("durable.bin") {
        Some(Entry::File { data, .. }) => assert!(*data == pattern(300_000, 9)),
        e => panic!("durable.bin in the bucket: {e:?}"),
    }
    assert!(got.contains_key("b/y.txt"));
    f.unmount();
}

/// An S3 NEW across `mount --takeover`: the old daemon stops publishing, the new one goes on,
/// and what was written before and after the handover reaches the bucket.
#[test]
fn an_s3_new_keeps_publishing_across_a_takeover() {
    let mut f = Fixture::new().over("dev");
    let old_arg = fill_old(&f, Side::Posix, "unused");
    let nb = "takeover-new";
    let new_arg = new_arg(&f, Side::S3, nb);
    prepare(&f, &old_arg, &new_arg);
    f.mount_with(&f.mnt.clone(), &[]);
    fs::write(f.v("before.txt"), b"written before the handover").unwrap();
    let mut held = fs::OpenOptions::new()
        .append(true)
        .open(f.v("a/one.txt"))
        .unwrap();
    held.write_all(b" +1").unwrap();
    let before = f.daemon_pid().expect("a daemon serves");
    ok(f.try_mount(&f.mnt.clone(), &["--takeover"]));
    assert_ne!(f.daemon_pid(), Some(before), "the daemon was not replaced");
    held.write_all(b" +2").unwrap();
    drop(held);
    fs::write(f.v("after.txt"), b"written after the handover").unwrap();
    ok(f.cmd("execute", &["--wait"]));
    let want = tree_of_dir(&f.mnt);
    ok(f.cmd("commit", &[]));
    f.unmount();
    assert_same("NEW after a takeover", &tree_of_bucket(&store(nb)), &want);
    match want.get("a/one.txt") {
        Some(Entry::File { data, .. }) => assert_eq!(data, b"one +1 +2"),
        e => panic!("a/one.txt: {e:?}"),
    }
}

/// kill -9 of the daemon in the middle of the copier's work, for each pairing: the next
/// mount resumes (what was copied and recorded stays copied), and after execute, verify and
/// commit NEW holds exactly what OLD held.
fn crash_resume(old: Side, new: Side, name: &str) {
    let mut f = Fixture::new();
    let (ob, nb) = (format!("{name}-old"), format!("{name}-new"));
    let old_arg = fill_old(&f, old, &ob);
    // Enough small files that the copier, held to 150 of them a second, is caught mid-way.
    let many: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("many/d{}/f{i:03}", i % 8), pattern(2000 + i, i)))
        .collect();
    match old {
        Side::Posix => {
            for (rel, data) in &many {
                let p = f.old.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, data).unwrap();
            }
        }
        Side::S3 => {
            let s = store(&ob);
            for (rel, data) in &many {
                let meta = PosixMeta {
                    mode: Some(0o100644),
                    uid: Some(0),
                    gid: Some(0),
                    mtime: Some((1_500_000_000, 0)),
                };
                s.put(rel, data.clone(), &meta).unwrap();
            }
        }
    }
    let want = match old {
        Side::Posix => tree_of_dir(&f.old),
        Side::S3 => tree_of_bucket(&store(&ob)),
    };
    let new_arg = new_arg(&f, new, &nb);
    prepare(&f, &old_arg, &new_arg);
    f.mount_with(&f.mnt.clone(), &["--ops-limit", "50"]);
    common::wait_for("the copier to copy some files", 30, || {
        f.status_json()["files"]["done"].as_u64().unwrap_or(0) >= 60
    });
    f.kill9();
    let at_kill = f.status_json()["files"]["done"].as_u64().unwrap();
    assert!(
        at_kill < 400,
        "the copier had finished before the kill ({at_kill} files)"
    );
    f.mount();
    ok(f.cmd("execute", &["--wait"]));
    let st = f.status_json();
    assert_eq!(st["phase"], "executed", "{st}");
    // Done counts are the view's files: nothing counted twice across the crash.
    assert_eq!(st["files"]["done"], st["files"]["total"], "{st}");
    assert_same("the view after the crash", &tree_of_dir(&f.mnt), &want);
    let out = ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    ok(f.cmd("commit", &[]));
    f.unmount();
    assert_same("NEW after the crash", &tree_of(new, &f.new, &nb), &want);
}

#[test]
fn crash_resume_posix_to_posix() {
    crash_resume(Side::Posix, Side::Posix, "cpp");
}

#[test]
fn crash_resume_s3_to_posix() {
    crash_resume(Side::S3, Side::Posix, "csp");
}

#[test]
fn crash_resume_posix_to_s3() {
    crash_resume(Side::Posix, Side::S3, "cps");
}

#[test]
fn crash_resume_s3_to_s3() {
    crash_resume(Side::S3, Side::S3, "css");
}

/// `--old-s3-profile` / `--new-s3-profile`: OLD and NEW are buckets of the same name on two
/// servers, each reached with the keys and endpoint of an AWS profile of its own, and no keys
/// or endpoint in the environment at all. The migration runs end to end; the state dir
/// records the profiles' names and never their keys.
#[test]
fn old_and_new_on_two_servers_each_reached_with_a_profile_of_its_own() {
    use std::ffi::OsStr;
    let a = server();
    let b = Garage::start();
    a.bucket("prof-both");
    b.bucket("prof-both");
    let meta = PosixMeta {
        mode: Some(0o100640),
        uid: Some(0),
        gid: Some(0),
        mtime: Some((1_500_000_000, 0)),
    };
    let o = store("prof-both");
    o.put("top", b"top level".to_vec(), &meta).unwrap();
    o.put("d/inner", vec![5u8; 70_000], &meta).unwrap();
    let f = Fixture::new();
    let profiles = [a.profile("old"), b.profile("new")];
    // Every ferryfs command (and so the daemon) gets the profiles and none of AWS's key or
    // endpoint variables.
    let cli = |args: &[&OsStr]| {
        common::run(common::ferryfs_with_profiles(f.root.path(), &profiles).args(args))
    };
    // The same bucket name on both servers, each server named by its profile alone.
    let old_url = "s3://prof-both".to_string();
    let new_url = "s3://prof-both".to_string();
    let prepare = |old: &str, new: &str, extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec![
            "prepare".as_ref(),
            "--old".as_ref(),
            old.as_ref(),
            "--new".as_ref(),
            new.as_ref(),
            "--state".as_ref(),
            f.state.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        cli(&args)
    };
    let refused = |out: std::process::Output, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "prepare passed: {what}");
        assert!(
            !f.state.exists(),
            "a refused prepare made the state dir: {what}"
        );
        err
    };
    // No profile and no keys: refused, saying what is missing.
    let err = refused(prepare(&old_url, &new_url, &[]), "no credentials");
    assert!(err.contains("credentials"), "{err}");
    // A profile for a store that is a directory, and one the URL contradicts.
    let err = refused(
        prepare(
            f.old.to_str().unwrap(),
            &new_url,
            &["--old-s3-profile", "old", "--new-s3-profile", "new"],
        ),
        "a profile for a directory",
    );
    assert!(
        err.contains("--old-s3-profile") && err.contains("directory"),
        "{err}"
    );
    let err = refused(
        prepare(
            &format!("{old_url}?profile=other"),
            &new_url,
            &["--old-s3-profile", "old", "--new-s3-profile", "new"],
        ),
        "two profiles for OLD",
    );
    assert!(err.contains("disagree"), "{err}");

    ok(prepare(
        &old_url,
        &new_url,
        &["--old-s3-profile", "old", "--new-s3-profile", "new"],
    ));
    let st = f.state.as_os_str();
    ok(cli(&[
        "mount".as_ref(),
        "--state".as_ref(),
        st,
        f.mnt.as_os_str(),
        "-o".as_ref(),
        "allow_other".as_ref(),
    ]));
    assert_eq!(fs::read(f.mnt.join("top")).unwrap(), b"top level");
    fs::write(f.mnt.join("made"), b"through the view").unwrap();
    ok(cli(&[
        "execute".as_ref(),
        "--state".as_ref(),
        st,
        "--wait".as_ref(),
    ]));
    let out = ok(cli(&[
        "verify".as_ref(),
        "--state".as_ref(),
        st,
        "--checksum".as_ref(),
    ]));
    assert!(out.contains("0 mismatches"), "{out}");
    let out = ok(cli(&["commit".as_ref(), "--state".as_ref(), st]));
    assert!(out.contains("committed"), "{out}");
    let status = ok(cli(&["status".as_ref(), "--state".as_ref(), st]));
    ok(ferryfs(&["unmount".as_ref(), f.mnt.as_os_str()]));
    assert!(
        status.contains("profile=old") && status.contains("profile=new"),
        "status names the stores with their profiles: {status}"
    );
    // The keys are nowhere in the state dir (journal, config, log).
    let mut stack = vec![f.state.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = fs::read(&p) {
                for secret in [&a.secret, &b.secret] {
                    assert!(
                        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "a secret key in {}",
                        p.display()
                    );
                }
            }
        }
    }
    // NEW's bucket, as another client with NEW's keys sees it.
    let ls = common::run(
        b.rclone()
            .args(["lsf", "-R", "--files-only", "g:prof-both"]),
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names, ["d/inner", "made", "top"], "{ls:?}");
    let cat = common::run(b.rclone().args(["cat", "g:prof-both/made"]));
    assert_eq!(cat.stdout, b"through the view");
    let cat = common::run(b.rclone().args(["cat", "g:prof-both/d/inner"]));
    assert_eq!(cat.stdout, vec![5u8; 70_000]);
}

/// `prepare --s3-metadata rclone`: NEW's objects carry the mode in rclone's octal, so
/// `rclone copy --metadata` out of the bucket gives every file its mode and mtime back
/// (with s3fs's decimal it turned 0600 into 0152). Refused for a directory NEW.
#[test]
fn an_s3_new_written_for_rclone_gives_rclone_its_modes_back() {
    let mut f = Fixture::new();
    let old = fill_old(&f, Side::Posix, "");
    let new = new_arg(&f, Side::S3, "for-rclone");
    let posix_new = f.new.to_str().unwrap().to_string();
    let refused = prepare_with(&f, &old, &posix_new, &["--s3-metadata", "rclone"]);
    assert!(
        !refused.status.success(),
        "--s3-metadata taken for a directory NEW"
    );
    ok(prepare_with(&f, &old, &new, &["--s3-metadata", "rclone"]));
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    ok(f.cmd("execute", &["--wait"]));
    f.unmount();
    let out = f.root.path().join("rclone-out");
    let o = common::run(server().rclone().args([
        "copy",
        "--metadata",
        "g:for-rclone",
        out.to_str().unwrap(),
    ]));
    assert!(
        o.status.success(),
        "rclone: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (rel, data, perm, mtime) in dataset() {
        let md = fs::metadata(out.join(rel)).unwrap();
        assert_eq!(fs::read(out.join(rel)).unwrap(), data, "{rel}");
        assert_eq!(md.mode() & 0o7777, perm, "{rel}: mode {:o}", md.mode());
        assert_eq!(md.mtime(), mtime, "{rel}");
    }
}

/// Issue 23: an S3 NEW on a service that refuses directory markers (a test double in front of
/// Garage answering HTTP 500 to every PUT of a `key/` object, as several gateways do). prepare's
/// probe finds it and names the fallback; the publisher sends no marker; an empty directory,
/// which no bucket without markers can hold, is an error naming it (never dropped silently)
/// until it is removed; after commit the bucket holds exactly the view.
#[test]
fn an_s3_new_that_refuses_directory_markers_holds_exactly_the_view_after_commit() {
    let g = server();
    let double = common::s3double::refuse_directory_markers(&g.endpoint);
    let mut f = Fixture::new();
    let nb = "nomarkers-new";
    let old_arg = fill_old(&f, Side::Posix, "unused");
    g.bucket(nb);
    let new_arg = format!("s3://{nb}?endpoint={}", double.endpoint);
    let out = ok(prepare_with(&f, &old_arg, &new_arg, &[]));
    assert!(
        out.lines().any(|l| l.contains("NEW s3_dir_markers")
            && l.contains(" NO ")
            && l.contains("500")
            && l.contains("no directory markers")),
        "prepare does not name the missing markers and the fallback: {out}"
    );
    let probe_refusals = double.refused.load(std::sync::atomic::Ordering::Relaxed);
    // (The SDK retries a 500 a few times.)
    assert!(probe_refusals >= 1, "the probe sent no marker");
    assert!(
        store(nb).is_empty().unwrap(),
        "the probe left objects in NEW"
    );
    f.mount();
    change_through_the_view(&f);
    // `empty` (made by the changes above) cannot be held: execute says so and names it.
    let o = f.cmd("execute", &["--wait"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "execute --wait succeeded: {text}");
    assert!(
        text.contains("empty") && text.contains("directory markers"),
        "{text}"
    );
    let st = f.status_json();
    assert!(
        st["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/empty" && e["error"].as_str().unwrap().contains("markers")),
        "{st}"
    );
    assert!(!f.cmd("commit", &[]).status.success());
    fs::remove_dir(f.v("empty")).unwrap();
    ok(f.cmd("execute", &["--wait"]));
    let out = ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    let want = expected_after_changes(&f);
    ok(f.cmd("commit", &[]));
    f.unmount();
    // Read straight from Garage: the view's tree exactly, directories from the keys' paths.
    assert_same(
        "the bucket after commit",
        &tree_of_bucket(&store(nb)),
        &want,
    );
    assert_eq!(
        double.refused.load(std::sync::atomic::Ordering::Relaxed),
        probe_refusals,
        "the publisher sent directory markers"
    );
}

/// The daemon's /metrics, parsed.
fn metrics(port: u16) -> BTreeMap<String, f64> {
    common::parse_metrics(
        &common::http_get(port, "/metrics")
            .expect("/metrics answers")
            .1,
    )
}

/// The object `key` of `s`, whole.
fn object(s: &Arc<S3Store>, key: &str) -> Vec<u8> {
    let o = s.head(key).unwrap().unwrap_or_else(|| panic!("no {key}"));
    let size = o.size as usize;
    ObjectReader::new(s.clone(), o, 8 << 20)
        .read_at(0, size)
        .unwrap()
}

/// The object `key` of `s`, whole, or `None` while it is missing or replaced between its HEAD
/// and its GET (a publisher sending a new version: HTTP 412), for polling.
fn object_now(s: &Arc<S3Store>, key: &str) -> Option<Vec<u8>> {
    let o = s.head(key).ok()??;
    let size = o.size as usize;
    ObjectReader::new(s.clone(), o, 8 << 20)
        .read_at(0, size)
        .ok()
}

/// Copy-before-write by chunk into an S3 NEW (issue 25): a write into a big OLD file copies
/// only the chunks it touches into the staging tree, and the publisher sends the file into
/// the bucket from there and from OLD, with no copier running: never with holes for data,
/// never filled in on local disk first. It is then an evicted file of NEW (read from the
/// bucket); a later write stages one chunk again; commit leaves the bucket the view's bytes.
#[test]
fn an_s3_new_publishes_a_partly_copied_file_without_filling_it_in() {
    use std::os::unix::fs::FileExt;
    let bucket = "pairing-chunks";
    let mut f = Fixture::new();
    let mut model = pattern(4 << 20, 5);
    fs::write(f.old.join("big"), &model).unwrap();
    let new = new_arg(&f, Side::S3, bucket);
    ok(prepare_with(
        &f,
        f.old.to_str().unwrap(),
        &new,
        &["--chunk-size", "256k"],
    ));
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy", "--metrics-addr", &addr]);
    let w = fs::OpenOptions::new().write(true).open(f.v("big")).unwrap();
    w.write_all_at(b"through the view", 3_000_000).unwrap();
    drop(w);
    model[3_000_000..3_000_016].copy_from_slice(b"through the view");
    assert_eq!(f.status_json()["partial"]["files"], 1);
    let staged = f.state.join("stage").join("big");
    let s = store(bucket);
    let mut peak = 0;
    common::wait_for("the publisher to send big and evict it", 60, || {
        peak = peak.max(fs::metadata(&staged).map_or(0, |m| m.blocks() * 512));
        f.status_json()["published"]["evicted"] == 1
    });
    assert!(
        peak <= 512 << 10,
        "the staging tree held {peak} bytes of big: filled in before its upload"
    );
    assert!(object(&s, "big") == model, "the bucket's big");
    let st = f.status_json();
    assert_eq!(st["partial"]["files"], 0, "{st}");
    let m = metrics(port);
    assert_eq!(m.get("ferryfs_partial_published_total"), Some(&1.0));
    assert_eq!(
        m.get("ferryfs_partial_published_sent_bytes_total"),
        Some(&((4u64 << 20) as f64))
    );
    // Read from the bucket now; a write stages one chunk and is published in turn.
    assert!(fs::read(f.v("big")).unwrap() == model, "the view's big");
    let w = fs::OpenOptions::new().write(true).open(f.v("big")).unwrap();
    w.write_all_at(b"again", 100).unwrap();
    drop(w);
    model[100..105].copy_from_slice(b"again");
    common::wait_for("the second write in the bucket", 60, || {
        object_now(&s, "big").as_ref() == Some(&model)
            && f.status_json()["published"]["settled"] == true
    });
    ok(f.cmd("execute", &["--wait"]));
    f.unmount();
    ok(f.cmd("commit", &[]));
    let t = tree_of_bucket(&s);
    match t.get("big") {
        Some(Entry::File { data, .. }) => assert!(*data == model, "the bucket's big"),
        other => panic!("big in the bucket: {other:?}"),
    }
}

/// The same out of an S3 OLD on NEW's service: the ranges of the file no write touched are
/// copied by the server from OLD's object (UploadPartCopy), only the part holding the write
/// is sent by this host.
#[test]
fn a_partly_copied_object_is_published_with_its_unchanged_ranges_copied_by_the_server() {
    use std::os::unix::fs::FileExt;
    let (ob, nb) = ("pairing-chunks-old", "pairing-chunks-new");
    server().bucket(ob);
    let old = store(ob);
    // Five parts of 16 MiB: the write lands in the third.
    let mut model = pattern(80 << 20, 11);
    old.put("big", model.clone(), &PosixMeta::default())
        .unwrap();
    let mut f = Fixture::new();
    let new = new_arg(&f, Side::S3, nb);
    ok(prepare_with(
        &f,
        &format!("s3://{ob}"),
        &new,
        &["--chunk-size", "1M"],
    ));
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy", "--metrics-addr", &addr]);
    let at = (40 << 20) + 12_345;
    let w = fs::OpenOptions::new().write(true).open(f.v("big")).unwrap();
    w.write_all_at(&[7u8; 4096], at as u64).unwrap();
    drop(w);
    model[at..at + 4096].fill(7);
    common::wait_for("the publisher to send big", 120, || {
        f.status_json()["published"]["evicted"] == 1
    });
    let s = store(nb);
    assert!(object(&s, "big") == model, "the NEW bucket's big");
    let m = metrics(port);
    assert_eq!(m.get("ferryfs_partial_published_total"), Some(&1.0));
    assert_eq!(
        m.get("ferryfs_partial_published_server_copied_bytes_total"),
        Some(&((64u64 << 20) as f64)),
        "{m:?}"
    );
    assert_eq!(
        m.get("ferryfs_partial_published_sent_bytes_total"),
        Some(&((16u64 << 20) as f64)),
        "{m:?}"
    );
    assert!(fs::read(f.v("big")).unwrap() == model, "the view's big");
    ok(f.cmd("execute", &["--wait"]));
    f.unmount();
    ok(f.cmd("commit", &[]));
    assert!(
        object(&s, "big") == model,
        "the NEW bucket's big after commit"
    );
}
