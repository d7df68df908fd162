//! Finishing instructions the host's CPL0 emulator gives up on.
//!
//! On this workplace's nested KVM, guest kernel code is run by KVM's instruction emulator,
//! which lacks some instructions (KVM-NOTES: `int3`, `fwait`, `popcnt`, `clac`, ...) and then
//! exits with an emulation failure carrying the instruction bytes. For a few simple ones we
//! do what the CPU would and resume the guest; anything else stays a fault.

use kvm_bindings::kvm_regs;

/// RFLAGS bits touched here.
const FLAG_CF: u64 = 1 << 0;
const FLAG_PF: u64 = 1 << 2;
const FLAG_AF: u64 = 1 << 4;
const FLAG_ZF: u64 = 1 << 6;
const FLAG_SF: u64 = 1 << 7;
const FLAG_OF: u64 = 1 << 11;
const FLAG_AC: u64 = 1 << 18;

/// An instruction we can complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `int3`: raise #BP with RIP after the instruction.
    Int3,
    /// `fwait`: no pending x87 exception is ever left unmasked by Linux here; a no-op.
    Fwait,
    /// `clac` / `stac`: clear / set RFLAGS.AC.
    SetAc(bool),
    /// `popcnt reg, reg` with the operand size in bytes.
    Popcnt { dst: u8, src: u8, size: u8, len: u8 },
}

impl Insn {
    /// Length in bytes.
    pub fn length(&self) -> u64 {
        match self {
            Insn::Int3 | Insn::Fwait => 1,
            Insn::SetAc(_) => 3,
            Insn::Popcnt { len, .. } => u64::from(*len),
        }
    }
}

/// Decodes the instructions we handle from the bytes at RIP.
pub fn decode(bytes: &[u8]) -> Option<Insn> {
    match bytes {
        [0xcc, ..] => return Some(Insn::Int3),
        [0x9b, ..] => return Some(Insn::Fwait),
        [0x0f, 0x01, 0xca, ..] => return Some(Insn::SetAc(false)),
        [0x0f, 0x01, 0xcb, ..] => return Some(Insn::SetAc(true)),
        _ => {}
    }
    // popcnt: [66] F3 [REX] 0F B8 /r, register form only.
    let mut i = 0;
    let mut size = 4u8;
    let mut saw_f3 = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => size = 2,
            0xf3 => saw_f3 = true,
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b) = bytes.get(i) {
        if b & 0xf0 == 0x40 {
            rex = b;
            i += 1;
        }
    }
    if !saw_f3 || bytes.get(i..i + 2) != Some(&[0x0f, 0xb8]) {
        return None;
    }
    let modrm = *bytes.get(i + 2)?;
    if modrm >> 6 != 3 {
        return None;
    }
    if rex & 0x8 != 0 {
        size = 8;
    }
    let dst = ((modrm >> 3) & 7) | if rex & 0x4 != 0 { 8 } else { 0 };
    let src = (modrm & 7) | if rex & 0x1 != 0 { 8 } else { 0 };
    Some(Insn::Popcnt {
        dst,
        src,
        size,
        len: (i + 3) as u8,
    })
}

fn reg_mut(regs: &mut kvm_regs, n: u8) -> &mut u64 {
    match n & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Applies `insn` (other than `Int3`, which needs an exception injected) to `regs`, including
/// advancing RIP.
pub fn apply(insn: Insn, regs: &mut kvm_regs) {
    match insn {
        Insn::Int3 | Insn::Fwait => {}
        Insn::SetAc(true) => regs.rflags |= FLAG_AC,
        Insn::SetAc(false) => regs.rflags &= !FLAG_AC,
        Insn::Popcnt { dst, src, size, .. } => {
            let mask = match size {
                2 => 0xffff,
                4 => 0xffff_ffff,
                _ => u64::MAX,
            };
            let value = *reg_mut(regs, src) & mask;
            let count = u64::from(value.count_ones());
            let d = reg_mut(regs, dst);
            *d = match size {
                2 => (*d & !0xffff) | count,
                _ => count, // 32-bit results zero-extend
            };
            regs.rflags &= !(FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF);
            if value == 0 {
                regs.rflags |= FLAG_ZF;
            }
        }
    }
    regs.rip = regs.rip.wrapping_add(insn.length());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_handled_instructions() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Insn::Int3));
        assert_eq!(decode(&[0x9b]), Some(Insn::Fwait));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), Some(Insn::SetAc(false)));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]), Some(Insn::SetAc(true)));
        // popcnt %rdi, %rax (the kernel's hweight64)
        assert_eq!(
            decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x41]),
            Some(Insn::Popcnt {
                dst: 0,
                src: 7,
                size: 8,
                len: 5
            })
        );
        // popcnt %r9d, %r10d
        assert_eq!(
            decode(&[0xf3, 0x45, 0x0f, 0xb8, 0xd1]),
            Some(Insn::Popcnt {
                dst: 10,
                src: 9,
                size: 4,
                len: 5
            })
        );
        // 16-bit form
        assert_eq!(
            decode(&[0x66, 0xf3, 0x0f, 0xb8, 0xc1]),
            Some(Insn::Popcnt {
                dst: 0,
                src: 1,
                size: 2,
                len: 5
            })
        );
        assert_eq!(decode(&[0xf3, 0x0f, 0xb8, 0x07]), None, "memory operand");
        assert_eq!(decode(&[0x0f, 0xb8, 0xc7]), None, "no F3 prefix (jmpe)");
        assert_eq!(decode(&[0x0f, 0x0b]), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn popcnt_results_and_flags() {
        let mut r = kvm_regs {
            rdi: 0xff00_0000_0000_00f1,
            rax: 7,
            rip: 0x1000,
            rflags: 0x2 | FLAG_CF,
            ..Default::default()
        };
        apply(
            Insn::Popcnt {
                dst: 0,
                src: 7,
                size: 8,
                len: 5,
            },
            &mut r,
        );
        assert_eq!(r.rax, 13);
        assert_eq!(r.rip, 0x1005);
        assert_eq!(r.rflags, 0x2);
        let mut r = kvm_regs {
            rcx: 0xffff_ffff_0000_0000,
            rax: u64::MAX,
            ..Default::default()
        };
        apply(
            Insn::Popcnt {
                dst: 0,
                src: 1,
                size: 4,
                len: 4,
            },
            &mut r,
        );
        assert_eq!(r.rax, 0, "32-bit popcnt of the low half, zero-extended");
        assert_eq!(r.rflags & FLAG_ZF, FLAG_ZF);
        let mut r = kvm_regs {
            rcx: 0x7,
            rax: 0xdead_0000_0000_ffff,
            ..Default::default()
        };
        apply(
            Insn::Popcnt {
                dst: 0,
                src: 1,
                size: 2,
                len: 5,
            },
            &mut r,
        );
        assert_eq!(r.rax, 0xdead_0000_0000_0003);
    }

    #[test]
    fn ac_and_nops() {
        let mut r = kvm_regs {
            rflags: 0x2,
            rip: 10,
            ..Default::default()
        };
        apply(Insn::SetAc(true), &mut r);
        assert_eq!((r.rflags, r.rip), (0x2 | FLAG_AC, 13));
        apply(Insn::SetAc(false), &mut r);
        assert_eq!((r.rflags, r.rip), (0x2, 16));
        apply(Insn::Fwait, &mut r);
        assert_eq!(r.rip, 17);
    }
}
