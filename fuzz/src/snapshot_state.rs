//! `snapshot_state`: bytes handed to hearth as a snapshot's state file, read as a restore
//! reads one (`builder::load_snapshot`): `StateFile::from_bytes`, this host's facts probed
//! for the CPU profile the header names, `into_snapshot` with the VMM's real payload
//! (`VmmState`), then what a restore does with the snapshot before it needs KVM: the
//! memory layout's `validate`, `ram_size` and `file_size`, and
//! `DevicesState::apply_overrides`.
//!
//! Input format:
//!
//! ```text
//! u8      mode
//!           bit 0     reseal: the checksum field is recomputed over everything after the
//!                     prefix before reading, so that the decoders behind it are reached
//!           bit 1     the body length field is set to what follows the header (when the
//!                     prefix is whole and the header fits), so that inserted and removed
//!                     bytes still make a file of consistent lengths
//!           bits 2-3  the facts the file is judged against: 0 this host's (probed once per
//!                     CPU profile, as a restore probes them); 1 the file's own (every host
//!                     passes, so the body is decoded on any machine); 2 the file's own under
//!                     the other KVM flavour; 3 the file's own on a CPU without features
//!           bit 4     also read from a file, with `StateFile::read`
//! rest    the state file
//! ```
//!
//! Checked (beyond "no panic"):
//! - reading holds at most `ALLOC_PER_BYTE` bytes per input byte plus `ALLOC_BASE` at once
//!   (no length prefix, and no run of tiny encoded items, makes it allocate gigabytes);
//! - every refusal is one non-empty line of at most `MAX_ERROR_LEN` bytes;
//! - `StateFile::read` accepts what `from_bytes` accepts, with the same header, and refuses
//!   the rest with the same error;
//! - a file's own facts pass; under the other KVM flavour they do not; on a CPU without
//!   features they pass exactly when they list no feature;
//! - an accepted snapshot re-encodes (`Snapshot::to_bytes`) to a file that reads back and
//!   re-encodes to the same bytes;
//! - a layout that validates has a RAM size and a memory-file size covering every region;
//!   device overrides apply exactly when the snapshot has a device of their kind.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use hearth::config::{CpuProfile, DiskOverride, NetOverride, RestoreConfig};
use hearth::device_manager::VirtioDeviceState;
use hearth::snapshot::{FormatError, HostFacts, KvmFlavour, Snapshot, StateFile};
use hearth::vmm::persist::VmmState;
use hearth::vstate::kvm::KvmContext;
use sha2::{Digest, Sha256};

use crate::alloc_meter::{measure, Usage};

pub const RESEAL: u8 = 1 << 0;
pub const FIX_BODY_LEN: u8 = 1 << 1;
pub const FACTS_THIS_HOST: u8 = 0 << 2;
pub const FACTS_OWN: u8 = 1 << 2;
pub const FACTS_OTHER_KVM: u8 = 2 << 2;
pub const FACTS_NO_FEATURES: u8 = 3 << 2;
const FACTS_MASK: u8 = 3 << 2;
pub const THROUGH_FILE: u8 = 1 << 4;

/// The state file's fixed prefix (see `hearth::snapshot::format`): magic, version, header
/// length at 12, body length at 16, the SHA-256 of what follows at 24.
pub const PREFIX_LEN: usize = 56;
const HEADER_LEN_AT: usize = 12;
const BODY_LEN_AT: usize = 16;
const CHECKSUM_AT: usize = 24;

/// Reading may hold this much beyond `ALLOC_PER_BYTE` per input byte: what the state's
/// fixed-size parts take decoded, for the most vCPUs a file may list (254 of 6 KiB).
pub const ALLOC_BASE: usize = 4 << 20;
/// The file is copied once; an item can decode to many times its encoding (a CPUID entry
/// is 40 bytes from 1), and a list that grows holds its old and new space at once.
pub const ALLOC_PER_BYTE: usize = 64;
/// Longest acceptable error message: a user reads it on one line.
pub const MAX_ERROR_LEN: usize = 512;

