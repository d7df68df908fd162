//! Driving Strata's journal directly, without the CLI or a server: create a disk, write,
//! take checkpoints, read a checkpoint while Now moves on, delete a checkpoint (an online
//! delete: the tree commit, then its merge jobs run and swapped in), and check every
//! record and checksum. Every read is compared with an in-memory model of what each view
//! must hold; any difference exits nonzero.
//!
//!     cargo run --release --example journal_api [-- DIR]
//!
//! DIR (default: a fresh temporary directory) must not hold a disk yet.

mod common;

use std::process::ExitCode;

use common::{compare, e, open, run_jobs, verify, write, Model, DISK_SIZE};
use journal::{DeleteOptions, Disk, StrategyKind};

fn run(dir: &std::path::Path) -> Result<(), String> {
    Disk::create(dir, DISK_SIZE, None).map_err(e("create"))?;
    let mut disk = open(dir, false)?;
    println!("created {} ({} MiB)", dir.display(), DISK_SIZE >> 20);

    // Three generations of data, a checkpoint after each of the first two.
    let mut now_model = Model::new();
    write(&disk.now(), &mut now_model, 0, 256, 0x11).map_err(e("write"))?;
    disk.checkpoint("monday").map_err(e("checkpoint"))?;
    let monday = now_model.clone();
    write(&disk.now(), &mut now_model, 128, 256, 0x22).map_err(e("write"))?;
    disk.checkpoint("tuesday").map_err(e("checkpoint"))?;
    let tuesday = now_model.clone();
    write(&disk.now(), &mut now_model, 300, 64, 0x33).map_err(e("write"))?;
    for name in disk.list().iter().map(|c| c.name.clone()) {
        println!("checkpoint {name}");
    }

    // A checkpoint reads as it was, while Now has moved on.
    let n = compare(
        disk.checkpoint_view("monday").map_err(e("view"))?,
        &monday,
        "monday",
    )?;
    println!("monday reads as written ({n} blocks compared)");
    compare(
        disk.checkpoint_view("tuesday").map_err(e("view"))?,
        &tuesday,
        "tuesday",
    )?;
    compare(disk.now(), &now_model, "Now")?;

    // Delete monday online: the tree changes at once, the jobs move data afterwards.
    let opts = DeleteOptions::with(StrategyKind::CompactIntoChild);
    let (report, jobs) = disk.delete_online("monday", &opts).map_err(e("delete"))?;
    if disk.list().iter().any(|c| c.name == "monday") {
        return Err("monday is still listed after delete_online".into());
    }
    println!(
        "deleted {:?}; {} merge job(s) to run",
        report.deleted,
        jobs.len()
    );
    let mut copied = 0;
    for r in run_jobs(&mut disk, jobs)? {
        println!(
            "merge {} ({}): copied {} bytes, freed {} bytes, {} -> {} layer files",
            r.id, r.strategy, r.bytes_copied, r.bytes_freed, r.layers_before, r.layers_after
        );
        copied += r.bytes_copied;
    }
    if copied == 0 {
        return Err("compact-into-child copied nothing".into());
    }
    // Everything still reads and checks out, also after closing and reopening.
    let check = verify(disk, &[("tuesday", &tuesday)], &now_model)?;
    println!(
        "check clean: {} layers, {} blocks verified",
        check.layers_checked, check.blocks_checked
    );
    Ok(())
}

fn main() -> ExitCode {
    let arg = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let result =
        common::tempdir().and_then(|tmp| run(&arg.unwrap_or_else(|| tmp.path().join("disk"))));
    common::finish("journal_api", result)
}
