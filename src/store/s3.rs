//! S3 stores: `s3://bucket[/prefix][?endpoint=URL&region=R&profile=P&path_style=true|false]`.
//!
//! The URL carries only non-secret settings. Credentials come from AWS's standard chain: the
//! named profile (`profile=`, in ~/.aws/credentials and ~/.aws/config), else the environment
//! (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), else the instance or pod
//! role; they never reach argv, a log line or the journal. The endpoint comes from the URL,
//! else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or the profile's endpoint_url); path-style
//! addressing is chosen for an endpoint that is an IP address or localhost, unless the URL
//! says otherwise.
//!
//! Objects are files and common prefixes (and `key/` marker objects) are directories. POSIX
//! metadata is read from the s3fs convention (`x-amz-meta-mode`, `-uid`, `-gid`, `-mtime`) and
//! rclone's (`x-amz-meta-mtime`, fractional seconds), else the store's defaults. The calls are
//! blocking: each runs on the store's own Tokio runtime, so the view's and the copier's plain
//! threads can use them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};

/// A parsed `s3://` store URL. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix of the store's root: empty, or ending in `/`.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub path_style: Option<bool>,
    /// POSIX attributes for objects and directories whose metadata does not say (`uid=`,
    /// `gid=`, `file_mode=`, `dir_mode=`, octal modes).
    #[serde(default)]
    pub defaults: Defaults,
}

/// Owner and permission bits shown for entries whose object metadata does not carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// The mtime (seconds) of directories, which S3 does not have: set by `prepare` to the
    /// time of prepare, so that it never changes. Not a URL setting.
    #[serde(default)]
    pub dir_mtime: i64,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            dir_mtime: 0,
        }
    }
}

/// Query settings a store URL may carry; anything else (a secret above all) is refused.
const SETTINGS: &[&str] = &[
    "endpoint",
    "region",
    "profile",
    "path_style",
    "uid",
    "gid",
    "file_mode",
    "dir_mode",
];

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(h);
                i += 3;
            }
            b'%' => return Err(format!("bad percent escape in {s:?}")),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl S3Url {
    pub fn parse(arg: &str) -> std::result::Result<S3Url, String> {
        let rest = arg
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{arg}: an S3 store is s3://bucket[/prefix]"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let (bucket, prefix) = match path.split_once('/') {
            Some((b, p)) => (b, p),
            None => (path, ""),
        };
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        {
            return Err(format!(
                "{arg}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(format!("{arg}: the prefix may not hold '.', '..' or '//'"));
        }
        let mut url = S3Url {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint: None,
            region: None,
            profile: None,
            path_style: None,
            defaults: Defaults::default(),
        };
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v)?;
            match k {
                "endpoint" => {
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(format!(
                            "{arg}: endpoint must be an http:// or https:// URL"
                        ));
                    }
                    url.endpoint = Some(v.trim_end_matches('/').to_string());
                }
                "region" => url.region = Some(v),
                "profile" => url.profile = Some(v),
                "path_style" => {
                    url.path_style = Some(match v.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(format!("{arg}: path_style must be true or false")),
                    })
                }
                "uid" | "gid" => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| format!("{arg}: {k} must be a number"))?;
                    if k == "uid" {
                        url.defaults.uid = n;
                    } else {
                        url.defaults.gid = n;
                    }
                }
                "file_mode" | "dir_mode" => {
                    let m = u32::from_str_radix(&v, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| format!("{arg}: {k} must be octal permission bits"))?;
                    if k == "file_mode" {
                        url.defaults.file_mode = m;
                    } else {
                        url.defaults.dir_mode = m;
                    }
                }
                _ if k.contains("secret") || k.contains("key") || k.contains("token") => {
                    // The URL is not repeated: it holds the secret.
                    return Err(format!(
                        "s3://{bucket}: setting {k:?} refused: credentials never go in a store URL (it is recorded in the journal \
                         and shown in status); use a profile or AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY"
                    ));
                }
                _ => {
                    return Err(format!(
                        "{arg}: unknown setting {k:?} (known: {})",
                        SETTINGS.join(", ")
                    ));
                }
            }
        }
        Ok(url)
    }

    /// The full key of `rel` (a path below the store's root, no leading '/').
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix.trim_end_matches('/'))?;
        }
        let mut sep = '?';
        let mut put = |f: &mut fmt::Formatter<'_>, k: &str, v: &str| {
            let r = write!(f, "{sep}{k}={v}");
            sep = '&';
            r
        };
        if let Some(e) = &self.endpoint {
            put(f, "endpoint", e)?;
        }
        if let Some(r) = &self.region {
            put(f, "region", r)?;
        }
        if let Some(p) = &self.profile {
            put(f, "profile", p)?;
        }
        if let Some(p) = self.path_style {
            put(f, "path_style", if p { "true" } else { "false" })?;
        }
        let (d, z) = (&self.defaults, Defaults::default());
        if d.uid != z.uid {
            put(f, "uid", &d.uid.to_string())?;
        }
        if d.gid != z.gid {
            put(f, "gid", &d.gid.to_string())?;
        }
        if d.file_mode != z.file_mode {
            put(f, "file_mode", &format!("{:o}", d.file_mode))?;
        }
        if d.dir_mode != z.dir_mode {
            put(f, "dir_mode", &format!("{:o}", d.dir_mode))?;
        }
        Ok(())
    }
}

