//! KVM state: the device, the VM, guest memory and the vCPUs.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
