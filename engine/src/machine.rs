//! The engine's one door to the VMM's machine state and memory images (`vmm::snapshot`):
//! the identity of a VM directory's files, state files, memory saves and image chains, and the
//! running machine's controls.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::snapshot::memory::{self as mem, LiveOptions};
use vmm::snapshot::{Identity, MachineState};

use crate::vmdir::{files, store, MemoryMode, Store, VmSpec};
use crate::{Error, Result};

/// Largest machine state file read.
const MAX_STATE_FILE: u64 = vmm::snapshot::MAX_MACHINE_STATE + 4096;

fn vm_err(e: impl std::error::Error) -> Error {
    Error::Vm(crate::cli::error_chain(&e))
}

/// The identity every file of `spec`'s VM carries.
pub fn identity(spec: &VmSpec) -> Result<Identity> {
    Ok(Identity {
        vm_uuid: spec.uuid_bytes()?,
        mem_size: spec.memory,
    })
}

/// Writes a machine state file.
pub fn write_state(path: &Path, state: &MachineState, spec: &VmSpec) -> Result<()> {
    let bytes = vmm::snapshot::encode(state, &identity(spec)?).map_err(vm_err)?;
    files::write_atomic(path, &bytes)
}

/// Reads and decodes a machine state file (not yet validated against a VM).
pub fn read_state(path: &Path, spec: &VmSpec) -> Result<MachineState> {
    let bytes = files::read_capped(path, MAX_STATE_FILE)?;
    vmm::snapshot::decode(&bytes, &identity(spec)?).map_err(|e| {
        Error::Vm(format!(
            "{}: {}",
            path.display(),
            crate::cli::error_chain(&e)
        ))
    })
}

/// Checks that a machine state file belongs to `spec`'s VM and is intact.
pub fn check_state_file(path: &Path, spec: &VmSpec) -> Result<()> {
    read_state(path, spec).map(|_| ())
}

/// Checks a memory image chain as a restore would before mapping it (headers, metadata,
/// sizes, links; page data is checked as it loads).
pub fn check_memory(chain: &[PathBuf], spec: &VmSpec) -> Result<()> {
    mem::check_chain(chain, &identity(spec)?)
        .map_err(|e| Error::Vm(format!("memory image: {}", crate::cli::error_chain(&e))))
}

/// Folds the memory image `parent` into its increment `child` (the child's pages win);
/// returns the child's new page bytes.
pub fn fold(parent: &Path, child: &Path, spec: &VmSpec) -> Result<u64> {
    let out = child.with_extension("fold");
    let stats = mem::fold(parent, child, &out, &identity(spec)?).map_err(|e| {
        let _ = std::fs::remove_file(&out);
        Error::Vm(format!(
            "folding memory images: {}",
            crate::cli::error_chain(&e)
        ))
    })?;
    std::fs::rename(&out, child)
        .map_err(|e| Error::io(format!("replacing {}", child.display()), e))?;
    files::sync_dir(child.parent().unwrap_or(Path::new(".")))?;
    Ok(stats.bytes_written)
}

/// Writes the memory a chain of images restores to as one full image at `out`.
pub fn flatten(chain: &[PathBuf], out: &Path, spec: &VmSpec) -> Result<u64> {
    let id = identity(spec)?;
    let memory = mem::restore(chain, &id)
        .map_err(|e| Error::Vm(format!("memory image: {}", crate::cli::error_chain(&e))))?;
    let r = mem::save_full(&memory, out, &id);
    mem::release(&memory);
    r.map(|s| s.bytes_written).map_err(vm_err)
}

/// Builds the VM of checkpoint `id`: its state and memory chain are checked before anything
/// runs; memory loads lazily.
pub fn restore(store: &Store, id: u64, spec: &VmSpec, config: vmm::VmConfig) -> Result<vmm::Vm> {
    let state = read_state(&store.dir_of(id).join(store::STATE_FILE), spec)?;
    let chain = store.memory_chain(id)?;
    // A page that fails its checksum is poisoned, never served: make the access that hits it
    // end this process with the reason instead of a bare "Bus error".
    mem::exit_on_damaged_access().map_err(|e| Error::io("installing the SIGBUS handler", e))?;
    let memory = mem::restore(&chain, &identity(spec)?)
        .map_err(|e| Error::Vm(format!("memory image: {}", crate::cli::error_chain(&e))))?;
    match vmm::Vm::restore(config, &state, memory.clone()) {
        Ok(vm) => Ok(vm),
        Err(e) => {
            mem::release(&memory);
            Err(vm_err(e))
        }
    }
}

