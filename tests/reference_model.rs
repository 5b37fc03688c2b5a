//! Reference-model test: random operations applied both to a mounted view and to a plain
//! directory that starts as a copy of OLD (the model of what the view must show). After every
//! operation the whole tree (names, types, contents, modes, link counts, symlink targets,
//! xattrs) must be equal, errors must match, and st_ino must be stable within a mount.
//!
//! Operations include "kill -9 the daemon and mount again" and "a file appears in OLD behind
//! the view's back". Indexes wrap around the entries that exist, so every generated operation
//! applies to something. Shrunk failures are checked in as named tests at the bottom.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Create { dir: usize, name: u8, len: u16 },
    Write { file: usize, off: u16, len: u16 },
    Append { file: usize, len: u16 },
    Truncate { file: usize, len: u16 },
    Unlink { file: usize },
    Mkdir { dir: usize, name: u8 },
    Rmdir { dir: usize },
    Rename { src: usize, dir: usize, name: u8 },
    Link { file: usize, dir: usize, name: u8 },
    Symlink { dir: usize, name: u8 },
    Chmod { any: usize, mode: u16 },
    SetXattr { file: usize, val: u8 },
    Remount,
    Kill9Remount,
    OldAppears { name: u8, len: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = any::<usize>();
    let name = 0u8..6;
    let len = 0u16..5000;
    prop_oneof![
        4 => (idx, name.clone(), len.clone()).prop_map(|(dir, name, len)| Op::Create { dir, name, len }),
        3 => (idx, 0u16..6000, 1u16..3000).prop_map(|(file, off, len)| Op::Write { file, off, len }),
        2 => (idx, 1u16..3000).prop_map(|(file, len)| Op::Append { file, len }),
        2 => (idx, len.clone()).prop_map(|(file, len)| Op::Truncate { file, len }),
        3 => idx.prop_map(|file| Op::Unlink { file }),
        2 => (idx, name.clone()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        2 => idx.prop_map(|dir| Op::Rmdir { dir }),
        4 => (idx, idx, name.clone()).prop_map(|(src, dir, name)| Op::Rename { src, dir, name }),
        2 => (idx, idx, name.clone()).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        1 => (idx, name.clone()).prop_map(|(dir, name)| Op::Symlink { dir, name }),
        2 => (idx, 0u16..0o777).prop_map(|(any, mode)| Op::Chmod { any, mode }),
        1 => (idx, any::<u8>()).prop_map(|(file, val)| Op::SetXattr { file, val }),
        1 => Just(Op::Remount),
        1 => Just(Op::Kill9Remount),
        1 => (name, len).prop_map(|(name, len)| Op::OldAppears { name, len }),
    ]
}

fn data(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7)) as u8)
        .collect()
}

/// Entries below `root` (relative), sorted, split by kind. Never descends into `fresh/`'s
/// siblings' symlinks.
fn entries(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut dirs, mut all) = (Vec::new(), vec![PathBuf::new()], Vec::new());
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut ents: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let r = rel.join(e.file_name());
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                dirs.push(r.clone());
                stack.push(r.clone());
            } else if ft.is_file() {
                files.push(r.clone());
            }
            all.push(r);
        }
    }
    files.sort();
    dirs.sort();
    all.sort();
    (files, dirs, all)
}

fn pick(v: &[PathBuf], i: usize) -> Option<&PathBuf> {
    if v.is_empty() {
        None
    } else {
        Some(&v[i % v.len()])
    }
}

