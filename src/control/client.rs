//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::protocol::{ControlError, Request, Response};
use crate::state::layout;

/// Send one request to the daemon serving `state`. `Ok(None)`: no daemon listens there.
pub fn request(state: &Path, req: &Request) -> Result<Option<Response>, ControlError> {
    let path = layout::socket_path(state);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    let mut body = serde_json::to_vec(req).expect("request serializes");
    body.push(b'\n');
    (&conn).write_all(&body).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| ControlError::BadAnswer(e.to_string()))
}

/// Whether a daemon answers on `state`'s socket.
pub fn daemon_serves(state: &Path) -> Result<bool, ControlError> {
    Ok(request(state, &Request::Status)?.is_some())
}
