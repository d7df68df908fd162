//! A merge strategy of your own, plugged into a delete.
//!
//! `AbsorbIntoChild` moves the deleted checkpoint's live blocks into its child's newest
//! sealed layer (only the blocks the child did not overwrite are copied; the child's own
//! data stays where it is). The built-in `compact-into-child` instead rewrites the whole
//! stack into a new layer. This example builds the same disk twice (a small checkpoint
//! under a big one), deletes the small one with each strategy, compares the bytes each
//! copied, and checks that every checkpoint and Now read exactly as before. Any mismatch
//! exits nonzero.
//!
//!     cargo run --release --example custom_strategy

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use common::{e, open, run_jobs, verify, Model, DISK_SIZE};
use journal::{
    DeleteOptions, Disk, MergeReport, Move, Placement, Situation, Strategy, StrategyKind, Volume,
    BLOCK_SIZE,
};

/// The research strategy: absorb the deleted layers into the child's newest sealed layer.
struct AbsorbIntoChild;

impl Strategy for AbsorbIntoChild {
    fn name(&self) -> &str {
        "absorb-into-child"
    }

    fn plan(&self, s: &Situation) -> Vec<Move> {
        // The stack that received the deleted checkpoint's layers (None when it stays as a
        // hidden node shared by several children: nothing to do then).
        let Some(stack) = s.target.and_then(|t| s.stack(t)) else {
            return Vec::new();
        };
        if stack.busy || stack.sealed < 2 {
            return Vec::new();
        }
        println!(
            "  {} sees stack {:?}: {} layers ({} sealed), {} records, garbage {:.0}%",
            self.name(),
            stack.at,
            stack.layers.len(),
            stack.sealed,
            stack.records(),
            stack.garbage() * 100.0
        );
        vec![Move {
            stack: stack.at,
            first: 0,
            len: stack.sealed,
            placement: Placement::Absorb(stack.sealed - 1),
        }]
    }
}

/// Writes each of `blocks` (one write per block) as `byte`, in the disk and the model.
fn write(
    now: &Volume,
    m: &mut Model,
    blocks: impl Iterator<Item = u64>,
    byte: u8,
) -> journal::Result<()> {
    for b in blocks {
        common::write(now, m, b, 1, byte)?;
    }
    Ok(())
}

/// The disk: `small` (64 scattered blocks) under `big` (2048 blocks, overwriting 16 of
/// small's), Now on top with a few writes. Returns the models of big and Now.
fn build(dir: &Path) -> Result<(Model, Model), String> {
    Disk::create(dir, DISK_SIZE, None).map_err(e("create"))?;
    let mut disk = open(dir, false)?;
    let mut m = Model::new();
    write(&disk.now(), &mut m, (0..64).map(|i| i * 97), 0x51).map_err(e("write"))?;
    disk.checkpoint("small").map_err(e("checkpoint"))?;
    write(
        &disk.now(),
        &mut m,
        (0..16).map(|i| i * 97).chain(8192..8192 + 2032),
        0x52,
    )
    .map_err(e("write"))?;
    disk.checkpoint("big").map_err(e("checkpoint"))?;
    let big = m.clone();
    write(&disk.now(), &mut m, 4000..4010, 0x53).map_err(e("write"))?;
    Ok((big, m))
}

/// Deletes `small` with `opts`, runs the merge jobs, and verifies every view (before and
/// after reopening) and the disk's checksums.
fn delete_and_verify(
    dir: &Path,
    opts: &DeleteOptions,
    big: &Model,
    now: &Model,
) -> Result<Vec<MergeReport>, String> {
    let mut disk = open(dir, false)?;
    let (_, jobs) = disk.delete_online("small", opts).map_err(e("delete"))?;
    let reports = run_jobs(&mut disk, jobs)?;
    if disk.list().iter().any(|c| c.name == "small") {
        return Err("small is still listed".into());
    }
    verify(disk, &[("big", big)], now)?;
    Ok(reports)
}

fn copied(reports: &[MergeReport]) -> u64 {
    reports.iter().map(|r| r.bytes_copied).sum()
}

fn run(root: &Path) -> Result<(), String> {
    let custom = DeleteOptions {
        custom: Some(Arc::new(AbsorbIntoChild)),
        ..DeleteOptions::default()
    };
    let builtin = DeleteOptions::with(StrategyKind::CompactIntoChild);
    let mut results = Vec::new();
    for (label, opts) in [
        ("absorb-into-child", &custom),
        ("compact-into-child", &builtin),
    ] {
        let dir = root.join(label);
        let (big, now) = build(&dir)?;
        println!("{label}: deleting checkpoint small");
        let reports = delete_and_verify(&dir, opts, &big, &now)?;
        for r in &reports {
            println!(
                "  merge {} by {}: copied {} bytes, freed {} bytes, layer files {} -> {}",
                r.id, r.strategy, r.bytes_copied, r.bytes_freed, r.layers_before, r.layers_after
            );
        }
        if reports.is_empty() || reports.iter().any(|r| r.strategy != label) {
            return Err(format!("{label}: expected merge jobs run by {label}"));
        }
        println!("  every view reads as before; check clean");
        results.push(copied(&reports));
    }
    // small held 64 blocks, 16 of them overwritten by big: at most 48 live blocks to move.
    let (mine, theirs) = (results[0], results[1]);
    if mine == 0 || mine > 48 * BLOCK_SIZE {
        return Err(format!(
            "absorb-into-child copied {mine} bytes, expected 1..={}",
            48 * BLOCK_SIZE
        ));
    }
    if mine >= theirs {
        return Err(format!(
            "absorb-into-child copied {mine} bytes, not less than compact-into-child's {theirs}"
        ));
    }
    println!("absorb-into-child copied {mine} bytes, compact-into-child {theirs}");
    Ok(())
}

fn main() -> ExitCode {
    let result = common::tempdir().and_then(|tmp| run(tmp.path()));
    common::finish("custom_strategy", result)
}
