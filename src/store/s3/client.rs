//! The plain requests: HEAD, LIST, PUT, CopyObject, DELETE, each blocking on the store's
//! runtime, with errno mapping.

use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::ByteStream;

use super::*;

impl S3Store {
    /// HEAD of `rel`: `None` when there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<ObjectInfo>> {
        self.counters.heads.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let r = self.block(self.head_req(&key).send());
        head_result(rel, || self.at(format!("HEAD {key}")), r)
    }

    fn head_req(
        &self,
        key: &str,
    ) -> aws_sdk_s3::operation::head_object::builders::HeadObjectFluentBuilder {
        self.client.head_object().bucket(&self.url.bucket).key(key)
    }

    /// [`S3Store::head`] of `rel` and [`S3Store::is_dir`] of `rel` at once, both requests in
    /// flight together on the store's runtime (one round trip, no thread of their own).
    pub fn head_and_is_dir(&self, rel: &str) -> (Result<Option<ObjectInfo>>, Result<bool>) {
        self.counters.heads.fetch_add(1, Ordering::Relaxed);
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let dir = self.url.key(&format!("{rel}/"));
        let list = self
            .rt
            .spawn(self.list_req(&dir, false, Some(1), None).send());
        let (h, l) = self.block(async {
            let h = self.head_req(&key).send().await;
            (h, list.await)
        });
        let what = self.at(format!("LIST s3://{}/{dir}", self.url.bucket));
        let l = match l {
            Ok(r) => r.map(|r| has_keys(&r)).map_err(|e| sdk_err(&what, e)),
            Err(e) => match e.try_into_panic() {
                Ok(p) => std::panic::resume_unwind(p),
                Err(e) => Err(S3Error::new(what, libc::EIO, e.to_string())),
            },
        };
        (head_result(rel, || self.at(format!("HEAD {key}")), h), l)
    }

    /// One page of ListObjectsV2 below `prefix` (a full key prefix): split at '/' when
    /// `delimited`, at most `max_keys` keys when given, from `token` on.
    fn list_page(
        &self,
        prefix: &str,
        delimited: bool,
        max_keys: Option<i32>,
        token: Option<String>,
    ) -> Result<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        self.block(self.list_req(prefix, delimited, max_keys, token).send())
            .map_err(|e| {
                sdk_err(
                    &self.at(format!("LIST s3://{}/{prefix}", self.url.bucket)),
                    e,
                )
            })
    }

    fn list_req(
        &self,
        prefix: &str,
        delimited: bool,
        max_keys: Option<i32>,
        token: Option<String>,
    ) -> aws_sdk_s3::operation::list_objects_v2::builders::ListObjectsV2FluentBuilder {
        self.client
            .list_objects_v2()
            .bucket(&self.url.bucket)
            .prefix(prefix)
            .set_delimiter(delimited.then(|| "/".to_string()))
            .set_max_keys(max_keys)
            .set_continuation_token(token)
    }

    /// The names directly below directory `rel_dir` (empty: the root; else ending in '/'),
    /// sorted by name. A `name/` marker object and a common prefix `name/` are one directory.
    pub fn list_dir(&self, rel_dir: &str) -> Result<Vec<Listed>> {
        let prefix = self.url.key(rel_dir);
        let mut out: Vec<Listed> = Vec::new();
        let mut dirs = std::collections::BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let r = self.list_page(&prefix, true, None, token.take())?;
            for o in r.contents() {
                let Some(key) = o.key() else { continue };
                let Some(name) = key.strip_prefix(&prefix) else {
                    continue;
                };
                if name.is_empty() {
                    continue; // the directory's own marker
                }
                if let Some(d) = name.strip_suffix('/') {
                    dirs.insert(d.to_string());
                    continue;
                }
                out.push(Listed::Object(ObjectInfo {
                    rel: format!("{rel_dir}{name}"),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_string(),
                    last_modified: time_of(o.last_modified()),
                    meta: None,
                }));
            }
            for p in r.common_prefixes() {
                if let Some(d) = p
                    .prefix()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(|n| n.strip_suffix('/'))
                    .filter(|n| !n.is_empty())
                {
                    dirs.insert(d.to_string());
                }
            }
            match r.next_continuation_token() {
                Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        // A name that is both an object and a prefix shows as the directory (the object is
        // unreachable through a POSIX view; docs/SEMANTICS.md "An S3 OLD").
        out.retain(|l| !dirs.contains(name_of(l)));
        out.extend(
            dirs.into_iter()
                .map(|d| Listed::Dir(format!("{rel_dir}{d}"))),
        );
        out.sort_by(|a, b| name_of(a).cmp(name_of(b)));
        Ok(out)
    }

    /// One LIST of at most one key: the bucket exists and these credentials may read it.
    pub fn reachable(&self) -> Result<()> {
        self.list_page(&self.url.prefix, false, Some(1), None)
            .map(drop)
    }

    /// Whether no object lies below the store's prefix.
    pub fn is_empty(&self) -> Result<bool> {
        let r = self.list_page(&self.url.prefix, false, Some(1), None)?;
        Ok(r.key_count().unwrap_or(0) == 0 && r.contents().is_empty())
    }

    /// Whether `rel` is a directory: some key lies below `rel/` (a marker or an object).
    pub fn is_dir(&self, rel: &str) -> Result<bool> {
        let r = self.list_page(&self.url.key(&format!("{rel}/")), false, Some(1), None)?;
        Ok(has_keys(&r))
    }

    /// Every object below the store's root, in key order, with no delimiter (one request per
    /// 1,000 keys whatever the tree's shape): `each` gets the key below the root and the size.
    pub fn list_all(&self, each: &mut dyn FnMut(&str, u64)) -> Result<()> {
        self.list_all_below("", each)
    }

    /// [`S3Store::list_all`] with each object's ETag.
    pub fn list_all_etags(&self, each: &mut dyn FnMut(&str, u64, &str)) -> Result<()> {
        self.list_keys("", &mut |k, size, etag| each(k, size, etag))
    }

    /// [`S3Store::list_all`] of the keys below `rel_dir` (empty: the root; else ending in
    /// '/'); `each` still gets keys below the store's root.
    pub fn list_all_below(&self, rel_dir: &str, each: &mut dyn FnMut(&str, u64)) -> Result<()> {
        self.list_keys(rel_dir, &mut |k, size, _| each(k, size))
    }

    fn list_keys(&self, rel_dir: &str, each: &mut dyn FnMut(&str, u64, &str)) -> Result<()> {
        let root = self.url.prefix.clone();
        let prefix = self.url.key(rel_dir);
        let mut token: Option<String> = None;
        loop {
            let r = self.list_page(&prefix, false, None, token.take())?;
            for o in r.contents() {
                if let Some(rel) = o.key().and_then(|k| k.strip_prefix(&root)) {
                    each(
                        rel,
                        o.size().unwrap_or(0).max(0) as u64,
                        o.e_tag().unwrap_or_default(),
                    );
                }
            }
            match r.next_continuation_token() {
                Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }

    /// PUT `rel` with `data` and POSIX metadata, in one request.
    pub fn put(&self, rel: &str, data: Vec<u8>, meta: &PosixMeta) -> Result<ObjectInfo> {
        self.put_md5(rel, data, meta, None)
    }

    /// [`put`](Self::put), with the Content-MD5 `md5` of `data` when given (the server then
    /// refuses a body that arrives other than it was read).
    pub fn put_md5(
        &self,
        rel: &str,
        data: Vec<u8>,
        meta: &PosixMeta,
        md5: Option<&[u8; 16]>,
    ) -> Result<ObjectInfo> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let size = data.len() as u64;
        let o = self
            .block(
                self.client
                    .put_object()
                    .bucket(&self.url.bucket)
                    .key(&key)
                    .body(ByteStream::from(data))
                    .set_content_md5(md5.map(|m| base64_md5(m)))
                    .set_metadata(Some(meta.to_metadata(self.url.metadata)))
                    .send(),
            )
            .map_err(|e| sdk_err(&self.at(format!("PUT {key}")), e))?;
        Ok(ObjectInfo::written(
            rel,
            size,
            o.e_tag().unwrap_or_default().to_string(),
            meta,
        ))
    }

    /// PUT `rel` with the whole of `file` (streamed from disk, not held in memory) and POSIX
    /// metadata: one request up to [`MULTIPART_THRESHOLD`], a multipart upload above it.
    pub fn put_file(
        &self,
        rel: &str,
        file: &std::fs::File,
        meta: &PosixMeta,
    ) -> Result<ObjectInfo> {
        self.put_file_md5(rel, file, meta).map(|(o, _)| o)
    }

    /// [`put_file`](Self::put_file), also giving the MD5 of the bytes sent (a multipart
    /// object's ETag is not one).
    pub fn put_file_md5(
        &self,
        rel: &str,
        file: &std::fs::File,
        meta: &PosixMeta,
    ) -> Result<(ObjectInfo, [u8; 16])> {
        self.put_file_md5_if(rel, file, meta, &|| true)
    }

    /// [`put_file_md5`](Self::put_file_md5) of a file another process may be writing (OLD's):
    /// `still()` is asked once the MD5s are read, before anything is sent, and again before
    /// a multipart upload is completed; `false` fails the upload with ESTALE and leaves
    /// nothing under `rel` (the bytes hashed were read while the file changed; a change after
    /// that makes the server refuse the body, whose Content-MD5 then differs).
    pub fn put_file_md5_if(
        &self,
        rel: &str,
        file: &std::fs::File,
        meta: &PosixMeta,
        still: &dyn Fn() -> bool,
    ) -> Result<(ObjectInfo, [u8; 16])> {
        let key = self.url.key(rel);
        let what = self.at(format!("PUT {key}"));
        let io = |e: std::io::Error| {
            S3Error::new(&what, e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
        };
        let size = file.metadata().map_err(io)?.len();
        if size > MULTIPART_THRESHOLD {
            return self.put_multipart(rel, file, size, meta, still);
        }
        if size <= SMALL_BODY {
            return self.put_small(rel, file, size, meta, still);
        }
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        // By the fd's /proc path: a body made from a path is read again if the request is
        // retried (one made from an open file is not).
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        // Content-MD5: the server refuses a body that arrives other than it was read.
        let md5 = file_md5(file).map_err(io)?;
        if !still() {
            return Err(S3Error::new(
                &what,
                libc::ESTALE,
                "changed while it was read",
            ));
        }
        let o = self.block(async {
            let body = ByteStream::read_from()
                .path(&path)
                .length(aws_sdk_s3::primitives::Length::Exact(size))
                .build()
                .await
                .map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?;
            self.client
                .put_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .body(body)
                .content_md5(base64_md5(&md5))
                .set_metadata(Some(meta.to_metadata(self.url.metadata)))
                .send()
                .await
                .map_err(|e| sdk_err(&what, e))
        })?;
        Ok((
            ObjectInfo::written(rel, size, o.e_tag().unwrap_or_default().to_string(), meta),
            md5,
        ))
    }

    /// [`put_file_md5_if`](Self::put_file_md5_if) of a file of `size` bytes, at most
    /// [`SMALL_BODY`]: read once into memory (its MD5 taken from the same bytes), and sent
    /// from there, a retry included.
    fn put_small(
        &self,
        rel: &str,
        file: &std::fs::File,
        size: u64,
        meta: &PosixMeta,
        still: &dyn Fn() -> bool,
    ) -> Result<(ObjectInfo, [u8; 16])> {
        use md5::Digest;
        use std::os::unix::fs::FileExt;
        let key = self.url.key(rel);
        let what = self.at(format!("PUT {key}"));
        // (By offset: the file's position is left alone.)
        let mut data = vec![0u8; size as usize];
        let mut off = 0;
        while off < data.len() {
            match file.read_at(&mut data[off..], off as u64) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(S3Error::new(
                        &what,
                        e.raw_os_error().unwrap_or(libc::EIO),
                        e.to_string(),
                    ));
                }
            }
        }
        if off != data.len() || !still() {
            return Err(S3Error::new(
                &what,
                libc::ESTALE,
                "changed while it was read",
            ));
        }
        let md5: [u8; 16] = md5::Md5::digest(&data).into();
        Ok((self.put_md5(rel, data, meta, Some(&md5))?, md5))
    }

    /// Server-side copy of another store's object (`src`'s `rel`, exactly the version with
    /// ETag `etag`: a replaced object fails ESTALE) of `size` bytes to `to` here, with new
    /// POSIX metadata. These credentials must be allowed to read `src`'s bucket.
    pub fn copy_from(
        &self,
        src: &S3Store,
        rel: &str,
        etag: &str,
        size: u64,
        to: &str,
        meta: &PosixMeta,
    ) -> Result<ObjectInfo> {
        self.copy_object(src, rel, Some(etag), size, to, meta)
    }

    /// Whether objects of `other` can be copied here by the server: same endpoint and region.
    pub fn same_service(&self, other: &S3Store) -> bool {
        self.endpoint == other.endpoint && self.region == other.region
    }

    /// Server-side copy of `from` (of `size` bytes, exactly the version with ETag `etag`: a
    /// replaced object fails ESTALE) to `rel` with new POSIX metadata: no byte passes through
    /// this host. `from` may be `rel` itself, which changes the metadata alone.
    pub fn copy(
        &self,
        from: &str,
        rel: &str,
        etag: &str,
        size: u64,
        meta: &PosixMeta,
    ) -> Result<ObjectInfo> {
        self.copy_object(
            self,
            from,
            Some(etag).filter(|e| !e.is_empty()),
            size,
            rel,
            meta,
        )
    }

    /// CopyObject (metadata replaced) up to 5 GiB, its limit; above, a multipart upload whose
    /// parts are copied by the server (UploadPartCopy).
    fn copy_object(
        &self,
        src: &S3Store,
        rel: &str,
        etag: Option<&str>,
        size: u64,
        to: &str,
        meta: &PosixMeta,
    ) -> Result<ObjectInfo> {
        if size > COPY_LIMIT {
            let part = COPY_PART.max(size.div_ceil(10_000).next_multiple_of(1 << 20));
            return self.copy_parts(src, rel, etag.unwrap_or(""), size, to, meta, part);
        }
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(to);
        let source = copy_source(src, rel);
        let o = self
            .block(
                self.client
                    .copy_object()
                    .bucket(&self.url.bucket)
                    .key(&key)
                    .copy_source(&source)
                    .set_copy_source_if_match(etag.map(str::to_string))
                    .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                    .set_metadata(Some(meta.to_metadata(self.url.metadata)))
                    .send(),
            )
            .map_err(|e| sdk_err(&self.at(format!("COPY {source} to {key}")), e))?;
        Ok(ObjectInfo::written(
            to,
            size,
            o.copy_object_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            meta,
        ))
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.url.key(rel);
        self.block(
            self.client
                .delete_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .send(),
        )
        .map_err(|e| sdk_err(&self.at(format!("DELETE {key}")), e))?;
        Ok(())
    }

    /// Create the bucket (tests, and a NEW bucket that does not exist yet).
    pub fn create_bucket(&self) -> Result<()> {
        self.block(self.client.create_bucket().bucket(&self.url.bucket).send())
            .map_err(|e| sdk_err(&self.at(format!("CREATE BUCKET {}", self.url.bucket)), e))?;
        Ok(())
    }
}
