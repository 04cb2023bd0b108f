//! Which host files and sockets a jailed VM needs, and where they go in the jail: each
//! file is mirrored at its own absolute path under the jail directory (so the VM's config
//! needs no rewriting beyond making its paths absolute), each socket is made by the VMM at
//! its own path inside the jail and reached from the host through a symlink, unless it
//! lives in a directory of the VM's own (`--vm-dir`), which is bound into the jail at its
//! own path whole, so that the host's listeners there are reachable from the jail.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::JailError;
use crate::config::{SerialConfig, VmConfig};

/// What the jailed VMM may do with a mirrored file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    /// Appends (the serial console's file): created by the front end if missing.
    Append,
    ReadWrite,
}

/// One host file, bind-mounted at the same path inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailFile {
    pub path: PathBuf,
    pub access: Access,
}

/// Everything a jail holds, worked out from the VM's config before any of it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailPlan {
    /// The jail directory on the host; `/` for the jailed VMM.
    pub root: PathBuf,
    pub files: Vec<JailFile>,
    /// Sockets the VMM creates, at these absolute paths inside the jail.
    pub sockets: Vec<PathBuf>,
    /// Directories of the VM's own, bind-mounted read-write at their own paths and given
    /// to the jail's uid: sockets in them are made there, without a link.
    pub vm_dirs: Vec<PathBuf>,
    /// Host listeners the VMM connects to (virtio-fs back ends), bind-mounted at their
    /// own paths: the socket inode itself, nothing else of its directory.
    pub backend_sockets: Vec<PathBuf>,
}

/// Directories inside the jail that hearth itself fills; no VM file may live there.
pub const RESERVED: [&str; 2] = ["/dev", "/proc"];

impl JailPlan {
    /// The plan for `config` (whose file paths become absolute and canonical, as the jail
    /// mirrors them) and the extra sockets (the API socket), also made absolute.
    pub fn new(
        root: &Path,
        config: &mut VmConfig,
        extra_sockets: &mut [&mut PathBuf],
    ) -> Result<Self, JailError> {
        let mut files = Vec::new();
        let mut add = |path: &mut PathBuf, access: Access, what: &str| {
            *path = canonical_file(path, what)?;
            files.push((path.clone(), access));
            Ok::<_, JailError>(())
        };
        add(&mut config.kernel, Access::Read, "kernel")?;
        if let Some(initrd) = &mut config.initrd {
            add(initrd, Access::Read, "initrd")?;
        }
        // Read while the VM is built, inside the jail (`--sample-rip`).
        if let Some(symbols) = (config.sample_rip.as_mut()).and_then(|s| s.kernel_symbols.as_mut())
        {
            add(symbols, Access::Read, "kernel symbols")?;
        }
        for disk in &mut config.disks {
            let access = if disk.read_only {
                Access::Read
            } else {
                Access::ReadWrite
            };
            add(&mut disk.path, access, "disk")?;
        }
        let mut sockets = Vec::new();
        match &mut config.serial {
            SerialConfig::File(path) => {
                *path = absolute_socket_path(path)?;
                files.push((path.clone(), Access::Append));
            }
            SerialConfig::Unix(path) => {
                *path = absolute_socket_path(path)?;
                sockets.push(path.clone());
            }
            SerialConfig::Stdio | SerialConfig::None => {}
        }
        if let Some(vsock) = &mut config.vsock {
            vsock.uds_path = absolute_socket_path(&vsock.uds_path)?;
            sockets.push(vsock.uds_path.clone());
        }
        for socket in extra_sockets.iter_mut() {
            **socket = absolute_socket_path(socket)?;
            sockets.push(socket.to_path_buf());
        }
        let mut backends = Vec::new();
        for fs in &mut config.fs {
            fs.socket = canonical_file(&fs.socket, "virtio-fs back end socket")?;
            backends.push(fs.socket.clone());
        }
        Self::from_parts(root, files, sockets)?.with_backend_sockets(backends)
    }

    /// Adds host listeners the VMM connects to (absolute, existing sockets).
    pub fn with_backend_sockets(mut self, sockets: Vec<PathBuf>) -> Result<Self, JailError> {
        self.backend_sockets.extend(sockets);
        self.check()?;
        Ok(self)
    }

