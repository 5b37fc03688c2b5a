//! RocksDB journal backend. The only file that names a `rocksdb` type.
//!
//! One WriteBatch per transition; `sync` batches are written with `WriteOptions::set_sync`, so
//! the WAL is fsync'ed before the call returns. RocksDB's own LOCK file refuses a second
//! writer; we translate that into [`JournalError::Busy`].

use std::path::Path;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use super::{Journal, JournalError, KvOp, Result};

pub struct RocksJournal {
    db: DB,
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
        Ok(RocksJournal { db })
    }

    /// Open for reading while a daemon may hold the write lock (for `status`).
    pub fn open_read_only(dir: &Path) -> Result<RocksJournal> {
        let opts = Options::default();
        let db = DB::open_for_read_only(&opts, dir, false).map_err(backend)?;
        Ok(RocksJournal { db })
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

    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(backend)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}
