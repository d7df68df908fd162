//! Online deletes on a running VM (needs /dev/kvm): the deterministic test guest keeps doing
//! I/O while checkpoints are deleted and their data merged in the background. The oracle: the
//! run still ends with `errors=0`, the same ledger and memory digests, and a disk
//! byte-identical to an uninterrupted run; a surviving checkpoint still resumes to the same end.

mod vm_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_common::*;

const WORKLOAD: &str = "seed=23,ops=40000,read=30,bs=4k-16k,region=0:48M,qd=16,flush=24,dirty=8m";
const MEMORY: &str = "128M";
const DISK: &str = "128M";

fn reference(t: &Path) -> (String, PathBuf) {
    make_reference(t, WORKLOAD, MEMORY, DISK)
}

fn names(run: &Running) -> Vec<String> {
    let l = run.checkpoint_ok("list", &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&l).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn online_delete_on_a_running_vm_keeps_the_oracle() {
    let (_one, t) = vm_test();
    let reference = reference(t.path());
    let vm = t.path().join("vm");
    let run = start_new_vm(&vm, WORKLOAD, MEMORY, DISK);
    for name in ["a", "b", "c", "d"] {
        let_it_run(Duration::from_millis(300));
        run.checkpoint_ok("create", &["--name", name]);
    }
    let_it_run(Duration::from_millis(200));
    // b's data moves into c while the guest writes; the reply comes when the merge is done.
    let out = run.checkpoint_ok(
        "delete",
        &["b", "--strategy", "compact-into-child", "--wait"],
    );
    eprintln!("{out}");
    assert!(out.contains("deleted b (its merges are planned"), "{out}");
    assert!(out.contains("bytes copied"), "no merge report: {out}");
    assert!(!names(&run).contains(&"b".to_string()));
    // a goes with another strategy, without waiting: gone from the list at once.
    let out = run.checkpoint_ok("delete", &["a", "--strategy", "compact-into-parent"]);
    eprintln!("{out}");
    assert!(out.contains("deleted a (its merges are planned"), "{out}");
    assert_eq!(names(&run), ["c", "d"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = run.checkpoint_ok("status", &["--json"]);
        let v: serde_json::Value = serde_json::from_str(&st).unwrap();
        for f in v["finished"].as_array().unwrap() {
            assert!(
                !f["status"]["state"].as_str().unwrap().starts_with("failed"),
                "{st}"
            );
        }
        if v["merges"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "merges never finished: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (okay, out, err) = run.wait();
    assert!(okay, "the VM failed:\n{out}{err}");
    assert_matches_reference(&vm, &out, &reference, t.path(), "run");
    // c's whole machine still resumes to the same end (its disk survived both merges).
    ok(&["checkpoint", "apply", "--vm", s(&vm), "c"]);
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay && err.contains("resumed from c"), "{out}{err}");
    assert_matches_reference(&vm, &out, &reference, t.path(), "resumed");
}
