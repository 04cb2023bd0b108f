//! How a VM is made, as one linear recipe: open KVM, create the VM, map memory, load the
//! kernel, initrd and command line, attach devices, write the firmware tables and boot
//! parameters, create the vCPUs. `build_vm` reads top to bottom in that order;
//! `build_from_snapshot` is the same recipe for a VM that goes on from a snapshot.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::boot::{BootProtocol, InitrdRegion};
use crate::arch::{self, layout};
use crate::config::{ConfigError, RestoreConfig, SerialConfig, VmConfig};
use crate::console::InputSource;
use crate::device_manager::{
    AttachedDeviceState, EventLoop, MmioDeviceManager, VirtioDeviceState, VirtioHandle,
};
use crate::devices::bus::lock;
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::control::{BootCompletePort, Control, ControlPage, ExitPort};
use crate::devices::legacy::acpi_pm::AcpiSleep;
use crate::devices::legacy::cmos::{Cmos, CmosState};
use crate::devices::legacy::i8042::{I8042State, I8042};
use crate::devices::legacy::serial::{
    InputSpace, SerialDevice, SerialState, SocketSink, StdoutSink,
};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::vmgenid::{VmGenId, VmGenIdError, VmGenIdState};
use crate::diag::{self, RipSampler, SymbolsError};
use crate::exit::ExitSignal;
use crate::metrics::METRICS;
use crate::snapshot::{Snapshot, SnapshotError, StateFile};
use crate::vmm::persist::{OverrideError, VmmState};
use crate::vmm::{ConsoleSetup, RuntimeDevices, Vmm};
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{
    create_guest_memory, create_shared_guest_memory, GuestMemory, MemoryError,
};
use crate::vstate::vcpu::{BootEntry, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Offset of the 64-bit entry point (startup_64) in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// ELF identification: 64-bit class, x86-64 machine.
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
/// Linux boot protocol: "HdrS" at 0x202.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Symbols(#[from] SymbolsError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot load kernel \"{path}\"")]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("cannot load initrd \"{path}\"")]
    Initrd {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot write the kernel command line to guest memory")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("kernel command line is {len} bytes, longer than the {max} bytes this kernel accepts")]
    CmdlineTooLongForKernel { len: usize, max: usize },
    #[error("cannot set up device {name}")]
    Device {
        name: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot place device {name} on its bus")]
    Bus {
        name: &'static str,
        #[source]
        source: BusError,
    },
    #[error("cannot write the MP table")]
    Mptable(#[source] arch::mptable::MptableError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] arch::acpi::AcpiError),
    #[error("cannot write the boot parameters")]
    BootParams(#[source] arch::boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    DeviceManager(crate::device_manager::DeviceManagerError),
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Override(#[from] OverrideError),
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("not an ELF or bzImage image")]
    UnknownFormat,
    #[error("ELF image is not 64-bit")]
    ElfClass,
    #[error("ELF image is for machine {0}, not x86-64 (62)")]
    ElfMachine(u16),
    #[error("invalid or truncated ELF image")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("invalid or truncated bzImage")]
    BzImage(#[source] linux_loader::loader::Error),
}

/// A kernel in guest memory.
struct LoadedKernel {
    boot: BootEntry,
    /// First byte after the kernel image.
    end: GuestAddress,
    /// The bzImage's setup header, to be copied into boot_params.
    setup_header: Option<setup_header>,
}

/// Builds a ready-to-run VM from validated configuration.
pub fn build_vm(config: &VmConfig, start: Instant) -> Result<Vmm, BuildError> {
    let kvm = KvmContext::open()?;
    kvm.check_vcpu_count(config.vcpu_count)?;
    let cpu_profile = config.resolved_cpu_profile();
    log::info!(
        "CPU profile: {:?}{}",
        cpu_profile,
        if crate::arch::pvm::host_is_pvm() {
            " (host KVM is nested PVM)"
        } else {
            ""
        }
    );
    // Before any guest memory is set up: a bad symbols file fails the run at once.
    let sampling = (config.sample_rip.as_ref())
        .map(|sampling| diag::sampling_setup(sampling, &config.kernel))
        .transpose()?;

    let vm = Vm::new(&kvm)?;
    // A vhost-user back end maps guest RAM itself: only memory in a memfd can be shared.
    let mem = if config.fs.is_empty() {
        create_guest_memory(config.mem_size)?
    } else {
        create_shared_guest_memory(config.mem_size)?
    };
    // KVM takes its time over the PIT and the memory slots: they are set up on a thread
    // of their own while the rest of the VM is built, and waited for at the end.
    let platform = vm.set_up_platform(&mem)?;

    let kernel = load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&mem, path, &kernel)?),
        None => None,
    };

    let exit = Arc::new(ExitSignal::new().map_err(|e| BuildError::Device {
        name: "exit eventfd",
        source: Box::new(e),
    })?);
    let mut event_loop = EventLoop::new().map_err(BuildError::EventLoop)?;
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let mut mmio_devices = MmioDeviceManager::new();
    let console = attach_serial(&vm, &mut io_bus, &config.serial, None)?;
    let (i8042, cmos) = attach_legacy_devices(&vm, &mut io_bus, exit.clone(), None)?;
    let control = Control::new(exit.clone(), start, config.boot_timer);
    let control = attach_control_device(&mut io_bus, &mut mmio_bus, control)?;
    let mut virtio = VirtioAttach {
        vm: &vm,
        mem: &mem,
        mmio_bus: &mut mmio_bus,
        event_loop: &mut event_loop,
        manager: &mut mmio_devices,
    };
    let disks = attach_disks(&mut virtio, config)?;
    let nets = attach_nets(&mut virtio, config)?;
    attach_vsock(&mut virtio, config)?;
    attach_rng(&mut virtio, config)?;
    attach_fs(&mut virtio, config)?;
    let balloon = attach_balloon(&mut virtio, config)?;
    let vmgenid = VmGenId::new(
        &mem,
        VmGenIdState {
            address: layout::VMGENID_START,
            irq: layout::GED_IRQ,
        },
    )?;

    let cmdline_size = load_kernel_cmdline(&mem, config, &kernel, &mmio_devices)?;
    arch::mptable::setup_mptable(&mem, config.vcpu_count).map_err(BuildError::Mptable)?;
    let rsdp =
        arch::acpi::create_acpi_tables(&mem, config.vcpu_count, &mmio_devices.acpi_devices())
            .map_err(BuildError::Acpi)?;
    match kernel.boot.protocol {
        BootProtocol::Linux64 => arch::boot::configure_linux_boot(
            &mem,
            GuestAddress(layout::CMDLINE_START),
            cmdline_size,
            initrd.as_ref(),
            kernel.setup_header,
            Some(rsdp),
        ),
        BootProtocol::Pvh => arch::boot::configure_pvh_boot(
            &mem,
            GuestAddress(layout::CMDLINE_START),
            initrd.as_ref(),
            Some(rsdp),
        ),
    }
    .map_err(BuildError::BootParams)?;

    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpu_count));
    for index in 0..config.vcpu_count {
        let mut vcpu = Vcpu::new(
            &vm,
            index,
            io_bus.clone(),
            mmio_bus.clone(),
            exit.clone(),
            mem.clone(),
            cpu_profile,
        )?;
        vcpu.configure(&kvm, config.vcpu_count, (index == 0).then_some(kernel.boot))?;
        if let Some((interval, symbols)) = &sampling {
            vcpu.sample_rip(RipSampler::new(index, *interval, symbols.clone()));
        }
        vcpus.push(vcpu);
    }
    platform.wait()?;

    let mut vmm = Vmm::new(
        kvm,
        vm,
        mem,
        vcpus,
        exit,
        event_loop,
        console,
        control,
        cpu_profile,
        mmio_devices,
        RuntimeDevices {
            i8042,
            disks,
            nets,
            balloon,
            cmos,
            vmgenid,
        },
    );
    if let Some((interval, _)) = sampling {
        vmm.kick_every(interval);
    }
    Ok(vmm)
}

