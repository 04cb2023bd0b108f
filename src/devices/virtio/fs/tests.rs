//! The device against a real vhost-user back end in-process: the `vhost` crate's own
//! back-end request handler, served on a thread, over a socket pair or a listening
//! socket, recording what hearth asks of it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, SubscriberOps};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as BackendChannel, BackendReqHandler, Error as VhostUserError, GpuBackend,
    Result as VhostUserResult, VhostUserBackendReqHandlerMut, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::*;
use crate::devices::bus::{lock, BusDevice};
use crate::devices::virtio::device::test_util::{configure_queue, observed_interrupt};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::test_util::running;
use crate::devices::virtio::{
    Pausable, VirtioDevice, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::vstate::memory::{create_shared_guest_memory, GuestMemory};

const EXTRA_FEATURE: u64 = 1 << 24; // VIRTIO_F_NOTIFY_ON_EMPTY: offered, not passed on.
const DRIVER_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

/// What the test back end was asked, and what it holds.
#[derive(Default)]
struct Recorder {
    log: Vec<String>,
    queue_num: u64,
    /// Added to the base a ring was started from when it is stopped: the requests the
    /// back end "served".
    served: u16,
    bases: Vec<u32>,
    mem_files: Vec<(VhostUserMemoryRegion, File)>,
    addrs: Vec<(u64, u64, u64)>,
    kicks: Vec<Option<File>>,
    calls: Vec<Option<File>>,
}

impl Recorder {
    fn new(queue_num: u64) -> Self {
        Self {
            queue_num,
            bases: vec![0; queue_num as usize],
            addrs: vec![(0, 0, 0); queue_num as usize],
            kicks: (0..queue_num).map(|_| None).collect(),
            calls: (0..queue_num).map(|_| None).collect(),
            ..Self::default()
        }
    }
}

fn unsupported<T>() -> VhostUserResult<T> {
    Err(VhostUserError::InvalidOperation("not in the test back end"))
}

impl VhostUserBackendReqHandlerMut for Recorder {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        self.log.push("SET_OWNER".into());
        Ok(())
    }
    fn reset_owner(&mut self) -> VhostUserResult<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> VhostUserResult<()> {
        unsupported()
    }
    fn get_features(&mut self) -> VhostUserResult<u64> {
        self.log.push("GET_FEATURES".into());
        Ok(GUEST_FEATURES | EXTRA_FEATURE | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.log.push(format!("SET_FEATURES {features:#x}"));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> VhostUserResult<()> {
        self.log.push(format!("SET_MEM_TABLE {}", ctx.len()));
        self.mem_files = ctx.iter().copied().zip(files).collect();
        Ok(())
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_NUM {index} {num}"));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_ADDR {index}"));
        self.addrs[index as usize] = (descriptor, available, used);
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_BASE {index} {base}"));
        self.bases[index as usize] = base;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.log.push(format!("GET_VRING_BASE {index}"));
        let base = self.bases[index as usize] + u32::from(self.served);
        Ok(VhostUserVringState::new(index, base))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_KICK {index}"));
        self.kicks[usize::from(index)] = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_CALL {index}"));
        self.calls[usize::from(index)] = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VhostUserResult<()> {
        unsupported()
    }
    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        self.log.push("GET_PROTOCOL_FEATURES".into());
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG)
    }
    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.log
            .push(format!("SET_PROTOCOL_FEATURES {features:#x}"));
        Ok(())
    }
    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        self.log.push("GET_QUEUE_NUM".into());
        Ok(self.queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.log.push(format!("SET_VRING_ENABLE {index} {enable}"));
        Ok(())
    }
    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        unsupported()
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        unsupported()
    }
    fn set_backend_req_fd(&mut self, _backend: BackendChannel) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        unsupported()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> VhostUserResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
    ) -> VhostUserResult<()> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> VhostUserResult<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        unsupported()
    }
}

/// A back end serving `stream` on a thread until the connection ends; a handle to hang
/// it up (the other end of the same socket).
struct TestBackend {
    recorder: Arc<Mutex<Recorder>>,
    socket: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl TestBackend {
    fn serve(stream: UnixStream, queue_num: u64) -> Self {
        let recorder = Arc::new(Mutex::new(Recorder::new(queue_num)));
        let socket = stream.try_clone().unwrap();
        let mut handler = BackendReqHandler::from_stream(stream, recorder.clone());
        let thread = std::thread::spawn(move || while handler.handle_request().is_ok() {});
        Self {
            recorder,
            socket,
            thread: Some(thread),
        }
    }

    fn log(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.recorder).log)
    }

    fn hang_up(&mut self) {
        self.socket.shutdown(std::net::Shutdown::Both).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn connected(config: &FsConfig, queue_num: u64) -> (Result<Fs, FsError>, TestBackend) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let backend = TestBackend::serve(theirs, queue_num);
    let fs = Backend::handshake(ours, config.queue_count())
        .map_err(FsError::Backend)
        .and_then(|b| Fs::with_backend(config, b));
    (fs, backend)
}

