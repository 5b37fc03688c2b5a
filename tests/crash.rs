//! Crash safety: kill -9 the daemon at random moments of a write-heavy workload, mount again,
//! and check that every operation that had returned is there and that nothing half-copied is
//! visible in NEW.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// What the workload was told succeeded: path -> expected content (None = must not exist).
type Acked = Arc<Mutex<BTreeMap<String, Option<Vec<u8>>>>>;
/// Names the one operation in flight at the kill touches: their state may go either way.
type Pending = Arc<Mutex<Vec<String>>>;

fn old_content(i: usize) -> Vec<u8> {
    format!("old file {i} ").repeat(2000).into_bytes()
}

fn workload(mnt: PathBuf, acked: Acked, pending: Pending, stop: Arc<AtomicBool>, round: usize) {
    let mut i = 0usize;
    let mut created: Vec<String> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        *pending.lock().unwrap() = vec![
            created.last().cloned().unwrap_or_default(),
            format!("old/f{}", (i / 5) % 40),
            format!("old/f{}", 40 + (i / 5) % 40),
        ];
        let res: std::io::Result<(String, Option<Vec<u8>>)> = (|| match i % 5 {
            // Create and write a new file.
            0 | 1 => {
                let name = format!("w/r{round}-c{i}");
                let body = format!("round {round} file {i}\n").repeat(50).into_bytes();
                let mut h = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(mnt.join(&name))?;
                h.write_all(&body)?;
                drop(h);
                Ok((name, Some(body)))
            }
            // Append to an OLD-only file: copy-up under load.
            2 => {
                let k = (i / 5) % 40;
                let name = format!("old/f{k}");
                let path = mnt.join(&name);
                let mut body = fs::read(&path)?;
                let extra = format!("+r{round}i{i}").into_bytes();
                OpenOptions::new()
                    .append(true)
                    .open(&path)?
                    .write_all(&extra)?;
                body.extend_from_slice(&extra);
                Ok((name, Some(body)))
            }
            // Rename the file this round created last.
            3 => {
                let Some(from) = created.pop() else {
                    return Ok((String::new(), None));
                };
                let to = format!("w/r{round}-moved{i}");
                let body = fs::read(mnt.join(&from))?;
                fs::rename(mnt.join(&from), mnt.join(&to))?;
                acked.lock().unwrap().insert(from, None);
                Ok((to, Some(body)))
            }
            // Delete an OLD-only file (a tombstone).
            _ => {
                let k = 40 + (i / 5) % 40;
                let name = format!("old/f{k}");
                match fs::remove_file(mnt.join(&name)) {
                    Ok(()) => Ok((name, None)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((name, None)),
                    Err(e) => Err(e),
                }
            }
        })();
        match res {
            Ok((name, _)) if name.is_empty() => {}
            Ok((name, v)) => {
                if name.contains("-c") {
                    created.push(name.clone());
                }
                acked.lock().unwrap().insert(name, v);
                pending.lock().unwrap().clear();
            }
            Err(_) => return, // the daemon is gone: nothing after this was acknowledged
        }
    }
}

#[test]
fn kill9_during_a_write_heavy_workload_loses_no_acknowledged_operation() {
    let mut f = Fixture::new();
    for i in 0..80 {
        write(&f.old.join(format!("old/f{i}")), &old_content(i));
    }
    fs::create_dir(f.old.join("w")).unwrap();
    f.start();
    let acked: Acked = Arc::default();
    let pending: Pending = Arc::default();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for round in 0..6 {
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (mnt, acked, pending, stop) =
                (f.mnt.clone(), acked.clone(), pending.clone(), stop.clone());
            std::thread::spawn(move || workload(mnt, acked, pending, stop, round))
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        f.kill9();
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        f.mount();
        let in_flight = std::mem::take(&mut *pending.lock().unwrap());
        let mut acked_now = acked.lock().unwrap();
        for name in &in_flight {
            // Whatever the view shows now is the truth the next round builds on.
            acked_now.insert(name.clone(), fs::read(f.v(name)).ok());
        }
        for (name, want) in acked_now.iter() {
            if in_flight.contains(name) {
                continue;
            }
            let got = fs::read(f.v(name)).ok();
            match want {
                Some(body) => assert!(
                    got.as_ref().is_some_and(|g| g.starts_with(body)),
                    "round {round}: acknowledged {name} lost or wrong after kill -9"
                ),
                None => assert!(got.is_none(), "round {round}: deleted {name} came back"),
            }
        }
        drop(acked_now);
        // Nothing half-copied in NEW: every copied-up OLD file holds OLD's full content first.
        for i in 0..40 {
            let p = f.new.join(format!("old/f{i}"));
            if let Ok(n) = fs::read(&p) {
                assert!(
                    n.starts_with(&old_content(i)),
                    "round {round}: partial copy of f{i} in NEW"
                );
            }
        }
    }
    let n = acked.lock().unwrap().len();
    assert!(
        n > 20,
        "the workload did too little to prove anything ({n} ops)"
    );
    f.unmount();
}

#[test]
fn renaming_a_directory_holding_100000_old_only_files_copies_no_file_into_new() {
    let mut f = Fixture::new();
    for d in 0..100 {
        let dir = f.old.join(format!("big/d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..1000 {
            fs::write(dir.join(format!("f{i:04}")), b"x").unwrap();
        }
    }
    f.start();
    fs::rename(f.v("big"), f.v("big-renamed")).unwrap();
    let copied: Vec<_> = manifest(&f.new, false)
        .into_iter()
        .filter(|(_, e)| e.kind != "dir")
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    assert!(
        copied.is_empty(),
        "rename copied files into NEW: {:?}",
        &copied[..copied.len().min(5)]
    );
    assert!(!f.v("big").exists());
    let mut total = 0;
    for d in fs::read_dir(f.v("big-renamed")).unwrap() {
        total += fs::read_dir(d.unwrap().path()).unwrap().count();
    }
    assert_eq!(total, 100_000);
    assert_eq!(fs::read(f.v("big-renamed/d042/f0999")).unwrap(), b"x");
    f.unmount();
}
