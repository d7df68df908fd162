//! Crash test of FLUSH on the io_uring engine: a child process writes and flushes through
//! `IoEngine` and reports each completion on stdout; it is killed with SIGKILL at some point
//! and the disk is reopened. Every write that completed before a FLUSH that was acknowledged
//! must read back (that version or a later one); every block reads as zeros or as one whole
//! version written to that very block (never a torn or foreign block).
//!
//! The child is this test binary itself, started with `CHILD_DIR` set.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use journal::{AlignedBuf, CacheMode, Completion, Disk, IoEngine, OpenOptions, Request};

const CHILD_DIR: &str = "STRATA_FLUSH_CRASH_DIR";
const CHILD_ROUND: &str = "STRATA_FLUSH_CRASH_ROUND";
const BLOCKS: u64 = 512;
const BS: usize = 4096;
const QD: usize = 16;
/// A FLUSH after this many write completions.
const FLUSH_EVERY: u64 = 8;
/// Flush tokens have this bit set.
const FLUSH_TOKEN: u64 = 1 << 63;

fn opts() -> OpenOptions {
    OpenOptions {
        cache: CacheMode::None,
        read_only: false,
    }
}

/// The content of `block` at `version`: 8-byte words mixing both, so that a block holding
/// another block's or another version's data, or two halves of different versions, is seen.
fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS);
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    while b.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// Which version a block read back holds: `Some(0)` for zeros (never written), `None` when
/// it is no whole version of this block.
fn decode(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let b = u64::from_le_bytes(data[..8].try_into().ok()?);
    let v = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (b == block && data == pattern(block, v).as_slice()).then_some(v)
}

/// The child: writes random blocks (never two in flight to one block) and flushes, forever.
/// Lines: `W block version` when a write completed, `F id` when a flush is submitted,
/// `A id` when it completed successfully.
fn child(dir: &Path, round: u64) -> ! {
    let disk = Disk::open(dir, opts()).expect("child: open");
    let mut eng = IoEngine::new(disk.now(), QD as u32).expect("child: engine");
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut state = round.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut version = round * 1_000_000_000;
    let mut busy: HashMap<u64, u64> = HashMap::new(); // token (= block) -> version
    let mut flushes = 0u64;
    let mut completed = 0u64;
    let mut done: Vec<Completion> = Vec::new();
    loop {
        while busy.len() < QD {
            let block = rand() % BLOCKS;
            if busy.contains_key(&block) {
                continue;
            }
            version += 1;
            let buf = AlignedBuf::from_slice(&pattern(block, version));
            let req = Request::Write {
                offset: block * BS as u64,
                buf,
                fua: rand() % 16 == 0,
            };
            eng.submit(block, req).expect("child: submit");
            busy.insert(block, version);
        }
        eng.wait(1, &mut done).expect("child: wait");
        for c in done.drain(..) {
            c.result.expect("child: request failed");
            if c.token & FLUSH_TOKEN != 0 {
                writeln!(out, "A {}", c.token & !FLUSH_TOKEN).unwrap();
                out.flush().unwrap();
                continue;
            }
            let v = busy.remove(&c.token).expect("child: unknown token");
            writeln!(out, "W {} {v}", c.token).unwrap();
            out.flush().unwrap();
            completed += 1;
            if completed.is_multiple_of(FLUSH_EVERY) {
                flushes += 1;
                writeln!(out, "F {flushes}").unwrap();
                out.flush().unwrap();
                eng.submit(FLUSH_TOKEN | flushes, Request::Flush)
                    .expect("child: flush");
            }
        }
    }
}

#[test]
fn flush_crash_child() {
    // Only does something when the parent test starts this binary as the child.
    if let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ROUND)) {
        child(Path::new(&dir), round.parse().unwrap());
    }
}

/// What the parent learned from one child's output.
#[derive(Default)]
struct Seen {
    /// Per block, the newest version that must survive.
    required: HashMap<u64, u64>,
    acks: u64,
}

#[test]
fn every_acknowledged_flush_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk");
    Disk::create(&dir, BLOCKS * BS as u64, None).unwrap();
    let mut required: HashMap<u64, u64> = HashMap::new();
    for round in 1..=4u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "flush_crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir)
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Writes completed so far in this round, and at each flush's submission.
        let mut completed: Vec<(u64, u64)> = Vec::new();
        let mut at_flush: HashMap<u64, usize> = HashMap::new();
        let mut seen = Seen::default();
        // Kill after a different number of acknowledged flushes each round.
        let kill_after = 10 + round * 13;
        let mut killed = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            let mut f = line.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some("W"), Some(b), Some(v)) => {
                    completed.push((b.parse().unwrap(), v.parse().unwrap()));
                }
                (Some("F"), Some(id), None) => {
                    at_flush.insert(id.parse().unwrap(), completed.len());
                }
                (Some("A"), Some(id), None) => {
                    let id: u64 = id.parse().unwrap();
                    let upto = at_flush[&id];
                    for &(b, v) in &completed[..upto] {
                        let r = seen.required.entry(b).or_default();
                        *r = (*r).max(v);
                    }
                    seen.acks += 1;
                    if seen.acks == kill_after && !killed {
                        child.kill().unwrap(); // SIGKILL
                        killed = true;
                    }
                }
                _ => {} // the test harness's own lines
            }
        }
        let status = child.wait().unwrap();
        assert!(killed, "round {round}: the child ended by itself: {status}");
        assert!(seen.acks >= kill_after);
        for (b, v) in seen.required {
            let r = required.entry(b).or_default();
            *r = (*r).max(v);
        }

        let disk = Disk::open(&dir, opts()).unwrap();
        let now = disk.now();
        let mut buf = vec![0u8; BS];
        let mut checked = 0;
        for block in 0..BLOCKS {
            now.read_at(&mut buf, block * BS as u64).unwrap();
            let got = decode(block, &buf);
            let Some(got) = got else {
                panic!("round {round}: block {block} holds no whole version of itself");
            };
            if let Some(&want) = required.get(&block) {
                assert!(
                    got >= want,
                    "round {round}: block {block} reads version {got}, but version {want} \
                     was written before an acknowledged flush"
                );
                checked += 1;
            }
        }
        assert!(checked > 0);
        drop(now);
        drop(disk);
    }
}
