//! `strata run`: boot a VM (the built-in test guest or a Linux kernel) on a journalled disk
//! and return the guest's exit status.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmm::boot::linux::{self, LinuxSpec};
use vmm::test_guest::{self, WorkloadSpec};
use vmm::{Guest, Outcome, Vm, VmConfig};

use std::sync::{Arc, Mutex};

use crate::cli::RunArgs;
use crate::control::{ControlServer, DiskTarget};
use crate::quiesce::{Gate, Member};
use crate::size::parse_size;
use crate::{Error, Result};

/// Size of a disk created by `strata run`.
const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// `strata run`.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    // Block SIGINT/SIGTERM before any thread starts (the control socket's among them), so
    // every thread inherits the mask and a signal always means a clean stop.
    let signals = StopSignals::block()?;
    if let Some(dir) = &args.vm {
        return crate::vm_run::run(dir, &args, signals);
    }
    if args.kernel.is_none() && (args.initrd.is_some() || args.cmdline.is_some()) {
        return Err(Error::Usage("--initrd and --cmdline need --kernel".into()));
    }
    if args.kernel.is_some() && args.workload.is_some() {
        return Err(Error::Usage(
            "--workload is for the built-in test guest, not with --kernel".into(),
        ));
    }
    let mem_size = parse_size(args.memory.as_deref().unwrap_or("256M"))?;
    let guest = guest_of(&args)?;
    let console = open_console(&args.console)?;

    let scratch = match &args.disk {
        Some(_) => None,
        None => Some(ScratchDir::new()?),
    };
    let disk_dir = match (&args.disk, &scratch) {
        (Some(d), _) => d.clone(),
        (None, Some(s)) => s.path.join("disk"),
        (None, None) => return Err(Error::Usage("no disk".into())),
    };
    if !disk_dir.exists() {
        journal::Disk::create(&disk_dir, DEFAULT_DISK_SIZE, None)?;
    }
    let disk = journal::Disk::open(
        &disk_dir,
        journal::OpenOptions {
            cache: args.cache.into(),
            read_only: false,
        },
    )?;
    // The control socket (--api) takes live *disk* checkpoints of the running VM: the
    // virtio-blk worker is paused and drained through the gate, the journal switches layers,
    // the worker resumes. Memory and vCPU state join VM checkpoints in a later issue.
    let gate = Gate::new();
    let device = gated_block_device(disk.now(), &gate)?;
    let disk = Arc::new(Mutex::new(disk));
    let control = match &args.api {
        Some(path) => {
            let target = DiskTarget::new(disk.clone(), gate.clone(), true);
            Some(ControlServer::start(path, Arc::new(target))?)
        }
        None => None,
    };

    let is_linux = matches!(guest, Guest::Linux(_));
    let vm = Vm::new(VmConfig {
        mem_size,
        vcpus: args.vcpus,
        console,
        guest,
        device: Some(Box::new(device)),
    })
    .map_err(vm_error)?;
    let latch = vm.latch();
    signals.forward(move |signal| latch.set(Outcome::Stopped { signal }))?;
    let outcome = vm.run().map_err(vm_error);
    if let Some(c) = control {
        c.stop();
    }
    let outcome = outcome?;
    drop(disk);
    drop(scratch);
    exit_code(outcome, is_linux)
}

/// The process exit status for how the guest ended.
pub(crate) fn exit_code(outcome: Outcome, is_linux: bool) -> Result<ExitCode> {
    match outcome {
        Outcome::ExitPort(status) => {
            if status != 0 {
                eprintln!(
                    "strata: guest exited with status {status} ({})",
                    test_guest::describe_exit_status(status)
                );
            }
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX)))
        }
        Outcome::Reset if is_linux => Ok(ExitCode::SUCCESS),
        Outcome::Reset => Err(Error::Vm(
            "the test guest reset the machine instead of exiting".into(),
        )),
        Outcome::Fault { cpu, what } => {
            Err(Error::Vm(format!("guest failed on vCPU {cpu}: {what}")))
        }
        Outcome::Stopped { signal } => {
            eprintln!("strata: stopped by signal {signal}");
            let code = 128 + u8::try_from(signal).unwrap_or(0).min(127);
            Ok(ExitCode::from(code))
        }
    }
}

/// The virtio-blk device over `volume`, its I/O admitted through `gate` (so checkpoints can
/// pause and drain it).
pub(crate) fn gated_block_device(
    volume: Arc<journal::Volume>,
    gate: &Arc<Gate>,
) -> Result<block::VirtioBlock> {
    Ok(block::VirtioBlock::new(volume, "strata".into())
        .map_err(|e| {
            Error::Vm(format!(
                "virtio-blk device: {}",
                crate::cli::error_chain(&e)
            ))
        })?
        .with_gate(Arc::new(Member::new(gate)?)))
}

pub(crate) fn vm_error(e: vmm::Error) -> Error {
    Error::Vm(crate::cli::error_chain(&e))
}

/// The guest to boot: a kernel, or the test guest with the (validated, normalised) workload.
fn guest_of(args: &RunArgs) -> Result<Guest> {
    match &args.kernel {
        Some(kernel) => {
            let cmdline = linux::command_line(args.cmdline.as_deref()).map_err(vm_error)?;
            Ok(Guest::Linux(LinuxSpec {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline,
                vcpus: args.vcpus,
            }))
        }
        None => {
            let spec = match &args.workload {
                Some(text) => WorkloadSpec::parse(text)
                    .map_err(|e| Error::Usage(format!("--workload: {e}")))?,
                None => WorkloadSpec::default(),
            };
            Ok(Guest::TestGuest {
                image: test_guest::IMAGE.to_vec(),
                workload: spec.to_string(),
            })
        }
    }
}

/// SIGINT and SIGTERM, blocked in this thread (and so in the vCPU threads it spawns) and
/// turned into a clean stop of the VM by a thread that waits for them: the disk is closed and
/// a scratch disk removed as on a normal exit.
pub(crate) struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    pub(crate) fn block() -> Result<Self> {
        // SAFETY: sigemptyset/sigaddset initialise and fill the local set we pass by pointer;
        // pthread_sigmask only reads it and changes this thread's mask.
        let (set, rc) = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            (set, rc)
        };
        if rc != 0 {
            return Err(Error::io(
                "blocking SIGINT/SIGTERM",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(Self { set })
    }

    /// Spawns the thread that calls `on_signal` when a signal arrives.
    pub(crate) fn forward(&self, on_signal: impl Fn(i32) + Send + 'static) -> Result<()> {
        let set = self.set;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised signal set owned by this closure and `sig`
                // a valid out-pointer; sigwait only reads the one and writes the other.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc == 0 {
                    on_signal(sig);
                    return;
                }
            })
            .map(|_| ())
            .map_err(|e| Error::io("spawning the signal thread", e))
    }
}

/// `stdio` or a file (created or truncated).
pub(crate) fn open_console(spec: &str) -> Result<Box<dyn Write + Send>> {
    if spec == "stdio" {
        return Ok(Box::new(std::io::stdout()));
    }
    let file =
        File::create(spec).map_err(|e| Error::io(format!("creating console file {spec}"), e))?;
    Ok(Box::new(file))
}

/// A temporary directory for a throw-away disk, removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<Self> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "strata-run-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
            }
        }
        Err(Error::Usage(format!(
            "cannot create a scratch directory in {}",
            base.display()
        )))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove_quietly(&self.path);
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!("removing scratch disk {}: {e}", path.display());
    }
}
