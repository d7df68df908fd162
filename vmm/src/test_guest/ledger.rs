//! The guest's ledger (what it wrote where) and its data pattern, so the host can check a disk
//! against a memory image of the guest, e.g. after a checkpoint and restore.
//!
//! Ledger header page at [`LEDGER_ADDR`](super::LEDGER_ADDR), little endian:
//! ```text
//! off size field
//! 0   4    magic "STRL" (0x4C525453); 0 while the guest is setting up
//! 4   4    version = 1
//! 8   8    seed
//! 16  8    region_sector   first disk sector tracked (tags[0])
//! 24  8    region_sectors  number of tags
//! 32  4    state           0 setting up, 1 running, 2 done
//! 36  4    qd
//! 40  8    last_tag        tags 1..=last_tag have been given to writes
//! 48  8    completed       reads + writes completed
//! 56  8    errors
//! 64  24*128 slots         {u32 kind (0 free, 1 read, 2 write, 3 flush), u32 tag,
//!                           u64 sector, u64 sectors}: the requests in flight
//! 3136 8   dirty_base      guest-physical address of the dirty region (0: no `dirty=`)
//! 3144 8   dirty_pages     4 KiB pages in it
//! 3152 8   dirty_written   page rewrites done
//! 3160 4   dirty_rate      pages rewritten per completed request
//! 3164 4   reserved
//! ```
//! Tags at [`LEDGER_TAGS_ADDR`](super::LEDGER_TAGS_ADDR): one u32 per sector of the region:
//! 0 = never written by this run, `u32::MAX` = a write failed (contents unknown), else the tag of
//! the last write that completed with OK status. A tag is set when the write completes, so a
//! sector under an in-flight write may hold the old or the new data.
//!
//! Pattern of a sector written with tag `t` in a run with seed `s` (64 little-endian u64 words):
//! `w[0] = sector`, `w[1] = t | s << 32`, `w[i] = mix64(k + i)` for i in 2..64 with
//! `k = mix64(s ^ mix64(sector ^ mix64(t)))`, `mix64` = the splitmix64 finaliser.
//!
//! Dirty region (`dirty=SIZE`): page `p` at generation `g` holds 512 little-endian u64 words
//! `w[0] = p`, `w[1] = g`, `w[i] = mix64(k + i)` for i in 2..512 with
//! `k = mix64(!s ^ mix64(p ^ mix64(g)))`. After `dirty_written` rewrites page `p` holds
//! generation [`dirty_gen`]; the page `dirty_written % dirty_pages` may be half rewritten in a
//! memory image (the guest writes the page, then counts it).
//!
//! Digests of the `done` line: `ledger=` is FNV-1a 64 over the tags as little-endian bytes in
//! region order ([`ledger_digest`]), `mem=` FNV-1a 64 over the dirty region's bytes.

use super::Error;

/// Tag of a sector never written by this run.
pub const TAG_NEVER: u32 = 0;
/// Tag of a sector whose write failed: contents unknown, never verified.
pub const TAG_UNKNOWN: u32 = u32::MAX;
/// Ledger header magic, "STRL".
pub const LEDGER_MAGIC: u32 = 0x4C52_5453;
/// Ledger layout version.
pub const LEDGER_VERSION: u32 = 1;
/// Number of slots in the header.
pub const SLOTS: usize = 128;
/// Bytes of the header that [`LedgerHeader::parse`] reads.
pub const HEADER_LEN: usize = 64 + 24 * SLOTS + 32;
const SECTOR: usize = 512;
const PAGE: usize = 4096;
const DIRTY_OFF: usize = 64 + 24 * SLOTS;

/// FNV-1a 64 offset basis: the digest of nothing.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds `bytes` into the FNV-1a 64 state `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a64(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The `ledger=` digest of the guest's `done` line for these tags.
pub fn ledger_digest(tags: &[u32]) -> u64 {
    tags.iter()
        .fold(FNV_OFFSET, |h, t| fnv1a64(h, &t.to_le_bytes()))
}

