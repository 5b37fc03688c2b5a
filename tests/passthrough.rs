//! Kernel FUSE passthrough (`mount --passthrough new|all|off`): the kernel reads and writes
//! the stores' files itself, so file data no longer crosses the daemon. Measured by what the
//! daemon itself read and wrote (/proc/PID/io rchar and wchar), against `--passthrough off`.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// Write 32 MiB to a new file and read it back through the view; what the daemon moved.
fn write_and_read_back(f: &Fixture, name: &str) -> (u64, u64) {
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i % 251) as u8).collect();
    let (r0, w0) = daemon_io(f);
    let mut out = fs::File::create(f.v(name)).unwrap();
    out.write_all(&data).unwrap();
    out.sync_all().unwrap();
    drop(out);
    let back = fs::read(f.v(name)).unwrap();
    assert!(
        back == data,
        "{name}: read back differs from what was written"
    );
    assert_eq!(fs::read(f.new.join(name)).unwrap().len(), data.len());
    let (r1, w1) = daemon_io(f);
    (r1 - r0, w1 - w0)
}

#[test]
fn files_in_new_are_read_and_written_by_the_kernel_not_the_daemon() {
    let mut on = Fixture::new();
    on.start(); // default: --passthrough new
    let (read, written) = write_and_read_back(&on, "big");
    eprintln!("passthrough new: daemon read {read} and wrote {written} bytes for 32 MiB each way");
    assert!(
        read < 4 * MIB as u64 && written < 4 * MIB as u64,
        "with passthrough the daemon still moved the data: read {read}, wrote {written}"
    );

    // The same through the daemon: proves the measure sees data that crosses it.
    let mut off = Fixture::new();
    off.prepare();
    let mp = off.mnt.clone();
    off.mount_with(&mp, &["--no-copy", "--passthrough", "off"]);
    let (read, written) = write_and_read_back(&off, "big");
    eprintln!("passthrough off: daemon read {read} and wrote {written} bytes");
    assert!(
        written >= 32 * MIB as u64,
        "without passthrough the daemon should have written the 32 MiB: {written}"
    );
}

#[test]
fn default_mode_serves_old_only_reads_through_the_daemon_so_writers_never_wait() {
    let mut f = Fixture::new();
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i % 253) as u8).collect();
    write(&f.old.join("old-file"), &data);
    f.start();
    let (r0, _) = daemon_io(&f);
    let mut reader = fs::File::open(f.v("old-file")).unwrap();
    let mut head = vec![0u8; MIB];
    reader.read_exact(&mut head).unwrap();
    assert!(head == data[..MIB]);
    let (r1, _) = daemon_io(&f);
    assert!(
        r1 - r0 >= MIB as u64,
        "an OLD-only read went around the daemon"
    );
    // A writer while the reader is open: no wait, no error; the reader sees the change.
    let t = Instant::now();
    let mut w = fs::OpenOptions::new()
        .write(true)
        .open(f.v("old-file"))
        .unwrap();
    w.write_all(b"CHANGED").unwrap();
    drop(w);
    assert!(t.elapsed() < Duration::from_secs(1), "the writer waited");
    let mut rest = Vec::new();
    use std::io::{Seek, SeekFrom};
    reader.seek(SeekFrom::Start(0)).unwrap();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(&rest[..7], b"CHANGED");
    assert_eq!(rest[7..], data[7..]);
    assert_eq!(
        fs::read(f.old.join("old-file")).unwrap(),
        data,
        "OLD written"
    );
}

