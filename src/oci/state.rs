//! A container's state directory, `ROOT/ID/`: `state.json` (written atomically by
//! `create` and the monitor), the monitor's control socket `ctl.sock`, and the root
//! filesystem image. The runtime-spec state is derived from it and from whether the
//! monitor still lives.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::OciError;

/// runtime-spec status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The anchor's pid (the process engines wait on; the monitor's until the anchor
    /// registered).
    pub pid: i32,
    /// That process's start time (clock ticks since boot), so that a reused pid is not
    /// taken for it.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub created: String,
    pub status: Status,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The container process's exit status, once it is known.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// The VM's vsock socket, for `exec` (once the VM runs).
    #[serde(default)]
    pub vsock: Option<PathBuf>,
}

impl Record {
    /// The status as callers see it: an anchor that is gone (or a zombie, waiting to be
    /// reaped by the engine) means the container stopped, whatever the file says.
    pub fn current_status(&self) -> Status {
        if self.status != Status::Stopped && !self.anchor_alive() {
            return Status::Stopped;
        }
        self.status
    }

    pub fn anchor_alive(&self) -> bool {
        process_start(self.pid) == Some(self.pid_start)
    }

    /// The runtime-spec state JSON (`hearth oci state`).
    pub fn spec_state(&self) -> serde_json::Value {
        let status = self.current_status();
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": super::SPEC_VERSION,
            "id": self.id,
            "status": status.name(),
            "pid": pid,
            "bundle": self.bundle,
            "rootfs": self.bundle.join("rootfs"),
            "created": self.created,
            "annotations": self.annotations,
        })
    }
}

/// The start time of a live, non-zombie process `pid` (field 22 of /proc/PID/stat).
pub fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count from its end.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // fields[0] is the state (field 3); the start time is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// runc's rule for container IDs: `^[\w+-\.]+$`.
pub fn check_id(id: &str) -> Result<(), OciError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(OciError::Usage(format!("invalid container ID {id:?}")))
    }
}

/// `ROOT/ID`.
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path, id: &str) -> Result<Self, OciError> {
        check_id(id)?;
        Ok(StateDir {
            path: root.join(id),
        })
    }

    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join("ctl.sock")
    }

    /// The monitor's log of what it did (for a container that failed to start).
    pub fn monitor_log(&self) -> PathBuf {
        self.path.join("monitor.log")
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Makes the directory for a new container; refuses an ID in use.
    pub fn create(&self) -> Result<(), OciError> {
        if let Some(root) = self.path.parent() {
            fs::create_dir_all(root)
                .map_err(|e| OciError::State(format!("cannot create {}: {e}", root.display())))?;
        }
        match fs::create_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(OciError::State("container ID already exists".into()))
            }
            Err(e) => Err(OciError::State(format!(
                "cannot create {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// The record of an existing container.
    pub fn load(&self) -> Result<Record, OciError> {
        let id = self.path.file_name().unwrap_or_default().to_string_lossy();
        let text = match fs::read_to_string(self.state_file()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OciError::NotFound(id.into_owned()))
            }
            Err(e) => {
                return Err(OciError::State(format!(
                    "cannot read {}: {e}",
                    self.state_file().display()
                )))
            }
        };
        serde_json::from_str(&text)
            .map_err(|e| OciError::State(format!("{}: {e}", self.state_file().display())))
    }

    /// Replaces `state.json` atomically (temporary file, then rename).
    pub fn save(&self, record: &Record) -> Result<(), OciError> {
        let text = serde_json::to_vec(record)
            .map_err(|e| OciError::State(format!("encoding the state: {e}")))?;
        write_atomically(&self.state_file(), &text)
            .map_err(|e| OciError::State(format!("cannot write the state: {e}")))
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), OciError> {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OciError::State(format!(
                "cannot remove {}: {e}",
                self.path.display()
            ))),
        }
    }
}

/// Writes `path` as a whole or not at all: a reader never sees half a file.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    crate::fsutil::write_atomically(path, &temp, data)
}

/// Every container under `root`, by ID (unreadable entries are skipped).
pub fn list(root: &Path) -> Vec<Record> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut records: Vec<Record> = entries
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_string_lossy().into_owned();
            StateDir::new(root, &id).ok()?.load().ok()
        })
        .collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    records
}

/// Now, as RFC 3339 in UTC with nanoseconds (runc's `created`).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS.NNNNNNNNNZ`.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let (year, month, day) = crate::logger::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn record(pid: i32, pid_start: u64, status: Status) -> Record {
        Record {
            id: "c1".into(),
            pid,
            pid_start,
            bundle: "/b".into(),
            created: rfc3339(0, 0),
            status,
            annotations: HashMap::new(),
            exit_status: None,
            vsock: None,
        }
    }

    #[test]
    fn ids_follow_runcs_rule() {
        for good in ["a", "abc-1_2+3.4", &"f".repeat(64)] {
            check_id(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a\n"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_796_515_200, 5), "2026-12-06T00:00:00.000000005Z");
        assert_eq!(rfc3339(951_825_600, 0), "2000-02-29T12:00:00.000000000Z");
        assert!(now_rfc3339().ends_with('Z'));
    }

    #[test]
    fn status_follows_the_monitor() {
        let me = std::process::id() as i32;
        let start = process_start(me).unwrap();
        assert_eq!(
            record(me, start, Status::Running).current_status(),
            Status::Running
        );
        assert_eq!(
            record(me, start, Status::Created).current_status(),
            Status::Created
        );
        // A reused pid, or none at all: the anchor is gone.
        assert_eq!(
            record(me, start + 1, Status::Running).current_status(),
            Status::Stopped
        );
        assert_eq!(
            record(0, 0, Status::Created).current_status(),
            Status::Stopped
        );
        let state = record(me, start + 1, Status::Running).spec_state();
        assert_eq!(state["status"], "stopped");
        assert_eq!(state["pid"], 0);
        assert_eq!(state["id"], "c1");
        assert_eq!(state["ociVersion"], super::super::SPEC_VERSION);
    }

    #[test]
    fn state_dirs_round_trip_and_refuse_duplicates() {
        let root = TempDir::new("oci-state");
        let dir = StateDir::new(root.path(), "c1").unwrap();
        assert!(matches!(dir.load(), Err(OciError::NotFound(_))));
        dir.create().unwrap();
        assert_eq!(
            dir.create().unwrap_err().to_string(),
            "container ID already exists"
        );
        let r = record(1, 2, Status::Created);
        dir.save(&r).unwrap();
        assert_eq!(dir.load().unwrap(), r);
        assert_eq!(list(root.path()), vec![r]);
        dir.remove().unwrap();
        assert!(!dir.exists());
        assert!(StateDir::new(root.path(), "../x").is_err());
    }
}
