//! The CPU features a guest may rely on, as a snapshot records them: the vendor and the
//! CPUID registers that hold feature bits. A snapshot restores only on a host that offers
//! at least those features, and when one is missing the refusal names it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn name(self) -> &'static str {
        match self {
            Self::Eax => "eax",
            Self::Ebx => "ebx",
            Self::Ecx => "ecx",
            Self::Edx => "edx",
        }
    }

    fn of(self, regs: [u32; 4]) -> u32 {
        regs[self as usize]
    }
}

/// One CPUID register that holds feature bits, with the bits a guest was offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Register,
    pub bits: u32,
}

/// The CPU a guest was given, as far as restoring it elsewhere is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID leaf 0's vendor string, e.g. `GenuineIntel`.
    pub vendor: String,
    /// One entry per register of `FEATURE_REGISTERS`, in that order.
    pub words: Vec<FeatureWord>,
}

use Register::{Eax, Ebx, Ecx, Edx};

/// The registers whose bits are features a guest can come to depend on. Leaf 0xD.0 lists
/// the XSAVE state components (whose registers a restored XSAVE image holds); 0x40000001 the
/// KVM paravirtual features.
const FEATURE_REGISTERS: &[(u32, u32, Register)] = &[
    (0x1, 0, Ecx),
    (0x1, 0, Edx),
    (0x7, 0, Ebx),
    (0x7, 0, Ecx),
    (0x7, 0, Edx),
    (0x7, 1, Eax),
    (0xd, 0, Eax),
    (0xd, 0, Edx),
    (0xd, 1, Eax),
    (0x4000_0001, 0, Eax),
    (0x8000_0001, 0, Ecx),
    (0x8000_0001, 0, Edx),
    (0x8000_0007, 0, Edx),
];

/// Bits that describe this VM or the running OS rather than the CPU: leaf 1 EDX HTT follows
/// the vCPU count, leaf 1 ECX OSXSAVE mirrors CR4.
const NOT_FEATURES: &[(u32, u32, Register, u32)] =
    &[(0x1, 0, Edx, 1 << 28), (0x1, 0, Ecx, 1 << 27)];

/// Leaves whose feature bits a nested PVM host does not take from KVM_SET_CPUID2: there the
/// guest sees the host CPU's own values (shared/HOST-KVM.md), so those count as offered.
const PVM_NATIVE_LEAVES: &[u32] = &[0x1, 0x7, 0xd];

/// Bit number and Linux's name for it.
type BitNames = &'static [(u32, &'static str)];

