//! A real S3 server for the tests: a single-node Garage (tests/s3/garage.toml, from
//! ../shared/s3) started on free loopback ports in a scratch directory, with one access key
//! allowed to create buckets. Stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Garage {
    child: Child,
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// The Garage binary scripts/setup.sh installs (or one on PATH).
/// One server for every test of this test binary, its settings (AWS's standard variables) in
/// the process environment, which stores built here and ferryfs commands started here use.
/// The environment is the process's: set once, before any store or command, never changed.
pub fn shared() -> &'static Garage {
    static G: std::sync::OnceLock<Garage> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        let g = Garage::start();
        for (k, v) in g.env() {
            // SAFETY: under the OnceLock, before any other thread of the test reads it.
            unsafe { std::env::set_var(k, v) };
        }
        g
    })
}

pub fn garage_bin() -> PathBuf {
    let tools = std::env::var_os("FERRYFS_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/ferryfs/tools/bin"));
    let bin = tools.join("garage");
    if bin.exists() {
        return bin;
    }
    if let Ok(out) = Command::new("which").arg("garage").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    panic!(
        "garage not found at {} nor on PATH: these tests talk S3 to a real Garage server \
         (scripts/setup.sh installs Garage 2.5.0)",
        bin.display()
    );
}

impl Garage {
    pub fn start() -> Garage {
        // Free ports are picked, then bound by the server: another test process may take one
        // in between. A server that dies at start is tried again on other ports.
        let mut last = String::new();
        for _ in 0..5 {
            match Garage::try_start() {
                Ok(g) => return g,
                Err(e) => last = e,
            }
        }
        panic!("garage did not start: {last}");
    }

    fn try_start() -> Result<Garage, String> {
        let bin = garage_bin();
        let dir = tempfile::Builder::new()
            .prefix("ferryfs-garage-")
            .tempdir_in("/tmp")
            .unwrap();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let template = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/s3/garage.toml"),
        )
        .unwrap();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            template
                .replace("@DIR@", dir.path().to_str().unwrap())
                .replace("@S3@", &s3.to_string())
                .replace("@RPC@", &rpc.to_string())
                .replace("@ADMIN@", &admin.to_string()),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        // The server must not outlive the test process, which may never drop a Garage (one
        // kept in a static): a shell starts it and ends it as soon as this process is gone
        // (removing its directory, which no Drop will), or on SIGTERM (Drop).
        let watch = r#"
            "$2" -c "$3" server & g=$!
            trap 'kill $g 2>/dev/null; wait $g; exit 0' TERM
            while kill -0 "$1" 2>/dev/null && kill -0 $g 2>/dev/null; do sleep 0.2; done
            kill $g 2>/dev/null
            wait $g
            kill -0 "$1" 2>/dev/null || rm -rf -- "$4"
        "#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(watch)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(&bin)
            .arg(&config)
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut g = Garage {
            child,
            bin,
            config,
            dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
        };
        let server_log = |g: &Garage| {
            std::fs::read_to_string(g.dir.path().join("server.log")).unwrap_or_default()
        };
        // Ready when the node answers over RPC (`status`), and its S3 port takes connections.
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = g.child.try_wait() {
                return Err(format!("the server exited ({st}): {}", server_log(&g)));
            }
            if g.cli(&["status"]).status.success()
                && std::net::TcpStream::connect(("127.0.0.1", s3)).is_ok()
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("no answer within 20 s: {}", server_log(&g)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = g.ok(&["node", "id", "-q"]);
        let node = out.trim().split('@').next().unwrap().to_string();
        g.ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.ok(&["layout", "apply", "--version", "1"]);
        let key = g.ok(&["key", "create", "test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in garage's key output: {key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.ok(&["key", "allow", "--create-bucket", "test-key"]);
        // The ports were free when picked, but another test process may have bound one since.
        // Garage then keeps running without that server (it logs the error), and the port
        // answers for someone else: another Garage's RPC port resets every S3 request. By now
        // the servers have long tried their binds; each must have taken its port, and the S3
        // port must answer HTTP.
        let log = server_log(&g);
        if log.contains("exited with error") || log.contains("Address already in use") {
            return Err(format!("a port was taken by another process: {log}"));
        }
        if super::http("GET", s3, "/").is_none() {
            return Err(format!(
                "the S3 port {s3} does not answer HTTP: {}",
                server_log(&g)
            ));
        }
        Ok(g)
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new bucket the test key owns.
    pub fn bucket(&self, name: &str) {
        self.ok(&["bucket", "create", name]);
        self.ok(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", "test-key",
        ]);
    }

    /// An AWS profile reaching this server: (its block in the credentials file, its block in
    /// the config file), for `--old-s3-profile NAME` / `--new-s3-profile NAME`.
    pub fn profile(&self, name: &str) -> (String, String) {
        (
            format!(
                "[{name}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
            format!(
                "[profile {name}]\nregion = garage\nendpoint_url = {}\n",
                self.endpoint
            ),
        )
    }

    /// AWS's standard variables for this server: with only these set, `s3://bucket` works.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "garage".into()),
        ]
    }

    /// rclone's settings for this server, as environment variables of a remote named `g`
    /// (Debian's rclone refuses to start with AWS_CA_BUNDLE set: unset it).
    pub fn rclone(&self) -> Command {
        let mut c = Command::new("rclone");
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG_G_TYPE", "s3")
            .env("RCLONE_CONFIG_G_PROVIDER", "Other")
            .env("RCLONE_CONFIG_G_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_G_ACCESS_KEY_ID", &self.key_id)
            .env("RCLONE_CONFIG_G_SECRET_ACCESS_KEY", &self.secret)
            .env("RCLONE_CONFIG_G_REGION", "garage")
            .env("RCLONE_CONFIG_G_FORCE_PATH_STYLE", "true");
        c
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // SIGTERM: the watching shell stops the server, then exits.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
    }
}
