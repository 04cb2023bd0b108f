//! The two ways hearth runs with the API, as Firecracker does:
//!
//! - [`run_firecracker`]: `hearth` without a subcommand, the `firecracker` binary's shape.
//!   An empty VMM is configured through the API and started by `InstanceStart`, or is
//!   built at once from `--config-file` (with the API serving it, or with `--no-api`).
//!   The guest console is stdin/stdout, as Firecracker's.
//! - [`run_with_api`]: `hearth run ... --api-sock PATH`, a VM started from the command
//!   line whose API serves it while it runs.
//!
//! Before start, requests are served here, one at a time; once the VM is built they are
//! served from its event loop (`Vmm::serve_api`). The socket file is removed on every way
//! out.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::action::{ApiError, VmmData};
use super::controller::{
    apply_logger, apply_metrics, parse_level, Preboot, PrebootController, RuntimeController,
};
use super::models::FullVmConfig;
use super::resources::VmResources;
use super::{channel as api_channel, http, serve_http, start_server};
use super::{ActionSender, ApiEndpoint, ServerError};
use crate::builder::{build_vm, BuildError};
use crate::cli::FirecrackerArgs;
use crate::config::VmConfig;
use crate::exit::ExitReason;
use crate::vmm::{read_signal, terminating_signalfd, Vmm, VmmError};

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Longest instance id (Firecracker's limit).
const MAX_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid --id \"{0}\": use 1 to 64 letters, digits and '-'")]
    InvalidId(String),
    #[error("{0}")]
    InvalidFlag(String),
    #[error("cannot read the configuration file \"{path}\"")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file \"{path}\": {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// `hearth [--api-sock PATH] [--config-file FILE] [--no-api] ...`: returns the exit status.
pub fn run_firecracker(args: &FirecrackerArgs) -> Result<u8, ShapeError> {
    apply_flags(args)?;
    let id = args.id.clone().unwrap_or_else(|| DEFAULT_ID.to_string());
    check_id(&id)?;
    // Before any thread starts, so that only the VMM reads the terminating signals.
    let signals = terminating_signalfd().map_err(ShapeError::Signals)?;
    let server = if args.no_api {
        None
    } else {
        let path = args
            .api_sock
            .clone()
            .unwrap_or_else(|| DEFAULT_API_SOCK.into());
        let max_body = args
            .http_api_max_payload_size
            .unwrap_or(http::DEFAULT_MAX_BODY);
        Some(start_server(&path, max_body)?)
    };
    let mut resources = VmResources {
        boot_timer: args.boot_timer,
        ..VmResources::default()
    };

    let (socket, endpoint) = match server {
        Some((socket, endpoint)) => (Some(socket), Some(endpoint)),
        None => (None, None),
    };
    let vmm = match (&args.config_file, endpoint) {
        (Some(path), endpoint) => {
            load_config_file(path, &mut resources)?;
            let config = resources
                .to_vm_config()
                .map_err(|e| config_error(path, e))?;
            let mut vmm = build_vm(&config, crate::process_start())?;
            if let Some(endpoint) = endpoint {
                let devices = vmm.devices().clone();
                vmm.serve_api(RuntimeController::new(endpoint, resources, id, devices));
            }
            vmm
        }
        (None, Some(endpoint)) => {
            let controller = PrebootController::new(id, resources);
            match serve_until_start(controller, endpoint, &signals)? {
                Started::Vm(vmm) => *vmm,
                Started::Signal(signo) => {
                    log::info!("received signal {signo} before InstanceStart");
                    drop(socket);
                    return Ok(ExitReason::Signal(signo).status());
                }
                Started::Shutdown => {
                    drop(socket);
                    return Ok(crate::report_exit(&ExitReason::Shutdown));
                }
            }
        }
        // clap makes --no-api require --config-file.
        (None, None) => {
            return Err(ShapeError::InvalidFlag(
                "--no-api needs --config-file".into(),
            ))
        }
    };
    drop(signals);
    let status = run_to_end(vmm);
    drop(socket);
    status
}

