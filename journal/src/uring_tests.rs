//! Ownership tests of the io_uring engine on real files and a real ring: a refused submit,
//! a failing `io_uring_enter`, SQEs past the ring's size, and dropping the engine in flight.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use super::*;
use crate::{CacheMode, Disk, OpenOptions};

const MIB: u64 = 1 << 20;

fn disk(dir: &Path) -> Disk {
    let d = dir.join("disk");
    Disk::create(&d, 16 * MIB, None).unwrap();
    Disk::open(
        &d,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .unwrap()
}

fn write(offset: u64, fill: u8, len: usize) -> Request {
    Request::Write {
        offset,
        buf: AlignedBuf::from_slice(&vec![fill; len]),
        fua: false,
    }
}

/// Points the ring's descriptor at /dev/null, so that every `io_uring_enter` fails (the ring
/// itself lives on through its mappings); `restore` puts it back.
struct BrokenRing {
    ring_fd: RawFd,
    saved: RawFd,
}

impl BrokenRing {
    fn new(engine: &IoEngine) -> BrokenRing {
        let null = std::fs::File::open("/dev/null").unwrap();
        let ring_fd = engine.ring_fd();
        // SAFETY: dup/dup2 on descriptors this test owns; `ring_fd` stays a valid descriptor
        // throughout (first a copy of /dev/null, then the ring again).
        let saved = unsafe { libc::dup(ring_fd) };
        assert!(saved >= 0);
        // SAFETY: as above.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), ring_fd) } >= 0);
        BrokenRing { ring_fd, saved }
    }

    fn restore(self) {
        // SAFETY: `saved` is our duplicate of the ring; it goes back to its number and closes.
        unsafe {
            assert!(libc::dup2(self.saved, self.ring_fd) >= 0);
            libc::close(self.saved);
        }
    }
}

#[test]
fn a_refused_submit_hands_the_request_back_and_never_completes() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let mut eng = IoEngine::new(disk.now(), 8).unwrap();
    let mut out = Vec::new();

    let broken = BrokenRing::new(&eng);
    // Taken: its SQE is queued although the enter fails; it completes later.
    eng.submit(1, write(0, 0xa1, 4096)).unwrap();
    assert_eq!(eng.in_flight(), 1);
    // Refused before anything of it is queued: the request comes back whole.
    let buf = AlignedBuf::from_slice(&[0xb2; 8192]);
    let ptr = buf.as_slice().as_ptr();
    let r = eng
        .submit(
            2,
            Request::Write {
                offset: 8192,
                buf,
                fua: false,
            },
        )
        .unwrap_err();
    assert_eq!(r.token, 2);
    match &r.request {
        Request::Write { offset, buf, .. } => {
            assert_eq!(*offset, 8192);
            assert_eq!(buf.as_slice().as_ptr(), ptr, "the same buffer comes back");
            assert!(buf.as_slice().iter().all(|&b| b == 0xb2));
        }
        other => panic!("got back {other:?}"),
    }
    assert_eq!(eng.in_flight(), 1, "a refused request is not in flight");
    assert!(eng.poll(&mut out).is_err(), "the failing ring is reported");
    assert!(out.is_empty());

    broken.restore();
    // The caller may reuse token 2 at once: exactly one completion per taken request.
    eng.submit(2, write(16384, 0xc3, 4096)).unwrap();
    eng.wait(usize::MAX, &mut out).unwrap();
    let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
    tokens.sort();
    assert_eq!(tokens, [1, 2]);
    assert!(out.iter().all(|c| c.result.is_ok()));
    let v = disk.now();
    let mut b = vec![0u8; 4096 * 5];
    v.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0xa1));
    assert!(
        b[8192..12288].iter().all(|&x| x == 0),
        "the refused write never ran"
    );
    assert!(b[16384..].iter().all(|&x| x == 0xc3));
}

#[test]
fn sqes_beyond_the_ring_wait_in_the_backlog() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    // Every other block, so that one read of the range needs one SQE per written block:
    // 200 SQEs, more than the smallest ring (64 entries) holds.
    for i in 0..200u64 {
        v.write_at(&[i as u8 + 1; 4096], i * 8192, false).unwrap();
    }
    let mut eng = IoEngine::new(v.clone(), 1).unwrap();
    eng.submit(
        7,
        Request::Read {
            offset: 0,
            len: 200 * 8192,
        },
    )
    .unwrap();
    let mut out = Vec::new();
    eng.wait(1, &mut out).unwrap();
    let buf = out.pop().unwrap().result.unwrap().unwrap();
    for i in 0..200usize {
        let blk = &buf.as_slice()[i * 8192..(i + 1) * 8192];
        assert!(blk[..4096].iter().all(|&b| b == i as u8 + 1), "block {i}");
        assert!(blk[4096..].iter().all(|&b| b == 0), "hole {i}");
    }
}

