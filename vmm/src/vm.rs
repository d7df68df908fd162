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
use crate::layout::{MMIO_BASE, MMIO_IRQ, SERIAL_IRQ};
use crate::mmio::{regs::QUEUE_NOTIFY, MmioInterrupt, MmioTransport};
use crate::outcome::{ExitLatch, Outcome};
use crate::serial::{ConsoleOut, SerialConsole};
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

/// A built VM, ready to run.
pub struct Vm {
    // Field order is drop order: threads are joined in `run`, then the VM fd closes before
    // the memory it maps is unmapped.
    _vm: VmFd,
    vcpus: Vec<Vcpu>,
    bus: Arc<Bus>,
    latch: Arc<ExitLatch>,
    mem: GuestMemoryMmap,
    tsc_khz: u32,
    _irqfds: Vec<EventFd>,
}

impl Vm {
    /// Creates the VM, its devices and vCPUs, and loads the guest.
    pub fn new(config: VmConfig) -> Result<Self> {
        if config.vcpus == 0 {
            return Err(Error::Config("at least one vCPU is needed".into()));
        }
        if matches!(config.guest, Guest::TestGuest { .. }) && config.vcpus != 1 {
            return Err(Error::Config(
                "the test guest runs on exactly one vCPU".into(),
            ));
        }
        vcpu::install_kick_handler()?;
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let max = kvm.get_nr_vcpus().min(usize::from(boot::mptable::MAX_CPUS));
        if usize::from(config.vcpus) > max {
            return Err(Error::Config(format!(
                "at most {max} vCPUs are supported here"
            )));
        }
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

        let mem = memory::create(config.mem_size)?;
        memory::register(&vm, &mem)?;

        let latch = Arc::new(ExitLatch::new());
        let serial_irq = new_eventfd()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
        let serial = SerialConsole::new(&serial_irq, config.console)?;
        let irqfds = vec![serial_irq];

        let virtio = match config.device {
            Some(device) => {
                let irq = new_eventfd()?;
                vm.register_irqfd(&irq, MMIO_IRQ)
                    .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
                let interrupt = Arc::new(MmioInterrupt::new(irq));
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

        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(&kvm, &vm, id, config.vcpus))
            .collect::<Result<Vec<_>>>()?;
        let tsc_khz = vcpus.first().map_or(0, Vcpu::tsc_khz);
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
        if let Some(bsp) = vcpus.first() {
            boot::setup_boot_vcpu(bsp.fd(), &entry)?;
        }
        Ok(Self {
            _vm: vm,
            vcpus,
            bus,
            latch,
            mem,
            tsc_khz,
            _irqfds: irqfds,
        })
    }

    /// The TSC frequency given to the guest (kHz, 0 if unknown).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The latch that records how the VM ends (to stop it from outside, set an outcome).
    pub fn latch(&self) -> Arc<ExitLatch> {
        Arc::clone(&self.latch)
    }

    /// Runs the VM until the guest exits, resets, or a vCPU faults; stops every vCPU thread
    /// and the device before returning.
    pub fn run(mut self) -> Result<Outcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = VcpuShared {
            bus: Arc::clone(&self.bus),
            latch: Arc::clone(&self.latch),
            stop: Arc::clone(&stop),
            mem: self.mem.clone(),
        };
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let shared = shared.clone();
            let id = threads.len();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let latch = Arc::clone(&shared.latch);
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(shared)));
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
                    self.latch.set(Outcome::Fault {
                        cpu: id,
                        what: e.to_string(),
                    });
                    break;
                }
            }
        }
        let outcome = self.latch.wait(None).unwrap_or(Outcome::Fault {
            cpu: 0,
            what: "VM stopped without an outcome".into(),
        });
        stop.store(true, Ordering::Release);
        let stuck = stop_threads(threads);
        self.bus.shutdown_devices();
        self.bus.flush_console();
        if let Some(cpu) = stuck {
            return Err(Error::VcpuFault {
                cpu,
                what: "did not stop after the VM ended".into(),
            });
        }
        Ok(outcome)
    }
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
