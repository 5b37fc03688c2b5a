//! Shared harness for tests that mount a real view: temp OLD/NEW/state dirs, the real
//! `ferryfs` binary, and a manifest of a tree (content and metadata) to compare stores.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod garage;
pub mod moto;
pub mod s3double;
pub mod stores;
pub mod trees;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferryfs");

/// Fail loudly, naming what is missing, when the machine cannot run FUSE tests.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount a real FUSE view (run scripts/setup.sh)"
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests must run as root: they mount FUSE and change owners"
    );
}

/// Whether process `pid` has exited: gone, or a zombie its parent has not reaped yet (its
/// cmdline is empty then).
pub fn process_gone(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.is_empty())
        .unwrap_or(true)
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

pub fn ferryfs(args: &[&OsStr]) -> Output {
    run(Command::new(BIN).args(args))
}

/// A command's stdout and stderr, as one text.
pub fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Fixture {
    pub root: tempfile::TempDir,
    pub old: PathBuf,
    pub new: PathBuf,
    pub state: PathBuf,
    pub mnt: PathBuf,
    /// `mount --transport` for every mount of this fixture (`None`: the default, `auto`).
    pub transport: Option<&'static str>,
    mounted: bool,
}

/// The fuse module's switch for FUSE over io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// A test of the io_uring transport needs the kernel to offer it; scripts/test.sh turns it on
/// for its run.
/// Nothing is mounted at `mp` (in this process's mount table).
pub fn assert_not_mounted(mp: &Path, why: &str) {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !table.contains(mp.to_str().unwrap()),
        "{why}: {} is in /proc/self/mountinfo",
        mp.display()
    );
}

pub fn require_io_uring() {
    let on = fs::read_to_string(ENABLE_URING).map(|v| v.trim() == "Y");
    assert!(
        matches!(on, Ok(true)),
        "FUSE over io_uring is not offered by this kernel ({ENABLE_URING}: {on:?}); this test \
         needs Linux 6.14+ with it on (`echo Y > {ENABLE_URING}`; scripts/test.sh does so for \
         its run and puts it back)"
    );
}

