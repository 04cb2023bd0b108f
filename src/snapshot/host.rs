//! The facts about the host a snapshot depends on: which KVM ran it, which CPU profile the
//! guest got, and the CPU features it was offered. A snapshot restores only where the KVM
//! flavour is the same and every feature is offered again.

use std::fmt;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::arch::cpu_features::CpuFeatures;
use crate::arch::cpuid::{self, CpuidError, CpuidOptions};
use crate::arch::pvm::host_is_pvm;
use crate::config::CpuProfile;
use crate::vstate::kvm::{KvmContext, KvmError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("cannot build the guest CPUID")]
    Cpuid(#[source] CpuidError),
}

/// Which kind of KVM runs the guest. Guest state does not move between them: the nested
/// PVM module keeps guest state its own way and needs hearth's compatibility layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvmFlavour {
    /// Hardware-assisted virtualisation (VMX or SVM).
    Hardware,
    /// The nested `kvm_pvm` module.
    Pvm,
}

impl KvmFlavour {
    pub fn of_this_host() -> Self {
        if host_is_pvm() {
            Self::Pvm
        } else {
            Self::Hardware
        }
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hardware => "hardware (VMX/SVM) KVM",
            Self::Pvm => "nested PVM KVM",
        })
    }
}

/// What a snapshot records about the host it was taken on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub kvm: KvmFlavour,
    /// The profile the guest runs with; a restore keeps it.
    pub cpu_profile: CpuProfile,
    /// The features the guest may have seen and come to use.
    pub cpu: CpuFeatures,
}

impl HostFacts {
    /// This host's facts for a guest with `profile`: the CPUID hearth gives a vCPU (see
    /// `Vcpu::configure`), plus, on a nested PVM host, the host CPU's own features in the
    /// leaves that host shows its guests unchanged. What a restore compares a snapshot to.
    pub fn probe(kvm: &KvmContext, profile: CpuProfile) -> Result<Self, HostError> {
        let mut supported = kvm.supported_cpuid()?;
        let options = CpuidOptions {
            cpu_index: 0,
            cpu_count: 1,
            hide_pvm_unsupported: profile == CpuProfile::Compat,
        };
        cpuid::normalize(&mut supported, &options).map_err(HostError::Cpuid)?;
        Ok(Self::for_guest(supported.as_slice(), profile))
    }

    /// This host's facts for a guest running with `profile` whose vCPU was given `cpuid`
    /// (a saved vCPU's): what a snapshot records.
    pub fn for_guest(cpuid: &[kvm_cpuid_entry2], profile: CpuProfile) -> Self {
        let flavour = KvmFlavour::of_this_host();
        let mut cpu = CpuFeatures::from_entries(cpuid);
        if flavour == KvmFlavour::Pvm {
            cpu = cpu.with_pvm_native_leaves();
        }
        Self {
            kvm: flavour,
            cpu_profile: profile,
            cpu,
        }
    }

    /// Why a guest saved with `self` cannot resume on `current`, in one phrase; `None` when
    /// it can.
    pub fn incompatibility(&self, current: &HostFacts) -> Option<String> {
        if self.kvm != current.kvm {
            return Some(format!(
                "the snapshot was taken under {}, this host has {}",
                self.kvm, current.kvm
            ));
        }
        if self.cpu_profile != current.cpu_profile {
            return Some(format!(
                "the snapshot's guest runs the {:?} CPU profile, this host was probed for {:?}",
                self.cpu_profile, current.cpu_profile
            ));
        }
        self.cpu.missing_on(&current.cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testutil::sample_facts;

    #[test]
    fn another_kvm_flavour_is_named() {
        let saved = sample_facts();
        let current = HostFacts {
            kvm: KvmFlavour::Hardware,
            ..saved.clone()
        };
        assert_eq!(saved.incompatibility(&saved), None);
        assert_eq!(
            saved.incompatibility(&current).unwrap(),
            "the snapshot was taken under nested PVM KVM, this host has hardware (VMX/SVM) KVM"
        );
    }

    #[test]
    fn a_probe_for_another_profile_does_not_pass() {
        let saved = sample_facts();
        let current = HostFacts {
            cpu_profile: CpuProfile::Host,
            ..saved.clone()
        };
        assert!(saved
            .incompatibility(&current)
            .unwrap()
            .contains("Compat CPU profile"));
    }

    #[test]
    fn this_host_is_compatible_with_itself() {
        let kvm = match KvmContext::open() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("SKIPPED: no KVM ({e}); this_host_is_compatible_with_itself did not run");
                return;
            }
        };
        for profile in [CpuProfile::Host, CpuProfile::Compat] {
            let facts = HostFacts::probe(&kvm, profile).unwrap();
            assert_eq!(facts.kvm, KvmFlavour::of_this_host());
            assert!(!facts.cpu.vendor.is_empty());
            assert_eq!(facts.incompatibility(&facts), None);
            assert_eq!(HostFacts::probe(&kvm, profile).unwrap(), facts);
        }
    }
}