/// The 4096 bytes of dirty-region page `page` at generation `gen` in a run with `seed`.
pub fn dirty_page_pattern(seed: u64, page: u64, gen: u64) -> Vec<u8> {
    let key = mix64(!seed ^ mix64(page ^ mix64(gen)));
    let mut out = vec![0u8; PAGE];
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        let w = match i {
            0 => page,
            1 => gen,
            _ => mix64(key.wrapping_add(i as u64)),
        };
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The generation page `page` of a `pages`-page dirty region holds after `written` rewrites
/// (rewrite `c` writes page `c % pages` with generation `c / pages + 1`).
pub fn dirty_gen(written: u64, pages: u64, page: u64) -> u64 {
    if page >= written || pages == 0 {
        0
    } else {
        (written - 1 - page) / pages + 1
    }
}

/// The tags a disk's contents imply for the `sectors` 512-byte sectors in `data` starting at
/// disk sector `first`: 0 for an all-zero sector, else the tag of the pattern it holds. Anything
/// else (not a pattern of this seed and sector) is an error naming the sector.
pub fn tags_from_disk(seed: u64, first: u64, data: &[u8]) -> Result<Vec<u32>, Error> {
    if !data.len().is_multiple_of(SECTOR) {
        return Err(Error::Ledger(format!(
            "{} bytes is not a whole number of sectors",
            data.len()
        )));
    }
    data.chunks_exact(SECTOR)
        .enumerate()
        .map(|(i, d)| {
            let sector = first + i as u64;
            if d.iter().all(|&b| b == 0) {
                return Ok(TAG_NEVER);
            }
            let tag = u32_at(d, 8);
            if sector_matches(seed, sector, tag, d) {
                Ok(tag)
            } else {
                Err(Error::Ledger(format!(
                    "sector {sector} holds neither zeros nor a pattern of seed {seed}"
                )))
            }
        })
        .collect()
}

/// The splitmix64 finaliser.
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pattern_word(seed: u64, sector: u64, tag: u32, key: u64, i: usize) -> u64 {
    match i {
        0 => sector,
        1 => u64::from(tag) | seed << 32,
        _ => mix64(key.wrapping_add(i as u64)),
    }
}

/// The 512 bytes the guest writes to `sector` with `tag` in a run with `seed`.
pub fn sector_pattern(seed: u64, sector: u64, tag: u32) -> [u8; 512] {
    let key = mix64(seed ^ mix64(sector ^ mix64(u64::from(tag))));
    let mut out = [0u8; SECTOR];
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(seed, sector, tag, key, i).to_le_bytes());
    }
    out
}

/// Whether `data` (512 bytes) is the pattern of `sector` with `tag`.
pub fn sector_matches(seed: u64, sector: u64, tag: u32, data: &[u8]) -> bool {
    data.len() == SECTOR && data == sector_pattern(seed, sector, tag).as_slice()
}

/// What the guest is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    Setup,
    Running,
    Done,
}

/// A request type in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Read,
    Write,
    Flush,
}

/// A request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub kind: SlotKind,
    /// Write tag (0 for reads and flushes).
    pub tag: u32,
    pub sector: u64,
    pub sectors: u64,
}