/// Linux's names for the feature bits (as in /proc/cpuinfo), for naming what a host lacks.
/// Bits not listed are named by position.
const FEATURE_NAMES: &[(u32, u32, Register, BitNames)] = &[
    (
        0x1,
        0,
        Ecx,
        &[
            (0, "pni"),
            (1, "pclmulqdq"),
            (3, "monitor"),
            (5, "vmx"),
            (9, "ssse3"),
            (12, "fma"),
            (13, "cx16"),
            (17, "pcid"),
            (19, "sse4_1"),
            (20, "sse4_2"),
            (21, "x2apic"),
            (22, "movbe"),
            (23, "popcnt"),
            (24, "tsc_deadline_timer"),
            (25, "aes"),
            (26, "xsave"),
            (28, "avx"),
            (29, "f16c"),
            (30, "rdrand"),
            (31, "hypervisor"),
        ],
    ),
    (
        0x1,
        0,
        Edx,
        &[
            (0, "fpu"),
            (3, "pse"),
            (4, "tsc"),
            (5, "msr"),
            (6, "pae"),
            (8, "cx8"),
            (9, "apic"),
            (11, "sep"),
            (12, "mtrr"),
            (13, "pge"),
            (15, "cmov"),
            (16, "pat"),
            (19, "clflush"),
            (23, "mmx"),
            (24, "fxsr"),
            (25, "sse"),
            (26, "sse2"),
        ],
    ),
    (
        0x7,
        0,
        Ebx,
        &[
            (0, "fsgsbase"),
            (1, "tsc_adjust"),
            (3, "bmi1"),
            (4, "hle"),
            (5, "avx2"),
            (7, "smep"),
            (8, "bmi2"),
            (9, "erms"),
            (10, "invpcid"),
            (11, "rtm"),
            (16, "avx512f"),
            (17, "avx512dq"),
            (18, "rdseed"),
            (19, "adx"),
            (20, "smap"),
            (21, "avx512ifma"),
            (23, "clflushopt"),
            (24, "clwb"),
            (28, "avx512cd"),
            (29, "sha_ni"),
            (30, "avx512bw"),
            (31, "avx512vl"),
        ],
    ),
    (
        0x7,
        0,
        Ecx,
        &[
            (1, "avx512vbmi"),
            (2, "umip"),
            (3, "pku"),
            (4, "ospke"),
            (5, "waitpkg"),
            (6, "avx512_vbmi2"),
            (8, "gfni"),
            (9, "vaes"),
            (10, "vpclmulqdq"),
            (11, "avx512_vnni"),
            (12, "avx512_bitalg"),
            (14, "avx512_vpopcntdq"),
            (16, "la57"),
            (22, "rdpid"),
            (25, "cldemote"),
            (27, "movdiri"),
            (28, "movdir64b"),
        ],
    ),
    (
        0x7,
        0,
        Edx,
        &[
            (2, "avx512_4vnniw"),
            (3, "avx512_4fmaps"),
            (4, "fsrm"),
            (8, "avx512_vp2intersect"),
            (10, "md_clear"),
            (14, "serialize"),
            (22, "amx_bf16"),
            (23, "avx512_fp16"),
            (24, "amx_tile"),
            (25, "amx_int8"),
            (26, "spec_ctrl"),
            (27, "intel_stibp"),
            (28, "flush_l1d"),
            (29, "arch_capabilities"),
            (31, "spec_ctrl_ssbd"),
        ],
    ),
    (0x7, 1, Eax, &[(4, "avx_vnni"), (5, "avx512_bf16")]),
    (
        0xd,
        0,
        Eax,
        &[
            (0, "xsave component x87"),
            (1, "xsave component sse"),
            (2, "xsave component avx"),
            (3, "xsave component bndregs"),
            (4, "xsave component bndcsr"),
            (5, "xsave component opmask"),
            (6, "xsave component zmm_hi256"),
            (7, "xsave component hi16_zmm"),
            (9, "xsave component pkru"),
            (17, "xsave component xtilecfg"),
            (18, "xsave component xtiledata"),
        ],
    ),
    (
        0xd,
        1,
        Eax,
        &[
            (0, "xsaveopt"),
            (1, "xsavec"),
            (2, "xgetbv1"),
            (3, "xsaves"),
        ],
    ),
    (
        0x4000_0001,
        0,
        Eax,
        &[
            (0, "kvm clocksource"),
            (3, "kvm clocksource2"),
            (4, "kvm async_pf"),
            (5, "kvm steal_time"),
            (6, "kvm pv_eoi"),
            (7, "kvm pv_unhalt"),
            (9, "kvm pv_tlb_flush"),
            (11, "kvm pv_send_ipi"),
            (12, "kvm poll_control"),
            (13, "kvm pv_sched_yield"),
            (15, "kvm msi_ext_dest_id"),
            (24, "kvm clocksource_stable"),
        ],
    ),
    (
        0x8000_0001,
        0,
        Ecx,
        &[
            (0, "lahf_lm"),
            (2, "svm"),
            (5, "abm"),
            (6, "sse4a"),
            (8, "3dnowprefetch"),
            (11, "xop"),
            (16, "fma4"),
        ],
    ),
    (
        0x8000_0001,
        0,
        Edx,
        &[
            (11, "syscall"),
            (20, "nx"),
            (26, "pdpe1gb"),
            (27, "rdtscp"),
            (29, "lm"),
        ],
    ),
    (0x8000_0007, 0, Edx, &[(8, "constant_tsc")]),
];

fn feature_name(leaf: u32, subleaf: u32, register: Register, bit: u32) -> String {
    FEATURE_NAMES
        .iter()
        .find(|(l, s, r, _)| (*l, *s, *r) == (leaf, subleaf, register))
        .and_then(|(_, _, _, names)| names.iter().find(|(b, _)| *b == bit))
        .map_or_else(
            || format!("cpuid {leaf:#x}.{subleaf} {} bit {bit}", register.name()),
            |(_, name)| (*name).to_string(),
        )
}

fn not_feature_mask(leaf: u32, subleaf: u32, register: Register) -> u32 {
    NOT_FEATURES
        .iter()
        .filter(|(l, s, r, _)| (*l, *s, *r) == (leaf, subleaf, register))
        .fold(0, |mask, (_, _, _, bits)| mask | bits)
}

impl CpuFeatures {
    /// The features in the CPUID a vCPU is given (leaves it lacks count as all zero).
    pub fn from_cpuid(cpuid: &CpuId) -> Self {
        Self::from_entries(cpuid.as_slice())
    }

