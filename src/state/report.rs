//! `ferryfs report`: one record per entry of the migration, streamed (memory bounded by the
//! depth of the tree and the number of recorded problems, not by the number of entries).
//!
//! NEW is walked as it is, and each entry is classified by the journal's records of its NEW
//! inode: a copy record (copied from OLD, perhaps renamed through the view since, perhaps
//! copied again after OLD changed it), an origin record (came from OLD, then written through
//! the view), neither (born in the view). The journal's directory records add the names the
//! view removed; a POSIX OLD walked with prepare's filter adds what the filter left out. The
//! verdict is the copier's error for the path, else what the last verify found, else ok; a
//! file `verify --checksum` read carries its SHA-256 while its ctime and size are unchanged.
//!
//! Once committed the journal no longer holds these records: commit writes the report as the
//! migration's manifest (`STATE/manifest.jsonl`), and `report` then reads that.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{StateError, io_at, layout, read_config};
use crate::copier::filter::Filter;
use crate::journal::{Dentry, Fingerprint, Phase, ROOT_DIR, Records};
use crate::store::StoreSpec;

/// One entry of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The path below the dataset's root, its bytes exact: `\xHH` stands for a byte that is not
    /// UTF-8, and for `\` itself (see [`escape`]).
    pub path: String,
    /// file, dir, symlink, fifo, socket, char, block; `unknown` for a removed entry OLD no
    /// longer shows.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// copied, copied_again, renamed, written, born, removed, excluded.
    pub origin: String,
    /// Where it came from in OLD when that is not `path` (renamed, written), escaped alike.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    /// OLD's entry as NEW took it (dev, ino, size, mtime, ctime).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub old_fingerprint: Option<Fingerprint>,
    /// NEW's content as `verify --checksum` read it (and found equal to OLD's).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<String>,
    /// ok, mismatch, error.
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// When the verdict was reached (seconds since the epoch), when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub at: Option<u64>,
}

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

const CSV_HEADER: &str = "path,type,size,origin,from,old_dev,old_ino,old_size,old_mtime,old_ctime,sha256,verdict,errno,detail,at";

/// Write `records` in `format` to `out`; the number written.
pub fn write_records(
    format: Format,
    out: &mut dyn Write,
    records: &mut dyn Iterator<Item = io::Result<Record>>,
) -> io::Result<u64> {
    if format == Format::Csv {
        writeln!(out, "{CSV_HEADER}")?;
    }
    let mut n = 0;
    for r in records {
        let r = r?;
        match format {
            Format::Jsonl => {
                serde_json::to_writer(&mut *out, &r)?;
                out.write_all(b"\n")?;
            }
            Format::Csv => {
                let fp = r.old_fingerprint;
                let ns = |t: (i64, i64)| format!("{}.{:09}", t.0, t.1);
                let cols = [
                    csv(&r.path),
                    csv(&r.kind),
                    r.size.to_string(),
                    csv(&r.origin),
                    csv(r.from.as_deref().unwrap_or("")),
                    fp.map_or(String::new(), |f| f.dev.to_string()),
                    fp.map_or(String::new(), |f| f.ino.to_string()),
                    fp.map_or(String::new(), |f| f.size.to_string()),
                    fp.map_or(String::new(), |f| ns(f.mtime)),
                    fp.map_or(String::new(), |f| ns(f.ctime)),
                    csv(r.sha256.as_deref().unwrap_or("")),
                    csv(&r.verdict),
                    r.errno.map_or(String::new(), |e| e.to_string()),
                    csv(r.detail.as_deref().unwrap_or("")),
                    r.at.map_or(String::new(), |a| a.to_string()),
                ];
                writeln!(out, "{}", cols.join(","))?;
            }
        }
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// A CSV field, quoted when it needs to be (RFC 4180).
fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A path's bytes as text, exactly: UTF-8 as it is, but every byte that is not UTF-8, and the
/// backslash, written `\xHH`.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                s.push_str("\\x5c");
            } else {
                s.push(c);
            }
        }
        for byte in chunk.invalid() {
            s.push_str(&format!("\\x{byte:02x}"));
        }
    }
    s
}

