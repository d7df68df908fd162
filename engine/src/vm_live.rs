//! Checkpoints of a running VM: the control socket's target for `strata run --vm`.
//!
//! The instant of a checkpoint: every vCPU is parked out of KVM_RUN, the virtio-blk queue is
//! drained through the quiesce gate (in-flight requests complete and their interrupts are
//! delivered), the vCPU, VM and device state is captured, the disk switches to a new active
//! layer, and guest memory is either written (`stop-copy`) or write-protected (`live`, the
//! default); then the guest resumes. A live checkpoint's memory is saved in the background and
//! the checkpoint becomes visible (its state directory renamed into place) only once every
//! page is durable.
//!
//! Applying a checkpoint to the running VM stops the current machine and has the run loop
//! (`vm_run.rs`) start the restored one in the same process, on the same control socket.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use journal::Disk;
use serde_json::{json, Value};

use crate::control::{to_json, DeleteArgs, Target};
use crate::machine::{self, MemoryBase};
use crate::merge_worker::{MergeWorker, Waiter};
use crate::quiesce::Gate;
use crate::vm_ops;
use crate::vmdir::{store, MachineMeta, MemoryMode, StateMeta, VmDir};
use crate::{Error, Result};

/// How long a checkpoint waits for the vCPUs to stop and for in-flight I/O to drain.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `apply` waits for the restored machine to run.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What the run loop starts next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Boot the configuration's guest.
    Cold,
    /// Restore checkpoint `id`'s machine.
    Resume(u64),
}

/// The state shared by the run loop and the control socket.
pub struct Live {
    pub vm: Mutex<VmDir>,
    pub disk: Arc<Mutex<Disk>>,
    pub gate: Arc<Gate>,
    machine: Mutex<Option<machine::Running>>,
    /// One tree operation at a time.
    ops: Mutex<()>,
    next: Mutex<Option<Start>>,
    /// The run loop's report of the last start: Ok(instant the guest ran) or the error text.
    started: Mutex<Option<std::result::Result<Instant, String>>>,
    started_cv: Condvar,
    /// The disk's background merges (online deletes), or why its thread did not start.
    merges: std::result::Result<MergeWorker, String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Live {
    pub fn new(vm: VmDir, disk: Arc<Mutex<Disk>>, gate: Arc<Gate>) -> Arc<Live> {
        let merges = MergeWorker::start(disk.clone(), gate.clone()).map_err(|e| {
            let why = crate::cli::error_chain(&e);
            tracing::error!("no online merges on this VM: {why}");
            why
        });
        Arc::new(Live {
            merges,
            vm: Mutex::new(vm),
            disk,
            gate,
            machine: Mutex::new(None),
            ops: Mutex::new(()),
            next: Mutex::new(None),
            started: Mutex::new(None),
            started_cv: Condvar::new(),
        })
    }

    /// The run loop: a machine is running (or none, once it ended).
    pub fn set_machine(&self, running: Option<machine::Running>) {
        *lock(&self.machine) = running;
    }

    /// The run loop: the machine ended; returns it.
    pub fn take_machine(&self) -> Option<machine::Running> {
        lock(&self.machine).take()
    }

    /// The run loop: how the last start went.
    pub fn report_start(&self, r: std::result::Result<Instant, String>) {
        *lock(&self.started) = Some(r);
        self.started_cv.notify_all();
    }

    /// The run loop: what to start after the current machine ended (None: stop).
    pub fn take_next(&self) -> Option<Start> {
        lock(&self.next).take()
    }

    /// Ends the running machine (a signal): nothing is started after it.
    pub fn stop(&self, outcome: vmm::Outcome) {
        *lock(&self.next) = None;
        if let Some(m) = lock(&self.machine).as_ref() {
            m.finish(outcome);
        }
    }

    fn worker(&self) -> Result<&MergeWorker> {
        self.merges.as_ref().map_err(|why| {
            Error::Usage(format!(
                "online deletes are not available: the merge worker did not start ({why})"
            ))
        })
    }

    fn disk(&self) -> Result<MutexGuard<'_, Disk>> {
        self.disk.lock().map_err(|_| {
            Error::Protocol("internal error: the disk state was lost to a panic".into())
        })
    }

