//! A whole VM: KVM set-up, memory, devices, boot, vCPU threads, and a blocking `run`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::VirtioDevice;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::linux::{self, LinuxSpec};
use crate::boot::{self, test_guest};
use crate::bus::Bus;
use crate::control::Control;
pub use crate::control::PauseStats;
use crate::layout::{MMIO_BASE, MMIO_IRQ, SERIAL_IRQ};
use crate::mmio::{regs::QUEUE_NOTIFY, MmioInterrupt, MmioTransport};
use crate::outcome::{ExitLatch, Outcome};
use crate::serial::{ConsoleOut, SerialConsole};
use crate::snapshot::{CpuContext, Expect, MachineState, VmState, MACHINE_STATE_VERSION};
use crate::vcpu::{self, Vcpu, VcpuShared};
use crate::{memory, Error, Result};

/// Addresses KVM needs for its real-mode helpers on some hosts; just below the BIOS area at
/// the top of the 32-bit space, clear of RAM and of the MMIO window.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// How long to keep kicking a vCPU thread that does not leave KVM_RUN before giving up on it.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VM boots.
pub enum Guest {
    /// The built-in test guest image with its workload text.
    TestGuest { image: Vec<u8>, workload: String },
    /// A Linux kernel.
    Linux(LinuxSpec),
}

/// Everything needed to build a VM.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub console: ConsoleOut,
    pub guest: Guest,
    /// The device behind the virtio-mmio window (none: the window reads as all ones).
    pub device: Option<Box<dyn VirtioDevice>>,
}

/// What the VM's threads, the controller and the `Vm` share.
struct Shared {
    // Field order is drop order: the VM fd closes before the memory it maps is unmapped.
    vm: VmFd,
    bus: Arc<Bus>,
    latch: Arc<ExitLatch>,
    control: Arc<Control>,
    cpu: Arc<CpuContext>,
    vcpus: u8,
    mem_size: u64,
    mem: GuestMemoryMmap,
    _irqfds: Vec<EventFd>,
}

/// A built VM, ready to run.
pub struct Vm {
    // Threads are joined in `run` before `shared` (VM fd, then memory) can go.
    vcpus: Vec<Vcpu>,
    shared: Arc<Shared>,
    tsc_khz: u32,
}

/// Pauses, captures, resumes and ends a VM from another thread (see [`Vm::controller`]).
#[derive(Clone)]
pub struct VmController {
    shared: Arc<Shared>,
}

/// The parts of a VM made before any guest state goes in.
struct Parts {
    kvm: Kvm,
    vm: VmFd,
    serial_irq: EventFd,
    virtio_irq: Option<EventFd>,
}

impl Vm {
    /// Creates the VM, its devices and vCPUs, and loads the guest.
    pub fn new(config: VmConfig) -> Result<Self> {
        check_config(&config)?;
        let parts = create_vm()?;
        let mem = memory::create(config.mem_size)?;
        memory::register(&parts.vm, &mem)?;
        let serial = SerialConsole::new(&parts.serial_irq, config.console)?;
        let a = assemble(parts, &mem, serial, config.device, config.vcpus)?;
        let tsc_khz = a.vcpus.first().map_or(0, Vcpu::tsc_khz);
        let entry = match &config.guest {
            Guest::TestGuest { image, workload } => {
                test_guest::load(&mem, image, workload, tsc_khz)?
            }
            Guest::Linux(spec) => {
                let spec = LinuxSpec {
                    vcpus: config.vcpus,
                    ..spec.clone()
                };
                linux::load(&mem, &spec)?
            }
        };
        if let Some(bsp) = a.vcpus.first() {
            boot::setup_boot_vcpu(bsp.fd(), &entry)?;
        }
        Ok(Self::from_parts(
            a,
            mem,
            (config.vcpus, config.mem_size),
            tsc_khz,
        ))
    }

