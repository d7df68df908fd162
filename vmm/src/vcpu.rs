//! One vCPU: its KVM state set-up, and the thread that runs it and dispatches its exits.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::{cpuid, msr};
use crate::bus::Bus;
use crate::control::{Command, Control};
use crate::mmio::MmioInterrupt;
use crate::outcome::{ExitLatch, Outcome};
use crate::snapshot::{CpuContext, VcpuState};
use crate::wait_port::{self, WAIT_PORT};
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

thread_local! {
    /// The `kvm_run` area of the vCPU this thread runs (null on other threads).
    static KICK_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Most exits handled while completing a pending I/O before parking (a string I/O
/// instruction may need several).
const SETTLE_EXITS: usize = 4096;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread local without destructor: reading it allocates nothing and
    // cannot fail, so this is async-signal-safe.
    let _ = KICK_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is only stored by `KickTarget` for the lifetime of
            // this thread's vCPU mapping (cleared before the `VcpuFd` is dropped); the signal
            // runs on that same thread, and a byte-sized volatile store cannot tear.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Points the kick handler at this thread's `kvm_run` while it lives.
struct KickTarget;

impl KickTarget {
    fn install(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KICK_RUN.with(|p| p.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KICK_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Marks the vCPU's control slot as gone when its thread ends (also on panic).
struct Registration<'a> {
    control: &'a Control,
    id: usize,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.control.unregister(self.id);
    }
}

/// What one KVM_RUN came to.
enum Step {
    /// An exit was handled; run again.
    Continue,
    /// KVM_RUN returned EINTR (a kick, or `immediate_exit`).
    Interrupted,
    /// The VM ends.
    End(Outcome),
}

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
    /// The virtio device's interrupt, for the wait port (set when the thread starts).
    waiter: Option<Arc<MmioInterrupt>>,
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuShared {
    pub bus: Arc<Bus>,
    pub latch: Arc<ExitLatch>,
    pub stop: Arc<AtomicBool>,
    pub mem: GuestMemoryMmap,
    pub(crate) control: Arc<Control>,
    pub cpu: Arc<CpuContext>,
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
            waiter: None,
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
    /// another thread already did, or `stop` was raised). While a pause is requested the
    /// thread parks (see [`crate::control`]).
    pub fn run(mut self, shared: VcpuShared) {
        let _kick = KickTarget::install(&mut self.fd);
        self.waiter = shared.bus.virtio_interrupt();
        shared.control.register(self.id);
        let _registration = Registration {
            control: &shared.control,
            id: self.id,
        };
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.control.pause_requested() {
                if let Err(outcome) = self.settle(&shared) {
                    shared.latch.set(outcome);
                    return;
                }
                let cpu = Arc::clone(&shared.cpu);
                let fd = &self.fd;
                let resumed = shared.control.park(self.id, |cmd| match cmd {
                    Command::Capture(reply) => {
                        let _ = reply.send(VcpuState::save(fd, &cpu));
                    }
                });
                if !resumed {
                    return;
                }
                continue;
            }
            if let Step::End(outcome) = self.run_once(&shared) {
                shared.latch.set(outcome);
            }
            if shared.latch.is_set() {
                return;
            }
        }
    }

    /// Before parking: re-enters KVM_RUN with `immediate_exit` set so KVM completes an I/O
    /// or MMIO access the last exit left pending (its result lands in the registers) without
    /// running further guest instructions; the state is then consistent to save.
    fn settle(&mut self, shared: &VcpuShared) -> std::result::Result<(), Outcome> {
        for _ in 0..SETTLE_EXITS {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once(shared) {
                Step::Interrupted => return Ok(()),
                Step::Continue => {}
                Step::End(outcome) => return Err(outcome),
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        Err(Outcome::Fault {
            cpu: self.id,
            what: "pending I/O did not complete before pausing".into(),
        })
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self, shared: &VcpuShared) -> Step {
        let bus = &shared.bus;
        let what = match self.fd.run() {
            Ok(VcpuExit::IoIn(WAIT_PORT, data)) if data.len() == 4 && self.waiter.is_some() => {
                if let Some(irq) = &self.waiter {
                    let bits = wait_port::wait(irq, kick_signal(), || {
                        shared.control.pause_requested() || shared.stop.load(Ordering::Acquire)
                    });
                    data.copy_from_slice(&bits.to_le_bytes());
                }
                return Step::Continue;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                return Step::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.pio_write(port, data);
                return Step::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                return Step::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                return Step::Continue;
            }
            Ok(VcpuExit::Intr) => return Step::Continue,
            Ok(VcpuExit::SystemEvent(kind, _))
                if kind == SYSTEM_EVENT_SHUTDOWN || kind == SYSTEM_EVENT_RESET =>
            {
                return Step::End(Outcome::Reset);
            }
            Ok(VcpuExit::InternalError) => {
                return match self.internal_error(shared) {
                    Some(outcome) => Step::End(outcome),
                    None => Step::Continue,
                }
            }
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::Hlt) => "halted with nothing to wake it (KVM_EXIT_HLT)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, host cpu {cpu})")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Cleared before the caller looks at the pause flag: a kick after this point
                // is seen through the flag, one before it has done its job.
                self.fd.set_kvm_immediate_exit(0);
                return Step::Interrupted;
            }
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        Step::End(self.fault(shared, what, None))
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
