//! Metadata changes that copy no data (overlayfs's metacopy, at file level): a chmod, chown,
//! utimens, setxattr or removexattr of a file whose data is still only in OLD is recorded in
//! the journal ([`MetaChange`], keyed by OLD's inode, durable before the reply) instead of
//! copying the file into NEW. The view shows it over OLD's attributes; reads keep falling
//! through to OLD. The copy that NEW takes later (the copier's, or a write's copy-up) carries
//! it and is then the view's own (no copy record: verify does not compare it with OLD); abort
//! writes it into OLD's file.
//!
//! Left to a copy-up, as before: changes to anything but a regular file, a file in an S3 OLD,
//! a file that has an ACL (a chmod changes its ACL's mask), and `system.*` attributes (ACLs,
//! whose changes change the mode).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::journal::{Batch, MetaChange};
use crate::store::posix::Loc;
use crate::view::error::{Context, Error, Result};

use super::attr::{Attr, ts};
use super::inode::Inode;
use super::{Kind, View};

/// The ACL attribute whose presence keeps a chmod out of the journal.
const ACL_ACCESS: &str = "system.posix_acl_access";
/// Dropped by every chown of a file, as Linux drops it.
const CAPABILITY: &[u8] = b"security.capability";

fn now() -> (i64, i64) {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, i64::from(d.subsec_nanos()))
}

fn systime(t: SystemTime) -> (i64, i64) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (
                    -(d.as_secs() as i64) - 1,
                    1_000_000_000 - i64::from(d.subsec_nanos()),
                )
            }
        }
    }
}

/// One change a setattr asks for, in the journal's terms.
pub(crate) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `Some(None)`: now.
    pub atime: Option<Option<SystemTime>>,
    pub mtime: Option<Option<SystemTime>>,
}

/// `a` as the view shows it: OLD's attributes under the view's changes.
pub(crate) fn show(a: &mut Attr, m: &MetaChange) {
    if let Some(mode) = m.mode {
        a.perm = (mode & 0o7777) as u16;
    }
    if let Some(uid) = m.uid {
        a.uid = uid;
    }
    if let Some(gid) = m.gid {
        a.gid = gid;
    }
    if let Some((s, n)) = m.atime {
        a.atime = ts(s, n);
    }
    if let Some((s, n)) = m.mtime {
        a.mtime = ts(s, n);
    }
    a.ctime = a.ctime.max(ts(m.ctime.0, m.ctime.1));
}

/// Write `m` onto the file at `loc` (NEW's copy before it is named, or OLD's file at abort):
/// owner first (which drops set-id bits and capabilities, as the view showed), then extended
/// attributes, mode, and times last.
pub(crate) fn apply(loc: &Loc, m: &MetaChange) -> Result<()> {
    if m.uid.is_some() || m.gid.is_some() {
        loc.chown(m.uid, m.gid)
            .ctx("chown (a change made through the view)")?;
    }
    for (name, value) in &m.xattrs {
        let name = OsStr::from_bytes(name);
        let r = match value {
            Some(v) => loc.setxattr(name, v, rustix::fs::XattrFlags::empty()),
            None => loc.removexattr(name),
        };
        match r {
            Err(e) if value.is_none() && e.raw_os_error() == Some(libc::ENODATA) => {}
            r => r.ctx("xattr (a change made through the view)")?,
        }
    }
    if let Some(mode) = m.mode {
        loc.chmod(mode)
            .ctx("chmod (a change made through the view)")?;
    }
    if m.atime.is_some() || m.mtime.is_some() {
        let t = |v: Option<(i64, i64)>| match v {
            Some((s, n)) => rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: n as _,
            },
            None => rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT as _,
            },
        };
        loc.utimens(&rustix::fs::Timestamps {
            last_access: t(m.atime),
            last_modification: t(m.mtime),
        })
        .ctx("utimens (a change made through the view)")?;
    }
    Ok(())
}

