//! Emulated devices and the buses that reach them.

pub mod bus;
pub mod control;
pub mod legacy;
pub mod virtio;
pub mod vmgenid;
