//! The FUSE side of handing a live mount to a new daemon (`mount --takeover`).
//!
//! The kernel connection outlives the daemon as long as some process holds a /dev/fuse fd of
//! it. The old daemon parks every request (never answers it), passes all its /dev/fuse fds to
//! the new daemon and exits without unmounting. The new daemon wraps those fds in a fuser
//! session (fuser insists on an INIT handshake, so it gets a replay of the original one over
//! a socketpair, then the real fd is put in place), and asks the kernel to queue every
//! unanswered request again (FUSE_NOTIFY_RESEND, Linux 6.9): applications see a pause, not an
//! error.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{FerryFs, IoMode, Opened, Passthrough};

/// Counts the requests being answered, and parks new ones while a takeover runs.
#[derive(Default)]
pub struct Gate {
    parking: AtomicBool,
    in_flight: AtomicUsize,
    /// Where parked requests wait for `unpark` (or for the process to exit, its mount taken).
    parked: std::sync::Mutex<()>,
    unparked: std::sync::Condvar,
    /// What the kernel offered at INIT, replayed to the next daemon's fuser session.
    kernel: OnceLock<KernelInit>,
    /// How the session gets its requests, once it serves: `Some(rings)` over io_uring (a
    /// takeover hands the rings over), `None` through /dev/fuse.
    transport: OnceLock<Option<Rings>>,
    /// The daemon's own requests through its mount (the health probe's statfs).
    own: std::sync::Mutex<OwnUses>,
    own_done: std::sync::Condvar,
}

#[derive(Default)]
struct OwnUses {
    /// A takeover holds them: none may start.
    held: bool,
    running: usize,
}

/// One of the daemon's own requests through its mount, being made.
pub struct OwnUse<'a>(&'a Gate);

impl Drop for OwnUse<'_> {
    fn drop(&mut self) {
        let mut o = self.0.own.lock().unwrap_or_else(|p| p.into_inner());
        o.running -= 1;
        self.0.own_done.notify_all();
    }
}

