//! Stores: where OLD and NEW live.
//!
//! A store is named on the command line as `posix:/abs/path`, a bare absolute path, or (later)
//! `s3://bucket/prefix`. Everything that assumes a POSIX file system lives in [`posix`]; the view
//! reaches a store only through the handles that module hands out.

pub mod posix;
pub mod s3;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A store as recorded in the journal at `prepare` time. Holds no credentials, ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreSpec {
    Posix { path: PathBuf },
}

impl StoreSpec {
    /// Parse a store argument. Relative paths are refused: a migration outlives the shell that
    /// prepared it, so a path that depends on the current directory would be a trap.
    pub fn parse(arg: &str) -> Result<StoreSpec, String> {
        if arg.starts_with("s3://") {
            return Err(format!(
                "{arg}: S3 stores are not supported by this build yet; use a POSIX directory"
            ));
        }
        let raw = arg.strip_prefix("posix:").unwrap_or(arg);
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(format!(
                "{arg}: a store must be an absolute path (or posix:/abs/path)"
            ));
        }
        Ok(StoreSpec::Posix { path })
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Posix { path } => write!(f, "posix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_refuses_relative_and_s3() {
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
        assert!(StoreSpec::parse("s3://b").unwrap_err().contains("S3"));
    }
}
