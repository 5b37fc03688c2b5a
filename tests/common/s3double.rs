//! A test double in front of a real S3 server (Garage) that behaves as several S3 gateways do:
//! it refuses directory marker objects (a PUT of a key ending in `/`) with HTTP 500, and
//! passes every other request through unchanged (signatures stay valid: the Host header the
//! client signed is forwarded as it came).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The double's endpoint (`http://127.0.0.1:PORT`) and how many markers it refused.
pub struct MarkerRefuser {
    pub endpoint: String,
    pub refused: Arc<AtomicU64>,
}

/// Start the double in front of `upstream` (`http://127.0.0.1:PORT`); it serves until the
/// test process ends.
pub fn refuse_directory_markers(upstream: &str) -> MarkerRefuser {
    let up = upstream.trim_start_matches("http://").to_string();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let refused = Arc::new(AtomicU64::new(0));
    let count = refused.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (up, count) = (up.clone(), count.clone());
            std::thread::spawn(move || {
                let _ = serve(c, &up, &count);
            });
        }
    });
    MarkerRefuser { endpoint, refused }
}

/// One client connection: each request read whole (head and body), refused or forwarded on
/// one upstream connection; responses flow back by a thread of their own (a client sends its
/// next request only once it has the response to the last, so they stay in order).
fn serve(client: TcpStream, upstream: &str, refused: &AtomicU64) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
    });
    let mut to_server = server;
    let mut r = BufReader::new(client.try_clone()?);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                let _ = to_server.shutdown(Shutdown::Both);
                return Ok(());
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let mut lines = text.lines();
        let request = lines.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                body.extend_from_slice(size.as_bytes());
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk)?;
                body.extend_from_slice(&chunk);
                if n == 0 {
                    break;
                }
            }
        }
        let mut parts = request.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        // Path style: /bucket/key; a key ending in '/' is a directory marker.
        let key = path
            .trim_start_matches('/')
            .split_once('/')
            .map_or("", |(_, k)| k);
        if method == "PUT" && key.ends_with('/') {
            refused.fetch_add(1, Ordering::Relaxed);
            let msg = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>\
                       <Message>directory objects are not supported</Message></Error>";
            let resp = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            );
            client.try_clone()?.write_all(resp.as_bytes())?;
            let _ = client.shutdown(Shutdown::Both);
            let _ = to_server.shutdown(Shutdown::Both);
            return Ok(());
        }
        to_server.write_all(&head)?;
        to_server.write_all(&body)?;
    }
}
