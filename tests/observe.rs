//! Watching a migration from outside: /metrics scraped while the copier copies, /healthz and
//! /readyz, JSON logs without secrets, and the start-up errors an operator can make.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use common::*;

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "/metrics: {body}");
    parse_metrics(&body)
}

/// OLD holds `d/<name>` for each name; the view is mounted without the copier, its metrics on
/// the port returned, with `args` added.
fn mount_dir_with_metrics(names: impl Iterator<Item = String>, args: &[&str]) -> (Fixture, u16) {
    let mut f = Fixture::new();
    for n in names {
        write(&f.old.join("d").join(n), b"x");
    }
    f.prepare();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut all = vec!["--no-copy", "--metrics-addr", &addr];
    all.extend_from_slice(args);
    f.mount_with(&f.mnt.clone(), &all);
    (f, port)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in /metrics; have: {:?}", m.keys()))
}

#[test]
fn metrics_are_scraped_during_a_migration_and_follow_it() {
    let mut f = Fixture::new();
    let mut total = 0u64;
    fs::create_dir(f.old.join("d")).unwrap();
    for i in 0..24 {
        let data = vec![b'a' + (i % 26) as u8; 256 << 10];
        write(&f.old.join(format!("d/f{i:02}")), &data);
        total += data.len() as u64;
    }
    write(&f.old.join("read-me"), &vec![7u8; 100_000]);
    write(&f.old.join("append-me"), b"old bytes\n");
    write(&f.old.join("delete-me"), b"gone soon\n");
    total += 100_000 + 10 + 10;
    f.prepare();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Copier off at first, so the reads below are sure to fall through to OLD.
    f.mount_with(&f.mnt.clone(), &["--no-copy", "--metrics-addr", &addr]);

    let m0 = scrape(port);
    assert_eq!(get(&m0, "ferryfs_total_bytes"), total as f64);
    assert_eq!(get(&m0, "ferryfs_total_files"), 27.0);
    assert_eq!(get(&m0, "ferryfs_pending_bytes"), total as f64);
    assert_eq!(get(&m0, "ferryfs_phase{phase=\"prepared\"}"), 1.0);
    assert_eq!(get(&m0, "ferryfs_copier_running"), 0.0);

    // Application traffic: a fall-through read, a copy-up, a failed lookup.
    assert_eq!(fs::read(f.v("read-me")).unwrap(), vec![7u8; 100_000]);
    fs::OpenOptions::new()
        .append(true)
        .open(f.v("append-me"))
        .and_then(|mut h| std::io::Write::write_all(&mut h, b"new\n"))
        .unwrap();
    assert!(fs::metadata(f.v("no-such-name")).is_err());
    fs::remove_file(f.v("delete-me")).unwrap();
    let m1 = scrape(port);
    assert!(get(&m1, "ferryfs_fallthrough_reads_total") >= 1.0);
    assert!(get(&m1, "ferryfs_fallthrough_read_bytes_total") >= 100_000.0);
    assert_eq!(get(&m1, "ferryfs_copy_ups_total"), 1.0);
    assert!(get(&m1, "ferryfs_fuse_requests_total{op=\"lookup\"}") >= 3.0);
    assert!(get(&m1, "ferryfs_fuse_requests_total{op=\"read\"}") >= 1.0);
    assert!(get(&m1, "ferryfs_fuse_errors_total{op=\"lookup\"}") >= 1.0);
    assert!(
        get(
            &m1,
            "ferryfs_fuse_request_duration_seconds_count{op=\"lookup\"}"
        ) >= 3.0
    );
    assert!(
        get(
            &m1,
            "ferryfs_fuse_request_duration_seconds_bucket{op=\"lookup\",le=\"+Inf\"}"
        ) >= 3.0
    );
    assert!(get(&m1, "ferryfs_opens_total{path=\"daemon\"}") >= 1.0);
    // The tombstone was made durable before the unlink returned.
    assert!(
        get(
            &m1,
            "ferryfs_journal_write_duration_seconds_count{sync=\"true\"}"
        ) >= 1.0
    );

    // The copier, throttled so that it is watched at work: 6.2 MiB at 1 MiB/s.
    ok(f.cmd("execute", &["--bwlimit", "1M"]));
    let t = Instant::now();
    let mut seen_running = false;
    let mut seen_rate = false;
    let mut copied = Vec::new();
    loop {
        let m = scrape(port);
        seen_running |= get(&m, "ferryfs_copier_running") == 1.0;
        seen_rate |= get(&m, "ferryfs_copy_rate_bytes_per_second") > 0.0;
        copied.push((
            get(&m, "ferryfs_copied_bytes"),
            get(&m, "ferryfs_pending_bytes"),
        ));
        if get(&m, "ferryfs_phase{phase=\"executed\"}") == 1.0 {
            assert_eq!(get(&m, "ferryfs_pending_bytes"), 0.0);
            assert_eq!(get(&m, "ferryfs_pending_files"), 0.0);
            assert_eq!(get(&m, "ferryfs_copy_errors"), 0.0);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not executed after 60 s: {copied:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(seen_running, "ferryfs_copier_running never 1");
    assert!(
        seen_rate,
        "ferryfs_copy_rate_bytes_per_second never above 0"
    );
    // Several scrapes saw the copy in flight, copied going up while pending went down.
    let mid: Vec<_> = copied
        .iter()
        .filter(|(c, p)| *c > 0.0 && *p > 0.0)
        .collect();
    assert!(mid.len() >= 2, "too few scrapes mid-copy: {copied:?}");
    for w in copied.windows(2) {
        assert!(w[1].0 >= w[0].0, "copied went down: {copied:?}");
        assert!(w[1].1 <= w[0].1, "pending went up: {copied:?}");
    }

    // Health: both pages pass and say what they checked.
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    let names: Vec<&str> = h["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mount", "view"], "{body}");
    wait_for("readyz to list a checked view", 10, || {
        let (code, body) = http_get(port, "/readyz").unwrap();
        code == 200 && body.contains("statfs answered")
    });
    let (_, body) = http_get(port, "/readyz").unwrap();
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["serving", "mount", "view", "old_store", "new_store"],
        "{body}"
    );
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{body}"
    );
    assert_eq!(get(&scrape(port), "ferryfs_ready"), 1.0);
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);
    assert_eq!(http("POST", port, "/metrics").unwrap().0, 405);
    assert_eq!(http("HEAD", port, "/healthz").unwrap().0, 200);

    // The unmount is not held up by the probes, and the endpoints go with the daemon.
    f.unmount();
    assert!(
        http_get(port, "/metrics").is_none(),
        "metrics outlived the daemon"
    );
}

