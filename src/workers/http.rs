//! The little HTTP/1.1 the coordinator and its workers speak: one JSON request per
//! connection (`Connection: close`), a bearer token on every request, bounded sizes. Written
//! out rather than pulling in an HTTP stack: four POST endpoints, no streaming bodies, and
//! every limit (header bytes, body bytes, time) is ours to state.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

/// The most bytes a request's or a response's body may have.
pub const MAX_BODY: usize = 1 << 20;
/// The most bytes of request line and headers.
const MAX_HEAD: u64 = 16 << 10;
/// How long one side waits for the other to send or take bytes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A request as the server read it.
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization: Bearer` token, if any.
    pub token: Option<String>,
    pub body: Vec<u8>,
}

/// Why a request could not be read: the status to answer with, and why.
#[derive(Debug)]
pub struct Refused(pub u16, pub String);

/// Read one request from `conn` (a connection's byte stream).
pub fn read_request(conn: impl Read) -> Result<Request, Refused> {
    let mut r = BufReader::new(conn);
    let mut head = (&mut r).take(MAX_HEAD);
    let mut line = String::new();
    let bad = |what: &str| Refused(400, format!("malformed request: {what}"));
    head.read_line(&mut line)
        .map_err(|e| bad(&format!("request line: {e}")))?;
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") => (m.to_string(), p.to_string()),
        _ => return Err(bad("request line")),
    };
    let (mut length, mut token) = (None, None);
    loop {
        let mut h = String::new();
        let n = head
            .read_line(&mut h)
            .map_err(|e| bad(&format!("headers: {e}")))?;
        if n == 0 {
            return Err(Refused(
                431,
                "request headers too large or cut short".into(),
            ));
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(bad("header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| bad("Content-Length"))?;
            if n > MAX_BODY {
                return Err(Refused(
                    413,
                    format!("request body of {n} bytes: more than {MAX_BODY}"),
                ));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("authorization") {
            token = value.strip_prefix("Bearer ").map(|t| t.trim().to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refused(411, "a Content-Length is required".into()));
        }
    }
    let mut body = vec![0u8; length.unwrap_or(0)];
    r.read_exact(&mut body)
        .map_err(|e| bad(&format!("body shorter than its Content-Length: {e}")))?;
    Ok(Request {
        method,
        path,
        token,
        body,
    })
}

/// The reason phrase of the statuses the coordinator answers with.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Write a JSON response and close.
pub fn write_response(mut conn: impl Write, status: u16, body: &[u8]) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    conn.write_all(body)?;
    conn.flush()
}

/// Send a POST of `body` to `path` with the bearer `token` over `conn`; the status and body
/// of the answer.
pub fn post(
    mut conn: impl Read + Write,
    host: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    conn.flush()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    (&mut r).take(MAX_HEAD).read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))?;
    let mut length = None;
    loop {
        let mut h = String::new();
        if (&mut r).take(MAX_HEAD).read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut out = Vec::new();
    match length {
        Some(n) if n <= MAX_BODY => {
            out.resize(n, 0);
            r.read_exact(&mut out)?;
        }
        Some(n) => {
            return Err(std::io::Error::other(format!(
                "an answer of {n} bytes: more than {MAX_BODY}"
            )));
        }
        None => {
            r.take(MAX_BODY as u64).read_to_end(&mut out)?;
        }
    }
    Ok((status, out))
}

/// Whether two tokens are equal, in time that depends only on their lengths.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_within_their_limits() {
        let ok =
            b"POST /v1/lease HTTP/1.1\r\nAuthorization: Bearer abc\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_request(&ok[..]).unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/lease"));
        assert_eq!(r.token.as_deref(), Some("abc"));
        assert_eq!(r.body, b"{}");
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(read_request(big.as_bytes()).err().unwrap().0, 413);
        assert_eq!(read_request(&b"garbage\r\n\r\n"[..]).err().unwrap().0, 400);
        let short = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(read_request(&short[..]).err().unwrap().0, 400);
        let mut long = b"POST / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 20 << 10));
        assert!(read_request(&long[..]).is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abcd", b"abcd"));
        assert!(!same_token(b"abcd", b"abce"));
        assert!(!same_token(b"abc", b"abcd"));
    }
}
