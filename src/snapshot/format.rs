//! The snapshot state file: a fixed prefix, then a header and a body in postcard encoding.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HEARTHST"
//!      8     4  format version, little-endian u32
//!     12     4  header length H, little-endian u32
//!     16     8  body length B, little-endian u64
//!     24    32  SHA-256 of the H + B bytes that follow
//!     56     H  header: Header (hearth version first, then the host facts)
//!   56+H     B  body: the memory layout, then the payload
//! ```
//!
//! The prefix stays the same in every format version, and every header starts with the
//! writer's hearth version, so a file of another version is refused by name. postcard
//! writes fields in declaration order and enum variants by index, with no field names: any
//! change to a saved type (a field added, removed or moved, a variant moved) needs a new
//! `FORMAT_VERSION`. Encoding was chosen by measurement: for a 2-vCPU state (~14 KB in
//! postcard, ~33 KB in JSON) decoding takes ~14 µs against ~70 µs for serde_json.
//!
//! Checks run cheapest and most telling first: magic, version, lengths, checksum, header,
//! host compatibility, and only then the body, so an incompatible snapshot is refused before
//! anything of it is used.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::host::HostFacts;
use crate::vstate::memory::MemoryLayout;

pub const MAGIC: [u8; 8] = *b"HEARTHST";
/// The version this hearth writes. 2: the devices' state holds the VM generation ID's
/// address and interrupt. 3: each disk's, NIC's and entropy device's configuration holds
/// its rate limiters. 4: a NIC's configuration holds its back end (tap, stream socket or
/// user-mode networking) instead of a tap name; virtio-fs and virtio-balloon device states
/// (new last variants of the virtio device states).
pub const FORMAT_VERSION: u32 = 4;
/// The versions this hearth reads.
pub const SUPPORTED_FORMAT_VERSIONS: &[u32] = &[3, FORMAT_VERSION];
/// The hearth release, recorded in every header.
pub const HEARTH_VERSION: &str = env!("CARGO_PKG_VERSION");