#[test]
fn after_commit_readyz_checks_new_and_no_longer_old() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    f.prepare();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    f.mount_with(&f.mnt.clone(), &["--metrics-addr", &addr]);
    wait_for("executed", 30, || f.status_json()["phase"] == "executed");
    ok(f.cmd("commit", &[]));
    f.unmount();
    // After commit the view is NEW alone: OLD may be gone, and is not a reason to be unready.
    fs::remove_dir_all(&f.old).unwrap();
    f.mount_with(&f.mnt.clone(), &["--metrics-addr", &addr]);
    wait_for("readyz with a checked view", 10, || {
        http_get(port, "/readyz").is_some_and(|(c, b)| c == 200 && b.contains("statfs answered"))
    });
    let (_, body) = http_get(port, "/readyz").unwrap();
    assert!(!body.contains("old_store"), "{body}");
    assert!(body.contains("new_store"), "{body}");
    let m = scrape(port);
    assert_eq!(get(&m, "ferryfs_phase{phase=\"committed\"}"), 1.0);
    f.unmount();
}

#[test]
fn a_metrics_address_in_use_fails_the_mount_with_the_reason() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    f.prepare();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = f.try_mount(&f.mnt, &["--metrics-addr", &addr]);
    assert!(!out.status.success(), "mount succeeded on a taken address");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--metrics-addr") && err.contains(&addr) && err.contains("in use"),
        "{err}"
    );
    assert_not_mounted(&f.mnt, "a view was left mounted");
    // Nothing was lost: the migration mounts fine on a free address.
    let port = free_port();
    f.mount_with(
        &f.mnt.clone(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(fs::read(f.v("a")).unwrap(), b"a");
    f.unmount();
}

#[test]
fn json_logs_are_one_object_per_line_and_carry_no_secret() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    write(&f.old.join("d/e/x"), b"x");
    f.prepare();
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";
    let out = run(std::process::Command::new(BIN)
        .args(["--log-format", "json", "mount", "--no-copy", "--state"])
        .arg(&f.state)
        .arg(&f.mnt)
        .env("FERRYFS_LOG", "debug")
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID"));
    ok(out);
    // Some traffic, including a failure that is logged with its op and errno.
    assert_eq!(fs::read(f.v("a")).unwrap(), b"a");
    assert!(fs::metadata(f.v("missing")).is_err());
    assert!(fs::metadata(f.v("d/e/gone")).is_err());
    let mut buf = [0u8; 16];
    assert!(rustix::fs::getxattr(f.v("d/e/x"), "user.none", &mut buf).is_err());
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(f.v("b"))
        .unwrap();
    f.unmount();
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    let mut messages = Vec::new();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if let Some(m) = v["fields"]["message"].as_str() {
            messages.push(m.to_string());
        }
        lines += 1;
    }
    assert!(lines > 3, "too few log lines: {log}");
    assert!(messages.iter().any(|m| m == "view serving"), "{messages:?}");
    // The failed lookup is logged inside its request's span, with op and errno.
    assert!(
        log.lines().any(|l| l.contains("request failed")
            && l.contains("\"op\":\"lookup\"")
            && l.contains("\"errno\":2")),
        "no lookup failure with op and errno in:\n{log}"
    );
    // ... and with the view path it was about.
    assert!(
        log.lines()
            .any(|l| l.contains("request failed") && l.contains("\"path\":\"/d/e/gone\"")),
        "no lookup failure with its path in:\n{log}"
    );
    // An xattr's name is not a path component: the path is the file's.
    assert!(
        log.lines().any(|l| l.contains("request failed")
            && l.contains("\"op\":\"getxattr\"")
            && l.contains("\"path\":\"/d/e/x\"")),
        "no getxattr failure with the file's path in:\n{log}"
    );
    assert!(!log.contains(secret), "the secret key reached the log");
    assert!(
        !log.contains("AKIAEXAMPLEKEYID"),
        "the access key reached the log"
    );
}

