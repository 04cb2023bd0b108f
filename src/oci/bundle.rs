//! A bundle's `config.json`, checked completely and turned into what the container VM
//! needs: the agent's [`RunSpec`] for the process, the root filesystem directory, the
//! VM's size, and the hooks. Everything is checked before anything starts, so a bad
//! bundle leaves nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Hooks, Mount, Process, Spec};

use super::OciError;
use crate::agent::protocol::{FileCopy, Network, Rootfs, RunSpec};

/// The largest host file a bind mount copies into the container, and the most all of
/// them may hold (they travel in the agent's run request, one 64 KiB frame).
const MAX_FILE_BYTES: u64 = 8 << 10;
const MAX_FILES_BYTES: usize = 24 << 10;

/// Mount destinations the agent gives every container itself (proc, sysfs, devpts, ...).
const PROVIDED_MOUNTS: &[&str] = &[
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
];

/// What `create` makes of a bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// The root filesystem directory, absolute.
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub run: RunSpec,
    pub hooks: Option<Hooks>,
    pub annotations: HashMap<String, String>,
    /// Mounts of the config that the VM does not provide, each with why (for the log).
    pub skipped_mounts: Vec<String>,
}

/// Reads and checks `DIR/config.json`.
pub fn load(dir: &Path) -> Result<Bundle, OciError> {
    let dir = std::path::absolute(dir)
        .map_err(|e| OciError::Bundle(format!("bundle {}: {e}", dir.display())))?;
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config)
        .map_err(|e| OciError::Bundle(format!("cannot read {}: {e}", config.display())))?;
    let spec: Spec = serde_json::from_str(&text)
        .map_err(|e| OciError::Bundle(format!("{}: invalid JSON: {e}", config.display())))?;
    from_spec(&spec, &dir)
}

/// Checks a parsed config; `dir` is the (absolute) bundle directory.
pub fn from_spec(spec: &Spec, dir: &Path) -> Result<Bundle, OciError> {
    let bad = |text: String| Err(OciError::Bundle(text));
    let version = spec.version();
    if version.split('.').next() != Some("1") {
        return bad(format!(
            "ociVersion {version:?}: this runtime implements runtime-spec 1.x"
        ));
    }
    if spec.windows().is_some() {
        return bad("windows: a Windows container cannot run here".into());
    }
    if spec.solaris().is_some() {
        return bad("solaris: a Solaris container cannot run here".into());
    }
    if spec.zos().is_some() {
        return bad("zos: a z/OS container cannot run here".into());
    }
    if spec.vm().is_some() {
        return bad("vm: hearth chooses the VM's kernel and image itself".into());
    }
    let Some(root) = spec.root() else {
        return bad("root: missing (the bundle needs a root filesystem)".into());
    };
    let rootfs = dir.join(root.path());
    if !rootfs.is_dir() {
        return bad(format!(
            "root.path: {} is not a directory",
            rootfs.display()
        ));
    }
    let Some(process) = spec.process() else {
        return bad("process: missing (nothing to run)".into());
    };
    let mut run = process_spec(process)?;
    run.hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
            if limit > 0 {
                run.memory_limit = Some(limit as u64);
            }
        }
        if let Some(cpu) = resources.cpu() {
            if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
                if quota > 0 && period > 0 {
                    let cpus = quota as f64 / period as f64;
                    if cpus > crate::config::MAX_VCPUS as f64 {
                        return bad(format!(
                            "linux.resources.cpu: quota/period {cpus} is more than {} CPUs",
                            crate::config::MAX_VCPUS
                        ));
                    }
                    run.cpus = Some(cpus);
                }
            }
        }
    }
    let mut skipped_mounts = Vec::new();
    for mount in spec.mounts().iter().flatten() {
        match classify_mount(mount)? {
            MountUse::Provided => {}
            MountUse::File(file) => {
                let total: usize = run.files.iter().map(|f| f.content.len()).sum();
                if total + file.content.len() > MAX_FILES_BYTES {
                    skipped_mounts.push(format!(
                        "{} (bind): the host files bound in exceed {MAX_FILES_BYTES} bytes",
                        file.target
                    ));
                } else {
                    run.files.push(file);
                }
            }
            MountUse::Skipped(why) => skipped_mounts.push(why),
        }
    }
    Ok(Bundle {
        dir: dir.to_path_buf(),
        rootfs,
        readonly: root.readonly().unwrap_or(false),
        run,
        hooks: spec.hooks().clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        skipped_mounts,
    })
}