    /// Takes a checkpoint of the running machine.
    fn create(&self, name: &str, mode: MemoryMode) -> Result<Value> {
        journal::validate_name(name)?;
        let requested = Instant::now();
        let vm = lock(&self.vm);
        let mut disk = self.disk()?;
        if disk.list().iter().any(|c| c.name == name) {
            return Err(journal::Error::DuplicateName(name.into()).into());
        }
        let guard = lock(&self.machine);
        let running = guard.as_ref().ok_or_else(|| {
            Error::Usage("the VM is not running (it is being restored or has stopped)".into())
        })?;
        let draft = vm.store.begin(name)?;
        // The instant: vCPUs parked, I/O drained, state captured, disk switched, memory
        // written or write-protected; only then may the device touch guest memory again.
        // Most of the disk's flush is done before the pause, while the guest runs; the flush
        // inside `Disk::checkpoint` then only covers the last moments.
        disk.now().flush()?;
        let paused = running.pause(PAUSE_TIMEOUT)?;
        let io = match self.gate.pause(PAUSE_TIMEOUT) {
            Ok(g) => g,
            Err(e) => {
                running.resume()?;
                return Err(e);
            }
        };
        let drained = paused.elapsed();
        let captured = (|| {
            let state = running.capture()?;
            let captured = paused.elapsed();
            let info = disk.checkpoint(name)?;
            Ok::<_, Error>((state, info, captured))
        })();
        let (state, info, captured_at) = match captured {
            Ok(v) => v,
            Err(e) => {
                drop(io);
                running.resume()?;
                return Err(e);
            }
        };
        let switched = paused.elapsed();
        let dir = draft.dir().to_path_buf();
        let memory = running.start_memory_save(&dir.join(store::MEMORY_FILE), mode, &vm.store);
        let protected = paused.elapsed();
        drop(io);
        let resumed = running.resume();
        tracing::info!(
            "checkpoint {name:?} pause: I/O drained at {drained:?}, state captured at {captured_at:?}, disk switched at {switched:?}, memory {} at {protected:?}",
            if mode == MemoryMode::Live { "protected" } else { "written" }
        );
        let ((save, parent), resumed_at) = match (memory, resumed) {
            (Ok(save), Ok(at)) => (save, at),
            (Err(e), _) | (_, Err(e)) => {
                vm_ops::undo_checkpoint(&mut disk, name);
                return Err(e);
            }
        };
        drop(guard);
        let pause = resumed_at.saturating_duration_since(paused);
        // The state is plain data by now: written (and fsynced) while the guest runs.
        if let Err(e) = machine::write_state(&dir.join(store::STATE_FILE), &state, &vm.spec) {
            drop(save);
            vm_ops::undo_checkpoint(&mut disk, name);
            return Err(e);
        }
        let bytes = match save.wait() {
            Ok(b) => b,
            Err(e) => {
                vm_ops::undo_checkpoint(&mut disk, name);
                return Err(e);
            }
        };
        let meta = StateMeta {
            format: 1,
            checkpoint: info.id,
            machine: Some(MachineMeta {
                mode,
                memory_parent: parent,
                memory_bytes: bytes,
                pause_us: pause.as_micros() as u64,
                total_us: requested.elapsed().as_micros() as u64,
            }),
        };
        if let Err(e) = draft.commit(&vm.spec, &meta) {
            vm_ops::undo_checkpoint(&mut disk, name);
            return Err(e);
        }
        if let Some(m) = lock(&self.machine).as_ref() {
            m.set_memory_base(MemoryBase::Image(info.id));
        }
        tracing::info!(
            "checkpoint {name:?}: guest paused {pause:?}, complete after {:?}, {} bytes of memory",
            requested.elapsed(),
            bytes
        );
        let mut v = to_json(&info)?;
        v["pause_us"] = json!(meta.machine.as_ref().map(|m| m.pause_us));
        v["total_us"] = json!(meta.machine.as_ref().map(|m| m.total_us));
        v["memory_bytes"] = json!(bytes);
        v["incremental"] = json!(parent.is_some());
        Ok(v)
    }

