//! The fuzzing loop: runs a target's seed corpus, then mutated corpus inputs, for a bounded
//! time or number of executions. A panic is a crash; an input that runs longer than the
//! per-input timeout is a hang. Either saves the input under `artifacts/<target>/` and fails.
//!
//! There is no coverage feedback (libFuzzer and AFL need nightly-only instrumentation here):
//! the targets are structure-aware instead, decoding their input with `arbitrary` so that
//! random bytes and byte-level mutations of the seeds turn into plausible, hostile inputs.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rng::Rng;
use crate::targets::Target;

/// Longest input the mutator produces.
pub const MAX_INPUT: usize = 64 << 10;

/// How one target is run.
#[derive(Clone, Debug)]
pub struct Budget {
    pub time: Duration,
    /// Stop after this many executions (whichever of time and count comes first).
    pub max_execs: u64,
    /// An input running longer than this is a hang.
    pub timeout: Duration,
    pub seed: u64,
}

/// What one run found.
#[derive(Debug)]
pub struct Outcome {
    pub execs: u64,
    pub elapsed: Duration,
    /// Path of the saved crashing input, if any.
    pub crash: Option<PathBuf>,
}

/// The input being run, for the watchdog to save on a hang.
struct Current {
    input: Mutex<Vec<u8>>,
    /// Milliseconds since `epoch` when the current input started; 0 when idle.
    started_ms: AtomicU64,
    done: AtomicBool,
}

/// Loads `dir`'s files as seeds; the target's built-in seeds when the directory is empty.
pub fn load_corpus(target: &Target, dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut corpus: Vec<Vec<u8>> = files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .map(|mut v| {
            v.truncate(MAX_INPUT);
            v
        })
        .collect();
    if corpus.is_empty() {
        corpus = (target.seeds)();
    }
    corpus
}

/// Saves `input` as `artifacts/<target>/<kind>-<crc>` and returns the path.
pub fn save_artifact(artifacts: &Path, target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = artifacts.join(target);
    let path = dir.join(format!("{kind}-{:08x}", crc32c::crc32c(input)));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        eprintln!("fuzz: could not save {}: {e}", path.display());
    }
    path
}

/// Runs one input, turning a panic into its message.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

/// Fuzzes `target` within `budget`, starting from `corpus`.
pub fn fuzz(target: &Target, corpus: &[Vec<u8>], budget: &Budget, artifacts: &Path) -> Outcome {
    let epoch = Instant::now();
    let current = Arc::new(Current {
        input: Mutex::new(Vec::new()),
        started_ms: AtomicU64::new(0),
        done: AtomicBool::new(false),
    });
    let watchdog = {
        let current = current.clone();
        let timeout = budget.timeout;
        let artifacts = artifacts.to_path_buf();
        let name = target.name;
        std::thread::spawn(move || watch(&current, epoch, timeout, &artifacts, name))
    };

    let last_input = target.keep_last_input.then(|| {
        let dir = artifacts.join(target.name);
        let _ = std::fs::create_dir_all(&dir);
        dir.join("last-input")
    });
    let mut rng = Rng::new(budget.seed);
    let mut execs = 0u64;
    let mut crash = None;
    let mut scratch = Vec::new();
    // The corpus as is first (regressions), then mutations until the budget is spent.
    let mut seeds = corpus.iter();
    loop {
        let input: &[u8] = match seeds.next() {
            Some(s) => s,
            None => {
                if epoch.elapsed() >= budget.time || execs >= budget.max_execs {
                    break;
                }
                scratch.clear();
                mutate(&mut rng, corpus, &mut scratch);
                &scratch
            }
        };
        if let Some(p) = &last_input {
            // Best effort: losing it only loses the reproducer of a process-killing input.
            let _ = std::fs::write(p, input);
        }
        {
            let mut cur = current.input.lock().unwrap_or_else(|e| e.into_inner());
            cur.clear();
            cur.extend_from_slice(input);
        }
        current
            .started_ms
            .store(ms_since(epoch).max(1), Ordering::SeqCst);
        let result = run_one(target, input);
        current.started_ms.store(0, Ordering::SeqCst);
        execs += 1;
        if let Err(msg) = result {
            let path = save_artifact(artifacts, target.name, "crash", input);
            eprintln!(
                "fuzz: {}: CRASH after {execs} executions: {msg}\nfuzz: {}: input saved to {} \
                 (replay: strata-fuzz replay {} {})",
                target.name,
                target.name,
                path.display(),
                target.name,
                path.display()
            );
            crash = Some(path);
            break;
        }
    }
    // Still in place only when an input killed the process (a panic saved its own file).
    if let Some(p) = &last_input {
        let _ = std::fs::remove_file(p);
    }
    current.done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    Outcome {
        execs,
        elapsed: epoch.elapsed(),
        crash,
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Ends the process (exit status 3) when one input has run longer than `timeout`.
fn watch(current: &Current, epoch: Instant, timeout: Duration, artifacts: &Path, name: &str) {
    let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    while !current.done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let started = current.started_ms.load(Ordering::SeqCst);
        if started != 0 && ms_since(epoch).saturating_sub(started) > limit {
            let input = current
                .input
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let path = save_artifact(artifacts, name, "hang", &input);
            eprintln!(
                "fuzz: {name}: HANG: one input ran longer than {timeout:?}\nfuzz: {name}: input \
                 saved to {} (replay: strata-fuzz replay {name} {})",
                path.display(),
                path.display()
            );
            std::process::exit(3);
        }
    }
}

/// Interesting values for overwrites: boundaries of every integer width.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    15,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    511,
    512,
    4095,
    4096,
    4097,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 52,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// Builds a mutated input in `out` from a random corpus entry.
pub fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
    if corpus.is_empty() || rng.below(16) == 0 {
        // Fresh random bytes now and then.
        let n = rng.below(512) as usize;
        out.extend((0..n).map(|_| rng.next() as u8));
        return;
    }
    out.extend_from_slice(&corpus[rng.below(corpus.len() as u64) as usize]);
    let rounds = 1 + rng.below(4).min(rng.below(8));
    for _ in 0..rounds {
        mutate_once(rng, corpus, out);
    }
    out.truncate(MAX_INPUT);
}