/// A process of the config (or of `exec --process`) as the agent runs it.
pub fn process_spec(process: &Process) -> Result<RunSpec, OciError> {
    let bad = |text: &str| Err(OciError::Bundle(text.to_string()));
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return bad("process.args: empty (nothing to run)");
    }
    if process.command_line().is_some() {
        return bad("process.commandLine: only for Windows");
    }
    let cwd = process.cwd().to_string_lossy().into_owned();
    if !cwd.starts_with('/') {
        return Err(OciError::Bundle(format!(
            "process.cwd {cwd:?}: must be an absolute path"
        )));
    }
    let user = process.user();
    if user.username().is_some() {
        return bad("process.user.username: only for Windows; give uid and gid");
    }
    let env = process.env().clone().unwrap_or_default();
    if let Some(item) = env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
        return Err(OciError::Bundle(format!(
            "process.env: {item:?} is not KEY=VALUE"
        )));
    }
    let tty = process.terminal().unwrap_or(false);
    Ok(RunSpec {
        argv,
        env,
        cwd,
        user: Some(format!("{}:{}", user.uid(), user.gid())),
        hostname: None,
        tty,
        // The caller's stdin is always the process's (a /dev/null gives it EOF at once).
        stdin: true,
        rootfs: Rootfs::Device {
            path: "/dev/vda".into(),
            fstype: "ext4".into(),
        },
        volumes: Vec::new(),
        memory_limit: None,
        cpus: None,
        network: Network::Vm,
        net: None,
        name: Some(super::CONTAINER_NAME.into()),
        term_size: process.console_size().as_ref().filter(|_| tty).map(|b| {
            (
                b.height().min(u16::MAX as u64) as u16,
                b.width().min(u16::MAX as u64) as u16,
            )
        }),
        mac: None,
        files: Vec::new(),
    })
}

/// What becomes of one of the config's mounts.
#[derive(Debug)]
enum MountUse {
    /// One of the standard filesystems, which the agent mounts itself.
    Provided,
    /// A small host file, copied in now (later edits on the host are not seen).
    File(FileCopy),
    /// Not provided in the VM, and why (for the monitor's log).
    Skipped(String),
}