/// What the next memory image of a running machine is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBase {
    /// Nothing: the next image is full.
    None,
    /// The image of this checkpoint (the last one taken of, or restored into, this memory).
    Image(u64),
}

/// A running machine, as the control socket drives it.
pub struct Running {
    ctl: vmm::VmController,
    identity: Identity,
    base: Mutex<MemoryBase>,
}

/// A memory save under way.
pub enum Save {
    Done(mem::ImageStats),
    Live(mem::LiveSave),
}

impl Running {
    pub fn new(ctl: vmm::VmController, spec: &VmSpec, base: MemoryBase) -> Result<Running> {
        Ok(Running {
            ctl,
            identity: identity(spec)?,
            base: Mutex::new(base),
        })
    }

    /// Parks every vCPU; returns the instant the last one stopped.
    pub fn pause(&self, timeout: Duration) -> Result<Instant> {
        self.ctl.pause(timeout).map(|p| p.stopped).map_err(vm_err)
    }

    /// The machine's state (paused, with the block device drained).
    pub fn capture(&self) -> Result<MachineState> {
        self.ctl.capture().map_err(vm_err)
    }

    /// Lets the vCPUs run again; returns the instant the first one did.
    pub fn resume(&self) -> Result<Instant> {
        self.ctl.resume().map_err(vm_err)
    }

    /// Ends the machine's run with `outcome`.
    pub fn finish(&self, outcome: vmm::Outcome) {
        self.ctl.finish(outcome)
    }

    /// Starts saving memory (paused) for checkpoint `id` into `path`: an increment over the
    /// base image when there is one.
    pub fn start_memory_save(
        &self,
        path: &Path,
        mode: MemoryMode,
        store: &Store,
    ) -> Result<(Save, Option<u64>)> {
        let memory = self.ctl.memory();
        let base = *self.base.lock().unwrap_or_else(|p| p.into_inner());
        let (parent, parent_ref) = match base {
            MemoryBase::Image(p) => {
                match mem::image_id(&store.dir_of(p).join(store::MEMORY_FILE), &self.identity) {
                    Ok(r) => (Some(p), Some(r)),
                    Err(e) => {
                        tracing::warn!("checkpoint {p}'s memory image is unusable as a base ({e}); saving a full image");
                        (None, None)
                    }
                }
            }
            MemoryBase::None => (None, None),
        };
        let save = match mode {
            MemoryMode::StopCopy => Save::Done(
                mem::save_stop_copy(&memory, path, &self.identity, parent_ref.as_ref())
                    .map_err(vm_err)?,
            ),
            MemoryMode::Live => Save::Live(
                mem::start_live(
                    &memory,
                    path,
                    &self.identity,
                    LiveOptions {
                        parent: parent_ref.as_ref(),
                    },
                )
                .map_err(vm_err)?,
            ),
        };
        Ok((save, parent))
    }

    /// The next image is relative to checkpoint `id`'s.
    pub fn set_memory_base(&self, base: MemoryBase) {
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = base;
    }

    /// Checkpoint `deleted` is gone: if it was the base, the next image is full.
    pub fn forget_memory_base(&self, deleted: u64) {
        let mut b = self.base.lock().unwrap_or_else(|p| p.into_inner());
        if *b == MemoryBase::Image(deleted) {
            *b = MemoryBase::None;
        }
    }

    /// Watches a restored machine's memory while it loads in the background: a page of the
    /// image chain that fails its checksum is never served, and the machine is stopped with a
    /// clear error as soon as the prefetch finds one.
    pub fn watch_restored_memory(&self) {
        let ctl = self.ctl.clone();
        let spawned = std::thread::Builder::new()
            .name("memory-health".into())
            .spawn(move || loop {
                match mem::health(&ctl.memory()) {
                    Ok(true) => return,
                    Ok(false) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => {
                        ctl.finish(vmm::Outcome::Fault {
                            cpu: 0,
                            what: format!(
                                "restored memory is damaged: {}",
                                crate::cli::error_chain(&e)
                            ),
                        });
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch the restored memory: {e}");
        }
    }

    /// Stops tracking the machine's memory (after its run ended).
    pub fn release_memory(&self) {
        mem::release(&self.ctl.memory());
    }
}

impl Save {
    /// Waits until the image is complete and durable.
    pub fn wait(self) -> Result<u64> {
        match self {
            Save::Done(s) => Ok(s.bytes_written),
            Save::Live(l) => l.wait().map(|s| s.bytes_written).map_err(vm_err),
        }
    }
}
