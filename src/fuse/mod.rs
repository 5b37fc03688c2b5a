//! The FUSE adapter: the only module that knows `fuser`. Every request is forwarded to
//! [`View`]; each handler replies exactly once, and every error goes through [`fail`], which
//! logs it at its level with the request's context and replies its errno.

use rustc_hash::FxHashMap as HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    IoctlFlags, KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::metrics::{METRICS, Op, OpenPath, Timer};
use crate::view::error::Error;
use crate::view::{Attr, Caller, Kind, SetAttr, SetTime, View, XattrReply, wants_write};

mod creds;
pub mod mount;
pub mod session;
pub mod takeover;

pub struct FerryFs {
    view: Arc<View>,
    passthrough: Arc<Passthrough>,
    /// Parks requests while the mount is handed to a new daemon (`mount --takeover`).
    gate: Arc<takeover::Gate>,
    readdirplus: ReaddirPlus,
    /// How requests reach the daemon (`mount --transport`).
    transport: Transport,
    /// What an entry without a security label answers for it (`mount --selinux-absent`).
    selinux_absent: SelinuxAbsent,
    /// How long the kernel may trust attributes and names without asking (`mount
    /// --metadata-ttl`). Every change made through the view is seen by the kernel directly;
    /// this only bounds how late a change made in OLD behind the view's back shows.
    ttl: Duration,
}

impl FerryFs {
    /// `passthrough`: which open files' data path the kernel takes over (`mount --passthrough`).
    pub fn new(view: Arc<View>, passthrough: PassthroughMode, ttl: Duration) -> FerryFs {
        FerryFs {
            view,
            ttl,
            readdirplus: ReaddirPlus::Always,
            transport: Transport::Auto,
            selinux_absent: SelinuxAbsent::Eopnotsupp,
            passthrough: Arc::new(Passthrough {
                wanted: passthrough,
                refused: [AtomicBool::new(false), AtomicBool::new(false)],
                inodes: Mutex::new(HashMap::default()),
                dev: std::sync::OnceLock::new(),
            }),
            gate: Default::default(),
        }
    }

    /// How listings reach the kernel (`mount --readdirplus`).
    pub fn with_readdirplus(mut self, r: ReaddirPlus) -> FerryFs {
        self.readdirplus = r;
        self
    }

    /// How requests reach the daemon (`mount --transport`).
    pub fn with_transport(mut self, t: Transport) -> FerryFs {
        self.transport = t;
        self
    }

    /// What an unlabeled entry answers for `security.selinux` (`mount --selinux-absent`).
    pub fn with_selinux_absent(mut self, s: SelinuxAbsent) -> FerryFs {
        self.selinux_absent = s;
        self
    }

    /// What a takeover needs of this adapter once it serves: its request gate and its
    /// passthrough state.
    pub fn takeover_parts(&self) -> takeover::Parts {
        takeover::Parts {
            gate: self.gate.clone(),
            passthrough: self.passthrough.clone(),
        }
    }
}

/// How the kernel hands requests to the daemon (`mount --transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// FUSE over io_uring when the kernel offers it, else /dev/fuse.
    Auto,
    /// FUSE over io_uring, or the mount fails.
    Uring,
    /// read(2) and writev(2) on /dev/fuse.
    Dev,
}

impl Transport {
    /// Before mounting: whether this kernel can give what `--transport` asks (`uring` only).
    pub fn check(self) -> Result<(), String> {
        if self != Transport::Uring {
            return Ok(());
        }
        uring_offered(
            std::fs::read_to_string(ENABLE_URING).ok().as_deref(),
            std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .as_deref(),
        )
    }
}

/// Whether the kernel offers FUSE over io_uring, from the fuse module's `enable_uring` and
/// the `io_uring_disabled` sysctl (`None`: absent).
fn uring_offered(enable: Option<&str>, disabled: Option<&str>) -> Result<(), String> {
    match enable.map(str::trim) {
        Some("Y") => {}
        Some(_) => {
            return Err(format!(
                "--transport uring: FUSE over io_uring is off on this host ({ENABLE_URING} is \
                 N; `echo Y > {ENABLE_URING}` turns it on, see docs/OPERATIONS.md), or use \
                 --transport auto"
            ));
        }
        None => {
            return Err(format!(
                "--transport uring: this kernel has no FUSE over io_uring ({ENABLE_URING} is \
                 missing: Linux 6.14 or later built with CONFIG_FUSE_IO_URING); use \
                 --transport auto or dev"
            ));
        }
    }
    match disabled.map(str::trim) {
        Some(v) if v != "0" => Err(format!(
            "--transport uring: io_uring is disabled on this host \
             (/proc/sys/kernel/io_uring_disabled is {v})"
        )),
        _ => Ok(()),
    }
}