/// A snapshot whose state file was read and checked against this host, with its guest
/// memory mapped: what [`build_from_loaded`] builds a VM from. Its payload (the saved
/// VM) can be looked at in between, e.g. by the API for the ids it saved.
pub struct LoadedSnapshot {
    kvm: KvmContext,
    pub snapshot: Snapshot<VmmState>,
    mem: GuestMemory,
}

/// Reads the snapshot in `state_path` and `mem_path`: the first half of
/// [`build_from_snapshot`]. A damaged state file is refused before KVM is opened, a
/// snapshot this host cannot run before the memory file is.
pub fn load_snapshot(state_path: &Path, mem_path: &Path) -> Result<LoadedSnapshot, BuildError> {
    let file = StateFile::read(state_path).map_err(SnapshotError::from)?;
    let kvm = KvmContext::open()?;
    let (snapshot, mem) = crate::snapshot::load_file::<VmmState>(&kvm, file, mem_path, |state| {
        state.devices.needs_shared_memory()
    })?;
    Ok(LoadedSnapshot { kvm, snapshot, mem })
}

/// Rebuilds a VM from a snapshot in the same order as [`build_vm`]: open KVM, read the
/// state file and check this host against it, map guest memory from the memory file,
/// create the VM with its saved interrupt controllers, PIT and clock, recreate every
/// device from its state (with `restore`'s new backing), recreate the vCPUs from theirs.
/// No kernel is loaded and no firmware table written: all of that is in guest memory.
/// The VM runs when started if `restore.resume`; otherwise it starts paused.
pub fn build_from_snapshot(restore: &RestoreConfig, start: Instant) -> Result<Vmm, BuildError> {
    let loaded = load_snapshot(&restore.state_path, &restore.mem_path)?;
    build_from_loaded(loaded, restore, start)
}