#[test]
fn dropping_the_engine_waits_for_every_request() {
    let t = tempfile::tempdir().unwrap();
    let mut disk = disk(t.path());
    let v = disk.now();
    let mut eng = IoEngine::new(v.clone(), 64).unwrap();
    for i in 0..64u64 {
        eng.submit(i, write(i * 65536, i as u8, 65536)).unwrap();
    }
    for i in 0..16u64 {
        eng.submit(
            100 + i,
            Request::Read {
                offset: i * MIB,
                len: MIB,
            },
        )
        .unwrap();
    }
    // Nothing reaped: every write is still in flight as far as the volume knows.
    assert!(v.writes_in_flight() > 0);
    drop(eng);
    // Every write was finished (committed or aborted) before the engine went away: none is
    // left holding the volume, so a checkpoint can be taken.
    assert_eq!(v.writes_in_flight(), 0);
    disk.checkpoint("after-drop").unwrap();

    // The same with SQEs queued while the ring could not be entered: they are submitted and
    // waited for.
    let mut eng = IoEngine::new(v.clone(), 64).unwrap();
    let broken = BrokenRing::new(&eng);
    eng.submit(1, write(0, 0x5a, 65536)).unwrap();
    assert_eq!(v.writes_in_flight(), 1);
    broken.restore();
    drop(eng);
    assert_eq!(v.writes_in_flight(), 0);
    disk.checkpoint("after-second-drop").unwrap();
}

// FLUSH and FUA: ordering and coverage of the sync batches, on real files.

fn log_len(v: &Volume) -> u64 {
    let a = v.active_layer().unwrap();
    std::fs::metadata(&a.files.log_path).unwrap().len()
}

fn reopen(dir: &Path) -> Disk {
    Disk::open(
        &dir.join("disk"),
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .unwrap()
}

fn read_back(v: &Volume, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    v.read_at(&mut b, offset).unwrap();
    b
}

fn wait_all(eng: &mut IoEngine) -> Vec<Completion> {
    let mut out = Vec::new();
    eng.wait(usize::MAX, &mut out).unwrap();
    out
}

#[test]
fn a_flush_puts_every_completed_write_in_the_log() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let header = log_len(&v);
    let mut eng = IoEngine::new(v.clone(), 32).unwrap();
    for i in 0..40u64 {
        eng.submit(i, write(i * 8192, i as u8 + 1, 4096)).unwrap();
    }
    assert!(wait_all(&mut eng).iter().all(|c| c.result.is_ok()));
    assert_eq!(log_len(&v), header, "no record is appended before a FLUSH");
    eng.submit(100, Request::Flush).unwrap();
    let out = wait_all(&mut eng);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].token, 100);
    assert!(out[0].result.is_ok());
    assert_eq!(
        log_len(&v),
        header + 40 * crate::format::RECORD_SIZE as u64,
        "the flush appended the record of every write completed before it"
    );
    drop(eng);
    drop(v);
    drop(disk);
    let disk = reopen(t.path());
    let v = disk.now();
    for i in 0..40u64 {
        assert!(
            read_back(&v, i * 8192).iter().all(|&b| b == i as u8 + 1),
            "write {i} survives the reopen"
        );
    }
}

/// Puts a descriptor on which fsync fails (EINVAL) in place of `fd`; `restore` undoes it.
struct BrokenFd {
    fd: RawFd,
    saved: RawFd,
}

impl BrokenFd {
    fn new(fd: RawFd) -> BrokenFd {
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup/dup2 on descriptors the test owns; `fd` stays valid throughout.
        let saved = unsafe { libc::dup(fd) };
        assert!(saved >= 0);
        // SAFETY: as above.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), fd) } >= 0);
        BrokenFd { fd, saved }
    }

    fn restore(self) {
        // SAFETY: `saved` is our duplicate of the original file; it goes back and closes.
        unsafe {
            assert!(libc::dup2(self.saved, self.fd) >= 0);
            libc::close(self.saved);
        }
    }
}

#[test]
fn no_record_reaches_the_log_when_the_data_sync_fails() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let header = log_len(&v);
    let mut eng = IoEngine::new(v.clone(), 8).unwrap();
    eng.submit(1, write(0, 0x11, 8192)).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());

    let data_fd = v.active_layer().unwrap().files.data.as_raw_fd();
    let broken = BrokenFd::new(data_fd);
    eng.submit(2, Request::Flush).unwrap();
    let out = wait_all(&mut eng);
    broken.restore();
    assert_eq!(out.len(), 1);
    assert!(
        out[0].result.is_err(),
        "the flush reports the failed data sync"
    );
    assert_eq!(
        log_len(&v),
        header,
        "the append behind the failed data sync never ran"
    );

    // The records were handed back: the next flush appends them.
    eng.submit(3, Request::Flush).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    assert_eq!(log_len(&v), header + 2 * crate::format::RECORD_SIZE as u64);
    drop(eng);
    drop(v);
    drop(disk);
    let disk = reopen(t.path());
    assert!(read_back(&disk.now(), 4096).iter().all(|&b| b == 0x11));
}

