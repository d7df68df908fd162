//! virtio-blk executor tests against a backend the test completes by hand.

use std::sync::{Arc, Mutex};

use journal::{AlignedBuf, Completion};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::guest::Segment;
use crate::request::Range;
use crate::testutil::*;

fn executor(depth: usize, max_bytes: u64) -> (GuestExecutor, Arc<Mutex<Held>>) {
    let (backend, state) = HeldBackend::new();
    (
        GuestExecutor::new(
            Box::new(backend),
            *b"serial-0123456789abc",
            depth,
            max_bytes,
            None,
        )
        .expect("executor"),
        state,
    )
}

fn finished(queue: u16, head: u16, used_len: u32) -> Done {
    Done {
        queue,
        head,
        used_len,
    }
}

/// Starts `req`, which must not have to wait.
fn start(
    ex: &mut GuestExecutor,
    m: &GuestMemoryMmap,
    queue: u16,
    req: Request,
    done: &mut Vec<Done>,
) {
    assert!(ex.try_start(m, queue, req, done).is_ok(), "had to wait");
}

fn segs(addr: u64, len: u32) -> SegList {
    let mut l = SegList::new();
    l.push(Segment {
        addr: GuestAddress(addr),
        len,
    });
    l
}

fn write_req(head: u16, len: u32) -> Request {
    Request {
        head,
        kind: RequestKind::Write {
            offset: 0,
            data: segs(DATA, len),
        },
        status: GuestAddress(STATUS + u64::from(head)),
    }
}

#[test]
fn buffer_budget_bounds_what_is_held() {
    let m = mem();
    let mb = 1u64 << 20;
    let (mut ex, state) = executor(256, 4 * mb);
    let mut done = Vec::new();
    // One request always fits into an idle executor, even one larger than the budget.
    let big = write_req(0, 8 << 20);
    start(&mut ex, &m, 0, big, &mut done);
    assert!(
        ex.try_start(&m, 0, write_req(1, 512), &mut done).is_err(),
        "budget exhausted by the first request"
    );
    let flush = Request {
        head: 2,
        kind: RequestKind::Flush,
        status: GuestAddress(STATUS + 2),
    };
    start(&mut ex, &m, 0, flush, &mut done);
    complete_all(&state, true, 0);
    ex.reap(&m, &mut done).expect("reap");
    assert_eq!(
        done,
        vec![finished(0, 0, 1), finished(0, 2, 1)],
        "requests without buffers still fit"
    );
    assert_eq!(status_at(&m, STATUS), 0);
    for head in 0..4u16 {
        start(&mut ex, &m, 0, write_req(head, mb as u32), &mut done);
    }
    assert!(ex.try_start(&m, 0, write_req(9, 512), &mut done).is_err());
    assert_eq!(ex.in_flight(), 4);
}

#[test]
fn depth_bounds_journal_requests() {
    let m = mem();
    let (mut ex, _state) = executor(4, u64::MAX);
    let mut done = Vec::new();
    for head in 0..4u16 {
        let flush = Request {
            head,
            kind: RequestKind::Flush,
            status: GuestAddress(STATUS + u64::from(head)),
        };
        start(&mut ex, &m, 0, flush, &mut done);
    }
    let flush = Request {
        head: 5,
        kind: RequestKind::Flush,
        status: GuestAddress(STATUS + 5),
    };
    assert!(ex.try_start(&m, 0, flush, &mut done).is_err());
}

#[test]
fn multi_range_requests_finish_once_with_the_first_failure() {
    let m = mem();
    let (mut ex, state) = executor(256, u64::MAX);
    let mut done = Vec::new();
    let ranges = vec![
        Range {
            offset: 0,
            len: 4096,
        },
        Range {
            offset: 8192,
            len: 0,
        },
        Range {
            offset: 65536,
            len: 512,
        },
    ];
    start(
        &mut ex,
        &m,
        0,
        Request {
            head: 7,
            kind: RequestKind::Discard { ranges },
            status: GuestAddress(STATUS),
        },
        &mut done,
    );
    assert_eq!(
        state.lock().expect("lock").submitted.len(),
        2,
        "empty ranges are skipped"
    );
    // First part succeeds, second fails.
    {
        let mut s = state.lock().expect("lock");
        let (t0, _) = s.submitted.remove(0);
        s.ready.push(Completion {
            token: t0,
            result: Ok(None),
        });
    }
    ex.reap(&m, &mut done).expect("reap");
    assert!(done.is_empty(), "finished before all parts completed");
    complete_all(&state, false, 0);
    ex.reap(&m, &mut done).expect("reap");
    assert_eq!(done, vec![finished(0, 7, 1)]);
    assert_eq!(status_at(&m, STATUS), 1);
    assert_eq!(ex.in_flight(), 0);
}

#[test]
fn reads_land_in_guest_buffers() {
    let m = mem();
    let (mut ex, state) = executor(256, u64::MAX);
    let mut done = Vec::new();
    let mut data = segs(DATA, 512);
    data.push(Segment {
        addr: GuestAddress(DATA + 0x10000),
        len: 1024,
    });
    start(
        &mut ex,
        &m,
        3,
        Request {
            head: 1,
            kind: RequestKind::Read { offset: 0, data },
            status: GuestAddress(STATUS),
        },
        &mut done,
    );
    complete_all(&state, true, 0x5a);
    ex.reap(&m, &mut done).expect("reap");
    assert_eq!(done, vec![finished(3, 1, 1536 + 1)]);
    assert_eq!(read_bytes(&m, DATA, 512), vec![0x5a; 512]);
    assert_eq!(read_bytes(&m, DATA + 0x10000, 1024), vec![0x5a; 1024]);
    assert_eq!(status_at(&m, STATUS), 0);

    // A completion whose buffer does not match the request is an I/O error.
    start(
        &mut ex,
        &m,
        0,
        Request {
            head: 2,
            kind: RequestKind::Read {
                offset: 0,
                data: segs(DATA, 512),
            },
            status: GuestAddress(STATUS),
        },
        &mut done,
    );
    {
        let mut s = state.lock().expect("lock");
        let (t, _) = s.submitted.remove(0);
        s.ready.push(Completion {
            token: t,
            result: Ok(Some(AlignedBuf::new(4096))),
        });
        s.ready.push(Completion {
            token: 999,
            result: Ok(None),
        });
    }
    done.clear();
    ex.reap(&m, &mut done).expect("reap");
    assert_eq!(done, vec![finished(0, 2, 1)]);
    assert_eq!(status_at(&m, STATUS), 1);
}