/// The second half of [`build_from_snapshot`], from a snapshot [`load_snapshot`] read
/// (`restore`'s file paths are not read again).
pub fn build_from_loaded(
    loaded: LoadedSnapshot,
    restore: &RestoreConfig,
    start: Instant,
) -> Result<Vmm, BuildError> {
    let LoadedSnapshot { kvm, snapshot, mem } = loaded;
    let cpu_profile = snapshot.header.host.cpu_profile;
    let mut state = snapshot.payload;
    let vcpu_count = u8::try_from(state.vcpus.len())
        .ok()
        .filter(|&count| count > 0)
        .ok_or_else(|| {
            SnapshotError::Inconsistent(format!("it has {} vCPUs", state.vcpus.len()))
        })?;
    kvm.check_vcpu_count(vcpu_count)?;
    state.devices.apply_overrides(restore)?;
    log::info!(
        "restoring a snapshot of hearth {}: {vcpu_count} vCPUs, {} MiB, CPU profile {cpu_profile:?}",
        snapshot.header.hearth_version,
        snapshot.layout.ram_size() >> 20
    );

    let vm = Vm::new(&kvm)?;
    // As when booting, the PIT and memory slots are set up while the devices and vCPUs
    // are rebuilt; the PIT must be there before the VM's saved state goes back in.
    let platform = vm.set_up_platform(&mem)?;

    let exit = Arc::new(ExitSignal::new().map_err(|e| BuildError::Device {
        name: "exit eventfd",
        source: Box::new(e),
    })?);
    let mut event_loop = EventLoop::new().map_err(BuildError::EventLoop)?;
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let mut mmio_devices = MmioDeviceManager::new();
    let devices = &state.devices;
    let console = attach_serial(&vm, &mut io_bus, &restore.serial, Some(&devices.serial))?;
    let legacy = Some((&devices.i8042, &devices.cmos));
    let (i8042, cmos) = attach_legacy_devices(&vm, &mut io_bus, exit.clone(), legacy)?;
    let control = Control::restore(exit.clone(), start, false, &devices.control);
    let control = attach_control_device(&mut io_bus, &mut mmio_bus, control)?;
    let mut virtio = VirtioAttach {
        vm: &vm,
        mem: &mem,
        mmio_bus: &mut mmio_bus,
        event_loop: &mut event_loop,
        manager: &mut mmio_devices,
    };
    let (disks, nets, vsocks, balloon) = restore_virtio_devices(&mut virtio, &devices.virtio)?;

    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for index in 0..vcpu_count {
        vcpus.push(Vcpu::new(
            &vm,
            index,
            io_bus.clone(),
            mmio_bus.clone(),
            exit.clone(),
            mem.clone(),
            cpu_profile,
        )?);
    }
    platform.wait()?;
    // Only now: KVM refuses the MSRs that point into guest memory (PV EOI, async page
    // faults) while no memory slot holds their address.
    for (vcpu, saved) in vcpus.iter_mut().zip(&state.vcpus) {
        vcpu.restore_state(saved)?;
    }
    // The interrupt controllers, PIT and clock: KVM_SET_CLOCK updates every vCPU's
    // kvmclock, so it goes after the vCPUs exist (none has run).
    vm.restore_state(&state.vm)?;
    // Only now, or the restored interrupt controllers would drop the interrupts.
    announce_resized_disks(&disks, &state.devices.virtio);
    for vsock in &vsocks {
        lock(vsock).repeat_reset_interrupt();
    }
    let vmgenid = restore_vmgenid(&vm, &mem, &devices.vmgenid)?;

    let mut vmm = Vmm::new(
        kvm,
        vm,
        mem,
        vcpus,
        exit,
        event_loop,
        console,
        control,
        cpu_profile,
        mmio_devices,
        RuntimeDevices {
            i8042,
            disks,
            nets,
            balloon,
            cmos,
            vmgenid,
        },
    );
    if !restore.resume {
        vmm.start_paused(state.vm.clock);
    }
    Ok(vmm)
}

