//! The start-up benchmark's cases: what each runs, what exit status means success, and
//! which hearth case it is compared with.
//!
//! Every case runs the same command (`/bin/true` by default) on the same busybox root
//! filesystem where it has one: the guest kernel cases through the busybox test
//! initramfs, the container cases through the rootfs directory or its OCI bundle. The
//! tiny-payload cases run no command: they measure the VMM alone.
//!
//! Ratios (see [`CaseId::baseline`]): tiny-payload cases are compared with `hearth-tiny`,
//! guest-kernel cases with `hearth-linux`, container-like cases (crun, runc, unshare,
//! hearth containers) with `hearth-container`, hearth's fresh-microVM container booting
//! its kernel, and `hearth-machine-start-template` with `hearth-machine-start`. When the
//! baseline has no result (not selected, or failed), `hearth-tiny` is used instead.
//!
//! The `-template` cases restore their VM from a template (see `container::template`);
//! their twins pass `--no-template` and boot. A template is made on first use, so each
//! template case runs once unmeasured before the first round ([`Runner::makes_template`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::fixtures::Fixtures;
use super::process::Invocation;
use crate::arch::pvm::host_is_pvm;
use crate::config::{compat_boot_args, BootSpeedups};

/// What hearth's `--boot-timer` prints on stderr when the guest signals boot complete.
pub const BOOT_MARKER: &str = "boot-timer:";
/// Guest RAM of the tiny-payload VMs.
pub const TINY_MEMORY: &str = "64M";
/// Guest RAM of the Linux VMs.
pub const LINUX_MEMORY: &str = "128M";
/// The machine `hearth-machine` starts and stops.
pub const MACHINE_NAME: &str = "hearth-bench";
/// The machine `hearth-machine-start` boots and stops in every sample.
pub const MACHINE_START_NAME: &str = "hearth-bench-start";
/// The machine `hearth-machine-start-template` restores and stops in every sample.
pub const MACHINE_START_TEMPLATE_NAME: &str = "hearth-bench-start-template";

const TINY_TIMEOUT: Duration = Duration::from_secs(60);
const LINUX_TIMEOUT: Duration = Duration::from_secs(600);
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(600);
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(60);
/// The name `image::sample::busybox_docker_save` tags its image with.
const PODMAN_IMAGE: &str = "hearth-sample/busybox:latest";
/// QEMU booting Linux on a nested-PVM host may hang rather than fail; the minimal kernel
/// takes about a minute there when it works.
const QEMU_LINUX_TIMEOUT: Duration = Duration::from_secs(300);

/// QEMU's isa-debug-exit device turns a guest write of N into exit status 2N+1.
const QEMU_DEBUG_EXIT_SUCCESS: i32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseId {
    HearthTiny,
    HearthLinux,
    HearthContainer,
    HearthContainerTemplate,
    HearthMachine,
    HearthMachineStart,
    HearthMachineStartTemplate,
    Crun,
    Runc,
    PodmanHearth,
    PodmanCrun,
    Unshare,
    QemuTiny,
    QemuLinux,
    FirecrackerTiny,
    FirecrackerLinux,
}

