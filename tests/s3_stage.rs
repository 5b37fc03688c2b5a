//! An S3 NEW of any size (issue 24): the staging tree in the state dir keeps only what is not
//! in the bucket yet. A file uploaded and closed is evicted (its bytes punched out of the
//! staging tree, its record pointing at the bucket's object), read from the bucket after, and
//! staged again only by the chunks a later write touches; the next upload copies the
//! unchanged ranges by the server. Against a real Garage and a real FUSE mount.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::{Fixture, ferryfs, ok, wait_for};
use ferryfs::store::s3::{ObjectReader, S3Store, S3Url};

fn store(bucket: &str) -> Arc<S3Store> {
    Arc::new(S3Store::connect(&S3Url::parse(&format!("s3://{bucket}")).unwrap()).unwrap())
}

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// Bytes the files below `dir` take on disk (their blocks, as `du` counts them).
fn used(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let st = rustix::fs::lstat(e.path()).unwrap();
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            total += used(&e.path());
        } else {
            total += st.st_blocks as u64 * 512;
        }
    }
    total
}

/// The object `key` of `s`, whole.
fn object(s: &Arc<S3Store>, key: &str) -> Vec<u8> {
    let info = s
        .head(key)
        .unwrap()
        .unwrap_or_else(|| panic!("{key} not in the bucket"));
    let r = ObjectReader::new(s.clone(), info.clone(), 16 << 20);
    r.read_at(0, info.size as usize).unwrap()
}

/// A fixture whose NEW is the (emptied) bucket `bucket`, prepared with `extra`, mounted with
/// the copier on.
fn start(bucket: &str, fill: impl FnOnce(&Path), extra: &[&str]) -> Fixture {
    let mut f = Fixture::new();
    fill(&f.old);
    prepare_into(&f, bucket, extra);
    let mp = f.mnt.clone();
    f.mount_with(&mp, &[]);
    f
}

/// `prepare` of `f`'s OLD into the (emptied) bucket `bucket`, with `extra`.
fn prepare_into(f: &Fixture, bucket: &str, extra: &[&str]) {
    common::garage::shared().bucket(bucket);
    let new = format!("s3://{bucket}");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "prepare".as_ref(),
        "--old".as_ref(),
        f.old.as_os_str(),
        "--new".as_ref(),
        new.as_ref(),
        "--state".as_ref(),
        f.state.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    ok(ferryfs(&args));
}

fn published(f: &Fixture, what: &str) -> u64 {
    f.status_json()["published"][what]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no published.{what}"))
}

fn write_synced(p: &Path, data: &[u8]) {
    let h = fs::File::create(p).unwrap();
    h.write_all_at(data, 0).unwrap();
    h.sync_all().unwrap();
}

fn pwrite_synced(p: &Path, at: u64, data: &[u8]) {
    let h = fs::OpenOptions::new().write(true).open(p).unwrap();
    h.write_all_at(data, at).unwrap();
    h.sync_all().unwrap();
}

