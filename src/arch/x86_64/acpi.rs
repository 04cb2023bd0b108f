//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and a DSDT describing
//! the serial port, the virtio-mmio windows, the VM generation ID with the Generic Event
//! Device that announces its changes, and the S5 (power-off) sleep state.
//!
//! Hardware-reduced ACPI has no PM1 blocks, GPEs or SCI: the guest powers off through the
//! FADT sleep control register alone, finds every device through the DSDT, and hears of
//! platform events through a Generic Event Device (GED) interrupt. That also
//! means Linux runs without a legacy PIC (`nr_legacy_irqs() == 0`) and maps no ISA IRQ on its
//! own: an interrupt works only if some table names it, which is why COM1 is in the DSDT.

use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_TABLES_END, ACPI_TABLES_START,
    APIC_START, GED_IRQ, IOAPIC_START, RSDP_START, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_SIZE,
    VMGENID_START,
};

/// A virtio-mmio window to announce in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Errors from building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    #[error("{0} CPUs are more than the MADT can describe (254)")]
    TooManyCpus(u8),
    #[error("{0} virtio-mmio devices are more than the DSDT can name ({MAX_DEVICES})")]
    TooManyDevices(usize),
    #[error("virtio-mmio window {base:#x}+{size:#x} is not below 4 GiB")]
    DeviceAbove4G { base: u64, size: u64 },
    #[error("the ACPI tables end at {end:#x}, past {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write the ACPI tables")]
    Write(#[source] GuestMemoryError),
}

const OEM_ID: [u8; 6] = *b"HEARTH";
const OEM_TABLE_ID: [u8; 8] = *b"HEARTHVM";
const OEM_REVISION: u32 = 1;

/// Device names are "V" and three decimal digits.
const MAX_DEVICES: usize = 1000;
/// APIC ids are 8 bits and 0xff is the broadcast id.
const MAX_CPUS: u8 = 254;

/// The sleep type the DSDT's `_S5_` names; the guest writes `SLP_TYP << 2 | SLP_EN` (0x34)
/// to the sleep control register to power off.
const S5_SLEEP_TYPE: u8 = 5;

/// FADT IA-PC boot architecture flags: no VGA (skip probing legacy video) and no MSI (there
/// is no PCI). The 8042 flag stays clear, so Linux does not probe a PS/2 controller; the
/// i8042 reset port still works for `reboot=k`.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// MADT structure types and flags.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags 0: polarity and trigger conform to the bus (edge, active high for ISA).
const MPS_INTI_CONFORMING: u16 = 0;
const MADT_HEADER_SIZE: u32 = 44;
const MADT_REVISION: u8 = 5;
/// KVM's in-kernel IOAPIC resets its ID register to 0.
const IOAPIC_ID: u8 = 0;
/// The PIT's ISA IRQ 0 is wired to GSI 2, as on PC chipsets (and QEMU).
const TIMER_ISA_IRQ: u8 = 0;
const TIMER_GSI: u32 = 2;
/// MADT "all processors" ACPI processor UID for the LINT1 NMI entry.
const ALL_PROCESSORS: u8 = 0xff;

/// The VM generation ID device's own hardware ID; guests bind it by its compatible ID, the
/// name Microsoft's VM generation ID specification gives (Linux's vmgenid driver matches
/// `VM_GEN_COUNTER`).
const VMGENID_HID: &str = "HRTHVGID";
const VMGENID_CID: &str = "VM_GEN_COUNTER";
/// ACPI Notify value that tells the VM generation ID device its ID changed.
const VMGENID_CHANGED: u8 = 0x80;

const DSDT_REVISION: u8 = 2; // 64-bit AML integers
const TABLE_ALIGNMENT: u64 = 8;

