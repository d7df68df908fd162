//! Unit tests of one connection over a socket pair and a real journal disk.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use journal::{Disk, OpenOptions};

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    disk: Disk,
    export: Arc<Export>,
}

fn fixture(read_only: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    Disk::create(&path, 4 << 20, None).unwrap();
    let disk = Disk::open(&path, OpenOptions::default()).unwrap();
    let volume = disk.now();
    let export = Arc::new(Export {
        limits: ExportLimits {
            size: volume.size(),
            read_only,
        },
        volume,
        gate: Gate::new(),
        shutdown: Arc::new(EventFd::new().unwrap()),
        serve: ServerLimits::default(),
        budget: MemoryBudget::new(ServerLimits::DEFAULT_MEMORY_BUDGET),
    });
    Fixture {
        _dir: dir,
        disk,
        export,
    }
}

/// Starts serving one end of a socket pair; returns the client end past NBD_OPT_GO.
fn connect(export: &Arc<Export>) -> (UnixStream, std::thread::JoinHandle<Result<()>>) {
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
