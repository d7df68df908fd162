//! The `--workload` grammar, parsed on the host exactly as the guest parses it
//! (`vmm/guest/logic.c`), so `strata run` refuses a bad spec before booting.
//!
//! `key=value` items separated by `,` (surrounding blanks of the whole text are ignored):
//! `seed` (u64), `ops` (0..=2e9), `read` (percent 0..=100), `bs` (a size or a range `MIN-MAX`,
//! multiples of 512, 512..=256k), `region` (`OFFSET:LEN` in bytes, multiples of 512), `qd`
//! (1..=128), `flush` (a FLUSH after every N writes, 0 = never), `verify` (0/1), `dirty` (bytes
//! of guest RAM the guest also rewrites round-robin, a multiple of 4k, at most 3g, 0 = off),
//! `dirty_rate` (pages of that region rewritten per completed request, 1..=4096), `irq` (0/1:
//! with 1 the guest, once nothing has completed for `poll` microseconds, sleeps on the device
//! interrupt through the wait port instead of spinning; 0 = spin), `poll` (microseconds,
//! 0..=1000000). Sizes take a `k`/`m`/`g` suffix (powers of 1024). Defaults: `seed=1,ops=10000,
//! read=50,bs=4k,qd=32,flush=0,verify=1,dirty=0,dirty_rate=1,irq=1,poll=DEFAULT_POLL_US`, region =
//! whole disk capped by the ledger's room in guest RAM. The normalised form leaves `dirty`,
//! `dirty_rate`, `irq` and `poll` out when they have their defaults.
//!
//! With `dirty=SIZE` the region is the last SIZE bytes of RAM below 3 GiB (see
//! [`MemoryPlan`]); the ledger tags get the RAM between `LEDGER_TAGS_ADDR` and it. The guest
//! fills every page with generation 0 at set-up, then after each completed request rewrites the
//! next `dirty_rate` pages (page `c % pages` with generation `c / pages + 1` for rewrite `c`),
//! each after checking that it still holds what it last wrote, and checks the whole region again
//! at the end; a mismatch counts in `errors=`. Rewrites follow completions, not time, so the
//! region's final contents (the `mem=` digest of the `done` line) depend only on the workload.

use std::fmt;
use std::str::FromStr;

use super::{Error, GUEST_QUEUE_MAX, LEDGER_TAGS_ADDR, MAX_MEM_SIZE};

/// Sector size of the workload's addressing.
pub const SECTOR_SIZE: u64 = 512;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024;
/// Most requests in flight.
pub const MAX_QUEUE_DEPTH: u8 = 128;
/// Most operations (write tags are u32).
pub const MAX_OPS: u64 = 2_000_000_000;

/// Size of the pages of the dirty region.
pub const PAGE_SIZE: u64 = 4096;
/// Largest `dirty=` (the guest's RAM below the MMIO hole).
pub const MAX_DIRTY: u64 = MAX_MEM_SIZE;
/// Largest `dirty_rate=` (pages per completed request).
pub const MAX_DIRTY_RATE: u32 = 4096;

/// Longest `poll=` (microseconds).
pub const MAX_POLL_US: u32 = 1_000_000;
/// Default `poll=`: how long the guest spins on its used ring before it sleeps.
pub const DEFAULT_POLL_US: u32 = 0;

const KEYS: &str = "seed, ops, read, bs, region, qd, flush, verify, dirty, dirty_rate, irq, poll";

/// Request sizes: each request is `min..=max` bytes (a multiple of 512, uniformly chosen) at an
/// offset aligned to `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub max: u32,
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// A parsed, validated workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub seed: u64,
    /// Reads plus writes (flushes are extra).
    pub ops: u64,
    pub read_percent: u8,
    pub block_size: BlockSize,
    /// `None`: the whole disk, capped by what the ledger can hold.
    pub region: Option<Region>,
    pub queue_depth: u8,
    /// A FLUSH after every this many writes; 0 = never.
    pub flush_every: u32,
    pub verify: bool,
    /// Bytes of RAM rewritten round-robin between I/Os (a multiple of 4096); 0 = off.
    pub dirty: u64,
    /// Pages of the dirty region rewritten per completed request.
    pub dirty_rate: u32,
    /// Sleep on the device interrupt (the wait port) when idle, instead of spinning.
    pub irq: bool,
    /// Microseconds without a completion before the guest sleeps (with `irq`).
    pub poll_us: u32,
}

