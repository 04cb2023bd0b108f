//! The control plane as data: every API request becomes one [`VmmAction`], handled in one
//! place (`controller.rs`), answered with [`VmmData`] or an [`ApiError`]. The HTTP layer
//! only parses requests into actions and maps results to responses.

use std::fmt;

use super::models::{
    Balloon, BalloonStatistics, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, Entropy,
    FullVmConfig, InstanceInfo, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, Serial, SnapshotCreateParams,
    SnapshotLoadParams, Vsock,
};

/// One request to the VMM.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    /// `GET /`
    GetInstanceInfo,
    /// `GET /version`
    GetVersion,
    /// `GET /machine-config`
    GetMachineConfig,
    /// `GET /vm/config`
    GetFullVmConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`
    PutDrive(Drive),
    /// `PATCH /drives/{id}`
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`
    PutVsock(Vsock),
    /// `PUT /entropy`
    PutEntropy(Entropy),
    /// `PUT /serial`
    PutSerial(Serial),
    /// `PUT /balloon`
    PutBalloon(Balloon),
    /// `PATCH /balloon`
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon`
    GetBalloon,
    /// `GET /balloon/statistics`
    GetBalloonStats,
    /// `PATCH /balloon/statistics`
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /logger`
    PutLogger(Logger),
    /// `PUT /metrics`
    PutMetrics(Metrics),
    /// `GET /metrics`: hearth's extension, the counters as `FlushMetrics` writes them.
    GetMetrics,
    /// `PUT /actions` `InstanceStart`
    InstanceStart,
    /// `PUT /actions` `SendCtrlAltDel`
    SendCtrlAltDel,
    /// `PUT /actions` `FlushMetrics`
    FlushMetrics,
    /// `PATCH /vm` `Paused`
    Pause,
    /// `PATCH /vm` `Resumed`
    Resume,
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /api/v1/vmm.shutdown`: hearth's extension, on Cloud Hypervisor's path (see
    /// [`super::parse::SHUTDOWN_PATH`]): end the VMM in an orderly way.
    Shutdown,
}

impl VmmAction {
    /// How the request is named in fault messages ("PUT /boot-source").
    pub fn describe(&self) -> &'static str {
        match self {
            Self::GetInstanceInfo => "GET /",
            Self::GetVersion => "GET /version",
            Self::GetMachineConfig => "GET /machine-config",
            Self::GetFullVmConfig => "GET /vm/config",
            Self::PutMachineConfig(_) => "PUT /machine-config",
            Self::PatchMachineConfig(_) => "PATCH /machine-config",
            Self::PutBootSource(_) => "PUT /boot-source",
            Self::PutDrive(_) => "PUT /drives",
            Self::PatchDrive(_) => "PATCH /drives",
            Self::PutNetworkInterface(_) => "PUT /network-interfaces",
            Self::PatchNetworkInterface(_) => "PATCH /network-interfaces",
            Self::PutVsock(_) => "PUT /vsock",
            Self::PutEntropy(_) => "PUT /entropy",
            Self::PutSerial(_) => "PUT /serial",
            Self::PutBalloon(_) => "PUT /balloon",
            Self::PatchBalloon(_) => "PATCH /balloon",
            Self::GetBalloon => "GET /balloon",
            Self::GetBalloonStats => "GET /balloon/statistics",
            Self::PatchBalloonStats(_) => "PATCH /balloon/statistics",
            Self::PutLogger(_) => "PUT /logger",
            Self::PutMetrics(_) => "PUT /metrics",
            Self::GetMetrics => "GET /metrics",
            Self::InstanceStart => "InstanceStart",
            Self::SendCtrlAltDel => "SendCtrlAltDel",
            Self::FlushMetrics => "FlushMetrics",
            Self::Pause => "pausing the microVM",
            Self::Resume => "resuming the microVM",
            Self::CreateSnapshot(_) => "PUT /snapshot/create",
            Self::LoadSnapshot(_) => "PUT /snapshot/load",
            Self::Shutdown => "PUT /api/v1/vmm.shutdown",
        }
    }
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    InstanceInfo(InstanceInfo),
    Version(String),
    MachineConfig(MachineConfig),
    FullVmConfig(Box<FullVmConfig>),
    /// The metrics, already JSON.
    Metrics(String),
    Balloon(Balloon),
    BalloonStats(BalloonStatistics),
}

/// Why a request was refused. Each is answered 400 with its text as `fault_message`, as
/// Firecracker does, except [`ApiError::VmmGone`] (503).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request method and/or path: {method} {path}")]
    InvalidPathMethod { method: String, path: String },
    #[error("a {0} request cannot have a body")]
    BodyNotAllowed(String),
    #[error("a {0} request needs a JSON body")]
    MissingBody(String),
    #[error("the {0} in the path is empty")]
    EmptyId(&'static str),
    #[error("invalid {what} \"{id}\": use only letters, digits and '_'")]
    InvalidId { what: &'static str, id: String },
    #[error("the {what} in the path (\"{path}\") differs from the one in the body (\"{body}\")")]
    IdMismatch {
        what: &'static str,
        path: String,
        body: String,
    },
    #[error("invalid JSON body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the request body has {size} bytes, more than the {limit} this server accepts")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("malformed HTTP request: {0}")]
    Http(String),
    #[error("hearth does not implement {0}")]
    NotImplemented(&'static str),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is only possible before InstanceStart, and the microVM is running")]
    AfterStart(&'static str),
    #[error("{0} is only possible once the microVM runs: send InstanceStart first")]
    BeforeStart(&'static str),
    #[error("cannot start the microVM: {0}")]
    Start(String),
    #[error("{0}")]
    Runtime(String),
    /// A snapshot that cannot be loaded: the reason, as one line.
    #[error("{0}")]
    Snapshot(String),
    #[error("the VMM has stopped")]
    VmmGone,
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::VmmGone => 503,
            _ => 400,
        }
    }

    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::Invalid(message.to_string())
    }
}

/// What the controller answers.
pub type ActionResult = Result<VmmData, ApiError>;