/// A new VM generation ID in place of the saved one, announced to the guest with the
/// saved GED interrupt: every VM restored from one snapshot gets an ID of its own, and the
/// guest reseeds its RNG. Goes after the interrupt controllers are restored (the edge is
/// latched in the IOAPIC's saved routing) and before any vCPU runs (none may see the old ID
/// after the restore).
fn restore_vmgenid(
    vm: &Vm,
    mem: &GuestMemory,
    state: &VmGenIdState,
) -> Result<VmGenId, BuildError> {
    check_vmgenid_irq(state)?;
    let vmgenid = VmGenId::restore(mem, state)?;
    vmgenid.notify(vm)?;
    log::info!(
        "VM generation ID at {:#x} renewed, GED IRQ {} raised",
        state.address,
        state.irq
    );
    Ok(vmgenid)
}

/// KVM answers KVM_IRQ_LINE for a GSI it has no route for with success, so a saved
/// interrupt that is no IOAPIC pin would leave the guest unaware of its new ID.
fn check_vmgenid_irq(state: &VmGenIdState) -> Result<(), SnapshotError> {
    if state.irq >= layout::IOAPIC_NUM_PINS {
        return Err(SnapshotError::Inconsistent(format!(
            "its VM generation ID interrupt is GSI {}, not an IOAPIC pin",
            state.irq
        )));
    }
    Ok(())
}

/// Loads an ELF vmlinux (PVH entry preferred when the image has one) or a bzImage.
fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BuildError> {
    let fail = |source| BuildError::Kernel {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(|e| fail(KernelError::Read(e)))?;
    let mut head = [0u8; 0x210];
    let head_len = read_prefix(&mut file, &mut head).map_err(|e| fail(KernelError::Read(e)))?;
    let head = &head[..head_len];
    let highmem = Some(GuestAddress(layout::HIMEM_START));

    if head.starts_with(b"\x7fELF") {
        check_elf_identity(head).map_err(fail)?;
        let loaded =
            Elf::load(mem, None, &mut file, highmem).map_err(|e| fail(KernelError::Elf(e)))?;
        let boot = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => BootEntry {
                entry,
                protocol: BootProtocol::Pvh,
            },
            _ => BootEntry {
                entry: loaded.kernel_load,
                protocol: BootProtocol::Linux64,
            },
        };
        log::info!(
            "kernel: ELF, {:?} entry {:#x}, ends at {:#x}",
            boot.protocol,
            boot.entry.0,
            loaded.kernel_end
        );
        return Ok(LoadedKernel {
            boot,
            end: GuestAddress(loaded.kernel_end),
            setup_header: None,
        });
    }

    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        let loaded = BzImage::load(mem, None, &mut file, highmem)
            .map_err(|e| fail(KernelError::BzImage(e)))?;
        let entry = GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
        log::info!(
            "kernel: bzImage, 64-bit entry {:#x}, ends at {:#x}",
            entry.0,
            loaded.kernel_end
        );
        return Ok(LoadedKernel {
            boot: BootEntry {
                entry,
                protocol: BootProtocol::Linux64,
            },
            end: GuestAddress(loaded.kernel_end),
            setup_header: loaded.setup_header,
        });
    }

    Err(fail(KernelError::UnknownFormat))
}

