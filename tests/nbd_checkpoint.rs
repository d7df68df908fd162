//! Live checkpoints of a disk served over NBD: qemu-io writes patterns, `strata checkpoint
//! create` takes checkpoints while the server runs, and each exported checkpoint (and Now)
//! must equal a reference raw image that received the same writes.

mod nbd_common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use nbd_common::*;

/// Applies the same qemu-io commands to the served disk and to the reference image.
fn write_both(server: &Server, reference: &Path, cmds: &[&str]) {
    qemu_io_ok(&server.uri(), cmds);
    qemu_io_ok(reference.to_str().unwrap(), cmds);
}

fn compare(image: &Path, reference: &Path) {
    require_tool("qemu-img", "qemu-utils");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(image)
        .arg(reference)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{} differs from {}: {}{}",
        image.display(),
        reference.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn export(disk: &Path, name: Option<&str>, out: &Path) {
    let mut c = strata(&["disk", "export"]);
    c.arg(disk);
    if let Some(n) = name {
        c.arg(n);
    }
    run_ok(c.arg("--output").arg(out));
}

#[test]
fn live_checkpoints_match_reference_images() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "16M");
    let reference = dir.path().join("ref.img");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-f", "raw"])
            .arg(&reference)
            .arg("16M"),
    );
    let server = Server::start(&disk, dir.path(), &[]);
    let api = server.api.to_str().unwrap().to_string();

    write_both(
        &server,
        &reference,
        &[
            "write -P 0xaa 0 64k",
            "write -P 0xbb 1M 128k",
            "write -P 0x01 15M 1M",
        ],
    );
    let out = run_ok(strata(&[
        "checkpoint",
        "create",
        "--api",
        &api,
        "--name",
        "first",
    ]));
    assert!(out.contains("first"), "{out}");
    std::fs::copy(&reference, dir.path().join("ref-first.img")).unwrap();

    // Overwrites (partly overlapping), zeroes, discards, FUA writes and a flush.
    write_both(
        &server,
        &reference,
        &[
            "write -P 0xcc 32k 64k",
            "write -z 1M 64k",
            "discard 1088k 32k",
            "write -f -P 0x5a 8M 512",
            "flush",
        ],
    );
    run_ok(strata(&[
        "checkpoint",
        "create",
        "--api",
        &api,
        "--name",
        "second",
    ]));
    std::fs::copy(&reference, dir.path().join("ref-second.img")).unwrap();

    write_both(
        &server,
        &reference,
        &[
            "write -P 0xdd 0 4k",
            "write -P 0xee 12M 2M",
            "write -z 15M 512k",
        ],
    );

    // A duplicate name is refused and changes nothing.
    run_fails(
        strata(&["checkpoint", "create", "--api", &api, "--name", "first"]),
        "already exists",
    );

    let listed = run_ok(strata(&["checkpoint", "list", "--api", &api, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(v[1]["parent"], "first");
    assert_eq!(v[1]["now_parent"], true);
    let text = run_ok(strata(&["checkpoint", "list", "--api", &api]));
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("second") && l.ends_with("<- Now")),
        "{text}"
    );

    server.stop();
    for (name, refimg) in [
        (Some("first"), "ref-first.img"),
        (Some("second"), "ref-second.img"),
        (None, "ref.img"),
    ] {
        let out = dir.path().join(format!("{}.raw", name.unwrap_or("now")));
        export(&disk, name, &out);
        compare(&out, &dir.path().join(refimg));
    }
}

/// A writer keeps `QD` writes in flight, each to the next block, while a checkpoint is taken.
/// The requests of one connection are admitted in order, so the checkpoint must hold exactly
/// a prefix of the blocks, including every block acknowledged before the checkpoint began.
#[test]
fn live_checkpoint_under_load_is_a_prefix() {
    const QD: usize = 8;
    const BLOCKS: u64 = 8192; // 32 MiB of 4 KiB writes
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "32M");
    let server = Server::start(&disk, dir.path(), &[]);
    let client = Client::connect(&server.sock);
    let mut reader = Client {
        s: client.s.try_clone().unwrap(),
        size: client.size,
        flags: client.flags,
    };
    let mut writer = client;

    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let checkpoint_done = Arc::new(AtomicBool::new(false));
    // Set before the last write is sent, so the reader knows when to stop.
    let last_sent = Arc::new(AtomicBool::new(false));
    let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(QD);
    for _ in 0..QD {
        credit_tx.send(()).unwrap();
    }
    let writer_thread = {
        let (sent, done, last_sent) = (sent.clone(), checkpoint_done.clone(), last_sent.clone());
        std::thread::spawn(move || {
            let mut stop_at = BLOCKS;
            let mut i = 0;
            while i < stop_at {
                if done.load(Ordering::SeqCst) && stop_at == BLOCKS {
                    stop_at = (i + 256).min(BLOCKS);
                }
                credit_rx.recv().unwrap();
                sent.store(i + 1, Ordering::SeqCst);
                if i + 1 == stop_at {
                    last_sent.store(true, Ordering::SeqCst);
                }
                writer.send(NBD_CMD_WRITE, 0, i, i * 4096, 4096, &block_pattern(i));
                i += 1;
            }
            writer
        })
    };
    let reader_thread = {
        let (acked, sent, last_sent) = (acked.clone(), sent.clone(), last_sent.clone());
        std::thread::spawn(move || loop {
            let (errno, cookie, _) = reader.reply(0);
            assert_eq!(errno, 0, "write {cookie} failed");
            let n = acked.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = credit_tx.try_send(());
            if last_sent.load(Ordering::SeqCst) && n == sent.load(Ordering::SeqCst) {
                return n;
            }
        })
    };
    while acked.load(Ordering::SeqCst) < 200 {
        std::thread::yield_now();
    }
    let before = acked.load(Ordering::SeqCst);
    run_ok(strata(&[
        "checkpoint",
        "create",
        "--api",
        server.api.to_str().unwrap(),
        "--name",
        "mid",
    ]));
    let sent_by_return = sent.load(Ordering::SeqCst);
    checkpoint_done.store(true, Ordering::SeqCst);
    let total = reader_thread.join().unwrap();
    let writer = writer_thread.join().unwrap();
    writer.disconnect();
    server.stop();

    let img = dir.path().join("mid.raw");
    export(&disk, Some("mid"), &img);
    let data = std::fs::read(&img).unwrap();
    let mut m = 0u64;
    while m < BLOCKS && data[(m * 4096) as usize..][..4096] == block_pattern(m)[..] {
        m += 1;
    }
    for b in m..BLOCKS {
        assert!(
            data[(b * 4096) as usize..][..4096].iter().all(|&x| x == 0),
            "checkpoint is not a prefix: block {b} written but block {m} is not"
        );
    }
    assert!(
        m >= before,
        "write acknowledged before the checkpoint is missing: {m} < {before}"
    );
    assert!(
        m <= sent_by_return,
        "checkpoint holds writes sent after it returned: {m} > {sent_by_return}"
    );
    assert!(
        m < total,
        "the checkpoint did not split the write stream (m = {m}, total = {total})"
    );

    let now = dir.path().join("now.raw");
    export(&disk, None, &now);
    let data = std::fs::read(&now).unwrap();
    for b in 0..total {
        assert_eq!(
            data[(b * 4096) as usize..][..4096],
            block_pattern(b)[..],
            "Now lost block {b}"
        );
    }
}

fn block_pattern(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(4096);
    while v.len() < 4096 {
        v.extend_from_slice(&(i + 1).to_le_bytes());
    }
    v
}