/// The module parameter that lets the kernel offer FUSE over io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether listings carry each entry's attributes (`mount --readdirplus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReaddirPlus {
    /// Every listing: a stat after a listing costs no request (`ls -l`, `find -printf`,
    /// rsync, du, Python's scandir + lstat); a listing nobody stats costs a lookup per entry
    /// in the daemon.
    Always,
    /// The kernel's heuristic: attributes for a directory's first chunk, then only while it
    /// sees lookups between chunks.
    Auto,
    /// Names only; every stat afterwards is a lookup.
    Off,
}

/// What `getxattr("security.selinux")` answers for an entry that has no such attribute
/// (`mount --selinux-absent`). The daemon is only asked on a host where no security module
/// answers for the label itself (with SELinux on, the kernel labels FUSE entries by policy).
/// `ls -l` asks for every entry's label, and no kernel cache keeps a FUSE entry's xattrs;
/// but coreutils stops asking a device once the label is not supported there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelinuxAbsent {
    /// EOPNOTSUPP, as a file system without security labels answers: `ls -l` then asks once
    /// per listing instead of once per entry. Entries that have a label give it.
    Eopnotsupp,
    /// ENODATA, what the stores themselves answer.
    Enodata,
}

/// The one security label `ls -l` asks for every entry (`--selinux-absent`).
const SELINUX_XATTR: &[u8] = b"security.selinux";

/// Which open files the kernel reads and writes directly (`mount --passthrough`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PassthroughMode {
    /// Files whose data is in NEW (written, copied, or created through the view). A read-only
    /// open of an OLD-only file goes through the daemon, so a later write open of the same file
    /// can always move to NEW.
    New,
    /// Also read-only opens of OLD-only files: native reads of OLD too, but while such a reader
    /// is open, a write open or truncate of that file waits up to 2 s for it to close, then
    /// fails with EBUSY (the kernel keeps one backing file per open inode).
    All,
    /// Every read and write through the daemon.
    Off,
}

/// Kernel FUSE passthrough: the kernel reads and writes the store's file itself, the daemon
/// only opens it. The kernel's rule: while any file of an inode is open, every open of that
/// inode uses one and the same backing file, or none does (a mix fails the open with EIO).
/// So the io mode is decided per inode by its first open and kept until its last release.
pub(crate) struct Passthrough {
    /// Asked for at mount.
    wanted: PassthroughMode,
    /// The kernel refused a backing file of OLD [0] / NEW [1] (an older kernel, a store on a
    /// stacked file system): that store's files are served through the daemon from then on.
    refused: [AtomicBool; 2],
    /// Inodes with open files: their io mode and how many files are open.
    inodes: Mutex<HashMap<u64, Opened>>,
    /// A /dev/fuse fd of this connection, once taken over from a previous daemon: for closing
    /// the backing files it registered (see [`IoMode::Inherited`]).
    dev: std::sync::OnceLock<std::os::fd::OwnedFd>,
}

struct Opened {
    mode: IoMode,
    opens: u32,
}

enum IoMode {
    /// The kernel reads and writes `id`'s file (NEW's, or OLD's for read-only opens). `raw`
    /// is the kernel's number for it, handed to a next daemon.
    Passthrough {
        id: Arc<BackingId>,
        raw: u32,
        on_new: bool,
    },
    /// A backing file the previous daemon registered (a takeover): taken into a `BackingId`
    /// by the next open of the inode, or closed by its last release.
    Inherited { raw: u32, on_new: bool },
    /// Through the daemon (read and write requests), with the kernel's page cache.
    Cached,
}

/// How long a change to a file waits for the read-only opens that pass through to its OLD
/// file to close (the kernel cannot move them to NEW), before it fails with EBUSY.
const OLD_READERS_WAIT: Duration = Duration::from_secs(2);