/// The parsed ledger header page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerHeader {
    pub seed: u64,
    pub region_sector: u64,
    pub region_sectors: u64,
    pub state: LedgerState,
    pub queue_depth: u32,
    pub last_tag: u64,
    pub completed: u64,
    pub errors: u64,
    pub in_flight: Vec<InFlight>,
    /// Guest-physical address of the dirty region (0: none).
    pub dirty_base: u64,
    pub dirty_pages: u64,
    pub dirty_written: u64,
    pub dirty_rate: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl LedgerHeader {
    /// Parses the header from guest memory at `LEDGER_ADDR` (at least [`HEADER_LEN`] bytes).
    /// The memory comes from the guest: every field is checked.
    pub fn parse(page: &[u8]) -> Result<Self, Error> {
        let bad = |m: String| Error::Ledger(m);
        if page.len() < HEADER_LEN {
            return Err(bad(format!(
                "header needs {HEADER_LEN} bytes, got {}",
                page.len()
            )));
        }
        let magic = u32_at(page, 0);
        if magic != LEDGER_MAGIC {
            return Err(bad(format!(
                "magic {magic:#x} (guest not started or not set up)"
            )));
        }
        let version = u32_at(page, 4);
        if version != LEDGER_VERSION {
            return Err(bad(format!("unsupported version {version}")));
        }
        let state = match u32_at(page, 32) {
            0 => LedgerState::Setup,
            1 => LedgerState::Running,
            2 => LedgerState::Done,
            s => return Err(bad(format!("unknown state {s}"))),
        };
        let mut in_flight = Vec::new();
        for i in 0..SLOTS {
            let off = 64 + 24 * i;
            let kind = match u32_at(page, off) {
                0 => continue,
                1 => SlotKind::Read,
                2 => SlotKind::Write,
                3 => SlotKind::Flush,
                k => return Err(bad(format!("slot {i}: unknown kind {k}"))),
            };
            in_flight.push(InFlight {
                kind,
                tag: u32_at(page, off + 4),
                sector: u64_at(page, off + 8),
                sectors: u64_at(page, off + 16),
            });
        }
        Ok(Self {
            seed: u64_at(page, 8),
            region_sector: u64_at(page, 16),
            region_sectors: u64_at(page, 24),
            state,
            queue_depth: u32_at(page, 36),
            last_tag: u64_at(page, 40),
            completed: u64_at(page, 48),
            errors: u64_at(page, 56),
            in_flight,
            dirty_base: u64_at(page, DIRTY_OFF),
            dirty_pages: u64_at(page, DIRTY_OFF + 8),
            dirty_written: u64_at(page, DIRTY_OFF + 16),
            dirty_rate: u32_at(page, DIRTY_OFF + 24),
        })
    }

    /// Bytes of the dirty region.
    pub fn dirty_len(&self) -> u64 {
        self.dirty_pages.saturating_mul(PAGE as u64)
    }

    /// Checks a memory image of the dirty region (`region`: [`dirty_len`](Self::dirty_len)
    /// bytes from `dirty_base`) against the rewrite count; returns the pages that hold something
    /// else. The page being rewritten at the instant (`dirty_written % dirty_pages`) is skipped.
    pub fn verify_dirty(&self, region: &[u8]) -> Result<Vec<u64>, Error> {
        if region.len() as u64 != self.dirty_len() {
            return Err(Error::Ledger(format!(
                "dirty region image is {} bytes, the ledger says {}",
                region.len(),
                self.dirty_len()
            )));
        }
        let busy = self.dirty_written.checked_rem(self.dirty_pages);
        Ok(region
            .chunks_exact(PAGE)
            .enumerate()
            .map(|(p, data)| (p as u64, data))
            .filter(|&(p, data)| {
                let gen = dirty_gen(self.dirty_written, self.dirty_pages, p);
                Some(p) != busy && data != dirty_page_pattern(self.seed, p, gen).as_slice()
            })
            .map(|(p, _)| p)
            .collect())
    }

    /// Bytes of tags at `LEDGER_TAGS_ADDR`.
    pub fn tags_len(&self) -> u64 {
        self.region_sectors.saturating_mul(4)
    }

    /// Whether a write in flight covers `sector` (its contents may be old or new).
    pub fn write_in_flight(&self, sector: u64) -> bool {
        self.in_flight.iter().any(|f| {
            f.kind == SlotKind::Write && sector >= f.sector && sector - f.sector < f.sectors
        })
    }
}

