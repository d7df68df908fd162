//! The shared executor against a backend the test completes by hand, and against io_uring.

use std::sync::Mutex;

use journal::Request as J;

use super::*;
use crate::testutil::*;

fn executor(
    depth: usize,
    budget: u64,
    gate: Option<Arc<TestGate>>,
) -> (Executor<u32>, Arc<Mutex<Held>>) {
    let (backend, state) = HeldBackend::new();
    let gate = gate.map(|g| g as Arc<dyn RequestGate>);
    let ex = Executor::new(
        Box::new(backend),
        depth,
        Budget::local(budget).expect("budget"),
        gate,
    );
    (ex, state)
}

fn start(ex: &mut Executor<u32>, ctx: u32, op: Op, out: &mut Vec<Done<u32>>) {
    let t = ex
        .admit(op.parts(), op.alloc_bytes())
        .expect("must not have to wait");
    ex.start(t, ctx, op, out);
}

fn read(offset: u64, len: u64) -> Op {
    Op::Read { offset, len }
}

fn write(offset: u64, len: usize, fua: bool) -> Op {
    Op::Write {
        offset,
        buf: AlignedBuf::new(len),
        fua,
    }
}

#[test]
fn depth_counts_journal_parts_and_one_request_always_fits() {
    let (mut ex, state) = executor(4, u64::MAX, None);
    let mut out = Vec::new();
    let five = Op::Discard {
        ranges: (0..5).map(|i| (i * 4096, 4096)).collect(),
        fua: false,
    };
    assert_eq!(five.parts(), 5);
    start(&mut ex, 1, five, &mut out);
    assert_eq!(
        state.lock().unwrap().submitted.len(),
        5,
        "an idle executor takes it whole"
    );
    assert_eq!(ex.admit(1, 0).err(), Some(Wait::Full));
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(out.len(), 1, "five parts, one completion");
    assert!(out[0].result.is_ok());
    for i in 0..4 {
        start(&mut ex, i, Op::Flush, &mut out);
    }
    assert_eq!(ex.admit(1, 0).err(), Some(Wait::Full), "depth 4");
}

#[test]
fn the_budget_bounds_buffers_and_read_data_is_held_until_released() {
    let (mut ex, state) = executor(64, 8192, None);
    let mut out = Vec::new();
    start(&mut ex, 1, read(0, 1 << 20), &mut out);
    assert_eq!(
        ex.held(),
        1 << 20,
        "an idle executor takes one oversized read"
    );
    assert_eq!(ex.admit(1, 512).err(), Some(Wait::Full));
    assert!(
        ex.admit(1, 0).is_ok_and(|t| {
            ex.abandon(t);
            true
        }),
        "bufferless requests still fit"
    );
    complete_all(&state, true, 0x5a);
    ex.poll(&mut out).unwrap();
    let d = out.pop().unwrap();
    assert_eq!(d.held, 1 << 20);
    assert_eq!(
        d.result.unwrap().unwrap().as_slice(),
        vec![0x5a; 1 << 20].as_slice()
    );
    assert_eq!(
        ex.held(),
        1 << 20,
        "read data stays charged until delivered"
    );
    ex.release(d.held);
    assert_eq!(ex.held(), 0);
    // A write's payload reserved by the front end travels with the request.
    assert!(ex.reserve(4096));
    let mut t = ex.admit(1, 0).unwrap();
    t.carry(4096);
    ex.start(t, 2, write(0, 4096, false), &mut out);
    assert_eq!(ex.held(), 4096);
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(out.pop().unwrap().held, 0);
    assert_eq!(ex.held(), 0, "a write's payload goes with its completion");
}

