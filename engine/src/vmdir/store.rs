//! The per-checkpoint state of a VM directory: `checkpoints/<id>/` beside disk checkpoint
//! `<id>` (ids are stable across renames), created complete or not at all.
//!
//! A checkpoint is written into `checkpoints/tmp-<pid>-<n>/` while an intent file
//! (`checkpoints/pending.json`, naming the disk checkpoint) says one is under way; the finished
//! directory is renamed to `<id>` and only then is the intent removed. After a crash, the
//! next open of the VM finds the intent, deletes the disk checkpoint of that name if its state
//! directory never appeared (the disk merges it into its child, so Now reads as before), and
//! removes the temporary directories. So a checkpoint is either complete or absent.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::files;
use super::spec::VmSpec;
use crate::{Error, Result};

/// Format of `meta.json`.
const META_FORMAT: u32 = 1;
const MAX_META_BYTES: u64 = 1 << 20;
pub const META_FILE: &str = "meta.json";
pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "machine.state";
pub const MEMORY_FILE: &str = "memory.img";
const PENDING_FILE: &str = "pending.json";
const RESUME_FILE: &str = "resume.json";
/// Longest chain of incremental memory images followed (each link is one file).
const MAX_CHAIN: usize = 4096;

/// How a running VM's memory was captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryMode {
    /// Written while the VM was paused.
    StopCopy,
    /// Write-protected at the pause and saved in the background while the guest ran.
    Live,
}

impl std::str::FromStr for MemoryMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "live" => Ok(MemoryMode::Live),
            "stop-copy" => Ok(MemoryMode::StopCopy),
            _ => Err(Error::Usage(format!(
                "memory mode {s:?}: expected live or stop-copy"
            ))),
        }
    }
}

/// The saved machine of a checkpoint taken of a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMeta {
    pub mode: MemoryMode,
    /// The checkpoint whose memory image this one's is an increment over (None: full image).
    pub memory_parent: Option<u64>,
    /// Bytes of page data written for this checkpoint's image.
    pub memory_bytes: u64,
    /// Guest downtime: last vCPU stopped to first vCPU running again.
    pub pause_us: u64,
    /// From the request to the checkpoint being complete (memory durable).
    pub total_us: u64,
}

/// `meta.json` of one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateMeta {
    pub format: u32,
    /// The disk checkpoint this state belongs to.
    pub checkpoint: u64,
    /// None: a checkpoint of a stopped VM (disk and configuration only).
    pub machine: Option<MachineMeta>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    name: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    checkpoint: u64,
}

/// The `checkpoints/` directory of a VM.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// A checkpoint being written: its files go into [`Draft::dir`].
pub struct Draft {
    dir: PathBuf,
    store: Store,
    done: bool,
}