#[test]
fn writes_copy_guest_data_and_get_id_needs_no_io() {
    let m = mem();
    let (mut ex, state) = executor(256, u64::MAX);
    let mut done = Vec::new();
    m.write_slice(&pattern(4, 2048), GuestAddress(DATA))
        .expect("data");
    ex.set_write_through(true);
    start(&mut ex, &m, 0, write_req(0, 2048), &mut done);
    {
        let s = state.lock().expect("lock");
        match &s.submitted[0].1 {
            journal::Request::Write { buf, fua, offset } => {
                assert_eq!(buf.as_slice(), pattern(4, 2048).as_slice());
                assert!(*fua, "write-through writes are FUA");
                assert_eq!(*offset, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    start(
        &mut ex,
        &m,
        0,
        Request {
            head: 9,
            kind: RequestKind::GetId {
                data: segs(DATA + 8192, 8),
            },
            status: GuestAddress(STATUS + 9),
        },
        &mut done,
    );
    assert_eq!(done, vec![finished(0, 9, 9)]);
    assert_eq!(read_bytes(&m, DATA + 8192, 8), b"serial-0");
}

#[test]
fn drain_never_hangs_on_a_lost_request() {
    let m = mem();
    let (mut ex, state) = executor(256, u64::MAX);
    let mut done = Vec::new();
    start(&mut ex, &m, 0, write_req(0, 512), &mut done);
    state.lock().expect("lock").lost = true;
    ex.drain(&m, &mut done);
    assert_eq!(done, vec![finished(0, 0, 1)]);
    assert_eq!(status_at(&m, STATUS), 1);
    assert_eq!(ex.in_flight(), 0);
}

fn write_at(head: u16, offset: u64, addr: u64, len: u32) -> Request {
    Request {
        head,
        kind: RequestKind::Write {
            offset,
            data: segs(addr, len),
        },
        status: GuestAddress(STATUS + u64::from(head)),
    }
}

/// On the real io_uring backend, with `io_uring_enter` failing for a while (the ring's
/// descriptor number points at /dev/null): a request the engine took completes once, with its
/// own status, and one it refused fails at once without ever finishing another request
/// that later reuses its slot.
#[test]
fn a_refused_submit_never_finishes_another_request() {
    use std::os::fd::AsRawFd;
    let m = mem();
    let td = test_disk(16 << 20);
    let backend = crate::backend::UringBackend::new(td.volume.clone(), 8).expect("backend");
    let ring_fd = backend.ring_fd().expect("a ring");
    let mut ex = GuestExecutor::new(
        Box::new(backend),
        *b"serial-0123456789abc",
        8,
        u64::MAX,
        None,
    )
    .expect("executor");
    m.write_slice(&[0xaa; 4096], GuestAddress(DATA)).unwrap();
    m.write_slice(&[0xbb; 4096], GuestAddress(DATA + 0x10000))
        .unwrap();
    m.write_slice(&[0xcc; 4096], GuestAddress(DATA + 0x20000))
        .unwrap();
    let mut done = Vec::new();

    let null = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: dup/dup2 on descriptors this test owns; the ring lives on through its mappings
    // while its number points at /dev/null, and gets its number back below.
    let saved = unsafe { libc::dup(ring_fd) };
    assert!(saved >= 0);
    // SAFETY: as above.
    assert!(unsafe { libc::dup2(null.as_raw_fd(), ring_fd) } >= 0);
    start(&mut ex, &m, 0, write_at(1, 0, DATA, 4096), &mut done);
    start(
        &mut ex,
        &m,
        0,
        write_at(2, 4096, DATA + 0x10000, 4096),
        &mut done,
    );
    // SAFETY: puts the ring back on its number and closes the copy.
    unsafe {
        assert!(libc::dup2(saved, ring_fd) >= 0);
        libc::close(saved);
    }
    assert_eq!(
        done,
        vec![finished(0, 2, 1)],
        "only the refused request is finished"
    );
    assert_eq!(status_at(&m, STATUS + 2), Status::IoErr.byte());
    start(
        &mut ex,
        &m,
        0,
        write_at(3, 8192, DATA + 0x20000, 4096),
        &mut done,
    );
    ex.drain(&m, &mut done);
    let mut heads: Vec<u16> = done.iter().map(|d| d.head).collect();
    heads.sort();
    assert_eq!(heads, [1, 2, 3], "each request finishes exactly once");
    assert_eq!(status_at(&m, STATUS + 1), Status::Ok.byte());
    assert_eq!(status_at(&m, STATUS + 3), Status::Ok.byte());
    let mut back = vec![0u8; 3 * 4096];
    td.volume.read_at(&mut back, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0xaa));
    assert!(
        back[4096..8192].iter().all(|&b| b == 0),
        "the refused write ran"
    );
    assert!(back[8192..].iter().all(|&b| b == 0xcc));
}
