//! An object open for reading, by ranges.

use std::sync::Arc;

use super::{ObjectInfo, Result, S3Error, S3Store};

/// Reads one object by ranges: sequential reads are served from a window that is fetched
/// ahead (one GET of `chunk` bytes at a time, the next one started as soon as the reader
/// enters the current one), random reads by one GET each. Memory: at most two chunks per open
/// object. Every GET is conditional on the ETag seen at open: an object replaced meanwhile
/// fails with ESTALE instead of mixing two versions.
pub struct ObjectReader {
    store: Arc<S3Store>,
    pub info: ObjectInfo,
    chunk: u64,
    state: std::sync::Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// Bytes at `start`.
    start: u64,
    data: Vec<u8>,
    /// The next chunk, being fetched (or fetched) in the background.
    ahead: Option<(u64, tokio::task::JoinHandle<Result<Vec<u8>>>)>,
    /// Where the last read ended: a read starting there is sequential.
    next: u64,
}

impl ObjectReader {
    pub fn new(store: Arc<S3Store>, info: ObjectInfo, chunk: u64) -> ObjectReader {
        ObjectReader {
            store,
            info,
            chunk: chunk.max(64 << 10),
            state: Default::default(),
        }
    }

    /// The store the object is read from.
    pub fn store(&self) -> &Arc<S3Store> {
        &self.store
    }

    fn spawn_fetch(&self, off: u64) -> tokio::task::JoinHandle<Result<Vec<u8>>> {
        let store = self.store.clone();
        let (rel, etag) = (self.info.rel.clone(), self.info.etag.clone());
        let len = self.chunk.min(self.info.size.saturating_sub(off));
        self.store
            .rt
            .spawn_blocking(move || store.get_range(&rel, &etag, off, len))
    }

    /// Read up to `len` bytes at `off` (short only at the end of the object).
    pub fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let n = self.read_into(off, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// [`ObjectReader::read_at`] into `buf` (the view's read path: no allocation per read);
    /// returns the length read.
    pub fn read_into(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.info.size;
        if off >= size || buf.is_empty() {
            return Ok(0);
        }
        let end = (off + buf.len() as u64).min(size);
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let sequential = off == w.next && off != 0 || (off == 0 && w.data.is_empty());
        let mut done = 0usize;
        let mut pos = off;
        while pos < end {
            let in_window = pos >= w.start && pos < w.start + w.data.len() as u64;
            if !in_window {
                // Take the chunk fetched ahead if it starts here, else fetch (sequential) or
                // read just this range (random).
                let ahead = match w.ahead.take() {
                    Some((at, h)) if at == pos => Some(h),
                    Some((_, h)) => {
                        h.abort();
                        None
                    }
                    None => None,
                };
                let data = match ahead {
                    Some(h) => self
                        .store
                        .block(h)
                        .map_err(|e| S3Error::new("readahead", libc::EIO, e.to_string()))??,
                    None if sequential => {
                        let len = self.chunk.min(size - pos);
                        self.store
                            .get_range(&self.info.rel, &self.info.etag, pos, len)?
                    }
                    None => {
                        let d = self.store.get_range(
                            &self.info.rel,
                            &self.info.etag,
                            pos,
                            end - pos,
                        )?;
                        if d.is_empty() {
                            break;
                        }
                        let n = d.len().min(buf.len() - done);
                        buf[done..done + n].copy_from_slice(&d[..n]);
                        done += n;
                        pos += n as u64;
                        continue;
                    }
                };
                if data.is_empty() {
                    break;
                }
                w.start = pos;
                w.data = data;
            }
            let from = (pos - w.start) as usize;
            let to = ((end - w.start) as usize).min(w.data.len());
            buf[done..done + to - from].copy_from_slice(&w.data[from..to]);
            done += to - from;
            pos += (to - from) as u64;
            if sequential && w.ahead.is_none() {
                let next = w.start + w.data.len() as u64;
                if next < size {
                    let h = self.spawn_fetch(next);
                    w.ahead = Some((next, h));
                }
            }
        }
        w.next = pos;
        Ok(done)
    }
}
