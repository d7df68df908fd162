//! A VM whose disk references a raw base image (`strata vm create --base`), run with the
//! built-in test guest (needs /dev/kvm), checkpointed while running, applied offline and
//! resumed. The oracle: the same workload on a VM without a base writes the same sectors
//! with the same bytes, so the base VM's final disk must be that run's disk wherever it wrote
//! and the base image everywhere else.

mod vm_common;

use std::path::Path;
use std::time::Duration;

use vm_common::*;

const WORKLOAD: &str = "seed=5,ops=40000,read=40,bs=4k-16k,region=0:24M,qd=8,flush=16";
const DISK: u64 = 32 << 20;

/// A base image whose every sector is nonzero and tells its position.
fn write_base(path: &Path) -> Vec<u8> {
    let mut img = vec![0u8; DISK as usize];
    for (i, sector) in img.chunks_mut(512).enumerate() {
        sector.fill((i % 251) as u8 + 1);
        sector[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(path, &img).unwrap();
    img
}

#[test]
fn a_vm_over_a_base_image_reads_the_base_and_checkpoints_over_it() {
    require_kvm();
    let _one = one_vm_test_at_a_time();
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.raw");
    let base_bytes = write_base(&base);

    // The workload on a plain disk: which sectors it writes, and with what.
    let plain = t.path().join("plain");
    create_vm(&plain, WORKLOAD, "128M", "32M");
    let (okay, out, err) = run_to_end(&plain);
    assert!(okay, "plain run failed:\n{out}{err}");
    let reference = done_line(&out);
    assert_eq!(field(&reference, "errors"), "0", "{reference}");
    let plain_raw = t.path().join("plain.raw");
    export_now(&plain, &plain_raw);
    let plain_bytes = std::fs::read(&plain_raw).unwrap();

    // The same workload over the base, checkpointed mid-run, continued, put back and resumed.
    let vm = t.path().join("vm");
    ok(&[
        "vm",
        "create",
        s(&vm),
        "--memory",
        "128M",
        "--base",
        s(&base),
        "--workload",
        WORKLOAD,
    ]);
    let run = Running::start(&vm);
    let_it_run(Duration::from_millis(300));
    run.checkpoint_ok("create", &["--name", "mid"]);
    let (okay, out, err) = run.wait();
    assert!(okay, "base run failed:\n{out}{err}");
    assert_eq!(field(&done_line(&out), "errors"), "0", "{out}");
    ok(&["checkpoint", "apply", "--vm", s(&vm), "mid"]);
    let (okay, out, err) = run_to_end(&vm);
    assert!(okay, "resumed run failed:\n{out}{err}");
    assert!(err.contains("resumed from mid"), "{out}{err}");
    let done = done_line(&out);
    assert_eq!(field(&done, "errors"), "0", "{done}");
    for k in ["ledger", "writes", "reads"] {
        assert_eq!(
            field(&done, k),
            field(&reference, k),
            "{k}: {done} vs {reference}"
        );
    }

    let vm_raw = t.path().join("vm.raw");
    export_now(&vm, &vm_raw);
    let vm_bytes = std::fs::read(&vm_raw).unwrap();
    assert_eq!(vm_bytes.len(), base_bytes.len());
    let mut from_guest = 0;
    for (i, ((got, written), base)) in vm_bytes
        .chunks(512)
        .zip(plain_bytes.chunks(512))
        .zip(base_bytes.chunks(512))
        .enumerate()
    {
        // The guest's sectors are never all zeros (they carry a header), so a zero sector
        // of the plain run is one the guest never wrote.
        let expected = if written.iter().any(|&b| b != 0) {
            from_guest += 1;
            written
        } else {
            base
        };
        assert!(
            got == expected,
            "sector {i} differs from the expected overlay"
        );
    }
    assert!(
        from_guest > 1000,
        "the workload wrote only {from_guest} sectors"
    );
    assert!(
        from_guest < DISK as usize / 512,
        "the workload covered the whole disk: the base is not tested"
    );
    let report = ok(&["disk", "check", s(&vm.join("disk"))]);
    assert!(report.contains("clean"), "{report}");
}

#[test]
fn a_vm_base_that_cannot_be_used_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let odd = t.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let vm = t.path().join("vm");
    let err = fails(&["vm", "create", s(&vm), "--base", s(&odd)]);
    assert!(err.contains("1000"), "{err}");
    assert!(
        !vm.join("vm.json").exists(),
        "a refused VM left its vm.json"
    );
    let err = fails(&[
        "vm",
        "create",
        s(&t.path().join("vm2")),
        "--base",
        s(&t.path().join("missing.raw")),
    ]);
    assert!(err.contains("missing.raw"), "{err}");
}
