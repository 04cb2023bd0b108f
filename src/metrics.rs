//! hearth's metrics: counters for the VM (vCPU exits, API requests, the log, the metrics
//! writer itself) and for each device, written as one JSON object per flush.
//!
//! Counters are `AtomicU64`s bumped with relaxed ordering, so any thread (a vCPU, the
//! event loop, the API server) counts without a lock. A VMM process runs one VM, as
//! Firecracker's does, so the counters live in one process-wide [`METRICS`]. Devices own
//! their counters (an `Arc<BlockMetrics>` and so on, created with the device) and the
//! builder registers them under the device's id; a device that is rebuilt under the same
//! id (a snapshot restore) replaces the old entry.
//!
//! Every value is **cumulative** since the VMM process started, never a delta since the
//! last flush: a flush that fails loses nothing, `GET /metrics` and the flushes agree, and
//! a reader gets rates by subtracting two lines. (Firecracker writes deltas for most
//! counters; a reader of both must subtract for hearth.)
//!
//! Where the JSON goes: the file or named pipe given once, by `--metrics-path`,
//! `PUT /metrics` or the `metrics` section of a configuration file ([`init`]); one line is
//! appended per flush. A flush happens every [`FLUSH_INTERVAL`] on the event loop
//! ([`PeriodicFlush`]), on `FlushMetrics`, and when the VMM stops.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Serialize, Serializer};
use vmm_sys_util::timerfd::TimerFd;

use crate::vstate::vcpu::{KvmExit, VcpuAction};

/// How often the event loop writes the metrics (Firecracker's period).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// The process's counters.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// Where flushes go, once set.
static DESTINATION: Mutex<Option<Destination>> = Mutex::new(None);

struct Destination {
    path: PathBuf,
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("the metrics destination is already \"{0}\"; it cannot be changed")]
    AlreadySet(PathBuf),
    #[error("cannot open the metrics file \"{path}\"")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the metrics to \"{path}\"")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the metrics")]
    Encode(#[source] serde_json::Error),
}

/// One monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_u64(self.get())
    }
}

/// vCPU exits, summed over every vCPU of the VM.
#[derive(Debug, Default, Serialize)]
pub struct VcpuMetrics {
    /// Port reads (KVM_EXIT_IO, in), the compat layer's ports included.
    pub exits_io_in: Counter,
    /// Port writes (KVM_EXIT_IO, out).
    pub exits_io_out: Counter,
    /// MMIO reads (KVM_EXIT_MMIO).
    pub exits_mmio_read: Counter,
    /// MMIO writes.
    pub exits_mmio_write: Counter,
    /// KVM_EXIT_HLT (only without an in-kernel irqchip; it stops the VM).
    pub exits_hlt: Counter,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    pub exits_shutdown: Counter,
    /// KVM_EXIT_SYSTEM_EVENT: power-off or reset.
    pub exits_system_event: Counter,
    /// KVM_RUN interrupted by a kick (pause, stop, the compat layer's poll).
    pub exits_interrupted: Counter,
    /// KVM_EXIT_DEBUG, KVM_EXIT_INTERNAL_ERROR, failed entries and anything else.
    pub exits_other: Counter,
    /// Port accesses the compat layer answered itself.
    pub compat_port_accesses: Counter,
    /// Debug exits handed to the compat layer.
    pub compat_debug_exits: Counter,
    /// Instructions KVM could not emulate, handed to the compat layer.
    pub compat_emulations: Counter,
    /// Port accesses no device claimed (reads answer 0xff).
    pub unclaimed_io: Counter,
    /// MMIO accesses no device claimed.
    pub unclaimed_mmio: Counter,
}