/// What one input came to, for tests.
#[derive(Debug)]
pub struct Outcome {
    /// The decoded snapshot's shape, or the error chain a user would see.
    pub result: Result<Decoded, String>,
    /// What reading allocated.
    pub usage: Usage,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub vcpus: usize,
    pub devices: usize,
    pub frontend_len: Option<usize>,
    /// The memory layout passed `validate`.
    pub layout_valid: bool,
}

pub fn run(data: &[u8]) -> Outcome {
    let (mode, file) = match data.split_first() {
        Some((&mode, file)) => (mode, prepare(mode, file)),
        None => (0, Vec::new()),
    };
    if mode & FACTS_MASK == FACTS_THIS_HOST {
        // Probed once, outside the measured read: a restore probes before it decodes too.
        let _ = this_host(CpuProfile::Host);
    }
    let ((result, own), usage) = measure(|| read(&file, mode));
    let limit = ALLOC_BASE + ALLOC_PER_BYTE * file.len();
    assert!(
        usage.peak <= limit,
        "reading {} bytes held {} bytes at once (limit {limit}); largest request {}",
        file.len(),
        usage.peak,
        usage.largest
    );
    if let Some(own) = &own {
        check_judgement(mode, own, result.as_ref().err());
    }
    let result = result.map(after_decode).map_err(|e| check_error(&e));
    if mode & THROUGH_FILE != 0 {
        compare_with_file(&file);
    }
    Outcome { result, usage }
}

/// The input's file after the mode's repairs.
fn prepare(mode: u8, file: &[u8]) -> Vec<u8> {
    let mut file = file.to_vec();
    if file.len() < PREFIX_LEN {
        return file;
    }
    if mode & FIX_BODY_LEN != 0 {
        let header_len = u32::from_le_bytes(
            file[HEADER_LEN_AT..BODY_LEN_AT]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        if let Some(body_len) = (file.len() - PREFIX_LEN).checked_sub(header_len) {
            file[BODY_LEN_AT..CHECKSUM_AT].copy_from_slice(&(body_len as u64).to_le_bytes());
        }
    }
    if mode & RESEAL != 0 {
        let digest = Sha256::digest(&file[PREFIX_LEN..]);
        file[CHECKSUM_AT..PREFIX_LEN].copy_from_slice(&digest);
    }
    file
}

/// What a restore does: check the file, probe the host for the header's profile, decode.
/// Also returns the header's facts, when it got that far.
fn read(file: &[u8], mode: u8) -> (Result<Snapshot<VmmState>, FormatError>, Option<HostFacts>) {
    let state = match StateFile::from_bytes(file) {
        Ok(state) => state,
        Err(e) => return (Err(e), None),
    };
    let own = state.header().host.clone();
    let facts = match mode & FACTS_MASK {
        FACTS_THIS_HOST => this_host(own.cpu_profile).clone(),
        FACTS_OWN => own.clone(),
        FACTS_OTHER_KVM => HostFacts {
            kvm: match own.kvm {
                KvmFlavour::Hardware => KvmFlavour::Pvm,
                KvmFlavour::Pvm => KvmFlavour::Hardware,
            },
            ..own.clone()
        },
        _ => {
            let mut facts = own.clone();
            facts.cpu.words.clear();
            facts
        }
    };
    (state.into_snapshot::<VmmState>(&facts), Some(own))
}

/// This host's facts for `profile`, probed once. Without KVM, those of a host whose CPU
/// offers nothing (every file that lists a feature is refused).
fn this_host(profile: CpuProfile) -> &'static HostFacts {
    static FACTS: OnceLock<[HostFacts; 2]> = OnceLock::new();
    let facts = FACTS.get_or_init(|| {
        let probe = |profile| match KvmContext::open() {
            Ok(kvm) => HostFacts::probe(&kvm, profile)
                .unwrap_or_else(|e| panic!("cannot probe this host: {}", hearth::error_chain(&e))),
            Err(e) => {
                eprintln!(
                    "snapshot_state: no KVM ({}): this host's facts are a CPU without features",
                    hearth::error_chain(&e)
                );
                HostFacts::for_guest(&[], profile)
            }
        };
        [probe(CpuProfile::Host), probe(CpuProfile::Compat)]
    });
    match profile {
        CpuProfile::Host => &facts[0],
        CpuProfile::Compat => &facts[1],
    }
}