/// Path-style addressing for an endpoint that is an IP address or localhost (virtual-hosted
/// names cannot resolve there).
pub fn wants_path_style(endpoint: &str) -> bool {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("");
    if let Some(v6) = authority.strip_prefix('[') {
        // [v6]:port
        return v6
            .split(']')
            .next()
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// An S3 error, with the errno the view reports for it.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {msg}")]
pub struct S3Error {
    pub what: String,
    pub msg: String,
    pub errno: i32,
}

impl S3Error {
    pub fn new(what: impl Into<String>, errno: i32, msg: impl Into<String>) -> S3Error {
        S3Error {
            what: what.into(),
            msg: msg.into(),
            errno,
        }
    }
}

pub type Result<T> = std::result::Result<T, S3Error>;

impl From<S3Error> for std::io::Error {
    fn from(e: S3Error) -> std::io::Error {
        // The errno is what callers match on; the message goes to the log where the error is
        // reported (it names the request, never a credential).
        if e.errno == libc::EIO {
            tracing::warn!(error = %e, "S3 request failed");
        } else {
            tracing::debug!(error = %e, "S3 request failed");
        }
        std::io::Error::from_raw_os_error(e.errno)
    }
}

/// Map an SDK error to an errno: not found, access, precondition (the object changed), else
/// EIO. The message is the SDK's, which names the code and never a credential.
fn sdk_err<E>(
    what: &str,
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> S3Error
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    let (code, status) = match &e {
        SdkError::ServiceError(s) => (
            s.err().code().map(str::to_string),
            Some(s.raw().status().as_u16()),
        ),
        SdkError::ResponseError(r) => (None, Some(r.raw().status().as_u16())),
        _ => (None, None),
    };
    let errno = match (code.as_deref(), status) {
        (Some("NoSuchKey" | "NotFound" | "NoSuchBucket"), _) | (_, Some(404)) => libc::ENOENT,
        (Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"), _)
        | (_, Some(403)) => libc::EACCES,
        (Some("PreconditionFailed"), _) | (_, Some(412)) => libc::ESTALE,
        (Some("InvalidRange"), _) | (_, Some(416)) => libc::ERANGE,
        _ => libc::EIO,
    };
    let msg = match &e {
        SdkError::ServiceError(s) => format!(
            "{} ({}, HTTP {})",
            s.err().message().unwrap_or("no message"),
            code.as_deref().unwrap_or("no code"),
            status.unwrap_or(0)
        ),
        other => format!("{}", aws_sdk_s3::error::DisplayErrorContext(other)),
    };
    // No request was made: the credentials could not be loaded (a missing profile).
    let errno = if errno == libc::EIO
        && matches!(
            e,
            SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
        )
        && msg.to_ascii_lowercase().contains("credential")
    {
        libc::EACCES
    } else {
        errno
    };
    S3Error::new(what, errno, msg)
}

/// POSIX attributes taken from an object's user metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PosixMeta {
    /// Permission bits and, when the writer recorded it (s3fs), the file type.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// (seconds, nanoseconds).
    pub mtime: Option<(i64, u32)>,
}

/// Parse "1700000000", "1700000000.123456789" or "1700000000.5" into (secs, nanos), exactly.
pub fn parse_time(s: &str) -> Option<(i64, u32)> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = whole.parse().ok()?;
    if frac.is_empty() {
        return Some((secs, 0));
    }
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((secs, digits.parse().ok()?))
}

/// A file type in st_mode's type bits (S_IFREG, S_IFDIR, S_IFLNK, ...).
fn valid_type(mode: u32) -> bool {
    matches!(
        mode & 0o170000,
        0o010000 | 0o020000 | 0o040000 | 0o060000 | 0o100000 | 0o120000 | 0o140000
    )
}

/// An st_mode as object metadata holds it: s3fs writes it in decimal with the type bits
/// ("33188"), rclone's `--metadata` in octal without a leading 0 ("100644", "40755"), others
/// octal with a leading 0 ("0644"). Decimal when that gives a real file type, else octal.
pub fn parse_mode(v: &str) -> Option<u32> {
    let octal = || u32::from_str_radix(v, 8).ok().filter(|m| *m <= 0o177777);
    if v.len() > 1 && v.starts_with('0') {
        return octal();
    }
    match v.parse::<u32>().ok() {
        Some(d) if d <= 0o177777 && valid_type(d) => Some(d),
        _ => octal().filter(|m| valid_type(*m) || *m <= 0o7777),
    }
}

/// Format (secs, nanos) as rclone and s3fs read it back: integer seconds, or with a fraction.
pub fn format_time((secs, nanos): (i64, u32)) -> String {
    if nanos == 0 {
        secs.to_string()
    } else {
        format!("{secs}.{nanos:09}")
    }
}

impl PosixMeta {
    pub fn from_metadata(m: &HashMap<String, String>) -> PosixMeta {
        let get = |k: &str| m.get(k).map(|v| v.trim());
        PosixMeta {
            mode: get("mode").and_then(parse_mode),
            uid: get("uid").and_then(|v| v.parse().ok()),
            gid: get("gid").and_then(|v| v.parse().ok()),
            mtime: get("mtime").and_then(parse_time),
        }
    }

    /// The user metadata that records these attributes (s3fs's and rclone's conventions).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if let Some(v) = self.mode {
            m.insert("mode".into(), v.to_string());
        }
        if let Some(v) = self.uid {
            m.insert("uid".into(), v.to_string());
        }
        if let Some(v) = self.gid {
            m.insert("gid".into(), v.to_string());
        }
        if let Some(t) = self.mtime {
            m.insert("mtime".into(), format_time(t));
        }
        m
    }
}

