//! Optional cgroup placement of a jailed VMM: a `hearth/<id>` group with cpu, memory and
//! pids limits, on cgroup v2 where the host has a unified hierarchy and on the v1
//! per-controller hierarchies otherwise (hybrid hosts). The front end makes the groups and
//! writes the limits, the jailed child moves itself in, the front end removes them after.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::parse_byte_size;
use crate::config::specs::parse_options;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// cpu.max / cpu.cfs_period_us: the quota is a share of this many microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Limits for the VMM's cgroup; none set means no placement at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// CPU time, in CPUs (1.5 = one and a half CPUs' worth per period).
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Memory, in bytes (guest RAM plus the VMM's own).
    #[serde(default)]
    pub memory: Option<u64>,
    /// Processes and threads.
    #[serde(default)]
    pub pids: Option<u64>,
}

impl CgroupLimits {
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none() && self.pids.is_none()
    }

    /// `cpu=1.5,memory=512M,pids=64`, any subset.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut limits = Self::default();
        let options = parse_options(spec, &["cpu", "memory", "pids"]).map_err(|e| e.to_string())?;
        for (key, value) in &options {
            match key.as_str() {
                "cpu" => {
                    let cpus: f64 = value
                        .parse()
                        .ok()
                        .filter(|c: &f64| c.is_finite() && *c >= 0.01 && *c <= 1024.0)
                        .ok_or_else(|| format!("cpu \"{value}\" is not a CPU count (0.01-1024)"))?;
                    limits.cpu = Some(cpus);
                }
                "memory" => {
                    let bytes =
                        parse_byte_size(value).map_err(|e| format!("memory \"{value}\": {e}"))?;
                    if bytes < 1 << 20 {
                        return Err(format!("memory \"{value}\" is below 1 MiB"));
                    }
                    limits.memory = Some(bytes);
                }
                "pids" => {
                    let pids = value
                        .parse()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("pids \"{value}\" is not a positive number"))?;
                    limits.pids = Some(pids);
                }
                _ => unreachable!("parse_options admits only the keys above"),
            }
        }
        Ok(limits)
    }
}

/// The host's cgroup layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// One unified hierarchy at the root.
    V2(PathBuf),
    /// One hierarchy per controller under the root (`cpu`, `memory`, `pids`).
    V1(PathBuf),
}

impl Hierarchy {
    /// v2 when the root itself is a cgroup2 hierarchy (it has `cgroup.controllers`).
    pub fn detect(root: &Path) -> Self {
        if root.join("cgroup.controllers").exists() {
            Self::V2(root.to_path_buf())
        } else {
            Self::V1(root.to_path_buf())
        }
    }
}

/// One group to make: its directory and the files to write there, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub dir: PathBuf,
    pub settings: Vec<(&'static str, String)>,
}

/// The groups for a VM `id` with `limits`: one per controller on v1, one on v2 (whose
/// parent `hearth` group must first enable the controllers for its children).
pub fn plan(hierarchy: &Hierarchy, id: &str, limits: &CgroupLimits) -> Vec<Group> {
    let quota = |cpus: f64| ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
    match hierarchy {
        Hierarchy::V2(root) => {
            let mut settings = Vec::new();
            if let Some(cpus) = limits.cpu {
                settings.push(("cpu.max", format!("{} {CPU_PERIOD_US}", quota(cpus))));
            }
            if let Some(bytes) = limits.memory {
                settings.push(("memory.max", bytes.to_string()));
            }
            if let Some(pids) = limits.pids {
                settings.push(("pids.max", pids.to_string()));
            }
            vec![Group {
                dir: root.join("hearth").join(id),
                settings,
            }]
        }
        Hierarchy::V1(root) => {
            let group = |controller: &str, settings| Group {
                dir: root.join(controller).join("hearth").join(id),
                settings,
            };
            let mut groups = Vec::new();
            if let Some(cpus) = limits.cpu {
                groups.push(group(
                    "cpu",
                    vec![
                        ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", quota(cpus).to_string()),
                    ],
                ));
            }
            if let Some(bytes) = limits.memory {
                groups.push(group(
                    "memory",
                    vec![("memory.limit_in_bytes", bytes.to_string())],
                ));
            }
            if let Some(pids) = limits.pids {
                groups.push(group("pids", vec![("pids.max", pids.to_string())]));
            }
            groups
        }
    }
}