/// Reads as much of the file's start as there is, up to `buf.len()`.
fn read_prefix(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(filled)
}

/// linux-loader checks the ELF magic and layout but not the class and machine.
fn check_elf_identity(head: &[u8]) -> Result<(), KernelError> {
    // e_ident[EI_CLASS] is byte 4, e_machine the u16 at 18.
    if head.len() < 20 {
        return Err(KernelError::Elf(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::ReadElfHeader,
        )));
    }
    if head[4] != ELFCLASS64 {
        return Err(KernelError::ElfClass);
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if machine != EM_X86_64 {
        return Err(KernelError::ElfMachine(machine));
    }
    Ok(())
}

/// Copies the initrd high into low RAM, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdRegion, BuildError> {
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| BuildError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(|e| fail(Box::new(e)))?;
    let size = file.metadata().map_err(|e| fail(Box::new(e)))?.len() as usize;
    let max_address = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(layout::INITRD_ADDR_MAX_DEFAULT);
    let address = arch::boot::initrd_load_address(mem, kernel.end, size, max_address)
        .map_err(|e| fail(Box::new(e)))?;
    mem.read_exact_volatile_from(address, &mut file, size)
        .map_err(|e| fail(Box::new(e)))?;
    log::info!("initrd: {size} bytes at {:#x}", address.0);
    Ok(InitrdRegion { address, size })
}

/// Writes the command line; returns its size including the NUL.
fn load_kernel_cmdline(
    mem: &GuestMemory,
    config: &VmConfig,
    kernel: &LoadedKernel,
    mmio_devices: &MmioDeviceManager,
) -> Result<usize, BuildError> {
    let mut cmdline = config.kernel_cmdline()?;
    mmio_devices
        .add_to_cmdline(&mut cmdline)
        .map_err(BuildError::DeviceManager)?;
    let text = cmdline
        .as_cstring()
        .map_err(|e| ConfigError::CmdlineInvalid(e.to_string()))?;
    let size = text.as_bytes_with_nul().len();
    // A bzImage states its own limit (boot protocol 2.06+); it excludes the NUL.
    if let Some(header) = kernel.setup_header.filter(|h| h.version >= 0x0206) {
        let max = header.cmdline_size as usize;
        if max != 0 && size - 1 > max {
            return Err(BuildError::CmdlineTooLongForKernel { len: size - 1, max });
        }
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(BuildError::Cmdline)?;
    log::info!("kernel command line: {}", text.to_string_lossy());
    Ok(size)
}

fn insert(
    bus: &mut Bus,
    name: &'static str,
    device: SharedDevice,
    base: u64,
    len: u64,
) -> Result<(), BuildError> {
    bus.insert(device, base, len)
        .map_err(|source| BuildError::Bus { name, source })
}

/// COM1 on `serial`'s backend, its interrupt routed with an irqfd; in `state` when it
/// goes on from a snapshot.
fn attach_serial(
    vm: &Vm,
    io_bus: &mut Bus,
    serial: &SerialConfig,
    state: Option<&SerialState>,
) -> Result<ConsoleSetup, BuildError> {
    let device_err = |e: std::io::Error| BuildError::Device {
        name: "serial",
        source: Box::new(e),
    };
    let interrupt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(device_err)?;
    vm.register_irqfd(&interrupt, layout::SERIAL_IRQ)?;
    let space = Arc::new(InputSpace::new().map_err(device_err)?);

    let (out, input): (Box<dyn std::io::Write + Send>, Option<InputSource>) = match serial {
        SerialConfig::Stdio => (
            Box::new(StdoutSink),
            Some(InputSource::Stdin {
                // SAFETY: isatty only inspects the descriptor.
                interactive: unsafe { libc::isatty(libc::STDIN_FILENO) } == 1,
            }),
        ),
        SerialConfig::None => (Box::new(std::io::sink()), None),
        SerialConfig::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| BuildError::Device {
                    name: "serial",
                    source: format!("cannot open \"{}\": {e}", path.display()).into(),
                })?;
            (Box::new(file), None)
        }
        SerialConfig::Unix(path) => {
            // A stale socket from an earlier run is replaced; another VM's live console,
            // or any other file, is not.
            let listener = crate::uds::listen_fresh(path).map_err(|e| BuildError::Device {
                name: "serial",
                source: Box::new(e),
            })?;
            let sink = SocketSink::default();
            (
                Box::new(sink.clone()),
                Some(InputSource::Socket {
                    listener,
                    client: None,
                    sink,
                }),
            )
        }
    };
    let socket_path = match serial {
        SerialConfig::Unix(path) => Some(path.clone()),
        _ => None,
    };
    let device = match state {
        Some(state) => {
            SerialDevice::restore(state, interrupt, space.clone(), out).map_err(|e| {
                BuildError::Device {
                    name: "serial",
                    source: Box::new(e),
                }
            })?
        }
        None => SerialDevice::new(interrupt, space.clone(), out),
    };
    let serial = Arc::new(Mutex::new(device));
    insert(
        io_bus,
        "serial",
        serial.clone(),
        layout::SERIAL_PORT_BASE,
        layout::SERIAL_PORT_SIZE,
    )?;
    Ok(ConsoleSetup {
        serial,
        space,
        input,
        socket_path,
    })
}

