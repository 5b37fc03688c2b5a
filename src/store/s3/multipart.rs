//! Multipart uploads: a large file uploaded in parts, and a large object copied by the server
//! in parts (UploadPartCopy). One helper creates the upload, sends its parts a bounded number
//! at a time, and completes it, or aborts it on any failure so no half upload stays behind.

use std::future::Future;
use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::*;

/// The size of the parts of a multipart upload of `size` bytes: [`MULTIPART_PART`], or more
/// (a multiple of 1 MiB) where S3's 10,000 parts would not hold it.
pub fn part_size(size: u64) -> u64 {
    MULTIPART_PART.max(size.div_ceil(10_000).next_multiple_of(1 << 20))
}

/// The parts ((offset, length) each) of `[offset, offset + len)` of an object of `size` bytes,
/// in parts of [`part_size`]`(size)`; one empty part for an empty object.
fn part_ranges(size: u64, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let part = part_size(size);
    let end = (offset + len).min(size);
    let mut out: Vec<(u64, u64)> = (offset..end)
        .step_by(part as usize)
        .map(|o| (o, part.min(end - o)))
        .collect();
    if out.is_empty() {
        out.push((offset, 0));
    }
    out
}

/// One part of a multipart upload, sent: its number (from 1), ETag and length.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SentPart {
    pub number: i32,
    pub etag: String,
    pub len: u64,
}

impl SentPart {
    fn completed(&self) -> CompletedPart {
        CompletedPart::builder()
            .part_number(self.number)
            .e_tag(&self.etag)
            .build()
    }
}

impl S3Store {
    /// A multipart upload of `file` (`size` bytes), parts of [`MULTIPART_PART`] or more (S3
    /// takes at most 10,000), each read once, [`MULTIPART_IN_FLIGHT`] at a time, each with
    /// its Content-MD5; completed only if `still()` says so once every part is sent. Gives
    /// the object and the MD5 of the whole file.
    pub(super) fn put_multipart(
        &self,
        rel: &str,
        file: &std::fs::File,
        size: u64,
        meta: &PosixMeta,
        still: &dyn Fn() -> bool,
    ) -> Result<(ObjectInfo, [u8; 16])> {
        use md5::Digest;
        // The parts are read in order, once: the whole file's MD5 on the way.
        let mut whole = md5::Md5::new();
        let (o, _) = self.put_parts(
            rel,
            size,
            meta,
            None,
            &|_, _| false,
            &mut |off, buf| {
                crate::store::posix::read_old_at(file, buf, off)?;
                whole.update(&*buf);
                Ok(())
            },
            still,
        )?;
        Ok((o, whole.finalize().into()))
    }