/// The controllers a v2 group needs enabled in its parents' `cgroup.subtree_control`.
fn v2_controllers(limits: &CgroupLimits) -> String {
    let mut wanted = Vec::new();
    if limits.cpu.is_some() {
        wanted.push("+cpu");
    }
    if limits.memory.is_some() {
        wanted.push("+memory");
    }
    if limits.pids.is_some() {
        wanted.push("+pids");
    }
    wanted.join(" ")
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Makes the groups and writes their limits; on failure removes what it made.
pub fn create(hierarchy: &Hierarchy, groups: &[Group], limits: &CgroupLimits) -> io::Result<()> {
    if let Hierarchy::V2(root) = hierarchy {
        let controllers = v2_controllers(limits);
        write(&root.join("cgroup.subtree_control"), &controllers)?;
        let hearth = root.join("hearth");
        fs::create_dir_all(&hearth)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", hearth.display())))?;
        write(&hearth.join("cgroup.subtree_control"), &controllers)?;
    }
    for (made, group) in groups.iter().enumerate() {
        let result = fs::create_dir_all(&group.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", group.dir.display())))
            .and_then(|()| {
                (group.settings.iter())
                    .try_for_each(|(file, value)| write(&group.dir.join(file), value))
            });
        if let Err(e) = result {
            remove(&groups[..=made]);
            return Err(e);
        }
    }
    Ok(())
}

/// Moves the calling process into the groups ("0" is the writer itself, in v1 and v2).
pub fn join(groups: &[Group]) -> io::Result<()> {
    groups
        .iter()
        .try_for_each(|group| write(&group.dir.join("cgroup.procs"), "0"))
}

/// Removes the groups (empty once the VMM has exited); the shared `hearth` parents stay.
pub fn remove(groups: &[Group]) {
    for group in groups {
        if let Err(e) = fs::remove_dir(&group.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove cgroup {}: {e}", group.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let limits = CgroupLimits::parse("cpu=1.5,memory=512M,pids=64").unwrap();
        assert_eq!(limits.cpu, Some(1.5));
        assert_eq!(limits.memory, Some(512 << 20));
        assert_eq!(limits.pids, Some(64));
        assert_eq!(
            CgroupLimits::parse("pids=8").unwrap(),
            CgroupLimits {
                pids: Some(8),
                ..Default::default()
            }
        );
        for (spec, error) in [
            ("cpu", "\"cpu\" is not key=value"),
            ("cpu=0", "cpu \"0\" is not a CPU count (0.01-1024)"),
            ("cpu=NaN", "cpu \"NaN\" is not a CPU count (0.01-1024)"),
            ("pids=0", "pids \"0\" is not a positive number"),
            ("memory=1K", "memory \"1K\" is below 1 MiB"),
            ("io=1", "unknown option \"io\" (expected cpu, memory, pids)"),
            ("pids=1,pids=2", "option \"pids\" given twice"),
        ] {
            assert_eq!(CgroupLimits::parse(spec).unwrap_err(), error, "{spec}");
        }
    }

    #[test]
    fn v1_has_a_group_per_controller() {
        let limits = CgroupLimits::parse("cpu=0.5,pids=10").unwrap();
        let groups = plan(&Hierarchy::V1("/cg".into()), "vm1", &limits);
        assert_eq!(
            groups,
            [
                Group {
                    dir: "/cg/cpu/hearth/vm1".into(),
                    settings: vec![
                        ("cpu.cfs_period_us", "100000".into()),
                        ("cpu.cfs_quota_us", "50000".into())
                    ],
                },
                Group {
                    dir: "/cg/pids/hearth/vm1".into(),
                    settings: vec![("pids.max", "10".into())],
                },
            ]
        );
    }

    #[test]
    fn v2_has_one_group() {
        let limits = CgroupLimits::parse("cpu=2,memory=1G").unwrap();
        let groups = plan(&Hierarchy::V2("/cg".into()), "vm1", &limits);
        assert_eq!(
            groups,
            [Group {
                dir: "/cg/hearth/vm1".into(),
                settings: vec![
                    ("cpu.max", "200000 100000".into()),
                    ("memory.max", (1u64 << 30).to_string())
                ],
            }]
        );
        assert_eq!(v2_controllers(&limits), "+cpu +memory");
    }

    #[test]
    fn detection_looks_for_cgroup_controllers() {
        let dir = std::env::temp_dir().join(format!("hearth-cg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(Hierarchy::detect(&dir), Hierarchy::V1(dir.clone()));
        fs::write(dir.join("cgroup.controllers"), "cpu").unwrap();
        assert_eq!(Hierarchy::detect(&dir), Hierarchy::V2(dir.clone()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