/// What attaching a virtio device touches.
struct VirtioAttach<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemory,
    mmio_bus: &'a mut Bus,
    event_loop: &'a mut EventLoop,
    manager: &'a mut MmioDeviceManager,
}

impl VirtioAttach<'_> {
    fn attach(&mut self, name: &str, device: impl Into<VirtioHandle>) -> Result<(), BuildError> {
        self.manager
            .attach_virtio(
                name,
                device.into(),
                self.vm,
                self.mem,
                self.mmio_bus,
                self.event_loop,
            )
            .map(|_| ())
            .map_err(BuildError::DeviceManager)
    }
}

/// One virtio-blk device per `--disk`, in order (the guest sees vda, vdb, ...).
fn attach_disks(
    virtio: &mut VirtioAttach,
    config: &VmConfig,
) -> Result<Vec<Arc<Mutex<Block>>>, BuildError> {
    let mut disks = Vec::with_capacity(config.disks.len());
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(disk).map_err(|e| BuildError::Device {
            name: "virtio-blk",
            source: Box::new(e),
        })?;
        let name = format!("disk{index}");
        METRICS.register_block(disk.id.as_deref().unwrap_or(&name), block.metrics());
        let block = Arc::new(Mutex::new(block));
        virtio.attach(&name, VirtioHandle::Block(block.clone()))?;
        disks.push(block);
    }
    Ok(disks)
}

/// One virtio-net device per `--net`, in order (eth0, eth1, ...).
fn attach_nets(
    virtio: &mut VirtioAttach,
    config: &VmConfig,
) -> Result<Vec<Arc<Mutex<Net>>>, BuildError> {
    let mut nets = Vec::with_capacity(config.nets.len());
    for (index, net) in config.nets.iter().enumerate() {
        let device = Net::new(net).map_err(|e| BuildError::Device {
            name: "virtio-net",
            source: Box::new(e),
        })?;
        let name = format!("net{index}");
        METRICS.register_net(&name, device.metrics());
        let device = Arc::new(Mutex::new(device));
        virtio.attach(&name, VirtioHandle::Net(device.clone()))?;
        nets.push(device);
    }
    Ok(nets)
}

/// The virtio-vsock device, when `--vsock` is given.
fn attach_vsock(virtio: &mut VirtioAttach, config: &VmConfig) -> Result<(), BuildError> {
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock).map_err(|e| BuildError::Device {
            name: "virtio-vsock",
            source: Box::new(e),
        })?;
        METRICS.register_vsock(device.metrics());
        virtio.attach("vsock0", device)?;
    }
    Ok(())
}

