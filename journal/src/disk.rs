//! A Strata disk directory: lock, tree metadata, layers, and the tree operations.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;

use crate::base::BaseImage;
use crate::format::{RecordKind, LOG_HEADER_SIZE, ZERO_BLOCK};
use crate::layer::{self, LayerFiles, LAYERS_DIR};
use crate::locking::{self, lock_reader, lock_writer, LOCK_FILE};
use crate::merge::{
    maintenance_moves, Above, DeleteOptions, Doomed, JobSetup, LayerStat, MergeJob, MergeReport,
    MergeStatus, Move, Placement, Reclaim, ReclaimSetup, Reclaimed, Registry, Situation, StackRef,
    StackStat, Strategy, Target,
};
use crate::tree::{sync_dir, unix_now, Node, NowNode, PartialMerge, Tree, TREE_FILE, TREE_FORMAT};
use crate::view::{build_state, build_view, DiskFiles, Tail};
use crate::volume::{ActiveLayer, ViewState, Volume};
use crate::{AlignedBuf, Error, Result, BLOCK_SIZE, SECTOR_SIZE};

/// How layer data files are opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no host page cache (like QEMU `cache=none`).
    #[default]
    None,
    /// Buffered I/O through the host page cache (like QEMU `cache=writeback`).
    Writeback,
}

/// Options for [`Disk::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub cache: CacheMode,
    /// Open without the ability to write Now (checkpoint tree changes are refused too).
    pub read_only: bool,
}

/// One checkpoint, as listed to users.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointInfo {
    pub id: u64,
    pub name: String,
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes of data held by this checkpoint's own layer(s).
    pub layer_bytes: u64,
    /// True when Now is a direct child of this checkpoint.
    pub now_parent: bool,
}

/// Summary of a disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub size: u64,
    pub block_size: u64,
    pub base: Option<PathBuf>,
    pub checkpoints: usize,
    /// Name of the checkpoint Now descends from, if any.
    pub now_parent: Option<String>,
    /// Layers in Now's lineage (its depth).
    pub depth: usize,
    /// Bytes allocated by Now's own layers.
    pub now_bytes: u64,
    /// Why Now cannot be read (damaged, or being written by another process), if so.
    pub now_unreadable: Option<String>,
    /// Bytes allocated on the host by all layer files.
    pub allocated_bytes: u64,
    /// Distinct blocks written in Now's lineage, and the index memory they take.
    pub index_blocks: usize,
    pub index_bytes: usize,
}

/// What a `check` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub layers_checked: usize,
    pub blocks_checked: u64,
    /// One line per problem: which file, which record or block, what is wrong.
    pub problems: Vec<String>,
    /// Views that were not checked, and why.
    pub skipped: Vec<String>,
    /// Findings that are not damage (a log's unwritten zero tail), one line each.
    pub notes: Vec<String>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a `delete` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeleteReport {
    pub deleted: Vec<String>,
    /// Checkpoints whose layers were merged into their single child.
    pub merged: usize,
    /// Deleted checkpoints kept as hidden nodes because several children still need them.
    pub hidden: usize,
    pub bytes_freed: u64,
    /// Merged layers a concurrent reader pinned: their overwritten blocks stay allocated.
    pub kept_for_readers: usize,
    /// Merge jobs run to the end by [`Disk::delete`] (0 for `delete_online`), and the bytes
    /// they copied.
    pub merge_jobs: usize,
    pub bytes_copied: u64,
}

/// What [`Disk::run_merges`] tells its caller while it runs jobs.
pub enum MergeEvent<'a> {
    /// A job's progress: when it starts, then about every [`MERGE_POLL`] while it runs.
    Progress(&'a MergeStatus),
    /// A job ran and was finished (swapped in, or discarded) with this report.
    Done(&'a MergeStatus, &'a MergeReport),
}

/// How often [`Disk::run_merges`] reports a running job's progress.
pub const MERGE_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// Maintenance passes [`Disk::run_merges`] makes after its jobs (each may find more).
pub const MAX_MAINTENANCE_ROUNDS: usize = 8;

/// How many times a reader without the lock rebuilds a view that changed while it was
/// being opened.
const SHARED_OPEN_TRIES: usize = 5;

/// An open Strata disk: locked for writing, locked shared for reading, or (read-only, while
/// another process writes it) unlocked with its checkpoints pinned as they are opened.
pub struct Disk {
    dir: PathBuf,
    _lock: Option<File>,
    /// Opened read-only while another process holds the disk for writing: Now is not
    /// readable, checkpoint views are pinned and re-validated.
    shared: bool,
    tree: Tree,
    uuid: u128,
    opts: OpenOptions,
    base: Option<Arc<BaseImage>>,
    /// Why the base image cannot be used (read-only opens only).
    base_error: Option<String>,
    now: Arc<Volume>,
    /// Layers merge jobs read (never punched, never Now's own while a job lives).
    registry: Arc<Registry>,
    /// Layers a reader pinned when they joined Now's stack: never Now's own.
    not_own: HashSet<u64>,
    /// Layers a reclaim job went through (maintenance does not plan them again unchanged).
    reclaimed: Reclaimed,
}

/// The text of a base image error with its causes ("base image P: why", "I/O error on P: ...").
fn base_problem(e: &Error) -> String {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&format!(": {s}"));
        src = s.source();
    }
    text
}

fn random_u128() -> Result<u128> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|f| {
            f.read_exact_at(&mut b, 0).or_else(|_| {
                use std::io::Read;
                let mut f = f;
                f.read_exact(&mut b)
            })
        })
        .map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(u128::from_le_bytes(b))
}