/// Apply one filesystem op under `root`; returns the errno on failure.
fn apply(
    root: &Path,
    op: &Op,
    files: &[PathBuf],
    dirs: &[PathBuf],
    all: &[PathBuf],
    step: usize,
) -> Result<(), i32> {
    let e = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error().unwrap_or(-1));
    let nm = |n: u8| format!("n{n}");
    match op {
        Op::Create { dir, name, len } => {
            let d = pick(dirs, *dir).unwrap();
            let p = root.join(d).join(nm(*name));
            e(OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .and_then(|mut f| f.write_all(&data(step, *len as usize))))
        }
        Op::Write { file, off, len } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            e(OpenOptions::new()
                .write(true)
                .open(root.join(f))
                .and_then(|mut h| {
                    h.seek(SeekFrom::Start(*off as u64))?;
                    h.write_all(&data(step, *len as usize))
                }))
        }
        Op::Append { file, len } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            e(OpenOptions::new()
                .append(true)
                .open(root.join(f))
                .and_then(|mut h| h.write_all(&data(step, *len as usize))))
        }
        Op::Truncate { file, len } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            e(OpenOptions::new()
                .write(true)
                .open(root.join(f))
                .and_then(|h| h.set_len(*len as u64)))
        }
        Op::Unlink { file } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            e(fs::remove_file(root.join(f)))
        }
        Op::Mkdir { dir, name } => e(fs::create_dir(
            root.join(pick(dirs, *dir).unwrap()).join(nm(*name)),
        )),
        Op::Rmdir { dir } => {
            let d = pick(dirs, *dir).unwrap();
            if d.as_os_str().is_empty() {
                return Ok(());
            }
            e(fs::remove_dir(root.join(d)))
        }
        Op::Rename { src, dir, name } => {
            let Some(s) = pick(all, *src) else {
                return Ok(());
            };
            let d = pick(dirs, *dir).unwrap();
            e(fs::rename(root.join(s), root.join(d).join(nm(*name))))
        }
        Op::Link { file, dir, name } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            e(fs::hard_link(
                root.join(f),
                root.join(pick(dirs, *dir).unwrap()).join(nm(*name)),
            ))
        }
        Op::Symlink { dir, name } => e(symlink(
            format!("target-{step}"),
            root.join(pick(dirs, *dir).unwrap()).join(nm(*name)),
        )),
        Op::Chmod { any, mode } => {
            let Some(p) = pick(all, *any) else {
                return Ok(());
            };
            let p = root.join(p);
            if fs::symlink_metadata(&p).unwrap().file_type().is_symlink() {
                return Ok(());
            }
            // Keep directories searchable and files readable by root-run comparisons.
            e(fs::set_permissions(
                &p,
                fs::Permissions::from_mode(*mode as u32 | 0o500),
            ))
        }
        Op::SetXattr { file, val } => {
            let Some(f) = pick(files, *file) else {
                return Ok(());
            };
            rustix::fs::setxattr(
                root.join(f),
                "user.m",
                &[*val],
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| e.raw_os_error())
        }
        Op::Remount | Op::Kill9Remount | Op::OldAppears { .. } => Ok(()),
    }
}

/// The comparable part of a tree: manifest without times and owners.
fn shape(root: &Path) -> Manifest {
    manifest(root, false)
}

