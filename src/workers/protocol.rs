//! The requests and answers of the coordinator's protocol (JSON bodies over
//! [`super::http`]). Workers name nothing by their own paths: every item they report on is
//! named by its lease and number, and the path and temporary name they echo must be the ones
//! the coordinator handed out (checked, with the path rules of [`check_path`]).

use serde::{Deserialize, Serialize};

pub use crate::store::s3::SentPart;

/// The protocol's version, in every path (`/v1/...`).
pub const VERSION: &str = "v1";

/// A store as a worker reaches it: a POSIX path (shared mounts at the same path, or
/// `worker --old/--new`), or an S3 URL without credentials (the worker's own environment or
/// profile gives those).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Posix(String),
    S3(String),
}

/// `POST /v1/hello`: a worker introduces itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The worker's id (`JOB_COMPLETION_INDEX` under an Indexed Job, else host and pid).
    pub worker: String,
}

/// The coordinator's answer to hello: where the stores are and how leases go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    pub old: Store,
    pub new: Store,
    /// NEW's work dir (below NEW's root), where a POSIX NEW's copies are made.
    pub work_dir: String,
    /// Seconds a lease lasts unless renewed.
    pub lease_secs: u64,
}

/// `POST /v1/lease`: a worker asks for work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub worker: String,
}

/// One file to copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Its number in the lease.
    pub n: u32,
    /// OLD's path below OLD's root (an S3 OLD: the key below its prefix).
    pub path: String,
    /// OLD's size and mtime (seconds, nanoseconds) when leased: a worker finding another
    /// copies nothing and says so.
    pub size: u64,
    pub mtime: (i64, u32),
    /// An S3 OLD's object: the ETag to read it at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The name to make the copy under in NEW's work dir (a POSIX NEW).
    pub tmp: String,
    /// An S3 NEW: the key (below NEW's prefix) to upload the copy to, as a multipart upload
    /// the worker begins and never completes (the coordinator does, once it takes the copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// OLD's permission bits (and type), owner and group: what the copy carries.
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// A big file's range: copy these bytes only, into the file (`tmp`) or upload the
    /// coordinator made for the whole file, which other workers fill too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
}

/// The bytes of a big file one worker copies (DistCp's chunks, AFM's split of big files
/// across gateways): `[offset, offset + len)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    /// An S3 NEW: the multipart upload of the whole file, which the coordinator began (and
    /// completes once every range is in). The range's parts are numbered as in the whole
    /// file (parts of `crate::store::s3::part_size(size)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
}

/// The coordinator's answer to a lease request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// Copy these, and report before `secs` seconds (renew to get more).
    Lease {
        id: u64,
        secs: u64,
        items: Vec<Item>,
    },
    /// Nothing to hand out now (paused, or every file is leased): ask again after `ms`.
    Wait { ms: u64 },
    /// The migration is executed (or ended): the worker may exit.
    Done,
}

/// `POST /v1/renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renew {
    pub worker: String,
    pub lease: u64,
}

/// One item's outcome, as the worker reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub n: u32,
    /// The item's path and temporary name, as handed out (checked).
    pub path: String,
    pub tmp: String,
    /// `None`: copied, made durable (fsync) under `tmp`, or sent as the parts of `upload`.
    /// Else why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error's errno, when it had one.
    #[serde(default)]
    pub errno: i32,
    /// OLD's size and mtime as the copy read them (a copy of another version is refused).
    pub size: u64,
    pub mtime: (i64, u32),
    /// OLD's file changed since it was handed out (or while it was copied): nothing to take.
    #[serde(default)]
    pub changed: bool,
    /// An S3 NEW: the item's key, as handed out (checked), the id of the multipart upload
    /// holding the copy, and its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<SentPart>,
}

/// `POST /v1/report`: the outcomes of (some of) a lease's items. The lease ends with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub worker: String,
    pub lease: u64,
    pub outcomes: Vec<Outcome>,
}

/// The coordinator's answer to a report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// Items whose copies took their names in NEW.
    pub accepted: Vec<u32>,
    /// Items refused, and why (their copies were removed).
    pub refused: Vec<(u32, String)>,
}

/// An error answer's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
}

/// Whether `path` may name an entry of the migration: relative, no empty, `.` or `..`
/// component, no NUL, at most 4,096 bytes.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 4096 {
        return Err(format!("a path of {} bytes", path.len()));
    }
    if path.starts_with('/') {
        return Err(format!("an absolute path: {path:?}"));
    }
    if path.contains('\0') {
        return Err("a path with a NUL byte".into());
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "a path with an empty, `.` or `..` component: {path:?}"
        ));
    }
    Ok(())
}

/// Whether `tmp` may name a copy in NEW's work dir: one component, ferryfs's prefix.
pub fn check_tmp(tmp: &str) -> Result<(), String> {
    if !tmp.starts_with(crate::view::REMOTE_FILE_PREFIX)
        || tmp.contains('/')
        || tmp.contains('\0')
        || tmp.len() > 255
    {
        return Err(format!("not a temporary name of this coordinator: {tmp:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_migration_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "a/b.txt", "dir/..x", "x..", ".hidden/f"] {
            assert!(check_path(good).is_ok(), "{good:?}");
        }
        assert!(check_tmp("remote-1-2").is_ok());
        assert!(check_tmp("../remote-1").is_err());
        assert!(check_tmp("file-1").is_err());
    }
}
