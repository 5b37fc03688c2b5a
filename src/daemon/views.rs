//! Views left behind and views to end: detaching the mounts of a killed daemon before its
//! migration is served or worked on again, and `ferryfs unmount`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::fuse::mount::{self, FS_TYPE};
use crate::state::Migration;
use crate::state::layout;

/// Detach ferryfs mounts at `path` whose daemon is gone (killed, OOM): no daemon holds their
/// state dir's lock. `own_state` is ours, locked by this process, so any mount of it is dead.
/// A live view of another migration is refused. A dead mount cannot be told apart by stat: the
/// kernel keeps answering from its attribute cache for a while after the daemon died.
pub fn clear_dead_mounts(path: &Path, own_state: &Path) -> Result<(), String> {
    while let Some(src) = mount::ferryfs_mount_at(path) {
        let state = mount::state_of_source(&src);
        if state != own_state && layout::is_held(&state) {
            return Err(format!(
                "{} is already a live ferryfs view ({src}); unmount it first",
                path.display()
            ));
        }
        tracing::warn!(path = %path.display(), %src, "detaching a dead view left by a killed daemon");
        mount::detach(path)
            .map_err(|e| format!("{}: cannot detach dead mount: {e}", path.display()))?;
    }
    Ok(())
}

/// Before the CLI works on a migration without a daemon: detach views a killed daemon of this
/// state dir left over its stores (OLD's own path, when it was mounted in place).
pub fn clear_dead_views(m: &Migration) -> Result<(), String> {
    let state_abs = std::fs::canonicalize(&m.dir).unwrap_or(m.dir.clone());
    for p in [m.config.old.posix_path(), m.config.new.posix_path()]
        .into_iter()
        .flatten()
    {
        clear_dead_mounts(p, &state_abs)?;
    }
    Ok(())
}

/// `ferryfs unmount`: unmount, then wait until the daemon has released its state dir.
pub fn unmount(mp: &Path) -> Result<(), String> {
    let source = mount::ferryfs_mount_at(mp)
        .ok_or_else(|| format!("{} is not a ferryfs mount", mp.display()))?;
    mount::unmount_retrying_busy(mp).map_err(|e| {
        if e == rustix::io::Errno::BUSY {
            format!(
                "{}: busy (files are open in the view); close them and retry",
                mp.display()
            )
        } else {
            format!("{}: {e}", mp.display())
        }
    })?;
    if let Some(state) = source.strip_prefix(&format!("{FS_TYPE}:")) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !layout::is_held(Path::new(state)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(format!(
            "unmounted, but the daemon for {state} has not exited after 30 s"
        ));
    }
    Ok(())
}