/// The error as a user sees it, after checking that it is one short line.
fn check_error(err: &FormatError) -> String {
    let message = hearth::error_chain(err);
    assert!(!message.is_empty(), "an error without a message: {err:?}");
    assert!(
        !message.contains('\n') && message.len() <= MAX_ERROR_LEN,
        "not one short line ({} bytes): {message}",
        message.len()
    );
    message
}

/// A file whose header holds `own` passes its own facts, not the other KVM flavour's, and
/// a CPU without features exactly when it lists none. `err` is how reading ended.
fn check_judgement(mode: u8, own: &HostFacts, err: Option<&FormatError>) {
    let refused = matches!(err, Some(FormatError::IncompatibleHost(_)));
    match mode & FACTS_MASK {
        FACTS_OWN => assert!(!refused, "a file's own facts refused it: {err:?}"),
        FACTS_OTHER_KVM => assert!(refused, "another KVM flavour passed: {err:?}"),
        FACTS_NO_FEATURES => {
            let lists_features = own.cpu.words.iter().any(|w| w.bits != 0);
            assert_eq!(refused, lists_features, "{err:?}");
        }
        _ => {}
    }
}

/// Checks on an accepted snapshot; returns its shape.
fn after_decode(mut snapshot: Snapshot<VmmState>) -> Decoded {
    let bytes = snapshot.to_bytes().expect("a decoded snapshot encodes");
    let again = StateFile::from_bytes(&bytes)
        .and_then(|f| f.into_snapshot::<VmmState>(&snapshot.header.host))
        .unwrap_or_else(|e| panic!("a re-encoded snapshot is refused: {}", check_error(&e)));
    assert_eq!(
        again.to_bytes().expect("encodes"),
        bytes,
        "a re-encoded snapshot changes when read back"
    );

    let layout = &snapshot.layout;
    let layout_valid = layout.validate().is_ok();
    if layout_valid {
        let file_size = layout.file_size();
        let ram_size = layout.ram_size();
        let mut sum = 0u64;
        for region in &layout.regions {
            assert!(region.file_offset + region.size <= file_size);
            sum += region.size;
        }
        assert_eq!(ram_size, sum);
    }

    let devices = &snapshot.payload.devices;
    let has = |kind: fn(&VirtioDeviceState) -> bool| devices.virtio.iter().any(|d| kind(&d.device));
    let overridable = has(|d| matches!(d, VirtioDeviceState::Block(_)))
        && has(|d| matches!(d, VirtioDeviceState::Net(_)))
        && has(|d| matches!(d, VirtioDeviceState::Vsock(_)));
    let mut restore = RestoreConfig::new("/fuzz/state", "/fuzz/mem");
    restore.disks = vec![DiskOverride {
        index: 0,
        path: PathBuf::from("/fuzz/disk"),
    }];
    restore.nets = vec![NetOverride {
        index: 0,
        tap: "fuzz0".into(),
    }];
    restore.vsock_uds_path = Some(PathBuf::from("/fuzz/v.sock"));
    let applied = snapshot.payload.devices.apply_overrides(&restore);
    assert_eq!(applied.is_ok(), overridable, "{applied:?}");

    Decoded {
        vcpus: snapshot.payload.vcpus.len(),
        devices: snapshot.payload.devices.virtio.len(),
        frontend_len: snapshot.payload.frontend.as_ref().map(String::len),
        layout_valid,
    }
}

