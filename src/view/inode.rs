//! The inode table: the view's inode numbers and what backs each one.
//!
//! An inode number is allocated the first time the kernel learns of an entry and stays with
//! that entry for the life of the mount, across copy-up (rule 6): copy-up changes what backs the
//! inode, never its number. Entries are found again by their backing identity (NEW's or OLD's
//! st_dev/st_ino), so hard links share one inode. An inode leaves the table when the kernel
//! forgets it.

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::attr::Kind;
use crate::store::posix::Loc;

pub const ROOT_INO: u64 = 1;

/// Which store's inode an entry currently is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    New(u64, u64),
    Old(u64, u64),
}

/// The OLD entry behind a view entry: its path below OLD's root (what redirects record) and
/// where it is (resolved beneath the root without following symlinks).
#[derive(Debug, Clone)]
pub struct OldRef {
    pub path: Vec<u8>,
    pub loc: Loc,
}

#[derive(Debug)]
pub struct Node {
    /// Names this inode is known by in the view: (parent ino, name). One for everything but
    /// hard links. Copy-up places the NEW copy at one of these.
    pub names: Vec<(u64, OsString)>,
    /// The entry in NEW, once it exists there.
    pub new: Option<Loc>,
    /// The OLD entry: the data of an OLD-only file, or the OLD half of a merged directory.
    pub old: Option<OldRef>,
    /// Journal directory id (directories only), once anything below needed a record.
    pub dir_id: Option<u64>,
    pub ids: Vec<Identity>,
    /// OLD (st_dev, st_ino) of the hard-link group this file belongs to, if OLD gave it
    /// several names (see `journal::HardLinkGroup`).
    pub old_group: Option<(u64, u64)>,
    /// Subdirectories in the merged listing of a directory with both sides, and when counted:
    /// st_nlink of a merged directory without listing it on every getattr.
    pub subdirs: Option<(u32, std::time::Instant)>,
    /// (mtime, mtime_nsec, size, st_ino) of the data when the kernel last opened it: an open
    /// that finds the same stamp keeps the kernel's page cache. A directory's: its stores'
    /// times at its last open (`View::dir_stamp`), for keeping the kernel's cached listing.
    pub cache_stamp: Option<(i64, i64, i64, u64)>,
    /// A directory's: when the kernel last got its whole listing, with every entry's
    /// attributes (READDIRPLUS), rather than keeping the listing it had cached.
    pub listed_at: Option<std::time::Instant>,
    /// Whether NEW's entry is still a plain copy of OLD (a copy record exists), as far as
    /// known: the first change through the view removes the record, once.
    pub copy: CopyState,
    /// When a kernel lookup last queued this entry's copy for a check against OLD.
    pub rechecked: Option<std::time::Instant>,
    /// An OLD-only file's metadata changed through the view (as the journal has it), shown
    /// over OLD's attributes until NEW takes the file.
    pub meta: Option<Box<crate::journal::MetaChange>>,
    /// A file whose data is partly still OLD's (copy-before-write by chunk): NEW's file
    /// holds the chunks its map marks, OLD's the rest.
    pub(crate) partial: Option<Arc<super::partial::Partial>>,
}

impl Node {
    /// An inode with nothing behind it: what a new daemon keeps for an inode the kernel still
    /// holds but whose names no longer resolve (see [`InodeTable::insert_detached`]).
    fn detached() -> Node {
        Node {
            names: Vec::new(),
            new: None,
            old: None,
            dir_id: None,
            ids: Vec::new(),
            old_group: None,
            subdirs: None,
            cache_stamp: None,
            listed_at: None,
            copy: CopyState::Local,
            rechecked: None,
            meta: None,
            partial: None,
        }
    }
}

/// What the kernel knows of one inode: its number, kind, lookup count and names. A daemon
/// handing its mount over passes these on, so the next one serves the same numbers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KnownInode {
    pub ino: u64,
    pub kind: Kind,
    pub lookups: u64,
    /// (parent ino, name bytes).
    pub names: Vec<(u64, Vec<u8>)>,
}

