//! Helpers of the VM checkpoint tests: run `strata`, VM directories, the test guest's `done`
//! line, byte comparison of exported disks. Every test here needs /dev/kvm and fails (never
//! skips) without it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read/write access to /dev/kvm ({e}); run it on a KVM-capable host");
    }
}

/// A VM console kept in memory (clones share it), for the tests that run `vmm::Vm` directly.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// Runs `strata ARGS` to completion.
pub fn strata(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("running strata")
}

/// Runs `strata ARGS`, asserting success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        out.status.success(),
        "strata {args:?} failed ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `strata ARGS`, asserting failure; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        !out.status.success(),
        "strata {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "strata panicked: {err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Creates a test-guest VM directory.
pub fn create_vm(dir: &Path, workload: &str, memory: &str, disk: &str) {
    ok(&[
        "vm",
        "create",
        s(dir),
        "--memory",
        memory,
        "--disk-size",
        disk,
        "--workload",
        workload,
    ]);
}

/// A running `strata run --vm DIR`.
pub struct Running {
    pub child: Child,
    pub api: PathBuf,
}

impl Running {
    pub fn start(dir: &Path) -> Running {
        let api = dir.join("api.sock");
        let _ = std::fs::remove_file(&api);
        let child = Command::new(bin())
            .args(["run", "--vm", s(dir)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning strata run");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&api).is_err() {
            assert!(Instant::now() < deadline, "control socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Running { child, api }
    }

    /// Calls `strata checkpoint VERB --api API ARGS`.
    pub fn checkpoint(&self, verb: &str, args: &[&str]) -> Output {
        let mut a = vec!["checkpoint", verb, "--api", s(&self.api)];
        a.extend_from_slice(args);
        strata(&a)
    }

    pub fn checkpoint_ok(&self, verb: &str, args: &[&str]) -> String {
        let out = self.checkpoint(verb, args);
        assert!(
            out.status.success(),
            "checkpoint {verb} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for the VM to end; returns (status ok, stdout, stderr).
    pub fn wait(mut self) -> (bool, String, String) {
        let mut out = String::new();
        let mut err = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
        (st.success(), out, err)
    }
}

/// Runs a VM directory to its end (no control calls); returns (ok, stdout, stderr).
pub fn run_to_end(dir: &Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["run", "--vm", s(dir)])
        .output()
        .expect("running strata");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test guest's final `done` line.
pub fn done_line(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("strata-guest: done "))
        .unwrap_or_else(|| panic!("no done line in:\n{stdout}"))
        .to_string()
}

/// A `key=value` field of a `done` line.
pub fn field<'a>(done: &'a str, key: &str) -> &'a str {
    done.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {done}"))
}

/// Exports Now of a VM's disk to a raw file.
pub fn export_now(vm: &Path, out: &Path) {
    ok(&["disk", "export", s(&vm.join("disk")), "--output", s(out)]);
}

/// Creates a VM directory (as [`create_vm`]) and starts it.
pub fn start_new_vm(dir: &Path, workload: &str, memory: &str, disk: &str) -> Running {
    create_vm(dir, workload, memory, disk);
    Running::start(dir)
}

/// A reference run: a fresh VM in `t/ref` running `workload` uninterrupted to its end, which
/// must pass. Returns its done line and its disk exported to `t/ref.raw`.
pub fn make_reference(t: &Path, workload: &str, memory: &str, disk: &str) -> (String, PathBuf) {
    let dir = t.join("ref");
    create_vm(&dir, workload, memory, disk);
    let (okay, out, err) = run_to_end(&dir);
    assert!(okay, "reference run failed:\n{out}{err}");
    let done = done_line(&out);
    assert_eq!(field(&done, "errors"), "0", "{done}");
    let raw = t.join("ref.raw");
    export_now(&dir, &raw);
    (done, raw)
}

/// Checks the run of `vm` that printed `out` against a [`make_reference`] run of the same
/// workload: no errors, the same ledger and memory digests and request counts, a
/// byte-identical disk (exported to `t/TAG.raw`) and a clean `disk check`.
pub fn assert_matches_reference(
    vm: &Path,
    out: &str,
    reference: &(String, PathBuf),
    t: &Path,
    tag: &str,
) {
    let done = done_line(out);
    assert_eq!(field(&done, "errors"), "0", "{tag}: {done}\n{out}");
    for k in ["ledger", "mem", "writes", "reads"] {
        assert_eq!(
            field(&done, k),
            field(&reference.0, k),
            "{tag}: {k}: {done} vs {}",
            reference.0
        );
    }
    let raw = t.join(format!("{tag}.raw"));
    export_now(vm, &raw);
    assert_same_file(&raw, &reference.1);
    let check = ok(&["disk", "check", s(&vm.join("disk"))]);
    assert!(check.contains("clean"), "{tag}: {check}");
}

/// Asserts two files are byte-identical (reports the first differing 4 KiB block).
pub fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len(), "sizes differ");
    if x != y {
        let first = x
            .chunks(4096)
            .zip(y.chunks(4096))
            .position(|(p, q)| p != q)
            .unwrap();
        let count = x
            .chunks(4096)
            .zip(y.chunks(4096))
            .filter(|(p, q)| p != q)
            .count();
        panic!(
            "disks differ: {count} blocks, first at byte {}",
            first * 4096
        );
    }
}

/// Waits until the guest has run for at least `d` (the VM's console has no progress lines,
/// so this is wall time after the control socket appeared).
pub fn let_it_run(d: Duration) {
    std::thread::sleep(d);
}

/// The start of a VM test: fails without KVM, waits for the binary's other VM tests
/// ([`one_vm_test_at_a_time`]), and gives a temporary directory.
pub fn vm_test() -> (std::sync::MutexGuard<'static, ()>, tempfile::TempDir) {
    require_kvm();
    let one = one_vm_test_at_a_time();
    (one, tempfile::tempdir().unwrap())
}

/// VM tests of one binary run one at a time: each guest holds a core, and the checkpoints'
/// timing is only meaningful when they do not starve each other.
pub fn one_vm_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
