//! `mount` without `--foreground`: the command re-executes itself in the foreground as a
//! detached child and waits on a pipe until the child says the view serves (or why it could
//! not), so the command returns exactly when the mount is usable, and fails with the child's
//! reason otherwise.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::MountArgs;

/// The environment variable that hands the child the readiness pipe's fd number.
pub const READY_FD_ENV: &str = "FERRYFS_READY_FD";

/// What the serving child tells the waiting `mount` command: warnings, then READY or ERROR.
pub struct Ready(Option<std::fs::File>);

impl Ready {
    /// The readiness pipe given by a parent `mount`, if any.
    pub fn from_env() -> Ready {
        let fd: Option<i32> = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Ready(fd.map(|fd| {
            // SAFETY: the parent put this fd number in our environment for exactly this
            // purpose and nothing else in this process owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: removing our own variable before any thread is spawned.
            unsafe { std::env::remove_var(READY_FD_ENV) };
            std::fs::File::from(owned)
        }))
    }

    /// A warning the parent prints before it returns.
    pub fn warn(&mut self, w: &str) {
        if let Some(r) = self.0.as_mut() {
            let _ = writeln!(r, "WARN {w}");
        }
    }

    /// The view serves: the parent returns success.
    pub fn ready(&mut self) {
        if let Some(mut r) = self.0.take() {
            let _ = writeln!(r, "READY");
        }
    }

    /// Serving failed: the parent fails with `msg`, which is also returned.
    pub fn fail(&mut self, msg: String) -> String {
        if let Some(r) = self.0.as_mut() {
            let _ = writeln!(r, "ERROR {msg}");
        }
        msg
    }
}

/// Start the daemon in the background and wait until it serves (or fails).
pub fn spawn_background(args: &MountArgs, raw_args: &[OsString]) -> Result<(), String> {
    let (rd, wr) = rustix::pipe::pipe().map_err(|e| format!("pipe: {e}"))?;
    // The child inherits only the write end.
    rustix::io::fcntl_setfd(&wr, rustix::io::FdFlags::empty()).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&args.state).ok();
    let log_path = crate::state::layout::log_path(&args.state);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(raw_args)
        .arg("--foreground")
        .env(READY_FD_ENV, wr.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null());
    // Started by a systemd unit (its ExecReload runs `mount --takeover`): the daemon logs to
    // the journal as the one it replaces did, not to a file.
    if std::env::var_os("JOURNAL_STREAM").is_none() {
        cmd.stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let ready_fd = wr.as_raw_fd();
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (close_range, fcntl) and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // The daemon keeps stdio and the readiness pipe only. Any other fd the caller left
            // open (a shell's `exec 3<file` in the view, during `mount --takeover`) would be
            // a file open in the view for the daemon's whole life: the mount could never
            // unmount.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if libc::fcntl(ready_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    drop(wr);
    let mut line = String::new();
    let mut reader = BufReader::new(std::fs::File::from(rd));
    // Warnings first (what the view takes away, say), then READY or ERROR.
    loop {
        line.clear();
        let _ = reader.read_line(&mut line);
        match line.trim_end().strip_prefix("WARN ") {
            Some(w) => eprintln!("warning: {w}"),
            None => break,
        }
    }
    let line = line.trim_end();
    if line == "READY" {
        return Ok(());
    }
    let _ = child.wait();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    Err(match line.strip_prefix("ERROR ") {
        Some(msg) => msg.to_string(),
        None => format!(
            "the daemon exited before serving; see {}",
            log_path.display()
        ),
    })
}
