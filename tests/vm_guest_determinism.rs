//! The built-in test guest is deterministic, and its dirty region is checked (needs /dev/kvm,
//! real KVM through `strata run`):
//! - two runs of one seed and workload (qd=32, mixed block sizes, flushes, a dirty region) end
//!   with byte-identical disks (`strata disk export` + compare) and identical `ledger=` and
//!   `mem=` digests; the ledger digest is the one the exported disk implies; another seed
//!   changes both;
//! - the guest's two ways of waiting (sleeping on the wait port, `irq=1`, and spinning on its
//!   used ring, `irq=0`) change only timing: the same disk, digests and console; the sleeping
//!   guest did sleep and the spinning one did not;
//! - a page of the dirty region replaced under the running guest by another page (what a memory
//!   snapshot that restored the wrong page looks like) is reported and fails the run; the
//!   host-side check of a memory image (`LedgerHeader::verify_dirty`) sees the same.
//!
//! This is the oracle the VM checkpoint tests build on: an uninterrupted run is the reference.

mod vm_common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use vm_common::{require_kvm, strata};
use vmm::test_guest::{ledger, Summary, SECTOR_SIZE};

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Disk size of these runs; the workload's region is its first `REGION` bytes.
const DISK: &str = "64M";
const REGION: u64 = 16 << 20;
/// qd=32 over a 16 MiB region with 512 B..64 KiB requests: new requests often overlap ones in
/// flight, so the guest's ordering of overlapping requests is what keeps the disk deterministic.
const WORKLOAD: &str =
    "ops=3000,read=40,bs=512-64k,region=0:16m,qd=32,flush=16,dirty=8m,dirty_rate=3";