/// The virtio-rng entropy device, when `--rng` is given.
fn attach_rng(virtio: &mut VirtioAttach, config: &VmConfig) -> Result<(), BuildError> {
    if let Some(rng) = &config.rng {
        let device = Rng::new(rng).map_err(|e| BuildError::Device {
            name: "virtio-rng",
            source: Box::new(e),
        })?;
        METRICS.register_rng(device.metrics());
        virtio.attach("rng0", device)?;
    }
    Ok(())
}

/// The virtio-fs devices, `fs0`, `fs1`, ..., each connected to its back end now: one that
/// is not listening fails the build.
fn attach_fs(virtio: &mut VirtioAttach, config: &VmConfig) -> Result<(), BuildError> {
    for (index, fs) in config.fs.iter().enumerate() {
        let device = Fs::new(fs).map_err(|e| BuildError::Device {
            name: "virtio-fs",
            source: Box::new(e),
        })?;
        virtio.attach(&format!("fs{index}"), device)?;
    }
    Ok(())
}

/// The virtio-balloon, when `--balloon` is given. It goes after every other device, so
/// adding it moves none of theirs.
fn attach_balloon(
    virtio: &mut VirtioAttach,
    config: &VmConfig,
) -> Result<Option<Arc<Mutex<Balloon>>>, BuildError> {
    let Some(balloon) = &config.balloon else {
        return Ok(None);
    };
    let device = Balloon::new(balloon).map_err(|e| BuildError::Device {
        name: "virtio-balloon",
        source: Box::new(e),
    })?;
    METRICS.register_balloon(device.metrics());
    let device = Arc::new(Mutex::new(device));
    virtio.attach("balloon0", VirtioHandle::Balloon(device.clone()))?;
    Ok(Some(device))
}

/// Every saved virtio device, back in its window and IRQ, in the order it was saved.
/// Returns the disks, the NICs and the vsock devices, each in that order, and the
/// balloon.
#[allow(clippy::type_complexity)]
fn restore_virtio_devices(
    virtio: &mut VirtioAttach,
    saved: &[AttachedDeviceState],
) -> Result<
    (
        Vec<Arc<Mutex<Block>>>,
        Vec<Arc<Mutex<Net>>>,
        Vec<Arc<Mutex<Vsock>>>,
        Option<Arc<Mutex<Balloon>>>,
    ),
    BuildError,
> {
    let mut balloon = None;
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut vsocks = Vec::new();
    for state in saved {
        let device = virtio
            .manager
            .restore_virtio(
                state,
                virtio.vm,
                virtio.mem,
                virtio.mmio_bus,
                virtio.event_loop,
            )
            .map_err(BuildError::DeviceManager)?;
        match (&device, &state.device) {
            (VirtioHandle::Block(block), VirtioDeviceState::Block(saved)) => {
                let id = saved.config.id.as_deref().unwrap_or(&state.name);
                METRICS.register_block(id, lock(block).metrics());
            }
            (VirtioHandle::Net(net), _) => METRICS.register_net(&state.name, lock(net).metrics()),
            (VirtioHandle::Vsock(vsock), _) => METRICS.register_vsock(lock(vsock).metrics()),
            (VirtioHandle::Rng(rng), _) => METRICS.register_rng(lock(rng).metrics()),
            (VirtioHandle::Balloon(device), _) => METRICS.register_balloon(lock(device).metrics()),
            _ => {}
        }
        match device {
            VirtioHandle::Block(block) => disks.push(block),
            VirtioHandle::Net(net) => nets.push(net),
            VirtioHandle::Vsock(vsock) => vsocks.push(vsock),
            VirtioHandle::Balloon(device) => balloon = Some(device),
            _ => {}
        }
    }
    Ok((disks, nets, vsocks, balloon))
}

/// Disks restored on an image of another size than the saved one (a template's empty
/// placeholder replaced by a container's image): their drivers must re-read the capacity.
fn announce_resized_disks(disks: &[Arc<Mutex<Block>>], saved: &[AttachedDeviceState]) {
    let saved = saved.iter().filter_map(|attached| match &attached.device {
        VirtioDeviceState::Block(block) => Some(block.capacity),
        _ => None,
    });
    for (disk, saved_capacity) in disks.iter().zip(saved) {
        let disk = lock(disk);
        if disk.capacity() != saved_capacity {
            disk.announce_config_change();
        }
    }
}

