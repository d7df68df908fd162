//! Model-specific registers initialised before entry (the values a firmware would leave).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE.FAST_STRING.
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSR values as `(index, value)`.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

/// Writes [`boot_msrs`] into the vCPU; fails unless KVM accepted every one.
pub fn setup(vcpu: &VcpuFd) -> Result<()> {
    let list = boot_msrs();
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Config(format!("building the MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        let failed = list.get(written).map_or(0, |m| m.0);
        return Err(Error::Config(format!("KVM refused MSR {failed:#x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_strings_on_and_syscall_msrs_cleared() {
        let m = boot_msrs();
        assert!(m.contains(&(0x1a0, 1)));
        assert!(m.contains(&(0xc000_0082, 0)));
        let mut idx: Vec<u32> = m.iter().map(|x| x.0).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), m.len());
    }
}