/// One object as listed or headed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key below the store's prefix.
    pub rel: String,
    pub size: u64,
    pub etag: String,
    /// LastModified: (seconds, nanoseconds).
    pub last_modified: (i64, u32),
    /// User metadata, when known (HEAD gives it; LIST does not).
    pub meta: Option<PosixMeta>,
}

/// One name in a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    Object(ObjectInfo),
    /// A common prefix (or a `name/` marker object): a directory.
    Dir(String),
}

/// Request counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub puts: AtomicU64,
}

/// A connected S3 store.
pub struct S3Store {
    pub url: S3Url,
    /// The endpoint requests go to, as resolved at connect (`None`: AWS's own), and the
    /// region: two stores with the same can copy between them server-side.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    rt: Arc<tokio::runtime::Runtime>,
    client: Client,
    pub counters: Counters,
}

fn time_of(t: Option<&aws_sdk_s3::primitives::DateTime>) -> (i64, u32) {
    t.map_or((0, 0), |t| (t.secs(), t.subsec_nanos()))
}

/// An object as a HEAD or a GET answer describes it (both carry the same fields).
fn info_of(
    rel: &str,
    len: Option<i64>,
    etag: Option<&str>,
    modified: Option<&aws_sdk_s3::primitives::DateTime>,
    meta: Option<&HashMap<String, String>>,
) -> ObjectInfo {
    ObjectInfo {
        rel: rel.to_string(),
        size: len.unwrap_or(0).max(0) as u64,
        etag: etag.unwrap_or_default().to_string(),
        last_modified: time_of(modified),
        meta: Some(meta.map(PosixMeta::from_metadata).unwrap_or_default()),
    }
}

