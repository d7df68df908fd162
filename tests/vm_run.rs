//! `strata run` with the built-in test guest (needs /dev/kvm): the workload goes through
//! virtio-mmio and virtio-blk into the journal, and the exit status is the guest's.

mod vm_common;

use std::path::Path;
use std::process::Command;

use vm_common::{require_kvm, strata};
use vmm::test_guest::{ledger, Summary};

/// The guest's final `done` line, parsed by the VMM's own parser (every key present once).
fn done_line(stdout: &str) -> Summary {
    Summary::from_console(stdout).unwrap_or_else(|e| panic!("{e} in:\n{stdout}"))
}

#[test]
fn test_guest_workload_passes_on_a_fresh_disk() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let out = strata(&[
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--workload",
        "seed=7,ops=400,read=50,bs=4k,qd=8,flush=50",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("strata-guest: start "), "{stdout}");
    let done = done_line(&stdout);
    assert_eq!(done.errors, 0, "{stdout}");
    assert_eq!(done.ops, 400);
    assert_eq!(done.reads + done.writes, 400);
    assert!(done.flushes > 0);
    // No dirty region: nothing rewritten, the digest of nothing; the ledger has a digest.
    assert_eq!(
        (done.dirtied, done.mem),
        (0, ledger::FNV_OFFSET),
        "{stdout}"
    );
    assert_ne!(done.ledger, ledger::FNV_OFFSET);
    assert!(Path::new(&disk).is_dir(), "the disk directory was created");
    // The disk persists: a second run on it works too (and sees the data it left).
    let again = strata(&[
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--workload",
        "seed=8,ops=50",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn console_goes_to_a_file_and_default_disk_is_temporary() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let out = strata(&[
        "run",
        "--console",
        console.to_str().unwrap(),
        "--workload",
        "ops=20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "console output must not reach stdout"
    );
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(done_line(&text).errors, 0, "{text}");
}

#[test]
fn bad_arguments_fail_before_booting() {
    let out = strata(&["run", "--workload", "ops=banana"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workload"));
    let out = strata(&["run", "--initrd", "/nonexistent"]);
    assert!(!out.status.success());
    let out = strata(&["run", "--vcpus", "2", "--workload", "ops=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one vCPU"));
    let out = strata(&["run", "--workload", "dirty=6k"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dirty: bad value"));
}

#[test]
fn a_dirty_region_that_does_not_fit_is_refused_before_booting() {
    require_kvm();
    let out = strata(&["run", "--memory", "128M", "--workload", "ops=10,dirty=64m"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("dirty=67108864 does not fit in 134217728 bytes"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "the guest must not have run");
    // The same with room to spare runs and rewrites its region.
    let out = strata(&["run", "--memory", "128M", "--workload", "ops=10,dirty=60m"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let done = done_line(&stdout);
    assert_eq!(done.errors, 0);
    // 10 reads/writes, one page each (dirty_rate=1), after the fill of generation 0.
    assert_eq!(done.dirtied, 10, "{stdout}");
    assert_ne!(done.mem, ledger::FNV_OFFSET);
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "run",
            "--disk",
            disk.to_str().unwrap(),
            "--workload",
            "ops=1000000,qd=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning strata");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // Wait until the guest runs its workload, then ask the VMM to stop.
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("strata-guest: start"));
    assert!(started, "the guest never started");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: `pid` is our own child process, still running (we hold its stdout open).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by signal 15"));
    // The disk was closed properly and opens again.
    let again = strata(&[
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--workload",
        "ops=10",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
