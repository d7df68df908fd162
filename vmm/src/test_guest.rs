//! The built-in test guest: a small bare-metal x86-64 program (sources in `vmm/guest/`, built by
//! `build.rs`) that drives the virtio-blk device with a seeded random workload, keeps a ledger of
//! what it wrote in its RAM and verifies every read against it.
//!
//! This module holds the image, the constants of the VMM/guest contract
//! (`/work/notes/GUEST-CONTRACT.md`), the [`BootInfo`] writer, the host-side [`WorkloadSpec`]
//! parser (the same grammar as the guest, so a bad `--workload` is refused before booting), the
//! parser of the guest's final `done` line ([`Summary`]) and the ledger format ([`ledger`]).

pub mod ledger;
#[cfg(test)]
mod parity_tests;
mod summary;
mod workload;

pub use summary::{error_lines, Summary, DONE_PREFIX, LINE_PREFIX};
pub use workload::{
    ledger_capacity_sectors, BlockSize, MemoryPlan, Region, WorkloadSpec, DEFAULT_POLL_US,
    MAX_BLOCK_SIZE, MAX_DIRTY, MAX_DIRTY_RATE, MAX_OPS, MAX_POLL_US, MAX_QUEUE_DEPTH, PAGE_SIZE,
    SECTOR_SIZE,
};

/// The flat guest image; load it at [`LOAD_ADDR`], its first byte is the entry point.
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_guest.bin"));

/// Guest-physical address the image is loaded at (and its entry point).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Where the VMM writes the [`BootInfo`] (passed in RSI at entry).
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// RSP at entry.
pub const ENTRY_STACK: u64 = 0x8000;
/// Base of the virtio-mmio (version 2) virtio-blk device window.
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Size of the virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// GSI of the virtio-mmio device (the guest never takes it as an x86 interrupt: it sleeps on
/// [`WAIT_PORT`], which returns when the device raises it).
pub const MMIO_IRQ: u32 = 5;
/// A 32-bit `out` to this port ends the VM; the value is the exit status.
pub const EXIT_PORT: u16 = 0xF4;
/// A 32-bit `in` from this port sleeps until the virtio-mmio device interrupts (see
/// [`crate::wait_port`]); the value read is the InterruptStatus bits acknowledged.
pub const WAIT_PORT: u16 = 0xF8;
/// COM1: the guest writes its console lines to THR here.
pub const SERIAL_PORT: u16 = 0x3F8;
/// The guest's largest split virtqueue. It uses one descriptor per request when the device offers
/// VIRTIO_RING_F_INDIRECT_DESC (then `qd=128` needs `QueueNumMax` >= 128), else 3 (then
/// `qd=128` needs 512; with 256, `qd` can be at most 85).
pub const GUEST_QUEUE_MAX: u16 = 512;

/// BootInfo magic, "STRG" little endian.
pub const BOOT_INFO_MAGIC: u32 = 0x4752_5453;
/// BootInfo layout version.
pub const BOOT_INFO_VERSION: u32 = 1;
/// Offset of the workload text inside BootInfo.
pub const BOOT_INFO_WORKLOAD_OFFSET: usize = 40;
/// Longest workload text BootInfo carries.
pub const WORKLOAD_MAX: usize = 3800;
/// Most RAM the test guest uses: one region below the 3 GiB MMIO hole.
pub const MAX_MEM_SIZE: u64 = 3 << 30;
/// Most RAM a VM running the test guest may have: RAM above the hole is left untouched by the
/// guest but is still the VM's memory (checkpoints save it, benchmarks measure it).
pub const MAX_VM_MEM_SIZE: u64 = 64 << 30;

/// Guest RAM from here holds the per-slot data buffers (128 x 256 KiB).
pub const BUF_BASE: u64 = 0x20_0000;
/// The ledger header page (see [`ledger::LedgerHeader`]).
pub const LEDGER_ADDR: u64 = 0x400_0000;
/// The ledger tags: one little-endian u32 per sector of the region, up to the end of RAM.
pub const LEDGER_TAGS_ADDR: u64 = LEDGER_ADDR + 0x1000;

/// Exit status: the workload ran and found no errors.
pub const EXIT_PASSED: u32 = 0;
/// Exit status: verification mismatches or failed requests.
pub const EXIT_VERIFY_FAILED: u32 = 1;
/// Exit status: the workload spec was refused (or does not fit this disk/VM).
pub const EXIT_BAD_SPEC: u32 = 2;
/// Exit status: no device, device error, setup failure or timeout.
pub const EXIT_DEVICE_ERROR: u32 = 3;

