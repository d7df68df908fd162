//! The server's limits against clients that hold on to its resources: idle connections,
//! slow handshakes, clients that never read their replies, and TRIM with FUA made durable.
//! Short limits are set by flags; nothing asserts on elapsed time: each test checks that
//! the hostile clients are cut off, memory stays bounded, and a new client gets served.

mod nbd_common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbd_common::*;

/// Tries a qemu-io read until it succeeds (the server frees slots on its own schedule).
fn served_eventually(server: &Server) {
    for _ in 0..240 {
        let out = qemu_io(&server.uri(), &["read 0 4k"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !text.contains("failed") && !text.contains("error") {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("a new client was never served");
}

/// Waits for the server to close a connection the client does not use.
fn closed_by_server(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close an idle connection: {e}"),
    }
}

/// A new 16 MiB disk in `dir`, served with the limit flags `extra`; qemu-io must exist.
fn serve_16m(dir: &Path, extra: &[&str]) -> (PathBuf, Server) {
    require_tool("qemu-io", "qemu-utils");
    let disk = create_disk(dir, "disk", "16M");
    let server = Server::start(&disk, dir, extra);
    (disk, server)
}

#[test]
fn idle_clients_do_not_lock_out_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_16m(dir.path(), &["--max-clients", "4", "--idle-timeout", "1"]);
    // Every slot taken by a client that negotiated and then does nothing.
    let mut idle: Vec<Client> = (0..4).map(|_| Client::connect(&server.sock)).collect();
    served_eventually(&server);
    for c in &mut idle {
        closed_by_server(&mut c.s);
    }
    server.stop();
}

#[test]
fn a_slow_handshake_loses_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_16m(
        dir.path(),
        &["--max-clients", "1", "--handshake-timeout", "1"],
    );
    // One option at a time, each answered quickly, never picking the export: the handshake
    // as a whole runs out long before 256 options.
    let mut s = connect_raw(&server.sock);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut answered = 0;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&0x4242u32.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    loop {
        if s.write_all(&m).is_err() {
            break;
        }
        let mut h = [0u8; 20];
        if s.read_exact(&mut h).is_err() {
            break;
        }
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered < 256, "{answered} options answered");
    served_eventually(&server);
    server.stop();
}

/// Sends 1 MiB reads without ever reading a reply, until the server hangs up.
fn hog(sock: &Path) -> std::thread::JoinHandle<std::io::Error> {
    let mut c = Client::connect(sock);
    std::thread::spawn(move || {
        c.s.set_write_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut batch = Vec::new();
        for i in 0..16u64 {
            batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&NBD_CMD_READ.to_be_bytes());
            batch.extend_from_slice(&i.to_be_bytes());
            batch.extend_from_slice(&((i << 20) % (16 << 20)).to_be_bytes());
            batch.extend_from_slice(&(1u32 << 20).to_be_bytes());
        }
        loop {
            if let Err(e) = c.s.write_all(&batch) {
                return e;
            }
        }
    })
}

#[test]
fn clients_that_do_not_read_keep_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_16m(
        dir.path(),
        &[
            "--memory-budget",
            "64M",
            "--client-buffer",
            "32M",
            "--idle-timeout",
            "2",
        ],
    );
    qemu_io_ok(&server.uri(), &["write -P 0x3c 0 1M"]);
    // Sixteen clients asking for reads they never collect: each would take its whole client
    // budget (512 MiB together) without the server's budget.
    let hogs: Vec<_> = (0..16).map(|_| hog(&server.sock)).collect();
    for h in hogs {
        let err = h.join().unwrap();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "a client that never reads was not disconnected: {err}"
        );
    }
    let peak = peak_rss_kib(server.pid());
    println!("server peak RSS {peak} KiB with 16 clients not reading, 64 MiB budget");
    assert!(
        peak < 256 << 10,
        "server peak RSS {peak} KiB with a 64 MiB budget"
    );
    served_eventually(&server);
    qemu_io_ok(&server.uri(), &["read -P 0x3c 0 1M", "read -P 0 1M 15M"]);
    server.stop();
}

#[test]
fn trim_with_fua_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, server) = serve_16m(dir.path(), &[]);
    let mut c = Client::connect(&server.sock);
    assert_eq!(
        c.call(NBD_CMD_WRITE, NBD_FLAG_FUA, 0, 1 << 20, &[0x77; 1 << 20])
            .0,
        0
    );
    assert_eq!(c.call(NBD_CMD_TRIM, NBD_FLAG_FUA, 0, 1 << 20, &[]).0, 0);
    // A crash right after the acknowledgement: the trim must be on disk.
    server.kill();
    let server = Server::start(&disk, dir.path(), &[]);
    qemu_io_ok(&server.uri(), &["read -P 0 0 1M"]);
    server.stop();
}

#[test]
fn sockets_are_for_the_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "16M");
    let server = Server::start(&disk, dir.path(), &[]);
    for path in [&server.sock, &server.api] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}: mode {:o}", path.display(), mode);
    }
    server.stop();
}

#[test]
fn bad_limit_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = create_disk(dir.path(), "disk", "16M");
    let sock = format!("unix:{}", dir.path().join("s").display());
    for (flag, value, want) in [
        ("--max-clients", "0", "--max-clients"),
        ("--handshake-timeout", "0", "--handshake-timeout"),
        ("--memory-budget", "1M", "--memory-budget"),
        ("--client-buffer", "lots", "--client-buffer"),
    ] {
        let d = disk.to_str().unwrap();
        let (code, _, err) = run_strata(&["disk", "serve", d, "--listen", &sock, flag, value]);
        assert_eq!(code, 1, "{flag} {value}: {err}");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{flag} {value}: {err}"
        );
    }
}