#[test]
fn uploaded_files_leave_the_staging_tree_and_are_read_from_the_bucket() {
    let bucket = "stage-evict";
    let mut f = start(
        bucket,
        |old| fs::write(old.join("old.txt"), b"from OLD").unwrap(),
        &[],
    );
    let stage = f.state.join("stage");
    // Written through the view: a file over the multipart threshold and small ones.
    let mut big = pattern((72 << 20) + 4321, 1);
    write_synced(&f.v("big.bin"), &big);
    for i in 0..20 {
        write_synced(&f.v(&format!("small-{i}.txt")), &pattern(5000 + i, i));
    }
    ok(f.cmd("execute", &["--wait"]));
    wait_for("every file evicted from the staging tree", 30, || {
        published(&f, "evicted") >= 22
    });
    let staged = used(&stage);
    println!("staging tree after upload: {staged} bytes (72 MiB and 20 small files written)");
    assert!(
        staged < 64 << 10,
        "the staging tree still holds {staged} bytes"
    );
    ok(f.cmd("verify", &["--checksum"]));
    // Read back with no page cache and nothing staged: from the bucket.
    f.unmount();
    let mp = f.mnt.clone();
    f.mount_with(&mp, &[]);
    assert!(
        fs::read(f.v("big.bin")).unwrap() == big,
        "big.bin read back"
    );
    for i in 0..20 {
        assert_eq!(
            fs::read(f.v(&format!("small-{i}.txt"))).unwrap(),
            pattern(5000 + i, i)
        );
    }
    assert_eq!(fs::read(f.v("old.txt")).unwrap(), b"from OLD");
    // A 4 KiB write into the middle of the evicted file stages the chunk it touches (1 MiB,
    // the default chunk), not the file.
    let at = (30 << 20) + 100;
    pwrite_synced(&f.v("big.bin"), at, &[7u8; 4096]);
    big[at as usize..at as usize + 4096].fill(7);
    let staged = used(&stage);
    println!("staging tree after a 4 KiB write into the evicted 72 MiB file: {staged} bytes");
    assert!(staged <= 2 << 20, "{staged} bytes staged for a 4 KiB write");
    assert!(fs::read(f.v("big.bin")).unwrap() == big);
    // Published (the unchanged ranges copied by the server), and evicted again.
    ok(f.cmd("execute", &["--wait"]));
    let s = store(bucket);
    assert!(object(&s, "big.bin") == big, "the bucket's big.bin");
    wait_for("big.bin evicted again", 30, || used(&stage) < 64 << 10);
    // Acknowledged (fsync) and the daemon killed before any pass: there after mount, and then
    // in the bucket.
    pwrite_synced(&f.v("big.bin"), 5, b"acknowledged");
    big[5..17].copy_from_slice(b"acknowledged");
    write_synced(&f.v("small-3.txt"), b"rewritten");
    f.kill9();
    f.mount_with(&mp, &[]);
    assert!(
        fs::read(f.v("big.bin")).unwrap() == big,
        "big.bin after kill -9"
    );
    assert_eq!(fs::read(f.v("small-3.txt")).unwrap(), b"rewritten");
    ok(f.cmd("execute", &["--wait"]));
    assert!(object(&s, "big.bin") == big);
    assert_eq!(object(&s, "small-3.txt"), b"rewritten");
    // A rename of an evicted file: copied by the server from its old key, which then goes.
    fs::rename(f.v("small-4.txt"), f.v("renamed.txt")).unwrap();
    ok(f.cmd("execute", &["--wait"]));
    assert_eq!(object(&s, "renamed.txt"), pattern(5004, 4));
    assert!(
        s.head("small-4.txt").unwrap().is_none(),
        "the old key stayed"
    );
    assert_eq!(fs::read(f.v("renamed.txt")).unwrap(), pattern(5004, 4));
    // /metrics and status say so.
    let st = f.status_json();
    assert!(st["published"]["staged_bytes"].as_u64().is_some(), "{st}");
    // Commit: the bucket holds the view, and evicted files are still read from it.
    ok(f.cmd("commit", &[]));
    f.unmount();
    f.mount_with(&mp, &[]);
    assert!(
        fs::read(f.v("big.bin")).unwrap() == big,
        "big.bin after commit"
    );
    assert_eq!(fs::read(f.v("renamed.txt")).unwrap(), pattern(5004, 4));
    f.unmount();
}

#[test]
fn abort_writes_evicted_files_back_into_old_from_the_bucket() {
    let bucket = "stage-abort";
    let f = start(
        bucket,
        |old| fs::write(old.join("kept.txt"), pattern(3 << 20, 2)).unwrap(),
        &[],
    );
    let mut born = pattern(9 << 20, 3);
    write_synced(&f.v("born.bin"), &born);
    ok(f.cmd("execute", &["--wait"]));
    wait_for("born.bin evicted", 30, || published(&f, "evicted") >= 2);
    pwrite_synced(&f.v("born.bin"), 4 << 20, b"after eviction");
    born[4 << 20..(4 << 20) + 14].copy_from_slice(b"after eviction");
    ok(f.cmd("abort", &[]));
    assert!(
        fs::read(f.old.join("born.bin")).unwrap() == born,
        "born.bin in OLD"
    );
    assert!(fs::read(f.old.join("kept.txt")).unwrap() == pattern(3 << 20, 2));
    let mut keys = Vec::new();
    store(bucket)
        .list_all(&mut |k, _| keys.push(k.to_string()))
        .unwrap();
    assert!(keys.is_empty(), "left in the bucket after abort: {keys:?}");
}

