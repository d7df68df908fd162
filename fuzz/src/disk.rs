//! Real disk directories for the journal and tree targets: a template built once per process
//! with the journal's own API, copied fresh for every input, and one routine that drives every
//! read-side entry point over whatever the input made of it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use journal::{CacheMode, Disk, OpenOptions};

/// Size of the template disks: 256 blocks, so reading every block of a view stays cheap.
pub const DISK_SIZE: u64 = 1 << 20;
pub const BLOCK: u64 = journal::BLOCK_SIZE;

static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();

/// The scratch root: `$STRATA_FUZZ_TMP`, else `/dev/shm` (no fsync cost: four times the
/// executions of a disk on ext4), else the system temporary directory.
pub fn scratch_root() -> &'static Path {
    SCRATCH
        .get_or_init(|| {
            let shm = Path::new("/dev/shm");
            let base = std::env::var_os("STRATA_FUZZ_TMP")
                .map(PathBuf::from)
                .or_else(|| shm.is_dir().then(|| shm.to_path_buf()))
                .unwrap_or_else(std::env::temp_dir);
            tempfile::Builder::new()
                .prefix("strata-fuzz-")
                .tempdir_in(base)
                .expect("creating the fuzz scratch directory")
        })
        .path()
}

/// Removes the scratch root (statics are never dropped, so this is explicit).
pub fn remove_scratch() {
    if let Some(root) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(root.path());
    }
}

pub fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        cache: CacheMode::Writeback,
        read_only,
    }
}

fn fill(seed: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131)) as u8)
        .collect()
}

/// A disk with a small tree: `a` (blocks 0-7 and 100), `b` on `a` (zeroes, overwrites),
/// `c` on `a` (a branch), and Now on `b` with data of its own.
pub fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch_root().join("template");
        Disk::create(&dir, DISK_SIZE, None).expect("template create");
        let mut d = Disk::open(&dir, opts(false)).expect("template open");
        let now = d.now();
        for b in (0..8).chain([100]) {
            now.write_at(&fill(b), b * BLOCK, false).expect("write");
        }
        now.flush().expect("flush");
        d.checkpoint("a").expect("checkpoint a");
        let now = d.now();
        now.write_zeroes(2 * BLOCK, 2 * BLOCK, false)
            .expect("zeroes");
        now.write_at(&fill(50), BLOCK, false).expect("write");
        now.flush().expect("flush");
        d.checkpoint("b").expect("checkpoint b");
        d.apply("a", None).expect("apply a");
        d.now()
            .write_at(&fill(77), 7 * BLOCK, false)
            .expect("write");
        d.now().flush().expect("flush");
        d.checkpoint("c").expect("checkpoint c");
        d.apply("b", None).expect("apply b");
        let now = d.now();
        now.write_at(&fill(9), 200 * BLOCK, false).expect("write");
        now.write_at(&fill(10), 3 * BLOCK, false).expect("write");
        now.flush().expect("flush");
        drop(d);
        dir
    })
}

/// Copies `src` (a disk directory, one level of subdirectories) to a new directory.
pub fn copy_disk(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    copy_tree(src, dst).expect("copying the template disk");
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), to)?;
        }
    }
    Ok(())
}

/// A fresh copy of the template for one input.
pub fn fresh_copy() -> PathBuf {
    let dst = scratch_root().join("case");
    copy_disk(template(), &dst);
    dst
}

/// Layer ids in `dir/strata.json` (every node's, then Now's), read without the journal.
pub fn layer_ids(dir: &Path) -> (u128, Vec<u64>, u64) {
    let text = std::fs::read(dir.join("strata.json")).expect("template metadata");
    let v: serde_json::Value = serde_json::from_slice(&text).expect("template json");
    let uuid = u128::from_str_radix(v["uuid"].as_str().expect("uuid"), 16).expect("uuid hex");
    let mut ids: Vec<u64> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .flat_map(|n| n["layers"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l.as_u64())
        .collect();
    let now: Vec<u64> = v["now"]["layers"]
        .as_array()
        .expect("now layers")
        .iter()
        .filter_map(|l| l.as_u64())
        .collect();
    let active = *now.last().expect("an active layer");
    ids.extend(now);
    (uuid, ids, active)
}

/// Drives every read-side operation of an opened disk: info, list, tree, check, and a read of
/// every block of Now and of every checkpoint. Errors are fine; panics and hangs are not.
pub fn exercise(d: &Disk, export_to: Option<&Path>) {
    let _ = d.info();
    let _ = d.tree_text();
    let _ = d.tree_json();
    let _ = d.check();
    let mut views = vec![Ok(d.now())];
    for c in d.list() {
        views.push(d.checkpoint_view(&c.name));
        if let Some(out) = export_to {
            let _ = d.export(Some(&c.name), out);
        }
    }
    let mut buf = vec![0u8; 16 * BLOCK as usize];
    for v in views.into_iter().flatten() {
        let size = v.size();
        let mut off = 0;
        while off < size {
            let n = (buf.len() as u64).min(size - off) as usize;
            let _ = v.read_at(&mut buf[..n], off);
            off += n as u64;
        }
    }
}

/// Writes one block at `block`, flushes, reopens the disk, and asserts that the disk still
/// opens and that the block reads back as written or fails: whatever damage the input put in
/// the files, a flushed write is never replaced by other data. (A read may fail: a block
/// whose newest version is in a layer with a damaged log is refused, even a newer write.)
pub fn write_survives_reopen(dir: &Path, block: u64) {
    let Ok(d) = Disk::open(dir, opts(false)) else {
        return;
    };
    let now = d.now();
    let block = block % (now.size() / BLOCK);
    let data = fill(0xf00d ^ block);
    if now.write_at(&data, block * BLOCK, false).is_err() || now.flush().is_err() {
        return;
    }
    drop(now);
    drop(d);
    let d = Disk::open(dir, opts(true)).unwrap_or_else(|e| {
        panic!("a disk that accepted and flushed a write no longer opens: {e}")
    });
    let mut back = vec![0u8; BLOCK as usize];
    if d.now().read_at(&mut back, block * BLOCK).is_ok() {
        assert!(
            back == data,
            "block {block} reads different data after a flushed write and a reopen"
        );
    }
}
