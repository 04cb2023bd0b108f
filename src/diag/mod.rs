//! Diagnostics of a running guest: where its vCPUs spend their time ([`sampler`]) and
//! the kernel symbols that name those places ([`symbols`]).

pub mod sampler;
pub mod symbols;

pub use sampler::RipSampler;
pub use symbols::{Symbols, SymbolsError};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RipSamplingConfig;

/// The RIP samplers' interval and symbols for a VM booting `kernel` (see
/// [`RipSamplingConfig::kernel_symbols`] for where symbols come from).
pub fn sampling_setup(
    sampling: &RipSamplingConfig,
    kernel: &Path,
) -> Result<(Duration, Option<Arc<Symbols>>), SymbolsError> {
    let symbols = match &sampling.kernel_symbols {
        Some(path) => Some(Symbols::load(path)?),
        None => Symbols::for_kernel(kernel),
    };
    match &symbols {
        Some(symbols) => log::info!(
            "sampling vCPU RIPs every {} ms, {} code symbols from \"{}\"",
            sampling.interval_ms,
            symbols.len(),
            symbols.source().display()
        ),
        None => log::info!("sampling vCPU RIPs every {} ms", sampling.interval_ms),
    }
    Ok((
        Duration::from_millis(u64::from(sampling.interval_ms)),
        symbols.map(Arc::new),
    ))
}
