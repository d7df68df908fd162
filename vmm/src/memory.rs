//! Guest RAM: anonymous mappings registered with KVM as memory slots.
//!
//! The memory must stay private anonymous (or shmem): live checkpoints write-protect it with a
//! userfaultfd in synchronous mode, which the kernel refuses on private file mappings (see
//! `snapshot::memory`). Restored memory is anonymous too (filled by the fault handler).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout;
use crate::{Error, Result};

/// Smallest RAM size we accept (the fixed low-memory layout needs the first MiBs).
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// Allocates `mem_size` bytes of guest RAM laid out by [`layout::ram_ranges`].
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap> {
    if mem_size < MIN_MEM_SIZE {
        return Err(Error::Config(format!(
            "memory size {mem_size} is below the minimum of {MIN_MEM_SIZE} bytes"
        )));
    }
    if mem_size & 0xfff != 0 {
        return Err(Error::Config(format!(
            "memory size {mem_size} is not a multiple of 4096"
        )));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| Error::Config(format!("memory size {mem_size} too large")))
        })
        .collect::<Result<_>>()?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
    for r in mem.iter() {
        // Transparent huge pages: fewer page-table entries for KVM, and write-protecting all
        // of RAM at a checkpoint (userfaultfd) walks 512x fewer entries. Advisory only.
        // SAFETY: advises on the region's own live mapping; MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE);
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|source| Error::GuestMemory {
                addr: region.start_addr().raw_value(),
                source,
            })?;
        let slot =
            u32::try_from(slot).map_err(|_| Error::Config("too many memory slots".into()))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `memory_size` bytes owned by `mem`;
        // every `GuestMemoryMmap` clone shares it, and the `Vm` keeps a clone until the VM fd
        // is closed, so the mapping outlives the slot.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Writes `data` at guest address `addr`.
pub fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<()> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { addr, source })
}

/// Total RAM bytes in `mem`.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_low_ram_and_rejects_bad_sizes() {
        let mem = create(32 << 20).unwrap();
        assert_eq!(total_size(&mem), 32 << 20);
        assert_eq!(mem.num_regions(), 1);
        write(&mem, 0x1000, b"abc").unwrap();
        let mut buf = [0u8; 3];
        mem.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(write(&mem, (32 << 20) - 1, b"ab").is_err());
        assert!(create(1 << 20).is_err());
        assert!(create((32 << 20) + 1).is_err());
    }
}