    /// The plan for these files (absolute; one named twice gets the widest access asked
    /// for) and sockets (absolute).
    pub fn from_parts(
        root: &Path,
        files: Vec<(PathBuf, Access)>,
        sockets: Vec<PathBuf>,
    ) -> Result<Self, JailError> {
        let mut merged: BTreeMap<PathBuf, Access> = BTreeMap::new();
        for (path, access) in files {
            if !path.is_absolute() {
                return Err(JailError::File {
                    what: "file".into(),
                    path,
                    source: std::io::Error::other("not an absolute path"),
                });
            }
            let entry = merged.entry(path).or_insert(access);
            *entry = (*entry).max(access);
        }
        let plan = Self {
            root: root.to_path_buf(),
            files: (merged.into_iter())
                .map(|(path, access)| JailFile { path, access })
                .collect(),
            sockets,
            vm_dirs: Vec::new(),
            backend_sockets: Vec::new(),
        };
        plan.check()?;
        Ok(plan)
    }

    /// Adds the VM's own directory of `jail`, if any (see [`Self::with_vm_dir`]).
    pub fn with_vm_dirs(self, jail: &super::JailConfig) -> Result<Self, JailError> {
        match &jail.vm_dir {
            Some(dir) => self.with_vm_dir(dir),
            None => Ok(self),
        }
    }

