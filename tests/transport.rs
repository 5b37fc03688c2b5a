//! `mount --transport`: FUSE over io_uring when the kernel offers it, /dev/fuse otherwise, and
//! what the operator sees of it (status, /metrics, the daemon's rings). The conformance suites
//! run over both transports in tests/conformance.rs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    parse_metrics(&body)
}

/// The daemon's io_uring instances, and its threads by name.
fn rings_and_threads(pid: i32) -> (usize, Vec<String>) {
    let rings = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy() == "anon_inode:[io_uring]")
        .count();
    let threads = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    (rings, threads)
}

/// Wait until daemon `pid` serves `n` ring threads, one io_uring each.
fn serves_rings(pid: i32, n: usize) {
    let mut last = (0, Vec::new());
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(10) {
        last = rings_and_threads(pid);
        let ring_threads = last
            .1
            .iter()
            .filter(|t| t.starts_with("fuser-ring"))
            .count();
        if ring_threads == n && last.0 == n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("daemon {pid}: want {n} ring threads with a ring each, have {last:?}");
}

fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Some work through the view: names, metadata, data both ways (1 MiB requests), a listing.
fn exercise(f: &Fixture) {
    for i in 0..200 {
        fs::write(f.v(&format!("new/f{i}")), format!("file {i}")).unwrap();
    }
    assert_eq!(fs::read_dir(f.v("new")).unwrap().count(), 200);
    assert_eq!(fs::read(f.v("new/f123")).unwrap(), b"file 123");
    let big: Vec<u8> = (0..(9 << 20) + 17).map(|i: u32| (i % 251) as u8).collect();
    fs::write(f.v("new/big"), &big).unwrap();
    assert!(fs::read(f.v("new/big")).unwrap() == big);
    assert!(fs::read(f.v("old-big")).unwrap() == pattern_old());
    fs::rename(f.v("new/f1"), f.v("new/g1")).unwrap();
    fs::remove_file(f.v("new/f2")).unwrap();
    assert!(fs::metadata(f.v("new/f2")).is_err());
}

fn pattern_old() -> Vec<u8> {
    (0..(5 << 20) + 3).map(|i: u32| (i % 241) as u8).collect()
}

fn fixture() -> Fixture {
    let f = Fixture::new();
    write(&f.old.join("old-big"), &pattern_old());
    fs::create_dir(f.old.join("new")).unwrap();
    f.prepare();
    f
}

/// A view over `transport` with the copier off and its metrics on the port returned.
fn mounted_over(transport: &'static str) -> (Fixture, u16) {
    let mut f = fixture().over(transport);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    f.mount_with(&f.mnt.clone(), &["--no-copy", "--metrics-addr", &addr]);
    f.assert_transport();
    (f, port)
}

#[test]
fn a_view_over_io_uring_serves_from_rings_and_says_so_in_status_and_metrics() {
    let (mut f, port) = mounted_over("uring");
    let st = f.status_json();
    assert_eq!(
        st["transport"]["queues"].as_u64(),
        Some(possible_cpus() as u64)
    );
    assert_eq!(st["transport"]["payload_bytes"].as_u64(), Some(1 << 20));
    let m = scrape(port);
    assert_eq!(m["ferryfs_fuse_transport{transport=\"io_uring\"}"], 1.0);
    assert_eq!(m["ferryfs_fuse_transport{transport=\"dev\"}"], 0.0);
    let pid = f.daemon_pid().expect("a daemon serves");
    let (rings, threads) = rings_and_threads(pid);
    let ring_threads = threads
        .iter()
        .filter(|t| t.starts_with("fuser-ring"))
        .count();
    // --threads 8 by default, and at least one per queue.
    assert_eq!(ring_threads, 8.max(possible_cpus()), "threads: {threads:?}");
    assert_eq!(rings, ring_threads, "one io_uring per ring thread");
    // Each ring thread runs on its queue's CPU (where its requests' callers run), as this test
    // process may run on every CPU.
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = fs::read_to_string(t.join("comm")).unwrap();
        let Some(q) = comm.trim().strip_prefix("fuser-ring") else {
            continue;
        };
        let q = q.split('-').next().unwrap();
        let status = fs::read_to_string(t.join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(cpus, q, "{} is not pinned to CPU {q}", comm.trim());
    }
    exercise(&f);
    let text = ok(f.cmd("status", &[]));
    assert!(
        text.contains("transport:  io_uring"),
        "status does not show the transport: {text}"
    );
    f.unmount();
}

#[test]
fn a_view_over_dev_fuse_makes_no_ring() {
    let (mut f, port) = mounted_over("dev");
    let m = scrape(port);
    assert_eq!(m["ferryfs_fuse_transport{transport=\"dev\"}"], 1.0);
    assert_eq!(m["ferryfs_fuse_transport{transport=\"io_uring\"}"], 0.0);
    let (rings, threads) = rings_and_threads(f.daemon_pid().unwrap());
    assert_eq!(rings, 0);
    assert!(!threads.iter().any(|t| t.starts_with("fuser-ring")));
    exercise(&f);
    f.unmount();
}

/// seccomp: io_uring_setup fails with EPERM in the mount command and the daemon it forks, as
/// under a container runtime's default profile.
fn without_io_uring(cmd: &mut Command) -> &mut Command {
    // SAFETY: between fork and exec only prctl is called, with a filter that lives on the
    // child's stack for the call.
    unsafe {
        cmd.pre_exec(|| {
            const IO_URING_SETUP: u32 = 425;
            const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
            let ld = |k| libc::sock_filter {
                code: 0x20, // BPF_LD | BPF_W | BPF_ABS
                jt: 0,
                jf: 0,
                k,
            };
            let jeq = |k, jt, jf| libc::sock_filter {
                code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
                jt,
                jf,
                k,
            };
            let ret = |k| libc::sock_filter {
                code: 0x06, // BPF_RET | BPF_K
                jt: 0,
                jf: 0,
                k,
            };
            let prog = [
                ld(4), // seccomp_data.arch
                jeq(AUDIT_ARCH_X86_64, 0, 3),
                ld(0), // seccomp_data.nr
                jeq(IO_URING_SETUP, 0, 1),
                ret(0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO
                ret(0x7fff_0000),                      // SECCOMP_RET_ALLOW
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &fprog as *const _) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn mount_cmd(f: &Fixture, transport: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["mount", "--no-copy", "--transport", transport, "--state"])
        .arg(&f.state)
        .arg(&f.mnt);
    c
}

#[test]
fn auto_falls_back_to_dev_fuse_where_io_uring_is_blocked_and_uring_refuses_to_mount() {
    require_io_uring();
    assert!(
        std::env::consts::ARCH == "x86_64",
        "this test's seccomp filter is written for x86_64"
    );
    let f = fixture();
    // `uring`, demanded: the mount fails with the reason, and nothing stays mounted.
    let out = run(without_io_uring(&mut mount_cmd(&f, "uring")));
    assert!(!out.status.success(), "mounted without io_uring");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--transport uring") && err.contains("cannot use io_uring"),
        "unclear error: {err}"
    );
    assert_not_mounted(&f.mnt, "a failed mount left the view mounted");
    // `auto`: served through /dev/fuse, said in the log, and it works.
    ok(run(without_io_uring(&mut mount_cmd(&f, "auto"))));
    let mut f = f;
    f.transport = Some("dev");
    f.assert_transport();
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert!(
        log.contains("FUSE over io_uring cannot be used"),
        "the fall-back is not logged: {log}"
    );
    exercise(&f);
    f.unmount();
}

/// A takeover of a view over io_uring hands its ring entries over: the new daemon maps their
/// memory where the kernel has it, answers the requests they hold and serves each entry from
/// a ring of its own (as many ring threads as the old daemon had, whatever `--threads` or
/// `--transport` it is given); the old daemon exits and nothing else changes. Twice, so a
/// daemon that took its rings over hands them on again.
#[test]
fn a_takeover_of_a_view_over_io_uring_hands_its_rings_to_the_new_daemon() {
    let mut f = fixture().over("uring");
    f.mount_with(&f.mnt.clone(), &["--threads", "3"]);
    let first = f.daemon_pid().unwrap();
    let ring_threads = 3.max(possible_cpus());
    serves_rings(first, ring_threads);
    fs::write(f.v("before"), b"1").unwrap();
    let mut held = fs::File::open(f.v("old-big")).unwrap();
    let mut head = vec![0u8; 1000];
    std::io::Read::read_exact(&mut held, &mut head).unwrap();
    let mut before = first;
    for args in [
        &["--takeover", "--threads", "16"][..],
        &["--takeover", "--transport", "dev"][..],
    ] {
        f.transport = None;
        ok(f.try_mount(&f.mnt.clone(), args));
        f.transport = Some("uring");
        wait_for("the old daemon to exit", 10, || process_gone(before));
        let pid = f.daemon_pid().unwrap();
        assert_ne!(pid, before, "{args:?}: the daemon was not replaced");
        f.assert_transport();
        // As many ring threads as entries handed over, one ring each.
        serves_rings(pid, ring_threads);
        before = pid;
    }
    // The file opened before goes on, and the view works as before.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut rest).unwrap();
    head.extend(rest);
    assert!(head == pattern_old());
    drop(held);
    assert_eq!(fs::read(f.v("before")).unwrap(), b"1");
    exercise(&f);
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    assert!(
        log.matches("FUSE requests come over io_uring").count() >= 3,
        "{log}"
    );
    f.unmount();
}

/// Requests held in ring entries at a takeover carry their payloads to the new daemon: 1 MiB
/// writes served by the daemon (`--passthrough off`) from three writers on two entries land
/// exactly, across eight takeovers.
#[test]
fn writes_held_in_ring_entries_at_a_takeover_land_exactly() {
    let mut f = fixture().over("uring");
    f.mount_with(
        &f.mnt.clone(),
        &["--no-copy", "--passthrough", "off", "--threads", "1"],
    );
    let chunk = |w: usize, i: usize| -> Vec<u8> {
        (0..1usize << 20)
            .map(|k| (k.wrapping_mul(31) ^ w.wrapping_mul(7) ^ i) as u8)
            .collect()
    };
    const CHUNKS: usize = 64;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let path = f.v(&format!("w{w}"));
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let file = fs::File::create(&path).unwrap();
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
                    for i in 0..CHUNKS {
                        file.write_all_at(&chunk(w, i ^ rounds), (i << 20) as u64)
                            .unwrap();
                    }
                    rounds += 1;
                }
                rounds - 1
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut before = f.daemon_pid().unwrap();
    for _ in 0..8 {
        f.transport = None;
        ok(f.try_mount(&f.mnt.clone(), &["--takeover"]));
        f.transport = Some("uring");
        wait_for("the old daemon to exit", 10, || process_gone(before));
        before = f.daemon_pid().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (w, t) in writers.into_iter().enumerate() {
        let last = t.join().unwrap();
        let got = fs::read(f.v(&format!("w{w}"))).unwrap();
        assert_eq!(got.len(), CHUNKS << 20);
        for i in 0..CHUNKS {
            assert!(
                got[i << 20..(i + 1) << 20] == chunk(w, i ^ last),
                "writer {w}: chunk {i} is not what its last round wrote"
            );
        }
    }
    f.assert_transport();
    // The rings carried requests with their payloads (which requests the entries hold at each
    // handover is up to timing: each write is preceded by a GETXATTR of its file's
    // `security.capability`, a 20-byte payload; a held 1 MiB write shows as >= 1 MiB).
    let log = fs::read_to_string(f.state.join("ferryfs.log")).unwrap();
    let held: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("held_request_bytes=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .collect();
    assert_eq!(held.len(), 8, "{log}");
    assert!(
        held.iter().any(|&b| b > 2 * 288),
        "no takeover handed over a request's payload: {held:?}"
    );
    eprintln!("held request bytes per takeover: {held:?}");
    f.unmount();
}

/// A daemon kept off a CPU (its affinity, as a cpuset would) cannot fill that CPU's queue's
/// free ring entries (only a request made on that CPU lands there): its takeover is refused
/// at once with the reason and the way out, and it serves on.
#[test]
fn a_takeover_over_io_uring_is_refused_at_once_when_a_queues_cpu_is_out_of_reach() {
    assert!(
        possible_cpus() >= 2,
        "this test needs 2 CPUs or more (it keeps the daemon off one)"
    );
    let mut f = fixture().over("uring");
    let mut cmd = mount_cmd(&f, "uring");
    // SAFETY: only sched_setaffinity between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ok(run(&mut cmd));
    f.assert_transport();
    let pid = f.daemon_pid().unwrap();
    serves_rings(pid, 8.max(possible_cpus()));
    let t = std::time::Instant::now();
    f.transport = None;
    let out = f.try_mount(&f.mnt.clone(), &["--takeover"]);
    f.transport = Some("uring");
    assert!(!out.status.success(), "the takeover went through");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        (err.contains("may not run on CPUs") || err.contains("offline"))
            && err.contains("--transport dev")
            && err.contains("keeps serving"),
        "unclear refusal: {err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "refused only after {:?}",
        t.elapsed()
    );
    assert_eq!(f.daemon_pid(), Some(pid), "the old daemon was replaced");
    f.assert_transport();
    exercise(&f);
    f.unmount();
}

#[test]
fn a_takeover_asked_for_io_uring_serves_what_the_first_daemon_negotiated() {
    require_io_uring();
    let mut f = fixture().over("dev");
    f.mount();
    let pid = f.daemon_pid().unwrap();
    f.transport = None;
    ok(f.try_mount(&f.mnt.clone(), &["--takeover", "--transport", "uring"]));
    assert_ne!(f.daemon_pid(), Some(pid), "the daemon was not replaced");
    f.transport = Some("dev");
    f.assert_transport();
    exercise(&f);
    f.unmount();
}
