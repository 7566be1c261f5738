//! Dropping root once the privileged work is done: the listeners are bound, the XDP program is
//! attached and the map fds are open (map reads and writes through an open fd need no
//! capability). The agent then runs as `agent.user` with no capabilities, except CAP_NET_RAW
//! in transparent mode (IP_TRANSPARENT on each upstream socket needs it), and with
//! no_new_privs set.
//!
//! Linux keeps uids and capabilities per thread, and these are raw syscalls: the switch must
//! happen while the process has one thread, before the async runtime and the ban worker start.
//! [`drop_to`] checks that.

use rustix::thread::{CapabilitySet, CapabilitySets};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "agent.user {user:?} does not exist: create it (useradd --system --no-create-home --shell \
         /usr/sbin/nologin {user}, or `cargo xtask setup`), or set agent.user = \"\" to stay root"
    )]
    NoSuchUser { user: String },
    #[error("cannot read /etc/passwd to find agent.user: {0}")]
    Passwd(std::io::Error),
    #[error("cannot switch to user {user}: {step}: {source}")]
    Switch { user: String, step: &'static str, source: std::io::Error },
    #[error(
        "internal error: privileges must be dropped while the process has one thread ({threads} \
         now)"
    )]
    Threads { threads: usize },
}

/// A user as /etc/passwd gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Finds `name` in passwd-format `text`.
pub fn find_user(text: &str, name: &str) -> Option<User> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == name).then(|| {
            Some(User {
                name: name.to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            })
        })?
    })
}

pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
    let text = std::fs::read_to_string("/etc/passwd").map_err(PrivilegeError::Passwd)?;
    find_user(&text, name).ok_or_else(|| PrivilegeError::NoSuchUser { user: name.to_owned() })
}

/// The id of group `name` in group-format `text` (/etc/group).
pub fn find_group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 3 && fields[0] == name).then(|| fields[2].parse().ok())?
    })
}

/// Threads of this process, from /proc/self/status.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(1)
}

/// Switches the (single-threaded) process to `user`, keeping only `keep` capabilities.
pub fn drop_to(user: &User, keep: CapabilitySet) -> Result<(), PrivilegeError> {
    let threads = threads();
    if threads != 1 {
        return Err(PrivilegeError::Threads { threads });
    }
    let fail = |step| {
        move |source: rustix::io::Errno| PrivilegeError::Switch {
            user: user.name.clone(),
            step,
            source: source.into(),
        }
    };
    let uid = rustix::process::Uid::from_raw(user.uid);
    let gid = rustix::process::Gid::from_raw(user.gid);
    rustix::thread::set_keep_capabilities(!keep.is_empty()).map_err(fail("PR_SET_KEEPCAPS"))?;
    rustix::thread::set_thread_groups(&[gid]).map_err(fail("setgroups"))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(fail("setresgid"))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(fail("setresuid"))?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets { effective: keep, permitted: keep, inheritable: CapabilitySet::empty() },
    )
    .map_err(fail("capset"))?;
    rustix::thread::set_keep_capabilities(false).map_err(fail("PR_SET_KEEPCAPS"))?;
    rustix::thread::set_no_new_privs(true).map_err(fail("PR_SET_NO_NEW_PRIVS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_in_passwd_text() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      helo-filter:x:998:997::/nonexistent:/usr/sbin/nologin\n\
                      broken:x:notanumber:1::/:/bin/false\n";
        assert_eq!(
            find_user(passwd, "helo-filter"),
            Some(User { name: "helo-filter".into(), uid: 998, gid: 997 })
        );
        assert_eq!(find_user(passwd, "helo"), None, "whole names only");
        assert_eq!(find_user(passwd, "broken"), None);
    }
}
