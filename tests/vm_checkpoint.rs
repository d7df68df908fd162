//! Whole-machine checkpoints of the built-in test guest (needs /dev/kvm). The oracle: the guest
//! is deterministic, so a run that is checkpointed mid-workload, continues, is put back to the
//! checkpoint and resumed must end with `errors=0`, the same ledger and memory digests, and a
//! disk byte-identical to an uninterrupted run of the same workload. Memory and disk must agree
//! at the checkpoint instant, or the guest's ledger (every sector it wrote, verified on read) or
//! its dirty-memory check catches it.

mod vm_common;

use std::path::Path;
use std::time::Duration;

use vm_common::*;

/// Long enough that checkpoints land mid-run; mixed sizes, flushes, requests in flight, and
/// guest memory rewritten between I/Os.
const WORKLOAD: &str = "seed=11,ops=40000,read=30,bs=4k-16k,region=0:48M,qd=16,flush=24,dirty=8m";
const MEMORY: &str = "128M";
const DISK: &str = "128M";

/// An uninterrupted run of WORKLOAD: its done line and exported disk (made once, shared by the
/// tests of this file).
fn reference(_t: &Path) -> (String, std::path::PathBuf) {
    static REF: std::sync::OnceLock<(tempfile::TempDir, String, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let r = REF.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let (done, raw) = make_reference(t.path());
        (t, done, raw)
    });
    (r.1.clone(), r.2.clone())
}

fn make_reference(t: &Path) -> (String, std::path::PathBuf) {
    vm_common::make_reference(t, WORKLOAD, MEMORY, DISK)
}

/// Checks a run's result against the reference (the disk is exported as `t/VM.raw`).
fn assert_matches_reference(
    vm: &Path,
    out: &str,
    reference: &(String, std::path::PathBuf),
    t: &Path,
) {
    let tag = vm.file_name().unwrap().to_string_lossy();
    vm_common::assert_matches_reference(vm, out, reference, t, &tag);
}

#[test]
fn apply_on_the_running_vm_continues_from_the_instant() {
    let (_one, t) = vm_test();
    let reference = reference(t.path());
    for mode in ["live", "stop-copy"] {
        let vm = t.path().join(format!("vm-{mode}"));
        let run = start_new_vm(&vm, WORKLOAD, MEMORY, DISK);
        let_it_run(Duration::from_millis(700));
        let out = run.checkpoint_ok("create", &["--name", "c1", "--memory", mode]);
        assert!(out.contains("machine state"), "{out}");
        // Let the guest move on (overwriting what c1 holds), then put it back.
        let_it_run(Duration::from_millis(700));
        let list = run.checkpoint_ok("list", &["--json"]);
        assert!(list.contains("\"machine\""), "{list}");
        // "Checkpoint, then apply": the state just before the apply is kept as `before`.
        let out = run.checkpoint_ok("apply", &["c1", "--save-current", "before"]);
        assert!(out.contains("continues"), "{out}");
        let list = run.checkpoint_ok("list", &["--json"]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        let before = v.as_array().unwrap().iter().find(|c| c["name"] == "before");
        assert_eq!(
            before.map(|c| c["kind"].clone()),
            Some("machine".into()),
            "{list}"
        );
        let (okay, out, err) = run.wait();
        assert!(okay, "{mode}: the applied VM failed:\n{out}{err}");
        assert_matches_reference(&vm, &out, &reference, t.path());
        // `before` and everything under it go with --subtree; c1 stays and still applies.
        ok(&[
            "checkpoint",
            "delete",
            "--vm",
            s(&vm),
            "before",
            "--subtree",
        ]);
        let l = ok(&["checkpoint", "list", "--vm", s(&vm)]);
        assert!(!l.contains("before") && l.contains("c1"), "{l}");
    }
}

#[test]
fn apply_offline_then_resume_in_a_new_process_and_from_an_export() {
    let (_one, t) = vm_test();
    let reference = reference(t.path());
    let vm = t.path().join("vm");
    let run = start_new_vm(&vm, WORKLOAD, MEMORY, DISK);
    let_it_run(Duration::from_millis(600));
    run.checkpoint_ok("create", &["--name", "mid"]);
    let (okay, out, err) = run.wait();
    assert!(okay, "{out}{err}");
    // The VM is stopped: export the checkpoint, then apply it offline and run again.
    let exported = t.path().join("exported");
    let out = ok(&[
        "checkpoint",
        "export",
        "--vm",
        s(&vm),
        "mid",
        "--output",
        s(&exported),
    ]);
    assert!(out.contains("resumes"), "{out}");
    let out = ok(&["checkpoint", "apply", "--vm", s(&vm), "mid"]);
    assert!(out.contains("resumes"), "{out}");
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay, "{out}{err}");
    assert!(err.contains("strata: resumed from mid"), "{err}");
    assert_matches_reference(&vm, &out, &reference, t.path());
    // A second run cold-boots (the saved state was consumed), and still passes.
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay && !err.contains("resumed"), "{out}{err}");
    // The export runs on its own.
    let (okay, out, err) = run_to_end(&exported);
    assert!(okay, "{out}{err}");
    assert!(err.contains("strata: resumed from mid"), "{err}");
    assert_matches_reference(&exported, &out, &reference, t.path());
}