#[test]
fn a_fua_write_is_in_the_log_when_it_completes() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let header = log_len(&v);
    let mut eng = IoEngine::new(v.clone(), 8).unwrap();
    eng.submit(1, write(0, 0x21, 4096)).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    eng.submit(
        2,
        Request::Write {
            offset: 65536,
            buf: AlignedBuf::from_slice(&[0x22; 4096]),
            fua: true,
        },
    )
    .unwrap();
    let out = wait_all(&mut eng);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    assert_eq!(
        log_len(&v),
        header + 2 * crate::format::RECORD_SIZE as u64,
        "the FUA write's record (and the earlier one) are in the log"
    );
    drop(eng);
    drop(v);
    drop(disk);
    let disk = reopen(t.path());
    assert!(read_back(&disk.now(), 65536).iter().all(|&b| b == 0x22));
}

#[test]
fn flushes_wait_together_and_do_not_hold_back_requests_behind_them() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let active = v.active_layer().unwrap();
    let mut eng = IoEngine::new(v.clone(), 32).unwrap();
    for i in 0..8u64 {
        eng.submit(i, write(i * 4096, 0x30 + i as u8, 4096))
            .unwrap();
    }
    assert_eq!(wait_all(&mut eng).len(), 8);
    let before = active.batches_started();

    // Someone else holds the log (as a batch of another engine would).
    let held = active.lock_log();
    for t in 0..3u64 {
        eng.submit(100 + t, Request::Flush).unwrap();
    }
    eng.submit(
        103,
        Request::Write {
            offset: 1 << 20,
            buf: AlignedBuf::from_slice(&[0x3f; 4096]),
            fua: true,
        },
    )
    .unwrap();
    // Reads and writes queued behind the flushes complete meanwhile.
    for i in 0..8u64 {
        eng.submit(
            200 + i,
            Request::Read {
                offset: i * 4096,
                len: 4096,
            },
        )
        .unwrap();
        eng.submit(300 + i, write((64 + i) * 4096, 0x40, 4096))
            .unwrap();
    }
    let mut out = Vec::new();
    eng.wait(16, &mut out).unwrap();
    let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
    tokens.sort();
    let expect: Vec<u64> = (200..208).chain(300..308).collect();
    assert_eq!(tokens, expect, "only the reads and writes completed");
    for c in &out {
        if let Ok(Some(buf)) = &c.result {
            let i = c.token - 200;
            assert!(buf.as_slice().iter().all(|&b| b == 0x30 + i as u8));
        }
    }
    assert_eq!(eng.in_flight(), 4, "three flushes and the FUA write wait");
    assert_eq!(active.batches_started(), before);

    drop(held);
    let out = wait_all(&mut eng);
    let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
    tokens.sort();
    assert_eq!(tokens, [100, 101, 102, 103]);
    assert!(out.iter().all(|c| c.result.is_ok()));
    assert_eq!(
        active.batches_started(),
        before + 1,
        "the waiting flushes shared one sync batch"
    );
}

#[test]
fn a_flush_on_one_engine_is_covered_by_the_batch_of_another() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let active = v.active_layer().unwrap();
    let mut a = IoEngine::new(v.clone(), 8).unwrap();
    let mut b = IoEngine::new(v.clone(), 8).unwrap();
    a.submit(1, write(0, 0x51, 4096)).unwrap();
    assert!(wait_all(&mut a)[0].result.is_ok());
    let held = active.lock_log();
    b.submit(2, Request::Flush).unwrap();
    a.submit(3, Request::Flush).unwrap();
    let before = active.batches_started();
    drop(held);
    // A runs the batch; B's flush, submitted before it started, is covered by it.
    assert!(wait_all(&mut a)[0].result.is_ok());
    assert_eq!(active.batches_started(), before + 1);
    // A write committed after that batch started is not B's business.
    a.submit(4, write(8192, 0x52, 4096)).unwrap();
    assert!(wait_all(&mut a)[0].result.is_ok());
    let out = wait_all(&mut b);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    assert_eq!(active.batches_started(), before + 1, "B did not sync again");
}

// Plugged submission: one enter per batch, back-to-back writes merged into one writev.