#[test]
fn passthrough_all_reads_old_only_files_natively_and_a_writer_waits_for_those_readers() {
    let mut f = Fixture::new();
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i % 249) as u8).collect();
    write(&f.old.join("old-file"), &data);
    f.prepare();
    let mp = f.mnt.clone();
    f.mount_with(&mp, &["--no-copy", "--passthrough", "all"]);
    let (r0, _) = daemon_io(&f);
    let mut reader = fs::File::open(f.v("old-file")).unwrap();
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    assert!(all == data, "OLD-only file read back wrong");
    let (r1, _) = daemon_io(&f);
    eprintln!(
        "passthrough all: daemon read {} bytes for a 32 MiB OLD-only file",
        r1 - r0
    );
    assert!(
        r1 - r0 < 4 * MIB as u64,
        "the OLD-only read went through the daemon: {} bytes",
        r1 - r0
    );

    // While it is open, the kernel keeps OLD's file as the inode's backing: a write open
    // cannot move to NEW. It waits for the reader, then fails EBUSY, changing nothing.
    let t = Instant::now();
    let err = fs::OpenOptions::new()
        .write(true)
        .open(f.v("old-file"))
        .expect_err("a write open while an OLD passthrough reader is open");
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "did not wait for the reader"
    );
    assert!(
        !f.new.join("old-file").exists(),
        "a refused open copied the file up"
    );
    assert!(fs::read(f.v("old-file")).unwrap() == data);
    // Same for a truncate by path.
    let path =
        std::ffi::CString::new(f.v("old-file").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::truncate(path.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    assert_eq!(
        (rc, err.raw_os_error()),
        (-1, Some(libc::EBUSY)),
        "truncate must wait too"
    );

    // Once the reader closes, the write goes to NEW as usual.
    drop(reader);
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(f.v("old-file"))
        .unwrap();
    w.write_all(b"tail").unwrap();
    drop(w);
    let now = fs::read(f.v("old-file")).unwrap();
    assert_eq!(now.len(), data.len() + 4);
    assert_eq!(&now[data.len()..], b"tail");
    // (32 MiB is copied by chunk: NEW holds the file once the copier filled it in.)
    ok(f.cmd("execute", &["--wait"]));
    assert!(
        fs::read(f.new.join("old-file")).unwrap() == now,
        "NEW after execute differs from the view"
    );
    assert!(
        fs::read(f.old.join("old-file")).unwrap() == data,
        "OLD written"
    );
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Set-id bits go as on a native file system whichever path the data takes: a write, an
/// `O_TRUNC` open or a truncate by a caller without CAP_FSETID clears them (in the view and in
/// NEW), root's keep them. With passthrough the write never reaches the daemon: the kernel
/// clears the bits through it; an `O_TRUNC` open is the daemon's to clear (the kernel skips
/// its SETATTR when OPEN truncates). Guards any change to who clears them (KILLPRIV).
#[test]
fn an_unprivileged_write_or_truncate_clears_set_id_bits_with_and_without_passthrough() {
    use std::os::unix::fs::PermissionsExt;
    for pt in ["new", "off"] {
        let mut f = Fixture::new();
        f.prepare();
        let mp = f.mnt.clone();
        f.mount_with(&mp, &["--no-copy", "--passthrough", pt]);
        for (name, how) in [
            ("w", "printf x >>"),   // a write
            ("t", ": >"),           // an O_TRUNC open
            ("s", "truncate -s 1"), // truncate(2)
        ] {
            let p = f.v(name);
            write(&p, b"#!/bin/sh\n");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
            // Root (CAP_FSETID) keeps them, writing or truncating.
            fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .unwrap()
                .write_all(b"# root\n")
                .unwrap();
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p)
                .unwrap()
                .write_all(b"#!/bin/sh\n")
                .unwrap();
            assert_eq!(
                mode(&p),
                0o6777,
                "--passthrough {pt}: root's write cleared set-id bits"
            );
            // As nobody: uid and gid 65534, no supplementary groups, no capabilities.
            let out = sh_as(65534, 65534, &format!("{how} '{}'", p.display()));
            assert!(
                out.status.success(),
                "as nobody: {how} {}: {out:?}",
                p.display()
            );
            assert_eq!(
                mode(&p),
                0o777,
                "--passthrough {pt}: {name} by nobody kept set-id bits"
            );
            assert_eq!(
                mode(&f.new.join(name)),
                0o777,
                "--passthrough {pt}: NEW kept them"
            );
        }
        f.unmount();
    }
}