impl CaseId {
    /// Every case, in report order.
    pub const ALL: [CaseId; 16] = [
        CaseId::HearthTiny,
        CaseId::HearthLinux,
        CaseId::HearthContainer,
        CaseId::HearthContainerTemplate,
        CaseId::HearthMachine,
        CaseId::HearthMachineStart,
        CaseId::HearthMachineStartTemplate,
        CaseId::Crun,
        CaseId::Runc,
        CaseId::PodmanHearth,
        CaseId::PodmanCrun,
        CaseId::Unshare,
        CaseId::QemuTiny,
        CaseId::QemuLinux,
        CaseId::FirecrackerTiny,
        CaseId::FirecrackerLinux,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CaseId::HearthTiny => "hearth-tiny",
            CaseId::HearthLinux => "hearth-linux",
            CaseId::HearthContainer => "hearth-container",
            CaseId::HearthContainerTemplate => "hearth-container-template",
            CaseId::HearthMachine => "hearth-machine",
            CaseId::HearthMachineStart => "hearth-machine-start",
            CaseId::HearthMachineStartTemplate => "hearth-machine-start-template",
            CaseId::Crun => "crun",
            CaseId::Runc => "runc",
            CaseId::PodmanHearth => "podman-hearth",
            CaseId::PodmanCrun => "podman-crun",
            CaseId::Unshare => "unshare",
            CaseId::QemuTiny => "qemu-tiny",
            CaseId::QemuLinux => "qemu-linux",
            CaseId::FirecrackerTiny => "firecracker-tiny",
            CaseId::FirecrackerLinux => "firecracker-linux",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    pub fn description(self) -> &'static str {
        match self {
            CaseId::HearthTiny => "hearth microVM, tiny payload: spawn -> guest runs -> exit",
            CaseId::HearthLinux => "hearth microVM, minimal Linux kernel + busybox initramfs",
            CaseId::HearthContainer => "hearth container run --no-template, fresh microVM booting",
            CaseId::HearthContainerTemplate => {
                "hearth container run, fresh microVM restored from a template"
            }
            CaseId::HearthMachine => "hearth container run inside a running hearth machine",
            CaseId::HearthMachineStart => {
                "hearth machine start --no-template (boots) until it returns, then machine stop"
            }
            CaseId::HearthMachineStartTemplate => {
                "hearth machine start (restores a template) until it returns, then machine stop"
            }
            CaseId::Crun => "crun run, OCI bundle of the rootfs",
            CaseId::Runc => "runc run, OCI bundle of the rootfs",
            CaseId::PodmanHearth => {
                "podman run --rm with hearth as its OCI runtime (a microVM per container)"
            }
            CaseId::PodmanCrun => "podman run --rm with crun, podman's own runtime",
            CaseId::Unshare => "unshare --fork --pid --mount --root (namespace-only floor)",
            CaseId::QemuTiny => "QEMU microvm, tiny payload",
            CaseId::QemuLinux => "QEMU microvm, minimal Linux kernel + busybox initramfs",
            CaseId::FirecrackerTiny => "Firecracker, tiny payload",
            CaseId::FirecrackerLinux => "Firecracker, minimal Linux kernel + busybox initramfs",
        }
    }

    /// The hearth case this one's ratio is computed against (see the module docs).
    pub fn baseline(self) -> CaseId {
        match self {
            CaseId::HearthTiny | CaseId::QemuTiny | CaseId::FirecrackerTiny => CaseId::HearthTiny,
            CaseId::HearthLinux | CaseId::QemuLinux | CaseId::FirecrackerLinux => {
                CaseId::HearthLinux
            }
            CaseId::HearthMachineStart | CaseId::HearthMachineStartTemplate => {
                CaseId::HearthMachineStart
            }
            CaseId::HearthContainer
            | CaseId::HearthContainerTemplate
            | CaseId::HearthMachine
            | CaseId::Crun
            | CaseId::Runc
            | CaseId::PodmanHearth
            | CaseId::PodmanCrun
            | CaseId::Unshare => CaseId::HearthContainer,
        }
    }

    /// Whether the case restores from a template (made on first use).
    pub fn uses_template(self) -> bool {
        matches!(
            self,
            CaseId::HearthContainerTemplate | CaseId::HearthMachineStartTemplate
        )
    }

    /// Whether the case boots the minimal kernel with the test initramfs.
    pub fn needs_linux(self) -> bool {
        matches!(
            self,
            CaseId::HearthLinux | CaseId::QemuLinux | CaseId::FirecrackerLinux
        )
    }
}

/// Parses `--include`: comma-separated case names, or `all`.
pub fn parse_include(list: &str) -> Result<Vec<CaseId>, String> {
    select_cases(list, &CaseId::ALL, CaseId::name)
}

