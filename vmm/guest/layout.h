/* Fixed guest-physical layout of the Strata test guest (identity mapped). Mirrored by
 * vmm/src/test_guest.rs and documented in /work/notes/GUEST-CONTRACT.md. */
#ifndef STRATA_GUEST_LAYOUT_H
#define STRATA_GUEST_LAYOUT_H

#define BOOT_INFO_ADDR   0x7000ULL
#define BOOT_INFO_MAGIC  0x47525453U      /* "STRG" */
#define BOOT_INFO_VERSION 1U
#define WORKLOAD_MAX     3800U

#define MMIO_BASE        0xD0000000ULL
#define SERIAL_PORT      0x3F8
#define EXIT_PORT        0xF4
#define WAIT_PORT        0xF8             /* 32-bit in: sleep until the device interrupts */

#define EXIT_PASSED      0
#define EXIT_VERIFY      1
#define EXIT_BAD_SPEC    2
#define EXIT_DEVICE      3

#define IMAGE_ADDR       0x100000ULL      /* image (code, data, bss, stack) below BUF_BASE */
#define BUF_BASE         0x200000ULL      /* MAX_QD data buffers of MAX_BS bytes each */
#define LEDGER_ADDR      0x4000000ULL     /* 64 MiB: ledger header page */
#define LEDGER_TAGS_ADDR (LEDGER_ADDR + 0x1000ULL) /* u32 tag per sector of the region */
#define LEDGER_MAGIC     0x4C525453U      /* "STRL" */
#define LEDGER_VERSION   1U

#include "logic.h"

/* BootInfo at BOOT_INFO_ADDR, written by the VMM. */
struct boot_info {
    u32 magic, version;
    u64 mem_size, mmio_base;
    u32 mmio_irq, tsc_khz, workload_len, reserved;
    char workload[];
};

enum { SLOT_FREE = 0, SLOT_READ = 1, SLOT_WRITE = 2, SLOT_FLUSH = 3 };
enum { STATE_SETUP = 0, STATE_RUNNING = 1, STATE_DONE = 2 };

/* Ledger header at LEDGER_ADDR. The slot table is the driver's own in-flight bookkeeping, so a
 * memory image shows exactly which requests were in flight. Tags follow at LEDGER_TAGS_ADDR. */
struct slot { u32 kind; u32 tag; u64 sector; u64 sectors; };
struct ledger {
    u32 magic, version;
    u64 seed;
    u64 region_sector;   /* first disk sector covered by tags[0] */
    u64 region_sectors;  /* number of tags */
    u32 state, qd;
    u64 last_tag;        /* tags 1..=last_tag handed out to writes */
    u64 completed;       /* reads + writes completed */
    u64 errors;
    struct slot slots[MAX_QD];
    /* dirty=SIZE: the RAM the guest rewrites round-robin (see dirty_fill in logic.h). */
    u64 dirty_base;      /* guest-physical address of the region, 0 = none */
    u64 dirty_pages;     /* 4 KiB pages in the region */
    u64 dirty_written;   /* page rewrites done: page p holds dirty_gen(dirty_written, pages, p) */
    u32 dirty_rate, reserved;
};

#endif
