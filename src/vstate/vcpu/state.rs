//! A vCPU's state as plain data: everything KVM keeps for it that a guest can notice, and
//! the compat layer's own, so a paused vCPU can be saved and its guest carried on by a
//! fresh vCPU (of a new VM on the same memory). Live objects (fds, threads) stay out.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::arch::{msr, CompatState};
use crate::snapshot::format::bounded_vec;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what} (KVM)")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused MSR {index:#x} (set {set} of {total})")]
    MsrRefused {
        index: u32,
        set: usize,
        total: usize,
    },
    #[error("{0} entries do not fit one KVM request")]
    TooMany(&'static str),
    #[error("the compat layer's state: {0}")]
    Compat(String),
}

/// One vCPU, saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// At most what one KVM_SET_CPUID2 takes, the most a restore can give back.
    #[serde(deserialize_with = "bounded_vec::<_, _, KVM_MAX_CPUID_ENTRIES>")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The MSRs of KVM's index list this vCPU could read, in that order (IA32_TSC before
    /// TSC_DEADLINE, as restoring needs).
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX and AVX-512 registers (KVM_GET_XSAVE's 4 KiB, enough for every
    /// component a guest is offered here).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs, interrupt shadow, SMM.
    pub vcpu_events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    /// The TSC frequency the guest saw, where KVM reports one.
    pub tsc_khz: Option<u32>,
    /// The compat layer's state, when the vCPU ran with it.
    pub compat: Option<CompatState>,
}

impl VcpuState {
    /// Saves `tsc` as the guest's IA32_TSC (where the MSR was saved at all).
    pub fn set_tsc(&mut self, tsc: u64) {
        let saved = self.msrs.iter_mut().find(|msr| msr.index == msr::IA32_TSC);
        if let Some(msr) = saved {
            msr.data = tsc;
        }
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Reads the state of a vCPU that is not running. `msr_index` is what KVM can save
/// (KVM_GET_MSR_INDEX_LIST); MSRs this vCPU refuses to read are left out.
pub fn save(
    fd: &VcpuFd,
    msr_index: &[u32],
    compat: Option<CompatState>,
) -> Result<VcpuState, StateError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read the CPUID"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        cpuid,
        msrs: read_msrs(fd, msr_index)?,
        regs: fd.get_regs().map_err(kvm("read the registers"))?,
        sregs: fd.get_sregs().map_err(kvm("read the special registers"))?,
        xsave: fd.get_xsave().map_err(kvm("read the XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(kvm("read the XCRs"))?,
        lapic: fd.get_lapic().map_err(kvm("read the local APIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
        vcpu_events: fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(kvm("read the debug registers"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
        compat,
    })
}

/// Loads `state` into a vCPU that has not run, in the order KVM needs: CPUID first (it
/// decides which MSRs and XSAVE components exist), special registers before the LAPIC
/// (APIC base), MSRs after the LAPIC (TSC deadline), events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::TooMany("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        // Not every host can scale the TSC; the guest then sees the host's frequency.
        if let Err(e) = fd.set_tsc_khz(khz) {
            log::debug!("cannot set the TSC frequency to {khz} kHz: {e}");
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("set the MP state"))?;
    fd.set_regs(&state.regs).map_err(kvm("set the registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm("set the special registers"))?;
    // SAFETY: `state.xsave` is a whole kvm_xsave; this VM was not given KVM_CAP_XSAVE2, so
    // KVM reads no more than that.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("set the XSAVE state"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("set the XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("set the debug registers"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm("set the local APIC"))?;
    write_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm("set the vCPU events"))?;
    Ok(())
}

/// KVM_GET_MSRS over `index`, leaving out each MSR KVM will not read (it stops at the
/// first one it refuses and reports how many it read).
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany("MSR"))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            log::trace!("MSR {:#x} cannot be read; not saved", chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(saved)
}

fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::TooMany("MSR"))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set < chunk.len() {
            return Err(StateError::MsrRefused {
                index: chunk[set].index,
                set,
                total: chunk.len(),
            });
        }
    }
    Ok(())
}

/// The MSRs a vCPU's state is saved with, shared by every vCPU of a VM.
pub type MsrIndex = Arc<[u32]>;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::arch::boot::BootProtocol;
    use crate::config::CpuProfile;
    use crate::devices::bus::{Bus, BusDevice};
    use crate::exit::ExitSignal;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::memory::{create_guest_memory, GuestMemory};
    use crate::vstate::vcpu::{install_kick_handler, BootEntry, Vcpu, VcpuEvent, VcpuHandle};
    use crate::vstate::vm::Vm;

