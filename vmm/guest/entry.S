/* Strata test guest entry. The VMM enters here (first byte of the image at 0x100000) in 64-bit
 * mode at CPL0 with RSI = BootInfo. CPL0 code is emulated instruction by instruction on this
 * host's nested KVM, so it only loads our page tables (U bit set), GDT and TSS, then iretq's to
 * CPL3 with IOPL=3; everything else runs at CPL3. */

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    mov $pml4, %eax
    mov %rax, %cr3
    lgdt gdt_ptr(%rip)
    mov $0x30, %ax
    ltr %ax
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %rsi, %rdi              /* BootInfo pointer: first argument of guest_main */
    pushq $0x23                 /* SS: user data */
    pushq $user_stack_top       /* RSP */
    pushq $0x3002               /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x2b                 /* CS: user code (64-bit) */
    pushq $user_entry           /* RIP */
    iretq

    .text
user_entry:                     /* CPL3 from here on */
    mov %rdi, %r12
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov $0x23, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %r12, %rdi
    call guest_main
1:  pause
    jmp 1b

    .section .data.tables, "aw"
    .balign 4096
pml4:                           /* identity map of the first 4 GiB, 2 MiB pages, P|W|U */
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 2048
    .quad addr + 0x87           /* P|W|U|PS */
    .set addr, addr + 0x200000
    .endr

    .balign 16
gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00af9b000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0                     /* 0x18 unused */
    .quad 0x00cff3000000ffff    /* 0x20 user data (selector 0x23) */
    .quad 0x00affb000000ffff    /* 0x28 user code, 64-bit (selector 0x2b) */
    .quad __tss_desc_lo         /* 0x30 TSS (64-bit, 16 bytes), computed by guest.ld */
    .quad __tss_desc_hi
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl tss, tss_end
    .balign 16
tss:                            /* 64-bit TSS with an I/O permission bitmap */
    .long 0
    .quad kernel_stack_top      /* RSP0, only used if an exception ever reached CPL0 */
    .fill 88, 1, 0
    .word 0
    .word iomap - tss           /* I/O map base */
iomap:
    /* This host's nested KVM drops IOPL on the iretq to CPL3 (RFLAGS arrives with IOPL=0), so
     * CPL3 in/out are allowed by this bitmap instead (bit clear = allowed), ports 0..0x3ff:
     * 0xf4-0xf7 (exit port), 0xf8-0xfb (wait port) and 0x3f8-0x3ff (COM1). Ports above 0x3ff
     * lie beyond the TSS limit and fault. */
    .fill 30, 1, 0xff
    .byte 0x0f                  /* ports 0xf0-0xf7: 0xf4-0xf7 allowed */
    .byte 0xf0                  /* ports 0xf8-0xff: 0xf8-0xfb allowed */
    .fill 95, 1, 0xff
    .byte 0x00                  /* ports 0x3f8-0x3ff */
    .byte 0xff                  /* required terminator */
tss_end:

    .section .stack, "aw", @nobits
    .balign 16
kernel_stack:
    .skip 4096
kernel_stack_top:
    .skip 65536
user_stack_top:
    .section .note.GNU-stack, "", @progbits
