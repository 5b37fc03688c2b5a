//! An S3 store seen as a read-only tree: the OLD side of a migration out of a bucket.
//!
//! Objects are regular files (or, as s3fs records them, symlinks holding their target) and
//! common prefixes (and `key/` markers) are directories. Each
//! entry gets a stat made from what S3 says of it: size; mode, owner and mtime from the
//! object's metadata (s3fs's or rclone's convention) or the store URL's defaults; ctime is the
//! object's LastModified. `st_ino` is a stable hash of the key and the ETag, so a replaced
//! object is a new inode with a new fingerprint, exactly as a file replaced by rename is in a
//! POSIX OLD; `st_dev` is a hash of the store's URL.
//!
//! A lookup is one HEAD (the metadata lives there), plus one LIST of `name/` when there is no
//! such object (is it a directory?). A directory listed within the last second answers
//! lookups of names it does not hold, and of its directories, without a request.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Defaults, Listed, ObjectInfo, ObjectReader, S3Store, S3Url};

/// How long a listing answers lookups in its directory: the kernel's attribute TTL, the bound
/// the view already has on seeing changes made in OLD.
const LISTING_TTL: Duration = Duration::from_secs(1);

/// Directory listings kept (each holds one entry per name in its directory).
const LISTINGS: usize = 64;

/// Readahead chunk of an object open for reading.
pub const READ_CHUNK: u64 = 8 << 20;

/// FNV-1a, 64 bits: stable across builds and Rust versions (the numbers it makes are kept in
/// the journal's fingerprints).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The inode number of a directory (`etag` None) or of one version of an object. Never 0, top
/// bit clear (the view marks numbers it made up with the top bit).
pub fn ino_of(rel: &str, etag: Option<&str>) -> u64 {
    let h = match etag {
        Some(e) => fnv(&[b"f", rel.as_bytes(), e.as_bytes()]),
        None => fnv(&[b"d", rel.as_bytes()]),
    };
    (h & !(1 << 63)).max(2)
}

/// `dir/name`, or `name` at the root.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// A directory's listing by name.
type Names = Arc<HashMap<String, Listed>>;

pub struct S3Tree {
    pub store: Arc<S3Store>,
    dev: u64,
    defaults: Defaults,
    /// Directory (rel, no trailing '/') to when it was listed and its names.
    listings: Mutex<lru::LruCache<String, (Instant, Names)>>,
    /// Objects the copier asked for ahead of its lookups ([`S3Tree::prefetch`]): rel to when,
    /// what a HEAD or GET said, and a small object's bytes.
    prefetched: Mutex<lru::LruCache<String, Prefetched>>,
}

struct Prefetched {
    at: Instant,
    info: ObjectInfo,
    data: Option<Arc<Vec<u8>>>,
}

/// Objects up to this size are fetched whole by a prefetch (their lookup and their copy in one
/// GET); bigger ones get a HEAD.
pub const PREFETCH_WHOLE: u64 = 256 << 10;
/// How old a listing may be for a prefetch to use it (to choose between GET and HEAD).
const PREFETCH_LISTING_AGE: Duration = Duration::from_secs(60);
/// Prefetched objects kept at most (so at most 64 MiB of small objects' bytes).
const PREFETCHED: usize = 256;

impl fmt::Debug for S3Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Tree({})", self.store.url)
    }
}

/// One entry of the tree, as the view holds it (inside a `Loc`).
pub struct Entry {
    pub tree: Arc<S3Tree>,
    /// Path below the store's root, no leading or trailing '/' ("" for the root).
    pub rel: String,
    /// The object, for a file; `None` for a directory.
    pub object: Option<ObjectInfo>,
    pub st: rustix::fs::Stat,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("rel", &self.rel)
            .field("object", &self.object)
            .finish()
    }
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.object.is_none()
    }

    /// A symlink's target: the object's content (s3fs's convention).
    pub fn readlink(&self) -> io::Result<Vec<u8>> {
        if self.st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(self.reader()?.read_at(0, libc::PATH_MAX as usize)?)
    }

    /// A reader for the object's bytes (ranged GETs, fetched ahead when read in order).
    pub fn reader(&self) -> io::Result<ObjectReader> {
        match &self.object {
            Some(o) => Ok(ObjectReader::new(
                self.tree.store.clone(),
                o.clone(),
                READ_CHUNK,
            )),
            None => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        }
    }
}

/// One name of a listed directory.
pub struct Child {
    pub name: String,
    pub is_dir: bool,
    pub ino: u64,
}

