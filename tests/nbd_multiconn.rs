//! Several connections to one export (NBD_FLAG_CAN_MULTI_CONN): a write acknowledged on one
//! connection is seen by reads on another, and overlapping writes racing from two connections
//! all complete (one waits for the other's range lock) without tearing a block.

mod nbd_common;

use nbd_common::*;

#[test]
fn connections_share_one_view() {
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "4M");
    let server = Server::start(&disk, dir.path(), &[]);
    let mut a = Client::connect(&server.sock);
    let mut b = Client::connect(&server.sock);
    assert_ne!(a.flags & (1 << 8), 0, "NBD_FLAG_CAN_MULTI_CONN");
    assert_eq!(a.call(NBD_CMD_WRITE, 0, 8192, 4096, &[0x61; 4096]).0, 0);
    let (errno, data) = b.call(NBD_CMD_READ, 0, 8192, 4096, &[]);
    assert_eq!(errno, 0);
    assert!(
        data.iter().all(|&x| x == 0x61),
        "connection B does not see A's acknowledged write"
    );
    // A flush on B covers A's completed writes (the flush is volume-wide).
    assert_eq!(b.call(NBD_CMD_FLUSH, 0, 0, 0, &[]).0, 0);

    // Two connections pipeline overlapping writes over the same 64 blocks.
    const ROUNDS: u64 = 300;
    let run = |mut c: Client, fill: u8| {
        std::thread::spawn(move || {
            let mut reader = Client {
                s: c.s.try_clone().unwrap(),
                size: c.size,
                flags: c.flags,
            };
            let replies = std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let (errno, _, _) = reader.reply(0);
                    assert_eq!(errno, 0);
                }
            });
            for i in 0..ROUNDS {
                // 16 KiB writes at 4 KiB steps: every write overlaps its neighbours.
                let off = (i % 61) * 4096;
                c.send(NBD_CMD_WRITE, 0, i, off, 16384, &[fill; 16384]);
            }
            replies.join().unwrap();
            c
        })
    };
    let ta = run(a, 0xa1);
    let tb = run(b, 0xb2);
    let (a, b) = (ta.join().unwrap(), tb.join().unwrap());
    let mut c = Client::connect(&server.sock);
    let (errno, data) = c.call(NBD_CMD_READ, 0, 0, 64 * 4096, &[]);
    assert_eq!(errno, 0);
    for (i, block) in data.chunks(4096).enumerate() {
        let first = block[0];
        assert!(first == 0xa1 || first == 0xb2, "block {i} holds {first:#x}");
        assert!(block.iter().all(|&x| x == first), "block {i} is torn");
    }
    for cl in [a, b, c] {
        cl.disconnect();
    }
    server.stop();
}