    /// Puts the running VM back to checkpoint `name`.
    fn apply(&self, name: &str, save_current: Option<&str>) -> Result<Value> {
        if let Some(sc) = save_current {
            journal::validate_name(sc)?;
            if self.disk()?.list().iter().any(|c| c.name == sc) {
                return Err(journal::Error::DuplicateName(sc.into()).into());
            }
            if !self.disk()?.list().iter().any(|c| c.name == name) {
                return Err(journal::Error::UnknownCheckpoint(name.into()).into());
            }
            self.create(sc, MemoryMode::Live)?;
        }
        let t0 = Instant::now();
        let mut vm = lock(&self.vm);
        let mut disk = self.disk()?;
        let guard = lock(&self.machine);
        let running = guard
            .as_ref()
            .ok_or_else(|| Error::Usage("the VM is not running".into()))?;
        running.pause(PAUSE_TIMEOUT)?;
        let io = match self.gate.pause(PAUSE_TIMEOUT) {
            Ok(g) => g,
            Err(e) => {
                running.resume()?;
                return Err(e);
            }
        };
        let applied = match vm_ops::apply_disk(&mut vm, &mut disk, name) {
            Ok(a) => a,
            Err(e) => {
                drop(io);
                running.resume()?;
                return Err(e);
            }
        };
        drop(disk);
        *lock(&self.started) = None;
        *lock(&self.next) = Some(if applied.machine {
            Start::Resume(applied.id)
        } else {
            Start::Cold
        });
        tracing::info!(
            "apply {name:?}: paused and disk rewound after {:?}",
            t0.elapsed()
        );
        running.finish(vmm::Outcome::Stopped { signal: 0 });
        drop(guard);
        drop(vm);
        // The run loop builds the restored machine; keep I/O closed until it runs.
        let started = {
            let mut s = lock(&self.started);
            let deadline = Instant::now() + START_TIMEOUT;
            while s.is_none() && Instant::now() < deadline {
                s = self
                    .started_cv
                    .wait_timeout(s, deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            s.clone()
        };
        drop(io);
        match started {
            Some(Ok(at)) => Ok(json!({
                "name": name,
                "running": true,
                "resumed": applied.machine,
                "apply_us": at.saturating_duration_since(t0).as_micros() as u64,
            })),
            Some(Err(e)) => Err(Error::Vm(format!("restoring {name:?} failed: {e}"))),
            None => Err(Error::Vm(format!(
                "the restored machine of {name:?} did not start within {START_TIMEOUT:?}"
            ))),
        }
    }
}

impl Target for Live {
    fn checkpoint_create(&self, name: &str, memory: Option<&str>) -> Result<Value> {
        let mode = match memory {
            Some(m) => m.parse()?,
            None => MemoryMode::Live,
        };
        let _op = lock(&self.ops);
        self.create(name, mode)
    }

    fn checkpoint_list(&self) -> Result<Value> {
        let vm = lock(&self.vm);
        let disk = self.disk()?;
        to_json(&vm_ops::list(&vm, &disk)?)
    }

    fn checkpoint_apply(&self, name: &str, save_current: Option<&str>) -> Result<Value> {
        let _op = lock(&self.ops);
        self.apply(name, save_current)
    }

    fn checkpoint_delete(&self, name: &str, args: &DeleteArgs) -> Result<Value> {
        let opts = args.options()?;
        let worker = self.worker()?;
        let _op = lock(&self.ops);
        let vm = lock(&self.vm);
        let (id, doomed) = {
            let disk = self.disk()?;
            let id = disk
                .list()
                .into_iter()
                .find(|c| c.name == name)
                .map(|c| c.id)
                .ok_or_else(|| journal::Error::UnknownCheckpoint(name.into()))?;
            // Memory images are folded while the guest runs and its I/O flows.
            (id, vm_ops::prepare_delete(&vm, &disk, name, args.subtree)?)
        };
        // The disk's tree changes with no I/O in flight (a few ms); the data moves later.
        let deleted = worker.delete(name, &opts, PAUSE_TIMEOUT)?;
        if let Some(m) = lock(&self.machine).as_ref() {
            m.forget_memory_base(id);
        }
        vm_ops::forget_deleted(&vm, &doomed)?;
        to_json(&deleted)
    }

    fn checkpoint_status(&self) -> Result<Value> {
        to_json(&self.worker()?.status())
    }

    fn merge_waiter(&self) -> Option<Waiter> {
        self.worker().ok().map(MergeWorker::waiter)
    }

    fn checkpoint_rename(&self, name: &str, new_name: &str) -> Result<Value> {
        let _op = lock(&self.ops);
        let mut disk = self.disk()?;
        vm_ops::rename(&mut disk, name, new_name)
    }

    fn checkpoint_export(&self, name: &str, output: &std::path::Path) -> Result<Value> {
        let _op = lock(&self.ops);
        let vm = lock(&self.vm);
        let disk = self.disk()?;
        vm_ops::export(&vm, &disk, name, output)
    }
}

/// The VM's current configuration.
pub fn lock_spec(live: &Live) -> crate::vmdir::VmSpec {
    lock(&live.vm).spec.clone()
}

/// The VM's checkpoint store.
pub fn lock_store(live: &Live) -> crate::vmdir::Store {
    lock(&live.vm).store.clone()
}

/// The VM directory.
pub fn lock_dir(live: &Live) -> std::path::PathBuf {
    lock(&live.vm).path.clone()
}
