//! Parser tests: every request type's happy path and every malformed chain.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::config::{MAX_DATA_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::status::{for_request_error, Status};
use crate::testutil::*;

const CAP: u64 = 1 << 20;

fn run(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> Result<Request, Rejected> {
    let q = MockSplitQueue::new(mem, config_queue_size());
    let chain = q.build_desc_chain(descs).expect("chain");
    parse(chain, mem, limits)
}

fn config_queue_size() -> u16 {
    crate::config::QUEUE_SIZE
}

fn run_raw(
    mem: &GuestMemoryMmap,
    table: &[(u16, RawDescriptor)],
    head: u16,
) -> Result<Request, Rejected> {
    let mut d = Driver::new(mem);
    d.add_raw(table, head);
    let mut queue: Queue = d.q.create_queue().expect("queue");
    let chain = queue.iter(mem).expect("iter").next().expect("one chain");
    parse(chain, mem, &all_limits(CAP, false))
}

fn rejected(r: Result<Request, Rejected>) -> Rejected {
    match r {
        Ok(req) => panic!("expected a rejection, got {req:?}"),
        Err(rej) => rej,
    }
}

fn seglist(parts: &[(u64, u32)]) -> SegList {
    let mut l = SegList::new();
    for &(addr, len) in parts {
        l.push(Segment {
            addr: GuestAddress(addr),
            len,
        });
    }
    l
}

#[test]
fn read_request() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_IN, 8);
    let req = run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 4096, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
        &all_limits(CAP, false),
    )
    .expect("valid read");
    assert_eq!(
        req.kind,
        RequestKind::Read {
            offset: 4096,
            data: seglist(&[(DATA, 4096)])
        }
    );
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(req.buffer_bytes(), 4096);
}

#[test]
fn write_request_with_any_layout() {
    let m = mem();
    // Header and data in one readable descriptor, the status in the last byte of a writable one.
    write_header(&m, HDR, VIRTIO_BLK_T_OUT, 2);
    let req = run(
        &m,
        &[desc(HDR, 16 + 1024, 0), desc(STATUS, 1, F_WRITE)],
        &all_limits(CAP, false),
    )
    .expect("valid write");
    assert_eq!(
        req.kind,
        RequestKind::Write {
            offset: 1024,
            data: seglist(&[(HDR + 16, 1024)])
        }
    );
    assert_eq!(req.status, GuestAddress(STATUS));
    // Extra writable bytes before the status byte would be data a write does not take.
    let rej = rejected(run(
        &m,
        &[desc(HDR, 16 + 1024, 0), desc(STATUS, 4, F_WRITE)],
        &all_limits(CAP, false),
    ));
    assert_eq!(
        (rej.error, rej.status),
        (
            RequestError::UnexpectedWritableData { len: 3 },
            Some(GuestAddress(STATUS + 3))
        )
    );
}

#[test]
fn status_shares_the_data_descriptor() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let req = run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(DATA + 8192, 513, F_WRITE),
        ],
        &all_limits(CAP, false),
    )
    .expect("valid read");
    assert_eq!(
        req.kind,
        RequestKind::Read {
            offset: 0,
            data: seglist(&[(DATA, 512), (DATA + 8192, 512)])
        }
    );
    assert_eq!(req.status, GuestAddress(DATA + 8192 + 512));
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let req = run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(0xdead_beef_0000, 0, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
        &all_limits(CAP, false),
    )
    .expect("valid read");
    assert_eq!(req.buffer_bytes(), 512);
}

#[test]
fn flush_and_get_id() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = run(
        &m,
        &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)],
        &all_limits(CAP, false),
    )
    .expect("flush");
    assert_eq!(req.kind, RequestKind::Flush);

    let mut no_flush = all_limits(CAP, false);
    no_flush.flush = false;
    let rej = rejected(run(
        &m,
        &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)],
        &no_flush,
    ));
    assert_eq!(
        rej.error,
        RequestError::FeatureNotNegotiated("VIRTIO_BLK_F_FLUSH")
    );
    assert_eq!(for_request_error(&rej.error), Status::Unsupp);

    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let req = run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 20, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
        &all_limits(CAP, false),
    )
    .expect("get id");
    assert_eq!(
        req.kind,
        RequestKind::GetId {
            data: seglist(&[(DATA, 20)])
        }
    );
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let n = write_segments(&m, DATA, &[(8, 8, 0), (100, 16, 0)]);
    let req = run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, n, 0), desc(STATUS, 1, F_WRITE)],
        &all_limits(CAP, false),
    )
    .expect("discard");
    assert_eq!(
        req.kind,
        RequestKind::Discard {
            ranges: vec![
                Range {
                    offset: 4096,
                    len: 4096
                },
                Range {
                    offset: 51200,
                    len: 8192
                }
            ]
        }
    );

    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let n = write_segments(&m, DATA, &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    let req = run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, n, 0), desc(STATUS, 1, F_WRITE)],
        &all_limits(CAP, false),
    )
    .expect("write zeroes");
    assert_eq!(
        req.kind,
        RequestKind::WriteZeroes {
            ranges: vec![Range {
                offset: 0,
                len: 512
            }]
        }
    );
}

