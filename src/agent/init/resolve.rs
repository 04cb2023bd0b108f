//! Pure helpers that turn a `RunSpec` into what `execve` needs: the user from
//! /etc/passwd and /etc/group, the program found on `PATH`, the final environment, and
//! the cgroup `cpu.max` text. No system calls here, so all of it is unit-tested.

use std::path::{Path, PathBuf};

pub use crate::image::DEFAULT_PATH;

/// Why a user, group, program or limit could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
    #[error("invalid user specification {0:?}")]
    BadUserSpec(String),
    #[error("invalid number of CPUs {0}")]
    BadCpus(f64),
}

/// One line of /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of /etc/group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses /etc/passwd text; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f.get(5).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Parses /etc/group text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership).
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolves `user` (`uid[:gid]` or `name[:group]`, `None` is root) against the text of
/// /etc/passwd and /etc/group (either may be missing). Numeric ids need no entries;
/// names must exist.
pub fn resolve_user(
    user: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<Identity, ResolveError> {
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let groups = group.map(parse_group).unwrap_or_default();
    let spec = user.unwrap_or("0");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(ResolveError::BadUserSpec(spec.to_string()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: if uid == 0 { "/root".into() } else { "/".into() },
            })),
        Err(_) => users.iter().find(|e| e.name == user_part).cloned(),
    }
    .ok_or_else(|| ResolveError::NoUser(user_part.to_string()))?;
    let gid = match group_part {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| ResolveError::NoGroup(g.to_string()))?,
        },
    };
    let mut supplementary: Vec<u32> = if entry.name.is_empty() {
        Vec::new()
    } else {
        groups
            .iter()
            .filter(|g| g.members.contains(&entry.name))
            .map(|g| g.gid)
            .filter(|&g| g != gid)
            .collect()
    };
    supplementary.dedup();
    let home = if entry.home.is_empty() {
        "/".to_string()
    } else {
        entry.home
    };
    Ok(Identity {
        uid: entry.uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// The value of `key` in a `KEY=VALUE` list (the last one wins, as with execve users).
pub fn env_get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The final environment: the spec's, plus `PATH`, `HOME` and `HOSTNAME` where absent.
pub fn final_env(
    env: &[String],
    home: &str,
    hostname: Option<&str>,
    default_path: &str,
) -> Vec<String> {
    let mut out = env.to_vec();
    if env_get(env, "PATH").is_none() {
        out.push(format!("PATH={default_path}"));
    }
    if env_get(env, "HOME").is_none() {
        out.push(format!("HOME={home}"));
    }
    if let Some(h) = hostname {
        if env_get(env, "HOSTNAME").is_none() {
            out.push(format!("HOSTNAME={h}"));
        }
    }
    out
}

/// What a candidate path for a program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    Missing,
    /// Exists but is a directory or lacks execute permission.
    NotExecutable,
    Executable,
}

/// Why a program cannot be run; the exit status a shell would report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotInPath(String),
    #[error("exec: {0:?}: no such file or directory")]
    NoSuchFile(String),
    #[error("exec: {0:?}: permission denied")]
    PermissionDenied(String),
}

impl LookupError {
    /// 127 for "not found", 126 for "found but cannot run".
    pub fn status(&self) -> i32 {
        match self {
            LookupError::PermissionDenied(_) => 126,
            _ => 127,
        }
    }
}

/// Finds `program` the way execvp does: a name with a `/` is used as is, otherwise each
/// `PATH` directory is tried in order (an empty entry is the current directory).
pub fn search_path(
    program: &str,
    path_var: Option<&str>,
    probe: impl Fn(&Path) -> Candidate,
) -> Result<PathBuf, LookupError> {
    if program.is_empty() {
        return Err(LookupError::NoSuchFile(program.to_string()));
    }
    if program.contains('/') {
        return match probe(Path::new(program)) {
            Candidate::Executable => Ok(PathBuf::from(program)),
            Candidate::NotExecutable => Err(LookupError::PermissionDenied(program.to_string())),
            Candidate::Missing => Err(LookupError::NoSuchFile(program.to_string())),
        };
    }
    for dir in path_var.unwrap_or(DEFAULT_PATH).split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        if probe(&candidate) == Candidate::Executable {
            return Ok(candidate);
        }
    }
    Err(LookupError::NotInPath(program.to_string()))
}

