//! Holding a vCPU's time-stamp counter still across a pause.
//!
//! A Linux guest on a host with an invariant TSC picks the TSC as its clocksource over
//! kvmclock (it demotes kvm-clock when the CPU reports a constant, non-stop TSC), so
//! saving and restoring kvmclock alone leaves its monotonic clock jumping by the length of
//! a pause. The guest TSC is the host's plus a per-vCPU offset; writing IA32_TSC from the
//! VMM (KVM_SET_MSRS) sets that offset so the guest reads the written value at that
//! moment. So the value read when the vCPU parks, written back just before it runs again,
//! takes the pause out of the guest's TSC.
//!
//! KVM treats a VMM's TSC write that lands within one second of where the TSC would be
//! anyway as an attempt to synchronize the vCPUs, and keeps the current offset then: a
//! pause shorter than a second still shows in the guest (by less than a second), and the
//! second and later vCPUs of a VM, whose saved values are milliseconds apart, all get the
//! first one's new offset, so they stay in step. KVM_VCPU_TSC_OFFSET (a vCPU device
//! attribute) would set the offset exactly, but needs the host TSC's advance during the
//! pause and its scaling ratio; the MSR works on every KVM and needs neither.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::msr::IA32_TSC;

#[derive(Debug, thiserror::Error)]
pub enum TscError {
    #[error("cannot read the guest TSC")]
    Read(#[source] kvm_ioctls::Error),
    #[error("cannot set the guest TSC")]
    Write(#[source] kvm_ioctls::Error),
    #[error("KVM did not {0} IA32_TSC")]
    Refused(&'static str),
}

fn tsc_msrs(value: u64) -> Msrs {
    let entry = kvm_msr_entry {
        index: IA32_TSC,
        data: value,
        ..Default::default()
    };
    Msrs::from_entries(&[entry]).expect("one MSR fits a KVM request")
}

/// The guest TSC of a vCPU that is not running, as the guest would read it now.
pub fn read(vcpu: &VcpuFd) -> Result<u64, TscError> {
    let mut msrs = tsc_msrs(0);
    match vcpu.get_msrs(&mut msrs).map_err(TscError::Read)? {
        1 => Ok(msrs.as_slice()[0].data),
        _ => Err(TscError::Refused("read")),
    }
}

/// Makes the guest TSC of a vCPU that is not running read `value` now (see the module
/// comment for when KVM keeps the offset it has instead).
pub fn write(vcpu: &VcpuFd, value: u64) -> Result<(), TscError> {
    match vcpu.set_msrs(&tsc_msrs(value)).map_err(TscError::Write)? {
        1 => Ok(()),
        _ => Err(TscError::Refused("set")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use std::time::Duration;

    /// A value written back after more than KVM's one-second synchronization window is
    /// what the vCPU reads: the time in between is gone. Needs /dev/kvm (skips without),
    /// and not a nested-PVM one: there the guest TSC is the host's, whatever is written.
    #[test]
    fn written_back_tsc_leaves_out_the_time_between() {
        if crate::arch::pvm::host_is_pvm() {
            eprintln!("skipping: a nested-PVM guest reads the host's TSC");
            return;
        }
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipping: cannot open /dev/kvm: {e}");
                return;
            }
        };
        let vm = kvm.create_vm().expect("create VM");
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        let khz = u64::from(vcpu.get_tsc_khz().expect("TSC frequency"));
        let held = read(&vcpu).expect("read");
        std::thread::sleep(Duration::from_millis(1500));
        let before_write = read(&vcpu).expect("read");
        assert!(
            before_write - held >= khz * 1000,
            "the TSC did not run for a second: {held} -> {before_write} at {khz} kHz"
        );
        write(&vcpu, held).expect("write");
        let after = read(&vcpu).expect("read");
        // A tenth of a second's slack for a busy host between the write and the read.
        assert!(
            after >= held && after - held < khz * 100,
            "the TSC kept the pause: held {held}, read {after} at {khz} kHz"
        );
    }
}
