//! Reading objects: ranged GETs, a whole object into a file (in parallel ranges for a large
//! one), a small object into memory.

use std::sync::atomic::Ordering;

use super::*;

impl S3Store {
    /// Bytes [off, off+len) of `rel`, as long as its ETag is still `etag` (ESTALE if the
    /// object was replaced meanwhile). Short at the object's end.
    pub fn get_range(&self, rel: &str, etag: &str, off: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = self.at(format!("GET {key} bytes {off}+{len}"));
        let req = self.get_req(&key, etag, Some((off, len)));
        let data = self.block(async {
            let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
            o.body
                .collect()
                .await
                .map(|b| b.into_bytes().to_vec())
                .map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))
        });
        match data {
            Ok(d) => {
                self.counters
                    .get_bytes
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                Ok(d)
            }
            // A range starting at the end of the object.
            Err(e) if e.errno == libc::ERANGE => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Exactly `buf.len()` bytes of `rel` from `off` into `buf`, straight from the response
    /// body (no copy held besides), as long as its ETag is still `etag` (ESTALE if the object
    /// was replaced meanwhile, or is shorter than that).
    pub fn get_range_into(&self, rel: &str, etag: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let len = buf.len() as u64;
        let what = self.at(format!("GET {key} bytes {off}+{len}"));
        let req = self.get_req(&key, etag, Some((off, len)));
        let got = self.block(async {
            let mut o = req.send().await.map_err(|e| sdk_err(&what, e))?;
            let mut at = 0usize;
            while let Some(chunk) = o.body.next().await {
                let chunk = chunk.map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?;
                let end = at + chunk.len();
                if end > buf.len() {
                    return Err(S3Error::new(&what, libc::EIO, "more bytes than asked for"));
                }
                buf[at..end].copy_from_slice(&chunk);
                at = end;
            }
            Ok(at)
        });
        match got {
            Ok(n) if n == buf.len() => {
                self.counters.get_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Ok(n) => Err(S3Error::new(
                &what,
                libc::ESTALE,
                format!("{n} bytes where {len} were asked for: the object is shorter"),
            )),
            Err(e) if e.errno == libc::ERANGE => {
                Err(S3Error::new(&what, libc::ESTALE, "the object is shorter"))
            }
            Err(e) => Err(e),
        }
    }

    /// GET the whole of `rel` into `out` (from offset 0), as long as its ETag is still `etag`
    /// (ESTALE otherwise): the object as it was listed or headed, never a newer one. `tick` is
    /// told the length of each piece written; `false` stops the copy (`Ok(None)`). Returns the
    /// object as the GET saw it (its metadata included).
    pub fn get_to_file(
        &self,
        rel: &str,
        etag: &str,
        out: &std::fs::File,
        tick: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Option<ObjectInfo>> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = self.at(format!("GET {key}"));
        let req = self.get_req(&key, etag, None);
        self.block(async {
            let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
            let info = info_of(
                rel,
                o.content_length(),
                o.e_tag(),
                o.last_modified(),
                o.metadata(),
            );
            let written = self
                .body_to_file(o.body, out, 0, info.size, &what, tick)
                .await?;
            Ok(written.map(|()| info))
        })
    }

    /// A GET of `key`, of version `etag` (If-Match; any version when empty), of the bytes
    /// [off, off+len) when `range` is given.
    fn get_req(
        &self,
        key: &str,
        etag: &str,
        range: Option<(u64, u64)>,
    ) -> aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder {
        let mut req = self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(key)
            .set_range(range.map(|(off, len)| format!("bytes={off}-{}", off + len - 1)));
        if !etag.is_empty() {
            req = req.if_match(etag);
        }
        req
    }

    /// Stream a GET's `body` into `out` at `base` onwards: exactly `len` bytes (EIO when more
    /// or fewer arrive). `each` gets each piece's length once it is written; `false` stops
    /// (`Ok(None)`).
    async fn body_to_file(
        &self,
        mut body: ByteStream,
        out: &std::fs::File,
        base: u64,
        len: u64,
        what: &str,
        each: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Option<()>> {
        use std::os::unix::fs::FileExt;
        let mut at = 0u64;
        while let Some(piece) = body
            .try_next()
            .await
            .map_err(|e| S3Error::new(what, libc::EIO, e.to_string()))?
        {
            let n = piece.len() as u64;
            if at + n > len {
                return Err(S3Error::new(what, libc::EIO, "more bytes than asked for"));
            }
            out.write_all_at(&piece, base + at).map_err(|e| {
                S3Error::new(what, e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
            })?;
            at += n;
            self.counters.get_bytes.fetch_add(n, Ordering::Relaxed);
            if !each(n) {
                return Ok(None);
            }
        }
        if at != len {
            return Err(S3Error::new(
                what,
                libc::EIO,
                format!("body ended at {at} of {len} bytes"),
            ));
        }
        Ok(Some(()))
    }

    /// [`S3Store::get_to_file`] of a large object of `size` bytes, in ranged GETs of `part`
    /// bytes (the copier's: [`PARALLEL_GET_PART`]), up to [`PARALLEL_GET_STREAMS`] at once:
    /// one TCP stream carries a few hundred MiB/s at most, several fill the link. Every range
    /// asks for version `etag` (If-Match), so a replaced object fails ESTALE instead of mixing
    /// two versions. Each range streams into `out` at its own offset (memory: a body piece per
    /// stream). Only the calling thread calls `tick`, with each piece's length, and the
    /// streams wait while it sleeps (a bandwidth limit holds); `false` stops every stream
    /// (`Ok(None)`). Extra streams beyond the caller's own are shared by the whole process
    /// ([`PARALLEL_GET_EXTRA`]), so many large objects at once do not open hundreds of
    /// connections.
    pub fn get_parallel_to_file(
        &self,
        rel: &str,
        etag: &str,
        size: u64,
        part: u64,
        out: &std::fs::File,
        tick: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Option<()>> {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        static EXTRA_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
        let part = part.max(1);
        let parts = size.div_ceil(part);
        let next = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        // Bounded: while `tick` sleeps (a bandwidth limit), the streams wait for it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(PARALLEL_GET_STREAMS);
        // One range after another until none is left, an error, or a stop.
        let stream = |tx: std::sync::mpsc::SyncSender<u64>| -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= parts || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let off = i * part;
                let len = part.min(size - off);
                let r = self.get_range_to_file(rel, etag, off, len, out, &stop, &tx);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r?;
            }
        };
        // One slot of EXTRA_IN_FLIGHT, given back however its stream ends (a panic included).
        struct Slot;
        impl Drop for Slot {
            fn drop(&mut self) {
                EXTRA_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // Whatever ends the draining (a panic in `tick` included) stops the streams and drops
        // the receiver, so none stays blocked on a full channel and the scope can end.
        struct Drain<'a> {
            rx: Option<std::sync::mpsc::Receiver<u64>>,
            stop: &'a AtomicBool,
        }
        impl Drop for Drain<'_> {
            fn drop(&mut self) {
                self.stop.store(true, Ordering::Relaxed);
                self.rx.take();
            }
        }
        let (mine, extra, stopped) = std::thread::scope(|sc| {
            let mut drain = Drain {
                rx: Some(rx),
                stop: &stop,
            };
            let mut extra = Vec::new();
            for _ in 1..PARALLEL_GET_STREAMS.min(parts as usize) {
                let taken = EXTRA_IN_FLIGHT
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < PARALLEL_GET_EXTRA).then_some(n + 1)
                    })
                    .is_ok();
                if !taken {
                    break;
                }
                let slot = Slot;
                let tx = tx.clone();
                let h = std::thread::Builder::new()
                    .name("s3-range".into())
                    .spawn_scoped(sc, move || {
                        let _slot = slot;
                        stream(tx)
                    });
                match h {
                    Ok(h) => extra.push(h),
                    // (The closure, and its slot, are dropped.)
                    Err(_) => break,
                }
            }
            // The caller's own stream runs on a thread too, so this one can pace the copy.
            let me = {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name("s3-range".into())
                    .spawn_scoped(sc, move || stream(tx))
            };
            drop(tx);
            if me.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            if let Some(rx) = &drain.rx {
                for n in rx.iter() {
                    if !stop.load(Ordering::Relaxed) && !tick(n) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            let stopped = stop.load(Ordering::Relaxed);
            drain.rx.take();
            let join = |h: std::thread::ScopedJoinHandle<'_, Result<()>>| {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            };
            let mine = match me {
                Ok(h) => join(h),
                Err(e) => Err(S3Error::new(
                    format!("GET {rel}"),
                    libc::EAGAIN,
                    format!("no thread for a ranged GET: {e}"),
                )),
            };
            let extra: Vec<Result<()>> = extra.into_iter().map(join).collect();
            (mine, extra, stopped)
        });
        mine?;
        for r in extra {
            r?;
        }
        if stopped {
            return Ok(None);
        }
        Ok(Some(()))
    }

    /// One range of [`S3Store::get_parallel_to_file`]: bytes [off, off+len) of version `etag`
    /// of `rel` into `out` at the same offsets; each piece's length goes to `done`. Stops
    /// (without error) when `stop` is set.
    #[allow(clippy::too_many_arguments)]
    fn get_range_to_file(
        &self,
        rel: &str,
        etag: &str,
        off: u64,
        len: u64,
        out: &std::fs::File,
        stop: &std::sync::atomic::AtomicBool,
        done: &std::sync::mpsc::SyncSender<u64>,
    ) -> Result<()> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = self.at(format!("GET {key} bytes {off}+{len}"));
        let req = self.get_req(&key, etag, Some((off, len)));
        self.block(async {
            let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
            let mut each = |n| {
                let _ = done.send(n);
                !stop.load(Ordering::Relaxed)
            };
            self.body_to_file(o.body, out, off, len, &what, &mut each)
                .await
                .map(drop)
        })
    }

    /// GET of the whole of `rel` into memory (any version: the answer says which), with its
    /// metadata: a small object's lookup and data in one request. `None`: no such object.
    pub fn get_small(&self, rel: &str) -> Result<Option<(ObjectInfo, Vec<u8>)>> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = self.at(format!("GET {key}"));
        let req = self.get_req(&key, "", None);
        let r = self.block(async {
            let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
            let info = info_of(
                rel,
                o.content_length(),
                o.e_tag(),
                o.last_modified(),
                o.metadata(),
            );
            // Asked for as small (from a listing that may be old): a big object now is left
            // to a streamed read.
            if info.size > GET_SMALL_MAX {
                return Err(S3Error::new(
                    &what,
                    libc::EFBIG,
                    format!("{} bytes: too big to hold in memory", info.size),
                ));
            }
            // One copy: the body's pieces straight into a buffer of the object's size.
            let mut data = Vec::with_capacity(info.size as usize);
            let mut body = o.body;
            while let Some(piece) = body
                .try_next()
                .await
                .map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?
            {
                data.extend_from_slice(&piece);
            }
            if data.len() as u64 != info.size {
                return Err(S3Error::new(
                    &what,
                    libc::EIO,
                    format!("body of {} bytes, not {}", data.len(), info.size),
                ));
            }
            self.counters
                .get_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok((info, data))
        });
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }
}
