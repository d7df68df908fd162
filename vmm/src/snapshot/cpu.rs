//! vCPU and VM (in-kernel irqchip, PIT, kvmclock) state: save from KVM, validate, restore.
//!
//! KVM structures are stored as their exact bytes ([`Blob`]); a blob of the wrong length is
//! refused rather than padded. Every blob of a state is converted (and every field checked)
//! before the first `KVM_SET_*` call.
//!
//! Order matters (as in Firecracker and Cloud Hypervisor):
//! - save: MP state first (`KVM_GET_MP_STATE` lets the LAPIC accept pending INIT/SIPI), vCPU
//!   events after the LAPIC;
//! - restore: MP state, regs, sregs (which carry the APIC base), FPU, XSAVE, XCRs, LAPIC (after
//!   sregs), TSC frequency, MSRs (after the LAPIC: the TSC deadline MSR needs it configured; the
//!   TSC itself is the IA32_TSC MSR), debug registers, and vCPU events last (`KVM_SET_REGS`
//!   clears pending exceptions that the events restore).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_SUSPENDED,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::mirror::mirror_fields;
use crate::{Error, Result};

/// Most MSRs a vCPU state may carry (KVM reports ~40 here; the cap only bounds a hostile file).
pub const MAX_MSRS: usize = 1024;
/// The classic `kvm_xsave` area size; larger XSAVE state (AMX) is not supported.
const XSAVE_LEGACY_SIZE: i32 = 4096;

