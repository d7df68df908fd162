//! An Intel MultiProcessor Specification 1.4 table, so Linux finds the vCPUs and the IOAPIC
//! without ACPI. Floating pointer at the EBDA start (0x9FC00), configuration table right after.

use crate::layout::EBDA_START;

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC pins.
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature; FPU | APIC feature flags.
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURES: u32 = 0x001 | 0x200;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Size of the EBDA page the table lives in.
const TABLE_SPACE: usize = 0x400;
/// The most vCPUs whose processor entries fit in [`TABLE_SPACE`].
pub const MAX_CPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs; returns the bytes
/// to write at [`EBDA_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, String> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(format!(
            "the MP table supports 1 to {MAX_CPUS} vCPUs, not {cpus}"
        ));
    }
    let ioapic_id = cpus + 1;
    let table_addr = EBDA_START as u32 + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[
            0,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { MP_EXTINT } else { MP_INT };
        // type, irq type, flags (conforming: 2 bytes), source bus, source irq, dest apic, pin
        entries.extend_from_slice(&[3, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let length = u16::try_from(44 + entries.len()).map_err(|_| "MP table too large".to_string())?;
    header.extend_from_slice(&length.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"STRATA  ");
    header.extend_from_slice(b"STRATA VMM  ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length (16-byte units), rev, checksum, features
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    if out.len() > TABLE_SPACE {
        return Err(format!(
            "MP table for {cpus} vCPUs does not fit in the EBDA"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            // First processor entry is the enabled BSP with APIC ID 0.
            assert_eq!(&cfg[44..48], &[0, 0, APIC_VERSION, 3]);
        }
    }

    #[test]
    fn limits() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }
}
