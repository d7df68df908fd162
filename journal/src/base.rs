//! The optional read-only raw base image under every layer.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::disk::CacheMode;
use crate::safe_open::{open_regular, open_regular_flags, Links};
use crate::tree::BaseRef;
use crate::{Error, Result, BLOCK_SIZE, SECTOR_SIZE};

/// Number of 4 KiB blocks sampled (evenly spread, plus the first and last) for a fingerprint.
const FINGERPRINT_SAMPLES: u64 = 64;

/// An open base image.
pub struct BaseImage {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
}

/// Names the base image in a "not a regular file" error.
fn not_regular(path: &Path, e: Error) -> Error {
    match e {
        Error::NotRegular(_) => Error::BaseChanged {
            path: path.to_path_buf(),
            why: "not a regular file".into(),
        },
        e => e,
    }
}

impl BaseImage {
    /// Opens `path` read-only (O_DIRECT when `cache` is none and the filesystem allows it).
    pub fn open(path: &Path, cache: CacheMode) -> Result<BaseImage> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        // The path is the user's choice: a symlink is followed, but only to a regular file
        // (checked before any read, and without blocking on a FIFO).
        let file = if cache == CacheMode::None {
            match open_regular_flags(path, &opts, Links::Follow, libc::O_DIRECT) {
                Ok(f) => f,
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                    open_regular(path, &opts, Links::Follow).map_err(|e| not_regular(path, e))?
                }
                Err(e) => return Err(not_regular(path, e)),
            }
        } else {
            open_regular(path, &opts, Links::Follow).map_err(|e| not_regular(path, e))?
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            return Err(Error::BaseChanged {
                path: path.to_path_buf(),
                why: format!("size {size} is not a multiple of 512"),
            });
        }
        Ok(BaseImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Opens the base a disk references and refuses it if its size or content changed.
    pub fn open_checked(base: &BaseRef, cache: CacheMode) -> Result<BaseImage> {
        let img = Self::open(&base.path, cache)?;
        if img.size != base.size {
            return Err(Error::BaseChanged {
                path: base.path.clone(),
                why: format!(
                    "size is {} bytes, the disk was created over {} bytes",
                    img.size, base.size
                ),
            });
        }
        let fp = img.fingerprint()?;
        if fp != base.fingerprint {
            return Err(Error::BaseChanged {
                path: base.path.clone(),
                why: format!(
                    "content changed since the disk was created (fingerprint {fp}, expected {})",
                    base.fingerprint
                ),
            });
        }
        Ok(img)
    }

    /// CRC32C over sampled blocks (and the size), as 8 hex digits.
    pub fn fingerprint(&self) -> Result<String> {
        let blocks = self.size.div_ceil(BLOCK_SIZE);
        let mut sum = crc32c::crc32c(&self.size.to_le_bytes());
        let mut buf = crate::AlignedBuf::new(BLOCK_SIZE as usize);
        let mut samples: Vec<u64> = (0..FINGERPRINT_SAMPLES)
            .map(|i| i * blocks / FINGERPRINT_SAMPLES)
            .collect();
        samples.push(blocks.saturating_sub(1));
        samples.dedup();
        for b in samples {
            if b >= blocks {
                continue;
            }
            let n = self.read_at(buf.as_mut_slice(), b * BLOCK_SIZE)?;
            sum = crc32c::crc32c_append(sum, &buf.as_slice()[..n]);
        }
        Ok(format!("{sum:08x}"))
    }

    /// Reads at `off` (block aligned); bytes past the end of the image read as zeros.
    /// Returns how many bytes came from the file.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let avail = self.size.saturating_sub(off).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < avail {
            match self.file.read_at(&mut buf[done..avail], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }
}
