//! Architecture-specific guest setup. hearth only runs x86_64 guests; the split keeps every
//! register value, table layout and guest address in one subtree.

pub mod x86_64;

pub use x86_64::*;
