//! Boot protocol structures: the Linux zero page (`boot_params`) with its e820 map, the PVH
//! `hvm_start_info` with its memory map and module list, and where the initrd goes.
//!
//! Both protocols describe guest RAM with the same map, built from the regions that actually
//! back guest memory, so the 32-bit MMIO hole (control page, virtio-mmio, IOAPIC, LAPIC) and
//! the firmware area below 1 MiB can never be handed to the guest as RAM.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

use super::layout::{
    EBDA_START, HIMEM_START, INITRD_ADDR_MAX_DEFAULT, MMIO32_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, RAM_ABOVE_4G_START, ZERO_PAGE_START,
};

/// The entry point convention the vCPU registers and boot structures follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64,
    /// Xen PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
}

/// Where the initrd was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    pub address: GuestAddress,
    pub size: usize,
}

/// Errors from writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("initrd of {size} bytes does not fit in guest RAM between {low:#x} and {high:#x}")]
    InitrdDoesNotFit { size: usize, low: u64, high: u64 },
    #[error("guest memory has no RAM at address 0")]
    NoLowMemory,
    #[error("{what} at {address:#x} is above 4 GiB, out of reach of the 32-bit boot fields")]
    AddressAbove4G { what: &'static str, address: u64 },
    #[error("the memory map has {0} entries, more than the boot structures hold")]
    TooManyMemoryMapEntries(usize),
    #[error("cannot write the zero page")]
    ZeroPage(#[source] GuestMemoryError),
    #[error("cannot write the PVH start info")]
    StartInfo(#[source] GuestMemoryError),
    #[error("cannot write the PVH module list")]
    ModuleList(#[source] GuestMemoryError),
    #[error("cannot write the PVH memory map")]
    MemoryMap(#[source] GuestMemoryError),
}

/// e820 / PVH memory map entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// "HdrS": the setup header signature.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature the kernel checks in `boot_flag`.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot protocol 2.15: the newest fields we fill (acpi_rsdp_addr needs 2.14).
const KERNEL_BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// "Undefined" boot loader id: we have no registered one.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The kernel's default physical alignment (CONFIG_PHYSICAL_ALIGN).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `setup_header.loadflags`: the protected-mode kernel sits at 1 MiB.
const LOADED_HIGH: u8 = 0x1;

/// Xen PVH start info magic and the version with the memory map fields.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const HVM_START_INFO_VERSION: u32 = 1;

/// Room for the PVH memory map before the boot stack page; the map has at most four entries,
/// this is only a guard against the layout changing under us.
const PVH_MEMMAP_MAX_ENTRIES: usize = 64;

const PAGE_SIZE: u64 = 0x1000;

// The PVH structures must not overlap each other.
const _: () =
    assert!(PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= PVH_MODLIST_START);
const _: () = assert!(
    PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64 <= PVH_MEMMAP_START
);

/// One entry of the guest memory map, shared by the e820 table and the PVH memmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MemoryMapEntry {
    addr: u64,
    size: u64,
    kind: u32,
}

/// The guest's memory map: RAM below the EBDA, the EBDA-to-1 MiB firmware area (MP table,
/// VM generation ID, ACPI tables) reserved, RAM from 1 MiB to the end of low RAM, and RAM
/// above 4 GiB. Only ranges that are backed by guest memory are reported as RAM; whatever
/// else lies in [MMIO32_START, 4 GiB) stays out of the map altogether.
fn memory_map(mem: &GuestMemoryMmap) -> Vec<MemoryMapEntry> {
    let usable_windows = [
        (0, EBDA_START),
        (HIMEM_START, MMIO32_START),
        (RAM_ABOVE_4G_START, u64::MAX),
    ];
    let mut ram: Vec<MemoryMapEntry> = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start.saturating_add(region.len());
        for (window_start, window_end) in usable_windows {
            let lo = start.max(window_start);
            let hi = end.min(window_end);
            if lo >= hi {
                continue;
            }
            // Regions that touch (e.g. two memory slots back to back) become one entry.
            match ram.last_mut() {
                Some(last) if last.addr + last.size == lo => last.size += hi - lo,
                _ => ram.push(MemoryMapEntry {
                    addr: lo,
                    size: hi - lo,
                    kind: E820_RAM,
                }),
            }
        }
    }
    ram.sort_by_key(|e| e.addr);

    let reserved = MemoryMapEntry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820_RESERVED,
    };
    let at = ram.partition_point(|e| e.addr < EBDA_START);
    ram.insert(at, reserved);
    ram
}

/// End of the RAM region that starts at address 0, capped at the MMIO hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or(BootError::NoLowMemory)?;
    Ok(region.len().min(MMIO32_START))
}

