//! systemd's readiness protocol (`Type=notify`): datagrams to `$NOTIFY_SOCKET`.
//!
//! READY=1 once the view serves, STATUS= lines with progress, WATCHDOG=1 while the health
//! checks pass (when the unit sets `WatchdogSec=`), STOPPING=1 when the view shuts down.
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd listens, taken from the environment once at start.
pub struct Notifier {
    addr: Option<SocketAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring `$WATCHDOG_PID`), and remove them
    /// from the environment so no child process answers for this one. Call before threads are
    /// spawned.
    pub fn from_env() -> Notifier {
        let addr = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let b = std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec();
            let parsed = match b.strip_prefix(b"@") {
                // An abstract socket (systemd's own default in containers and user managers).
                Some(name) => {
                    <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
                        .ok()
                }
                None => SocketAddr::from_pathname(&p).ok(),
            };
            if parsed.is_none() {
                tracing::warn!(socket = ?p, "NOTIFY_SOCKET is not a usable socket address; not notifying systemd");
            }
            parsed
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        // SAFETY: called at start, before any thread exists (see above).
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        Notifier { addr, watchdog }
    }

    /// Keep up the watchdog the previous daemon kept (a takeover under systemd: the new
    /// process is not the one systemd told, but it answers for the service now).
    pub fn adopt_watchdog(&mut self, period: Duration) {
        if self.watchdog.is_none() {
            self.watchdog = Some(period);
        }
    }

    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// The watchdog period systemd asked for, if any: WATCHDOG=1 must come more often.
    pub fn watchdog(&self) -> Option<Duration> {
        self.addr.as_ref().and(self.watchdog)
    }

    /// Send one state change (`KEY=value` lines). Failures are logged, never fatal: a view
    /// that serves must not stop because systemd went away.
    pub fn notify(&self, state: &str) {
        let Some(addr) = &self.addr else { return };
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), addr));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "sd_notify");
        }
    }
}