/// A listing page holds at least one key (a directory is there: [`S3Store::is_dir`]).
fn has_keys(r: &aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output) -> bool {
    r.key_count().unwrap_or(0) > 0 || !r.contents().is_empty()
}

/// A HEAD's answer as [`S3Store::head`] gives it: `None` for no such object.
fn head_result(
    rel: &str,
    key: &str,
    r: std::result::Result<
        aws_sdk_s3::operation::head_object::HeadObjectOutput,
        aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::head_object::HeadObjectError>,
    >,
) -> Result<Option<ObjectInfo>> {
    match r {
        Ok(o) => Ok(Some(info_of(
            rel,
            o.content_length(),
            o.e_tag(),
            o.last_modified(),
            o.metadata(),
        ))),
        Err(e) => {
            let e = sdk_err(&format!("HEAD {key}"), e);
            if e.errno == libc::ENOENT {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl S3Store {
    /// Build a client for `url` with the standard credential chain. Makes no request.
    pub fn connect(url: &S3Url) -> Result<S3Store> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| S3Error::new("starting the S3 runtime", libc::EIO, e.to_string()))?;
        let conf = rt.block_on(async {
            // Five attempts, not the SDK's three: a server restarting or shedding load resets
            // connections for a second or two, and a store operation that gives up then fails
            // a read through the view or a whole prepare.
            let mut l = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(5));
            if let Some(p) = &url.profile {
                // The named profile's own keys, even when AWS_ACCESS_KEY_ID is set (it may be
                // the other store's): OLD and NEW can use different credentials.
                l = l.profile_name(p).credentials_provider(
                    aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .profile_name(p)
                        .build(),
                );
            }
            if let Some(r) = &url.region {
                l = l.region(aws_config::Region::new(r.clone()));
            }
            if let Some(e) = &url.endpoint {
                l = l.endpoint_url(e);
            }
            l.load().await
        });
        let endpoint = conf.endpoint_url().map(str::to_string);
        let path_style = url
            .path_style
            .unwrap_or_else(|| endpoint.as_deref().is_some_and(wants_path_style));
        let mut b = aws_sdk_s3::config::Builder::from(&conf).force_path_style(path_style);
        if conf.region().is_none() {
            // A local S3-compatible server may not care; AWS's own default region does.
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        if conf.credentials_provider().is_none() {
            return Err(S3Error::new(
                format!("{}", url),
                libc::EACCES,
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile (profile=)",
            ));
        }
        let region = conf.region().map(|r| r.to_string());
        Ok(S3Store {
            url: url.clone(),
            endpoint: endpoint.clone(),
            region,
            rt: Arc::new(rt),
            client: Client::from_conf(b.build()),
            counters: Counters::default(),
        })
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// HEAD of `rel`: `None` when there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<ObjectInfo>> {
        self.counters.heads.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let r = self.block(self.head_req(&key).send());
        head_result(rel, &key, r)
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
        let what = format!("LIST s3://{}/{dir}", self.url.bucket);
        let l = match l {
            Ok(r) => r.map(|r| has_keys(&r)).map_err(|e| sdk_err(&what, e)),
            Err(e) => match e.try_into_panic() {
                Ok(p) => std::panic::resume_unwind(p),
                Err(e) => Err(S3Error::new(what, libc::EIO, e.to_string())),
            },
        };
        (head_result(rel, &key, h), l)
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
            .map_err(|e| sdk_err(&format!("LIST s3://{}/{prefix}", self.url.bucket), e))
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

    /// Bytes [off, off+len) of `rel`, as long as its ETag is still `etag` (ESTALE if the
    /// object was replaced meanwhile). Short at the object's end.
    pub fn get_range(&self, rel: &str, etag: &str, off: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = format!("GET {key} bytes {off}+{len}");
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
        let what = format!("GET {key}");
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
        let what = format!("GET {key} bytes {off}+{len}");
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
        let what = format!("GET {key}");
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
                    .set_metadata(Some(meta.to_metadata()))
                    .send(),
            )
            .map_err(|e| sdk_err(&format!("PUT {key}"), e))?;
        Ok(ObjectInfo {
            rel: rel.to_string(),
            size,
            etag: o.e_tag().unwrap_or_default().to_string(),
            last_modified: (0, 0),
            meta: Some(*meta),
        })
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
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(rel);
        let what = format!("PUT {key}");
        let io = |e: std::io::Error| {
            S3Error::new(&what, e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
        };
        let size = file.metadata().map_err(io)?.len();
        // By the fd's /proc path: a body made from a path is read again if the request is
        // retried (one made from an open file is not).
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        if size > MULTIPART_THRESHOLD {
            return self.put_multipart(rel, file, &path, size, meta);
        }
        // Content-MD5: the server refuses a body that arrives other than it was read.
        let md5 = file_md5(file).map_err(io)?;
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
                .content_md5(crate::journal::bytes_b64::encode(&md5))
                .set_metadata(Some(meta.to_metadata()))
                .send()
                .await
                .map_err(|e| sdk_err(&what, e))
        })?;
        Ok((
            ObjectInfo {
                rel: rel.to_string(),
                size,
                etag: o.e_tag().unwrap_or_default().to_string(),
                last_modified: (0, 0),
                meta: Some(*meta),
            },
            md5,
        ))
    }

    /// A multipart upload of `file` (`path` its /proc path), parts of [`MULTIPART_PART`] or
    /// more (S3 takes at most 10,000), [`MULTIPART_IN_FLIGHT`] at a time, each with its
    /// Content-MD5. Aborted on any failure, so no half upload stays behind.
    fn put_multipart(
        &self,
        rel: &str,
        file: &std::fs::File,
        path: &str,
        size: u64,
        meta: &PosixMeta,
    ) -> Result<(ObjectInfo, [u8; 16])> {
        use aws_sdk_s3::types::CompletedPart;
        use md5::Digest;
        use std::os::unix::fs::FileExt;
        let key = self.url.key(rel);
        let what = format!("multipart PUT {key}");
        let io = |e: std::io::Error| {
            S3Error::new(&what, e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
        };
        let part = MULTIPART_PART.max(size.div_ceil(10_000).next_multiple_of(1 << 20));
        // Each part's MD5 (for its Content-MD5) and the whole's, in one read of the file.
        let mut whole = md5::Md5::new();
        let mut parts: Vec<(u64, u64, [u8; 16])> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < size {
            let len = part.min(size - off);
            let mut h = md5::Md5::new();
            let mut done = 0u64;
            while done < len {
                let want = (len - done).min(buf.len() as u64) as usize;
                let n = file.read_at(&mut buf[..want], off + done).map_err(io)?;
                if n == 0 {
                    return Err(io(std::io::Error::from_raw_os_error(libc::ESTALE)));
                }
                h.update(&buf[..n]);
                whole.update(&buf[..n]);
                done += n as u64;
            }
            parts.push((off, len, h.finalize().into()));
            off += len;
        }
        let created = self
            .block(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.url.bucket)
                    .key(&key)
                    .set_metadata(Some(meta.to_metadata()))
                    .send(),
            )
            .map_err(|e| sdk_err(&what, e))?;
        let id = created.upload_id().unwrap_or_default().to_string();
        let sent = self.block(async {
            let mut done: Vec<CompletedPart> = Vec::with_capacity(parts.len());
            for chunk in parts.chunks(MULTIPART_IN_FLIGHT).enumerate() {
                let (c, group) = chunk;
                let mut set = tokio::task::JoinSet::new();
                for (i, (off, len, md5)) in group.iter().enumerate() {
                    let number = (c * MULTIPART_IN_FLIGHT + i + 1) as i32;
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(*off)
                        .length(aws_sdk_s3::primitives::Length::Exact(*len))
                        .build()
                        .await
                        .map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?;
                    let req = self
                        .client
                        .upload_part()
                        .bucket(&self.url.bucket)
                        .key(&key)
                        .upload_id(&id)
                        .part_number(number)
                        .content_md5(crate::journal::bytes_b64::encode(md5))
                        .body(body);
                    set.spawn(async move { (number, req.send().await) });
                }
                while let Some(r) = set.join_next().await {
                    let (number, r) =
                        r.map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?;
                    let o = r.map_err(|e| sdk_err(&what, e))?;
                    done.push(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(o.e_tag().map(str::to_string))
                            .build(),
                    );
                }
            }
            Ok(done)
        });
        let etag = self.finish_multipart(&key, &id, &what, sent)?;
        Ok((
            ObjectInfo {
                rel: rel.to_string(),
                size,
                etag,
                last_modified: (0, 0),
                meta: Some(*meta),
            },
            whole.finalize().into(),
        ))
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
        let source = format!(
            "{}/{}",
            src.url.bucket,
            percent_encode_key(&src.url.key(rel))
        );
        let o = self
            .block(
                self.client
                    .copy_object()
                    .bucket(&self.url.bucket)
                    .key(&key)
                    .copy_source(&source)
                    .set_copy_source_if_match(etag.map(str::to_string))
                    .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                    .set_metadata(Some(meta.to_metadata()))
                    .send(),
            )
            .map_err(|e| sdk_err(&format!("COPY {source} to {key}"), e))?;
        Ok(ObjectInfo {
            rel: to.to_string(),
            size,
            etag: o
                .copy_object_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            last_modified: (0, 0),
            meta: Some(*meta),
        })
    }

    /// Server-side copy of `src`'s `rel` (version `etag`; any version when empty) to `to`
    /// here as a multipart upload of `part`-byte parts, each copied by the server
    /// (UploadPartCopy), [`MULTIPART_IN_FLIGHT`] at a time; aborted on any failure.
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
        use aws_sdk_s3::types::CompletedPart;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let key = self.url.key(to);
        let source = format!(
            "{}/{}",
            src.url.bucket,
            percent_encode_key(&src.url.key(rel))
        );
        let what = format!("multipart COPY {source} to {key}");
        let ranges: Vec<(u64, u64)> = (0..size.div_ceil(part.max(1)))
            .map(|i| (i * part, ((i + 1) * part).min(size) - 1))
            .collect();
        let created = self
            .block(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.url.bucket)
                    .key(&key)
                    .set_metadata(Some(meta.to_metadata()))
                    .send(),
            )
            .map_err(|e| sdk_err(&what, e))?;
        let id = created.upload_id().unwrap_or_default().to_string();
        let sent = self.block(async {
            let mut done: Vec<CompletedPart> = Vec::with_capacity(ranges.len());
            for (c, group) in ranges.chunks(MULTIPART_IN_FLIGHT).enumerate() {
                let mut set = tokio::task::JoinSet::new();
                for (i, (first, last)) in group.iter().enumerate() {
                    let number = (c * MULTIPART_IN_FLIGHT + i + 1) as i32;
                    let req = self
                        .client
                        .upload_part_copy()
                        .bucket(&self.url.bucket)
                        .key(&key)
                        .upload_id(&id)
                        .part_number(number)
                        .copy_source(&source)
                        .copy_source_range(format!("bytes={first}-{last}"))
                        .set_copy_source_if_match((!etag.is_empty()).then(|| etag.to_string()));
                    set.spawn(async move { (number, req.send().await) });
                }
                while let Some(r) = set.join_next().await {
                    let (number, r) =
                        r.map_err(|e| S3Error::new(&what, libc::EIO, e.to_string()))?;
                    let o = r.map_err(|e| sdk_err(&what, e))?;
                    done.push(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(
                                o.copy_part_result()
                                    .and_then(|p| p.e_tag())
                                    .map(str::to_string),
                            )
                            .build(),
                    );
                }
            }
            Ok(done)
        });
        let etag = self.finish_multipart(&key, &id, &what, sent)?;
        Ok(ObjectInfo {
            rel: to.to_string(),
            size,
            etag,
            last_modified: (0, 0),
            meta: Some(*meta),
        })
    }

    /// The last step of a multipart upload `id` of `key`: completed with the parts `sent`
    /// gave (their ETag), or aborted when sending failed, so no half upload stays behind.
    fn finish_multipart(
        &self,
        key: &str,
        id: &str,
        what: &str,
        sent: Result<Vec<aws_sdk_s3::types::CompletedPart>>,
    ) -> Result<String> {
        let done = sent.and_then(|mut parts| {
            parts.sort_by_key(|p| p.part_number());
            self.block(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.url.bucket)
                    .key(key)
                    .upload_id(id)
                    .multipart_upload(
                        aws_sdk_s3::types::CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send(),
            )
            .map_err(|e| sdk_err(what, e))
        });
        match done {
            Ok(o) => Ok(o.e_tag().unwrap_or_default().to_string()),
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

    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.url.key(rel);
        self.block(
            self.client
                .delete_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .send(),
        )
        .map_err(|e| sdk_err(&format!("DELETE {key}"), e))?;
        Ok(())
    }

    /// Create the bucket (tests, and a NEW bucket that does not exist yet).
    pub fn create_bucket(&self) -> Result<()> {
        self.block(self.client.create_bucket().bucket(&self.url.bucket).send())
            .map_err(|e| sdk_err(&format!("CREATE BUCKET {}", self.url.bucket), e))?;
        Ok(())
    }
}

