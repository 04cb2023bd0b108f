//! Where every [`VmmAction`] is handled: by the [`PrebootController`] until
//! `InstanceStart`, then by the [`RuntimeController`] from the VMM's event loop. Requests
//! that do not fit the microVM's state are refused with a 400 and change nothing.

use std::path::Path;
use std::sync::mpsc;

use super::action::{ActionResult, ApiError, VmmAction, VmmData};
use super::models::{InstanceInfo, InstanceState, Logger, Metrics};
use super::resources::VmResources;
use super::{ApiEndpoint, EventfdWaker};
use crate::devices::bus::lock;
use crate::devices::virtio::balloon::Balloon;
use crate::exit::ExitReason;
use crate::snapshot::Saved;
use crate::vmm::{ControlHook, RuntimeDevices, Vmm, VmmError};

/// The name `GET /` reports.
pub const APP_NAME: &str = "hearth";
/// hearth's version, reported by `GET /` and `GET /version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the pre-boot loop should do with a request.
pub enum Preboot {
    /// Answer it.
    Answer(ActionResult),
    /// Build and start the VM, then answer.
    Start,
    /// Build the VM from this snapshot, then answer.
    Load(super::models::SnapshotLoadParams),
    /// Answer 204, then end the VMM (`PUT /api/v1/vmm.shutdown`).
    Shutdown,
}

/// What the runtime controller needs of the running VM: the [`Vmm`] itself, or a stand-in
/// in unit tests.
pub trait RunningVm {
    fn pause(&mut self) -> Result<(), VmmError>;
    fn resume(&mut self) -> Result<(), VmmError>;
    /// Ends the VMM in an orderly way (the run returns [`ExitReason::Shutdown`]).
    fn shutdown(&mut self);
    /// Writes a snapshot of the paused VM (see [`Vmm::snapshot`]).
    fn snapshot(
        &mut self,
        state: &Path,
        mem: &Path,
        frontend: Option<String>,
    ) -> Result<Saved, VmmError>;
}

impl RunningVm for Vmm {
    fn pause(&mut self) -> Result<(), VmmError> {
        Vmm::pause(self)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Vmm::resume(self)
    }

    fn shutdown(&mut self) {
        self.exit_signal().request(ExitReason::Shutdown);
    }

    fn snapshot(
        &mut self,
        state: &Path,
        mem: &Path,
        frontend: Option<String>,
    ) -> Result<Saved, VmmError> {
        Vmm::snapshot(self, state, mem, frontend)
    }
}

/// Accumulates the configuration before `InstanceStart`.
pub struct PrebootController {
    pub resources: VmResources,
    pub id: String,
}

impl PrebootController {
    pub fn new(id: String, resources: VmResources) -> Self {
        Self { resources, id }
    }

    pub fn handle(&mut self, action: VmmAction) -> Preboot {
        let res = &mut self.resources;
        let empty = |r: Result<(), ApiError>| r.map(|()| VmmData::Empty);
        Preboot::Answer(match action {
            VmmAction::InstanceStart => return Preboot::Start,
            VmmAction::Shutdown => return Preboot::Shutdown,
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(instance_info(
                &self.id,
                InstanceState::NotStarted,
            ))),
            VmmAction::GetVersion => Ok(VmmData::Version(VERSION.to_string())),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(res.machine.clone())),
            VmmAction::GetFullVmConfig => Ok(VmmData::FullVmConfig(Box::new(res.to_full_config()))),
            VmmAction::PutMachineConfig(config) => empty(res.set_machine_config(config)),
            VmmAction::PatchMachineConfig(update) => empty(res.update_machine_config(update)),
            VmmAction::PutBootSource(boot) => empty(res.set_boot_source(boot)),
            VmmAction::PutDrive(drive) => empty(res.put_drive(drive)),
            VmmAction::PutNetworkInterface(iface) => empty(res.put_net(iface)),
            VmmAction::PutVsock(vsock) => empty(res.set_vsock(vsock)),
            VmmAction::PutEntropy(entropy) => empty(res.set_entropy(entropy)),
            VmmAction::PutBalloon(balloon) => empty(res.set_balloon(balloon)),
            VmmAction::GetBalloon => res
                .balloon
                .clone()
                .map(VmmData::Balloon)
                .ok_or_else(no_balloon),
            VmmAction::PutSerial(serial) => empty(res.set_serial(serial)),
            VmmAction::PutLogger(logger) => empty(apply_logger(&logger)),
            VmmAction::PutMetrics(metrics) => empty(apply_metrics(&metrics)),
            VmmAction::FlushMetrics => flush_metrics(),
            VmmAction::GetMetrics => get_metrics(),
            // As Firecracker: a snapshot brings its whole VM, so nothing may be set up yet.
            VmmAction::LoadSnapshot(_)
                if res.boot_source.is_some()
                    || !res.drives.is_empty()
                    || !res.nets.is_empty()
                    || res.vsock.is_some()
                    || res.entropy.is_some()
                    || res.balloon.is_some() =>
            {
                Err(ApiError::invalid(
                    "loading a snapshot is not allowed after configuring boot-specific resources",
                ))
            }
            VmmAction::LoadSnapshot(params) => return Preboot::Load(params),
            action @ (VmmAction::PatchDrive(_)
            | VmmAction::PatchNetworkInterface(_)
            | VmmAction::PatchBalloon(_)
            | VmmAction::GetBalloonStats
            | VmmAction::PatchBalloonStats(_)
            | VmmAction::SendCtrlAltDel
            | VmmAction::Pause
            | VmmAction::Resume
            | VmmAction::CreateSnapshot(_)) => Err(ApiError::BeforeStart(action.describe())),
        })
    }
}

