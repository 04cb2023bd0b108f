//! Access to /dev/kvm: opening it, checking the API version and the capabilities hearth
//! relies on, and the host-wide limits it reports.

use std::path::PathBuf;

use kvm_ioctls::{Cap, Kvm};

/// Environment variable that points hearth at another KVM device node (tests use it).
pub const KVM_DEVICE_ENV: &str = "HEARTH_KVM_DEVICE";
const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// Capabilities without which hearth cannot build a VM, with the name shown to the user.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open KVM device {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a KVM device")]
    NotKvm {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM API version {0} is not supported (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    #[error("--cpus {requested} is above this KVM's maximum of {max} vCPUs")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] std::io::Error),
    #[error("cannot read the MSRs KVM saves (KVM_GET_MSR_INDEX_LIST)")]
    MsrIndexList(#[source] std::io::Error),
}

/// An open, checked /dev/kvm.
pub struct KvmContext {
    pub kvm: Kvm,
    pub max_vcpus: usize,
}

impl KvmContext {
    /// Opens the KVM device (or `$HEARTH_KVM_DEVICE`) and checks that it is usable.
    pub fn open() -> Result<Self, KvmError> {
        let path = std::env::var_os(KVM_DEVICE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE));
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            KvmError::Open {
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            }
        })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| KvmError::Open {
            path: path.clone(),
            source: e.into(),
        })?;
        Self::check(kvm, path)
    }

    fn check(kvm: Kvm, path: PathBuf) -> Result<Self, KvmError> {
        // GET_API_VERSION is the first ioctl: on a file that is not /dev/kvm it fails with
        // ENOTTY, which is how a wrong device is recognised.
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(KvmError::NotKvm {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        if version != KVM_API_VERSION {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        Ok(Self { kvm, max_vcpus })
    }

    /// Fails when the host cannot run `count` vCPUs.
    pub fn check_vcpu_count(&self, count: u8) -> Result<(), KvmError> {
        if usize::from(count) > self.max_vcpus {
            return Err(KvmError::TooManyVcpus {
                requested: count,
                max: self.max_vcpus,
            });
        }
        Ok(())
    }

    /// The MSRs KVM can save and restore for a vCPU (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        self.kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(|e| KvmError::MsrIndexList(e.into()))
    }

    /// The CPUID leaves KVM can expose, as the starting point for each vCPU.
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::SupportedCpuid(e.into()))
    }
}