static DRAFTS: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The store of the VM directory `vm_dir` (created if missing).
    pub fn open(vm_dir: &Path) -> Result<Store> {
        let dir = vm_dir.join("checkpoints");
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Store { dir })
    }

    /// The directory of checkpoint `id`'s state.
    pub fn dir_of(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The meta of checkpoint `id`, if it has complete state.
    pub fn meta(&self, id: u64) -> Result<Option<StateMeta>> {
        let path = self.dir_of(id).join(META_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = files::read_capped(&path, MAX_META_BYTES)?;
        let meta: StateMeta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Vm(format!("{}: {e}", path.display())))?;
        if meta.format != META_FORMAT || meta.checkpoint != id {
            return Err(Error::Vm(format!(
                "{}: format {} for checkpoint {} (expected format {META_FORMAT}, checkpoint {id})",
                path.display(),
                meta.format,
                meta.checkpoint
            )));
        }
        Ok(Some(meta))
    }

    /// The configuration saved with checkpoint `id`.
    pub fn config(&self, id: u64) -> Result<VmSpec> {
        VmSpec::load(&self.dir_of(id).join(CONFIG_FILE))
    }

    /// Memory images to restore checkpoint `id`: its full ancestor image first, then each
    /// increment, ending with its own.
    pub fn memory_chain(&self, id: u64) -> Result<Vec<PathBuf>> {
        let mut chain = Vec::new();
        let mut cur = id;
        loop {
            let meta = self.meta(cur)?.ok_or_else(|| {
                Error::Vm(format!(
                    "memory image chain of checkpoint {id}: checkpoint {cur} has no saved state"
                ))
            })?;
            let m = meta.machine.ok_or_else(|| {
                Error::Vm(format!(
                    "memory image chain of checkpoint {id}: checkpoint {cur} holds no memory"
                ))
            })?;
            chain.push(self.dir_of(cur).join(MEMORY_FILE));
            match m.memory_parent {
                None => break,
                Some(p) if chain.len() < MAX_CHAIN => cur = p,
                Some(_) => {
                    return Err(Error::Vm(format!(
                        "memory image chain of checkpoint {id} is longer than {MAX_CHAIN} (a loop?)"
                    )))
                }
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Ids of checkpoints whose memory image is an increment over `id`'s.
    pub fn memory_children(&self, id: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for other in self.ids()? {
            if let Some(StateMeta {
                machine: Some(m), ..
            }) = self.meta(other)?
            {
                if m.memory_parent == Some(id) {
                    out.push(other);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Ids of every complete state directory.
    pub fn ids(&self) -> Result<Vec<u64>> {
        let rd = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
        let mut ids: Vec<u64> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Host bytes of checkpoint `id`'s state files.
    pub fn bytes_of(&self, id: u64) -> u64 {
        files::allocated_in(&self.dir_of(id))
    }

    /// Records that checkpoint `name` is being taken and returns a directory for its files.
    pub fn begin(&self, name: &str) -> Result<Draft> {
        let text = serde_json::to_vec(&Pending {
            name: name.to_string(),
        })
        .map_err(|e| Error::Protocol(e.to_string()))?;
        files::write_atomic(&self.dir.join(PENDING_FILE), &text)?;
        let n = DRAFTS.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("tmp-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Draft {
            dir,
            store: self.clone(),
            done: false,
        })
    }

    /// Finishes what a crash interrupted: a disk checkpoint whose state never completed is
    /// deleted from `disk` (Now reads as before), temporary directories are removed, and state
    /// directories of checkpoints the disk no longer has (and no image depends on) go.
    pub fn recover(&self, disk: &mut journal::Disk) -> Result<()> {
        let pending = self.dir.join(PENDING_FILE);
        if pending.exists() {
            let bytes = files::read_capped(&pending, MAX_META_BYTES)?;
            if let Ok(p) = serde_json::from_slice::<Pending>(&bytes) {
                if let Some(info) = disk.list().into_iter().find(|c| c.name == p.name) {
                    if self.meta(info.id)?.is_none() {
                        tracing::warn!(
                            "removing checkpoint {:?}: it was being taken when the VMM stopped",
                            p.name
                        );
                        disk.delete(&p.name, false)?;
                    }
                }
            }
            fs::remove_file(&pending)
                .map_err(|e| Error::io(format!("removing {}", pending.display()), e))?;
        }
        let rd = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let visible: Vec<u64> = disk.list().iter().map(|c| c.id).collect();
        for id in self.ids()? {
            if !visible.contains(&id) && self.memory_children(id)?.is_empty() {
                let _ = fs::remove_dir_all(self.dir_of(id));
            }
        }
        files::sync_dir(&self.dir)
    }

    /// Sets (or clears) the checkpoint the next `strata run --vm` resumes from.
    pub fn set_resume(&self, id: Option<u64>) -> Result<()> {
        let path = self.dir.join(RESUME_FILE);
        match id {
            Some(checkpoint) => {
                let text = serde_json::to_vec(&Resume { checkpoint })
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                files::write_atomic(&path, &text)
            }
            None => match fs::remove_file(&path) {
                Ok(()) => files::sync_dir(&self.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
            },
        }
    }

    /// The checkpoint the next run resumes from, if any.
    pub fn resume(&self) -> Result<Option<u64>> {
        let path = self.dir.join(RESUME_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = files::read_capped(&path, MAX_META_BYTES)?;
        let r: Resume = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Vm(format!("{}: {e}", path.display())))?;
        Ok(Some(r.checkpoint))
    }

    /// Removes checkpoint `id`'s state directory.
    pub fn remove(&self, id: u64) -> Result<()> {
        let dir = self.dir_of(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => files::sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
        }
    }

    /// Rewrites checkpoint `id`'s meta (e.g. after its memory image was folded).
    pub fn rewrite_meta(&self, meta: &StateMeta) -> Result<()> {
        let text = serde_json::to_vec_pretty(meta).map_err(|e| Error::Protocol(e.to_string()))?;
        files::write_atomic(&self.dir_of(meta.checkpoint).join(META_FILE), &text)
    }
}

impl Draft {
    /// Where this checkpoint's files are written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the checkpoint complete: writes its configuration and meta, fsyncs everything and
    /// renames the directory to the disk checkpoint's id.
    pub fn commit(mut self, spec: &VmSpec, meta: &StateMeta) -> Result<()> {
        spec.save(&self.dir.join(CONFIG_FILE))?;
        let text = serde_json::to_vec_pretty(meta).map_err(|e| Error::Protocol(e.to_string()))?;
        files::write_atomic(&self.dir.join(META_FILE), &text)?;
        for f in [STATE_FILE, MEMORY_FILE] {
            let p = self.dir.join(f);
            if p.exists() {
                fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(format!("syncing {}", p.display()), e))?;
            }
        }
        files::sync_dir(&self.dir)?;
        let target = self.store.dir_of(meta.checkpoint);
        let _ = fs::remove_dir_all(&target);
        fs::rename(&self.dir, &target)
            .map_err(|e| Error::io(format!("renaming {}", target.display()), e))?;
        files::sync_dir(&self.store.dir)?;
        self.done = true;
        self.store.clear_pending()
    }
}

impl Store {
    fn clear_pending(&self) -> Result<()> {
        let p = self.dir.join(PENDING_FILE);
        match fs::remove_file(&p) {
            Ok(()) => files::sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
        }
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
            if let Err(e) = self.store.clear_pending() {
                tracing::warn!("{e}");
            }
        }
    }
}
