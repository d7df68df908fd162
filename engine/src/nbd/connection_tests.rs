//! Unit tests of one connection over a socket pair and a real journal disk.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use journal::{Disk, OpenOptions};

use super::*;
use crate::sys::Flag;

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) disk: Disk,
    pub(super) export: Arc<Export>,
}

fn fixture(read_only: bool) -> Fixture {
    fixture_with(read_only, ServerLimits::default())
}

fn fixture_with(read_only: bool, serve: ServerLimits) -> Fixture {
    fixture_sized(4 << 20, read_only, serve)
}

pub(super) fn fixture_sized(size: u64, read_only: bool, serve: ServerLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    Disk::create(&path, size, None).unwrap();
    let disk = Disk::open(&path, OpenOptions::default()).unwrap();
    let volume = disk.now();
    let export = Arc::new(Export {
        limits: ExportLimits {
            size: volume.size(),
            read_only,
        },
        volume,
        gate: Gate::new(),
        shutdown: Arc::new(crate::sys::new_eventfd().unwrap()),
        serve,
        budget: MemoryBudget::new(serve.memory_budget),
    });
    Fixture {
        _dir: dir,
        disk,
        export,
    }
}

/// Starts serving one end of a socket pair; returns the client end past NBD_OPT_GO.
pub(super) fn connect(export: &Arc<Export>) -> (UnixStream, std::thread::JoinHandle<Result<()>>) {
    let (server, mut client) = UnixStream::pair().unwrap();
    let export = export.clone();
    let t = std::thread::spawn(move || serve(Stream::Unix(server), &export));
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut greet = [0u8; 18];
    client.read_exact(&mut greet).unwrap();
    client.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0; 6]);
    client.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        client.read_exact(&mut h).unwrap();
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        client.read_exact(&mut d).unwrap();
        if u32::from_be_bytes(h[12..16].try_into().unwrap()) == REP_ACK {
            return (client, t);
        }
    }
}

fn send(c: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let h = RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    };
    c.write_all(&h.encode()).unwrap();
    c.write_all(payload).unwrap();
}

/// Reads a reply: (errno, cookie, data of `len` bytes when successful).
fn reply(c: &mut UnixStream, len: usize) -> (u32, u64, Vec<u8>) {
    let mut h = [0u8; REPLY_LEN];
    c.read_exact(&mut h).unwrap();
    assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
    let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let mut data = vec![0u8; if errno == 0 { len } else { 0 }];
    c.read_exact(&mut data).unwrap();
    (
        errno,
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        data,
    )
}

#[test]
fn pipelined_requests_then_disconnect() {
    let f = fixture(false);
    let (mut c, t) = connect(&f.export);
    for i in 0..40u64 {
        send(&mut c, CMD_WRITE, i, i * 4096, 4096, &[i as u8 + 1; 4096]);
    }
    send(&mut c, CMD_FLUSH, 100, 0, 0, &[]);
    let mut cookies = Vec::new();
    for _ in 0..41 {
        let (errno, cookie, _) = reply(&mut c, 0);
        assert_eq!(errno, 0, "request {cookie} failed");
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (0..40).chain([100]).collect::<Vec<_>>());
    for i in 0..40u64 {
        send(&mut c, CMD_READ, i, i * 4096, 4096, &[]);
    }
    for _ in 0..40 {
        let (errno, k, data) = reply(&mut c, 4096);
        assert_eq!(errno, 0);
        assert!(
            data.iter().all(|&b| b == k as u8 + 1),
            "read {k} returned the wrong data"
        );
    }
    send(&mut c, CMD_DISC, 0, 0, 0, &[]);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    t.join().unwrap().unwrap();
    assert_eq!(f.export.gate.in_flight(), 0);
}

#[test]
fn paused_gate_holds_new_writes_until_resume() {
    let f = fixture(false);
    let (mut c, t) = connect(&f.export);
    let guard = f.export.gate.pause(Duration::from_secs(5)).unwrap();
    send(&mut c, CMD_WRITE, 7, 0, 4096, &[0x5a; 4096]);
    // Not admitted while paused: no reply, and the journal sees no write.
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut h = [0u8; 1];
    let err = c.read(&mut h).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    let mut buf = vec![0u8; 4096];
    f.disk.now().read_at(&mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a write ran while the gate was closed"
    );
    drop(guard);
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(reply(&mut c, 0).0, 0);
    f.disk.now().read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    drop(c);
    t.join().unwrap().unwrap();
}

