//! A second real S3 implementation for the tests: moto's S3 server mode (PyPI moto[server],
//! which scripts/setup.sh installs in a venv), started on a free loopback port, stopped when
//! dropped or when the test process ends. Any access key works; buckets are made by rclone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Moto {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// The moto_server scripts/setup.sh installs.
pub fn moto_bin() -> PathBuf {
    let bin = std::env::var_os("FERRYFS_MOTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/ferryfs/tools/moto-venv/bin/moto_server"));
    assert!(
        bin.exists(),
        "moto_server not found at {}: the S3 NEW tests also run against moto's S3 server \
         (scripts/setup.sh installs moto[server] from PyPI)",
        bin.display()
    );
    bin
}

impl Moto {
    pub fn start() -> Moto {
        let mut last = String::new();
        for _ in 0..5 {
            match Moto::try_start() {
                Ok(m) => return m,
                Err(e) => last = e,
            }
        }
        panic!("moto_server did not start: {last}");
    }

    fn try_start() -> Result<Moto, String> {
        let bin = moto_bin();
        let dir = tempfile::Builder::new()
            .prefix("ferryfs-moto-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        // As for Garage: a shell ends the server as soon as this process is gone.
        let watch = r#"
            "$2" -H 127.0.0.1 -p "$3" & g=$!
            trap 'kill $g 2>/dev/null; wait $g; exit 0' TERM
            while kill -0 "$1" 2>/dev/null && kill -0 $g 2>/dev/null; do sleep 0.2; done
            kill $g 2>/dev/null
            wait $g
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(watch)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(&bin)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let server_log =
            || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("the server exited ({st}): {}", server_log()));
            }
            if super::http("GET", port, "/").is_some() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err(format!("no answer within 30 s: {}", server_log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Moto {
            child,
            _dir: dir,
            endpoint: format!("http://127.0.0.1:{port}"),
            key_id: "moto-key".into(),
            secret: "moto-secret".into(),
        })
    }

    /// rclone with this server as the remote `m` (and whatever else the caller adds).
    pub fn rclone(&self) -> Command {
        let mut c = Command::new("rclone");
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG_M_TYPE", "s3")
            .env("RCLONE_CONFIG_M_PROVIDER", "Other")
            .env("RCLONE_CONFIG_M_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_M_ACCESS_KEY_ID", &self.key_id)
            .env("RCLONE_CONFIG_M_SECRET_ACCESS_KEY", &self.secret)
            .env("RCLONE_CONFIG_M_REGION", "us-east-1")
            .env("RCLONE_CONFIG_M_FORCE_PATH_STYLE", "true");
        c
    }

    /// A new, empty bucket.
    pub fn bucket(&self, name: &str) {
        let out = super::run(self.rclone().args(["mkdir", &format!("m:{name}")]));
        assert!(
            out.status.success(),
            "rclone mkdir m:{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An AWS profile block reaching this server (for `--new-s3-profile NAME`).
    pub fn profile(&self, name: &str) -> (String, String) {
        (
            format!(
                "[{name}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
            format!(
                "[profile {name}]\nregion = us-east-1\nendpoint_url = {}\n",
                self.endpoint
            ),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
