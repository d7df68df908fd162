//! SIGTERM and SIGINT stop `strata run` cleanly, with or without a control socket: the guest is
//! stopped, the disk flushed and closed, the socket removed, and the exit status says which
//! signal (128 + N). Needs /dev/kvm.

mod vm_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_common::*;

fn stop_with(signal: libc::c_int, api: bool) {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk");
    let sock = t.path().join("api.sock");
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--disk",
        s(&disk),
        "--workload",
        "seed=2,ops=100000000,qd=8,region=0:16M",
    ]);
    if api {
        cmd.args(["--api", s(&sock)]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Running: the disk exists (and the socket answers, with --api).
    while !(disk.join("strata.json").exists()
        && (!api || std::os::unix::net::UnixStream::connect(&sock).is_ok()))
    {
        assert!(Instant::now() < deadline, "the VM never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(128 + signal),
        "signal {signal} (api {api}) did not stop the VM cleanly: {:?}\n{err}",
        out.status
    );
    assert!(err.contains("stopped by signal"), "{err}");
    assert!(!sock.exists(), "the control socket was left behind");
    let check = ok(&["disk", "check", s(&disk)]);
    assert!(check.contains("clean"), "{check}");
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly_with_and_without_a_control_socket() {
    require_kvm();
    let _one = one_vm_test_at_a_time();
    for api in [true, false] {
        stop_with(libc::SIGTERM, api);
        stop_with(libc::SIGINT, api);
    }
}
