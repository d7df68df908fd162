//! virtio-blk descriptor chains: a split virtqueue laid out in real guest memory from the
//! input (descriptor table, available ring, request headers and segments), each available
//! chain parsed by `block::request::parse`, and every accepted request checked against the
//! limits the device relies on.
//!
//! Input: features (u64 LE, masked by what the device offers), capacity in sectors (u32 LE),
//! a read-only byte, the head count and heads (u16 LE each), the descriptor table length
//! (u16 LE) and bytes, then the bytes of the header area at [`HDR`].

use std::cell::RefCell;

use block::config;
use block::request::{parse, RequestKind};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Target;

pub const TARGET: Target = Target {
    name: "virtio_blk",
    about: "virtio-blk descriptor chains and request headers (block::request::parse)",
    run,
    seeds,
    keep_last_input: false,
};

const MEM: u64 = 16 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Request headers, segments and status bytes.
pub const HDR: u64 = 0x4000;
const HDR_LEN: usize = 0x4000;
const DATA: u64 = 0x10_0000;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = data.split_at(n.min(data.len()));
    *data = b;
    a
}

fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(x)
}

fn run(mut input: &[u8]) {
    thread_local! {
        static MEMORY: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
    }
    MEMORY.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory")
        });
        one(mem, &mut input);
    });
}

