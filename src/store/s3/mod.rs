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

pub mod client;
pub mod get;
pub mod meta;
pub mod multipart;
pub mod reader;
pub mod tree;
pub mod url;

pub use meta::{MetaStyle, PosixMeta, file_md5, format_time, md5_etag, parse_mode, parse_time};
pub use multipart::{BUFFER_BUDGET, BUFFERS, SentPart, part_size};
pub use reader::ObjectReader;
pub use url::{Defaults, S3Url, wants_path_style};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

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

impl ObjectInfo {
    /// The object `rel` at version `etag`, `size` bytes (what a reader needs of it).
    pub fn at(rel: &str, size: u64, etag: &str) -> ObjectInfo {
        ObjectInfo {
            rel: rel.to_string(),
            size,
            etag: etag.to_string(),
            last_modified: (0, 0),
            meta: None,
        }
    }

    /// An object this store just wrote (PUT, a copy, a completed upload) with `meta`.
    fn written(rel: &str, size: u64, etag: String, meta: &PosixMeta) -> ObjectInfo {
        ObjectInfo {
            rel: rel.to_string(),
            size,
            etag,
            last_modified: (0, 0),
            meta: Some(*meta),
        }
    }
}

/// CopyObject's `x-amz-copy-source` for `src`'s object at `rel`.
fn copy_source(src: &S3Store, rel: &str) -> String {
    format!(
        "{}/{}",
        src.url.bucket,
        percent_encode_key(&src.url.key(rel))
    )
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

/// A Content-MD5 header's value: the digest in base64.
fn base64_md5(md5: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(md5)
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
    what: impl FnOnce() -> String,
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
            let e = sdk_err(&what(), e);
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
            } else if url.endpoint.is_some()
                || ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                    .iter()
                    .any(|k| std::env::var_os(k).is_some())
            {
                // A service that is not AWS's: its region comes from the environment or the
                // profile, else any name does. Never from the EC2 instance metadata service,
                // which the SDK's default chain asks last: a request off this host, waiting
                // for its timeout wherever there is no such service.
                use aws_config::environment::region::EnvironmentVariableRegionProvider;
                use aws_config::meta::region::RegionProviderChain;
                use aws_config::profile::ProfileFileRegionProvider;
                let profile = match &url.profile {
                    Some(p) => ProfileFileRegionProvider::builder().profile_name(p).build(),
                    None => ProfileFileRegionProvider::new(),
                };
                l = l.region(
                    RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
                        .or_else(profile)
                        .or_else(aws_config::Region::new("us-east-1")),
                );
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

    /// A request's name for its errors: what it was, and the endpoint it went to (which of
    /// two stores on two services failed, and where).
    fn at(&self, what: impl std::fmt::Display) -> String {
        match (&self.endpoint, &self.region) {
            (Some(e), _) => format!("{what} at {e}"),
            (None, Some(r)) => format!("{what} at AWS S3 ({r})"),
            (None, None) => format!("{what} at AWS S3"),
        }
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
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
/// A file up to this size is uploaded from memory, read once (its MD5 from the same bytes).
pub const SMALL_BODY: u64 = 1 << 20;
/// The smallest part of a multipart upload (S3's own minimum is 5 MiB).
pub const MULTIPART_PART: u64 = 16 << 20;
/// S3's limit for one CopyObject; bigger objects are copied in parts.
pub const COPY_LIMIT: u64 = 5 << 30;
/// The part of a server-side multipart copy.
pub const COPY_PART: u64 = 512 << 20;
/// Parts of one upload in flight at once (each held in memory: 64 MiB an upload).
pub const MULTIPART_IN_FLIGHT: usize = 4;
/// Parts of one server-side copy in flight at once (nothing held here).
pub const COPY_IN_FLIGHT: usize = 8;

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
        for style in [MetaStyle::S3fs, MetaStyle::Rclone] {
            assert_eq!(
                PosixMeta::from_metadata(&p.to_metadata(style)),
                p,
                "{style:?}"
            );
        }
        assert!(p.to_metadata(MetaStyle::None).is_empty());
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
