//! Who ran a CLI command, as the operating system saw it: recorded as the audit
//! actor of what the command did, so "who rotated the key at 03:12" has an
//! answer better than `cli`.
//!
//! The control socket admits only the server's own user, so the peer's uid
//! alone names the service account, not the person. Linux keeps the uid a
//! session logged in with (`/proc/PID/loginuid`, set by `pam_loginuid` and kept
//! across `sudo`/`su`), which names the person behind `sudo -u aragora`. Both
//! come from the kernel (the socket's `SO_PEERCRED` and procfs), never from what
//! the client says about itself.

use std::path::Path;

/// Longest `/etc/passwd` read when resolving a uid (a larger one is not read).
const MAX_PASSWD_BYTES: u64 = 4 << 20;
/// `loginuid` of a process no login session started (a daemon, `kubectl exec`).
const NO_LOGIN_UID: u32 = u32::MAX;

/// The OS identity of a command's caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    uid: u32,
    login_uid: Option<u32>,
    pid: Option<i32>,
}

impl Operator {
    /// The peer of a control socket connection.
    pub fn of_peer(uid: u32, pid: Option<i32>) -> Self {
        let login_uid = pid.and_then(|p| read_login_uid(&format!("/proc/{p}/loginuid")));
        Self {
            uid,
            login_uid,
            pid,
        }
    }

    /// This process (the CLI acting on a stopped server's store itself).
    pub fn of_this_process() -> Self {
        let pid = i32::try_from(std::process::id()).ok();
        let uid = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(NO_LOGIN_UID);
        Self {
            uid,
            login_uid: read_login_uid("/proc/self/loginuid"),
            pid,
        }
    }

    /// The audit actor: `cli:NAME`, NAME being the login user when the
    /// session has one, else the user the command ran as (a name when
    /// `/etc/passwd` has it, else `uid=N`).
    pub fn actor(&self) -> String {
        format!("cli:{}", user_name(self.login_uid.unwrap_or(self.uid)))
    }

    /// Everything known, for the log line of a control command.
    pub fn describe(&self) -> String {
        let mut s = format!("uid={}({})", self.uid, user_name(self.uid));
        if let Some(l) = self.login_uid {
            s.push_str(&format!(" loginuid={l}({})", user_name(l)));
        }
        if let Some(p) = self.pid {
            s.push_str(&format!(" pid={p}"));
        }
        s
    }
}

fn read_login_uid(path: &str) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&u| u != NO_LOGIN_UID)
}

/// The name `/etc/passwd` gives `uid`, or `uid=N`. Names are kept only when
/// they are plain (an odd byte in a passwd file never reaches an audit actor).
fn user_name(uid: u32) -> String {
    passwd_name(Path::new("/etc/passwd"), uid).unwrap_or_else(|| format!("uid={uid}"))
}

fn passwd_name(passwd: &Path, uid: u32) -> Option<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(passwd)
        .ok()?
        .take(MAX_PASSWD_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let entry_uid = fields.nth(1)?.parse::<u32>().ok()?;
        let plain = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        (entry_uid == uid && plain).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_passwd_and_odd_ones_are_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n\
             bad name:x:1001:1001::/:/bin/sh\nbroken line\n",
        )
        .expect("write");
        assert_eq!(passwd_name(&passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(passwd_name(&passwd, 0).as_deref(), Some("root"));
        assert_eq!(passwd_name(&passwd, 1001), None, "a name with a space");
        assert_eq!(passwd_name(&passwd, 4242), None);
    }

    #[test]
    fn the_login_user_names_the_actor_when_there_is_one() {
        let op = Operator {
            uid: 4242,
            login_uid: None,
            pid: Some(1),
        };
        assert_eq!(op.actor(), "cli:uid=4242");
        let behind_sudo = Operator {
            uid: 4242,
            login_uid: Some(4343),
            pid: Some(1),
        };
        assert_eq!(behind_sudo.actor(), "cli:uid=4343");
        assert!(behind_sudo.describe().contains("loginuid=4343"));
    }

    #[test]
    fn this_process_is_described_by_the_kernel() {
        let me = Operator::of_this_process();
        assert!(me.actor().starts_with("cli:"));
        assert!(me.pid.is_some());
    }
}
