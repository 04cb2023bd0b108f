//! Reading guest virtual memory through the guest's own page tables, for the compat layer
//! (instruction bytes at RIP, IDT gates, the #PF frame on the kernel stack).

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress};

use super::PvmError;
use crate::vstate::memory::GuestMemory;

const CR0_PG: u64 = 1 << 31;
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a guest virtual address with the guest's own page tables (4-level paging,
/// or none when paging is off).
pub fn translate(mem: &GuestMemory, sregs: &kvm_sregs, vaddr: u64) -> Result<u64, PvmError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(vaddr);
    }
    let mut table = sregs.cr3 & PTE_ADDR_MASK;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let index = (vaddr >> shift) & 0x1ff;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + index * 8))
            .map_err(|_| PvmError::Unmapped(vaddr))?;
        if entry & PTE_PRESENT == 0 {
            return Err(PvmError::Unmapped(vaddr));
        }
        let page_mask = (1u64 << shift) - 1;
        if level == 1 || (level <= 3 && entry & PTE_LARGE != 0) {
            return Ok((entry & PTE_ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    unreachable!("the walk returns at level 1")
}

/// Reads guest virtual memory, page by page.
pub fn read_virt(
    mem: &GuestMemory,
    sregs: &kvm_sregs,
    vaddr: u64,
    buf: &mut [u8],
) -> Result<(), PvmError> {
    let mut done = 0;
    while done < buf.len() {
        let va = vaddr.wrapping_add(done as u64);
        let in_page = (0x1000 - (va & 0xfff)) as usize;
        let len = in_page.min(buf.len() - done);
        let pa = translate(mem, sregs, va)?;
        mem.read_slice(&mut buf[done..done + len], GuestAddress(pa))
            .map_err(|_| PvmError::Unmapped(va))?;
        done += len;
    }
    Ok(())
}

/// Builds a 4-level mapping of `vaddr` to `paddr` (4 KiB page) with tables at 0x1000..,
/// for the compat layer's tests.
#[cfg(test)]
pub(super) fn map_page(mem: &GuestMemory, vaddr: u64, paddr: u64) -> kvm_sregs {
    let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
    let idx = |shift: u32| (vaddr >> shift) & 0x1ff;
    mem.write_obj(pdpt | 3, GuestAddress(pml4 + idx(39) * 8))
        .unwrap();
    mem.write_obj(pd | 3, GuestAddress(pdpt + idx(30) * 8))
        .unwrap();
    mem.write_obj(pt | 3, GuestAddress(pd + idx(21) * 8))
        .unwrap();
    mem.write_obj(paddr | 3, GuestAddress(pt + idx(12) * 8))
        .unwrap();
    kvm_sregs {
        cr0: CR0_PG | 1,
        cr3: pml4,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn page_walk_and_virtual_reads() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let va = 0xffff_ffff_8100_0ffe;
        let sregs = map_page(&mem, va & !0xfff, 0x20_0000);
        assert_eq!(translate(&mem, &sregs, va).unwrap(), 0x20_0ffe);
        // The next page is not mapped: a read across the boundary fails cleanly.
        let mut buf = [0u8; 4];
        assert!(matches!(
            read_virt(&mem, &sregs, va, &mut buf),
            Err(PvmError::Unmapped(_))
        ));
        mem.write_slice(&[1, 2], GuestAddress(0x20_0ffe)).unwrap();
        let mut two = [0u8; 2];
        read_virt(&mem, &sregs, va, &mut two).unwrap();
        assert_eq!(two, [1, 2]);
        // Paging off: identity.
        let flat = kvm_sregs::default();
        assert_eq!(translate(&mem, &flat, 0x1234).unwrap(), 0x1234);
    }

    #[test]
    fn large_pages_translate() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (pml4, pdpt, pd) = (0x1000u64, 0x2000u64, 0x3000u64);
        mem.write_obj(pdpt | 3, GuestAddress(pml4)).unwrap();
        mem.write_obj(pd | 3, GuestAddress(pdpt)).unwrap();
        mem.write_obj(0x20_0000 | 0x83, GuestAddress(pd + 8))
            .unwrap();
        let sregs = kvm_sregs {
            cr0: CR0_PG,
            cr3: pml4,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, 0x20_1234).unwrap(), 0x20_1234);
        assert!(translate(&mem, &sregs, 0x40_0000).is_err());
    }
}