/// Serves the API from the running VM's event loop.
pub struct RuntimeController {
    endpoint: ApiEndpoint,
    resources: VmResources,
    id: String,
    state: InstanceState,
    devices: RuntimeDevices,
    /// The `InstanceStart` request, answered once the vCPUs run.
    pending_start: Option<mpsc::Sender<ActionResult>>,
}

impl RuntimeController {
    /// `devices` must be the VM's (`Vmm::devices`), disks in `resources`' drive order.
    pub fn new(
        endpoint: ApiEndpoint,
        resources: VmResources,
        id: String,
        devices: RuntimeDevices,
    ) -> Self {
        Self {
            endpoint,
            resources,
            id,
            state: InstanceState::Running,
            devices,
            pending_start: None,
        }
    }

    /// The VM starts paused (restored from a snapshot without `resume_vm`).
    pub fn start_paused(&mut self) {
        self.state = InstanceState::Paused;
    }

    /// Answers `InstanceStart` with 204 from the event loop's first round, when the
    /// vCPUs run.
    pub fn answer_start_when_running(&mut self, reply: mpsc::Sender<ActionResult>) {
        self.pending_start = Some(reply);
    }

    /// The subscriber that wakes the event loop when requests wait.
    pub fn waker(&self) -> std::io::Result<EventfdWaker> {
        self.endpoint.waker()
    }

    /// Answers every waiting request.
    pub fn serve(&mut self, vm: &mut dyn RunningVm) {
        if let Some(reply) = self.pending_start.take() {
            let _ = reply.send(Ok(VmmData::Empty));
        }
        while let Some(request) = self.endpoint.try_next() {
            let result = self.handle(request.action, vm);
            let _ = request.reply.send(result);
        }
    }

