//! Diagnostics of a running guest: where its vCPUs spend their time ([`sampler`]) and
//! the kernel symbols that name those places ([`symbols`]).

pub mod sampler;
pub mod symbols;

pub use sampler::RipSampler;
pub use symbols::{Symbols, SymbolsError};