/// The bytes [`escape`] wrote.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1] == b'x'
            && let Ok(hex) = std::str::from_utf8(&b[i + 2..i + 4])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else {
        "block"
    }
}

/// What the journal says went wrong, by view path (no leading `/`).
struct Verdicts {
    errors: HashMap<Vec<u8>, crate::journal::CopyError>,
    mismatches: HashMap<Vec<u8>, crate::journal::Mismatch>,
    stales: HashMap<Vec<u8>, crate::journal::StaleRecord>,
}

/// Records keyed by view path, the paths without a leading `/`.
fn by_path<T>(v: Vec<(Vec<u8>, T)>) -> HashMap<Vec<u8>, T> {
    v.into_iter()
        .map(|(k, r)| match k.strip_prefix(b"/") {
            Some(t) => (t.to_vec(), r),
            None => (k, r),
        })
        .collect()
}

/// The report of the migration in `state`, streamed: records in the order a depth-first walk
/// of NEW meets them, then the names the view removed, then what the filter left out.
pub struct Report {
    journal: Records,
    old_root: Option<PathBuf>,
    filter: Filter,
    verdicts: Verdicts,
    /// Directories still to list: (path below the root, its open listing).
    stack: Vec<(Vec<u8>, fs::ReadDir)>,
    stage: Stage,
    /// The journal's directory records still to read: (dir id, its path).
    dirs: Vec<(u64, Vec<u8>)>,
    pending: std::collections::VecDeque<Record>,
    /// The walk of OLD for the filter's left-outs: (path, listing, all below excluded).
    old_stack: Vec<(Vec<u8>, fs::ReadDir, bool)>,
}

#[derive(PartialEq)]
enum Stage {
    New,
    Removed,
    Excluded,
    Done,
}

/// Open the report of the migration in `state` (read-only: a daemon may be serving it).
pub fn open(state: &Path) -> Result<Box<dyn Iterator<Item = io::Result<Record>>>, StateError> {
    let journal = super::status::read_journal(state)?;
    let phase = journal.phase()?;
    if matches!(phase, Phase::Committed) {
        let m = layout::manifest_path(state);
        let f = fs::File::open(&m).map_err(|e| {
            StateError::Invalid(format!(
                "the migration is committed and its manifest {} does not read ({e}): the \
                 journal no longer holds the records a report is made of",
                m.display()
            ))
        })?;
        return Ok(Box::new(io::BufReader::new(f).lines().map(|l| {
            let l = l?;
            serde_json::from_str(&l).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })));
    }
    Ok(Box::new(Report::new(journal, state)?))
}

impl Report {
    pub fn new(journal: Records, state: &Path) -> Result<Report, StateError> {
        let config = read_config(&journal, state)?;
        let new_root = match &config.new {
            StoreSpec::Posix { path } => path.clone(),
            StoreSpec::S3 { .. } => layout::stage_dir(state),
        };
        let old_root = config.old.posix_path().map(|p| p.to_path_buf());
        let filter = crate::copier::filter::load(&journal).map_err(StateError::Invalid)?;
        let verdicts = Verdicts {
            errors: by_path(journal.errors()?),
            mismatches: by_path(journal.mismatches()?),
            stales: by_path(journal.stales()?),
        };
        let listing = fs::read_dir(&new_root).map_err(io_at(&new_root))?;
        Ok(Report {
            journal,
            old_root,
            filter,
            verdicts,
            stack: vec![(Vec::new(), listing)],
            stage: Stage::New,
            dirs: vec![(ROOT_DIR, Vec::new())],
            pending: Default::default(),
            old_stack: Vec::new(),
        })
    }

