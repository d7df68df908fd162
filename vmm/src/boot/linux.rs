//! Loading a Linux kernel (bzImage or ELF vmlinux) for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): kernel, initrd, command line, zero page, MP table.

use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::decompress::{self, PayloadFormat};
use super::long_mode::{self, LINUX_SELECTORS};
use super::{cmdline, e820, file, mptable, Entry};
use crate::layout::{
    BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, KERNEL_START, LINUX_STACK,
    MMIO_HOLE_START,
};
use crate::{memory, Error, Result};

/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// loadflags: LOADED_HIGH | CAN_USE_HEAP.
const LOADFLAGS: u8 = 0x01 | 0x80;
/// xloadflags: XLF_KERNEL_64 (has the 64-bit entry at +0x200).
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in the protected-mode kernel of a bzImage.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
/// Default highest initrd address for old kernels.
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full command line (see [`cmdline::build`]).
    pub cmdline: String,
    pub vcpus: u8,
}

/// The two kernel formats we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Detects the format from the first 0x210 bytes of the file.
pub fn detect(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    let magic = head.get(0x202..0x206)?;
    (magic == HDRS_MAGIC.to_le_bytes()).then_some(KernelFormat::BzImage)
}

/// Where a kernel's loaded image ends (exclusive), from its ELF program headers: the
/// largest `p_paddr + p_memsz` of a PT_LOAD segment. `None` when `head` (the start of the
/// file) is not a 64-bit ELF header with its program headers, or a sum overflows.
pub fn elf_load_end(head: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    if !head.starts_with(b"\x7fELF") || *head.get(4)? != 2 {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 {
        return None;
    }
    let mut end = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 1 {
            let e = u64_at(ph.checked_add(24)?)?.checked_add(u64_at(ph.checked_add(40)?)?)?;
            end = Some(end.map_or(e, |x: u64| x.max(e)));
        }
    }
    end
}

/// Refuses a kernel whose image would end past the RAM it can be loaded into.
fn check_fits(kernel: &Path, end: u64, mem_size: u64) -> Result<()> {
    let usable = mem_size.min(MMIO_HOLE_START);
    if end > usable {
        return Err(Error::Config(format!(
            "too little memory: kernel {} needs more than {} MiB of guest memory (it is loaded \
             up to {end:#x}); the guest has {} MiB",
            kernel.display(),
            end.div_ceil(1 << 20),
            mem_size >> 20
        )));
    }
    Ok(())
}

/// The command line's length limit: what the kernel accepts (`cmdline_size` is the longest
/// command line without its NUL, boot protocol 2.06+; 255 before) and what we can place.
pub fn cmdline_max_len(hdr: &setup_header) -> usize {
    let kernel = if hdr.version >= 0x206 {
        usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX)
    } else {
        255
    };
    kernel.min(CMDLINE_MAX - 1)
}

