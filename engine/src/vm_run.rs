//! `strata run --vm DIR`: run a VM directory. A cold boot of its configured guest, or, when a
//! checkpoint was applied to the stopped VM, a resume of that checkpoint's machine. The control
//! socket (default DIR/api.sock) takes whole-machine checkpoints; applying one replaces the
//! running machine in place: this loop ends the current machine and starts the restored one in
//! the same process.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm::{Guest, Outcome, VmConfig};

use crate::cli::RunArgs;
use crate::control::ControlServer;
use crate::machine::{self, MemoryBase};
use crate::quiesce::Gate;
use crate::run_cmd::{exit_code, gated_block_device, open_console, vm_error, StopSignals};
use crate::vm_live::{Live, Start};
use crate::vmdir::{GuestSpec, VmDir, VmSpec};
use crate::{Error, Result};

/// Runs the VM in `dir` until its guest ends (or a signal stops it).
pub(crate) fn run(dir: &Path, args: &RunArgs, signals: StopSignals) -> Result<ExitCode> {
    let vm_dir = VmDir::open(dir)?;
    let disk = vm_dir.open_disk()?;
    let mut start = match vm_dir.store.resume()? {
        Some(id) => Start::Resume(id),
        None => Start::Cold,
    };
    let api = args.api.clone().unwrap_or_else(|| vm_dir.api_path());
    let console = open_console(&args.console)?;
    let console: Arc<Mutex<Box<dyn std::io::Write + Send>>> = Arc::new(Mutex::new(console));
    let gate = Gate::new();
    let disk = Arc::new(Mutex::new(disk));
    let live = Live::new(vm_dir, disk.clone(), gate.clone());
    {
        let live = Arc::downgrade(&live);
        signals.forward(move |signal| {
            if let Some(live) = live.upgrade() {
                live.stop(Outcome::Stopped { signal })
            }
        })?;
    }
    let control = ControlServer::start(&api, live.clone())?;
    let result = (|| loop {
        let spec = crate::vm_live::lock_spec(&live);
        let building = Instant::now();
        let running = match build(&live, &spec, start, &console, &gate) {
            Ok(v) => v,
            Err(e) => {
                live.report_start(Err(crate::cli::error_chain(&e)));
                return Err(e);
            }
        };
        let (vm, base) = running;
        let ctl = machine::Running::new(vm.controller(), &spec, base)?;
        if base != MemoryBase::None {
            ctl.watch_restored_memory();
        }
        live.set_machine(Some(ctl));
        live.report_start(Ok(Instant::now()));
        tracing::info!("machine built in {:?} ({start:?})", building.elapsed());
        let outcome = vm.run().map_err(vm_error);
        let ended = Instant::now();
        if let Some(m) = live.take_machine() {
            // Stopping the memory tracker's threads takes up to their poll period: do it beside
            // the next machine's start (the old memory is not used by anything any more).
            let released = std::thread::Builder::new()
                .name("memory-release".into())
                .spawn(move || m.release_memory());
            if let Err(e) = released {
                tracing::warn!("releasing the old machine's memory: {e}");
            }
        }
        tracing::info!("machine ended {:?} ago", ended.elapsed());
        match live.take_next() {
            Some(next) => start = next,
            None => return outcome,
        }
    })();
    control.stop();
    // Everything the guest saw completed is made durable before the process ends.
    let flushed = match live.disk.lock() {
        Ok(d) => d.now().flush().map_err(Error::from),
        Err(_) => Err(Error::Protocol(
            "internal error: the disk state was lost to a panic".into(),
        )),
    };
    let is_linux = matches!(
        crate::vm_live::lock_spec(&live).guest,
        GuestSpec::Linux { .. }
    );
    let outcome = result?;
    flushed?;
    exit_code(outcome, is_linux)
}

/// Builds the machine to run: a cold boot or a restore of checkpoint `id`.
fn build(
    live: &Live,
    spec: &VmSpec,
    start: Start,
    console: &Arc<Mutex<Box<dyn std::io::Write + Send>>>,
    gate: &Arc<Gate>,
) -> Result<(vmm::Vm, MemoryBase)> {
    let disk = live.disk.lock().map_err(|_| {
        Error::Protocol("internal error: the disk state was lost to a panic".into())
    })?;
    let device = gated_block_device(disk.now(), gate)?;
    let name_of = |id: u64| {
        disk.list()
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.name)
            .unwrap_or_else(|| format!("checkpoint {id}"))
    };
    let config = VmConfig {
        mem_size: spec.memory,
        vcpus: spec.vcpus,
        console: Box::new(SharedConsole(console.clone())),
        guest: guest_of(live, spec)?,
        device: Some(Box::new(device)),
    };
    let out = match start {
        Start::Cold => (vmm::Vm::new(config).map_err(vm_error)?, MemoryBase::None),
        Start::Resume(id) => {
            let store = crate::vm_live::lock_store(live);
            let vm = machine::restore(&store, id, spec, config)?;
            eprintln!("strata: resumed from {}", name_of(id));
            (vm, MemoryBase::Image(id))
        }
    };
    // From here the guest moves the disk on: a later run must not resume the old state.
    crate::vm_live::lock_store(live).set_resume(None)?;
    Ok(out)
}

/// The guest a cold boot loads.
fn guest_of(live: &Live, spec: &VmSpec) -> Result<Guest> {
    match &spec.guest {
        GuestSpec::TestGuest { workload } => Ok(Guest::TestGuest {
            image: vmm::test_guest::IMAGE.to_vec(),
            workload: workload.clone(),
        }),
        GuestSpec::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            let dir = crate::vm_live::lock_dir(live);
            Ok(Guest::Linux(vmm::boot::linux::LinuxSpec {
                kernel: dir.join(kernel),
                initrd: initrd.as_ref().map(|i| dir.join(i)),
                cmdline: cmdline.clone(),
                vcpus: spec.vcpus,
            }))
        }
    }
}

/// One console shared by the machines of one run (a restored machine continues the output).
struct SharedConsole(Arc<Mutex<Box<dyn std::io::Write + Send>>>);

impl std::io::Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut w) => w.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut w) => w.flush(),
            Err(_) => Ok(()),
        }
    }
}
