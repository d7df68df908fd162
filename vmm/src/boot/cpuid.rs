//! CPUID: what KVM supports, with per-vCPU topology and without the features whose
//! instructions the host's CPL0 emulator cannot run (see KVM-NOTES: on this nested KVM, guest
//! kernel code is emulated and dies on `xrstor`, `popcnt`, `clac`, `cmpxchg16b`...).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bits removed: FMA(12), CX16(13), POPCNT(23), XSAVE(26), OSXSAVE(27), AVX(28),
/// F16C(29).
const LEAF1_ECX_MASK: u32 =
    (1 << 12) | (1 << 13) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29);
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (more than one logical processor field valid).
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID entries for vCPU `id` of `count`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx = (e.ecx & !LEAF1_ECX_MASK) | LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Structured extended features (SMAP/clac, AVX2, ...): none.
            7 => {
                if e.index == 0 {
                    e.eax = 0;
                }
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // XSAVE state enumeration: none (XSAVE is masked above).
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // x2APIC topology: this vCPU's APIC ID.
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_masks() {
        let mut e = vec![
            entry(1, 0),
            entry(7, 0),
            entry(0xd, 1),
            entry(0xb, 0),
            entry(0x8000_0001, 0),
        ];
        filter(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xffff);
        assert_eq!(e[0].ecx & LEAF1_ECX_MASK, 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (0, 0, 0, 0));
        assert_eq!((e[2].eax, e[2].ebx), (0, 0));
        assert_eq!(e[3].edx, 3);
        assert_eq!(e[4].ecx, u32::MAX);
    }
}
