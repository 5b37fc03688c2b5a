//! Copy-before-write by chunk (issue 25): the first write into a big file still in OLD
//! copies only the chunks it touches into NEW; reads of the others fall through to OLD; the
//! copier hydrates the rest; kill -9 at any step keeps exactly the acknowledged bytes; abort
//! writes back only the changed chunks; commit waits for whole files.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

/// Deterministic bytes (xorshift), so a model and a file can be built alike.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A file of `len` bytes of real data (no holes), and the same bytes: 64 KiB of random
/// bytes repeated, each repetition stamped with its index (no two blocks alike).
fn data_file(p: &Path, len: usize, seed: u64) -> Vec<u8> {
    let block = Rng(seed).bytes(65536);
    let mut data = Vec::with_capacity(len);
    let mut i = 0u64;
    while data.len() < len {
        let mut b = block.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        let n = (len - data.len()).min(b.len());
        data.extend_from_slice(&b[..n]);
        i += 1;
    }
    let mut f = fs::File::create(p).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    data
}

fn drop_caches() {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn prepare_chunked(f: &Fixture, chunk: &str) {
    ok(f.cmd_prepare_with(&["--chunk-size".as_ref(), chunk.as_ref()]));
}

/// The view's file must hold exactly `model`.
fn assert_same(p: &Path, model: &[u8], what: &str) {
    let got = fs::read(p).unwrap_or_else(|e| panic!("{what}: read {}: {e}", p.display()));
    assert_eq!(got.len(), model.len(), "{what}: size of {}", p.display());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != model[i]) {
        panic!(
            "{what}: {} differs from the model first at byte {i} (chunk-aligned 4k: {})",
            p.display(),
            i / 4096 * 4096
        );
    }
}