/// Parses an `--include` list of the cases `all` (in report order) named by `name`:
/// comma-separated names, or `all`. The selection comes back in report order, whatever
/// the order given, each case once.
pub fn select_cases<C: Copy + PartialEq>(
    list: &str,
    all: &[C],
    name: fn(C) -> &'static str,
) -> Result<Vec<C>, String> {
    if list.trim() == "all" {
        return Ok(all.to_vec());
    }
    let mut cases = Vec::new();
    for wanted in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let case = all
            .iter()
            .copied()
            .find(|&c| name(c) == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|&c| name(c)).collect();
                format!("unknown case {wanted:?} (known: {})", known.join(", "))
            })?;
        if !cases.contains(&case) {
            cases.push(case);
        }
    }
    if cases.is_empty() {
        return Err("no case selected".to_owned());
    }
    cases.sort_by_key(|c| all.iter().position(|a| a == c));
    Ok(cases)
}

/// How to run one sample of a case.
#[derive(Clone, Debug)]
pub struct Runner {
    pub invocation: Invocation,
    pub expected_status: i32,
    pub timeout: Duration,
    /// Appended to the arguments with the sample number: a container id that must be
    /// unique per run.
    pub unique_id_prefix: Option<String>,
    /// Run once before the first sample (e.g. start a machine); its failure fails the case.
    pub setup: Option<Invocation>,
    /// Run once after the last sample, whatever happened.
    pub teardown: Option<Invocation>,
    /// Run right after `invocation` succeeds, as part of the same sample: the sample is
    /// both together, and `invocation`'s exit is its ready time (`machine start` returning,
    /// then `machine stop`).
    pub then: Option<Invocation>,
    /// The case restores from a template: one unmeasured sample before the first round
    /// makes the template if it is missing, so that no measured sample builds it.
    pub makes_template: bool,
    /// How this case was adapted to the host, for the report.
    pub note: Option<String>,
}

impl Runner {
    fn new(invocation: Invocation, expected_status: i32, timeout: Duration) -> Self {
        Runner {
            invocation,
            expected_status,
            timeout,
            unique_id_prefix: None,
            setup: None,
            teardown: None,
            then: None,
            makes_template: false,
            note: None,
        }
    }

    /// The invocation of sample `n`.
    pub fn invocation_for(&self, n: usize) -> Invocation {
        match &self.unique_id_prefix {
            Some(prefix) => self.invocation.clone().arg(format!("{prefix}-{n}")),
            None => self.invocation.clone(),
        }
    }
}

/// Why a case does not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotRun {
    /// Optional tool missing: reported as skipped, with a note.
    Skipped(String),
    /// Needed artifact or tool missing: reported as failed.
    Failed(String),
}

/// What a case needs from the environment.
pub struct CaseEnv<'a> {
    pub hearth: &'a Path,
    pub fixtures: &'a Fixtures,
    pub command: &'a [String],
    /// Extra flags for the cases' own `hearth run` (`--hearth-flag`).
    pub hearth_flags: &'a [String],
}

impl CaseEnv<'_> {
    fn kernel_and_initrd(&self) -> Result<(&Path, &Path), NotRun> {
        let kernel = self.fixtures.kernel.as_deref().map_err(|e| failed(e))?;
        let initrd = self.fixtures.initramfs.as_deref().map_err(|e| failed(e))?;
        Ok((kernel, initrd))
    }

    fn cmdline(&self) -> String {
        super::fixtures::linux::cmdline("", &self.command.join(" "))
    }

    /// What `hearth container run` is given as the image: the very rootfs directory the
    /// other runtimes use (a plain root filesystem image to hearth).
    fn container_image(&self) -> OsString {
        self.fixtures.rootfs.clone().into_os_string()
    }

    fn hearth(&self) -> Invocation {
        Invocation::new(self.hearth)
    }

    /// hearth as an OCI runtime: a `hearth-oci` symlink to the hearth binary in the work
    /// directory (engines take a runtime's path; the name selects `hearth oci`).
    fn hearth_oci(&self) -> Result<PathBuf, NotRun> {
        let link = self.fixtures.dir.join(crate::oci::PROGRAM_NAME);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(self.hearth, &link).map_err(|e| {
            NotRun::Failed(format!(
                "cannot create the runtime link {}: {e}",
                link.display()
            ))
        })?;
        Ok(link)
    }

    /// `hearth run` with the `--hearth-flag`s.
    fn hearth_run(&self) -> Invocation {
        self.hearth().arg("run").args(self.hearth_flags)
    }

    /// The report's note on a case that ran with `--hearth-flag`s.
    fn hearth_flags_note(&self) -> Option<String> {
        (!self.hearth_flags.is_empty())
            .then(|| format!("hearth run given {}", self.hearth_flags.join(" ")))
    }
}

