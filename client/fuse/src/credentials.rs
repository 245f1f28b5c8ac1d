//! Who is asking: a request's uid and gid, and the supplementary groups of
//! its process from `/proc/<pid>/status`, as the [`User`] every metadata
//! request carries.
//!
//! The kernel gives a FUSE request only the caller's uid, gid and pid; the
//! metadata service needs the supplementary groups as well to decide
//! group permissions the way the local kernel would.

use flyfs_proto::wire::meta::User;
use fuser::Request;

/// The caller's credentials. Supplementary groups come from
/// `/proc/<pid>/status`, read anew for every request (group membership
/// changes with `newgrp` and `setgroups`); a caller whose process cannot
/// be seen (pid 0: a kernel-internal request) has none.
pub(crate) fn user_of(uid: u32, gid: u32, pid: u32) -> User {
    User {
        uid,
        gid,
        groups: groups_of(pid),
    }
}

fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Credentials of a request, taken in the callback (the request is gone by
/// the time the task runs) but resolved in the task.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    uid: u32,
    gid: u32,
    pid: u32,
}

impl Caller {
    pub(crate) fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    pub(crate) fn user(self) -> User {
        user_of(self.uid, self.gid, self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_of_this_process() {
        let pid = std::process::id();
        // Whatever they are, they parse (and a missing pid has none).
        let _ = groups_of(pid);
        assert!(groups_of(0).is_empty());
        assert!(groups_of(u32::MAX).is_empty());
    }
}
