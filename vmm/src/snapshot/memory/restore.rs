//! Lazy restore: guest RAM is fresh anonymous memory whose pages the fault handler fills
//! from the image chain on first touch, while a prefetch thread loads the rest.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::bitmap;
use super::format::{self, PAGE_SIZE};
use super::tracker::{Source, Tracker};
use super::{Error, Result};
use crate::snapshot::Identity;

/// Pages per prefetch read.
const PREFETCH_PAGES: u64 = 64;

/// Restores guest memory from `chain` (full image first, then its increments, oldest first)
/// for the VM `id`. Every image is checked (envelope, metadata checksums, sizes, the chain's
/// parent links) before anything is mapped; page data is checked against its CRC as it is
/// loaded, and a damaged page is never served (the access fails). Returns at once: pages load
/// on first touch, and in the background. The memory stays tracked, so a later
/// [`super::start_live`] with this chain's last image as parent takes an increment.
pub fn restore(chain: &[PathBuf], id: &Identity) -> Result<GuestMemoryMmap> {
    restore_with(chain, id, true)
}

/// [`restore`], with or without the prefetch thread (tests: every page by fault).
pub(super) fn restore_with(
    chain: &[PathBuf],
    id: &Identity,
    prefetch_pages: bool,
) -> Result<GuestMemoryMmap> {
    let images = format::open_chain(chain, id)?;
    let page_count = id.mem_size / PAGE_SIZE;
    let mut owner = vec![u8::MAX; page_count as usize];
    for (k, img) in images.iter().enumerate() {
        for (first, n) in bitmap::runs(&img.held, page_count, u64::MAX) {
            for i in first..first + n {
                owner[i as usize] = if bitmap::test(&img.data, i) {
                    k as u8
                } else {
                    u8::MAX
                };
            }
        }
    }
    let last = images.last().expect("chain is not empty").header.image_id;
    let mem = crate::memory::create(id.mem_size).map_err(|e| Error::Memory(e.to_string()))?;
    let source = Arc::new(Source { images, owner });
    let t = Tracker::create(&mem, Some(source))?;
    t.lock().last_image = Some(last);
    if !prefetch_pages {
        return Ok(mem);
    }
    let p = Arc::clone(&t);
    let th = std::thread::Builder::new()
        .name("memory-prefetch".into())
        .spawn(move || {
            prefetch(&p);
            p.prefetched
                .store(true, std::sync::atomic::Ordering::Release);
        })
        .map_err(|e| Error::Sys("spawn memory prefetch", e))?;
    t.add_thread(th);
    Ok(mem)
}

/// Loads every non-zero page not yet present, in runs read from one image.
fn prefetch(t: &Tracker) {
    let Some(src) = t.source.clone() else { return };
    let mut buf = vec![0u8; (PREFETCH_PAGES * PAGE_SIZE) as usize];
    for r in &t.regions {
        let end = r.first_page + r.len / PAGE_SIZE;
        let mut i = r.first_page;
        while i < end {
            if t.stopping() {
                return;
            }
            let k = src.owner[i as usize];
            if k == u8::MAX {
                i += 1;
                continue;
            }
            let mut n = 1;
            while i + n < end && n < PREFETCH_PAGES && src.owner[(i + n) as usize] == k {
                n += 1;
            }
            let img = &src.images[k as usize];
            let data = &mut buf[..(n * PAGE_SIZE) as usize];
            let off = img.header.data_offset + i * PAGE_SIZE;
            if let Err(e) = img.file.read_exact_at(data, off) {
                t.record_damage(format!("{}: {e}", img.path.display()));
                i += n;
                continue;
            }
            let all_good = data
                .chunks(PAGE_SIZE as usize)
                .enumerate()
                .all(|(j, p)| crc32c::crc32c(p) == img.crcs[i as usize + j]);
            let r = if all_good {
                t.fill(i, data)
            } else {
                if let Some((j, _)) = data
                    .chunks(PAGE_SIZE as usize)
                    .enumerate()
                    .find(|(j, p)| crc32c::crc32c(p) != img.crcs[i as usize + j])
                {
                    let e = Error::PageChecksum {
                        path: img.path.clone(),
                        page: i + j as u64,
                    };
                    t.record_damage(e.to_string());
                }
                data.chunks(PAGE_SIZE as usize)
                    .enumerate()
                    .filter(|(j, p)| crc32c::crc32c(p) == img.crcs[i as usize + j])
                    .try_for_each(|(j, p)| t.fill(i + j as u64, p))
            };
            if let Err(e) = r {
                tracing::warn!("memory prefetch stopped: {e}");
                return;
            }
            i += n;
        }
    }
}
