//! The memory image file (docs/FORMAT.md, "Memory images"): an envelope whose payload is the
//! image header, the held-page and data-page bitmaps and a CRC32C per page, then the page data
//! with page `i` at `data_offset + i * 4096` (a sparse file: zero pages are holes).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::bitmap;
use super::envelope::{self, HEADER_LEN, KIND_MEMORY_IMAGE};
use super::{Error, Result};
use crate::snapshot::Identity;

/// Guest page size of every image.
pub const PAGE_SIZE: u64 = 4096;
/// Page data starts at a multiple of this (so the data can be mapped with large pages).
pub const DATA_ALIGN: u64 = 2 << 20;
/// Bytes of the fixed header fields at the start of the payload.
pub const FIELDS_LEN: usize = 80;
/// `flags` bit: the image holds only the pages dirtied since its parent.
pub const FLAG_INCREMENTAL: u32 = 1;

/// The fixed fields of an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub mem_size: u64,
    pub flags: u32,
    /// This image's id (random, unique per image).
    pub image_id: [u8; 16],
    /// The parent image's id (all zero for a full image).
    pub parent_id: [u8; 16],
    pub page_count: u64,
    /// Pages this image holds (set bits of the held bitmap).
    pub held_pages: u64,
    /// Held pages with non-zero data (set bits of the data bitmap).
    pub data_pages: u64,
    pub data_offset: u64,
}

impl Header {
    /// Whether this is an incremental image.
    pub fn incremental(&self) -> bool {
        self.flags & FLAG_INCREMENTAL != 0
    }
}

/// Words of one page bitmap for `page_count` pages.
pub fn bitmap_words(page_count: u64) -> u64 {
    page_count.div_ceil(64)
}

/// Payload bytes for `page_count` pages: fields, two bitmaps, the CRC table.
pub fn payload_len(page_count: u64) -> u64 {
    FIELDS_LEN as u64 + 2 * 8 * bitmap_words(page_count) + 4 * page_count
}

/// Where page data starts for `page_count` pages.
pub fn data_offset(page_count: u64) -> u64 {
    (HEADER_LEN as u64 + payload_len(page_count)).next_multiple_of(DATA_ALIGN)
}

/// Size of a complete image file of `page_count` pages.
pub fn file_len(page_count: u64) -> u64 {
    data_offset(page_count) + page_count * PAGE_SIZE
}

