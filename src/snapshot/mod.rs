//! Snapshots: a paused VM saved as two files, and restored from them in a new process.
//!
//! - The memory file ([`memory`]): guest RAM as plain bytes, sparse, mapped back privately
//!   so pages load on first touch and VMs restored from one file share unchanged pages.
//! - The state file ([`format`]): a checked, versioned container holding the host facts
//!   ([`host`]) a restore must match, the memory layout, and the VM's saved state.
//!
//! [`save`] and [`load`] put the two together; the VM's state type is the caller's.

pub mod format;
pub mod host;
pub mod memory;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use format::{FormatError, Header, Snapshot, StateFile, FORMAT_VERSION, HEARTH_VERSION};
pub use host::{HostError, HostFacts, KvmFlavour};
pub use memory::{write_memory_file, MemoryFileError, WrittenMemory};

use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::{
    restore_guest_memory, restore_shared_guest_memory, GuestMemory, MemoryError,
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error("cannot check this host against the snapshot")]
    Host(#[source] HostError),
    #[error("cannot open the memory file \"{path}\"")]
    OpenMemory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map the memory file \"{path}\"")]
    MapMemory {
        path: PathBuf,
        #[source]
        source: MemoryError,
    },
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// What [`save`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// Bytes of guest RAM data in the memory file (the rest are holes).
    pub memory_data_bytes: u64,
    /// Size of the state file.
    pub state_bytes: u64,
}

/// Writes a paused VM's memory to `mem_path` and `payload`, with `host` and the memory
/// layout, to `state_path`. The memory file is written first, so a state file never
/// describes a memory file that is not complete.
pub fn save<T: Serialize>(
    mem: &GuestMemory,
    host: HostFacts,
    payload: &T,
    state_path: &Path,
    mem_path: &Path,
) -> Result<Saved, SnapshotError> {
    let written = write_memory_file(mem, mem_path)?;
    let snapshot = Snapshot::new(host, written.layout, payload);
    let state_bytes = snapshot.write(state_path)?;
    Ok(Saved {
        memory_data_bytes: written.data_bytes,
        state_bytes,
    })
}

/// Reads the state file at `state_path`, refuses it unless this host can run it (probed
/// for the CPU profile the snapshot's guest runs), and maps guest RAM from `mem_path`.
pub fn load<T: DeserializeOwned>(
    kvm: &KvmContext,
    state_path: &Path,
    mem_path: &Path,
) -> Result<(Snapshot<T>, GuestMemory), SnapshotError> {
    load_file(kvm, StateFile::read(state_path)?, mem_path, |_: &T| false)
}

/// [`load`], for a state file already read (and checked for damage). Guest RAM is mapped
/// privately from the memory file unless `shared` says the saved VM needs shareable memory
/// (a vhost-user device): then it is copied into a memfd.
pub fn load_file<T: DeserializeOwned>(
    kvm: &KvmContext,
    file: StateFile,
    mem_path: &Path,
    shared: impl FnOnce(&T) -> bool,
) -> Result<(Snapshot<T>, GuestMemory), SnapshotError> {
    let current =
        HostFacts::probe(kvm, file.header().host.cpu_profile).map_err(SnapshotError::Host)?;
    let snapshot = file.into_snapshot::<T>(&current)?;
    let memory = File::open(mem_path).map_err(|source| SnapshotError::OpenMemory {
        path: mem_path.to_path_buf(),
        source,
    })?;
    let mem = if shared(&snapshot.payload) {
        restore_shared_guest_memory(memory, &snapshot.layout)
    } else {
        restore_guest_memory(memory, &snapshot.layout)
    }
    .map_err(|source| SnapshotError::MapMemory {
        path: mem_path.to_path_buf(),
        source,
    })?;
    Ok((snapshot, mem))
}

/// `path` with `.tmp-<pid>` appended: files are written under this name, then moved into
/// place with [`move_into_place`].
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(name)
}

/// Gives the complete file at `temp` the name `path`, so nobody sees a half-written file.
/// An older file at `path` is unlinked, not overwritten: VMs restored from it keep mapping
/// its pages. Unlinking first rather than renaming over it spares the wait ext4 adds to a
/// rename that replaces a file (auto_da_alloc writes the new file out at once, and the
/// next replacement waits for that I/O): writing a memory file with 10 MiB of scattered
/// data over the last one took 210 ms that way, 12 ms this way (benches/snapshot.rs).
fn move_into_place(temp: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::rename(temp, path)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::HostFacts;
    use crate::arch::cpu_features::CpuFeatures;
    use crate::config::CpuProfile;
    use crate::snapshot::KvmFlavour;

    pub use crate::testutil::TempDir;

    pub fn sample_facts() -> HostFacts {
        HostFacts {
            kvm: KvmFlavour::Pvm,
            cpu_profile: CpuProfile::Compat,
            cpu: CpuFeatures {
                vendor: "GenuineIntel".into(),
                words: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::testutil::TempDir;
    use super::*;
    use crate::config::CpuProfile;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn save_then_load_on_this_host() {
        let kvm = match KvmContext::open() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("SKIPPED: no KVM ({e}); save_then_load_on_this_host did not run");
                return;
            }
        };
        let dir = TempDir::new("save-load");
        let (state_path, mem_path) = (dir.path().join("state"), dir.path().join("mem"));
        let mem = create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(0x8000)).unwrap();
        let host = HostFacts::probe(&kvm, CpuProfile::Host).unwrap();
        let payload = vec![String::from("vcpu0"), String::from("vcpu1")];
        let saved = save(&mem, host, &payload, &state_path, &mem_path).unwrap();
        assert_eq!(saved.memory_data_bytes, 4096);
        assert_eq!(
            saved.state_bytes,
            std::fs::metadata(&state_path).unwrap().len()
        );

        let (snapshot, restored) = load::<Vec<String>>(&kvm, &state_path, &mem_path).unwrap();
        assert_eq!(snapshot.payload, payload);
        assert_eq!(snapshot.header.host.cpu_profile, CpuProfile::Host);
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x8000)).unwrap(),
            0xfeed
        );

        let err = load::<Vec<String>>(&kvm, &state_path, &dir.path().join("gone")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open the memory file"));
    }
}