// The fixed regions of the guest's memory map do not overlap.
const _: () = assert!(BOOT_INFO_ADDR as usize + BOOT_INFO_WORKLOAD_OFFSET + WORKLOAD_MAX <= 0x8000);
const _: () = assert!(LOAD_ADDR + (1 << 20) <= BUF_BASE);
const _: () = assert!(BUF_BASE + 128 * 256 * 1024 <= LEDGER_ADDR);
const _: () = assert!(MMIO_BASE >= MAX_MEM_SIZE);

/// What an exit status of the test guest means.
pub fn describe_exit_status(status: u32) -> &'static str {
    match status {
        EXIT_PASSED => "workload passed",
        EXIT_VERIFY_FAILED => "verification or I/O errors",
        EXIT_BAD_SPEC => "bad workload spec",
        EXIT_DEVICE_ERROR => "device error or setup failure",
        _ => "unknown status",
    }
}

/// Errors of the test guest's host-side helpers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("bad workload spec: {0}")]
    Workload(String),
    #[error("workload text is {len} bytes, at most {WORKLOAD_MAX} fit in BootInfo")]
    WorkloadTooLong { len: usize },
    #[error("workload text must be ASCII")]
    WorkloadNotAscii,
    #[error("test guest memory size {size} bytes: {why}")]
    MemorySize { size: u64, why: &'static str },
    #[error("workload region {offset}+{len} does not fit: {why}")]
    Region {
        offset: u64,
        len: u64,
        why: &'static str,
    },
    #[error(
        "workload dirty={dirty} does not fit in {mem_size} bytes of guest RAM beside the ledger \
         (at most {max})"
    )]
    Dirty { dirty: u64, mem_size: u64, max: u64 },
    #[error("bad guest summary line: {0}")]
    Summary(String),
    #[error("bad ledger: {0}")]
    Ledger(String),
}

/// The BootInfo page the VMM writes at [`BOOT_INFO_ADDR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// Bytes of guest RAM (from GPA 0).
    pub mem_size: u64,
    /// TSC frequency from `KVM_GET_TSC_KHZ`, 0 if unknown (the guest then reports `iops=0`).
    pub tsc_khz: u32,
    /// Workload text (the guest parses it with the same grammar as [`WorkloadSpec`]).
    pub workload: String,
}

impl BootInfo {
    /// BootInfo for a parsed spec: the text is the spec's normalised form.
    pub fn for_spec(mem_size: u64, tsc_khz: u32, spec: &WorkloadSpec) -> Self {
        Self {
            mem_size,
            tsc_khz,
            workload: spec.to_string(),
        }
    }

    /// The bytes to write at [`BOOT_INFO_ADDR`] (40-byte header + workload text).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let text = self.workload.as_bytes();
        if !self.workload.is_ascii() {
            return Err(Error::WorkloadNotAscii);
        }
        if text.len() > WORKLOAD_MAX {
            return Err(Error::WorkloadTooLong { len: text.len() });
        }
        check_mem_size(self.mem_size)?;
        // A text that does not parse is the guest's to refuse (exit status 2); one that does
        // must leave the guest room for its dirty region.
        if let Ok(spec) = WorkloadSpec::parse(&self.workload) {
            spec.memory_plan(self.mem_size)?;
        }
        let len =
            u32::try_from(text.len()).map_err(|_| Error::WorkloadTooLong { len: text.len() })?;
        let mut b = Vec::with_capacity(BOOT_INFO_WORKLOAD_OFFSET + text.len());
        b.extend_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
        b.extend_from_slice(&BOOT_INFO_VERSION.to_le_bytes());
        // The guest plans its memory below the hole only.
        b.extend_from_slice(&self.mem_size.min(MAX_MEM_SIZE).to_le_bytes());
        b.extend_from_slice(&MMIO_BASE.to_le_bytes());
        b.extend_from_slice(&MMIO_IRQ.to_le_bytes());
        b.extend_from_slice(&self.tsc_khz.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(text);
        Ok(b)
    }
}

/// Smallest RAM the guest accepts: the ledger tags start at 64 MiB + 4 KiB; this leaves room
/// for 256 K tags (a 128 MiB region).
pub const MIN_MEM_SIZE: u64 = LEDGER_TAGS_ADDR + (1 << 20) - 0x1000;