fn memory() -> GuestMemory {
    create_shared_guest_memory(2 << 20).unwrap()
}

/// The driver's queues, one mock per device queue, 64 KiB apart.
fn set_up_queues(fs: &mut Fs, mem: &GuestMemory) -> Vec<MockSplitQueue<'static, GuestMemory>> {
    let mem: &'static GuestMemory = Box::leak(Box::new(mem.clone()));
    let mocks: Vec<_> = (0..fs.queues().len())
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x10_0000 + i as u64 * 0x1_0000), 16))
        .collect();
    for (queue, mock) in fs.queues_mut().iter_mut().zip(&mocks) {
        configure_queue(queue, &mock.create_queue().unwrap());
    }
    mocks
}

#[test]
fn features_and_configuration_space() {
    let mut config = FsConfig::new("hostshare", "/unused");
    config.num_request_queues = 2;
    config.queue_size = 16;
    let (fs, backend) = connected(&config, 3);
    let fs = fs.unwrap();
    assert_eq!(fs.device_type(), 26);
    // The back end's extra feature and the protocol-features bit are not offered.
    assert_eq!(
        fs.avail_features(),
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    );
    assert_eq!(fs.queues().len(), 3);
    assert!(fs.queues().iter().all(|q| q.max_size() == 16));
    let mut space = [0xffu8; CONFIG_SPACE_BYTES + 4];
    fs.read_config(0, &mut space);
    assert_eq!(&space[..9], b"hostshare");
    assert!(space[9..TAG_BYTES].iter().all(|&b| b == 0));
    assert_eq!(&space[TAG_BYTES..TAG_BYTES + 4], &2u32.to_le_bytes());
    assert_eq!(&space[CONFIG_SPACE_BYTES..], &[0; 4]);
    assert_eq!(
        backend.log(),
        [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            // MQ and REPLY_ACK: not CONFIG, the configuration space is hearth's.
            "SET_PROTOCOL_FEATURES 0x9",
            "GET_QUEUE_NUM",
        ]
    );
}

#[test]
fn a_back_end_with_too_few_queues_is_refused() {
    let mut config = FsConfig::new("t", "/unused");
    config.num_request_queues = 4;
    let (fs, _backend) = connected(&config, 2);
    assert_eq!(
        crate::error_chain(&fs.err().unwrap()),
        "the back end serves 2 queues, the device has 5"
    );
}

#[test]
fn activation_hands_over_memory_and_rings_and_calls_become_interrupts() {
    let mut config = FsConfig::new("share", "/unused");
    config.queue_size = 16;
    let (fs, mut backend) = connected(&config, 2);
    let mut fs = fs.unwrap();
    backend.log();
    let mem = memory();
    let _mocks = set_up_queues(&mut fs, &mem);
    fs.set_acked_features(DRIVER_FEATURES);
    let fs = Arc::new(Mutex::new(fs));
    let mut events = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
    let id = events.add_subscriber(fs.clone());
    let (interrupt, irq) = observed_interrupt();
    lock(&fs).activate(mem.clone(), interrupt.clone()).unwrap();

    let features = DRIVER_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let mut expected = vec![
        format!("SET_FEATURES {features:#x}"),
        "SET_MEM_TABLE 1".into(),
    ];
    for i in 0..2 {
        for step in [
            format!("SET_VRING_NUM {i} 16"),
            format!("SET_VRING_ADDR {i}"),
            format!("SET_VRING_BASE {i} 0"),
            format!("SET_VRING_CALL {i}"),
            format!("SET_VRING_KICK {i}"),
            format!("SET_VRING_ENABLE {i} true"),
        ] {
            expected.push(step);
        }
    }
    assert_eq!(backend.log(), expected);

    {
        let recorder = lock(&backend.recorder);
        // The back end maps the same pages: a guest write is in the file it was given.
        let (region, file) = &recorder.mem_files[0];
        assert_eq!(
            ({ region.guest_phys_addr }, { region.memory_size }),
            (0, 2 << 20)
        );
        mem.write_obj(0xa5_u8, GuestAddress(0x1234)).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, { region.mmap_offset } + 0x1234)
            .unwrap();
        assert_eq!(byte, [0xa5]);
        // Ring addresses are hearth's own addresses of the rings, which the back end
        // translates through the memory table.
        let host = mem.get_host_address(GuestAddress(0x11_0000)).unwrap() as u64;
        assert_eq!(recorder.addrs[1].0, host);
        assert_eq!(
            { region.user_addr },
            mem.iter().next().unwrap().as_ptr() as u64
        );

        // A guest notification (KVM writes the queue's eventfd) is the back end's kick.
        let kick = recorder.kicks[1].as_ref().unwrap();
        lock(&fs).queue_events()[1].write(1).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(std::io::Read::read(&mut &*kick, &mut buf).unwrap(), 8);
        assert!(u64::from_ne_bytes(buf) >= 1);

        // The back end's call is an interrupt once the event loop runs.
        let call = recorder.calls[0].as_ref().unwrap();
        std::io::Write::write_all(&mut &*call, &1u64.to_ne_bytes()).unwrap();
    }
    while irq.read().is_err() {
        events.run_with_timeout(100).unwrap();
    }
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );

    // Pausing takes the rings back, with where the back end got to; resuming gives them
    // back from there.
    lock(&backend.recorder).served = 3;
    {
        let mut ops = events.event_ops(id).unwrap();
        lock(&fs).pause(&mut ops);
    }
    assert_eq!(
        backend.log(),
        [
            "SET_VRING_ENABLE 0 false",
            "GET_VRING_BASE 0",
            "SET_VRING_ENABLE 1 false",
            "GET_VRING_BASE 1"
        ]
    );
    assert!(lock(&fs).queues().iter().all(|q| q.next_avail() == 3));
    let saved = lock(&fs).save();
    assert!(saved.core.queues.iter().all(|q| q.next_avail == 3));
    {
        let mut ops = events.event_ops(id).unwrap();
        lock(&fs).resume(&mut ops);
    }
    let log = backend.log();
    assert!(log.contains(&"SET_VRING_BASE 1 3".to_string()), "{log:?}");
    assert!(
        !log.iter().any(|l| l.starts_with("SET_MEM_TABLE")),
        "{log:?}"
    );

    // The back end goes away: the device is broken, the driver hears about it, the VM
    // (this thread) goes on.
    backend.hang_up();
    while !lock(&fs).is_broken() {
        events.run_with_timeout(100).unwrap();
    }
    assert!(lock(&fs).needs_reset());
    assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    // A reset of a broken device talks to no one and does not block.
    lock(&fs).reset();
    assert!(!lock(&fs).is_activated());
}

