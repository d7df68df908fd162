//! Layer logs and their replay: a mutated `L<id>.log` (and a resized `L<id>.data`) is written
//! into a copy of a real disk, which is then opened, read through every view, checked and
//! exported; when it opens for writing, a flushed write must survive a reopen.
//!
//! Input: `flags`, `layer`, `data_len` (u16 LE, blocks; 0xffff keeps the file), then the log.
//! Flags: 0x01 reseal every record checksum with the layer's real seed (so mutated fields get
//! past the checksum), 0x02 prepend a valid header (the rest is the record area), 0x04 set each
//! data record's block CRC from the data file, 0x08 read-only only, 0x10 also export.
//! The byte layouts are re-implemented here from `docs/FORMAT.md`, on purpose.

use journal::Disk;

use super::Target;
use crate::disk::{self, BLOCK};

pub const TARGET: Target = Target {
    name: "journal_log",
    about: "layer log records and replay (open, read every view, check, export, write+reopen)",
    run,
    seeds,
    keep_last_input: true,
};

const HEADER: usize = 64;
const RECORD: usize = 32;

fn seed_of(uuid: u128, layer: u64) -> u32 {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(&uuid.to_le_bytes());
    b[16..].copy_from_slice(&layer.to_le_bytes());
    crc32c::crc32c(&b)
}

fn header(uuid: u128, layer: u64) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[0..8].copy_from_slice(b"STRATALG");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&4096u32.to_le_bytes());
    b[16..32].copy_from_slice(&uuid.to_le_bytes());
    b[32..40].copy_from_slice(&layer.to_le_bytes());
    let sum = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&sum.to_le_bytes());
    b
}

fn run(input: &[u8]) {
    let (&flags, rest) = input.split_first().unwrap_or((&0, &[]));
    let (&which, rest) = rest.split_first().unwrap_or((&0, &[]));
    let (len_b, body) = rest.split_at(rest.len().min(2));
    let data_len = match len_b {
        [a, b] => u16::from_le_bytes([*a, *b]),
        _ => u16::MAX,
    };

    let dir = disk::fresh_copy();
    let (uuid, layers, _) = disk::layer_ids(&dir);
    let layer = layers[usize::from(which) % layers.len()];
    let log_path = dir.join(format!("layers/L{layer}.log"));
    let data_path = dir.join(format!("layers/L{layer}.data"));
    if data_len != u16::MAX {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&data_path)
            .expect("data file");
        f.set_len(u64::from(data_len % 300) * BLOCK)
            .expect("resizing the data file");
    }
    let data = std::fs::read(&data_path).expect("reading the data file");

    let mut log = Vec::with_capacity(HEADER + body.len());
    let start = if flags & 0x02 != 0 {
        log.extend_from_slice(&header(uuid, layer));
        HEADER
    } else {
        0
    };
    log.extend_from_slice(body);
    let seed = seed_of(uuid, layer);
    if flags & 0x05 != 0 && log.len() >= HEADER {
        for r in log[HEADER.max(start)..].chunks_exact_mut(RECORD) {
            if flags & 0x04 != 0 && u32::from_le_bytes(r[20..24].try_into().unwrap()) == 1 {
                let n = u64::from_le_bytes(r[8..16].try_into().unwrap());
                let block = n
                    .checked_mul(BLOCK)
                    .and_then(|o| usize::try_from(o).ok())
                    .and_then(|o| data.get(o..o.checked_add(BLOCK as usize)?));
                if let Some(b) = block {
                    r[16..20].copy_from_slice(&crc32c::crc32c(b).to_le_bytes());
                }
            }
            if flags & 0x01 != 0 {
                let sum = crc32c::crc32c_append(seed, &r[..28]);
                r[28..32].copy_from_slice(&sum.to_le_bytes());
            }
        }
    }
    std::fs::write(&log_path, &log).expect("writing the log");

    let export = (flags & 0x10 != 0).then(|| dir.with_extension("export"));
    if let Ok(d) = Disk::open(&dir, disk::opts(true)) {
        disk::exercise(&d, export.as_deref());
    }
    if flags & 0x08 == 0 {
        if let Ok(d) = Disk::open(&dir, disk::opts(false)) {
            disk::exercise(&d, None);
        }
        disk::write_survives_reopen(&dir, u64::from(which) * 7 + u64::from(data_len));
    }
}

/// Every layer's real log, with the flag combinations that keep it valid or reseal it.
fn seeds() -> Vec<Vec<u8>> {
    let dir = disk::template();
    let (_, layers, _) = disk::layer_ids(dir);
    let mut out = Vec::new();
    for (i, id) in layers.iter().enumerate() {
        let log = std::fs::read(dir.join(format!("layers/L{id}.log"))).expect("template log");
        for flags in [0x00u8, 0x03, 0x07, 0x1b] {
            let mut s = vec![flags, i as u8, 0xff, 0xff];
            if flags & 0x02 != 0 {
                s.extend_from_slice(&log[HEADER..]);
            } else {
                s.extend_from_slice(&log);
            }
            out.push(s);
        }
    }
    // Regression (issue 6, item 2): a record with a valid checksum whose data block number
    // overflows the file offset, in the first (sealed) layer.
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&100u64.to_le_bytes());
    r[8..16].copy_from_slice(&(1u64 << 52).to_le_bytes());
    r[20..24].copy_from_slice(&1u32.to_le_bytes());
    let mut s = vec![0x03, 0, 0xff, 0xff];
    s.extend_from_slice(&r);
    out.push(s);
    out
}