impl Disk {
    /// Creates a new disk directory of `size` bytes, optionally over a raw base image.
    pub fn create(dir: &Path, size: u64, base: Option<&Path>) -> Result<()> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::BadSize(size));
        }
        if dir.join(TREE_FILE).exists() {
            return Err(Error::AlreadyExists(dir.to_path_buf()));
        }
        let base_ref = match base {
            Some(p) => {
                let abs = fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
                let img = BaseImage::open(&abs, CacheMode::Writeback)?;
                if img.size > size {
                    return Err(Error::Invalid(format!(
                        "disk size {size} is smaller than the base image ({} bytes)",
                        img.size
                    )));
                }
                Some(crate::tree::BaseRef {
                    fingerprint: img.fingerprint()?,
                    path: abs,
                    size: img.size,
                })
            }
            None => None,
        };
        let created_dir = !dir.exists();
        if !created_dir
            && fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .next()
                .is_some()
        {
            return Err(Error::AlreadyExists(dir.to_path_buf()));
        }
        let result = (|| {
            fs::create_dir_all(dir.join(LAYERS_DIR)).map_err(|e| Error::io(dir, e))?;
            let _lock = lock_writer(dir)?;
            let uuid = random_u128()?;
            LayerFiles::create(dir, uuid, 1, CacheMode::Writeback)?;
            sync_dir(&dir.join(LAYERS_DIR))?;
            let tree = Tree {
                format: TREE_FORMAT,
                uuid: format!("{uuid:032x}"),
                size,
                block_size: BLOCK_SIZE,
                base: base_ref,
                next_id: 2,
                merging: Vec::new(),
                nodes: Vec::new(),
                now: NowNode {
                    parent: None,
                    layers: vec![1],
                },
            };
            tree.save(dir)
        })();
        if result.is_err() {
            if created_dir {
                let _ = fs::remove_dir_all(dir);
            } else {
                let _ = fs::remove_dir_all(dir.join(LAYERS_DIR));
                let _ = fs::remove_file(dir.join(LOCK_FILE));
            }
        }
        result
    }

    /// Opens and locks a disk; replays each layer's log (recovery after a crash).
    pub fn open(dir: &Path, opts: OpenOptions) -> Result<Disk> {
        if !dir.join(TREE_FILE).exists() {
            return Err(Error::NotADisk(dir.to_path_buf()));
        }
        let (lock, shared) = if opts.read_only {
            match lock_reader(dir)? {
                Some(f) => (Some(f), false),
                None => (None, true),
            }
        } else {
            (Some(lock_writer(dir)?), false)
        };
        let tree = Tree::load(dir)?;
        let uuid = tree.uuid_value()?;
        // A read-only open goes on without a base it cannot use: no view can be read (every
        // view reads through the base), but info, tree and check work.
        let (base, base_error) = match &tree.base {
            Some(b) => match BaseImage::open_checked(b, opts.cache) {
                Ok(img) => (Some(Arc::new(img)), None),
                Err(e) if opts.read_only => {
                    tracing::warn!("{e}");
                    (None, Some(base_problem(&e)))
                }
                Err(e) => return Err(e),
            },
            None => (None, None),
        };
        if !opts.read_only {
            remove_orphans(dir, &tree);
        }
        let lineage = tree.lineage_layers(None)?;
        let own_from = lineage.len() - tree.now.layers.len();
        let files = DiskFiles {
            dir,
            uuid,
            size: tree.size,
            cache: opts.cache,
        };
        let now = if let Some(why) = &base_error {
            Volume::new(tree.size, true, None, ViewState::unreadable(why.clone()))
        } else if shared {
            Volume::new(
                tree.size,
                true,
                base.clone(),
                ViewState::unreadable(format!(
                    "{} is in use by another process (locked) and Now is changing; \
                     its checkpoints can be read",
                    dir.display()
                )),
            )
        } else {
            match build_state(files, &lineage, own_from, !opts.read_only, Tail::Active) {
                Ok(state) => Volume::new(tree.size, opts.read_only, base.clone(), state),
                // A read-only open still serves the checkpoints that do not use the damage.
                Err(e) if opts.read_only => {
                    tracing::warn!("Now cannot be read: {e}");
                    Volume::new(
                        tree.size,
                        true,
                        base.clone(),
                        ViewState::unreadable(e.to_string()),
                    )
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Disk {
            dir: dir.to_path_buf(),
            _lock: lock,
            shared,
            tree,
            uuid,
            opts,
            base,
            now: Arc::new(now),
            base_error,
            registry: Arc::new(Registry::default()),
            not_own: HashSet::new(),
            reclaimed: Reclaimed::default(),
        })
    }

    /// The read-write view of Now (read-only if the disk was opened read-only). The same
    /// `Arc` stays valid across [`Disk::checkpoint`] and [`Disk::apply`].
    pub fn now(&self) -> Arc<Volume> {
        self.now.clone()
    }

    /// A read-only view of checkpoint `name`. Without the lock (another process writes the
    /// disk), the view is built from the current `strata.json`, its layers are pinned, and
    /// it is only handed out if the checkpoint still has the same layers afterwards.
    pub fn checkpoint_view(&self, name: &str) -> Result<Arc<Volume>> {
        if let Some(why) = &self.base_error {
            self.tree.by_name(name)?;
            return Err(Error::Unreadable {
                view: format!("checkpoint {name:?}"),
                why: why.clone(),
            });
        }
        if self.shared {
            return self.pinned_view(name).map(Arc::new);
        }
        let node = self.tree.by_name(name)?;
        let lineage = self.tree.lineage_layers(Some(node.id))?;
        // Built and registered under the build lock: a progressive merge frees no block of
        // a layer an open view reads (see "journal: progressive merges" in DESIGN.md).
        let _views = self.registry.build_lock();
        let v = Arc::new(build_view(
            self.files(),
            &lineage,
            lineage.len(),
            false,
            Tail::Sealed,
            self.base.clone(),
        )?);
        self.registry.add_view(&v, lineage);
        Ok(v)
    }

    fn pinned_view(&self, name: &str) -> Result<Volume> {
        for attempt in 0..SHARED_OPEN_TRIES {
            if attempt > 0 {
                // The writer is punching or deleting layers of this lineage right now.
                std::thread::sleep(std::time::Duration::from_millis(10 << attempt));
            }
            let tree = Tree::load(&self.dir)?;
            let lineage = tree.lineage_layers(Some(tree.by_name(name)?.id))?;
            // A progressive merge appends records to a layer of the lineage and then frees
            // the blocks they replace: a log that grew while the view was built and pinned
            // means the view may point at freed blocks.
            let log_lens = |l: &[u64]| -> Vec<Option<u64>> {
                l.iter()
                    .map(|&id| {
                        fs::metadata(layer::log_path(&self.dir, id))
                            .ok()
                            .map(|m| m.len())
                    })
                    .collect()
            };
            let lens_before = log_lens(&lineage);
            let state =
                match build_state(self.files(), &lineage, lineage.len(), false, Tail::Sealed) {
                    Ok(s) => s,
                    // A layer deleted since the tree was read: read the tree again.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        continue
                    }
                    Err(e) => return Err(e),
                };
            let mut pinned = true;
            for lf in &state.layers {
                pinned &= locking::pin(lf)?;
            }
            // Pinned layers are never punched; a layer punched before the pin belongs to a
            // node the writer has already changed in the tree it committed first.
            let now_tree = Tree::load(&self.dir)?;
            let still = now_tree
                .by_name(name)
                .and_then(|n| now_tree.lineage_layers(Some(n.id)));
            if pinned && still.is_ok_and(|l| l == lineage) && log_lens(&lineage) == lens_before {
                return Ok(Volume::new(self.tree.size, true, self.base.clone(), state));
            }
        }
        Err(Error::Invalid(format!(
            "checkpoint {name:?} kept changing while it was being opened (the disk is in use by another process); try again"
        )))
    }

    fn disk_blocks(&self) -> u64 {
        self.tree.size.div_ceil(BLOCK_SIZE)
    }

    fn files(&self) -> DiskFiles<'_> {
        DiskFiles {
            dir: &self.dir,
            uuid: self.uuid,
            size: self.tree.size,
            cache: self.opts.cache,
        }
    }

    fn writable(&self) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn info_of(&self, node: &Node) -> CheckpointInfo {
        CheckpointInfo {
            id: node.id,
            name: node.name.clone().unwrap_or_default(),
            parent: self.tree.visible_name(node.parent),
            created: node.created,
            layer_bytes: node.layers.iter().map(|&l| self.layer_bytes(l)).sum(),
            now_parent: node.name.is_some()
                && self.tree.visible_name(self.tree.now.parent) == node.name,
        }
    }

    fn layer_bytes(&self, id: u64) -> u64 {
        layer::allocated(&layer::data_path(&self.dir, id))
            + layer::allocated(&layer::log_path(&self.dir, id))
    }

    /// Creates the files of a new layer whose id is allocated in `tree` (a copy of the
    /// tree about to be committed, so a failure leaves `self.tree` untouched).
    fn create_layer(&self, tree: &mut Tree) -> Result<(u64, Arc<LayerFiles>)> {
        let id = tree.alloc_id()?;
        let files = LayerFiles::create(&self.dir, self.uuid, id, self.opts.cache)?;
        sync_dir(&self.dir.join(LAYERS_DIR))?;
        Ok((id, Arc::new(files)))
    }

    /// Removes the files of a layer created for a change that failed before its commit,
    /// and hands back the error.
    fn abandon_layer(&self, id: u64, e: Error) -> Error {
        self.remove_layer_files(id);
        e
    }

    fn remove_layer_files(&self, id: u64) -> u64 {
        let bytes = self.layer_bytes(id);
        let _ = fs::remove_file(layer::data_path(&self.dir, id));
        let _ = fs::remove_file(layer::log_path(&self.dir, id));
        bytes
    }

    /// Saves `tree` and adopts it; on failure the in-memory tree is left unchanged.
    fn commit_tree(&mut self, tree: Tree) -> Result<()> {
        tree.save(&self.dir)?;
        self.tree = tree;
        Ok(())
    }

    /// Takes a checkpoint of Now named `name`. Fails with [`Error::Busy`] while writes are in
    /// flight on Now: the caller drains first. O(1): Now's index is kept as it is.
    pub fn checkpoint(&mut self, name: &str) -> Result<CheckpointInfo> {
        self.writable()?;
        self.tree.check_new_name(name)?;
        let now = self.now.clone();
        let mut st = now.state_mut();
        if now.writes_in_flight() > 0 {
            return Err(Error::Busy);
        }
        let active = st.active.clone().ok_or(Error::ReadOnly)?;
        active.sync(true)?;
        active.trim_preallocation()?;
        let mut tree = self.tree.clone();
        let (layer_id, files) = self.create_layer(&mut tree)?;
        let node_id = match tree.alloc_id() {
            Ok(id) => id,
            Err(e) => return Err(self.abandon_layer(layer_id, e)),
        };
        let new_active = match ActiveLayer::after(files.clone(), &active) {
            Ok(a) => Arc::new(a),
            Err(e) => return Err(self.abandon_layer(layer_id, e)),
        };
        tree.nodes.push(Node {
            id: node_id,
            name: Some(name.to_string()),
            parent: tree.now.parent,
            created: unix_now(),
            layers: tree.now.layers.clone(),
        });
        tree.now = NowNode {
            parent: Some(node_id),
            layers: vec![layer_id],
        };
        if let Err(e) = self.commit_tree(tree) {
            return Err(self.abandon_layer(layer_id, e));
        }
        st.layers.push(files);
        st.own_from = st.layers.len() - 1;
        st.active = Some(new_active);
        drop(st);
        let node = self
            .tree
            .node(node_id)
            .cloned()
            .ok_or(Error::UnknownCheckpoint(name.into()))?;
        Ok(self.info_of(&node))
    }

    /// All visible checkpoints, parents before children.
    pub fn list(&self) -> Vec<CheckpointInfo> {
        let mut out = Vec::new();
        let mut stack = self.tree.roots();
        stack.reverse();
        while let Some(id) = stack.pop() {
            if let Some(n) = self.tree.node(id) {
                if n.name.is_some() {
                    out.push(self.info_of(n));
                }
                let mut kids = self.tree.children(id);
                kids.reverse();
                stack.extend(kids);
            }
        }
        out
    }

    /// Summary.
    pub fn info(&self) -> Result<DiskInfo> {
        // Allocated sizes count the hole punches queued so far as done.
        self.now.wait_punches();
        let (index_blocks, index_bytes) = self.now.index_stats();
        Ok(DiskInfo {
            path: self.dir.clone(),
            size: self.tree.size,
            block_size: BLOCK_SIZE,
            base: self.tree.base.as_ref().map(|b| b.path.clone()),
            checkpoints: self.tree.nodes.iter().filter(|n| n.name.is_some()).count(),
            now_parent: self.tree.visible_name(self.tree.now.parent),
            depth: self.tree.lineage_layers(None)?.len(),
            now_unreadable: self.now.unreadable_reason(),
            now_bytes: self
                .tree
                .now
                .layers
                .iter()
                .map(|&l| self.layer_bytes(l))
                .sum(),
            allocated_bytes: self
                .tree
                .all_layers()
                .iter()
                .map(|&l| self.layer_bytes(l))
                .sum(),
            index_blocks,
            index_bytes,
        })
    }

    /// Makes Now a fresh child of `name`, discarding Now's unsaved writes (first saved as
    /// checkpoint `save_current` if given).
    pub fn apply(&mut self, name: &str, save_current: Option<&str>) -> Result<()> {
        self.writable()?;
        let target = self.tree.by_name(name)?.id;
        if let Some(sc) = save_current {
            self.tree.check_new_name(sc)?;
        }
        if self.now.writes_in_flight() > 0 {
            return Err(Error::Busy);
        }
        if let Some(sc) = save_current {
            self.checkpoint(sc)?;
        }
        let mut tree = self.tree.clone();
        let (layer_id, _) = self.create_layer(&mut tree)?;
        let old_layers = std::mem::replace(
            &mut tree.now,
            NowNode {
                parent: Some(target),
                layers: vec![layer_id],
            },
        )
        .layers;
        // The old parent may be a hidden node left with one child (or none): join it to its
        // child (or drop it) now. Only the tree changes; no block is freed here.
        let mut dropped = Vec::new();
        collapse_from(
            &mut tree,
            self.tree.now.parent,
            &mut dropped,
            &mut Vec::new(),
            &mut DeleteReport::default(),
        );
        let lineage = tree.lineage_layers(None)?;
        // Built and swapped in under the build lock (a progressive merge moves Now's index
        // entries under it).
        let registry = self.registry.clone();
        let _views = registry.build_lock();
        let mut state = match build_state(
            self.files(),
            &lineage,
            lineage.len() - 1,
            true,
            Tail::Active,
        ) {
            Ok(s) => s,
            Err(e) => return Err(self.abandon_layer(layer_id, e)),
        };
        let now = self.now.clone();
        let mut st = now.state_mut();
        if now.writes_in_flight() > 0 {
            return Err(self.abandon_layer(layer_id, Error::Busy));
        }
        if let Err(e) = self.commit_tree(tree) {
            return Err(self.abandon_layer(layer_id, e));
        }
        // The new active layer takes over the old one's punch worker, as a checkpoint's
        // does: dropping the old state then never waits for its queued punches (a merge's
        // finish may just have queued thousands) with Now locked.
        if let (Some(new), Some(old)) = (state.active.as_mut(), st.active.as_ref()) {
            if let Some(new) = Arc::get_mut(new) {
                new.take_over_punches(old);
            }
        }
        *st = state;
        drop(st);
        for l in old_layers.into_iter().chain(dropped) {
            self.remove_layer_files(l);
        }
        Ok(())
    }

    /// Deletes checkpoint `name` (and its descendants with `subtree`) and runs the merges
    /// the default strategy (`auto`) and the layer-file bound want, to the end: the
    /// offline form of [`Disk::delete_online`]. Every other checkpoint and Now read exactly
    /// as before.
    pub fn delete(&mut self, name: &str, subtree: bool) -> Result<DeleteReport> {
        self.delete_with(
            name,
            &DeleteOptions {
                subtree,
                ..DeleteOptions::default()
            },
        )
    }

    /// [`Disk::delete`] with options: [`Disk::delete_online`], then [`Disk::run_merges`].
    pub fn delete_with(&mut self, name: &str, opts: &DeleteOptions) -> Result<DeleteReport> {
        let (mut report, jobs) = self.delete_online(name, opts)?;
        for r in self.run_merges(jobs, opts, &mut |_| {})? {
            report.merge_jobs += 1;
            report.bytes_copied += r.bytes_copied;
            report.bytes_freed += r.bytes_freed;
        }
        Ok(report)
    }

    /// Runs `jobs` to the end one at a time (each on a thread of its own while this one calls
    /// `on` with its progress about every [`MERGE_POLL`]) and finishes them, then the
    /// maintenance merges the journal wants after them (up to [`MAX_MAINTENANCE_ROUNDS`]
    /// passes). The offline driver of merges: [`Disk::delete_with`] and `strata disk
    /// delete` use it. A job that runs out of space stops it with [`Error::NoSpace`] (the
    /// job's durable batches are kept: the next run resumes it); one that fails otherwise
    /// is abandoned. Returns every report.
    pub fn run_merges(
        &mut self,
        jobs: Vec<MergeJob>,
        opts: &DeleteOptions,
        on: &mut dyn FnMut(MergeEvent<'_>),
    ) -> Result<Vec<MergeReport>> {
        let mut reports = Vec::new();
        let mut jobs = jobs;
        for round in 0..=MAX_MAINTENANCE_ROUNDS {
            if round > 0 {
                jobs = self.maintenance_merges(opts)?;
                if jobs.is_empty() {
                    break;
                }
            }
            for job in std::mem::take(&mut jobs) {
                reports.push(self.run_merge(job, on)?);
            }
        }
        Ok(reports)
    }

    /// Runs one job on a thread of its own while this one reports its progress, then
    /// finishes it.
    fn run_merge(
        &mut self,
        job: MergeJob,
        on: &mut dyn FnMut(MergeEvent<'_>),
    ) -> Result<MergeReport> {
        let progress = job.progress();
        let cancel = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (job, ran) = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let mut job = job;
                let r = job.run(&cancel);
                let _ = tx.send(());
                (job, r)
            });
            loop {
                on(MergeEvent::Progress(&progress.status()));
                match rx.recv_timeout(MERGE_POLL) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
            worker.join()
        })
        .map_err(|_| Error::Invalid("internal error: the merge thread panicked".into()))?;
        match ran {
            Ok(()) => {
                let report = self.finish_merge(job)?;
                on(MergeEvent::Done(&progress.status(), &report));
                Ok(report)
            }
            // The job stays resumable: its durable batches are kept for the next run.
            Err(e @ Error::NoSpace { .. }) => Err(e),
            Err(e) => {
                self.abandon_merge(job);
                Err(e)
            }
        }
    }

    /// Deletes checkpoint `name` in one tree commit (the relink: a checkpoint with one child
    /// has its layers joined to the child's stack; one with several children stays as a
    /// hidden node until it has at most one). When this returns the checkpoint is gone from
    /// `list()` and from the tree on disk; every other checkpoint and Now read as before.
    /// Returns the data movements the strategy wants (see [`MergeJob`]); dropping a job
    /// without running it is safe. The strategy plans before the commit: a strategy that
    /// measures live blocks scans the target stack's logs here (an online delete that must
    /// be quick uses [`Disk::delete_deferred`]), and a plan it gets wrong fails the delete
    /// with nothing changed.
    pub fn delete_online(
        &mut self,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<(DeleteReport, Vec<MergeJob>)> {
        let mut change = self.relink(name, opts)?;
        let strategy = opts.strategy_impl();
        let planned = self.plan_moves(&change.tree, name, &change.merges, &*strategy)?;
        let ids = planned.reserve(&mut change.tree)?;
        let mut report = self.commit_relink(change)?;
        let (jobs, freed) = self.start_planned(planned, ids, name, strategy.name(), opts)?;
        report.bytes_freed += freed;
        Ok((report, jobs))
    }

    /// The first half of [`Disk::delete_online`]: the relink, committed, and nothing else.
    /// Its cost does not depend on how much data the checkpoint holds (no log is read), so
    /// the checkpoint is gone within a tree commit whatever its size. The strategy plans
    /// later, in [`Disk::plan_deferred`], on the tree as it is then; dropping the returned
    /// plan instead is safe (a maintenance pass reclaims what the relink left shadowed).
    pub fn delete_deferred(
        &mut self,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<(DeleteReport, PendingPlan)> {
        let mut change = self.relink(name, opts)?;
        let id = change.tree.alloc_id()?;
        let received = change.merges.clone();
        let report = self.commit_relink(change)?;
        Ok((
            report,
            PendingPlan {
                id,
                checkpoint: name.to_string(),
                received,
            },
        ))
    }

    /// The second half of a deferred delete: the strategy plans on the current tree (a
    /// checkpoint, delete or merge since the relink may have moved the received layers to
    /// another stack, or replaced them), its outputs' ids are reserved in a second tree
    /// commit, and the jobs come back, each status naming `plan.id()` as its `delete`.
    /// Also returns the bytes an inline reclaim (no `background_reclaim`) freed.
    pub fn plan_deferred(
        &mut self,
        plan: PendingPlan,
        opts: &DeleteOptions,
    ) -> Result<(Vec<MergeJob>, u64)> {
        self.writable()?;
        let mut merges: Vec<Merge> = Vec::new();
        for m in &plan.received {
            for &l in &m.parent_layers {
                let Some((at, _)) = self.tree.find_run(&[l]) else {
                    continue;
                };
                match merges.iter_mut().find(|g| g.child == at) {
                    Some(g) => g.parent_layers.push(l),
                    None => merges.push(Merge {
                        parent_layers: vec![l],
                        child: at,
                    }),
                }
            }
        }
        let strategy = opts.strategy_impl();
        let planned = self.plan_moves(&self.tree, &plan.checkpoint, &merges, &*strategy)?;
        if planned.moves.is_empty() && planned.reclaims.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let mut tree = self.tree.clone();
        let ids = planned.reserve(&mut tree)?;
        self.commit_tree(tree)?;
        let (jobs, freed) =
            self.start_planned(planned, ids, &plan.checkpoint, strategy.name(), opts)?;
        for j in &jobs {
            j.progress().made_by_delete(plan.id);
        }
        Ok((jobs, freed))
    }

    /// The tree after deleting `name` (not committed), with what the relink moved.
    fn relink(&self, name: &str, opts: &DeleteOptions) -> Result<Relinked> {
        self.writable()?;
        let id = self.tree.by_name(name)?.id;
        if self.now.writes_in_flight() > 0 {
            return Err(Error::Busy);
        }
        let mut report = DeleteReport::default();
        let mut tree = self.tree.clone();
        let mut drop_layers: Vec<u64> = Vec::new();
        let mut merges: Vec<Merge> = Vec::new();
        let now_path = tree.path_to(tree.now.parent)?;
        if opts.subtree {
            if now_path.contains(&id) {
                return Err(Error::Invalid(format!(
                    "Now descends from checkpoint {name:?}; apply another checkpoint before deleting its subtree"
                )));
            }
            let mut doomed = vec![id];
            let mut i = 0;
            while i < doomed.len() {
                doomed.extend(tree.children(doomed[i]));
                i += 1;
            }
            for d in &doomed {
                if let Some(n) = tree.node(*d) {
                    drop_layers.extend(&n.layers);
                    if let Some(nm) = &n.name {
                        report.deleted.push(nm.clone());
                    }
                }
            }
            let parent = tree.node(id).and_then(|n| n.parent);
            tree.nodes.retain(|n| !doomed.contains(&n.id));
            collapse_from(
                &mut tree,
                parent,
                &mut drop_layers,
                &mut merges,
                &mut report,
            );
        } else {
            report.deleted.push(name.to_string());
            if let Some(n) = tree.nodes.iter_mut().find(|n| n.id == id) {
                n.name = None;
            }
            collapse_from(
                &mut tree,
                Some(id),
                &mut drop_layers,
                &mut merges,
                &mut report,
            );
        }
        Ok(Relinked {
            tree,
            report,
            drop_layers,
            merges,
        })
    }

    /// Commits a relink and frees what it can at once: the dropped layers' files, and Now's
    /// superseded blocks in the layers that became its own.
    fn commit_relink(&mut self, change: Relinked) -> Result<DeleteReport> {
        let Relinked {
            tree,
            mut report,
            drop_layers,
            merges,
        } = change;
        let old_own = self.tree.now.layers.len();
        self.commit_tree(tree)?;
        // The tree is durable: now free space. A crash from here on only leaves garbage that
        // the next open removes (whole layer files) or that stays allocated (shadowed blocks,
        // which a maintenance pass reclaims). A merge's replaced layers go when it finishes;
        // the blocks the relinked layers' new stack overwrites are punched by a reclaim job
        // (see `merge::reclaim`).
        let new_own = self.tree.now.layers.len();
        // Layers that become Now's own: their overwritten blocks get punched from now on,
        // unless a reader (another process reading a checkpoint without the lock) pins them.
        let becoming_own: Vec<u64> = if new_own != old_own {
            let st = self.now.state();
            let new_from = st.layers.len().saturating_sub(new_own);
            st.layers[new_from..st.own_from.max(new_from)]
                .iter()
                .map(|l| l.id)
                .collect()
        } else {
            Vec::new()
        };
        let mut to_check: Vec<u64> = merges
            .iter()
            .flat_map(|m| m.parent_layers.iter().copied())
            .chain(becoming_own.iter().copied())
            .collect();
        to_check.sort_unstable();
        to_check.dedup();
        // A layer a reader pins is reported (its overwritten blocks stay allocated: the
        // reclaim claims each layer before it punches) and never becomes Now's own.
        let pinned: HashSet<u64> = to_check
            .into_iter()
            .filter(|&l| !claimable(&self.dir, l))
            .collect();
        report.kept_for_readers = pinned.len();
        for l in &becoming_own {
            if pinned.contains(l) {
                self.not_own.insert(*l);
            }
        }
        self.refresh_own_from();
        for l in drop_layers {
            report.bytes_freed += self.remove_layer_files(l);
        }
        Ok(report)
    }

    /// What `strategy` wants after a relink that moved `merges` (as found in `tree`): its
    /// validated moves, and a reclaim per stack for the received layers no move rewrites.
    fn plan_moves(
        &self,
        tree: &Tree,
        name: &str,
        merges: &[Merge],
        strategy: &dyn Strategy,
    ) -> Result<Planned> {
        let target = merges.first().map(|m| m.child);
        let moved: HashSet<u64> = merges
            .iter()
            .flat_map(|m| m.parent_layers.iter().copied())
            .collect();
        // Live blocks are counted (the logs scanned) only for a strategy that looks at them.
        let measure: Vec<StackRef> = target.into_iter().filter(|_| strategy.measures()).collect();
        let situation = self.situation(tree, name, target, &moved, &measure)?;
        let moves = validate_moves(strategy.name(), &situation, strategy.plan(&situation))?;
        let covered = covered_layers(tree, &moves);
        let mut reclaims: Vec<(StackRef, Vec<u64>)> = Vec::new();
        for m in merges {
            let left: Vec<u64> = m
                .parent_layers
                .iter()
                .copied()
                .filter(|l| !covered.contains(l))
                .collect();
            if left.is_empty() {
                continue;
            }
            match reclaims.iter_mut().find(|r| r.0 == m.child) {
                Some(r) => r.1.extend(left),
                None => reclaims.push((m.child, left)),
            }
        }
        Ok(Planned { moves, reclaims })
    }

    /// Makes and starts the jobs of a plan whose ids the committed tree reserves: the
    /// reclaims first (quick, they give space back before any copy needs it), returned or,
    /// without `background_reclaim`, run here (the bytes they freed are returned).
    fn start_planned(
        &mut self,
        planned: Planned,
        ids: ReservedIds,
        name: &str,
        strategy: &str,
        opts: &DeleteOptions,
    ) -> Result<(Vec<MergeJob>, u64)> {
        let jobs = self.build_jobs(&planned.moves, &ids.moves, name, strategy, opts);
        self.refresh_own_from();
        if jobs_touch_now(&self.tree, &jobs) {
            // Frees, before any job reads, the blocks Now's writes superseded in layers that
            // are no longer Now's own.
            self.now.sync_log(true)?;
        }
        let mut freed = 0;
        let mut first = Vec::new();
        for ((at, layers), id) in planned.reclaims.into_iter().zip(ids.reclaims) {
            match self.reclaim_job(at, &layers, id, name, opts) {
                Ok(j) if opts.background_reclaim => first.push(j),
                // Inline (for comparisons): the same job, run before the delete returns.
                Ok(mut j) => match j.run(&AtomicBool::new(false)) {
                    Ok(()) => {
                        if let Some(r) = crate::merge::finish_reclaim(&mut j) {
                            freed += r.bytes_freed;
                        }
                    }
                    Err(e) => tracing::warn!("reclaim of {at:?} failed: {e}"),
                },
                Err(e) => tracing::warn!("reclaim of {at:?} not started: {e}"),
            }
        }
        let mut jobs = self.start_progressive(jobs);
        first.append(&mut jobs);
        Ok((first, freed))
    }

    /// A reclaim job for `layers` of stack `at` (oldest first).
    fn reclaim_job(
        &self,
        at: StackRef,
        layers: &[u64],
        id: u64,
        checkpoint: &str,
        opts: &DeleteOptions,
    ) -> Result<MergeJob> {
        let open = |l: u64, rw: bool| -> Result<Arc<LayerFiles>> {
            LayerFiles::open(&self.dir, self.uuid, l, self.opts.cache, rw).map(Arc::new)
        };
        let doomed = layers
            .iter()
            .map(|&l| Doomed::new(open(l, true)?))
            .collect::<Result<Vec<_>>>()?;
        let above = match at {
            StackRef::Now => {
                let active = self
                    .now
                    .state()
                    .active
                    .as_ref()
                    .map(|a| a.files.id)
                    .ok_or(Error::ReadOnly)?;
                Above::Now {
                    now: self.now.clone(),
                    active,
                }
            }
            StackRef::Node(_) => {
                let stack = self.tree.stack(at).unwrap_or(&[]);
                Above::Sealed(
                    stack
                        .iter()
                        .map(|&l| open(l, false))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let plan = Reclaim::new(
            doomed,
            above,
            self.disk_blocks(),
            opts.rate_limit,
            self.reclaimed.clone(),
            self.now.clone(),
        );
        Ok(MergeJob::reclaim(
            ReclaimSetup {
                id,
                checkpoint: checkpoint.to_string(),
                dir: self.dir.clone(),
                uuid: self.uuid,
                cache: self.opts.cache,
                disk_blocks: self.disk_blocks(),
                registry: self.registry.clone(),
            },
            plan,
        ))
    }

    /// Layers of each stack (oldest first) whose data files hold at least
    /// [`RECLAIM_MIN_BYTES`] more than the blocks they hold the newest version of: blocks
    /// the stack above overwrote (a relink whose reclaim a crash or a stop interrupted) or
    /// superseded within the layer. Skips stacks in `skip`, layers a merge job reads, a
    /// reader pins, or a reclaim already went through unchanged.
    fn reclaim_candidates(
        &self,
        situation: &Situation,
        skip: &HashSet<StackRef>,
    ) -> Vec<(StackRef, Vec<u64>)> {
        let busy = self.registry.busy_layers();
        // Live data blocks per layer of Now's view, from its index.
        let now_live: HashMap<u64, u64> = {
            let st = self.now.state();
            let mut per = vec![0u64; st.layers.len()];
            for (_, l) in st.index.iter() {
                if l.data_block != ZERO_BLOCK {
                    if let Some(c) = per.get_mut(usize::from(l.ordinal)) {
                        *c += 1;
                    }
                }
            }
            st.layers.iter().map(|l| l.id).zip(per).collect()
        };
        let reclaimed = self.reclaimed.lock().map(|m| m.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for st in &situation.stacks {
            if skip.contains(&st.at) || st.layers.len() < 2 {
                continue;
            }
            // Every layer with a layer of its stack above it.
            let candidates = match st.at {
                StackRef::Now => st.sealed,
                StackRef::Node(_) => st.sealed.saturating_sub(1),
            };
            let mut layers = Vec::new();
            for l in &st.layers[..candidates] {
                let live = match st.at {
                    StackRef::Now => now_live.get(&l.id).copied(),
                    StackRef::Node(_) => l.live,
                };
                let Some(live) = live else { continue };
                let data = layer::allocated(&layer::data_path(&self.dir, l.id));
                if data
                    < live
                        .saturating_mul(BLOCK_SIZE)
                        .saturating_add(RECLAIM_MIN_BYTES)
                {
                    continue;
                }
                let log_len = fs::metadata(layer::log_path(&self.dir, l.id))
                    .map(|m| m.len())
                    .unwrap_or(0);
                if reclaimed.get(&l.id) == Some(&(log_len, data))
                    || busy.contains(&l.id)
                    || !claimable(&self.dir, l.id)
                {
                    continue;
                }
                layers.push(l.id);
            }
            if !layers.is_empty() {
                out.push((st.at, layers));
            }
        }
        out
    }

    /// Merges the layer-file bound wants now even without a delete: every lineage whose
    /// stacks hold more than [`crate::LINEAGE_SLACK`] layers beyond one per node (and Now's
    /// active layer) has its deepest stacks compacted, which also picks up merges a crash
    /// interrupted. Placement as `auto` chooses it.
    pub fn maintenance_merges(&mut self, opts: &DeleteOptions) -> Result<Vec<MergeJob>> {
        self.writable()?;
        let paths = self.tree.view_paths()?;
        let measure: Vec<StackRef> = self
            .tree
            .stacks()
            .into_iter()
            .filter(|&a| self.tree.stack(a).is_some_and(|l| l.len() >= 2))
            .collect();
        let situation = self.situation(&self.tree, "", None, &HashSet::new(), &measure)?;
        let moves = maintenance_moves(&situation, &paths);
        // Progressive merges a crash or a dropped job left under way are completed, except
        // in a stack that a move below compacts whole (that move subsumes them).
        let whole: Vec<StackRef> = moves.iter().map(|m| m.stack).collect();
        let mut jobs = self.resume_merges_except(opts, &whole)?;
        // Stacks a move compacts lose their garbage with it; the others are reclaimed.
        let moved: HashSet<StackRef> = whole.iter().copied().collect();
        let reclaims = if opts.background_reclaim {
            self.reclaim_candidates(&situation, &moved)
        } else {
            Vec::new()
        };
        if moves.is_empty() && reclaims.is_empty() {
            return Ok(jobs);
        }
        let mut tree = self.tree.clone();
        let mut ids = Vec::with_capacity(moves.len());
        for _ in &moves {
            ids.push(tree.alloc_id()?);
        }
        let mut reclaim_ids = Vec::with_capacity(reclaims.len());
        for _ in &reclaims {
            reclaim_ids.push(tree.alloc_id()?);
        }
        self.commit_tree(tree)?;
        for ((at, layers), id) in reclaims.into_iter().zip(reclaim_ids) {
            match self.reclaim_job(at, &layers, id, "", opts) {
                Ok(j) => jobs.push(j),
                Err(e) => tracing::warn!("reclaim of {at:?} not started: {e}"),
            }
        }
        let planned = self.build_jobs(&moves, &ids, "", "maintenance", opts);
        self.refresh_own_from();
        if jobs_touch_now(&self.tree, &planned) {
            self.now.sync_log(true)?;
        }
        jobs.extend(self.start_progressive(planned));
        Ok(jobs)
    }

    /// The tree as a strategy sees it. Stacks in `measure` get their live blocks counted
    /// (their logs are scanned).
    fn situation(
        &self,
        tree: &Tree,
        deleted: &str,
        target: Option<StackRef>,
        moved: &HashSet<u64>,
        measure: &[StackRef],
    ) -> Result<Situation> {
        let busy = self.registry.busy_layers();
        let mut stacks = Vec::new();
        for at in tree.stacks() {
            let layers = tree.stack(at).unwrap_or(&[]);
            let sealed = match at {
                StackRef::Now => layers.len().saturating_sub(1),
                StackRef::Node(_) => layers.len(),
            };
            let live = if measure.contains(&at) {
                self.live_counts(&layers[..sealed])?
            } else {
                Vec::new()
            };
            let stats = layers
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    let log_len = fs::metadata(layer::log_path(&self.dir, id))
                        .map(|m| m.len())
                        .unwrap_or(LOG_HEADER_SIZE);
                    LayerStat {
                        id,
                        records: log_len.saturating_sub(LOG_HEADER_SIZE)
                            / crate::format::RECORD_SIZE as u64,
                        live: live.get(i).copied(),
                        allocated_bytes: self.layer_bytes(id),
                        from_deleted: moved.contains(&id),
                    }
                })
                .collect();
            let visible = match at {
                StackRef::Now => true,
                StackRef::Node(id) => tree.node(id).is_some_and(|n| n.name.is_some()),
            };
            stacks.push(StackStat {
                at,
                visible,
                layers: stats,
                sealed,
                busy: layers.iter().any(|l| busy.contains(l)),
            });
        }
        Ok(Situation {
            deleted: deleted.to_string(),
            target,
            stacks,
            visible_checkpoints: tree.nodes.iter().filter(|n| n.name.is_some()).count(),
        })
    }

    /// For each of `layers` (one stack, oldest first), the blocks it holds the newest
    /// version of within the stack.
    fn live_counts(&self, layers: &[u64]) -> Result<Vec<u64>> {
        let disk_blocks = self.disk_blocks();
        let mut counts = vec![0u64; layers.len()];
        // One slot per disk block (layer index + 1) when that is small and the stack fits a
        // u16, a map otherwise.
        let dense = disk_blocks <= DENSE_LIVE_BLOCKS && layers.len() < usize::from(u16::MAX);
        if dense {
            let mut newest = vec![0u16; disk_blocks as usize];
            for (i, &l) in layers.iter().enumerate() {
                let lf = LayerFiles::open(&self.dir, self.uuid, l, self.opts.cache, false)?;
                for r in lf.scan_log(disk_blocks)?.records {
                    if let Some(slot) = newest.get_mut(r.disk_block as usize) {
                        *slot = i as u16 + 1;
                    }
                }
            }
            for &s in newest.iter().filter(|&&s| s > 0) {
                counts[usize::from(s) - 1] += 1;
            }
            return Ok(counts);
        }
        let mut newest: HashMap<u64, usize> = HashMap::new();
        for (i, &l) in layers.iter().enumerate() {
            let lf = LayerFiles::open(&self.dir, self.uuid, l, self.opts.cache, false)?;
            for r in lf.scan_log(disk_blocks)?.records {
                newest.insert(r.disk_block, i);
            }
        }
        for i in newest.into_values() {
            counts[i] += 1;
        }
        Ok(counts)
    }

    /// Opens the files of each move's run and makes its job (ids reserved in the tree).
    fn build_jobs(
        &self,
        moves: &[Move],
        ids: &[u64],
        checkpoint: &str,
        strategy: &str,
        opts: &DeleteOptions,
    ) -> Vec<MergeJob> {
        let mut jobs = Vec::new();
        for (mv, &id) in moves.iter().zip(ids) {
            let made = (|| -> Result<MergeJob> {
                let stack = self.tree.stack(mv.stack).unwrap_or(&[]);
                let run_ids = stack
                    .get(mv.first..mv.first + mv.len)
                    .ok_or_else(|| Error::Invalid("merge run out of range".into()))?;
                let mut below_ids = self.tree.below_stack(mv.stack)?;
                below_ids.extend_from_slice(&stack[..mv.first]);
                let open = |l: &u64| -> Result<Arc<LayerFiles>> {
                    LayerFiles::open(&self.dir, self.uuid, *l, self.opts.cache, false).map(Arc::new)
                };
                let run = run_ids.iter().map(open).collect::<Result<Vec<_>>>()?;
                let below = below_ids.iter().map(open).collect::<Result<Vec<_>>>()?;
                // Blocks the stack's layers above the run hide: they may already be punched
                // (Now's overwrites free what they supersede), and no view reads them.
                let sealed = match mv.stack {
                    StackRef::Now => stack.len().saturating_sub(1),
                    StackRef::Node(_) => stack.len(),
                };
                let above = stack[mv.first + mv.len..sealed]
                    .iter()
                    .map(open)
                    .collect::<Result<Vec<_>>>()?;
                let mut hidden = HashSet::new();
                if mv.stack == StackRef::Now {
                    let st = self.now.state();
                    if let Some(p) = st.find_run(run_ids) {
                        hidden.extend(
                            st.index
                                .iter()
                                .filter(|(_, l)| usize::from(l.ordinal) >= p + run_ids.len())
                                .map(|(b, _)| b),
                        );
                    }
                }
                Ok(MergeJob::new(JobSetup {
                    id,
                    checkpoint: checkpoint.to_string(),
                    strategy: strategy.to_string(),
                    dir: self.dir.clone(),
                    uuid: self.uuid,
                    cache: self.opts.cache,
                    disk_blocks: self.disk_blocks(),
                    base_blocks: self
                        .tree
                        .base
                        .as_ref()
                        .map_or(0, |b| b.size.div_ceil(BLOCK_SIZE)),
                    run,
                    below,
                    above,
                    hidden,
                    target: match mv.placement {
                        Placement::NewLayer => Target::New,
                        Placement::Absorb(i) => Target::Absorb(i),
                    },
                    // A resumed progressive merge absorbs into its new layer's partial output.
                    new_layer: match mv.placement {
                        Placement::NewLayer => true,
                        Placement::Absorb(i) => run_ids
                            .get(i)
                            .is_some_and(|l| self.tree.merging.iter().any(|m| m.out == *l)),
                    },
                    rate_limit: opts.rate_limit,
                    queue_depth: opts.queue_depth,
                    batch_bytes: opts.batch_bytes,
                    progressive: opts.progressive,
                    registry: self.registry.clone(),
                }))
            })();
            match made {
                Ok(j) => jobs.push(j),
                Err(e) => tracing::warn!("merge of {:?} not started: {e}", mv),
            }
        }
        jobs
    }

    /// Sets Now's `own_from`: Now's own layers are those of its stack, except (and below)
    /// any a merge job reads or a reader pinned when it joined Now.
    fn refresh_own_from(&self) {
        let busy = self.registry.busy_layers();
        let mut st = self.now.state_mut();
        if st.unreadable.is_some() || st.active.is_none() {
            return;
        }
        let n = st.layers.len();
        let own = self.tree.now.layers.len();
        if own > n || own == 0 {
            return;
        }
        let natural = n - own;
        let from = st.layers[natural..n - 1]
            .iter()
            .rposition(|l| busy.contains(&l.id) || self.not_own.contains(&l.id))
            .map_or(natural, |i| natural + i + 1);
        st.own_from = from;
    }

    /// Swaps a job that ran to completion into the tree (one atomic tree commit) and into
    /// Now's open view, then deletes the replaced files. Requires no write in flight on Now
    /// ([`Error::Busy`] otherwise; use [`Disk::try_finish_merge`] to keep the job). If the
    /// job's layers are gone from the tree, its output is discarded (`discarded` in the
    /// report).
    pub fn finish_merge(&mut self, job: MergeJob) -> Result<MergeReport> {
        self.try_finish_merge(job).map_err(|(_, e)| e)
    }

    /// [`Disk::finish_merge`] that hands the job back on failure (e.g. [`Error::Busy`]).
    pub fn try_finish_merge(
        &mut self,
        mut job: MergeJob,
    ) -> std::result::Result<MergeReport, (Box<MergeJob>, Error)> {
        if let Err(e) = self.writable() {
            return Err((Box::new(job), e));
        }
        if !job.copied {
            let e = Error::Invalid(format!(
                "merge {} has not finished copying (run it first)",
                job.id()
            ));
            return Err((Box::new(job), e));
        }
        if let Some(r) = crate::merge::finish_reclaim(&mut job) {
            return Ok(r);
        }
        let run = job.run_layers();
        let progress = job.progress();
        let mut report = MergeReport {
            id: job.id(),
            checkpoint: job.checkpoint().to_string(),
            strategy: job.strategy().to_string(),
            bytes_copied: job.comp.as_ref().map_or(0, |c| c.copies.len() as u64) * BLOCK_SIZE,
            peak_extra_bytes: job.peak_extra,
            bytes_freed: job.freed,
            copy_seconds: progress.copy_seconds(),
            progressive: job.progressive.is_some(),
            ..MergeReport::default()
        };
        let found = self.tree.find_run(&run).filter(|_| !job.stale);
        let Some((at, pos)) = found else {
            job.discard_output();
            report.discarded = true;
            return Ok(report);
        };
        let lineage_len = |t: &Tree| {
            t.below_stack(at).map_or(0, |b| b.len()) + t.stack(at).map_or(0, |s| s.len())
        };
        report.layers_before = lineage_len(&self.tree);
        let out_id = job.output_layer();
        let (Some(out), Some(comp)) = (job.out.clone(), job.comp.take()) else {
            let e = Error::Invalid(format!("merge {} lost its output", job.id()));
            return Err((Box::new(job), e));
        };
        let mut tree = self.tree.clone();
        tree.replace_run(at, pos, run.len(), out_id);
        tree.merging.retain(|m| m.out != out_id);
        let now = self.now.clone();
        let mut st = now.state_mut();
        if now.writes_in_flight() > 0 {
            drop(st);
            job.comp = Some(comp);
            return Err((Box::new(job), Error::Busy));
        }
        let now_pos = st.find_run(&run);
        if let Some(p) = now_pos {
            if let Err(e) = st.check_merged_run(p, run.len(), &comp.map) {
                drop(st);
                job.comp = Some(comp);
                return Err((Box::new(job), e));
            }
        }
        if let Err(e) = self.commit_tree(tree) {
            drop(st);
            job.comp = Some(comp);
            return Err((Box::new(job), e));
        }
        job.adopted = true;
        // Blocks of the merged layer nobody reads: the absorbing layer's shadowed ones, and
        // (when the layer is Now's alone) those Now superseded above it.
        let mut dead: Vec<u64> = comp.unreferenced.clone();
        if let Some(p) = now_pos {
            st.swap_merged_run(p, run.len(), out.clone(), &comp.map);
            if at == StackRef::Now {
                for &(b, d, _) in &comp.map {
                    if d == ZERO_BLOCK {
                        continue;
                    }
                    let here = st
                        .index
                        .get(b)
                        .is_some_and(|l| usize::from(l.ordinal) == p && l.data_block == d);
                    if !here {
                        dead.push(d);
                    }
                }
            }
        }
        drop(st);
        if dead.len() > comp.unreferenced.len() {
            // Now's records that supersede those blocks may still be pending: they must be
            // durable before the blocks are punched, or a crash reads holes there.
            if let Err(e) = now.sync_log(true) {
                tracing::warn!(
                    "merge {}: Now's log is not durable ({e}): the blocks it supersedes stay allocated",
                    job.id()
                );
                dead.truncate(comp.unreferenced.len());
            }
        }
        self.registry.release(job.id());
        self.refresh_own_from();
        for &l in &run {
            if l != out_id {
                report.bytes_freed += self.remove_layer_files(l);
            }
        }
        if !dead.is_empty() && !self.registry.busy_layers().contains(&out_id) {
            // The absorbing layer may be pinned by a reader of an older view.
            // A progressive output was in the tree while the job ran: a reader may pin it.
            let (mut kept, _claim) = if out_id == job.id() && job.progressive.is_none() {
                (None, None)
            } else {
                match locking::claim(&out.log_path) {
                    Ok(Some(f)) => (None, Some(f)),
                    _ => (Some("is pinned by a reader"), None),
                }
            };
            // An open in-process view of an older lineage (a deleted checkpoint's, opened
            // before the delete) may read the absorbing layer's blocks the run shadowed.
            if kept.is_none() && self.registry.viewed_layers().contains(&out_id) {
                kept = Some("is read by an open checkpoint view");
            }
            // A read of Now that resolved one of these blocks before Now overwrote it (or
            // before the swap) may still be running: wait for the reads begun so far.
            if kept.is_none() && !now.merge_gate.drain(GATE_DRAIN) {
                kept = Some("has reads of Now in flight that did not end");
            }
            if kept.is_none() {
                // Punched in the background (the swap is done; nothing reads them): the
                // report counts them freed once queued.
                dead.sort_unstable();
                dead.dedup();
                report.bytes_freed += dead.len() as u64 * BLOCK_SIZE;
                now.punch_later(&out, dead);
            } else {
                tracing::info!(
                    "layer {out_id} {}: its unreferenced blocks stay allocated",
                    kept.unwrap_or_default()
                );
            }
        }
        report.layers_after = lineage_len(&self.tree);
        progress.done();
        Ok(report)
    }

    /// Gives up a job (deletes its partial output). A progressive job that wrote nothing
    /// takes its output layer out of the tree again; one that did leaves its partial output
    /// in the tree ([`Disk::resume_merges`] completes it).
    pub fn abandon_merge(&mut self, mut job: MergeJob) {
        if job.progressive.is_some() && !job.log_started && !job.adopted {
            if let Err(e) = self.unplace_output(&job) {
                tracing::info!(
                    "merge {}: its empty output layer stays in the tree ({e})",
                    job.id()
                );
            }
        }
        job.discard_output();
        let id = job.id();
        drop(job);
        self.registry.release(id);
        self.refresh_own_from();
    }

    /// Makes the jobs that can free their sources batch by batch progressive, as
    /// `delete_online` does for its own: for the jobs of [`Disk::plan_deferred`], whose
    /// planning ran while clients wrote (a new layer's output enters Now's view only with no
    /// write in flight, so there it may have been left whole-output). Call with client I/O
    /// paused; a job that still cannot (writes in flight, a full disk) copies its whole
    /// output, as before.
    pub fn start_progressive_merges(&mut self, jobs: Vec<MergeJob>) -> Vec<MergeJob> {
        self.start_progressive(jobs)
    }

    /// Makes the jobs that can free their sources batch by batch progressive: a new-layer
    /// job gets its output layer placed above its run (one tree commit, and in Now's open
    /// view); a job absorbing into its run's top layer needs no change. A job absorbing
    /// into a lower layer (whose appended records do not win over the layers above it), or
    /// one whose output cannot be placed (a write in flight on Now), copies its whole
    /// output before the swap as before.
    fn start_progressive(&mut self, mut jobs: Vec<MergeJob>) -> Vec<MergeJob> {
        for job in &mut jobs {
            if !job.may_become_progressive() {
                continue;
            }
            if job.absorbs_into_top() {
                job.make_progressive(self.now.clone());
            } else if job.makes_new_layer() {
                if let Err(e) = self.place_output(job) {
                    tracing::info!(
                        "merge {}: copies its whole output before the swap ({e})",
                        job.id()
                    );
                }
            }
        }
        self.refresh_own_from();
        jobs
    }

    /// Jobs that complete the progressive merges a crash (or a dropped job) left under way:
    /// each absorbs the rest of its run into its output, the run's top layer, so nothing
    /// is copied twice. Entries whose layers changed since are dropped from the tree.
    pub fn resume_merges(&mut self, opts: &DeleteOptions) -> Result<Vec<MergeJob>> {
        self.resume_merges_except(opts, &[])
    }

    /// [`Disk::resume_merges`] leaving alone (listed, not resumed) the merges in `except`'s
    /// stacks.
    fn resume_merges_except(
        &mut self,
        opts: &DeleteOptions,
        except: &[StackRef],
    ) -> Result<Vec<MergeJob>> {
        self.writable()?;
        let busy = self.registry.busy_layers();
        let mut tree = self.tree.clone();
        let mut moves = Vec::new();
        let mut keep = Vec::new();
        for m in &self.tree.merging {
            if busy.contains(&m.out) {
                keep.push(m.clone());
                continue;
            }
            let mut run = m.run.clone();
            run.push(m.out);
            if let Some((at, pos)) = self.tree.find_run(&run) {
                if except.contains(&at) {
                    keep.push(m.clone());
                    continue;
                }
                moves.push(Move {
                    stack: at,
                    first: pos,
                    len: run.len(),
                    placement: Placement::Absorb(run.len() - 1),
                });
                keep.push(m.clone());
            }
        }
        tree.merging = keep;
        let mut ids = Vec::with_capacity(moves.len());
        for _ in &moves {
            ids.push(tree.alloc_id()?);
        }
        if tree != self.tree {
            self.commit_tree(tree)?;
        }
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let jobs = self.build_jobs(&moves, &ids, "", "resume", opts);
        self.refresh_own_from();
        if jobs_touch_now(&self.tree, &jobs) {
            self.now.sync_log(true)?;
        }
        Ok(self.start_progressive(jobs))
    }

    /// Creates a new-layer job's output (empty) and places it above the job's run in the
    /// tree and in Now's view: every view reads the same, as the layer holds nothing yet.
    fn place_output(&mut self, job: &mut MergeJob) -> Result<()> {
        let run = job.run_layers();
        let (at, pos) = self
            .tree
            .find_run(&run)
            .ok_or_else(|| Error::Invalid("its run is not in the tree".into()))?;
        let id = job.id();
        let mut tree = self.tree.clone();
        let Some(stack) = tree.stack_mut(at) else {
            return Err(Error::Invalid("its stack is not in the tree".into()));
        };
        stack.insert(pos + run.len(), id);
        tree.merging.push(PartialMerge {
            out: id,
            run: run.clone(),
        });
        let out = match LayerFiles::create(&self.dir, self.uuid, id, self.opts.cache)
            .and_then(|lf| sync_dir(&self.dir.join(LAYERS_DIR)).map(|()| lf))
        {
            Ok(lf) => Arc::new(lf),
            Err(e) => return Err(self.abandon_layer(id, e)),
        };
        let now = self.now.clone();
        let mut st = now.state_mut();
        let view_pos = st.find_run(&run);
        // A planned write carries its layer's ordinal, which the insertion would shift.
        if view_pos.is_some() && now.writes_in_flight() > 0 {
            drop(st);
            return Err(self.abandon_layer(id, Error::Busy));
        }
        if view_pos.is_some() && st.layers.len() >= usize::from(u16::MAX) {
            drop(st);
            return Err(
                self.abandon_layer(id, Error::Invalid("Now's lineage has 65535 layers".into()))
            );
        }
        if let Err(e) = self.commit_tree(tree) {
            drop(st);
            return Err(self.abandon_layer(id, e));
        }
        if let Some(p) = view_pos {
            st.insert_layer(p + run.len(), out.clone());
        }
        drop(st);
        job.adopt_output_above(out, now);
        Ok(())
    }

    /// Takes the empty output a progressive job placed above its run out of the tree and
    /// of Now's view again (the reverse of [`Disk::place_output`]).
    fn unplace_output(&mut self, job: &MergeJob) -> Result<()> {
        let out = job.output_layer();
        if out != job.id() || !self.tree.merging.iter().any(|m| m.out == out) {
            return Ok(());
        }
        let run = job.run_layers();
        let (at, pos) = self
            .tree
            .find_run(&run)
            .ok_or_else(|| Error::Invalid("its run is not in the tree".into()))?;
        let mut tree = self.tree.clone();
        let Some(stack) = tree.stack_mut(at) else {
            return Err(Error::Invalid("its stack is not in the tree".into()));
        };
        stack.remove(pos + run.len() - 1);
        tree.merging.retain(|m| m.out != out);
        let now = self.now.clone();
        let mut st = now.state_mut();
        let view_pos = st.find_run(&run);
        if view_pos.is_some() && now.writes_in_flight() > 0 {
            return Err(Error::Busy);
        }
        self.commit_tree(tree)?;
        if let Some(p) = view_pos {
            st.remove_layer(p + run.len() - 1);
        }
        drop(st);
        self.remove_layer_files(out);
        Ok(())
    }

    /// Renames a checkpoint.
    pub fn rename(&mut self, name: &str, new_name: &str) -> Result<()> {
        self.writable()?;
        let id = self.tree.by_name(name)?.id;
        if name == new_name {
            return Ok(());
        }
        self.tree.check_new_name(new_name)?;
        let mut tree = self.tree.clone();
        if let Some(n) = tree.nodes.iter_mut().find(|n| n.id == id) {
            n.name = Some(new_name.to_string());
        }
        self.commit_tree(tree)
    }

    /// Writes a flattened raw image of `name` (or Now) to `out`, sparse where it reads zeros.
    /// `out` may not be, or lie inside, the disk directory or its base image; the image is
    /// written to a temporary file beside `out` and renamed over it once complete, so a
    /// failure leaves no partial output.
    pub fn export(&self, name: Option<&str>, out: &Path) -> Result<()> {
        self.check_export_target(out)?;
        let view = match name {
            Some(n) => self.checkpoint_view(n)?,
            None if self.shared => return Err(Error::Locked(self.dir.clone())),
            None => self.now.clone(),
        };
        view.check_readable()?;
        let file_name = out
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} names no file", out.display())))?;
        let tmp = out.with_file_name(format!(
            ".{}.strata-export-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let result = (|| {
            f.set_len(view.size()).map_err(|e| Error::io(&tmp, e))?;
            const CHUNK: u64 = 1 << 20;
            let mut buf = vec![0u8; CHUNK as usize];
            let mut off = 0;
            while off < view.size() {
                let n = CHUNK.min(view.size() - off) as usize;
                view.read_at(&mut buf[..n], off)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    f.write_all_at(&buf[..n], off)
                        .map_err(|e| Error::io(&tmp, e))?;
                }
                off += n as u64;
            }
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Refuses an export target that is one of the disk's files, lies inside the disk
    /// directory, is the base image, or exists and is not a regular file.
    fn check_export_target(&self, out: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: &str| {
            Err(Error::Invalid(format!(
                "refusing to export to {}: {why}",
                out.display()
            )))
        };
        let mut own: HashSet<(u64, u64)> = HashSet::new();
        let mut add = |p: &Path| {
            if let Ok(m) = fs::metadata(p) {
                own.insert((m.dev(), m.ino()));
            }
        };
        add(&self.dir);
        add(&self.dir.join(LAYERS_DIR));
        for d in [self.dir.clone(), self.dir.join(LAYERS_DIR)] {
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    add(&e.path());
                }
            }
        }
        if let Some(b) = &self.tree.base {
            add(&b.path);
        }
        if let Some(b) = &self.base {
            if let Ok(m) = b.file.metadata() {
                own.insert((m.dev(), m.ino()));
            }
        }
        match fs::metadata(out) {
            Ok(m) => {
                if own.contains(&(m.dev(), m.ino())) {
                    return refuse("it is a file of the disk or its base image");
                }
                if !m.is_file() {
                    return refuse("it exists and is not a regular file");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(out, e)),
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = fs::canonicalize(parent).map_err(|e| Error::io(parent, e))?;
        let dir = fs::canonicalize(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        if parent.starts_with(&dir) {
            return refuse("it lies inside the disk directory");
        }
        Ok(())
    }

    /// Verifies every log record, and the checksum of every block that some checkpoint or
    /// Now can read.
    pub fn check(&self) -> Result<CheckReport> {
        self.now.wait_punches();
        let mut report = CheckReport::default();
        if let Some(why) = &self.base_error {
            report.problems.push(format!("{why} (no view can be read)"));
        }
        let mut stacks: Vec<(String, Vec<u64>)> = self
            .tree
            .nodes
            .iter()
            .map(|n| {
                let label = match &n.name {
                    Some(nm) => format!("checkpoint {nm:?}"),
                    None => format!("hidden node {}", n.id),
                };
                (label, n.layers.clone())
            })
            .collect();
        if self.shared {
            // Now is being written by the process that holds the lock.
            report.skipped.push(format!(
                "Now (the disk is in use by another process; its layers {:?} are changing)",
                self.tree.now.layers
            ));
        } else {
            stacks.push(("Now".to_string(), self.tree.now.layers.clone()));
        }
        let active_id = self.tree.now.layers.last().copied();
        let mut raced = false;
        let mut buf = AlignedBuf::new(BLOCK_SIZE as usize);
        for (label, layers) in stacks {
            // block -> (layer files, data block, crc) of the newest record in this stack.
            let mut live: HashMap<u64, (Arc<LayerFiles>, u64, u32)> = HashMap::new();
            for &l in &layers {
                report.layers_checked += 1;
                let lf = match LayerFiles::open(&self.dir, self.uuid, l, self.opts.cache, false) {
                    Ok(lf) => Arc::new(lf),
                    Err(e) => {
                        report.problems.push(format!("{label}: layer {l}: {e}"));
                        continue;
                    }
                };
                if self.shared && !locking::pin(&lf)? {
                    raced = true;
                }
                let scan = match lf.scan_log(self.disk_blocks()) {
                    Ok(scan) => scan,
                    Err(e) => {
                        report.problems.push(format!("{label}: layer {l}: {e}"));
                        continue;
                    }
                };
                for (off, why) in &scan.damaged {
                    report.problems.push(format!(
                        "{label}: {}: record at byte {off}: {why}",
                        lf.log_path.display()
                    ));
                }
                for (off, why) in &scan.ignored {
                    report.problems.push(format!(
                        "{label}: {}: record at byte {off}: {why}",
                        lf.log_path.display()
                    ));
                }
                if scan.omitted > 0 {
                    report.problems.push(format!(
                        "{label}: {}: {} more damaged or ignored records",
                        lf.log_path.display(),
                        scan.omitted
                    ));
                }
                if scan.torn_bytes > 0 && Some(l) != active_id {
                    report.problems.push(format!(
                        "{label}: {}: {} bytes after the last valid record at byte {} (the layer is sealed: its blocks cannot be trusted)",
                        lf.log_path.display(),
                        scan.torn_bytes,
                        scan.valid_len
                    ));
                }
                if scan.zero_tail > 0 {
                    report.notes.push(format!(
                        "{label}: {}: {} zero bytes at byte {} after the last record (space the log was extended by that no write reached, as a crash after preallocating leaves it: not damage{})",
                        lf.log_path.display(),
                        scan.zero_tail,
                        scan.valid_len + scan.torn_bytes,
                        if Some(l) == active_id { "; a writable open cuts it off" } else { "; the next append writes over it" }
                    ));
                }
                for r in scan.records {
                    match r.kind {
                        RecordKind::Data => {
                            live.insert(r.disk_block, (lf.clone(), r.data_block, r.crc))
                        }
                        RecordKind::Zero => live.remove(&r.disk_block),
                    };
                }
            }
            let mut blocks: Vec<_> = live.into_iter().collect();
            blocks.sort_by_key(|(b, (l, d, _))| (l.id, *d, *b));
            for (disk_block, (lf, data_block, crc)) in blocks {
                report.blocks_checked += 1;
                match lf.read_block(data_block, buf.as_mut_slice()) {
                    Ok(()) => {
                        let got = crc32c::crc32c(buf.as_slice());
                        if got != crc {
                            report.problems.push(format!(
                                "{label}: {} data block {data_block} (disk offset {}): checksum {got:08x}, expected {crc:08x}",
                                lf.data_path.display(),
                                disk_block.saturating_mul(BLOCK_SIZE)
                            ));
                        }
                    }
                    Err(e) => report.problems.push(format!(
                        "{label}: {} data block {data_block} (disk offset {}): {e}",
                        lf.data_path.display(),
                        disk_block.saturating_mul(BLOCK_SIZE)
                    )),
                }
            }
        }
        if self.shared && (raced || !report.is_clean()) && Tree::load(&self.dir)? != self.tree {
            return Err(Error::Invalid(
                "the checkpoint tree changed while it was being checked (the disk is in use by another process); run check again".into(),
            ));
        }
        Ok(report)
    }

    /// Renders the tree as text, with a `<- Now` marker.
    pub fn tree_text(&self) -> String {
        let mut out = String::new();
        match &self.tree.base {
            Some(b) => out.push_str(&format!("base {} ({} bytes)\n", b.path.display(), b.size)),
            None => out.push_str(&format!("(empty disk, {} bytes)\n", self.tree.size)),
        }
        self.render(&mut out, None, &self.tree.roots(), "");
        out
    }

    fn render(&self, out: &mut String, parent: Option<u64>, kids: &[u64], prefix: &str) {
        let now_here = self.tree.now.parent == parent;
        let total = kids.len() + usize::from(now_here);
        for (i, &k) in kids.iter().enumerate() {
            let last = i + 1 == total;
            let Some(n) = self.tree.node(k) else { continue };
            let label = match &n.name {
                Some(nm) => format!("{nm}  ({} KiB)", self.info_of(n).layer_bytes / 1024),
                None => "(deleted, shared by its children)".to_string(),
            };
            out.push_str(&format!(
                "{prefix}{}{label}\n",
                if last { "└─ " } else { "├─ " }
            ));
            let next = format!("{prefix}{}", if last { "   " } else { "│  " });
            self.render(out, Some(k), &self.tree.children(k), &next);
        }
        if now_here {
            out.push_str(&format!("{prefix}└─ <- Now\n"));
        }
    }

    /// The tree as JSON: checkpoints (parents first) and Now's parent.
    pub fn tree_json(&self) -> serde_json::Value {
        serde_json::json!({
            "size": self.tree.size,
            "base": self.tree.base.as_ref().map(|b| b.path.clone()),
            "checkpoints": self.list(),
            "now": {
                "parent": self.tree.visible_name(self.tree.now.parent),
            },
        })
    }

    /// The disk directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if !self.opts.read_only {
            if let Err(e) = self.now.flush() {
                tracing::warn!("flush on close failed: {e}");
            }
            // Queued hole punches end before the disk lock goes (another writer may reuse
            // those blocks once it has the lock).
            self.now.wait_punches();
        }
    }
}

/// A parent merged into its only child: its layers joined the child's stack.
#[derive(Clone, Debug)]
struct Merge {
    parent_layers: Vec<u64>,
    /// The stack that received them.
    child: StackRef,
}

/// A delete's tree, computed and not committed yet.
struct Relinked {
    tree: Tree,
    report: DeleteReport,
    /// Layers whose files go once the tree is committed.
    drop_layers: Vec<u64>,
    merges: Vec<Merge>,
}

/// A strategy's validated moves and the reclaims of what they leave.
struct Planned {
    moves: Vec<Move>,
    /// Per stack, the received layers no move rewrites (oldest first).
    reclaims: Vec<(StackRef, Vec<u64>)>,
}

/// Tree ids reserved for a plan's jobs.
struct ReservedIds {
    moves: Vec<u64>,
    reclaims: Vec<u64>,
}

impl Planned {
    fn reserve(&self, tree: &mut Tree) -> Result<ReservedIds> {
        let moves = self
            .moves
            .iter()
            .map(|_| tree.alloc_id())
            .collect::<Result<_>>()?;
        let reclaims = self
            .reclaims
            .iter()
            .map(|_| tree.alloc_id())
            .collect::<Result<_>>()?;
        Ok(ReservedIds { moves, reclaims })
    }
}

/// A committed relink whose merges are not planned yet (see [`Disk::delete_deferred`]).
#[derive(Debug)]
pub struct PendingPlan {
    id: u64,
    checkpoint: String,
    /// What each stack received in the relink, as the tree stood then.
    received: Vec<Merge>,
}

impl PendingPlan {
    /// An id the relink's commit reserved for this delete: the jobs it plans name it as
    /// their `delete`; no job or layer has it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The deleted checkpoint.
    pub fn checkpoint(&self) -> &str {
        &self.checkpoint
    }
}

/// Starting at hidden node `id`, removes or merges hidden nodes that no longer have two or
/// more children, walking up the tree.
fn collapse_from(
    tree: &mut Tree,
    mut id: Option<u64>,
    drop_layers: &mut Vec<u64>,
    merges: &mut Vec<Merge>,
    report: &mut DeleteReport,
) {
    let mut first = true;
    while let Some(cur) = id {
        let Some(node) = tree.node(cur).cloned() else {
            return;
        };
        if node.name.is_some() {
            return;
        }
        let kids = tree.children(cur);
        let now_child = tree.now.parent == Some(cur);
        match kids.len() + usize::from(now_child) {
            0 => {
                drop_layers.extend(&node.layers);
                tree.nodes.retain(|n| n.id != cur);
                id = node.parent;
            }
            1 => {
                if now_child {
                    merges.push(Merge {
                        parent_layers: node.layers.clone(),
                        child: StackRef::Now,
                    });
                    let mut layers = node.layers.clone();
                    layers.extend(&tree.now.layers);
                    tree.now.layers = layers;
                    tree.now.parent = node.parent;
                } else if let Some(child) = tree.nodes.iter_mut().find(|n| n.id == kids[0]) {
                    merges.push(Merge {
                        parent_layers: node.layers.clone(),
                        child: StackRef::Node(child.id),
                    });
                    let mut layers = node.layers.clone();
                    layers.extend(&child.layers);
                    child.layers = layers;
                    child.parent = node.parent;
                }
                tree.nodes.retain(|n| n.id != cur);
                report.merged += 1;
                // The parent may have been left with a single child by an earlier `apply`
                // (which moved Now away): look at it too, so no hidden node keeps a single
                // child (the layer-file bound counts on it).
                id = node.parent;
                first = false;
            }
            _ => {
                if first {
                    report.hidden += 1;
                }
                return;
            }
        }
    }
}

/// Disks of at most this many blocks (16 GiB) count live blocks in a dense table (2 bytes
/// per block) rather than a map.
const DENSE_LIVE_BLOCKS: u64 = 1 << 22;

/// Bytes of dead data a layer must hold before maintenance plans its reclaim.
const RECLAIM_MIN_BYTES: u64 = 1 << 20;

/// Longest wait of `finish_merge` for Now's reads in flight before it punches the merged
/// layer's unreferenced blocks (the engine drains client I/O first, so it waits for none);
/// blocks whose reads do not end by then stay allocated.
const GATE_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// True when no reader pins layer `id` (its claim could be taken; it is released at once).
fn claimable(dir: &Path, id: u64) -> bool {
    match locking::claim(&layer::log_path(dir, id)) {
        Ok(Some(_)) => true,
        Ok(None) => {
            tracing::info!(
                "layer {id} is pinned by a reader: its overwritten blocks stay allocated"
            );
            false
        }
        Err(e) => {
            tracing::warn!("layer {id}: {e}: its overwritten blocks stay allocated");
            false
        }
    }
}

/// The layers of `tree` that `moves` rewrite.
fn covered_layers(tree: &Tree, moves: &[Move]) -> HashSet<u64> {
    moves
        .iter()
        .filter_map(|m| tree.stack(m.stack)?.get(m.first..m.first + m.len))
        .flatten()
        .copied()
        .collect()
}

/// True when some job's run lies in Now's stack.
fn jobs_touch_now(tree: &Tree, jobs: &[MergeJob]) -> bool {
    jobs.iter().any(|j| {
        tree.find_run(&j.run_layers())
            .is_some_and(|(at, _)| at == StackRef::Now)
    })
}

/// Checks a strategy's moves against the situation: in range, sealed, not overlapping.
/// Moves on a stack a running job already works on are skipped.
fn validate_moves(strategy: &str, s: &Situation, moves: Vec<Move>) -> Result<Vec<Move>> {
    let bad = |why: String| Error::Invalid(format!("merge strategy {strategy:?}: {why}"));
    let mut out: Vec<Move> = Vec::new();
    for m in moves {
        let st = s
            .stack(m.stack)
            .ok_or_else(|| bad(format!("{:?} is not a stack of the tree", m.stack)))?;
        if m.len == 0 || m.first.checked_add(m.len).is_none_or(|e| e > st.sealed) {
            return Err(bad(format!(
                "layers {}..{} of {:?} are not sealed layers of it ({} sealed)",
                m.first,
                m.first.saturating_add(m.len),
                m.stack,
                st.sealed
            )));
        }
        if let Placement::Absorb(i) = m.placement {
            if i >= m.len {
                return Err(bad(format!("absorbing layer {i} is outside its run")));
            }
        }
        if out
            .iter()
            .any(|o| o.stack == m.stack && o.first < m.first + m.len && m.first < o.first + o.len)
        {
            return Err(bad(format!("two moves overlap in {:?}", m.stack)));
        }
        if st.busy {
            tracing::info!(
                "{strategy}: {:?} already has a merge running; skipped",
                m.stack
            );
            continue;
        }
        out.push(m);
    }
    Ok(out)
}

/// Removes layer files that the tree does not reference (left by a crash between writing
/// files and committing the tree).
fn remove_orphans(dir: &Path, tree: &Tree) {
    let known: HashSet<u64> = tree.all_layers().into_iter().collect();
    let Ok(entries) = fs::read_dir(dir.join(LAYERS_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let id = name
            .strip_prefix('L')
            .and_then(|r| r.strip_suffix(".data").or_else(|| r.strip_suffix(".log")))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            if !known.contains(&id) {
                tracing::info!("removing orphan layer file {name}");
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod race_tests {
    use super::*;
    use crate::merge::reclaim_tests::{finished_or_draining, small_disk};
    use crate::merge::StrategyKind;

    /// `finish_merge` punches the merged layer's blocks Now overwrote during the merge; a
    /// read that resolved one of them before the overwrite is still in flight: the punch
    /// waits for it.
    #[test]
    fn finishing_a_merge_waits_for_a_read_of_a_block_now_overwrote() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        let mut disk = small_disk(&dir);
        let now = disk.now();
        for (g, name) in [(1u8, "a"), (2, "b"), (3, "c")] {
            now.write_at(&[g; 8192], 0, false).unwrap();
            disk.checkpoint(name).unwrap();
        }
        // c's layer joins Now's stack, then b's: Now's stack holds two sealed layers.
        for (name, kind) in [
            ("c", StrategyKind::Relink),
            ("b", StrategyKind::CompactIntoChild),
        ] {
            let (_, jobs) = disk
                .delete_online(name, &DeleteOptions::with(kind))
                .unwrap();
            let mut merge = None;
            for mut j in jobs {
                j.run(&AtomicBool::new(false)).unwrap();
                if j.is_reclaim() {
                    disk.finish_merge(j).unwrap();
                } else {
                    merge = Some(j);
                }
            }
            if let Some(job) = merge {
                // Resolved to the merged layer (the progressive merge moved Now's entries).
                let plan = now.plan_read(0, 4096).unwrap();
                assert!(plan.checks.iter().all(|c| c.layer == job.output_layer()));
                now.write_at(&[9; 4096], 0, false).unwrap();
                let e0 = now.merge_gate.epoch();
                std::thread::scope(|s| {
                    let h = s.spawn(|| disk.finish_merge(job).unwrap());
                    finished_or_draining(&h, &now.merge_gate, e0);
                    let mut buf = crate::AlignedBuf::new(4096);
                    let read = Volume::execute_read(&plan, buf.as_mut_slice());
                    assert!(
                        read.is_ok() && buf.as_slice() == [3; 4096],
                        "the read planned before the overwrite got a punched block: {read:?}"
                    );
                    drop(plan);
                    let r = h.join().unwrap();
                    assert!(r.bytes_freed > 0, "nothing was punched: {r:?}");
                });
            }
        }
        let mut buf = [0u8; 8192];
        now.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096] == [9; 4096] && buf[4096..] == [3; 4096]);
        assert!(disk.check().unwrap().is_clean());
    }
}