    pub fn handle(&mut self, action: VmmAction, vm: &mut dyn RunningVm) -> ActionResult {
        match action {
            VmmAction::GetInstanceInfo => {
                Ok(VmmData::InstanceInfo(instance_info(&self.id, self.state)))
            }
            VmmAction::GetVersion => Ok(VmmData::Version(VERSION.to_string())),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.resources.machine.clone()))
            }
            VmmAction::GetFullVmConfig => Ok(VmmData::FullVmConfig(Box::new(
                self.resources.to_full_config(),
            ))),
            VmmAction::SendCtrlAltDel => lock(&self.devices.i8042)
                .send_ctrl_alt_del()
                .map(|()| VmmData::Empty)
                .map_err(|e| ApiError::Runtime(format!("cannot send Ctrl+Alt+Del: {e}"))),
            VmmAction::PatchDrive(patch) => {
                let index = self
                    .resources
                    .drive_index(&patch.drive_id)
                    .ok_or_else(|| ApiError::invalid(format!("no drive \"{}\"", patch.drive_id)))?;
                let disk = self.devices.disks.get(index).ok_or_else(|| {
                    ApiError::Runtime(format!("drive \"{}\" has no device", patch.drive_id))
                })?;
                if let Some(path) = patch.path_on_host {
                    lock(disk).replace_image(&path).map_err(|e| {
                        ApiError::Runtime(format!(
                            "cannot update drive \"{}\": {}",
                            patch.drive_id,
                            crate::error_chain(&e)
                        ))
                    })?;
                    self.resources.set_drive_path(&patch.drive_id, path);
                }
                if let Some(update) = &patch.rate_limiter {
                    let mut disk = lock(disk);
                    disk.update_rate_limiter(update);
                    let now = disk.rate_limiter().config();
                    self.resources.set_drive_rate_limiter(&patch.drive_id, now);
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(patch) => {
                let index = self.resources.net_index(&patch.iface_id).ok_or_else(|| {
                    ApiError::invalid(format!("no network interface \"{}\"", patch.iface_id))
                })?;
                let net = self.devices.nets.get(index).ok_or_else(|| {
                    ApiError::Runtime(format!(
                        "network interface \"{}\" has no device",
                        patch.iface_id
                    ))
                })?;
                // Only rate limiters can change.
                let mut net = lock(net);
                net.update_rate_limiters(
                    patch.rx_rate_limiter.as_ref(),
                    patch.tx_rate_limiter.as_ref(),
                );
                let (rx, tx) = net.rate_limiters();
                let (rx, tx) = (rx.config(), tx.config());
                self.resources
                    .set_net_rate_limiters(&patch.iface_id, rx, tx);
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloon => {
                let balloon = self.balloon()?;
                let config = lock(&balloon).config();
                Ok(VmmData::Balloon(config))
            }
            VmmAction::PatchBalloon(update) => {
                let mem_size_mib = self.resources.machine.mem_size_mib;
                let balloon = self.balloon()?;
                crate::devices::virtio::balloon::BalloonConfig::check_amount(
                    update.amount_mib,
                    mem_size_mib,
                )
                .map_err(ApiError::invalid)?;
                let mut balloon = lock(&balloon);
                balloon.update_target(update.amount_mib);
                self.resources.balloon = Some(balloon.config());
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloonStats => {
                let balloon = self.balloon()?;
                let stats = lock(&balloon).statistics().map_err(ApiError::invalid)?;
                Ok(VmmData::BalloonStats(stats))
            }
            VmmAction::PatchBalloonStats(update) => {
                let balloon = self.balloon()?;
                let mut balloon = lock(&balloon);
                balloon
                    .update_stats_interval(update.stats_polling_interval_s)
                    .map_err(ApiError::invalid)?;
                self.resources.balloon = Some(balloon.config());
                Ok(VmmData::Empty)
            }
            // As with Firecracker, asking for the state the VM is in succeeds.
            VmmAction::Pause if self.state == InstanceState::Paused => Ok(VmmData::Empty),
            VmmAction::Resume if self.state == InstanceState::Running => Ok(VmmData::Empty),
            VmmAction::Pause => self.set_state(vm.pause(), InstanceState::Paused),
            VmmAction::Resume => self.set_state(vm.resume(), InstanceState::Running),
            // The answer leaves before the VMM stops: the API socket is closed only after
            // the server has written every answer it holds (`ApiSocket`'s drop).
            VmmAction::Shutdown => {
                vm.shutdown();
                Ok(VmmData::Empty)
            }
            VmmAction::CreateSnapshot(_) if self.state != InstanceState::Paused => Err(
                ApiError::invalid("the microVM must be paused for a snapshot (PATCH /vm Paused)"),
            ),
            VmmAction::CreateSnapshot(params) => {
                super::snapshot::create(vm, &params, &self.resources)
            }
            VmmAction::FlushMetrics => flush_metrics(),
            VmmAction::GetMetrics => get_metrics(),
            action @ (VmmAction::InstanceStart
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutBootSource(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutEntropy(_)
            | VmmAction::PutBalloon(_)
            | VmmAction::PutSerial(_)
            | VmmAction::PutLogger(_)
            | VmmAction::PutMetrics(_)
            | VmmAction::LoadSnapshot(_)) => Err(ApiError::AfterStart(action.describe())),
        }
    }

    fn balloon(&self) -> Result<std::sync::Arc<std::sync::Mutex<Balloon>>, ApiError> {
        self.devices.balloon.clone().ok_or_else(no_balloon)
    }

    /// Records the outcome of a pause or resume: `GET /` reports the new state only once
    /// the VM has reached it.
    fn set_state(&mut self, outcome: Result<(), VmmError>, reached: InstanceState) -> ActionResult {
        outcome.map_err(|e| ApiError::Runtime(crate::error_chain(&e)))?;
        self.state = reached;
        Ok(VmmData::Empty)
    }
}

/// The API drives the VM from its event loop: requests are answered after every round.
impl ControlHook for RuntimeController {
    fn start(&mut self, vmm: &mut Vmm) {
        match self.waker() {
            Ok(waker) => {
                use event_manager::SubscriberOps;
                vmm.event_loop().add_subscriber(Box::new(waker));
            }
            Err(e) => log::error!("the API cannot wake the event loop: {e}"),
        }
        // InstanceStart is answered now that the vCPUs run.
        self.serve(vmm);
    }

    fn after_events(&mut self, vmm: &mut Vmm) {
        self.serve(vmm);
    }
}

fn no_balloon() -> ApiError {
    ApiError::invalid("the microVM has no balloon device (PUT /balloon before InstanceStart)")
}

fn instance_info(id: &str, state: InstanceState) -> InstanceInfo {
    InstanceInfo {
        app_name: APP_NAME.to_string(),
        id: id.to_string(),
        state,
        vmm_version: VERSION.to_string(),
    }
}

/// `PUT /logger` (and the logger section of a configuration file): the level and where
/// hearth's log goes.
pub fn apply_logger(logger: &Logger) -> Result<(), ApiError> {
    if logger.module.is_some() {
        return Err(ApiError::Unsupported(
            "hearth does not support filtering its log by module".into(),
        ));
    }
    let level = logger
        .level
        .as_deref()
        .map(parse_level)
        .transpose()
        .map_err(ApiError::invalid)?;
    if let Some(path) = &logger.log_path {
        crate::logger::log_to_file(path).map_err(|e| {
            ApiError::invalid(format!(
                "cannot open the log file \"{}\": {e}",
                path.display()
            ))
        })?;
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

/// `PUT /metrics` (and the metrics section of a configuration file): where the metrics
/// go, once.
pub fn apply_metrics(metrics: &Metrics) -> Result<(), ApiError> {
    crate::metrics::init(&metrics.metrics_path)
        .map_err(|e| ApiError::invalid(crate::error_chain(&e)))
}

/// `FlushMetrics`: writes the metrics now; does nothing when no destination is set, as in
/// Firecracker.
fn flush_metrics() -> ActionResult {
    match crate::metrics::flush() {
        Ok(true) => Ok(VmmData::Empty),
        Ok(false) => {
            log::debug!("FlushMetrics: no metrics destination is set (PUT /metrics)");
            Ok(VmmData::Empty)
        }
        Err(e) => Err(ApiError::Runtime(crate::error_chain(&e))),
    }
}

fn get_metrics() -> ActionResult {
    crate::metrics::METRICS
        .to_json()
        .map(VmmData::Metrics)
        .map_err(|e| ApiError::Runtime(crate::error_chain(&e)))
}

/// Firecracker's level names, in any case.
pub fn parse_level(name: &str) -> Result<log::LevelFilter, String> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warning" | "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => {
            return Err(format!(
                "invalid log level \"{name}\": use Error, Warning, Info, Debug, Trace or Off"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preboot_refuses_runtime_requests() {
        let mut controller = PrebootController::new("vm1".into(), VmResources::default());
        for action in [
            VmmAction::Pause,
            VmmAction::Resume,
            VmmAction::SendCtrlAltDel,
            VmmAction::PatchNetworkInterface(super::super::models::PartialNetworkInterface {
                iface_id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }),
        ] {
            let Preboot::Answer(Err(err)) = controller.handle(action.clone()) else {
                panic!("{action:?} was accepted before start");
            };
            assert!(
                err.to_string().contains("send InstanceStart first"),
                "{err}"
            );
        }
        let Preboot::Answer(Ok(VmmData::InstanceInfo(info))) =
            controller.handle(VmmAction::GetInstanceInfo)
        else {
            panic!("no instance info");
        };
        assert_eq!(
            (info.id.as_str(), info.state),
            ("vm1", InstanceState::NotStarted)
        );
        assert!(matches!(
            controller.handle(VmmAction::InstanceStart),
            Preboot::Start
        ));
        assert!(matches!(
            controller.handle(VmmAction::Shutdown),
            Preboot::Shutdown
        ));
        let load: super::super::models::SnapshotLoadParams =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert!(matches!(
            controller.handle(VmmAction::LoadSnapshot(load.clone())),
            Preboot::Load(params) if params == load
        ));
        // Once something is configured, a snapshot (which brings its own VM) is refused.
        let entropy = VmmAction::PutEntropy(Default::default());
        assert!(matches!(
            controller.handle(entropy),
            Preboot::Answer(Ok(VmmData::Empty))
        ));
        let Preboot::Answer(Err(err)) = controller.handle(VmmAction::LoadSnapshot(load.clone()))
        else {
            panic!("snapshot load accepted after configuring");
        };
        assert_eq!(
            err.to_string(),
            "loading a snapshot is not allowed after configuring boot-specific resources"
        );
        controller.resources.entropy = None;

        // The balloon before boot: no statistics or new target yet, a target that fits.
        let Preboot::Answer(Err(err)) = controller.handle(VmmAction::GetBalloon) else {
            panic!("a balloon nobody configured");
        };
        assert!(err.to_string().contains("no balloon device"), "{err}");
        let too_big = VmmAction::PutBalloon("amount_mib=1000000".parse().unwrap());
        assert!(matches!(
            controller.handle(too_big),
            Preboot::Answer(Err(_))
        ));
        let put = VmmAction::PutBalloon("amount_mib=8".parse().unwrap());
        assert!(matches!(controller.handle(put), Preboot::Answer(Ok(_))));
        let Preboot::Answer(Ok(VmmData::Balloon(balloon))) =
            controller.handle(VmmAction::GetBalloon)
        else {
            panic!("no balloon after PUT /balloon");
        };
        assert_eq!(balloon.amount_mib, 8);
        for action in [
            VmmAction::GetBalloonStats,
            VmmAction::PatchBalloon(super::super::models::BalloonUpdate { amount_mib: 1 }),
        ] {
            let Preboot::Answer(Err(err)) = controller.handle(action) else {
                panic!("a runtime balloon request before start");
            };
            assert!(
                err.to_string().contains("send InstanceStart first"),
                "{err}"
            );
        }
        assert!(matches!(
            controller.handle(VmmAction::LoadSnapshot(load.clone())),
            Preboot::Answer(Err(_))
        ));
        controller.resources.balloon = None;
        controller.resources.vsock = Some(super::super::models::Vsock {
            guest_cid: 3,
            uds_path: "/v.sock".into(),
            vsock_id: None,
        });
        assert!(matches!(
            controller.handle(VmmAction::LoadSnapshot(load)),
            Preboot::Answer(Err(_))
        ));
    }

    #[test]
    fn runtime_answers_start_then_refuses_what_does_not_fit() {
        use std::sync::{Arc, Mutex};

        use crate::devices::legacy::i8042::I8042;
        use crate::exit::ExitSignal;
        use crate::vmm::RunState;

        let exit = Arc::new(ExitSignal::new().unwrap());
        let devices = RuntimeDevices {
            i8042: Arc::new(Mutex::new(I8042::new(exit.clone(), None))),
            disks: Vec::new(),
            nets: Vec::new(),
            balloon: Some(Arc::new(Mutex::new(
                Balloon::new(&"stats_polling_interval_s=1".parse().unwrap()).unwrap(),
            ))),
            cmos: Arc::new(Mutex::new(crate::devices::legacy::cmos::Cmos::new())),
            vmgenid: crate::devices::vmgenid::VmGenId::new(
                &crate::vstate::memory::create_guest_memory(2 << 20).unwrap(),
                crate::devices::vmgenid::VmGenIdState {
                    address: 0xdf000,
                    irq: 23,
                },
            )
            .unwrap(),
        };
        let (sender, requests) = mpsc::channel();
        let endpoint = ApiEndpoint {
            requests,
            eventfd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let mut runtime =
            RuntimeController::new(endpoint, VmResources::default(), "vm".into(), devices);
        let (start_reply, start_answer) = mpsc::channel();
        runtime.answer_start_when_running(start_reply);
        let (reply, answer) = mpsc::channel();
        sender
            .send(super::super::ApiRequest {
                action: VmmAction::GetInstanceInfo,
                reply,
            })
            .unwrap();
        /// A VM that refuses to pause, as a VM that is not running does.
        struct Refusing(Arc<ExitSignal>);
        impl RunningVm for Refusing {
            fn pause(&mut self) -> Result<(), VmmError> {
                Err(VmmError::State(RunState::Created, RunState::Running))
            }
            fn resume(&mut self) -> Result<(), VmmError> {
                Err(VmmError::State(RunState::Created, RunState::Paused))
            }
            fn shutdown(&mut self) {
                self.0.request(ExitReason::Shutdown);
            }
            fn snapshot(
                &mut self,
                _: &Path,
                _: &Path,
                _: Option<String>,
            ) -> Result<Saved, VmmError> {
                Err(VmmError::State(RunState::Created, RunState::Paused))
            }
        }
        let mut vm = Refusing(exit.clone());
        runtime.serve(&mut vm);
        assert!(matches!(start_answer.try_recv(), Ok(Ok(VmmData::Empty))));
        let Ok(Ok(VmmData::InstanceInfo(info))) = answer.try_recv() else {
            panic!("GET / was not answered");
        };
        assert_eq!(info.state, InstanceState::Running);

        let mut handle = |action| runtime.handle(action, &mut vm);
        assert!(handle(VmmAction::SendCtrlAltDel).is_ok());
        let err = handle(VmmAction::Pause).unwrap_err();
        assert_eq!(err.to_string(), "the VM is Created; it must be Running");
        let Ok(VmmData::InstanceInfo(info)) = handle(VmmAction::GetInstanceInfo) else {
            panic!("no instance info");
        };
        assert_eq!(
            info.state,
            InstanceState::Running,
            "a refused pause changes nothing"
        );
        for action in [
            VmmAction::InstanceStart,
            VmmAction::PutMachineConfig(Default::default()),
            VmmAction::PutEntropy(Default::default()),
            VmmAction::LoadSnapshot(
                serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap(),
            ),
        ] {
            let err = handle(action).unwrap_err().to_string();
            assert!(err.contains("only possible before InstanceStart"), "{err}");
        }
        let create: super::super::models::SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        let err = handle(VmmAction::CreateSnapshot(create)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the microVM must be paused for a snapshot (PATCH /vm Paused)"
        );
        let patch = serde_json::from_str(r#"{"drive_id": "nope"}"#).unwrap();
        assert!(handle(VmmAction::PatchDrive(patch)).is_err());

        // The balloon: a new target within the guest's memory, statistics that stay on.
        use super::super::models::{BalloonStatsUpdate, BalloonUpdate};
        let inflate = |amount_mib| VmmAction::PatchBalloon(BalloonUpdate { amount_mib });
        assert!(matches!(handle(inflate(16)), Ok(VmmData::Empty)));
        let Ok(VmmData::Balloon(balloon)) = handle(VmmAction::GetBalloon) else {
            panic!("no balloon");
        };
        assert_eq!(balloon.amount_mib, 16);
        let err = handle(inflate(100_000)).unwrap_err().to_string();
        assert!(err.contains("larger than the guest's memory"), "{err}");
        let Ok(VmmData::BalloonStats(stats)) = handle(VmmAction::GetBalloonStats) else {
            panic!("no statistics");
        };
        assert_eq!(
            (stats.target_mib, stats.target_pages, stats.actual_pages),
            (16, 4096, 0)
        );
        let interval = |stats_polling_interval_s| {
            VmmAction::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s,
            })
        };
        assert!(handle(interval(3)).is_ok());
        let err = handle(interval(0)).unwrap_err().to_string();
        assert!(err.contains("cannot be turned off"), "{err}");
        let put = VmmAction::PutBalloon("".parse().unwrap());
        let err = handle(put).unwrap_err().to_string();
        assert!(err.contains("only possible before InstanceStart"), "{err}");
        let Ok(VmmData::Metrics(json)) = handle(VmmAction::GetMetrics) else {
            panic!("no metrics");
        };
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(json["vcpu"]["exits_io_in"].is_u64(), "{json}");
        let put = VmmAction::PutMetrics(Metrics {
            metrics_path: "/tmp/m".into(),
        });
        let err = handle(put).unwrap_err().to_string();
        assert!(err.contains("only possible before InstanceStart"), "{err}");
        assert!(!exit.is_requested(), "no refusal stops the VM");
        assert!(matches!(handle(VmmAction::Shutdown), Ok(VmmData::Empty)));
        assert_eq!(exit.reason(), Some(ExitReason::Shutdown));
    }

    #[test]
    fn log_levels_follow_firecracker_names() {
        assert_eq!(parse_level("Warning"), Ok(log::LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Ok(log::LevelFilter::Debug));
        assert!(parse_level("loud").is_err());
        let err = apply_logger(&Logger {
            module: Some("api".into()),
            ..Logger::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("module"));
    }
}
