//! The guest physical memory map and I/O port assignments (see docs/GUEST-CONTRACT in the notes:
//! the test guest relies on every address here).

/// The VMM's initial GDT (entry only).
pub const GDT_ADDR: u64 = 0x500;
/// The test guest's BootInfo page; for Linux the same page holds `boot_params` (the zero page).
pub const BOOT_INFO_ADDR: u64 = crate::test_guest::BOOT_INFO_ADDR;
/// Initial stack pointer of the test guest.
pub const TEST_GUEST_STACK: u64 = crate::test_guest::ENTRY_STACK;
/// Initial stack pointer for Linux (its 64-bit entry switches to its own stack at once).
pub const LINUX_STACK: u64 = 0x8ff0;
/// First page of the VMM's identity page tables: PML4, then PDPT, then four PDs (4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) of the identity map.
pub const PD_ADDR: u64 = 0xb000;
/// End (exclusive) of the identity page tables.
pub const PAGE_TABLES_END: u64 = 0xf000;
/// The Linux kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line we write (the kernel may accept less; see `setup_header.cmdline_size`).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: usable low RAM ends here, the MP table lives here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the test guest image and a bzImage's protected-mode kernel are loaded (1 MiB).
pub const KERNEL_START: u64 = crate::test_guest::LOAD_ADDR;
/// Guest RAM below the 32-bit MMIO hole ends here at most (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM above the hole starts here (4 GiB).
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Base address of the virtio-mmio device window.
pub const MMIO_BASE: u64 = crate::test_guest::MMIO_BASE;
/// Size of the virtio-mmio device window.
pub const MMIO_SIZE: u64 = crate::test_guest::MMIO_SIZE;
/// GSI (IOAPIC pin) of the virtio-mmio device.
pub const MMIO_IRQ: u32 = crate::test_guest::MMIO_IRQ;

/// COM1 base port.
pub const SERIAL_PORT: u16 = crate::test_guest::SERIAL_PORT;
/// Number of COM1 registers.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1 IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// Test guest exit port (32-bit `out`, value = exit status).
pub const EXIT_PORT: u16 = crate::test_guest::EXIT_PORT;

/// Guest RAM ranges `(start, len)` for `mem_size` bytes of RAM, skipping the MMIO hole.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, mem_size - MMIO_HOLE_START),
        ]
    }
}

// The fixed regions must not overlap (checked at compile time).
const _: () = {
    assert!(GDT_ADDR + 0x100 <= BOOT_INFO_ADDR);
    assert!(BOOT_INFO_ADDR + 0x1000 <= PML4_ADDR);
    assert!(PD_ADDR + 4 * 0x1000 == PAGE_TABLES_END);
    assert!(PAGE_TABLES_END <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
    assert!(
        crate::test_guest::BOOT_INFO_WORKLOAD_OFFSET + crate::test_guest::WORKLOAD_MAX <= 0x1000
    );
    assert!(MMIO_BASE >= MMIO_HOLE_START && MMIO_BASE + MMIO_SIZE <= HIGH_RAM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
    }
}
