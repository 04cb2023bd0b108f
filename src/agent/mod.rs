//! The guest agent, `hearth-init`, and the protocol the host uses to talk to it.
//!
//! [`protocol`] and [`relay`] (published ports' traffic) are shared by both sides. The
//! agent itself (PID 1 of container VMs and machines) lives in [`init`] and is started
//! by the `hearth-init` binary.

pub mod init;
pub mod protocol;
pub mod relay;