#[test]
fn prepare_if_absent_succeeds_again_for_the_same_stores_only() {
    let mut f = Fixture::new();
    write(&f.old.join("a"), b"a");
    let prepare = |f: &Fixture, new: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "--old",
            f.old.to_str().unwrap(),
            "--new",
            new.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        f.cmd("prepare", &args)
    };
    ok(prepare(&f, &f.new, &["--if-absent"]));
    // Again, with NEW no longer empty (a restart of a service mid-migration): nothing changes.
    write(&f.new.join("born-in-new"), b"x");
    let out = ok(prepare(&f, &f.new, &["--if-absent"]));
    assert!(out.contains("already prepared"), "{out}");
    // Without the flag, a second prepare is refused as before.
    let out = prepare(&f, &f.new, &[]);
    assert!(!out.status.success());
    // Other stores: refused, naming the migration the state dir holds.
    let other = f.root.path().join("other");
    fs::create_dir(&other).unwrap();
    let out = prepare(&f, &other, &["--if-absent"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds a migration of") && err.contains(f.new.to_str().unwrap()),
        "{err}"
    );
    // The migration still works.
    f.mount();
    assert_eq!(fs::read(f.v("a")).unwrap(), b"a");
    f.unmount();
    // A service restart after a crash of a view mounted in place: OLD's own path is a dead
    // mount, and the settings name it through a symlinked parent. Still the same migration.
    let old = f.old.clone();
    f.mount_at(&old);
    f.kill9();
    // Past the kernel's attribute cache (--metadata-ttl 1 s): the dead path now gives ENOTCONN.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fs::metadata(&old).is_err(), "the dead view still answers");
    let link = f.root.path().join("via-link");
    std::os::unix::fs::symlink(f.root.path(), &link).unwrap();
    let out = f.cmd(
        "prepare",
        &[
            "--if-absent",
            "--old",
            link.join("old").to_str().unwrap(),
            "--new",
            f.new.to_str().unwrap(),
        ],
    );
    assert!(ok(out).contains("already prepared"));
    f.mount_at(&old); // detaches the dead view by itself
    assert_eq!(fs::read(old.join("a")).unwrap(), b"a");
    f.unmount_at(&old);
}

