//! An S3 bucket as OLD, a POSIX directory as NEW (issue 6, the "s3 to posix" pairing),
//! against a real Garage on 127.0.0.1: objects written by rclone (with and without metadata)
//! and in s3fs's convention, read through the mounted view, copied by the copier, verified,
//! committed; an object replaced behind the view's back; abort writing the view back into the
//! bucket; and the refusals (an S3 NEW, a bucket that does not exist).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use common::garage::Garage;
use common::{BIN, Fixture, ferryfs, names, ok};
use ferryfs::store::s3::{PosixMeta, S3Store, S3Url};

fn server() -> &'static Garage {
    common::garage::shared()
}

fn store(bucket: &str) -> Arc<S3Store> {
    Arc::new(S3Store::connect(&S3Url::parse(&format!("s3://{bucket}")).unwrap()).unwrap())
}

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

fn try_prepare(old: &OsStr, new: &OsStr, state: &Path) -> std::process::Output {
    ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        old,
        "--new".as_ref(),
        new,
        "--state".as_ref(),
        state.as_os_str(),
    ])
}

fn prepare(f: &Fixture, old: &str) -> String {
    ok(try_prepare(old.as_ref(), f.new.as_os_str(), &f.state))
}

/// The stderr of a command that must fail.
fn refused(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What a test bucket holds, written the ways real buckets are: rclone with its mtime
/// metadata, s3fs's mode/uid/gid/mtime (a symlink among them), no metadata at all, a
/// directory marker, and an object big enough for several readahead chunks.
/// A file as the view must show it; `mtime` where the object's metadata had one.
#[derive(Clone)]
struct Want {
    data: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    mtime: Option<(i64, u32)>,
}

fn want(data: Vec<u8>, mode: u32, owner: (u32, u32), mtime: Option<(i64, u32)>) -> Want {
    Want {
        data,
        mode,
        owner,
        mtime,
    }
}

struct Dataset {
    files: BTreeMap<String, Want>,
    symlinks: BTreeMap<String, String>,
    dirs: Vec<String>,
}

fn fill(g: &Garage, bucket: &str) -> Dataset {
    g.bucket(bucket);
    let s = store(bucket);
    let mut files = BTreeMap::new();
    // rclone, from a local tree: mtime metadata (nanoseconds), no mode.
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("docs/deep")).unwrap();
    let ts = common::fixed_times();
    for (i, rel) in ["docs/a.txt", "docs/deep/b.txt", "top.txt"]
        .iter()
        .enumerate()
    {
        let data = pattern(1000 + i * 777, i);
        let p = src.path().join(rel);
        fs::write(&p, &data).unwrap();
        rustix::fs::utimensat(rustix::fs::CWD, &p, &ts, rustix::fs::AtFlags::empty()).unwrap();
        files.insert(
            rel.to_string(),
            want(data, 0o644, (0, 0), Some((1_100_000_000, 987_654_321))),
        );
    }
    let out = common::run(g.rclone().args([
        "copy",
        src.path().to_str().unwrap(),
        &format!("g:{bucket}"),
    ]));
    assert!(
        out.status.success(),
        "rclone copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // s3fs's convention: full st_mode in decimal, owner, mtime in seconds.
    let meta = PosixMeta {
        mode: Some(0o100640),
        uid: Some(1234),
        gid: Some(99),
        mtime: Some((1_400_000_000, 0)),
    };
    let data = b"written by s3fs".to_vec();
    s.put("s3fs/file", data.clone(), &meta).unwrap();
    files.insert(
        "s3fs/file".into(),
        want(data, 0o640, (1234, 99), Some((1_400_000_000, 0))),
    );
    let link = PosixMeta {
        mode: Some(0o120777),
        uid: Some(0),
        gid: Some(0),
        mtime: Some((1_400_000_001, 0)),
    };
    s.put("s3fs/link", b"file".to_vec(), &link).unwrap();
    // No metadata at all: the URL's defaults, LastModified as mtime.
    let plain = pattern(5000, 7);
    s.put("plain.bin", plain.clone(), &PosixMeta::default())
        .unwrap();
    files.insert("plain.bin".into(), want(plain, 0o644, (0, 0), None));
    // Several readahead chunks (8 MiB each) and a short tail.
    let big = pattern((20 << 20) + 12345, 3);
    s.put("big/blob", big.clone(), &PosixMeta::default())
        .unwrap();
    files.insert("big/blob".into(), want(big, 0o644, (0, 0), None));
    // An empty directory, as a marker object.
    s.put("empty/", Vec::new(), &PosixMeta::default()).unwrap();
    Dataset {
        files,
        symlinks: [("s3fs/link".to_string(), "file".to_string())].into(),
        dirs: ["big", "docs", "docs/deep", "empty", "s3fs"]
            .map(String::from)
            .to_vec(),
    }
}

/// Every file, symlink and directory below `root` matches the dataset: content, mode, owner
/// and (where the object's metadata had it) mtime to the nanosecond.
fn check_tree(root: &Path, d: &Dataset) {
    for (rel, w) in &d.files {
        let p = root.join(rel);
        let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            got == w.data,
            "{rel}: content differs ({} bytes, want {})",
            got.len(),
            w.data.len()
        );
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(md.is_file(), "{rel} is not a regular file");
        assert_eq!(md.permissions().mode() & 0o7777, w.mode, "{rel}: mode");
        assert_eq!((md.uid(), md.gid()), w.owner, "{rel}: owner");
        if let Some((s, ns)) = w.mtime {
            assert_eq!(
                (md.mtime(), md.mtime_nsec()),
                (s, i64::from(ns)),
                "{rel}: mtime"
            );
        }
    }
    for (rel, target) in &d.symlinks {
        let t = fs::read_link(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(t, Path::new(target), "{rel}: symlink target");
    }
    for rel in &d.dirs {
        assert!(root.join(rel).is_dir(), "{rel} is not a directory");
    }
    assert!(fs::read_dir(root.join("empty")).unwrap().next().is_none());
}

/// Every key below the bucket's root (rclone's recursive listing, directories as `name/`).
fn keys(g: &Garage, bucket: &str) -> Vec<String> {
    let out = common::run(g.rclone().args(["lsf", "-R", &format!("g:{bucket}")]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut k: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    k.sort();
    k
}

#[test]
fn a_bucket_migrates_into_posix_through_the_view_and_the_copier() {
    let g = server();
    let d = fill(g, "s3-old-e2e");
    let mut f = Fixture::new();
    let out = prepare(&f, "s3://s3-old-e2e");
    // 7 objects are files (the marker is a directory): 3 from rclone, 2 s3fs, plain, big.
    assert!(out.contains("7 files"), "{out}");
    assert!(out.contains("5 dirs"), "{out}");
    f.mount();
    // Reads fall through to the bucket.
    check_tree(&f.mnt, &d);
    let mut names = common::names(&f.mnt);
    names.sort();
    assert_eq!(
        names,
        ["big", "docs", "empty", "plain.bin", "s3fs", "top.txt"]
    );
    // Changes through the view land in NEW; the objects stay as they are.
    let mut top = d.files["top.txt"].data.clone();
    {
        use std::io::Write;
        let mut h = fs::OpenOptions::new()
            .append(true)
            .open(f.v("top.txt"))
            .unwrap();
        h.write_all(b" and more").unwrap();
    }
    top.extend_from_slice(b" and more");
    fs::write(f.v("docs/new.txt"), b"made in the view").unwrap();
    fs::rename(f.v("plain.bin"), f.v("docs/plain-moved.bin")).unwrap();
    fs::remove_file(f.v("docs/deep/b.txt")).unwrap();
    assert_eq!(fs::read(f.v("top.txt")).unwrap(), top);
    assert_eq!(
        fs::read(f.v("docs/plain-moved.bin")).unwrap(),
        d.files["plain.bin"].data
    );
    assert!(!f.v("plain.bin").exists());
    assert_eq!(
        store("s3-old-e2e").head("top.txt").unwrap().unwrap().size,
        2554
    );
    f.unmount();

    // The copier (offline, in the foreground), verify, commit.
    ok(f.cmd("execute", &[]));
    let st = f.status_json();
    assert_eq!(st["phase"], "executed", "{st}");
    assert_eq!(st["errors"].as_array().unwrap().len(), 0, "{st}");
    ok(f.cmd("verify", &["--checksum"]));
    ok(f.cmd("commit", &[]));
    assert_eq!(f.status_json()["phase"], "committed");

    // NEW holds the bucket plus the view's changes, exactly, and no ferryfs litter.
    let mut want_new = Dataset {
        files: d.files.clone(),
        symlinks: d.symlinks.clone(),
        dirs: d.dirs.clone(),
    };
    let t = want_new.files.get_mut("top.txt").unwrap();
    t.data = top;
    t.mtime = None; // written through the view
    let plain = want_new.files.remove("plain.bin").unwrap();
    want_new.files.insert("docs/plain-moved.bin".into(), plain);
    want_new.files.remove("docs/deep/b.txt");
    want_new.files.insert(
        "docs/new.txt".into(),
        want(b"made in the view".to_vec(), 0o644, (0, 0), None),
    );
    // A file made through the view belongs to its creator (root here), mode as its umask left.
    let new_txt = fs::metadata(f.new.join("docs/new.txt")).unwrap();
    want_new.files.get_mut("docs/new.txt").unwrap().mode = new_txt.permissions().mode() & 0o7777;
    check_tree(&f.new, &want_new);
    let mut all = Vec::new();
    for e in walk(&f.new) {
        all.push(e);
    }
    all.sort();
    assert_eq!(
        all,
        [
            "big",
            "big/blob",
            "docs",
            "docs/a.txt",
            "docs/deep",
            "docs/new.txt",
            "docs/plain-moved.bin",
            "empty",
            "s3fs",
            "s3fs/file",
            "s3fs/link",
            "top.txt"
        ]
    );
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn an_object_replaced_after_its_copy_is_reported_and_copied_again() {
    let g = server();
    g.bucket("s3-old-stale");
    let s = store("s3-old-stale");
    s.put("a/one", b"first version".to_vec(), &PosixMeta::default())
        .unwrap();
    s.put("two", b"stays".to_vec(), &PosixMeta::default())
        .unwrap();
    let f = Fixture::new();
    prepare(&f, "s3://s3-old-stale");
    ok(f.cmd("execute", &[]));
    assert_eq!(fs::read(f.new.join("a/one")).unwrap(), b"first version");
    ok(f.cmd("verify", &[]));
    // Replaced behind the view's back, same size: the ETag (in the fingerprint) tells.
    s.put("a/one", b"other version".to_vec(), &PosixMeta::default())
        .unwrap();
    let v = f.cmd("verify", &[]);
    assert!(!v.status.success(), "verify passed over a replaced object");
    let text =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(text.contains("a/one"), "{text}");
    let c = f.cmd("commit", &[]);
    assert!(!c.status.success(), "commit went ahead with a stale copy");
    // The final pass copies it again; then all is clean.
    ok(f.cmd("execute", &[]));
    assert_eq!(fs::read(f.new.join("a/one")).unwrap(), b"other version");
    ok(f.cmd("verify", &["--checksum"]));
    ok(f.cmd("commit", &[]));
}

#[test]
fn abort_writes_the_view_back_into_the_bucket() {
    let g = server();
    g.bucket("s3-old-abort");
    let s = store("s3-old-abort");
    for (k, v) in [
        ("keep/same", "unchanged"),
        ("keep/edit", "before"),
        ("gone", "deleted through the view"),
        ("dir/x", "in a renamed directory"),
        ("move-me", "renamed file"),
    ] {
        s.put(k, v.as_bytes().to_vec(), &PosixMeta::default())
            .unwrap();
    }
    let same_etag = s.head("keep/same").unwrap().unwrap().etag;
    let mut f = Fixture::new();
    prepare(&f, "s3://s3-old-abort");
    f.mount();
    fs::write(f.v("keep/edit"), b"after").unwrap();
    fs::remove_file(f.v("gone")).unwrap();
    fs::rename(f.v("dir"), f.v("dir2")).unwrap();
    fs::rename(f.v("move-me"), f.v("keep/moved")).unwrap();
    fs::write(f.v("fresh"), b"new file").unwrap();
    fs::set_permissions(f.v("fresh"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(f.v("hollow")).unwrap();
    std::os::unix::fs::symlink("keep/same", f.v("ln")).unwrap();
    f.unmount();
    let out = ok(f.cmd("abort", &[]));
    assert!(out.contains("aborted"), "{out}");
    assert_eq!(
        keys(g, "s3-old-abort"),
        [
            "dir2/",
            "dir2/x",
            "fresh",
            "keep/",
            "keep/edit",
            "keep/moved",
            "keep/same",
            "ln"
        ]
    );
    // (rclone's recursive listing does not show a directory held by a marker alone.)
    assert!(
        s.head("hollow/").unwrap().is_some(),
        "no marker for the empty directory"
    );
    let get = |k: &str| {
        let o = s.head(k).unwrap().unwrap();
        let r = ferryfs::store::s3::ObjectReader::new(s.clone(), o, 1 << 20);
        r.read_at(0, 1 << 20).unwrap()
    };
    assert_eq!(get("keep/edit"), b"after");
    assert_eq!(get("keep/moved"), b"renamed file");
    assert_eq!(get("dir2/x"), b"in a renamed directory");
    assert_eq!(get("fresh"), b"new file");
    assert_eq!(get("ln"), b"keep/same");
    // Unchanged objects are not written again.
    assert_eq!(s.head("keep/same").unwrap().unwrap().etag, same_etag);
    // Metadata in s3fs's names: mode with its type, as another client reads it.
    let fresh = s.head("fresh").unwrap().unwrap().meta.unwrap();
    assert_eq!(fresh.mode, Some(0o100600));
    let ln = s.head("ln").unwrap().unwrap().meta.unwrap();
    assert_eq!(ln.mode.map(|m| m & 0o170000), Some(0o120000));
    assert_eq!(f.status_json()["phase"], "aborted");
    // NEW was empty before: it is empty again.
    assert!(fs::read_dir(&f.new).unwrap().next().is_none());
}

/// An object of 64 MiB or more is fetched by the copier in parallel ranged GETs: every byte
/// arrives at its place, and verify --checksum agrees with the bucket.
#[test]
fn a_large_object_is_copied_exactly_in_parallel_ranges() {
    let g = server();
    g.bucket("s3-old-large");
    let s = store("s3-old-large");
    let big = pattern((64 << 20) + 4321, 11);
    s.put("d/big", big.clone(), &PosixMeta::default()).unwrap();
    let f = Fixture::new();
    prepare(&f, "s3://s3-old-large");
    ok(f.cmd("execute", &[]));
    assert!(
        fs::read(f.new.join("d/big")).unwrap() == big,
        "the copy differs"
    );
    ok(f.cmd("verify", &["--checksum"]));
}

/// A bucket holding an object and a directory of the same name (`a` and `a/x`): the view shows
/// the directory, so abort never saw the object and leaves it hidden there while the view
/// still shows the directory; once the view renamed the directory away, the object goes (OLD
/// equals the view); an object the view removed and replaced by a directory of its name goes.
#[test]
fn abort_into_a_bucket_leaves_an_object_hidden_behind_a_directory_of_its_name() {
    let g = server();
    g.bucket("s3-old-shadow");
    let s = store("s3-old-shadow");
    for (k, v) in [
        ("a", "hidden by the directory a/"),
        ("a/x", "in a"),
        ("m", "hidden by the marker m/"),
        ("m/", ""),
        ("f", "a file the view turns into a directory"),
        ("b", "hidden by the directory b/, which the view renames"),
        ("b/x", "in b"),
    ] {
        s.put(k, v.as_bytes().to_vec(), &PosixMeta::default())
            .unwrap();
    }
    let mut f = Fixture::new();
    prepare(&f, "s3://s3-old-shadow");
    f.mount();
    assert!(f.v("a").is_dir() && f.v("m").is_dir());
    fs::remove_file(f.v("f")).unwrap();
    fs::create_dir(f.v("f")).unwrap();
    fs::write(f.v("f/y"), b"made through the view").unwrap();
    fs::write(f.v("a/z"), b"new in a").unwrap();
    fs::rename(f.v("b"), f.v("c")).unwrap();
    // The renamed directory is listed (its OLD origin `b` is a directory, not the object).
    let mut root = names(&f.mnt);
    root.sort();
    assert_eq!(root, ["a", "c", "f", "m"]);
    assert_eq!(names(&f.v("c")), ["x"]);
    f.unmount();
    ok(f.cmd("abort", &[]));
    let get = |k: &str| {
        let o = s
            .head(k)
            .unwrap()
            .unwrap_or_else(|| panic!("abort deleted {k}"));
        let r = ferryfs::store::s3::ObjectReader::new(s.clone(), o, 1 << 20);
        r.read_at(0, 1 << 20).unwrap()
    };
    assert_eq!(get("a"), b"hidden by the directory a/");
    assert_eq!(get("m"), b"hidden by the marker m/");
    assert_eq!(get("a/x"), b"in a");
    assert_eq!(get("a/z"), b"new in a");
    assert_eq!(get("f/y"), b"made through the view");
    // The view renamed the directory that hid `b`: OLD must not show a file the view did not.
    assert!(
        s.head("b").unwrap().is_none(),
        "a hidden object was left where the view showed nothing"
    );
    assert_eq!(get("c/x"), b"in b");
    assert!(s.head("b/x").unwrap().is_none(), "b/x was renamed to c/x");
    assert!(
        s.head("f").unwrap().is_none(),
        "the file removed through the view is still in the bucket"
    );
}

/// Abort into a bucket when names were reused through the view: a file renamed away and a new
/// one made at its name (log rotation), a directory renamed away and made again. Each renamed
/// entry still reads OLD's object at its old key, which abort also writes: OLD must end with
/// both, each with its own bytes, whatever order abort meets them in; and so when the abort is
/// killed (-9) part way, at several moments, and run again.
#[test]
fn abort_into_a_bucket_keeps_renamed_objects_whose_old_keys_were_reused() {
    for (i, kill_after_ms) in [None, Some(250), Some(400), Some(550), Some(700), Some(850)]
        .into_iter()
        .enumerate()
    {
        abort_with_reused_names(&format!("s3-old-reuse-{i}"), kill_after_ms);
    }
}

fn abort_with_reused_names(bucket: &str, kill_after_ms: Option<u64>) {
    let g = server();
    g.bucket(bucket);
    let s = store(bucket);
    let mut names = Vec::new();
    for i in 0..6 {
        names.push(format!("log{i}"));
        s.put(
            &format!("log{i}"),
            format!("old log {i}").into_bytes(),
            &PosixMeta::default(),
        )
        .unwrap();
    }
    s.put("data/x", b"old data".to_vec(), &PosixMeta::default())
        .unwrap();
    let mut f = Fixture::new();
    prepare(&f, &format!("s3://{bucket}"));
    f.mount_with(&f.mnt.clone(), &["--no-copy"]);
    for n in &names {
        fs::rename(f.v(n), f.v(&format!("{n}.1"))).unwrap();
        fs::write(f.v(n), format!("new {n}")).unwrap();
    }
    fs::rename(f.v("data"), f.v("data.old")).unwrap();
    fs::create_dir(f.v("data")).unwrap();
    fs::write(f.v("data/x"), b"new data").unwrap();
    f.unmount();
    if let Some(ms) = kill_after_ms {
        let mut first = std::process::Command::new(BIN)
            .arg("abort")
            .arg("--state")
            .arg(&f.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = first.kill();
        first.wait().unwrap();
    }
    // (A first abort the kill came too late for has finished: nothing to run again.)
    let phase = f.status_json()["phase"].clone();
    eprintln!(
        "{bucket}: phase {phase} after the first abort, keys {:?}",
        keys(g, bucket)
    );
    if phase != "aborted" {
        let out = ok(f.cmd("abort", &[]));
        assert!(out.contains("aborted"), "{out}");
        eprintln!("{bucket}: {}", out.lines().last().unwrap_or_default());
    }
    let get = |k: &str| {
        let o = s
            .head(k)
            .unwrap()
            .unwrap_or_else(|| panic!("{bucket}: {k} missing from OLD"));
        let r = ferryfs::store::s3::ObjectReader::new(s.clone(), o, 1 << 20);
        String::from_utf8(r.read_at(0, 1 << 20).unwrap()).unwrap()
    };
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            get(&format!("{n}.1")),
            format!("old log {i}"),
            "{bucket}: {n}.1"
        );
        assert_eq!(get(n), format!("new {n}"), "{bucket}: {n}");
    }
    assert_eq!(get("data.old/x"), "old data");
    assert_eq!(get("data/x"), "new data");
    // Nothing of the abort's own is left in the bucket.
    let left = keys(g, bucket);
    assert!(
        left.iter().all(|k| !k.starts_with(".ferryfs")),
        "{bucket}: {left:?}"
    );
    assert_eq!(f.status_json()["phase"], "aborted");
}

#[test]
fn refusals_say_what_is_wrong_and_create_nothing() {
    let g = server();
    g.bucket("s3-old-refuse");
    let f = Fixture::new();
    // A bucket that does not exist.
    let err = refused(try_prepare(
        "s3://no-such-bucket-here".as_ref(),
        f.new.as_os_str(),
        &f.state,
    ));
    assert!(err.contains("no-such-bucket-here"), "{err}");
    assert!(!f.state.exists(), "a failed prepare left a state dir");
    // An S3 NEW that holds objects: refused, even with --allow-nonempty-new.
    store("s3-old-refuse")
        .put("someone/else", b"x".to_vec(), &PosixMeta::default())
        .unwrap();
    let err = refused(ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        f.old.as_os_str(),
        "--new".as_ref(),
        "s3://s3-old-refuse".as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
        "--allow-nonempty-new".as_ref(),
    ]));
    assert!(err.contains("is not empty"), "{err}");
    // One bucket as both stores, NEW's prefix inside OLD's: refused.
    let err = refused(try_prepare(
        "s3://s3-old-refuse".as_ref(),
        "s3://s3-old-refuse/inside".as_ref(),
        &f.state,
    ));
    assert!(err.contains("must not contain one another"), "{err}");
    // A secret in the URL: refused, and not echoed.
    let err = refused(try_prepare(
        "s3://s3-old-refuse?secret_key=hunter2hunter2".as_ref(),
        f.new.as_os_str(),
        &f.state,
    ));
    assert!(err.contains("credentials never go in a store URL"), "{err}");
    assert!(!err.contains("hunter2"), "the secret was echoed: {err}");
    assert!(!f.state.exists());
}

#[test]
fn an_object_held_open_across_a_takeover_keeps_its_position_and_bytes() {
    use std::io::{Read, Seek, SeekFrom};
    let g = server();
    g.bucket("s3-old-takeover");
    let s = store("s3-old-takeover");
    let data = pattern((12 << 20) + 77, 5);
    s.put("held", data.clone(), &PosixMeta::default()).unwrap();
    let mut f = Fixture::new().over("dev");
    prepare(&f, "s3://s3-old-takeover");
    f.mount();
    let mut h = fs::File::open(f.v("held")).unwrap();
    let mut first = vec![0u8; 5 << 20];
    h.read_exact(&mut first).unwrap();
    assert!(first[..] == data[..5 << 20]);
    let before = f.daemon_pid().expect("a daemon serves");
    ok(f.try_mount(&f.mnt.clone(), &["--takeover"]));
    assert_ne!(f.daemon_pid(), Some(before), "the daemon was not replaced");
    // The same open file goes on where it was, then seeks back, with no error.
    let mut rest = Vec::new();
    h.read_to_end(&mut rest).unwrap();
    assert!(
        rest[..] == data[5 << 20..],
        "bytes after the takeover differ"
    );
    h.seek(SeekFrom::Start(1000)).unwrap();
    let mut again = vec![0u8; 4096];
    h.read_exact(&mut again).unwrap();
    assert!(again[..] == data[1000..1000 + 4096]);
    drop(h);
    f.unmount();
}

#[test]
fn abort_asked_of_the_mounted_daemon_writes_the_bucket_and_detaches_the_view() {
    let g = server();
    g.bucket("s3-old-abort-live");
    let s = store("s3-old-abort-live");
    for i in 0..5 {
        s.put(
            &format!("d/f{i}"),
            format!("object {i}").into_bytes(),
            &PosixMeta::default(),
        )
        .unwrap();
    }
    let mut f = Fixture::new();
    prepare(&f, "s3://s3-old-abort-live");
    f.mount_with(&f.mnt.clone(), &[]);
    fs::write(f.v("d/f0"), b"changed while mounted").unwrap();
    fs::remove_file(f.v("d/f1")).unwrap();
    let out = ok(f.cmd("abort", &[]));
    assert!(out.contains("detached"), "{out}");
    common::wait_for("the view to go", 30, || {
        ferryfs::fuse::mount::ferryfs_mount_at(&f.mnt).is_none()
    });
    assert_eq!(
        keys(g, "s3-old-abort-live"),
        ["d/", "d/f0", "d/f2", "d/f3", "d/f4"]
    );
    let o = s.head("d/f0").unwrap().unwrap();
    let r = ferryfs::store::s3::ObjectReader::new(s.clone(), o, 1 << 20);
    assert_eq!(r.read_at(0, 100).unwrap(), b"changed while mounted");
    assert_eq!(f.status_json()["phase"], "aborted");
}

#[test]
fn a_bucket_server_that_goes_away_mid_read_fails_reads_with_eio_and_the_daemon_stays_up() {
    use std::io::Read;
    // A server of this test's own, stopped half way; its keys go to the daemon's environment.
    let g2 = Garage::start();
    g2.bucket("s3-old-vanish");
    let src = tempfile::tempdir().unwrap();
    let data = pattern(24 << 20, 9);
    fs::write(src.path().join("big"), &data).unwrap();
    let up =
        common::run(
            g2.rclone()
                .args(["copy", src.path().to_str().unwrap(), "g:s3-old-vanish"]),
        );
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let f = Fixture::new();
    let with_env = |args: &[&OsStr]| {
        let mut c = std::process::Command::new(common::BIN);
        c.args(args);
        for (k, v) in g2.env() {
            c.env(k, v);
        }
        common::run(&mut c)
    };
    ok(with_env(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        "s3://s3-old-vanish".as_ref(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ]));
    ok(with_env(&[
        "mount".as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
        f.mnt.as_os_str(),
        "--no-copy".as_ref(),
    ]));
    fs::write(f.mnt.join("made-before"), b"in NEW").unwrap();
    let mut h = fs::File::open(f.mnt.join("big")).unwrap();
    let mut first = vec![0u8; 1 << 20];
    h.read_exact(&mut first).unwrap();
    assert!(first[..] == data[..1 << 20]);
    let pid = f.daemon_pid().expect("a daemon serves");
    drop(g2);
    let mut rest = Vec::new();
    let err = h
        .read_to_end(&mut rest)
        .expect_err("reads went on with the bucket's server gone");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(h);
    // The daemon is still there and the view still serves what NEW holds (past the kernel's
    // cache: every lookup below reaches the daemon). A new name needs OLD (does OLD hold it?):
    // it fails EIO rather than guess.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(f.daemon_pid(), Some(pid));
    fs::metadata(&f.mnt).expect("stat of the view's root with OLD gone");
    fs::write(f.mnt.join("made-before"), b"still writable").unwrap();
    assert_eq!(
        fs::read(f.mnt.join("made-before")).unwrap(),
        b"still writable"
    );
    let e = fs::write(f.mnt.join("made-after"), b"x").expect_err("a new name without OLD");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    ok(f.cmd("status", &[]));
    ok(ferryfs(&["unmount".as_ref(), f.mnt.as_os_str()]));
}

/// Copy-before-write by chunk out of a bucket (issue 25): a write into a big object copies
/// only the chunks it touches (ranged GETs), reads of the rest are ranged GETs too, the copier
/// fills the file in, commit leaves NEW exactly the view; an object replaced behind the view
/// while the file is partly copied fails its OLD chunks' reads (ETag-conditional GETs), and
/// abort into the bucket writes the view's bytes.
#[test]
fn a_write_into_a_big_object_copies_only_the_chunks_it_touches() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let g = server();
    g.bucket("s3-old-chunks");
    let s = store("s3-old-chunks");
    let mut model = pattern(3 << 20, 7);
    s.put("big", model.clone(), &PosixMeta::default()).unwrap();
    s.put("other", pattern(2 << 20, 3), &PosixMeta::default())
        .unwrap();
    let mut f = Fixture::new();
    ok(ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        "s3://s3-old-chunks".as_ref(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
        "--chunk-size".as_ref(),
        "256k".as_ref(),
    ]));
    f.mount();
    let w = fs::OpenOptions::new().write(true).open(f.v("big")).unwrap();
    w.write_all_at(b"written through the view", 1_000_000)
        .unwrap();
    drop(w);
    model[1_000_000..1_000_024].copy_from_slice(b"written through the view");
    let n = fs::metadata(f.new.join("big")).unwrap();
    assert_eq!(n.len(), 3 << 20);
    assert!(
        n.blocks() * 512 <= 2 * (256 << 10),
        "NEW holds {} bytes for one small write",
        n.blocks() * 512
    );
    assert!(fs::read(f.v("big")).unwrap() == model, "the view's bytes");
    assert_eq!(f.status_json()["partial"]["files"], 1);
    // `other`: partly copied, then replaced in the bucket behind the view.
    let w = fs::OpenOptions::new()
        .write(true)
        .open(f.v("other"))
        .unwrap();
    w.write_all_at(b"x", 0).unwrap();
    drop(w);
    s.put("other", pattern(2 << 20, 99), &PosixMeta::default())
        .unwrap();
    // Its chunks still in OLD read as the version the copy began at (what the reader
    // fetched at that ETag), or fail: never the new object's bytes.
    let r = fs::File::open(f.v("other")).unwrap();
    let mut buf = vec![0u8; 4096];
    match r.read_exact_at(&mut buf, 1 << 20) {
        Ok(()) => assert!(
            buf[..] == pattern(2 << 20, 3)[1 << 20..(1 << 20) + 4096],
            "a replaced object's chunk read showed other bytes"
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ESTALE | libc::EIO)),
            "a replaced object's chunk read: {e}"
        ),
    }
    drop(r);
    // (Its chunks still in OLD are lost: removing it through the view settles it.)
    fs::remove_file(f.v("other")).unwrap();
    assert_eq!(f.status_json()["partial"]["files"], 1);
    f.unmount();
    // Abort into the bucket: `big` is the view's bytes there.
    let out = ok(f.cmd("abort", &["--keep-new"]));
    println!("{out}");
    let o = s.head("big").unwrap().unwrap();
    let got = ferryfs::store::s3::ObjectReader::new(s.clone(), o, 1 << 20)
        .read_at(0, 4 << 20)
        .unwrap();
    assert!(got == model, "the bucket's `big` after abort");
}

