//! The view's side of a daemon takeover (`mount --takeover`): what the kernel holds of this
//! daemon (inode numbers with their lookup counts and names, open files and directories) is
//! written out by the old daemon and put back by the new one, so every number and handle the
//! kernel uses keeps meaning the same entry.
//!
//! Inodes are not copied field by field: the new daemon looks each name up again, parent
//! first, with the inode number set to the one the kernel uses. What backs an entry is then
//! found exactly as for any lookup, from the stores and the journal as they are now.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::handles::{FileHandle, Handle};
use super::inode::{KnownInode, ROOT_INO};
use super::{DirEntry, Kind, View};

/// An open file: its handle, inode and open flags. Its file descriptor travels beside the
/// state, in the same order as the list (an S3 object has none: it is opened again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenFileState {
    pub fh: u64,
    pub ino: u64,
    pub flags: i32,
    pub on_new: bool,
    #[serde(default)]
    pub object: bool,
}

/// An open directory: its handle and the listing snapshot its offsets index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenDirState {
    pub fh: u64,
    pub entries: Vec<(Vec<u8>, Kind, u64)>,
    /// The directory's inode (absent from an older daemon's state: the snapshot then stays).
    #[serde(default)]
    pub ino: Option<u64>,
    /// Whether `entries` is a snapshot taken (else the handle lists at its first read).
    #[serde(default = "listed_default")]
    pub listed: bool,
}

fn listed_default() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ViewState {
    pub inodes: Vec<KnownInode>,
    pub next_ino: u64,
    pub files: Vec<OpenFileState>,
    pub dirs: Vec<OpenDirState>,
    pub next_fh: u64,
}

/// What a new daemon put back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Imported {
    pub inodes: usize,
    /// Inodes whose names no longer resolve: kept as numbers only (see
    /// `InodeTable::insert_detached`).
    pub detached: usize,
    pub files: usize,
    pub dirs: usize,
}

impl View {
    /// What the kernel holds of this view, and the open files behind its file handles (in the
    /// order of `ViewState::files`). Call with every request parked.
    pub fn export_state(&self) -> (ViewState, Vec<Arc<File>>) {
        let (inodes, next_ino) = self.inodes.export();
        let (handles, next_fh) = self.handles.export();
        let mut st = ViewState {
            inodes,
            next_ino,
            next_fh,
            ..Default::default()
        };
        let mut fds = Vec::new();
        for (fh, h) in handles {
            match &*h {
                Handle::File(f) => {
                    let (src, on_new) = f.file.read().unwrap().clone();
                    st.files.push(OpenFileState {
                        fh,
                        ino: f.inode.ino,
                        flags: f.flags,
                        on_new,
                        object: src.file().is_none(),
                    });
                    if let Some(file) = src.file() {
                        fds.push(file.clone());
                    }
                }
                Handle::Dir(d) => {
                    let snapshot = d.entries.lock().unwrap().clone();
                    st.dirs.push(OpenDirState {
                        fh,
                        entries: snapshot
                            .as_deref()
                            .into_iter()
                            .flatten()
                            .map(|(_, e)| (e.name.as_bytes().to_vec(), e.kind, e.ino))
                            .collect(),
                        ino: Some(d.ino),
                        listed: snapshot.is_some(),
                    })
                }
            }
        }
        (st, fds)
    }

    /// Put back what the previous daemon's kernel connection holds. `files` are the open
    /// files of `st.files`, in order. Call before serving any request.
    pub fn import_state(&self, st: ViewState, files: Vec<File>) -> Imported {
        let mut out = Imported::default();
        let mut known: HashSet<u64> = HashSet::from([ROOT_INO]);
        let mut pending: Vec<&KnownInode> =
            st.inodes.iter().filter(|k| k.ino != ROOT_INO).collect();
        // Parents first: each round attaches the inodes one of whose parents is attached.
        loop {
            let before = pending.len();
            pending.retain(|k| {
                let mut attached = false;
                for (parent, name) in &k.names {
                    if !known.contains(parent) {
                        continue;
                    }
                    let name = OsStr::from_bytes(name);
                    // A first name makes the inode (with the kernel's number); any other name
                    // of a hard link is added to it.
                    self.inodes.pin_next(k.ino);
                    let found = self.lookup_entry(*parent, name);
                    self.inodes.pin_next(0);
                    match found {
                        Ok((inode, _)) if inode.ino == k.ino && inode.kind == k.kind => {
                            attached = true
                        }
                        Ok((inode, _)) => {
                            // The name is another entry now (changed behind the view
                            // meanwhile): give its lookup back.
                            self.inodes.forget(inode.ino, 1);
                        }
                        Err(e) => {
                            tracing::debug!(ino = k.ino, name = ?name, error = %e, "takeover: name no longer resolves")
                        }
                    }
                }
                if attached {
                    known.insert(k.ino);
                }
                !attached
            });
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        for k in &pending {
            tracing::warn!(
                ino = k.ino,
                "takeover: an inode the kernel holds no longer resolves by name; kept for its open files"
            );
            self.inodes.insert_detached(k.ino, k.kind, k.lookups);
        }
        out.detached = pending.len();
        for k in &st.inodes {
            self.inodes.set_lookups(k.ino, k.lookups);
        }
        out.inodes = st.inodes.len() - out.detached;
        self.inodes.set_next(self.inodes.next().max(st.next_ino));
        let by_ino: HashMap<u64, Kind> = st.inodes.iter().map(|k| (k.ino, k.kind)).collect();
        let mut files = files.into_iter();
        for f in &st.files {
            let src = if f.object {
                // An S3 object: read again from the inode's OLD entry (same ETag, so the same
                // bytes, or ESTALE at the next read if the object was replaced meanwhile).
                let loc = self
                    .inodes
                    .get(f.ino)
                    .and_then(|i| i.node().old.as_ref().map(|o| o.loc.clone()));
                match loc.map(|l| l.open_source(rustix::fs::OFlags::RDONLY)) {
                    Some(Ok(s)) => s,
                    _ => {
                        tracing::warn!(
                            ino = f.ino,
                            "takeover: an open S3 object no longer resolves; its handle is dropped"
                        );
                        continue;
                    }
                }
            } else {
                match files.next() {
                    Some(file) => crate::store::Source::File(Arc::new(file)),
                    None => break,
                }
            };
            let inode = match self.inodes.get(f.ino) {
                Some(i) => i,
                None => self.inodes.insert_detached(
                    f.ino,
                    by_ino.get(&f.ino).copied().unwrap_or(Kind::File),
                    0,
                ),
            };
            self.handles.insert_at(
                f.fh,
                Handle::File(FileHandle {
                    inode,
                    file: RwLock::new((src, f.on_new)),
                    flags: f.flags,
                }),
            );
            out.files += 1;
        }
        for d in st.dirs {
            let entries = d
                .entries
                .into_iter()
                .map(|(name, kind, ino)| DirEntry {
                    name: std::ffi::OsString::from(std::ffi::OsStr::from_bytes(&name)),
                    kind,
                    ino,
                    new_id: None,
                })
                .collect();
            // The offsets the kernel holds are the ones these names are placed at here too.
            let entries = super::handles::placed(entries);
            self.handles.insert_at(
                d.fh,
                Handle::Dir(super::handles::DirHandle {
                    ino: d.ino.unwrap_or(0),
                    entries: std::sync::Mutex::new(d.listed.then(|| std::sync::Arc::new(entries))),
                }),
            );
            out.dirs += 1;
        }
        self.handles.set_next(st.next_fh);
        out
    }
}