#[test]
fn a_write_into_a_big_old_file_copies_only_the_chunks_it_touches() {
    let mut f = Fixture::new();
    let mut model = data_file(&f.old.join("big.bin"), 8 << 20, 7);
    fs::set_permissions(f.old.join("big.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    prepare_chunked(&f, "64k");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mnt = f.mnt.clone();
    f.mount_with(&mnt, &["--no-copy", "--metrics-addr", &addr]);
    // 4 KiB across the boundary of chunks 40 and 41.
    let at = 41 * 65536 - 2048;
    let patch = Rng(99).bytes(4096);
    {
        let w = fs::OpenOptions::new()
            .write(true)
            .open(f.v("big.bin"))
            .unwrap();
        w.write_all_at(&patch, at as u64).unwrap();
    }
    model[at..at + 4096].copy_from_slice(&patch);
    // NEW holds the file at OLD's size, two chunks of data, not 8 MiB.
    let n = fs::metadata(f.new.join("big.bin")).unwrap();
    assert_eq!(n.len(), 8 << 20, "NEW's partial file has the file's size");
    assert!(
        n.blocks() * 512 <= 4 * 65536,
        "NEW holds {} bytes of data for a 4 KiB write: more than the chunks it touched",
        n.blocks() * 512
    );
    assert_eq!(n.mode() & 0o7777, 0o640, "NEW's file has OLD's mode");
    assert_same(&f.v("big.bin"), &model, "the view after the write");
    let st = f.status_json();
    assert_eq!(st["partial"]["files"], 1, "status: {st}");
    assert_eq!(st["partial"]["chunks_present"], 2, "status: {st}");
    assert_eq!(st["partial"]["chunks_total"], 128, "status: {st}");
    assert_eq!(st["partial"]["chunk_size"], 65536, "status: {st}");
    let (code, text) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    for (series, want) in [
        ("ferryfs_partial_files", 1.0),
        ("ferryfs_partial_chunks_present", 2.0),
        ("ferryfs_partial_chunks_total", 128.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "/metrics {series}");
    }
    // SEEK_HOLE sees no hole (NEW's holes are OLD's chunks).
    let mut r = fs::File::open(f.v("big.bin")).unwrap();
    let hole = rustix::fs::seek(&r, rustix::fs::SeekFrom::Hole(0)).unwrap();
    assert_eq!(hole, 8 << 20, "a partial file shows no holes");
    r.seek(SeekFrom::Start(0)).unwrap();
    drop(r);
    // Served by the daemon while partial (its bytes are NEW's and OLD's).
    let (r0, _) = daemon_io(&f);
    drop_caches();
    assert_same(&f.v("big.bin"), &model, "the view, read cold");
    let (r1, _) = daemon_io(&f);
    assert!(
        r1 - r0 >= 4 << 20,
        "a partial file's read did not go through the daemon ({} bytes)",
        r1 - r0
    );
    // Not committed while chunks are only in OLD.
    let out = f.cmd("commit", &[]);
    assert!(!out.status.success(), "commit of a partial file succeeded");
    // The copier hydrates the rest: then an ordinary NEW file, the same bytes.
    ok(f.cmd("execute", &["--wait"]));
    let st = f.status_json();
    assert_eq!(st["partial"]["files"], 0, "status after execute: {st}");
    let m = parse_metrics(&http_get(port, "/metrics").expect("/metrics answers").1);
    assert_eq!(m.get("ferryfs_partial_files"), Some(&0.0));
    assert_eq!(m.get("ferryfs_partial_chunks_total"), Some(&0.0));
    assert_same(&f.new.join("big.bin"), &model, "NEW after hydration");
    // Whole again: an ordinary NEW file, which the kernel reads itself (passthrough).
    drop_caches();
    let (r0, _) = daemon_io(&f);
    assert_same(&f.v("big.bin"), &model, "the view after hydration");
    let (r1, _) = daemon_io(&f);
    assert!(
        r1 - r0 < 1 << 20,
        "a hydrated file's read went through the daemon ({} bytes): no passthrough",
        r1 - r0
    );
    ok(f.cmd("verify", &["--checksum"]));
    f.unmount();
    ok(f.cmd("commit", &[]));
    assert_same(&f.new.join("big.bin"), &model, "NEW after commit");
}

#[test]
fn truncate_append_and_holes_follow_the_model_across_kill_9() {
    let mut f = Fixture::new();
    let mut model = data_file(&f.old.join("f.bin"), 1 << 20, 3);
    prepare_chunked(&f, "16k");
    f.mount();
    let w = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.v("f.bin"))
            .unwrap()
    };
    // Shrink into the middle of a chunk, then grow: the bytes past the cut are zeros, not
    // OLD's.
    w().set_len(300_001).unwrap();
    model.truncate(300_001);
    assert_same(&f.v("f.bin"), &model, "after the cut");
    w().set_len(500_000).unwrap();
    model.resize(500_000, 0);
    assert_same(&f.v("f.bin"), &model, "after growing again");
    // Append.
    let mut a = fs::OpenOptions::new()
        .append(true)
        .open(f.v("f.bin"))
        .unwrap();
    a.write_all(b"appended").unwrap();
    drop(a);
    model.extend_from_slice(b"appended");
    // A hole punched across chunk edges.
    let file = w();
    rustix::fs::fallocate(
        &file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        10_000,
        40_000,
    )
    .unwrap();
    model[10_000..50_000].fill(0);
    file.sync_all().unwrap();
    drop(file);
    assert_same(&f.v("f.bin"), &model, "after the hole");
    f.kill9();
    f.mount();
    assert_same(&f.v("f.bin"), &model, "after kill -9 and mount again");
    ok(f.cmd("execute", &["--wait"]));
    assert_same(&f.new.join("f.bin"), &model, "NEW after hydration");
}

