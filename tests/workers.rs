//! The copier across many machines (issue 26): a mount daemon coordinating remote workers
//! (`mount --workers-listen`), four `ferryfs worker` processes started as a Kubernetes
//! Indexed Job starts them (`JOB_COMPLETION_INDEX`), against real FUSE mounts and a real
//! journal: exact results, kill -9 of a worker and of the coordinator, the view's writes
//! winning over a worker's copy, and refusals of bad requests.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ferryfs::store::s3::{PosixMeta, S3Store, S3Url};

/// OLD's dataset: `small` files over 30 directories, a few of some MiB, xattrs and owners.
fn dataset(old: &Path, small: usize) {
    for i in 0..small {
        let d = old.join(format!("d{:02}/e{}", i % 30, i % 4));
        fs::create_dir_all(&d).unwrap();
        let len = 1 + (i * 7919) % 5000;
        let data: Vec<u8> = (0..len).map(|j| (i + j * 31) as u8).collect();
        fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    for (i, mib) in [3usize, 5, 9].into_iter().enumerate() {
        let data: Vec<u8> = (0..mib << 20).map(|j| (j * 13 + i) as u8).collect();
        write(&old.join(format!("big/b{i}.bin")), &data);
    }
    let owned = old.join("owned.txt");
    fs::write(&owned, b"owned").unwrap();
    std::os::unix::fs::chown(&owned, Some(1234), Some(5678)).unwrap();
    rustix::fs::setxattr(
        &owned,
        "user.note",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

/// A token file in the fixture.
fn token(f: &Fixture) -> PathBuf {
    let p = f.root.path().join("token");
    let t = ok(ferryfs(&["workers-token".as_ref()]));
    assert!(t.trim().len() >= 43, "a 256-bit token: {t:?}");
    fs::write(&p, t).unwrap();
    p
}

/// Mount with the coordinator at `port`, the copier off until `execute`.
fn mount_coordinator(f: &mut Fixture, port: u16, token: &Path, extra: &[&str]) {
    mount_coordinator_env(f, port, token, extra, &[]);
}

/// [`mount_coordinator`] with environment variables for the daemon.
fn mount_coordinator_env(
    f: &mut Fixture,
    port: u16,
    token: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) {
    let addr = format!("127.0.0.1:{port}");
    let mnt = f.mnt.clone();
    let mut args = vec![
        "--no-copy",
        "--workers-listen",
        &addr,
        "--workers-token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    f.mount_env(&mnt, &args, env);
}

/// A worker process, as an Indexed Job's pod `index` runs it; its log in the fixture.
fn worker(f: &Fixture, port: u16, token: &Path, index: u32, extra: &[&str]) -> Child {
    let log = fs::File::create(f.root.path().join(format!("worker-{index}.log"))).unwrap();
    Command::new(BIN)
        .args([
            "worker",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "--token-file",
            token.to_str().unwrap(),
        ])
        .args(extra)
        .env("JOB_COMPLETION_INDEX", index.to_string())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn worker_log(f: &Fixture, index: u32) -> String {
    fs::read_to_string(f.root.path().join(format!("worker-{index}.log"))).unwrap_or_default()
}

/// Wait for a worker to exit by itself; its exit status.
fn wait_exit(f: &Fixture, c: &mut Child, index: u32, secs: u64) -> std::process::ExitStatus {
    wait_child(c, secs).unwrap_or_else(|| {
        let _ = c.kill();
        panic!("worker {index} did not exit: {}", worker_log(f, index))
    })
}

/// Wait for the workers `ws` (indexes from 0) to exit 0 by themselves, then check that
/// together they copied `files` files, each once, spread over at least `spread` of them:
/// the workers' status.
fn all_copied(
    f: &Fixture,
    ws: &mut [Child],
    files: u64,
    spread: usize,
) -> Vec<(String, u64, u64, u64)> {
    for (i, w) in ws.iter_mut().enumerate() {
        let st = wait_exit(f, w, i as u32, 120);
        assert!(
            st.success(),
            "worker {i}: {st}: {}",
            worker_log(f, i as u32)
        );
    }
    let ws = workers_status(f);
    println!("workers: {ws:?}");
    let copied: u64 = ws.iter().map(|w| w.1).sum();
    assert_eq!(copied, files, "files copied by workers, once each: {ws:?}");
    assert!(
        ws.iter().filter(|w| w.1 > 0).count() >= spread,
        "the work was spread: {ws:?}"
    );
    ws
}

/// The workers' entries in `status --json`, by id: (files, batches, refused).
fn workers_status(f: &Fixture) -> Vec<(String, u64, u64, u64)> {
    let st = f.status_json();
    st["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in status: {st}"))
        .iter()
        .map(|w| {
            (
                w["id"].as_str().unwrap().to_string(),
                w["files"].as_u64().unwrap(),
                w["batches"].as_u64().unwrap(),
                w["refused"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn files_in(root: &Path) -> u64 {
    manifest(root, false)
        .values()
        .filter(|e| e.kind == "file")
        .count() as u64
}

/// Four workers copy the whole dataset, its big files by ranges (several workers each); the
/// result is exact after commit, every file was copied by a worker exactly once, and the
/// workers exit 0 once the copy is done.
#[test]
fn four_workers_copy_a_posix_migration_exactly() {
    let mut f = Fixture::new();
    dataset(&f.old, 3000);
    let old_before = full_manifest(&f.old);
    let files = files_in(&f.old);
    f.prepare();
    let port = free_port();
    let t = token(&f);
    let metrics = free_port();
    let addr = format!("127.0.0.1:{metrics}");
    // (Ranges of 1 MiB: the dataset's big files, of 3 to 9 MiB, are copied by ranges.)
    mount_coordinator_env(
        &mut f,
        port,
        &t,
        &["--metrics-addr", &addr],
        &[("FERRYFS_RANGE_BYTES", "1048576")],
    );
    let mut ws: Vec<Child> = (0..4).map(|i| worker(&f, port, &t, i, &[])).collect();
    wait_for("four workers to say hello", 30, || {
        workers_status(&f).len() == 4
    });
    ok(f.cmd("execute", &["--wait"]));
    let ws = all_copied(&f, &mut ws, files, 2);
    assert!(ws.iter().any(|w| w.0 == "index-3"), "{ws:?}");
    // The big files went by ranges, to several workers.
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert_eq!(
        log.matches("a big file copied by ranges").count(),
        3,
        "{log}"
    );
    // /metrics: each worker's counts, labelled by its id; the coordinator's totals.
    let m = parse_metrics(&http_get(metrics, "/metrics").expect("/metrics answers").1);
    let by_worker: f64 = (0..4)
        .map(|i| m[&format!("ferryfs_worker_files_total{{worker=\"index-{i}\"}}")])
        .sum();
    assert_eq!(by_worker as u64, files, "{m:?}");
    assert!(m["ferryfs_workers_handed_out_total"] as u64 >= files);
    assert_eq!(m["ferryfs_workers_leased_files"], 0.0);
    let view = full_manifest(&f.mnt);
    assert!(view == old_before, "{}", diff(&old_before, &view));
    let out = ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    ok(f.cmd("commit", &[]));
    f.unmount();
    let new = full_manifest(&f.new);
    assert!(new == old_before, "{}", diff(&old_before, &new));
    assert!(
        !f.new.join(".ferryfs-work").exists(),
        "NEW keeps ferryfs's work dir"
    );
}

/// kill -9 of a worker in the middle of its lease: the lease expires, its files go to
/// another worker, its copies are removed; kill -9 of the coordinator and `mount` again:
/// the workers carry on (retrying meanwhile), and no finished copy is made again.
#[test]
fn killed_workers_and_a_killed_coordinator_lose_nothing_and_copy_nothing_twice() {
    let mut f = Fixture::new();
    dataset(&f.old, 1500);
    let old_before = full_manifest(&f.old);
    let files = files_in(&f.old);
    f.prepare();
    let port = free_port();
    let t = token(&f);
    // Leases of 3 s (a killed worker's files wait that long), workers paced at 2 MiB/s so
    // that the kills land in the middle of the copy.
    let env = [("FERRYFS_LEASE_SECS", "3")];
    let addr = format!("127.0.0.1:{port}");
    let mount_args = [
        "--no-copy",
        "--workers-listen",
        addr.as_str(),
        "--workers-token-file",
        t.to_str().unwrap(),
    ];
    let mnt = f.mnt.clone();
    ok(f.try_mount_env(&mnt, &mount_args, &env));
    let slow = ["--bwlimit", "1M"];
    // The doomed one so slow that it dies with its first lease in hand.
    let mut doomed = worker(&f, port, &t, 0, &["--bwlimit", "4k"]);
    let mut ws: Vec<Child> = (1..3).map(|i| worker(&f, port, &t, i, &slow)).collect();
    wait_for("three workers", 30, || workers_status(&f).len() == 3);
    ok(f.cmd("execute", &[]));
    // The doomed worker holds a lease: it has made copies in NEW's work dir.
    wait_for("worker 0 to have a lease", 30, || {
        workers_status(&f)
            .iter()
            .any(|w| w.0 == "index-0" && w.2 > 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // Its lease expires (its files go to the others), then the coordinator dies.
    wait_for("the killed worker's lease to expire", 60, || {
        fs::read_to_string(f.state.join("ferryfs.log")).is_ok_and(|l| l.contains("lease expired"))
    });
    f.kill9();
    let before_restart: u64 = workers_status(&f).iter().map(|w| w.1).sum();
    assert!(
        before_restart < files,
        "the coordinator died after the copy was done"
    );
    std::thread::sleep(Duration::from_secs(2));
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    ok(f.try_mount_env(&mnt, &mount_args, &env));
    // The workers come back by themselves (they retried meanwhile).
    wait_for("the workers to reach the new coordinator", 60, || {
        let st = f.status_json();
        st["workers"].as_array().is_some_and(|a| {
            a.iter()
                .filter(|w| w["last_seen"].as_u64().unwrap() >= restarted)
                .count()
                == 2
        })
    });
    ok(f.cmd("execute", &["--wait"]));
    for (i, w) in ws.iter_mut().enumerate() {
        let st = wait_exit(&f, w, i as u32 + 1, 60);
        assert!(st.success(), "worker {}: {st}", i + 1);
    }
    let log = worker_log(&f, 1) + &worker_log(&f, 2);
    assert!(log.contains("unreachable"), "the workers retried: {log}");
    let ws = workers_status(&f);
    println!("before the restart: {before_restart} files; workers: {ws:?}");
    let dead = ws.iter().find(|w| w.0 == "index-0").unwrap();
    assert_eq!((dead.1, dead.2), (0, 1), "the killed worker: {ws:?}");
    let copied: u64 = ws.iter().map(|w| w.1).sum();
    // Every file named once, by a worker: none of those named before the restart again.
    assert_eq!(copied, files, "files named by workers: {ws:?}");
    assert!(copied > before_restart);
    let view = full_manifest(&f.mnt);
    assert!(view == old_before, "{}", diff(&old_before, &view));
    ok(f.cmd("commit", &[]));
    f.unmount();
    let new = full_manifest(&f.new);
    assert!(new == old_before, "{}", diff(&old_before, &new));
}

/// A write through the view to a file a worker is copying wins: the worker's copy is
/// refused, NEW holds what the application wrote.
#[test]
fn a_write_through_the_view_wins_over_a_workers_copy() {
    let mut f = Fixture::new();
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7) as u8).collect();
    write(&f.old.join("big.bin"), &big);
    f.cmd_prepare_with(&["--chunk-size".as_ref(), "0".as_ref()]);
    let port = free_port();
    let t = token(&f);
    mount_coordinator(&mut f, port, &t, &[]);
    // 16 MiB at 2 MiB/s: eight seconds in flight.
    let mut w = worker(&f, port, &t, 0, &["--bwlimit", "2M"]);
    wait_for("the worker", 30, || workers_status(&f).len() == 1);
    ok(f.cmd("execute", &[]));
    wait_for("the worker's copy under way", 30, || {
        fs::read_dir(f.new.join(".ferryfs-work")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("remote-"))
        })
    });
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.v("big.bin"))
        .unwrap();
    file.write_all_at(b"the application's", 1000).unwrap();
    drop(file);
    let mut want = big.clone();
    want[1000..1017].copy_from_slice(b"the application's");
    ok(f.cmd("execute", &["--wait"]));
    let st = wait_exit(&f, &mut w, 0, 60);
    assert!(st.success(), "{}", worker_log(&f, 0));
    let ws = workers_status(&f);
    assert_eq!(ws[0].1, 0, "the worker's copy took the name: {ws:?}");
    assert_eq!(ws[0].3, 1, "the worker's copy was not refused: {ws:?}");
    assert!(
        fs::read(f.v("big.bin")).unwrap() == want,
        "the view's bytes"
    );
    ok(f.cmd("commit", &[]));
    f.unmount();
    assert!(
        fs::read(f.new.join("big.bin")).unwrap() == want,
        "NEW's bytes"
    );
}

/// Every file (not directory) below `root`, its work dir included: what a request could
/// name. (The copier makes directories meanwhile, some in the work dir then renamed: entries
/// that vanish while listed are skipped.)
fn files_below(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => out.push(e.path().strip_prefix(root).unwrap().to_path_buf()),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// One raw request; (status, body).
fn raw(port: u16, request: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(request);
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn post(port: u16, token: &str, path: &str, body: &str) -> (u16, String) {
    raw(
        port,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// A wrong or missing token, a path with `..`, a malformed or oversized request: refused
/// with the right status, nothing changed; a worker with a wrong token exits at once,
/// non-zero, saying so. A token file too short is refused at mount.
#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let mut f = Fixture::new();
    dataset(&f.old, 20);
    f.prepare();
    let port = free_port();
    let t = token(&f);
    // A short token: the mount says why.
    let short = f.root.path().join("short");
    fs::write(&short, "abc").unwrap();
    let addr = format!("127.0.0.1:{port}");
    let out = f.try_mount(
        &f.mnt.clone(),
        &[
            "--workers-listen",
            &addr,
            "--workers-token-file",
            short.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("128 random bits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mount_coordinator(&mut f, port, &t, &[]);
    let good = fs::read_to_string(&t).unwrap().trim().to_string();
    // Missing and wrong tokens.
    let (s, body) = raw(
        port,
        b"POST /v1/hello HTTP/1.1\r\nContent-Length: 14\r\n\r\n{\"worker\":\"x\"}",
    );
    assert_eq!(s, 401, "{body}");
    assert!(!body.contains(&good), "the token was echoed");
    let (s, _) = post(
        port,
        "not-the-token-at-all-00000000",
        "/v1/hello",
        r#"{"worker":"x"}"#,
    );
    assert_eq!(s, 401);
    // A lease, then a report naming `..` and another path than handed out.
    let (s, _) = post(port, &good, "/v1/hello", r#"{"worker":"probe"}"#);
    assert_eq!(s, 200);
    ok(f.cmd("execute", &[]));
    let mut lease = serde_json::Value::Null;
    wait_for("a lease", 30, || {
        let (s, body) = post(port, &good, "/v1/lease", r#"{"worker":"probe"}"#);
        assert_eq!(s, 200, "{body}");
        let b = body.split("\r\n\r\n").nth(1).unwrap_or("");
        lease = serde_json::from_str(b).unwrap();
        lease.get("lease").is_some()
    });
    let id = lease["lease"]["id"].as_u64().unwrap();
    let new_before = files_below(&f.new);
    let item = &lease["lease"]["items"][0];
    let tmp = item["tmp"].as_str().unwrap();
    for (path, tmp) in [
        ("../../etc/passwd", tmp.to_string()),
        ("/etc/passwd", tmp.to_string()),
        ("d00/../../x", tmp.to_string()),
        ("d00/e0/not-this-one", tmp.to_string()),
        (item["path"].as_str().unwrap(), "../escape".to_string()),
    ] {
        let report = serde_json::json!({
            "worker": "probe", "lease": id,
            "outcomes": [{"n": 0, "path": path, "tmp": tmp, "size": 1, "mtime": [0, 0]}],
        });
        let (s, body) = post(port, &good, "/v1/report", &report.to_string());
        assert_eq!(s, 400, "{path:?}: {body}");
    }
    // Malformed, oversized, unknown.
    let (s, _) = post(port, &good, "/v1/report", "{not json");
    assert_eq!(s, 400);
    let (s, _) = raw(
        port,
        format!(
            "POST /v1/report HTTP/1.1\r\nAuthorization: Bearer {good}\r\nContent-Length: {}\r\n\r\n",
            8 << 20
        )
        .as_bytes(),
    );
    assert_eq!(s, 413);
    let (s, _) = post(port, &good, "/v1/../../admin", "{}");
    assert_eq!(s, 404);
    // A report about another worker's lease, and a renewal of it.
    let (s, _) = post(
        port,
        &good,
        "/v1/renew",
        &format!(r#"{{"worker":"other","lease":{id}}}"#),
    );
    assert_eq!(s, 409);
    assert_eq!(
        files_below(&f.new),
        new_before,
        "a refused request changed NEW"
    );
    assert_eq!(
        f.status_json()["errors"].as_array().unwrap().len(),
        0,
        "a refused request recorded an error"
    );
    // A worker with a wrong token: out at once, non-zero, saying why.
    let wrong = f.root.path().join("wrong");
    fs::write(&wrong, "0123456789abcdef0123456789abcdef").unwrap();
    let t0 = std::time::Instant::now();
    let out = Command::new(BIN)
        .args([
            "worker",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "--token-file",
            wrong.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "a refused worker's exit status");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the worker retried a wrong token"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused") && err.contains("token"), "{err}");
    assert!(!err.contains(&good));
    f.unmount();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Posix,
    S3,
}

fn bucket_store(bucket: &str) -> std::sync::Arc<S3Store> {
    std::sync::Arc::new(
        S3Store::connect(&S3Url::parse(&format!("s3://{bucket}")).unwrap()).unwrap(),
    )
}

/// OLD's dataset for the S3 pairings, made in `dir`: `small` files of up to 12 KiB over 12
/// directories with their own modes and mtimes, and two of 40 and 9 MiB (copied by ranges of
/// 4 MiB into a POSIX NEW, of one 16 MiB part into a bucket; the second not into a bucket).
fn plain_dataset(dir: &Path, small: usize) {
    for i in 0..small {
        let d = dir.join(format!("d{:02}", i % 12));
        fs::create_dir_all(&d).unwrap();
        let len = 1 + (i * 7919) % 12_000;
        let data: Vec<u8> = (0..len).map(|j| (i + j * 31) as u8).collect();
        let p = d.join(format!("f{i}"));
        fs::write(&p, data).unwrap();
        fs::set_permissions(
            &p,
            std::os::unix::fs::PermissionsExt::from_mode([0o644, 0o600, 0o640][i % 3]),
        )
        .unwrap();
        trees::set_mtime(&p, 1_600_000_000 + i as i64);
    }
    for (i, mib) in [40usize, 9].into_iter().enumerate() {
        let data: Vec<u8> = (0..mib << 20).map(|j| (j * 13 + i) as u8).collect();
        let p = dir.join(format!("big/b{i}.bin"));
        write(&p, &data);
        trees::set_mtime(&p, 1_650_000_000 + i as i64);
    }
}

/// Every file below `dir` put into `bucket` as an object carrying its mode and mtime
/// (s3fs's metadata), as another client would have filled an S3 OLD.
fn upload_tree(dir: &Path, s: &S3Store) {
    let tree = trees::tree_of_dir(dir);
    for (rel, e) in tree {
        if let trees::Entry::File { data, perm, mtime } = e {
            let meta = PosixMeta {
                mode: Some(0o100000 | perm),
                uid: Some(0),
                gid: Some(0),
                mtime: Some((mtime, 0)),
            };
            s.put(&rel, data, &meta).unwrap();
        }
    }
}

/// Workers copy a migration with an S3 store: the result exact after commit, every file
/// copied by a worker, no upload left unfinished in NEW's bucket (a worker's copy into a
/// bucket is an upload only the coordinator completes). With `doomed`, a worker dies (kill
/// -9) with uploads begun: its lease expires, the coordinator aborts them, another worker
/// copies its files (no file is split then: every upload begun is a worker's).
fn workers_across(old: Side, new: Side, name: &str, workers: u32, doomed: bool) {
    let g = common::garage::shared();
    let mut f = Fixture::new();
    let (ob, nb) = (format!("{name}-old"), format!("{name}-new"));
    let src = f.root.path().join("src");
    // (Fewer small files into a bucket: reading them back, through the view and from the
    // bucket, takes a request each from Garage, the test's slowest part by far.)
    plain_dataset(&src, if new == Side::S3 { 200 } else { 600 });
    let want = trees::tree_of_dir(&src);
    let files = want
        .values()
        .filter(|e| matches!(e, trees::Entry::File { .. }))
        .count() as u64;
    let old_arg = match old {
        Side::S3 => {
            g.bucket(&ob);
            upload_tree(&src, &bucket_store(&ob));
            format!("s3://{ob}")
        }
        Side::Posix => {
            fs::remove_dir(&f.old).unwrap();
            fs::rename(&src, &f.old).unwrap();
            f.old.to_str().unwrap().to_string()
        }
    };
    let new_arg = match new {
        Side::S3 => {
            g.bucket(&nb);
            format!("s3://{nb}")
        }
        Side::Posix => f.new.to_str().unwrap().to_string(),
    };
    let state = f.state.to_str().unwrap().to_string();
    ok(ferryfs(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        old_arg.as_ref(),
        "--new".as_ref(),
        new_arg.as_ref(),
        "--state".as_ref(),
        state.as_ref(),
    ]));
    let port = free_port();
    let t = token(&f);
    let addr = format!("127.0.0.1:{port}");
    let mnt = f.mnt.clone();
    let args = [
        "--no-copy",
        "--workers-listen",
        addr.as_str(),
        "--workers-token-file",
        t.to_str().unwrap(),
    ];
    f.mount_env(
        &mnt,
        &args,
        &[
            ("FERRYFS_LEASE_SECS", "3"),
            // (Big files by ranges, but not with a doomed worker: see below.)
            (
                "FERRYFS_RANGE_BYTES",
                if doomed { "1073741824" } else { "4194304" },
            ),
        ],
    );
    if doomed {
        // The doomed worker alone first, so slow that it dies with its first lease in hand
        // and its uploads begun (every unfinished upload then is its own).
        let mut d = worker(&f, port, &t, workers, &["--bwlimit", "4k"]);
        wait_for("the doomed worker to say hello", 30, || {
            workers_status(&f).len() == 1
        });
        ok(f.cmd("execute", &[]));
        // (No file is split here, so every upload begun is the worker's: the coordinator
        // begins a split file's upload itself, at offer time, before any lease.)
        wait_for(
            "the doomed worker's lease and its uploads begun",
            30,
            || {
                workers_status(&f).iter().all(|w| w.2 == 1)
                    && !bucket_store(&nb).unfinished_uploads().unwrap().is_empty()
            },
        );
        d.kill().unwrap();
        d.wait().unwrap();
    }
    let mut ws: Vec<Child> = (0..workers).map(|i| worker(&f, port, &t, i, &[])).collect();
    let all = workers as usize + usize::from(doomed);
    wait_for("the workers to say hello", 30, || {
        workers_status(&f).len() == all
    });
    ok(f.cmd("execute", &["--wait"]));
    if doomed {
        let dead = workers_status(&f)
            .into_iter()
            .find(|w| w.0 == format!("index-{workers}"))
            .unwrap();
        assert_eq!((dead.1, dead.2), (0, 1), "the killed worker: {dead:?}");
    }
    all_copied(&f, &mut ws, files, 2.min(workers as usize));
    if new == Side::S3 {
        let left = bucket_store(&nb).unfinished_uploads().unwrap();
        assert!(left.is_empty(), "uploads left unfinished in NEW: {left:?}");
    }
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert_eq!(
        log.contains("a big file copied by ranges"),
        !doomed,
        "{log}"
    );
    if doomed {
        assert!(log.contains("lease expired"), "{log}");
    }
    trees::assert_same("the view", &trees::tree_of_dir(&f.mnt), &want);
    let out = ok(f.cmd("verify", &["--checksum"]));
    assert!(out.contains("0 mismatches"), "{out}");
    ok(f.cmd("commit", &[]));
    f.unmount();
    let got = match new {
        Side::S3 => trees::tree_of_bucket(&bucket_store(&nb)),
        Side::Posix => trees::tree_of_dir(&f.new),
    };
    trees::assert_same("NEW after commit", &got, &want);
}

/// Four workers copy an S3 OLD into an S3 NEW of the same service (every part copied by the
/// server, conditional on OLD's ETag), started as an Indexed Job starts them.
#[test]
fn four_workers_copy_an_s3_to_s3_migration_exactly() {
    workers_across(Side::S3, Side::S3, "workers-s3s3", 4, false);
}

/// Workers send a POSIX OLD's bytes into an S3 NEW as multipart uploads; one killed with
/// uploads begun leaves none behind.
#[test]
fn workers_upload_a_posix_old_into_an_s3_new_and_a_killed_one_leaves_no_upload() {
    workers_across(Side::Posix, Side::S3, "workers-posix-s3", 2, true);
}

/// Workers read an S3 OLD's objects (at the ETag handed out) into a POSIX NEW.
#[test]
fn workers_copy_an_s3_old_into_a_posix_new() {
    workers_across(Side::S3, Side::Posix, "workers-s3-posix", 2, false);
}

/// The coordinator over TLS (`--workers-tls-cert/--workers-tls-key`): a worker trusting its
/// certificate (`--ca-file`) copies exactly; one that does not trust it stops at once, saying
/// so; a plain-HTTP request gets no answer.
#[test]
fn workers_reach_a_tls_coordinator_and_a_certificate_not_trusted_is_refused() {
    let mut f = Fixture::new();
    dataset(&f.old, 200);
    let old_before = full_manifest(&f.old);
    let files = files_in(&f.old);
    f.prepare();
    let port = free_port();
    let t = token(&f);
    let (cert, key) = certificate(f.root.path());
    mount_coordinator(
        &mut f,
        port,
        &t,
        &[
            "--workers-tls-cert",
            cert.to_str().unwrap(),
            "--workers-tls-key",
            key.to_str().unwrap(),
        ],
    );
    let https = format!("https://127.0.0.1:{port}");
    // Not trusted: the system's roots do not know this certificate.
    let t0 = std::time::Instant::now();
    let out = Command::new(BIN)
        .args(["worker", "--coordinator", &https, "--token-file"])
        .arg(&t)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the worker retried a refused certificate"
    );
    // Plain HTTP: no HTTP answer.
    let (s, _) = post(port, "x", "/v1/hello", r#"{"worker":"x"}"#);
    assert_eq!(s, 0, "a plain request was answered over a TLS endpoint");
    let mut w = Command::new(BIN)
        .args(["worker", "--coordinator", &https, "--token-file"])
        .arg(&t)
        .arg("--ca-file")
        .arg(&cert)
        .env("JOB_COMPLETION_INDEX", "0")
        .stderr(fs::File::create(f.root.path().join("worker-0.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for("the worker over TLS", 30, || workers_status(&f).len() == 1);
    ok(f.cmd("execute", &["--wait"]));
    let st = wait_exit(&f, &mut w, 0, 60);
    assert!(st.success(), "{}", worker_log(&f, 0));
    let ws = workers_status(&f);
    assert_eq!(ws[0].1, files, "{ws:?}");
    ok(f.cmd("commit", &[]));
    f.unmount();
    let new = full_manifest(&f.new);
    assert!(new == old_before, "{}", diff(&old_before, &new));
}
