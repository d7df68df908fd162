//! Hostile and broken clients: garbage handshakes, huge lengths, unknown commands, bad
//! magic, hang-ups in the middle of a request, and a client that never reads its replies.
//! Each gets an NBD error or a closed connection; the server stays up, bounded in memory,
//! and serves a well-behaved client afterwards.

mod nbd_common;

use std::io::{Read, Write};
use std::path::Path;

use nbd_common::*;

const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const SIZE: u64 = 16 << 20;

/// Reads until the server closes the connection; returns what it sent.
fn until_closed(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => rest,
        Err(e) => panic!("the server neither answered nor closed: {e}"),
    }
}

fn hostile_handshakes(sock: &Path) {
    // Unknown client flags.
    let mut s = connect_raw(sock);
    s.write_all(&[0xff; 4]).unwrap();
    assert!(until_closed(&mut s).is_empty());
    // Random bytes instead of an option.
    let mut s = connect_raw(sock);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(until_closed(&mut s).is_empty());
    // An option claiming 4 GiB of data.
    let mut s = connect_raw(sock);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&m).unwrap();
    let (_, kind, _) = read_option_reply(&mut s);
    assert_eq!(kind, (1 << 31) + 9, "NBD_REP_ERR_TOO_BIG");
    assert!(until_closed(&mut s).is_empty());
    // Unknown options are refused, and the handshake goes on.
    let mut s = connect_raw(sock);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut s, 0x4242, b"xyz");
    assert_eq!(read_option_reply(&mut s), (0x4242, (1 << 31) + 1, vec![]));
    send_option(&mut s, 3, &[]); // LIST
    assert_eq!(read_option_reply(&mut s).1, 2);
    assert_eq!(read_option_reply(&mut s).1, 1);
    // Hang up in the middle of an option.
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    // Hang up right after connecting.
    drop(connect_raw(sock));
}

fn hostile_requests(sock: &Path) {
    let mut c = Client::connect(sock);
    assert_eq!(c.size, SIZE);
    // Huge and too-large lengths.
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, u32::MAX, &[]).0, ENOMEM);
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, (32 << 20) + 512, &[]).0, ENOMEM);
    // Unaligned requests are served (byte granularity); out of range is refused.
    assert_eq!(c.call(NBD_CMD_READ, 0, 100, 512, &[]).0, 0);
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, 100, &[]).0, 0);
    assert_eq!(c.call(NBD_CMD_READ, 0, SIZE, 512, &[]).0, EINVAL);
    assert_eq!(c.call(NBD_CMD_READ, 0, u64::MAX - 511, 1024, &[]).0, EINVAL);
    assert_eq!(
        c.call(NBD_CMD_WRITE, 0, SIZE - 512, 4096, &[9; 4096]).0,
        ENOSPC
    );
    assert_eq!(c.call(NBD_CMD_WRITE, 0, 0, 100, &[9; 100]).0, 0);
    assert_eq!(c.call(NBD_CMD_TRIM, 0, SIZE, 4096, &[]).0, ENOSPC);
    assert_eq!(c.call(NBD_CMD_WRITE_ZEROES, 0, 1, 4096, &[]).0, 0);
    // Unknown commands and flags.
    assert_eq!(c.call(0x55, 0, 0, 4096, &[]).0, EINVAL);
    assert_eq!(c.call(NBD_CMD_READ, 0x8000, 0, 4096, &[]).0, EINVAL);
    assert_eq!(c.call(NBD_CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    // Still in step: the refused write payloads were consumed, not parsed as requests.
    let (errno, data) = c.call(NBD_CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(errno, 0);
    assert_eq!(data[0], 9, "the 100-byte write kept its first byte");
    assert!(data[1..].iter().all(|&b| b == 0), "zeroed from byte 1 on");
    assert_eq!(c.call(NBD_CMD_WRITE_ZEROES, 0, 0, 4096, &[]).0, 0);
    // A refused write of 40 MiB: its payload is discarded without being buffered.
    let big = vec![7u8; 40 << 20];
    assert_eq!(
        c.call(NBD_CMD_WRITE, 0, 0, big.len() as u32, &big).0,
        ENOMEM
    );
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, 512, &[]).0, 0);
    // Pipelined requests then DISC: every reply comes before the close.
    c.send(NBD_CMD_WRITE, 0, 1, 1 << 20, 4096, &[0xab; 4096]);
    c.send(NBD_CMD_READ, 0, 2, 1 << 20, 4096, &[]);
    c.send(NBD_CMD_DISC, 0, 3, 0, 0, &[]);
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[4..]), 0);
        let cookie = be64(&h[8..]);
        if cookie == 2 {
            let mut d = vec![0u8; 4096];
            c.s.read_exact(&mut d).unwrap();
            // The read may run before or after the write (no ordering between in-flight
            // requests), but it never sees a mix.
            assert!(
                d.iter().all(|&b| b == 0xab) || d.iter().all(|&b| b == 0),
                "torn read"
            );
        }
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, [1, 2]);
    assert!(until_closed(&mut c.s).is_empty());

    // Bad request magic: the connection is closed.
    let mut c = Client::connect(sock);
    c.s.write_all(&[0x11; 28]).unwrap();
    assert!(until_closed(&mut c.s).is_empty());
    // A write that claims 2 GiB and hangs up after a few bytes.
    let mut c = Client::connect(sock);
    c.send(NBD_CMD_WRITE, 0, 1, 0, 0x8000_0000, &[1; 1000]);
    drop(c);
    // A valid write cut off in the middle of its payload, and a half header.
    let mut c = Client::connect(sock);
    c.send(NBD_CMD_WRITE, 0, 1, 0, 1 << 20, &[2; 300_000]);
    drop(c);
    let mut c = Client::connect(sock);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
}