/// `hearth run ... --api-sock PATH`.
pub fn run_with_api(config: &VmConfig, path: &Path) -> Result<u8, ShapeError> {
    let signals = terminating_signalfd().map_err(ShapeError::Signals)?;
    let (socket, endpoint) = start_server(path, http::DEFAULT_MAX_BODY)?;
    let mut vmm = build_vm(config, crate::process_start())?;
    let devices = vmm.devices().clone();
    let resources = VmResources::from_vm_config(config);
    vmm.serve_api(RuntimeController::new(
        endpoint,
        resources,
        DEFAULT_ID.to_string(),
        devices,
    ));
    drop(signals);
    let status = run_to_end(vmm);
    drop(socket);
    status
}

/// An empty VMM in the firecracker shape whose requests come from `driver`, run on its
/// own thread with an [`ActionSender`] (and, with `api_sock`, from the API socket too):
/// `hearth restore`. The VMM serves the driver exactly as it serves the API, through
/// the same controllers, and runs until it stops. Returns the exit status and what the
/// driver returned (`None` if its thread panicked).
pub fn run_driven<T, F>(api_sock: Option<&Path>, driver: F) -> Result<(u8, Option<T>), ShapeError>
where
    T: Send + 'static,
    F: FnOnce(ActionSender) -> T + Send + 'static,
{
    // Before any thread starts, so that only the VMM reads the terminating signals.
    let signals = terminating_signalfd().map_err(ShapeError::Signals)?;
    let (sender, endpoint) =
        api_channel().map_err(|e| ShapeError::Server(ServerError::Setup(e)))?;
    let socket = api_sock
        .map(|path| serve_http(path, http::DEFAULT_MAX_BODY, sender.clone()))
        .transpose()?;
    let driver = std::thread::Builder::new()
        .name("driver".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Driver);
            driver(sender)
        })
        .map_err(|e| ShapeError::Server(ServerError::Setup(e)))?;
    let controller = PrebootController::new(DEFAULT_ID.to_string(), VmResources::default());
    let status = match serve_until_start(controller, endpoint, &signals)? {
        Started::Vm(vmm) => {
            drop(signals);
            run_to_end(*vmm)?
        }
        Started::Signal(signo) => {
            log::info!("received signal {signo} before the VM started");
            ExitReason::Signal(signo).status()
        }
        Started::Shutdown => crate::report_exit(&ExitReason::Shutdown),
    };
    drop(socket);
    // The driver cannot be left waiting: the VMM's end of the channel is gone, so every
    // request it still sends is answered `VmmGone`.
    Ok((status, driver.join().ok()))
}

/// Runs the VM until it stops; its exit status, reported as `hearth run` does.
fn run_to_end(vmm: Vmm) -> Result<u8, ShapeError> {
    let reason = vmm.run()?;
    Ok(crate::report_exit(&reason))
}