/// The i8042 (keyboard on IRQ 1, reset), the CMOS clock and the ACPI sleep registers
/// (power-off), fresh or in their saved states. Returns the i8042, which the API types
/// Ctrl+Alt+Del into, and the CMOS.
#[allow(clippy::type_complexity)]
fn attach_legacy_devices(
    vm: &Vm,
    io_bus: &mut Bus,
    exit: Arc<ExitSignal>,
    state: Option<(&I8042State, &CmosState)>,
) -> Result<(Arc<Mutex<I8042>>, Arc<Mutex<Cmos>>), BuildError> {
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
        BuildError::Device {
            name: "i8042",
            source: Box::new(e),
        }
    })?;
    vm.register_irqfd(&irq, layout::I8042_KEYBOARD_IRQ)?;
    let device_err = |name, source: Box<dyn std::error::Error + Send + Sync>| BuildError::Device {
        name,
        source,
    };
    let (i8042, cmos) = match state {
        Some((i8042, cmos)) => (
            I8042::restore(exit.clone(), Some(irq), i8042)
                .map_err(|e| device_err("i8042", Box::new(e)))?,
            Cmos::restore(cmos).map_err(|e| device_err("cmos", Box::new(e)))?,
        ),
        None => (I8042::new(exit.clone(), Some(irq)), Cmos::new()),
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    let cmos = Arc::new(Mutex::new(cmos));
    let ports = layout::I8042_COMMAND_PORT - layout::I8042_DATA_PORT + 1;
    insert(
        io_bus,
        "i8042",
        i8042.clone(),
        layout::I8042_DATA_PORT,
        ports,
    )?;
    insert(
        io_bus,
        "cmos",
        cmos.clone(),
        layout::CMOS_PORT_BASE,
        layout::CMOS_PORT_SIZE,
    )?;
    insert(
        io_bus,
        "acpi sleep registers",
        Arc::new(Mutex::new(AcpiSleep::new(exit))),
        layout::ACPI_SLEEP_CONTROL_PORT,
        layout::ACPI_SLEEP_STATUS_PORT - layout::ACPI_SLEEP_CONTROL_PORT + 1,
    )?;
    Ok((i8042, cmos))
}

/// The control page and its two port forms.
fn attach_control_device(
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    control: Control,
) -> Result<Arc<Control>, BuildError> {
    let control = Arc::new(control);
    insert(
        mmio_bus,
        "control page",
        Arc::new(Mutex::new(ControlPage(control.clone()))),
        layout::CONTROL_PAGE_START,
        layout::CONTROL_PAGE_SIZE,
    )?;
    insert(
        io_bus,
        "boot-complete port",
        Arc::new(Mutex::new(BootCompletePort(control.clone()))),
        layout::BOOT_COMPLETE_PORT,
        1,
    )?;
    insert(
        io_bus,
        "exit port",
        Arc::new(Mutex::new(ExitPort(control.clone()))),
        layout::EXIT_PORT,
        1,
    )?;
    Ok(control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_vmgenid_irq_must_be_an_ioapic_pin() {
        let state = |irq| VmGenIdState {
            address: layout::VMGENID_START,
            irq,
        };
        assert!(check_vmgenid_irq(&state(layout::GED_IRQ)).is_ok());
        let err = check_vmgenid_irq(&state(layout::IOAPIC_NUM_PINS)).unwrap_err();
        assert!(
            err.to_string()
                .contains("VM generation ID interrupt is GSI 24"),
            "{err}"
        );
    }

    #[test]
    fn elf_identity_checks() {
        let mut head = [0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = ELFCLASS64;
        head[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        assert!(check_elf_identity(&head).is_ok());
        head[18] = 0xb7;
        assert!(matches!(
            check_elf_identity(&head),
            Err(KernelError::ElfMachine(0xb7))
        ));
        head[4] = 1;
        assert!(matches!(
            check_elf_identity(&head),
            Err(KernelError::ElfClass)
        ));
        assert!(check_elf_identity(&head[..10]).is_err());
    }
}