/// Where to put an initrd of `size` bytes: page-aligned, as high as possible in RAM below
/// `min(end of low RAM, max_address + 1)`, and above the kernel end `kernel_end`.
///
/// High placement keeps the initrd clear of the kernel's own decompression and bss, and the
/// cap honours the kernel's `initrd_addr_max`.
pub fn initrd_load_address(
    mem: &GuestMemoryMmap,
    kernel_end: GuestAddress,
    size: usize,
    max_address: u64,
) -> Result<GuestAddress, BootError> {
    let top = low_ram_end(mem)?.min(max_address.saturating_add(1));
    let low = kernel_end.raw_value().max(HIMEM_START);
    let does_not_fit = || BootError::InitrdDoesNotFit {
        size,
        low,
        high: top,
    };
    let start = top.checked_sub(size as u64).ok_or_else(does_not_fit)? & !(PAGE_SIZE - 1);
    if start < low {
        return Err(does_not_fit());
    }
    Ok(GuestAddress(start))
}

fn check_below_4g(what: &'static str, address: u64) -> Result<u32, BootError> {
    u32::try_from(address).map_err(|_| BootError::AddressAbove4G { what, address })
}

/// The setup header for a kernel that did not bring one (ELF vmlinux): what the boot protocol
/// requires a loader to provide.
fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        version: KERNEL_BOOT_PROTOCOL_VERSION,
        loadflags: LOADED_HIGH,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        initrd_addr_max: INITRD_ADDR_MAX_DEFAULT as u32,
        ..Default::default()
    }
}

/// Linux 64-bit boot protocol: writes `boot_params` at `ZERO_PAGE_START` with the setup
/// header (the bzImage's own when given, otherwise a minimal valid one), the command line,
/// the initrd, the RSDP address when there are ACPI tables, and the e820 map.
pub fn configure_linux_boot(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<&InitrdRegion>,
    setup_header: Option<setup_header>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: setup_header.unwrap_or_else(default_setup_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = check_below_4g("the command line", cmdline_addr.raw_value())?;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = check_below_4g("the initrd", initrd.address.raw_value())?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| BootError::AddressAbove4G {
                what: "the initrd end",
                address: initrd.address.raw_value() + initrd.size as u64,
            })?;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }

    let map = memory_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::ZeroPage)
}