/// Decodes the tag array (little-endian u32s).
pub fn parse_tags(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A sector whose disk contents do not match the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub sector: u64,
    pub expected_tag: u32,
    /// Words 0 and 1 of what the disk holds (the sector and tag it was written for, if it is
    /// a pattern at all).
    pub found_sector: u64,
    pub found_tag: u32,
}

/// Result of checking a disk against a ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Sectors compared with their pattern.
    pub checked: u64,
    /// Sectors skipped: never written, failed write, or under a write in flight.
    pub skipped: u64,
    pub mismatch_count: u64,
    /// The first mismatches (at most 16).
    pub mismatches: Vec<Mismatch>,
}

const CHUNK_SECTORS: u64 = 256;
const MAX_LISTED: usize = 16;

/// Checks every tracked sector of the disk against the ledger. `read(first_sector, buf)` must
/// fill `buf` (a multiple of 512 bytes) from the disk.
pub fn verify_disk<E>(
    header: &LedgerHeader,
    tags: &[u32],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Result<VerifyReport, Error>, E> {
    if (tags.len() as u64) < header.region_sectors {
        return Ok(Err(Error::Ledger(format!(
            "{} tags for a region of {} sectors",
            tags.len(),
            header.region_sectors
        ))));
    }
    let mut report = VerifyReport::default();
    let mut buf = vec![0u8; CHUNK_SECTORS as usize * SECTOR];
    let mut first = 0u64;
    while first < header.region_sectors {
        let n = CHUNK_SECTORS.min(header.region_sectors - first);
        let chunk = &mut buf[..n as usize * SECTOR];
        read(header.region_sector + first, chunk)?;
        for k in 0..n {
            let sector = header.region_sector + first + k;
            let tag = tags[(first + k) as usize];
            if tag == TAG_NEVER || tag == TAG_UNKNOWN || header.write_in_flight(sector) {
                report.skipped += 1;
                continue;
            }
            report.checked += 1;
            let data = &chunk[k as usize * SECTOR..(k as usize + 1) * SECTOR];
            if !sector_matches(header.seed, sector, tag, data) {
                report.mismatch_count += 1;
                if report.mismatches.len() < MAX_LISTED {
                    report.mismatches.push(Mismatch {
                        sector,
                        expected_tag: tag,
                        found_sector: u64_at(data, 0),
                        found_tag: u32_at(data, 8),
                    });
                }
            }
        }
        first += n;
    }
    Ok(Ok(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(slots: &[(u32, u32, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&LEDGER_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&7u64.to_le_bytes());
        b[16..24].copy_from_slice(&100u64.to_le_bytes());
        b[24..32].copy_from_slice(&600u64.to_le_bytes());
        b[32..36].copy_from_slice(&1u32.to_le_bytes());
        b[36..40].copy_from_slice(&32u32.to_le_bytes());
        b[40..48].copy_from_slice(&9u64.to_le_bytes());
        b[48..56].copy_from_slice(&20u64.to_le_bytes());
        b[3136..3144].copy_from_slice(&0x0c00_0000u64.to_le_bytes());
        b[3144..3152].copy_from_slice(&3u64.to_le_bytes());
        b[3152..3160].copy_from_slice(&7u64.to_le_bytes());
        b[3160..3164].copy_from_slice(&2u32.to_le_bytes());
        for (i, (kind, tag, sector, n)) in slots.iter().enumerate() {
            let off = 64 + 24 * (i * 5); // spread over the table
            b[off..off + 4].copy_from_slice(&kind.to_le_bytes());
            b[off + 4..off + 8].copy_from_slice(&tag.to_le_bytes());
            b[off + 8..off + 16].copy_from_slice(&sector.to_le_bytes());
            b[off + 16..off + 24].copy_from_slice(&n.to_le_bytes());
        }
        b
    }

    #[test]
    fn pattern_has_the_documented_words() {
        let p = sector_pattern(0x1_0000_0005, 776, 46);
        assert_eq!(u64_at(&p, 0), 776);
        assert_eq!(u64_at(&p, 8), 46 | 5 << 32);
        let k = mix64(0x1_0000_0005 ^ mix64(776 ^ mix64(46)));
        assert_eq!(u64_at(&p, 16), mix64(k + 2));
        assert_eq!(u64_at(&p, 504), mix64(k + 63));
        assert!(sector_matches(0x1_0000_0005, 776, 46, &p));
        assert!(!sector_matches(0x1_0000_0005, 776, 47, &p));
        assert!(!sector_matches(0x1_0000_0005, 776, 46, &p[..511]));
        // splitmix64 reference value: the first output of splitmix64 seeded with 0.
        assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn parses_the_header_and_its_slots() {
        let b = header_bytes(&[(2, 9, 150, 8), (1, 0, 300, 1), (3, 0, 0, 0)]);
        let h = LedgerHeader::parse(&b).unwrap();
        assert_eq!((h.seed, h.region_sector, h.region_sectors), (7, 100, 600));
        assert_eq!(
            (h.state, h.queue_depth, h.last_tag, h.completed),
            (LedgerState::Running, 32, 9, 20)
        );
        assert_eq!(h.in_flight.len(), 3);
        assert_eq!(
            h.in_flight[0],
            InFlight {
                kind: SlotKind::Write,
                tag: 9,
                sector: 150,
                sectors: 8
            }
        );
        assert!(h.write_in_flight(150) && h.write_in_flight(157));
        assert!(!h.write_in_flight(158) && !h.write_in_flight(300));
        assert_eq!(h.tags_len(), 2400);
        assert_eq!(
            (h.dirty_base, h.dirty_pages, h.dirty_written, h.dirty_rate),
            (0x0c00_0000, 3, 7, 2)
        );
        assert_eq!(h.dirty_len(), 3 * 4096);
    }

    #[test]
    fn digests_are_fnv1a64() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        let tags = [1u32, 0, 0xdead_beef];
        let bytes: Vec<u8> = tags.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(ledger_digest(&tags), fnv1a64(FNV_OFFSET, &bytes));
        assert_ne!(ledger_digest(&[1, 2]), ledger_digest(&[2, 1]));
    }

    #[test]
    fn dirty_generations_follow_the_round_robin() {
        // 3 pages, 7 rewrites: pages 0,1,2,0,1,2,0 -> generations 3, 2, 2.
        assert_eq!(
            (0..3).map(|p| dirty_gen(7, 3, p)).collect::<Vec<_>>(),
            vec![3, 2, 2]
        );
        assert_eq!(dirty_gen(0, 3, 0), 0);
        assert_eq!(dirty_gen(1, 3, 1), 0);
        assert_eq!(dirty_gen(u64::MAX, 1, 0), u64::MAX);
        let p = dirty_page_pattern(9, 2, 5);
        assert_eq!((u64_at(&p, 0), u64_at(&p, 8)), (2, 5));
        assert_eq!(u64_at(&p, 16), mix64(mix64(!9 ^ mix64(2 ^ mix64(5))) + 2));
        assert_ne!(p, dirty_page_pattern(9, 2, 4));
    }

    #[test]
    fn verify_dirty_finds_a_page_from_another_instant() {
        let h = LedgerHeader::parse(&header_bytes(&[])).unwrap(); // seed 7, 3 pages, 7 written
        let mut region: Vec<u8> = (0..3)
            .flat_map(|p| dirty_page_pattern(7, p, dirty_gen(7, 3, p)))
            .collect();
        assert_eq!(h.verify_dirty(&region).unwrap(), Vec::<u64>::new());
        // Page 1 (busy: 7 % 3) may be half rewritten; page 2 restored from an older instant.
        region[4096 + 100] ^= 1;
        region[8192..].copy_from_slice(&dirty_page_pattern(7, 2, 1));
        assert_eq!(h.verify_dirty(&region).unwrap(), vec![2]);
        region[5] ^= 1;
        assert_eq!(h.verify_dirty(&region).unwrap(), vec![0, 2]);
        assert!(h.verify_dirty(&region[..4096]).is_err());
    }

    #[test]
    fn tags_from_disk_reads_back_the_patterns() {
        let mut disk = vec![0u8; 4 * 512];
        disk[512..1024].copy_from_slice(&sector_pattern(3, 11, 40));
        disk[1536..].copy_from_slice(&sector_pattern(3, 13, 2));
        let tags = tags_from_disk(3, 10, &disk).unwrap();
        assert_eq!(tags, vec![0, 40, 0, 2]);
        // Wrong seed, wrong place, or garbage: refused.
        assert!(tags_from_disk(4, 10, &disk).is_err());
        assert!(tags_from_disk(3, 11, &disk).is_err());
        disk[700] ^= 1;
        assert!(tags_from_disk(3, 10, &disk).is_err());
        assert!(tags_from_disk(3, 10, &disk[..100]).is_err());
    }

    #[test]
    fn refuses_bad_headers() {
        let good = header_bytes(&[]);
        assert!(LedgerHeader::parse(&good[..HEADER_LEN - 1]).is_err());
        let mut b = good.clone();
        b[0] = 0;
        assert!(LedgerHeader::parse(&b).is_err());
        let mut b = good.clone();
        b[4] = 2;
        assert!(LedgerHeader::parse(&b).is_err());
        let mut b = good.clone();
        b[32] = 3;
        assert!(LedgerHeader::parse(&b).is_err());
        let b = header_bytes(&[(4, 0, 0, 0)]);
        assert!(LedgerHeader::parse(&b).is_err());
    }

    #[test]
    fn verify_disk_finds_mismatches_and_skips_unknowns() {
        // Region: sectors 100..700, one write of tag 9 in flight over 150..158.
        let h = LedgerHeader::parse(&header_bytes(&[(2, 9, 150, 8)])).unwrap();
        let mut disk = vec![0u8; 700 * 512];
        let mut tags = vec![TAG_NEVER; 600];
        for s in 100..700u64 {
            let tag = (s % 5) as u32; // 0 = never written
            tags[(s - 100) as usize] = tag;
            if tag != 0 {
                let p = sector_pattern(7, s, tag);
                disk[s as usize * 512..(s as usize + 1) * 512].copy_from_slice(&p);
            }
        }
        tags[10] = TAG_UNKNOWN;
        disk[150 * 512] ^= 1; // under the in-flight write: skipped
        disk[400 * 512 + 100] ^= 1; // tag 400 % 5 = 0: never written, skipped
        disk[401 * 512 + 100] ^= 1; // checked: mismatch
        let old = sector_pattern(7, 402, 1);
        disk[402 * 512..403 * 512].copy_from_slice(&old); // stale data: mismatch
        let read = |first: u64, buf: &mut [u8]| -> Result<(), std::io::Error> {
            let start = first as usize * 512;
            buf.copy_from_slice(&disk[start..start + buf.len()]);
            Ok(())
        };
        let r = verify_disk(&h, &tags, read).unwrap().unwrap();
        assert_eq!(r.mismatch_count, 2);
        assert_eq!(
            r.mismatches,
            vec![
                Mismatch {
                    sector: 401,
                    expected_tag: 1,
                    found_sector: 401,
                    found_tag: 1
                },
                Mismatch {
                    sector: 402,
                    expected_tag: 2,
                    found_sector: 402,
                    found_tag: 1
                },
            ]
        );
        let never = tags.iter().filter(|&&t| t == TAG_NEVER).count() as u64;
        // Skipped: never written, one unknown, and the in-flight sectors that had a tag.
        let in_flight_tagged = (150..158u64).filter(|s| s % 5 != 0).count() as u64;
        assert_eq!(r.skipped, never + 1 + in_flight_tagged);
        assert_eq!(r.checked + r.skipped, 600);
        assert!(verify_disk(&h, &tags[..10], read).unwrap().is_err());
    }
}