/// A request being answered.
pub struct Entered<'a>(&'a Gate);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// Enter to answer a request. While a takeover runs the request waits here, not
    /// counted as being answered: if the takeover succeeds this process exits without ever
    /// answering it (the new daemon has the kernel queue it again, FUSE_NOTIFY_RESEND); if it
    /// fails, the request goes on once unparked. (Forgetting parked requests and queueing them
    /// again on failure would also queue again the requests being answered right then, which
    /// were then answered twice: a create done twice failed EEXIST.)
    pub(super) fn enter(&self) -> Entered<'_> {
        loop {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.parking.load(Ordering::SeqCst) {
                return Entered(self);
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let mut g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            while self.parking.load(Ordering::SeqCst) {
                g = self.unparked.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Make one of the daemon's own requests through its mount (a health probe); `None`
    /// while a takeover runs. Such a request must never be parked: a thread of the old
    /// daemon waiting for an answer its own daemon read keeps that process from exiting (a
    /// thread waiting on a FUSE request already read cannot be killed), the new daemon waits
    /// for that exit before it has the requests queued again, and the mount hangs.
    pub fn own_use(&self) -> Option<OwnUse<'_>> {
        let mut o = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if o.held {
            return None;
        }
        o.running += 1;
        Some(OwnUse(self))
    }

    /// Stop the daemon's own uses of the mount (a health probe's statfs): none starts from
    /// here, and the running ones are waited for, up to `limit`, answered rather than parked.
    /// False: some still run; the caller unparks.
    pub fn hold_own(&self, limit: Duration) -> bool {
        let t = Instant::now();
        let mut o = self.own.lock().unwrap_or_else(|p| p.into_inner());
        o.held = true;
        while o.running > 0 {
            let Some(left) = limit.checked_sub(t.elapsed()) else {
                return false;
            };
            o = self
                .own_done
                .wait_timeout(o, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Park every new request and wait, up to `limit`, until the ones being answered are
    /// done. First the daemon's own uses of the mount stop, and the running ones are let
    /// finish (answered, not parked). False: some are still running (a hung store); the
    /// caller unparks.
    pub fn park(&self, limit: Duration) -> bool {
        let t = Instant::now();
        if !self.hold_own(limit) {
            return false;
        }
        self.parking.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn unpark(&self) {
        {
            let _g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            self.parking.store(false, Ordering::SeqCst);
            self.unparked.notify_all();
        }
        self.own.lock().unwrap_or_else(|p| p.into_inner()).held = false;
    }

    /// How the session gets its requests (recorded once it serves).
    pub fn set_transport(&self, rings: Option<Rings>) {
        let _ = self.transport.set(rings);
    }

    /// `None`: the session does not serve yet; `Some(None)`: through /dev/fuse;
    /// `Some(Some(rings))`: over io_uring.
    pub fn transport(&self) -> Option<Option<Rings>> {
        self.transport.get().cloned()
    }

    pub(super) fn set_kernel(&self, k: KernelInit) {
        let _ = self.kernel.set(k);
    }

    pub fn kernel(&self) -> Option<KernelInit> {
        self.kernel.get().copied()
    }
}

/// A session's FUSE io_uring rings, as its threads serve them.
#[derive(Clone)]
pub struct Rings(Arc<fuser::IoUringState>);

impl Rings {
    pub(super) fn new(s: Arc<fuser::IoUringState>) -> Rings {
        Rings(s)
    }

    /// Whether requests pass through them (the kernel did not refuse them).
    pub fn active(&self) -> bool {
        self.0.active()
    }

    /// Ring threads keep new requests in their entries, unanswered, until `release`.
    pub fn hold(&self) {
        self.0.hold();
    }

    pub fn release(&self) {
        self.0.release();
    }

    /// Wait until no entry is being answered; the queues of the free entries.
    pub fn settle(&self, limit: Duration) -> std::io::Result<Vec<u16>> {
        self.0.settle(limit)
    }

    /// Fill every free ring entry with a request (`fill_ring_entries`), wait until each holds
    /// one (up to `fill_limit`), and take what the next daemon needs: the entries, and the
    /// requests they hold in one frame. A free entry left as this process exits would be
    /// cancelled, racing with a request being put into it (that request would then hang); an
    /// entry holding a request is left alone, and the next daemon answers it from its own ring.
    pub fn fill_and_hand_over(
        &self,
        root: BorrowedFd<'_>,
        free: &[u16],
        drain: Duration,
        fill_limit: Duration,
    ) -> Result<(UringHanded, Vec<u8>), String> {
        let t = Instant::now();
        if let Some(why) = unreachable_queues(free) {
            return Err(why);
        }
        if !free.is_empty() {
            fill_ring_entries(root, free)
                .map_err(|e| format!("filling the free io_uring entries: {e}"))?;
        }
        loop {
            match self.settle(drain) {
                Ok(f) if f.is_empty() => break,
                Ok(f) if t.elapsed() > fill_limit => {
                    return Err(format!(
                        "io_uring entries of queues {f:?} still free after {} s: requests made \
                         on those CPUs did not reach them (is this daemon allowed to run there?)",
                        fill_limit.as_secs()
                    ));
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("holding the io_uring requests: {e}")),
            }
        }
        let h = self
            .0
            .handover()
            .map_err(|e| format!("handing the io_uring entries over: {e}"))?;
        let meta = UringHanded {
            base: h.base,
            entry_len: h.entry_len,
            entries_total: h.entries_total,
            queues: h.queues,
            payload: h.payload,
            entries: h
                .entries
                .iter()
                .map(|e| (e.index, e.qid, e.bytes.len() as u64))
                .collect(),
        };
        Ok((meta, h.entries.into_iter().flat_map(|e| e.bytes).collect()))
    }
}

/// The ring entries of a mount served over io_uring, as one daemon hands them to the next
/// (see `fuser::RingHandover`); the requests they hold travel apart, in one frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UringHanded {
    pub base: u64,
    pub entry_len: u64,
    pub entries_total: u32,
    pub queues: u32,
    pub payload: u64,
    /// Each entry's place, queue and the length of the request it holds (in the frame, in
    /// this order).
    pub entries: Vec<(u32, u16, u64)>,
}

/// Handed-over rings, their entries mapped in this process where the kernel has them.
pub struct AdoptedRings(pub(super) fuser::AdoptedRings);

impl AdoptedRings {
    /// Map the entries at the old daemon's address and put back the requests they hold
    /// (`blob`, in the order of `u.entries`).
    pub fn map(u: &UringHanded, blob: &[u8]) -> std::io::Result<AdoptedRings> {
        let mut at = 0usize;
        let mut entries = Vec::with_capacity(u.entries.len());
        for &(index, qid, n) in &u.entries {
            let bytes = at
                .checked_add(n as usize)
                .and_then(|end| blob.get(at..end))
                .ok_or_else(|| std::io::Error::other("io_uring requests cut short"))?
                .to_vec();
            at += n as usize;
            entries.push(fuser::HandedEntry { index, qid, bytes });
        }
        let h = fuser::RingHandover {
            base: u.base,
            entry_len: u.entry_len,
            entries_total: u.entries_total,
            queues: u.queues,
            payload: u.payload,
            entries,
        };
        fuser::AdoptedRings::map(&h).map(AdoptedRings)
    }
}

/// The kernel's INIT: protocol version and the capabilities it offered.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct KernelInit {
    pub major: u32,
    pub minor: u32,
    pub flags: u64,
}

/// What the daemon's takeover needs of the FUSE adapter.
#[derive(Clone)]
pub struct Parts {
    pub gate: Arc<Gate>,
    pub(super) passthrough: Arc<Passthrough>,
}

/// The passthrough state of one inode with open files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenInode {
    pub ino: u64,
    pub opens: u32,
    /// The kernel's backing id and whether it is NEW's file; `None`: served by the daemon.
    pub backing: Option<(u32, bool)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PassthroughState {
    pub refused: [bool; 2],
    pub inodes: Vec<OpenInode>,
}

impl Parts {
    pub fn export_passthrough(&self) -> PassthroughState {
        let pt = &self.passthrough;
        PassthroughState {
            refused: [
                pt.refused[0].load(Ordering::Relaxed),
                pt.refused[1].load(Ordering::Relaxed),
            ],
            inodes: pt
                .inodes
                .lock()
                .unwrap()
                .iter()
                .map(|(ino, o)| OpenInode {
                    ino: *ino,
                    opens: o.opens,
                    backing: match &o.mode {
                        IoMode::Passthrough { raw, on_new, .. }
                        | IoMode::Inherited { raw, on_new } => Some((*raw, *on_new)),
                        IoMode::Cached => None,
                    },
                })
                .collect(),
        }
    }

    /// Take on the previous daemon's passthrough state; `dev` is a /dev/fuse fd of the
    /// connection, for closing inherited backing files.
    pub fn import_passthrough(&self, st: PassthroughState, dev: OwnedFd) {
        let pt = &self.passthrough;
        for (i, r) in st.refused.iter().enumerate() {
            pt.refused[i].store(*r, Ordering::Relaxed);
        }
        let _ = pt.dev.set(dev);
        let mut inodes = pt.inodes.lock().unwrap();
        for o in st.inodes {
            inodes.insert(
                o.ino,
                Opened {
                    mode: match o.backing {
                        Some((raw, on_new)) => IoMode::Inherited { raw, on_new },
                        None => IoMode::Cached,
                    },
                    opens: o.opens,
                },
            );
        }
    }
}

/// FUSE_DEV_IOC_BACKING_CLOSE: _IOW(229, 2, uint32_t).
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// Close a backing file the previous daemon registered, once no open file uses it.
pub(super) fn close_backing(dev: &OwnedFd, raw: u32) {
    // SAFETY: the ioctl reads one u32 from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &raw) };
    if r < 0 {
        tracing::warn!(backing_id = raw, error = %std::io::Error::last_os_error(), "closing an inherited backing file");
    }
}

/// FUSE_INIT's opcode, and the INIT_EXT flag (the high 32 flag bits are in flags2).
const FUSE_INIT: u32 = 26;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// A fuser session for a connection that is already initialised: fuser gets a replay of the
/// kernel's INIT over a socketpair (its answer is dropped: the kernel negotiated with the
/// first daemon), then `dev` takes the place of its fd.
pub fn session_on(
    fs: FerryFs,
    dev: BorrowedFd<'_>,
    kernel: KernelInit,
    acl: fuser::SessionACL,
    cfg: fuser::Config,
) -> std::io::Result<fuser::Session<FerryFs>> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let mut init = Vec::with_capacity(104);
    // fuse_in_header
    init.extend_from_slice(&104u32.to_le_bytes());
    init.extend_from_slice(&FUSE_INIT.to_le_bytes());
    init.extend_from_slice(&1u64.to_le_bytes()); // unique
    init.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    init.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    // fuse_init_in; never io_uring (fuser would make rings of its own): a connection served
    // over io_uring gets its handed rings afterwards (`Session::adopt`).
    let flags = (kernel.flags | FUSE_INIT_EXT) & !FUSE_OVER_IO_URING;
    init.extend_from_slice(&kernel.major.to_le_bytes());
    init.extend_from_slice(&kernel.minor.to_le_bytes());
    init.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    init.extend_from_slice(&(flags as u32).to_le_bytes());
    init.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
    init.extend_from_slice(&[0u8; 44]);
    rustix::io::write(&ours, &init)?;
    let session = fuser::Session::from_fd(fs, theirs, acl, cfg)?;
    let mut answer = [0u8; 512];
    rustix::io::read(&ours, &mut answer)?;
    // SAFETY: dup3 onto the session's own fd, which it owns and keeps using by number; the
    // socketpair end it held is closed by the kernel as part of the call.
    let r = unsafe {
        libc::dup3(
            dev.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(session)
}

/// FUSE_NOTIFY_RESEND: the kernel queues again every request read from this connection but
/// not answered (the parked ones), for whoever reads next.
pub fn resend(dev: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16u32.to_le_bytes()); // len
    msg.extend_from_slice(&7i32.to_le_bytes()); // error: the notify code, FUSE_NOTIFY_RESEND
    msg.extend_from_slice(&0u64.to_le_bytes()); // unique 0: a notification
    rustix::io::write(dev, &msg)?;
    Ok(())
}

/// Every /dev/fuse fd this process holds: the session's and its per-thread clones.
pub fn fuse_fds() -> std::io::Result<Vec<BorrowedFd<'static>>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target == std::path::Path::new("/dev/fuse")
            && let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
        {
            // SAFETY: the session's fds stay open until this process exits (the takeover
            // ends with exit, or gives up and keeps serving on them).
            out.push(unsafe { BorrowedFd::borrow_raw(fd) });
        }
    }
    out.sort_by_key(|f| f.as_raw_fd());
    Ok(out)
}

/// Make one request on each of `queues` (the kernel's io_uring queue of a request is the CPU
/// its caller runs on): for each, a child process pinned to that CPU asks for a statfs of
/// `root`, the mount's root. The children wait for their answers (from this daemon if the
/// takeover fails, from the next one if not) and are reaped by a thread of this process
/// meanwhile. A child that cannot run on its CPU exits without asking.
pub fn fill_ring_entries(root: BorrowedFd<'_>, queues: &[u16]) -> std::io::Result<()> {
    let fd = root.as_raw_fd();
    let mut children = Vec::with_capacity(queues.len());
    for &q in queues {
        let cpu = usize::from(q);
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("queue {q}: no such CPU")));
        }
        // SAFETY: the child only makes system calls (no allocation, no lock a thread of the
        // parent may have held at the fork) and ends with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: the child, as above; cpu_set_t and statfs are plain values on its stack.
            unsafe {
                // Told apart from the daemon it was forked from (same command line) in `ps`.
                libc::prctl(libc::PR_SET_NAME, c"ferryfs-fill".as_ptr());
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    libc::_exit(2);
                }
                // Hold none of the daemon's fds (its rings, /dev/fuse, the state lock)
                // past its exit: only the root.
                if fd > 3 {
                    libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 0u32);
                }
                libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
                let mut st: libc::statfs = std::mem::zeroed();
                libc::fstatfs(fd, &mut st);
                libc::_exit(0);
            }
        }
        children.push(pid);
    }
    std::thread::Builder::new()
        .name("takeover-fill".into())
        .spawn(move || {
            for pid in children {
                // SAFETY: waits for our own child; the status is not needed.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            }
        })
        .map(drop)
}

