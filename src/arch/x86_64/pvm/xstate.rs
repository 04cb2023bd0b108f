//! Extended register state (AVX, AVX-512) that hearth saves and restores for a guest
//! kernel that cannot.
//!
//! On a nested PVM host the guest kernel boots with `noxsave` (KVM's emulator cannot run
//! XSAVE/XRSTOR), so it switches only the FXSAVE state between tasks. Guest user space,
//! though, runs with the host's XCR0: AVX is usable and advertised, and a task switch
//! would leave one task with another's upper YMM/ZMM halves (glibc's AVX string functions
//! then corrupt memory). The minimal guest kernel (patch 0005 in resources/guest-kernel)
//! therefore hands every save and restore of a task's state to hearth (the ports are in
//! `layout.rs`):
//!
//! * a 32-bit read of [`PV_XSTATE_SAVE_PORT`] returns [`MAGIC`] (other VMMs answer all
//!   ones, and the kernel keeps FXSAVE);
//! * a 32-bit write of `gpa >> 6` to the save port copies the vCPU's whole register state
//!   (KVM_GET_XSAVE: 4096 bytes, standard XSAVE layout, whose first 512 bytes are the
//!   FXSAVE image) to guest-physical `gpa`;
//! * the same write to [`PV_XSTATE_RESTORE_PORT`] loads it back (KVM_SET_XSAVE).
//!
//! The guest's kernel edits the legacy region in place (ptrace, signal return), exactly as
//! FXRSTOR would then load it, so a restore always takes x87 and SSE from the image. With
//! patch 0006 a signal frame holds the whole image and sigreturn hands back whatever guest
//! user space left there, so a restore also drops what KVM_SET_XSAVE would refuse in the
//! header: components it was not offered, a compacted format, reserved bytes. A guest that
//! passes a bad address or a malformed image only gets a warning: it can do nothing with
//! this but read and write its own memory and registers.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::PvmCompat;
use crate::arch::x86_64::cpuid::PVM_XSTATE_COMPONENTS;
use crate::arch::x86_64::layout::{PV_XSTATE_RESTORE_PORT, PV_XSTATE_SAVE_PORT};
use crate::vstate::memory::GuestMemory;

/// What a read of the save port returns: "HXST".
pub const MAGIC: u32 = 0x4858_5354;
/// Size of the image: KVM_GET_XSAVE's region.
pub const IMAGE_SIZE: usize = 4096;
/// The XSAVE header (64 bytes): XSTATE_BV, XCOMP_BV (8 bytes each), then reserved bytes
/// that must be zero.
const XSTATE_BV_OFFSET: usize = 512;
const XCOMP_BV_OFFSET: usize = 520;
const HEADER_END: usize = 576;
/// XSTATE_BV bits of the x87 and SSE components (in its low 32-bit word).
const LEGACY_COMPONENTS: u32 = 0b11;

