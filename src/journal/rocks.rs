//! RocksDB journal backend. The only file that names a `rocksdb` type.
//!
//! One WriteBatch per transition; `sync` batches are written with `WriteOptions::set_sync`, so
//! the WAL is fsync'ed before the call returns. RocksDB's own LOCK file refuses a second
//! writer; we translate that into [`JournalError::Busy`].

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use super::{Journal, JournalError, KvOp, Result};

pub struct RocksJournal {
    db: DB,
    /// A reader's own directory (dropped after `db`, which uses it).
    _reader: Option<ReaderDir>,
}

fn backend(e: rocksdb::Error) -> JournalError {
    JournalError::Backend(e.into_string())
}

impl RocksJournal {
    /// Open (creating if asked) the journal in `dir` for writing.
    pub fn open(dir: &Path, create: bool) -> Result<RocksJournal> {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        // Small, hot records: a modest write buffer keeps memory bounded.
        opts.set_write_buffer_size(16 << 20);
        let db = DB::open(&opts, dir).map_err(|e| {
            let s = e.into_string();
            if s.contains("lock") || s.contains("Resource temporarily unavailable") {
                JournalError::Busy(dir.parent().unwrap_or(dir).display().to_string())
            } else {
                JournalError::Backend(s)
            }
        })?;
        Ok(RocksJournal { db, _reader: None })
    }

    /// Open for reading while a daemon may hold the write lock (for `status`, `execute
    /// --wait`, progress lines), as a RocksDB secondary instance: it reads the daemon's
    /// MANIFEST and write-ahead logs, then catches up once more (below). (A plain read-only
    /// open does not: while the daemon flushed, such an open either failed on a log that just
    /// went or, worse, came up without the records that log held, and so did a secondary open
    /// alone; `a_reader_opens_while_the_writer_switches_its_log`.) Its own info log goes to
    /// a private temporary directory, removed when the journal is dropped. An open that still
    /// meets a file just deleted is tried again (for up to about 2 s).
    pub fn open_read_only(dir: &Path) -> Result<RocksJournal> {
        let mut opts = Options::default();
        // A secondary keeps every table file open: a compaction cannot pull one away.
        opts.set_max_open_files(-1);
        let own = ReaderDir::new().map_err(|e| {
            JournalError::Backend(format!("a temporary directory for a journal reader: {e}"))
        })?;
        let mut tries = 0;
        loop {
            // The open reads the MANIFEST, then the logs: a log flushed and deleted in between
            // is missed, records and all. The primary records a flush's table in the MANIFEST
            // before it deletes the log, so a catch-up begun after the open reads that table:
            // every record written before this call is seen.
            let opened = DB::open_as_secondary(&opts, dir, &own.0)
                .and_then(|db| db.try_catch_up_with_primary().map(|()| db));
            match opened {
                Ok(db) => {
                    return Ok(RocksJournal {
                        db,
                        _reader: Some(own),
                    });
                }
                Err(e) if tries < 100 && e.to_string().contains("No such file or directory") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(backend(e)),
            }
        }
    }
}

/// A secondary instance's own directory (its info log), removed with it.
struct ReaderDir(std::path::PathBuf);

impl ReaderDir {
    fn new() -> std::io::Result<ReaderDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferryfs-journal-reader-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map(|()| ReaderDir(p))
    }
}

impl Drop for ReaderDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Journal for RocksJournal {
    fn write(&self, ops: Vec<KvOp>, sync: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                KvOp::Put(k, v) => batch.put(k, v),
                KvOp::Delete(k) => batch.delete(k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(backend)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(backend)
    }

    fn scan_after(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(
            after.unwrap_or(prefix),
            Direction::Forward,
        )) {
            let (k, v) = item.map_err(backend)?;
            if out.len() >= limit || !k.starts_with(prefix) {
                break;
            }
            if Some(&*k) == after {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A reader opening the journal while the daemon writes and flushes (each flush switches
    /// the write-ahead log and deletes the old one): every open succeeds and reads the data.
    /// Before the retry, an open failed "No such file or directory" on a log that just went
    /// (seen from `execute --wait` during a 200,000-file migration).
    #[test]
    fn a_reader_opens_while_the_writer_switches_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let w = RocksJournal::open(dir.path(), true).unwrap();
        w.write(vec![KvOp::Put(b"k".to_vec(), b"v".to_vec())], true)
            .unwrap();
        let done = AtomicBool::new(false);
        // The last key the writer finished writing (+1; 0: none yet).
        let written = std::sync::atomic::AtomicU64::new(0);
        let mut opens = 0;
        std::thread::scope(|s| {
            // 300 log switches, one every millisecond or so.
            s.spawn(|| {
                for i in 0..300u64 {
                    let k = format!("x{i}").into_bytes();
                    w.write(vec![KvOp::Put(k, vec![0; 100])], false).unwrap();
                    written.store(i + 1, Ordering::Release);
                    w.db.flush().unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                done.store(true, Ordering::Relaxed);
            });
            while !done.load(Ordering::Relaxed) {
                let before = written.load(Ordering::Acquire);
                let r = RocksJournal::open_read_only(dir.path())
                    .unwrap_or_else(|e| panic!("a reader failed to open after {opens}: {e}"));
                assert_eq!(r.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
                if before > 0 {
                    let k = format!("x{}", before - 1).into_bytes();
                    assert!(
                        r.get(&k).unwrap().is_some(),
                        "x{} written before the open is missing",
                        before - 1
                    );
                }
                opens += 1;
            }
        });
        assert!(opens > 10, "only {opens} opens while the log switched");
    }
}