    /// Server-side copy of `src`'s `rel` (version `etag`; any version when empty) to `to`
    /// here as a multipart upload of `part`-byte parts, each copied by the server
    /// (UploadPartCopy), [`COPY_IN_FLIGHT`] at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_parts(
        &self,
        src: &S3Store,
        rel: &str,
        etag: &str,
        size: u64,
        to: &str,
        meta: &PosixMeta,
        part: u64,
    ) -> Result<ObjectInfo> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(to);
        let source = copy_source(src, rel);
        let what = self.at(format!("multipart COPY {source} to {key}"));
        let ranges: Vec<(u64, u64)> = (0..size.div_ceil(part.max(1)))
            .map(|i| (i * part, ((i + 1) * part).min(size) - 1))
            .collect();
        let etag = self.multipart(&key, &what, meta, ranges.len(), |id, number| {
            let (first, last) = ranges[number as usize - 1];
            let req = self
                .client
                .upload_part_copy()
                .bucket(&self.url.bucket)
                .key(&key)
                .upload_id(id)
                .part_number(number)
                .copy_source(&source)
                .copy_source_range(format!("bytes={first}-{last}"))
                .set_copy_source_if_match((!etag.is_empty()).then(|| etag.to_string()));
            let what = what.clone();
            async move {
                let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
                Ok(o.copy_part_result()
                    .and_then(|p| p.e_tag())
                    .map(str::to_string))
            }
        })?;
        Ok(ObjectInfo::written(to, size, etag, meta))
    }

    /// An upload of `size` bytes to `rel` whose bytes are, where `from_source(offset, len)`
    /// says so, the same bytes at the same offsets of the object `source` names (a store of
    /// the same service, a key below its prefix, an ETag), and elsewhere what `read(offset,
    /// buf)` gives. Those ranges are copied by the server (UploadPartCopy, conditional on the
    /// ETag), the rest is sent, each part with its Content-MD5; at most
    /// [`MULTIPART_IN_FLIGHT`] parts are held and in flight at once, so memory is bounded
    /// whatever the size. Reads run on the caller's thread, between the groups of requests.
    /// Completed with every part, or aborted on any failure. Gives the object and the bytes
    /// the server copied.
    pub fn put_patched(
        &self,
        rel: &str,
        size: u64,
        meta: &PosixMeta,
        source: Option<(&S3Store, &str, &str)>,
        from_source: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(ObjectInfo, u64)> {
        self.put_parts(rel, size, meta, source, from_source, read, &|| true)
    }

    /// [`Self::put_patched`], completed only if `still()` says so once every part is sent
    /// (else aborted: ESTALE). The parts are a sliding window: the next part is read (on the
    /// caller's thread) as soon as one of the [`MULTIPART_IN_FLIGHT`] in flight is done, so
    /// reading and sending overlap; each part's MD5 is taken where it is sent.
    #[allow(clippy::too_many_arguments)]
    fn put_parts(
        &self,
        rel: &str,
        size: u64,
        meta: &PosixMeta,
        source: Option<(&S3Store, &str, &str)>,
        from_source: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
        still: &dyn Fn() -> bool,
    ) -> Result<(ObjectInfo, u64)> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = match source {
            None => self.at(format!("multipart PUT {key}")),
            Some((src, rel, _)) => self.at(format!(
                "multipart PUT {key} (unchanged ranges copied from {})",
                copy_source(src, rel)
            )),
        };
        let id = self.begin_upload(&key, &what, meta)?;
        let sent = self
            .upload_parts(
                &key,
                &id,
                &what,
                &part_ranges(size, 0, size),
                1,
                source,
                from_source,
                read,
            )
            .and_then(|(parts, copied)| {
                if still() {
                    Ok((parts, copied))
                } else {
                    Err(S3Error::new(
                        &what,
                        libc::ESTALE,
                        "changed while it was sent",
                    ))
                }
            });
        let (sent, copied) = match sent {
            Ok((parts, copied)) => (
                Ok(parts.into_iter().map(|p| p.completed()).collect()),
                copied,
            ),
            Err(e) => (Err(e), 0),
        };
        let etag = self.finish_multipart(&key, &id, &what, sent)?;
        Ok((ObjectInfo::written(rel, size, etag, meta), copied))
    }

    /// Send the parts `ranges` ((offset, length) each) of the upload `id` of `key`, numbered
    /// from `first`: where `from_source(offset, len)` says so copied by the server from
    /// `source`, elsewhere what `read(offset, buf)` gives, with its Content-MD5; a sliding
    /// window of [`MULTIPART_IN_FLIGHT`]: the next part is read (on the caller's thread) as
    /// soon as one in flight is done. Neither completes nor aborts the upload. Gives the parts
    /// sent and the bytes the server copied.
    #[allow(clippy::too_many_arguments)]
    fn upload_parts(
        &self,
        key: &str,
        id: &str,
        what: &str,
        ranges: &[(u64, u64)],
        first: i32,
        source: Option<(&S3Store, &str, &str)>,
        from_source: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(Vec<SentPart>, u64)> {
        let (source, src_etag) = match source {
            Some((src, rel, etag)) => (copy_source(src, rel), etag),
            None => (String::new(), ""),
        };
        let part = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let window = MULTIPART_IN_FLIGHT.min(ranges.len());
        // The bytes the window may hold, counted against every upload's (see `BUFFERS`), all
        // at once (a taker never waits holding a share), given back at the end.
        let _held = BUFFERS.take(window as u64 * part);
        let io = |e: std::io::Error| {
            S3Error::new(what, e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
        };
        type Sent = std::result::Result<(i32, Option<String>), S3Error>;
        let joined = |r: std::result::Result<Sent, tokio::task::JoinError>| -> Result<SentPart> {
            let (number, etag) = r.map_err(|e| S3Error::new(what, libc::EIO, e.to_string()))??;
            Ok(SentPart {
                number,
                etag: etag.unwrap_or_default(),
                len: ranges[(number - first) as usize].1,
            })
        };
        let mut set: tokio::task::JoinSet<Sent> = tokio::task::JoinSet::new();
        let mut done = Vec::with_capacity(ranges.len());
        let mut failed: Option<S3Error> = None;
        let mut copied = 0;
        for (i, &(off, len)) in ranges.iter().enumerate() {
            if set.len() >= window {
                match self.block(set.join_next()).map(joined) {
                    Some(Ok(p)) => done.push(p),
                    Some(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    None => {}
                }
            }
            let number = first + i as i32;
            let what = what.to_string();
            if len > 0 && !source.is_empty() && from_source(off, len) {
                copied += len;
                let req = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.url.bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(number)
                    .copy_source(&source)
                    .copy_source_range(format!("bytes={off}-{}", off + len - 1))
                    .set_copy_source_if_match((!src_etag.is_empty()).then(|| src_etag.to_string()));
                let _rt = self.rt.enter();
                set.spawn(async move {
                    let o = req.send().await.map_err(|e| sdk_err(&what, e))?;
                    Ok((
                        number,
                        o.copy_part_result()
                            .and_then(|p| p.e_tag())
                            .map(str::to_string),
                    ))
                });
            } else {
                let mut data = vec![0u8; len as usize];
                if let Err(e) = read(off, &mut data) {
                    failed = Some(io(e));
                    break;
                }
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.url.bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(number);
                let _rt = self.rt.enter();
                set.spawn(async move {
                    let md5: [u8; 16] = {
                        use md5::Digest;
                        md5::Md5::digest(&data).into()
                    };
                    let o = req
                        .content_md5(base64_md5(&md5))
                        .body(ByteStream::from(data))
                        .send()
                        .await
                        .map_err(|e| sdk_err(&what, e))?;
                    Ok((number, o.e_tag().map(str::to_string)))
                });
            }
        }
        if failed.is_some() {
            set.abort_all();
        }
        while let Some(r) = self.block(set.join_next()) {
            if failed.is_some() {
                continue;
            }
            match joined(r) {
                Ok(p) => done.push(p),
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((done, copied)),
        }
    }

    /// Begin a multipart upload of `rel` carrying the POSIX metadata `meta`: its id. Nothing
    /// is under the key until the upload is completed ([`Self::complete_upload`]); one never
    /// completed is freed by [`Self::abort_upload`].
    pub fn begin_multipart(&self, rel: &str, meta: &PosixMeta) -> Result<String> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = self.at(format!("CreateMultipartUpload {key}"));
        self.begin_upload(&key, &what, meta)
    }

    /// Send the bytes `[offset, offset + len)` (`span`) of an object of `size` bytes into the
    /// upload `id` of `rel` begun with [`Self::begin_multipart`] (see [`Self::put_patched`]
    /// for `source`, `from_source` and `read`), without completing it: the parts of
    /// [`part_size`] that hold them, numbered as in the whole object (`span` starts on a
    /// part's boundary), so that several senders can fill one upload. Gives the parts sent
    /// and the bytes the server copied; on failure the upload is left as it is (the caller
    /// aborts it).
    #[allow(clippy::too_many_arguments)]
    pub fn send_parts_of(
        &self,
        rel: &str,
        id: &str,
        size: u64,
        span: (u64, u64),
        source: Option<(&S3Store, &str, &str)>,
        from_source: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(Vec<SentPart>, u64)> {
        let key = self.url.key(rel);
        let what = self.at(format!("UploadPart {key}"));
        let part = part_size(size);
        if span.0 % part != 0 || span.0 + span.1 > size {
            return Err(S3Error::new(
                &what,
                libc::EINVAL,
                format!("bytes {}+{} are not parts of {size}", span.0, span.1),
            ));
        }
        let first = (span.0 / part) as i32 + 1;
        let ranges = part_ranges(size, span.0, span.1);
        self.upload_parts(&key, id, &what, &ranges, first, source, from_source, read)
    }

    /// Complete the upload `id` of `rel` with `parts` (every part, as
    /// [`Self::send_parts_of`] gave them): the object's ETag. Not aborted on failure.
    pub fn complete_upload(&self, rel: &str, id: &str, parts: &[SentPart]) -> Result<String> {
        let key = self.url.key(rel);
        let what = self.at(format!("CompleteMultipartUpload {key}"));
        self.complete(
            &key,
            id,
            &what,
            parts.iter().map(SentPart::completed).collect(),
        )
    }

    /// CompleteMultipartUpload of `id` of `key` with `parts` (in any order): the ETag.
    fn complete(
        &self,
        key: &str,
        id: &str,
        what: &str,
        mut parts: Vec<CompletedPart>,
    ) -> Result<String> {
        parts.sort_by_key(|p| p.part_number());
        let o = self
            .block(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.url.bucket)
                    .key(key)
                    .upload_id(id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send(),
            )
            .map_err(|e| sdk_err(what, e))?;
        Ok(o.e_tag().unwrap_or_default().to_string())
    }

    /// The multipart uploads begun and neither completed nor aborted below the store's
    /// prefix: (key below the prefix, upload id), in key order.
    pub fn unfinished_uploads(&self) -> Result<Vec<(String, String)>> {
        self.uploads_below(&self.url.prefix.clone())
    }

    /// The ids of the multipart uploads of `rel` begun and neither completed nor aborted.
    pub fn unfinished_uploads_of(&self, rel: &str) -> Result<Vec<String>> {
        let key = self.url.key(rel);
        Ok(self
            .uploads_below(&key)?
            .into_iter()
            .filter(|(k, _)| self.url.key(k) == key)
            .map(|(_, id)| id)
            .collect())
    }

    /// The unfinished multipart uploads of the keys that begin with `below` (a key below the
    /// store's prefix, or the prefix itself): (key below the store's prefix, upload id).
    fn uploads_below(&self, below: &str) -> Result<Vec<(String, String)>> {
        let what = self.at(format!("ListMultipartUploads {below}"));
        let root = self.url.prefix.clone();
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let r = self
                .block(
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.url.bucket)
                        .prefix(below)
                        .set_key_marker(key_marker.take())
                        .set_upload_id_marker(id_marker.take())
                        .send(),
                )
                .map_err(|e| sdk_err(&what, e))?;
            for u in r.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id())
                    && let Some(rel) = k.strip_prefix(&root)
                {
                    out.push((rel.to_string(), id.to_string()));
                }
            }
            match (
                r.is_truncated(),
                r.next_key_marker(),
                r.next_upload_id_marker(),
            ) {
                (Some(true), Some(k), id) => {
                    key_marker = Some(k.to_string());
                    id_marker = id.map(str::to_string);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Abort the multipart upload `id` of `rel` (its parts are freed; nothing was visible).
    pub fn abort_upload(&self, rel: &str, id: &str) -> Result<()> {
        let key = self.url.key(rel);
        let what = self.at(format!("AbortMultipartUpload {key}"));
        match self.block(
            self.client
                .abort_multipart_upload()
                .bucket(&self.url.bucket)
                .key(&key)
                .upload_id(id)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = sdk_err(&what, e);
                // Gone already (completed or aborted meanwhile).
                if e.errno == libc::ENOENT {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// A multipart upload of `key` with `count` parts (server-side copies), part `number`
    /// (from 1) sent by the future `part(upload id, number)` gives, which answers the part's
    /// ETag; [`COPY_IN_FLIGHT`] parts at a time. Completed with every part, or aborted on any
    /// failure. Gives the object's ETag.
    fn multipart<F, Fut>(
        &self,
        key: &str,
        what: &str,
        meta: &PosixMeta,
        count: usize,
        part: F,
    ) -> Result<String>
    where
        F: Fn(&str, i32) -> Fut,
        Fut: Future<Output = Result<Option<String>>> + Send + 'static,
    {
        self.multipart_if(key, what, meta, count, &|| true, part)
    }

    /// [`Self::multipart`], completed only if `still()` says so once every part is sent
    /// (else aborted: ESTALE).
    fn multipart_if<F, Fut>(
        &self,
        key: &str,
        what: &str,
        meta: &PosixMeta,
        count: usize,
        still: &dyn Fn() -> bool,
        part: F,
    ) -> Result<String>
    where
        F: Fn(&str, i32) -> Fut,
        Fut: Future<Output = Result<Option<String>>> + Send + 'static,
    {
        let id = self.begin_upload(key, what, meta)?;
        let sent = self.block(async {
            let mut done: Vec<CompletedPart> = Vec::with_capacity(count);
            for first in (0..count).step_by(COPY_IN_FLIGHT) {
                let mut set = tokio::task::JoinSet::new();
                for i in first..(first + COPY_IN_FLIGHT).min(count) {
                    let number = (i + 1) as i32;
                    let send = part(&id, number);
                    set.spawn(async move { (number, send.await) });
                }
                while let Some(r) = set.join_next().await {
                    let (number, r) =
                        r.map_err(|e| S3Error::new(what, libc::EIO, e.to_string()))?;
                    done.push(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(r?)
                            .build(),
                    );
                }
            }
            Ok(done)
        });
        let sent = sent.and_then(|parts| {
            if still() {
                Ok(parts)
            } else {
                Err(S3Error::new(
                    what,
                    libc::ESTALE,
                    "changed while it was sent",
                ))
            }
        });
        self.finish_multipart(key, &id, what, sent)
    }

    /// CreateMultipartUpload of `key` with POSIX metadata: the upload's id.
    fn begin_upload(&self, key: &str, what: &str, meta: &PosixMeta) -> Result<String> {
        let created = self
            .block(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.url.bucket)
                    .key(key)
                    .set_metadata(Some(meta.to_metadata(self.url.metadata)))
                    .send(),
            )
            .map_err(|e| sdk_err(what, e))?;
        Ok(created.upload_id().unwrap_or_default().to_string())
    }

    /// The last step of a multipart upload `id` of `key`: completed with the parts `sent`
    /// gave (their ETag), or aborted when sending failed, so no half upload stays behind.
    fn finish_multipart(
        &self,
        key: &str,
        id: &str,
        what: &str,
        sent: Result<Vec<CompletedPart>>,
    ) -> Result<String> {
        match sent.and_then(|parts| self.complete(key, id, what, parts)) {
            Ok(etag) => Ok(etag),
            Err(e) => {
                let _ = self.block(
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.url.bucket)
                        .key(key)
                        .upload_id(id)
                        .send(),
                );
                Err(e)
            }
        }
    }
}

/// Bytes read into memory for uploads (the parts of [`S3Store::put_patched`], the bodies of
/// streamed single PUTs), across the process: at most [`BUFFER_BUDGET`] at once, whatever the
/// number of workers and the object sizes. A taker waits for room.
pub static BUFFERS: Budget = Budget::new(BUFFER_BUDGET);

/// See [`BUFFERS`]: 512 MiB, room for 32 parts of 16 MiB (four uploads' worth of parts in
/// flight, or hundreds of small objects).
pub const BUFFER_BUDGET: u64 = 512 << 20;

/// A count of bytes held, bounded: [`Budget::take`] waits until its share fits.
pub struct Budget {
    held: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
    max: u64,
}

impl Budget {
    pub const fn new(max: u64) -> Budget {
        Budget {
            held: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
            max,
        }
    }

    /// Hold `n` bytes (at most the whole budget) until the share is dropped.
    pub fn take(&self, n: u64) -> Share<'_> {
        let n = n.min(self.max);
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while *h + n > self.max {
            h = self.freed.wait(h).unwrap_or_else(|p| p.into_inner());
        }
        *h += n;
        Share { budget: self, n }
    }
}

/// Bytes held of a [`Budget`], given back when dropped.
pub struct Share<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut h = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        *h -= self.n;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_a_span_are_numbered_and_cut_as_in_the_whole_object() {
        let size = 40 << 20;
        let part = part_size(size);
        assert_eq!(part, MULTIPART_PART);
        assert_eq!(
            part_ranges(size, 0, size),
            vec![(0, part), (part, part), (2 * part, size - 2 * part)]
        );
        // The second range of two parts: the object's second and third.
        assert_eq!(
            part_ranges(size, part, 2 * part),
            vec![(part, part), (2 * part, size - 2 * part)]
        );
        assert_eq!(part_ranges(0, 0, 0), vec![(0, 0)]);
        // More than 10,000 parts of 16 MiB: bigger parts, whole MiB.
        let huge: u64 = 200 << 30;
        assert!(huge.div_ceil(part_size(huge)) <= 10_000);
        assert_eq!(part_size(huge) % (1 << 20), 0);
    }
}
