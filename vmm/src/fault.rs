//! Turning an unexpected vCPU stop into a readable report: registers, and the instruction
//! bytes at RIP (from KVM's emulation-failure data, or read through the guest page tables).

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// KVM_INTERNAL_ERROR_EMULATION.
pub const SUBERROR_EMULATION: u32 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.
const FLAG_INSTRUCTION_BYTES: u64 = 1;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Instruction bytes from the `internal.data` of an emulation failure, if KVM supplied them
/// (layout of `kvm_run.emulation_failure`: flags, then insn_size:u8 + insn_bytes[15]).
pub fn emulation_insn_bytes(data: &[u64]) -> Option<Vec<u8>> {
    if data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = usize::from(raw[0]).min(15);
    Some(raw[1..1 + size].to_vec())
}

/// Translates a guest virtual address through 4-level long-mode page tables.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, va: u64) -> Option<u64> {
    const PG: u64 = 1 << 31;
    const LMA: u64 = 1 << 10;
    if sregs.cr0 & PG == 0 {
        return Some(va);
    }
    if sregs.efer & LMA == 0 {
        return None;
    }
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    let mut table = sregs.cr3 & ADDR_MASK;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let entry = read(table + ((va >> shift) & 0x1ff) * 8)?;
        if entry & 1 == 0 {
            return None;
        }
        let huge = level < 4 && level > 1 && entry & 0x80 != 0;
        if huge || level == 1 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Up to 16 bytes at `rip` (stopping at a page boundary), or `None` if unmapped.
pub fn code_at(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rip: u64) -> Option<Vec<u8>> {
    let pa = translate(mem, sregs, sregs.cs.base.wrapping_add(rip))?;
    let n = (0x1000 - (pa & 0xfff)).min(16) as usize;
    let mut buf = vec![0u8; n];
    mem.read_slice(&mut buf, GuestAddress(pa)).ok()?;
    Some(buf)
}

/// Hex bytes separated by spaces.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line with the registers that locate a fault.
pub fn regs_line(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cs.selector,
        sregs.cs.dpl,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::long_mode::{self, TEST_GUEST_SELECTORS};
    use crate::memory;

    #[test]
    fn decodes_emulation_failure_bytes() {
        // flags=1, size=2, bytes 0f 0b
        let d1 = u64::from_le_bytes([2, 0x0f, 0x0b, 0x90, 0x90, 0x90, 0x90, 0x90]);
        assert_eq!(
            emulation_insn_bytes(&[1, d1, 0x9090_9090_9090_9090]),
            Some(vec![0x0f, 0x0b])
        );
        assert_eq!(emulation_insn_bytes(&[0, d1, 0]), None);
        assert_eq!(emulation_insn_bytes(&[1]), None);
        let big = u64::from_le_bytes([200, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            emulation_insn_bytes(&[1, big, 0]).map(|v| v.len()),
            Some(15)
        );
    }

    #[test]
    fn walks_the_identity_map() {
        let mem = memory::create(16 << 20).unwrap();
        long_mode::write_tables(&mem, TEST_GUEST_SELECTORS).unwrap();
        memory::write(&mem, 0x10_0000, &[0xcc, 0xf4]).unwrap();
        let mut sregs = kvm_sregs::default();
        long_mode::set_sregs(&mut sregs, TEST_GUEST_SELECTORS);
        assert_eq!(translate(&mem, &sregs, 0x12_3456), Some(0x12_3456));
        assert_eq!(translate(&mem, &sregs, 0x1_0000_0000), None);
        let code = code_at(&mem, &sregs, 0x10_0000).unwrap();
        assert_eq!(&code[..2], &[0xcc, 0xf4]);
        assert_eq!(code.len(), 16);
        assert_eq!(code_at(&mem, &sregs, 0x10_0ffe).unwrap().len(), 2);
        assert_eq!(hex(&[0x0f, 0xab]), "0f ab");
    }
}
