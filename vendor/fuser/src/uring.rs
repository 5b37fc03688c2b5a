//! FUSE over io_uring (Linux 6.14 and later, protocol 7.42): requests and replies pass through
//! ring entries instead of read(2)/writev(2) on /dev/fuse.
//!
//! The kernel keeps one queue per possible CPU and puts a request on the queue of the CPU its
//! caller runs on. A server gives it *entries*: a 288-byte header buffer and a payload buffer,
//! registered with an `IORING_OP_URING_CMD` (`FUSE_IO_URING_CMD_REGISTER`) on the /dev/fuse
//! fd. A request fills a free entry of its queue and completes that command; the server
//! answers in the same buffers and hands the entry back with `COMMIT_AND_FETCH`, which also
//! waits for the next request. Forgets, interrupts and notifications stay on /dev/fuse, and
//! backing files (passthrough) are still opened with ioctls on it.
//!
//! Here every ring thread owns one io_uring and one entry, and answers its requests itself,
//! as a /dev/fuse thread does: handlers may block (a thread per entry), the ring has one
//! submitter (`SINGLE_ISSUER`, `DEFER_TASKRUN`: the kernel copies the next request into the
//! entry when the thread waits for it, never interrupting a handler). Threads are spread
//! over the queues round robin; there are at least as many as queues, since the kernel holds
//! every request until each queue has an entry.
//!
//! Negotiating the flag commits the connection: once the kernel has the INIT reply with
//! `FUSE_OVER_IO_URING`, requests wait for ring entries. So the rings are tried before the
//! reply (`probe`), and the flag is dropped from it when they cannot be made. If the kernel
//! refuses the first registration it serves the connection through /dev/fuse again, and the
//! thread becomes a /dev/fuse thread.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ll::Operation;
use crate::reply::ReplyEmpty;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: `in_out[128]`, `op_in[128]`, `ring_ent_in_out` (32 bytes).
const HEADER_SIZE: usize = 288;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
/// `ring_ent_in_out.commit_id` and `.payload_sz`.
const COMMIT_ID: usize = ENT_IN_OUT + 8;
const PAYLOAD_SZ: usize = ENT_IN_OUT + 16;
/// `struct fuse_in_header` and `struct fuse_out_header`.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// `FUSE_MIN_READ_BUFFER`: the smallest payload the kernel takes.
const MIN_PAYLOAD: usize = 8192;
/// Where the header buffer ends and the payload begins in an entry's memory (a page).
const PAYLOAD_AT: usize = 4096;
/// The SQE's `len` (the iovec count of a registration), which `UringCmd80` cannot set.
const SQE_LEN_OFFSET: usize = 24;

/// FUSE over io_uring on a session, as the kernel and the threads have it.
#[derive(Debug)]
pub struct IoUringState {
    queues: usize,
    payload: usize,
    serving: AtomicUsize,
    refused: AtomicBool,
    /// Every entry of the session, made when it starts serving (or handed over).
    slots: OnceLock<Vec<Arc<Slot>>>,
    /// The entries came from a previous server, each holding a request (`adopt`).
    adopted: bool,
    /// While set, a ring thread that gets a request keeps it without answering (`hold`):
    /// read without a lock by every request, so set and cleared under `hold`'s lock.
    holding: AtomicBool,
    hold: Mutex<()>,
    held: Condvar,
}

impl IoUringState {
    /// The kernel's queues: one per possible CPU.
    pub fn queues(&self) -> usize {
        self.queues
    }

    /// Bytes of each entry's payload buffer.
    pub fn payload_bytes(&self) -> usize {
        self.payload
    }

