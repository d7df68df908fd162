//! `strata-fuzz`: bounded fuzzing of every Strata parser of untrusted input on the stable
//! toolchain. See `README.md`.
//!
//! ```text
//! strata-fuzz run [--time SECS] [--execs N] [--timeout SECS] [--seed N] [TARGET...]
//! strata-fuzz replay TARGET FILE...
//! strata-fuzz seed [TARGET...]
//! strata-fuzz list
//! ```

mod disk;
mod driver;
mod rng;
mod targets;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use driver::Budget;
use targets::{Target, ALL};

fn usage() -> ExitCode {
    eprintln!(
        "usage: strata-fuzz run [--time SECS] [--execs N] [--timeout SECS] [--seed N] [TARGET...]\n\
         \x20      strata-fuzz replay TARGET FILE...\n\
         \x20      strata-fuzz seed [TARGET...]\n\
         \x20      strata-fuzz list"
    );
    ExitCode::from(2)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_dir(t: &Target) -> PathBuf {
    root().join("corpus").join(t.name)
}

fn artifacts_dir() -> PathBuf {
    root().join("artifacts")
}

fn targets_named(names: &[String]) -> Result<Vec<&'static Target>, String> {
    if names.is_empty() {
        return Ok(ALL.iter().collect());
    }
    names
        .iter()
        .map(|n| targets::find(n).ok_or_else(|| format!("unknown target {n:?} (see `list`)")))
        .collect()
}

struct RunArgs {
    budget: Budget,
    names: Vec<String>,
}

fn parse_run(args: &[String]) -> Result<RunArgs, String> {
    let mut budget = Budget {
        time: Duration::from_secs(20),
        max_execs: u64::MAX,
        timeout: Duration::from_secs(10),
        seed: 1,
    };
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |what: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--time" => budget.time = Duration::from_secs(val("--time")?),
            "--execs" => budget.max_execs = val("--execs")?,
            "--timeout" => budget.timeout = Duration::from_secs(val("--timeout")?),
            "--seed" => budget.seed = val("--seed")?,
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => names.push(s.to_string()),
        }
    }
    Ok(RunArgs { budget, names })
}

/// Runs each target in its own child process (an abort or the memory limit ends only that
/// target), then prints one line per target and a summary.
fn run_all(args: &[String]) -> Result<ExitCode, String> {
    let RunArgs { budget, names } = parse_run(args)?;
    let targets = targets_named(&names)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
    // Every child works under this directory, removed at the end even if a child aborted.
    let scratch = disk::scratch_root().to_path_buf();
    let mut failed = Vec::new();
    let mut total = 0u64;
    for t in &targets {
        let out = Command::new(&exe)
            .arg("one")
            .args(["--time", &budget.time.as_secs().to_string()])
            .args(["--execs", &budget.max_execs.to_string()])
            .args(["--timeout", &budget.timeout.as_secs().to_string()])
            .args(["--seed", &budget.seed.to_string()])
            .arg(t.name)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .env("STRATA_FUZZ_TMP", &scratch)
            .output()
            .map_err(|e| format!("starting {}: {e}", t.name))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let execs: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("execs="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        total += execs;
        let status = if out.status.success() {
            "ok".to_string()
        } else {
            failed.push(t.name);
            let last = artifacts_dir().join(t.name).join("last-input");
            if t.keep_last_input && last.exists() {
                eprintln!(
                    "fuzz: {}: the input that was running is saved in {}",
                    t.name,
                    last.display()
                );
            }
            format!("FAILED ({})", out.status)
        };
        println!(
            "fuzz: {:<14} {status}: {execs} executions ({}); {}",
            t.name,
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("rate="))
                .unwrap_or("?"),
            t.about
        );
    }
    disk::remove_scratch();
    println!(
        "fuzz summary: {} of {} targets clean, {total} executions, seed {}{}",
        targets.len() - failed.len(),
        targets.len(),
        budget.seed,
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", failed.join(", "))
        }
    );
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Caps the address space so that an input that makes the code allocate without bound ends
/// this target with an allocation failure instead of the machine's OOM killer.
fn limit_memory() {
    let lim = libc::rlimit {
        rlim_cur: 8 << 30,
        rlim_max: 8 << 30,
    };
    // SAFETY: passes a valid rlimit by pointer; setrlimit only reads it.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
}

fn run_one_target(args: &[String]) -> Result<ExitCode, String> {
    let RunArgs { budget, names } = parse_run(args)?;
    let [name] = names.as_slice() else {
        return Err("`one` takes exactly one target".into());
    };
    let t = targets::find(name).ok_or_else(|| format!("unknown target {name:?}"))?;
    limit_memory();
    let corpus = driver::load_corpus(t, &corpus_dir(t));
    let out = driver::fuzz(t, &corpus, &budget, &artifacts_dir());
    disk::remove_scratch();
    let secs = out.elapsed.as_secs_f64().max(1e-9);
    println!("execs={}", out.execs);
    println!("rate={:.0}/s over {:.1} s", out.execs as f64 / secs, secs);
    Ok(if out.crash.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn replay(args: &[String]) -> Result<ExitCode, String> {
    let (name, files) = args.split_first().ok_or("replay needs a target")?;
    let t = targets::find(name).ok_or_else(|| format!("unknown target {name:?}"))?;
    let mut bad = 0;
    for f in files {
        let input = std::fs::read(f).map_err(|e| format!("{f}: {e}"))?;
        match driver::run_one(t, &input) {
            Ok(()) => println!("{f}: ok"),
            Err(msg) => {
                println!("{f}: PANIC: {msg}");
                bad += 1;
            }
        }
    }
    disk::remove_scratch();
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn seed(args: &[String]) -> Result<ExitCode, String> {
    for t in targets_named(args)? {
        let dir = corpus_dir(t);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (i, s) in (t.seeds)().iter().enumerate() {
            let p = dir.join(format!("seed-{i:03}"));
            write(&p, s)?;
        }
        println!("{}: seeds written to {}", t.name, dir.display());
    }
    disk::remove_scratch();
    Ok(ExitCode::SUCCESS)
}

fn write(p: &Path, data: &[u8]) -> Result<(), String> {
    std::fs::write(p, data).map_err(|e| format!("{}: {e}", p.display()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return usage();
    };
    let r = match cmd.as_str() {
        "run" => run_all(rest),
        "one" => run_one_target(rest),
        "replay" => replay(rest),
        "seed" => seed(rest),
        "list" => {
            for t in ALL {
                println!("{:<14} {}", t.name, t.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => return usage(),
    };
    r.unwrap_or_else(|e| {
        eprintln!("strata-fuzz: {e}");
        ExitCode::from(2)
    })
}