/// PVH boot: writes `hvm_start_info` at `PVH_INFO_START`, the initrd module entry at
/// `PVH_MODLIST_START` and the memory map at `PVH_MEMMAP_START`.
pub fn configure_pvh_boot(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    initrd: Option<&InitrdRegion>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: HVM_START_INFO_VERSION,
        cmdline_paddr: cmdline_addr.raw_value(),
        rsdp_paddr: rsdp.map_or(0, |r| r.raw_value()),
        ..Default::default()
    };

    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.address.raw_value(),
            size: initrd.size as u64,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::ModuleList)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }

    let map = memory_map(mem);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, entry) in map.iter().enumerate() {
        let table_entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        mem.write_obj(
            table_entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )
        .map_err(BootError::MemoryMap)?;
    }
    start_info.memmap_paddr = PVH_MEMMAP_START;
    start_info.memmap_entries = map.len() as u32;

    mem.write_obj(start_info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::arch_memory_regions;
    use crate::arch::x86_64::layout::{
        CMDLINE_START, CONTROL_PAGE_START, RSDP_START, VMGENID_PAGE_SIZE, VMGENID_START,
    };

    fn guest_memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    fn read_e820(mem: &GuestMemoryMmap) -> (boot_params, Vec<(u64, u64, u32)>) {
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let table = params.e820_table;
        let entries = table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        (params, entries)
    }

    fn is_ram(map: &[(u64, u64, u32)], addr: u64) -> bool {
        map.iter()
            .any(|&(a, s, t)| t == E820_RAM && a <= addr && addr < a + s)
    }

    #[test]
    fn e820_for_128_mib() {
        let mem = guest_memory(128 << 20);
        configure_linux_boot(&mem, GuestAddress(CMDLINE_START), 42, None, None, None).unwrap();
        let (params, map) = read_e820(&mem);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        assert!(!is_ram(&map, RSDP_START));
        assert!(!is_ram(&map, CONTROL_PAGE_START));
        assert!(!is_ram(&map, VMGENID_START));
        assert!(!is_ram(&map, VMGENID_START + VMGENID_PAGE_SIZE - 1));

        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.loadflags }, LOADED_HIGH);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn e820_for_4_gib_excludes_the_hole() {
        let mem = guest_memory(4 << 30);
        configure_linux_boot(&mem, GuestAddress(CMDLINE_START), 1, None, None, None).unwrap();
        let (_, map) = read_e820(&mem);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, MMIO32_START - HIMEM_START, E820_RAM),
                (RAM_ABOVE_4G_START, 1 << 30, E820_RAM),
            ]
        );
        for addr in [CONTROL_PAGE_START, MMIO32_START + 0x1000_0000, 0xffff_ffff] {
            assert!(!is_ram(&map, addr), "{addr:#x} must not be RAM");
        }
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn linux_boot_keeps_the_bzimage_header_and_fills_ours() {
        let mem = guest_memory(128 << 20);
        let from_kernel = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            version: 0x020c,
            setup_sects: 27,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let initrd = InitrdRegion {
            address: GuestAddress(0x700_0000),
            size: 0x12345,
        };
        configure_linux_boot(
            &mem,
            GuestAddress(CMDLINE_START),
            100,
            Some(&initrd),
            Some(from_kernel),
            Some(GuestAddress(RSDP_START)),
        )
        .unwrap();
        let (params, _) = read_e820(&mem);
        let hdr = params.hdr;
        assert_eq!({ hdr.version }, 0x020c);
        assert_eq!({ hdr.setup_sects }, 27);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ params.acpi_rsdp_addr }, RSDP_START);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = guest_memory(128 << 20);
        let addr = initrd_load_address(&mem, GuestAddress(0x200_0000), 0x1801, u64::MAX).unwrap();
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert_eq!(addr.raw_value(), (128 << 20) - 0x2000);
        assert!(addr.raw_value() + 0x1801 <= 128 << 20);
    }

    #[test]
    fn initrd_respects_max_address() {
        let mem = guest_memory(2 << 30);
        let max = INITRD_ADDR_MAX_DEFAULT;
        let addr = initrd_load_address(&mem, GuestAddress(0x200_0000), 0x10_0000, max).unwrap();
        assert_eq!(addr.raw_value(), 0x3800_0000 - 0x10_0000);
        assert!(addr.raw_value() + 0x10_0000 - 1 <= max);
    }

    #[test]
    fn initrd_in_a_big_guest_stays_below_the_hole() {
        let mem = guest_memory(6 << 30);
        let addr = initrd_load_address(&mem, GuestAddress(0x200_0000), 0x1000, u64::MAX).unwrap();
        assert_eq!(addr.raw_value(), MMIO32_START - 0x1000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let mem = guest_memory(128 << 20);
        // Larger than all of RAM.
        assert!(matches!(
            initrd_load_address(&mem, GuestAddress(0x200_0000), 256 << 20, u64::MAX),
            Err(BootError::InitrdDoesNotFit { .. })
        ));
        // Fits in RAM, but would overlap the kernel.
        assert!(initrd_load_address(&mem, GuestAddress(0x7f0_0000), 0x20_0000, u64::MAX).is_err());
        // Exactly the space between the kernel and the end of RAM.
        let addr =
            initrd_load_address(&mem, GuestAddress(0x7e0_0000), 0x20_0000, u64::MAX).unwrap();
        assert_eq!(addr.raw_value(), 0x7e0_0000);
    }

    #[test]
    fn pvh_start_info_fields() {
        let mem = guest_memory(4 << 30);
        let initrd = InitrdRegion {
            address: GuestAddress(0x600_0000),
            size: 0x4321,
        };
        configure_pvh_boot(
            &mem,
            GuestAddress(CMDLINE_START),
            Some(&initrd),
            Some(GuestAddress(RSDP_START)),
        )
        .unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, RSDP_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 4);

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x600_0000, 0x4321));

        let entries: Vec<(u64, u64, u32)> = (0..4)
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(PVH_MEMMAP_START + i * 24))
                    .unwrap();
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, EBDA_START, 1),
                (EBDA_START, HIMEM_START - EBDA_START, 2),
                (HIMEM_START, MMIO32_START - HIMEM_START, 1),
                (RAM_ABOVE_4G_START, 1 << 30, 1),
            ]
        );
    }

    #[test]
    fn pvh_without_initrd_or_acpi() {
        let mem = guest_memory(128 << 20);
        configure_pvh_boot(&mem, GuestAddress(CMDLINE_START), None, None).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert_eq!(info.rsdp_paddr, 0);
        assert_eq!(info.memmap_entries, 3);
    }
}
