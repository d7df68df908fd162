//! The examples in `examples/` run and succeed: each builds a real disk, drives the journal
//! API (a custom merge strategy in `custom_strategy`), compares every read with a model and
//! exits nonzero on any mismatch. Run through `cargo run --release --example`, so the test
//! works whatever targets the test run built.

use std::process::Command;

fn run_example(name: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "--example",
            name,
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("running cargo");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "example {name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{name}: OK")), "{stdout}");
    stdout
}

#[test]
fn journal_api_example_runs() {
    let out = run_example("journal_api");
    assert!(out.contains("monday reads as written"), "{out}");
    assert!(out.contains("deleted [\"monday\"]"), "{out}");
    assert!(out.contains("(compact-into-child): copied"), "{out}");
    assert!(out.contains("check clean"), "{out}");
}

#[test]
fn custom_strategy_example_runs() {
    let out = run_example("custom_strategy");
    assert!(
        out.contains("merge") && out.contains("by absorb-into-child: copied"),
        "{out}"
    );
    // The custom strategy copied only the deleted checkpoint's 48 live blocks.
    assert!(
        out.contains("absorb-into-child copied 196608 bytes, compact-into-child"),
        "{out}"
    );
}