/// Builds the sealed metadata (envelope + payload) of an image.
pub fn encode(id: &Identity, h: &Header, held: &[u64], data: &[u64], crcs: &[u32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(payload_len(h.page_count) as usize);
    p.extend_from_slice(&h.mem_size.to_le_bytes());
    p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    p.extend_from_slice(&h.flags.to_le_bytes());
    p.extend_from_slice(&h.image_id);
    p.extend_from_slice(&h.parent_id);
    p.extend_from_slice(&h.page_count.to_le_bytes());
    p.extend_from_slice(&h.held_pages.to_le_bytes());
    p.extend_from_slice(&h.data_pages.to_le_bytes());
    p.extend_from_slice(&h.data_offset.to_le_bytes());
    debug_assert_eq!(p.len(), FIELDS_LEN);
    for w in held.iter().chain(data) {
        p.extend_from_slice(&w.to_le_bytes());
    }
    for c in crcs {
        p.extend_from_slice(&c.to_le_bytes());
    }
    envelope::seal(KIND_MEMORY_IMAGE, id, &p)
}

/// An image whose metadata passed every check; page data is read on demand.
pub struct Image {
    pub path: PathBuf,
    pub file: File,
    pub header: Header,
    pub held: Vec<u64>,
    pub data: Vec<u64>,
    pub crcs: Vec<u32>,
}

impl Image {
    /// Opens and checks the image at `path` for the VM `id`.
    pub fn open(path: &Path, id: &Identity) -> Result<Image> {
        let io = |source| Error::Io {
            context: "open memory image",
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() || meta.file_type().is_fifo() {
            return Err(Error::Damaged(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let file_size = meta.len();
        let page_count = id.mem_size / PAGE_SIZE;
        let mut head = [0u8; HEADER_LEN];
        read_exact_at(&file, path, &mut head, 0, file_size).map_err(|e| e.at(path))?;
        let len = envelope::check_header(KIND_MEMORY_IMAGE, id, &head, u64::MAX / 2, file_size)
            .map_err(|e| e.at(path))?;
        if len != payload_len(page_count) {
            // Most likely an image of another memory size: say so if its (unverified) size
            // field agrees, else it is damaged. Nothing else is read.
            let mut size = [0u8; 8];
            read_exact_at(&file, path, &mut size, HEADER_LEN as u64, file_size)
                .map_err(|e| e.at(path))?;
            let image = u64::from_le_bytes(size);
            let e = if image != id.mem_size && payload_len(image / PAGE_SIZE) == len {
                Error::MemSize {
                    image,
                    vm: id.mem_size,
                }
            } else {
                Error::Damaged(format!("{len} bytes of metadata"))
            };
            return Err(e.at(path));
        }
        let mut payload = vec![0u8; len as usize];
        read_exact_at(&file, path, &mut payload, HEADER_LEN as u64, file_size)
            .map_err(|e| e.at(path))?;
        envelope::check_payload(&head, &payload).map_err(|e| e.at(path))?;
        let img = parse(path, file, &payload, id, file_size).map_err(|e| e.at(path))?;
        Ok(img)
    }

    /// Reads page `i`'s data (checked against its CRC) into `buf` (4096 bytes). The caller
    /// has checked that the image holds page `i`.
    pub fn read_page(&self, i: u64, buf: &mut [u8]) -> Result<()> {
        if !bitmap::test(&self.data, i) {
            buf.fill(0);
        } else {
            self.file
                .read_exact_at(buf, self.header.data_offset + i * PAGE_SIZE)
                .map_err(|source| Error::Io {
                    context: "read memory image page",
                    path: self.path.clone(),
                    source,
                })?;
        }
        if crc32c::crc32c(buf) != self.crcs[i as usize] {
            return Err(Error::PageChecksum {
                path: self.path.clone(),
                page: i,
            });
        }
        Ok(())
    }

    /// Whether this image holds page `i`.
    pub fn holds(&self, i: u64) -> bool {
        bitmap::test(&self.held, i)
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], off: u64, file_size: u64) -> Result<()> {
    let end = off + buf.len() as u64;
    if end > file_size {
        return Err(Error::Truncated {
            expected: end,
            actual: file_size,
        });
    }
    file.read_exact_at(buf, off).map_err(|source| Error::Io {
        context: "read memory image",
        path: path.to_path_buf(),
        source,
    })
}

fn u32_at(p: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(p[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(p: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(p[off..off + 8].try_into().expect("8 bytes"))
}

fn parse(path: &Path, file: File, p: &[u8], id: &Identity, file_size: u64) -> Result<Image> {
    if p.len() < FIELDS_LEN {
        return Err(Error::Damaged(format!(
            "metadata of {} bytes is shorter than the header fields",
            p.len()
        )));
    }
    let mem_size = u64_at(p, 0);
    if mem_size != id.mem_size {
        return Err(Error::MemSize {
            image: mem_size,
            vm: id.mem_size,
        });
    }
    let page_size = u32_at(p, 8);
    if u64::from(page_size) != PAGE_SIZE {
        return Err(Error::Damaged(format!("page size {page_size}")));
    }
    let flags = u32_at(p, 12);
    if flags & !FLAG_INCREMENTAL != 0 {
        return Err(Error::Damaged(format!("unknown flags {flags:#x}")));
    }
    let h = Header {
        mem_size,
        flags,
        image_id: p[16..32].try_into().expect("16 bytes"),
        parent_id: p[32..48].try_into().expect("16 bytes"),
        page_count: u64_at(p, 48),
        held_pages: u64_at(p, 56),
        data_pages: u64_at(p, 64),
        data_offset: u64_at(p, 72),
    };
    if !mem_size.is_multiple_of(PAGE_SIZE) || h.page_count != mem_size / PAGE_SIZE {
        return Err(Error::Damaged(format!(
            "{} pages for {} bytes of memory",
            h.page_count, mem_size
        )));
    }
    if p.len() as u64 != payload_len(h.page_count) {
        return Err(Error::Damaged(format!(
            "metadata is {} bytes, {} pages need {}",
            p.len(),
            h.page_count,
            payload_len(h.page_count)
        )));
    }
    if h.data_offset != data_offset(h.page_count) {
        return Err(Error::Damaged(format!("data offset {}", h.data_offset)));
    }
    let expect = file_len(h.page_count);
    if file_size != expect {
        return Err(Error::Truncated {
            expected: expect,
            actual: file_size,
        });
    }
    if h.incremental() == (h.parent_id == [0; 16]) {
        return Err(Error::Damaged(
            "parent id does not match the incremental flag".into(),
        ));
    }
    let words = bitmap_words(h.page_count) as usize;
    let word = |k: usize| u64_at(p, FIELDS_LEN + 8 * k);
    let held: Vec<u64> = (0..words).map(word).collect();
    let data: Vec<u64> = (words..2 * words).map(word).collect();
    let crc_off = FIELDS_LEN + 16 * words;
    let crcs: Vec<u32> = (0..h.page_count as usize)
        .map(|k| u32_at(p, crc_off + 4 * k))
        .collect();
    let tail = h.page_count % 64;
    if tail != 0 {
        let mask = !((1u64 << tail) - 1);
        if held[words - 1] & mask != 0 || data[words - 1] & mask != 0 {
            return Err(Error::Damaged("bitmap bits past the last page".into()));
        }
    }
    if held.iter().zip(&data).any(|(h, d)| d & !h != 0) {
        return Err(Error::Damaged("data bitmap names pages not held".into()));
    }
    if bitmap::count(&held) != h.held_pages || bitmap::count(&data) != h.data_pages {
        return Err(Error::Damaged(
            "bitmap counts do not match the header".into(),
        ));
    }
    if !h.incremental() && h.held_pages != h.page_count {
        return Err(Error::Damaged(format!(
            "full image holds {} of {} pages",
            h.held_pages, h.page_count
        )));
    }
    Ok(Image {
        path: path.to_path_buf(),
        file,
        header: h,
        held,
        data,
        crcs,
    })
}

/// Opens a chain (full image first, then increments, oldest first) and checks that each
/// image's parent is the one before it.
pub fn open_chain(chain: &[PathBuf], id: &Identity) -> Result<Vec<Image>> {
    if chain.is_empty() {
        return Err(Error::Chain("no images given".into()));
    }
    if chain.len() > usize::from(u8::MAX) {
        return Err(Error::Chain(format!(
            "{} images in one chain (at most 255)",
            chain.len()
        )));
    }
    let mut out: Vec<Image> = Vec::with_capacity(chain.len());
    for path in chain {
        let img = Image::open(path, id)?;
        match out.last() {
            None if img.header.incremental() => {
                return Err(Error::Chain(format!(
                    "{} is incremental, a chain starts with a full image",
                    path.display()
                )))
            }
            Some(prev) if img.header.parent_id != prev.header.image_id => {
                return Err(Error::Chain(format!(
                    "{} is not a child of {}",
                    path.display(),
                    prev.path.display()
                )))
            }
            Some(_) if !img.header.incremental() => {
                return Err(Error::Chain(format!(
                    "{} is a full image in the middle of a chain",
                    path.display()
                )))
            }
            _ => {}
        }
        out.push(img);
    }
    Ok(out)
}

/// A fresh random image id.
pub fn new_image_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    loop {
        // SAFETY: writes at most 16 bytes into the live local array.
        let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
        if n == 16 && id != [0; 16] {
            return id;
        }
    }
}
