//! Serving a checkpoint: it reads as the checkpoint, refuses every kind of write with EPERM,
//! cannot be checkpointed live, and leaves the checkpoint unchanged.

mod nbd_common;

use nbd_common::*;

const EPERM: u32 = 1;

#[test]
fn checkpoint_serving_is_read_only() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "8M");
    let server = Server::start(&disk, dir.path(), &[]);
    qemu_io_ok(
        &server.uri(),
        &["write -P 0x33 0 128k", "write -P 0x44 4M 4k"],
    );
    run_ok(strata(&[
        "checkpoint",
        "create",
        "--api",
        server.api.to_str().unwrap(),
        "--name",
        "base",
    ]));
    qemu_io_ok(&server.uri(), &["write -P 0x55 0 64k"]);
    server.stop();

    let ro_dir = dir.path().join("ro");
    std::fs::create_dir(&ro_dir).unwrap();
    let ro = Server::start(&disk, &ro_dir, &["--checkpoint", "base"]);
    // Reads see the checkpoint, not Now.
    qemu_io_ok_with(
        &["-r"],
        &ro.uri(),
        &[
            "read -P 0x33 0 128k",
            "read -P 0x44 4M 4k",
            "read -P 0 4100k 4k",
        ],
    );

    // qemu-io cannot even open the export for writing.
    let out = qemu_io(&ro.uri(), &["write -P 0x66 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a read-write open of a read-only export succeeded: {text}"
    );
    assert!(
        text.contains("Permission denied") || text.contains("read-only"),
        "{text}"
    );

    // Raw requests get EPERM, and the connection keeps working.
    let mut c = Client::connect(&ro.sock);
    assert_ne!(c.flags & 2, 0, "NBD_FLAG_READ_ONLY not set");
    assert_eq!(c.call(NBD_CMD_WRITE, 0, 0, 4096, &[0x77; 4096]).0, EPERM);
    assert_eq!(
        c.call(NBD_CMD_WRITE, NBD_FLAG_FUA, 0, 512, &[0x77; 512]).0,
        EPERM
    );
    assert_eq!(c.call(NBD_CMD_TRIM, 0, 0, 4096, &[]).0, EPERM);
    assert_eq!(c.call(NBD_CMD_WRITE_ZEROES, 0, 0, 4096, &[]).0, EPERM);
    assert_eq!(
        c.call(NBD_CMD_FLUSH, 0, 0, 0, &[]).0,
        0,
        "flush of a read-only export succeeds"
    );
    let (errno, data) = c.call(NBD_CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(errno, 0);
    assert!(data.iter().all(|&b| b == 0x33));
    c.disconnect();

    // No live checkpoint of a read-only view.
    let api = ro.api.to_str().unwrap();
    run_fails(
        strata(&["checkpoint", "create", "--api", api, "--name", "x"]),
        "read-only",
    );
    let listed = run_ok(strata(&[
        "checkpoint",
        "list",
        "--api",
        ro.api.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    ro.stop();

    // The checkpoint is unchanged and Now kept its own write.
    let out = dir.path().join("base.raw");
    run_ok(
        strata(&["disk", "export"])
            .arg(&disk)
            .arg("base")
            .arg("--output")
            .arg(&out),
    );
    let data = std::fs::read(&out).unwrap();
    assert!(data[..128 << 10].iter().all(|&b| b == 0x33));
    let now = dir.path().join("now.raw");
    run_ok(
        strata(&["disk", "export"])
            .arg(&disk)
            .arg("--output")
            .arg(&now),
    );
    let data = std::fs::read(&now).unwrap();
    assert!(data[..64 << 10].iter().all(|&b| b == 0x55));
    assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 0x33));
}

#[test]
fn unknown_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "1M");
    let mut serve = strata(&["disk", "serve"]);
    serve
        .arg(&disk)
        .args(["--checkpoint", "missing", "--listen"])
        .arg(format!("unix:{}", dir.path().join("s").display()));
    let out = run_fails(serve, "missing");
    assert!(out.stdout.is_empty(), "no ready line on failure");
    assert!(!dir.path().join("s").exists());
}

#[test]
fn served_disk_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "1M");
    let server = Server::start(&disk, dir.path(), &[]);
    let other = dir.path().join("other.sock");
    // A second server does not open a served disk.
    let mut serve = strata(&["disk", "serve"]);
    serve
        .arg(&disk)
        .arg("--listen")
        .arg(format!("unix:{}", other.display()));
    run_fails(serve, "locked");
    assert!(!other.exists());
    // A listening socket of a running server is not taken over by another disk's server.
    let disk2 = create_disk(dir.path(), "disk2", "1M");
    let mut serve = strata(&["disk", "serve"]);
    serve
        .arg(&disk2)
        .arg("--listen")
        .arg(format!("unix:{}", server.sock.display()));
    run_fails(serve, "listening");
    assert!(server.alive_after_clients());
    server.stop();
    assert!(
        !dir.path().join("nbd.sock").exists(),
        "socket removed on exit"
    );
    assert!(
        !dir.path().join("api.sock").exists(),
        "control socket removed on exit"
    );
}
