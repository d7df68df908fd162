//! The QEMU baseline of `strata bench merge`: a qcow2 chain q1..qN holding exactly the
//! layers of the Strata chain (written with qemu-io), and `qemu-img commit` of the deleted
//! layer's image into its backing file (what deleting a snapshot in the middle of a qcow2
//! chain costs), with O_DIRECT like the Strata disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::merge_layout::{Extent, LayerPlan, Layout};
use super::{fail, procs};
use crate::{Error, Result};

/// qemu-io commands per invocation.
const BATCH: usize = 4096;
/// Largest single qemu-io write.
const PIECE: u64 = 4 << 20;

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {what} (install qemu-utils)"), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lower = stdout.to_ascii_lowercase();
    if !out.status.success() || lower.contains("error") || lower.contains("fail") {
        return Err(fail(
            format!("{what} ({})", out.status),
            format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(stdout)
}

/// Sorted, adjacent extents joined, split into pieces of at most [`PIECE`].
fn coalesce(extents: &[Extent]) -> Vec<Extent> {
    let mut v = extents.to_vec();
    v.sort_unstable_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if last.offset + last.len == e.offset && last.len + e.len <= PIECE => {
                last.len += e.len;
            }
            _ => out.push(e),
        }
    }
    out
}

fn write_layer(path: &Path, layer: &LayerPlan) -> Result<()> {
    for chunk in coalesce(&layer.extents).chunks(BATCH) {
        let mut cmd = Command::new("qemu-io");
        // Building the chain is set-up, not measured: cache=unsafe skips qemu's flushes
        // (a 1 GiB scattered chain took ~30 min with them). `commit` syncs every image and
        // evicts it from the page cache before it times anything.
        cmd.args(["-f", "qcow2", "-t", "unsafe"]);
        for e in chunk {
            cmd.arg("-c")
                .arg(format!("write -q -P {} {} {}", layer.byte, e.offset, e.len));
        }
        cmd.arg(path);
        run(&mut cmd, "qemu-io write")?;
    }
    Ok(())
}

/// Builds `dir/q1.qcow2 .. dir/qN.qcow2` (64 KiB clusters, the default) holding `layout`.
pub fn build_chain(dir: &Path, layout: &Layout) -> Result<Vec<PathBuf>> {
    let mut images: Vec<PathBuf> = Vec::new();
    for l in &layout.layers {
        let path = dir.join(format!("q{}.qcow2", l.layer));
        match images.last() {
            Some(prev) => procs::create_overlay(&path, prev, "qcow2")?,
            None => {
                let _ = std::fs::remove_file(&path);
                run(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2"])
                        .arg(&path)
                        .arg(layout.disk_size.to_string()),
                    "qemu-img create",
                )?;
            }
        }
        write_layer(&path, l)?;
        images.push(path);
    }
    Ok(images)
}

/// What a commit did.
#[derive(Clone, Copy, Debug)]
pub struct Commit {
    pub took: Duration,
    /// Bytes the committed image had allocated on the host (whole clusters plus metadata).
    pub image_bytes: u64,
}

/// `qemu-img commit -t none -d` of image `layer` (1-based) of `chain` into its backing
/// file, then a check that the backing file now reads the committed layer's byte.
pub fn commit(chain: &[PathBuf], layout: &Layout) -> Result<Commit> {
    let layer = layout.target;
    if layer < 2 || layer > chain.len() {
        return Err(fail("qemu-img commit", format!("no image below q{layer}")));
    }
    let top = &chain[layer - 1];
    let image_bytes = super::merge_space::allocated(top);
    let refs: Vec<&Path> = chain.iter().map(PathBuf::as_path).collect();
    procs::evict_page_cache(&refs)?;
    let start = Instant::now();
    run(
        Command::new("qemu-img")
            .args(["commit", "-q", "-t", "none", "-d", "-f", "qcow2"])
            .arg(top),
        "qemu-img commit",
    )?;
    let took = start.elapsed();
    // A block of the committed layer that a later layer did not overwrite is in the parent.
    let plan = &layout.layers[layer - 1];
    let probe = plan.extents[plan.extents.len() / 2];
    run(
        Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c"])
            .arg(format!("read -q -P {} {} 4096", plan.byte, probe.offset))
            .arg(&chain[layer - 2]),
        "qemu-io read after commit",
    )?;
    Ok(Commit { took, image_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_adjacent_extents() {
        let e = |offset, len| Extent { offset, len };
        let v = coalesce(&[e(8192, 4096), e(0, 4096), e(4096, 4096), e(65536, 4096)]);
        assert_eq!(v, vec![e(0, 12288), e(65536, 4096)]);
        let big: Vec<Extent> = (0..3).map(|i| e(i * PIECE, PIECE)).collect();
        assert_eq!(coalesce(&big).len(), 3, "pieces stay at most PIECE long");
    }
}