/// Checks that `mem_size` is usable by the test guest.
pub fn check_mem_size(mem_size: u64) -> Result<(), Error> {
    if mem_size > MAX_VM_MEM_SIZE {
        return Err(Error::MemorySize {
            size: mem_size,
            why: "the test guest's VM may have at most 64 GiB (it uses the RAM below 3 GiB)",
        });
    }
    if mem_size < MIN_MEM_SIZE {
        return Err(Error::MemorySize {
            size: mem_size,
            why: "the test guest needs at least 65 MiB (buffers and ledger start at 64 MiB)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_starts_with_the_entry_stub() {
        // mov $pml4, %eax (b8 imm32) then mov %rax, %cr3 (0f 22 d8): the CPL0 stub is first.
        assert!(
            IMAGE.len() > 4096 && IMAGE.len() < (1 << 20),
            "{}",
            IMAGE.len()
        );
        assert_eq!(IMAGE[0], 0xb8);
        let pml4 = u32::from_le_bytes([IMAGE[1], IMAGE[2], IMAGE[3], IMAGE[4]]) as u64;
        assert_eq!(&IMAGE[5..8], &[0x0f, 0x22, 0xd8]);
        assert!(pml4 >= LOAD_ADDR && pml4.is_multiple_of(4096));
        // The guest's own identity map has the U bit on every level.
        let off = (pml4 - LOAD_ADDR) as usize;
        let entry = u64::from_le_bytes(IMAGE[off..off + 8].try_into().unwrap());
        assert_eq!(entry & 0x7, 0x7, "PML4[0] = {entry:#x}");
    }

    #[test]
    fn boot_info_bytes_follow_the_contract() {
        let spec: WorkloadSpec = "seed=3,ops=7".parse().unwrap();
        let bi = BootInfo::for_spec(256 << 20, 2_445_400, &spec);
        let b = bi.to_bytes().unwrap();
        let text = "seed=3,ops=7,read=50,bs=4k,qd=32,flush=0,verify=1";
        assert_eq!(b.len(), 40 + text.len());
        assert_eq!(&b[0..4], b"STRG");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 256 << 20);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            0xD000_0000
        );
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 2_445_400);
        assert_eq!(
            u32::from_le_bytes(b[32..36].try_into().unwrap()),
            text.len() as u32
        );
        assert_eq!(&b[36..40], &[0, 0, 0, 0]);
        assert_eq!(&b[40..], text.as_bytes());
    }

    #[test]
    fn boot_info_refuses_bad_input() {
        let mut bi = BootInfo {
            mem_size: 256 << 20,
            tsc_khz: 0,
            workload: "x".repeat(WORKLOAD_MAX + 1),
        };
        assert_eq!(
            bi.to_bytes(),
            Err(Error::WorkloadTooLong {
                len: WORKLOAD_MAX + 1
            })
        );
        bi.workload = "x".repeat(WORKLOAD_MAX);
        assert_eq!(bi.to_bytes().unwrap().len(), 40 + WORKLOAD_MAX);
        bi.workload = "seed=1\u{e9}".into();
        assert_eq!(bi.to_bytes(), Err(Error::WorkloadNotAscii));
        bi.workload = String::new();
        bi.mem_size = 64 << 20;
        assert!(matches!(bi.to_bytes(), Err(Error::MemorySize { .. })));
        bi.mem_size = 65 << 30;
        assert!(matches!(bi.to_bytes(), Err(Error::MemorySize { .. })));
        // RAM above the hole is the VM's, not the guest's: the guest is told 3 GiB.
        bi.mem_size = 4 << 30;
        let b = bi.to_bytes().unwrap();
        assert_eq!(b[8..16], MAX_MEM_SIZE.to_le_bytes());
        bi.mem_size = MIN_MEM_SIZE;
        assert!(bi.to_bytes().is_ok());
        // The dirty region must fit beside the ledger: 256 MiB leave 192 MiB - 4 KiB - 32 B of
        // tags room, so 188m fits and 192m does not.
        bi.mem_size = 256 << 20;
        bi.workload = "dirty=188m".into();
        assert!(bi.to_bytes().is_ok());
        bi.workload = "dirty=192m".into();
        assert_eq!(
            bi.to_bytes(),
            Err(Error::Dirty {
                dirty: 192 << 20,
                mem_size: 256 << 20,
                max: (192 << 20) - 8192
            })
        );
        assert!(bi
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("dirty=201326592 does not fit"));
    }

    #[test]
    fn exit_status_descriptions() {
        assert_eq!(describe_exit_status(EXIT_BAD_SPEC), "bad workload spec");
        assert_eq!(describe_exit_status(77), "unknown status");
    }
}