fn failed(msg: &str) -> NotRun {
    NotRun::Failed(msg.to_owned())
}

/// `name` on `$PATH`, if it is there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn required_tool(name: &str, package: &str) -> Result<PathBuf, NotRun> {
    find_on_path(name)
        .ok_or_else(|| NotRun::Failed(format!("{name} is not on PATH (apt-get install {package})")))
}

fn optional_tool(name: &str, note: &str) -> Result<PathBuf, NotRun> {
    find_on_path(name).ok_or_else(|| NotRun::Skipped(format!("{name} is not on PATH; {note}")))
}

/// How to run `case` here, or why it cannot run.
pub fn runner(case: CaseId, env: &CaseEnv) -> Result<Runner, NotRun> {
    let command = env.command;
    Ok(match case {
        CaseId::HearthTiny => Runner {
            note: env.hearth_flags_note(),
            ..Runner::new(
                env.hearth_run()
                    .arg("--kernel")
                    .arg(&env.fixtures.tiny)
                    .args(["--memory", TINY_MEMORY, "--boot-timer"])
                    .boot_marker(BOOT_MARKER),
                0,
                TINY_TIMEOUT,
            )
        },
        CaseId::HearthLinux => {
            let (kernel, initrd) = env.kernel_and_initrd()?;
            let runner = Runner::new(
                env.hearth_run()
                    .arg("--kernel")
                    .arg(kernel)
                    .arg("--initrd")
                    .arg(initrd)
                    .arg("--cmdline")
                    .arg(env.cmdline())
                    .args(["--memory", LINUX_MEMORY, "--boot-timer"])
                    .boot_marker(BOOT_MARKER),
                0,
                LINUX_TIMEOUT,
            );
            Runner {
                note: env.hearth_flags_note(),
                ..runner
            }
        }
        CaseId::HearthContainer => Runner::new(
            env.hearth()
                .args(["container", "run", "--no-template"])
                .arg(env.container_image())
                .args(command),
            0,
            CONTAINER_TIMEOUT,
        ),
        CaseId::HearthContainerTemplate => Runner {
            makes_template: true,
            ..Runner::new(
                env.hearth()
                    .args(["container", "run"])
                    .arg(env.container_image())
                    .args(command),
                0,
                CONTAINER_TIMEOUT,
            )
        },
        CaseId::HearthMachineStart => machine_start(env, MACHINE_START_NAME, false),
        CaseId::HearthMachineStartTemplate => machine_start(env, MACHINE_START_TEMPLATE_NAME, true),
        CaseId::HearthMachine => Runner {
            setup: Some(env.hearth().args(["machine", "start", MACHINE_NAME])),
            teardown: Some(env.hearth().args(["machine", "stop", MACHINE_NAME])),
            ..Runner::new(
                env.hearth()
                    .args(["container", "run", "--machine", MACHINE_NAME])
                    .arg(env.container_image())
                    .args(command),
                0,
                CONTAINER_TIMEOUT,
            )
        },
        CaseId::Crun if cgroups_are_hybrid() => {
            // crun refuses hybrid cgroup v1/v2 hosts ("drop all controllers from
            // cgroupv2"), and on a pure v2 view it needs CAP_SYS_RESOURCE for its eBPF
            // device filter. So each sample runs crun in a private mount namespace with a
            // cgroup2 mount at /sys/fs/cgroup and without cgroup management. The extra
            // unshare + sh + mount cost (a few ms) is counted against crun.
            let tool = required_tool("crun", "crun")?;
            let unshare = required_tool("unshare", "util-linux")?;
            let script = format!(
                "umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && \
                 exec {} --cgroup-manager=disabled run --bundle \"$0\" \"$1\"",
                tool.display()
            );
            Runner {
                unique_id_prefix: Some(format!("hearth-bench-{}", std::process::id())),
                note: Some(
                    "hybrid cgroup host: crun runs in a private mount namespace with a \
                     cgroup2 view and --cgroup-manager=disabled (no cgroup setup)"
                        .to_owned(),
                ),
                ..Runner::new(
                    Invocation::new(unshare)
                        .args(["--mount", "--propagation", "private", "sh", "-c"])
                        .arg(script)
                        .arg(&env.fixtures.bundle),
                    0,
                    RUNTIME_TIMEOUT,
                )
            }
        }
        CaseId::Crun | CaseId::Runc => {
            let name = case.name();
            let tool = required_tool(name, name)?;
            Runner {
                unique_id_prefix: Some(format!("hearth-bench-{}", std::process::id())),
                ..Runner::new(
                    Invocation::new(tool)
                        .args(["run", "--bundle"])
                        .arg(&env.fixtures.bundle),
                    0,
                    RUNTIME_TIMEOUT,
                )
            }
        }
        CaseId::PodmanHearth => Runner {
            makes_template: true,
            ..podman(env, &env.hearth_oci()?)?
        },
        CaseId::PodmanCrun => podman(env, &required_tool("crun", "crun")?)?,
        CaseId::Unshare => Runner::new(
            Invocation::new(required_tool("unshare", "util-linux")?)
                .args(["--fork", "--pid", "--mount"])
                .arg(format!("--root={}", env.fixtures.rootfs.display()))
                .args(command),
            0,
            RUNTIME_TIMEOUT,
        ),
        CaseId::QemuTiny => Runner {
            note: qemu_pvm_note(false),
            ..Runner::new(
                qemu()?.arg("-kernel").arg(&env.fixtures.tiny),
                QEMU_DEBUG_EXIT_SUCCESS,
                TINY_TIMEOUT,
            )
        },
        CaseId::QemuLinux => {
            let (kernel, initrd) = env.kernel_and_initrd()?;
            // The guest powers off (ACPI) after the command; isa-debug-exit stays unused.
            // On a nested-PVM host the guest gets the boot options hearth's compat profile
            // adds (its speed-ups included, as hearth's own case boots with them), computed
            // by the same function, so both VMMs boot the same kernel the same way.
            let mut cmdline = env.cmdline();
            if host_is_pvm() {
                let compat =
                    compat_boot_args(super::fixtures::linux::BASE_CMDLINE, BootSpeedups::On);
                cmdline = super::fixtures::linux::cmdline(&compat, &env.command.join(" "));
            }
            Runner {
                note: qemu_pvm_note(true),
                ..Runner::new(
                    qemu()?
                        .args(["-m", LINUX_MEMORY])
                        .arg("-kernel")
                        .arg(kernel)
                        .arg("-initrd")
                        .arg(initrd)
                        .arg("-append")
                        .arg(cmdline),
                    0,
                    QEMU_LINUX_TIMEOUT,
                )
            }
        }
        CaseId::FirecrackerTiny => firecracker(env, &env.fixtures.tiny, None, TINY_TIMEOUT)?,
        CaseId::FirecrackerLinux => {
            let (kernel, initrd) = env.kernel_and_initrd()?;
            firecracker(env, kernel, Some(initrd), LINUX_TIMEOUT)?
        }
    })
}