/// Where the guest puts its ledger tags and dirty region in its RAM, by the guest's rules
/// (`memory_plan` in `vmm/guest/logic.c`): `top` = RAM below 3 GiB rounded down to 4 KiB, the
/// dirty region is `[top - dirty, top)`, the tags run from `LEDGER_TAGS_ADDR` up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Guest-physical address of the dirty region (`top` when `dirty=0`).
    pub dirty_base: u64,
    /// Pages of the dirty region.
    pub dirty_pages: u64,
    /// Sectors the ledger can track.
    pub ledger_sectors: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            ops: 10_000,
            read_percent: 50,
            block_size: BlockSize {
                min: 4096,
                max: 4096,
            },
            region: None,
            queue_depth: 32,
            flush_every: 0,
            verify: true,
            dirty: 0,
            dirty_rate: 1,
            irq: true,
            poll_us: DEFAULT_POLL_US,
        }
    }
}

fn bad(msg: String) -> Error {
    Error::Workload(msg)
}

/// Decimal digits with an optional k/m/g suffix when `sized`; `None` on anything else or
/// overflow.
fn parse_num(s: &str, sized: bool) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') if sized => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') if sized => (&s[..s.len() - 1], 1 << 20),
        Some(b'g' | b'G') if sized => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

fn help(key: &str) -> &'static str {
    match key {
        "seed" => "a decimal u64",
        "ops" => "a decimal number 0..=2000000000",
        "read" => "a percentage 0..=100",
        "bs" => "a size (512, 4k, 64k) or range 512-64k, multiples of 512, at most 256k",
        "region" => "OFFSET:LEN, sizes in bytes (k/m/g suffixes), multiples of 512, LEN > 0",
        "qd" => "a number 1..=128",
        "flush" => "a decimal number 0..=4294967295",
        "dirty" => "a size (0 = off, 64m), a multiple of 4k, at most 3g",
        "dirty_rate" => "a number of pages 1..=4096",
        "poll" => "microseconds 0..=1000000",
        _ => "0 or 1",
    }
}