/// `StateFile::read` on a file holding `bytes` decides as `from_bytes` does.
fn compare_with_file(bytes: &[u8]) {
    let from_bytes = StateFile::from_bytes(bytes);
    let from_file = StateFile::read(&scratch_file(bytes));
    match (from_bytes, from_file) {
        (Ok(a), Ok(b)) => assert_eq!(a.header(), b.header()),
        (Err(a), Err(FormatError::InFile { source, .. })) => {
            assert_eq!(hearth::error_chain(&a), hearth::error_chain(&*source));
        }
        (a, b) => panic!("from_bytes gave {a:?}, read gave {b:?}"),
    }
}

/// A path to a file holding exactly `bytes`: a memfd, so nothing is left behind.
fn scratch_file(bytes: &[u8]) -> PathBuf {
    static FILE: OnceLock<File> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        // SAFETY: the name is a NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"snapshot_state".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        unsafe { File::from_raw_fd(fd) }
    });
    file.set_len(0).expect("truncate the scratch file");
    file.write_all_at(bytes, 0).expect("write the scratch file");
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

// ---- seeds --------------------------------------------------------------------------

/// A real state file (`cargo run --example gen_state_file` writes it): the `counter` tiny
/// guest, one vCPU, a disk and a vsock device, a configuration document as front end.
pub const FIXTURE: &[u8] = include_bytes!("../fixtures/counter.state");

/// A state file of `header` and `body` with the fixture's magic and version, and lengths
/// and checksum to match.
pub fn state_file(header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut file = FIXTURE[..PREFIX_LEN].to_vec();
    file[HEADER_LEN_AT..BODY_LEN_AT].copy_from_slice(&(header.len() as u32).to_le_bytes());
    file[BODY_LEN_AT..CHECKSUM_AT].copy_from_slice(&(body.len() as u64).to_le_bytes());
    file.extend_from_slice(header);
    file.extend_from_slice(body);
    let digest = Sha256::digest(&file[PREFIX_LEN..]);
    file[CHECKSUM_AT..PREFIX_LEN].copy_from_slice(&digest);
    file
}

/// The fixture's header and body bytes.
fn fixture_parts() -> (&'static [u8], &'static [u8]) {
    let header_len = u32::from_le_bytes(
        FIXTURE[HEADER_LEN_AT..BODY_LEN_AT]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    FIXTURE[PREFIX_LEN..].split_at(header_len)
}

fn fixture_snapshot() -> Snapshot<VmmState> {
    let file = StateFile::from_bytes(FIXTURE).expect("the fixture is a state file");
    let own = file.header().host.clone();
    file.into_snapshot(&own)
        .expect("the fixture decodes (rewrite it with the gen_state_file example)")
}

fn encoded<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encodes")
}

/// A postcard length (or other unsigned) prefix.
fn varint(n: u64) -> Vec<u8> {
    encoded(&n)
}

/// The fields of a `VcpuState` that holds nothing: empty lists, zero-length register
/// blocks (read back as zeroes), no TSC frequency, no compat state.
const EMPTY_VCPU: [u8; 12] = [0; 12];