fn mutate_once(rng: &mut Rng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
    let len = out.len() as u64;
    let pos = |rng: &mut Rng| if len == 0 { 0 } else { rng.below(len) as usize };
    match rng.below(10) {
        0 if len > 0 => {
            let p = pos(rng);
            out[p] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let p = pos(rng);
            out[p] = rng.next() as u8;
        }
        2 => {
            // Overwrite with an interesting value of 1, 2, 4 or 8 bytes, either endianness.
            let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
            let width = 1usize << rng.below(4);
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let src = if rng.below(2) == 0 {
                &bytes[..width]
            } else {
                &bytes[8 - width..]
            };
            let p = pos(rng).min(out.len().saturating_sub(width));
            for (i, b) in src.iter().enumerate() {
                if let Some(x) = out.get_mut(p + i) {
                    *x = *b;
                } else {
                    out.push(*b);
                }
            }
        }
        3 => {
            let p = pos(rng);
            let n = 1 + rng.below(16) as usize;
            let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            out.splice(p..p, fill);
        }
        4 if len > 0 => {
            let p = pos(rng);
            let n = (1 + rng.below(32) as usize).min(out.len() - p);
            out.drain(p..p + n);
        }
        5 if len > 0 => {
            // Duplicate a range.
            let p = pos(rng);
            let n = (1 + rng.below(64) as usize).min(out.len() - p);
            let chunk = out[p..p + n].to_vec();
            let q = pos(rng);
            out.splice(q..q, chunk);
        }
        6 if len > 0 => {
            out.truncate(pos(rng));
        }
        7 => {
            // Splice in part of another corpus entry.
            let other = &corpus[rng.below(corpus.len() as u64) as usize];
            if !other.is_empty() {
                let a = rng.below(other.len() as u64) as usize;
                let b = a + rng.below((other.len() - a) as u64 + 1) as usize;
                let p = pos(rng);
                out.truncate(p);
                out.extend_from_slice(&other[a..b]);
            }
        }
        8 if len > 1 => {
            // Swap two bytes.
            let (a, b) = (pos(rng), pos(rng));
            out.swap(a, b);
        }
        _ => {
            let p = pos(rng);
            if let Some(x) = out.get_mut(p) {
                *x = x.wrapping_add(rng.below(33) as u8).wrapping_sub(16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_bounded_and_vary() {
        let corpus = vec![vec![7u8; 100], b"hello world".to_vec()];
        let mut rng = Rng::new(1);
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..2000 {
            let mut out = Vec::new();
            mutate(&mut rng, &corpus, &mut out);
            assert!(out.len() <= MAX_INPUT);
            distinct.insert(out);
        }
        assert!(distinct.len() > 1000, "only {} distinct", distinct.len());
    }
}