/// Why some of `queues` cannot be filled from here, if so: the kernel's queue of a request is
/// the CPU its caller runs on, so a queue whose CPU is offline, or outside this daemon's
/// allowed CPUs (a cpuset), gets no request from a child of this process.
fn unreachable_queues(queues: &[u16]) -> Option<String> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| cpu_list(s.trim()));
    // SAFETY: a cpu_set_t on the stack, filled by the kernel for this thread.
    let allowed = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    };
    let mut offline: Vec<u16> = Vec::new();
    let mut denied: Vec<u16> = Vec::new();
    for &q in queues {
        let cpu = usize::from(q);
        if online.as_ref().is_some_and(|o| !o.contains(&cpu)) {
            offline.push(q);
        } else if cpu >= libc::CPU_SETSIZE as usize
            // SAFETY: CPU_ISSET reads the set at an index below CPU_SETSIZE.
            || allowed.is_some_and(|a| !unsafe { libc::CPU_ISSET(cpu, &a) })
        {
            denied.push(q);
        }
    }
    offline.dedup();
    denied.dedup();
    match (offline.is_empty(), denied.is_empty()) {
        (true, true) => None,
        (false, _) => Some(format!(
            "CPUs {offline:?} are offline and their io_uring queues have free entries, which \
             only a request made on those CPUs can fill: a takeover over io_uring needs every \
             possible CPU online (or mount with --transport dev)"
        )),
        (true, false) => Some(format!(
            "this daemon may not run on CPUs {denied:?} (its CPU affinity or cpuset), whose \
             io_uring queues have free entries that only a request made there can fill: allow \
             it every CPU, or mount with --transport dev"
        )),
    }
}