fn one(mem: &GuestMemoryMmap, input: &mut &[u8]) {
    let features = le(take(input, 8));
    let capacity = le(take(input, 4)) * journal::SECTOR_SIZE;
    let read_only = take(input, 1).first().is_some_and(|b| b & 1 != 0);
    let acked = features & config::avail_features(read_only);
    let limits = config::limits(capacity, read_only, acked);
    let qsize = config::QUEUE_SIZE;

    let nheads = usize::from(take(input, 1).first().copied().unwrap_or(0));
    let heads: Vec<u16> = take(input, nheads * 2)
        .chunks(2)
        .map(|c| le(c) as u16)
        .collect();
    let table_len = le(take(input, 2)) as usize;
    let mut table = take(input, table_len.min(usize::from(qsize) * 16)).to_vec();
    table.resize(usize::from(qsize) * 16, 0);
    let mut hdr = take(input, HDR_LEN).to_vec();
    hdr.resize(HDR_LEN, 0);

    mem.write_slice(&table, GuestAddress(DESC)).expect("table");
    mem.write_slice(&hdr, GuestAddress(HDR)).expect("headers");
    let mut avail = vec![0u8; 4 + 2 * usize::from(qsize) + 2];
    avail[2..4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        let at = 4 + 2 * (i % usize::from(qsize));
        avail[at..at + 2].copy_from_slice(&h.to_le_bytes());
    }
    mem.write_slice(&avail, GuestAddress(AVAIL)).expect("avail");
    mem.write_slice(&[0u8; 4], GuestAddress(USED))
        .expect("used");

    let mut q = Queue::new(qsize).expect("queue");
    q.set_size(qsize);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let Ok(iter) = q.iter(mem) else {
        return;
    };
    for chain in iter {
        let Ok(req) = parse(chain, mem, &limits) else {
            continue;
        };
        assert!(
            req.buffer_bytes() <= u64::from(limits.max_data_bytes),
            "a request makes the device allocate {} bytes",
            req.buffer_bytes()
        );
        assert!(
            mem.read_obj::<u8>(req.status).is_ok(),
            "status byte outside guest memory"
        );
        match &req.kind {
            RequestKind::Read { offset, data } | RequestKind::Write { offset, data } => {
                assert!(
                    offset
                        .checked_add(data.len())
                        .is_some_and(|e| e <= capacity),
                    "I/O past the end: {offset} + {} > {capacity}",
                    data.len()
                );
                assert_eq!(data.len() % journal::SECTOR_SIZE, 0, "unaligned I/O length");
                assert!(
                    !(read_only && matches!(req.kind, RequestKind::Write { .. })),
                    "a write accepted on a read-only disk"
                );
            }
            RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => {
                assert!(
                    !read_only,
                    "discard/write-zeroes accepted on a read-only disk"
                );
                assert!(
                    ranges.len()
                        <= config::MAX_DISCARD_SEG.max(config::MAX_WRITE_ZEROES_SEG) as usize
                );
                for r in ranges {
                    assert!(
                        r.offset.checked_add(r.len).is_some_and(|e| e <= capacity),
                        "a range past the end: {r:?} capacity {capacity}"
                    );
                }
            }
            // The serial is at most 20 bytes whatever the buffer: nothing is allocated.
            RequestKind::GetId { .. } => {}
            RequestKind::Flush => assert!(limits.flush, "FLUSH accepted without the feature"),
        }
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Builds an input: chains given as descriptor lists (linked in order), headers at HDR.
fn build(read_only: bool, chains: &[Vec<(u64, u32, u16)>], hdr: &[u8]) -> Vec<u8> {
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(&(8192u32).to_le_bytes());
    v.push(u8::from(read_only));
    let mut table = Vec::new();
    let mut heads = Vec::new();
    let mut i = 0u16;
    for c in chains {
        heads.push(i);
        for (k, &(addr, len, flags)) in c.iter().enumerate() {
            let last = k + 1 == c.len();
            let flags = if last { flags } else { flags | NEXT };
            table.extend_from_slice(&desc(addr, len, flags, if last { 0 } else { i + 1 }));
            i += 1;
        }
    }
    v.push(heads.len() as u8);
    for h in heads {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&(table.len() as u16).to_le_bytes());
    v.extend_from_slice(&table);
    v.extend_from_slice(hdr);
    v
}

fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn seeds() -> Vec<Vec<u8>> {
    // Headers at HDR + 64 * k; a discard segment after header 4; status bytes at HDR + 0x2000.
    let mut hdr = Vec::new();
    for (ty, sector) in [
        (0u32, 0u64),
        (1, 8),
        (4, 0),
        (8, 0),
        (11, 0),
        (13, 16),
        (99, 0),
    ] {
        hdr.extend_from_slice(&header(ty, sector));
        let mut seg = [0u8; 48];
        seg[0..8].copy_from_slice(&(sector + 1).to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        hdr.extend_from_slice(&seg);
    }
    let st = |k: u64| (HDR + 0x2000 + k, 1u32, WRITE);
    let h = |k: u64, len: u32| (HDR + 64 * k, len, 0u16);
    let chains = vec![
        vec![h(0, 16), (DATA, 4096, WRITE), st(0)],
        vec![h(1, 16), (DATA, 512, 0), (DATA + 4096, 1024, 0), st(1)],
        vec![h(2, 16), st(2)],
        vec![h(3, 16), (DATA, 20, WRITE), st(3)],
        vec![h(4, 16), (HDR + 64 * 4 + 16, 16, 0), st(4)],
        vec![h(5, 16), (HDR + 64 * 5 + 16, 32, 0), st(5)],
        vec![h(6, 16), st(6)],
        vec![h(0, 8), (HDR + 8, 8, 0), (DATA, 8192, WRITE), st(7)],
        vec![h(0, 16), (DATA, 4096, WRITE), (MEM - 1, 1, WRITE)],
    ];
    let mut out = vec![
        build(false, &chains, &hdr),
        build(true, &chains, &hdr),
        build(false, &chains[..1], &hdr),
    ];
    // An indirect table inside the header area (a 3-entry chain behind one descriptor).
    let mut with_table = hdr.clone();
    with_table.resize(0x3000, 0);
    with_table.extend_from_slice(&desc(HDR, 16, NEXT, 1));
    with_table.extend_from_slice(&desc(DATA, 4096, NEXT | WRITE, 2));
    with_table.extend_from_slice(&desc(HDR + 0x2000, 1, WRITE, 0));
    out.push(build(
        false,
        &[vec![(HDR + 0x3000, 48, INDIRECT)]],
        &with_table,
    ));
    out
}