fn inos(root: &Path, all: &[PathBuf]) -> BTreeMap<PathBuf, u64> {
    all.iter()
        .filter_map(|p| {
            fs::symlink_metadata(root.join(p))
                .ok()
                .map(|m| (p.clone(), m.ino()))
        })
        .collect()
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut f = Fixture::new();
    // OLD: a small tree; `fresh/` is where files appear behind the view's back.
    write(&f.old.join("a"), b"old a");
    write(&f.old.join("d1/b"), &data(1, 3000));
    write(&f.old.join("d1/d2/c"), b"old c");
    fs::create_dir_all(f.old.join("d3")).unwrap();
    // An OLD hard-link group across directories.
    fs::hard_link(f.old.join("d1/b"), f.old.join("d3/b-link")).unwrap();
    fs::create_dir_all(f.old.join("fresh")).unwrap();
    let model = f.root.path().join("model");
    copy_tree(&f.old, &model);
    f.start();
    prop_assert_eq!(shape(&f.mnt), shape(&model));
    for (step, op) in ops.iter().enumerate() {
        let (files, dirs, all) = entries(&model);
        // Never operate on fresh/ through the view: it is OLD's, for OldAppears.
        let keep = |v: Vec<PathBuf>| {
            v.into_iter()
                .filter(|p| !p.starts_with("fresh"))
                .collect::<Vec<_>>()
        };
        let (files, dirs, all) = (keep(files), keep(dirs), keep(all));
        let ino_before = inos(&f.mnt, &all);
        let ino_model_before = inos(&model, &all);
        let want = apply(&model, op, &files, &dirs, &all, step);
        let got = apply(&f.mnt, op, &files, &dirs, &all, step);
        prop_assert_eq!(got, want, "step {}: {:?}", step, op);
        match op {
            Op::Remount => {
                f.unmount();
                f.mount();
            }
            Op::Kill9Remount => {
                f.kill9();
                f.mount();
            }
            Op::OldAppears { name, len } => {
                let n = format!("fresh/o{step}-{name}");
                write(&f.old.join(&n), &data(step, *len as usize));
                write(&model.join(&n), &data(step, *len as usize));
            }
            _ => {}
        }
        prop_assert_eq!(
            shape(&f.mnt),
            shape(&model),
            "tree differs after step {}: {:?}",
            step,
            op
        );
        if !matches!(op, Op::Remount | Op::Kill9Remount) {
            // st_ino stable within a mount: an entry the model did not replace keeps its number.
            let ino_after = inos(&f.mnt, &all);
            let ino_model_after = inos(&model, &all);
            for (p, before) in &ino_before {
                if ino_model_before.get(p) == ino_model_after.get(p)
                    && let Some(after) = ino_after.get(p)
                {
                    prop_assert_eq!(
                        before,
                        after,
                        "st_ino of {:?} changed at step {}: {:?}",
                        p,
                        step,
                        op
                    );
                }
            }
        }
    }
    f.unmount();
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FERRYFS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 200,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn view_matches_the_reference_model(ops in prop::collection::vec(op(), 1..40)) {
        run_case(&ops)?;
    }
}

// Shrunk failures, kept as named regression tests.

/// OLD d1/b and d3/b-link are one file. chmod copies b up; unlinking its only NEW name must
/// keep the data alive for b-link (which used to list but fail lookup with ENOENT).
#[test]
fn regression_unlink_of_the_copied_name_keeps_the_old_hard_link_alive() {
    run_case(&[
        Op::Rename {
            src: 4144495295656359498,
            dir: 6482804721522217295,
            name: 0,
        },
        Op::Chmod {
            any: 3069023277191889607,
            mode: 390,
        },
        Op::Unlink {
            file: 18026902055322943582,
        },
    ])
    .unwrap();
}

/// write copies d1/b up, unlink removes its NEW name: b-link's st_nlink is 1, not 2 (the
/// kept-alive link in the work dir is no name).
#[test]
fn regression_write_then_unlink_of_a_hard_link_counts_links_right() {
    run_case(&[
        Op::Write {
            file: 3476756242844283061,
            off: 1430,
            len: 1242,
        },
        Op::Unlink {
            file: 1048964911006786729,
        },
    ])
    .unwrap();
}

/// The same across a remount, where b-link is linked up and the kept-alive copy dropped:
/// st_nlink was 0.
#[test]
fn regression_truncate_unlink_remount_of_a_hard_link_counts_links_right() {
    run_case(&[
        Op::Truncate {
            file: 1922270295218030345,
            len: 0,
        },
        Op::Unlink {
            file: 9486399556851544541,
        },
        Op::Remount,
    ])
    .unwrap();
}

/// A symlink renamed, a file truncated and unlinked, directories made, then a rename onto the
/// symlink's new name: once listed entries that could not be looked up (ENOENT).
#[test]
fn regression_rename_onto_a_renamed_symlink_keeps_the_tree_consistent() {
    run_case(&[
        Op::Symlink {
            dir: 2528728224734882327,
            name: 0,
        },
        Op::Rename {
            src: 3774209477764724806,
            dir: 6448507407446818248,
            name: 1,
        },
        Op::Truncate {
            file: 6737889836987046745,
            len: 3452,
        },
        Op::Unlink {
            file: 14447911973556099769,
        },
        Op::Mkdir {
            dir: 16004823103370901001,
            name: 3,
        },
        Op::Mkdir {
            dir: 9124174534776539378,
            name: 4,
        },
        Op::Rename {
            src: 13607658755634452838,
            dir: 493969436817962220,
            name: 1,
        },
    ])
    .unwrap();
}