/// A client that pipelines 512 MiB of reads before reading any reply: the server must stop
/// reading instead of buffering everything, and still answer every request.
fn slow_reader(sock: &Path, pid: i32) {
    const N: u64 = 4096;
    const LEN: u32 = 128 << 10;
    let c = Client::connect(sock);
    let mut writer = Client {
        s: c.s.try_clone().unwrap(),
        size: c.size,
        flags: c.flags,
    };
    let mut reader = c;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            writer.send(NBD_CMD_READ, 0, i, (i * u64::from(LEN)) % SIZE, LEN, &[]);
        }
        writer
    });
    // Give the server time to fill its buffers and stop (no timing is asserted).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let peak = peak_rss_kib(pid);
    assert!(
        peak < 400 << 10,
        "server peak RSS {peak} KiB while a client does not read"
    );
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let (errno, cookie, data) = reader.reply(LEN as usize);
        assert_eq!(errno, 0);
        assert_eq!(data.len(), LEN as usize);
        assert!(
            !std::mem::replace(&mut seen[cookie as usize], true),
            "duplicate reply {cookie}"
        );
    }
    sender.join().unwrap().disconnect();
    let peak = peak_rss_kib(pid);
    println!("server peak RSS {peak} KiB after 512 MiB of pipelined reads");
    assert!(
        peak < 400 << 10,
        "server peak RSS {peak} KiB after 512 MiB of pipelined reads"
    );
}

#[test]
fn hostile_clients_do_not_hurt_the_server() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "16M");
    let mut server = Server::start(&disk, dir.path(), &[]);
    hostile_handshakes(&server.sock);
    assert!(server.alive());
    hostile_requests(&server.sock);
    assert!(server.alive());
    slow_reader(&server.sock, server.pid());
    assert!(server.alive());
    // A well-behaved client is served normally afterwards.
    qemu_io_ok(
        &server.uri(),
        &[
            "write -P 0xa5 64k 64k",
            "read -P 0xa5 64k 64k",
            "read -P 0 0 64k",
        ],
    );
    server.stop();
}