#[test]
fn a_store_that_hangs_fails_readiness_not_liveness_and_recovers() {
    let mut f = Fixture::new();
    // OLD behind a FUSE server (bindfs) that this test can freeze, as an NFS server can hang.
    let src = f.root.path().join("old-src");
    fs::create_dir(&src).unwrap();
    write(&src.join("a"), b"a");
    /// Whatever happens, the frozen server is thawed and stopped at the end.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let bindfs = Server(
        std::process::Command::new("bindfs")
            .arg("-f")
            .arg(&src)
            .arg(&f.old)
            .spawn()
            .expect("bindfs is missing (scripts/setup.sh installs it)"),
    );
    wait_for("bindfs to serve OLD", 10, || f.old.join("a").exists());
    f.prepare();
    let port = free_port();
    f.mount_with(
        &f.mnt.clone(),
        &["--no-copy", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    // Every probe has answered once (on a loaded machine the OLD probe's first statfs may
    // still be on its way when the view's has come back).
    wait_for("readyz with every check answered", 10, || {
        http_get(port, "/readyz").is_some_and(|(c, b)| {
            c == 200 && b.contains("statfs answered") && !b.contains("not checked yet")
        })
    });
    let pid = rustix::process::Pid::from_raw(bindfs.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    // OLD no longer answers: readiness fails naming it, once its probe is 10 s silent.
    let t = Instant::now();
    wait_for("readyz to fail on the hung OLD store", 25, || {
        http_get(port, "/readyz").is_some_and(|(c, b)| c == 503 && b.contains("no answer for"))
    });
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "failed before the probe went stale"
    );
    let (_, body) = http_get(port, "/readyz").unwrap();
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let failing: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failing, ["old_store"], "{body}");
    // Liveness holds: the daemon and its view are fine, and a restart would not mend OLD.
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&scrape(port), "ferryfs_ready"), 0.0);
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    wait_for("readyz to pass again once OLD answers", 15, || {
        http_get(port, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    f.unmount();
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&f.old)
        .status();
    drop(bindfs);
}

#[test]
fn listings_with_attributes_count_lookups_exactly_as_the_kernel_does() {
    // 3,000 names: many READDIRPLUS replies, each ending with an entry that did not fit.
    let (mut f, port) = mount_dir_with_metrics(
        (0..3000).map(|i| format!("a-rather-long-file-name-{i:05}")),
        &[],
    );
    let ls = || {
        let out = run(std::process::Command::new("ls").arg("-l").arg(f.v("d")));
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(ls(), 3001, "ls -l shows every entry");
    let m = scrape(port);
    assert!(
        get(&m, "ferryfs_fuse_requests_total{op=\"readdirplus\"}") >= 2.0,
        "the kernel did not list with attributes"
    );
    assert!(
        get(&m, "ferryfs_fuse_requests_total{op=\"lookup\"}") < 100.0,
        "attributes came by lookups, not with the listing"
    );
    let known = get(&m, "ferryfs_inodes");
    assert!(known >= 3000.0, "{known} inodes known after listing 3,000");
    // The kernel forgets everything it can: every lookup it held comes back, and no more (an
    // entry counted but never received would keep its inode forever).
    let t = Instant::now();
    let mut left = known;
    while t.elapsed() < Duration::from_secs(20) {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        left = get(&scrape(port), "ferryfs_inodes");
        if left <= 3.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The root and at most the directory and one more the kernel keeps.
    assert!(
        left <= 3.0,
        "{left} inodes still held after the kernel forgot all it could"
    );
    // And none was given back early: everything still resolves.
    assert_eq!(ls(), 3001);
    for i in (0..3000).step_by(7) {
        fs::symlink_metadata(f.v(&format!("d/a-rather-long-file-name-{i:05}"))).unwrap();
    }
    f.unmount();
}

/// A warm `ls -lR` costs the daemon almost nothing per entry. Of what `ls -l` reads per entry
/// (Debian 12's coreutils: the security label, then the access ACL), the kernel keeps each
/// entry's ACL (FUSE_POSIX_ACL), and an entry without a label answers EOPNOTSUPP, after which
/// `ls` stops asking that device (`--selinux-absent eopnotsupp`, the default). With
/// `--selinux-absent enodata` the label is asked for every entry (and the ACL still is not).
#[test]
fn a_warm_ls_lr_asks_the_daemon_for_no_xattr_per_entry() {
    for (args, most) in [
        (&[][..], 8.0),
        (&["--selinux-absent", "enodata"][..], 520.0),
    ] {
        let names = (0..500).map(|i| format!("s{}/f{i:03}", i % 10));
        let (mut f, port) = mount_dir_with_metrics(names, args);
        let ls = || {
            let out = run(std::process::Command::new("ls").arg("-lR").arg(f.v("d")));
            assert!(out.status.success());
            let files = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with('-'))
                .count();
            assert_eq!(files, 500);
        };
        let getxattrs = || {
            get(
                &scrape(port),
                "ferryfs_fuse_requests_total{op=\"getxattr\"}",
            )
        };
        ls();
        let before = settled(getxattrs);
        ls();
        let asked = settled(getxattrs) - before;
        assert!(
            asked <= most,
            "{asked} GETXATTR requests for a warm ls -lR of 510 entries with {args:?} \
             (at most {most}): the kernel did not keep ACLs, or ls kept asking for labels"
        );
        if !args.is_empty() {
            // Each entry's label asked for, and no ACL.
            assert!(
                asked >= 500.0,
                "{asked} GETXATTRs with {args:?}: labels were not asked"
            );
        }
        f.unmount();
    }
}

/// A security label is a label whatever `--selinux-absent` says; only an entry without one
/// answers EOPNOTSUPP (default) or ENODATA.
#[test]
fn selinux_absent_changes_only_what_an_unlabeled_entry_answers() {
    for (args, absent) in [
        (&[][..], rustix::io::Errno::OPNOTSUPP),
        (
            &["--selinux-absent", "enodata"][..],
            rustix::io::Errno::NODATA,
        ),
    ] {
        let (mut f, _port) = mount_dir_with_metrics(["a", "b"].map(String::from).into_iter(), args);
        let label = b"system_u:object_r:var_t:s0";
        rustix::fs::setxattr(
            f.old.join("d/a"),
            "security.selinux",
            label,
            rustix::fs::XattrFlags::empty(),
        )
        .expect("the test's OLD holds security labels (root, a file system with xattrs)");
        let mut buf = [0u8; 256];
        let n = rustix::fs::getxattr(f.v("d/a"), "security.selinux", &mut buf).unwrap();
        assert_eq!(&buf[..n], label, "{args:?}");
        assert_eq!(
            rustix::fs::getxattr(f.v("d/b"), "security.selinux", &mut buf),
            Err(absent),
            "{args:?}"
        );
        // Other names are what the stores say.
        assert_eq!(
            rustix::fs::getxattr(f.v("d/b"), "security.other", &mut buf),
            Err(rustix::io::Errno::NODATA),
            "{args:?}"
        );
        // A label set through the view is read back.
        rustix::fs::setxattr(
            f.v("d/b"),
            "security.selinux",
            label,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let n = rustix::fs::getxattr(f.v("d/b"), "security.selinux", &mut buf).unwrap();
        assert_eq!(&buf[..n], label, "{args:?}");
        f.unmount();
    }
}

#[test]
fn an_unchanged_directory_is_listed_from_the_kernel_cache_until_it_changes() {
    let (mut f, port) = mount_dir_with_metrics((0..200).map(|i| format!("f{i}")), &[]);
    let names = || fs::read_dir(f.v("d")).unwrap().count();
    let listings = || {
        let m = scrape(port);
        get(&m, "ferryfs_fuse_requests_total{op=\"readdir\"}")
            + get(&m, "ferryfs_fuse_requests_total{op=\"readdirplus\"}")
    };
    assert_eq!(names(), 200);
    // A request is counted once its answer is sent: the count may lag the listing briefly.
    let first = settled(listings);
    assert!(first >= 1.0, "the first listing came from the daemon");
    for _ in 0..3 {
        assert_eq!(names(), 200);
    }
    assert_eq!(
        listings(),
        first,
        "an unchanged directory was listed by the daemon again"
    );
    // A change through the view: the kernel drops its cached listing by itself.
    write(&f.v("d/made-through-the-view"), b"y");
    assert_eq!(names(), 201);
    assert!(listings() > first, "listed from a stale cache");
    // Behind the view's back: OLD's directory times differ at the next open.
    std::thread::sleep(Duration::from_millis(20));
    write(&f.old.join("d/made-in-old"), b"z");
    assert_eq!(
        names(),
        202,
        "a name added in OLD is missing from the listing"
    );
    // A handle opened before a change and read after it: it lists the directory as it is
    // when it reads, and that is what the kernel's shared listing cache gets from it.
    let early = fs::File::open(f.v("d")).unwrap();
    write(&f.v("d/made-after-the-open"), b"w");
    let listed = list_fd(early);
    assert!(
        listed.iter().any(|n| n == "made-after-the-open"),
        "a handle read after a create misses the new name"
    );
    assert_eq!(
        names(),
        203,
        "the kernel's cached listing misses a new name"
    );
    f.unmount();
}

/// A counter once two readings 200 ms apart agree (requests are counted after their answer).
fn settled(read: impl Fn() -> f64) -> f64 {
    let mut last = read();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the counter never settled (last {last})");
}

/// The names read through an already open directory fd (readdir on that very handle).
fn list_fd(f: fs::File) -> Vec<String> {
    use std::os::fd::IntoRawFd;
    let mut out = Vec::new();
    // SAFETY: fdopendir takes ownership of a valid directory fd; every dirent pointer is used
    // before the next readdir call, and the stream is closed once.
    unsafe {
        let d = libc::fdopendir(f.into_raw_fd());
        assert!(!d.is_null(), "fdopendir");
        loop {
            let e = libc::readdir64(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            out.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(d);
    }
    out
}

#[test]
fn readdirplus_off_lists_names_only_and_every_stat_is_a_lookup() {
    let (mut f, port) =
        mount_dir_with_metrics((0..300).map(|i| format!("f{i}")), &["--readdirplus", "off"]);
    let out = run(std::process::Command::new("ls").arg("-l").arg(f.v("d")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 301);
    let m = scrape(port);
    assert_eq!(
        get(&m, "ferryfs_fuse_requests_total{op=\"readdirplus\"}"),
        0.0
    );
    assert!(get(&m, "ferryfs_fuse_requests_total{op=\"lookup\"}") >= 300.0);
    f.unmount();
}

/// `ferryfs status --watch | head -1`: once the reader is gone, status ends at once and
/// quietly, as Unix tools do, instead of panicking on the closed pipe.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let f = Fixture::new();
    write(&f.old.join("a"), b"a");
    f.prepare();
    let mut child = std::process::Command::new(BIN)
        .args(["status", "--watch", "--state"])
        .arg(&f.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    assert!(
        out.read(&mut buf).unwrap() > 0,
        "status --watch printed nothing"
    );
    drop(out);
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("status --watch went on for 10 s with nobody reading");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
}