fn dwz_error(ty: u32, segs: &[(u64, u32, u32)], extra_len: u32, limits: &Limits) -> RequestError {
    let m = mem();
    write_header(&m, HDR, ty, 0);
    let n = write_segments(&m, DATA, segs) + extra_len;
    rejected(run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, n, 0), desc(STATUS, 1, F_WRITE)],
        limits,
    ))
    .error
}

#[test]
fn bad_discard_and_write_zeroes_requests() {
    let l = all_limits(CAP, false);
    assert_eq!(
        dwz_error(
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
            0,
            &l
        ),
        RequestError::UnsupportedFlags { flags: 1 }
    );
    assert_eq!(
        dwz_error(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 6)], 0, &l),
        RequestError::UnsupportedFlags { flags: 6 }
    );
    assert_eq!(
        for_request_error(&RequestError::UnsupportedFlags { flags: 6 }),
        Status::Unsupp
    );
    assert_eq!(
        dwz_error(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)], 1, &l),
        RequestError::BadSegmentList(17)
    );
    assert_eq!(
        dwz_error(VIRTIO_BLK_T_DISCARD, &[], 0, &l),
        RequestError::BadSegmentList(0)
    );
    let many: Vec<(u64, u32, u32)> = (0..=u64::from(MAX_DISCARD_SEG))
        .map(|i| (i, 1, 0))
        .collect();
    assert_eq!(
        dwz_error(VIRTIO_BLK_T_DISCARD, &many, 0, &l),
        RequestError::TooManySegments {
            count: many.len() as u64,
            max: MAX_DISCARD_SEG
        }
    );
    assert_eq!(
        dwz_error(
            VIRTIO_BLK_T_DISCARD,
            &[(0, MAX_DISCARD_SECTORS + 1, 0)],
            0,
            &l
        ),
        RequestError::SegmentTooLarge {
            sectors: MAX_DISCARD_SECTORS + 1,
            max: MAX_DISCARD_SECTORS
        }
    );
    assert!(matches!(
        dwz_error(VIRTIO_BLK_T_WRITE_ZEROES, &[(CAP / 512, 1, 0)], 0, &l),
        RequestError::OutOfRange { .. }
    ));
    assert_eq!(
        dwz_error(
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, 0)],
            0,
            &all_limits(CAP, true)
        ),
        RequestError::FeatureNotNegotiated("VIRTIO_BLK_F_DISCARD")
    );
    let mut ro = all_limits(CAP, false);
    ro.read_only = true;
    assert_eq!(
        dwz_error(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)], 0, &ro),
        RequestError::ReadOnly
    );
}

fn simple_error(ty: u32, sector: u64, descs: &[RawDescriptor], limits: &Limits) -> Rejected {
    let m = mem();
    write_header(&m, HDR, ty, sector);
    rejected(run(&m, descs, limits))
}

#[test]
fn unknown_type_is_unsupported() {
    let rej = simple_error(
        99,
        0,
        &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)],
        &all_limits(CAP, false),
    );
    assert_eq!(rej.error, RequestError::UnknownType(99));
    assert_eq!(rej.status, Some(GuestAddress(STATUS)));
    assert_eq!(for_request_error(&rej.error), Status::Unsupp);
}

