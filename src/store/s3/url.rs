//! The store URL: `s3://bucket[/prefix][?endpoint=URL&region=R&profile=P&path_style=...]`,
//! non-secret settings only, and the store's POSIX defaults.

use std::fmt;

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
    /// How POSIX attributes are written into object metadata (`metadata=s3fs|rclone|none`).
    #[serde(default)]
    pub metadata: super::MetaStyle,
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
    "metadata",
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
            metadata: Default::default(),
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
                "metadata" => {
                    url.metadata = super::MetaStyle::parse(&v)
                        .ok_or_else(|| format!("{arg}: metadata must be s3fs, rclone or none"))?
                }
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
        if self.metadata != super::MetaStyle::default() {
            put(f, "metadata", self.metadata.as_str())?;
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