    /// Builds a VM around already populated guest memory `mem` and puts `state` into its
    /// vCPUs, in-kernel devices and userspace devices; nothing is loaded and the guest
    /// continues where `state` was captured. `config.guest` is not used; `config.device` must
    /// serve the disk as it was at the capture (the device restarts on the saved queues and
    /// processes any chain already waiting in them). The state is validated against `config`
    /// and `mem` before KVM sees any of it.
    pub fn restore(config: VmConfig, state: &MachineState, mem: GuestMemoryMmap) -> Result<Self> {
        check_config(&config)?;
        state.validate(&Expect {
            vcpus: config.vcpus,
            mem_size: config.mem_size,
            mem: &mem,
        })?;
        match (&state.devices.virtio, &config.device) {
            (Some(_), None) => {
                return Err(Error::State(
                    "the state has a virtio device but the VM is given none".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::State(
                    "the state has no virtio device but the VM is given one".into(),
                ))
            }
            _ => {}
        }
        let parts = create_vm()?;
        memory::register(&parts.vm, &mem)?;
        let serial =
            SerialConsole::from_state(&parts.serial_irq, config.console, &state.devices.serial)?;
        let a = assemble(parts, &mem, serial, config.device, config.vcpus)?;
        state.vm.restore(&a.vm)?;
        for (i, (vcpu, saved)) in a.vcpus.iter().zip(&state.vcpus).enumerate() {
            saved.restore(vcpu.fd(), &a.cpu).map_err(|e| match e {
                Error::State(s) => Error::State(format!("vCPU {i}: {s}")),
                other => other,
            })?;
        }
        // Last: the device may start serving requests at once.
        if let Some(mmio) = &state.devices.virtio {
            a.bus.restore_virtio(mmio)?;
        }
        let tsc_khz = state.vcpus.first().map_or(0, |v| v.tsc_khz);
        Ok(Self::from_parts(
            a,
            mem,
            (config.vcpus, config.mem_size),
            tsc_khz,
        ))
    }

    fn from_parts(
        a: Assembled,
        mem: GuestMemoryMmap,
        (count, mem_size): (u8, u64),
        tsc_khz: u32,
    ) -> Self {
        Self {
            vcpus: a.vcpus,
            shared: Arc::new(Shared {
                vm: a.vm,
                bus: a.bus,
                latch: a.latch,
                control: Arc::new(Control::new()),
                cpu: Arc::new(a.cpu),
                vcpus: count,
                mem_size,
                mem,
                _irqfds: a.irqfds,
            }),
            tsc_khz,
        }
    }

    /// The TSC frequency given to the guest (kHz, 0 if unknown).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The latch that records how the VM ends (to stop it from outside, set an outcome).
    pub fn latch(&self) -> Arc<ExitLatch> {
        Arc::clone(&self.shared.latch)
    }

    /// A handle to pause, capture, resume and end this VM from other threads.
    pub fn controller(&self) -> VmController {
        VmController {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs the VM until the guest exits, resets, or a vCPU faults (or a controller finishes
    /// it); stops every vCPU thread and the device before returning.
    pub fn run(mut self) -> Result<Outcome> {
        let shared = &self.shared;
        let stop = Arc::new(AtomicBool::new(false));
        let vshared = VcpuShared {
            bus: Arc::clone(&shared.bus),
            latch: Arc::clone(&shared.latch),
            stop: Arc::clone(&stop),
            mem: shared.mem.clone(),
            control: Arc::clone(&shared.control),
            cpu: Arc::clone(&shared.cpu),
        };
        shared.control.start(self.vcpus.len());
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let vshared = vshared.clone();
            let id = threads.len();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let latch = Arc::clone(&vshared.latch);
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        vcpu.run(vshared)
                    }));
                    if r.is_err() {
                        latch.set(Outcome::Fault {
                            cpu: id,
                            what: "vCPU thread panicked".into(),
                        });
                    }
                })
                .map_err(Error::io("spawning a vCPU thread"));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.control.unregister(id);
                    shared.latch.set(Outcome::Fault {
                        cpu: id,
                        what: e.to_string(),
                    });
                    break;
                }
            }
        }
        drop(vshared);
        let outcome = shared.latch.wait(None).unwrap_or(Outcome::Fault {
            cpu: 0,
            what: "VM stopped without an outcome".into(),
        });
        stop.store(true, Ordering::Release);
        shared.control.stop();
        let stuck = stop_threads(threads);
        shared.bus.shutdown_devices();
        shared.bus.flush_console();
        if let Some(cpu) = stuck {
            return Err(Error::VcpuFault {
                cpu,
                what: "did not stop after the VM ended".into(),
            });
        }
        Ok(outcome)
    }
}

/// How long `resume` waits for the parked vCPUs to leave their park.
const RESUME_TIMEOUT: Duration = Duration::from_secs(5);

impl VmController {
    /// Kicks every vCPU out of KVM_RUN and parks it; returns once all are parked (or fails
    /// after `timeout`, leaving the VM running).
    pub fn pause(&self, timeout: Duration) -> Result<PauseStats> {
        self.shared.control.pause(timeout, vcpu::kick_signal())
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.shared.control.is_paused()
    }

