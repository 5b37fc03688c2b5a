//! A requesting process's privileges, for the one decision the kernel leaves to the daemon:
//! which set-id bits an `O_TRUNC` open clears (see [`setid_bits_to_kill`]).

/// CAP_FSETID's bit in a capability set.
const CAP_FSETID: u32 = 4;

/// What /proc/PID/status says of a process's file-system credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub fsgid: u32,
    pub groups: Vec<u32>,
    /// CAP_FSETID in the effective set.
    pub fsetid: bool,
}

impl Creds {
    /// The credentials of process `pid`; `None` when they cannot be read (gone, or a
    /// malformed status). A process in another user namespace than the daemon's is taken to
    /// hold no capability here (the kernel checks them in the initial namespace).
    pub fn of(pid: u32) -> Option<Creds> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mut c = parse_status(&status)?;
        let ns = |p: String| std::fs::read_link(p).ok();
        if ns(format!("/proc/{pid}/ns/user")) != ns("/proc/self/ns/user".into()) {
            c.fsetid = false;
        }
        Some(c)
    }
}

/// The `Gid:` (fourth field: the fs gid), `Groups:` and `CapEff:` lines of a status file.
pub fn parse_status(status: &str) -> Option<Creds> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let fsgid = field("Gid:")?.split_whitespace().nth(3)?.parse().ok()?;
    let groups = field("Groups:")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    let cap_eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some(Creds {
        fsgid,
        groups,
        fsetid: cap_eff & (1 << CAP_FSETID) != 0,
    })
}

/// The set-id bits of a regular file with `mode` and group `gid` that a truncate by a process
/// with `creds` clears, as the kernel decides it for a native file system: S_ISUID; S_ISGID
/// when the file is group-executable or the caller is not in its group; nothing for a caller
/// with CAP_FSETID. Unknown credentials (`None`) clear every set-id bit: the safe side.
pub fn setid_bits_to_kill(mode: u32, gid: u32, creds: Option<&Creds>) -> u32 {
    let suid = mode & libc::S_ISUID;
    let sgid = mode & libc::S_ISGID;
    if suid | sgid == 0 {
        return 0;
    }
    let Some(c) = creds else { return suid | sgid };
    if c.fsetid {
        return 0;
    }
    let in_group = c.fsgid == gid || c.groups.contains(&gid);
    let sgid = if mode & libc::S_IXGRP != 0 || !in_group {
        sgid
    } else {
        0
    };
    suid | sgid
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nUmask:\t0022\nState:\tS (sleeping)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t100\t100\t100\t101\n\
        Groups:\t100 200 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\n";

    #[test]
    fn status_gives_fsgid_groups_and_fsetid() {
        let c = parse_status(STATUS).unwrap();
        assert_eq!(c.fsgid, 101, "the fourth Gid field is the fs gid");
        assert_eq!(c.groups, vec![100, 200]);
        assert!(!c.fsetid);
        let root = STATUS
            .replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff")
            .replace("Groups:\t100 200 ", "Groups:\t");
        let r = parse_status(&root).unwrap();
        assert!(r.fsetid);
        assert!(r.groups.is_empty());
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn which_bits_a_truncate_clears() {
        let user = Creds {
            fsgid: 100,
            groups: vec![200],
            fsetid: false,
        };
        let root = Creds {
            fsetid: true,
            ..user.clone()
        };
        // set-uid always; set-gid when group-executable.
        assert_eq!(setid_bits_to_kill(0o6755, 100, Some(&user)), 0o6000);
        // set-gid without group exec (a locking mark) stays for a member of the group...
        assert_eq!(setid_bits_to_kill(0o2744, 200, Some(&user)), 0);
        // ... and goes for anyone else.
        assert_eq!(setid_bits_to_kill(0o2744, 300, Some(&user)), 0o2000);
        assert_eq!(setid_bits_to_kill(0o6777, 300, Some(&root)), 0);
        assert_eq!(setid_bits_to_kill(0o0777, 300, Some(&user)), 0);
        assert_eq!(setid_bits_to_kill(0o6744, 100, None), 0o6000);
    }
}