/// `podman run --rm --network none IMAGE CMD` with `runtime`, podman's storage and state
/// in the work directory; the busybox image is loaded once, before the first sample.
/// podman's options are the ones a host without systemd, journald or kernel overlayfs in
/// its sandbox needs (README, "Using hearth with podman, docker and containerd").
fn podman(env: &CaseEnv, runtime: &Path) -> Result<Runner, NotRun> {
    let tool = optional_tool(
        "podman",
        "apt-get install podman conmon to compare with a container engine",
    )?;
    let dir = env.fixtures.dir.join("podman");
    let archive = env.fixtures.dir.join("busybox-docker-save.tar");
    if !archive.exists() {
        crate::image::sample::busybox_docker_save(&archive, &[])
            .map_err(|e| NotRun::Failed(format!("building the podman image archive: {e}")))?;
    }
    let podman = Invocation::new(tool)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
        .args(["--storage-driver", "vfs"]);
    Ok(Runner {
        setup: Some(
            podman
                .clone()
                .args(["load", "--quiet", "--input"])
                .arg(&archive),
        ),
        ..Runner::new(
            podman
                .arg("--runtime")
                .arg(runtime)
                .args(["run", "--rm", "--network", "none", PODMAN_IMAGE])
                .args(env.command),
            0,
            RUNTIME_TIMEOUT,
        )
    })
}

