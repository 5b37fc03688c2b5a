//! packaging/: the systemd unit (checked by systemd-analyze, and its exec lines run as systemd
//! would run them, readiness protocol included), the Kubernetes manifests (rendered by
//! kustomize, checked, and the sidecar's own command run against real directories) and the
//! container image's Dockerfile. No cluster and no systemd PID 1 here: what cannot run is
//! checked for structure, what can run is run.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn need(cmd: &str, why: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{cmd}` is missing: {why} (scripts/setup.sh installs it)"
    );
}

/// `Key=value` lines of one section of a unit file (repeated keys kept in order).
fn unit_section(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if inside && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').expect("Key=value");
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn unit_value(unit: &str, section: &str, key: &str) -> String {
    unit_section(unit, section)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("[{section}] has no {key}="))
        .1
}

/// An EnvironmentFile: KEY=value lines, comments and blanks skipped.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// systemd's expansion of an Exec line: `${VAR}` is replaced within its word, a word that is
/// exactly `$VAR` becomes the value split on white space (none when empty).
fn systemd_expand(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            let v = env.get(name).map(String::as_str).unwrap_or("");
            out.extend(v.split_whitespace().map(String::from));
            continue;
        }
        let mut w = word.to_string();
        while let Some(i) = w.find("${") {
            let j = w[i..].find('}').expect("closing brace") + i;
            let v = env.get(&w[i + 2..j]).cloned().unwrap_or_default();
            w.replace_range(i..=j, &v);
        }
        out.push(w);
    }
    out
}

/// SIGTERM `child` (what systemd's stop and the kubelet send), run `meanwhile`, and wait up to
/// 30 s for it to exit.
fn terminate(
    child: &mut std::process::Child,
    meanwhile: impl FnOnce(),
) -> std::process::ExitStatus {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    meanwhile();
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    need(
        "systemd-analyze",
        "the unit is checked by systemd's own verifier",
    );
    let unit = fs::read_to_string(repo().join("packaging/systemd/ferryfs@.service")).unwrap();
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "all"),
        ("EnvironmentFile", "/etc/ferryfs/%i.conf"),
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
    ] {
        assert_eq!(unit_value(&unit, "Service", key), want, "{key}");
    }
    assert!(unit_value(&unit, "Service", "ExecStart").contains("mount --foreground"));
    assert!(unit_value(&unit, "Service", "ExecReload").contains("mount --takeover"));
    assert!(!unit_section(&unit, "Install").is_empty());
    // systemd-analyze wants an instance and an executable that exists: the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferryfs@demo.service");
    fs::write(&path, unit.replace("/usr/local/bin/ferryfs", BIN)).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {said}"
    );
    // It reports bad settings as warnings with exit 0: there must be none about our unit.
    assert!(
        !said.contains("ferryfs@demo.service"),
        "systemd-analyze complains about the unit: {said}"
    );
}