    /// Ring threads serving now.
    pub fn threads(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    /// Whether the kernel refused a registration (the connection is then served through
    /// /dev/fuse).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether requests pass through the rings.
    pub fn active(&self) -> bool {
        !self.refused()
    }

    fn new(queues: usize, payload: usize, adopted: bool) -> IoUringState {
        IoUringState {
            queues,
            payload,
            serving: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            slots: OnceLock::new(),
            adopted,
            holding: AtomicBool::new(false),
            hold: Mutex::new(()),
            held: Condvar::new(),
        }
    }

    /// The entries to serve: `n` made now in one region (the first call), or the ones handed
    /// over.
    pub(crate) fn slots(&self, n: usize) -> io::Result<&[Arc<Slot>]> {
        if let Some(s) = self.slots.get() {
            return Ok(s);
        }
        let region = Arc::new(Region::new(n, self.payload)?);
        let slots = (0..n)
            .map(|i| Arc::new(Slot::new(region.clone(), i, (i % self.queues) as u16)))
            .collect();
        Ok(self.slots.get_or_init(|| slots))
    }

    /// Handing the rings over to another process, step 1: from now on a ring thread that gets
    /// a request keeps it in its entry without answering it, until `release` (or the end of
    /// this process). Requests already being answered go on.
    pub fn hold(&self) {
        let _g = self.hold.lock();
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Serve again: held requests are answered.
    pub fn release(&self) {
        let _g = self.hold.lock();
        self.holding.store(false, Ordering::SeqCst);
        self.held.notify_all();
    }

    /// Wait, up to `limit`, until no entry is being answered (each is held or free); the
    /// queues of the free entries, one item per entry. Call after `hold`.
    pub fn settle(&self, limit: Duration) -> io::Result<Vec<u16>> {
        let t = Instant::now();
        loop {
            let (mut free, mut busy) = (Vec::new(), 0);
            for slot in self.slots.get().map(|s| &s[..]).unwrap_or_default() {
                let st = slot.state.lock();
                if st.unique == 0 {
                    free.push(slot.qid);
                } else if !st.held {
                    busy += 1;
                }
            }
            if busy == 0 {
                return Ok(free);
            }
            if t.elapsed() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{busy} requests still being answered after {limit:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Handing the rings over, step 2: what the next server needs to answer the held
    /// requests from its own rings. Every entry must hold a request (a free entry would be
    /// cancelled as this process exits, racing with a request being put into it); fill free
    /// entries first with requests made on their queues' CPUs.
    pub fn handover(&self) -> io::Result<RingHandover> {
        let slots = self
            .slots
            .get()
            .ok_or_else(|| io::Error::other("the rings are not serving yet"))?;
        let region = &slots
            .first()
            .ok_or_else(|| io::Error::other("no ring entries"))?
            .region;
        let mut entries = Vec::with_capacity(slots.len());
        for slot in slots {
            let st = slot.state.lock();
            if st.unique == 0 || !st.held {
                return Err(io::Error::other(format!(
                    "ring entry {} (queue {}) holds no request",
                    slot.index, slot.qid
                )));
            }
            // SAFETY: the entry holds a request the kernel delivered and waits for its commit:
            // nobody writes to it while its thread is held.
            let bytes = unsafe {
                let header = slot.header();
                let payload_sz = header.add(PAYLOAD_SZ).cast::<u32>().read_unaligned() as usize;
                let mut b = Vec::with_capacity(HEADER_SIZE + payload_sz);
                b.extend_from_slice(std::slice::from_raw_parts(header, HEADER_SIZE));
                b.extend_from_slice(std::slice::from_raw_parts(
                    slot.payload(),
                    payload_sz.min(slot.payload_len),
                ));
                b
            };
            entries.push(HandedEntry {
                index: slot.index as u32,
                qid: slot.qid,
                bytes,
            });
        }
        Ok(RingHandover {
            base: region.base as u64,
            entry_len: region.entry_len as u64,
            entries_total: slots.len() as u32,
            queues: self.queues as u32,
            payload: self.payload as u64,
            entries,
        })
    }

    /// Where a ring thread holds a request it got while `hold` is set. Every request passes
    /// here: one atomic load unless a takeover runs (a request that saw it clear just before
    /// `hold` is answered, and `settle` waits for it).
    fn hold_point(&self, slot: &Slot) {
        if !self.holding.load(Ordering::SeqCst) {
            return;
        }
        let mut g = self.hold.lock();
        if !self.holding.load(Ordering::SeqCst) {
            return;
        }
        slot.state.lock().held = true;
        while self.holding.load(Ordering::SeqCst) {
            self.held.wait(&mut g);
        }
        slot.state.lock().held = false;
    }
}

/// The rings of a session as one server hands them to the next (`IoUringState::handover`):
/// the entries' memory (`entries_total` entries of `entry_len` bytes from `base`), and the
/// request each entry holds. The kernel keeps the entries' addresses, so the next server maps
/// its own memory at the same place, puts the requests back and answers them from its own
/// rings: each entry is then its own.
#[derive(Debug, Clone)]
pub struct RingHandover {
    /// The address of the first entry.
    pub base: u64,
    /// Bytes from one entry to the next (the header page and the payload buffer).
    pub entry_len: u64,
    /// Entries in the region.
    pub entries_total: u32,
    /// The kernel's queues (possible CPUs).
    pub queues: u32,
    /// Bytes of each entry's payload buffer as registered.
    pub payload: u64,
    /// Every entry, with the request it holds.
    pub entries: Vec<HandedEntry>,
}

/// One entry of a [`RingHandover`]: its place, queue and the request it holds (the header
/// buffer, then the payload the header announces).
#[derive(Debug, Clone)]
pub struct HandedEntry {
    /// Its place in the region.
    pub index: u32,
    /// The queue it was registered on.
    pub qid: u16,
    /// The header buffer (288 bytes) and the payload it announces.
    pub bytes: Vec<u8>,
}

/// Rings handed over, their memory mapped where the kernel expects it: for
/// `Session::adopt_io_uring`. Made before the previous server lets go, so that a failure
/// (the addresses taken in this process) leaves it serving.
#[derive(Debug)]
pub struct AdoptedRings(Arc<IoUringState>);

impl AdoptedRings {
    /// Map the entries' memory at the handed address and put each held request back.
    pub fn map(h: &RingHandover) -> io::Result<AdoptedRings> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let payload = h.payload as usize;
        if h.queues == 0
            || h.entries.len() != h.entries_total as usize
            || Region::entry_len(payload) != h.entry_len as usize
            || payload < MIN_PAYLOAD
        {
            return Err(invalid(format!(
                "io_uring handover: {} of {} entries, {} bytes each for a payload of {payload}",
                h.entries.len(),
                h.entries_total,
                h.entry_len
            )));
        }
        let region = Arc::new(Region::at(
            h.base as usize,
            h.entries_total as usize,
            payload,
        )?);
        let state = IoUringState::new(h.queues as usize, payload, true);
        let mut slots = Vec::with_capacity(h.entries.len());
        for e in &h.entries {
            if e.index >= h.entries_total
                || u32::from(e.qid) >= h.queues
                || e.bytes.len() < HEADER_SIZE
                || e.bytes.len() > HEADER_SIZE + payload
            {
                return Err(invalid(format!(
                    "io_uring handover: entry {} of queue {} with {} bytes",
                    e.index,
                    e.qid,
                    e.bytes.len()
                )));
            }
            let slot = Slot::new(region.clone(), e.index as usize, e.qid);
            // SAFETY: the entry's memory, HEADER_SIZE + payload bytes of the fresh mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(e.bytes.as_ptr(), slot.header(), HEADER_SIZE);
                std::ptr::copy_nonoverlapping(
                    e.bytes[HEADER_SIZE..].as_ptr(),
                    slot.payload(),
                    e.bytes.len() - HEADER_SIZE,
                );
            }
            slots.push(Arc::new(slot));
        }
        state.slots.set(slots).expect("a fresh state has no slots");
        Ok(AdoptedRings(Arc::new(state)))
    }

    pub(crate) fn into_state(self) -> Arc<IoUringState> {
        self.0
    }
}

/// How many queues the kernel makes for a connection: `num_possible_cpus()`, counted from
/// `/sys/devices/system/cpu/possible` (which `sysconf` may undercount on hot-plug machines).
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    count_cpu_list(s.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /sys/devices/system/cpu/possible: {s:?}"),
        )
    })
}