/// The bytes of `s`'s object `key`, whole.
fn object_bytes(s: &Arc<S3Store>, key: &str) -> Vec<u8> {
    let o = s.head(key).unwrap().unwrap_or_else(|| panic!("no {key}"));
    let size = o.size as usize;
    ferryfs::store::s3::ObjectReader::new(s.clone(), o, 8 << 20)
        .read_at(0, size)
        .unwrap()
}

/// A bucket with an 80 MiB object `big` (five 16 MiB parts) and a 40 MiB `moved`, prepared
/// into the fixture with 1 MiB chunks and mounted; `big` written in parts 1 and 3, `moved`
/// written and renamed. Gives (OLD's store, `big`'s model, `moved`'s model).
fn partly_written_bucket(f: &mut Fixture, bucket: &str) -> (Arc<S3Store>, Vec<u8>, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    server().bucket(bucket);
    let s = store(bucket);
    let mut big = pattern(80 << 20, 13);
    s.put("big", big.clone(), &PosixMeta::default()).unwrap();
    let mut moved = pattern(40 << 20, 17);
    s.put("moved", moved.clone(), &PosixMeta::default())
        .unwrap();
    ok(ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        format!("s3://{bucket}").as_ref(),
        "--new".as_ref(),
        f.new.as_os_str(),
        "--state".as_ref(),
        f.state.as_os_str(),
        "--chunk-size".as_ref(),
        "1M".as_ref(),
    ]));
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy"]);
    let w = fs::OpenOptions::new().write(true).open(f.v("big")).unwrap();
    for at in [1_000_000usize, 40 << 20, (40 << 20) + 3_000_000] {
        w.write_all_at(&[9u8; 4096], at as u64).unwrap();
        big[at..at + 4096].fill(9);
    }
    drop(w);
    let w = fs::OpenOptions::new()
        .write(true)
        .open(f.v("moved"))
        .unwrap();
    w.write_all_at(b"moved", 5).unwrap();
    moved[5..10].copy_from_slice(b"moved");
    drop(w);
    fs::rename(f.v("moved"), f.v("renamed")).unwrap();
    assert_eq!(f.status_json()["partial"]["files"], 2);
    f.unmount();
    (s, big, moved)
}