const PREFIX_LEN: usize = 56;
const CHECKSUM_LEN: usize = 32;
/// Enough of a file to read the prefix and the writer's version after it.
const HEAD_READ: usize = PREFIX_LEN + 64;
/// Longest writer version shown in an error.
const MAX_SHOWN_VERSION: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read the snapshot state file \"{path}\"")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the snapshot state file \"{path}\"")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state file \"{path}\"")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<FormatError>,
    },
    #[error("not a hearth snapshot state file (bad magic)")]
    BadMagic,
    #[error("truncated: {len} bytes, the file needs {needed}")]
    Truncated { len: u64, needed: u64 },
    #[error("{len} bytes long, but its header accounts for {needed}")]
    TrailingBytes { len: u64, needed: u64 },
    #[error("format version {found}{} is not supported; this hearth ({HEARTH_VERSION}) reads version {}",
        writer.as_ref().map(|w| format!(" (written by hearth {w})")).unwrap_or_default(),
        versions_text())]
    UnsupportedVersion { found: u32, writer: Option<String> },
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("cannot decode the header")]
    Header(#[source] postcard::Error),
    #[error("cannot decode the saved state")]
    Body(#[source] postcard::Error),
    #[error("the saved state ends {0} bytes before the body does")]
    BodyTrailing(usize),
    #[error("taken on an incompatible host: {0}")]
    IncompatibleHost(String),
    #[error("cannot encode the snapshot state")]
    Encode(#[source] postcard::Error),
}

fn versions_text() -> String {
    SUPPORTED_FORMAT_VERSIONS
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every state file says about itself before its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The hearth release that wrote the file. Must stay the first field.
    pub hearth_version: String,
    pub host: HostFacts,
}

/// A whole snapshot state: the header, where guest RAM is in the memory file, and the
/// saved VM state (`T`, which the VMM defines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot<T> {
    pub header: Header,
    pub layout: MemoryLayout,
    pub payload: T,
}

impl<T> Snapshot<T> {
    /// A snapshot written by this hearth on a host described by `host`.
    pub fn new(host: HostFacts, layout: MemoryLayout, payload: T) -> Self {
        Self {
            header: Header {
                hearth_version: HEARTH_VERSION.to_string(),
                host,
            },
            layout,
            payload,
        }
    }
}

impl<T: Serialize> Snapshot<T> {
    /// The state file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let header = postcard::to_stdvec(&self.header).map_err(FormatError::Encode)?;
        let body =
            postcard::to_stdvec(&(&self.layout, &self.payload)).map_err(FormatError::Encode)?;
        let header_len = u32::try_from(header.len())
            .map_err(|_| FormatError::Encode(postcard::Error::SerializeBufferFull))?;
        let mut checksum = Sha256::new();
        checksum.update(&header);
        checksum.update(&body);
        let mut bytes = Vec::with_capacity(PREFIX_LEN + header.len() + body.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&checksum.finalize());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&body);
        Ok(bytes)
    }

    /// Writes the state file to `path`, replacing any file there: the bytes go to a
    /// temporary file beside it that is then moved into place, so no reader sees a partial
    /// file. Returns the file's size.
    pub fn write(&self, path: &Path) -> Result<u64, FormatError> {
        let bytes = self.to_bytes()?;
        let temp = super::temp_path(path);
        let write_err = |source| FormatError::Write {
            path: path.to_path_buf(),
            source,
        };
        let result =
            std::fs::write(&temp, &bytes).and_then(|()| super::move_into_place(&temp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map_err(write_err)?;
        Ok(bytes.len() as u64)
    }
}

/// Decodes a list of at most `MAX` items, for `#[serde(deserialize_with = ...)]` on the
/// lists of a saved state whose items take far more memory than file: an empty vCPU state
/// is 12 bytes in the file and 6 KiB decoded, so without a bound a hostile state file of
/// 10 MB would make a restore allocate 5 GB. Space is reserved for the announced length
/// only when the input can hold it (postcard gives no hint otherwise), and never for more
/// than `MAX` items. A longer list fails the decoding. postcard keeps no custom error
/// text, so the user sees postcard's generic one.
pub fn bounded_vec<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX} items")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let announced = seq.size_hint().unwrap_or(0);
            if announced > MAX {
                return Err(serde::de::Error::invalid_length(announced, &self));
            }
            let mut items = Vec::with_capacity(announced);
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}

/// A state file whose magic, version, length and checksum are good and whose header is
/// decoded. The body is decoded only by `into_snapshot`, after the host check.
#[derive(Debug)]
pub struct StateFile {
    header: Header,
    body: Vec<u8>,
}

/// The fixed-size start of a state file.
struct Prefix {
    header_len: usize,
    body_len: u64,
    checksum: [u8; CHECKSUM_LEN],
}

impl Prefix {
    /// Checks what `head` (the file's first bytes; `file_len` in all) says about the file.
    fn parse(head: &[u8], file_len: u64) -> Result<Self, FormatError> {
        let magic_len = head.len().min(MAGIC.len());
        if head[..magic_len] != MAGIC[..magic_len] {
            return Err(FormatError::BadMagic);
        }
        let truncated = |needed: u64| FormatError::Truncated {
            len: file_len,
            needed,
        };
        if head.len() < PREFIX_LEN {
            return Err(truncated(PREFIX_LEN as u64));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if !SUPPORTED_FORMAT_VERSIONS.contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                writer: writer_version(&head[PREFIX_LEN..]),
            });
        }
        let header_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        let body_len = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let needed = (PREFIX_LEN as u64)
            .saturating_add(u64::from(header_len))
            .saturating_add(body_len);
        if file_len < needed {
            return Err(truncated(needed));
        }
        if file_len > needed {
            return Err(FormatError::TrailingBytes {
                len: file_len,
                needed,
            });
        }
        Ok(Self {
            header_len: header_len as usize,
            body_len,
            checksum: head[24..PREFIX_LEN].try_into().expect("32 bytes"),
        })
    }
}