/// Loads everything and returns the entry state.
pub fn load(mem: &GuestMemoryMmap, spec: &LinuxSpec) -> Result<Entry> {
    let mem_size = memory::total_size(mem);
    let read_err = |source| Error::ReadFile {
        path: spec.kernel.clone(),
        source,
    };
    let mut file = file::open_regular(&spec.kernel, "kernel")?;
    // Enough for the setup header, or for an ELF header and its program headers.
    let mut head = vec![0u8; 64 << 10];
    let n = read_up_to(&mut file, &mut head).map_err(read_err)?;
    head.truncate(n);
    let format = detect(&head).ok_or_else(|| {
        Error::KernelLoad(format!(
            "{}: neither an ELF vmlinux nor a bzImage",
            spec.kernel.display()
        ))
    })?;
    let highmem = Some(GuestAddress(KERNEL_START));
    let (entry, kernel_end, mut hdr) = match format {
        KernelFormat::Elf => {
            if let Some(end) = elf_load_end(&head) {
                check_fits(&spec.kernel, end, mem_size)?;
            }
            let r = Elf::load(mem, None, &mut file, highmem)
                .map_err(|e| Error::KernelLoad(format!("ELF: {e}")))?;
            (r.kernel_load.0, r.kernel_end, elf_setup_header())
        }
        KernelFormat::BzImage => {
            let image = file::read_regular(&spec.kernel, "kernel", mem_size)?;
            let hdr = image_setup_header(&image)?;
            check_bzimage(&hdr)?;
            match decompress::bzimage_payload(&image) {
                Some(p) if decompress::payload_format(p) == PayloadFormat::Xz => {
                    // See `decompress`: unpack on the host, boot the ELF inside.
                    let limit = usize::try_from(mem_size).unwrap_or(usize::MAX);
                    let elf = decompress::xz(p, limit).map_err(|e| {
                        if e.contains("expands beyond") {
                            // The unpacked kernel alone is larger than the guest's memory.
                            Error::Config(format!(
                                "too little memory: kernel {} unpacks to more than the guest's \
                                 {} MiB",
                                spec.kernel.display(),
                                mem_size >> 20
                            ))
                        } else {
                            Error::KernelLoad(e)
                        }
                    })?;
                    if let Some(end) = elf_load_end(&elf) {
                        check_fits(&spec.kernel, end, mem_size)?;
                    }
                    tracing::info!(
                        "bzImage: booting its XZ payload ({} bytes) as ELF",
                        elf.len()
                    );
                    let r = Elf::load(mem, None, &mut Cursor::new(elf), highmem)
                        .map_err(|e| Error::KernelLoad(format!("bzImage payload ELF: {e}")))?;
                    (r.kernel_load.0, r.kernel_end, hdr)
                }
                _ => {
                    // The kernel decompresses itself in place: it needs `init_size` bytes
                    // from its load address (boot protocol 2.10+), and at least the image.
                    let need = (image.len() as u64).max(u64::from(hdr.init_size));
                    check_fits(&spec.kernel, KERNEL_START.saturating_add(need), mem_size)?;
                    let r = BzImage::load(mem, None, &mut Cursor::new(image), highmem)
                        .map_err(|e| Error::KernelLoad(format!("bzImage: {e}")))?;
                    let hdr = r.setup_header.unwrap_or(hdr);
                    (r.kernel_load.0 + BZIMAGE_64BIT_ENTRY, r.kernel_end, hdr)
                }
            }
        }
    };

    let cmd = spec.cmdline.as_bytes();
    let max_len = cmdline_max_len(&hdr);
    if cmd.len() > max_len {
        return Err(Error::Cmdline(format!(
            "{} bytes; this kernel accepts at most {max_len} bytes",
            cmd.len()
        )));
    }
    let mut cmd_nul = cmd.to_vec();
    cmd_nul.push(0);
    memory::write(mem, CMDLINE_ADDR, &cmd_nul)?;

    hdr.type_of_loader = 0xff;
    hdr.loadflags |= LOADFLAGS;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmd_nul.len() as u32;

    if let Some(initrd) = &spec.initrd {
        let (addr, size) = load_initrd(mem, initrd, &hdr, kernel_end, mem_size)?;
        hdr.ramdisk_image = addr;
        hdr.ramdisk_size = size;
    }

    let params = zero_page(hdr, mem_size)?;
    mem.write_obj(params, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|source| Error::GuestMemory {
            addr: BOOT_INFO_ADDR,
            source,
        })?;
    memory::write(
        mem,
        EBDA_START,
        &mptable::build(spec.vcpus).map_err(Error::Config)?,
    )?;
    long_mode::write_tables(mem, LINUX_SELECTORS)?;
    Ok(Entry {
        rip: entry,
        rsp: LINUX_STACK,
        rsi: BOOT_INFO_ADDR,
        selectors: LINUX_SELECTORS,
    })
}

/// Reads as much of `buf` as the file has.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The setup header of a bzImage file image.
fn image_setup_header(image: &[u8]) -> Result<setup_header> {
    let size = std::mem::size_of::<setup_header>();
    image
        .get(0x1f1..0x1f1 + size)
        .and_then(setup_header::from_slice)
        .copied()
        .ok_or_else(|| Error::KernelLoad("bzImage too short for its setup header".into()))
}

fn check_bzimage(hdr: &setup_header) -> Result<()> {
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < 0x20c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::KernelLoad(format!(
            "bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
            version >> 8,
            version & 0xff
        )));
    }
    Ok(())
}

/// The setup header a bzImage would carry, for an ELF vmlinux (which has none).
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: 0x020f,
        kernel_alignment: 0x0100_0000,
        initrd_addr_max: INITRD_ADDR_MAX_DEFAULT as u32,
        cmdline_size: CMDLINE_MAX as u32,
        ..Default::default()
    }
}

/// Places the initrd as high as allowed in low RAM, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    hdr: &setup_header,
    kernel_end: u64,
    mem_size: u64,
) -> Result<(u32, u32)> {
    let data = file::read_regular(path, "initrd", mem_size)?;
    let size = data.len() as u64;
    let addr_max = match hdr.initrd_addr_max {
        0 => INITRD_ADDR_MAX_DEFAULT,
        m => u64::from(m),
    };
    let top = (addr_max + 1).min(mem_size.min(MMIO_HOLE_START));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end && size <= u64::from(u32::MAX) => {
            memory::write(mem, addr, &data)?;
            Ok((addr as u32, size as u32))
        }
        _ => Err(Error::Config(format!(
            "initrd {} ({size} bytes) does not fit in guest memory below {top:#x} above the kernel",
            path.display()
        ))),
    }
}