/// Seed inputs: the real file as a restore reads it here and on any host (from a file),
/// broken by a flipped bit, a cut, the next format version and a trailing byte, and
/// hostile files with valid checksums: length prefixes of 2^60 for the vCPUs, the regions,
/// the front end and the CPU vendor, 1000 vCPUs of 12 bytes each (6 MiB decoded), a
/// thousand feature words, and feature words listed twice.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: u8, file: &[u8]| [&[mode][..], file].concat();
    let (header, body) = fixture_parts();
    let snapshot = fixture_snapshot();
    let layout_len = encoded(&snapshot.layout).len();
    let vcpus_len = encoded(&snapshot.payload.vcpus).len();
    let (layout, payload) = body.split_at(layout_len);
    let after_vcpus = &payload[vcpus_len..];
    let huge = varint(1 << 60);

    let mut flipped = FIXTURE.to_vec();
    flipped[FIXTURE.len() / 2] ^= 0x08;
    let mut other_version = FIXTURE.to_vec();
    other_version[8..12].copy_from_slice(&(hearth::snapshot::FORMAT_VERSION + 1).to_le_bytes());
    let mut trailing = FIXTURE.to_vec();
    trailing.push(0);

    let frontend = encoded(&snapshot.payload.frontend);
    let before_frontend = &body[..body.len() - frontend.len()];
    let empty_vcpus = EMPTY_VCPU.repeat(1000);
    let host = &snapshot.header.host;
    let before_vendor = encoded(&(&snapshot.header.hearth_version, host.kvm, host.cpu_profile));

    let mut many_words = snapshot.header.clone();
    let word = many_words.host.cpu.words[0];
    many_words.host.cpu.words = (0..1000u32)
        .map(|i| hearth::arch::cpu_features::FeatureWord {
            leaf: i,
            bits: u32::MAX,
            ..word
        })
        .collect();
    let mut twice = snapshot.header.clone();
    let doubled: Vec<_> = twice
        .host
        .cpu
        .words
        .iter()
        .map(|w| hearth::arch::cpu_features::FeatureWord {
            bits: !w.bits,
            ..*w
        })
        .collect();
    twice.host.cpu.words.extend(doubled);

    vec![
        ("counter_vm", with(FACTS_THIS_HOST, FIXTURE)),
        (
            "counter_vm_any_host_from_a_file",
            with(FACTS_OWN | THROUGH_FILE, FIXTURE),
        ),
        ("flipped_bit", with(FACTS_OWN | THROUGH_FILE, &flipped)),
        (
            "truncated",
            with(FACTS_OWN | THROUGH_FILE, &FIXTURE[..FIXTURE.len() - 1000]),
        ),
        (
            "another_format_version",
            with(FACTS_OWN | THROUGH_FILE, &other_version),
        ),
        (
            "trailing_byte_resealed",
            with(FACTS_OWN | RESEAL | FIX_BODY_LEN, &trailing),
        ),
        (
            "vcpu_count_2_pow_60",
            with(FACTS_OWN, &state_file(header, &[layout, &huge].concat())),
        ),
        (
            "region_count_2_pow_60",
            with(FACTS_OWN, &state_file(header, &[&huge, payload].concat())),
        ),
        (
            "frontend_length_2_pow_60",
            with(
                FACTS_OWN,
                &state_file(header, &[before_frontend, &[1], &huge[..], b"{}"].concat()),
            ),
        ),
        (
            "cpu_vendor_length_2_pow_60",
            with(
                FACTS_OWN,
                &state_file(&[&before_vendor[..], &huge, b"GenuineIntel"].concat(), body),
            ),
        ),
        (
            "1000_empty_vcpus",
            with(
                FACTS_OWN,
                &state_file(
                    header,
                    &[layout, &varint(1000), &empty_vcpus, after_vcpus].concat(),
                ),
            ),
        ),
        (
            "1000_feature_words",
            with(FACTS_NO_FEATURES, &state_file(&encoded(&many_words), body)),
        ),
        (
            "feature_words_twice",
            with(FACTS_OWN, &state_file(&encoded(&twice), body)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_as(mode: u8) -> Outcome {
        run(&[&[mode][..], FIXTURE].concat())
    }

    fn seed(name: &str) -> Outcome {
        let bytes = seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
            .1;
        run(&bytes)
    }

    #[track_caller]
    fn refused(name: &str) -> String {
        seed(name).result.unwrap_err()
    }

    #[test]
    fn the_real_file_decodes_on_any_host() {
        let expected = Decoded {
            vcpus: 1,
            devices: 2,
            frontend_len: fixture_snapshot()
                .payload
                .frontend
                .as_ref()
                .map(String::len),
            layout_valid: true,
        };
        assert!(expected.frontend_len.is_some());
        for outcome in [
            seed("counter_vm_any_host_from_a_file"),
            fixture_as(FACTS_OWN),
        ] {
            assert_eq!(outcome.result, Ok(expected.clone()));
            // The file copied, and the state: about two file sizes.
            assert!(
                outcome.usage.peak < 3 * FIXTURE.len(),
                "{:?}",
                outcome.usage
            );
        }
        // On this host: it decodes where it was written, or is refused as incompatible.
        match seed("counter_vm").result {
            Ok(decoded) => assert_eq!(decoded, expected),
            Err(e) => assert!(e.starts_with("taken on an incompatible host"), "{e}"),
        }
    }

    #[test]
    fn other_hosts_refuse_it() {
        assert!(fixture_as(FACTS_OTHER_KVM)
            .result
            .unwrap_err()
            .starts_with("taken on an incompatible host: the snapshot was taken under"));
        let lacking = fixture_as(FACTS_NO_FEATURES).result.unwrap_err();
        assert!(
            lacking.starts_with("taken on an incompatible host: this host's CPU lacks "),
            "{lacking}"
        );
    }

    #[test]
    fn damaged_files_are_refused() {
        assert_eq!(
            refused("flipped_bit"),
            "checksum mismatch: the file is corrupt"
        );
        assert_eq!(
            refused("truncated"),
            format!(
                "truncated: {} bytes, the file needs {}",
                FIXTURE.len() - 1000,
                FIXTURE.len()
            )
        );
        let version = refused("another_format_version");
        assert!(
            version.starts_with(&format!(
                "format version {} (written by hearth {}) is not supported",
                hearth::snapshot::FORMAT_VERSION + 1,
                fixture_snapshot().header.hearth_version
            )),
            "{version}"
        );
        assert_eq!(
            refused("trailing_byte_resealed"),
            "the saved state ends 1 bytes before the body does"
        );
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating_them() {
        for name in [
            "vcpu_count_2_pow_60",
            "region_count_2_pow_60",
            "frontend_length_2_pow_60",
        ] {
            let outcome = seed(name);
            let err = outcome.result.unwrap_err();
            assert!(
                err.starts_with("cannot decode the saved state: "),
                "{name}: {err}"
            );
            assert!(outcome.usage.peak < 1 << 20, "{name}: {:?}", outcome.usage);
        }
        let outcome = seed("cpu_vendor_length_2_pow_60");
        let err = outcome.result.unwrap_err();
        assert!(err.starts_with("cannot decode the header: "), "{err}");
        assert!(outcome.usage.peak < 1 << 20, "{:?}", outcome.usage);
    }

    #[test]
    fn many_small_items_are_refused_or_bounded() {
        // 12 KB of vCPUs are 6 MiB decoded: the vCPU list is refused past MAX_VCPUS.
        let outcome = seed("1000_empty_vcpus");
        assert_eq!(
            outcome.result.unwrap_err(),
            "cannot decode the saved state: Serde Deserialization Error"
        );
        assert!(outcome.usage.peak < 4 << 20, "{:?}", outcome.usage);

        let lacking = refused("1000_feature_words");
        assert!(
            lacking.starts_with("taken on an incompatible host: this host's CPU lacks ")
                && lacking.ends_with(" more"),
            "{lacking}"
        );

        let twice = seed("feature_words_twice").result.unwrap();
        assert_eq!((twice.vcpus, twice.devices), (1, 2));
    }

    /// Every mode of the real file, and every seed, within the checks of `run`; the modes
    /// that repair nothing leave a good file good.
    #[test]
    fn every_mode_reads_the_real_file() {
        for mode in 0..=u8::MAX {
            let outcome = run(&[&[mode][..], FIXTURE].concat());
            if mode & FACTS_MASK == FACTS_OWN {
                assert!(
                    outcome.result.is_ok(),
                    "mode {mode:#x}: {:?}",
                    outcome.result
                );
            }
        }
        for (_, bytes) in seeds() {
            run(&bytes);
        }
        // Input shorter than a prefix, or nothing at all.
        assert!(run(&[]).result.is_err());
        assert!(run(&[RESEAL | FIX_BODY_LEN, b'H']).result.is_err());
    }
}