/// Random pwrite / truncate / fallocate / read / fsync / chmod steps on big OLD-only files,
/// with the copier hydrating in the background and kill -9 plus mount again between steps:
/// after every step the view matches the model byte for byte.
#[test]
fn random_changes_match_the_model_through_hydration_and_kill_9() {
    for (seed, chunk, chunk_len) in [(11u64, "4k", 4096u64), (23, "64k", 65536)] {
        let mut f = Fixture::new();
        let names = ["a.bin", "b.bin"];
        let mut models: Vec<Vec<u8>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| data_file(&f.old.join(n), 768 * 1024 + i * 4097, seed + i as u64))
            .collect();
        prepare_chunked(&f, chunk);
        let mnt = f.mnt.clone();
        // The copier runs, slowly (hydration interleaves with the steps).
        f.mount_with(&mnt, &["--bwlimit", "64k"]);
        ok(f.cmd("execute", &[]));
        let mut rng = Rng(seed * 1000 + 1);
        // Files still partial at a kill: what this test is about.
        let mut seen_partial = 0;
        for step in 0..60 {
            let i = rng.below(2) as usize;
            let p = f.v(names[i]);
            let m = &mut models[i];
            let size = m.len() as u64;
            // Offsets at, around and across chunk edges.
            let edge = |rng: &mut Rng| -> u64 {
                let c = rng.below(size / chunk_len + 2);
                let jitter = rng.below(64) as i64 - 32;
                ((c * chunk_len) as i64 + jitter).max(0) as u64
            };
            match rng.below(7) {
                0 | 1 => {
                    let off = if rng.below(2) == 0 {
                        edge(&mut rng)
                    } else {
                        rng.below(size + 1000)
                    };
                    let len = 1 + rng.below(3 * chunk_len) as usize;
                    let data = rng.bytes(len);
                    let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
                    file.write_all_at(&data, off).unwrap();
                    let end = off as usize + len;
                    if m.len() < end {
                        m.resize(end, 0);
                    }
                    m[off as usize..end].copy_from_slice(&data);
                }
                2 => {
                    let to = if rng.below(2) == 0 {
                        edge(&mut rng)
                    } else {
                        rng.below(size + 2 * chunk_len)
                    };
                    let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
                    file.set_len(to).unwrap();
                    m.resize(to as usize, 0);
                }
                3 => {
                    let off = edge(&mut rng).min(size.saturating_sub(1));
                    let len = 1 + rng.below(2 * chunk_len);
                    let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
                    let zero = rng.below(2) == 0;
                    let flags = if zero {
                        rustix::fs::FallocateFlags::ZERO_RANGE
                    } else {
                        rustix::fs::FallocateFlags::PUNCH_HOLE
                            | rustix::fs::FallocateFlags::KEEP_SIZE
                    };
                    match rustix::fs::fallocate(&file, flags, off, len) {
                        Ok(()) => {}
                        // (A kernel whose FUSE passes no ZERO_RANGE on: nothing changed.)
                        Err(rustix::io::Errno::OPNOTSUPP) if zero => continue,
                        Err(e) => panic!("seed {seed} step {step}: fallocate: {e}"),
                    }
                    let end = (off + len) as usize;
                    let keep = if zero { end } else { end.min(m.len()) };
                    if m.len() < keep {
                        m.resize(keep, 0);
                    }
                    let stop = end.min(m.len());
                    m[off as usize..stop].fill(0);
                }
                4 => {
                    let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
                    file.sync_all().unwrap();
                }
                5 => {
                    let mode = 0o600 | (rng.below(0o100) as u32);
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                }
                _ => {
                    // A read across an edge.
                    let off = edge(&mut rng).min(size);
                    let mut buf = vec![0u8; (2 * chunk_len) as usize];
                    let file = fs::File::open(&p).unwrap();
                    let n = file.read_at(&mut buf, off).unwrap();
                    let want = &m[off as usize..(off as usize + buf.len()).min(m.len())];
                    assert_eq!(n, want.len(), "seed {seed} step {step}: read length");
                    assert!(buf[..n] == *want, "seed {seed} step {step}: read bytes");
                }
            }
            if step % 10 == 9 {
                let pf = f.status_json()["partial"]["files"].as_u64().unwrap_or(0);
                seen_partial = seen_partial.max(pf);
                f.kill9();
                f.mount_with(&mnt, &["--bwlimit", "64k"]);
                ok(f.cmd("execute", &[]));
            }
            for (n, m) in names.iter().zip(&models) {
                assert_same(
                    &f.v(n),
                    m,
                    &format!("seed {seed} chunk {chunk} step {step}"),
                );
            }
        }
        println!("seed {seed}: at most {seen_partial} partial files at a kill -9");
        assert!(
            seen_partial > 0,
            "seed {seed}: no file was partial at any kill -9"
        );
        ok(f.cmd("limits", &["--bwlimit", "0"]));
        ok(f.cmd("execute", &["--wait"]));
        assert_eq!(f.status_json()["partial"]["files"], 0);
        for (n, m) in names.iter().zip(&models) {
            assert_same(
                &f.new.join(n),
                m,
                &format!("seed {seed}: NEW after hydration"),
            );
        }
        ok(f.cmd("verify", &["--checksum"]));
    }
}