#[derive(Debug, thiserror::Error)]
pub enum PvXstateError {
    #[error("KVM_GET_XSAVE failed")]
    Get(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_XSAVE refused the guest's image at {gpa:#x}")]
    Set {
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{gpa:#x}: not {IMAGE_SIZE} bytes of guest RAM")]
    Buffer { gpa: u64 },
}

/// Which request a port write is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Save,
    Restore,
}

impl Request {
    pub fn for_port(port: u16) -> Option<Self> {
        match port {
            PV_XSTATE_SAVE_PORT => Some(Self::Save),
            PV_XSTATE_RESTORE_PORT => Some(Self::Restore),
            _ => None,
        }
    }
}

/// The 32-bit value a write carries, or `None` for another width.
pub fn written_value(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

/// Whether a port access is this protocol's: a 32-bit access to one of its two ports.
/// Other widths go to the bus (nothing there: reads see all ones).
pub fn claims(port: u16, len: usize) -> bool {
    Request::for_port(port).is_some() && len == 4
}

/// Answers a read of a claimed port: the magic on the save port, all ones (as an empty
/// port reads) on the restore port.
pub fn probe(port: u16, data: &mut [u8]) {
    match Request::for_port(port) {
        Some(Request::Save) if data.len() == 4 => data.copy_from_slice(&MAGIC.to_le_bytes()),
        _ => data.fill(0xff),
    }
}

impl PvmCompat {
    /// A write to a claimed port: a save or restore of the buffer it names.
    pub(super) fn on_xstate_request(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        port: u16,
        data: &[u8],
    ) {
        let (Some(request), Some(value)) = (Request::for_port(port), written_value(data)) else {
            return;
        };
        match handle(fd, mem, request, value) {
            Ok(()) if request == Request::Save => self.stats.xstate_saves += 1,
            Ok(()) => self.stats.xstate_restores += 1,
            Err(e) => {
                // The guest hurts only itself; say so a few times, not on every switch.
                self.stats.xstate_errors += 1;
                if self.stats.xstate_errors <= 3 {
                    log::warn!(
                        "vCPU {}: guest xstate {request:?}: {}",
                        self.vcpu,
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }
}

/// Carries out `request` for the buffer at `value << 6`.
pub fn handle(
    fd: &VcpuFd,
    mem: &GuestMemory,
    request: Request,
    value: u32,
) -> Result<(), PvXstateError> {
    let gpa = u64::from(value) << 6;
    match request {
        Request::Save => {
            let xsave = fd.get_xsave().map_err(PvXstateError::Get)?;
            mem.write_slice(&to_image(&xsave), GuestAddress(gpa))
                .map_err(|_| PvXstateError::Buffer { gpa })
        }
        Request::Restore => {
            let mut image = [0u8; IMAGE_SIZE];
            mem.read_slice(&mut image, GuestAddress(gpa))
                .map_err(|_| PvXstateError::Buffer { gpa })?;
            let xsave = from_image(&image);
            // SAFETY: `xsave` is a whole kvm_xsave (4096 bytes) that KVM_SET_XSAVE reads;
            // the VM was not given KVM_CAP_XSAVE2, so KVM reads no more than that.
            unsafe { fd.set_xsave(&xsave) }.map_err(|source| PvXstateError::Set { gpa, source })
        }
    }
}

fn to_image(xsave: &kvm_xsave) -> [u8; IMAGE_SIZE] {
    let mut image = [0u8; IMAGE_SIZE];
    for (chunk, word) in image.chunks_exact_mut(4).zip(xsave.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    image
}

/// The guest's image as KVM_SET_XSAVE input: standard format, legacy region always used,
/// only the components the guest was offered, reserved header bytes zero.
fn from_image(image: &[u8; IMAGE_SIZE]) -> kvm_xsave {
    let mut xsave = kvm_xsave::default();
    for (word, chunk) in xsave.region.iter_mut().zip(image.chunks_exact(4)) {
        *word = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
    }
    let xstate_bv = xsave.region[XSTATE_BV_OFFSET / 4];
    xsave.region[XSTATE_BV_OFFSET / 4] = (xstate_bv | LEGACY_COMPONENTS) & PVM_XSTATE_COMPONENTS;
    // Components 32-63: none offered.
    xsave.region[XSTATE_BV_OFFSET / 4 + 1] = 0;
    xsave.region[XCOMP_BV_OFFSET / 4..HEADER_END / 4].fill(0);
    xsave
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_widths() {
        assert_eq!(Request::for_port(0x5f0), Some(Request::Save));
        assert_eq!(Request::for_port(0x5f4), Some(Request::Restore));
        assert_eq!(Request::for_port(0x5f1), None);
        assert_eq!(written_value(&[0x40, 0, 1, 0]), Some(0x0001_0040));
        assert_eq!(written_value(&[1, 2]), None);
        assert!(claims(0x5f0, 4) && claims(0x5f4, 4));
        assert!(!claims(0x5f0, 2) && !claims(0x5f8, 4));
    }

    #[test]
    fn probes_answer_the_magic_on_the_save_port_only() {
        let mut data = [0u8; 4];
        probe(PV_XSTATE_SAVE_PORT, &mut data);
        assert_eq!(u32::from_le_bytes(data), MAGIC);
        probe(PV_XSTATE_RESTORE_PORT, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn images_round_trip_with_the_legacy_region_forced_in() {
        let mut image = [0u8; IMAGE_SIZE];
        for (i, b) in image.iter_mut().enumerate() {
            *b = i as u8;
        }
        image[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8].copy_from_slice(&4u64.to_le_bytes());
        let back = to_image(&from_image(&image));
        assert_eq!(back[..XSTATE_BV_OFFSET], image[..XSTATE_BV_OFFSET]);
        assert_eq!(
            u64::from_le_bytes(
                back[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8]
                    .try_into()
                    .unwrap()
            ),
            0b111
        );
        assert_eq!(back[XCOMP_BV_OFFSET..XCOMP_BV_OFFSET + 8], [0; 8]);
        assert_eq!(back[HEADER_END..], image[HEADER_END..]);
    }

    /// What guest user space can leave in a signal frame: a header KVM would refuse.
    #[test]
    fn a_forged_header_is_made_acceptable() {
        let mut image = [0xffu8; IMAGE_SIZE];
        image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR, checked by the guest
        let back = to_image(&from_image(&image));
        let bv = u64::from_le_bytes(back[XSTATE_BV_OFFSET..XCOMP_BV_OFFSET].try_into().unwrap());
        assert_eq!(bv, u64::from(PVM_XSTATE_COMPONENTS));
        assert_eq!(
            back[XCOMP_BV_OFFSET..HEADER_END],
            [0; HEADER_END - XCOMP_BV_OFFSET]
        );
        assert_eq!(back[..XSTATE_BV_OFFSET], image[..XSTATE_BV_OFFSET]);
        assert_eq!(back[HEADER_END..], image[HEADER_END..]);
    }
}
