//! A machine checkpoint whose memory image has damaged page data (needs /dev/kvm). `apply`
//! only checks the image's structure (reading every page would make apply cost the size of
//! memory), so the damage is found when the restored guest touches it, or by the background
//! prefetch. Either way the run must end with a clear reason and an exit status, never be
//! killed by SIGBUS or serve the damaged bytes; the disk stays clean, and an undamaged
//! checkpoint still resumes.

mod vm_common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use vm_common::*;

const WORKLOAD: &str = "seed=3,ops=60000,read=30,bs=4k,qd=8,dirty=4m";

/// Flips one byte in every 4 KiB page of data of a memory image (past its 2 MiB of metadata;
/// holes hold no data and stay holes).
fn damage_every_page(path: &std::path::Path) -> usize {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut damaged = 0;
    let mut b = [0u8; 1];
    let mut off = 2u64 << 20;
    while off < len {
        // Only pages that hold data: reading a hole gives zeros, writing one would allocate.
        f.read_exact_at(&mut b, off + 100).unwrap();
        let mut page = vec![0u8; 4096];
        f.read_exact_at(&mut page, off).unwrap();
        if page.iter().any(|&x| x != 0) {
            f.write_all_at(&[b[0] ^ 0x40], off + 100).unwrap();
            damaged += 1;
        }
        off += 4096;
    }
    damaged
}

#[test]
fn a_damaged_memory_page_stops_the_restored_vm_with_its_reason() {
    require_kvm();
    let _one = one_vm_test_at_a_time();
    let t = tempfile::tempdir().unwrap();
    let vm = t.path().join("vm");
    let run = start_new_vm(&vm, WORKLOAD, "128M", "64M");
    let_it_run(Duration::from_millis(500));
    run.checkpoint_ok("create", &["--name", "good"]);
    let_it_run(Duration::from_millis(300));
    run.checkpoint_ok("create", &["--name", "bad", "--memory", "stop-copy"]);
    let (okay, out, err) = run.wait();
    assert!(okay, "first run failed:\n{out}{err}");

    let list = ok(&["checkpoint", "list", "--vm", s(&vm), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = v
        .as_array()
        .or_else(|| v["checkpoints"].as_array())
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bad")
        .map(|c| c["id"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("no checkpoint bad in {list}"));
    let image = vm
        .join("checkpoints")
        .join(id.to_string())
        .join("memory.img");
    assert!(damage_every_page(&image) > 10, "the image holds no data");

    ok(&["checkpoint", "apply", "--vm", s(&vm), "bad"]);
    let out = Command::new(bin())
        .args(["run", "--vm", s(&vm)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        None,
        "killed by a signal:\n{}",
        err.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(!out.status.success(), "a damaged restore ran to its end");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("damaged") && last.contains("memory.img"),
        "the last line does not give the reason: {last}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("strata-guest: done"),
        "the guest ran to its end on damaged memory:\n{stdout}"
    );
    let check = ok(&["disk", "check", s(&vm.join("disk"))]);
    assert!(check.contains("clean"), "{check}");

    // The undamaged checkpoint still resumes and its run is correct.
    ok(&["checkpoint", "apply", "--vm", s(&vm), "good"]);
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay, "resuming the good checkpoint failed:\n{out}{err}");
    assert_eq!(field(&done_line(&out), "errors"), "0");
}