impl Fixture {
    /// Empty OLD and NEW; call `prepare` after filling OLD.
    pub fn new() -> Fixture {
        require_fuse();
        let root = tempfile::Builder::new()
            .prefix("ferryfs-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let p = root.path().to_path_buf();
        for d in ["old", "new", "mnt"] {
            fs::create_dir(p.join(d)).unwrap();
        }
        Fixture {
            old: p.join("old"),
            new: p.join("new"),
            state: p.join("state"),
            mnt: p.join("mnt"),
            root,
            transport: None,
            mounted: false,
        }
    }

    pub fn prepare(&self) {
        ok(self.cmd_prepare());
    }

    /// `prepare` of this fixture's stores, as it went (it may fail).
    pub fn cmd_prepare(&self) -> Output {
        self.cmd_prepare_with(&[])
    }

    /// `prepare` with extra arguments (bytes: patterns need not be UTF-8).
    pub fn cmd_prepare_with(&self, extra: &[&OsStr]) -> Output {
        let mut args: Vec<&OsStr> = vec![
            "prepare".as_ref(),
            "--old".as_ref(),
            self.old.as_os_str(),
            "--new".as_ref(),
            self.new.as_os_str(),
            "--state".as_ref(),
            self.state.as_os_str(),
        ];
        args.extend_from_slice(extra);
        ferryfs(&args)
    }

    /// Mount with the copier off: the view's rules alone.
    pub fn mount_at(&mut self, mp: &Path) {
        self.mount_with(mp, &["--no-copy"]);
    }

    /// Mount with extra `mount` arguments (no `--no-copy`: the copier runs unless told not to).
    pub fn mount_with(&mut self, mp: &Path, extra: &[&str]) {
        ok(self.try_mount(mp, extra));
        self.mounted = true;
    }

    /// `mount` at `mp` with extra arguments and environment variables.
    pub fn mount_env(&mut self, mp: &Path, extra: &[&str], env: &[(&str, &str)]) {
        ok(self.try_mount_env(mp, extra, env));
        self.mounted = true;
    }

    /// `mount` at `mp` with extra arguments, as it went (it may fail).
    pub fn try_mount(&self, mp: &Path, extra: &[&str]) -> Output {
        self.try_mount_env(mp, extra, &[])
    }

    /// `try_mount` with variables added to the daemon's environment.
    pub fn try_mount_env(&self, mp: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args: Vec<&OsStr> = vec![
            "mount".as_ref(),
            "--state".as_ref(),
            self.state.as_os_str(),
            mp.as_os_str(),
            "-o".as_ref(),
            "allow_other".as_ref(),
        ];
        if let Some(t) = self.transport {
            args.extend(["--transport".as_ref(), OsStr::new(t)]);
        }
        args.extend(extra.iter().map(|a| OsStr::new(*a)));
        run(Command::new(BIN).args(&args).envs(env.iter().copied()))
    }

    /// Run a ferryfs subcommand on this fixture's state dir (`--state` added).
    pub fn cmd(&self, sub: &str, extra: &[&str]) -> Output {
        let mut args: Vec<&OsStr> = vec![sub.as_ref(), "--state".as_ref(), self.state.as_os_str()];
        args.extend(extra.iter().map(|a| OsStr::new(*a)));
        ferryfs(&args)
    }

    pub fn mount(&mut self) {
        let mp = self.mnt.clone();
        self.mount_at(&mp);
    }

    /// Prepare and mount in one go.
    pub fn start(&mut self) {
        self.prepare();
        self.mount();
    }

    pub fn unmount_at(&mut self, mp: &Path) {
        ok(ferryfs(&["unmount".as_ref(), mp.as_os_str()]));
        self.mounted = false;
    }

    pub fn unmount(&mut self) {
        let mp = self.mnt.clone();
        self.unmount_at(&mp);
    }

    /// A path inside the view.
    pub fn v(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Use `mount --transport` `transport` ("dev" or "uring") for this fixture's mounts; the
    /// io_uring one needs the kernel to offer it.
    pub fn over(mut self, transport: &'static str) -> Fixture {
        if transport == "uring" {
            require_io_uring();
        }
        self.transport = Some(transport);
        self
    }

    /// The mounted view is served over the transport this fixture asked for.
    pub fn assert_transport(&self) {
        let want = match self.transport {
            Some("uring") => "io_uring",
            Some(t) => t,
            None => return,
        };
        let st = self.status_json();
        assert_eq!(
            st["transport"]["transport"].as_str(),
            Some(want),
            "the view is not served over {want}: status {}",
            st["transport"]
        );
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = ok(ferryfs(&[
            "status".as_ref(),
            "--state".as_ref(),
            self.state.as_os_str(),
            "--json".as_ref(),
        ]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    /// The pid of the daemon serving this fixture's state dir.
    pub fn daemon_pid(&self) -> Option<i32> {
        let state = fs::canonicalize(&self.state).ok()?;
        for ent in fs::read_dir("/proc").ok()? {
            let ent = ent.ok()?;
            let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = fs::read(ent.path().join("cmdline")) else {
                continue;
            };
            // A takeover's helpers over io_uring are forks of the daemon, named apart.
            if fs::read_to_string(ent.path().join("comm")).is_ok_and(|c| c.trim() == "ferryfs-fill")
            {
                continue;
            }
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            if args.iter().any(|a| *a == b"--foreground")
                && args.iter().any(|a| {
                    *a == state.as_os_str().as_bytes() || *a == self.state.as_os_str().as_bytes()
                })
            {
                return Some(pid);
            }
        }
        None
    }

    /// kill -9 the daemon and wait for it to be gone; the mount is left dead.
    pub fn kill9(&mut self) {
        let pid = self.daemon_pid().expect("daemon running");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        wait_for(&format!("daemon {pid} to die"), 10, || process_gone(pid));
        self.mounted = true; // dead, still mounted: the next mount must cope
    }
}

/// Abort the kernel FUSE connection of the mount at `mp` (fusectl), if there is one: what an
/// operator does to a mount whose daemon is gone or wedged. Its waiters get ENOTCONN.
pub fn abort_fuse_connection(mp: &Path) {
    let Ok(mp) = fs::canonicalize(mp) else { return };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // "36 35 0:41 / /mnt rw ... - fuse ferryfs:... rw,...": the connection is the minor.
    let Some(minor) = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && Path::new(f[4]) == mp && l.contains(" - fuse "))
            .then(|| f[2].split(':').nth(1).map(str::to_owned))
            .flatten()
    }) else {
        return;
    };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(&minor).exists() {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .stderr(std::process::Stdio::null())
            .status();
    }
    if fs::write(ctl.join(&minor).join("abort"), b"1").is_ok() {
        eprintln!("aborted the FUSE connection of {}", mp.display());
    }
}

/// Lazily unmount whatever is mounted at `mp`, first aborting its FUSE connection when
/// `abort` (a failed test, whose view may have no daemon left to answer).
pub fn detach_view(mp: &Path, abort: bool) {
    if abort {
        abort_fuse_connection(mp);
    }
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mp)
        .stderr(std::process::Stdio::null())
        .status();
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A failed test shows what the daemon said (FERRYFS_LOG=debug for more).
        if std::thread::panicking() {
            if let Some(keep) = std::env::var_os("FERRYFS_TEST_KEEP_LOG") {
                let _ = fs::copy(self.state.join("ferryfs.log"), keep);
            }
            if let Ok(log) = fs::read_to_string(self.state.join("ferryfs.log")) {
                let lines: Vec<&str> = log.lines().collect();
                let from = lines.len().saturating_sub(60);
                eprintln!(
                    "---- daemon log ({}), last {} lines ----\n{}",
                    self.state.join("ferryfs.log").display(),
                    lines.len() - from,
                    lines[from..].join("\n")
                );
            }
        }
        // Best effort, lazy: a failed test must not leave a mount behind for the next, nor a
        // daemon stuck on a connection nobody serves.
        for mp in [&self.mnt, &self.old] {
            detach_view(mp, std::thread::panicking());
        }
    }
}