impl VcpuMetrics {
    /// Counts one KVM_RUN outcome and where [`crate::vstate::vcpu::classify`] sent it.
    pub fn record_exit(&self, exit: &KvmExit, action: &VcpuAction) {
        let counter = match exit {
            KvmExit::PortIn { .. } => &self.exits_io_in,
            KvmExit::PortOut { .. } => &self.exits_io_out,
            KvmExit::MmioRead { .. } => &self.exits_mmio_read,
            KvmExit::MmioWrite { .. } => &self.exits_mmio_write,
            KvmExit::Halt => &self.exits_hlt,
            KvmExit::Shutdown => &self.exits_shutdown,
            KvmExit::SystemEvent { .. } => &self.exits_system_event,
            KvmExit::Interrupted => &self.exits_interrupted,
            KvmExit::InternalError
            | KvmExit::Debug { .. }
            | KvmExit::FailEntry { .. }
            | KvmExit::Again
            | KvmExit::Unexpected(_)
            | KvmExit::RunFailed(_) => &self.exits_other,
        };
        counter.inc();
        match action {
            VcpuAction::CompatPort => self.compat_port_accesses.inc(),
            VcpuAction::CompatDebug { .. } => self.compat_debug_exits.inc(),
            VcpuAction::CompatEmulation => self.compat_emulations.inc(),
            _ => {}
        }
    }
}

/// One virtio-blk device.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// VIRTIO_BLK_T_IN requests that succeeded.
    pub read_requests: Counter,
    /// Bytes read from the image into guest memory.
    pub read_bytes: Counter,
    /// VIRTIO_BLK_T_OUT requests that succeeded.
    pub write_requests: Counter,
    /// Bytes written from guest memory to the image.
    pub write_bytes: Counter,
    /// VIRTIO_BLK_T_FLUSH requests that succeeded.
    pub flush_requests: Counter,
    /// GET_ID, DISCARD and WRITE_ZEROES requests that succeeded.
    pub other_requests: Counter,
    /// Requests refused as malformed, out of range or unsupported (the guest's fault).
    pub invalid_requests: Counter,
    /// Requests that failed in the host's I/O (the guest got VIRTIO_BLK_S_IOERR).
    pub io_errors: Counter,
    /// Times a request had to wait for the rate limiter.
    pub throttled: Counter,
}

/// One virtio-net device.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: Counter,
    /// Their bytes, without the virtio-net header.
    pub rx_bytes: Counter,
    /// Frames read from the tap and not delivered (too large for the guest's buffers, or
    /// a runt).
    pub rx_dropped: Counter,
    /// Tap reads that failed (the device stops receiving).
    pub rx_errors: Counter,
    /// Frames the guest sent that reached the tap.
    pub tx_packets: Counter,
    /// Their bytes, without the virtio-net header.
    pub tx_bytes: Counter,
    /// Frames the guest sent that were malformed and dropped.
    pub tx_dropped: Counter,
    /// Frames the tap refused.
    pub tx_errors: Counter,
    /// Times a received frame had to wait for the receive rate limiter.
    pub rx_throttled: Counter,
    /// Times a frame the guest sent had to wait for the transmit rate limiter.
    pub tx_throttled: Counter,
}

/// The virtio-vsock device.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Connections set up, either side initiating.
    pub conns_added: Counter,
    /// Connections torn down.
    pub conns_removed: Counter,
    /// Connections refused: a host program's beyond the limits, or a guest's to a port
    /// nothing listens on.
    pub conns_refused: Counter,
    /// Payload bytes from the host to the guest.
    pub rx_bytes: Counter,
    /// Payload bytes from the guest to the host.
    pub tx_bytes: Counter,
}

/// The virtio-rng device.
#[derive(Debug, Default, Serialize)]
pub struct RngMetrics {
    /// Requests served.
    pub requests: Counter,
    /// Random bytes given to the guest.
    pub bytes: Counter,
    /// Requests answered with no bytes because the host's getrandom failed.
    pub errors: Counter,
    /// Times a request had to wait for the rate limiter.
    pub throttled: Counter,
}

/// The virtio-balloon device.
#[derive(Debug, Default, Serialize)]
pub struct BalloonMetrics {
    /// 4 KiB pages the guest put in the balloon (given back to the host).
    pub inflated_pages: Counter,
    /// 4 KiB pages the guest took back out of the balloon.
    pub deflated_pages: Counter,
    /// Free page reports served.
    pub reports: Counter,
    /// 4 KiB pages the guest reported free (given back to the host).
    pub reported_pages: Counter,
    /// Statistics buffers read.
    pub stats_updates: Counter,
    /// Requests refused: a malformed buffer, or memory that is not guest RAM.
    pub invalid_requests: Counter,
    /// Ranges the host could not drop (madvise failed).
    pub discard_failures: Counter,
}