#[test]
fn errors_and_read_only() {
    let f = fixture(true);
    let (mut c, t) = connect(&f.export);
    send(&mut c, CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(reply(&mut c, 0).0, EPERM);
    send(&mut c, CMD_READ, 2, 4 << 20, 512, &[]);
    assert_eq!(reply(&mut c, 512).0, EINVAL);
    send(&mut c, CMD_READ, 3, 0, 0, &[]);
    assert_eq!(reply(&mut c, 0), (0, 3, vec![]), "zero-length read");
    send(&mut c, CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(reply(&mut c, 0).0, 0);
    // Shutdown ends the connection.
    f.export.shutdown.notify();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn an_engine_failure_releases_gate_admissions() {
    let f = fixture(false);
    f.disk.now().write_at(&[7; 4096], 0, false).unwrap();
    let (server, mut client) = UnixStream::pair().unwrap();
    let stream = Stream::Unix(server);
    stream.set_nonblocking().unwrap();
    let tr = Transmission::new(stream, &f.export).unwrap();
    // Every io_uring_enter of this connection's engine fails from now on: the read is queued
    // but never submitted, and the transmission loop returns early with it admitted.
    let null = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: replaces the ring's descriptor number with /dev/null; the ring lives on
    // through its mappings until the engine is dropped.
    assert!(unsafe { libc::dup2(null.as_raw_fd(), tr.exec.ring_fd().unwrap()) } >= 0);
    send(&mut client, CMD_READ, 1, 0, 4096, &[]);
    assert!(tr.run().is_err());
    assert_eq!(f.export.gate.in_flight(), 0, "an admission leaked");
    // A live checkpoint can still drain.
    drop(f.export.gate.pause(Duration::from_secs(5)).unwrap());
}

fn limits(idle: Duration) -> ServerLimits {
    ServerLimits {
        idle_timeout: Some(idle),
        ..ServerLimits::default()
    }
}

#[test]
fn idle_and_stuck_clients_are_disconnected() {
    let f = fixture_with(false, limits(Duration::from_millis(100)));
    // Idle after the handshake.
    let (mut c, t) = connect(&f.export);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    t.join().unwrap().unwrap();
    // Stopped in the middle of a write's payload.
    let (mut c, t) = connect(&f.export);
    send(&mut c, CMD_WRITE, 1, 0, 8192, &[1; 100]);
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    t.join().unwrap().unwrap();
    assert_eq!(
        f.export.budget.used(),
        0,
        "the half write's buffer was given back"
    );
    // Never reading its replies: the server stops reading, then drops it, so the client's
    // writes end in an error instead of blocking forever.
    let (mut c, t) = connect(&f.export);
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = Vec::new();
    for i in 0..64u64 {
        let h = RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: i,
            offset: 0,
            len: 1 << 20,
        };
        req.extend_from_slice(&h.encode());
    }
    let err = loop {
        if let Err(e) = c.write_all(&req) {
            break e;
        }
    };
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    t.join().unwrap().unwrap();
    assert_eq!(f.export.budget.used(), 0);
    assert_eq!(f.export.gate.in_flight(), 0);
}

#[test]
fn a_busy_client_is_not_idle() {
    // Requests keep arriving, each within the idle timeout: the client is served throughout.
    let f = fixture_with(false, limits(Duration::from_secs(2)));
    let (mut c, t) = connect(&f.export);
    for i in 0..10u64 {
        send(&mut c, CMD_WRITE, i, i * 4096, 4096, &[3; 4096]);
        assert_eq!(reply(&mut c, 0), (0, i, vec![]));
        std::thread::sleep(Duration::from_millis(100));
    }
    send(&mut c, CMD_DISC, 0, 0, 0, &[]);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn clients_share_the_memory_budget() {
    // A 32 MiB budget and 4 MiB per client: three clients that never read their 1 MiB reads
    // together hold at most the budget, and a well-behaved client is served once they go.
    let serve = ServerLimits {
        memory_budget: 32 << 20,
        client_buffer: 4 << 20,
        idle_timeout: Some(Duration::from_millis(500)),
        ..ServerLimits::default()
    };
    let f = fixture_with(false, serve);
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let (mut c, t) = connect(&f.export);
        let export = f.export.clone();
        hogs.push(std::thread::spawn(move || {
            c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut most = 0;
            for i in 0.. {
                let h = RequestHeader {
                    flags: 0,
                    kind: CMD_READ,
                    cookie: i,
                    offset: 0,
                    len: 1 << 20,
                };
                most = most.max(export.budget.used());
                if c.write_all(&h.encode()).is_err() {
                    break;
                }
            }
            t.join().unwrap().unwrap();
            most
        }));
    }
    for h in hogs {
        let most = h.join().unwrap();
        assert!(most <= 32 << 20, "{most} bytes held");
    }
    assert_eq!(f.export.budget.used(), 0);
    let (mut c, t) = connect(&f.export);
    send(&mut c, CMD_READ, 9, 0, 1 << 20, &[]);
    assert_eq!(reply(&mut c, 1 << 20).0, 0);
    drop(c);
    t.join().unwrap().unwrap();
}
