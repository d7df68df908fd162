//! Folding a middle image into its child, so the middle checkpoint can be deleted.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use super::bitmap;
use super::format::{self, Header, Image, PAGE_SIZE};
use super::{Error, ImageStats, Result};
use crate::snapshot::Identity;

/// Pages per copy.
const CHUNK: u64 = 256;

/// Writes to `out` the image `child` with the pages of its parent `parent` that it does not
/// hold (the child's pages win): the result has the child's id and the parent's parent, so the
/// child's own children still chain to it, and `parent` can be deleted. Rename `out` over
/// `child` to finish (the caller does, so a crash leaves both old images intact).
pub fn fold(parent: &Path, child: &Path, out: &Path, id: &Identity) -> Result<ImageStats> {
    let start = Instant::now();
    let p = Image::open(parent, id)?;
    let c = Image::open(child, id)?;
    if !c.header.incremental() || c.header.parent_id != p.header.image_id {
        return Err(Error::Chain(format!(
            "{} is not a child of {}",
            child.display(),
            parent.display()
        )));
    }
    let page_count = c.header.page_count;
    let mut held = p.held.clone();
    let mut data = vec![0u64; held.len()];
    let mut crcs = vec![0u32; page_count as usize];
    // Source per page: 0 = parent, 1 = child.
    let mut from_child = vec![false; page_count as usize];
    for i in 0..page_count {
        let (src, src_i) = if c.holds(i) {
            bitmap::set(&mut held, i);
            from_child[i as usize] = true;
            (&c, i)
        } else if p.holds(i) {
            (&p, i)
        } else {
            continue;
        };
        crcs[i as usize] = src.crcs[src_i as usize];
        if bitmap::test(&src.data, i) {
            bitmap::set(&mut data, i);
        }
    }
    let io = |context| {
        move |source| Error::Io {
            context,
            path: out.to_path_buf(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(out)
        .map_err(io("create folded image"))?;
    file.set_len(format::file_len(page_count))
        .map_err(io("create folded image"))?;
    let data_offset = format::data_offset(page_count);
    let mut buf = vec![0u8; (CHUNK * PAGE_SIZE) as usize];
    for (first, n) in bitmap::runs(&data, page_count, u64::MAX) {
        let mut i = first;
        while i < first + n {
            let src_child = from_child[i as usize];
            let mut len = 1;
            while i + len < first + n && len < CHUNK && from_child[(i + len) as usize] == src_child
            {
                len += 1;
            }
            let src = if src_child { &c } else { &p };
            let chunk = &mut buf[..(len * PAGE_SIZE) as usize];
            src.file
                .read_exact_at(chunk, src.header.data_offset + i * PAGE_SIZE)
                .map_err(|source| Error::Io {
                    context: "read memory image",
                    path: src.path.clone(),
                    source,
                })?;
            for (j, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                let k = i + j as u64;
                if crc32c::crc32c(page) != src.crcs[k as usize] {
                    return Err(Error::PageChecksum {
                        path: src.path.clone(),
                        page: k,
                    });
                }
            }
            file.write_all_at(chunk, data_offset + i * PAGE_SIZE)
                .map_err(io("write folded image"))?;
            i += len;
        }
    }
    let header = Header {
        mem_size: id.mem_size,
        flags: p.header.flags,
        image_id: c.header.image_id,
        parent_id: p.header.parent_id,
        page_count,
        held_pages: bitmap::count(&held),
        data_pages: bitmap::count(&data),
        data_offset,
    };
    file.sync_data().map_err(io("sync folded image"))?;
    let meta = format::encode(id, &header, &held, &data, &crcs);
    file.write_all_at(&meta, 0)
        .map_err(io("write folded image"))?;
    file.sync_data().map_err(io("sync folded image"))?;
    Ok(ImageStats {
        image_id: header.image_id,
        incremental: header.incremental(),
        pages: header.held_pages,
        data_pages: header.data_pages,
        bytes_written: header.data_pages * PAGE_SIZE,
        elapsed: start.elapsed(),
        ..ImageStats::default()
    })
}