/// API requests, by outcome.
#[derive(Debug, Default, Serialize)]
pub struct ApiMetrics {
    /// Answered 200 or 204.
    pub requests_ok: Counter,
    /// Answered 400 (refused: bad request, or not possible in this state).
    pub requests_failed: Counter,
    /// Answered 503: the VMM had stopped.
    pub requests_vmm_gone: Counter,
    /// Requests that could not be framed as HTTP (the connection is closed).
    pub requests_malformed: Counter,
}

impl ApiMetrics {
    /// Counts one answered request by its HTTP status.
    pub fn record_status(&self, status: u16) {
        match status {
            200..=299 => self.requests_ok.inc(),
            503 => self.requests_vmm_gone.inc(),
            _ => self.requests_failed.inc(),
        }
    }
}

/// hearth's own log.
#[derive(Debug, Default, Serialize)]
pub struct LoggerMetrics {
    /// Lines dropped by the per-module rate limit.
    pub missed_log_count: Counter,
}

/// The metrics writer.
#[derive(Debug, Default, Serialize)]
pub struct FlushMetrics {
    /// Flushes written.
    pub flushes: Counter,
    /// Flushes that could not be written (a full pipe, a full disk).
    pub flush_failures: Counter,
}

/// Every counter of the process (see the module documentation).
#[derive(Debug, Default)]
pub struct Metrics {
    pub vcpu: VcpuMetrics,
    pub api: ApiMetrics,
    pub logger: LoggerMetrics,
    pub metrics: FlushMetrics,
    devices: Mutex<Devices>,
}

/// The devices' counters, by device id.
#[derive(Debug, Default)]
struct Devices {
    block: BTreeMap<String, Arc<BlockMetrics>>,
    net: BTreeMap<String, Arc<NetMetrics>>,
    vsock: Option<Arc<VsockMetrics>>,
    rng: Option<Arc<RngMetrics>>,
    balloon: Option<Arc<BalloonMetrics>>,
}

/// What one flush writes; see the README's metrics reference.
#[derive(Serialize)]
struct Report<'a> {
    utc_timestamp_ms: u64,
    vcpu: &'a VcpuMetrics,
    api: &'a ApiMetrics,
    logger: &'a LoggerMetrics,
    metrics: &'a FlushMetrics,
    block: BTreeMap<&'a str, &'a BlockMetrics>,
    net: BTreeMap<&'a str, &'a NetMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vsock: Option<&'a VsockMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rng: Option<&'a RngMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balloon: Option<&'a BalloonMetrics>,
}

impl Metrics {
    fn devices(&self) -> std::sync::MutexGuard<'_, Devices> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports `metrics` as the disk `id`'s.
    pub fn register_block(&self, id: &str, metrics: Arc<BlockMetrics>) {
        self.devices().block.insert(id.to_string(), metrics);
    }

    /// Reports `metrics` as the network interface `id`'s.
    pub fn register_net(&self, id: &str, metrics: Arc<NetMetrics>) {
        self.devices().net.insert(id.to_string(), metrics);
    }

    /// Reports `metrics` as the vsock device's.
    pub fn register_vsock(&self, metrics: Arc<VsockMetrics>) {
        self.devices().vsock = Some(metrics);
    }

    /// Reports `metrics` as the entropy device's.
    pub fn register_rng(&self, metrics: Arc<RngMetrics>) {
        self.devices().rng = Some(metrics);
    }

    /// Reports `metrics` as the balloon's.
    pub fn register_balloon(&self, metrics: Arc<BalloonMetrics>) {
        self.devices().balloon = Some(metrics);
    }

    /// Every counter as one JSON object (one line).
    pub fn to_json(&self) -> Result<String, MetricsError> {
        let devices = self.devices();
        let report = Report {
            utc_timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |t| t.as_millis() as u64),
            vcpu: &self.vcpu,
            api: &self.api,
            logger: &self.logger,
            metrics: &self.metrics,
            block: devices
                .block
                .iter()
                .map(|(id, m)| (id.as_str(), &**m))
                .collect(),
            net: devices
                .net
                .iter()
                .map(|(id, m)| (id.as_str(), &**m))
                .collect(),
            vsock: devices.vsock.as_deref(),
            rng: devices.rng.as_deref(),
            balloon: devices.balloon.as_deref(),
        };
        serde_json::to_string(&report).map_err(MetricsError::Encode)
    }
}

