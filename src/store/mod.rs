//! Stores: where OLD and NEW live.
//!
//! A store is named on the command line as `posix:/abs/path`, a bare absolute path, or
//! `s3://bucket/prefix`. Everything that assumes a POSIX file system lives in [`posix`], the S3
//! client in [`s3`], and an S3 OLD seen as a read-only tree in [`s3::tree`]; the view reaches a
//! store only through the `Loc`s, `Source`s and [`OldStore`] these hand out.

pub mod copy;
pub mod posix;
pub mod probe;
pub mod s3;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use posix::{Loc, PosixStore};

use serde::{Deserialize, Serialize};

/// A store as recorded in the journal at `prepare` time. Holds no credentials, ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreSpec {
    Posix {
        path: PathBuf,
    },
    /// An S3 bucket (and prefix), with its non-secret settings (`s3::S3Url`).
    S3 {
        url: s3::S3Url,
    },
}

impl StoreSpec {
    /// Parse a store argument. Relative paths are refused: a migration outlives the shell that
    /// prepared it, so a path that depends on the current directory would be a trap.
    pub fn parse(arg: &str) -> Result<StoreSpec, String> {
        if arg.starts_with("s3://") {
            return s3::S3Url::parse(arg).map(|url| StoreSpec::S3 { url });
        }
        let raw = arg.strip_prefix("posix:").unwrap_or(arg);
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(format!(
                "{arg}: a store must be an absolute path, posix:/abs/path or s3://bucket[/prefix]"
            ));
        }
        Ok(StoreSpec::Posix { path })
    }

    /// This store reached with the AWS profile `profile` (`--old-s3-profile` /
    /// `--new-s3-profile`): the same as `profile=` in its URL, which it must not contradict.
    /// `side` ("OLD", "NEW") and `flag` name the store and the flag in errors.
    pub fn with_s3_profile(
        self,
        profile: &str,
        side: &str,
        flag: &str,
    ) -> Result<StoreSpec, String> {
        if profile.is_empty()
            || !profile
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.@+".contains(&c))
        {
            return Err(format!(
                "{flag} {profile:?}: not a profile name (letters, digits, '-', '_', '.', '@', '+')"
            ));
        }
        match self {
            StoreSpec::Posix { .. } => Err(format!(
                "{flag} names the AWS profile of an S3 {side}, but {side} is a directory ({self})"
            )),
            StoreSpec::S3 { mut url } => match &url.profile {
                Some(p) if p != profile => Err(format!(
                    "{flag} {profile} and profile={p} in the {side} URL disagree: give one of them"
                )),
                _ => {
                    url.profile = Some(profile.to_string());
                    Ok(StoreSpec::S3 { url })
                }
            },
        }
    }

    /// This S3 store writing POSIX attributes in `style` (`--s3-metadata`): the same as
    /// `metadata=` in its URL. An error for a POSIX store (its attributes are its own).
    pub fn with_s3_metadata(self, style: &str, side: &str) -> Result<StoreSpec, String> {
        let style = s3::MetaStyle::parse(style)
            .ok_or_else(|| format!("--s3-metadata {style:?}: one of s3fs, rclone or none"))?;
        match self {
            StoreSpec::Posix { .. } => Err(format!(
                "--s3-metadata is how an S3 {side} records owners, modes and times, but {side} \
                 is a directory ({self})"
            )),
            StoreSpec::S3 { mut url } => {
                if url.metadata != s3::MetaStyle::default() && url.metadata != style {
                    return Err(format!(
                        "--s3-metadata {} and metadata={} in the {side} URL disagree: give one \
                         of them",
                        style.as_str(),
                        url.metadata.as_str()
                    ));
                }
                url.metadata = style;
                Ok(StoreSpec::S3 { url })
            }
        }
    }

    /// The directory of a POSIX store.
    pub fn posix_path(&self) -> Option<&PathBuf> {
        match self {
            StoreSpec::Posix { path } => Some(path),
            StoreSpec::S3 { .. } => None,
        }
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Posix { path } => write!(f, "posix:{}", path.display()),
            StoreSpec::S3 { url } => write!(f, "{url}"),
        }
    }
}