/// A failed back end shows as DEVICE_NEEDS_RESET in the transport's status register.
#[test]
fn a_broken_device_shows_needs_reset() {
    let mut config = FsConfig::new("share", "/unused");
    config.queue_size = 16;
    let (fs, mut backend) = connected(&config, 2);
    let fs = Arc::new(Mutex::new(fs.unwrap()));
    let mem = memory();
    let (interrupt, _irq) = observed_interrupt();
    let mut transport = MmioTransport::new(fs.clone(), mem, interrupt);
    let status = |transport: &mut MmioTransport| {
        let mut data = [0u8; 4];
        transport.read(0x70, &mut data);
        u32::from_le_bytes(data)
    };
    assert_eq!(status(&mut transport) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    backend.hang_up();
    lock(&fs).mark_broken(&std::io::Error::other("gone"));
    assert_ne!(status(&mut transport) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

/// A restore connects to the back end the (overridden) configuration names and, as the
/// saved driver had the device running, hands it memory and the rings from the saved
/// positions with no help from the guest.
#[test]
fn a_restored_device_sets_up_a_fresh_back_end_from_the_saved_positions() {
    let dir = std::env::temp_dir().join(format!("hearth-fs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fresh.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();

    let mut config = FsConfig::new("share", "/the/old/back/end.sock");
    config.queue_size = 16;
    let (fs, _old) = connected(&config, 2);
    let mut fs = fs.unwrap();
    let mem = memory();
    let _mocks = set_up_queues(&mut fs, &mem);
    fs.set_acked_features(DRIVER_FEATURES);
    for queue in fs.queues_mut() {
        queue.set_next_avail(7);
    }
    let mut state = fs.save();
    state.config.socket = path.clone();

    let accept = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        TestBackend::serve(stream, 2)
    });
    let restored = Fs::restore(&state).unwrap();
    let fresh = accept.join().unwrap();
    let restored = Arc::new(Mutex::new(restored));
    let (interrupt, _irq) = observed_interrupt();
    MmioTransport::restore(restored.clone(), mem, interrupt, &running(DRIVER_FEATURES)).unwrap();
    assert!(lock(&restored).is_activated());
    let log = fresh.log();
    assert_eq!(
        log[..5],
        [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES 0x9",
            "GET_QUEUE_NUM"
        ]
    );
    assert!(log.contains(&"SET_MEM_TABLE 1".to_string()));
    assert!(log.contains(&"SET_VRING_BASE 0 7".to_string()));
    assert!(log.contains(&"SET_VRING_BASE 1 7".to_string()));
    assert_eq!(log.last().unwrap(), "SET_VRING_ENABLE 1 true");

    // No back end at the socket: the restore fails with one line naming it.
    std::fs::remove_file(&path).unwrap();
    let err = Fs::restore(&state).err().unwrap();
    let text = crate::error_chain(&err);
    assert!(
        text.starts_with(
            "cannot rebuild the virtio-fs device: cannot connect to the vhost-user back end at"
        ),
        "{text}"
    );
    assert!(!text.contains('\n'));
}
