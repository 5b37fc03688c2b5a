//! The control socket's wire protocol: one JSON request per line, one JSON response per line.
//! Shared by the daemon (which answers) and the CLI (which asks), so both agree on every
//! field; each request says which typed reply its `data` holds.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The copier's live state (status itself reads the journal). Reply: `CopierState`.
    Status,
    Execute,
    /// The next pass copies again what NEW lost (`execute --recopy-lost`).
    RecopyLost,
    /// Keep the view's entries at these view paths as they are (`ferryfs resolve`).
    Resolve {
        paths: Vec<String>,
    },
    Pause,
    Resume,
    /// Change limits while running; absent fields stay as they are. Reply: `CopierState`.
    Limits {
        bwlimit: Option<u64>,
        /// A bandwidth timetable (rclone's syntax) instead of a fixed `bwlimit`.
        #[serde(default)]
        bwlimit_timetable: Option<String>,
        ops_limit: Option<u64>,
        workers: Option<usize>,
    },
    /// Reply: `CheckReport`.
    Verify {
        checksum: bool,
    },
    /// `yes`: go ahead although entries the filter excluded will leave the view.
    Commit {
        #[serde(default)]
        yes: bool,
    },
    /// Reply: [`Aborted`].
    Abort {
        keep_new: bool,
    },
    /// A new daemon asks for the mount (`mount --takeover`); answered in the takeover's own
    /// framing, with fds (see `daemon::takeover`). Named `handover` on the wire, as every
    /// ferryfs that can take over sends it.
    #[serde(rename = "handover")]
    Takeover,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What an abort in the daemon answers: the view it detaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Aborted {
    pub mountpoint: PathBuf,
}

/// A control exchange that failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad answer from the daemon: {0}")]
    BadAnswer(String),
    /// The daemon answered, and said no.
    #[error("{0}")]
    Refused(String),
}

impl Response {
    pub fn ok(message: impl Into<String>, data: impl Serialize) -> Response {
        Response {
            ok: true,
            message: message.into(),
            data: serde_json::to_value(data).unwrap_or_default(),
        }
    }

    pub fn err(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }

    /// The message of a successful answer; a refusal as an error.
    pub fn accepted(self) -> Result<String, ControlError> {
        if self.ok {
            Ok(self.message)
        } else {
            Err(ControlError::Refused(self.message))
        }
    }

    /// The typed reply of a successful answer (see [`Request`] for which); a refusal as an
    /// error.
    pub fn reply<T: DeserializeOwned>(self) -> Result<T, ControlError> {
        if !self.ok {
            return Err(ControlError::Refused(self.message));
        }
        serde_json::from_value(self.data).map_err(|e| ControlError::BadAnswer(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_names_and_replies_their_types() {
        let r = serde_json::to_string(&Request::Verify { checksum: true }).unwrap();
        assert_eq!(r, r#"{"cmd":"verify","checksum":true}"#);
        // Daemons of every version ask for a takeover in these words.
        let t = serde_json::to_string(&Request::Takeover).unwrap();
        assert_eq!(t, r#"{"cmd":"handover"}"#);
        let a = Response::ok(
            "x",
            Aborted {
                mountpoint: "/mnt/v".into(),
            },
        );
        let line = serde_json::to_string(&a).unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back.reply::<Aborted>().unwrap().mountpoint,
            PathBuf::from("/mnt/v")
        );
        let refused = Response::err("no");
        assert!(matches!(refused.reply::<Aborted>(), Err(ControlError::Refused(m)) if m == "no"));
    }
}
