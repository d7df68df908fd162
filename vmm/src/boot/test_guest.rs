//! Loading the built-in test guest: flat image at 1 MiB, BootInfo page at 0x7000.

use vm_memory::GuestMemoryMmap;

use super::long_mode::{self, TEST_GUEST_SELECTORS};
use super::Entry;
use crate::layout::{BOOT_INFO_ADDR, KERNEL_START, TEST_GUEST_STACK};
use crate::test_guest::{check_mem_size, BootInfo};
use crate::{memory, Error, Result};

/// Writes the image, BootInfo, GDT and page tables; returns the entry state.
pub fn load(mem: &GuestMemoryMmap, image: &[u8], workload: &str, tsc_khz: u32) -> Result<Entry> {
    let mem_size = memory::total_size(mem);
    check_mem_size(mem_size).map_err(|e| Error::Config(e.to_string()))?;
    if image.is_empty() {
        return Err(Error::Config("test guest image is empty".into()));
    }
    if KERNEL_START + image.len() as u64 > mem_size {
        return Err(Error::Config(format!(
            "test guest image ({} bytes) does not fit in {mem_size} bytes of memory",
            image.len()
        )));
    }
    memory::write(mem, KERNEL_START, image)?;
    memory::write(mem, BOOT_INFO_ADDR, &vec![0u8; 0x1000])?;
    let info = BootInfo {
        mem_size,
        tsc_khz,
        workload: workload.to_string(),
    };
    let info = info.to_bytes().map_err(|e| Error::Config(e.to_string()))?;
    memory::write(mem, BOOT_INFO_ADDR, &info)?;
    long_mode::write_tables(mem, TEST_GUEST_SELECTORS)?;
    Ok(Entry {
        rip: KERNEL_START,
        rsp: TEST_GUEST_STACK,
        rsi: BOOT_INFO_ADDR,
        selectors: TEST_GUEST_SELECTORS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn load_places_image_and_boot_info() {
        let mem = memory::create(128 << 20).unwrap();
        let e = load(&mem, &[0xf4, 0x90], "ops=1", 7).unwrap();
        assert_eq!((e.rip, e.rsp, e.rsi), (0x10_0000, 0x8000, 0x7000));
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x10_0000)).unwrap(),
            0x90f4
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x7000)).unwrap(),
            crate::test_guest::BOOT_INFO_MAGIC
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000 + 40)).unwrap(), b'o');
        assert!(load(&mem, &[], "", 0).is_err());
        assert!(load(&mem, &vec![0u8; 128 << 20], "", 0).is_err());
        assert!(load(&mem, &[0x90], &"x".repeat(3801), 0).is_err());
        let small = memory::create(32 << 20).unwrap();
        assert!(load(&small, &[0x90], "", 0).is_err());
    }
}