#[test]
fn wrong_directions_are_refused() {
    let l = all_limits(CAP, false);
    // A read whose data buffer is device-readable: the device would have to write into it.
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
        &l,
    );
    assert_eq!(rej.error, RequestError::UnexpectedReadableData { len: 512 });
    assert_eq!(for_request_error(&rej.error), Status::IoErr);
    // A write whose data buffer is device-writable.
    let rej = simple_error(
        VIRTIO_BLK_T_OUT,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
        &l,
    );
    assert_eq!(rej.error, RequestError::UnexpectedWritableData { len: 512 });
    // A readable descriptor after a writable one.
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(DATA, 8, 0),
            desc(STATUS, 1, F_WRITE),
        ],
        &l,
    );
    assert_eq!(rej.error, RequestError::ReadableAfterWritable);
    // The header in a writable descriptor.
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[desc(HDR, 16, F_WRITE), desc(STATUS, 1, F_WRITE)],
        &l,
    );
    assert_eq!(rej.error, RequestError::HeaderTooShort(0));
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[desc(HDR, 8, 0), desc(STATUS, 1, F_WRITE)],
        &l,
    );
    assert_eq!(rej.error, RequestError::HeaderTooShort(8));
}

#[test]
fn missing_or_unusable_status_byte() {
    let l = all_limits(CAP, false);
    // Status in a read-only descriptor: nothing writable at all.
    let rej = simple_error(
        VIRTIO_BLK_T_OUT,
        0,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, 0)],
        &l,
    );
    assert_eq!((rej.error, rej.status), (RequestError::NoStatusByte, None));
    // A zero-length status descriptor after a readable-only chain.
    let rej = simple_error(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[desc(HDR, 16, 0), desc(STATUS, 0, F_WRITE)],
        &l,
    );
    assert_eq!((rej.error, rej.status), (RequestError::NoStatusByte, None));
    // A status descriptor whose end overflows the address space.
    let rej = simple_error(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[desc(HDR, 16, 0), desc(u64::MAX - 10, 100, F_WRITE)],
        &l,
    );
    assert_eq!((rej.error, rej.status), (RequestError::NoStatusByte, None));
    // The status byte outside guest memory.
    let rej = simple_error(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[desc(HDR, 16, 0), desc(MEM_SIZE, 1, F_WRITE)],
        &l,
    );
    assert_eq!((rej.error, rej.status), (RequestError::NoStatusByte, None));
}

#[test]
fn buffers_outside_guest_memory() {
    let l = all_limits(CAP, false);
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[
            desc(HDR, 16, 0),
            desc(MEM_SIZE - 256, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
        &l,
    );
    assert_eq!(
        rej.error,
        RequestError::OutsideGuestMemory {
            addr: MEM_SIZE - 256,
            len: 512
        }
    );
    assert_eq!(rej.status, Some(GuestAddress(STATUS)));
    let rej = simple_error(
        VIRTIO_BLK_T_OUT,
        0,
        &[
            desc(HDR, 16, 0),
            desc(u64::MAX - 100, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
        &l,
    );
    assert!(matches!(rej.error, RequestError::OutsideGuestMemory { .. }));
    let rej = simple_error(
        VIRTIO_BLK_T_IN,
        0,
        &[desc(MEM_SIZE + 4096, 16, 0), desc(STATUS, 1, F_WRITE)],
        &l,
    );
    assert!(matches!(rej.error, RequestError::OutsideGuestMemory { .. }));
}

#[test]
fn bad_lengths_and_ranges() {
    let l = all_limits(CAP, false);
    let io = |ty, sector, len| {
        simple_error(
            ty,
            sector,
            &[
                desc(HDR, 16, 0),
                desc(DATA, len, if ty == VIRTIO_BLK_T_IN { F_WRITE } else { 0 }),
                desc(STATUS, 1, F_WRITE),
            ],
            &l,
        )
        .error
    };
    assert_eq!(io(VIRTIO_BLK_T_IN, 0, 1000), RequestError::Unaligned(1000));
    assert_eq!(io(VIRTIO_BLK_T_OUT, 0, 511), RequestError::Unaligned(511));
    assert_eq!(
        io(VIRTIO_BLK_T_IN, 0, MAX_DATA_BYTES + 512),
        RequestError::TooLarge {
            len: u64::from(MAX_DATA_BYTES) + 512,
            max: u64::from(MAX_DATA_BYTES)
        }
    );
    assert_eq!(
        io(VIRTIO_BLK_T_IN, CAP / 512, 512),
        RequestError::OutOfRange {
            offset: CAP,
            len: 512,
            capacity: CAP
        }
    );
    assert_eq!(
        io(VIRTIO_BLK_T_OUT, CAP / 512 - 1, 1024),
        RequestError::OutOfRange {
            offset: CAP - 512,
            len: 1024,
            capacity: CAP
        }
    );
    assert!(matches!(
        io(VIRTIO_BLK_T_IN, u64::MAX / 256, 512),
        RequestError::OutOfRange { .. }
    ));
    assert!(matches!(
        io(VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
        RequestError::OutOfRange { .. }
    ));
    // The last sector is fine.
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_IN, CAP / 512 - 1);
    assert!(run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE)
        ],
        &l
    )
    .is_ok());
}