    /// Where the guest's loop is, and the port it writes its counter to.
    const CODE: u64 = 0x10_0000;
    const PORT: u64 = 0x80;
    /// 32-bit code: `1: inc %eax; out %al, $0x80; jmp 1b`.
    const COUNT_LOOP: [u8; 5] = [0x40, 0xe6, 0x80, 0xeb, 0xfb];

    /// Records the bytes written to its port.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<u8>>>);

    impl BusDevice for Recorder {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    impl Recorder {
        fn written(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }

        /// Waits until more than `count` bytes were written.
        fn wait_for_more_than(&self, count: usize) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let written = self.written();
                if written.len() > count {
                    return written;
                }
                assert!(Instant::now() < deadline, "the guest wrote {written:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// A one-vCPU VM on `mem` whose vCPU writes to a [`Recorder`].
    fn vcpu_on(vm: &Vm, mem: &GuestMemory, profile: CpuProfile) -> (Vcpu, Recorder) {
        let recorder = Recorder::default();
        let mut io_bus = Bus::new();
        io_bus
            .insert(Arc::new(Mutex::new(recorder.clone())), PORT, 1)
            .unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let vcpu = Vcpu::new(
            vm,
            0,
            Arc::new(io_bus),
            Arc::new(Bus::new()),
            exit,
            mem.clone(),
            profile,
        )
        .unwrap();
        (vcpu, recorder)
    }

    fn stop(handle: VcpuHandle) {
        let deadline = Instant::now() + Duration::from_secs(5);
        handle.send_event(VcpuEvent::Finish).unwrap();
        handle.join(deadline);
    }

    /// The guest TSC saved with a vCPU's state.
    /// A one-vCPU VM running the counting loop (it has counted past 3), or `None` (said on
    /// stderr) where there is no KVM.
    struct Counting {
        kvm: KvmContext,
        profile: CpuProfile,
        mem: GuestMemory,
        msrs: MsrIndex,
        vm: Vm,
        handle: VcpuHandle,
        counted: Recorder,
    }

    impl Counting {
        fn start() -> Option<Self> {
            let kvm = match KvmContext::open() {
                Ok(kvm) => kvm,
                Err(e) => {
                    eprintln!("skipping: {}", crate::error_chain(&e));
                    return None;
                }
            };
            install_kick_handler().unwrap();
            let profile = crate::config::CpuProfileChoice::Auto.resolve();
            let mem = create_guest_memory(16 << 20).unwrap();
            mem.write_slice(&COUNT_LOOP, GuestAddress(CODE)).unwrap();
            let msrs: MsrIndex = kvm.msr_index_list().unwrap().into();
            let vm = Vm::new(&kvm).unwrap();
            vm.set_up_platform(&mem).unwrap().wait().unwrap();
            let (vcpu, counted) = vcpu_on(&vm, &mem, profile);
            let boot = BootEntry {
                entry: GuestAddress(CODE),
                protocol: BootProtocol::Pvh,
            };
            vcpu.configure(&kvm, 1, Some(boot)).unwrap();
            let handle = vcpu.start().unwrap();
            counted.wait_for_more_than(3);
            Some(Self {
                kvm,
                profile,
                mem,
                msrs,
                vm,
                handle,
                counted,
            })
        }
    }

    fn saved_tsc(state: &VcpuState) -> u64 {
        let tsc = state.msrs.iter().find(|msr| msr.index == msr::IA32_TSC);
        tsc.expect("IA32_TSC is saved").data
    }

    /// A pause does not show in the guest's TSC. While paused, the saved TSC is the one the
    /// vCPU parked with, however long the pause. Resumed after longer than KVM's one-second
    /// TSC synchronization window (see `arch::tsc`) and paused again once it has run a
    /// little, the vCPU has a TSC that moved on by far less than the pause; that part is
    /// skipped on a nested-PVM host, whose guests read the host's TSC.
    #[test]
    fn a_pause_does_not_show_in_the_guest_tsc() {
        // The VM and its memory are held (not dropped) while the vCPU runs.
        let Some(Counting {
            kvm: _kvm,
            mem: _mem,
            vm: _vm,
            msrs,
            handle,
            counted,
            ..
        }) = Counting::start()
        else {
            return;
        };
        let deadline = || Instant::now() + Duration::from_secs(5);

        handle.send_event(VcpuEvent::Pause).unwrap();
        handle.wait_for(&VcpuEvent::Pause, deadline()).unwrap();
        let parked = handle.save_state(msrs.clone(), deadline()).unwrap();
        let pause = Duration::from_secs(2);
        std::thread::sleep(pause);
        let still_parked = handle.save_state(msrs.clone(), deadline()).unwrap();
        assert_eq!(saved_tsc(&still_parked), saved_tsc(&parked));
        if crate::arch::pvm::host_is_pvm() {
            stop(handle);
            eprintln!("skipping the resume: a nested-PVM guest reads the host's TSC");
            return;
        }
        handle.send_event(VcpuEvent::Resume).unwrap();
        handle.wait_for(&VcpuEvent::Resume, deadline()).unwrap();
        counted.wait_for_more_than(counted.written().len() + 3);
        handle.send_event(VcpuEvent::Pause).unwrap();
        handle.wait_for(&VcpuEvent::Pause, deadline()).unwrap();
        let resumed = handle.save_state(msrs, deadline()).unwrap();
        stop(handle);

        let khz = u64::from(parked.tsc_khz.expect("KVM reports the TSC frequency"));
        let (before, after) = (saved_tsc(&parked), saved_tsc(&resumed));
        // Without the hold the step is the whole pause (2 s); the vCPU ran for a few
        // milliseconds in between, a quarter of the pause leaves room for a busy host.
        let bound = khz * pause.as_millis() as u64 / 4;
        assert!(
            after > before && after - before < bound,
            "guest TSC {before} -> {after} across a {pause:?} pause at {khz} kHz"
        );
    }

    /// A guest counting on a port is paused and saved; its state goes through JSON into a
    /// fresh vCPU of a new VM on the same memory (with the first VM's interrupt
    /// controllers, PIT and clock), and the count goes on from exactly where it stopped.
    #[test]
    fn a_saved_vcpu_goes_on_in_a_new_vm() {
        let Some(Counting {
            kvm,
            profile,
            mem,
            msrs,
            vm: first,
            handle,
            counted,
        }) = Counting::start()
        else {
            return;
        };
        let deadline = || Instant::now() + Duration::from_secs(5);
        // A running vCPU does not hand out its state.
        assert!(handle.save_state(msrs.clone(), deadline()).is_err());
        handle.send_event(VcpuEvent::Pause).unwrap();
        handle.wait_for(&VcpuEvent::Pause, deadline()).unwrap();
        let before = counted.written();
        let saved = handle.save_state(msrs.clone(), deadline()).unwrap();
        let vm_state = first.save_state(first.save_clock().unwrap()).unwrap();
        stop(handle);
        assert_eq!(counted.written(), before, "the vCPU ran while paused");
        // Paused between `inc` and `out`, or anywhere else in the loop.
        let last = *before.last().unwrap();
        assert!([last, last.wrapping_add(1)].contains(&(saved.regs.rax as u8)));
        assert!(!saved.msrs.is_empty());
        assert_eq!(saved.compat.is_some(), profile == CpuProfile::Compat);

        let json = serde_json::to_string(&saved).unwrap();
        let loaded: VcpuState = serde_json::from_str(&json).unwrap();
        let vm_json = serde_json::to_string(&vm_state).unwrap();
        let vm_loaded: crate::vstate::vm::VmState = serde_json::from_str(&vm_json).unwrap();

        let second = Vm::new(&kvm).unwrap();
        second.set_up_platform(&mem).unwrap().wait().unwrap();
        second.restore_state(&vm_loaded).unwrap();
        let (mut vcpu, continued) = vcpu_on(&second, &mem, profile);
        vcpu.restore_state(&loaded).unwrap();
        let handle = vcpu.start().unwrap();
        let after = continued.wait_for_more_than(2);
        stop(handle);
        assert_eq!(
            after[..3],
            [
                last.wrapping_add(1),
                last.wrapping_add(2),
                last.wrapping_add(3)
            ],
            "before the save: ...{:?}",
            &before[before.len().saturating_sub(4)..]
        );
    }
}
