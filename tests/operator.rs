//! The operator's controls (issue 27): filters, the dry run.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;

fn assert_ok(o: std::process::Output) -> String {
    let t = out_text(&o);
    assert!(o.status.success(), "{t}");
    t
}

/// OLD's tree with the cases rsync's rules trip people on.
fn filter_tree(old: &Path) {
    for p in [
        "keep.txt",
        "drop.tmp",
        "sub/drop.tmp",
        "sub/keep.tmp",
        "build/a",
        "build/b/c",
        "src/build/x",
        "a/cache/f",
        "b/cache",
        "logs/x.log",
        "logs/deep/y.log",
        "logs/keep.txt",
        "other/logs/z.log",
        "dir x/with space.bin",
        "dir x/nospace.bin",
    ] {
        write(&old.join(p), p.as_bytes());
    }
    write(&old.join(OsStr::from_bytes(b"caf\xe9.dat")), b"dropped");
    write(&old.join(OsStr::from_bytes(b"caf\xe9-keep")), b"kept");
}

/// The rules, in command-line order: an include before the exclude it overrides, anchored
/// and unanchored, `**`, a directory-only pattern, a name with a space, and a rules file
/// with bytes that are not UTF-8.
fn filter_args(dir: &Path) -> Vec<std::ffi::OsString> {
    let rules = dir.join("rules");
    fs::write(&rules, b"# bytes, not UTF-8\n+ caf\xe9-keep\n- caf\xe9*\n").unwrap();
    let mut v: Vec<std::ffi::OsString> = Vec::new();
    for (flag, pat) in [
        ("--include", "keep.tmp"),
        ("--exclude", "*.tmp"),
        ("--exclude", "/build/"),
        ("--exclude", "cache/"),
        ("--exclude", "logs/**.log"),
        ("--exclude", "with space*"),
    ] {
        v.push(flag.into());
        v.push(pat.into());
    }
    v.push("--filter-from".into());
    v.push(rules.into_os_string());
    v
}

const KEPT: &[&str] = &[
    "a",
    "b",
    "b/cache",
    "caf\u{fffd}-keep",
    "dir x",
    "dir x/nospace.bin",
    "keep.txt",
    "logs",
    "logs/deep",
    "logs/keep.txt",
    "other",
    "other/logs",
    "src",
    "src/build",
    "src/build/x",
    "sub",
    "sub/keep.tmp",
];