/// Whether the extended attribute `name` exists on OLD's file `old` as the view shows it.
fn has_xattr(m: &MetaChange, old: &Loc, name: &OsStr) -> Result<bool> {
    if let Some(v) = m.xattrs.get(name.as_bytes()) {
        return Ok(v.is_some());
    }
    match old.getxattr(name, &mut []) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
        Err(e) => Err(e).ctx("getxattr OLD"),
    }
}

/// A change to an extended attribute.
pub(crate) enum XattrChange<'a> {
    Set { value: &'a [u8], flags: i32 },
    Remove,
}

impl View {
    /// The metadata change recorded for `inode`, an OLD-only file whose OLD stat is `st`
    /// (read when the view learns of the file).
    pub(crate) fn load_meta_change(&self, inode: &Inode, st: &rustix::fs::Stat) -> Result<()> {
        if inode.kind != Kind::File {
            return Ok(());
        }
        let m = self.journal.meta_change(st.st_dev, st.st_ino)?;
        let mut n = inode.node();
        if n.new.is_none() {
            n.meta = m.map(Box::new);
        }
        Ok(())
    }

    /// The metadata change the view shows for `inode`, if its data is still OLD's only.
    pub(crate) fn meta_change_of(&self, inode: &Inode) -> Option<MetaChange> {
        let n = inode.node();
        if n.new.is_some() {
            return None;
        }
        n.meta.as_deref().cloned()
    }

    /// Record a change of `inode`'s metadata without copying its data, if it is an OLD-only
    /// regular file of a POSIX OLD: `f` makes the change on the recorded one (given OLD's file
    /// and stat) and says whether it can be recorded at all. Returns whether it was recorded
    /// (else the caller copies the file up and changes NEW's copy).
    fn change_meta_only(
        &self,
        inode: &Inode,
        f: impl FnOnce(&mut MetaChange, &Loc, &rustix::fs::Stat) -> Result<bool>,
    ) -> Result<bool> {
        let eligible = |inode: &Inode| {
            let n = inode.node();
            inode.kind == Kind::File
                && n.new.is_none()
                && n.old.as_ref().is_some_and(|o| o.loc.object().is_none())
        };
        if self.is_single() || !eligible(inode) {
            return Ok(false);
        }
        // A copy in flight gives way, as to a copy-up; one made already and waiting for its
        // name checks for the change under the namespace lock before it takes its name.
        inode.cancel.store(true, Ordering::Release);
        let _claim = inode.claim.lock().unwrap_or_else(|p| p.into_inner());
        inode.cancel.store(false, Ordering::Release);
        let _ns = self.ns.read().unwrap_or_else(|p| p.into_inner());
        if !eligible(inode) {
            return Ok(false);
        }
        let Some(old) = inode.node().old.clone() else {
            return Ok(false);
        };
        let st = old.loc.stat().ctx("stat OLD file")?;
        let mut m = self.meta_change_of(inode).unwrap_or_default();
        if !f(&mut m, &old.loc, &st)? {
            return Ok(false);
        }
        m.ctime = now();
        let mut b = Batch::new();
        b.meta_change(st.st_dev, st.st_ino, &m);
        // Acknowledged changes survive a crash, as a change in NEW would.
        self.journal.commit(b, true)?;
        inode.node().meta = Some(Box::new(m));
        crate::metrics::METRICS.meta_change();
        Ok(true)
    }