/// A kernel CPU list (`0-3,8,10-11`), as in /sys/devices/system/cpu/online.
fn cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Whether the running kernel has FUSE_NOTIFY_RESEND (Linux 6.9 and later).
pub fn kernel_can_resend() -> bool {
    let Ok(rel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (maj, min) >= (6, 9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_as_the_kernel_writes_them_and_reachable_queues_pass() {
        assert_eq!(cpu_list("0"), Some(vec![0]));
        assert_eq!(cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(cpu_list("3-1"), None);
        assert_eq!(cpu_list("x"), None);
        // The CPU this test runs on is online and allowed.
        // SAFETY: no arguments.
        let here = unsafe { libc::sched_getcpu() };
        assert!(here >= 0);
        assert_eq!(unreachable_queues(&[here as u16, here as u16]), None);
        let why = unreachable_queues(&[u16::MAX]).expect("CPU 65535 is nowhere");
        assert!(why.contains("--transport dev"), "{why}");
    }

    #[test]
    fn a_takeover_waits_for_the_daemons_own_request_and_then_lets_none_start() {
        let gate = Arc::new(Gate::default());
        let probe = gate.own_use().expect("no takeover yet");
        // A request of the daemon's own being answered: park waits for it, not for ever.
        let parker = {
            let g = gate.clone();
            std::thread::spawn(move || g.park(Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !parker.is_finished(),
            "parked while the probe's request ran"
        );
        assert!(
            gate.own_use().is_none(),
            "a new own request started while a takeover waits"
        );
        // It is answered, not parked: requests still enter.
        drop(gate.enter());
        drop(probe);
        assert!(parker.join().unwrap(), "park gave up after the probe ended");
        assert!(
            gate.own_use().is_none(),
            "an own request started while parked"
        );
        gate.unpark();
        assert!(
            gate.own_use().is_some(),
            "own requests refused after the takeover failed"
        );
    }

    #[test]
    fn an_own_request_that_does_not_end_fails_the_takeover_and_unpark_frees_it() {
        let gate = Gate::default();
        let hung = gate.own_use().unwrap();
        let t = Instant::now();
        assert!(!gate.park(Duration::from_millis(100)));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            !gate.parking.load(Ordering::SeqCst),
            "parked after giving up"
        );
        gate.unpark();
        drop(hung);
        assert!(gate.own_use().is_some());
        assert!(gate.park(Duration::from_millis(100)));
        gate.unpark();
    }
}