fn count_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

fn new_ring() -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(8)
        .build(4)
}

/// Check, before the INIT reply commits the connection, that this process can make the
/// rings (io_uring may be disabled by sysctl or seccomp) and how many queues to serve.
pub(crate) fn probe(max_write: u32, max_pages: u16) -> io::Result<Arc<IoUringState>> {
    let queues = possible_cpus()?;
    drop(new_ring()?);
    let payload = MIN_PAYLOAD
        .max(max_write as usize)
        .max(usize::from(max_pages) * page_size::get());
    Ok(Arc::new(IoUringState::new(queues, payload, false)))
}

/// The memory of all of a session's entries, one mapping: each entry is a header buffer, then
/// (page aligned) its payload buffer. One mapping, at an address chosen away from where the
/// kernel puts mappings by itself, so that the next server of a takeover can map its own at
/// the same place. Unmapped when the last slot goes, after the rings that registered it.
#[derive(Debug)]
struct Region {
    base: *mut u8,
    len: usize,
    entry_len: usize,
}

// SAFETY: a plain mapping; what is written where is ruled by the slots' locks.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn entry_len(payload: usize) -> usize {
        PAYLOAD_AT + payload.next_multiple_of(page_size::get())
    }

    fn new(entries: usize, payload: usize) -> io::Result<Region> {
        let len = entries * Region::entry_len(payload);
        // A random place in [16 TiB, 48 TiB): x86-64 and arm64 processes (47- or 48-bit
        // address spaces) keep their heap near the program, low, and their mappings near the
        // top. Elsewhere (a smaller address space) wherever the kernel says.
        for _ in 0..4 {
            let mut r = [0u8; 8];
            // SAFETY: fills the 8 bytes given.
            if unsafe { libc::getrandom(r.as_mut_ptr().cast(), 8, 0) } != 8 {
                break;
            }
            let hint = (0x1000_0000_0000 + u64::from_ne_bytes(r) % 0x2000_0000_0000) & !0x1f_ffff;
            if let Ok(region) = Region::map(hint as usize, len, entries, payload) {
                return Ok(region);
            }
        }
        Region::map(0, len, entries, payload)
    }

    /// The region of a previous server, at its address.
    fn at(base: usize, entries: usize, payload: usize) -> io::Result<Region> {
        Region::map(base, entries * Region::entry_len(payload), entries, payload).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mapping the ring entries at {base:#x} as the previous server had them: {e}"
                ),
            )
        })
    }

    /// `at == 0`: anywhere; else exactly there, or an error.
    fn map(at: usize, len: usize, entries: usize, payload: usize) -> io::Result<Region> {
        let fixed = if at == 0 {
            0
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
        // SAFETY: an anonymous private mapping, owned by the returned value; with
        // MAP_FIXED_NOREPLACE it never replaces an existing one.
        let ptr = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if at != 0 && ptr as usize != at {
            // A kernel without MAP_FIXED_NOREPLACE (before 4.17) took it as a hint.
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(ptr, len) };
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(Region {
            base: ptr.cast(),
            len,
            entry_len: len / entries.max(1),
        })
        .inspect(|r| debug_assert_eq!(r.entry_len, Region::entry_len(payload)))
    }

    fn entry(&self, index: usize) -> *mut u8 {
        debug_assert!((index + 1) * self.entry_len <= self.len);
        // SAFETY: within the mapping.
        unsafe { self.base.add(index * self.entry_len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`; the kernel no longer writes to it (the rings that
        // registered its entries are closed before the last slot goes).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The reply side of an entry: a reply, from whichever thread makes it, is written into the
/// entry's buffers; the ring thread then commits it.
pub(crate) struct Slot {
    region: Arc<Region>,
    index: usize,
    qid: u16,
    payload_len: usize,
    state: Mutex<SlotState>,
    replied: Condvar,
}

// SAFETY: the buffers are only written under `state`'s lock, while the kernel does not touch
// them (between a request's arrival and its commit); the mapping lives as long as the slot.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("payload_len", &self.payload_len)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct SlotState {
    /// The request being answered, 0 between requests.
    unique: u64,
    replied: bool,
    /// Kept without an answer while the rings are handed over (`IoUringState::hold`).
    held: bool,
}

impl Slot {
    fn new(region: Arc<Region>, index: usize, qid: u16) -> Slot {
        let payload_len = region.entry_len - PAYLOAD_AT;
        Slot {
            region,
            index,
            qid,
            payload_len,
            state: Mutex::new(SlotState::default()),
            replied: Condvar::new(),
        }
    }

    pub(crate) fn qid(&self) -> u16 {
        self.qid
    }

    fn header(&self) -> *mut u8 {
        self.region.entry(self.index)
    }

    fn payload(&self) -> *mut u8 {
        // SAFETY: within the entry (PAYLOAD_AT + payload_len bytes).
        unsafe { self.header().add(PAYLOAD_AT) }
    }

    /// Write a reply (`fuse_out_header` and its payload, as a /dev/fuse writev would take
    /// them) into the entry.
    pub(crate) fn reply(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > self.payload_len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut st = self.state.lock();
        let mut head = [0u8; OUT_HEADER];
        let mut at = 0;
        for b in bufs {
            for (i, byte) in b.iter().enumerate().take(OUT_HEADER.saturating_sub(at)) {
                head[at + i] = *byte;
            }
            at += b.len();
            if at >= OUT_HEADER {
                break;
            }
        }
        let unique = u64::from_ne_bytes(head[8..16].try_into().expect("8 bytes"));
        if st.unique == 0 || unique != st.unique || st.replied {
            // Not the request this entry holds (answered already, or a stale reply).
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        // SAFETY: the buffers are the entry's (`header` HEADER_SIZE bytes, `payload`
        // `payload_len`), written under the lock while the kernel waits for the commit.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), self.header(), OUT_HEADER);
            let mut skip = OUT_HEADER;
            let mut out = 0;
            for b in bufs {
                let s = &b[skip.min(b.len())..];
                skip -= skip.min(b.len());
                std::ptr::copy_nonoverlapping(s.as_ptr(), self.payload().add(out), s.len());
                out += s.len();
            }
            self.header()
                .add(PAYLOAD_SZ)
                .cast::<u32>()
                .write_unaligned(out as u32);
        }
        st.replied = true;
        self.replied.notify_all();
        Ok(())
    }

    fn begin(&self, unique: u64) {
        let mut st = self.state.lock();
        st.unique = unique;
        st.replied = false;
    }

    /// Wait until the request has its reply (handlers may answer from another thread).
    fn wait(&self) {
        let mut st = self.state.lock();
        while !st.replied {
            self.replied.wait(&mut st);
        }
        st.unique = 0;
    }
}

/// How a ring thread ended.
pub(crate) enum Served {
    /// The connection ended (unmount, abort).
    Ended,
    /// The kernel refused the entry before any request came: it serves the connection through
    /// /dev/fuse now.
    Refused(io::Error),
}

/// Serve one entry (of queue `slot.qid`) until the connection ends. An entry handed over by a
/// previous server starts with the request it holds; another is registered first.
pub(crate) fn serve<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    slot: Arc<Slot>,
    state: &IoUringState,
) -> io::Result<Served> {
    // The slot (and its region) outlives the ring: the kernel holds the entry's buffers (and
    // the registration's iovec) while the ring is open.
    let qid = slot.qid;
    let (header, payload) = (slot.header(), slot.payload());
    let iov = Box::new([
        libc::iovec {
            iov_base: header.cast(),
            iov_len: HEADER_SIZE,
        },
        libc::iovec {
            iov_base: payload.cast(),
            iov_len: state.payload,
        },
    ]);
    let mut ring = new_ring()?;
    ring.submitter()
        .register_files(&[se.ch.as_fd().as_raw_fd()])?;
    // The request, made contiguous as /dev/fuse would give it (8-byte aligned).
    let mut buf = vec![0u64; (IN_HEADER + OP_IN + state.payload).div_ceil(8)];

    let mut cmd = [0u8; 80];
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut register = opcode::UringCmd80::new(types::Fixed(0), CMD_REGISTER)
        .addr(Some(iov.as_ptr() as u64))
        .cmd(cmd)
        .build()
        .user_data(u64::from(CMD_REGISTER));
    // SAFETY: an Entry128 is a 128-byte `io_uring_sqe`; `len` is the u32 at byte 24.
    unsafe {
        (&mut register as *mut squeue::Entry128)
            .cast::<u8>()
            .add(SQE_LEN_OFFSET)
            .cast::<u32>()
            .write_unaligned(2);
    }
    let mut last = register.clone();
    // An adopted entry holds a request already, as if its fetch had just completed.
    let mut fetched = state.adopted;
    let mut pending = state.adopted.then_some(0);
    state.serving.fetch_add(1, Ordering::Relaxed);
    let _serving = Serving(state);
    if !state.adopted {
        // SAFETY: `register`'s iovec (`iov`) lives until the end of this function.
        unsafe { push(&mut ring, &register)? };
    }
    loop {
        let res = match pending.take() {
            Some(res) => res,
            None => {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
                let Some(cqe) = ring.completion().next() else {
                    continue;
                };
                cqe.result()
            }
        };
        if res < 0 {
            match -res {
                libc::EINTR | libc::EAGAIN => {
                    // SAFETY: as above: the iovec and the entry memory are alive.
                    unsafe { push(&mut ring, &last)? };
                    continue;
                }
                libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV => return Ok(Served::Ended),
                e if !fetched => {
                    state.refused.store(true, Ordering::Relaxed);
                    return Ok(Served::Refused(io::Error::from_raw_os_error(e)));
                }
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
        fetched = true;
        // SAFETY: the kernel wrote the request into the entry and waits for its commit.
        let (commit_id, len) =
            match unsafe { copy_request(header, payload, state.payload, &mut buf) } {
                Ok(r) => r,
                // A request this code cannot rebuild: answered EIO below (its commit id is still
                // the kernel's), never left holding the entry and its caller.
                Err(e) => {
                    warn!("FUSE over io_uring: queue {qid}: {e}");
                    // SAFETY: as above.
                    (
                        unsafe { header.add(COMMIT_ID).cast::<u64>().read_unaligned() },
                        0,
                    )
                }
            };
        if commit_id == 0 {
            return Err(io::Error::other(
                "FUSE over io_uring: a request without a commit id",
            ));
        }
        slot.begin(commit_id);
        state.hold_point(&slot);
        // SAFETY: `buf` is a Vec<u64>, so viewing `len` of its bytes is in bounds and aligned.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) };
        let parsed = (len > 0)
            .then(|| RequestWithSender::new(se.ch.ring_sender(slot.clone()), bytes))
            .flatten();
        match parsed {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
            None => {
                // Unparseable: answer EIO so that the entry goes back to the kernel.
                let mut h = [0u8; OUT_HEADER];
                h[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
                h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                h[8..16].copy_from_slice(&commit_id.to_ne_bytes());
                slot.reply(&[IoSlice::new(&h)])?;
            }
        }
        slot.wait();
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
        last = opcode::UringCmd80::new(types::Fixed(0), CMD_COMMIT_AND_FETCH)
            .cmd(cmd)
            .build()
            .user_data(u64::from(CMD_COMMIT_AND_FETCH));
        // SAFETY: the entry memory is alive; the commit reads the reply written into it.
        unsafe { push(&mut ring, &last)? };
    }
}

struct Serving<'a>(&'a IoUringState);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::Relaxed);
    }
}

/// # Safety
/// Whatever the entry points to must stay valid until its completion.
unsafe fn push(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    e: &squeue::Entry128,
) -> io::Result<()> {
    // SAFETY: the caller's promise; the queue has room (one entry in flight per ring).
    unsafe { ring.submission().push(e) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))
}

/// Copy the request in an entry into `buf` as /dev/fuse would give it: `fuse_in_header`, the
/// operation's fixed argument (in the header buffer), then the payload. Returns its unique
/// (the commit id) and length.
///
/// # Safety
/// `header` and `payload` are an entry's buffers (`HEADER_SIZE` and `payload_len` bytes)
/// holding a request the kernel delivered.
unsafe fn copy_request(
    header: *const u8,
    payload: *const u8,
    payload_len: usize,
    buf: &mut [u64],
) -> io::Result<(u64, usize)> {
    // SAFETY: the caller's promise.
    let (commit_id, payload_sz, len) = unsafe {
        (
            header.add(COMMIT_ID).cast::<u64>().read_unaligned(),
            header.add(PAYLOAD_SZ).cast::<u32>().read_unaligned() as usize,
            header.cast::<u32>().read_unaligned() as usize,
        )
    };
    let op_len = len
        .checked_sub(IN_HEADER + payload_sz)
        .filter(|l| *l <= OP_IN && payload_sz <= payload_len)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("io_uring entry: request of {len} bytes with a payload of {payload_sz}"),
            )
        })?;
    if commit_id == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "io_uring entry: a request without a commit id",
        ));
    }
    let out = buf.as_mut_ptr().cast::<u8>();
    debug_assert!(len <= buf.len() * 8);
    // SAFETY: `buf` holds IN_HEADER + OP_IN + payload_len bytes; the sources are the caller's.
    unsafe {
        std::ptr::copy_nonoverlapping(header, out, IN_HEADER);
        std::ptr::copy_nonoverlapping(header.add(OP_IN), out.add(IN_HEADER), op_len);
        std::ptr::copy_nonoverlapping(payload, out.add(IN_HEADER + op_len), payload_sz);
    }
    Ok((commit_id, len))
}

/// Run the calling thread on the CPU whose requests queue `qid` holds (the kernel's queue of a
/// request is the CPU its caller runs on), when this process may run there: the request is
/// answered where it was made, with no cross-CPU wake-up (measured: untar, rm -rf and warm
/// `ls -lR` through ferryfs 1.2-2x faster than unpinned). Outside the allowed CPUs (a
/// cpuset), the thread is left unpinned.
fn pin_to_queue_cpu(qid: u16) {
    let cpu = usize::from(qid);
    // SAFETY: cpu_set_t values on the stack, read and set for this thread only; CPU_ISSET and
    // CPU_SET are given an index below CPU_SETSIZE.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize
            || libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0
            || !libc::CPU_ISSET(cpu, &allowed)
        {
            debug!("FUSE over io_uring: queue {qid}'s thread not pinned (CPU not allowed here)");
            return;
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            debug!(
                "FUSE over io_uring: pinning queue {qid}'s thread: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Run a ring thread; if the kernel refuses its entry, serve /dev/fuse instead.
pub(crate) fn ring_thread<FS: Filesystem>(
    se: SessionEventLoop<FS>,
    slot: Arc<Slot>,
    state: Arc<IoUringState>,
) -> io::Result<()> {
    let qid = slot.qid;
    pin_to_queue_cpu(qid);
    match serve(&se, slot, &state) {
        Ok(Served::Ended) => Ok(()),
        Ok(Served::Refused(e)) => {
            warn!(
                "FUSE over io_uring: the kernel refused queue {qid}'s entry ({e}); serving through /dev/fuse"
            );
            se.event_loop()
        }
        Err(e) => {
            debug!("FUSE over io_uring: queue {qid}: {e}");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_entries_are_mapped_at_the_same_address_with_their_requests() {
        let payload = 8192;
        let state = IoUringState::new(2, payload, false);
        let slots = state.slots(3).unwrap().to_vec();
        assert_eq!(
            slots.iter().map(|s| s.qid).collect::<Vec<_>>(),
            [0, 1, 0],
            "round robin over the queues"
        );
        let region = slots[0].region.clone();
        let base = region.base as usize;
        assert!(
            (0x1000_0000_0000..0x3000_0000_0000).contains(&base),
            "the region is placed away from the kernel's own choices: {base:#x}"
        );
        // Nothing to hand over while an entry is free or being answered.
        state.hold();
        assert_eq!(state.settle(Duration::from_millis(10)).unwrap(), [0, 1, 0]);
        assert!(state.handover().is_err());
        for (i, slot) in slots.iter().enumerate() {
            unsafe {
                slot.header().cast::<u32>().write_unaligned(40 + 3);
                slot.header()
                    .add(COMMIT_ID)
                    .cast::<u64>()
                    .write_unaligned(100 + i as u64);
                slot.header()
                    .add(PAYLOAD_SZ)
                    .cast::<u32>()
                    .write_unaligned(3);
                std::ptr::copy_nonoverlapping(b"abc".as_ptr(), slot.payload(), 3);
            }
            slot.begin(100 + i as u64);
        }
        // Being answered (not held yet): settle waits, then gives up.
        assert!(state.settle(Duration::from_millis(10)).is_err());
        for slot in &slots {
            slot.state.lock().held = true;
        }
        assert!(state.settle(Duration::from_millis(10)).unwrap().is_empty());
        let h = state.handover().unwrap();
        assert_eq!((h.base as usize, h.entries_total, h.queues), (base, 3, 2));
        assert!(h.entries.iter().all(|e| e.bytes.len() == HEADER_SIZE + 3));
        // The address is taken here: mapping the entries again fails, and changes nothing.
        let err = AdoptedRings::map(&h).unwrap_err();
        assert!(err.to_string().contains("previous server"), "{err}");
        drop((slots, region));
        state.release();
        drop(state);
        // Free again (the old server gone): the entries come back where they were, with the
        // requests they held.
        let adopted = AdoptedRings::map(&h).unwrap().into_state();
        let slots = adopted.slots(99).unwrap();
        assert_eq!(slots.len(), 3, "the handed entries, whatever was asked");
        assert!(adopted.adopted);
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(slot.header() as usize, base + i * h.entry_len as usize);
            unsafe {
                assert_eq!(
                    slot.header().add(COMMIT_ID).cast::<u64>().read_unaligned(),
                    100 + i as u64
                );
                assert_eq!(std::slice::from_raw_parts(slot.payload(), 3), b"abc");
            }
        }
        // A handover that does not add up is refused.
        let mut bad = h.clone();
        bad.entries.pop();
        assert!(AdoptedRings::map(&bad).is_err());
    }

    #[test]
    fn cpu_lists_count_as_the_kernel_counts_possible_cpus() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("0,2,4"), Some(3));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn a_request_is_rebuilt_as_dev_fuse_gives_it_and_a_reply_lands_in_the_entry() {
        let payload_len = 8192;
        let slot = Slot::new(Arc::new(Region::new(1, payload_len).unwrap()), 0, 0);
        let (header, payload) = (slot.header(), slot.payload());
        // A WRITE: in_header (len = 40 + 40 + 5), fuse_write_in (40 bytes), 5 data bytes.
        unsafe {
            header.cast::<u32>().write_unaligned(85);
            header.add(4).cast::<u32>().write_unaligned(16);
            header.add(8).cast::<u64>().write_unaligned(42);
            for i in 0..40 {
                *header.add(OP_IN + i) = i as u8;
            }
            std::ptr::copy_nonoverlapping(b"hello".as_ptr(), payload, 5);
            header.add(COMMIT_ID).cast::<u64>().write_unaligned(42);
            header.add(PAYLOAD_SZ).cast::<u32>().write_unaligned(5);
        }
        let mut buf = vec![0u64; (IN_HEADER + OP_IN + payload_len).div_ceil(8)];
        let (id, len) = unsafe { copy_request(header, payload, payload_len, &mut buf).unwrap() };
        assert_eq!((id, len), (42, 85));
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) };
        assert_eq!(&bytes[0..4], &85u32.to_ne_bytes());
        assert_eq!(bytes[IN_HEADER + 39], 39);
        assert_eq!(&bytes[80..85], b"hello");
        // A header claiming more than fits is refused.
        unsafe { header.cast::<u32>().write_unaligned(40 + 200 + 5) };
        assert!(unsafe { copy_request(header, payload, payload_len, &mut buf) }.is_err());

        slot.begin(42);
        let mut out = [0u8; OUT_HEADER];
        out[0..4].copy_from_slice(&24u32.to_ne_bytes());
        out[8..16].copy_from_slice(&7u64.to_ne_bytes());
        // Another request's reply is refused.
        assert!(
            slot.reply(&[IoSlice::new(&out), IoSlice::new(b"12345678")])
                .is_err()
        );
        out[8..16].copy_from_slice(&42u64.to_ne_bytes());
        // The header split across slices, as a caller may give it.
        slot.reply(&[
            IoSlice::new(&out[..10]),
            IoSlice::new(&out[10..]),
            IoSlice::new(b"1234"),
            IoSlice::new(b"5678"),
        ])
        .unwrap();
        slot.wait();
        unsafe {
            assert_eq!(header.cast::<u32>().read_unaligned(), 24);
            assert_eq!(header.add(8).cast::<u64>().read_unaligned(), 42);
            assert_eq!(header.add(PAYLOAD_SZ).cast::<u32>().read_unaligned(), 8);
            assert_eq!(std::slice::from_raw_parts(payload, 8), b"12345678");
        }
        // A second reply to the same request is refused.
        assert!(slot.reply(&[IoSlice::new(&out)]).is_err());
    }
}