/// `hearth machine start NAME` (restored from the template, or booted) until it returns,
/// then `hearth machine stop NAME`. Each case has its own machine, apart from
/// `hearth-machine`'s.
fn machine_start(env: &CaseEnv, name: &str, template: bool) -> Runner {
    let mut start = env.hearth().args(["machine", "start", name]);
    if !template {
        start = start.arg("--no-template");
    }
    Runner {
        then: Some(env.hearth().args(["machine", "stop", name])),
        makes_template: template,
        ..Runner::new(start, 0, CONTAINER_TIMEOUT)
    }
}

/// QEMU's microvm machine with KVM, the serial console on stdout, and isa-debug-exit on
/// hearth's exit port (so the tiny payload's exit write ends QEMU too). On a nested-PVM
/// host the CPU model drops `arch-capabilities`: QEMU aborts setting its MSR there.
fn qemu() -> Result<Invocation, NotRun> {
    let tool = optional_tool(
        "qemu-system-x86_64",
        "apt-get install qemu-system-x86 to compare with QEMU",
    )?;
    let cpu = if host_is_pvm() {
        "host,-arch-capabilities"
    } else {
        "host"
    };
    Ok(Invocation::new(tool)
        .args(["-M", "microvm", "-enable-kvm", "-cpu", cpu, "-smp", "1"])
        .args(["-m", TINY_MEMORY])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]))
}

/// True on hosts with cgroup v1 hierarchies and a cgroup2 mount beside them that holds
/// controllers (systemd's "hybrid" layout), which crun refuses.
fn cgroups_are_hybrid() -> bool {
    let v2_controllers = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .map(|c| !c.trim().is_empty())
        .unwrap_or(false);
    v2_controllers && Path::new("/sys/fs/cgroup/memory").is_dir()
}

fn qemu_pvm_note(linux: bool) -> Option<String> {
    host_is_pvm().then(|| {
        let mut note = "nested-PVM host: -cpu host,-arch-capabilities".to_owned();
        if linux {
            note.push_str(" and hearth's compat boot options on the kernel command line");
        }
        note
    })
}

