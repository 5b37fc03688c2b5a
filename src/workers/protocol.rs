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

/// The most bytes of an error message an outcome or a verdict carries (longer ones are cut):
/// a lease is sized so that its report and the verdict on it each fit in one body
/// ([`super::http::MAX_BODY`]), errors and all.
pub const ERROR_MAX: usize = 256;

/// `why` as an outcome or a verdict carries it: at most [`ERROR_MAX`] bytes (cut at a
/// character), control characters as spaces (so that JSON escapes none of them as six bytes).
pub fn short_error(why: &str) -> String {
    let mut end = why.len().min(ERROR_MAX);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Bytes of JSON `v` encodes to.
pub fn json_len<T: Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v).expect("serializes");
    c.0
}

/// The most bytes of JSON that `item` (`item_json` bytes itself) and what comes back for it
/// take in a report and its verdict: its names again, an error of [`ERROR_MAX`] bytes (each
/// escaped: twice that), an upload id and the other fields, and a part per
/// `part_size(size)` of its bytes.
pub fn report_bound(item: &Item, item_json: usize) -> usize {
    let parts = match (&item.key, &item.range) {
        (None, _) => 0,
        (Some(_), r) => {
            let len = r.as_ref().map_or(item.size, |r| r.len);
            len.div_ceil(crate::store::s3::part_size(item.size)) as usize + 1
        }
    };
    item_json + 2 * (2 * ERROR_MAX) + 512 + parts * 160
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

    #[test]
    fn errors_are_cut_short_and_stay_one_json_byte_per_character() {
        let long = "é\n".repeat(400);
        let e = short_error(&long);
        assert!(e.len() <= ERROR_MAX, "{}", e.len());
        assert!(!e.contains('\n'));
        assert_eq!(json_len(&e), e.len() + 2);
        assert_eq!(short_error("short"), "short");
    }

    /// The worst report on a lease's item, and the verdict on it, stay within its bound.
    #[test]
    fn an_items_report_stays_within_its_bound() {
        let item = Item {
            n: u32::MAX,
            path: "d/".repeat(2000) + "f",
            size: 1 << 30,
            mtime: (i64::MIN, u32::MAX),
            etag: Some("\"0123456789abcdef0123456789abcdef-100\"".into()),
            tmp: "remote-18446744073709551615-4294967295".into(),
            key: Some("k\\\"".repeat(300)),
            mode: u32::MAX,
            uid: u32::MAX,
            gid: u32::MAX,
            range: None,
        };
        let bound = report_bound(&item, json_len(&item));
        let parts = (1u64 << 30).div_ceil(crate::store::s3::part_size(1 << 30));
        let outcome = Outcome {
            n: u32::MAX,
            path: item.path.clone(),
            tmp: item.tmp.clone(),
            error: Some(short_error(&"\"\\".repeat(1000))),
            errno: i32::MIN,
            size: u64::MAX,
            mtime: (i64::MIN, u32::MAX),
            changed: true,
            key: item.key.clone(),
            upload: Some("u".repeat(256)),
            parts: (0..parts as i32)
                .map(|i| SentPart {
                    number: i32::MAX - i,
                    etag: "\"0123456789abcdef0123456789abcdef\"".into(),
                    len: u64::MAX,
                })
                .collect(),
        };
        let verdict = json_len(&(u32::MAX, short_error(&"\"".repeat(1000))));
        assert!(
            json_len(&outcome) + verdict <= bound,
            "{} + {verdict} > {bound}",
            json_len(&outcome)
        );
    }
}