/// The most [`S3Store::get_small`] holds in memory.
pub const GET_SMALL_MAX: u64 = 4 << 20;
/// From this size on, the copier fetches an object in parallel ranged GETs.
pub const PARALLEL_GET_MIN: u64 = 64 << 20;
/// The size of each of those ranges.
pub const PARALLEL_GET_PART: u64 = 16 << 20;
/// Ranged GETs in flight for one object, at most.
pub const PARALLEL_GET_STREAMS: usize = 4;
/// Ranged GETs in flight beyond each object's first, in the whole process, at most.
pub const PARALLEL_GET_EXTRA: usize = 4;
/// Files above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// The smallest part of a multipart upload (S3's own minimum is 5 MiB).
pub const MULTIPART_PART: u64 = 16 << 20;
/// S3's limit for one CopyObject; bigger objects are copied in parts.
pub const COPY_LIMIT: u64 = 5 << 30;
/// The part of a server-side multipart copy.
pub const COPY_PART: u64 = 512 << 20;
/// Parts of one upload in flight at once.
pub const MULTIPART_IN_FLIGHT: usize = 8;

/// The MD5 of the whole of `file` (read by offset: the file position is left alone).
pub fn file_md5(file: &std::fs::File) -> std::io::Result<[u8; 16]> {
    use md5::Digest;
    use std::os::unix::fs::FileExt;
    let mut h = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut buf, off)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
}