/// The zero page: the setup header plus the E820 map.
pub fn zero_page(hdr: setup_header, mem_size: u64) -> Result<boot_params> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820::entries(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::Config("too many E820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Command line for `spec` built from the user's text.
pub fn command_line(user: Option<&str>) -> Result<String> {
    cmdline::build(user, true).map_err(Error::Cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        assert_eq!(detect(&[0u8; 0x210]), None);
        assert_eq!(detect(b"short"), None);
    }

    #[test]
    fn zero_page_layout() {
        let mut hdr = elf_setup_header();
        hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        hdr.type_of_loader = 0xff;
        let p = zero_page(hdr, 256 << 20).unwrap();
        let b = p.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x1e8], 3); // e820_entries
        assert_eq!(u16::from_le_bytes([b[0x1fe], b[0x1ff]]), 0xaa55);
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(b[0x210], 0xff);
        assert_eq!(
            u32::from_le_bytes(b[0x228..0x22c].try_into().unwrap()),
            0x2_0000
        );
        // Third E820 entry (20 bytes each from 0x2d0): RAM from 1 MiB.
        let e = &b[0x2d0 + 40..0x2d0 + 60];
        assert_eq!(u64::from_le_bytes(e[0..8].try_into().unwrap()), 0x10_0000);
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            (256 << 20) - 0x10_0000
        );
        assert_eq!(u32::from_le_bytes(e[16..20].try_into().unwrap()), 1);
    }

    #[test]
    fn old_bzimage_is_refused() {
        let hdr = setup_header {
            version: 0x20a,
            ..Default::default()
        };
        assert!(check_bzimage(&hdr).is_err());
        let hdr = setup_header {
            version: 0x20f,
            xloadflags: 1,
            ..Default::default()
        };
        assert!(check_bzimage(&hdr).is_ok());
    }

    #[test]
    fn cmdline_limit_follows_the_boot_protocol() {
        let mut hdr = setup_header {
            version: 0x20f,
            cmdline_size: 0,
            ..Default::default()
        };
        assert_eq!(cmdline_max_len(&hdr), 0);
        hdr.cmdline_size = 2047;
        assert_eq!(cmdline_max_len(&hdr), 2047);
        hdr.cmdline_size = u32::MAX;
        assert_eq!(cmdline_max_len(&hdr), CMDLINE_MAX - 1);
        hdr.version = 0x205;
        assert_eq!(cmdline_max_len(&hdr), 255);
    }

    /// A 64-bit ELF header with the given PT_LOAD (paddr, memsz) segments and one PT_NOTE.
    fn elf(segments: &[(u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..5].copy_from_slice(b"\x7fELF\x02");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(segments.len() as u16 + 1).to_le_bytes());
        for &(paddr, memsz) in segments {
            let mut ph = [0u8; 56];
            ph[0..4].copy_from_slice(&1u32.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        let mut note = [0u8; 56];
        note[0..4].copy_from_slice(&4u32.to_le_bytes());
        note[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&note);
        b
    }

    #[test]
    fn elf_load_end_is_the_end_of_the_highest_segment() {
        assert_eq!(
            elf_load_end(&elf(&[(0x100_0000, 0x20_0000), (0x300_0000, 0x1000)])),
            Some(0x300_1000)
        );
        assert_eq!(elf_load_end(&elf(&[])), None);
        assert_eq!(elf_load_end(&elf(&[(u64::MAX, 2)])), None, "overflow");
        let mut short = elf(&[(0x100_0000, 0x1000)]);
        short.truncate(100);
        assert_eq!(elf_load_end(&short), None);
        assert_eq!(elf_load_end(b"MZ"), None);
        assert!(check_fits(Path::new("k"), 0x300_1000, 64 << 20).is_ok());
        let e = check_fits(Path::new("k"), 0x4a0_0000, 64 << 20).unwrap_err();
        assert!(e.to_string().contains("too little memory"), "{e}");
        assert!(e.to_string().contains("more than 74 MiB"), "{e}");
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = memory::create(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let hdr = elf_setup_header();
        let (addr, size) = load_initrd(&mem, &p, &hdr, 0x20_0000, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(u64::from(addr) + 5000 <= 64 << 20);
        assert!(u64::from(addr) > (64 << 20) - 3 * 4096);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(addr))).unwrap(),
            7
        );
        assert!(load_initrd(&mem, &p, &hdr, 64 << 20, 64 << 20).is_err());
    }
}