fn names_of(root: &Path) -> Vec<String> {
    manifest(root, false)
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn filters_leave_exactly_the_excluded_entries_out_and_commit_asks_first() {
    let mut f = Fixture::new();
    filter_tree(&f.old);
    let args = filter_args(f.root.path());
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let out = assert_ok(f.cmd_prepare_with(&args));
    assert!(out.contains("(10 dirs, 7 files,"), "{out}");
    assert!(
        out.contains("it leaves out 3 dirs, 10 files"),
        "prepare counts what the filter leaves out: {out}"
    );
    let st = f.status_json();
    assert_eq!(st["excluded"]["files"], 10, "{st}");
    assert_eq!(st["excluded"]["dirs"], 3, "{st}");
    assert_eq!(st["filter"][0], "+ keep.tmp", "{st}");
    assert_eq!(st["filter"].as_array().unwrap().len(), 8, "{st}");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    assert_ok(f.cmd("execute", &["--wait"]));
    // The view still shows what the filter leaves out, from OLD.
    assert_eq!(fs::read(f.v("drop.tmp")).unwrap(), b"drop.tmp");
    assert_eq!(fs::read(f.v("build/b/c")).unwrap(), b"build/b/c");
    // An application's write to an excluded file is the application's: it stays.
    fs::write(f.v("sub/drop.tmp"), b"written through the view").unwrap();
    assert!(
        !f.new.join("drop.tmp").exists(),
        "the copier copied an excluded file"
    );
    assert!(
        !f.new.join("build").exists(),
        "the copier copied an excluded directory"
    );
    let st = f.status_json();
    assert_eq!(st["files"]["done"], st["files"]["total"], "{st}");
    assert_ok(f.cmd("verify", &["--checksum"]));
    let o = f.cmd("commit", &[]);
    let text = out_text(&o);
    assert!(
        !o.status.success(),
        "commit went ahead without --yes: {text}"
    );
    assert!(
        text.contains("--yes") && text.contains("10 files"),
        "commit says what leaves the view: {text}"
    );
    let out = assert_ok(f.cmd("commit", &["--yes"]));
    assert!(out.contains("left out are no longer in the view"), "{out}");
    f.unmount();
    let mut want: Vec<String> = KEPT.iter().map(|s| s.to_string()).collect();
    want.push("sub/drop.tmp".into());
    want.sort();
    assert_eq!(names_of(&f.new), want, "NEW after commit");
    assert_eq!(
        fs::read(f.new.join("sub/drop.tmp")).unwrap(),
        b"written through the view"
    );
    assert_eq!(
        fs::read(f.new.join(OsStr::from_bytes(b"caf\xe9-keep"))).unwrap(),
        b"kept"
    );
    // OLD keeps everything.
    assert!(f.old.join("build/b/c").exists() && f.old.join("drop.tmp").exists());
}

#[test]
fn a_bad_pattern_or_rules_file_is_refused_before_anything_is_made() {
    let f = Fixture::new();
    write(&f.old.join("a"), b"a");
    let o = f.cmd_prepare_with(&["--exclude".as_ref(), "[abc".as_ref()]);
    assert!(!o.status.success());
    assert!(out_text(&o).contains("[abc"), "{}", out_text(&o));
    let rules = f.root.path().join("rules");
    fs::write(&rules, "*.tmp\n").unwrap();
    let o = f.cmd_prepare_with(&["--filter-from".as_ref(), rules.as_os_str()]);
    assert!(!o.status.success());
    assert!(out_text(&o).contains("line 1"), "{}", out_text(&o));
    assert!(!f.state.exists(), "a refused prepare made the state dir");
}

#[test]
fn a_dry_run_reports_what_would_move_and_changes_nothing_anywhere() {
    let f = Fixture::new();
    filter_tree(&f.old);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        f.old.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod (tests run as root)");
    fs::create_dir(&f.state).unwrap();
    let args = filter_args(f.root.path());
    let before = (
        full_manifest(&f.old),
        full_manifest(&f.new),
        full_manifest(&f.state),
    );
    let mut a: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    a.push("--dry-run".as_ref());
    let out = assert_ok(f.cmd_prepare_with(&a));
    let after = (
        full_manifest(&f.old),
        full_manifest(&f.new),
        full_manifest(&f.state),
    );
    assert!(
        before.0 == after.0,
        "OLD changed: {}",
        diff(&before.0, &after.0)
    );
    assert!(
        before.1 == after.1,
        "NEW changed: {}",
        diff(&before.1, &after.1)
    );
    assert!(
        before.2 == after.2,
        "state dir changed: {}",
        diff(&before.2, &after.2)
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert!(out.contains("would move: 10 dirs, 8 files"), "{out}");
    assert!(out.contains("left out: 3 dirs, 10 files"), "{out}");
    assert!(out.contains("device files: 1"), "{out}");
    assert!(out.contains("NEW could not hold: nothing"), "{out}");
    // Without a filter everything moves; prepare itself then proceeds as usual.
    let out = assert_ok(f.cmd_prepare_with(&["--dry-run".as_ref()]));
    assert!(out.contains("would move: 13 dirs, 18 files"), "{out}");
    assert!(out.contains("filter: none"), "{out}");
    assert!(fs::read_dir(&f.state).unwrap().next().is_none());
}

/// Bytes copied per second over `secs`, from status.
fn copy_rate(f: &Fixture, secs: f64) -> f64 {
    let done = |f: &Fixture| f.status_json()["bytes"]["done"].as_u64().unwrap() as f64;
    let (b0, t0) = (done(f), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    (done(f) - b0) / t0.elapsed().as_secs_f64()
}

#[test]
fn a_bandwidth_timetable_set_while_running_changes_the_copy_rate() {
    let mut f = Fixture::new();
    for i in 0..96 {
        write(&f.old.join(format!("f{i:03}")), &vec![7u8; 256 << 10]);
    }
    f.prepare();
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--bwlimit", "1M", "--workers", "2"]);
    let st = f.status_json();
    assert_eq!(st["bwlimit"]["in_force"], 1 << 20, "{st}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let slow = copy_rate(&f, 3.0);
    // A timetable whose every entry is 4M: in force whatever the time.
    let out = assert_ok(f.cmd("limits", &["--bwlimit", "00:00,4M 12:00,4M"]));
    assert!(out.contains("limits set"), "{out}");
    let st = f.status_json();
    assert_eq!(st["bwlimit"]["in_force"], 4 << 20, "{st}");
    assert_eq!(st["bwlimit"]["timetable"], "00:00,4M 12:00,4M", "{st}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let fast = copy_rate(&f, 3.0);
    eprintln!("copy rate at 1M: {slow:.0} B/s; under the 4M timetable: {fast:.0} B/s");
    assert!(
        slow > 0.5 * (1 << 20) as f64 && slow < 1.6 * (1 << 20) as f64,
        "at 1M the copier moved {slow:.0} B/s"
    );
    assert!(
        fast > 2.0 * slow,
        "the timetable's 4M did not raise the rate: {slow:.0} B/s, then {fast:.0} B/s"
    );
    // A bad timetable is refused, naming the entry; the limit stays.
    let o = f.cmd("limits", &["--bwlimit", "25:00,1M"]);
    assert!(!o.status.success());
    assert!(out_text(&o).contains("25:00,1M"), "{}", out_text(&o));
    assert_eq!(f.status_json()["bwlimit"]["in_force"], 4 << 20);
    f.unmount();
}

/// The records of `ferryfs report --format jsonl`, by path.
fn report_records(f: &Fixture) -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = assert_ok(f.cmd("report", &[]));
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["path"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rewrite NEW's file behind ferryfs's back with other bytes of the same size, its times
/// kept (only a checksum sees it).
fn corrupt_keeping_times(p: &Path, data: &[u8]) {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(p).unwrap();
    fs::write(p, data).unwrap();
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec(),
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec(),
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, p, &ts, rustix::fs::AtFlags::empty()).unwrap();
}

#[test]
fn the_report_gives_every_entry_its_origin_fingerprint_checksum_and_verdict() {
    let mut f = Fixture::new();
    for p in ["a", "b", "c", "d", "e", "x.tmp", "dir/f"] {
        write(&f.old.join(p), format!("{p} from OLD").as_bytes());
    }
    write(&f.old.join(OsStr::from_bytes(b"caf\xe9")), b"bytes");
    write(&f.old.join("h1"), b"one file, two names");
    fs::hard_link(f.old.join("h1"), f.old.join("h2")).unwrap();
    let out = assert_ok(f.cmd_prepare_with(&["--exclude".as_ref(), "*.tmp".as_ref()]));
    assert!(out.contains("it leaves out 0 dirs, 1 files"), "{out}");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    assert_ok(f.cmd("execute", &["--wait"]));
    // Through the view: a rename, a write, a removal, a new file.
    fs::rename(f.v("b"), f.v("b2")).unwrap();
    fs::write(f.v("c"), b"c written through the view").unwrap();
    fs::remove_file(f.v("d")).unwrap();
    fs::write(f.v("n"), b"born in the view").unwrap();
    // Behind the view: OLD changes `e` (copied again); NEW's `a` loses its bytes.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(f.old.join("e"), b"e changed in OLD").unwrap();
    assert_ok(f.cmd("execute", &["--wait"]));
    corrupt_keeping_times(&f.new.join("a"), b"XXXXXXXXXX");
    let o = f.cmd("verify", &["--checksum"]);
    assert!(
        !o.status.success(),
        "verify missed a corrupted copy: {}",
        out_text(&o)
    );
    let r = report_records(&f);
    let get = |p: &str| {
        r.get(p)
            .unwrap_or_else(|| panic!("no record for {p}: {:?}", r.keys().collect::<Vec<_>>()))
    };
    let a = get("a");
    assert_eq!(a["origin"], "copied");
    assert_eq!(a["type"], "file");
    assert_eq!(a["verdict"], "mismatch", "{a}");
    assert!(
        a["detail"].as_str().unwrap().contains("content differs"),
        "{a}"
    );
    assert!(a["old_fingerprint"]["ino"].as_u64().unwrap() > 0, "{a}");
    assert!(a.get("sha256").is_none(), "{a}");
    let b2 = get("b2");
    assert_eq!(
        (&b2["origin"], &b2["from"]),
        (&"renamed".into(), &"b".into()),
        "{b2}"
    );
    assert_eq!(get("c")["origin"], "written");
    let d = get("d");
    assert_eq!(
        (&d["origin"], &d["type"]),
        (&"removed".into(), &"file".into()),
        "{d}"
    );
    assert_eq!(get("e")["origin"], "copied_again");
    assert_eq!(get("e")["size"], 16);
    assert_eq!(get("x.tmp")["origin"], "excluded");
    assert_eq!(get("n")["origin"], "born");
    assert_eq!(get("dir")["type"], "dir");
    let df = get("dir/f");
    assert_eq!(df["origin"], "copied");
    assert_eq!(df["verdict"], "ok");
    assert_eq!(df["sha256"], sha256_hex(b"dir/f from OLD"), "{df}");
    assert!(df["at"].as_u64().unwrap() > 0, "{df}");
    let cafe = get("caf\\xe9");
    assert_eq!(cafe["origin"], "copied", "{cafe}");
    // OLD's hard links: one copy, both names copied (not renamed).
    assert_eq!(
        (&get("h1")["origin"], &get("h2")["origin"]),
        (&"copied".into(), &"copied".into())
    );
    assert_eq!(r.len(), 13, "{:?}", r.keys().collect::<Vec<_>>());
    // CSV: a header, then one row an entry.
    let csv = assert_ok(f.cmd("report", &["--format", "csv"]));
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("path,type,size,origin"));
    assert_eq!(lines.count(), 13, "{csv}");
    // Into a file.
    let file = f.root.path().join("report.jsonl");
    assert_ok(f.cmd("report", &["--output", file.to_str().unwrap()]));
    assert_eq!(fs::read_to_string(&file).unwrap().lines().count(), 13);
    // Put `a` right (OLD's bytes, through the copier's own recopy of a lost copy is not
    // needed: the bytes are OLD's again), verify, commit: the manifest holds the same records.
    corrupt_keeping_times(&f.new.join("a"), b"a from OLD");
    assert_ok(f.cmd("verify", &["--checksum"]));
    let before = report_records(&f);
    assert_eq!(before["a"]["verdict"], "ok");
    assert_eq!(before["a"]["sha256"], sha256_hex(b"a from OLD"));
    let out = assert_ok(f.cmd("commit", &["--yes"]));
    assert!(
        out.contains("manifest.jsonl"),
        "commit names the manifest: {out}"
    );
    let after = report_records(&f);
    assert_eq!(
        before, after,
        "the report after commit is the manifest commit wrote"
    );
    f.unmount();
}
