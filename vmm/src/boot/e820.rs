//! The BIOS E820 memory map handed to Linux in `boot_params`.

use crate::layout::{EBDA_START, HIGH_RAM_START, KERNEL_START, MMIO_HOLE_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (here: the EBDA page holding the MP table).
pub const E820_RESERVED: u32 = 2;

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map for `mem_size` bytes of RAM laid out by [`crate::layout::ram_ranges`].
pub fn entries(mem_size: u64) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa_0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > KERNEL_START {
        out.push(E820Entry {
            addr: KERNEL_START,
            size: low_end - KERNEL_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_HOLE_START {
        out.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm() {
        let e = entries(256 << 20);
        assert_eq!(
            e,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_vm_skips_the_hole() {
        let e = entries(5 << 30);
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[2],
            E820Entry {
                addr: 0x10_0000,
                size: 0xc000_0000 - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            e[3],
            E820Entry {
                addr: 1 << 32,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = e
            .iter()
            .filter(|x| x.kind == E820_RAM)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (0x10_0000 - 0x9_fc00));
    }
}