/// cgroup v2 `cpu.max` for a number of CPUs: `"<quota> 100000"`.
pub fn cpu_max(cpus: f64) -> Result<String, ResolveError> {
    const PERIOD: f64 = 100_000.0;
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 4096.0 {
        return Err(ResolveError::BadCpus(cpus));
    }
    // The kernel refuses quotas under 1 ms.
    let quota = (cpus * PERIOD).round().max(1000.0) as u64;
    Ok(format!("{quota} 100000"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # comment\n\
        broken line\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nohome:x:1001:1001::\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\napp:x:1000:\nstaff:x:50:app\n";

    #[test]
    fn passwd_and_group_parse() {
        let users = parse_passwd(PASSWD);
        assert_eq!(users.len(), 4);
        assert_eq!(users[2].name, "app");
        assert_eq!(users[2].home, "/home/app");
        let groups = parse_group(GROUP);
        assert_eq!(groups[1].members, vec!["app", "root"]);
        assert!(groups[0].members.is_empty());
    }

    #[test]
    fn root_by_default() {
        let id = resolve_user(None, Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
        assert_eq!(id.groups, vec![10]);
        // No files at all: still root.
        let id = resolve_user(None, None, None).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn names_resolve_and_must_exist() {
        let id = resolve_user(Some("app"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![10, 50]);
        assert_eq!(id.home, "/home/app");
        let id = resolve_user(Some("app:wheel"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(id.gid, 10);
        assert_eq!(id.groups, vec![50]);
        assert_eq!(
            resolve_user(Some("ghost"), Some(PASSWD), Some(GROUP)),
            Err(ResolveError::NoUser("ghost".into()))
        );
        assert_eq!(
            resolve_user(Some("app:ghosts"), Some(PASSWD), None),
            Err(ResolveError::NoGroup("ghosts".into()))
        );
        assert!(resolve_user(Some("app"), None, None).is_err());
        assert!(resolve_user(Some(":1"), None, None).is_err());
        assert!(resolve_user(Some("1:"), None, None).is_err());
    }

    #[test]
    fn numeric_ids_need_no_files() {
        let id = resolve_user(Some("4242:77"), None, None).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4242, 77, "/"));
        assert!(id.groups.is_empty());
        let id = resolve_user(Some("1000"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.home.as_str()),
            (1000, 1000, "/home/app")
        );
        let id = resolve_user(Some("1001"), Some(PASSWD), None).unwrap();
        assert_eq!(id.home, "/");
        let id = resolve_user(Some("5"), Some(PASSWD), None).unwrap();
        assert_eq!((id.uid, id.gid), (5, 0));
    }

    #[test]
    fn env_defaults_fill_only_gaps() {
        let env = vec!["A=1".to_string(), "HOME=/x".to_string()];
        let out = final_env(&env, "/root", Some("box"), DEFAULT_PATH);
        assert_eq!(env_get(&out, "HOME"), Some("/x"));
        assert_eq!(env_get(&out, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(env_get(&out, "HOSTNAME"), Some("box"));
        assert_eq!(env_get(&out, "A"), Some("1"));
        assert_eq!(env_get(&out, "AB"), None);
        let out = final_env(&["PATH=/bin".into()], "/root", None, DEFAULT_PATH);
        assert_eq!(out, vec!["PATH=/bin", "HOME=/root"]);
    }

    #[test]
    fn path_search_like_execvp() {
        let probe = |p: &Path| match p.to_str().unwrap() {
            "/usr/bin/sh" | "/bin/sh" | "./tool" | "/opt/run" => Candidate::Executable,
            "/bin/data" | "/usr/bin/data" | "/opt/data" => Candidate::NotExecutable,
            _ => Candidate::Missing,
        };
        assert_eq!(
            search_path("sh", Some("/usr/bin:/bin"), probe),
            Ok(PathBuf::from("/usr/bin/sh"))
        );
        assert_eq!(
            search_path("sh", Some("/nope:/bin"), probe),
            Ok(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            search_path("tool", Some("/nope::/x"), probe),
            Ok(PathBuf::from("./tool"))
        );
        let err = search_path("data", Some("/usr/bin:/bin"), probe).unwrap_err();
        assert_eq!(err, LookupError::NotInPath("data".into()));
        assert_eq!(err.status(), 127);
        assert_eq!(
            err.to_string(),
            "exec: \"data\": executable file not found in $PATH"
        );
        assert_eq!(
            search_path("/opt/run", None, probe),
            Ok(PathBuf::from("/opt/run"))
        );
        let err = search_path("/opt/data", None, probe).unwrap_err();
        assert_eq!(err.status(), 126);
        let err = search_path("/opt/none", None, probe).unwrap_err();
        assert_eq!(err, LookupError::NoSuchFile("/opt/none".into()));
        assert_eq!(search_path("", None, probe).unwrap_err().status(), 127);
    }

    #[test]
    fn cpu_max_text() {
        assert_eq!(cpu_max(1.5).unwrap(), "150000 100000");
        assert_eq!(cpu_max(0.5).unwrap(), "50000 100000");
        assert_eq!(cpu_max(2.0).unwrap(), "200000 100000");
        assert_eq!(cpu_max(0.001).unwrap(), "1000 100000");
        assert!(cpu_max(0.0).is_err());
        assert!(cpu_max(-1.0).is_err());
        assert!(cpu_max(f64::NAN).is_err());
    }
}