/// Abort into an S3 OLD after scattered writes into a big object (issue 25): OLD's object is
/// rewritten in place by an upload whose unchanged parts the server copies from the object
/// itself, so only the parts holding the writes are sent (two of five here), and abort says
/// how many bytes it sent; a partly copied object renamed through the view is written whole
/// at its new key.
#[test]
fn abort_into_a_bucket_sends_only_the_changed_parts_of_a_partly_copied_object() {
    let mut f = Fixture::new();
    let (s, big, moved) = partly_written_bucket(&mut f, "s3-old-abort-parts");
    let out = ok(f.cmd("abort", &["--keep-new"]));
    assert!(
        out.contains("1 of them files partly copied")
            && out.contains(&format!("({} bytes sent into OLD", 32u64 << 20)),
        "{out}"
    );
    assert!(object_bytes(&s, "big") == big, "OLD's big after abort");
    assert!(
        object_bytes(&s, "renamed") == moved,
        "OLD's renamed after abort"
    );
    assert!(s.head("moved").unwrap().is_none(), "moved's old key stayed");
    assert!(s.unfinished_uploads().unwrap().is_empty());
}

/// An abort stopped right after its upload replaced OLD's object, before the journal said
/// so (the record still names the version the chunks were read at, marked as being
/// rewritten): the rerun takes the object for the view's and finishes, and one whose object
/// another client replaced meanwhile is refused, saying so, with nothing lost.
#[test]
fn an_abort_rerun_after_a_crash_at_the_end_of_an_upload_into_the_bucket_finishes() {
    let mut f = Fixture::new();
    let (s, big, _) = partly_written_bucket(&mut f, "s3-old-abort-crash");
    // The state a crash leaves between CompleteMultipartUpload and the journal's record.
    let mark = |on: bool| {
        let m = ferryfs::state::Migration::open(&f.state).unwrap();
        let mut b = ferryfs::journal::Batch::new();
        for (dev, ino, mut rec) in m.journal.partials().unwrap() {
            if rec.origin == b"big" {
                rec.abort_put = on;
                b.partial(dev, ino, &rec);
            }
        }
        m.journal.commit(b, true).unwrap();
    };
    mark(true);
    // Another client's bytes of another size: refused, OLD's object untouched.
    s.put("big", b"someone else".to_vec(), &PosixMeta::default())
        .unwrap();
    let err = refused(f.cmd("abort", &["--keep-new"]));
    assert!(err.contains("changed behind the migration"), "{err}");
    assert_eq!(object_bytes(&s, "big"), b"someone else");
    // The upload's own result: taken as written.
    s.put("big", big.clone(), &PosixMeta::default()).unwrap();
    let out = ok(f.cmd("abort", &["--keep-new"]));
    assert!(out.contains("1 of them files partly copied"), "{out}");
    assert!(object_bytes(&s, "big") == big, "OLD's big after the rerun");
}

