//! The `journal-api` target: the journal driven in-process through [`IoEngine`] (io_uring),
//! with the same offsets and queue depths as the fio jobs of the other targets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::{AlignedBuf, Completion, IoEngine, Request, Volume};

use super::pattern::{fill_raw, Permutation};
use super::{fail, Measured, Workload};
use crate::Result;

/// Offsets of a workload over a volume of `size` bytes, fio-style: random ones without
/// repeats (reads start a new pass when one is exhausted, writes stop), sequential from 0.
struct Offsets {
    workload: Workload,
    units: u64,
    seed: u64,
    perm: Permutation,
    next_seq: u64,
}

impl Offsets {
    fn new(workload: Workload, size: u64, seed: u64) -> Offsets {
        let units = size / workload.block_size();
        Offsets {
            workload,
            units,
            seed,
            perm: Permutation::new(units, seed),
            next_seq: 0,
        }
    }
}

impl Iterator for Offsets {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let bs = self.workload.block_size();
        match self.workload {
            Workload::SeqWrite => {
                let u = self.next_seq;
                if u >= self.units {
                    return None;
                }
                self.next_seq += 1;
                Some(u * bs)
            }
            Workload::RandWrite | Workload::RandWriteFlush8 => self.perm.next().map(|u| u * bs),
            Workload::RandRead => match self.perm.next() {
                Some(u) => Some(u * bs),
                None if self.units > 0 => {
                    self.seed = self.seed.wrapping_add(1);
                    self.perm = Permutation::new(self.units, self.seed);
                    self.perm.next().map(|u| u * bs)
                }
                None => None,
            },
        }
    }
}

/// Tokens of FLUSH requests have this bit set.
const FLUSH_TOKEN: u64 = 1 << 63;

/// Runs `workload` at queue depth `qd` on `volume` for at most `runtime` (writes also stop
/// once every unit of the volume was written once). Any failed request fails the run. With
/// a FLUSH every N writes, the flushes count toward the queue depth and not as operations.
pub fn run(
    volume: Arc<Volume>,
    workload: Workload,
    qd: u32,
    runtime: Duration,
    seed: u64,
) -> Result<Measured> {
    let offsets = Offsets::new(workload, volume.size(), seed);
    run_offsets(
        volume,
        workload.name(),
        workload.block_size(),
        workload.is_write(),
        u64::from(workload.flush_every()),
        qd,
        runtime,
        seed,
        offsets,
    )
}

/// 64 KiB sequential reads of `range` of `volume` (one pass, or until `runtime`), `qd` in
/// flight: how well a volume's data is laid out for streaming.
pub fn seq_read(
    volume: Arc<Volume>,
    range: std::ops::Range<u64>,
    qd: u32,
    runtime: Duration,
) -> Result<Measured> {
    const BS: u64 = 65536;
    let end = range.end.min(volume.size());
    let start = range.start - range.start % BS;
    let offsets = (start..end.saturating_sub(BS - 1)).step_by(BS as usize);
    run_offsets(volume, "seqread", BS, false, 0, qd, runtime, 0, offsets)
}