/// What a tree holds, entry by entry: type, mode, owner, size, mtime (ns), content hash,
/// symlink target, xattrs, link count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub nlink: u64,
    pub content: u64,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

pub type Manifest = BTreeMap<Vec<u8>, EntryInfo>;

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut list[..]) else {
        return out;
    };
    for name in list[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let mut val = vec![0u8; 65536];
        if let Ok(l) = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut val[..]) {
            out.insert(name.to_vec(), val[..l].to_vec());
        }
    }
    out
}

pub fn entry_info(p: &Path, with_times: bool) -> EntryInfo {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else {
        "special"
    };
    EntryInfo {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if ft.is_dir() { 0 } else { md.len() },
        mtime_ns: if with_times && !ft.is_dir() {
            md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128
        } else {
            0
        },
        nlink: if ft.is_dir() { 0 } else { md.nlink() },
        content: if ft.is_file() {
            fnv(&fs::read(p).unwrap())
        } else {
            0
        },
        target: ft
            .is_symlink()
            .then(|| fs::read_link(p).unwrap().as_os_str().as_bytes().to_vec()),
        xattrs: xattrs(p),
    }
}

/// The manifest of a tree below `root` (root itself excluded).
pub fn manifest(root: &Path, with_times: bool) -> Manifest {
    let mut m = Manifest::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for ent in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let ent = ent.unwrap();
            let r = rel.join(ent.file_name());
            let info = entry_info(&root.join(&r), with_times);
            if info.kind == "dir" {
                stack.push(r.clone());
            }
            m.insert(r.as_os_str().as_bytes().to_vec(), info);
        }
    }
    m
}