    /// As [`Self::from_cpuid`], from the entries themselves (a saved vCPU's).
    pub fn from_entries(entries: &[kvm_cpuid_entry2]) -> Self {
        Self::from_lookup(|leaf, subleaf| {
            entries
                .iter()
                .find(|e| e.function == leaf && e.index == subleaf)
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        })
    }

    fn from_lookup(lookup: impl Fn(u32, u32) -> Option<[u32; 4]>) -> Self {
        let vendor = lookup(0, 0).map_or_else(String::new, |[_, ebx, ecx, edx]| {
            [ebx, edx, ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .map(char::from)
                .collect()
        });
        let words = FEATURE_REGISTERS
            .iter()
            .map(|&(leaf, subleaf, register)| FeatureWord {
                leaf,
                subleaf,
                register,
                bits: lookup(leaf, subleaf).map_or(0, |regs| register.of(regs))
                    & !not_feature_mask(leaf, subleaf, register),
            })
            .collect();
        Self { vendor, words }
    }

    /// Adds the features the host CPU itself reports in the leaves a nested PVM host does
    /// not virtualise: a guest there sees them whatever hearth asked for.
    pub fn with_pvm_native_leaves(mut self) -> Self {
        let native = Self::from_lookup(|leaf, subleaf| {
            let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
            Some([r.eax, r.ebx, r.ecx, r.edx])
        });
        for (word, native) in self.words.iter_mut().zip(&native.words) {
            if PVM_NATIVE_LEAVES.contains(&word.leaf) {
                word.bits |= native.bits;
            }
        }
        self
    }

    /// Why a guest given `self` cannot run on a host that offers `host`, in one phrase; `None`
    /// when it can: same vendor and every feature bit of `self` offered by `host`. A register
    /// listed twice offers the bits of both (a saved CPU always passes against itself). The
    /// phrase stays short whatever a snapshot's header says: vendors are cut to
    /// `MAX_SHOWN_VENDOR` characters, and past `MAX_NAMED_FEATURES` missing features the
    /// rest are counted.
    pub fn missing_on(&self, host: &CpuFeatures) -> Option<String> {
        if self.vendor != host.vendor {
            return Some(format!(
                "the snapshot's CPU vendor is {}, this host's is {}",
                shown_vendor(&self.vendor),
                shown_vendor(&host.vendor)
            ));
        }
        let mut named = Vec::new();
        let mut missing = 0usize;
        for word in &self.words {
            let offered = host
                .words
                .iter()
                .filter(|w| {
                    (w.leaf, w.subleaf, w.register) == (word.leaf, word.subleaf, word.register)
                })
                .fold(0, |bits, w| bits | w.bits);
            let lacking = word.bits & !offered;
            for bit in (0..32).filter(|bit| lacking & (1 << bit) != 0) {
                missing += 1;
                if named.len() < MAX_NAMED_FEATURES {
                    named.push(feature_name(word.leaf, word.subleaf, word.register, bit));
                }
            }
        }
        if missing == 0 {
            return None;
        }
        let mut phrase = format!("this host's CPU lacks {}", named.join(", "));
        if missing > named.len() {
            phrase.push_str(&format!(" and {} more", missing - named.len()));
        }
        Some(phrase)
    }
}

/// Missing features named in [`CpuFeatures::missing_on`]'s phrase; the rest are counted.
const MAX_NAMED_FEATURES: usize = 12;
/// Characters of a vendor string shown (a real one has 12).
const MAX_SHOWN_VENDOR: usize = 16;

/// `vendor` quoted, cut to [`MAX_SHOWN_VENDOR`] characters.
fn shown_vendor(vendor: &str) -> String {
    let mut chars = vendor.chars();
    let shown: String = chars.by_ref().take(MAX_SHOWN_VENDOR).collect();
    if chars.next().is_some() {
        format!("{shown:?}...")
    } else {
        format!("{shown:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// An Intel CPU with AVX-512F (7.0 EBX bit 16) and SSE2.
    fn intel(leaf7_ebx: u32, leaf1_edx: u32) -> CpuFeatures {
        let cpuid = CpuId::from_entries(&[
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806f8, 0, 0x8000_0000, leaf1_edx]),
            entry(7, 0, [0, leaf7_ebx, 0, 0]),
        ])
        .unwrap();
        CpuFeatures::from_cpuid(&cpuid)
    }

    #[test]
    fn vendor_and_words_come_from_cpuid() {
        let features = intel(1 << 16, 1 << 26);
        assert_eq!(features.vendor, "GenuineIntel");
        assert_eq!(features.words.len(), FEATURE_REGISTERS.len());
        let leaf7 = features
            .words
            .iter()
            .find(|w| w.leaf == 7 && w.subleaf == 0 && w.register == Ebx)
            .unwrap();
        assert_eq!(leaf7.bits, 1 << 16);
        // Leaves the CPUID does not have are empty, not missing.
        assert!(features
            .words
            .iter()
            .filter(|w| w.leaf == 0x8000_0001)
            .all(|w| w.bits == 0));
    }

    #[test]
    fn the_same_or_more_features_suffice() {
        let saved = intel(1 << 16, 1 << 26);
        assert_eq!(saved.missing_on(&saved), None);
        assert_eq!(
            saved.missing_on(&intel((1 << 16) | (1 << 5), 1 << 26)),
            None
        );
    }

    #[test]
    fn missing_features_are_named() {
        let saved = intel((1 << 16) | (1 << 30) | (1 << 13), 1 << 26);
        let host = intel(0, 0);
        assert_eq!(
            saved.missing_on(&host).unwrap(),
            "this host's CPU lacks sse2, cpuid 0x7.0 ebx bit 13, avx512f, avx512bw"
        );
    }

    #[test]
    fn vendor_must_match() {
        let saved = intel(0, 0);
        let mut amd = saved.clone();
        amd.vendor = "AuthenticAMD".into();
        assert_eq!(
            saved.missing_on(&amd).unwrap(),
            "the snapshot's CPU vendor is \"GenuineIntel\", this host's is \"AuthenticAMD\""
        );
    }

    /// What a hostile snapshot header can list: the phrase stays one short line.
    #[test]
    fn long_lists_and_vendors_are_cut_short() {
        let mut saved = intel(0, 0);
        saved.words = (0..1000)
            .map(|leaf| FeatureWord {
                leaf,
                subleaf: 0,
                register: Ecx,
                bits: u32::MAX,
            })
            .collect();
        let phrase = saved.missing_on(&intel(0, 0)).unwrap();
        // 32,000 bits, less the 12 named and the one the host has (1.0 ECX bit 31).
        assert!(
            phrase.starts_with("this host's CPU lacks cpuid 0x0.0 ecx bit 0, ")
                && phrase.ends_with("cpuid 0x0.0 ecx bit 11 and 31987 more"),
            "{phrase}"
        );
        saved.vendor = "\n".repeat(5000);
        let phrase = saved.missing_on(&intel(0, 0)).unwrap();
        assert_eq!(
            phrase,
            format!(
                "the snapshot's CPU vendor is \"{}\"..., this host's is \"GenuineIntel\"",
                "\\n".repeat(16)
            )
        );
    }

    /// A register listed twice offers both values' bits: a saved CPU passes against itself
    /// however its header lists it.
    #[test]
    fn a_register_listed_twice_offers_both() {
        let mut saved = intel(1 << 16, 1 << 26);
        let inverted: Vec<_> = saved
            .words
            .iter()
            .map(|w| FeatureWord {
                bits: !w.bits,
                ..*w
            })
            .collect();
        saved.words.extend(inverted);
        assert_eq!(saved.missing_on(&saved), None);
        assert!(saved.missing_on(&intel(1 << 16, 1 << 26)).is_some());
    }

    #[test]
    fn vcpu_count_and_os_state_are_not_features() {
        // HTT follows the vCPU count: a 2-vCPU snapshot restores where a 1-vCPU probe lacks it.
        let two_vcpus = intel(0, (1 << 28) | (1 << 26));
        assert_eq!(two_vcpus.missing_on(&intel(0, 1 << 26)), None);
    }

    #[test]
    fn native_leaves_only_add_bits() {
        let plain = intel(0, 0);
        let widened = plain.clone().with_pvm_native_leaves();
        for (before, after) in plain.words.iter().zip(&widened.words) {
            assert_eq!(before.bits & after.bits, before.bits);
            if !PVM_NATIVE_LEAVES.contains(&before.leaf) {
                assert_eq!(before.bits, after.bits);
            }
        }
        // Every x86-64 CPU has SSE2, and the host CPU's leaf 1 is one of those added.
        assert_eq!(plain.missing_on(&widened), None);
        let sse2 = |f: &CpuFeatures| {
            f.words
                .iter()
                .any(|w| (w.leaf, w.register) == (1, Edx) && w.bits & (1 << 26) != 0)
        };
        assert!(!sse2(&plain) && sse2(&widened));
        assert!(widened.missing_on(&plain).is_some());
    }
}