/// Sets where flushes go: the file (created if missing, appended to) or named pipe at
/// `path`. Only once per process, as in Firecracker. A pipe is opened read-write and
/// non-blocking, so neither the open nor a flush waits for a reader: a full pipe fails the
/// flush instead of stalling the event loop.
pub fn init(path: &Path) -> Result<(), MetricsError> {
    let mut destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(current) = destination.as_ref() {
        return Err(MetricsError::AlreadySet(current.path.clone()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| MetricsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    *destination = Some(Destination {
        path: path.to_path_buf(),
        file,
    });
    Ok(())
}

/// The descriptor of the file [`init`] opened, if any: a jail keeps it open, so a jailed
/// VMM writes its metrics without the path being in the jail.
pub fn raw_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    destination.as_ref().map(|d| d.file.as_raw_fd())
}

/// The path [`init`] set, if any.
pub fn destination() -> Option<PathBuf> {
    let destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    destination.as_ref().map(|d| d.path.clone())
}

/// Appends the counters as one line to the destination. `Ok(false)` when none is set (as
/// in Firecracker, flushing then does nothing).
pub fn flush() -> Result<bool, MetricsError> {
    let mut destination = DESTINATION.lock().unwrap_or_else(|p| p.into_inner());
    let Some(destination) = destination.as_mut() else {
        return Ok(false);
    };
    // Counted before the JSON is made, so the line counts itself.
    METRICS.metrics.flushes.inc();
    let written = METRICS.to_json().and_then(|mut line| {
        line.push('\n');
        // One write: a reader of a pipe sees whole lines.
        destination
            .file
            .write_all(line.as_bytes())
            .map_err(|source| MetricsError::Write {
                path: destination.path.clone(),
                source,
            })
    });
    if written.is_err() {
        METRICS.metrics.flushes.0.fetch_sub(1, Ordering::Relaxed);
        METRICS.metrics.flush_failures.inc();
    }
    written.map(|()| true)
}

/// Flushes; a failure is logged, not returned (the periodic and final flushes).
pub fn flush_and_log() {
    if let Err(e) = flush() {
        log::warn!("{}", crate::error_chain(&e));
    }
}

/// The event-loop subscriber that flushes every [`FLUSH_INTERVAL`].
pub struct PeriodicFlush {
    timer: TimerFd,
}

impl PeriodicFlush {
    pub fn new() -> std::io::Result<Self> {
        Self::every(FLUSH_INTERVAL)
    }

    fn every(interval: Duration) -> std::io::Result<Self> {
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        timer
            .reset(interval, Some(interval))
            .map_err(std::io::Error::from)?;
        Ok(Self { timer })
    }
}

impl MutEventSubscriber for PeriodicFlush {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot watch the metrics timer: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Expirations missed while the loop was busy make one flush, not several.
        if let Err(e) = self.timer.wait() {
            log::debug!("metrics timer: {e}");
        }
        flush_and_log();
    }
}

#[cfg(test)]
mod tests {
    use event_manager::SubscriberOps;

    use super::*;

    #[test]
    fn counters_serialise_as_numbers() {
        let metrics = Metrics::default();
        metrics.vcpu.exits_io_in.add(3);
        metrics.api.record_status(204);
        metrics.api.record_status(400);
        metrics.api.record_status(503);
        let block = Arc::new(BlockMetrics::default());
        block.read_bytes.add(4096);
        metrics.register_block("rootfs", block.clone());
        let net = Arc::new(NetMetrics::default());
        metrics.register_net("eth0", net);
        let json: serde_json::Value = serde_json::from_str(&metrics.to_json().unwrap()).unwrap();
        assert_eq!(json["vcpu"]["exits_io_in"], 3);
        assert_eq!(json["api"]["requests_ok"], 1);
        assert_eq!(json["api"]["requests_failed"], 1);
        assert_eq!(json["api"]["requests_vmm_gone"], 1);
        assert_eq!(json["block"]["rootfs"]["read_bytes"], 4096);
        assert_eq!(json["net"]["eth0"]["tx_packets"], 0);
        assert!(json["utc_timestamp_ms"].as_u64().unwrap() > 0);
        // Absent devices are left out, not reported as zeros.
        assert!(json.get("vsock").is_none() && json.get("rng").is_none());
        // Counting goes on through the device's own Arc; a rebuilt device replaces it.
        block.read_bytes.add(1);
        let json: serde_json::Value = serde_json::from_str(&metrics.to_json().unwrap()).unwrap();
        assert_eq!(json["block"]["rootfs"]["read_bytes"], 4097);
        metrics.register_block("rootfs", Arc::new(BlockMetrics::default()));
        let json: serde_json::Value = serde_json::from_str(&metrics.to_json().unwrap()).unwrap();
        assert_eq!(json["block"]["rootfs"]["read_bytes"], 0);
        assert_eq!(json["block"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn exits_are_counted_by_kind() {
        let vcpu = VcpuMetrics::default();
        let mut data = [0u8; 4];
        vcpu.record_exit(
            &KvmExit::PortIn {
                port: 0x3f8,
                data: &mut data,
            },
            &VcpuAction::IoBus,
        );
        vcpu.record_exit(
            &KvmExit::PortOut {
                port: 0x80,
                data: &data,
            },
            &VcpuAction::CompatPort,
        );
        vcpu.record_exit(
            &KvmExit::MmioWrite {
                addr: 0xd000_0000,
                data: &data,
            },
            &VcpuAction::MmioBus,
        );
        vcpu.record_exit(&KvmExit::InternalError, &VcpuAction::CompatEmulation);
        vcpu.record_exit(&KvmExit::Interrupted, &VcpuAction::Interrupted);
        vcpu.record_exit(&KvmExit::Shutdown, &VcpuAction::TripleFault);
        let counts = [
            vcpu.exits_io_in.get(),
            vcpu.exits_io_out.get(),
            vcpu.exits_mmio_read.get(),
            vcpu.exits_mmio_write.get(),
            vcpu.exits_other.get(),
            vcpu.exits_interrupted.get(),
            vcpu.exits_shutdown.get(),
            vcpu.compat_port_accesses.get(),
            vcpu.compat_emulations.get(),
            vcpu.compat_debug_exits.get(),
        ];
        assert_eq!(counts, [1, 1, 0, 1, 1, 1, 1, 1, 1, 0]);
    }

    /// The process-wide destination: refused when unopenable, then set once, appended
    /// to, one JSON object per line. (The only test that sets it: tests share the
    /// process. The timer test may flush in between, so lines are counted from below.)
    #[test]
    fn flushes_append_lines_and_the_path_is_set_once() {
        let dir = crate::testutil::TempDir::new("metrics");
        let path = dir.path().join("metrics.json");
        assert!(
            !flush().unwrap(),
            "nothing is written before a destination is set"
        );
        let err = init(Path::new("/nonexistent/dir/metrics")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open the metrics file"));
        init(&path).unwrap();
        let err = init(&dir.path().join("other")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the metrics destination is already \"{}\"; it cannot be changed",
                path.display()
            )
        );
        assert_eq!(destination(), Some(path.clone()));
        assert!(flush().unwrap());
        assert!(flush().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let flushes: Vec<u64> = text
            .lines()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).unwrap();
                json["metrics"]["flushes"].as_u64().unwrap()
            })
            .collect();
        assert!(flushes.len() >= 2, "{text}");
        assert!(flushes.windows(2).all(|w| w[1] > w[0]), "{flushes:?}");
    }

    #[test]
    fn the_timer_fires() {
        let mut event_loop = crate::device_manager::EventLoop::new().unwrap();
        let flusher = PeriodicFlush::every(Duration::from_millis(10)).unwrap();
        event_loop.add_subscriber(Box::new(flusher));
        let dispatched = event_loop.run_with_timeout(5000).unwrap();
        assert_eq!(dispatched, 1, "the timer did not fire within 5 s");
    }
}