/// Names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An OLD file with three names (`links/a`, `links/b`, `tree/c-link`; `tree` must exist) and
/// xattrs on it and on the directory `tree`: what migrations get wrong.
pub fn links_and_xattrs(old: &Path) {
    write(&old.join("links/a"), b"linked data");
    fs::hard_link(old.join("links/a"), old.join("links/b")).unwrap();
    fs::hard_link(old.join("links/a"), old.join("tree/c-link")).unwrap();
    let x = rustix::fs::XattrFlags::empty();
    rustix::fs::setxattr(old.join("links/a"), "user.colour", b"blue", x).unwrap();
    rustix::fs::setxattr(old.join("tree"), "user.dir", b"yes", x).unwrap();
}

/// OLD's hard links changed behind the view after the copy: a name OLD adds to a copied file
/// joins NEW's copy (one file, not a second copy), a name OLD removes leaves, a name OLD gives
/// to another file shows that file; after commit NEW (read at `new_data`) has OLD's links.
pub fn old_hard_link_changes_followed(f: &mut Fixture, new_data: &Path) {
    use std::os::unix::fs::MetadataExt;
    write(&f.old.join("one"), b"one");
    write(&f.old.join("d/p"), b"pair");
    fs::hard_link(f.old.join("d/p"), f.old.join("d/q")).unwrap();
    write(&f.old.join("r"), b"split");
    fs::hard_link(f.old.join("r"), f.old.join("d/s")).unwrap();
    ok(f.cmd_prepare());
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &[]);
    ok(f.cmd("execute", &["--wait"]));
    assert_eq!(
        fs::metadata(new_data.join("d/p")).unwrap().ino(),
        fs::metadata(new_data.join("d/q")).unwrap().ino()
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Behind the view, in OLD: two more names for `one`, one name of the pair removed, one
    // name of `r` given to a file of its own.
    fs::hard_link(f.old.join("one"), f.old.join("two")).unwrap();
    fs::hard_link(f.old.join("one"), f.old.join("d/three")).unwrap();
    fs::remove_file(f.old.join("d/q")).unwrap();
    fs::remove_file(f.old.join("d/s")).unwrap();
    write(&f.old.join("d/s"), b"a file of its own");
    ok(f.cmd("execute", &["--wait"]));
    let ino = |p: &str| fs::metadata(f.v(p)).unwrap().ino();
    assert_eq!(
        ino("one"),
        ino("two"),
        "the view: a name OLD added joins the file"
    );
    assert_eq!(ino("one"), ino("d/three"));
    assert_eq!(fs::metadata(f.v("one")).unwrap().nlink(), 3);
    assert!(
        !f.v("d/q").exists(),
        "the view still shows a name OLD removed"
    );
    assert_eq!(fs::read(f.v("d/s")).unwrap(), b"a file of its own");
    assert_ne!(ino("r"), ino("d/s"));
    ok(f.cmd("verify", &["--checksum"]));
    ok(f.cmd("commit", &[]));
    f.unmount();
    let new = |p: &str| fs::metadata(new_data.join(p)).unwrap();
    assert_eq!(
        new("one").ino(),
        new("two").ino(),
        "NEW: one file, three names"
    );
    assert_eq!(new("one").ino(), new("d/three").ino());
    assert_eq!(new("one").nlink(), 3);
    assert_eq!(new("d/p").nlink(), 1);
    assert!(!new_data.join("d/q").exists());
    assert_eq!(
        fs::read(new_data.join("d/s")).unwrap(),
        b"a file of its own"
    );
    assert_eq!(fs::read(new_data.join("r")).unwrap(), b"split");
    assert_eq!(new("r").nlink(), 1);
    let names: Vec<String> = manifest(new_data, false)
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(names, ["d", "d/p", "d/s", "d/three", "one", "r", "two"]);
}

pub fn write(p: &Path, data: &[u8]) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, data).unwrap();
}

/// Run a shell command as another user (uid:gid), returning its output.
pub fn sh_as(uid: u32, gid: u32, script: &str) -> Output {
    use std::os::unix::process::CommandExt;
    run(Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(gid))
}

/// The data segments of a file (SEEK_DATA/SEEK_HOLE): where its holes are.
pub fn data_segments(p: &Path) -> Vec<(u64, u64)> {
    let f = fs::File::open(p).unwrap();
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Ok(d) = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(off)) else {
            break;
        };
        let h = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(d)).unwrap();
        out.push((d, h));
        off = h;
    }
    out
}