#[test]
fn fua_reaches_the_journal_and_a_fua_discard_is_flushed_before_it_completes() {
    let (mut ex, state) = executor(64, u64::MAX, None);
    let mut out = Vec::new();
    start(&mut ex, 1, write(0, 4096, true), &mut out);
    start(
        &mut ex,
        2,
        Op::WriteZeroes {
            ranges: vec![(8192, 4096)],
            fua: true,
        },
        &mut out,
    );
    {
        let s = state.lock().unwrap();
        assert!(matches!(s.submitted[0].1, J::Write { fua: true, .. }));
        assert!(matches!(s.submitted[1].1, J::WriteZeroes { fua: true, .. }));
    }
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(out.len(), 2);
    out.clear();
    start(
        &mut ex,
        3,
        Op::Discard {
            ranges: vec![(0, 4096), (65536, 4096)],
            fua: true,
        },
        &mut out,
    );
    let kinds = |s: &Held| {
        s.submitted
            .iter()
            .map(|(_, r)| format!("{r:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        state.lock().unwrap().submitted.len(),
        2,
        "no flush before the discards are done"
    );
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert!(out.is_empty(), "not done before its flush");
    let s = kinds(&state.lock().unwrap());
    assert_eq!(s, ["Flush"], "the flush follows the completed discards");
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    // A failed discard is not flushed: its error is the answer.
    out.clear();
    start(
        &mut ex,
        4,
        Op::Discard {
            ranges: vec![(0, 4096)],
            fua: true,
        },
        &mut out,
    );
    complete_all(&state, false, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_err());
    assert!(state.lock().unwrap().submitted.is_empty());
}

#[test]
fn a_closed_gate_holds_requests_and_completions_release_it() {
    let gate = TestGate::new();
    let (mut ex, state) = executor(64, u64::MAX, Some(gate.clone()));
    let mut out = Vec::new();
    start(&mut ex, 1, write(0, 4096, false), &mut out);
    assert_eq!(gate.in_flight(), 1);
    gate.close();
    assert_eq!(ex.admit(1, 4096).err(), Some(Wait::Paused));
    assert_eq!(ex.held(), 0, "a refused admission gives its budget back");
    let tries = gate.tries.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ex.admit(1, 0).err(), Some(Wait::Paused));
    assert_eq!(
        gate.tries.load(std::sync::atomic::Ordering::SeqCst),
        tries,
        "no new attempt before the waker fires"
    );
    complete_all(&state, true, 0);
    ex.poll(&mut out).unwrap();
    assert_eq!(
        gate.in_flight(),
        0,
        "the completion released its admission: a pause drains"
    );
    gate.open();
    ex.gate_woken();
    assert!(!ex.is_paused());
    start(&mut ex, 2, Op::Flush, &mut out);
    assert_eq!(gate.in_flight(), 1);
}

#[test]
fn cancelled_requests_complete_unanswered_and_release_everything() {
    let gate = TestGate::new();
    let (mut ex, state) = executor(64, u64::MAX, Some(gate.clone()));
    let mut out = Vec::new();
    start(&mut ex, 1, read(0, 8192), &mut out);
    start(&mut ex, 2, write(0, 4096, false), &mut out);
    ex.cancel_all();
    assert_eq!(ex.in_flight(), 2, "still in the backend");
    assert_eq!(
        gate.in_flight(),
        2,
        "and still admitted while the journal runs them"
    );
    complete_all(&state, true, 1);
    ex.poll(&mut out).unwrap();
    assert!(out.is_empty(), "nothing delivered");
    assert_eq!(ex.in_flight(), 0);
    assert_eq!(ex.held(), 0, "read data of a cancelled read is given back");
    assert_eq!(gate.in_flight(), 0);
}

#[test]
fn drain_fails_lost_requests_and_drop_releases_admissions() {
    let gate = TestGate::new();
    let (mut ex, state) = executor(64, u64::MAX, Some(gate.clone()));
    let mut out = Vec::new();
    start(&mut ex, 1, write(0, 4096, false), &mut out);
    state.lock().unwrap().lost = true;
    ex.drain(&mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_err(), "a lost request fails, never hangs");
    assert_eq!(gate.in_flight(), 0);
    state.lock().unwrap().lost = false;
    start(&mut ex, 2, write(0, 4096, false), &mut out);
    assert_eq!(gate.in_flight(), 1);
    drop(ex);
    assert_eq!(
        gate.in_flight(),
        0,
        "dropping the executor releases its admissions"
    );
}

#[test]
fn empty_range_lists_finish_at_once() {
    let gate = TestGate::new();
    let (mut ex, state) = executor(64, u64::MAX, Some(gate.clone()));
    let mut out = Vec::new();
    start(
        &mut ex,
        7,
        Op::Discard {
            ranges: vec![(0, 0)],
            fua: true,
        },
        &mut out,
    );
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    assert!(
        state.lock().unwrap().submitted.is_empty(),
        "no journal work, not even a flush"
    );
    assert_eq!(gate.in_flight(), 0);
}

/// On io_uring with a real journal: FLUSH, reads and writes all come back through the
/// engine, and a refused submit fails only its own request.
#[test]
fn on_io_uring_every_request_completes_once() {
    use std::os::fd::AsRawFd;
    let td = test_disk(16 << 20);
    let backend = crate::backend::UringBackend::new(td.volume.clone(), 8).expect("backend");
    let ring_fd = backend.ring_fd().expect("ring");
    let mut ex: Executor<u32> =
        Executor::new(Box::new(backend), 8, Budget::local(1 << 20).unwrap(), None);
    let mut out = Vec::new();
    let data = |b: u8| {
        let mut buf = AlignedBuf::new(4096);
        buf.as_mut_slice().fill(b);
        buf
    };
    start(
        &mut ex,
        1,
        Op::Write {
            offset: 0,
            buf: data(0xaa),
            fua: false,
        },
        &mut out,
    );
    let null = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: dup/dup2 on descriptors this test owns; the ring lives on through its mappings
    // while its number points at /dev/null, and gets its number back below.
    let saved = unsafe { libc::dup(ring_fd) };
    assert!(saved >= 0);
    // SAFETY: as above.
    assert!(unsafe { libc::dup2(null.as_raw_fd(), ring_fd) } >= 0);
    // The first write is queued (its SQE waits for a working enter), the second refused.
    start(
        &mut ex,
        2,
        Op::Write {
            offset: 4096,
            buf: data(0xbb),
            fua: false,
        },
        &mut out,
    );
    start(
        &mut ex,
        5,
        Op::Write {
            offset: 8192,
            buf: data(0xcc),
            fua: false,
        },
        &mut out,
    );
    assert_eq!(out.len(), 1, "only the refused write is done");
    // SAFETY: puts the ring back on its number and closes the copy.
    unsafe {
        assert!(libc::dup2(saved, ring_fd) >= 0);
        libc::close(saved);
    }
    // Requests in flight are not ordered against each other: read once the writes are done.
    ex.drain(&mut out);
    start(&mut ex, 3, Op::Flush, &mut out);
    start(&mut ex, 4, read(0, 12288), &mut out);
    ex.drain(&mut out);
    let mut ctxs: Vec<u32> = out.iter().map(|d| d.ctx).collect();
    ctxs.sort();
    assert_eq!(ctxs, [1, 2, 3, 4, 5], "each request finishes exactly once");
    for d in out {
        match d.ctx {
            5 => assert!(d.result.is_err(), "the refused write failed"),
            4 => {
                let got = d.result.unwrap().unwrap();
                assert!(got.as_slice()[..4096].iter().all(|&b| b == 0xaa));
                assert!(got.as_slice()[4096..8192].iter().all(|&b| b == 0xbb));
                assert!(
                    got.as_slice()[8192..].iter().all(|&b| b == 0),
                    "the refused write ran"
                );
                ex.release(d.held);
            }
            _ => assert!(d.result.is_ok()),
        }
    }
    assert_eq!(ex.held(), 0);
}