/// The exact bytes of one KVM structure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    fn of<T: IntoBytes + Immutable>(v: &T) -> Self {
        Blob(v.as_bytes().to_vec())
    }

    fn to<T: FromBytes>(&self, what: &str) -> Result<T> {
        T::read_from_bytes(&self.0).map_err(|_| {
            Error::State(format!(
                "{what} is {} bytes, expected {}",
                self.0.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
}

/// The x87/SSE state of `KVM_GET_FPU` (XSAVE holds it too; both are restored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

mirror_fields!(
    FpuState,
    kvm_fpu,
    {
        fpr,
        fcw,
        fsw,
        ftwx,
        last_opcode,
        last_ip,
        last_dp,
        xmm,
        mxcsr,
        ..Default::default()
    }
);

/// One MSR value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// What KVM can save of this host's vCPUs, probed once per VM.
#[derive(Debug, Clone)]
pub struct CpuContext {
    /// KVM's saveable MSR list (`KVM_GET_MSR_INDEX_LIST`), less those that cannot be read.
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_XSAVE2: the XSAVE area size (0 if the capability is absent).
    pub xsave_size: i32,
}

impl CpuContext {
    /// Refuses hosts whose XSAVE state does not fit `kvm_xsave` (dynamically enabled features
    /// such as AMX): checkpoints would lose it, and KVM_SET_XSAVE would read past the struct.
    fn check_xsave(&self) -> Result<()> {
        if self.xsave_size > XSAVE_LEGACY_SIZE {
            return Err(Error::Config(format!(
                "this host's XSAVE state is {} bytes; checkpoints support {XSAVE_LEGACY_SIZE}",
                self.xsave_size
            )));
        }
        Ok(())
    }
}

impl CpuContext {
    /// Probes `kvm` and a created (not yet run) vCPU `fd` of `vm`.
    pub fn probe(kvm: &Kvm, vm: &VmFd, fd: &VcpuFd) -> Result<Self> {
        let xsave_size = vm.check_extension_int(Cap::Xsave2);
        let list = kvm
            .get_msr_index_list()
            .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let mut msr_indices = Vec::new();
        for &index in list.as_slice() {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| Error::Config(format!("MSR buffer: {e:?}")))?;
            match fd.get_msrs(&mut one) {
                Ok(1) => msr_indices.push(index),
                _ => tracing::debug!("MSR {index:#x} is listed but cannot be read; not saved"),
            }
        }
        msr_indices.truncate(MAX_MSRS);
        Ok(Self {
            msr_indices,
            xsave_size,
        })
    }
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: Blob,
    pub sregs: Blob,
    pub fpu: FpuState,
    pub xsave: Blob,
    pub xcrs: Blob,
    pub lapic: Blob,
    pub msrs: Vec<MsrValue>,
    pub events: Blob,
    pub mp_state: u32,
    pub debugregs: Blob,
    /// TSC frequency (kHz); 0 when KVM does not know it.
    pub tsc_khz: u32,
}

/// A [`VcpuState`] with every blob converted.
struct Parsed {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Msrs,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

impl VcpuState {
    /// Reads the state of `fd`, which must not be running (call it on the parked vCPU's thread).
    pub fn save(fd: &VcpuFd, ctx: &CpuContext) -> Result<Self> {
        ctx.check_xsave()?;
        let mp_state = fd.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
        let xsave = fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
        let lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = ctx
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Config(format!("MSR buffer: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        if n != entries.len() {
            let bad = entries.get(n).map_or(0, |e| e.index);
            return Err(Error::Capture(format!(
                "KVM_GET_MSRS stopped at MSR {bad:#x} ({n} of {})",
                entries.len()
            )));
        }
        let msrs = msrs
            .as_slice()
            .iter()
            .map(|e| MsrValue {
                index: e.index,
                data: e.data,
            })
            .collect();
        let events = fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
        Ok(Self {
            regs: Blob::of(&regs),
            sregs: Blob::of(&sregs),
            fpu: FpuState::from(&fpu),
            xsave: Blob::of(&xsave),
            xcrs: Blob::of(&xcrs),
            lapic: Blob::of(&lapic),
            msrs,
            events: Blob::of(&events),
            mp_state: mp_state.mp_state,
            debugregs: Blob::of(&debugregs),
            tsc_khz: fd.get_tsc_khz().unwrap_or(0),
        })
    }

    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<()> {
        self.parse().map(|_| ())
    }

    fn parse(&self) -> Result<Parsed> {
        if self.mp_state > KVM_MP_STATE_SUSPENDED {
            return Err(Error::State(format!(
                "vCPU MP state {} is unknown",
                self.mp_state
            )));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(Error::State(format!(
                "{} MSRs exceed the limit of {MAX_MSRS}",
                self.msrs.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.msrs {
            if !seen.insert(m.index) {
                return Err(Error::State(format!("MSR {:#x} appears twice", m.index)));
            }
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        Ok(Parsed {
            regs: self.regs.to("regs")?,
            sregs: self.sregs.to("sregs")?,
            fpu: kvm_fpu::from(&self.fpu),
            xsave: self.xsave.to("XSAVE area")?,
            xcrs: self.xcrs.to("XCRs")?,
            lapic: self.lapic.to("LAPIC state")?,
            msrs: Msrs::from_entries(&entries)
                .map_err(|e| Error::State(format!("MSR list: {e:?}")))?,
            events: self.events.to("vCPU events")?,
            mp_state: kvm_mp_state {
                mp_state: self.mp_state,
            },
            debugregs: self.debugregs.to("debug registers")?,
        })
    }

    /// Loads this state into `fd` (a created vCPU of the VM `ctx` was probed on, not run
    /// since).
    pub fn restore(&self, fd: &VcpuFd, ctx: &CpuContext) -> Result<()> {
        ctx.check_xsave()?;
        let p = self.parse()?;
        fd.set_mp_state(p.mp_state)
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&p.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&p.sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        fd.set_fpu(&p.fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
        // SAFETY: `check_xsave` above refused this host unless KVM_CAP_XSAVE2 reports at most
        // the 4096 bytes of `kvm_xsave`, so KVM reads no more than the struct we pass.
        unsafe { fd.set_xsave(&p.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&p.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        fd.set_lapic(&p.lapic)
            .map_err(Error::kvm("KVM_SET_LAPIC"))?;
        if self.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(self.tsc_khz) {
            fd.set_tsc_khz(self.tsc_khz)
                .map_err(Error::kvm("KVM_SET_TSC_KHZ"))?;
        }
        let n = fd.set_msrs(&p.msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            let bad = self.msrs.get(n).map_or(0, |m| m.index);
            return Err(Error::State(format!(
                "KVM refused MSR {bad:#x} ({n} of {} restored)",
                self.msrs.len()
            )));
        }
        fd.set_debug_regs(&p.debugregs)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_vcpu_events(&p.events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The VM-wide KVM state: in-kernel PIC pair and IOAPIC, PIT, kvmclock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Blob,
    pub pic_slave: Blob,
    pub ioapic: Blob,
    pub pit: Blob,
    pub clock: Blob,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the VM state (vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<Self> {
        let pit = vm.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
        Ok(Self {
            pic_master: Blob::of(&get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?),
            pic_slave: Blob::of(&get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?),
            ioapic: Blob::of(&get_chip(vm, KVM_IRQCHIP_IOAPIC)?),
            pit: Blob::of(&pit),
            clock: Blob::of(&clock),
        })
    }

    fn parse(&self) -> Result<([kvm_irqchip; 3], kvm_pit_state2, kvm_clock_data)> {
        let chips = [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
        ];
        let mut out = [kvm_irqchip::default(); 3];
        for (slot, (blob, id, what)) in out.iter_mut().zip(chips) {
            let chip: kvm_irqchip = blob.to(what)?;
            if chip.chip_id != id {
                return Err(Error::State(format!(
                    "{what} state is for irqchip {}, expected {id}",
                    chip.chip_id
                )));
            }
            *slot = chip;
        }
        let mut clock: kvm_clock_data = self.clock.to("kvmclock")?;
        // Continue the clock from the saved instant (as the TSC does), not from wall time.
        clock.flags = 0;
        Ok((out, self.pit.to("PIT state")?, clock))
    }

    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<()> {
        self.parse().map(|_| ())
    }

    /// Loads this state into `vm` (irqchip and PIT created, no vCPU running).
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        let (chips, pit, clock) = self.parse()?;
        vm.set_pit2(&pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
        vm.set_clock(&clock).map_err(Error::kvm("KVM_SET_CLOCK"))?;
        for chip in &chips {
            vm.set_irqchip(chip)
                .map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_of_the_wrong_length_are_refused() {
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let b = Blob::of(&regs);
        assert_eq!(b.to::<kvm_regs>("regs").unwrap().rip, 0x1234);
        let short = Blob(b.0[..b.0.len() - 1].to_vec());
        let err = short.to::<kvm_regs>("regs").unwrap_err().to_string();
        assert!(err.contains("regs is 143 bytes, expected 144"), "{err}");
    }

    #[test]
    fn fpu_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[3][7] = 9;
        let back = kvm_fpu::from(&FpuState::from(&f));
        assert_eq!(back, f);
    }
}