#[test]
fn abort_writes_back_only_the_changed_chunks_of_a_partly_copied_file() {
    let mut f = Fixture::new();
    let len = 1 << 30;
    let mut model = data_file(&f.old.join("big.bin"), len, 5);
    let ino = fs::metadata(f.old.join("big.bin")).unwrap().ino();
    prepare_chunked(&f, "1M");
    f.mount();
    let mut rng = Rng(77);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.v("big.bin"))
        .unwrap();
    for _ in 0..16 {
        let off = rng.below(len as u64 - 4096) as usize;
        let data = rng.bytes(4096);
        file.write_all_at(&data, off as u64).unwrap();
        model[off..off + 4096].copy_from_slice(&data);
    }
    drop(file);
    fs::set_permissions(f.v("big.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    f.unmount();
    let out = ok(f.cmd("abort", &[]));
    println!("{out}");
    assert_same(&f.old.join("big.bin"), &model, "OLD after abort");
    let om = fs::metadata(f.old.join("big.bin")).unwrap();
    assert_eq!(
        om.ino(),
        ino,
        "OLD's own file took the chunks (not a rewritten copy)"
    );
    assert_eq!(om.mode() & 0o7777, 0o600, "OLD's mode after abort");
    // Reported: one file, a few chunks' worth of bytes, not the file.
    let bytes: u64 = out
        .split("bytes written into OLD")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("abort's report names no bytes written: {out}"));
    assert!(
        bytes > 0 && bytes <= 32 << 20,
        "abort wrote {bytes} bytes into OLD for 16 writes of 4 KiB"
    );
    assert!(
        out.contains("1 files partly copied"),
        "abort's report: {out}"
    );
}

/// OLD's file changed behind the view while the file is partly copied: the chunks still in
/// OLD are no longer the file's. Reads of them fail with EIO (never a mix of two versions),
/// the chunks NEW holds still read, the copier lists the file with its cause, and commit
/// refuses; nothing is lost silently.
#[test]
fn old_changed_behind_a_partly_copied_file_fails_loudly_and_commit_refuses() {
    let mut f = Fixture::new();
    let model = data_file(&f.old.join("big.bin"), 1 << 20, 9);
    prepare_chunked(&f, "64k");
    f.mount();
    let patch = Rng(5).bytes(100);
    {
        let w = fs::OpenOptions::new()
            .write(true)
            .open(f.v("big.bin"))
            .unwrap();
        w.write_all_at(&patch, 10).unwrap();
    }
    assert_eq!(f.status_json()["partial"]["files"], 1);
    // Behind the view: OLD's file rewritten in place (a new mtime).
    std::thread::sleep(std::time::Duration::from_millis(20));
    {
        let o = fs::OpenOptions::new()
            .write(true)
            .open(f.old.join("big.bin"))
            .unwrap();
        o.write_all_at(b"changed in OLD", 500_000).unwrap();
    }
    let r = fs::File::open(f.v("big.bin")).unwrap();
    // The chunk NEW holds still reads, with the view's change.
    let mut head = vec![0u8; 110];
    r.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..10], &model[..10]);
    assert_eq!(&head[10..110], &patch[..]);
    // A chunk still in OLD does not.
    let mut buf = vec![0u8; 4096];
    let err = r.read_exact_at(&mut buf, 600_000).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(r);
    let out = f.cmd("execute", &["--wait"]);
    assert!(!out.status.success(), "execute --wait succeeded");
    let st = f.status_json();
    let errors = st["errors"].as_array().expect("errors list");
    assert!(
        errors.iter().any(|e| e["path"]
            .as_str()
            .is_some_and(|p| p.trim_start_matches('/') == "big.bin")
            && e["error"]
                .as_str()
                .is_some_and(|m| m.contains("changed behind the view"))),
        "status does not name big.bin and the cause: {st}"
    );
    assert_eq!(st["partial"]["files"], 1, "{st}");
    let commit = f.cmd("commit", &[]);
    assert!(!commit.status.success(), "commit went ahead");
}
