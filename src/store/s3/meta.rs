//! POSIX attributes in object metadata: read in s3fs's and rclone's conventions, written in
//! both; and the MD5s that Content-MD5 headers and single-part ETags carry.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

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