#[test]
fn plugged_writes_merge_into_one_writev_and_read_back() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let mut eng = IoEngine::new(v.clone(), 32).unwrap();
    eng.plug();
    // Scattered disk offsets: their data blocks are allocated back to back.
    for i in 0..8u64 {
        eng.submit(i, write((i * 37 % 64) * 4096, 0x60 + i as u8, 4096))
            .unwrap();
    }
    assert_eq!(eng.runs_merged, 0, "nothing is built before unplug");
    eng.unplug().unwrap();
    assert_eq!(
        eng.runs_merged, 1,
        "8 writes (a quarter of depth 32) in one writev"
    );
    let out = wait_all(&mut eng);
    assert_eq!(out.len(), 8);
    assert!(out.iter().all(|c| c.result.is_ok()));
    for i in 0..8u64 {
        assert!(read_back(&v, (i * 37 % 64) * 4096)
            .iter()
            .all(|&b| b == 0x60 + i as u8));
    }
    eng.submit(99, Request::Flush).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    drop(eng);
    drop(v);
    drop(disk);
    let disk = reopen(t.path());
    for i in 0..8u64 {
        assert!(read_back(&disk.now(), (i * 37 % 64) * 4096)
            .iter()
            .all(|&b| b == 0x60 + i as u8));
    }
}

#[test]
fn a_failed_writev_fails_every_merged_write_and_shows_none() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let mut eng = IoEngine::new(v.clone(), 32).unwrap();
    eng.submit(1, write(0, 0x71, 4096)).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    // A read-only descriptor in place of the data file: the writev fails (EBADF).
    let data_fd = v.active_layer().unwrap().files.data.as_raw_fd();
    // SAFETY: dup/dup2 on descriptors this test owns; `data_fd` stays valid throughout.
    let saved = unsafe { libc::dup(data_fd) };
    let ro = std::fs::File::open(t.path().join("disk/strata.json")).unwrap();
    // SAFETY: as above.
    assert!(unsafe { libc::dup2(ro.as_raw_fd(), data_fd) } >= 0);
    eng.plug();
    for i in 0..4u64 {
        eng.submit(10 + i, write(i * 4096, 0x72, 4096)).unwrap();
    }
    eng.unplug().unwrap();
    let out = wait_all(&mut eng);
    // SAFETY: `saved` is our duplicate of the data file; it goes back and closes.
    unsafe {
        assert!(libc::dup2(saved, data_fd) >= 0);
        libc::close(saved);
    }
    assert_eq!(eng.runs_merged, 1);
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|c| c.result.is_err()), "every member failed");
    assert!(
        read_back(&v, 0).iter().all(|&b| b == 0x71),
        "old data stays"
    );
    assert!(read_back(&v, 4096).iter().all(|&b| b == 0));
    assert_eq!(v.writes_in_flight(), 0);
}

#[test]
fn dropping_a_plugged_engine_gives_up_its_unbuilt_writes() {
    let t = tempfile::tempdir().unwrap();
    let mut disk = disk(t.path());
    let v = disk.now();
    let mut eng = IoEngine::new(v.clone(), 32).unwrap();
    eng.plug();
    for i in 0..5u64 {
        eng.submit(i, write(i * 4096, 0x81, 4096)).unwrap();
    }
    assert_eq!(v.writes_in_flight(), 5);
    drop(eng);
    assert_eq!(v.writes_in_flight(), 0);
    disk.checkpoint("after-plugged-drop").unwrap();
}

#[test]
fn a_fua_write_zeroes_without_data_io_completes_durable() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let header = log_len(&v);
    let mut eng = IoEngine::new(v.clone(), 8).unwrap();
    eng.submit(1, write(0, 0x91, 8192)).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    // Whole blocks: zero records only, no data SQE.
    eng.submit(
        2,
        Request::WriteZeroes {
            offset: 0,
            len: 8192,
            fua: true,
        },
    )
    .unwrap();
    let out = wait_all(&mut eng);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    assert_eq!(log_len(&v), header + 4 * crate::format::RECORD_SIZE as u64);
    drop(eng);
    drop(v);
    drop(disk);
    let disk = reopen(t.path());
    assert!(read_back(&disk.now(), 0).iter().all(|&b| b == 0));
}

#[test]
fn a_blocking_flush_on_the_thread_of_a_running_batch_fails_instead_of_hanging() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk(t.path());
    let v = disk.now();
    let mut eng = IoEngine::new(v.clone(), 8).unwrap();
    eng.submit(1, write(0, 0xa1, 4096)).unwrap();
    assert!(wait_all(&mut eng)[0].result.is_ok());
    // The batch starts at submit and holds the log until this thread reaps it.
    eng.submit(2, Request::Flush).unwrap();
    assert!(v.flush().is_err(), "it would wait for itself");
    // Another thread simply waits for the batch.
    let v2 = v.clone();
    let other = std::thread::spawn(move || v2.flush());
    let out = wait_all(&mut eng);
    assert!(out[0].result.is_ok());
    assert!(other.join().unwrap().is_ok());
    assert!(v.flush().is_ok());
}
