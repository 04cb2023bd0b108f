//! What the tests of `hearth container` and `hearth machine` share: the hearth command
//! with a test's own cache, templates and state, the guest kernel and agent of this build,
//! and a run with the Linux-guest timeout.

use std::path::Path;
use std::process::{Command, Output};

use super::linux::{minimal_kernel, MINIMAL_TIMEOUT};

/// `hearth` with its cache, templates and state directories where the test wants them
/// (a state directory may be deliberately deeper than a socket address holds), the
/// minimal guest kernel and the `hearth-init` of this build.
pub fn hearth_in(cache: &Path, templates: &Path, state: &Path) -> Command {
    let mut cmd = super::hearth();
    cmd.env("HEARTH_CACHE", cache)
        .env("HEARTH_TEMPLATES", templates)
        .env("HEARTH_STATE", state)
        .env("HEARTH_GUEST_KERNEL", minimal_kernel())
        .env("HEARTH_INIT", env!("CARGO_BIN_EXE_hearth-init"));
    cmd
}

/// Runs a container or machine command to its end, with the Linux-guest timeout.
pub fn run(cmd: Command) -> Output {
    super::run_with_timeout(cmd, MINIMAL_TIMEOUT)
}

#[track_caller]
pub fn assert_status(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{}", super::describe(out));
}
