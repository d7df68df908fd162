//! 64-bit entry state shared by both boot paths: a flat GDT, an identity map of the first
//! 4 GiB with 2 MiB pages, and the control registers of the guest contract.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use crate::layout::{GDT_ADDR, PAGE_TABLES_END, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::memory;
use crate::Result;

/// CR0: PE | MP | ET | NE | WP | PG.
pub const CR0: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = 0x20 | 0x200 | 0x400;
/// EFER: SCE | LME | LMA.
pub const EFER: u64 = 0x1 | 0x100 | 0x400;

/// A 64-bit flat code segment descriptor (present, DPL 0, execute/read, L=1, G=1).
const CODE64: u64 = 0x00af_9b00_0000_ffff;
/// A flat data segment descriptor (present, DPL 0, read/write, D/B=1, G=1).
const DATA: u64 = 0x00cf_9300_0000_ffff;

/// Code and data selectors of the initial GDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selectors {
    pub code: u16,
    pub data: u16,
}

/// The test guest contract: CS 0x08, data 0x10.
pub const TEST_GUEST_SELECTORS: Selectors = Selectors {
    code: 0x08,
    data: 0x10,
};
/// The Linux 64-bit boot protocol: `__BOOT_CS` 0x10, `__BOOT_DS` 0x18.
pub const LINUX_SELECTORS: Selectors = Selectors {
    code: 0x10,
    data: 0x18,
};

/// The GDT as 8-byte descriptors for `sel` (null descriptors elsewhere).
pub fn gdt_entries(sel: Selectors) -> Vec<u64> {
    let n = usize::from(sel.code.max(sel.data) / 8) + 1;
    let mut gdt = vec![0u64; n];
    gdt[usize::from(sel.code / 8)] = CODE64;
    gdt[usize::from(sel.data / 8)] = DATA;
    gdt
}

/// The identity map as `(address, entry)` pairs: PML4[0], 4 PDPT entries, 2048 PD entries.
pub fn page_table_entries() -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(1 + 4 + 2048);
    out.push((PML4_ADDR, PDPT_ADDR | 0x3));
    for i in 0..4u64 {
        out.push((PDPT_ADDR + i * 8, (PD_ADDR + i * 0x1000) | 0x3));
    }
    for i in 0..2048u64 {
        // present | writable | page size (2 MiB)
        out.push((PD_ADDR + i * 8, (i << 21) | 0x83));
    }
    out
}

/// Writes the GDT and the page tables into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, sel: Selectors) -> Result<()> {
    let gdt: Vec<u8> = gdt_entries(sel)
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    memory::write(mem, GDT_ADDR, &gdt)?;
    memory::write(
        mem,
        PML4_ADDR,
        &vec![0u8; (PAGE_TABLES_END - PML4_ADDR) as usize],
    )?;
    for (addr, entry) in page_table_entries() {
        memory::write(mem, addr, &entry.to_le_bytes())?;
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs` for 64-bit entry with the tables written by [`write_tables`].
pub fn set_sregs(sregs: &mut kvm_sregs, sel: Selectors) {
    let code = segment(sel.code, true);
    let data = segment(sel.data, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt_entries(sel).len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn control_registers_match_the_contract() {
        assert_eq!(CR0, 0x8001_0033);
        assert_eq!(CR4, 0x620);
        assert_eq!(EFER, 0x501);
    }

    #[test]
    fn gdt_layouts() {
        assert_eq!(gdt_entries(TEST_GUEST_SELECTORS), vec![0, CODE64, DATA]);
        assert_eq!(gdt_entries(LINUX_SELECTORS), vec![0, 0, CODE64, DATA]);
        let mut s = kvm_sregs::default();
        set_sregs(&mut s, LINUX_SELECTORS);
        assert_eq!(s.gdt.limit, 31);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!((s.ss.selector, s.ss.l, s.ss.db), (0x18, 0, 1));
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mem = memory::create(16 << 20).unwrap();
        write_tables(&mem, TEST_GUEST_SELECTORS).unwrap();
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(rd(PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(rd(PML4_ADDR + 8), 0);
        assert_eq!(rd(PDPT_ADDR + 3 * 8), (PD_ADDR + 0x3000) | 3);
        // 0xD000_0000 (the MMIO window) lies in PD 3, entry 128.
        let pd_entry = PD_ADDR + 3 * 0x1000 + 128 * 8;
        assert_eq!(rd(pd_entry), 0xd000_0000 | 0x83);
        assert_eq!(rd(PD_ADDR + 3 * 0x1000 + 511 * 8), 0xffe0_0000 | 0x83);
        assert_eq!(rd(GDT_ADDR + 8), CODE64);
    }
}