/// The first 32 bytes of `s`, as the guest truncates names in messages.
fn trunc(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl WorkloadSpec {
    /// Parses a spec; the message of a refusal is the one the guest would print.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if !text.is_ascii() {
            return Err(Error::WorkloadNotAscii);
        }
        if text.len() > super::WORKLOAD_MAX {
            return Err(Error::WorkloadTooLong { len: text.len() });
        }
        let mut w = Self::default();
        let text = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
        if text.is_empty() {
            return Ok(w);
        }
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(',') {
            let Some((key, value)) = item.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                let shown = trunc(item.split_once('=').map_or(item, |(k, _)| k));
                return Err(bad(format!("expected key=value, got '{shown}'")));
            };
            if !KEYS.split(", ").any(|k| k == key) {
                return Err(bad(format!("unknown key '{}' (known: {KEYS})", trunc(key))));
            }
            if seen.contains(&key) {
                return Err(bad(format!("duplicate key {key}")));
            }
            seen.push(key);
            if w.set(key, value).is_none() {
                return Err(bad(format!("{key}: bad value, expected {}", help(key))));
            }
        }
        if let Some(r) = w.region {
            if r.len < u64::from(w.block_size.max) {
                return Err(bad(
                    "region: LEN is smaller than the largest block size".to_string()
                ));
            }
        }
        Ok(w)
    }

    fn set(&mut self, key: &str, v: &str) -> Option<()> {
        match key {
            "seed" => self.seed = parse_num(v, false)?,
            "ops" => self.ops = parse_num(v, false).filter(|&n| n <= MAX_OPS)?,
            "read" => self.read_percent = parse_num(v, false).filter(|&n| n <= 100)? as u8,
            "bs" => {
                let (a, b) = match v.split_once('-') {
                    Some((a, b)) => (parse_num(a, true)?, parse_num(b, true)?),
                    None => {
                        let a = parse_num(v, true)?;
                        (a, a)
                    }
                };
                let ok = a >= SECTOR_SIZE
                    && a.is_multiple_of(SECTOR_SIZE)
                    && b.is_multiple_of(SECTOR_SIZE)
                    && b <= u64::from(MAX_BLOCK_SIZE)
                    && a <= b;
                if !ok {
                    return None;
                }
                self.block_size = BlockSize {
                    min: u32::try_from(a).ok()?,
                    max: u32::try_from(b).ok()?,
                };
            }
            "region" => {
                let (a, b) = v.split_once(':')?;
                let (offset, len) = (parse_num(a, true)?, parse_num(b, true)?);
                if !offset.is_multiple_of(SECTOR_SIZE)
                    || !len.is_multiple_of(SECTOR_SIZE)
                    || len == 0
                {
                    return None;
                }
                offset.checked_add(len)?;
                self.region = Some(Region { offset, len });
            }
            "qd" => {
                self.queue_depth = parse_num(v, false)
                    .filter(|&n| (1..=u64::from(MAX_QUEUE_DEPTH)).contains(&n))?
                    as u8
            }
            "flush" => self.flush_every = u32::try_from(parse_num(v, false)?).ok()?,
            "dirty" => {
                self.dirty =
                    parse_num(v, true).filter(|&n| n.is_multiple_of(PAGE_SIZE) && n <= MAX_DIRTY)?
            }
            "dirty_rate" => {
                self.dirty_rate = parse_num(v, false)
                    .filter(|&n| (1..=u64::from(MAX_DIRTY_RATE)).contains(&n))?
                    as u32
            }
            "irq" => self.irq = parse_num(v, false).filter(|&n| n <= 1)? == 1,
            "poll" => {
                self.poll_us = parse_num(v, false).filter(|&n| n <= u64::from(MAX_POLL_US))? as u32
            }
            _ => self.verify = parse_num(v, false).filter(|&n| n <= 1)? == 1,
        }
        Some(())
    }

    /// The guest's placement of its dirty region and ledger tags in `mem_size` bytes of RAM;
    /// an error here is the one that makes the guest exit with status 2 (the dirty region does
    /// not fit) or 3 (too little RAM for the ledger of one largest block).
    pub fn memory_plan(&self, mem_size: u64) -> Result<MemoryPlan, Error> {
        let top = mem_size.min(MAX_MEM_SIZE) & !(PAGE_SIZE - 1);
        let need = LEDGER_TAGS_ADDR + 4 * (u64::from(self.block_size.max) / SECTOR_SIZE);
        let Some(room) = top.checked_sub(need) else {
            return Err(Error::MemorySize {
                size: mem_size,
                why: "too small for the buffers and the ledger of one largest block",
            });
        };
        let max = room & !(PAGE_SIZE - 1);
        if self.dirty > max {
            return Err(Error::Dirty {
                dirty: self.dirty,
                mem_size,
                max,
            });
        }
        let dirty_base = top - self.dirty;
        Ok(MemoryPlan {
            dirty_base,
            dirty_pages: self.dirty / PAGE_SIZE,
            ledger_sectors: (dirty_base - LEDGER_TAGS_ADDR) / 4,
        })
    }

    /// The region the guest will use on a disk of `disk_bytes` with `mem_size` bytes of RAM,
    /// by the guest's rules; an error here is the one that would make the guest exit with
    /// status 2 (or 3 for too little RAM).
    pub fn effective_region(&self, disk_bytes: u64, mem_size: u64) -> Result<Region, Error> {
        super::check_mem_size(mem_size)?;
        let cap = disk_bytes / SECTOR_SIZE * SECTOR_SIZE;
        let max_sectors = self.memory_plan(mem_size)?.ledger_sectors;
        let region = match self.region {
            Some(r) => r,
            None => Region {
                offset: 0,
                len: cap.min(max_sectors * SECTOR_SIZE),
            },
        };
        let fail = |why| Error::Region {
            offset: region.offset,
            len: region.len,
            why,
        };
        if region.offset > cap || region.len > cap - region.offset {
            return Err(fail("beyond the end of the disk"));
        }
        if region.len / SECTOR_SIZE > max_sectors {
            return Err(fail("more sectors than the ledger can hold in guest RAM"));
        }
        if region.len < u64::from(self.block_size.max) {
            return Err(fail("smaller than the largest block size"));
        }
        Ok(region)
    }

    /// Checks `qd` against a device's `QueueNumMax`: the guest uses the largest power of two
    /// <= min(QueueNumMax, 512), and 1 descriptor per request if the device offers
    /// VIRTIO_RING_F_INDIRECT_DESC, else 3.
    pub fn check_queue(&self, queue_num_max: u16, indirect: bool) -> Result<(), Error> {
        let mut q = GUEST_QUEUE_MAX;
        while q > queue_num_max && q > 0 {
            q >>= 1;
        }
        let per = if indirect { 1 } else { 3 };
        let need = per * u32::from(self.queue_depth);
        if need > u32::from(q) {
            return Err(bad(format!(
                "qd={} needs {need} descriptors but the device queue holds {q}",
                self.queue_depth
            )));
        }
        Ok(())
    }
}