    /// Adds the VM's own directory `dir` (made canonical): a directory made for this VM
    /// alone, never one others share (a world-writable or sticky one such as /tmp is
    /// refused), as it becomes the jail's uid's.
    pub fn with_vm_dir(mut self, dir: &Path) -> Result<Self, JailError> {
        let refuse = |why: &str| JailError::File {
            what: "VM directory".into(),
            path: dir.to_path_buf(),
            source: std::io::Error::other(why.to_string()),
        };
        let canonical = dir.canonicalize().map_err(|source| JailError::File {
            what: "VM directory".into(),
            path: dir.to_path_buf(),
            source,
        })?;
        let meta = canonical.metadata().map_err(|source| JailError::File {
            what: "VM directory".into(),
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(refuse("not a directory"));
        }
        if canonical.parent().is_none() {
            return Err(refuse("not / (give the VM a directory of its own)"));
        }
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o1002 != 0 {
            return Err(refuse(
                "shared by everyone (world-writable or sticky): give the VM a directory of its own",
            ));
        }
        self.vm_dirs.push(canonical);
        self.check()?;
        Ok(self)
    }

    /// No file or socket under a reserved directory, inside the jail directory itself, or
    /// at the same path as another.
    fn check(&self) -> Result<(), JailError> {
        let paths = (self.files.iter().map(|f| &f.path))
            .chain(&self.sockets)
            .chain(&self.vm_dirs)
            .chain(&self.backend_sockets);
        if let Some(socket) = (self.sockets.iter()).find(|s| s.parent() == Some(Path::new("/"))) {
            return Err(JailError::File {
                what: "socket".into(),
                path: socket.clone(),
                source: std::io::Error::other("a socket needs a directory of its own, not /"),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for path in paths {
            if let Some(reserved) = RESERVED.iter().find(|r| path.starts_with(r)) {
                return Err(JailError::Reserved {
                    path: path.clone(),
                    reserved,
                });
            }
            if path.starts_with(&self.root) || self.root.starts_with(path) {
                return Err(JailError::InsideJail(path.clone()));
            }
            if !seen.insert(path) {
                return Err(JailError::Twice(path.clone()));
            }
        }
        Ok(())
    }

    /// Where `path` (absolute, as the jailed VMM sees it) is on the host.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        host_path(&self.root, path)
    }

    /// Whether `path` is in one of the VM's own directories.
    pub fn in_vm_dir(&self, path: &Path) -> bool {
        self.vm_dirs.iter().any(|dir| path.starts_with(dir))
    }

    /// The sockets the host reaches through a link into the jail: those outside the VM's
    /// own directories.
    pub fn linked_sockets(&self) -> impl Iterator<Item = &PathBuf> {
        self.sockets.iter().filter(|s| !self.in_vm_dir(s))
    }

    /// The directories (as the jailed VMM sees them) holding the linked sockets, each
    /// once: made in the jail directory on the host.
    pub fn socket_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .linked_sockets()
            .filter_map(|s| s.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// `root` joined with the absolute `path`.
pub fn host_path(root: &Path, path: &Path) -> PathBuf {
    let relative: PathBuf = (path.components())
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(relative)
}

/// `path` made canonical; it must be an existing file (not a directory).
pub fn canonical_file(path: &Path, what: &str) -> Result<PathBuf, JailError> {
    let canonical = path.canonicalize().map_err(|source| JailError::File {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    if canonical.is_dir() {
        return Err(JailError::File {
            what: what.to_string(),
            path: path.to_path_buf(),
            source: std::io::Error::other("a directory, not a file"),
        });
    }
    Ok(canonical)
}

/// A path that need not exist yet: its directory made canonical, its name kept.
pub fn absolute_socket_path(path: &Path) -> Result<PathBuf, JailError> {
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else {
        return Err(JailError::File {
            what: "socket".into(),
            path: path.to_path_buf(),
            source: std::io::Error::other("not a file name"),
        });
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir = dir.canonicalize().map_err(|source| JailError::File {
        what: "socket directory".into(),
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::BlockConfig;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("hearth-plan-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir.canonicalize().unwrap())
    }

    fn touch(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"x").unwrap();
        path
    }

    #[test]
    fn files_are_mirrored_with_their_access() {
        let dir = scratch("mirror");
        let kernel = touch(&dir.0, "vmlinux");
        let ro = touch(&dir.0, "ro.img");
        let rw = touch(&dir.0, "rw.img");
        let mut config = VmConfig::new(&kernel);
        config.disks = vec![
            BlockConfig {
                path: ro.clone(),
                read_only: true,
                id: None,
                rate_limiter: Default::default(),
            },
            BlockConfig {
                path: rw.clone(),
                read_only: false,
                id: None,
                rate_limiter: Default::default(),
            },
            // The same image twice: writable wins.
            BlockConfig {
                path: dir.0.join(".").join("ro.img"),
                read_only: false,
                id: None,
                rate_limiter: Default::default(),
            },
        ];
        config.serial = SerialConfig::Unix(dir.0.join("console.sock"));
        let mut api = dir.0.join("api.sock");
        let plan = JailPlan::new(Path::new("/jail/x"), &mut config, &mut [&mut api]).unwrap();
        let access = |p: &Path| plan.files.iter().find(|f| f.path == p).map(|f| f.access);
        assert_eq!(access(&kernel), Some(Access::Read));
        assert_eq!(access(&ro), Some(Access::ReadWrite));
        assert_eq!(access(&rw), Some(Access::ReadWrite));
        assert_eq!(plan.files.len(), 3);
        assert_eq!(config.disks[2].path, ro);
        assert_eq!(
            plan.sockets,
            [dir.0.join("console.sock"), dir.0.join("api.sock")]
        );
        assert_eq!(plan.socket_dirs(), std::slice::from_ref(&dir.0));
        assert_eq!(
            plan.host_path(&kernel),
            Path::new("/jail/x").join(kernel.strip_prefix("/").unwrap())
        );
    }

    #[test]
    fn kernel_symbols_are_mirrored_read_only() {
        let dir = scratch("symbols");
        let kernel = touch(&dir.0, "vmlinux");
        let map = touch(&dir.0, "System.map");
        let mut config = VmConfig::new(&kernel);
        config.sample_rip = Some(crate::config::RipSamplingConfig {
            interval_ms: 5,
            kernel_symbols: Some(dir.0.join(".").join("System.map")),
        });
        let plan = JailPlan::new(Path::new("/jail/x"), &mut config, &mut []).unwrap();
        let access = |p: &Path| plan.files.iter().find(|f| f.path == p).map(|f| f.access);
        assert_eq!(access(&map), Some(Access::Read));
        assert_eq!(config.sample_rip.unwrap().kernel_symbols, Some(map));
    }

    #[test]
    fn fs_back_end_sockets_are_bound_in_not_made() {
        let dir = scratch("fs");
        let kernel = touch(&dir.0, "vmlinux");
        let socket = dir.0.join("vfs.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut config = VmConfig::new(&kernel);
        config.fs = vec![crate::devices::virtio::fs::FsConfig::new(
            "share",
            dir.0.join(".").join("vfs.sock"),
        )];
        let plan = JailPlan::new(Path::new("/j"), &mut config, &mut []).unwrap();
        assert_eq!(plan.backend_sockets, std::slice::from_ref(&socket));
        assert_eq!(config.fs[0].socket, socket);
        assert!(plan.sockets.is_empty() && plan.socket_dirs().is_empty());

        config.fs[0].socket = dir.0.join("no-back-end.sock");
        let err = JailPlan::new(Path::new("/j"), &mut config, &mut []).unwrap_err();
        assert!(
            crate::error_chain(&err).starts_with("cannot use virtio-fs back end socket"),
            "{err}"
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        let dir = scratch("bad");
        let kernel = touch(&dir.0, "vmlinux");
        let mut missing = VmConfig::new(dir.0.join("nope"));
        let err = JailPlan::new(Path::new("/j"), &mut missing, &mut []).unwrap_err();
        assert!(
            crate::error_chain(&err).starts_with("cannot use kernel"),
            "{err}"
        );

        let mut in_dev = VmConfig::new(&kernel);
        in_dev.serial = SerialConfig::File("/dev/null".into());
        let err = JailPlan::new(Path::new("/j"), &mut in_dev, &mut []).unwrap_err();
        assert!(matches!(err, JailError::Reserved { .. }), "{err}");

        let mut inside = VmConfig::new(&kernel);
        let err = JailPlan::new(&dir.0, &mut inside, &mut []).unwrap_err();
        assert!(matches!(err, JailError::InsideJail(_)), "{err}");

        let mut twice = VmConfig::new(&kernel);
        twice.serial = SerialConfig::Unix(dir.0.join("s"));
        let mut api = dir.0.join("s");
        let err = JailPlan::new(Path::new("/j"), &mut twice, &mut [&mut api]).unwrap_err();
        assert!(matches!(err, JailError::Twice(_)), "{err}");

        let mut in_root = VmConfig::new(&kernel);
        let mut api = PathBuf::from("/api.sock");
        let err = JailPlan::new(Path::new("/j"), &mut in_root, &mut [&mut api]).unwrap_err();
        assert!(crate::error_chain(&err).contains("not /"), "{err}");
    }

    #[test]
    fn sockets_in_the_vm_dir_need_no_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("vmdir");
        let kernel = touch(&dir.0, "vmlinux");
        let own = dir.0.join("vm");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = VmConfig::new(&kernel);
        config.vsock = Some(crate::devices::virtio::vsock::VsockConfig {
            guest_cid: 3,
            uds_path: own.join("v.sock"),
        });
        let mut api = dir.0.join("api.sock");
        let plan = JailPlan::new(Path::new("/j"), &mut config, &mut [&mut api])
            .unwrap()
            .with_vm_dir(&dir.0.join(".").join("vm"))
            .unwrap();
        assert_eq!(plan.vm_dirs, std::slice::from_ref(&own));
        assert!(plan.in_vm_dir(&own.join("v.sock")));
        assert_eq!(plan.linked_sockets().collect::<Vec<_>>(), [&api]);
        assert_eq!(plan.socket_dirs(), std::slice::from_ref(&dir.0));

        // Shared directories, files, / and the jail's own are refused.
        let shared = dir.0.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let refused = |path: &Path, root: &Path| {
            let plan = JailPlan::from_parts(root, Vec::new(), Vec::new()).unwrap();
            crate::error_chain(&plan.with_vm_dir(path).unwrap_err())
        };
        assert!(refused(&shared, Path::new("/j")).contains("shared by everyone"));
        assert!(refused(Path::new("/tmp"), Path::new("/j")).contains("shared by everyone"));
        assert!(refused(&kernel, Path::new("/j")).contains("not a directory"));
        assert!(refused(Path::new("/"), Path::new("/j")).contains("not /"));
        assert!(
            refused(&dir.0.join("nope"), Path::new("/j")).starts_with("cannot use VM directory")
        );
        assert!(refused(&dir.0, &own.join("jail")).contains("inside (or holds) the jail"));
    }

    #[test]
    fn host_paths_stay_under_the_root() {
        assert_eq!(
            host_path(Path::new("/r"), Path::new("/a/../b/./c")),
            Path::new("/r/a/b/c")
        );
        assert_eq!(host_path(Path::new("/r"), Path::new("/")), Path::new("/r"));
    }
}