impl Passthrough {
    /// Does inode `ino` have open files passing through to OLD? A change to its data must not
    /// start then: those readers would keep OLD's bytes while NEW changes. Waits a while for
    /// them to close; false if they are still open.
    fn old_readers_gone(&self, ino: u64) -> bool {
        let t = std::time::Instant::now();
        loop {
            let busy = matches!(
                self.inodes.lock().unwrap().get(&ino),
                Some(Opened {
                    mode: IoMode::Passthrough { on_new: false, .. },
                    ..
                })
            );
            if !busy {
                return true;
            }
            if t.elapsed() >= OLD_READERS_WAIT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The io mode for a new open of `ino` on `of.file`; registers the backing file with the
    /// kernel for the inode's first open. Err: this write open cannot join the inode's open
    /// files (they pass through to OLD).
    fn join<F>(
        &self,
        ino: u64,
        of: &crate::view::OpenFile,
        write: bool,
        register: F,
    ) -> Result<Option<Arc<BackingId>>, ()>
    where
        F: FnOnce(Register<'_>) -> std::io::Result<(BackingId, u32)>,
    {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(o) = inodes.get_mut(&ino) {
            if let IoMode::Inherited { raw, on_new } = o.mode {
                if write && !on_new {
                    return Err(());
                }
                let (id, raw) = register(Register::Wrap(raw)).map_err(drop)?;
                o.mode = IoMode::Passthrough {
                    id: Arc::new(id),
                    raw,
                    on_new,
                };
            }
            let id = match &o.mode {
                // Any open file of the inode shows the view's bytes: OLD's while data changes
                // wait for OLD's readers (old_readers_gone), NEW's otherwise.
                IoMode::Passthrough { on_new: false, .. } if write => return Err(()),
                IoMode::Passthrough { id, .. } => Some(id.clone()),
                IoMode::Inherited { .. } => unreachable!("taken above"),
                IoMode::Cached => None,
            };
            o.opens += 1;
            return Ok(id);
        }
        let store = usize::from(of.on_new);
        let allowed = match self.wanted {
            PassthroughMode::All => true,
            PassthroughMode::New => of.on_new,
            PassthroughMode::Off => false,
        };
        // An S3 object has no file to pass through to: the daemon serves it.
        let mode = match &of.file {
            Some(file) if allowed && !self.refused[store].load(Ordering::Relaxed) => {
                match register(Register::Open(file)) {
                    Ok((id, raw)) => IoMode::Passthrough {
                        id: Arc::new(id),
                        raw,
                        on_new: of.on_new,
                    },
                    Err(e) => {
                        if !self.refused[store].swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                store = if of.on_new { "NEW" } else { "OLD" },
                                error = %e,
                                "the kernel refused passthrough to this store's files; serving them through the daemon"
                            );
                        }
                        IoMode::Cached
                    }
                }
            }
            _ => IoMode::Cached,
        };
        let id = match &mode {
            IoMode::Passthrough { id, .. } => Some(id.clone()),
            IoMode::Inherited { .. } | IoMode::Cached => None,
        };
        inodes.insert(ino, Opened { mode, opens: 1 });
        Ok(id)
    }

    /// An open file of `ino` was released; the last one frees the inode's backing file.
    fn release(&self, ino: u64) {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(o) = inodes.get_mut(&ino) {
            o.opens -= 1;
            if o.opens == 0
                && let Some(Opened {
                    mode: IoMode::Inherited { raw, .. },
                    ..
                }) = inodes.remove(&ino)
                && let Some(dev) = self.dev.get()
            {
                takeover::close_backing(dev, raw);
            }
        }
    }
}

/// How `Passthrough::join` asks for the backing file of an inode's first open.
pub(crate) enum Register<'a> {
    /// Register this file with the kernel.
    Open(&'a std::fs::File),
    /// Take on a backing file the previous daemon registered.
    Wrap(u32),
}

/// A reply that can register backing files (open and create).
trait Backing {
    fn open_backing_file(&self, f: &std::fs::File) -> std::io::Result<BackingId>;
    /// # Safety
    /// `raw` must be an open backing id of this connection that nothing else owns.
    unsafe fn wrap(&self, raw: u32) -> BackingId;
}

impl Backing for ReplyOpen {
    fn open_backing_file(&self, f: &std::fs::File) -> std::io::Result<BackingId> {
        self.open_backing(f)
    }
    unsafe fn wrap(&self, raw: u32) -> BackingId {
        // SAFETY: the caller's contract.
        unsafe { self.wrap_backing(raw) }
    }
}

impl Backing for ReplyCreate {
    fn open_backing_file(&self, f: &std::fs::File) -> std::io::Result<BackingId> {
        self.open_backing(f)
    }
    unsafe fn wrap(&self, raw: u32) -> BackingId {
        // SAFETY: the caller's contract.
        unsafe { self.wrap_backing(raw) }
    }
}

/// The backing file for `r`, with its raw id (kept for a takeover).
fn backing(reply: &impl Backing, r: Register<'_>) -> std::io::Result<(BackingId, u32)> {
    let raw = match r {
        Register::Open(f) => reply.open_backing_file(f)?.into_raw(),
        Register::Wrap(raw) => raw,
    };
    // SAFETY: `raw` was just registered on this connection, or was registered by the previous
    // daemon and handed over to this one; either way the returned BackingId is its only owner.
    Ok((unsafe { reply.wrap(raw) }, raw))
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

impl FerryFs {
    /// Before an `O_TRUNC` open truncates, clear the set-id bits a truncate by this caller
    /// clears on a native file system ([`creds::setid_bits_to_kill`]). The kernel leaves it
    /// to us: with FUSE_ATOMIC_O_TRUNC the truncation is the OPEN's, and the kernel skips the
    /// SETATTR that would have carried the clearing. Before, not after: a failure then
    /// refuses the open with nothing truncated. The kernel's cached mode is dropped after.
    fn clear_setid_for_truncate(&self, req: &Request, ino: u64) -> crate::view::error::Result<()> {
        // The caller's credentials are read only for a file that has set-id bits.
        let creds = std::cell::OnceCell::new();
        let cleared = self.view.clear_mode_bits(ino, |mode, gid| {
            if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
                return 0;
            }
            let c = creds.get_or_init(|| creds::Creds::of(req.pid()));
            creds::setid_bits_to_kill(mode, gid, c.as_ref())
        })?;
        if cleared {
            self.view.invalidate(ino);
        }
        Ok(())
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// What every request holds while it is served: its tracing span (DESIGN: one span per FUSE
/// request, so whatever is logged carries the operation and the inode; near free when the
/// level is off) and its latency timer for `ferryfs_fuse_request_duration_seconds`.
struct InFlight<'a> {
    _span: tracing::span::EnteredSpan,
    _timer: Timer,
    _gate: Option<takeover::Entered<'a>>,
}

fn span(op: Op, ino: u64) -> InFlight<'static> {
    InFlight {
        _span: tracing::debug_span!("fuse", op = op.name(), ino).entered(),
        _timer: Timer::start(op),
        _gate: None,
    }
}

/// Start serving a request that has a reply: its span and timer, and its place in the gate.
/// While the mount is being handed over the request waits in the gate first (see
/// `Gate::enter`): answered here if the takeover fails, by the next daemon if it succeeds.
macro_rules! enter {
    ($self:ident, $op:expr, $ino:expr, $reply:ident) => {{
        let g = $self.gate.enter();
        let mut f = span($op, $ino);
        f._gate = Some(g);
        f
    }};
}

impl FerryFs {
    /// Log a failed request at the error's level with the view path it was about, count it,
    /// then give the kernel its errno. The path is only worked out when the line is logged.
    fn fail(&self, op: Op, ino: u64, name: Option<&OsStr>, e: &Error) -> Errno {
        METRICS.fuse_error(op);
        let op_kind = op;
        let op = op.name();
        let errno = e.errno();
        macro_rules! log {
            ($lvl:ident, $level:expr) => {
                if tracing::enabled!($level) {
                    // `name` is an entry of the directory `ino`, except for xattr requests (an
                    // attribute's name) and link (a name in the new parent).
                    let entry = !matches!(
                        op_kind,
                        Op::Getxattr | Op::Setxattr | Op::Removexattr | Op::Link
                    );
                    let path = self.view.log_path(ino, name.filter(|_| entry));
                    tracing::$lvl!(op, ino, name = ?name, path = %path, errno, error = %e, "request failed")
                }
            };
        }
        match e.level() {
            tracing::Level::ERROR => log!(error, tracing::Level::ERROR),
            tracing::Level::WARN => log!(warn, tracing::Level::WARN),
            tracing::Level::INFO => log!(info, tracing::Level::INFO),
            _ => log!(debug, tracing::Level::DEBUG),
        }
        Errno::from_i32(errno)
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn open_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

/// Count an open file by where its data path goes.
fn count_open(of: &crate::view::OpenFile, passthrough: bool) {
    METRICS.opened(match (passthrough, of.on_new) {
        (true, true) => OpenPath::PassthroughNew,
        (true, false) => OpenPath::PassthroughOld,
        (false, _) => OpenPath::Daemon,
    });
}

/// A change to a file's data refused while read-only opens pass through to its OLD file.
fn busy_with_old_readers(op: Op, ino: u64) -> Errno {
    METRICS.fuse_error(op);
    tracing::warn!(
        op = op.name(),
        ino,
        "refused with EBUSY: the file is open read-only through kernel passthrough to OLD, and \
         its data cannot change in NEW until those readers close (mount --passthrough new avoids this)"
    );
    Errno::from_i32(libc::EBUSY)
}

impl Filesystem for FerryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        self.gate.set_kernel(takeover::KernelInit {
            major: abi.0,
            minor: abi.1,
            flags: config.capabilities().bits(),
        });
        // O_TRUNC arrives with open, so an O_TRUNC open of an OLD-only file copies no data.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        // POSIX ACLs: the kernel checks permissions with an entry's ACL (read through
        // getxattr, cached until its attributes are refreshed), as it does on a local file
        // system. Without it `default_permissions` checks the mode bits alone, whose group
        // bits are an ACL's mask: named users refused, and the owning group granted the
        // mask's rights where the ACL grants it fewer.
        if config
            .add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL)
            .is_err()
        {
            tracing::warn!(
                "the kernel does not offer FUSE_POSIX_ACL: permissions are checked by mode bits \
                 only, ACLs are not enforced"
            );
        }
        let _ = config.set_max_write(1 << 20);
        // FUSE over io_uring: fuser serves ring entries when the kernel accepts it (and drops
        // the flag from its INIT reply if this process cannot make rings).
        if self.transport != Transport::Dev {
            let granted = config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            if !granted && self.transport == Transport::Uring {
                return Err(std::io::Error::other(
                    "--transport uring: the kernel does not offer FUSE over io_uring",
                ));
            }
        }
        // Listings with attributes: one request per listing chunk instead of a lookup per
        // name afterwards. `auto` sends attributes only for the first chunk of a directory
        // that is read whole before its entries are stat'ed (Python's scandir, big `ls -l`),
        // and every later entry then costs a lookup: hence `always` by default.
        match self.readdirplus {
            ReaddirPlus::Always => {
                let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
            }
            ReaddirPlus::Auto => {
                let _ = config.add_capabilities(
                    fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
                );
            }
            ReaddirPlus::Off => {}
        }
        if self.passthrough.wanted != PassthroughMode::Off {
            // Backing files on a stacked file system (overlayfs) allowed; this mount cannot
            // then be stacked under another. A kernel without passthrough serves everything
            // through the daemon.
            let granted = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !granted {
                tracing::info!(
                    "the kernel does not offer FUSE passthrough; data goes through the daemon"
                );
                for r in &self.passthrough.refused {
                    r.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _span = enter!(self, Op::Lookup, parent.0, reply);
        match self.view.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &attr(&a), Generation(0)),
            Err(e) => reply.error(self.fail(Op::Lookup, parent.0, Some(name), &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _span = span(Op::Forget, ino.0);
        self.view.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _span = enter!(self, Op::Getattr, ino.0, reply);
        match self.view.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&self.ttl, &attr(&a)),
            Err(e) => reply.error(self.fail(Op::Getattr, ino.0, None, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _span = enter!(self, Op::Setattr, ino.0, reply);
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        if s.size.is_some() && !self.passthrough.old_readers_gone(ino.0) {
            return reply.error(busy_with_old_readers(Op::Setattr, ino.0));
        }
        match self.view.setattr(ino.0, s) {
            Ok(a) => reply.attr(&self.ttl, &attr(&a)),
            Err(e) => reply.error(self.fail(Op::Setattr, ino.0, None, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _span = enter!(self, Op::Readlink, ino.0, reply);
        match self.view.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.fail(Op::Readlink, ino.0, None, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _span = enter!(self, Op::Mknod, parent.0, reply);
        match self.view.mknod(
            parent.0,
            name,
            mode & !umask | (mode & libc::S_IFMT),
            rdev,
            caller(req),
        ) {
            Ok(a) => reply.entry(&self.ttl, &attr(&a), Generation(0)),
            Err(e) => reply.error(self.fail(Op::Mknod, parent.0, Some(name), &e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _span = enter!(self, Op::Mkdir, parent.0, reply);
        match self.view.mkdir(parent.0, name, mode & !umask, caller(req)) {
            Ok(a) => reply.entry(&self.ttl, &attr(&a), Generation(0)),
            Err(e) => reply.error(self.fail(Op::Mkdir, parent.0, Some(name), &e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = enter!(self, Op::Unlink, parent.0, reply);
        match self.view.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Unlink, parent.0, Some(name), &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = enter!(self, Op::Rmdir, parent.0, reply);
        match self.view.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Rmdir, parent.0, Some(name), &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _span = enter!(self, Op::Symlink, parent.0, reply);
        match self
            .view
            .symlink(parent.0, link_name, target.as_os_str(), caller(req))
        {
            Ok(a) => reply.entry(&self.ttl, &attr(&a), Generation(0)),
            Err(e) => reply.error(self.fail(Op::Symlink, parent.0, Some(link_name), &e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Rename, parent.0, reply);
        match self
            .view
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Rename, parent.0, Some(name), &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _span = enter!(self, Op::Link, ino.0, reply);
        match self.view.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&self.ttl, &attr(&a), Generation(0)),
            Err(e) => reply.error(self.fail(Op::Link, ino.0, Some(newname), &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _span = enter!(self, Op::Open, ino.0, reply);
        let write = wants_write(flags.0);
        if write && !self.passthrough.old_readers_gone(ino.0) {
            reply.error(busy_with_old_readers(Op::Open, ino.0));
            return;
        }
        if flags.0 & libc::O_TRUNC != 0
            && let Err(e) = self.clear_setid_for_truncate(req, ino.0)
        {
            return reply.error(self.fail(Op::Open, ino.0, None, &e));
        }
        let of = match self.view.open(ino.0, flags.0) {
            Ok(of) => of,
            Err(e) => return reply.error(self.fail(Op::Open, ino.0, None, &e)),
        };
        match self
            .passthrough
            .join(ino.0, &of, write, |r| backing(&reply, r))
        {
            Ok(Some(id)) => {
                // The daemon will not see this file's reads and writes: count the open as
                // application I/O, for the copier to back off.
                self.view.note_io();
                count_open(&of, true);
                reply.opened_passthrough(FileHandle(of.fh), FopenFlags::empty(), &id)
            }
            Ok(None) => {
                count_open(&of, false);
                reply.opened(FileHandle(of.fh), open_flags(of.keep_cache))
            }
            Err(()) => {
                // Raced with a reader's open of OLD: refuse, as old_readers_gone would have.
                self.view.release(of.fh);
                reply.error(busy_with_old_readers(Op::Open, ino.0));
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let _span = enter!(self, Op::Read, ino.0, reply);
        thread_local! {
            // One read buffer per FUSE worker thread, reused for every request.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| match self.view.read(fh.0, offset, size, buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(self.fail(Op::Read, ino.0, None, &e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let _span = enter!(self, Op::Write, ino.0, reply);
        match self.view.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.fail(Op::Write, ino.0, None, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lo: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close: data written through the daemon is in the store's file
        // already, the kernel writes back its own dirty pages before it would ask, and locks
        // are the kernel's (no setlk here). ENOSYS tells the kernel so once and for all: it
        // stops sending FLUSH, and close() no longer waits for a round trip to the daemon.
        let _span = enter!(self, Op::Flush, ino.0, reply);
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Release, ino.0, reply);
        self.view.release(fh.0);
        self.passthrough.release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Fsync, ino.0, reply);
        match self.view.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Fsync, ino.0, None, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _span = enter!(self, Op::Opendir, ino.0, reply);
        match self.view.opendir(ino.0, self.ttl) {
            // The kernel caches the listing (readdir from its page cache, no request), and
            // drops it itself when the directory changes through the view.
            Ok((fh, keep)) => reply.opened(
                FileHandle(fh),
                if keep {
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::FOPEN_CACHE_DIR
                },
            ),
            Err(e) => reply.error(self.fail(Op::Opendir, ino.0, None, &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _span = enter!(self, Op::Readdir, ino.0, reply);
        match self.view.readdir(fh.0, offset) {
            Ok(entries) => {
                for (off, e) in entries {
                    if reply.add(INodeNo(e.ino), off, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(self.fail(Op::Readdir, ino.0, None, &e)),
        }
    }

    /// The listing with each entry's attributes: one request instead of a readdir and a
    /// lookup per name (`ls -l`, `find -printf`, stat-heavy tools). Every entry returned
    /// counts one lookup, as the kernel counts it; "." and ".." are not linked by the kernel
    /// and count none.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let _span = enter!(self, Op::Readdirplus, ino.0, reply);
        let entries = match self.view.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(self.fail(Op::Readdirplus, ino.0, None, &e)),
        };
        for (off, e) in entries {
            if e.name == "." || e.name == ".." {
                // The kernel skips these names when it links entries: their attributes are
                // never used.
                let a = FileAttr {
                    ino: INodeNo(e.ino),
                    size: 0,
                    blocks: 0,
                    atime: UNIX_EPOCH,
                    mtime: UNIX_EPOCH,
                    ctime: UNIX_EPOCH,
                    crtime: UNIX_EPOCH,
                    kind: FileType::Directory,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 0,
                    flags: 0,
                };
                if reply.add(
                    INodeNo(e.ino),
                    off,
                    &e.name,
                    &Duration::ZERO,
                    &a,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            match self.view.lookup(ino.0, &e.name) {
                Ok(a) => {
                    if reply.add(
                        INodeNo(a.ino),
                        off,
                        &e.name,
                        &self.ttl,
                        &attr(&a),
                        Generation(0),
                    ) {
                        // Did not fit: the kernel never saw it, so it holds no lookup.
                        self.view.forget(a.ino, 1);
                        break;
                    }
                }
                // Gone since the listing was taken: left out, as a later readdir would.
                Err(err) if err.errno() == libc::ENOENT => continue,
                Err(err) => {
                    return reply.error(self.fail(Op::Readdirplus, ino.0, Some(&e.name), &err));
                }
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Releasedir, ino.0, reply);
        self.view.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Fsyncdir, ino.0, reply);
        match self.view.fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Fsyncdir, ino.0, None, &e)),
        }
    }

    /// No ioctl passes through the view: each gets ENOTTY, what a plain file answers to a
    /// terminal's (Python's `open()` asks TCGETS of every file it opens). fuser's default
    /// logs a warning per call, three lines for every such open.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _span = enter!(self, Op::Ioctl, ino.0, reply);
        tracing::trace!(cmd, "ioctl refused (ENOTTY)");
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _span = enter!(self, Op::Statfs, ino.0, reply);
        match self.view.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::view::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(self.fail(Op::Statfs, ino.0, None, &e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Setxattr, ino.0, reply);
        match self.view.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Setxattr, ino.0, Some(name), &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _span = enter!(self, Op::Getxattr, ino.0, reply);
        match self.view.getxattr(ino.0, name, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e)
                if e.errno() == libc::ENODATA
                    && self.selinux_absent == SelinuxAbsent::Eopnotsupp
                    && name.as_bytes() == SELINUX_XATTR =>
            {
                reply.error(Errno::EOPNOTSUPP)
            }
            Err(e) => reply.error(self.fail(Op::Getxattr, ino.0, Some(name), &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _span = enter!(self, Op::Listxattr, ino.0, reply);
        match self.view.listxattr(ino.0, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(self.fail(Op::Listxattr, ino.0, None, &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = enter!(self, Op::Removexattr, ino.0, reply);
        match self.view.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Removexattr, ino.0, Some(name), &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _span = enter!(self, Op::Create, parent.0, reply);
        match self
            .view
            .create(parent.0, name, mode & !umask, flags, caller(req))
        {
            Ok((a, of)) => match self
                .passthrough
                .join(a.ino, &of, true, |r| backing(&reply, r))
            {
                Ok(Some(id)) => {
                    count_open(&of, true);
                    reply.created_passthrough(
                        &self.ttl,
                        &attr(&a),
                        Generation(0),
                        FileHandle(of.fh),
                        FopenFlags::empty(),
                        &id,
                    )
                }
                Ok(None) => {
                    count_open(&of, false);
                    reply.created(
                        &self.ttl,
                        &attr(&a),
                        Generation(0),
                        FileHandle(of.fh),
                        open_flags(of.keep_cache),
                    )
                }
                Err(()) => {
                    // A new file has no OLD readers; only a name reused racing an open of the
                    // old one could get here.
                    self.view.release(of.fh);
                    reply.error(busy_with_old_readers(Op::Create, a.ino));
                }
            },
            Err(e) => reply.error(self.fail(Op::Create, parent.0, Some(name), &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _span = enter!(self, Op::Fallocate, ino.0, reply);
        match self.view.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(Op::Fallocate, ino.0, None, &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _span = enter!(self, Op::Lseek, ino.0, reply);
        match self.view.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(self.fail(Op::Lseek, ino.0, None, &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_uring_is_refused_with_the_reason_where_the_kernel_does_not_offer_it() {
        assert!(uring_offered(Some("Y\n"), Some("0\n")).is_ok());
        assert!(uring_offered(Some("Y\n"), None).is_ok());
        let off = uring_offered(Some("N\n"), Some("0")).unwrap_err();
        assert!(off.contains("is N") && off.contains("echo Y"), "{off}");
        let old = uring_offered(None, None).unwrap_err();
        assert!(
            old.contains("6.14") && old.contains("--transport auto"),
            "{old}"
        );
        let disabled = uring_offered(Some("Y"), Some("2\n")).unwrap_err();
        assert!(disabled.contains("io_uring_disabled is 2"), "{disabled}");
        assert!(Transport::Auto.check().is_ok() && Transport::Dev.check().is_ok());
    }

    fn open_file(on_new: bool) -> crate::view::OpenFile {
        crate::view::OpenFile {
            fh: 1,
            keep_cache: false,
            file: Some(Arc::new(tempfile::tempfile().unwrap())),
            on_new,
        }
    }

    fn table(mode: PassthroughMode) -> Passthrough {
        Passthrough {
            wanted: mode,
            refused: [AtomicBool::new(false), AtomicBool::new(false)],
            inodes: Mutex::new(HashMap::default()),
            dev: std::sync::OnceLock::new(),
        }
    }

    #[test]
    fn a_store_whose_files_the_kernel_refuses_is_served_through_the_daemon() {
        let pt = table(PassthroughMode::All);
        let refuse = |_: Register<'_>| -> std::io::Result<(BackingId, u32)> {
            Err(std::io::Error::from_raw_os_error(libc::ELOOP))
        };
        assert!(matches!(
            pt.join(5, &open_file(true), true, refuse),
            Ok(None)
        ));
        assert!(pt.refused[1].load(Ordering::Relaxed));
        // Not asked again for that store; OLD's files are still tried.
        let never =
            |_: Register<'_>| -> std::io::Result<(BackingId, u32)> { panic!("asked again") };
        assert!(matches!(
            pt.join(6, &open_file(true), false, never),
            Ok(None)
        ));
        assert!(matches!(
            pt.join(7, &open_file(false), false, refuse),
            Ok(None)
        ));
        assert!(pt.refused[0].load(Ordering::Relaxed));
        // A second open of an inode joins its mode; the last release forgets it.
        assert!(matches!(
            pt.join(5, &open_file(true), false, never),
            Ok(None)
        ));
        for ino in [5, 5, 6, 7] {
            pt.release(ino);
        }
        assert!(pt.inodes.lock().unwrap().is_empty());
    }

    #[test]
    fn mode_new_never_passes_old_files_through_and_off_nothing() {
        let never = |_: Register<'_>| -> std::io::Result<(BackingId, u32)> { panic!("registered") };
        let pt = table(PassthroughMode::New);
        assert!(matches!(
            pt.join(5, &open_file(false), false, never),
            Ok(None)
        ));
        assert!(
            pt.old_readers_gone(5),
            "a daemon-served reader must not hold writers"
        );
        let pt = table(PassthroughMode::Off);
        assert!(matches!(
            pt.join(5, &open_file(true), true, never),
            Ok(None)
        ));
    }
}