    fn verdict(&self, path: &[u8], r: &mut Record) {
        if let Some(e) = self.verdicts.errors.get(path) {
            r.verdict = "error".into();
            r.errno = Some(e.errno);
            r.detail = Some(e.error.clone());
            r.at = Some(e.at);
        } else if let Some(m) = self.verdicts.mismatches.get(path) {
            r.verdict = "mismatch".into();
            r.detail = Some(m.detail.clone());
            r.at = Some(m.at);
        }
    }

    /// The next entry of NEW, classified.
    fn next_new(&mut self) -> Option<io::Result<Record>> {
        loop {
            let (dir, listing) = self.stack.last_mut()?;
            let ent = match listing.next() {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.stack.pop();
                    continue;
                }
            };
            let name = ent.file_name();
            if dir.is_empty()
                && (name == crate::view::WORK_DIR || name == crate::store::probe::PROBE_DIR)
            {
                continue;
            }
            let path = crate::view::join(dir, &name);
            let md = match ent.metadata() {
                Ok(m) => m,
                Err(e) => return Some(Err(e)),
            };
            if md.is_dir() {
                match fs::read_dir(ent.path()) {
                    Ok(l) => self.stack.push((path.clone(), l)),
                    Err(e) => return Some(Err(e)),
                }
            }
            return Some(self.classify(path, &md));
        }
    }

    fn classify(&self, path: Vec<u8>, md: &fs::Metadata) -> io::Result<Record> {
        let err = |e: crate::journal::JournalError| io::Error::other(e.to_string());
        let mut r = Record {
            path: escape(&path),
            kind: kind_of(&md.file_type()).into(),
            size: if md.is_file() { md.len() } else { 0 },
            origin: "born".into(),
            from: None,
            old_fingerprint: None,
            sha256: None,
            verdict: "ok".into(),
            errno: None,
            detail: None,
            at: None,
        };
        let (dev, ino) = (md.dev(), md.ino());
        if let Some(c) = self.journal.copy(dev, ino).map_err(err)? {
            r.old_fingerprint = Some(c.fp);
            // A file with several names is one copy: its record names the first name copied,
            // the others were linked to it (OLD's hard links), not renamed.
            r.origin = if c.origin != path && md.nlink() <= 1 {
                r.from = Some(escape(&c.origin));
                "renamed".into()
            } else if self
                .verdicts
                .stales
                .get(&path)
                .is_some_and(|s| s.copied_again)
            {
                "copied_again".into()
            } else {
                "copied".into()
            };
        } else if let Some(o) = self.journal.origin_of(dev, ino).map_err(err)? {
            r.origin = "written".into();
            if o != path {
                r.from = Some(escape(&o));
            }
        }
        if md.is_file()
            && let Some(d) = self.journal.digest_of(dev, ino).map_err(err)?
            && d.size == md.len()
            && d.ctime == (md.ctime(), md.ctime_nsec())
        {
            r.sha256 = Some(d.sha256);
            r.at = Some(d.at);
        }
        self.verdict(&path, &mut r);
        Ok(r)
    }

    /// The next name the view removed (a tombstone over OLD's entry).
    fn next_removed(&mut self) -> Option<io::Result<Record>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(Ok(r));
            }
            let (id, dir) = self.dirs.pop()?;
            let list = match self.journal.list(id) {
                Ok(l) => l,
                Err(e) => return Some(Err(io::Error::other(e.to_string()))),
            };
            for (name, d) in list {
                let path = crate::view::join(&dir, std::ffi::OsStr::from_bytes(&name));
                match d {
                    Dentry::Tombstone => {
                        // What OLD shows there still, when OLD is a directory tree.
                        let old = self.old_root.as_ref().and_then(|o| {
                            fs::symlink_metadata(o.join(std::ffi::OsStr::from_bytes(&path))).ok()
                        });
                        let mut r = Record {
                            path: escape(&path),
                            kind: old
                                .as_ref()
                                .map_or("unknown", |m| kind_of(&m.file_type()))
                                .into(),
                            size: old.as_ref().filter(|m| m.is_file()).map_or(0, |m| m.len()),
                            origin: "removed".into(),
                            from: None,
                            old_fingerprint: None,
                            sha256: None,
                            verdict: "ok".into(),
                            errno: None,
                            detail: None,
                            at: None,
                        };
                        self.verdict(&path, &mut r);
                        self.pending.push_back(r);
                    }
                    Dentry::Dir { id, .. } => self.dirs.push((id, path)),
                    Dentry::File { .. } => {}
                }
            }
        }
    }

    /// The next entry of OLD the filter leaves out (a POSIX OLD).
    fn next_excluded(&mut self) -> Option<io::Result<Record>> {
        loop {
            let (dir, listing, below) = self.old_stack.last_mut()?;
            let below = *below;
            let ent = match listing.next() {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.old_stack.pop();
                    continue;
                }
            };
            let path = crate::view::join(dir, &ent.file_name());
            let md = match ent.metadata() {
                Ok(m) => m,
                Err(e) => return Some(Err(e)),
            };
            let excluded = below || self.filter.excludes(&path, md.is_dir());
            if md.is_dir() {
                match fs::read_dir(ent.path()) {
                    Ok(l) => self.old_stack.push((path.clone(), l, excluded)),
                    Err(e) => return Some(Err(e)),
                }
            }
            if !excluded {
                continue;
            }
            return Some(Ok(Record {
                path: escape(&path),
                kind: kind_of(&md.file_type()).into(),
                size: if md.is_file() { md.len() } else { 0 },
                origin: "excluded".into(),
                from: None,
                old_fingerprint: Some(Fingerprint {
                    dev: md.dev(),
                    ino: md.ino(),
                    size: md.len(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ctime: (md.ctime(), md.ctime_nsec()),
                }),
                sha256: None,
                verdict: "ok".into(),
                errno: None,
                detail: None,
                at: None,
            }));
        }
    }
}