/// The console without the timing fields of the `done` line (the only part that may differ).
fn untimed(console: &str) -> String {
    console
        .lines()
        .map(|l| {
            l.split(' ')
                .filter(|kv| {
                    !["cycles=", "iops=", "max_stall_us=", "kicks=", "waits="]
                        .iter()
                        .any(|k| kv.starts_with(k))
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Run {
    summary: Summary,
    console: String,
    disk: Vec<u8>,
}

/// Creates a fresh disk in `dir`, runs the workload with `seed` on it, exports it.
fn run_and_export(dir: &Path, name: &str, seed: u64) -> Run {
    run_mode_and_export(dir, name, seed, "")
}

/// As [`run_and_export`], with `extra` appended to the workload.
fn run_mode_and_export(dir: &Path, name: &str, seed: u64, extra: &str) -> Run {
    let disk = dir.join(name);
    let d = disk.to_str().unwrap();
    ok(
        &strata(&["disk", "create", d, "--size", DISK]),
        "disk create",
    );
    let workload = format!("seed={seed},{WORKLOAD}{extra}");
    let stdout = ok(
        &strata(&["run", "--disk", d, "--workload", &workload]),
        "strata run",
    );
    let summary = Summary::from_console(&stdout).unwrap_or_else(|e| panic!("{e}:\n{stdout}"));
    assert_eq!(summary.errors, 0, "{stdout}");
    assert!(vmm::test_guest::error_lines(&stdout).is_empty(), "{stdout}");
    let image = dir.join(format!("{name}.raw"));
    ok(
        &strata(&["disk", "export", "--output", image.to_str().unwrap(), d]),
        "disk export",
    );
    let disk = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    Run {
        summary,
        console: untimed(&stdout),
        disk,
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn two_runs_of_one_workload_end_with_identical_disks_and_digests() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let ra = run_and_export(dir.path(), "a", 42);
    let rb = run_and_export(dir.path(), "b", 42);
    let (a, disk_a, b, disk_b) = (&ra.summary, &ra.disk, &rb.summary, &rb.disk);

    assert_eq!(disk_a.len(), 64 << 20);
    if let Some(at) = first_difference(disk_a, disk_b) {
        panic!(
            "the two runs' disks differ first at byte {at} (sector {}):\n{a}\n{b}",
            at as u64 / SECTOR_SIZE
        );
    }
    // Everything the workload decides is the same; only timing may differ.
    assert_eq!(
        (a.ops, a.reads, a.writes, a.flushes, a.bytes, a.dirtied),
        (b.ops, b.reads, b.writes, b.flushes, b.bytes, b.dirtied)
    );
    assert_eq!(a.ledger, b.ledger, "ledger digests differ:\n{a}\n{b}");
    assert_eq!(a.mem, b.mem, "dirty region digests differ:\n{a}\n{b}");
    assert!(a.writes > 1000 && a.flushes > 50, "{a}");
    // Every completed request rewrote 3 pages of the 8 MiB (2048-page) region: several passes.
    assert_eq!(a.dirtied, 3 * (a.ops + a.flushes), "{a}");
    assert!(a.dirtied > 2 * 2048, "{a}");
    // The whole console is the same but for the done line's timing fields (progress lines are
    // printed at exact op counts).
    assert_eq!(ra.console, rb.console);
    assert_eq!(ra.console.matches("strata-guest: progress ops=").count(), 9);

    // The ledger digest is the one the disk implies: each sector of the region holds the
    // pattern of its last write (or zeros), and nothing outside the region was written.
    let region = &disk_a[..REGION as usize];
    let tags = ledger::tags_from_disk(42, 0, region).unwrap();
    assert!(tags.iter().filter(|&&t| t != 0).count() > 10_000);
    assert_eq!(ledger::ledger_digest(&tags), a.ledger, "{a}");
    assert!(disk_a[REGION as usize..].iter().all(|&x| x == 0));

    // Another seed: another disk and other digests (the digests are not constants).
    let rc = run_and_export(dir.path(), "c", 43);
    let (c, disk_c) = (&rc.summary, &rc.disk);
    assert_eq!(c.errors, 0);
    assert_ne!(disk_a, disk_c);
    assert_ne!(a.ledger, c.ledger);
    assert_ne!(a.mem, c.mem);
    let tags = ledger::tags_from_disk(43, 0, &disk_c[..REGION as usize]).unwrap();
    assert_eq!(ledger::ledger_digest(&tags), c.ledger);
}

#[test]
fn sleeping_and_spinning_guests_end_with_identical_disks() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sleeping = run_mode_and_export(dir.path(), "irq", 42, ",irq=1");
    let spinning = run_mode_and_export(dir.path(), "spin", 42, ",irq=0");
    let (a, b) = (&sleeping.summary, &spinning.summary);
    if let Some(at) = first_difference(&sleeping.disk, &spinning.disk) {
        panic!("the disks differ first at byte {at}:\n{a}\n{b}");
    }
    assert_eq!((a.ops, a.writes, a.flushes), (b.ops, b.writes, b.flushes));
    assert_eq!((a.ledger, a.mem), (b.ledger, b.mem), "\n{a}\n{b}");
    // The consoles differ only in the start line's normalised spec (irq=1 is the default and
    // is left out of it).
    let rest = |c: &str| -> Vec<String> {
        c.lines()
            .filter(|l| !l.starts_with("strata-guest: start "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rest(&sleeping.console), rest(&spinning.console));
    assert!(spinning.console.contains(",irq=0"), "{}", spinning.console);
    assert!(!sleeping.console.contains("irq="), "{}", sleeping.console);
    // qd=32 over 3000 requests: the sleeping guest found its ring empty and slept at least
    // once (each sleep is one wait-port read); the spinning one never reads the port.
    assert!(a.waits > 0, "{a}");
    assert_eq!(b.waits, 0, "{b}");
}

/// Guest memory size of the memory test: an unusual size, so its mapping is easy to find.
const MEM_SIZE: u64 = 200 << 20;
const DIRTY: u64 = 4 << 20;

/// The start of `pid`'s mapping of guest RAM: the only read-write mapping of `MEM_SIZE` bytes.
fn guest_ram(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let found: Vec<u64> = maps
        .lines()
        .filter_map(|l| {
            let (range, rest) = l.split_once(' ')?;
            let (lo, hi) = range.split_once('-')?;
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            );
            (hi - lo == MEM_SIZE && rest.starts_with("rw")).then_some(lo)
        })
        .collect();
    assert_eq!(found.len(), 1, "guest RAM mappings {found:?} in:\n{maps}");
    found[0]
}

/// A process stopped with SIGSTOP (every thread in the stopped state) until dropped.
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(pid: libc::pid_t) -> Self {
        // SAFETY: `pid` is our own running child (we hold its stdout pipe).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .all(|t| {
                    let stat =
                        std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                    // The state follows the parenthesised command name.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
                })
        };
        for _ in 0..1000 {
            if all_stopped() {
                return Self(pid);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("process {pid} did not stop");
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `new`; SIGCONT resumes the child we stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_page_of_the_dirty_region_from_elsewhere_is_caught() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let d = disk.to_str().unwrap();
    ok(
        &strata(&["disk", "create", d, "--size", "64M"]),
        "disk create",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--disk", d, "--memory", &MEM_SIZE.to_string()])
        .args([
            "--workload",
            "seed=9,ops=3000,read=50,bs=4k,region=0:8m,qd=8,dirty=4m,dirty_rate=4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning strata");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    // The dirty region is filled before the first request; the first progress line (10% of the
    // ops) comes well after.
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "no progress line:\n{console}"
        );
        console.push_str(&line);
        if line.starts_with("strata-guest: progress") {
            break;
        }
    }
    // Stop the whole VMM (vCPU included) to read a consistent image of the guest's memory.
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let stopped = Stopped::new(pid);
    let stopped_at = std::time::Instant::now();
    let ram = guest_ram(child.id());
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    let read = |addr: u64, len: usize| {
        let mut b = vec![0u8; len];
        mem.read_exact_at(&mut b, ram + addr).unwrap();
        b
    };
    let header =
        ledger::LedgerHeader::parse(&read(vmm::test_guest::LEDGER_ADDR, ledger::HEADER_LEN))
            .unwrap();
    assert_eq!(header.state, ledger::LedgerState::Running);
    assert_eq!(
        (
            header.seed,
            header.dirty_base,
            header.dirty_pages,
            header.dirty_rate
        ),
        (9, MEM_SIZE - DIRTY, DIRTY / 4096, 4)
    );
    assert!(header.dirty_written > 0, "{header:?}");
    // The image agrees with the rewrite count (the host-side check of a memory image).
    let region = read(header.dirty_base, DIRTY as usize);
    assert_eq!(header.verify_dirty(&region).unwrap(), Vec::<u64>::new());

    // Put copies of page 0 (a valid pattern, but of another page) over three pages far apart,
    // as a memory image restored from the wrong place would look. Only the page the guest is
    // rewriting at this instant (it checked it already) can escape.
    let page0 = read(header.dirty_base, 4096);
    let victims = [100u64, 400, 700];
    for p in victims {
        mem.write_all_at(&page0, ram + header.dirty_base + p * 4096)
            .unwrap();
    }
    let busy = header.dirty_written % header.dirty_pages;
    let expect: Vec<u64> = victims.into_iter().filter(|&p| p != busy).collect();
    let region = read(header.dirty_base, DIRTY as usize);
    assert_eq!(header.verify_dirty(&region).unwrap(), expect);
    drop(mem);
    // Hold it long enough that this is the run's longest stall by far.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held = stopped_at.elapsed();
    drop(stopped);
    stdout.read_to_string(&mut console).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "verification failure expected:\n{console}"
    );
    let summary = Summary::from_console(&console).unwrap();
    let caught: Vec<u64> = victims
        .into_iter()
        .filter(|p| console.contains(&format!("error mem page={p} ")))
        .collect();
    assert_eq!(caught, expect, "{console}");
    assert_eq!(summary.errors, caught.len() as u64, "{console}");
    // The lines name what was found there: page 0.
    assert!(console.contains(" found_page=0 "), "{console}");
    // The guest felt the stop: no turn of its loop could run while every thread was stopped,
    // so its longest gap is at least that long (90%: the TSC frequency is KVM's estimate).
    let held_us = u64::try_from(held.as_micros()).unwrap();
    assert!(
        summary.max_stall_us >= held_us * 9 / 10,
        "held {held_us} us, guest max_stall_us={}",
        summary.max_stall_us
    );
}
