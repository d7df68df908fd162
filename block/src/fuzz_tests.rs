//! Randomised hostile drivers: random descriptor tables, heads, headers and lengths must
//! never panic the parser nor crash or hang the device.

use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{MAX_DATA_BYTES, QUEUE_SIZE};
use crate::request::*;
use crate::testutil::*;
use crate::{BackendKind, VirtioDevice};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const TABLE: u64 = 0x30_0000;

fn random_desc(r: &mut Rng) -> virtio_queue::desc::RawDescriptor {
    let addr = match r.below(8) {
        0 | 1 => HDR + 64 * r.below(8),
        2 | 3 => DATA + 512 * r.below(1000),
        4 => STATUS + r.below(16),
        5 => MEM_SIZE - r.below(16),
        6 => u64::MAX - r.below(4096),
        _ => TABLE + 16 * r.below(8),
    };
    let len = r.pick(&[0u32, 1, 15, 16, 17, 512, 4096, 8192, u32::MAX, 200 * 65536]);
    let len = if r.below(8) == 0 {
        r.next() as u32
    } else {
        len
    };
    let mut flags = 0;
    if r.below(3) != 0 {
        flags |= F_NEXT;
    }
    if r.below(2) == 0 {
        flags |= F_WRITE;
    }
    if r.below(16) == 0 {
        flags |= F_INDIRECT;
    }
    let next = if r.below(16) == 0 {
        r.next() as u16
    } else {
        r.below(u64::from(QUEUE_SIZE)) as u16
    };
    raw(addr, len, flags, next)
}

/// A chain that is probably well formed (header, data, status), sometimes with one
/// descriptor replaced by a random one. Returns its head.
fn plausible(r: &mut Rng, table: &mut [(u16, virtio_queue::desc::RawDescriptor)]) -> u16 {
    let base = r.below(u64::from(QUEUE_SIZE) - 3) as u16;
    let data_flags = if r.below(2) == 0 { F_WRITE } else { 0 };
    let mut chain = [
        raw(HDR + 64 * r.below(8), 16, F_NEXT, base + 1),
        raw(
            DATA + 512 * r.below(1000),
            512 * (1 + r.below(16) as u32),
            F_NEXT | data_flags,
            base + 2,
        ),
        raw(STATUS + r.below(16), 1, F_WRITE, 0),
    ];
    if r.below(4) == 0 {
        chain[r.below(3) as usize] = random_desc(r);
    }
    for (i, d) in chain.into_iter().enumerate() {
        table[usize::from(base) + i] = (base + i as u16, d);
    }
    base
}

fn scribble(m: &GuestMemoryMmap, r: &mut Rng) {
    for k in 0..8 {
        let ty = r.pick(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            99,
        ]);
        let sector = if r.below(4) == 0 {
            r.next()
        } else {
            r.below(8192)
        };
        write_header(m, HDR + 64 * k, ty, sector);
        // Half-plausible discard / write-zeroes segments right after some headers.
        write_segments(
            m,
            HDR + 64 * k + 16,
            &[(r.below(8192), r.below(64) as u32, r.below(3) as u32)],
        );
    }
    for i in 0..64 {
        m.write_obj(random_desc(r), GuestAddress(TABLE + 16 * i))
            .expect("table");
    }
}

#[test]
fn the_parser_survives_random_chains() {
    let m = mem();
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let limits = all_limits(4 << 20, false);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..200 {
        scribble(&m, &mut r);
        let mut d = Driver::new(&m);
        let mut table: Vec<_> = (0..QUEUE_SIZE).map(|i| (i, random_desc(&mut r))).collect();
        let mut q: Queue = d.q.create_queue().expect("queue");
        for _ in 0..64 {
            let head = match r.below(32) {
                0 => r.next() as u16,
                1..=15 => plausible(&mut r, &mut table),
                _ => r.below(u64::from(QUEUE_SIZE)) as u16,
            };
            d.add_raw(&table, head);
            let Some(chain) = q.iter(&m).expect("iter").next() else {
                panic!("the chain just made available is missing");
            };
            match parse(chain, &m, &limits) {
                Ok(req) => {
                    ok += 1;
                    assert!(req.buffer_bytes() <= u64::from(MAX_DATA_BYTES));
                    assert!(
                        m.read_obj::<u8>(req.status).is_ok(),
                        "status outside memory"
                    );
                    if let RequestKind::Read { offset, data }
                    | RequestKind::Write { offset, data } = &req.kind
                    {
                        assert!(offset + data.len() <= 4 << 20);
                        assert_eq!(data.len() % 512, 0);
                    }
                }
                Err(_) => refused += 1,
            }
        }
    }
    assert!(
        ok > 500 && refused > 500,
        "the generator is too one-sided: {ok} ok, {refused} refused"
    );
}

fn survive(kind: BackendKind, seed: u64) {
    let disk = test_disk(4 << 20);
    let m = mem();
    let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
    let mut r = Rng(seed);
    let mut expected = 0u16;
    for _ in 0..30 {
        scribble(&m, &mut r);
        let mut table: Vec<_> = (0..QUEUE_SIZE).map(|i| (i, random_desc(&mut r))).collect();
        let heads: Vec<u16> = (0..40)
            .map(|_| match r.below(32) {
                0 => QUEUE_SIZE + r.below(1000) as u16,
                1..=20 => plausible(&mut r, &mut table),
                _ => r.below(u64::from(QUEUE_SIZE)) as u16,
            })
            .collect();
        for &(i, d) in &table {
            h.drv.q.desc_table().store(i, d).expect("store");
        }
        for head in heads {
            h.drv.add_raw(&[], head);
            if head < QUEUE_SIZE {
                // Invalid heads cannot be returned through the used ring.
                expected = expected.wrapping_add(1);
            }
        }
        h.kick();
        h.drv.wait_used(expected);
    }
    // A well-formed request still works afterwards.
    h.drv.added = expected;
    assert_eq!(h.write(0, &pattern(1, 4096)), 0);
    assert_eq!(h.read(0, 4096), (0, pattern(1, 4096)));
    assert!(h.dev.reset());
}

#[test]
fn the_device_survives_random_chains_blocking() {
    survive(BackendKind::Blocking, 1);
}

#[test]
fn the_device_survives_random_chains_uring() {
    survive(BackendKind::Uring, 2);
}
