//! CPUID normalization: turns what KVM_GET_SUPPORTED_CPUID offers into the CPUID one vCPU
//! of this VM shows its guest: APIC ids and a topology of one thread per core and one core
//! per vCPU in a single package, the hypervisor bit, the KVM paravirt signature, and — on a
//! nested PVM host — none of the features that host cannot run or hypercalls it cannot
//! serve.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// How to present CPUID to one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidOptions {
    /// This vCPU's index, which is also its (x2)APIC id.
    pub cpu_index: u8,
    /// Number of vCPUs in the VM.
    pub cpu_count: u8,
    /// Hide the instructions a nested PVM host's instruction emulator cannot run, the KVM
    /// paravirt features that need hypercalls, and the invariant TSC (see
    /// [`LEAF_POWER_EDX_INVARIANT_TSC`]).
    pub hide_pvm_unsupported: bool,
}

/// Errors from CPUID normalization.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("vCPU index {cpu_index} is out of range for {cpu_count} vCPUs")]
    BadCpuIndex { cpu_index: u8, cpu_count: u8 },
    #[error("too many CPUID entries")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
}

// Leaf numbers.
const LEAF_BASIC: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_POWER: u32 = 0x8000_0007;

/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

// Leaf 1.
const LEAF1_EBX_CLFLUSH_SHIFT: u32 = 8;
const LEAF1_EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// CLFLUSH line size in 8-byte units: 64 bytes.
const CLFLUSH_LINE_SIZE: u32 = 8;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Leaf 1 ECX features a PVM host cannot run: SSSE3 (9), CX16 (13), SSE4.1 (19), SSE4.2 (20),
/// MOVBE (22), POPCNT (23), XSAVE (26), OSXSAVE (27). SSE4.1 goes with SSSE3 so the SSE ladder
/// stays one no real CPU would contradict. Without XSAVE no OS can enable AVX state, so the
/// AVX family goes too: FMA (12), AVX (28), F16C (29).
const LEAF1_ECX_PVM_HIDDEN: u32 = bits(&[9, 12, 13, 19, 20, 22, 23, 26, 27, 28, 29]);

/// Leaf 7.0 EBX: FSGSBASE (0), BMI1 (3), BMI2 (8), ERMS (9), ADX (19), SMAP (20); and the
/// XSAVE-managed AVX2 (5) and AVX-512 bits (16, 17, 21, 26, 27, 28, 30, 31).
const LEAF7_EBX_PVM_HIDDEN: u32 = bits(&[0, 3, 5, 8, 9, 16, 17, 19, 20, 21, 26, 27, 28, 30, 31]);
/// Leaf 7.0 ECX: RDPID (22); and the XSAVE-managed AVX512_VBMI (1), PKU/OSPKE (3, 4),
/// AVX512_VBMI2 (6), VAES (9), VPCLMULQDQ (10), AVX512_VNNI (11), AVX512_BITALG (12),
/// AVX512_VPOPCNTDQ (14).
const LEAF7_ECX_PVM_HIDDEN: u32 = bits(&[1, 3, 4, 6, 9, 10, 11, 12, 14, 22]);
/// Leaf 7.0 EDX: FSRM (4), SERIALIZE (14); and the XSAVE-managed AVX512_4VNNIW (2),
/// AVX512_4FMAPS (3), AVX512_VP2INTERSECT (8), AMX_BF16 (22), AVX512_FP16 (23),
/// AMX_TILE (24), AMX_INT8 (25).
const LEAF7_EDX_PVM_HIDDEN: u32 = bits(&[2, 3, 4, 8, 14, 22, 23, 24, 25]);
/// Leaf 7.1 EAX: AVX_VNNI (4), AVX512_BF16 (5), both XSAVE-managed.
const LEAF7_1_EAX_PVM_HIDDEN: u32 = bits(&[4, 5]);
/// Leaf 0x80000001 ECX: AMD's XSAVE-managed XOP (11) and FMA4 (16).
const LEAF_EXT_ECX_PVM_HIDDEN: u32 = bits(&[11, 16]);

