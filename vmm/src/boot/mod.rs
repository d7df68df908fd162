//! Booting: the built-in test guest or a Linux kernel, and the vCPU state both need.

pub mod cmdline;
pub mod cpuid;
pub mod decompress;
pub mod e820;
pub mod file;
pub mod linux;
pub mod long_mode;
pub mod mptable;
pub mod msr;
pub mod test_guest;

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub selectors: long_mode::Selectors,
}

/// Puts the boot vCPU in 64-bit mode at `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: &Entry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    long_mode::set_sregs(&mut sregs, entry.selectors);
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    Ok(())
}