const _: () = assert!(RSDP_START + 36 <= ACPI_TABLES_START);

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// COM1, so the guest's 8250 PNP driver gets IRQ 4 mapped through the IOAPIC.
fn serial_device() -> Vec<u8> {
    let port = SERIAL_PORT_BASE as u16;
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &0u8);
    let io = IO::new(port, port, 1, SERIAL_PORT_SIZE as u8);
    let irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq]));
    aml_bytes(&Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// One virtio-mmio window: the device Linux's virtio_mmio driver binds by `LNRO0005`.
fn virtio_device(uid: usize, device: &AcpiMmioDevice) -> Result<Vec<u8>, AcpiError> {
    let above_4g = || AcpiError::DeviceAbove4G {
        base: device.base,
        size: device.size,
    };
    let base = u32::try_from(device.base).map_err(|_| above_4g())?;
    let size = u32::try_from(device.size).map_err(|_| above_4g())?;
    if base.checked_add(size).is_none() {
        return Err(above_4g());
    }
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid_name = Name::new("_UID".into(), &(uid as u32));
    let window = Memory32Fixed::new(true, base, size);
    // Edge-triggered, active high: what the VMM's irqfd delivers into the in-kernel IOAPIC.
    let irq = Interrupt::new(true, true, false, false, device.irq);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&window, &irq]));
    let path = Path::new(&format!("V{uid:03}"));
    Ok(aml_bytes(&Device::new(path, vec![&hid, &uid_name, &crs])))
}

/// `VGEN`, the VM generation ID: its `ADDR` package holds the low and high 32 bits of the
/// ID's guest-physical address. `GED_`, a Generic Event Device whose one edge-triggered
/// interrupt runs `_EVT` (with the GSI as Arg0), which tells `VGEN` its ID changed; the
/// VMM raises that interrupt after it wrote a new ID.
fn vmgenid_devices() -> Vec<u8> {
    let low = VMGENID_START as u32;
    let high = (VMGENID_START >> 32) as u32;
    let hid = Name::new("_HID".into(), &VMGENID_HID);
    let cid = Name::new("_CID".into(), &VMGENID_CID);
    let ddn = Name::new("_DDN".into(), &VMGENID_CID);
    let addr = Name::new("ADDR".into(), &Package::new(vec![&low, &high]));
    let mut bytes = aml_bytes(&Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]));

    let ged_hid = Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = Name::new("_UID".into(), &0u8);
    let irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
    let vgen = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&vgen, &VMGENID_CHANGED);
    let is_ged_irq = Equal::new(&Arg(0), &GED_IRQ);
    let on_ged_irq = If::new(&is_ged_irq, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&on_ged_irq]);
    bytes.extend(aml_bytes(&Device::new(
        "GED_".into(),
        vec![&ged_hid, &ged_uid, &crs, &evt],
    )));
    bytes
}

fn dsdt(devices: &[AcpiMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > MAX_DEVICES {
        return Err(AcpiError::TooManyDevices(devices.len()));
    }
    let mut body = aml_bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE]),
    ));
    let mut system_bus = serial_device();
    for (uid, device) in devices.iter().enumerate() {
        system_bus.extend(virtio_device(uid, device)?);
    }
    system_bus.extend(vmgenid_devices());
    body.extend(Scope::raw("\\_SB_".into(), system_bus));

    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(&body);
    Ok(table.as_slice().to_vec())
}

fn fadt(dsdt_address: u64) -> Vec<u8> {
    let sleep_register =
        |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature buttons on a hardware-reduced platform.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED).into();
    fadt.sleep_control_reg = sleep_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = sleep_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(OEM_TABLE_ID).into();
    aml_bytes(&fadt.finalize())
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"APIC",
        MADT_HEADER_SIZE,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.write_u32(36, APIC_START as u32);
    // Flags: no PCAT_COMPAT; the guest is not to use the 8259s.
    table.write_u32(40, 0);

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        // ACPI processor UID and APIC id are both the vCPU index.
        entries.extend_from_slice(&[MADT_LOCAL_APIC, 8, cpu, cpu]);
        entries.extend_from_slice(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
    }
    entries.extend_from_slice(&[MADT_IO_APIC, 12, IOAPIC_ID, 0]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    entries.extend_from_slice(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, TIMER_ISA_IRQ]);
    entries.extend_from_slice(&TIMER_GSI.to_le_bytes());
    entries.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    entries.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entries.push(1); // LINT1
    table.append_slice(&entries);
    table.as_slice().to_vec()
}