/// The bytes of an entry open for reading: a POSIX file, or an S3 object read by ranges.
#[derive(Clone)]
pub enum Source {
    File(Arc<File>),
    Object(Arc<s3::ObjectReader>),
}

impl Source {
    /// Read into `buf` at `off`; short only at the end.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        match self {
            Source::File(f) => f.read_at(buf, off),
            Source::Object(o) => Ok(o.read_into(off, buf)?),
        }
    }

    /// The POSIX file, when it is one (what the kernel can pass through to, what an fd can
    /// carry across a takeover).
    pub fn file(&self) -> Option<&Arc<File>> {
        match self {
            Source::File(f) => Some(f),
            Source::Object(_) => None,
        }
    }
}

/// OLD as the view reads it: a POSIX directory or an S3 bucket.
pub enum OldStore {
    Posix(PosixStore),
    S3(Arc<s3::tree::S3Tree>),
}

impl OldStore {
    /// The root, and its stat.
    pub fn root(&self) -> io::Result<(Loc, rustix::fs::Stat)> {
        match self {
            OldStore::Posix(p) => {
                let fd = p.open_path(Path::new(""))?;
                let st = posix::stat_fd(fd.as_fd())?;
                Ok((Loc::Fd(Arc::new(fd)), st))
            }
            OldStore::S3(t) => {
                let e = t.root();
                let st = e.st;
                Ok((Loc::Obj(Arc::new(e)), st))
            }
        }
    }

    /// The entry at `rel` below the root (never following a symlink): ENOENT when absent.
    /// `dir`: whether the caller expects a directory there (a record's kind). In an S3 OLD a
    /// name may be both an object and a directory; the expected kind is asked first, in one
    /// request when it is there.
    pub fn locate_path(&self, rel: &[u8], dir: bool) -> io::Result<(Loc, rustix::fs::Stat)> {
        match self {
            OldStore::Posix(p) => {
                let fd = p.open_path(Path::new(std::ffi::OsStr::from_bytes(rel)))?;
                let st = posix::stat_fd(fd.as_fd())?;
                Ok((Loc::Fd(Arc::new(fd)), st))
            }
            OldStore::S3(t) => {
                let rel = std::str::from_utf8(rel)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ENOENT))?;
                match t.locate_as(rel, dir)? {
                    Some(e) => {
                        let st = e.st;
                        Ok((Loc::Obj(Arc::new(e)), st))
                    }
                    None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
                }
            }
        }
    }

    /// The entry at `rel`, held by its parent directory and name for a POSIX non-directory
    /// (what a copy's origin is checked through).
    pub fn locate_at(&self, rel: &[u8], dir: bool) -> io::Result<Option<Loc>> {
        match self {
            OldStore::Posix(p) => {
                let path = Path::new(std::ffi::OsStr::from_bytes(rel));
                let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                    return Ok(None);
                };
                let dfd = p.open_path(dir)?;
                Ok(Some(Loc::At(Arc::new(dfd), name.to_owned())))
            }
            OldStore::S3(_) => match self.locate_path(rel, dir) {
                Ok((loc, _)) => Ok(Some(loc)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    pub fn is_s3(&self) -> bool {
        matches!(self, OldStore::S3(_))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_s3_urls_and_refuses_relative_paths() {
        assert_eq!(
            StoreSpec::parse("/data/old").unwrap(),
            StoreSpec::Posix {
                path: "/data/old".into()
            }
        );
        assert_eq!(
            StoreSpec::parse("posix:/x").unwrap(),
            StoreSpec::Posix { path: "/x".into() }
        );
        assert!(
            StoreSpec::parse("data/old")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(matches!(
            StoreSpec::parse("s3://bkt/p?region=x").unwrap(),
            StoreSpec::S3 { .. }
        ));
        assert!(StoreSpec::parse("s3://b").unwrap_err().contains("bucket"));
    }
}
