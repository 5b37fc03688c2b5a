//! The daemon process's own set-up: which thread sees termination signals.

/// The signals that end a daemon with a clean unmount.
fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; sigaddset only writes it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block SIGTERM/SIGINT/SIGHUP in every thread (call before spawning any), so only the signal
/// thread's sigwait sees them and the view shuts down through a clean unmount.
pub fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: pthread_sigmask only reads the set, which lives across the call.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait until a termination signal arrives (they are blocked: see above).
pub fn wait_for_termination() {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: sigwait reads the set and writes the received signal number into `sig`.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
}