/// The tables and where each goes.
struct AcpiTables {
    rsdp: Vec<u8>,
    tables: Vec<(u64, Vec<u8>)>,
}

fn align_up(address: u64) -> u64 {
    address.next_multiple_of(TABLE_ALIGNMENT)
}

/// Lays the tables out from `start`, each 8-byte aligned, failing if they pass `limit`.
fn build_tables(
    num_cpus: u8,
    devices: &[AcpiMmioDevice],
    start: u64,
    limit: u64,
) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let mut tables = Vec::new();
    let mut next = start;
    let mut place = |bytes: Vec<u8>| {
        let address = next;
        next = align_up(address + bytes.len() as u64);
        tables.push((address, bytes));
        address
    };
    let dsdt_address = place(dsdt(devices)?);
    let fadt_address = place(fadt(dsdt_address));
    let madt_address = place(madt(num_cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let xsdt_address = place(aml_bytes(&xsdt));

    let end = tables
        .iter()
        .map(|(address, bytes)| address + bytes.len() as u64)
        .max()
        .unwrap_or(start);
    if end > limit {
        return Err(AcpiError::TooLarge { end, limit });
    }
    Ok(AcpiTables {
        rsdp: aml_bytes(&Rsdp::new(OEM_ID, xsdt_address)),
        tables,
    })
}

/// Writes the RSDP at `RSDP_START` and the XSDT, FADT, MADT (one enabled local APIC per vCPU,
/// the IOAPIC, ISA IRQ 0 → GSI 2) and DSDT (`_S5_`, COM1, one `LNRO0005` device per
/// virtio-mmio window, the VM generation ID and its GED) between `ACPI_TABLES_START` and `ACPI_TABLES_END`. Returns the RSDP
/// address for the boot protocol structures.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    devices: &[AcpiMmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let layout = build_tables(num_cpus, devices, ACPI_TABLES_START, ACPI_TABLES_END)?;
    for (address, bytes) in &layout.tables {
        mem.write_slice(bytes, GuestAddress(*address))
            .map_err(AcpiError::Write)?;
    }
    mem.write_slice(&layout.rsdp, GuestAddress(RSDP_START))
        .map_err(AcpiError::Write)?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW_SIZE};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    fn read_table(mem: &GuestMemoryMmap, address: u64) -> Vec<u8> {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(address)).unwrap();
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(address)).unwrap();
        table
    }

    fn devices(n: u64) -> Vec<AcpiMmioDevice> {
        (0..n)
            .map(|i| AcpiMmioDevice {
                base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_WINDOW_SIZE,
                size: VIRTIO_MMIO_WINDOW_SIZE,
                irq: 5 + i as u32,
            })
            .collect()
    }

    /// Writes the tables and returns them by signature, checking every checksum on the way.
    fn written_tables(num_cpus: u8, devs: &[AcpiMmioDevice]) -> Vec<([u8; 4], Vec<u8>)> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_address = create_acpi_tables(&mem, num_cpus, devs).unwrap();
        assert_eq!(rsdp_address.0, RSDP_START);

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_address).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");

        let mut addresses = vec![u64_at(&rsdp, 24)];
        let xsdt = read_table(&mem, addresses[0]);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut tables = vec![(*b"XSDT", xsdt.clone())];
        for at in (36..xsdt.len()).step_by(8) {
            addresses.push(u64_at(&xsdt, at));
            let table = read_table(&mem, u64_at(&xsdt, at));
            if &table[..4] == b"FACP" {
                addresses.push(u64_at(&table, 140));
                let dsdt = read_table(&mem, u64_at(&table, 140));
                tables.push((*b"DSDT", dsdt));
            }
            tables.push((table[..4].try_into().unwrap(), table));
        }
        for (signature, table) in &tables {
            assert_eq!(
                sum(table),
                0,
                "{} checksum",
                String::from_utf8_lossy(signature)
            );
        }
        for (address, (_, table)) in addresses.iter().zip(&tables) {
            assert!(*address >= ACPI_TABLES_START);
            assert!(address + table.len() as u64 <= ACPI_TABLES_END);
        }
        tables
    }

    fn table<'a>(tables: &'a [([u8; 4], Vec<u8>)], signature: &[u8; 4]) -> &'a [u8] {
        &tables.iter().find(|t| &t.0 == signature).unwrap().1
    }

    #[test]
    fn all_tables_present_with_valid_checksums() {
        let tables = written_tables(2, &devices(3));
        let mut signatures: Vec<[u8; 4]> = tables.iter().map(|t| t.0).collect();
        signatures.sort();
        assert_eq!(signatures, vec![*b"APIC", *b"DSDT", *b"FACP", *b"XSDT"]);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_cpu_and_the_ioapic() {
        for num_cpus in [1, 4, 254] {
            let tables = written_tables(num_cpus, &[]);
            let madt = table(&tables, b"APIC");
            assert_eq!(u64::from(u32_at(madt, 36)), APIC_START);
            let mut at = 44;
            let mut lapics = Vec::new();
            let mut ioapic = None;
            let mut overrides = Vec::new();
            while at < madt.len() {
                let (kind, len) = (madt[at], usize::from(madt[at + 1]));
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(u32_at(madt, at + 4), 1, "enabled");
                        lapics.push(madt[at + 3]);
                    }
                    MADT_IO_APIC => {
                        ioapic = Some((u32_at(madt, at + 4), u32_at(madt, at + 8)));
                    }
                    MADT_INTERRUPT_SOURCE_OVERRIDE => {
                        overrides.push((madt[at + 3], u32_at(madt, at + 4)));
                    }
                    _ => {}
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            assert_eq!(lapics, (0..num_cpus).collect::<Vec<u8>>());
            assert_eq!(ioapic, Some((IOAPIC_START as u32, 0)));
            assert_eq!(overrides, vec![(0, 2)]);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_registers() {
        let tables = written_tables(1, &[]);
        let fadt = table(&tables, b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc & 0x2, 0, "no 8042");
        assert_ne!(iapc & 0x4, 0, "no VGA");
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256: System I/O, 8 bits, byte access.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 248), ACPI_SLEEP_CONTROL_PORT);
        assert_eq!(&fadt[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 260), ACPI_SLEEP_STATUS_PORT);
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
        assert_ne!(u64_at(fadt, 140), 0, "X_DSDT");
    }

    #[test]
    fn dsdt_names_s5_serial_and_every_virtio_window() {
        let devs = devices(3);
        let tables = written_tables(1, &devs);
        let dsdt = table(&tables, b"DSDT");
        assert_eq!(count(dsdt, b"LNRO0005"), 3);
        assert_eq!(count(dsdt, b"_S5_"), 1);
        // Package(1) { BytePrefix 5 }
        assert_eq!(count(dsdt, &[0x12, 0x04, 0x01, 0x0a, 0x05]), 1);
        assert_eq!(count(dsdt, b"COM1"), 1);
        for name in [b"V000", b"V001", b"V002"] {
            assert_eq!(count(dsdt, name), 1);
        }
        for dev in &devs {
            // Memory32Fixed descriptor: tag 0x86, length 9, read-write, base, size.
            let mut descriptor = vec![0x86, 0x09, 0x00, 0x01];
            descriptor.extend_from_slice(&(dev.base as u32).to_le_bytes());
            descriptor.extend_from_slice(&(dev.size as u32).to_le_bytes());
            assert_eq!(count(dsdt, &descriptor), 1);
            // Extended interrupt: consumer, edge, active high, exclusive; one interrupt.
            let mut interrupt = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            interrupt.extend_from_slice(&dev.irq.to_le_bytes());
            assert_eq!(count(dsdt, &interrupt), 1);
        }
        let mut serial_irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        serial_irq.extend_from_slice(&SERIAL_IRQ.to_le_bytes());
        assert_eq!(count(dsdt, &serial_irq), 1);
    }

    #[test]
    fn dsdt_names_the_vm_generation_id_and_its_ged() {
        let tables = written_tables(1, &devices(2));
        let dsdt = table(&tables, b"DSDT");
        // The device, and the path `_EVT` notifies.
        assert_eq!(count(dsdt, b"VGEN"), 2);
        assert_eq!(count(dsdt, b"HRTHVGID"), 1);
        // _CID and _DDN.
        assert_eq!(count(dsdt, b"VM_GEN_COUNTER\0"), 2);
        // Name(ADDR, Package(2) { DWordPrefix low, Zero }).
        let mut addr = b"ADDR".to_vec();
        addr.extend_from_slice(&[0x12, 0x08, 0x02, 0x0c]);
        addr.extend_from_slice(&(VMGENID_START as u32).to_le_bytes());
        addr.push(0x00);
        assert_eq!(count(dsdt, &addr), 1);

        assert_eq!(count(dsdt, b"GED_"), 1);
        assert_eq!(count(dsdt, b"ACPI0013\0"), 1);
        let mut ged_irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        ged_irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        assert_eq!(count(dsdt, &ged_irq), 1);
        // Method(_EVT, 1, Serialized) { If (LEqual(Arg0, GED_IRQ)) {
        //     Notify(\_SB_.VGEN, 0x80) } }
        assert_eq!(count(dsdt, b"_EVT\x09\xa0"), 1);
        assert_eq!(count(dsdt, &[0x93, 0x68, 0x0a, GED_IRQ as u8]), 1);
        let mut notify = b"\x86\\\x2e_SB_VGEN".to_vec();
        notify.extend_from_slice(&[0x0a, VMGENID_CHANGED]);
        assert_eq!(count(dsdt, &notify), 1);
    }

    #[test]
    fn invalid_inputs() {
        assert!(matches!(
            build_tables(0, &[], 0, u64::MAX),
            Err(AcpiError::NoCpus)
        ));
        assert!(matches!(
            build_tables(255, &[], 0, u64::MAX),
            Err(AcpiError::TooManyCpus(255))
        ));
        let high = AcpiMmioDevice {
            base: 0x1_0000_0000,
            size: 0x1000,
            irq: 5,
        };
        assert!(matches!(
            build_tables(1, &[high], 0, u64::MAX),
            Err(AcpiError::DeviceAbove4G { .. })
        ));
        let straddling = AcpiMmioDevice {
            base: 0xffff_f000,
            size: 0x2000,
            irq: 5,
        };
        assert!(build_tables(1, &[straddling], 0, u64::MAX).is_err());
        assert!(matches!(
            build_tables(1, &devices(1001), 0, u64::MAX),
            Err(AcpiError::TooManyDevices(1001))
        ));
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error() {
        let start = ACPI_TABLES_START;
        let fits = build_tables(4, &devices(16), start, ACPI_TABLES_END).unwrap();
        let (address, bytes) = fits.tables.last().unwrap();
        let end = address + bytes.len() as u64;
        assert!(build_tables(4, &devices(16), start, end).is_ok());
        assert!(matches!(
            build_tables(4, &devices(16), start, end - 1),
            Err(AcpiError::TooLarge { .. })
        ));
    }
}
