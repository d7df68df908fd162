//! Whole NBD sessions against the real server code: the input is what a client sends (after
//! one selector byte), over a socket pair to `engine::nbd::connection::serve` on a real disk.
//! The session must end (no hang) without a panic, whatever the client sends.
//!
//! Input: selector (bit 0: serve the read-only checkpoint instead of Now; bit 1: the rest
//! steers a structured session generator instead of being the client's byte stream), then the
//! client's byte stream (client flags, options, requests with their payloads).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use arbitrary::Unstructured;
use engine::nbd::connection::{serve, Export};
use engine::nbd::protocol::*;
use engine::nbd::stream::Stream;
use engine::quiesce::Gate;
use engine::sys::new_eventfd;
use journal::Disk;

use super::Target;
use crate::disk;

pub const TARGET: Target = Target {
    name: "nbd_session",
    about: "NBD handshake and transmission phase of the real server, one client session per input",
    run,
    seeds,
    keep_last_input: true,
};

const SIZE: u64 = 4 << 20;

/// Now (read-write) and checkpoint `c` (read-only) of one disk, shared by every input.
fn exports() -> &'static [Arc<Export>; 2] {
    static E: OnceLock<[Arc<Export>; 2]> = OnceLock::new();
    E.get_or_init(|| {
        let dir = disk::scratch_root().join("nbd");
        Disk::create(&dir, SIZE, None).expect("nbd disk");
        let mut d = Disk::open(&dir, disk::opts(false)).expect("nbd disk open");
        d.now().write_at(&[0x5a; 8192], 4096, false).expect("write");
        d.checkpoint("c").expect("checkpoint");
        let rw = d.now();
        let ro = d.checkpoint_view("c").expect("view");
        // The disk outlives every export (the process ends with it).
        Box::leak(Box::new(d));
        let shutdown = Arc::new(new_eventfd().expect("eventfd"));
        let export = |volume: Arc<journal::Volume>, read_only| {
            Arc::new(Export {
                limits: ExportLimits {
                    size: volume.size(),
                    read_only: read_only || volume.read_only(),
                },
                volume,
                gate: Gate::new(),
                shutdown: shutdown.clone(),
                serve: engine::nbd::connection::ServerLimits::default(),
                budget: engine::nbd::budget::MemoryBudget::new(256 << 20),
            })
        };
        [export(rw, false), export(ro, true)]
    })
}

/// A client session decoded from `u`: options and requests with consistent lengths most of
/// the time, hostile values (lengths, counts, offsets, flags, kinds) the rest of it.
fn structured(u: &mut Unstructured) -> Vec<u8> {
    let mut v = Vec::new();
    let flags = match u.int_in_range(0..=7u8).unwrap_or(0) {
        0 => u.arbitrary().unwrap_or(0),
        1 => FLAG_C_FIXED_NEWSTYLE,
        2 => 0,
        _ => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
    };
    v.extend_from_slice(&flags.to_be_bytes());
    for _ in 0..u.int_in_range(1..=6u8).unwrap_or(1) {
        let option = *u
            .choose(&[
                OPT_GO,
                OPT_INFO,
                OPT_LIST,
                OPT_ABORT,
                OPT_EXPORT_NAME,
                8,
                10,
                u32::MAX,
            ])
            .unwrap_or(&OPT_GO);
        let mut data = Vec::new();
        if matches!(option, OPT_GO | OPT_INFO) {
            let name: Vec<u8> = if u.ratio(3, 4).unwrap_or(true) {
                Vec::new()
            } else {
                (0..u.int_in_range(0..=8u8).unwrap_or(0))
                    .map(|_| b'x')
                    .collect()
            };
            let infos: Vec<u16> = (0..u.int_in_range(0..=8u8).unwrap_or(0))
                .map(|_| *u.choose(&[0, 1, 2, 3, 0xffff]).unwrap_or(&0))
                .collect();
            let name_len = if u.ratio(7, 8).unwrap_or(true) {
                name.len() as u32
            } else {
                u.arbitrary().unwrap_or(0)
            };
            let count = if u.ratio(7, 8).unwrap_or(true) {
                infos.len() as u16
            } else {
                u.arbitrary().unwrap_or(0)
            };
            data.extend_from_slice(&name_len.to_be_bytes());
            data.extend_from_slice(&name);
            data.extend_from_slice(&count.to_be_bytes());
            for i in infos {
                data.extend_from_slice(&i.to_be_bytes());
            }
        } else if u.ratio(1, 4).unwrap_or(false) {
            data.extend((0..u.int_in_range(0..=32u8).unwrap_or(0)).map(|i| i ^ 0x5a));
        }
        let len = match u.int_in_range(0..=15u8).unwrap_or(0) {
            0 => u.arbitrary().unwrap_or(0),
            1 => MAX_OPTION_LEN + 1,
            _ => data.len() as u32,
        };
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&data);
        // The handshake usually ends here; what follows is the transmission phase.
        if matches!(option, OPT_GO | OPT_EXPORT_NAME) && u.ratio(7, 8).unwrap_or(true) {
            break;
        }
    }
    let kinds = [
        CMD_READ,
        CMD_WRITE,
        CMD_DISC,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_WRITE_ZEROES,
        5,
        7,
        u16::MAX,
    ];
    for i in 0..u.int_in_range(0..=48u8).unwrap_or(0) {
        let kind = *u.choose(&kinds).unwrap_or(&CMD_READ);
        let flags = *u
            .choose(&[0, 0, 0, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, 3, 4, 0xffff])
            .unwrap_or(&0);
        let offset = match u.int_in_range(0..=9u8).unwrap_or(0) {
            0 => u.arbitrary().unwrap_or(0),
            1 => SIZE - u64::from(u.int_in_range(0..=8192u16).unwrap_or(0)),
            2 => SIZE,
            3 => u64::MAX - u64::from(u.int_in_range(0..=4096u16).unwrap_or(0)),
            4 => u64::from(u.int_in_range(0..=u16::MAX).unwrap_or(0)),
            _ => u64::from(u.int_in_range(0..=1023u16).unwrap_or(0)) * 4096,
        };
        let len = match u.int_in_range(0..=11u8).unwrap_or(0) {
            0 => u.arbitrary().unwrap_or(0),
            1 => 0,
            2 => 1,
            3 => 511,
            4 => MAX_PAYLOAD,
            5 => MAX_PAYLOAD + 1,
            6 => u32::MAX,
            7 => 65536,
            _ => 512 * u32::from(u.int_in_range(1..=16u8).unwrap_or(1)),
        };
        let cookie = if u.ratio(1, 8).unwrap_or(false) {
            0
        } else {
            u64::from(i)
        };
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        v.extend_from_slice(&h.encode());
        if kind == CMD_WRITE {
            // The payload as announced when it is small, cut short now and then.
            let n = (len as usize).min(1 << 20);
            let n = if u.ratio(1, 8).unwrap_or(false) {
                n / 2
            } else {
                n
            };
            v.extend((0..n).map(|k| (k as u8) ^ i));
        }
    }
    v
}