/// Sectors the ledger can track with `mem_size` bytes of RAM and no dirty region (a u32 tag
/// per sector from `LEDGER_TAGS_ADDR` to the end of RAM).
pub fn ledger_capacity_sectors(mem_size: u64) -> u64 {
    mem_size.saturating_sub(LEDGER_TAGS_ADDR) / 4
}

impl FromStr for WorkloadSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// Formats a size as the guest does: `4k`, `1m`, `2g`, or plain bytes.
fn size(v: u64) -> String {
    let (mut v, mut unit) = (v, 0);
    while unit < 3 && v != 0 && v.is_multiple_of(1024) {
        v /= 1024;
        unit += 1;
    }
    match unit {
        0 => v.to_string(),
        1 => format!("{v}k"),
        2 => format!("{v}m"),
        _ => format!("{v}g"),
    }
}

/// The normalised form, identical to the guest's `start` line; it parses back to `self`.
impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={},ops={},read={},bs={}",
            self.seed,
            self.ops,
            self.read_percent,
            size(self.block_size.min.into())
        )?;
        if self.block_size.max != self.block_size.min {
            write!(f, "-{}", size(self.block_size.max.into()))?;
        }
        if let Some(r) = self.region {
            write!(f, ",region={}:{}", size(r.offset), size(r.len))?;
        }
        write!(
            f,
            ",qd={},flush={},verify={}",
            self.queue_depth,
            self.flush_every,
            u8::from(self.verify)
        )?;
        if self.dirty != 0 {
            write!(f, ",dirty={}", size(self.dirty))?;
        }
        if self.dirty_rate != 1 {
            write!(f, ",dirty_rate={}", self.dirty_rate)?;
        }
        if !self.irq {
            write!(f, ",irq=0")?;
        }
        if self.poll_us != DEFAULT_POLL_US {
            write!(f, ",poll={}", self.poll_us)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match WorkloadSpec::parse(text) {
            Err(Error::Workload(m)) => m,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn parses_every_key() {
        let w: WorkloadSpec = " seed=18446744073709551615,ops=20000,read=30,bs=512-64K,\
                               region=1m:1G,qd=128,flush=64,verify=0\n"
            .parse()
            .unwrap();
        assert_eq!(w.seed, u64::MAX);
        assert_eq!(w.ops, 20_000);
        assert_eq!(w.read_percent, 30);
        assert_eq!(
            w.block_size,
            BlockSize {
                min: 512,
                max: 65536
            }
        );
        assert_eq!(
            w.region,
            Some(Region {
                offset: 1 << 20,
                len: 1 << 30
            })
        );
        assert_eq!((w.queue_depth, w.flush_every, w.verify), (128, 64, false));
        assert_eq!(
            w.to_string(),
            "seed=18446744073709551615,ops=20000,read=30,bs=512-64k,region=1m:1g,qd=128,\
             flush=64,verify=0"
        );
    }

    #[test]
    fn defaults_and_round_trip() {
        let d = WorkloadSpec::parse("").unwrap();
        assert_eq!(d, WorkloadSpec::default());
        assert_eq!(
            d.to_string(),
            "seed=1,ops=10000,read=50,bs=4k,qd=32,flush=0,verify=1"
        );
        for text in [
            "bs=1536,region=0:3584",
            "bs=8k-256k,region=4g:2048m",
            "ops=0,read=100",
            "dirty=64m",
            "dirty=4k,dirty_rate=4096",
            "dirty_rate=3",
            "irq=0",
            "irq=0,poll=1000000",
            "poll=7",
        ] {
            let w = WorkloadSpec::parse(text).unwrap();
            assert_eq!(WorkloadSpec::parse(&w.to_string()).unwrap(), w, "{text}");
        }
        assert_eq!(
            WorkloadSpec::parse("bs=1536,region=0:3584")
                .unwrap()
                .to_string(),
            "seed=1,ops=10000,read=50,bs=1536,region=0:3584,qd=32,flush=0,verify=1"
        );
    }

    #[test]
    fn refuses_bad_specs_with_the_guest_messages() {
        assert_eq!(
            err("seed=1,colour=red"),
            "unknown key 'colour' (known: seed, ops, read, bs, region, qd, flush, verify, dirty, \
             dirty_rate, irq, poll)"
        );
        assert_eq!(err("seed=1,"), "expected key=value, got ''");
        assert_eq!(err("verify"), "expected key=value, got 'verify'");
        assert_eq!(err("=3"), "expected key=value, got ''");
        assert_eq!(err("qd=1,qd=2"), "duplicate key qd");
        assert_eq!(err("qd=0"), "qd: bad value, expected a number 1..=128");
        assert_eq!(err("qd=129"), "qd: bad value, expected a number 1..=128");
        assert_eq!(
            err("read=101"),
            "read: bad value, expected a percentage 0..=100"
        );
        assert!(err("seed=18446744073709551616").starts_with("seed: bad value"));
        assert!(err("seed=-1").starts_with("seed: bad value"));
        assert!(err("seed=1k").starts_with("seed: bad value"));
        assert!(err("ops=2000000001").starts_with("ops: bad value"));
        for bs in [
            "bs=1000",
            "bs=0",
            "bs=256",
            "bs=512k",
            "bs=64k-4k",
            "bs=4k-",
            "bs=k",
            "bs=4x",
        ] {
            assert!(err(bs).starts_with("bs: bad value"), "{bs}");
        }
        for region in [
            "region=1:4k",
            "region=0:0",
            "region=4k",
            "region=0:100",
            "region=:4k",
        ] {
            assert!(err(region).starts_with("region: bad value"), "{region}");
        }
        assert!(err("region=18446744073709551104:1024").starts_with("region: bad value"));
        assert_eq!(
            err("bs=8k,region=0:4k"),
            "region: LEN is smaller than the largest block size"
        );
        assert!(err("verify=2").starts_with("verify: bad value"));
        assert!(err("flush=4294967296").starts_with("flush: bad value"));
        for dirty in ["dirty=6k", "dirty=100", "dirty=4g", "dirty=", "dirty=-4k"] {
            assert_eq!(
                err(dirty),
                "dirty: bad value, expected a size (0 = off, 64m), a multiple of 4k, at most 3g",
                "{dirty}"
            );
        }
        assert!(err("dirty_rate=0").starts_with("dirty_rate: bad value"));
        assert_eq!(err("irq=2"), "irq: bad value, expected 0 or 1");
        assert_eq!(
            err("poll=1000001"),
            "poll: bad value, expected microseconds 0..=1000000"
        );
        assert!(err("poll=1k").starts_with("poll: bad value"));
        assert!(err("dirty_rate=4097").starts_with("dirty_rate: bad value"));
        assert_eq!(
            WorkloadSpec::parse("seed=\u{e9}"),
            Err(Error::WorkloadNotAscii)
        );
        let long = format!("seed=1{}", ",".repeat(4000));
        assert_eq!(
            WorkloadSpec::parse(&long),
            Err(Error::WorkloadTooLong { len: 4006 })
        );
    }

    #[test]
    fn effective_region_follows_the_guest_rules() {
        let mem = 256u64 << 20;
        let cap = ledger_capacity_sectors(mem);
        assert_eq!(cap, ((256u64 << 20) - LEDGER_TAGS_ADDR) / 4);
        let w = WorkloadSpec::default();
        assert_eq!(
            w.effective_region(1 << 30, mem).unwrap(),
            Region {
                offset: 0,
                len: 1 << 30
            }
        );
        // Whole disk larger than the ledger: capped.
        assert_eq!(
            w.effective_region(1 << 40, mem).unwrap(),
            Region {
                offset: 0,
                len: cap * 512
            }
        );
        // A disk size that is not a multiple of 512 is rounded down.
        assert_eq!(w.effective_region(5000, mem).unwrap().len, 4608);
        let r = WorkloadSpec::parse("region=1g:1m").unwrap();
        assert!(matches!(
            r.effective_region(1 << 30, mem),
            Err(Error::Region { .. })
        ));
        assert!(r.effective_region((1 << 30) + (1 << 20), mem).is_ok());
        let big = WorkloadSpec::parse("region=0:1t").err();
        assert!(big.is_some(), "no t suffix");
        let big = WorkloadSpec::parse("region=0:1024g").unwrap();
        assert!(matches!(
            big.effective_region(1 << 41, mem),
            Err(Error::Region { .. })
        ));
        assert!(matches!(
            w.effective_region(2048, mem),
            Err(Error::Region { .. })
        ));
        assert!(matches!(
            w.effective_region(1 << 30, 1 << 20),
            Err(Error::MemorySize { .. })
        ));
    }

    #[test]
    fn a_dirty_region_takes_its_room_from_the_ledger() {
        let mem = 256u64 << 20;
        let w = WorkloadSpec::parse("dirty=188m").unwrap();
        let plan = w.memory_plan(mem).unwrap();
        assert_eq!(plan.dirty_base, mem - (188 << 20));
        assert_eq!(plan.dirty_pages, 188 << 8);
        let sectors = (mem - (188 << 20) - LEDGER_TAGS_ADDR) / 4;
        assert_eq!(plan.ledger_sectors, sectors);
        // The default region shrinks to what the ledger can still track...
        assert_eq!(
            w.effective_region(1 << 30, mem).unwrap(),
            Region {
                offset: 0,
                len: sectors * 512
            }
        );
        // ... and an explicit region that fits without the dirty region may no longer fit.
        let r = WorkloadSpec::parse("region=0:512m,dirty=188m").unwrap();
        assert!(matches!(
            r.effective_region(1 << 30, mem),
            Err(Error::Region { .. })
        ));
        let r = WorkloadSpec::parse("region=0:512m").unwrap();
        assert!(r.effective_region(1 << 30, mem).is_ok());
        // Without dirty= the plan is the old one: tags up to the end of RAM.
        let d = WorkloadSpec::default().memory_plan(mem).unwrap();
        assert_eq!(
            (d.dirty_base, d.dirty_pages, d.ledger_sectors),
            (mem, 0, ledger_capacity_sectors(mem))
        );
        // Above 3 GiB only the RAM below the hole counts.
        let big = WorkloadSpec::parse("dirty=1g").unwrap();
        assert_eq!(
            big.memory_plan(4 << 30).unwrap().dirty_base,
            (3u64 << 30) - (1 << 30)
        );
        assert!(matches!(
            WorkloadSpec::parse("dirty=2g")
                .unwrap()
                .effective_region(1 << 30, 1 << 30),
            Err(Error::Dirty { .. })
        ));
    }

    #[test]
    fn queue_depth_against_queue_size() {
        let w = WorkloadSpec::parse("qd=128").unwrap();
        assert!(w.check_queue(256, true).is_ok());
        assert!(w.check_queue(128, true).is_ok());
        assert!(w.check_queue(127, true).is_err()); // 64 after rounding down
        assert!(w.check_queue(1024, false).is_ok());
        assert!(w.check_queue(512, false).is_ok());
        assert!(w.check_queue(511, false).is_err());
        assert!(w.check_queue(256, false).is_err());
        let w = WorkloadSpec::parse("qd=85").unwrap();
        assert!(w.check_queue(256, false).is_ok());
        assert!(w.check_queue(0, true).is_err());
    }
}