#[test]
fn the_units_exec_lines_prepare_mount_notify_and_stop_cleanly() {
    require_fuse();
    let unit = fs::read_to_string(repo().join("packaging/systemd/ferryfs@.service")).unwrap();
    let example =
        fs::read_to_string(repo().join("packaging/systemd/ferryfs.conf.example")).unwrap();
    let t = tempfile::Builder::new()
        .prefix("ferryfs-unit-")
        .tempdir_in("/tmp")
        .unwrap();
    let (old, new, state) = (
        t.path().join("old"),
        t.path().join("new"),
        t.path().join("state"),
    );
    // Dropped before `t`: on a failure, a view left mounted over OLD (its daemon gone or
    // wedged) is ended and detached, so removing the temp dir does not hang on it.
    let _mounted = EndViewOnPanic(old.clone());
    fs::create_dir(&old).unwrap();
    fs::create_dir(&new).unwrap();
    write(&old.join("report.txt"), b"quarterly numbers\n");
    // The example settings, with this test's directories and a free port; mounted in place.
    let port = free_port();
    let mut env = env_file(&example);
    let args = env["FERRYFS_MOUNT_ARGS"].replace("127.0.0.1:9477", &format!("127.0.0.1:{port}"));
    assert_ne!(
        args, env["FERRYFS_MOUNT_ARGS"],
        "the example has no --metrics-addr to adapt"
    );
    env.insert("FERRYFS_MOUNT_ARGS".into(), args);
    for (k, v) in [
        ("FERRYFS_OLD", &old),
        ("FERRYFS_NEW", &new),
        ("FERRYFS_STATE", &state),
        ("FERRYFS_MOUNTPOINT", &old),
    ] {
        assert!(env.contains_key(k), "the example settings lack {k}");
        env.insert(k.into(), v.to_str().unwrap().into());
    }
    let exec = |key: &str| -> Command {
        let words = systemd_expand(&unit_value(&unit, "Service", key), &env);
        assert_eq!(words[0], "/usr/local/bin/ferryfs", "{key}");
        assert!(
            !words.iter().any(|w| w.contains('$')),
            "unexpanded: {words:?}"
        );
        let mut c = Command::new(BIN);
        c.args(&words[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in &env {
            c.env(k, v);
        }
        c
    };
    // ExecStartPre prepares on the first start, and is a no-op on every later one.
    ok(run(&mut exec("ExecStartPre")));
    assert!(ok(run(&mut exec("ExecStartPre"))).contains("already prepared"));

    let sock_path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = exec("ExecStart")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "3000000")
        .stdout(Stdio::null())
        .stderr(fs::File::create(t.path().join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let mut said: Vec<String> = Vec::new();
    let recv_until = |what: &str, secs: u64, said: &mut Vec<String>| {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == what);
                said.push(msg);
                if hit {
                    return;
                }
            }
        }
        panic!("no {what} from the daemon within {secs} s; it said {said:?}");
    };
    recv_until("READY=1", 30, &mut said);
    // READY means serving: the view is in place over OLD's path.
    assert_eq!(
        fs::read(old.join("report.txt")).unwrap(),
        b"quarterly numbers\n"
    );
    assert!(
        said.last().unwrap().contains("STATUS=serving"),
        "READY came without a status: {said:?}"
    );
    recv_until("WATCHDOG=1", 10, &mut said);
    let (code, _) = http_get(port, "/readyz").expect("the example's metrics address serves");
    assert_eq!(code, 200);
    write(&old.join("written-under-systemd"), b"new\n");
    // `systemctl reload`: ExecReload's new daemon takes the view over (in place over OLD's
    // path) with a file held open, tells systemd it is the main process before the old one
    // exits, and keeps up the watchdog; the old daemon exits 0 without unmounting.
    let mut held = fs::OpenOptions::new()
        .append(true)
        .open(old.join("written-under-systemd"))
        .unwrap();
    said.clear();
    ok(run(exec("ExecReload").env("NOTIFY_SOCKET", &sock_path)));
    let old_exit = child.wait().unwrap();
    assert!(old_exit.success(), "the old daemon exited {old_exit}");
    recv_until("READY=1", 10, &mut said);
    let mainpid: i32 = said
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap_or_else(|| panic!("no MAINPID= from the new daemon: {said:?}"))
        .parse()
        .unwrap();
    assert_ne!(mainpid as u32, child.id());
    said.clear();
    recv_until("WATCHDOG=1", 10, &mut said);
    held.write_all(b"after reload\n").unwrap();
    drop(held);
    assert_eq!(
        fs::read(old.join("written-under-systemd")).unwrap(),
        b"new\nafter reload\n"
    );
    // `systemctl stop`: SIGTERM to the main process (KillMode=mixed), the new one now.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(mainpid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    recv_until("STOPPING=1", 10, &mut said);
    wait_for("the new daemon to exit on SIGTERM", 10, || {
        process_gone(mainpid)
    });
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(old.to_str().unwrap()),
        "the view is still mounted after the service stopped"
    );
    // The write made through the view landed in NEW; OLD was not touched.
    assert_eq!(
        fs::read(new.join("written-under-systemd")).unwrap(),
        b"new\nafter reload\n"
    );
    assert!(!old.join("written-under-systemd").exists());
}