/// Requests of `bs` bytes at `offsets` (writes of a fixed pattern, with a FLUSH every
/// `flush_every` writes if not 0, or reads), `qd` in flight,
/// until the offsets run out or `runtime` passed.
#[allow(clippy::too_many_arguments)]
fn run_offsets(
    volume: Arc<Volume>,
    name: &str,
    bs: u64,
    write: bool,
    flush_every: u64,
    qd: u32,
    runtime: Duration,
    seed: u64,
    mut offsets: impl Iterator<Item = u64>,
) -> Result<Measured> {
    if write && volume.read_only() {
        return Err(fail("journal-api", "write workload on a read-only volume"));
    }
    let mut template = AlignedBuf::new(bs as usize);
    fill_raw(template.as_mut_slice(), 0, seed ^ 0xda7a);
    let mut engine = IoEngine::new(volume, qd)?;
    let mut out: Vec<Completion> = Vec::with_capacity(qd as usize);
    let qd = qd.max(1) as usize;
    let start = Instant::now();
    let deadline = start + runtime;
    let mut token = 0u64;
    let mut ops = 0u64;
    let mut stop = false;
    loop {
        // One io_uring_enter per batch; writes landing back to back merge into one writev.
        engine.plug();
        while !stop && engine.in_flight() < qd {
            let Some(offset) = offsets.next() else {
                stop = true;
                break;
            };
            let req = if write {
                Request::Write {
                    offset,
                    buf: AlignedBuf::from_slice(template.as_slice()),
                    fua: false,
                }
            } else {
                Request::Read { offset, len: bs }
            };
            engine.submit(token, req).map_err(journal::Error::from)?;
            token += 1;
            if flush_every > 0 && token.is_multiple_of(flush_every) {
                engine
                    .submit(FLUSH_TOKEN | token, Request::Flush)
                    .map_err(journal::Error::from)?;
            }
        }
        engine.unplug()?;
        if engine.in_flight() == 0 {
            break;
        }
        engine.wait(1, &mut out)?;
        for c in out.drain(..) {
            if let Err(e) = c.result {
                return Err(fail(
                    format!("journal-api {name} request {}", c.token),
                    crate::cli::error_chain(&e),
                ));
            }
            if c.token & FLUSH_TOKEN == 0 {
                ops += 1;
            }
        }
        if !stop && Instant::now() >= deadline {
            stop = true;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Measured {
        ops,
        bytes: ops * bs,
        secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::{CacheMode, Disk, OpenOptions};
    use std::collections::HashSet;

    #[test]
    fn offsets_follow_fio_semantics() {
        let w: Vec<u64> = Offsets::new(Workload::RandWrite, 64 * 4096, 3).collect();
        assert_eq!(w.len(), 64);
        assert_eq!(w.iter().copied().collect::<HashSet<_>>().len(), 64);
        let r: Vec<u64> = Offsets::new(Workload::RandRead, 16 * 4096, 3)
            .take(40)
            .collect();
        assert_eq!(r.len(), 40, "reads wrap around to a new pass");
        assert_eq!(r[..16].iter().copied().collect::<HashSet<_>>().len(), 16);
        let s: Vec<u64> = Offsets::new(Workload::SeqWrite, 4 * 65536 + 100, 3).collect();
        assert_eq!(s, vec![0, 65536, 131072, 196608]);
    }

    #[test]
    fn runs_write_then_read_on_a_real_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        Disk::create(&dir, 4 << 20, None).unwrap();
        let disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        )
        .unwrap();
        let m = run(
            disk.now(),
            Workload::RandWrite,
            8,
            Duration::from_secs(30),
            1,
        )
        .unwrap();
        assert_eq!(m.ops, 1024, "every block written once, then the run stops");
        assert_eq!(m.bytes, 1024 * 4096);
        let m = run(
            disk.now(),
            Workload::SeqWrite,
            4,
            Duration::from_secs(30),
            1,
        )
        .unwrap();
        assert_eq!(m.ops, 64);
        let m = run(
            disk.now(),
            Workload::RandRead,
            32,
            Duration::from_millis(50),
            1,
        )
        .unwrap();
        assert!(m.ops > 0 && m.secs > 0.0);
        // Sequential 64 KiB reads of a range: one pass, aligned down, nothing past the end.
        let m = seq_read(disk.now(), 100_000..(1 << 20), 4, Duration::from_secs(30)).unwrap();
        assert_eq!(m.ops, 15, "65536..1048576 in 64 KiB reads");
        assert_eq!(m.bytes, 15 * 65536);
        let m = seq_read(disk.now(), 0..(64 << 20), 4, Duration::from_secs(30)).unwrap();
        assert_eq!(m.ops, 64, "capped at the volume's 4 MiB");
        // The written blocks hold the template.
        let mut expect = vec![0u8; 65536];
        fill_raw(&mut expect, 0, 1 ^ 0xda7a);
        let mut got = vec![0u8; 65536];
        disk.now().read_at(&mut got, 65536 * 3).unwrap();
        assert_eq!(got, expect);
    }

    #[test]
    fn write_on_read_only_volume_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        Disk::create(&dir, 1 << 20, None).unwrap();
        let disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: true,
            },
        )
        .unwrap();
        assert!(run(
            disk.now(),
            Workload::RandWrite,
            1,
            Duration::from_secs(1),
            1
        )
        .is_err());
    }
}
