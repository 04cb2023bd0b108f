//! Segment descriptors: packing the 8-byte GDT entries the boot code writes to guest memory,
//! and unpacking them into the `kvm_segment` form KVM_SET_SREGS wants, so the descriptor
//! cache KVM loads always agrees with the table the guest can read back.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry.
///
/// `flags` holds the access byte in bits 0-7 (P, DPL, S, type) and the flags nibble in bits
/// 12-15 (G, D/B, L, AVL), as they sit in bits 40-47 and 52-55 of the descriptor; bits 8-11
/// are ignored because that is where the limit's top nibble goes. `limit` is 20 bits.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn entry_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24)
}

/// The byte-granular limit: with G set the 20-bit limit counts 4 KiB pages, and KVM wants it
/// already scaled (the low 12 bits all ones).
fn entry_limit(entry: u64) -> u32 {
    let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    if entry_bit(entry, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn entry_bit(entry: u64, bit: u32) -> u8 {
    ((entry >> bit) & 1) as u8
}

/// Unpacks the GDT entry at `table_index` into the segment register KVM loads, with the
/// selector pointing at that entry (TI = 0, RPL = 0).
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = entry_bit(entry, 47);
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: entry_bit(entry, 54),
        s: entry_bit(entry, 44),
        l: entry_bit(entry, 53),
        g: entry_bit(entry, 55),
        avl: entry_bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_descriptor_values() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        // The classic flat 64-bit code, data and TSS descriptors.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        // 32-bit code for PVH entry.
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn base_and_limit_are_split_across_the_descriptor() {
        let entry = gdt_entry(0x008b, 0x1234_5678, 0xa_bcde);
        assert_eq!(entry, 0x120a_8b34_5678_bcde);
        let seg = kvm_segment_from_gdt(entry, 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xa_bcde);
    }

    #[test]
    fn code64_round_trips() {
        let seg = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.avl, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_and_tss_round_trip() {
        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.type_, data.s, data.db, data.l),
            (0x10, 3, 1, 1, 0)
        );
        assert_eq!(data.limit, 0xffff_ffff);

        let tss = kvm_segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 0));
        assert_eq!(tss.limit, 0x67);
        assert_eq!(tss.present, 1);
    }

    #[test]
    fn absent_descriptor_is_unusable() {
        let seg = kvm_segment_from_gdt(gdt_entry(0, 0, 0), 0);
        assert_eq!(seg.present, 0);
        assert_eq!(seg.unusable, 1);
    }
}