impl S3Tree {
    /// Connect to the store and check that its bucket answers.
    pub fn open(url: &S3Url) -> io::Result<Arc<S3Tree>> {
        let store = S3Store::connect(url).map_err(|e| io::Error::other(e.to_string()))?;
        store
            .reachable()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self::with_store(Arc::new(store)))
    }

    pub fn with_store(store: Arc<S3Store>) -> Arc<S3Tree> {
        let u = &store.url;
        let id = format!(
            "{}|{}|{}",
            u.endpoint.as_deref().unwrap_or(""),
            u.bucket,
            u.prefix
        );
        Arc::new(S3Tree {
            dev: fnv(&[id.as_bytes()]) | (1 << 62),
            defaults: u.defaults,
            store,
            listings: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LISTINGS).expect("nonzero"),
            )),
            prefetched: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(PREFETCHED).expect("nonzero"),
            )),
        })
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    fn stat_of(&self, rel: &str, object: Option<&ObjectInfo>) -> rustix::fs::Stat {
        // SAFETY: `stat` is a plain C struct of integers; all zeroes is a valid value.
        let mut st: rustix::fs::Stat = unsafe { std::mem::zeroed() };
        st.st_dev = self.dev as _;
        st.st_uid = self.defaults.uid;
        st.st_gid = self.defaults.gid;
        st.st_blksize = 1 << 20;
        match object {
            None => {
                st.st_ino = ino_of(rel, None) as _;
                st.st_mode = libc::S_IFDIR | self.defaults.dir_mode;
                st.st_nlink = 2;
                for t in [&mut st.st_mtime, &mut st.st_atime, &mut st.st_ctime] {
                    *t = self.defaults.dir_mtime as _;
                }
            }
            Some(o) => {
                let m = o.meta.unwrap_or_default();
                st.st_ino = ino_of(rel, Some(&o.etag)) as _;
                // s3fs records the file type too: a symlink is an object holding its target
                // (FIFOs and device nodes have no content).
                let kind = match m.mode.map(|m| m & libc::S_IFMT) {
                    Some(t) if t != 0 && t != libc::S_IFDIR => t,
                    _ => libc::S_IFREG,
                };
                st.st_mode = kind | m.mode.map_or(self.defaults.file_mode, |m| m & 0o7777);
                st.st_nlink = 1;
                if let Some(u) = m.uid {
                    st.st_uid = u;
                }
                if let Some(g) = m.gid {
                    st.st_gid = g;
                }
                st.st_size = o.size as _;
                st.st_blocks = o.size.div_ceil(512) as _;
                let (ms, mn) = m.mtime.unwrap_or(o.last_modified);
                st.st_mtime = ms as _;
                st.st_mtime_nsec = mn as _;
                st.st_atime = ms as _;
                st.st_atime_nsec = mn as _;
                st.st_ctime = o.last_modified.0 as _;
                st.st_ctime_nsec = o.last_modified.1 as _;
            }
        }
        st
    }

    fn dir(self: &Arc<Self>, rel: String) -> Entry {
        Entry {
            st: self.stat_of(&rel, None),
            tree: self.clone(),
            rel,
            object: None,
        }
    }

    fn file(self: &Arc<Self>, info: ObjectInfo) -> Entry {
        Entry {
            st: self.stat_of(&info.rel, Some(&info)),
            tree: self.clone(),
            rel: info.rel.clone(),
            object: Some(info),
        }
    }

    pub fn root(self: &Arc<Self>) -> Entry {
        self.dir(String::new())
    }

    fn cached(&self, dir: &str) -> Option<Names> {
        let mut l = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        match l.get(dir) {
            Some((at, names)) if at.elapsed() < LISTING_TTL => Some(names.clone()),
            _ => None,
        }
    }

    /// The entry `name` in directory `dir` (a rel path), if there is one.
    pub fn lookup(self: &Arc<Self>, dir: &str, name: &OsStr) -> io::Result<Option<Entry>> {
        // S3 keys are UTF-8: no other name can be in the bucket.
        let Some(name) = name.to_str() else {
            return Ok(None);
        };
        let rel = join(dir, name);
        if let Some(names) = self.cached(dir) {
            match names.get(name) {
                None => return Ok(None),
                Some(Listed::Dir(_)) => return Ok(Some(self.dir(rel))),
                // Its metadata is in its HEAD.
                Some(Listed::Object(_)) => return self.locate_listed_object(&rel),
            }
        }
        self.locate(&rel)
    }

    /// Ask S3 now, from the caller's thread and outside the view's locks, what a lookup of
    /// `name` in `dir` will ask: when a fresh listing of `dir` holds `name` as an object, a
    /// GET of the whole object if it is small and `data` (its bytes kept for the copy), else
    /// a HEAD. The
    /// answer serves lookups for as long as a listing does. Errors are left to the lookup.
    pub fn prefetch(&self, dir: &str, name: &OsStr, data: bool) {
        let Some(name) = name.to_str() else { return };
        // The listing only says whether to GET or HEAD; the answer is what counts. The copier
        // queues names up to a thousand ahead of its workers: an older listing serves.
        let names = {
            let mut l = self.listings.lock().unwrap_or_else(|p| p.into_inner());
            match l.get(dir) {
                Some((at, names)) if at.elapsed() < PREFETCH_LISTING_AGE => names.clone(),
                _ => return,
            }
        };
        let Some(Listed::Object(o)) = names.get(name) else {
            return;
        };
        let rel = join(dir, name);
        if self.fresh_prefetch(&rel).is_some() {
            return;
        }
        let got = if data && o.size <= PREFETCH_WHOLE {
            self.store
                .get_small(&rel)
                .map(|r| r.map(|(i, d)| (i, Some(Arc::new(d)))))
        } else {
            self.store.head(&rel).map(|r| r.map(|i| (i, None)))
        };
        if let Ok(Some((info, data))) = got {
            self.prefetched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(
                    rel,
                    Prefetched {
                        at: Instant::now(),
                        info,
                        data,
                    },
                );
        }
    }

    fn fresh_prefetch(&self, rel: &str) -> Option<ObjectInfo> {
        let mut p = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
        match p.get(rel) {
            Some(f) if f.at.elapsed() < LISTING_TTL => Some(f.info.clone()),
            _ => None,
        }
    }

    /// The bytes of version `etag` of `rel`, if a prefetch fetched them (taken: once).
    pub fn take_prefetched(&self, rel: &str, etag: &str) -> Option<Arc<Vec<u8>>> {
        let mut p = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
        match p.peek(rel) {
            Some(f) if f.info.etag == etag && f.data.is_some() => p.pop(rel).and_then(|f| f.data),
            _ => None,
        }
    }

    /// The entry at `rel` (a path below the root), if there is one.
    pub fn locate(self: &Arc<Self>, rel: &str) -> io::Result<Option<Entry>> {
        if rel.is_empty() {
            return Ok(Some(self.root()));
        }
        if let Some(info) = self.fresh_prefetch(rel) {
            return Ok(Some(self.file(info)));
        }
        // An object and a directory of one name (`a` beside `a/x`): the directory, as listings
        // show it (docs/SEMANTICS.md "An S3 OLD"). Both asked at once: one round trip.
        let (head, is_dir) = self.store.head_and_is_dir(rel);
        if is_dir? {
            return Ok(Some(self.dir(rel.to_string())));
        }
        Ok(head?.map(|info| self.file(info)))
    }

    /// [`Self::locate`] when the caller knows what it expects there (a copy record's or a
    /// redirect's kind): that kind is asked first, and alone when it is there (one request,
    /// as before names could clash); the other only when it is not.
    pub fn locate_as(self: &Arc<Self>, rel: &str, dir: bool) -> io::Result<Option<Entry>> {
        if rel.is_empty() {
            return Ok(Some(self.root()));
        }
        if let Some(info) = self.fresh_prefetch(rel) {
            return Ok(Some(self.file(info)));
        }
        if dir {
            if self.store.is_dir(rel)? {
                return Ok(Some(self.dir(rel.to_string())));
            }
            return Ok(self.store.head(rel)?.map(|info| self.file(info)));
        }
        if let Some(info) = self.store.head(rel)? {
            return Ok(Some(self.file(info)));
        }
        if self.store.is_dir(rel)? {
            return Ok(Some(self.dir(rel.to_string())));
        }
        Ok(None)
    }

    /// [`Self::locate`] of a name a listing of its directory showed as an object a moment
    /// ago (so no directory hides it): its HEAD alone.
    fn locate_listed_object(self: &Arc<Self>, rel: &str) -> io::Result<Option<Entry>> {
        if let Some(info) = self.fresh_prefetch(rel) {
            return Ok(Some(self.file(info)));
        }
        Ok(self.store.head(rel)?.map(|info| self.file(info)))
    }

    /// The names in directory `dir`, sorted. Kept a second for lookups of those names.
    pub fn list(&self, dir: &str) -> io::Result<Vec<Child>> {
        let listed = self.store.list_dir(&if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        })?;
        let mut out = Vec::with_capacity(listed.len());
        let mut names = HashMap::with_capacity(listed.len());
        for l in listed {
            let (rel, is_dir, ino) = match &l {
                Listed::Object(o) => (o.rel.as_str(), false, ino_of(&o.rel, Some(&o.etag))),
                Listed::Dir(d) => (d.as_str(), true, ino_of(d, None)),
            };
            let name = rel.rsplit('/').next().unwrap_or(rel).to_string();
            out.push(Child {
                name: name.clone(),
                is_dir,
                ino,
            });
            names.insert(name, l);
        }
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(dir.to_string(), (Instant::now(), Arc::new(names)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_stable_and_follow_the_etag() {
        // Fixed values: these numbers live in journals; a change of hash would make every
        // copy of an S3 OLD look stale.
        assert_eq!(fnv(&[b"a"]), 0x089b_e207_b544_f1e4);
        let a = ino_of("d/x", Some("\"e1\""));
        assert_eq!(a, ino_of("d/x", Some("\"e1\"")));
        assert_ne!(a, ino_of("d/x", Some("\"e2\"")));
        assert_ne!(ino_of("d/x", None), ino_of("d/y", None));
        assert_eq!(a >> 63, 0);
    }
}