    /// Captures the machine state; only while paused. vCPU state is read on each parked
    /// vCPU's own thread. The caller must have drained the block device (the engine's
    /// quiesce gate): a device with requests in flight refuses.
    pub fn capture(&self) -> Result<MachineState> {
        let vcpus = self.shared.control.capture()?;
        if !self.shared.control.is_paused() {
            return Err(Error::NotPaused);
        }
        let vm = VmState::save(&self.shared.vm)?;
        let devices = self.shared.bus.save_devices()?;
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            vcpus,
            vm,
            devices,
            mem_size: self.shared.mem_size,
        })
    }

    /// The guest RAM (a clone of the mapping handle: the same memory).
    pub fn memory(&self) -> GuestMemoryMmap {
        self.shared.mem.clone()
    }

    /// The KVM VM fd (for dirty logging).
    pub fn vm_fd(&self) -> &VmFd {
        &self.shared.vm
    }

    /// vCPUs of the VM.
    pub fn vcpus(&self) -> u8 {
        self.shared.vcpus
    }

    /// Lets the vCPUs run again; returns the instant the first one left its park.
    pub fn resume(&self) -> Result<Instant> {
        self.shared.control.resume(RESUME_TIMEOUT)
    }

    /// Ends `run` with `outcome` (also from a pause: the parked vCPUs stop).
    pub fn finish(&self, outcome: Outcome) {
        self.shared.latch.set(outcome);
        self.shared.control.stop();
    }
}

fn check_config(config: &VmConfig) -> Result<()> {
    if config.vcpus == 0 {
        return Err(Error::Config("at least one vCPU is needed".into()));
    }
    if matches!(config.guest, Guest::TestGuest { .. }) && config.vcpus != 1 {
        return Err(Error::Config(
            "the test guest runs on exactly one vCPU".into(),
        ));
    }
    Ok(())
}

/// Opens KVM and creates the VM with its in-kernel irqchip and PIT, and the irqfds.
fn create_vm() -> Result<Parts> {
    vcpu::install_kick_handler()?;
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
    let serial_irq = new_eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
    Ok(Parts {
        kvm,
        vm,
        serial_irq,
        virtio_irq: None,
    })
}

/// A VM with its devices and created vCPUs.
struct Assembled {
    vm: VmFd,
    vcpus: Vec<Vcpu>,
    cpu: CpuContext,
    bus: Arc<Bus>,
    latch: Arc<ExitLatch>,
    irqfds: Vec<EventFd>,
}

/// Adds the devices and the vCPUs (created, not yet given any guest state).
fn assemble(
    mut parts: Parts,
    mem: &GuestMemoryMmap,
    serial: SerialConsole,
    device: Option<Box<dyn VirtioDevice>>,
    count: u8,
) -> Result<Assembled> {
    let max = parts
        .kvm
        .get_nr_vcpus()
        .min(usize::from(boot::mptable::MAX_CPUS));
    if usize::from(count) > max {
        return Err(Error::Config(format!(
            "at most {max} vCPUs are supported here"
        )));
    }
    let vm = &parts.vm;
    let latch = Arc::new(ExitLatch::new());
    let virtio = match device {
        Some(device) => {
            let irq = new_eventfd()?;
            vm.register_irqfd(&irq, MMIO_IRQ)
                .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
            let interrupt = Arc::new(
                MmioInterrupt::new(
                    irq.try_clone()
                        .map_err(Error::io("cloning the virtio irqfd"))?,
                )
                .map_err(Error::io("creating the virtio waker"))?,
            );
            parts.virtio_irq = Some(irq);
            let transport = MmioTransport::new(device, mem.clone(), interrupt)?;
            for (i, evt) in transport.queue_events().iter().enumerate() {
                let addr = IoEventAddress::Mmio(MMIO_BASE + QUEUE_NOTIFY);
                vm.register_ioevent(evt, &addr, i as u32)
                    .map_err(Error::kvm("KVM_IOEVENTFD"))?;
            }
            Some(transport)
        }
        None => None,
    };
    let bus = Arc::new(Bus::new(serial, Arc::clone(&latch), virtio));
    let vcpus = (0..count)
        .map(|id| Vcpu::new(&parts.kvm, vm, id, count))
        .collect::<Result<Vec<_>>>()?;
    let first = vcpus
        .first()
        .ok_or_else(|| Error::Config("at least one vCPU is needed".into()))?;
    let cpu = CpuContext::probe(&parts.kvm, vm, first.fd())?;
    let mut irqfds = vec![parts.serial_irq];
    irqfds.extend(parts.virtio_irq);
    Ok(Assembled {
        vm: parts.vm,
        vcpus,
        cpu,
        bus,
        latch,
        irqfds,
    })
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating an eventfd"))
}

/// Kicks every vCPU thread out of KVM_RUN until it finishes, then joins it. Returns the first
/// vCPU that would not stop (it is left detached).
fn stop_threads(threads: Vec<JoinHandle<()>>) -> Option<usize> {
    let mut stuck = None;
    for (id, t) in threads.into_iter().enumerate() {
        let deadline = Instant::now() + KICK_TIMEOUT;
        while !t.is_finished() && Instant::now() < deadline {
            // The signal only interrupts KVM_RUN; a thread between runs sees `stop` itself.
            if let Err(e) = t.kill(vcpu::kick_signal()) {
                tracing::debug!("kicking vCPU {id}: {e}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            if t.join().is_err() {
                tracing::error!("vCPU {id} thread panicked");
            }
        } else {
            stuck.get_or_insert(id);
        }
    }
    stuck
}