/// Everything `manifest(root, true)` holds, plus directories' mtimes and files' data
/// segments (holes): what "NEW equals the view exactly" compares.
/// An entry of [`full_manifest`]: its info, a directory's mtime, a file's data segments.
pub type FullEntry = (EntryInfo, i128, Vec<(u64, u64)>);

pub fn full_manifest(root: &Path) -> BTreeMap<Vec<u8>, FullEntry> {
    manifest(root, true)
        .into_iter()
        .map(|(k, info)| {
            let p = root.join(OsStr::from_bytes(&k));
            let md = fs::symlink_metadata(&p).unwrap();
            let dir_mtime = if md.is_dir() {
                md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128
            } else {
                0
            };
            let segs = if md.is_file() {
                data_segments(&p)
            } else {
                Vec::new()
            };
            (k, (info, dir_mtime, segs))
        })
        .collect()
}

/// The first differences between two manifests, for assertion messages.
pub fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push_str(&format!("only in first: {k:?}\n")),
            Some(w) if w != v => out.push_str(&format!("differs: {k:?}\n  {v:?}\n  {w:?}\n")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push_str(&format!("only in second: {k:?}\n"));
    }
    out.chars().take(4000).collect()
}

/// Wait up to `secs` seconds for `child` to exit by itself: its status, or `None` (still
/// running).
pub fn wait_child(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll until `cond` holds, or panic naming `what` after `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fixed atime/mtime with nanoseconds (2001-09-09 and 2004-11-13), for tests that check times
/// survive to the nanosecond.
pub fn fixed_times() -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 987_654_321,
        },
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`: (status code, body). `None`: no answer
/// (nothing listens, or the connection broke).
pub fn http(method: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http("GET", port, path)
}

/// Prometheus text: `name{labels}` -> value, checking the format on the way (every sample's
/// metric has a TYPE line before it, values parse, no name appears twice).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            let name = f.next().expect("TYPE line names a metric");
            let kind = f.next().expect("TYPE line names a type");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type: {line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(
            typed.contains(family),
            "sample before its TYPE line: {line:?}"
        );
        assert!(
            name.starts_with("ferryfs_"),
            "series not named ferryfs_*: {line:?}"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            out.insert(series.to_string(), v).is_none(),
            "series twice: {series}"
        );
    }
    out
}

/// Bytes the daemon serving `f` has read and written (/proc/PID/io).
pub fn daemon_io(f: &Fixture) -> (u64, u64) {
    let pid = f.daemon_pid().expect("daemon running");
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |k: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/io"))
    };
    (field("rchar:"), field("wchar:"))
}

/// A ferryfs command that reaches S3 through AWS profiles alone: `profiles` ((credentials
/// block, config block) each, as `Garage::profile` and `Moto::profile` give) written into
/// files under `dir`, and none of AWS's key or endpoint variables in its environment.
pub fn ferryfs_with_profiles(dir: &Path, profiles: &[(String, String)]) -> Command {
    let aws = dir.join("aws-profiles");
    fs::create_dir_all(&aws).unwrap();
    let creds: String = profiles.iter().map(|(c, _)| c.as_str()).collect();
    let config: String = profiles.iter().map(|(_, c)| c.as_str()).collect();
    fs::write(aws.join("credentials"), creds).unwrap();
    fs::write(aws.join("config"), config).unwrap();
    let mut c = Command::new(BIN);
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_PROFILE",
    ] {
        c.env_remove(k);
    }
    c.env("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials"))
        .env("AWS_CONFIG_FILE", aws.join("config"));
    c
}

/// A self-signed server certificate for 127.0.0.1 and its key, made by openssl in `dir`:
/// (cert, key). Trusted as its own CA (`worker --ca-file`).
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=ferryfs-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // (A server's certificate, not a CA's: rustls refuses a CA certificate as a server's.)
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is missing: run scripts/setup.sh (it installs Debian's openssl)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}