/// A chmod of a big object still only in the bucket copies no data (issue 25): NEW gets a
/// partly copied file with no chunk in it, the mode shows at once and its bytes keep coming
/// from the bucket; the copier fills it in and commit keeps the mode.
#[test]
fn a_chmod_of_a_big_object_copies_no_data() {
    use std::os::unix::fs::MetadataExt;
    let g = server();
    g.bucket("s3-old-chmod");
    let s = store("s3-old-chmod");
    let model = pattern(24 << 20, 21);
    s.put("big", model.clone(), &PosixMeta::default()).unwrap();
    let mut f = Fixture::new();
    prepare(&f, "s3://s3-old-chmod");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy"]);
    fs::set_permissions(f.v("big"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(f.v("big")).unwrap().mode() & 0o7777, 0o600);
    let n = fs::metadata(f.new.join("big")).unwrap();
    assert_eq!(n.blocks(), 0, "a chmod copied {} bytes", n.blocks() * 512);
    assert_eq!(n.mode() & 0o7777, 0o600, "NEW's file has the mode");
    assert!(fs::read(f.v("big")).unwrap() == model, "the view's bytes");
    ok(f.cmd("execute", &["--wait"]));
    f.unmount();
    ok(f.cmd("commit", &[]));
    let n = fs::metadata(f.new.join("big")).unwrap();
    assert_eq!(n.mode() & 0o7777, 0o600);
    assert!(
        fs::read(f.new.join("big")).unwrap() == model,
        "NEW's bytes after commit"
    );
}