/// Leaf 0x80000007 EDX: invariant TSC (8). A PVM guest reads the host's TSC (RDTSC runs
/// natively in its user-mode half, where no offset applies), so nothing can take a pause out
/// of it. A Linux guest told its TSC is invariant prefers it to kvm-clock as its clocksource
/// (kvm-clock drops its rating below the TSC's) and its clock would jump by every pause;
/// without it, kvm-clock wins, which a pause holds still (KVM_GET/SET_CLOCK).
const LEAF_POWER_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// XSAVE state components whose registers guest user space can use on a PVM host: x87 (0),
/// SSE (1), AVX (2), AVX-512 opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7). Leaf 0xD offers only
/// these: KVM then includes them in KVM_GET_XSAVE/KVM_SET_XSAVE, which is how hearth saves
/// and restores a `noxsave` guest's extended state for it (see `arch::x86_64::pvm::xstate`).
pub const PVM_XSTATE_COMPONENTS: u32 = bits(&[0, 1, 2, 5, 6, 7]);

/// KVM paravirt features (leaf 0x40000001 EAX) a nested PVM host cannot serve: ASYNC_PF (4),
/// STEAL_TIME (5), PV_UNHALT (7), PV_TLB_FLUSH (9), ASYNC_PF_VMEXIT (10), PV_SEND_IPI (11),
/// POLL_CONTROL (12), PV_SCHED_YIELD (13), ASYNC_PF_INT (14), MSI_EXT_DEST_ID (15). The
/// clocksource bits (0, 3, 24) stay.
const KVM_FEATURES_PVM_HIDDEN: u32 = bits(&[4, 5, 7, 9, 10, 11, 12, 13, 14, 15]);

// Leaf 4 EAX.
const LEAF4_EAX_TYPE_MASK: u32 = 0x1f;
const LEAF4_EAX_LEVEL_SHIFT: u32 = 5;
const LEAF4_EAX_THREADS_SHARING_SHIFT: u32 = 14;
const LEAF4_EAX_CORES_SHIFT: u32 = 26;
/// Keeps cache type, level, self-initializing and fully-associative (bits 0-13).
const LEAF4_EAX_DESCRIPTION_MASK: u32 = 0x3fff;

// Leaves 0xB / 0x1F ECX level types.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits of APIC id needed to number `count` cores: ceil(log2(count)).
fn core_id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn topology_subleaf(function: u32, index: u32, opts: &CpuidOptions) -> kvm_cpuid_entry2 {
    let (eax, ebx, level_type) = match index {
        // One thread per core: nothing to shift out, one logical processor per core.
        0 => (0, 1, LEVEL_TYPE_SMT),
        // All vCPUs are cores of one package.
        1 => (
            core_id_bits(opts.cpu_count),
            u32::from(opts.cpu_count),
            LEVEL_TYPE_CORE,
        ),
        // Terminates the enumeration.
        _ => (0, 0, LEVEL_TYPE_INVALID),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: u32::from(opts.cpu_index),
        ..Default::default()
    }
}

/// Replaces the extended topology leaf `function` with SMT, core and terminating subleaves,
/// when the maximum basic leaf says the guest may read it.
fn set_topology_leaf(
    cpuid: &mut CpuId,
    function: u32,
    max_basic_leaf: u32,
    opts: &CpuidOptions,
) -> Result<(), CpuidError> {
    cpuid.retain(|e| e.function != function);
    if max_basic_leaf < function {
        return Ok(());
    }
    for index in 0..3 {
        cpuid
            .push(topology_subleaf(function, index, opts))
            .map_err(CpuidError::TooManyEntries)?;
    }
    Ok(())
}

/// Adds the KVM signature leaf (and an empty feature leaf) when KVM did not offer them, so
/// the guest recognizes KVM and can probe for its clocksource.
fn ensure_kvm_leaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    let has = |cpuid: &CpuId, function| cpuid.as_slice().iter().any(|e| e.function == function);
    if !has(cpuid, LEAF_KVM_SIGNATURE) {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_KVM_SIGNATURE,
                ..Default::default()
            })
            .map_err(CpuidError::TooManyEntries)?;
    }
    if !has(cpuid, LEAF_KVM_FEATURES) {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                ..Default::default()
            })
            .map_err(CpuidError::TooManyEntries)?;
    }
    Ok(())
}