/// See [`Node::copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyState {
    /// Not looked up yet.
    #[default]
    Unknown,
    /// NEW's entry has a copy record.
    Copy,
    /// NEW's entry is the view's own (or there is no NEW entry yet).
    Local,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    lookups: AtomicU64,
    node: Mutex<Node>,
    /// The copy claim, shared by the view's copy-up and the copier: held for the whole of a
    /// copy so no two copy the same file.
    pub claim: Mutex<()>,
    /// Set by the view when it wants the claim: a background copy holding it gives up at its
    /// next chunk and throws its work away (the view's change wins).
    pub cancel: std::sync::atomic::AtomicBool,
    /// Held around a chmod through the view and around clearing set-id bits (the mode read,
    /// then written back): the two never interleave.
    pub mode_lock: Mutex<()>,
    /// File handles open on it (counted under the node's lock): an S3 NEW's publisher evicts
    /// only a file nobody has open (a handle may hold NEW's file itself, or the kernel may
    /// pass it through).
    pub(crate) opens: AtomicU64,
    /// Held shared around every change of NEW's file's data through the view that does not go
    /// through its partial state (a write, a truncate, an fallocate), and exclusively by an
    /// S3 NEW's eviction of a file still open: a change either ends before the file turns
    /// into an evicted file (and its mtime tells the eviction), or starts after and goes
    /// through the evicted file's state.
    pub(crate) data: std::sync::RwLock<()>,
    /// [`crate::view::write_mark`] at the end of the last such change (0: none since the
    /// inode was made): an eviction knows a file unchanged since a mark by it, not only by
    /// its mtime (which cannot tell a change in the same timestamp tick).
    pub(crate) last_write: AtomicU64,
}

impl Inode {
    /// A change of NEW's file's data just ended (see [`Inode::last_write`]; called under
    /// [`Inode::data`]).
    pub(crate) fn wrote(&self) {
        self.last_write
            .store(crate::view::write_mark(), Ordering::Release);
    }

