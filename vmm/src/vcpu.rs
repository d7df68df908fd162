//! One vCPU: its KVM state set-up, and the thread that runs it and dispatches its exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::{cpuid, msr};
use crate::bus::Bus;
use crate::outcome::{ExitLatch, Outcome};
use crate::{emulate, fault};
use crate::{Error, Result};

/// Entries requested from KVM_GET_SUPPORTED_CPUID.
const MAX_CPUID_ENTRIES: usize = 256;
/// LAPIC local vector table registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// KVM_SYSTEM_EVENT_SHUTDOWN / RESET.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process, so the signal interrupts KVM_RUN with
/// EINTR instead of killing the process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| Error::io("installing the vCPU kick signal handler")(e.into()));
    });
    result
}

/// A created and configured vCPU.
pub struct Vcpu {
    id: usize,
    fd: VcpuFd,
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuShared {
    pub bus: Arc<Bus>,
    pub latch: Arc<ExitLatch>,
    pub stop: Arc<AtomicBool>,
    pub mem: GuestMemoryMmap,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with filtered CPUID, boot MSRs and LAPIC LINT0/LINT1 wired
    /// as on a PC (ExtINT, NMI).
    pub fn new(kvm: &Kvm, vm: &VmFd, id: u8, count: u8) -> Result<Self> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::filter(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        msr::setup(&fd)?;
        let mut lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))?;
        Ok(Self {
            id: usize::from(id),
            fd,
        })
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// TSC frequency in kHz, 0 if KVM does not know it.
    pub fn tsc_khz(&self) -> u32 {
        self.fd.get_tsc_khz().unwrap_or(0)
    }

    /// Runs the vCPU until the VM stops. Every way out records an [`Outcome`] first (unless
    /// another thread already did, or `stop` was raised).
    pub fn run(mut self, shared: VcpuShared) {
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let outcome = self.run_once(&shared);
            if let Some(outcome) = outcome {
                shared.latch.set(outcome);
            }
            if shared.latch.is_set() {
                return;
            }
        }
    }

    /// One KVM_RUN and the handling of its exit; `Some` ends the VM.
    fn run_once(&mut self, shared: &VcpuShared) -> Option<Outcome> {
        let bus = &shared.bus;
        let what = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                return None;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.pio_write(port, data);
                return None;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                return None;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                return None;
            }
            Ok(VcpuExit::Intr) => return None,
            Ok(VcpuExit::SystemEvent(kind, _))
                if kind == SYSTEM_EVENT_SHUTDOWN || kind == SYSTEM_EVENT_RESET =>
            {
                return Some(Outcome::Reset);
            }
            Ok(VcpuExit::InternalError) => return self.internal_error(shared),
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::Hlt) => "halted with nothing to wake it (KVM_EXIT_HLT)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, host cpu {cpu})")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        Some(self.fault(shared, what, None))
    }

    fn internal_error(&mut self, shared: &VcpuShared) -> Option<Outcome> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the `internal`
        // member of the exit union; it is plain integers, valid for any bit pattern.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let bytes = (internal.suberror == fault::SUBERROR_EMULATION)
            .then(|| fault::emulation_insn_bytes(data))
            .flatten();
        if let Some(insn) = bytes.as_deref().and_then(emulate::decode) {
            // The host's emulator cannot run this one; do what the CPU would (see `emulate`).
            match self.complete(insn) {
                Ok(()) => return None,
                Err(e) => tracing::warn!("vCPU {}: completing {insn:?} failed: {e}", self.id),
            }
        }
        let what = match internal.suberror {
            fault::SUBERROR_EMULATION => "KVM internal error: instruction emulation failed".into(),
            s => format!("KVM internal error, suberror {s}, data {data:x?}"),
        };
        Some(self.fault(shared, what, bytes))
    }

    /// Completes `insn` for the guest: registers, RIP, and for `int3` the #BP exception.
    fn complete(&self, insn: emulate::Insn) -> Result<()> {
        let mut regs = self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        emulate::apply(insn, &mut regs);
        self.fd
            .set_regs(&regs)
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        if insn != emulate::Insn::Int3 {
            return Ok(());
        }
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.flags = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    /// Builds the fault outcome with registers and instruction bytes.
    fn fault(&self, shared: &VcpuShared, what: String, insn: Option<Vec<u8>>) -> Outcome {
        let mut text = what;
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                text.push_str("; ");
                text.push_str(&fault::regs_line(&regs, &sregs));
                match insn.or_else(|| fault::code_at(&shared.mem, &sregs, regs.rip)) {
                    Some(b) => text.push_str(&format!("; code at rip: {}", fault::hex(&b))),
                    None => text.push_str("; code at rip: unmapped"),
                }
            }
            (Err(e), _) | (_, Err(e)) => text.push_str(&format!("; registers unavailable: {e}")),
        }
        Outcome::Fault {
            cpu: self.id,
            what: text,
        }
    }
}

fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_is_replaced() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0xff_u8 as libc::c_char;
        regs[APIC_LVT0 + 1] = 0xff_u8 as libc::c_char;
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0xff);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0xf8 | 0x7);
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x4);
    }
}