/// The hearth version at the start of a header, when it looks like one.
fn writer_version(header: &[u8]) -> Option<String> {
    let (version, _) = postcard::take_from_bytes::<String>(header).ok()?;
    let printable = version.chars().all(|c| c.is_ascii_graphic() || c == ' ');
    (printable && !version.is_empty() && version.len() <= MAX_SHOWN_VERSION).then_some(version)
}

impl StateFile {
    /// Reads and checks the state file at `path`.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        let read_err = |source| FormatError::Read {
            path: path.to_path_buf(),
            source,
        };
        let in_file = |source| FormatError::InFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let mut file = File::open(path).map_err(read_err)?;
        let file_len = file.metadata().map_err(read_err)?.len();
        // Only the prefix is read before it is checked: a wrong path (a memory file, say)
        // is refused without reading gigabytes.
        let mut head = Vec::with_capacity(HEAD_READ);
        (&mut file)
            .take(HEAD_READ as u64)
            .read_to_end(&mut head)
            .map_err(read_err)?;
        let prefix = Prefix::parse(&head, file_len).map_err(in_file)?;
        let mut rest = head.split_off(PREFIX_LEN);
        let expected = prefix.header_len as u64 + prefix.body_len;
        (&mut file)
            .take(expected - rest.len() as u64)
            .read_to_end(&mut rest)
            .map_err(read_err)?;
        if (rest.len() as u64) < expected {
            // The file shrank while being read.
            return Err(in_file(FormatError::Truncated {
                len: (PREFIX_LEN + rest.len()) as u64,
                needed: PREFIX_LEN as u64 + expected,
            }));
        }
        Self::from_parts(prefix, rest).map_err(in_file)
    }

    /// Checks a state file held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        let prefix = Prefix::parse(bytes, bytes.len() as u64)?;
        Self::from_parts(prefix, bytes[PREFIX_LEN..].to_vec())
    }

    /// `rest` is everything after the prefix, of the length the prefix announced.
    fn from_parts(prefix: Prefix, mut rest: Vec<u8>) -> Result<Self, FormatError> {
        if Sha256::digest(&rest)[..] != prefix.checksum[..] {
            return Err(FormatError::Checksum);
        }
        let body = rest.split_off(prefix.header_len);
        let header: Header = postcard::from_bytes(&rest).map_err(FormatError::Header)?;
        Ok(Self { header, body })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The snapshot, when the host it was taken on and `current` are compatible.
    pub fn into_snapshot<T: DeserializeOwned>(
        self,
        current: &HostFacts,
    ) -> Result<Snapshot<T>, FormatError> {
        if let Some(reason) = self.header.host.incompatibility(current) {
            return Err(FormatError::IncompatibleHost(reason));
        }
        let ((layout, payload), unread) =
            postcard::take_from_bytes::<(MemoryLayout, T)>(&self.body)
                .map_err(FormatError::Body)?;
        if !unread.is_empty() {
            return Err(FormatError::BodyTrailing(unread.len()));
        }
        Ok(Snapshot {
            header: self.header,
            layout,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::cpu_features::{CpuFeatures, FeatureWord, Register};
    use crate::devices::virtio::block::BlockConfig;
    use crate::devices::virtio::net::NetConfig;
    use crate::devices::virtio::vsock::VsockConfig;
    use crate::snapshot::host::KvmFlavour;
    use crate::snapshot::testutil::{sample_facts, TempDir};
    use crate::vstate::memory::RegionLayout;

    /// Something shaped like a VM's saved state: device configuration from `config` (the
    /// kinds the device states embed), register-like arrays, nested options.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct Payload {
        vcpus: Vec<Vec<u64>>,
        lapic: Vec<u8>,
        disks: Vec<BlockConfig>,
        nets: Vec<NetConfig>,
        vsock: Option<VsockConfig>,
        name: String,
    }

    fn sample() -> Snapshot<Payload> {
        let layout = MemoryLayout {
            regions: vec![RegionLayout {
                guest_address: 0,
                size: 256 << 20,
                file_offset: 0,
            }],
        };
        let payload = Payload {
            vcpus: vec![(0..18).collect(), (100..118).collect()],
            lapic: (0..=255).collect(),
            disks: vec!["path=/images/root.ext4,ro=on,id=root".parse().unwrap()],
            nets: vec!["tap=tap0,mac=52:54:00:12:34:56".parse().unwrap()],
            vsock: Some("cid=3,socket=/tmp/v.sock".parse().unwrap()),
            name: "vm".into(),
        };
        Snapshot::new(sample_facts(), layout, payload)
    }

    fn decode(bytes: &[u8]) -> Result<Snapshot<Payload>, FormatError> {
        StateFile::from_bytes(bytes)?.into_snapshot(&sample_facts())
    }

    /// Re-seals `bytes` with a correct checksum after a test has edited them.
    fn reseal(bytes: &mut [u8]) {
        let digest = Sha256::digest(&bytes[PREFIX_LEN..]);
        bytes[24..PREFIX_LEN].copy_from_slice(&digest);
    }

    #[test]
    fn round_trip_in_memory_and_through_a_file() {
        let snapshot = sample();
        let bytes = snapshot.to_bytes().unwrap();
        assert_eq!(&bytes[..8], b"HEARTHST");
        assert_eq!(decode(&bytes).unwrap(), snapshot);

        let dir = TempDir::new("state-file");
        let path = dir.path().join("state");
        assert_eq!(snapshot.write(&path).unwrap(), bytes.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let read = StateFile::read(&path).unwrap();
        assert_eq!(read.header().hearth_version, HEARTH_VERSION);
        assert_eq!(
            read.into_snapshot::<Payload>(&sample_facts()).unwrap(),
            snapshot
        );
        assert!(!super::super::temp_path(&path).exists());
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[0] = b'X';
        assert_eq!(
            decode(&bytes).unwrap_err().to_string(),
            "not a hearth snapshot state file (bad magic)"
        );
        assert!(matches!(
            decode(b"{\"json\": 1}"),
            Err(FormatError::BadMagic)
        ));
    }

    #[test]
    fn truncation_is_refused_wherever_it_cuts() {
        let bytes = sample().to_bytes().unwrap();
        let full = bytes.len() as u64;
        for cut in [0, 5, 8, 30, PREFIX_LEN, PREFIX_LEN + 3, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            let needed = if cut < PREFIX_LEN {
                PREFIX_LEN as u64
            } else {
                full
            };
            assert_eq!(
                err.to_string(),
                format!("truncated: {cut} bytes, the file needs {needed}"),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn extra_bytes_are_refused() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes.push(0);
        assert!(matches!(
            decode(&bytes),
            Err(FormatError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn any_flipped_bit_fails_the_checksum() {
        let bytes = sample().to_bytes().unwrap();
        for position in [
            24,
            PREFIX_LEN,
            PREFIX_LEN + 1,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            let mut corrupt = bytes.clone();
            corrupt[position] ^= 0x10;
            assert_eq!(
                decode(&corrupt).unwrap_err().to_string(),
                "checksum mismatch: the file is corrupt",
                "flip at {position}"
            );
        }
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            decode(&bytes).unwrap_err().to_string(),
            format!(
                "format version 7 (written by hearth {HEARTH_VERSION}) is not supported; this \
                 hearth ({HEARTH_VERSION}) reads version 3, {FORMAT_VERSION}"
            )
        );
        // A header that does not start with a version string is not quoted.
        bytes[PREFIX_LEN] = 0xff;
        assert_eq!(
            decode(&bytes).unwrap_err().to_string(),
            format!(
                "format version 7 is not supported; this hearth ({HEARTH_VERSION}) reads version \
                 3, {FORMAT_VERSION}"
            )
        );
    }

    /// Version 4 only added a last variant to the virtio device states: a version-3 file
    /// reads as it did.
    #[test]
    fn version_3_snapshots_still_read() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(decode(&bytes).is_ok());
    }

    #[test]
    fn older_snapshots_are_refused() {
        // Version 1 saved no VM generation ID, which a restore must renew; version 2 no
        // rate limiters, so its device states do not decode as version 3's.
        for version in [1u32, 2] {
            let mut bytes = sample().to_bytes().unwrap();
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            assert!(decode(&bytes)
                .unwrap_err()
                .to_string()
                .starts_with(&format!("format version {version} (written by hearth")));
        }
    }

    #[test]
    fn an_incompatible_host_is_refused_before_the_body_is_read() {
        let mut bytes = sample().to_bytes().unwrap();
        // A garbled body that still checksums: only the host check can run.
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        reseal(&mut bytes);
        let mut other = sample_facts();
        other.kvm = KvmFlavour::Hardware;
        let err = StateFile::from_bytes(&bytes)
            .unwrap()
            .into_snapshot::<Payload>(&other)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "taken on an incompatible host: the snapshot was taken under nested PVM KVM, this \
             host has hardware (VMX/SVM) KVM"
        );

        let mut saved = sample();
        saved.header.host.cpu = CpuFeatures {
            vendor: "GenuineIntel".into(),
            words: vec![FeatureWord {
                leaf: 7,
                subleaf: 0,
                register: Register::Ebx,
                bits: (1 << 16) | (1 << 5),
            }],
        };
        let err = decode(&saved.to_bytes().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "taken on an incompatible host: this host's CPU lacks avx2, avx512f"
        );
    }

    #[test]
    fn a_payload_of_another_shape_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        let file = StateFile::from_bytes(&bytes).unwrap();
        // Fewer fields than were written: the rest is left over.
        #[derive(Debug, Deserialize)]
        struct Smaller {
            _vcpus: Vec<Vec<u64>>,
        }
        assert!(matches!(
            file.into_snapshot::<Smaller>(&sample_facts()),
            Err(FormatError::BodyTrailing(_))
        ));
        let file = StateFile::from_bytes(&bytes).unwrap();
        assert!(matches!(
            file.into_snapshot::<(Payload, u64)>(&sample_facts()),
            Err(FormatError::Body(_))
        ));
    }

    #[derive(Debug, Deserialize)]
    struct AtMostThree {
        #[serde(deserialize_with = "bounded_vec::<_, _, 3>")]
        items: Vec<u32>,
        after: u8,
    }

    #[test]
    fn bounded_lists_refuse_more_items_than_their_bound() {
        let decode = |bytes: &[u8]| postcard::from_bytes::<AtMostThree>(bytes);
        let three = decode(&[3, 10, 20, 30, 7]).unwrap();
        assert_eq!((three.items, three.after), (vec![10, 20, 30], 7));
        assert!(decode(&[0, 7]).unwrap().items.is_empty());
        // Announced, with the bytes for it: refused before any item is decoded.
        assert!(decode(&[4, 1, 2, 3, 4, 7]).is_err());
        // Announced beyond the input (no size hint): refused at the fourth item.
        let mut huge = postcard::to_stdvec(&(1u64 << 60)).unwrap();
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert!(decode(&huge).is_err());
        // Fewer items than announced: the input ends.
        assert!(decode(&[3, 1, 2]).is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = TempDir::new("state-errors");
        let missing = dir.path().join("missing");
        let err = StateFile::read(&missing).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read the snapshot state file \"{}\"",
                missing.display()
            )
        );

        let mut bytes = sample().to_bytes().unwrap();
        bytes.truncate(100);
        let short = dir.path().join("short");
        std::fs::write(&short, &bytes).unwrap();
        let err = StateFile::read(&short).unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "snapshot state file \"{}\": truncated: 100 bytes, the file needs {}",
                short.display(),
                sample().to_bytes().unwrap().len()
            )
        );

        // A large file that is not a state file is refused from its first bytes.
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(1 << 30).unwrap();
        assert!(matches!(
            StateFile::read(&big),
            Err(FormatError::InFile { source, .. }) if matches!(*source, FormatError::BadMagic)
        ));

        let err = sample()
            .write(&dir.path().join("no-such-dir").join("state"))
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot write the snapshot state file"));
    }
}