fn run(input: &[u8]) {
    let (&sel, rest) = input.split_first().unwrap_or((&0, &[]));
    let export = exports()[usize::from(sel & 1)].clone();
    let decoded;
    let stream = if sel & 2 != 0 {
        decoded = structured(&mut Unstructured::new(rest));
        &decoded[..]
    } else {
        rest
    };
    let (server_end, mut client) = UnixStream::pair().expect("socketpair");
    let server = std::thread::spawn(move || {
        let _ = serve(Stream::Unix(server_end), &export);
    });
    let mut writer_end = client.try_clone().expect("clone");
    let data = stream.to_vec();
    let writer = std::thread::spawn(move || {
        // The server may hang up early: a write error only ends the input.
        let _ = writer_end.write_all(&data);
        let _ = writer_end.shutdown(Shutdown::Write);
    });
    // Drain replies until the server closes its end.
    let mut buf = vec![0u8; 64 << 10];
    while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    drop(client);
    let w = writer.join();
    if let Err(p) = server.join() {
        std::panic::resume_unwind(p);
    }
    if let Err(p) = w {
        std::panic::resume_unwind(p);
    }
}

fn option(v: &mut Vec<u8>, option: u32, data: &[u8]) {
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

fn go_payload(infos: &[u16]) -> Vec<u8> {
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn request(v: &mut Vec<u8>, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let h = RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
    };
    v.extend_from_slice(&h.encode());
    if kind == CMD_WRITE {
        v.extend((0..len).map(|i| (i as u8) ^ (cookie as u8)));
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Handshake variants.
    let mut go = vec![0u8];
    go.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    option(&mut go, OPT_LIST, &[]);
    option(
        &mut go,
        OPT_INFO,
        &go_payload(&[INFO_BLOCK_SIZE, INFO_NAME]),
    );
    option(&mut go, 99, b"unknown");
    option(&mut go, OPT_GO, &go_payload(&[INFO_NAME]));
    let mut export_name = vec![1u8];
    export_name.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    option(&mut export_name, OPT_EXPORT_NAME, b"");
    let mut abort = vec![0u8];
    abort.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    option(&mut abort, OPT_GO, &go_payload(&[]));
    out.push(abort.clone());
    option(&mut abort, OPT_ABORT, &[]);
    out.push(abort);

    // Transmission: every command, aligned and not, in range and not, then a clean exit.
    let mut t = go.clone();
    for (i, (kind, flags, off, len)) in [
        (CMD_WRITE, 0, 0, 4096),
        (CMD_READ, 0, 0, 8192),
        (CMD_WRITE, CMD_FLAG_FUA, 4096 + 512, 1024),
        (CMD_READ, 0, 513, 100),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_TRIM, 0, 8192, 8192),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512),
        (CMD_WRITE_ZEROES, CMD_FLAG_FUA, SIZE - 4096, 4096),
        (CMD_READ, 0, SIZE - 512, 1024),
        (CMD_WRITE, 0, SIZE, 512),
        (CMD_READ, 0x40, 0, 512),
        (77, 0, 0, 0),
        (CMD_DISC, 0, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        request(&mut t, kind, flags, i as u64, off, len);
    }
    out.push(t.clone());
    let mut ro = t;
    ro[0] = 1;
    out.push(ro);
    // Many small writes in flight, then reads of them, no disconnect (EOF instead).
    let mut burst = export_name;
    for i in 0..48u64 {
        request(&mut burst, CMD_WRITE, 0, i, i * 4096, 512);
    }
    for i in 0..48u64 {
        request(&mut burst, CMD_READ, 0, 100 + i, i * 4096, 4096);
    }
    out.push(burst);
    out.push(go);
    // Structured sessions (selector bit 1): the bytes steer the generator.
    let mut rng = crate::rng::Rng::new(3);
    for k in 0..8u8 {
        let mut s = vec![2 | (k & 1)];
        s.extend((0..64 + 32 * usize::from(k)).map(|_| rng.next() as u8));
        out.push(s);
    }
    out
}
