//! Live disk checkpoints of a running VM through `strata run --api`: the test guest keeps
//! writing and verifying while checkpoints are taken; it must finish with no error, the tree
//! must hold the checkpoints, and every layer must check clean. Needs /dev/kvm.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn strata() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// Runs `strata ARGS`, returning (exit code, stdout, stderr).
fn run_strata(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(strata())
        .args(args)
        .output()
        .expect("run strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn checkpoints_taken_while_the_guest_writes() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (KVM) and cannot run without it"
    );
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk");
    let api = t.path().join("api.sock");
    let d = disk.to_str().unwrap();
    assert_eq!(run_strata(&["disk", "create", d, "--size", "256M"]).0, 0);
    let child = Command::new(strata())
        .args(["run", "--disk", d, "--api", api.to_str().unwrap()])
        .args([
            "--workload",
            "seed=5,ops=60000,read=30,bs=4k,region=0:32M,qd=16,flush=32",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.exists() {
        assert!(Instant::now() < deadline, "control socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut taken = 0;
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        let name = format!("live{i}");
        let (rc, out, err) = run_strata(&[
            "checkpoint",
            "create",
            "--api",
            api.to_str().unwrap(),
            "--name",
            &name,
        ]);
        if rc != 0 && (err.contains("No such file") || err.contains("connect")) {
            break; // the guest already finished
        }
        assert_eq!(rc, 0, "{out}{err}");
        taken += 1;
    }
    let out = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "guest failed: {console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = console
        .lines()
        .find(|l| l.starts_with("strata-guest: done"))
        .expect("done line");
    assert!(done.contains(" errors=0 "), "{done}");
    assert!(
        taken >= 1,
        "the guest finished before any checkpoint could be taken: {done}"
    );
    let (rc, tree, _) = run_strata(&["disk", "tree", d]);
    assert_eq!(rc, 0);
    for i in 0..taken {
        assert!(tree.contains(&format!("live{i}")), "{tree}");
    }
    let (rc, out, _) = run_strata(&["disk", "check", d]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("clean"), "{out}");
}
