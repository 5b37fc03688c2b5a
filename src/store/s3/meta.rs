//! POSIX attributes in object metadata: read in s3fs's and rclone's conventions, written in
//! both; and the MD5s that Content-MD5 headers and single-part ETags carry.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How a store writes POSIX attributes into object metadata (`prepare --s3-metadata`, the
/// `metadata=` URL setting). Both conventions use the same keys (`mode`, `uid`, `gid`,
/// `mtime`) and differ in the mode's base; every reader here takes either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetaStyle {
    /// s3fs's: the whole st_mode in decimal ("33188"), mtime in seconds. What s3fs-fuse and
    /// most S3 file systems and gateways read; the default.
    #[default]
    S3fs,
    /// rclone's: the st_mode in octal ("100644"), which `rclone copy --metadata` applies;
    /// mtime in seconds with a fraction, which rclone reads as the modification time.
    Rclone,
    /// No POSIX attributes: objects carry only their bytes.
    None,
}

impl MetaStyle {
    pub const ALL: [MetaStyle; 3] = [MetaStyle::S3fs, MetaStyle::Rclone, MetaStyle::None];

    pub fn as_str(self) -> &'static str {
        match self {
            MetaStyle::S3fs => "s3fs",
            MetaStyle::Rclone => "rclone",
            MetaStyle::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<MetaStyle> {
        MetaStyle::ALL.into_iter().find(|m| m.as_str() == s)
    }
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

impl PosixMeta {
    /// The attributes an object holding an entry of stat `st` carries: its mode (type
    /// included), owner and mtime.
    pub fn of_stat(st: &rustix::fs::Stat) -> PosixMeta {
        #[allow(clippy::unnecessary_cast)]
        PosixMeta {
            mode: Some(st.st_mode as u32),
            uid: Some(st.st_uid),
            gid: Some(st.st_gid),
            mtime: Some((st.st_mtime as i64, st.st_mtime_nsec as u32)),
        }
    }
}

/// Parse "1700000000", "1700000000.123456789" or "1700000000.5" into (secs, nanos), exactly;
/// also an RFC 3339 time ("2014-05-13T16:53:20.000000005Z", "...+02:00"), as rclone's
/// metadata API writes it.
pub fn parse_time(s: &str) -> Option<(i64, u32)> {
    let s = s.trim();
    if s.contains('T') {
        return parse_rfc3339(s);
    }
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

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` as (seconds since the epoch, nanos).
fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let mut digits: String = f[..n].chars().take(9).collect();
        while digits.len() < 9 {
            digits.push('0');
        }
        nanos = digits.parse().ok()?;
        rest = &f[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            if oh.len() != 2 || om.len() != 2 {
                return None;
            }
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nanos))
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

    /// The user metadata that records these attributes, in `style`.
    pub fn to_metadata(&self, style: MetaStyle) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if style == MetaStyle::None {
            return m;
        }
        if let Some(v) = self.mode {
            let mode = match style {
                MetaStyle::Rclone => format!("{v:o}"),
                _ => v.to_string(),
            };
            m.insert("mode".into(), mode);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_as_seconds_and_nanos() {
        let t = |s| parse_time(s);
        assert_eq!(
            t("2014-05-13T16:53:20.000000005Z"),
            Some((1_400_000_000, 5))
        );
        assert_eq!(t("2014-05-13T18:53:20+02:00"), Some((1_400_000_000, 0)));
        assert_eq!(
            t("2014-05-13T12:53:20.5-04:00"),
            Some((1_400_000_000, 500_000_000))
        );
        assert_eq!(t("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(t("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(t("2000-02-29T00:00:00Z"), Some((951_782_400, 0)));
        for bad in [
            "2014-05-13T16:53:20",
            "2014-13-13T16:53:20Z",
            "2014-05-13T16:53Z",
            "x",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_style_writes_its_mode_and_none_writes_nothing() {
        let p = PosixMeta {
            mode: Some(0o100600),
            uid: Some(7),
            gid: Some(8),
            mtime: Some((1_400_000_000, 5)),
        };
        assert_eq!(p.to_metadata(MetaStyle::S3fs)["mode"], "33152");
        assert_eq!(p.to_metadata(MetaStyle::Rclone)["mode"], "100600");
        assert!(p.to_metadata(MetaStyle::None).is_empty());
        // Either is read back as the same mode.
        for style in [MetaStyle::S3fs, MetaStyle::Rclone] {
            assert_eq!(PosixMeta::from_metadata(&p.to_metadata(style)), p);
        }
    }
}