    pub fn node(&self) -> MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Tables {
    by_ino: rustc_hash::FxHashMap<u64, Arc<Inode>>,
    by_id: rustc_hash::FxHashMap<Identity, u64>,
}

impl Tables {
    /// `inode` is the table's inode for its number (not one the kernel forgot).
    fn holds(&self, inode: &Arc<Inode>) -> bool {
        self.by_ino
            .get(&inode.ino)
            .is_some_and(|i| Arc::ptr_eq(i, inode))
    }
}

/// The view's inode numbers (st_ino, and the kernel's node ids) outlive a mount: they are
/// made from what backs the entry, so the same entry gets the same number after unmount,
/// kill -9, takeover and commit. An entry that came from OLD has OLD's own st_ino (folded
/// below 2^61), and keeps it once copied (the journal maps its NEW inode to it); an entry born
/// in the view has 2^62 + NEW's st_ino. A number already taken by another live inode (two OLD
/// file systems, a folded collision) falls back to one counted up from 2^61.
const NUMBER_MASK: u64 = (1 << 61) - 1;
const FALLBACK_BASE: u64 = 1 << 61;

/// The number of an entry that came from OLD, whose OLD st_ino is `ino`.
pub fn old_number(ino: u64) -> u64 {
    ino & NUMBER_MASK
}

/// The number of an entry born in the view, whose NEW st_ino is `ino`.
pub fn new_born_number(ino: u64) -> u64 {
    (1 << 62) | (ino & NUMBER_MASK)
}

pub struct InodeTable {
    t: Mutex<Tables>,
    /// The next fallback number (see [`old_number`]).
    next: AtomicU64,
    /// A number the next new inode must take (a takeover replays the kernel's numbers); 0: none.
    pinned: AtomicU64,
}

impl InodeTable {
    pub fn new(root: Node) -> InodeTable {
        let mut t = Tables::default();
        for id in &root.ids {
            t.by_id.insert(*id, ROOT_INO);
        }
        t.by_ino.insert(
            ROOT_INO,
            Arc::new(Inode {
                ino: ROOT_INO,
                kind: Kind::Dir,
                // The root is never forgotten.
                lookups: AtomicU64::new(1 << 62),
                node: Mutex::new(root),
                claim: Mutex::new(()),
                cancel: Default::default(),
                mode_lock: Mutex::new(()),
                opens: AtomicU64::new(0),
                data: Default::default(),
                last_write: AtomicU64::new(0),
            }),
        );
        InodeTable {
            t: Mutex::new(t),
            next: AtomicU64::new(FALLBACK_BASE),
            pinned: AtomicU64::new(0),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.t.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.tables().by_ino.get(&ino).cloned()
    }

    /// Whether `inode` is still the table's inode for its number: an inode the kernel forgot
    /// (while the copier held it) is not, and its names may be stale. A new lookup of the same
    /// entry makes a new inode.
    pub fn is_live(&self, inode: &Arc<Inode>) -> bool {
        self.tables().holds(inode)
    }

    /// Count one lookup of `inode` if it is still the table's inode for its number (give it
    /// back with [`Self::forget`]); `false` for an inode the kernel forgot. Work on an inode
    /// that came by a queue (no lookup of its own) pins it first, so that the kernel cannot
    /// forget it meanwhile: a new lookup of the entry would make a second inode, with a claim
    /// of its own, and a change through it would not wait for that work.
    pub fn pin(&self, inode: &Arc<Inode>) -> bool {
        // Counted under the table's lock, as `forget` decides under it.
        let t = self.tables();
        let live = t.holds(inode);
        if live {
            inode.lookups.fetch_add(1, Ordering::Relaxed);
        }
        drop(t);
        live
    }

    /// The inode number already serving `id`, if any (for readdir's d_ino).
    pub fn ino_of(&self, id: &Identity) -> Option<u64> {
        self.tables().by_id.get(id).copied()
    }

    /// Find the inode for an entry the kernel is about to learn of (counting one lookup), or
    /// create it from `make`, numbered `want` unless that number is taken (see
    /// [`old_number`]). `name` is added to the inode's names.
    pub fn lookup_or_insert(
        &self,
        id: Identity,
        kind: Kind,
        want: u64,
        parent: u64,
        name: &std::ffi::OsStr,
        make: impl FnOnce() -> Node,
    ) -> Arc<Inode> {
        let mut t = self.tables();
        if let Some(ino) = t.by_id.get(&id).copied()
            && let Some(inode) = t.by_ino.get(&ino).cloned()
            && inode.kind == kind
        {
            inode.lookups.fetch_add(1, Ordering::Relaxed);
            {
                let mut n = inode.node();
                if !n.names.iter().any(|(p, nm)| *p == parent && nm == name) {
                    n.names.push((parent, name.to_owned()));
                }
            }
            return inode;
        }
        let free = |n: u64| n > ROOT_INO && !t.by_ino.contains_key(&n);
        let pinned = self.pinned.swap(0, Ordering::Relaxed);
        let ino = if free(pinned) {
            pinned
        } else if free(want) {
            want
        } else {
            loop {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                if free(n) {
                    break n;
                }
            }
        };
        let node = make();
        for i in &node.ids {
            t.by_id.insert(*i, ino);
        }
        t.by_id.insert(id, ino);
        let inode = Arc::new(Inode {
            ino,
            kind,
            lookups: AtomicU64::new(1),
            node: Mutex::new(Node {
                ids: {
                    let mut v = node.ids.clone();
                    if !v.contains(&id) {
                        v.push(id);
                    }
                    v
                },
                ..node
            }),
            claim: Mutex::new(()),
            cancel: Default::default(),
            mode_lock: Mutex::new(()),
            opens: AtomicU64::new(0),
            data: Default::default(),
            last_write: AtomicU64::new(0),
        });
        t.by_ino.insert(ino, inode.clone());
        inode
    }

    /// Record that `inode` is now also (or instead) known as `id` (after copy-up or link).
    pub fn add_identity(&self, inode: &Inode, id: Identity) {
        let mut t = self.tables();
        t.by_id.insert(id, inode.ino);
        let mut n = inode.node();
        if !n.ids.contains(&id) {
            n.ids.push(id);
        }
    }

    /// `id` no longer exists (its store entry was deleted): forget the mapping, so that a new
    /// entry the store gives the same number (ext4, XFS reuse inode numbers) is not taken for
    /// the old one. The inode itself lives on for the kernel and open files.
    pub fn unmap(&self, id: Identity) {
        let mut t = self.tables();
        if let Some(ino) = t.by_id.remove(&id)
            && let Some(inode) = t.by_ino.get(&ino)
        {
            inode.node().ids.retain(|i| *i != id);
        }
    }

    pub fn len(&self) -> usize {
        self.tables().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Run `f` on every inode in the table.
    pub fn for_each(&self, mut f: impl FnMut(&Inode)) {
        let all: Vec<Arc<Inode>> = self.tables().by_ino.values().cloned().collect();
        for i in &all {
            f(i);
        }
    }

    /// Every inode but the root, as the kernel knows it, and the next number to give.
    pub fn export(&self) -> (Vec<KnownInode>, u64) {
        use std::os::unix::ffi::OsStrExt;
        let all: Vec<Arc<Inode>> = self.tables().by_ino.values().cloned().collect();
        let known = all
            .iter()
            .filter(|i| i.ino != ROOT_INO)
            .map(|i| KnownInode {
                ino: i.ino,
                kind: i.kind,
                lookups: i.lookups.load(Ordering::Relaxed),
                names: i
                    .node()
                    .names
                    .iter()
                    .map(|(p, n)| (*p, n.as_bytes().to_vec()))
                    .collect(),
            })
            .collect();
        (known, self.next.load(Ordering::Relaxed))
    }

    /// The number the next new inode gets. A new daemon taking over sets it before each
    /// lookup it replays, so the entry gets the number the kernel already uses.
    /// The next fallback number (a takeover carries it over).
    pub fn set_next(&self, ino: u64) {
        self.next.store(ino.max(FALLBACK_BASE), Ordering::Relaxed);
    }

    /// The next new inode takes number `ino` (a takeover gives each inode the kernel's number
    /// again); 0 takes the pin back.
    pub fn pin_next(&self, ino: u64) {
        self.pinned.store(ino, Ordering::Relaxed);
    }

    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Set an inode's lookup count to what the kernel holds (after a takeover's replay).
    pub fn set_lookups(&self, ino: u64, lookups: u64) {
        if ino != ROOT_INO
            && let Some(i) = self.get(ino)
        {
            i.lookups.store(lookups, Ordering::Relaxed);
        }
    }

    /// An inode the kernel holds whose names no longer resolve (removed while open, or
    /// changed behind the view during a takeover): it keeps its number, and its open files
    /// keep working; anything by name fails until the kernel forgets it.
    pub fn insert_detached(&self, ino: u64, kind: Kind, lookups: u64) -> Arc<Inode> {
        let inode = Arc::new(Inode {
            ino,
            kind,
            lookups: AtomicU64::new(lookups),
            node: Mutex::new(Node::detached()),
            claim: Mutex::new(()),
            cancel: Default::default(),
            mode_lock: Mutex::new(()),
            opens: AtomicU64::new(0),
            data: Default::default(),
            last_write: AtomicU64::new(0),
        });
        self.tables().by_ino.insert(ino, inode.clone());
        inode
    }

    /// The kernel dropped `count` references; remove the inode when none remain.
    pub fn forget(&self, ino: u64, count: u64) {
        let mut t = self.tables();
        let Some(inode) = t.by_ino.get(&ino).cloned() else {
            return;
        };
        let prev = inode.lookups.fetch_sub(
            count.min(inode.lookups.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if prev <= count {
            t.by_ino.remove(&ino);
            for id in inode.node().ids.iter() {
                if t.by_id.get(id) == Some(&ino) {
                    t.by_id.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_holds_a_live_inode_and_refuses_a_forgotten_one() {
        let t = InodeTable::new(Node::detached());
        let id = Identity::New(1, 42);
        let make = Node::detached;
        let a = t.lookup_or_insert(id, Kind::File, 0, ROOT_INO, std::ffi::OsStr::new("a"), make);
        // Pinned, the kernel's forget of its one lookup leaves it in the table: a new lookup
        // of the entry finds the same inode (one claim for both).
        assert!(t.pin(&a));
        t.forget(a.ino, 1);
        assert!(t.is_live(&a));
        let again =
            t.lookup_or_insert(id, Kind::File, 0, ROOT_INO, std::ffi::OsStr::new("a"), make);
        assert!(Arc::ptr_eq(&a, &again));
        t.forget(a.ino, 1); // the second lookup
        t.forget(a.ino, 1); // the pin
        assert!(!t.is_live(&a));
        // Forgotten: no pin, and the entry's next lookup is another inode.
        assert!(!t.pin(&a));
        let b = t.lookup_or_insert(id, Kind::File, 0, ROOT_INO, std::ffi::OsStr::new("a"), make);
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(!t.pin(&a) && t.pin(&b));
    }

    #[test]
    fn numbers_come_from_the_backing_and_fall_back_when_taken() {
        let t = InodeTable::new(Node::detached());
        let insert = |id, want| {
            t.lookup_or_insert(id, Kind::File, want, ROOT_INO, "a".as_ref(), Node::detached)
        };
        assert_eq!(insert(Identity::Old(1, 7), old_number(7)).ino, 7);
        // Another entry wanting the same number (another file system's 7) gets a fallback.
        let b = insert(Identity::Old(2, 7), old_number(7));
        assert!(b.ino >= FALLBACK_BASE && b.ino < 1 << 62, "{}", b.ino);
        let c = insert(Identity::New(3, 7), new_born_number(7));
        assert_eq!(c.ino, (1 << 62) | 7);
        // The root's number is never given; a pin wins over the wanted number.
        assert_ne!(insert(Identity::Old(1, 1), old_number(1)).ino, ROOT_INO);
        t.pin_next(12345);
        assert_eq!(insert(Identity::Old(1, 99), old_number(99)).ino, 12345);
        assert_eq!(old_number(u64::MAX), NUMBER_MASK);
    }
}
