//! Driving Strata's journal directly, without the CLI or a server: create a disk, write,
//! take checkpoints, read a checkpoint while Now moves on, delete a checkpoint (an online
//! delete: the tree commit, then its merge jobs run and swapped in), and check every
//! record and checksum. Every read is compared with an in-memory model of what each view
//! must hold; any difference exits nonzero.
//!
//!     cargo run --release --example journal_api [-- DIR]
//!
//! DIR (default: a fresh temporary directory) must not hold a disk yet.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use journal::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind, Volume, BLOCK_SIZE};

/// What a view holds: block number -> fill byte (missing = never written, reads as zero).
type Model = BTreeMap<u64, u8>;

const DISK_SIZE: u64 = 64 << 20;

fn write(
    now: &Volume,
    model: &mut Model,
    first_block: u64,
    blocks: u64,
    byte: u8,
) -> journal::Result<()> {
    let data = vec![byte; (blocks * BLOCK_SIZE) as usize];
    now.write_at(&data, first_block * BLOCK_SIZE, false)?;
    for b in first_block..first_block + blocks {
        model.insert(b, byte);
    }
    Ok(())
}

/// Reads every block the model knows plus a few never-written ones and compares.
fn compare(view: Arc<Volume>, model: &Model, what: &str) -> Result<usize, String> {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let untouched = (0..DISK_SIZE / BLOCK_SIZE)
        .step_by(997)
        .filter(|b| !model.contains_key(b));
    let blocks: Vec<u64> = model.keys().copied().chain(untouched).collect();
    for &b in &blocks {
        view.read_at(&mut buf, b * BLOCK_SIZE)
            .map_err(|e| format!("{what}: reading block {b}: {e}"))?;
        let want = model.get(&b).copied().unwrap_or(0);
        if let Some(i) = buf.iter().position(|&x| x != want) {
            return Err(format!(
                "{what}: block {b} byte {i} reads {:#04x}, expected {want:#04x}",
                buf[i]
            ));
        }
    }
    Ok(blocks.len())
}

fn run(dir: &std::path::Path) -> Result<(), String> {
    let e = |what: &'static str| move |err: journal::Error| format!("{what}: {err}");
    Disk::create(dir, DISK_SIZE, None).map_err(e("create"))?;
    let mut disk = Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .map_err(e("open"))?;
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
    let cancel = AtomicBool::new(false);
    let mut copied = 0;
    for mut job in jobs {
        job.run(&cancel).map_err(e("merge"))?;
        let r = disk.finish_merge(job).map_err(e("finish merge"))?;
        println!(
            "merge {} ({}): copied {} bytes, freed {} bytes, {} -> {} layer files",
            r.id, r.strategy, r.bytes_copied, r.bytes_freed, r.layers_before, r.layers_after
        );
        copied += r.bytes_copied;
    }
    if copied == 0 {
        return Err("compact-into-child copied nothing".into());
    }
    compare(
        disk.checkpoint_view("tuesday").map_err(e("view"))?,
        &tuesday,
        "tuesday after the delete",
    )?;
    compare(disk.now(), &now_model, "Now after the delete")?;

    // Everything still checks out, also after closing and reopening.
    let check = disk.check().map_err(e("check"))?;
    if !check.is_clean() {
        return Err(format!("check found problems: {:?}", check.problems));
    }
    drop(disk);
    let disk = Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: true,
        },
    )
    .map_err(e("reopen"))?;
    compare(
        disk.checkpoint_view("tuesday").map_err(e("view"))?,
        &tuesday,
        "tuesday after reopening",
    )?;
    compare(disk.now(), &now_model, "Now after reopening")?;
    let check = disk.check().map_err(e("check"))?;
    if !check.is_clean() {
        return Err(format!("check after reopening: {:?}", check.problems));
    }
    println!(
        "check clean: {} layers, {} blocks verified",
        check.layers_checked, check.blocks_checked
    );
    Ok(())
}

fn main() -> ExitCode {
    let arg = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(err) => {
            eprintln!("journal_api: creating a temporary directory: {err}");
            return ExitCode::FAILURE;
        }
    };
    let dir = arg.unwrap_or_else(|| tmp.path().join("disk"));
    match run(&dir) {
        Ok(()) => {
            println!("journal_api: OK");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("journal_api: FAILED: {msg}");
            ExitCode::FAILURE
        }
    }
}
