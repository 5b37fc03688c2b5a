//! The FUSE session: mount options, who may use the mount, mounting (or adopting a mount a
//! previous daemon handed over), the kernel-cache invalidation thread, and running the
//! request loop. Everything the daemon needs of `fuser` to serve a view, so that nothing
//! outside `src/fuse/` names it.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};

use super::FerryFs;
use super::takeover::KernelInit;
use crate::state::status::{FuseTransport, TransportKind};
use crate::view::View;

/// The `-o` options of a mount, parsed: what goes to the kernel, and who may use the mount.
#[derive(Debug, Clone)]
pub struct MountPlan {
    options: Vec<MountOption>,
    acl: SessionACL,
}

impl MountPlan {
    /// `opts`: the `-o` arguments, each a comma-separated list. `allow_other`/`allow_root`
    /// set who may use the mount; `default_permissions` is always on; anything unknown goes
    /// to the kernel as it is.
    pub fn parse(opts: &[String]) -> MountPlan {
        let mut acl = SessionACL::Owner;
        let mut options = Vec::new();
        for o in opts
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            match o {
                "allow_other" => acl = SessionACL::All,
                "allow_root" => acl = SessionACL::RootAndOwner,
                "ro" => options.push(MountOption::RO),
                "rw" => options.push(MountOption::RW),
                "dev" => options.push(MountOption::Dev),
                "nodev" => options.push(MountOption::NoDev),
                "suid" => options.push(MountOption::Suid),
                "nosuid" => options.push(MountOption::NoSuid),
                "exec" => options.push(MountOption::Exec),
                "noexec" => options.push(MountOption::NoExec),
                "noatime" => options.push(MountOption::NoAtime),
                "atime" => options.push(MountOption::Atime),
                "default_permissions" => {} // always on
                other => options.push(MountOption::CUSTOM(other.to_string())),
            }
        }
        MountPlan { options, acl }
    }

    /// Whether set-id bits take effect through the view (`-o suid`; FUSE's default is nosuid).
    pub fn suid(&self) -> bool {
        self.options.contains(&MountOption::Suid)
    }

    /// Whether device files can be opened through the view (`-o dev`; default nodev).
    pub fn dev(&self) -> bool {
        self.options.contains(&MountOption::Dev)
    }

    /// Who may use the mount, by name: "owner", "all" or "root" (as a takeover records it).
    pub fn acl_name(&self) -> &'static str {
        match self.acl {
            SessionACL::All => "all",
            SessionACL::RootAndOwner => "root",
            SessionACL::Owner => "owner",
        }
    }

    /// Keep who may use the mount as the daemon that handed it over had it.
    pub fn set_acl_name(&mut self, name: &str) {
        self.acl = match name {
            "all" => SessionACL::All,
            "root" => SessionACL::RootAndOwner,
            _ => SessionACL::Owner,
        };
    }

    fn config(&self, fsname: String, subtype: &str, threads: usize) -> Config {
        let mut options = self.options.clone();
        options.push(MountOption::FSName(fsname));
        options.push(MountOption::Subtype(subtype.into()));
        options.push(MountOption::DefaultPermissions);
        let mut cfg = Config::default();
        cfg.mount_options = options;
        cfg.acl = self.acl;
        cfg.n_threads = Some(threads.max(1));
        cfg.clone_fd = true;
        cfg
    }
}

/// A FUSE session serving a view: mounted, not yet answering.
pub struct Session(fuser::Session<FerryFs>);

impl Session {
    /// Mount `fs` at `mp` with `threads` request threads, named `fsname` (its source in the
    /// mount table) with subtype `subtype`.
    pub fn mount(
        fs: FerryFs,
        mp: &Path,
        plan: &MountPlan,
        fsname: String,
        subtype: &str,
        threads: usize,
    ) -> std::io::Result<Session> {
        fuser::Session::new(fs, mp, &plan.config(fsname, subtype, threads)).map(Session)
    }

    /// Serve a mount a previous daemon handed over: `dev` is its /dev/fuse fd, `kernel` what
    /// the kernel negotiated with the first daemon, `rings` its io_uring entries (each holding
    /// a request the old daemon parked, answered first by this session's ring threads). The
    /// requests the old daemon parked after reading them from /dev/fuse are queued again, for
    /// this session's threads.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        fs: FerryFs,
        dev: BorrowedFd<'_>,
        kernel: KernelInit,
        rings: Option<super::takeover::AdoptedRings>,
        plan: &MountPlan,
        fsname: String,
        subtype: &str,
        threads: usize,
    ) -> Result<Session, String> {
        let cfg = plan.config(fsname, subtype, threads);
        let mut s = super::takeover::session_on(fs, dev, kernel, plan.acl, cfg)
            .map_err(|e| format!("taking the FUSE session: {e}"))?;
        if let Some(r) = rings {
            s.adopt_io_uring(r.0);
        }
        super::takeover::resend(dev).map_err(|e| format!("FUSE_NOTIFY_RESEND: {e}"))?;
        Ok(Session(s))
    }

    /// The session's io_uring rings, when it is served over them.
    pub fn rings(&self) -> Option<super::takeover::Rings> {
        self.0.io_uring().map(super::takeover::Rings::new)
    }

    /// The thread that tells the kernel to drop what it caches of an inode
    /// (`View::invalidate`). Its own thread: a notification can wait on the kernel's locks,
    /// which a request in flight may hold while it waits for its answer.
    pub fn spawn_invalidator(
        &self,
        view: Arc<View>,
        rx: crossbeam_channel::Receiver<u64>,
    ) -> std::io::Result<()> {
        let notifier = self.0.notifier();
        std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for ino in rx {
                    let sent = view.while_invalidations_open(|| {
                        // ENOENT: the kernel holds nothing of that inode (forgotten, never known).
                        if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0)
                            && e.raw_os_error() != Some(libc::ENOENT)
                        {
                            tracing::debug!(ino, error = %e, "kernel cache invalidation");
                        }
                    });
                    if !sent {
                        // Handing over: the kernel's cache of it expires with the TTL.
                        tracing::debug!(ino, "kernel cache invalidation skipped during a takeover");
                    }
                }
            })
            .map(drop)
    }

    /// How the kernel hands this session its requests, as negotiated at INIT.
    pub fn transport(&self) -> FuseTransport {
        match self.0.io_uring() {
            Some(u) => FuseTransport {
                transport: TransportKind::IoUring,
                queues: u.queues(),
                payload_bytes: u.payload_bytes(),
            },
            None => FuseTransport {
                transport: TransportKind::Dev,
                queues: 0,
                payload_bytes: 0,
            },
        }
    }

    /// Answer requests until the kernel detaches the mount.
    pub fn run(self) -> std::io::Result<()> {
        self.0.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_into_kernel_options_and_an_acl() {
        let p = MountPlan::parse(&["allow_other,suid".into(), "noatime".into()]);
        assert!(p.suid() && !p.dev());
        assert_eq!(p.acl_name(), "all");
        let mut p = MountPlan::parse(&[]);
        assert_eq!(p.acl_name(), "owner");
        p.set_acl_name("root");
        assert_eq!(p.acl_name(), "root");
    }
}