impl Iterator for Report {
    type Item = io::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let r = match self.stage {
                Stage::New => self.next_new(),
                Stage::Removed => self.next_removed(),
                Stage::Excluded => self.next_excluded(),
                Stage::Done => return None,
            };
            if r.is_some() {
                return r;
            }
            self.stage = match self.stage {
                Stage::New => Stage::Removed,
                Stage::Removed => {
                    if let (false, Some(o)) = (self.filter.is_empty(), &self.old_root) {
                        match fs::read_dir(o) {
                            Ok(l) => self.old_stack.push((Vec::new(), l, false)),
                            Err(e) => {
                                self.stage = Stage::Done;
                                return Some(Err(e));
                            }
                        }
                    }
                    Stage::Excluded
                }
                Stage::Excluded | Stage::Done => Stage::Done,
            };
        }
    }
}

/// Write the report as the migration's manifest (commit, before the journal forgets OLD).
pub fn write_manifest(journal: &Records, state: &Path) -> Result<PathBuf, StateError> {
    let path = layout::manifest_path(state);
    let tmp = state.join(format!("{}.tmp", layout::MANIFEST));
    let mut report = Report::new(journal.clone(), state)?;
    let f = fs::File::create(&tmp).map_err(io_at(&tmp))?;
    let mut w = io::BufWriter::new(f);
    write_records(Format::Jsonl, &mut w, &mut report).map_err(io_at(&tmp))?;
    let f = w.into_inner().map_err(|e| io_at(&tmp)(e.into_error()))?;
    f.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_exactly_and_back() {
        for p in [
            &b"plain/name.txt"[..],
            b"with space",
            b"caf\xe9",
            b"back\\slash",
            b"\\x41 looks escaped",
            b"caf\xc3\xa9 utf8",
        ] {
            let e = escape(p);
            assert_eq!(unescape(&e), p, "{e}");
        }
        assert_eq!(escape(b"caf\xe9"), "caf\\xe9");
        assert_eq!(escape(b"a\\b"), "a\\x5cb");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
