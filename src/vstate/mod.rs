//! KVM state: the device, the VM, guest memory and the vCPUs.

pub mod kvm;
pub mod memory;
pub mod pv_xstate;
pub mod pvm;
pub mod vcpu;
pub mod vm;