#[test]
fn writes_to_a_read_only_disk() {
    let rej = simple_error(
        VIRTIO_BLK_T_OUT,
        0,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
        &all_limits(CAP, true),
    );
    assert_eq!(rej.error, RequestError::ReadOnly);
    assert_eq!(for_request_error(&rej.error), Status::IoErr);
}

#[test]
fn chains_too_long() {
    let l = all_limits(CAP, false);
    let mut descs = vec![desc(HDR, 16, 0)];
    for i in 0..u64::from(l.max_descriptors) {
        descs.push(desc(DATA + i * 512, 512, 0));
    }
    descs.push(desc(STATUS, 1, F_WRITE));
    let rej = simple_error(VIRTIO_BLK_T_OUT, 0, &descs, &l);
    assert_eq!(
        rej.error,
        RequestError::TooManyDescriptors(l.max_descriptors)
    );
    assert_eq!(rej.status, Some(GuestAddress(STATUS)));
}

#[test]
fn looping_and_dangling_chains() {
    let m = mem();
    write_header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    let rej = rejected(run_raw(
        &m,
        &[
            (0, raw(HDR, 16, F_NEXT, 1)),
            (1, raw(STATUS, 1, F_WRITE | F_NEXT, 0)),
        ],
        0,
    ));
    assert_eq!((rej.error, rej.status), (RequestError::BrokenChain, None));
    // next points past the queue.
    let m = mem();
    let rej = rejected(run_raw(
        &m,
        &[
            (0, raw(HDR, 16, F_NEXT, 999)),
            (1, raw(STATUS, 1, F_WRITE, 0)),
        ],
        0,
    ));
    assert_eq!((rej.error, rej.status), (RequestError::BrokenChain, None));
    // The head index itself is past the queue.
    let m = mem();
    let rej = rejected(run_raw(&m, &[], 4000));
    assert_eq!((rej.error, rej.head), (RequestError::NoDescriptors, 4000));
}

#[test]
fn indirect_tables() {
    let m = mem();
    let table = 0x30_0000u64;
    write_header(&m, HDR, VIRTIO_BLK_T_IN, 1);
    let entries = [
        raw(HDR, 16, F_NEXT, 1),
        raw(DATA, 1024, F_WRITE | F_NEXT, 2),
        raw(STATUS, 1, F_WRITE, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(*e, GuestAddress(table + 16 * i as u64))
            .expect("table");
    }
    let req = run_raw(&m, &[(0, raw(table, 48, F_INDIRECT, 0))], 0).expect("indirect read");
    assert_eq!(
        req.kind,
        RequestKind::Read {
            offset: 512,
            data: seglist(&[(DATA, 1024)])
        }
    );

    // An indirect descriptor inside an indirect table is refused.
    m.write_obj(raw(table, 48, F_INDIRECT, 0), GuestAddress(table + 16))
        .expect("table");
    m.write_obj(raw(HDR, 16, F_NEXT, 1), GuestAddress(table))
        .expect("table");
    let rej = rejected(run_raw(&m, &[(0, raw(table, 48, F_INDIRECT, 0))], 0));
    assert_eq!((rej.error, rej.status), (RequestError::BrokenChain, None));

    // An indirect table outside guest memory yields no descriptors.
    let m = mem();
    let rej = rejected(run_raw(
        &m,
        &[(0, raw(MEM_SIZE + 0x1000, 48, F_INDIRECT, 0))],
        0,
    ));
    assert_eq!(rej.error, RequestError::NoDescriptors);
}

#[test]
fn huge_indirect_tables_are_not_scanned_to_the_end() {
    let m = mem();
    let table = 0x40_0000u64;
    write_header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let n = MAX_SCAN as u16 + 10;
    m.write_obj(raw(HDR, 16, F_NEXT, 1), GuestAddress(table))
        .expect("table");
    for i in 1..n {
        let last = i == n - 1;
        let d = if last {
            raw(STATUS, 1, F_WRITE, 0)
        } else {
            raw(DATA, 512, F_NEXT, i + 1)
        };
        m.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .expect("table");
    }
    let rej = rejected(run_raw(
        &m,
        &[(0, raw(table, 16 * u32::from(n), F_INDIRECT, 0))],
        0,
    ));
    assert_eq!(rej.status, None);
    assert!(matches!(rej.error, RequestError::TooManyDescriptors(_)));
}
