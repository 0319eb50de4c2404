//! Who a process or file operation runs as: `/etc/passwd` and `/etc/group`
//! parsed here (no NSS: the rootfs may lack its modules, and a static view of
//! the files is what the guest user edits), and the resolution of a
//! [`UserSpec`] to a kernel identity.
//!
//! It does not switch identities; `fsid` and `process` do that.

use std::path::PathBuf;

use ember_guest_api::UserSpec;

use crate::error::AgentError;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// What the kernel needs to act as a user, plus what its environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, primary gid included.
    pub groups: Vec<u32>,
    /// The user name, when `/etc/passwd` knows the uid.
    pub name: Option<String>,
    pub home: String,
    pub shell: String,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Lines that do not parse (comments, NIS `+` entries, garbage) are skipped:
/// one bad line must not lock every user out.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
                shell: f[6].to_owned(),
            })
        })
        .collect()
}

pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` against parsed files. A name must exist; a uid need not
/// (it then gets gid = uid, no other groups, `HOME=/`), as container
/// runtimes allow.
pub fn resolve(spec: &UserSpec, passwd: &[PasswdEntry], groups: &[GroupEntry]) -> Option<Identity> {
    let entry = match spec {
        UserSpec::Name(name) => Some(passwd.iter().find(|p| &p.name == name)?),
        UserSpec::Uid(uid) => passwd.iter().find(|p| p.uid == *uid),
    };
    let Some(entry) = entry else {
        let UserSpec::Uid(uid) = spec else {
            return None;
        };
        return Some(Identity {
            uid: *uid,
            gid: *uid,
            groups: vec![*uid],
            name: None,
            home: "/".into(),
            shell: "/bin/sh".into(),
        });
    };
    let mut gids = vec![entry.gid];
    for g in groups {
        if g.members.iter().any(|m| m == &entry.name) && !gids.contains(&g.gid) {
            gids.push(g.gid);
        }
    }
    Some(Identity {
        uid: entry.uid,
        gid: entry.gid,
        groups: gids,
        name: Some(entry.name.clone()),
        home: if entry.home.is_empty() {
            "/".into()
        } else {
            entry.home.clone()
        },
        shell: if entry.shell.is_empty() {
            "/bin/sh".into()
        } else {
            entry.shell.clone()
        },
    })
}

/// The user database of the guest: the files are read on every lookup, since
/// processes in the sandbox may add users at any time.
#[derive(Debug, Clone)]
pub struct UserDb {
    dir: PathBuf,
}

impl UserDb {
    pub fn new(dir: PathBuf) -> Self {
        UserDb { dir }
    }

    /// Resolves `spec`, or root when there is none.
    pub fn resolve(&self, spec: Option<&UserSpec>) -> Result<Identity, AgentError> {
        let root = UserSpec::Uid(0);
        let spec = spec.unwrap_or(&root);
        let passwd = parse_passwd(&self.read("passwd"));
        let groups = parse_group(&self.read("group"));
        let mut id = resolve(spec, &passwd, &groups)
            .ok_or_else(|| AgentError::NoSuchUser(spec.to_string()))?;
        if id.uid == 0 && id.name.is_none() {
            id.home = "/root".into();
            id.name = Some("root".into());
        }
        Ok(id)
    }

    fn read(&self, file: &str) -> String {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the user database");
            String::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
alice:x:1000:1000:Alice,,,:/home/alice:/bin/zsh
+nis::::::
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
bob:x:1001:1001::::
";
    const GROUP: &str = "\
root:x:0:
audio:x:29:alice, bob
team:x:5000:alice
alice:x:1000:
bad:x:notanumber:alice
";

    #[test]
    fn passwd_skips_what_it_cannot_parse() {
        let p = parse_passwd(PASSWD);
        let names: Vec<&str> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "alice", "nobody", "bob"]);
        assert_eq!(p[2].home, "/home/alice");
        assert_eq!(p[2].shell, "/bin/zsh");
        assert_eq!(p[3].uid, 65534);
    }

    #[test]
    fn group_members_are_trimmed() {
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[1].members, ["alice", "bob"]);
    }

    #[test]
    fn names_resolve_with_supplementary_groups() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let alice = resolve(&UserSpec::name("alice"), &p, &g).unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        assert_eq!(alice.groups, [1000, 29, 5000]);
        assert_eq!(alice.name.as_deref(), Some("alice"));
        let bob = resolve(&UserSpec::name("bob"), &p, &g).unwrap();
        assert_eq!(bob.home, "/");
        assert_eq!(bob.shell, "/bin/sh");
        assert_eq!(bob.groups, [1001, 29]);
    }

    #[test]
    fn uids_resolve_with_or_without_an_entry() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let by_uid = resolve(&UserSpec::Uid(1000), &p, &g).unwrap();
        assert_eq!(by_uid.name.as_deref(), Some("alice"));
        let unknown = resolve(&UserSpec::Uid(4242), &p, &g).unwrap();
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.groups.as_slice()),
            (4242, 4242, &[4242][..])
        );
        assert_eq!(unknown.home, "/");
        assert!(resolve(&UserSpec::name("mallory"), &p, &g).is_none());
    }
}
