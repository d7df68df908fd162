//! What clients are told about an export: `nbdinfo` must see the size, flags and block size
//! constraints, for Now (read-write) and for a checkpoint (read-only), over unix and TCP.

mod nbd_common;

use std::process::Command;

use nbd_common::*;

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    require_tool("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new("nbdinfo").args(["--json", uri]));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{out}"));
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v}");
    exports[0].clone()
}

fn assert_block_sizes(e: &serde_json::Value) {
    assert_eq!(e["block_size_minimum"], 1, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{e}");
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "24M");
    let server = Server::start(&disk, dir.path(), &[]);
    let e = nbdinfo_json(&server.uri());
    assert_eq!(e["export-size"], 24u64 << 20, "{e}");
    assert_eq!(e["export-name"], "");
    for (flag, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_df", false),
        ("can_cache", false),
        ("can_fast_zero", false),
    ] {
        assert_eq!(e[flag], want, "{flag} in {e}");
    }
    assert_block_sizes(&e);
    // The export list has the one default export.
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["exports"].as_array().map(Vec::len), Some(1), "{v}");
    // Asking for an export that does not exist fails.
    let bad = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///nope?socket={}", server.sock.display()))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(server.alive_after_clients());

    // A checkpoint is served read-only.
    run_ok(strata(&[
        "checkpoint",
        "create",
        "--api",
        server.api.to_str().unwrap(),
        "--name",
        "c1",
    ]));
    server.stop();
    let ro_dir = dir.path().join("ro");
    std::fs::create_dir(&ro_dir).unwrap();
    let ro = Server::start(&disk, &ro_dir, &["--checkpoint", "c1"]);
    let e = nbdinfo_json(&ro.uri());
    assert_eq!(e["export-size"], 24u64 << 20);
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["can_trim"], false, "{e}");
    assert_eq!(e["can_zero"], false, "{e}");
    assert_block_sizes(&e);
    ro.stop_with(libc::SIGINT);
}

#[test]
fn serves_over_tcp() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "8M");
    let server = Server::start_listen(&disk, "tcp:127.0.0.1:0", &[]);
    let addr = server
        .ready_line
        .rsplit_once(" on tcp:")
        .expect("tcp address in the ready line")
        .1
        .to_string();
    assert!(
        !addr.ends_with(":0"),
        "the ready line shows the bound port: {addr}"
    );
    let e = nbdinfo_json(&format!("nbd://{addr}"));
    assert_eq!(e["export-size"], 8u64 << 20, "{e}");
    qemu_io_ok(
        &format!("nbd://{addr}"),
        &[
            "write -P 0x42 4k 8k",
            "read -P 0x42 4k 8k",
            "read -P 0 0 4k",
        ],
    );
    server.stop();
}
