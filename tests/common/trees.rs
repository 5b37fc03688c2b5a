//! Trees of entries as a client sees them, of a directory or of a bucket, to compare stores
//! across pairings.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use ferryfs::store::s3::{ObjectReader, S3Store};

/// One entry as a client sees it: type, bytes (a symlink's target), permission bits, and
/// mtime in seconds (files and symlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File {
        data: Vec<u8>,
        perm: u32,
        mtime: i64,
    },
    Link(Vec<u8>),
}

/// Every entry below `root` of a directory tree.
pub fn tree_of_dir(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let entry = if md.is_dir() {
                stack.push(p.clone());
                Entry::Dir
            } else if md.file_type().is_symlink() {
                Entry::Link(
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                Entry::File {
                    data: fs::read(&p).unwrap(),
                    perm: md.mode() & 0o7777,
                    mtime: md.mtime(),
                }
            };
            out.insert(rel, entry);
        }
    }
    out
}

/// Every entry of a bucket as another client reads it: objects by HEAD and GET, their type and
/// mode from s3fs's metadata, directories from markers and from the keys' prefixes.
pub fn tree_of_bucket(s: &Arc<S3Store>) -> BTreeMap<String, Entry> {
    let mut keys = Vec::new();
    s.list_all(&mut |k, _| keys.push(k.to_string())).unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let mut parts: Vec<&str> = k.trim_end_matches('/').split('/').collect();
        parts.pop();
        for i in 1..=parts.len() {
            out.insert(parts[..i].join("/"), Entry::Dir);
        }
        if let Some(d) = k.strip_suffix('/') {
            out.insert(d.to_string(), Entry::Dir);
            continue;
        }
        let info = s.head(&k).unwrap().expect("listed object");
        let meta = info.meta.unwrap_or_default();
        let r = ObjectReader::new(s.clone(), info.clone(), 16 << 20);
        let data = r.read_at(0, info.size as usize).unwrap();
        let mode = meta.mode.unwrap_or(0o100644);
        let entry = if mode & 0o170000 == 0o120000 {
            Entry::Link(data)
        } else {
            Entry::File {
                data,
                perm: mode & 0o7777,
                mtime: meta.mtime.map_or(info.last_modified.0, |t| t.0),
            }
        };
        out.insert(k, entry);
    }
    out
}

/// `got` is `want`, or a list of the differences.
pub fn assert_same(what: &str, got: &BTreeMap<String, Entry>, want: &BTreeMap<String, Entry>) {
    let short = |e: &Entry| match e {
        Entry::File { data, perm, mtime } => {
            format!("file {} bytes {perm:o} mtime {mtime}", data.len())
        }
        e => format!("{e:?}"),
    };
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}: {}", short(w))),
            Some(g) if g != w => diffs.push(format!("{k}: got {}, want {}", short(g), short(w))),
            Some(_) => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("extra {k}: {}", short(g)));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// Set `p`'s mtime (and atime) to `secs` seconds, not following a symlink.
pub fn set_mtime(p: &Path, secs: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}