/// Sorts a mount; one that makes no sense is an error.
fn classify_mount(mount: &Mount) -> Result<MountUse, OciError> {
    let destination = mount.destination().to_string_lossy().into_owned();
    if !destination.starts_with('/') {
        return Err(OciError::Bundle(format!(
            "mounts: destination {destination:?} must be an absolute path"
        )));
    }
    let typ = mount.typ().clone().unwrap_or_default();
    if PROVIDED_MOUNTS.contains(&destination.as_str()) {
        return Ok(MountUse::Provided);
    }
    let options = mount.options().clone().unwrap_or_default();
    let bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
    let why = if bind {
        let source = mount.source().clone().unwrap_or_default();
        match std::fs::metadata(&source) {
            Ok(meta) if meta.is_file() && meta.len() <= MAX_FILE_BYTES => {
                match std::fs::read_to_string(&source) {
                    Ok(content) => {
                        return Ok(MountUse::File(FileCopy {
                            target: destination,
                            content,
                            readonly: options.iter().any(|o| o == "ro"),
                        }))
                    }
                    Err(_) => "a host file that is not text: not copied in",
                }
            }
            Ok(meta) if meta.is_file() => "a host file larger than 8 KiB: not copied in",
            _ => "a host directory: not shared into the VM",
        }
    } else if typ == "tmpfs" {
        "a tmpfs: the container's root overlay is in memory already"
    } else {
        "a filesystem the VM does not mount"
    };
    Ok(MountUse::Skipped(format!("{destination} ({typ}): {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn config(process: &str, extra: &str) -> String {
        format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs", "readonly": true}},
                "process": {process}, "hostname": "box"{extra}}}"#
        )
    }

    const PROCESS: &str = r#"{"terminal": false, "user": {"uid": 1000, "gid": 100},
        "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b=c"], "cwd": "/work",
        "consoleSize": {"height": 40, "width": 120}}"#;

    fn bundle_dir(config_text: &str) -> TempDir {
        let dir = TempDir::new("oci-bundle");
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config_text).unwrap();
        dir
    }

    fn err(config_text: &str) -> String {
        let dir = bundle_dir(config_text);
        load(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn a_config_maps_to_a_run_spec() {
        let extra = r#", "linux": {"resources": {"memory": {"limit": 134217728},
            "cpu": {"quota": 150000, "period": 100000}}},
            "annotations": {"a": "b"},
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                        "options": ["rbind", "ro"]},
                       {"destination": "/dev/shm", "type": "bind", "source": "/tmp"},
                       {"destination": "/srv", "type": "bind", "source": "/tmp"},
                       {"destination": "/data", "type": "tmpfs", "source": "tmpfs"}]"#;
        let dir = bundle_dir(&config(PROCESS, extra));
        let b = load(dir.path()).unwrap();
        assert_eq!(b.rootfs, dir.path().join("rootfs"));
        assert!(b.readonly);
        assert_eq!(b.run.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(b.run.env, ["PATH=/bin", "A=b=c"]);
        assert_eq!(b.run.cwd, "/work");
        assert_eq!(b.run.user.as_deref(), Some("1000:100"));
        assert_eq!(b.run.hostname.as_deref(), Some("box"));
        assert_eq!(b.run.memory_limit, Some(128 << 20));
        assert_eq!(b.run.cpus, Some(1.5));
        assert!(!b.run.tty);
        assert_eq!(b.run.term_size, None);
        assert!(b.run.stdin);
        assert_eq!(b.annotations.get("a").map(String::as_str), Some("b"));
        assert_eq!(b.hooks.unwrap().prestart().as_ref().unwrap().len(), 1);
        // A host file is copied in; a host directory and a tmpfs elsewhere are not there.
        assert_eq!(b.run.files.len(), 1);
        assert_eq!(b.run.files[0].target, "/etc/hosts");
        assert!(b.run.files[0].readonly);
        assert_eq!(
            b.run.files[0].content,
            std::fs::read_to_string("/etc/hosts").unwrap()
        );
        assert_eq!(b.skipped_mounts.len(), 2, "{:?}", b.skipped_mounts);
        assert!(b.skipped_mounts[0].starts_with("/srv (bind): a host directory"));
        assert!(b.skipped_mounts[1].starts_with("/data (tmpfs)"));
    }

    #[test]
    fn a_terminal_takes_the_console_size() {
        let process = PROCESS.replace(r#""terminal": false"#, r#""terminal": true"#);
        let dir = bundle_dir(&config(&process, ""));
        let b = load(dir.path()).unwrap();
        assert!(b.run.tty);
        assert_eq!(b.run.term_size, Some((40, 120)));
    }

    #[test]
    fn bad_bundles_name_the_problem() {
        let dir = TempDir::new("oci-bundle-empty");
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("config.json"),
            "{e}"
        );
        let e = err("{not json");
        assert!(e.contains("config.json: invalid JSON"), "{e}");
        let e = err(&config(PROCESS, "").replace("\"rootfs\"", "\"missing\""));
        assert!(
            e.starts_with("root.path: ") && e.ends_with("is not a directory"),
            "{e}"
        );
        let cases = [
            (
                PROCESS.replace(r#"["sh", "-c", "echo hi"]"#, "[]"),
                "process.args: empty",
            ),
            (
                PROCESS.replace("\"/work\"", "\"work\""),
                "process.cwd \"work\": must be",
            ),
            (
                PROCESS.replace(r#""uid": 1000"#, r#""username": "me", "uid": 1000"#),
                "process.user.username",
            ),
            (
                PROCESS.replace("\"A=b=c\"", "\"NOEQUALS\""),
                "process.env: \"NOEQUALS\"",
            ),
            (
                PROCESS.replace(r#""cwd""#, r#""commandLine": "x", "cwd""#),
                "process.commandLine",
            ),
        ];
        for (process, want) in cases {
            let e = err(&config(&process, ""));
            assert!(e.starts_with(want), "{e} does not start with {want}");
        }
        let e = err(&config(PROCESS, "").replace("1.0.2", "2.0.0"));
        assert!(e.starts_with("ociVersion \"2.0.0\""), "{e}");
        let e = err(&config(PROCESS, r#", "windows": {"layerFolders": []}"#));
        assert!(e.starts_with("windows:"), "{e}");
        let e = err(&config(PROCESS, r#", "mounts": [{"destination": "rel"}]"#));
        assert!(e.starts_with("mounts: destination \"rel\""), "{e}");
        let e = err(r#"{"ociVersion": "1.0.0", "root": {"path": "rootfs"}}"#);
        assert!(e.starts_with("process: missing"), "{e}");
        let e = err(&format!(
            r#"{{"ociVersion": "1.0.0", "process": {PROCESS}}}"#
        ));
        assert!(e.starts_with("root: missing"), "{e}");
        let quota = r#", "linux": {"resources": {"cpu": {"quota": 100000000, "period": 1000}}}"#;
        assert!(err(&config(PROCESS, quota)).starts_with("linux.resources.cpu"));
    }
}