fn normalize_entry(entry: &mut kvm_cpuid_entry2, opts: &CpuidOptions) {
    let hide = opts.hide_pvm_unsupported;
    match (entry.function, entry.index) {
        (LEAF_FEATURES, _) => {
            entry.ebx = (u32::from(opts.cpu_index) << LEAF1_EBX_APIC_ID_SHIFT)
                | (u32::from(opts.cpu_count) << LEAF1_EBX_LOGICAL_COUNT_SHIFT)
                | (CLFLUSH_LINE_SIZE << LEAF1_EBX_CLFLUSH_SHIFT)
                | (entry.ebx & 0xff);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            // TSC_DEADLINE (ECX bit 24) stays as KVM reported it.
            if opts.cpu_count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
            if hide {
                entry.ecx &= !LEAF1_ECX_PVM_HIDDEN;
            }
        }
        (LEAF_CACHE_PARAMS, _) => {
            if entry.eax & LEAF4_EAX_TYPE_MASK == 0 {
                return; // "no more caches"
            }
            let level = (entry.eax >> LEAF4_EAX_LEVEL_SHIFT) & 0x7;
            // L1 and L2 belong to one core (one thread); L3 is shared by the whole package.
            let sharing = if level >= 3 {
                u32::from(opts.cpu_count)
            } else {
                1
            };
            let cores = u32::from(opts.cpu_count).min(64);
            entry.eax = (entry.eax & LEAF4_EAX_DESCRIPTION_MASK)
                | ((sharing - 1) << LEAF4_EAX_THREADS_SHARING_SHIFT)
                | ((cores - 1) << LEAF4_EAX_CORES_SHIFT);
        }
        (LEAF_EXTENDED_FEATURES, 0) if hide => {
            entry.ebx &= !LEAF7_EBX_PVM_HIDDEN;
            entry.ecx &= !LEAF7_ECX_PVM_HIDDEN;
            entry.edx &= !LEAF7_EDX_PVM_HIDDEN;
        }
        (LEAF_EXTENDED_FEATURES, 1) if hide => {
            entry.eax &= !LEAF7_1_EAX_PVM_HIDDEN;
        }
        // Subleaf 0: the XCR0 components; 1: XSAVEOPT/XSAVEC/XSAVES (none here); 2 and up:
        // one state component each.
        (LEAF_XSAVE, 0) if hide => {
            entry.eax &= PVM_XSTATE_COMPONENTS;
            entry.edx = 0;
        }
        (LEAF_XSAVE, index)
            if hide && (index == 1 || index >= 32 || PVM_XSTATE_COMPONENTS & (1 << index) == 0) =>
        {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (LEAF_KVM_SIGNATURE, _) => {
            entry.eax = LEAF_KVM_FEATURES;
            [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
        }
        (LEAF_KVM_FEATURES, _) if hide => {
            entry.eax &= !KVM_FEATURES_PVM_HIDDEN;
        }
        (LEAF_EXT_FEATURES, _) if hide => {
            entry.ecx &= !LEAF_EXT_ECX_PVM_HIDDEN;
        }
        (LEAF_POWER, _) if hide => {
            entry.edx &= !LEAF_POWER_EDX_INVARIANT_TSC;
        }
        _ => {}
    }
}

/// Normalizes KVM_GET_SUPPORTED_CPUID's output for one vCPU, in place. Leaves not mentioned
/// here (0x80000001 and the rest of the extended range, 6, 0xA, ...) pass through unchanged.
pub fn normalize(cpuid: &mut CpuId, opts: &CpuidOptions) -> Result<(), CpuidError> {
    if opts.cpu_count == 0 || opts.cpu_index >= opts.cpu_count {
        return Err(CpuidError::BadCpuIndex {
            cpu_index: opts.cpu_index,
            cpu_count: opts.cpu_count,
        });
    }
    ensure_kvm_leaves(cpuid)?;
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, opts);
    }
    let max_basic_leaf = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_BASIC)
        .map_or(0, |e| e.eax);
    set_topology_leaf(cpuid, LEAF_TOPOLOGY, max_basic_leaf, opts)?;
    set_topology_leaf(cpuid, LEAF_TOPOLOGY_V2, max_basic_leaf, opts)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd | 0x1f) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// Something like what a recent Intel host's KVM returns, with every feature bit set
    /// where it matters and no KVM leaves.
    fn synthetic(max_basic_leaf: u32) -> CpuId {
        CpuId::from_entries(&[
            entry(
                0,
                0,
                [max_basic_leaf, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            ),
            entry(1, 0, [0x806f8, 0xff_ff_ff_ff, 0x7ffa_fbff, 0xffff_ffff]),
            entry(4, 0, [0xfc00_4121, 0x01c0_003f, 0x3f, 0]),
            entry(4, 1, [0xfc00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(4, 2, [0xfc01_c143, 0x03c0_003f, 0x7ff, 0]),
            entry(4, 3, [0xfc3f_c163, 0x0380_003f, 0xffff, 0x4]),
            entry(4, 4, [0, 0, 0, 0]),
            entry(7, 0, [1, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            entry(7, 1, [0xffff_ffff, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xd, 0, [0x2e7, 0x2988, 0x2988, 0]),
            entry(0xd, 1, [0xf, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0x2c10_0800]),
            entry(0x8000_0007, 0, [0, 0, 0, 0x100]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn normalized(max_basic_leaf: u32, opts: CpuidOptions) -> CpuId {
        let mut cpuid = synthetic(max_basic_leaf);
        normalize(&mut cpuid, &opts).unwrap();
        cpuid
    }

    const THIRD_OF_FOUR: CpuidOptions = CpuidOptions {
        cpu_index: 2,
        cpu_count: 4,
        hide_pvm_unsupported: false,
    };

    /// Where the VMM can offset the guest TSC, an invariant one stays: pauses hold it.
    #[test]
    fn invariant_tsc_passes_through_off_pvm() {
        let cpuid = normalized(0x1f, THIRD_OF_FOUR);
        assert_eq!(find(&cpuid, 0x8000_0007, 0).edx, 0x100);
    }

    #[test]
    fn leaf1_apic_id_counts_and_hypervisor() {
        let cpuid = normalized(0x1f, THIRD_OF_FOUR);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!((leaf1.ebx >> 8) & 0xff, 8);
        assert_eq!(leaf1.ebx & 0xff, 0xff, "brand index kept");
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        // Without hiding, the host features pass through.
        assert_ne!(leaf1.ecx & (1 << 26), 0);

        let single = normalized(
            0x1f,
            CpuidOptions {
                cpu_index: 0,
                cpu_count: 1,
                hide_pvm_unsupported: false,
            },
        );
        let leaf1 = find(&single, 1, 0);
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(leaf1.ebx >> 24, 0);
    }

    #[test]
    fn cache_topology_one_thread_per_core() {
        let cpuid = normalized(0x1f, THIRD_OF_FOUR);
        for index in 0..3 {
            let eax = find(&cpuid, 4, index).eax;
            assert_eq!((eax >> 14) & 0xfff, 0, "L1/L2 not shared");
            assert_eq!(eax >> 26, 3);
        }
        let l3 = find(&cpuid, 4, 3).eax;
        assert_eq!((l3 >> 14) & 0xfff, 3, "L3 shared by all 4");
        assert_eq!(l3 >> 26, 3);
        assert_eq!(l3 & 0x3fff, 0x163, "cache description kept");
        assert_eq!(find(&cpuid, 4, 4).eax, 0);
    }

    #[test]
    fn x2apic_topology_leaves() {
        let cpuid = normalized(0x1f, THIRD_OF_FOUR);
        for leaf in [0xb, 0x1f] {
            let smt = find(&cpuid, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = find(&cpuid, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
            let end = find(&cpuid, leaf, 2);
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 2));
            assert_eq!(
                cpuid
                    .as_slice()
                    .iter()
                    .filter(|e| e.function == leaf)
                    .count(),
                3
            );
        }
    }

    #[test]
    fn topology_shift_rounds_up() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(4), 2);
        assert_eq!(core_id_bits(5), 3);
        assert_eq!(core_id_bits(254), 8);
    }

    #[test]
    fn leaf_0x1f_only_when_max_basic_leaf_allows() {
        let cpuid = normalized(0xd, THIRD_OF_FOUR);
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
        assert_eq!(find(&cpuid, 0xb, 1).ebx, 4);
    }

    #[test]
    fn kvm_signature_added_when_missing() {
        let cpuid = normalized(0x1f, THIRD_OF_FOUR);
        let sig = find(&cpuid, 0x4000_0000, 0);
        assert_eq!(sig.eax, 0x4000_0001);
        let mut bytes = Vec::new();
        for reg in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(find(&cpuid, 0x4000_0001, 0).eax, 0);
    }

    #[test]
    fn kvm_signature_kept_once_when_present() {
        let mut cpuid = synthetic(0x1f);
        cpuid
            .push(entry(
                0x4000_0000,
                0,
                [
                    0x4000_0001,
                    KVM_SIGNATURE[0],
                    KVM_SIGNATURE[1],
                    KVM_SIGNATURE[2],
                ],
            ))
            .unwrap();
        cpuid
            .push(entry(0x4000_0001, 0, [0x0100_fffb, 0, 0, 0]))
            .unwrap();
        normalize(&mut cpuid, &THIRD_OF_FOUR).unwrap();
        let count = |f| cpuid.as_slice().iter().filter(|e| e.function == f).count();
        assert_eq!((count(0x4000_0000), count(0x4000_0001)), (1, 1));
        assert_eq!(find(&cpuid, 0x4000_0001, 0).eax, 0x0100_fffb);
    }

    #[test]
    fn pvm_hiding() {
        let mut cpuid = synthetic(0x1f);
        cpuid
            .push(entry(0x4000_0001, 0, [0x0100_fffb, 0, 0, 0]))
            .unwrap();
        let opts = CpuidOptions {
            hide_pvm_unsupported: true,
            ..THIRD_OF_FOUR
        };
        normalize(&mut cpuid, &opts).unwrap();

        let kvm = find(&cpuid, 0x4000_0001, 0).eax;
        for bit in [4, 5, 7, 9, 10, 11, 12, 13, 14, 15] {
            assert_eq!(kvm & (1 << bit), 0, "KVM feature bit {bit}");
        }
        // kvmclock (0, 3) and CLOCKSOURCE_STABLE (24) stay.
        assert_eq!(kvm & 0x0100_0009, 0x0100_0009);

        let leaf1 = find(&cpuid, 1, 0);
        for bit in [9, 13, 20, 22, 23, 26, 27] {
            assert_eq!(leaf1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit still set");
        assert_ne!(leaf1.ecx & 1, 0, "SSE3 kept");

        let leaf7 = find(&cpuid, 7, 0);
        for bit in [0, 3, 8, 9, 19, 20] {
            assert_eq!(leaf7.ebx & (1 << bit), 0, "leaf 7 EBX bit {bit}");
        }
        assert_ne!(leaf7.ebx & (1 << 7), 0, "SMEP kept");
        assert_eq!(leaf7.ecx & (1 << 22), 0, "RDPID");
        assert_eq!(leaf7.edx & (1 << 4), 0, "FSRM");
        assert_eq!(leaf7.edx & (1 << 14), 0, "SERIALIZE");

        // Leaf 0xD: x87, SSE, AVX and AVX-512 of 0x2e7 (not PKRU), no XSAVES & co.
        let xsave = find(&cpuid, 0xd, 0);
        assert_eq!((xsave.eax, xsave.edx), (0xe7, 0));
        let xsave = find(&cpuid, 0xd, 1);
        assert_eq!((xsave.eax, xsave.ebx, xsave.ecx, xsave.edx), (0, 0, 0, 0));
        // Extended leaves pass through apart from the XSAVE-managed AMD bits.
        let ext = find(&cpuid, 0x8000_0001, 0);
        assert_eq!(ext.ecx, !LEAF_EXT_ECX_PVM_HIDDEN);
        assert_eq!(ext.edx, 0x2c10_0800);
        // No invariant TSC, so that a Linux guest keeps kvm-clock.
        assert_eq!(find(&cpuid, 0x8000_0007, 0).edx, 0);
    }

    #[test]
    fn bad_cpu_index_is_an_error() {
        let mut cpuid = synthetic(0x1f);
        let opts = CpuidOptions {
            cpu_index: 4,
            ..THIRD_OF_FOUR
        };
        assert!(matches!(
            normalize(&mut cpuid, &opts),
            Err(CpuidError::BadCpuIndex { .. })
        ));
    }
}