fn kustomize(dir: &Path) -> Vec<Yaml> {
    need(
        "kubectl",
        "the manifests are rendered with `kubectl kustomize`",
    );
    let out = run(Command::new("kubectl").arg("kustomize").arg(dir));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed (its `patches:` field needs kubectl 1.21 or later): {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    YamlLoader::load_from_str(&text).expect("kustomize prints YAML")
}

fn load_yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

fn by_name<'a>(list: &'a Yaml, name: &str) -> &'a Yaml {
    list.as_vec()
        .unwrap_or_else(|| panic!("not a list: {list:?}"))
        .iter()
        .find(|x| x["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no item named {name}"))
}

/// A YAML value with every mapping's keys sorted: two manifests that differ only in key
/// order (kustomize sorts them) compare equal.
fn canon(y: &Yaml) -> String {
    match y {
        Yaml::Hash(h) => {
            let mut kv: Vec<(String, String)> =
                h.iter().map(|(k, v)| (canon(k), canon(v))).collect();
            kv.sort();
            let inner: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{{}}}", inner.join(", "))
        }
        Yaml::Array(a) => format!("[{}]", a.iter().map(canon).collect::<Vec<_>>().join(", ")),
        other => format!("{other:?}"),
    }
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_kubernetes_example_adds_a_sidecar_and_leaves_the_app_unchanged() {
    let dir = repo().join("packaging/container/kubernetes/pvc-migration");
    let docs = kustomize(&dir);
    let before = load_yaml(&dir.join("app.yaml"));
    let app_before = find(&before, "Deployment", "shop");
    let app = find(&docs, "Deployment", "shop");
    let spec = &app["spec"]["template"]["spec"];
    // The application's containers and volumes are exactly as they were.
    assert_eq!(
        canon(&spec["containers"]),
        canon(&app_before["spec"]["template"]["spec"]["containers"]),
        "the app container changed"
    );
    let vol_before = by_name(&app_before["spec"]["template"]["spec"]["volumes"], "data");
    assert_eq!(canon(by_name(&spec["volumes"], "data")), canon(vol_before));
    // New storage and the state dir, and the S3 Secret, are part of the example.
    assert_eq!(
        find(&docs, "PersistentVolumeClaim", "shop-data-new")["metadata"]["name"].as_str(),
        Some("shop-data-new")
    );
    find(&docs, "PersistentVolumeClaim", "shop-ferryfs-state");
    let secret = find(&docs, "Secret", "ferryfs-s3");
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(!secret["stringData"][k].is_badvalue(), "Secret lacks {k}");
    }

    let init = &spec["initContainers"];
    let names: Vec<&str> = init
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ferryfs-prepare", "ferryfs"],
        "prepare must run before the sidecar"
    );
    let side = by_name(init, "ferryfs");
    assert_eq!(
        side["restartPolicy"].as_str(),
        Some("Always"),
        "not a native sidecar"
    );
    let sc = &side["securityContext"];
    let caps = sc["capabilities"]["add"]
        .as_vec()
        .cloned()
        .unwrap_or_default();
    assert!(
        sc["privileged"].as_bool() == Some(true)
            || caps.iter().any(|c| c.as_str() == Some("SYS_ADMIN")),
        "the mount container needs privileged or SYS_ADMIN"
    );
    let fuse_vol = by_name(&spec["volumes"], "dev-fuse");
    assert_eq!(fuse_vol["hostPath"]["path"].as_str(), Some("/dev/fuse"));
    assert_eq!(
        by_name(&side["volumeMounts"], "dev-fuse")["mountPath"].as_str(),
        Some("/dev/fuse")
    );
    // The view is mounted in place over the app's own volume, propagated to the host.
    let data = by_name(&side["volumeMounts"], "data");
    assert_eq!(data["mountPropagation"].as_str(), Some("Bidirectional"));
    let args = strings(&side["args"]);
    assert_eq!(args.last().map(String::as_str), data["mountPath"].as_str());
    let addr = &args[args.iter().position(|a| a == "--metrics-addr").unwrap() + 1];
    let port: i64 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let named = by_name(&side["ports"], "metrics");
    assert_eq!(named["containerPort"].as_i64(), Some(port));
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let p = &side[probe]["httpGet"];
        assert_eq!(p["path"].as_str(), Some(path), "{probe}");
        assert_eq!(p["port"].as_str(), Some("metrics"), "{probe}");
    }
    let from_secret = side["envFrom"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|e| e["secretRef"]["name"].as_str() == Some("ferryfs-s3"));
    assert!(from_secret, "the sidecar does not take the S3 Secret");
    let new_vol = by_name(&spec["volumes"], "ferryfs-new");
    assert_eq!(
        new_vol["persistentVolumeClaim"]["claimName"].as_str(),
        Some("shop-data-new")
    );

    // Run the two containers' commands for real, with their volumes as local directories.
    require_fuse();
    let t = tempfile::Builder::new()
        .prefix("ferryfs-k8s-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for c in [by_name(init, "ferryfs-prepare"), side] {
        for m in c["volumeMounts"].as_vec().unwrap() {
            let (name, at) = (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            );
            if name == "dev-fuse" {
                continue;
            }
            let local = t.path().join(name);
            fs::create_dir_all(&local).unwrap();
            mounts.push((at.to_string(), local));
        }
    }
    let old = t.path().join("data");
    write(&old.join("orders.db"), b"order 1\n");
    let local_port = free_port();
    let remap = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .map(|a| {
                if a == *addr {
                    return format!("127.0.0.1:{local_port}");
                }
                let mut a = a;
                for (at, local) in &mounts {
                    if let Some(rest) = a.strip_prefix(at.as_str()) {
                        a = format!("{}{rest}", local.display());
                        break;
                    }
                }
                a
            })
            .collect()
    };
    let prepare = remap(strings(&by_name(init, "ferryfs-prepare")["args"]));
    ok(run(Command::new(BIN).args(&prepare)));
    // A pod restart runs the init container again: it must pass.
    ok(run(Command::new(BIN).args(&prepare)));
    let mut child = Command::new(BIN)
        .args(remap(args.clone()))
        .stdout(Stdio::null())
        .stderr(fs::File::create(t.path().join("sidecar.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        // What the kubelet's startup probe asks.
        if let Some((200, _)) = http_get(local_port, "/readyz") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30) && child.try_wait().unwrap().is_none(),
            "the sidecar never became ready: {}",
            fs::read_to_string(t.path().join("sidecar.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(local_port, "/healthz").unwrap().0, 200);
    // The app's path is now the view: OLD's data there, writes going to NEW.
    assert_eq!(fs::read(old.join("orders.db")).unwrap(), b"order 1\n");
    write(&old.join("order-2"), b"order 2\n");
    assert!(t.path().join("ferryfs-new/order-2").exists());
    let status = terminate(&mut child, || {});
    assert!(status.success(), "sidecar exited {status} on SIGTERM");
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_from_a_small_fuse3_one() {
    let text = fs::read_to_string(repo().join("packaging/container/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "expected a build and a runtime stage: {froms:?}"
    );
    let build_stage = froms[0]
        .split_whitespace()
        .last()
        .expect("the build stage is named");
    assert!(
        froms[0].contains(" AS "),
        "unnamed build stage: {}",
        froms[0]
    );
    assert!(
        froms[1].contains("-slim"),
        "the runtime is not a slim image: {}",
        froms[1]
    );
    let runtime_at = text.find(froms[1]).unwrap();
    let (build, runtime) = text.split_at(runtime_at);
    assert!(
        build.contains("libclang-dev"),
        "RocksDB's bindgen needs libclang"
    );
    assert!(build.contains("cargo build --release --locked"));
    assert!(runtime.contains("fuse3"), "the runtime lacks fuse3");
    assert!(!runtime.contains("cargo"), "the runtime stage builds");
    assert!(
        runtime.contains(&format!(
            "COPY --from={build_stage} /src/target/release/ferryfs"
        )),
        "the runtime does not take the built binary"
    );
    let entry = lines
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert!(entry.contains("/usr/local/bin/ferryfs"), "{entry}");
    // Every file the build copies exists in the repository (the build context is its root).
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(repo().join(src).exists(), "COPY of a missing path: {src}");
        }
    }
    let ignore = fs::read_to_string(repo().join("packaging/container/Dockerfile.dockerignore"))
        .expect("a .dockerignore beside the Dockerfile keeps target/ out of the context");
    assert!(ignore.lines().any(|l| l.trim() == "*"));
}

struct EndViewOnPanic(PathBuf);

impl Drop for EndViewOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            detach_view(&self.0, true);
        }
    }
}
