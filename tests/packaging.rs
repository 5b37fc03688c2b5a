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

/// A container's argument list as run here: each argument equal to a `subs` key replaced by
/// its value, each path below a volume's mount path moved below the local directory standing
/// for that volume.
fn remap_args(
    args: Vec<String>,
    subs: &[(String, String)],
    mounts: &[(String, PathBuf)],
) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            if let Some((_, to)) = subs.iter().find(|(from, _)| *from == a) {
                return to.clone();
            }
            for (at, local) in mounts {
                if let Some(rest) = a.strip_prefix(at.as_str()) {
                    return format!("{}{rest}", local.display());
                }
            }
            a
        })
        .collect()
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
    wait_child(child, 30).expect("still running 30 s after SIGTERM")
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
    systemd_verify(&unit, "ferryfs@demo.service");
}

/// `systemd-analyze verify` of the unit text `unit` as the instance `name`, with the built
/// binary where the unit names /usr/local/bin/ferryfs (it wants an executable that exists).
fn systemd_verify(unit: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
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
        !said.contains(name),
        "systemd-analyze complains about {name}: {said}"
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
    let dir = repo().join("packaging/kubernetes/pvc-migration");
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
    let subs = [(addr.clone(), format!("127.0.0.1:{local_port}"))];
    let remap = |args: Vec<String>| remap_args(args, &subs, &mounts);
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

/// The copier across machines, as packaged (issue 26): the Indexed Job of workers, the
/// coordinator's Service and token Secret, the sidecar turned coordinator, and the systemd
/// unit of a worker on a plain host. Their structure is checked, then the containers' and the
/// unit's own command lines are run here: the sidecar coordinates, one worker runs as the
/// Job's pod 0 runs it and one as the unit runs it, and the migration gets executed by them.
#[test]
fn the_copier_job_and_the_worker_unit_run_workers_against_the_sidecar_coordinator() {
    copier_job_runs("copier-workers", false);
}

/// The same over TLS (`copier-workers-tls`): the sidecar serves its workers with the
/// certificate of the Secret cert-manager makes, the workers connect with https and trust its
/// CA; run here with a certificate made by openssl in place of the Secret's.
#[test]
fn the_copier_job_over_tls_runs_workers_against_the_sidecar_coordinator() {
    copier_job_runs("copier-workers-tls", true);
}

fn copier_job_runs(example: &str, tls: bool) {
    let dir = repo().join("packaging/kubernetes").join(example);
    let docs = kustomize(&dir);
    let scheme = if tls { "https" } else { "http" };
    let job = find(&docs, "Job", "shop-copier");
    let js = &job["spec"];
    assert_eq!(js["completionMode"].as_str(), Some("Indexed"));
    assert!(js["parallelism"].as_i64().unwrap() >= 2);
    assert_eq!(js["parallelism"], js["completions"]);
    assert!(js["backoffLimitPerIndex"].as_i64().unwrap() >= 1);
    let rules = js["podFailurePolicy"]["rules"].as_vec().unwrap();
    let fail_job = rules
        .iter()
        .find(|r| r["action"].as_str() == Some("FailJob"))
        .expect("a rule failing the Job");
    assert_eq!(
        fail_job["onExitCodes"]["containerName"].as_str(),
        Some("worker")
    );
    assert_eq!(
        fail_job["onExitCodes"]["values"][0].as_i64(),
        Some(3),
        "the refused-token exit status"
    );
    assert!(rules.iter().any(|r| r["action"].as_str() == Some("Ignore")
        && r["onPodConditions"][0]["type"].as_str() == Some("DisruptionTarget")));
    let pod = &js["template"]["spec"];
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert_eq!(
        anti["labelSelector"]["matchLabels"]["app"], js["template"]["metadata"]["labels"]["app"],
        "the anti-affinity is not on the workers' own label"
    );
    let worker = by_name(&pod["containers"], "worker");
    let wargs = strings(&worker["args"]);
    assert_eq!(wargs[0], "worker");
    let coord = &wargs[wargs.iter().position(|a| a == "--coordinator").unwrap() + 1];
    let token_at = &wargs[wargs.iter().position(|a| a == "--token-file").unwrap() + 1];
    let svc = find(&docs, "Service", "ferryfs-coordinator");
    let svc_port = svc["spec"]["ports"][0]["port"].as_i64().unwrap();
    assert_eq!(*coord, format!("{scheme}://ferryfs-coordinator:{svc_port}"));
    assert_eq!(
        by_name(&pod["volumes"], "token")["secret"]["secretName"].as_str(),
        Some("ferryfs-workers-token")
    );
    assert!(
        token_at.starts_with(
            by_name(&worker["volumeMounts"], "token")["mountPath"]
                .as_str()
                .unwrap()
        )
    );
    for pvc in ["shop-data", "shop-data-new"] {
        let c = find(&docs, "PersistentVolumeClaim", pvc);
        assert_eq!(
            c["spec"]["accessModes"][0].as_str(),
            Some("ReadWriteMany"),
            "{pvc}"
        );
    }
    // The sidecar coordinates, with the token from the Secret, on the Service's target port.
    let app = find(&docs, "Deployment", "shop");
    let spec = &app["spec"]["template"]["spec"];
    let init = &spec["initContainers"];
    let side = by_name(init, "ferryfs");
    let args = strings(&side["args"]);
    let listen = &args[args.iter().position(|a| a == "--workers-listen").unwrap() + 1];
    let side_token = &args[args
        .iter()
        .position(|a| a == "--workers-token-file")
        .unwrap()
        + 1];
    let port = by_name(&side["ports"], "workers")["containerPort"]
        .as_i64()
        .unwrap();
    assert_eq!(listen.rsplit(':').next().unwrap(), port.to_string());
    // Over TLS: the sidecar's certificate and key, and the workers' CA, from one Secret that
    // cert-manager makes for the Service's name.
    let arg_after = |args: &[String], flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    let secret_file = |c: &Yaml, volumes: &Yaml, file: &str| -> Option<String> {
        let m = c["volumeMounts"]
            .as_vec()?
            .iter()
            .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))?;
        by_name(volumes, m["name"].as_str().unwrap())["secret"]["secretName"]
            .as_str()
            .map(str::to_string)
    };
    let tls_files = [
        arg_after(&args, "--workers-tls-cert"),
        arg_after(&args, "--workers-tls-key"),
        arg_after(&wargs, "--ca-file"),
    ];
    if tls {
        let secret = "ferryfs-coordinator-tls";
        for (i, f) in tls_files.iter().enumerate() {
            let f = f
                .as_ref()
                .unwrap_or_else(|| panic!("TLS file {i} not given"));
            let (c, vols) = if i < 2 {
                (side, &spec["volumes"])
            } else {
                (worker, &pod["volumes"])
            };
            assert_eq!(secret_file(c, vols, f).as_deref(), Some(secret), "{f}");
        }
        let cert = find(&docs, "Certificate", "ferryfs-coordinator");
        assert_eq!(cert["spec"]["secretName"].as_str(), Some(secret));
        assert_eq!(cert["spec"]["isCA"].as_bool(), Some(false));
        assert!(
            strings(&cert["spec"]["dnsNames"]).contains(&"ferryfs-coordinator".to_string()),
            "the certificate does not name the Service"
        );
    } else {
        assert!(tls_files.iter().all(Option::is_none), "{tls_files:?}");
    }
    assert_eq!(svc["spec"]["selector"]["app"].as_str(), Some("shop"));
    assert_eq!(
        by_name(&spec["volumes"], "ferryfs-workers-token")["secret"]["secretName"].as_str(),
        Some("ferryfs-workers-token")
    );
    // The workers mount OLD and NEW where the coordinator's migration names them.
    let prep = strings(&by_name(init, "ferryfs-prepare")["args"]);
    let at = |flag: &str| prep[prep.iter().position(|a| a == flag).unwrap() + 1].clone();
    assert_eq!(
        by_name(&worker["volumeMounts"], "old")["mountPath"].as_str(),
        Some(at("--old").as_str())
    );
    assert_eq!(
        by_name(&worker["volumeMounts"], "new")["mountPath"].as_str(),
        Some(at("--new").as_str())
    );
    let unit =
        fs::read_to_string(repo().join("packaging/systemd/ferryfs-worker@.service")).unwrap();
    assert_eq!(
        unit_value(&unit, "Service", "RestartPreventExitStatus"),
        "3"
    );
    assert_eq!(unit_value(&unit, "Service", "Restart"), "on-failure");
    need(
        "systemd-analyze",
        "the worker unit is checked by systemd's own verifier",
    );
    systemd_verify(&unit, "ferryfs-worker@demo.service");

    // Run them: volumes as local directories, the Secret as a file holding a real token.
    require_fuse();
    let t = tempfile::Builder::new()
        .prefix("ferryfs-k8s-workers-")
        .tempdir_in("/tmp")
        .unwrap();
    let token = t.path().join("token");
    fs::write(&token, ok(ferryfs(&["workers-token".as_ref()]))).unwrap();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for c in [by_name(init, "ferryfs-prepare"), side] {
        for m in c["volumeMounts"].as_vec().unwrap() {
            let (name, at) = (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            );
            if [
                "dev-fuse",
                "ferryfs-workers-token",
                "ferryfs-coordinator-tls",
            ]
            .contains(&name)
            {
                continue;
            }
            let local = t.path().join(name);
            fs::create_dir_all(&local).unwrap();
            mounts.push((at.to_string(), local));
        }
    }
    let old = t.path().join("data");
    for i in 0..300 {
        write(
            &old.join(format!("orders/{}/o{i}", i % 7)),
            format!("order {i}\n").as_bytes(),
        );
    }
    let (metrics_port, workers_port) = (free_port(), free_port());
    let metrics_addr = args[args.iter().position(|a| a == "--metrics-addr").unwrap() + 1].clone();
    let mut subs = vec![
        (metrics_addr, format!("127.0.0.1:{metrics_port}")),
        (listen.clone(), format!("127.0.0.1:{workers_port}")),
        (side_token.clone(), token.display().to_string()),
        (token_at.clone(), token.display().to_string()),
        (
            coord.clone(),
            format!("{scheme}://127.0.0.1:{workers_port}"),
        ),
    ];
    // (The Secret's files: a self-signed certificate for 127.0.0.1, its own CA.)
    let (cert, key) = certificate(t.path());
    if tls {
        for (f, local) in tls_files.iter().zip([&cert, &key, &cert]) {
            subs.push((f.clone().unwrap(), local.display().to_string()));
        }
    }
    let remap = |args: Vec<String>| remap_args(args, &subs, &mounts);
    ok(run(Command::new(BIN).args(remap(prep.clone()))));
    // The sidecar, but with the copier held back until both workers are there.
    let mut side_args = remap(args.clone());
    side_args.insert(1, "--no-copy".into());
    let mut sidecar = Command::new(BIN)
        .args(&side_args)
        .stdout(Stdio::null())
        .stderr(fs::File::create(t.path().join("sidecar.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !matches!(http_get(metrics_port, "/readyz"), Some((200, _))) {
        assert!(
            t0.elapsed() < Duration::from_secs(30) && sidecar.try_wait().unwrap().is_none(),
            "the coordinator never became ready: {}",
            fs::read_to_string(t.path().join("sidecar.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pod 0 of the Job, as the kubelet starts it.
    let mut pod0 = Command::new(BIN)
        .args(remap(wargs.clone()))
        .env("JOB_COMPLETION_INDEX", "0")
        .stderr(fs::File::create(t.path().join("pod0.log")).unwrap())
        .spawn()
        .unwrap();
    // The unit's ExecStart with the example settings, pointed at this coordinator.
    let conf = env_file(
        &fs::read_to_string(repo().join("packaging/systemd/ferryfs-worker.conf.example")).unwrap(),
    );
    let mut env = conf.clone();
    env.insert(
        "FERRYFS_COORDINATOR".into(),
        format!("{scheme}://127.0.0.1:{workers_port}"),
    );
    if tls {
        let more = format!(
            "{} --ca-file {}",
            env["FERRYFS_WORKER_ARGS"],
            cert.display()
        );
        env.insert("FERRYFS_WORKER_ARGS".into(), more);
    }
    let exec = unit_value(&unit, "Service", "ExecStart")
        .replace("/etc/ferryfs/%i.token", &token.display().to_string())
        .replace("/usr/local/bin/ferryfs", BIN);
    let line = systemd_expand(&exec, &env);
    let mut host = Command::new(&line[0])
        .args(&line[1..])
        .stderr(fs::File::create(t.path().join("unit.log")).unwrap())
        .spawn()
        .unwrap();
    let state = &prep[prep.iter().position(|a| a == "--state").unwrap() + 1];
    let state = remap(vec![state.clone()]).remove(0);
    let workers = || {
        let out = ok(run(
            Command::new(BIN).args(["status", "--json", "--state", &state])
        ));
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        st["workers"].as_array().cloned().unwrap_or_default()
    };
    let t0 = Instant::now();
    while workers().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the workers never reached the coordinator"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(run(
        Command::new(BIN).args(["execute", "--wait", "--state", &state])
    ));
    for (name, c) in [("pod0", &mut pod0), ("unit", &mut host)] {
        let st = wait_child(c, 60).unwrap_or_else(|| panic!("{name} did not exit"));
        assert!(
            st.success(),
            "{name}: {st}: {}",
            fs::read_to_string(t.path().join(format!("{name}.log"))).unwrap_or_default()
        );
    }
    let ws = workers();
    let copied: u64 = ws.iter().map(|w| w["files"].as_u64().unwrap()).sum();
    assert_eq!(copied, 300, "{ws:?}");
    assert!(
        ws.iter().any(|w| w["id"].as_str() == Some("index-0")),
        "{ws:?}"
    );
    assert_eq!(
        fs::read(t.path().join("ferryfs-new/orders/3/o3")).unwrap(),
        b"order 3\n"
    );
    let status = terminate(&mut sidecar, || {});
    assert!(
        status.success(),
        "the coordinator exited {status} on SIGTERM"
    );
    let log = fs::read_to_string(t.path().join("sidecar.log")).unwrap();
    assert!(
        log.contains(&format!("\"tls\":{tls}")) || log.contains(&format!("tls={tls}")),
        "the coordinator's log does not say tls={tls}: {log}"
    );
}

/// ferryfs in JuiceFS CSI Driver's mount pods (issue 26): the ConfigMap's mount pod patch is
/// what the driver reads (image, env, volumes, the hooks on `${MOUNT_POINT}`), and the hooks'
/// own command lines, run here over a FUSE mount standing in for JuiceFS's, mount the view
/// over it (OLD's data there, writes going to NEW) and unmount it cleanly.
#[test]
fn the_juicefs_mount_pod_patch_mounts_the_view_over_the_drivers_mount() {
    let dir = repo().join("packaging/kubernetes/juicefs-mount-pod");
    let docs = kustomize(&dir);
    let cm = find(&docs, "ConfigMap", "juicefs-csi-driver-config");
    assert_eq!(cm["metadata"]["namespace"].as_str(), Some("kube-system"));
    let cfg = YamlLoader::load_from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let patch = &cfg[0]["mountPodPatch"][0];
    assert!(
        !patch["pvcSelector"]["matchLabels"].is_badvalue(),
        "a patch for every PVC"
    );
    assert!(patch["ceMountImage"].as_str().unwrap().contains("ferryfs"));
    let hook = |which: &str| strings(&patch["lifecycle"][which]["exec"]["command"]);
    let start = hook("postStart");
    let stop = hook("preStop");
    assert_eq!(
        start[1..],
        ["start".to_string(), "${MOUNT_POINT}".to_string()]
    );
    assert_eq!(
        stop[1..],
        ["stop".to_string(), "${MOUNT_POINT}".to_string()]
    );
    let env: BTreeMap<String, String> = patch["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for m in patch["volumeMounts"].as_vec().unwrap() {
        assert!(!by_name(&patch["volumes"], m["name"].as_str().unwrap()).is_badvalue());
    }
    let mounted = |p: &str| {
        patch["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|m| p.starts_with(m["mountPath"].as_str().unwrap()))
    };
    assert!(mounted(&env["FERRYFS_NEW"]) && mounted(&env["FERRYFS_STATE"]));
    let docker =
        fs::read_to_string(repo().join("packaging/container/Dockerfile.juicefs-mount")).unwrap();
    assert!(docker.contains("COPY ferryfs-mount-pod /usr/local/bin/ferryfs-mount-pod"));
    assert_eq!(start[0], "/usr/local/bin/ferryfs-mount-pod");

    // The hooks here: a bindfs mount stands in for JuiceFS's at MOUNT_POINT.
    require_fuse();
    let t = tempfile::Builder::new()
        .prefix("ferryfs-mountpod-")
        .tempdir_in("/tmp")
        .unwrap();
    let (src, mp, new, state) = (
        t.path().join("volume"),
        t.path().join("jfs"),
        t.path().join("new"),
        t.path().join("state"),
    );
    for d in [&src, &mp, &new] {
        fs::create_dir_all(d).unwrap();
    }
    write(&src.join("orders.db"), b"order 1\n");
    let _jfs = common::stores::bindfs(&src, &mp);
    let script = repo().join("packaging/container/ferryfs-mount-pod");
    let hook_run = |args: &[String]| {
        let mp = mp.display().to_string();
        let args: Vec<String> = args[1..]
            .iter()
            .map(|a| a.replace("${MOUNT_POINT}", &mp))
            .collect();
        run(Command::new(&script)
            .args(&args)
            .env("FERRYFS_BIN", BIN)
            .env("FERRYFS_NEW", &new)
            .env("FERRYFS_STATE", state.join("pvc-1"))
            .env("FERRYFS_WAIT", "10"))
    };
    ok(hook_run(&start));
    assert_eq!(fs::read(mp.join("orders.db")).unwrap(), b"order 1\n");
    write(&mp.join("order-2"), b"order 2\n");
    assert!(
        new.join("order-2").exists(),
        "a write through the view did not land in NEW"
    );
    assert!(!src.join("order-2").exists());
    ok(hook_run(&stop));
    assert!(!mp.join("order-2").exists(), "the view is still mounted");
    // A mount pod restart: start again finds the migration and serves it.
    ok(hook_run(&start));
    assert_eq!(fs::read(mp.join("order-2")).unwrap(), b"order 2\n");
    ok(hook_run(&stop));
}
