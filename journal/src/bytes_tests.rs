//! Byte-granular requests: any offset and length inside the disk, through the synchronous
//! API and the io_uring engine, checked against a model; concurrent partial writes to one
//! block never lose each other's bytes.

use std::sync::Arc;

use rand::{Rng, SeedableRng};

use crate::{AlignedBuf, CacheMode, Completion, Disk, IoEngine, OpenOptions, Request};

const SIZE: u64 = (1 << 20) + 512;

fn disk() -> (tempfile::TempDir, Disk) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("disk");
    Disk::create(&d, SIZE, None).unwrap();
    let disk = Disk::open(
        &d,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .unwrap();
    (t, disk)
}

/// A random request range inside the disk, often ending at its last byte.
fn range(rng: &mut rand::rngs::SmallRng) -> (u64, u64) {
    let off = if rng.gen_bool(0.1) {
        SIZE - rng.gen_range(1..=9000)
    } else {
        rng.gen_range(0..SIZE)
    };
    let len = rng.gen_range(0..=(SIZE - off).min(3 * 4096 + 77));
    (off, len)
}

#[test]
fn random_byte_requests_match_a_model_sync() {
    let (_t, disk) = disk();
    let now = disk.now();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(6);
    for i in 0..3000u32 {
        let (off, len) = range(&mut rng);
        let (o, l) = (off as usize, len as usize);
        match rng.gen_range(0..5) {
            0 | 1 => {
                let data: Vec<u8> = (0..l).map(|_| rng.gen()).collect();
                now.write_at(&data, off, rng.gen_bool(0.05)).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            2 => {
                now.write_zeroes(off, len, false).unwrap();
                model[o..o + l].fill(0);
            }
            3 => {
                now.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                let mut b = vec![0xAAu8; l];
                now.read_at(&mut b, off).unwrap();
                assert_eq!(b, model[o..o + l], "request {i}: read {off}+{len}");
            }
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    now.read_at(&mut all, 0).unwrap();
    assert!(all == model, "the whole disk differs from the model");
    // One byte past the end is refused, the last byte is not.
    assert!(now.write_at(&[1], SIZE, false).is_err());
    now.write_at(&[1], SIZE - 1, true).unwrap();
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn random_byte_requests_match_a_model_io_uring() {
    let (_t, disk) = disk();
    let mut eng = IoEngine::new(disk.now(), 64).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut out: Vec<Completion> = Vec::new();
    for round in 0..300u64 {
        // Non-overlapping requests in one batch, so their order does not matter.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut reads = Vec::new();
        for k in 0..8u64 {
            let (off, len) = range(&mut rng);
            if taken.iter().any(|&(a, b)| off < b && a < off + len.max(1)) {
                continue;
            }
            taken.push((off, off + len.max(1)));
            let token = round * 100 + k;
            let (o, l) = (off as usize, len as usize);
            let req = match rng.gen_range(0..4) {
                0 => {
                    let data: Vec<u8> = (0..l).map(|_| rng.gen()).collect();
                    model[o..o + l].copy_from_slice(&data);
                    Request::Write {
                        offset: off,
                        buf: AlignedBuf::from_slice(&data),
                        fua: false,
                    }
                }
                1 => {
                    model[o..o + l].fill(0);
                    Request::WriteZeroes {
                        offset: off,
                        len,
                        fua: false,
                    }
                }
                _ => {
                    reads.push((token, off, len, model[o..o + l].to_vec()));
                    Request::Read { offset: off, len }
                }
            };
            eng.submit(token, req).unwrap();
        }
        let want = taken.len();
        let mut got = 0;
        while got < want {
            out.clear();
            eng.wait(1, &mut out).unwrap();
            for c in out.drain(..) {
                got += 1;
                let r = c
                    .result
                    .unwrap_or_else(|e| panic!("token {}: {e}", c.token));
                if let Some((_, off, len, expect)) = reads.iter().find(|r| r.0 == c.token) {
                    let buf = r.expect("a read returns data");
                    assert_eq!(buf.as_slice(), &expect[..], "read {off}+{len}");
                }
            }
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    disk.now().read_at(&mut all, 0).unwrap();
    assert!(all == model, "the whole disk differs from the model");
}

#[test]
fn concurrent_one_byte_writes_to_one_block_are_all_kept() {
    let (_t, disk) = disk();
    let now = disk.now();
    let threads = 8;
    let per = 512;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let v: Arc<crate::Volume> = now.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    // Thread t owns bytes t, t+8, ... of block 1 (and of the first bytes of
                    // block 2, for writes straddling a block boundary).
                    let off = 4096 + (i * threads + t) as u64;
                    v.write_at(&[(t + 1) as u8], off, false).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut b = vec![0u8; 4096];
    now.read_at(&mut b, 4096).unwrap();
    for (i, &x) in b.iter().enumerate() {
        assert_eq!(
            x as usize,
            i % threads + 1,
            "byte {i} of block 1 lost a write"
        );
    }
}