/// An MD5 as an ETag of a single-part upload shows it: quoted lowercase hex.
pub fn md5_etag(md5: &[u8; 16]) -> String {
    let mut s = String::with_capacity(34);
    s.push('"');
    for b in md5 {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('"');
    s
}

/// A key as CopyObject's `x-amz-copy-source` wants it: percent-encoded, '/' kept.
fn percent_encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn name_of(l: &Listed) -> &str {
    let rel = match l {
        Listed::Object(o) => &o.rel,
        Listed::Dir(d) => d,
    };
    rel.rsplit('/').next().unwrap_or(rel)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_settings_and_refuses_secrets() {
        let u = S3Url::parse(
            "s3://bkt/some/prefix/?endpoint=http%3A%2F%2F127.0.0.1%3A3900&region=garage&profile=old&path_style=true",
        )
        .unwrap();
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix, "some/prefix/");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(u.region.as_deref(), Some("garage"));
        assert_eq!(u.profile.as_deref(), Some("old"));
        assert_eq!(u.path_style, Some(true));
        assert_eq!(u.key("a/b"), "some/prefix/a/b");
        assert_eq!(
            u.to_string(),
            "s3://bkt/some/prefix?endpoint=http://127.0.0.1:3900&region=garage&profile=old&path_style=true"
        );
        assert_eq!(S3Url::parse(&u.to_string()).unwrap(), u);
        let plain = S3Url::parse("s3://bkt").unwrap();
        assert_eq!((plain.prefix.as_str(), plain.endpoint.clone()), ("", None));
        assert_eq!(plain.to_string(), "s3://bkt");
        for bad in [
            "s3://bkt?secret_access_key=x",
            "s3://bkt?access_key_id=x",
            "s3://bkt?session_token=x",
        ] {
            assert!(
                S3Url::parse(bad).unwrap_err().contains("credentials never"),
                "{bad}"
            );
        }
        assert!(
            S3Url::parse("s3://bkt?colour=red")
                .unwrap_err()
                .contains("unknown setting")
        );
        assert!(
            S3Url::parse("s3://B_d")
                .unwrap_err()
                .contains("bucket name")
        );
        assert!(S3Url::parse("s3://bkt/a/../b").unwrap_err().contains(".."));
        assert!(
            S3Url::parse("s3://bkt?endpoint=127.0.0.1")
                .unwrap_err()
                .contains("http")
        );
    }

    #[test]
    fn path_style_is_chosen_for_ip_and_localhost_endpoints() {
        for (e, want) in [
            ("http://127.0.0.1:3900", true),
            ("http://localhost:9000", true),
            ("http://s3.garage.localhost:3900", true),
            ("http://[::1]:3900", true),
            ("https://10.0.0.5", true),
            ("https://s3.eu-west-1.amazonaws.com", false),
            ("https://minio.example.com:9000", false),
        ] {
            assert_eq!(wants_path_style(e), want, "{e}");
        }
    }

    #[test]
    fn times_and_posix_metadata_round_trip_in_s3fs_and_rclone_forms() {
        assert_eq!(parse_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_time("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(
            parse_time("1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(
            parse_time("1700000000.1234567891"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(parse_time("soon"), None);
        assert_eq!(format_time((5, 0)), "5");
        assert_eq!(format_time((5, 7)), "5.000000007");
        let m: HashMap<String, String> = [
            ("mode", "33188"), // s3fs: S_IFREG | 0644, decimal
            ("uid", "1000"),
            ("gid", "100"),
            ("mtime", "1600000000.25"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = PosixMeta::from_metadata(&m);
        assert_eq!(p.mode, Some(0o100644));
        assert_eq!((p.uid, p.gid), (Some(1000), Some(100)));
        assert_eq!(p.mtime, Some((1_600_000_000, 250_000_000)));
        assert_eq!(PosixMeta::from_metadata(&p.to_metadata()), p);
        let octal: HashMap<String, String> = [("mode".to_string(), "0755".to_string())]
            .into_iter()
            .collect();
        assert_eq!(PosixMeta::from_metadata(&octal).mode, Some(0o755));
        // rclone --metadata: octal, no leading 0.
        assert_eq!(parse_mode("100644"), Some(0o100644));
        assert_eq!(parse_mode("40755"), Some(0o40755));
        assert_eq!(parse_mode("16877"), Some(0o40755)); // s3fs, a directory
        assert_eq!(parse_mode("644"), Some(0o644));
        assert_eq!(parse_mode("99999999"), None);
        assert_eq!(
            PosixMeta::from_metadata(&HashMap::new()),
            PosixMeta::default()
        );
    }
}