#[test]
fn incremental_chain_with_a_deleted_middle_restores_exactly() {
    let (_one, t) = vm_test();
    let reference = reference(t.path());
    let vm = t.path().join("vm");
    let run = start_new_vm(&vm, WORKLOAD, MEMORY, DISK);
    for name in ["a", "b", "c"] {
        let_it_run(Duration::from_millis(300));
        run.checkpoint_ok("create", &["--name", name]);
    }
    let list = run.checkpoint_ok("list", &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let arr = v.as_array().unwrap();
    let parent_of =
        |n: &str| arr.iter().find(|c| c["name"] == n).unwrap()["machine"]["memory_parent"].clone();
    assert!(parent_of("a").is_null(), "{list}");
    assert!(!parent_of("b").is_null(), "b is not incremental: {list}");
    assert!(!parent_of("c").is_null(), "c is not incremental: {list}");
    // Delete the middle one while the VM runs: c absorbs b's pages.
    run.checkpoint_ok("delete", &["b"]);
    let_it_run(Duration::from_millis(300));
    run.checkpoint_ok("apply", &["c"]);
    let (okay, out, err) = run.wait();
    assert!(okay, "{out}{err}");
    assert_matches_reference(&vm, &out, &reference, t.path());
    // And offline: delete a too, then resume c in a new process.
    ok(&["checkpoint", "delete", "--vm", s(&vm), "a"]);
    ok(&["checkpoint", "apply", "--vm", s(&vm), "c"]);
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay && err.contains("resumed from c"), "{out}{err}");
    assert_matches_reference(&vm, &out, &reference, t.path());
}

#[test]
fn damaged_or_foreign_state_is_refused_with_a_clear_error() {
    let (_one, t) = vm_test();
    let vm = t.path().join("vm");
    let other = t.path().join("other");
    create_vm(&vm, WORKLOAD, MEMORY, DISK);
    create_vm(&other, WORKLOAD, MEMORY, DISK);
    for d in [&vm, &other] {
        let run = Running::start(d);
        let_it_run(Duration::from_millis(300));
        run.checkpoint_ok("create", &["--name", "x", "--memory", "stop-copy"]);
        run.checkpoint_ok("create", &["--name", "y"]);
        // Errors leave the VM running and every checkpoint intact.
        let e = run.checkpoint("apply", &["nope"]);
        assert!(!e.status.success());
        let e = run.checkpoint("create", &["--name", "x"]);
        assert!(String::from_utf8_lossy(&e.stderr).contains("already exists"));
        let (okay, out, err) = run.wait();
        assert!(okay, "{out}{err}");
    }
    let id_of = |d: &Path, n: &str| -> u64 {
        let l = ok(&["checkpoint", "list", "--vm", s(d), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let x = vm.join("checkpoints").join(id_of(&vm, "x").to_string());
    let state = x.join("machine.state");
    let good = std::fs::read(&state).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    cases.push(("checksum", flipped));
    cases.push(("truncated", good[..good.len() / 3].to_vec()));
    cases.push(("truncated", good[..10].to_vec()));
    let foreign = other
        .join("checkpoints")
        .join(id_of(&other, "x").to_string())
        .join("machine.state");
    cases.push(("another VM", std::fs::read(&foreign).unwrap()));
    for (want, bytes) in cases {
        std::fs::write(&state, &bytes).unwrap();
        let e = fails(&["checkpoint", "apply", "--vm", s(&vm), "x"]);
        assert!(
            e.to_lowercase().contains(&want.to_lowercase()),
            "{want}: {e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
    std::fs::write(&state, &good).unwrap();
    // A damaged memory image.
    let img = x.join("memory.img");
    let good_img = std::fs::read(&img).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    let e = fails(&["checkpoint", "apply", "--vm", s(&vm), "x"]);
    assert!(e.to_lowercase().contains("memory"), "{e}");
    // y's memory is an increment over x's: it is refused too, until x's image is whole again.
    let e = fails(&["checkpoint", "apply", "--vm", s(&vm), "y"]);
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&img, &good_img).unwrap();
    // Nothing was changed by the refusals: y still applies and resumes.
    ok(&["checkpoint", "apply", "--vm", s(&vm), "y"]);
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay && err.contains("resumed from y"), "{out}{err}");
    assert_eq!(field(&done_line(&out), "errors"), "0");
}

#[test]
fn sigkill_during_a_live_checkpoint_leaves_no_partial_checkpoint() {
    let (_one, t) = vm_test();
    let vm = t.path().join("vm");
    // Large memory so the background save takes a while.
    create_vm(
        &vm,
        "seed=3,ops=2000000,read=30,bs=4k,region=0:32M,qd=16,flush=32,dirty=64m",
        "512M",
        DISK,
    );
    for round in 0..3u64 {
        let mut run = Running::start(&vm);
        let_it_run(Duration::from_millis(200));
        let api = run.api.clone();
        let name = format!("k{round}");
        let create = std::process::Command::new(bin())
            .args(["checkpoint", "create", "--api", s(&api), "--name", &name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + round * 40));
        run.child.kill().unwrap();
        let _ = run.child.wait();
        let mut create = create;
        let _ = create.wait();
        let list = ok(&["checkpoint", "list", "--vm", s(&vm), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        for c in v.as_array().unwrap() {
            assert_eq!(
                c["kind"], "machine",
                "a partial checkpoint is visible: {list}"
            );
        }
        let check = ok(&["disk", "check", s(&vm.join("disk"))]);
        assert!(check.contains("clean"), "{check}");
        assert!(
            std::fs::read_dir(vm.join("checkpoints"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("tmp-")),
            "temporary state left behind"
        );
    }
    // The VM still runs (and every complete checkpoint still applies).
    let run = Running::start(&vm);
    let_it_run(Duration::from_millis(200));
    run.checkpoint_ok("create", &["--name", "after"]);
    let mut child = run.child;
    let _ = child.kill();
    let _ = child.wait();
}
