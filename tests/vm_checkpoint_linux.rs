//! A stock Linux kernel on 2 vCPUs, checkpointed a few seconds into its boot through the VM's
//! control socket, then restored in a new process from the VM directory: its console must go on
//! past the lines printed before the checkpoint without booting again (no second `Linux version`
//! banner). Needs /dev/kvm and a kernel in /boot (`apt-get install linux-image-amd64`); guest
//! kernel code is emulated on this project's machines, so this takes a minute or two.

mod vm_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_common::*;

fn stock_kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels.pop().expect(
        "no /boot/vmlinuz-* found: install a stock kernel (apt-get install linux-image-amd64)",
    )
}

fn read(p: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

#[test]
fn a_booting_kernel_resumes_in_a_new_process_without_rebooting() {
    require_kvm();
    let _one = one_vm_test_at_a_time();
    let kernel = stock_kernel();
    let t = tempfile::tempdir().unwrap();
    let vm = t.path().join("linux-vm");
    ok(&[
        "vm",
        "create",
        s(&vm),
        "--memory",
        "256M",
        "--vcpus",
        "2",
        "--disk-size",
        "64M",
        "--kernel",
        s(&kernel),
    ]);
    let console1 = t.path().join("console1.txt");
    let api = vm.join("api.sock");
    let mut first = Command::new(bin())
        .args(["run", "--vm", s(&vm), "--console", s(&console1)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !read(&console1).contains("BIOS-e820") {
        assert!(
            Instant::now() < deadline && first.try_wait().unwrap().is_none(),
            "no banner and E820 map:\n{}",
            read(&console1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let out = strata(&[
        "checkpoint",
        "create",
        "--api",
        s(&api),
        "--name",
        "booting",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = read(&console1);
    first.kill().unwrap();
    let _ = first.wait();
    assert_eq!(before.matches("Linux version").count(), 1, "{before}");

    ok(&["checkpoint", "apply", "--vm", s(&vm), "booting"]);
    let console2 = t.path().join("console2.txt");
    let mut second = Command::new(bin())
        .args(["run", "--vm", s(&vm), "--console", s(&console2)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let enough = loop {
        let text = read(&console2);
        if text.lines().filter(|l| !before.contains(*l)).count() >= 10 {
            break true;
        }
        if Instant::now() > deadline || second.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = second.kill();
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let after = read(&console2);
    assert!(err.contains("strata: resumed from booting"), "{err}");
    assert!(
        enough,
        "the restored kernel printed too little.\nbefore:\n{before}\nafter:\n{after}\n{err}"
    );
    assert!(
        !after.contains("Linux version"),
        "the restored kernel booted again:\n{after}"
    );
}
