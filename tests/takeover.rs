//! Restart without unmount (`mount --takeover`): a new daemon takes the live mount over from
//! the one serving it, while applications keep reading and writing through files they hold
//! open and paths they look up, with no error.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BIG: u64 = 8 << 20;

fn pattern(off: u64) -> u8 {
    (off.wrapping_mul(7) ^ (off >> 12)) as u8
}

fn big_file() -> Vec<u8> {
    (0..BIG).map(pattern).collect()
}

/// What the application threads saw.
#[derive(Default)]
struct Seen {
    errors: Mutex<Vec<String>>,
    reads: AtomicU64,
    writes: AtomicU64,
    stop: AtomicBool,
}

impl Seen {
    fn err(&self, what: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }
}

/// A reader holding OLD's big file open (served by the daemon: an OLD-only file under
/// `--passthrough new`), checking every byte it reads; it also opens, reads and closes the
/// writer's log (a NEW file the kernel passes through) and stats a tree of small files.
fn reader(mnt: PathBuf, seen: Arc<Seen>) {
    let big = match fs::File::open(mnt.join("big")) {
        Ok(f) => f,
        Err(e) => return seen.err(format!("open big: {e}")),
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut i: u64 = 0;
    while !seen.stop.load(Ordering::Relaxed) {
        i += 1;
        let off = (i * 7919 * 4096) % (BIG - buf.len() as u64);
        match big.read_at(&mut buf, off) {
            Ok(n) if n == buf.len() => {
                if let Some(bad) = (0..n).find(|&k| buf[k] != pattern(off + k as u64)) {
                    seen.err(format!("big: wrong byte at {}", off + bad as u64));
                }
            }
            Ok(n) => seen.err(format!("big: short read {n} at {off}")),
            Err(e) => seen.err(format!("read big at {off}: {e}")),
        }
        let small = mnt.join(format!("tree/f{}", i % 50));
        match fs::read(&small) {
            Ok(d) if d == format!("small {}", i % 50).as_bytes() => {}
            Ok(d) => seen.err(format!("{}: got {:?}", small.display(), d)),
            Err(e) => seen.err(format!("read {}: {e}", small.display())),
        }
        match fs::File::open(mnt.join("log")) {
            Ok(mut f) => {
                let mut s = String::new();
                if let Err(e) = f.read_to_string(&mut s) {
                    seen.err(format!("read log: {e}"));
                }
            }
            Err(e) => seen.err(format!("open log: {e}")),
        }
        seen.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// A writer appending numbered lines to a log it keeps open (fsync now and then), and
/// creating, renaming and removing files by path.
fn writer(mnt: PathBuf, seen: Arc<Seen>) -> u64 {
    let mut log = match fs::OpenOptions::new().append(true).open(mnt.join("log")) {
        Ok(f) => f,
        Err(e) => {
            seen.err(format!("open log for append: {e}"));
            return 0;
        }
    };
    let mut n = 0u64;
    while !seen.stop.load(Ordering::Relaxed) {
        if let Err(e) = writeln!(log, "line {n}") {
            seen.err(format!("append line {n}: {e}"));
            break;
        }
        n += 1;
        if n % 16 == 0
            && let Err(e) = log.sync_data()
        {
            seen.err(format!("fsync log: {e}"));
        }
        let tmp = mnt.join(format!("w/tmp{}", n % 8));
        let done = mnt.join(format!("w/done{}", n % 8));
        if let Err(e) = fs::write(&tmp, n.to_string()) {
            seen.err(format!("create {}: {e}", tmp.display()));
        } else if let Err(e) = fs::rename(&tmp, &done) {
            seen.err(format!("rename to {}: {e}", done.display()));
        } else if n % 3 == 0
            && let Err(e) = fs::remove_file(&done)
        {
            seen.err(format!("remove {}: {e}", done.display()));
        }
        seen.writes.fetch_add(1, Ordering::Relaxed);
    }
    n
}

/// Start the reader and the writer on the view of `f` (its `w/` and `log` must exist).
fn start_load(
    f: &Fixture,
    seen: &Arc<Seen>,
) -> (std::thread::JoinHandle<()>, std::thread::JoinHandle<u64>) {
    let (m, s) = (f.mnt.clone(), seen.clone());
    let r = std::thread::spawn(move || reader(m, s));
    let (m, s) = (f.mnt.clone(), seen.clone());
    let w = std::thread::spawn(move || writer(m, s));
    (r, w)
}

fn takeover(f: &Fixture, mp: &Path) -> std::process::Output {
    f.try_mount(mp, &["--takeover"])
}

fn fill_old(f: &Fixture) {
    fs::write(f.old.join("big"), big_file()).unwrap();
    fs::create_dir(f.old.join("tree")).unwrap();
    for i in 0..50 {
        fs::write(f.old.join(format!("tree/f{i}")), format!("small {i}")).unwrap();
    }
}

#[test]
fn a_reader_and_a_writer_keep_going_across_three_daemon_restarts_over_dev() {
    a_reader_and_a_writer_keep_going_across_three_daemon_restarts("dev");
}

#[test]
fn a_reader_and_a_writer_keep_going_across_three_daemon_restarts_over_io_uring() {
    a_reader_and_a_writer_keep_going_across_three_daemon_restarts("uring");
}

fn a_reader_and_a_writer_keep_going_across_three_daemon_restarts(transport: &'static str) {
    let mut f = Fixture::new().over(transport);
    fill_old(&f);
    f.prepare();
    // The copier runs, slowly, so each handover also finds a copy under way.
    f.mount_with(&f.mnt.clone(), &["--bwlimit", "4M"]);
    fs::create_dir(f.v("w")).unwrap();
    fs::write(f.v("log"), b"").unwrap();
    let seen = Arc::new(Seen::default());
    let (r, w) = start_load(&f, &seen);
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        let before = f.daemon_pid().expect("a daemon serves");
        let (r0, w0) = (
            seen.reads.load(Ordering::Relaxed),
            seen.writes.load(Ordering::Relaxed),
        );
        let t = Instant::now();
        let out = takeover(&f, &f.mnt);
        assert!(
            out.status.success(),
            "round {round}: mount --takeover failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let took = t.elapsed();
        wait_for("the old daemon to exit", 10, || process_gone(before));
        f.assert_transport();
        f.assert_transport();
        let after = f.daemon_pid().expect("the new daemon serves");
        assert_ne!(after, before, "round {round}: a new daemon serves");
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            seen.reads.load(Ordering::Relaxed) > r0 && seen.writes.load(Ordering::Relaxed) > w0,
            "round {round}: the applications made no progress after the takeover"
        );
        eprintln!("round {round}: takeover took {took:?}");
    }
    seen.stop.store(true, Ordering::Relaxed);
    r.join().unwrap();
    let lines = w.join().unwrap();
    let errors = seen.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors across the restarts: {errors:#?}");
    // Every acknowledged append is in the log, in order, once.
    let log = fs::read_to_string(f.v("log")).unwrap();
    let want: String = (0..lines).map(|n| format!("line {n}\n")).collect();
    assert!(
        log == want,
        "the log lost or doubled writes: {} lines, want {lines}",
        log.lines().count()
    );
    assert_eq!(fs::read(f.v("big")).unwrap(), big_file());
    // The migration goes on under the last daemon, and it still unmounts cleanly.
    let st = f.status_json();
    assert_eq!(st["mounted"], true, "{st}");
    f.unmount();
    assert_eq!(fs::read_to_string(f.new.join("log")).unwrap(), want);
}

#[test]
fn files_held_open_across_a_takeover_keep_their_position_and_data_over_dev() {
    files_held_open_across_a_takeover_keep_their_position_and_data("dev");
}

#[test]
fn files_held_open_across_a_takeover_keep_their_position_and_data_over_io_uring() {
    files_held_open_across_a_takeover_keep_their_position_and_data("uring");
}

fn files_held_open_across_a_takeover_keep_their_position_and_data(transport: &'static str) {
    let mut f = Fixture::new().over(transport);
    fill_old(&f);
    f.start();
    // Open before: a read-only OLD file (through the daemon), a NEW file open for writing
    // (passthrough), and a directory listing in progress.
    let mut old = fs::File::open(f.v("big")).unwrap();
    let mut head = vec![0u8; 4096];
    old.read_exact(&mut head).unwrap();
    let mut new = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(f.v("held"))
        .unwrap();
    new.write_all(b"before ").unwrap();
    let cwd_dir = f.v("tree");
    let before = f.daemon_pid().unwrap();
    ok(takeover(&f, &f.mnt));
    wait_for("the old daemon to exit", 10, || process_gone(before));
    f.assert_transport();
    // The same open files go on where they were.
    let mut next = vec![0u8; 4096];
    old.read_exact(&mut next).unwrap();
    assert!(
        next.iter()
            .enumerate()
            .all(|(k, b)| *b == pattern(4096 + k as u64))
    );
    new.write_all(b"after").unwrap();
    new.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    new.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before after");
    // A second open of the same file joins the inherited backing file.
    assert_eq!(fs::read(f.v("held")).unwrap(), b"before after");
    drop(new);
    assert_eq!(fs::read(f.v("held")).unwrap(), b"before after");
    assert_eq!(names(&cwd_dir).len(), 50);
    // A file removed while open stays readable through its handle.
    let mut doomed = fs::File::open(f.v("tree/f1")).unwrap();
    fs::remove_file(f.v("tree/f1")).unwrap();
    let before = f.daemon_pid().unwrap();
    ok(takeover(&f, &f.mnt));
    wait_for("the old daemon to exit", 10, || process_gone(before));
    f.assert_transport();
    let mut s = String::new();
    doomed.read_to_string(&mut s).unwrap();
    assert_eq!(s, "small 1");
    assert!(!f.v("tree/f1").exists());
    drop((old, doomed));
    f.unmount();
}

#[test]
fn a_refused_takeover_leaves_the_old_daemon_serving_without_errors_over_dev() {
    a_refused_takeover_leaves_the_old_daemon_serving_without_errors("dev");
}

#[test]
fn a_refused_takeover_leaves_the_old_daemon_serving_without_errors_over_io_uring() {
    a_refused_takeover_leaves_the_old_daemon_serving_without_errors("uring");
}

fn a_refused_takeover_leaves_the_old_daemon_serving_without_errors(transport: &'static str) {
    let mut f = Fixture::new().over(transport);
    fill_old(&f);
    f.start();
    fs::write(f.v("log"), b"").unwrap();
    fs::create_dir(f.v("w")).unwrap();
    let seen = Arc::new(Seen::default());
    let (r, w) = start_load(&f, &seen);
    std::thread::sleep(Duration::from_millis(200));
    let pid = f.daemon_pid().unwrap();
    // The wrong mountpoint is found only once the old daemon has parked its requests: it must
    // queue them again for itself and go on.
    let elsewhere = f.root.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    for _ in 0..2 {
        let out = takeover(&f, &elsewhere);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not") && err.contains("keeps serving"),
            "unclear refusal: {err}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.daemon_pid(), Some(pid), "the old daemon serves on");
    f.assert_transport();
    let r0 = seen.reads.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert!(seen.reads.load(Ordering::Relaxed) > r0, "reads stalled");
    seen.stop.store(true, Ordering::Relaxed);
    r.join().unwrap();
    w.join().unwrap();
    let errors = seen.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors: {errors:#?}");
    f.unmount();
}

#[test]
fn a_takeover_while_the_health_probe_statfs_is_in_flight_ends_the_old_daemon_over_dev() {
    a_takeover_while_the_health_probe_statfs_is_in_flight_ends_the_old_daemon("dev");
}

#[test]
fn a_takeover_while_the_health_probe_statfs_is_in_flight_ends_the_old_daemon_over_io_uring() {
    a_takeover_while_the_health_probe_statfs_is_in_flight_ends_the_old_daemon("uring");
}

fn a_takeover_while_the_health_probe_statfs_is_in_flight_ends_the_old_daemon(
    transport: &'static str,
) {
    // The daemon's own health probe makes requests through its mount. One parked by the old
    // daemon held its exit for ever (a thread waiting on a FUSE request already read cannot
    // be killed), the new daemon waited for that exit, and the mount hung. A probe that never
    // rests is in flight at nearly every handover.
    let mut f = Fixture::new().over(transport);
    fill_old(&f);
    f.prepare();
    let mount = |f: &Fixture, takeover: bool, restless: bool| {
        let mut args = vec!["--no-copy", "--metrics-addr", "127.0.0.1:0"];
        if takeover {
            args.push("--takeover");
        }
        let env: &[(&str, &str)] = if restless {
            &[("FERRYFS_PROBE_INTERVAL_MS", "0")]
        } else {
            &[]
        };
        f.try_mount_env(&f.mnt, &args, env)
    };
    ok(mount(&f, false, true));
    // The last daemon probes every 2 s again: a probe that never rests keeps the mount busy
    // for `unmount`.
    for round in 0..7 {
        let before = f.daemon_pid().expect("a daemon serves");
        let t = Instant::now();
        let out = mount(&f, true, round < 6);
        assert!(
            out.status.success(),
            "round {round}: mount --takeover failed after {:?}: {}",
            t.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("the old daemon to exit", 10, || process_gone(before));
        f.assert_transport();
        f.assert_transport();
        assert_eq!(fs::read(f.v("tree/f3")).unwrap(), b"small 3");
        eprintln!("round {round}: takeover took {:?}", t.elapsed());
    }
    f.unmount();
}

#[test]
fn takeover_with_no_daemon_serving_says_so() {
    let f = Fixture::new();
    f.prepare();
    let out = takeover(&f, &f.mnt);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no daemon") && err.contains("without --takeover"),
        "unclear error: {err}"
    );
}

#[test]
fn a_takeover_started_from_a_shell_holding_view_files_does_not_keep_them_open_over_dev() {
    a_takeover_started_from_a_shell_holding_view_files_does_not_keep_them_open("dev");
}

#[test]
fn a_takeover_started_from_a_shell_holding_view_files_does_not_keep_them_open_over_io_uring() {
    a_takeover_started_from_a_shell_holding_view_files_does_not_keep_them_open("uring");
}

fn a_takeover_started_from_a_shell_holding_view_files_does_not_keep_them_open(
    transport: &'static str,
) {
    let mut f = Fixture::new().over(transport);
    fill_old(&f);
    f.start();
    let before = f.daemon_pid().unwrap();
    // The shell's fds 3 and 4 are files in the view, not close-on-exec: a daemon that kept
    // them would hold the mount busy for its whole life.
    let script = format!(
        "exec 3<'{mnt}/big' 4>>'{mnt}/log'; '{bin}' mount --state '{state}' '{mnt}' -o allow_other --takeover",
        mnt = f.mnt.display(),
        bin = BIN,
        state = f.state.display()
    );
    ok(run(std::process::Command::new("sh").args(["-c", &script])));
    wait_for("the old daemon to exit", 10, || process_gone(before));
    f.assert_transport();
    f.unmount();
}
