//! The Intel MultiProcessor Specification 1.4 table: how kernels built with
//! CONFIG_X86_MPPARSE and without ACPI find the CPUs, the IOAPIC and the ISA interrupt
//! routing. The floating pointer sits at the start of the EBDA, where Linux scans for it, and
//! the configuration table follows it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_NUM_PINS, IOAPIC_START, MPTABLE_END, MPTABLE_START};

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    #[error("{0} CPUs are more than the MP table can describe (254)")]
    TooManyCpus(u8),
    #[error("the MP table ({size} bytes) does not fit below {end:#x}")]
    TooLarge { size: usize, end: u64 },
    #[error("cannot write the MP table")]
    Write(#[source] GuestMemoryError),
}

/// APIC ids are 8 bits, 0xff is the broadcast id, and the IOAPIC takes the id after the
/// last CPU's.
const MAX_CPUS: u8 = 254;

const SPEC_REVISION: u8 = 4; // MP spec 1.4
const APIC_VERSION: u8 = 0x14;
const CPU_FLAG_ENABLED: u8 = 1 << 0;
const CPU_FLAG_BOOT_PROCESSOR: u8 = 1 << 1;
/// Family 6, model 0, stepping 0: any P6-or-later signature will do for the kernel.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1 EDX feature flags: FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_FLAG_ENABLED: u8 = 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus": edge, active high on ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

const OEM_ID: &[u8; 8] = b"HEARTH  ";
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

/// Value that makes `bytes` sum to zero (mod 256) once stored in the checksum byte.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

fn mp_table_size(num_cpus: u8) -> usize {
    FLOATING_POINTER_SIZE
        + CONFIG_HEADER_SIZE
        + PROCESSOR_ENTRY_SIZE * usize::from(num_cpus)
        + SMALL_ENTRY_SIZE // bus
        + SMALL_ENTRY_SIZE // IOAPIC
        + SMALL_ENTRY_SIZE * IOAPIC_NUM_PINS as usize
        + SMALL_ENTRY_SIZE * 2 // LINT0, LINT1
}

/// The entries of the configuration table and how many there are.
fn config_entries(num_cpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count = 0u16;

    for cpu in 0..num_cpus {
        let mut flags = CPU_FLAG_ENABLED;
        if cpu == 0 {
            flags |= CPU_FLAG_BOOT_PROCESSOR;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, IOAPIC_FLAG_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;

    // ISA IRQ i arrives on IOAPIC pin i, matching KVM's default GSI routing.
    for irq in 0..IOAPIC_NUM_PINS as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }

    // The 8259 output on every CPU's LINT0, NMI on LINT1 (what setup_lint programs).
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LOCAL_APICS, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, dest, lint]);
        count += 1;
    }
    (entries, count)
}

/// Builds the floating pointer followed by the configuration table, both checksummed, for a
/// table placed at `base`.
fn build_mptable(num_cpus: u8, base: u64) -> Vec<u8> {
    let (entries, entry_count) = config_entries(num_cpus);
    let config_address = base + FLOATING_POINTER_SIZE as u64;

    let mut table = Vec::with_capacity(mp_table_size(num_cpus));
    // Floating pointer structure.
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_address as u32).to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REVISION, 0]); // length in 16-byte units, rev, checksum
    table.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    table[10] = checksum(&table[..FLOATING_POINTER_SIZE]);

    // Configuration table header.
    let config_start = table.len();
    let length = (CONFIG_HEADER_SIZE + entries.len()) as u16;
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // revision, checksum
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table, its checksum, reserved
    table.extend_from_slice(&entries);
    table[config_start + 7] = checksum(&table[config_start..]);
    table
}

/// Writes the MP floating pointer and configuration table at `MPTABLE_START` for `num_cpus`
/// CPUs (APIC ids 0..n), one ISA bus, the IOAPIC (id `num_cpus`) with ISA IRQ i on pin i,
/// ExtINT on LINT0 and NMI on LINT1.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let size = mp_table_size(num_cpus);
    if MPTABLE_START + size as u64 > MPTABLE_END {
        return Err(MptableError::TooLarge {
            size,
            end: MPTABLE_END,
        });
    }
    let table = build_mptable(num_cpus, MPTABLE_START);
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn read_table(mem: &GuestMemoryMmap, num_cpus: u8) -> Vec<u8> {
        let mut buf = vec![0u8; mp_table_size(num_cpus)];
        mem.read_slice(&mut buf, GuestAddress(MPTABLE_START))
            .unwrap();
        buf
    }

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn checksums_and_pointers() {
        let mem = guest_memory();
        setup_mptable(&mem, 4).unwrap();
        let table = read_table(&mem, 4);

        let floating = &table[..16];
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(floating), 0);
        let config_ptr = u32::from_le_bytes(floating[4..8].try_into().unwrap());
        assert_eq!(u64::from(config_ptr), MPTABLE_START + 16);

        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        let length = usize::from(u16::from_le_bytes([config[4], config[5]]));
        assert_eq!(length, config.len());
        assert_eq!(sum(&config[..length]), 0);
        let lapic = u32::from_le_bytes(config[36..40].try_into().unwrap());
        assert_eq!(u64::from(lapic), APIC_START);
    }

    #[test]
    fn cpu_and_interrupt_entries() {
        let mem = guest_memory();
        setup_mptable(&mem, 3).unwrap();
        let table = read_table(&mem, 3);
        let config = &table[16..];
        let entry_count = u16::from_le_bytes([config[34], config[35]]);
        assert_eq!(usize::from(entry_count), 3 + 1 + 1 + 24 + 2);

        let mut at = 44;
        let mut cpus = Vec::new();
        let mut io_interrupts = 0;
        let mut ioapic = None;
        while at < config.len() {
            let kind = config[at];
            match kind {
                ENTRY_PROCESSOR => {
                    cpus.push((config[at + 1], config[at + 3]));
                    at += PROCESSOR_ENTRY_SIZE;
                    continue;
                }
                ENTRY_IOAPIC => ioapic = Some((config[at + 1], &config[at + 4..at + 8])),
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(config[at + 5], config[at + 7], "IRQ i on pin i");
                    assert_eq!(config[at + 6], 3, "routed to the IOAPIC");
                    io_interrupts += 1;
                }
                _ => {}
            }
            at += SMALL_ENTRY_SIZE;
        }
        assert_eq!(at, config.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        assert_eq!(io_interrupts, 24);
        let (id, address) = ioapic.unwrap();
        assert_eq!(id, 3);
        assert_eq!(address, (IOAPIC_START as u32).to_le_bytes());
    }

    #[test]
    fn cpu_count_limits() {
        let mem = guest_memory();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        setup_mptable(&mem, 254).unwrap();
        let table = read_table(&mem, 254);
        assert_eq!(sum(&table[16..]), 0);
    }

    #[test]
    fn memory_too_small_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::Write(_))
        ));
    }
}