/// Flags that act before anything else, and those hearth refuses.
fn apply_flags(args: &FirecrackerArgs) -> Result<(), ShapeError> {
    let refuse = |flag: &str, why: &str| {
        Err(ShapeError::Unsupported(format!(
            "{flag} is not supported: {why}"
        )))
    };
    if args.seccomp_filter.is_some() {
        return refuse(
            "--seccomp-filter",
            "hearth's filters are built in (see --no-seccomp)",
        );
    }
    if args.module.is_some() {
        return refuse("--module", "hearth's log cannot be filtered by module");
    }
    if args.metadata.is_some() || args.mmds_size_limit.is_some() {
        return refuse(
            "--metadata/--mmds-size-limit",
            "hearth has no metadata service (MMDS)",
        );
    }
    if let Some(level) = &args.level {
        log::set_max_level(parse_level(level).map_err(ShapeError::InvalidFlag)?);
    }
    if let Some(path) = &args.log_path {
        crate::logger::log_to_file(path).map_err(|e| {
            ShapeError::InvalidFlag(format!(
                "cannot open --log-path \"{}\": {e}",
                path.display()
            ))
        })?;
    }
    if let Some(path) = &args.metrics_path {
        crate::metrics::init(path).map_err(|e| {
            ShapeError::InvalidFlag(format!("--metrics-path: {}", crate::error_chain(&e)))
        })?;
    }
    if args.http_api_max_payload_size == Some(0) {
        return Err(ShapeError::InvalidFlag(
            "--http-api-max-payload-size must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Firecracker's rule: 1 to 64 characters, letters, digits and '-'.
fn check_id(id: &str) -> Result<(), ShapeError> {
    let valid = (1..=MAX_ID_LEN).contains(&id.len())
        && id.chars().all(|c| c == '-' || c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(ShapeError::InvalidId(id.to_string()))
    }
}

/// Reads a Firecracker JSON configuration into `resources`, refusing the sections hearth
/// has nothing for.
pub fn load_config_file(path: &Path, resources: &mut VmResources) -> Result<(), ShapeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ShapeError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let doc: FullVmConfig = serde_json::from_str(&text).map_err(|e| ShapeError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    apply_config(doc, resources).map_err(|e| config_error(path, e))
}

fn config_error(path: &Path, err: ApiError) -> ShapeError {
    ShapeError::Config {
        path: path.to_path_buf(),
        reason: err.to_string(),
    }
}

fn apply_config(doc: FullVmConfig, resources: &mut VmResources) -> Result<(), ApiError> {
    let unsupported = [
        ("cpu-config", doc.cpu_config.is_some()),
        ("memory-hotplug", doc.memory_hotplug.is_some()),
        ("mmds-config", doc.mmds_config.is_some()),
        ("pmem", !doc.pmem.is_empty()),
    ];
    if let Some((section, _)) = unsupported.iter().find(|(_, present)| *present) {
        return Err(ApiError::Unsupported(format!(
            "hearth does not support the \"{section}\" section"
        )));
    }
    if let Some(logger) = &doc.logger {
        apply_logger(logger)?;
    }
    if let Some(metrics) = &doc.metrics {
        apply_metrics(metrics)?;
    }
    if let Some(machine) = doc.machine_config {
        resources.set_machine_config(machine)?;
    }
    let boot = doc
        .boot_source
        .ok_or_else(|| ApiError::invalid("the \"boot-source\" section is required"))?;
    resources.set_boot_source(boot)?;
    for drive in doc.drives {
        let id = drive.drive_id.clone();
        resources
            .put_drive(drive)
            .map_err(|e| ApiError::invalid(format!("drive \"{id}\": {e}")))?;
    }
    for iface in doc.network_interfaces {
        let id = iface.iface_id.clone();
        resources
            .put_net(iface)
            .map_err(|e| ApiError::invalid(format!("network interface \"{id}\": {e}")))?;
    }
    if let Some(vsock) = doc.vsock {
        resources.set_vsock(vsock)?;
    }
    if let Some(entropy) = doc.entropy {
        resources.set_entropy(entropy)?;
    }
    if let Some(balloon) = doc.balloon {
        resources.set_balloon(balloon)?;
    }
    if let Some(serial) = doc.serial {
        resources.set_serial(serial)?;
    }
    Ok(())
}

enum Started {
    Vm(Box<Vmm>),
    Signal(i32),
    /// `PUT /api/v1/vmm.shutdown` before anything started.
    Shutdown,
}

/// The pre-boot loop: serves requests until `InstanceStart` builds the VM, or a
/// terminating signal or a shutdown request arrives.
fn serve_until_start(
    mut controller: PrebootController,
    endpoint: ApiEndpoint,
    signals: &OwnedFd,
) -> Result<Started, ShapeError> {
    loop {
        crate::uds::poll_readable(&[endpoint.eventfd.as_raw_fd(), signals.as_raw_fd()], -1)
            .map_err(ShapeError::Signals)?;
        if let Some(signo) = read_signal(signals) {
            return Ok(Started::Signal(signo));
        }
        let _ = endpoint.eventfd.read();
        while let Some(request) = endpoint.try_next() {
            match controller.handle(request.action) {
                Preboot::Answer(result) => {
                    let _ = request.reply.send(result);
                }
                Preboot::Shutdown => {
                    let _ = request.reply.send(Ok(VmmData::Empty));
                    return Ok(Started::Shutdown);
                }
                Preboot::Load(params) => {
                    match super::snapshot::load(&params, controller.resources.serial.as_ref()) {
                        Ok(loaded) => {
                            let mut vmm = loaded.vmm;
                            let devices = vmm.devices().clone();
                            let mut runtime = RuntimeController::new(
                                endpoint,
                                loaded.resources,
                                controller.id,
                                devices,
                            );
                            if !loaded.resumed {
                                runtime.start_paused();
                            }
                            // Answered from the event loop, once the restored VM is in place.
                            runtime.answer_start_when_running(request.reply);
                            vmm.serve_api(runtime);
                            return Ok(Started::Vm(Box::new(vmm)));
                        }
                        Err(e) => {
                            log::info!("snapshot load failed: {e}");
                            let _ = request.reply.send(Err::<VmmData, _>(e));
                        }
                    }
                }
                Preboot::Start => match start(&controller) {
                    Ok(mut vmm) => {
                        let devices = vmm.devices().clone();
                        let PrebootController { resources, id } = controller;
                        let mut runtime = RuntimeController::new(endpoint, resources, id, devices);
                        runtime.answer_start_when_running(request.reply);
                        vmm.serve_api(runtime);
                        return Ok(Started::Vm(Box::new(vmm)));
                    }
                    Err(e) => {
                        log::warn!("InstanceStart failed: {e}");
                        let _ = request.reply.send(Err::<VmmData, _>(e));
                    }
                },
            }
        }
    }
}

fn start(controller: &PrebootController) -> Result<Vmm, ApiError> {
    let config = controller.resources.to_vm_config()?;
    build_vm(&config, crate::process_start()).map_err(|e| ApiError::Start(crate::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_follow_firecracker() {
        check_id("anonymous-instance").unwrap();
        check_id("vm-01").unwrap();
        for bad in ["", "a b", "a_b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refused_flags_say_why() {
        let args = FirecrackerArgs {
            module: Some("api".into()),
            ..FirecrackerArgs::default()
        };
        let err = apply_flags(&args).unwrap_err().to_string();
        assert_eq!(
            err,
            "--module is not supported: hearth's log cannot be filtered by module"
        );
        let args = FirecrackerArgs {
            level: Some("chatty".into()),
            ..FirecrackerArgs::default()
        };
        assert!(apply_flags(&args)
            .unwrap_err()
            .to_string()
            .contains("chatty"));
    }

    #[test]
    fn config_files_refuse_unknown_and_unsupported_sections() {
        let dir = std::env::temp_dir().join(format!("hearth-shape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let write = |name: &str, json: serde_json::Value| {
            let path = dir.join(name);
            std::fs::write(&path, json.to_string()).unwrap();
            path
        };
        let boot = serde_json::json!({"kernel_image_path": kernel});
        let good = write(
            "good.json",
            serde_json::json!({"boot-source": boot,
                               "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
                               "entropy": {}}),
        );
        let mut res = VmResources::default();
        load_config_file(&good, &mut res).unwrap();
        assert_eq!(res.machine.vcpu_count, 2);
        assert_eq!(res.to_vm_config().unwrap().rng, Some(Default::default()));
        let limited = write(
            "limited.json",
            serde_json::json!({"boot-source": boot, "entropy":
                {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}}),
        );
        let mut res = VmResources::default();
        load_config_file(&limited, &mut res).unwrap();
        let rng = res.to_vm_config().unwrap().rng.unwrap();
        assert_eq!(rng.rate_limiter.bandwidth.unwrap().size, 1);

        for (name, json, expected) in [
            (
                "balloon.json",
                serde_json::json!({"boot-source": boot, "machine-config":
                    {"vcpu_count": 1, "mem_size_mib": 64}, "balloon": {"amount_mib": 65}}),
                "larger than the guest's memory (64 MiB)",
            ),
            (
                "entropy.json",
                serde_json::json!({"boot-source": boot, "entropy":
                    {"rate_limiter": {"bandwidth": {"size": 1, "refill": 1}}}}),
                "unknown field `refill`",
            ),
            (
                "unknown.json",
                serde_json::json!({"boot-source": boot, "gpu": {}}),
                "unknown field `gpu`",
            ),
            (
                "noboot.json",
                serde_json::json!({"drives": []}),
                "\"boot-source\" section is required",
            ),
        ] {
            let path = write(name, json);
            let err = load_config_file(&path, &mut VmResources::default()).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(expected) && text.contains(name), "{text}");
        }
        let missing = load_config_file(&dir.join("none.json"), &mut res).unwrap_err();
        assert!(missing.to_string().contains("none.json"));
    }
}