/// Firecracker without its API socket, from a config file written next to the fixtures.
/// The tiny payload ends it with an i8042 reset.
fn firecracker(
    env: &CaseEnv,
    kernel: &Path,
    initrd: Option<&Path>,
    timeout: Duration,
) -> Result<Runner, NotRun> {
    let tool = optional_tool(
        "firecracker",
        "Firecracker is not packaged in Debian; put its release binary on PATH to compare",
    )?;
    let mem_mib = if initrd.is_some() { 128 } else { 64 };
    let mut boot_source = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": env.cmdline(),
    });
    if let Some(initrd) = initrd {
        boot_source["initrd_path"] = serde_json::json!(initrd);
    }
    let config = serde_json::json!({
        "boot-source": boot_source,
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": mem_mib },
    });
    let file = env.fixtures.dir.join(if initrd.is_some() {
        "firecracker-linux.json"
    } else {
        "firecracker-tiny.json"
    });
    std::fs::write(&file, config.to_string())
        .map_err(|e| NotRun::Failed(format!("cannot write {}: {e}", file.display())))?;
    Ok(Runner::new(
        Invocation::new(tool)
            .arg("--no-api")
            .arg("--config-file")
            .arg(file),
        0,
        timeout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for case in CaseId::ALL {
            assert_eq!(CaseId::parse(case.name()), Some(case));
            let json = serde_json::to_string(&case).unwrap();
            assert_eq!(json, format!("\"{}\"", case.name()));
        }
    }

    #[test]
    fn include_list() {
        assert_eq!(
            parse_include("unshare, hearth-tiny,unshare").unwrap(),
            vec![CaseId::HearthTiny, CaseId::Unshare]
        );
        assert_eq!(parse_include("all").unwrap().len(), CaseId::ALL.len());
        assert!(parse_include("docker").unwrap_err().contains("docker"));
        assert!(parse_include(",").is_err());
    }

    #[test]
    fn baselines_are_hearth_cases() {
        for case in CaseId::ALL {
            assert!(case.baseline().name().starts_with("hearth-"));
            assert_eq!(case.baseline().baseline(), case.baseline());
        }
    }

    #[test]
    fn template_cases_compare_with_their_booting_twins() {
        assert_eq!(
            CaseId::HearthContainerTemplate.baseline(),
            CaseId::HearthContainer
        );
        assert_eq!(
            CaseId::HearthMachineStartTemplate.baseline(),
            CaseId::HearthMachineStart
        );
        assert_eq!(
            CaseId::HearthMachineStart.baseline(),
            CaseId::HearthMachineStart
        );
        assert_eq!(CaseId::Crun.baseline(), CaseId::HearthContainer);
        let with_template: Vec<CaseId> = CaseId::ALL
            .into_iter()
            .filter(|c| c.uses_template())
            .collect();
        assert_eq!(
            with_template,
            [
                CaseId::HearthContainerTemplate,
                CaseId::HearthMachineStartTemplate
            ]
        );
        for case in with_template {
            assert!(case.name().ends_with("-template"));
            assert_eq!(
                CaseId::parse(case.name().trim_end_matches("-template")),
                Some(case.baseline())
            );
        }
    }

    #[test]
    fn include_list_takes_the_template_cases() {
        assert_eq!(
            parse_include("crun,hearth-machine-start-template,hearth-container-template").unwrap(),
            vec![
                CaseId::HearthContainerTemplate,
                CaseId::HearthMachineStartTemplate,
                CaseId::Crun
            ]
        );
    }

    #[test]
    fn podman_runs_hearth_through_a_runtime_link() {
        let dir = crate::testutil::TempDir::new("bench-podman");
        let fixtures = Fixtures {
            tiny: dir.path().join("tiny"),
            idle: dir.path().join("idle"),
            rootfs: dir.path().join("rootfs"),
            bundle: dir.path().join("bundle"),
            kernel: Err("no kernel in unit tests".into()),
            initramfs: Err("no initramfs in unit tests".into()),
            dir: dir.path().to_owned(),
        };
        let env = CaseEnv {
            hearth: Path::new("/usr/bin/hearth"),
            fixtures: &fixtures,
            command: &["/bin/true".to_owned()],
            hearth_flags: &[],
        };
        match runner(CaseId::PodmanHearth, &env) {
            Ok(runner) => {
                let link = dir.path().join(crate::oci::PROGRAM_NAME);
                assert_eq!(std::fs::read_link(&link).unwrap(), env.hearth);
                let args = args_of(&runner.invocation);
                let at = args.iter().position(|a| a == "--runtime").unwrap();
                assert_eq!(args[at + 1], link.to_string_lossy());
                assert_eq!(
                    args[at + 2..],
                    [
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        PODMAN_IMAGE,
                        "/bin/true"
                    ]
                );
                assert!(runner.makes_template);
                let setup = args_of(runner.setup.as_ref().unwrap());
                assert!(setup.ends_with(&[
                    "load".into(),
                    "--quiet".into(),
                    "--input".into(),
                    dir.path()
                        .join("busybox-docker-save.tar")
                        .to_string_lossy()
                        .into_owned()
                ]));
                assert!(dir.path().join("busybox-docker-save.tar").is_file());
            }
            Err(NotRun::Skipped(e)) => assert!(e.contains("podman is not on PATH"), "{e}"),
            Err(other) => panic!("{other:?}"),
        }
    }

    fn test_env_runner(case: CaseId) -> Runner {
        let dir = PathBuf::from("/nonexistent/fixtures");
        let fixtures = Fixtures {
            tiny: dir.join("tiny"),
            idle: dir.join("idle"),
            rootfs: dir.join("rootfs"),
            bundle: dir.join("bundle"),
            kernel: Err("no kernel in unit tests".into()),
            initramfs: Err("no initramfs in unit tests".into()),
            dir,
        };
        let env = CaseEnv {
            hearth: Path::new("/usr/bin/hearth"),
            fixtures: &fixtures,
            command: &["/bin/true".to_owned()],
            hearth_flags: &["--no-seccomp".to_owned()],
        };
        runner(case, &env).unwrap()
    }

    fn args_of(inv: &Invocation) -> Vec<String> {
        inv.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn hearth_flags_go_to_the_cases_own_hearth_run() {
        let tiny = test_env_runner(CaseId::HearthTiny);
        assert_eq!(
            args_of(&tiny.invocation)[..3],
            ["run", "--no-seccomp", "--kernel"]
        );
        assert_eq!(tiny.note.as_deref(), Some("hearth run given --no-seccomp"));
        let container = test_env_runner(CaseId::HearthContainer);
        assert!(!args_of(&container.invocation).contains(&"--no-seccomp".to_owned()));
    }

    #[test]
    fn container_cases_boot_or_restore() {
        let boot = test_env_runner(CaseId::HearthContainer);
        assert_eq!(
            args_of(&boot.invocation)[..3],
            ["container", "run", "--no-template"]
        );
        assert!(!boot.makes_template);
        let restore = test_env_runner(CaseId::HearthContainerTemplate);
        assert!(!args_of(&restore.invocation).contains(&"--no-template".to_owned()));
        assert!(restore.makes_template && restore.then.is_none());
    }

    #[test]
    fn machine_start_cases_start_then_stop_their_own_machine() {
        for (case, name, template) in [
            (CaseId::HearthMachineStart, MACHINE_START_NAME, false),
            (
                CaseId::HearthMachineStartTemplate,
                MACHINE_START_TEMPLATE_NAME,
                true,
            ),
        ] {
            assert_ne!(name, MACHINE_NAME);
            let runner = test_env_runner(case);
            let mut start = vec!["machine", "start", name];
            if !template {
                start.push("--no-template");
            }
            assert_eq!(args_of(&runner.invocation), start);
            let stop = runner.then.as_ref().expect("a stop after the start");
            assert_eq!(args_of(stop), ["machine", "stop", name]);
            assert_eq!(runner.makes_template, template);
            assert!(runner.setup.is_none() && runner.teardown.is_none());
        }
    }

    #[test]
    fn unique_ids_per_sample() {
        let mut runner = Runner::new(Invocation::new("crun"), 0, RUNTIME_TIMEOUT);
        runner.unique_id_prefix = Some("x".into());
        assert_eq!(runner.invocation_for(3).args, vec![OsString::from("x-3")]);
    }
}
