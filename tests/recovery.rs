//! Redo intents: the NEW half of a rename or a replacing rename whose journal half was
//! durable when the daemon died is finished when the view opens, and only for the inode the
//! intent names (never a newer entry that took the same name).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use ferryfs::journal::mem::MemJournal;
use ferryfs::journal::{Batch, Intent, Records};
use ferryfs::store::OldStore;
use ferryfs::store::posix::PosixStore;
use ferryfs::view::View;

struct Stores {
    _tmp: tempfile::TempDir,
    old: std::path::PathBuf,
    new: std::path::PathBuf,
}

fn stores() -> Stores {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
    fs::create_dir(&old).unwrap();
    fs::create_dir(&new).unwrap();
    Stores {
        _tmp: tmp,
        old,
        new,
    }
}

fn open_view(s: &Stores, j: &Records) -> View {
    View::new(
        OldStore::Posix(PosixStore::open(&s.old).unwrap()),
        PosixStore::open(&s.new).unwrap(),
        j.clone(),
    )
    .unwrap()
}

#[test]
fn an_interrupted_rename_is_finished_at_the_next_mount() {
    let s = stores();
    fs::create_dir(s.new.join("a")).unwrap();
    fs::write(s.new.join("a/f"), b"payload").unwrap();
    let ino = fs::metadata(s.new.join("a")).unwrap().ino();
    let j = Records::new(Arc::new(MemJournal::default())).unwrap();
    let mut b = Batch::new();
    b.intent(
        7,
        &Intent::Rename {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
            ino,
        },
    );
    j.commit(b, true).unwrap();
    let _v = open_view(&s, &j);
    assert!(!s.new.join("a").exists());
    assert_eq!(fs::read(s.new.join("b/f")).unwrap(), b"payload");
    assert!(
        j.intents().unwrap().is_empty(),
        "a finished intent must be cleared"
    );
}

#[test]
fn an_intent_never_touches_a_newer_entry_of_the_same_name() {
    let s = stores();
    fs::write(s.new.join("a"), b"newer file, not the one the intent named").unwrap();
    let ino = fs::metadata(s.new.join("a")).unwrap().ino();
    let j = Records::new(Arc::new(MemJournal::default())).unwrap();
    let mut b = Batch::new();
    b.intent(
        1,
        &Intent::Rename {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
            ino: ino + 1_000_000,
        },
    )
    .intent(
        2,
        &Intent::Remove {
            path: b"a".to_vec(),
            ino: ino + 1_000_000,
        },
    );
    j.commit(b, true).unwrap();
    let _v = open_view(&s, &j);
    assert!(s.new.join("a").exists() && !s.new.join("b").exists());
    assert!(j.intents().unwrap().is_empty());
}

#[test]
fn an_interrupted_replacing_rename_removes_the_replaced_entry() {
    let s = stores();
    fs::write(s.new.join("victim"), b"replaced by an OLD-only file").unwrap();
    let ino = fs::metadata(s.new.join("victim")).unwrap().ino();
    let j = Records::new(Arc::new(MemJournal::default())).unwrap();
    let mut b = Batch::new();
    b.intent(
        3,
        &Intent::Remove {
            path: b"victim".to_vec(),
            ino,
        },
    );
    j.commit(b, true).unwrap();
    let _v = open_view(&s, &j);
    assert!(!s.new.join("victim").exists());
}

#[test]
fn an_interrupted_removal_of_a_hard_link_groups_last_new_name_keeps_the_copy_alive() {
    use std::os::fd::AsFd;
    let s = stores();
    fs::write(s.new.join("x"), b"group copy").unwrap();
    let st = fs::metadata(s.new.join("x")).unwrap();
    let f = fs::File::open(s.new.join("x")).unwrap();
    let handle = ferryfs::store::posix::file_handle(f.as_fd()).unwrap();
    drop(f);
    let j = Records::new(Arc::new(MemJournal::default())).unwrap();
    let group = ferryfs::journal::HardLinkGroup {
        copy: Some(handle),
        old_nlink: 2,
        ..Default::default()
    };
    let mut b = Batch::new();
    // OLD's group (dev 1, ino 2) has one OLD name left to link up when the daemon died
    // removing the copy's only NEW name.
    b.hardlink(1, 2, &group)
        .copy_of(st.dev(), st.ino(), 1, 2)
        .intent(
            9,
            &Intent::Remove {
                path: b"x".to_vec(),
                ino: st.ino(),
            },
        );
    j.commit(b, true).unwrap();
    let _v = open_view(&s, &j);
    assert!(!s.new.join("x").exists());
    let kept = s.new.join(ferryfs::view::WORK_DIR).join("hardlink-1-2");
    assert_eq!(fs::read(&kept).unwrap(), b"group copy");
    assert!(j.hardlink(1, 2).unwrap().unwrap().kept_alive);
}
