//! `strata disk ...`: offline operations on a disk directory.

use std::path::Path;
use std::process::ExitCode;

use journal::{CacheMode, Disk, OpenOptions};

use crate::cli::DiskCommand;
use crate::size::parse_size;
use crate::{Error, Result};

fn open(dir: &Path, read_only: bool) -> Result<Disk> {
    Ok(Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only,
        },
    )?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Bytes as B, KiB, MiB, GiB or TiB with one decimal.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Runs one offline disk command.
pub fn run(cmd: DiskCommand) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Create { disk, size, base } => {
            let size = match (size, &base) {
                (Some(s), _) => parse_size(&s)?,
                (None, Some(b)) => std::fs::metadata(b)
                    .map_err(|e| Error::io(format!("base image {}", b.display()), e))?
                    .len(),
                (None, None) => {
                    return Err(Error::Usage("--size is required without --base".into()))
                }
            };
            Disk::create(&disk, size, base.as_deref())?;
            println!("created {} ({})", disk.display(), human(size));
        }
        DiskCommand::Info { disk, json } => {
            let d = open(&disk, true)?;
            let info = d.info()?;
            if json {
                print_json(&info)?;
            } else {
                println!("disk:         {}", info.path.display());
                println!("size:         {} ({} bytes)", human(info.size), info.size);
                println!("block size:   {}", info.block_size);
                match &info.base {
                    Some(b) => println!("base:         {}", b.display()),
                    None => println!("base:         (none)"),
                }
                println!("checkpoints:  {}", info.checkpoints);
                println!(
                    "Now parent:   {}",
                    info.now_parent.as_deref().unwrap_or("(base)")
                );
                println!("depth:        {} layers", info.depth);
                if let Some(why) = &info.now_unreadable {
                    println!("Now:          cannot be read: {why}");
                }
                println!("Now data:     {}", human(info.now_bytes));
                println!("allocated:    {}", human(info.allocated_bytes));
                println!(
                    "index:        {} blocks, {}",
                    info.index_blocks,
                    human(info.index_bytes as u64)
                );
            }
        }
        DiskCommand::Checkpoint { disk, name } => {
            let mut d = open(&disk, false)?;
            let c = d.checkpoint(&name)?;
            println!("checkpoint {:?} created (id {})", c.name, c.id);
        }
        DiskCommand::Tree { disk, json } => {
            let d = open(&disk, true)?;
            if json {
                print_json(&d.tree_json())?;
            } else {
                print!("{}", d.tree_text());
            }
        }
        DiskCommand::Apply {
            disk,
            name,
            save_current,
        } => {
            let mut d = open(&disk, false)?;
            d.apply(&name, save_current.as_deref())?;
            match save_current {
                Some(s) => println!("saved Now as {s:?}; Now is a fresh child of {name:?}"),
                None => println!("Now is a fresh child of {name:?}"),
            }
        }
        DiskCommand::Delete {
            disk,
            name,
            subtree,
            merge,
        } => {
            let opts = crate::merge_worker::delete_options(
                subtree,
                merge.strategy.as_deref(),
                merge.rate,
            )?;
            let mut d = open(&disk, false)?;
            let start = std::time::Instant::now();
            let (r, jobs) = d.delete_online(&name, &opts)?;
            let gone = start.elapsed();
            if r.kept_for_readers > 0 {
                println!(
                    "{} merged layers are in use by a reader: their overwritten blocks stay allocated",
                    r.kept_for_readers
                );
            }
            println!(
                "deleted {} in {:.1} ms ({} merged, {} kept hidden for their children, {} freed); {} merges to run",
                r.deleted
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                gone.as_secs_f64() * 1000.0,
                r.merged,
                r.hidden,
                human(r.bytes_freed),
                jobs.len()
            );
            let mut display = crate::merge_progress::Display::new();
            let reports = crate::merge_progress::run_offline(&mut d, jobs, &opts, &mut display)?;
            if !reports.is_empty() {
                let copied: u64 = reports.iter().map(|r| r.bytes_copied).sum();
                let freed: u64 = reports.iter().map(|r| r.bytes_freed).sum();
                println!(
                    "merged: {} merges, {} copied, {} freed, {:.1} s in all",
                    reports.len(),
                    human(copied),
                    human(freed),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        DiskCommand::Rename {
            disk,
            name,
            new_name,
        } => {
            let mut d = open(&disk, false)?;
            d.rename(&name, &new_name)?;
            println!("renamed {name:?} to {new_name:?}");
        }
        DiskCommand::Export { disk, name, output } => {
            let d = open(&disk, true)?;
            d.export(name.as_deref(), &output)?;
            println!(
                "exported {} to {}",
                name.as_deref().unwrap_or("Now"),
                output.display()
            );
        }
        DiskCommand::Check { disk } => {
            let d = open(&disk, true)?;
            let r = d.check()?;
            for p in &r.problems {
                println!("damaged: {p}");
            }
            for s in &r.skipped {
                println!("skipped: {s}");
            }
            for n in &r.notes {
                println!("note: {n}");
            }
            println!(
                "{} layers, {} blocks checked: {}",
                r.layers_checked,
                r.blocks_checked,
                if r.is_clean() {
                    "clean".to_string()
                } else {
                    format!("{} problems", r.problems.len())
                }
            );
            if !r.is_clean() {
                return Ok(ExitCode::from(2));
            }
        }
        DiskCommand::Serve(_) => {
            return Err(Error::Usage("serve is handled by the NBD server".into()))
        }
    }
    Ok(ExitCode::SUCCESS)
}