/// Bytes used on the file system holding `p` (statvfs).
fn fs_used(p: &Path) -> u64 {
    let s = rustix::fs::statvfs(p).unwrap();
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

/// A tmpfs of `size` at `dir`, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        fs::create_dir_all(dir).unwrap();
        let out = common::run(std::process::Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            dir.to_str().unwrap(),
        ]));
        assert!(out.status.success(), "mount a {size} tmpfs: {out:?}");
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The most bytes used on the file system of a directory, sampled every 20 ms from
/// [`PeakUse::start`] to [`PeakUse::stop`].
struct PeakUse {
    done: Arc<std::sync::atomic::AtomicBool>,
    peak: Arc<std::sync::atomic::AtomicU64>,
    t: std::thread::JoinHandle<()>,
}

impl PeakUse {
    fn start(dir: &Path) -> PeakUse {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = {
            let (done, peak, dir) = (done.clone(), peak.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.fetch_max(fs_used(&dir), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        PeakUse { done, peak, t }
    }

    fn stop(self) -> u64 {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.t.join().unwrap();
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Issue 24, POSIX to S3: a dataset of more than 1 GiB (an object over 300 MiB, three of
/// 230 MiB, 2,000 small files) through a state dir on a 128 MiB file system: the copier sends
/// OLD's files straight into the bucket, so the state dir never holds their bytes. After
/// commit another client (rclone, reading every byte back) finds OLD plus the view's changes.
#[test]
fn posix_to_s3_through_a_128_mib_state_dir() {
    let bucket = "stage-posix-1g";
    let mut f = Fixture::new();
    let _statefs = SmallFs::mount(&f.state, "128m");
    let mut sizes = vec![(330u64 << 20) + 7, 230 << 20, 230 << 20, (230 << 20) + 1];
    for (i, size) in sizes.iter().enumerate() {
        common::write(
            &f.old.join(format!("big-{i}.bin")),
            &pattern(*size as usize, i),
        );
    }
    for i in 0..2000 {
        let p = f.old.join(format!("small/d{}/f{i:04}", i % 20));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern(8 << 10, i)).unwrap();
    }
    sizes.push(2000 * (8 << 10));
    let total: u64 = sizes.iter().sum();
    assert!(total > 1 << 30);
    prepare_into(&f, bucket, &[]);
    // The state dir's file system, sampled while the migration runs.
    let sampler = PeakUse::start(&f.state);
    let began = std::time::Instant::now();
    let mp = f.mnt.clone();
    f.mount_with(&mp, &[]);
    // Changes through the view meanwhile.
    write_synced(&f.v("written.txt"), b"through the view");
    fs::write(f.v("small/d3/f0003"), b"changed through the view").unwrap();
    ok(f.cmd("execute", &["--wait"]));
    ok(f.cmd("verify", &[]));
    ok(f.cmd("commit", &[]));
    f.unmount();
    let peak = sampler.stop();
    println!(
        "posix to s3: {total} bytes in {:.1} s, peak bytes used under the state dir: {peak} \
         ({:.1} MiB of a 128 MiB file system)",
        began.elapsed().as_secs_f64(),
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak < 64 << 20,
        "the state dir held {peak} bytes at its peak"
    );
    // OLD plus the view's changes, read back by another client.
    fs::write(f.old.join("written.txt"), b"through the view").unwrap();
    fs::write(f.old.join("small/d3/f0003"), b"changed through the view").unwrap();
    let out = common::run(common::garage::shared().rclone().args([
        "check",
        "--download",
        f.old.to_str().unwrap(),
        &format!("g:{bucket}"),
    ]));
    assert!(
        out.status.success(),
        "rclone check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 24, crash safety: kill -9 of the daemon in the middle of the copier's multipart
/// upload of a large object. The next mount aborts the upload left unfinished (none stays in
/// the bucket: ListMultipartUploads), the copy is made again, and the bucket holds exactly the
/// view's keys after commit.
#[test]
fn kill_9_in_the_middle_of_a_streamed_upload_leaves_no_multipart_upload() {
    let bucket = "stage-kill9";
    let big = pattern((200 << 20) + 3, 7);
    let mut f = start(
        bucket,
        |old| {
            common::write(&old.join("big.bin"), &big);
            fs::write(old.join("small.txt"), b"small").unwrap();
        },
        &[],
    );
    let s = store(bucket);
    wait_for("the copier's multipart upload to begin", 120, || {
        !s.unfinished_uploads().unwrap().is_empty()
    });
    f.kill9();
    assert!(
        !s.unfinished_uploads().unwrap().is_empty(),
        "the premise: kill -9 left an unfinished upload"
    );
    let mp = f.mnt.clone();
    // (The copier held back: a copy it began at once would be an unfinished upload too.)
    f.mount_with(&mp, &["--no-copy"]);
    assert_eq!(
        s.unfinished_uploads().unwrap(),
        Vec::<(String, String)>::new(),
        "unfinished multipart uploads after mount"
    );
    ok(f.cmd("execute", &["--wait"]));
    assert!(fs::read(f.v("big.bin")).unwrap() == big);
    ok(f.cmd("commit", &[]));
    f.unmount();
    let mut keys = Vec::new();
    s.list_all(&mut |k, _| keys.push(k.to_string())).unwrap();
    keys.sort();
    assert_eq!(keys, ["big.bin", "small.txt"]);
    assert!(object(&s, "big.bin") == big, "the bucket's big.bin");
    assert!(s.unfinished_uploads().unwrap().is_empty());
}

/// Issue 24, S3 to S3 between two separate services (two Garage servers, other ports, other
/// keys, each store reached with a profile of its own): more than 1 GiB (an object over
/// 300 MiB, three of 230 MiB, 2,000 small ones) through a state dir on a 128 MiB file system.
/// The copier reads OLD's objects by ranged GETs and sends them in parts: nothing is staged.
/// After commit rclone, reading every byte of both buckets, finds NEW equal to OLD plus the
/// view's changes.
#[test]
fn s3_to_s3_across_two_services_through_a_128_mib_state_dir() {
    use std::ffi::OsStr;
    let a = common::garage::shared();
    let b = common::garage::Garage::start();
    let (ob, nb) = ("stage-s3s3-old", "stage-s3s3-new");
    a.bucket(ob);
    b.bucket(nb);
    let o = store(ob);
    let meta = ferryfs::store::s3::PosixMeta {
        mode: Some(0o100644),
        uid: Some(0),
        gid: Some(0),
        mtime: Some((1_500_000_000, 0)),
    };
    let mut total = 0u64;
    for (i, size) in [(330usize << 20) + 7, 230 << 20, 230 << 20, (230 << 20) + 1]
        .into_iter()
        .enumerate()
    {
        o.put_patched(
            &format!("big-{i}.bin"),
            size as u64,
            &meta,
            None,
            &|_, _| false,
            &mut |off, buf| {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = (((off as usize + j) * 31 + i) % 251) as u8;
                }
                Ok(())
            },
        )
        .unwrap();
        total += size as u64;
    }
    for i in 0..2000 {
        o.put(
            &format!("small/d{}/f{i:04}", i % 20),
            pattern(8 << 10, i),
            &meta,
        )
        .unwrap();
        total += 8 << 10;
    }
    assert!(total > 1 << 30);
    let f = Fixture::new();
    let _statefs = SmallFs::mount(&f.state, "128m");
    let profiles = [a.profile("old"), b.profile("new")];
    let cli = |args: &[&OsStr]| cli_with(&f, &profiles, args);
    let st = f.state.clone();
    let (old_url, new_url) = (format!("s3://{ob}"), format!("s3://{nb}"));
    cli(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        old_url.as_ref(),
        "--new".as_ref(),
        new_url.as_ref(),
        "--state".as_ref(),
        st.as_os_str(),
        "--old-s3-profile".as_ref(),
        "old".as_ref(),
        "--new-s3-profile".as_ref(),
        "new".as_ref(),
    ]);
    let sampler = PeakUse::start(&f.state);
    let began = std::time::Instant::now();
    cli(&[
        "mount".as_ref(),
        "--state".as_ref(),
        st.as_os_str(),
        f.mnt.as_os_str(),
        "-o".as_ref(),
        "allow_other".as_ref(),
    ]);
    write_synced(&f.v("written.txt"), b"through the view");
    fs::write(f.v("small/d3/f0003"), b"changed through the view").unwrap();
    cli(&[
        "execute".as_ref(),
        "--state".as_ref(),
        st.as_os_str(),
        "--wait".as_ref(),
    ]);
    cli(&["verify".as_ref(), "--state".as_ref(), st.as_os_str()]);
    cli(&["commit".as_ref(), "--state".as_ref(), st.as_os_str()]);
    ok(ferryfs(&["unmount".as_ref(), f.mnt.as_os_str()]));
    let peak = sampler.stop();
    println!(
        "s3 to s3 across two services: {total} bytes in {:.1} s, peak bytes used under the \
         state dir: {peak} ({:.1} MiB of a 128 MiB file system)",
        began.elapsed().as_secs_f64(),
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak < 64 << 20,
        "the state dir held {peak} bytes at its peak"
    );
    // OLD plus the view's changes, then both buckets read back whole by rclone.
    o.put("written.txt", b"through the view".to_vec(), &meta)
        .unwrap();
    o.put(
        "small/d3/f0003",
        b"changed through the view".to_vec(),
        &meta,
    )
    .unwrap();
    let mut c = a.rclone();
    c.env("RCLONE_CONFIG_H_TYPE", "s3")
        .env("RCLONE_CONFIG_H_PROVIDER", "Other")
        .env("RCLONE_CONFIG_H_ENDPOINT", &b.endpoint)
        .env("RCLONE_CONFIG_H_ACCESS_KEY_ID", &b.key_id)
        .env("RCLONE_CONFIG_H_SECRET_ACCESS_KEY", &b.secret)
        .env("RCLONE_CONFIG_H_REGION", "garage")
        .env("RCLONE_CONFIG_H_FORCE_PATH_STYLE", "true")
        .args([
            "check",
            "--download",
            &format!("g:{ob}"),
            &format!("h:{nb}"),
        ]);
    let out = common::run(&mut c);
    assert!(
        out.status.success(),
        "rclone check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mount` of the state dir `st` at `mnt` through `run` (a [`cli_with`]).
fn cli_mount(run: &dyn Fn(&[&std::ffi::OsStr]) -> String, st: &std::ffi::OsStr, mnt: &Path) {
    run(&[
        "mount".as_ref(),
        "--state".as_ref(),
        st,
        mnt.as_os_str(),
        "-o".as_ref(),
        "allow_other".as_ref(),
    ]);
}

/// `execute --wait`, `verify --checksum` (no mismatch) and `commit` of the state dir `st`
/// through `run` (a [`cli_with`]).
fn cli_finish(run: &dyn Fn(&[&std::ffi::OsStr]) -> String, st: &std::ffi::OsStr) {
    run(&[
        "execute".as_ref(),
        "--state".as_ref(),
        st,
        "--wait".as_ref(),
    ]);
    let out = run(&[
        "verify".as_ref(),
        "--state".as_ref(),
        st,
        "--checksum".as_ref(),
    ]);
    assert!(out.contains("0 mismatches"), "{out}");
    run(&["commit".as_ref(), "--state".as_ref(), st]);
}

/// `ferryfs` run with `profiles` (see `common::ferryfs_with_profiles`); its output, or a
/// failure.
fn cli_with(f: &Fixture, profiles: &[(String, String)], args: &[&std::ffi::OsStr]) -> String {
    ok(common::run(
        common::ferryfs_with_profiles(f.root.path(), profiles).args(args),
    ))
}

/// Issue 24 against a second S3 implementation, moto's S3 server, so that no single server's
/// quirks are baked in: POSIX to moto (streamed copies, eviction, a write into an evicted file
/// published with its unchanged ranges copied by the server, a rename), and Garage to moto
/// (two services: ranged GETs into parts). After commit rclone reads both sides back whole.
#[test]
fn an_s3_new_on_moto_streams_evicts_and_commits_exactly() {
    use std::ffi::OsStr;
    let m = common::moto::Moto::start();
    let new_profile = m.profile("new");
    // POSIX to moto.
    m.bucket("moto-from-posix");
    let f = Fixture::new();
    let mut big = pattern((80 << 20) + 11, 3);
    common::write(&f.old.join("big.bin"), &big);
    for i in 0..50 {
        let p = f.old.join(format!("d{}/f{i:02}", i % 5));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern(3000 + i, i)).unwrap();
    }
    let st = f.state.as_os_str();
    let run = |args: &[&OsStr]| cli_with(&f, std::slice::from_ref(&new_profile), args);
    run(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        f.old.as_os_str(),
        "--new".as_ref(),
        "s3://moto-from-posix".as_ref(),
        "--state".as_ref(),
        st,
        "--new-s3-profile".as_ref(),
        "new".as_ref(),
    ]);
    cli_mount(&run, st, &f.mnt);
    write_synced(&f.v("born.txt"), b"born in the view");
    run(&[
        "execute".as_ref(),
        "--state".as_ref(),
        st,
        "--wait".as_ref(),
    ]);
    wait_for("the files evicted", 30, || published(&f, "evicted") >= 52);
    // A write into the evicted 80 MiB file: one chunk staged, then published (part copies of
    // the rest from the object itself) and evicted again.
    pwrite_synced(&f.v("big.bin"), 40 << 20, b"changed in the middle");
    big[40 << 20..(40 << 20) + 21].copy_from_slice(b"changed in the middle");
    fs::rename(f.v("d1/f01"), f.v("d1/renamed")).unwrap();
    cli_finish(&run, st);
    assert!(
        fs::read(f.v("big.bin")).unwrap() == big,
        "big.bin through the view"
    );
    ok(ferryfs(&["unmount".as_ref(), f.mnt.as_os_str()]));
    common::write(&f.old.join("big.bin"), &big);
    fs::write(f.old.join("born.txt"), b"born in the view").unwrap();
    fs::rename(f.old.join("d1/f01"), f.old.join("d1/renamed")).unwrap();
    let out = common::run(m.rclone().args([
        "check",
        "--download",
        f.old.to_str().unwrap(),
        "m:moto-from-posix",
    ]));
    assert!(
        out.status.success(),
        "rclone check (POSIX to moto): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Garage to moto: two services.
    let a = common::garage::shared();
    a.bucket("moto-old");
    m.bucket("moto-from-garage");
    let o = store("moto-old");
    let meta = ferryfs::store::s3::PosixMeta {
        mode: Some(0o100640),
        uid: Some(0),
        gid: Some(0),
        mtime: Some((1_500_000_000, 0)),
    };
    o.put("top", b"top level".to_vec(), &meta).unwrap();
    o.put("dir/big", pattern((40 << 20) + 5, 9), &meta).unwrap();
    let g = Fixture::new();
    let profiles = [a.profile("old"), new_profile.clone()];
    let st = g.state.as_os_str();
    let run = |args: &[&OsStr]| cli_with(&g, &profiles, args);
    run(&[
        "prepare".as_ref(),
        "--old".as_ref(),
        "s3://moto-old".as_ref(),
        "--new".as_ref(),
        "s3://moto-from-garage".as_ref(),
        "--state".as_ref(),
        st,
        "--old-s3-profile".as_ref(),
        "old".as_ref(),
        "--new-s3-profile".as_ref(),
        "new".as_ref(),
    ]);
    cli_mount(&run, st, &g.mnt);
    fs::write(g.mnt.join("made"), b"through the view").unwrap();
    cli_finish(&run, st);
    ok(ferryfs(&["unmount".as_ref(), g.mnt.as_os_str()]));
    o.put("made", b"through the view".to_vec(), &meta).unwrap();
    let mut c = a.rclone();
    c.envs(
        m.rclone()
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
    )
    .args(["check", "--download", "g:moto-old", "m:moto-from-garage"]);
    let out = common::run(&mut c);
    assert!(
        out.status.success(),
        "rclone check (Garage to moto): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Byte `i` of the test file with `seed` (the same as `pattern`).
fn byte_at(i: u64, seed: usize) -> u8 {
    ((i as usize * 31 + seed) % 251) as u8
}

/// Bytes [off, off + len) of the test file with `seed`.
fn piece(off: u64, len: usize, seed: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte_at(off + i, seed)).collect()
}

/// `size` bytes written to the view's `p` in 1 MiB writes, an fsync every 64 MiB and at the
/// end; every write must succeed.
fn write_through(p: &Path, size: u64, seed: usize) {
    let h = fs::File::create(p).unwrap();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        h.write_all_at(&piece(off, n, seed), off)
            .unwrap_or_else(|e| panic!("write of {} at {off}: {e}", p.display()));
        off += n as u64;
        if off % (64 << 20) == 0 {
            h.sync_all()
                .unwrap_or_else(|e| panic!("fsync of {} at {off}: {e}", p.display()));
        }
    }
    h.sync_all().unwrap();
}

/// Whether the bucket's `key` is the test file of `size` bytes with `seed`, read in pieces.
fn object_is(s: &Arc<S3Store>, key: &str, size: u64, seed: usize) -> bool {
    let Some(info) = s.head(key).unwrap() else {
        return false;
    };
    if info.size != size {
        return false;
    }
    let r = ObjectReader::new(s.clone(), info, 16 << 20);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(16 << 20) as usize;
        if r.read_at(off, n).unwrap() != piece(off, n, seed) {
            return false;
        }
        off += n as u64;
    }
    true
}

/// Issue 24: more than 1 GiB written through the view into an S3 NEW (a file of 600 MiB and
/// four of 110 MiB, written at once from two threads, fsynced as they go) through a state dir
/// on a 128 MiB file system, at the default --stage-max: writes wait for uploads when the
/// staging tree is full (a file still open is uploaded as it is and evicted), none fails, and
/// after commit the bucket holds every byte.
#[test]
fn a_gib_written_through_the_view_fits_a_128_mib_state_dir() {
    let bucket = "stage-writes-1g";
    let mut f = Fixture::new();
    let _statefs = SmallFs::mount(&f.state, "128m");
    fs::write(f.old.join("old.txt"), b"from OLD").unwrap();
    prepare_into(&f, bucket, &[]);
    let sampler = PeakUse::start(&f.state);
    let mp = f.mnt.clone();
    f.mount_with(&mp, &[]);
    let files: Vec<(String, u64, usize)> = std::iter::once(("big.bin".to_string(), 600 << 20, 1))
        .chain((0..4).map(|i| (format!("w/part-{i}.bin"), (110 << 20) + i as u64, 10 + i)))
        .collect();
    let total: u64 = files.iter().map(|(_, n, _)| n).sum();
    assert!(total > 1 << 30);
    fs::create_dir(f.v("w")).unwrap();
    let began = std::time::Instant::now();
    std::thread::scope(|s| {
        let (big, rest) = files.split_first().unwrap();
        let view = |name: &str| f.v(name);
        let p = view(&big.0);
        s.spawn(move || write_through(&p, big.1, big.2));
        let rest: Vec<_> = rest.iter().map(|(n, sz, sd)| (view(n), *sz, *sd)).collect();
        s.spawn(move || {
            for (p, size, seed) in rest {
                write_through(&p, size, seed);
            }
        });
    });
    let wrote = began.elapsed();
    let st = f.status_json();
    println!(
        "stage: {}",
        serde_json::to_string(&st["published"]).unwrap()
    );
    ok(f.cmd("execute", &["--wait"]));
    ok(f.cmd("verify", &[]));
    ok(f.cmd("commit", &[]));
    f.unmount();
    let peak = sampler.stop();
    println!(
        "{total} bytes written through the view in {:.1} s; peak bytes used under the state \
         dir: {peak} ({:.1} MiB of a 128 MiB file system)",
        wrote.as_secs_f64(),
        peak as f64 / (1 << 20) as f64
    );
    let s = store(bucket);
    for (name, size, seed) in &files {
        assert!(object_is(&s, name, *size, *seed), "the bucket's {name}");
    }
    let mut keys = Vec::new();
    s.list_all(&mut |k, _| keys.push(k.to_string())).unwrap();
    keys.sort();
    let mut want: Vec<String> = files.iter().map(|(n, _, _)| n.clone()).collect();
    want.extend(["old.txt".to_string(), "w/".to_string()]);
    want.sort();
    assert_eq!(keys, want, "the bucket after commit");
    assert!(s.unfinished_uploads().unwrap().is_empty());
}

/// Issue 24: a single allocation larger than the whole staging bound cannot wait for room:
/// it fails with ENOSPC and the log names the flag. Writes under it go on.
#[test]
fn an_allocation_larger_than_the_stage_bound_fails_with_enospc() {
    let mut f = start("stage-max-enospc", |_| {}, &[]);
    f.unmount();
    let mp = f.mnt.clone();
    f.mount_with(&mp, &["--stage-max", "8M"]);
    let h = fs::File::create(f.v("prealloc.bin")).unwrap();
    let err = rustix::fs::fallocate(&h, rustix::fs::FallocateFlags::empty(), 0, 16 << 20)
        .expect_err("a 16 MiB allocation under an 8 MiB bound");
    assert_eq!(err, rustix::io::Errno::NOSPC);
    drop(h);
    write_synced(&f.v("small.bin"), &pattern(4 << 20, 3));
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert!(
        log.contains("--stage-max"),
        "the log names the flag:\n{log}"
    );
    let st = f.status_json();
    assert_eq!(st["published"]["stage_max"].as_u64(), Some(8 << 20));
    ok(f.cmd("execute", &["--wait"]));
    ok(f.cmd("commit", &[]));
    f.unmount();
    assert!(object(&store("stage-max-enospc"), "small.bin") == pattern(4 << 20, 3));
}

/// The view's `p` written in 1 MiB pieces of the test file with `seed`, an fsync every 4 MiB,
/// until a write or an fsync fails (the daemon killed) or `size` is written; `acked` holds the
/// bytes the last successful fsync covered.
fn write_until_failure(p: &Path, size: u64, seed: usize, acked: &std::sync::atomic::AtomicU64) {
    let h = fs::File::create(p).unwrap();
    let mut off = 0;
    while off < size {
        if h.write_all_at(&piece(off, 1 << 20, seed), off).is_err() {
            return;
        }
        off += 1 << 20;
        if off % (4 << 20) == 0 {
            if h.sync_all().is_err() {
                return;
            }
            acked.store(off, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Issue 24, crash safety: kill -9 of the daemon while writes wait for staging room (a 16 MiB
/// bound, a file written far past it, so it is being uploaded and evicted while still open).
/// After mount again every fsynced byte is in the view, the migration completes, and the bucket
/// holds the view exactly, with no multipart upload left unfinished.
#[test]
fn kill_9_in_the_middle_of_back_pressure_loses_no_acknowledged_write() {
    let bucket = "stage-kill9-pressure";
    let mut f = start(
        bucket,
        |old| fs::write(old.join("old.txt"), b"from OLD").unwrap(),
        &[],
    );
    f.unmount();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mp = f.mnt.clone();
    f.mount_with(&mp, &["--stage-max", "16M", "--metrics-addr", &addr]);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (p, acked) = (f.v("big.bin"), acked.clone());
        std::thread::spawn(move || write_until_failure(&p, 1 << 30, 5, &acked))
    };
    let metric = |name: &str| {
        common::http_get(port, "/metrics")
            .map(|(_, body)| common::parse_metrics(&body))
            .and_then(|m| m.get(name).copied())
            .unwrap_or(0.0)
    };
    wait_for(
        "writes to wait for staging room, well past the bound",
        300,
        || {
            acked.load(std::sync::atomic::Ordering::Acquire) >= 64 << 20
                && metric("ferryfs_stage_waits_total") >= 2.0
        },
    );
    assert!(
        metric("ferryfs_evictions_total") >= 1.0,
        "the premise: the open file was uploaded and evicted while written"
    );
    f.kill9();
    writer.join().unwrap();
    let acked = acked.load(std::sync::atomic::Ordering::Acquire);
    assert!(
        acked < 1 << 30,
        "the premise: the writer was cut off by kill -9"
    );
    f.mount_with(&mp, &[]);
    let s = store(bucket);
    assert!(
        s.unfinished_uploads().unwrap().is_empty(),
        "a multipart upload left unfinished after mount"
    );
    {
        let h = fs::File::open(f.v("big.bin")).unwrap();
        let size = h.metadata().unwrap().len();
        assert!(
            size >= acked,
            "big.bin has {size} bytes, {acked} were fsynced"
        );
        let mut off = 0;
        while off < acked {
            let n = (acked - off).min(16 << 20) as usize;
            let mut buf = vec![0u8; n];
            h.read_exact_at(&mut buf, off).unwrap();
            assert!(buf == piece(off, n, 5), "fsynced bytes at {off} lost");
            off += n as u64;
        }
    }
    let size = fs::metadata(f.v("big.bin")).unwrap().len();
    ok(f.cmd("execute", &["--wait"]));
    ok(f.cmd("verify", &[]));
    ok(f.cmd("commit", &[]));
    f.unmount();
    let mut keys = Vec::new();
    s.list_all(&mut |k, _| keys.push(k.to_string())).unwrap();
    keys.sort();
    assert_eq!(keys, ["big.bin", "old.txt"], "the bucket after commit");
    let info = s.head("big.bin").unwrap().unwrap();
    assert_eq!(info.size, size, "the bucket's big.bin has the view's size");
    let r = ObjectReader::new(s.clone(), info, 16 << 20);
    let mut off = 0;
    while off < acked {
        let n = (acked - off).min(16 << 20) as usize;
        assert!(
            r.read_at(off, n).unwrap() == piece(off, n, 5),
            "the bucket's big.bin at {off}"
        );
        off += n as u64;
    }
    assert!(s.unfinished_uploads().unwrap().is_empty());
}