    /// chmod, chown, utimens of an OLD-only file, recorded (see [`Self::change_meta_only`]).
    pub(crate) fn change_attrs_only(&self, inode: &Inode, c: &AttrChange) -> Result<bool> {
        self.change_meta_only(inode, |m, old, st| {
            if c.mode.is_some() {
                match old.getxattr(OsStr::new(ACL_ACCESS), &mut []) {
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                    // An ACL (whose mask a chmod changes), or no answer: copied up.
                    _ => return Ok(false),
                }
            }
            if c.uid.is_some() || c.gid.is_some() {
                if let Some(u) = c.uid {
                    m.uid = Some(u);
                }
                if let Some(g) = c.gid {
                    m.gid = Some(g);
                }
                // A chown of a file drops its set-user-ID bit, its set-group-ID bit when group
                // execution is on, and its capabilities: Linux does, so NEW's copy would.
                let cur = m.mode.unwrap_or(st.st_mode & 0o7777);
                let mut mode = cur & !libc::S_ISUID;
                if cur & libc::S_IXGRP != 0 {
                    mode &= !libc::S_ISGID;
                }
                if mode != cur {
                    m.mode = Some(mode);
                }
                m.xattrs.insert(CAPABILITY.to_vec(), None);
            }
            if let Some(mode) = c.mode {
                m.mode = Some(mode & 0o7777);
            }
            let when = |t: Option<SystemTime>| t.map_or_else(now, systime);
            if let Some(t) = c.atime {
                m.atime = Some(when(t));
            }
            if let Some(t) = c.mtime {
                m.mtime = Some(when(t));
            }
            Ok(true)
        })
    }

    /// setxattr or removexattr of an OLD-only file, recorded (see [`Self::change_meta_only`]);
    /// the flags' EEXIST and ENODATA as the view shows the file.
    pub(crate) fn change_xattr_only(
        &self,
        inode: &Inode,
        name: &OsStr,
        c: XattrChange<'_>,
    ) -> Result<bool> {
        if name.as_bytes().starts_with(b"system.") {
            return Ok(false);
        }
        self.change_meta_only(inode, |m, old, _| {
            let exists = has_xattr(m, old, name)?;
            let value = match c {
                XattrChange::Set { value, flags } => {
                    if flags & libc::XATTR_CREATE != 0 && exists {
                        return Err(Error::refused(libc::EEXIST, "setxattr: exists"));
                    }
                    if flags & libc::XATTR_REPLACE != 0 && !exists {
                        return Err(Error::refused(libc::ENODATA, "setxattr: no such attribute"));
                    }
                    Some(value.to_vec())
                }
                XattrChange::Remove if !exists => {
                    return Err(Error::refused(
                        libc::ENODATA,
                        "removexattr: no such attribute",
                    ));
                }
                XattrChange::Remove => None,
            };
            m.xattrs.insert(name.as_bytes().to_vec(), value);
            Ok(true)
        })
    }

    /// getxattr of an OLD-only file whose attribute `name` the view changed: `Some(value)`,
    /// or `Some(None)` for one it removed; `None` where OLD's answer stands.
    pub(crate) fn changed_xattr(&self, inode: &Inode, name: &OsStr) -> Option<Option<Vec<u8>>> {
        let n = inode.node();
        if n.new.is_some() {
            return None;
        }
        n.meta.as_ref()?.xattrs.get(name.as_bytes()).cloned()
    }

    /// listxattr of an OLD-only file whose attributes the view changed: OLD's names with the
    /// view's changes (NUL-terminated names, as the kernel wants them); `None` where OLD's
    /// answer stands.
    pub(crate) fn changed_xattr_names(&self, inode: &Inode, old: &Loc) -> Result<Option<Vec<u8>>> {
        let changes = match self.meta_change_of(inode) {
            Some(m) if !m.xattrs.is_empty() => m.xattrs,
            _ => return Ok(None),
        };
        let mut buf = vec![0u8; old.listxattr(&mut []).ctx("listxattr OLD")?];
        let n = old.listxattr(&mut buf).ctx("listxattr OLD")?;
        buf.truncate(n);
        let mut names: Vec<Vec<u8>> = buf
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty() && !changes.contains_key(*s))
            .map(<[u8]>::to_vec)
            .collect();
        names.extend(
            changes
                .into_iter()
                .filter_map(|(k, v)| v.is_some().then_some(k)),
        );
        let mut out = Vec::new();
        for name in names {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(Some(out))
    }
}
