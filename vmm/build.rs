//! Builds the built-in test guest (`guest/`) into `$OUT_DIR/test_guest.bin` with the host's
//! gcc, ld and objcopy, and a host program `$OUT_DIR/guest_logic_check` (the guest's pure logic
//! compiled for the host) that the unit tests use to check the Rust side against the guest.
//!
//! Tools can be overridden with `STRATA_GUEST_CC`, `STRATA_GUEST_LD`, `STRATA_GUEST_OBJCOPY`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest sources, in link order (the entry stub first: the image starts with `_start`).
const GUEST_OBJECTS: &[&str] = &["entry.S", "logic.c", "virtio.c", "main.c", "rt.c"];
/// Every file of `guest/` the outputs depend on.
const GUEST_FILES: &[&str] = &[
    "entry.S",
    "logic.c",
    "virtio.c",
    "main.c",
    "rt.c",
    "logic.h",
    "virtio.h",
    "layout.h",
    "guest.ld",
    "host_check.c",
];

const GUEST_CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
];

const INSTALL_HINT: &str = "building the Strata test guest needs gcc and binutils (as, ld, \
                            objcopy) for x86-64; on Debian: apt-get install gcc binutils";

fn main() {
    if let Err(e) = build() {
        eprintln!("error: vmm build script: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest =
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?;
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let src = Path::new(&manifest).join("guest");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=guest");
    for f in GUEST_FILES {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    for var in ["STRATA_GUEST_CC", "STRATA_GUEST_LD", "STRATA_GUEST_OBJCOPY"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        return Err(format!(
            "the test guest is x86-64 code and is built with the host toolchain, but the target \
             architecture is {arch:?}"
        ));
    }
    let cc = env::var("STRATA_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("STRATA_GUEST_LD").unwrap_or_else(|_| "ld".into());
    let objcopy = env::var("STRATA_GUEST_OBJCOPY").unwrap_or_else(|_| "objcopy".into());

    let mut objects = Vec::new();
    for name in GUEST_OBJECTS {
        let obj = out.join(format!("guest_{name}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(GUEST_CFLAGS)
            .arg("-c")
            .arg(src.join(name))
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &cc)?;
        objects.push(obj);
    }
    let elf = out.join("test_guest.elf");
    let mut cmd = Command::new(&ld);
    cmd.args(["-nostdlib", "-static", "-z", "noexecstack", "-T"])
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .args(&objects);
    run(&mut cmd, &ld)?;
    let bin = out.join("test_guest.bin");
    let mut cmd = Command::new(&objcopy);
    cmd.args(["-O", "binary"]).arg(&elf).arg(&bin);
    run(&mut cmd, &objcopy)?;
    let len = std::fs::metadata(&bin)
        .map_err(|e| format!("{}: {e}", bin.display()))?
        .len();
    if len == 0 || len > 1 << 20 {
        return Err(format!("test guest image has a bad size ({len} bytes)"));
    }

    let check = out.join("guest_logic_check");
    let mut cmd = Command::new(&cc);
    cmd.args(["-O2", "-std=gnu11", "-Wall", "-Wextra", "-o"])
        .arg(&check)
        .arg(src.join("host_check.c"))
        .arg(src.join("logic.c"));
    run(&mut cmd, &cc)
}

/// Runs a tool; a missing tool or a failure becomes an error with its output, warnings are
/// passed on to cargo.
fn run(cmd: &mut Command, tool: &str) -> Result<(), String> {
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `{tool}` ({e}); {INSTALL_HINT}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("`{cmd:?}` failed ({}):\n{stderr}", output.status));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=test guest: {line}");
    }
    Ok(())
}
