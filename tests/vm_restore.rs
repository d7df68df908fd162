//! Machine-state checkpoints of a running VM (needs /dev/kvm): the built-in test guest is paused
//! mid-workload, its virtio-blk device drained, its machine state captured and its memory
//! copied, and a disk checkpoint taken at that instant. The original VM then resumes and
//! finishes. A new VM is built with `Vm::restore` from the state, the memory copy and the disk
//! applied back to the checkpoint: the guest must continue (no second start line) and finish
//! with no error, its ledger in memory agreeing with the disk.

mod vm_common;

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::quiesce::{Gate, Member};
use vm_common::{require_kvm, Console};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::snapshot::{self, Identity, MachineState};
use vmm::{Guest, Outcome, Vm, VmConfig, VmController};

const MEM_SIZE: u64 = 128 << 20;
const WORKLOAD: &str = "seed=11,ops=6000,read=30,bs=4k,region=0:16M,qd=16,flush=32";

/// An error with its sources, as the CLI prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

fn done_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("strata-guest: done "))
        .unwrap_or_else(|| panic!("no done line in:\n{text}"))
        .to_string()
}

fn field(done: &str, key: &str) -> u64 {
    done.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {done}"))
        .parse()
        .unwrap()
}

fn device(disk: &journal::Disk, gate: &Arc<Gate>) -> Box<dyn block::VirtioDevice> {
    let member = Member::new(gate).unwrap();
    Box::new(
        block::VirtioBlock::new(disk.now(), "strata".into())
            .unwrap()
            .with_gate(Arc::new(member)),
    )
}

fn config(console: &Console, dev: Box<dyn block::VirtioDevice>) -> VmConfig {
    VmConfig {
        mem_size: MEM_SIZE,
        vcpus: 1,
        console: Box::new(console.clone()),
        guest: Guest::TestGuest {
            image: vmm::test_guest::IMAGE.to_vec(),
            workload: WORKLOAD.into(),
        },
        device: Some(dev),
    }
}

/// A private copy of guest memory (the test's stand-in for a memory image).
fn copy_memory(src: &GuestMemoryMmap) -> GuestMemoryMmap {
    let dst = vmm::memory::create(MEM_SIZE).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for region in src.iter() {
        let start = region.start_addr().0;
        let mut off = 0u64;
        while off < region.len() {
            let n = (region.len() - off).min(buf.len() as u64) as usize;
            let addr = GuestAddress(start + off);
            src.read_slice(&mut buf[..n], addr).unwrap();
            dst.write_slice(&buf[..n], addr).unwrap();
            off += n as u64;
        }
    }
    dst
}

fn wait_for(console: &Console, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !console.text().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pauses the running VM, drains the disk, captures, copies memory, checkpoints the disk.
fn checkpoint(
    ctl: &VmController,
    gate: &Gate,
    disk: &mut journal::Disk,
    console: &Console,
) -> (MachineState, GuestMemoryMmap) {
    let stats = ctl
        .pause(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("pause: {e:?}; the console:\n{}", console.text()));
    assert_eq!(stats.vcpus, 1);
    assert!(stats.stopped >= stats.requested);
    assert!(ctl.is_paused());
    let guard = gate.pause(Duration::from_secs(10)).expect("drain");
    let state = ctl.capture().expect("capture");
    let mem = copy_memory(&ctl.memory());
    disk.checkpoint("cp").expect("disk checkpoint");
    drop(guard);
    ctl.resume().expect("resume");
    (state, mem)
}

/// The test guest running on a fresh disk (Now of a new `disk_size`-byte disk under `dir`),
/// past its start line.
struct Started {
    disk: journal::Disk,
    gate: Arc<Gate>,
    console: Console,
    ctl: VmController,
    runner: JoinHandle<vmm::Result<Outcome>>,
}

fn start_guest(dir: &Path, disk_size: u64) -> Started {
    let disk_dir = dir.join("disk");
    journal::Disk::create(&disk_dir, disk_size, None).unwrap();
    let disk = journal::Disk::open(&disk_dir, journal::OpenOptions::default()).unwrap();
    let gate = Gate::new();
    let console = Console::default();
    let vm = Vm::new(config(&console, device(&disk, &gate))).unwrap();
    let ctl = vm.controller();
    // Not paused: nothing to capture yet.
    assert!(matches!(ctl.capture(), Err(vmm::Error::NotPaused)));
    let runner = std::thread::spawn(move || vm.run());
    wait_for(&console, "strata-guest: start");
    Started {
        disk,
        gate,
        console,
        ctl,
        runner,
    }
}

#[test]
fn restored_vm_continues_the_workload_from_the_checkpoint() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // The original run, paused mid-workload.
    let Started {
        mut disk,
        gate,
        console,
        ctl,
        runner,
    } = start_guest(dir.path(), 256 << 20);
    // The first progress line is printed at 10% of the ops: 90% of the workload is left, so
    // the pause lands mid-workload however fast this machine runs the guest (a fixed sleep
    // let it finish first once in CI).
    wait_for(&console, "strata-guest: progress");
    let (state, mem) = checkpoint(&ctl, &gate, &mut disk, &console);
    let at_pause = console.text();
    let queue = state.devices.virtio.as_ref().unwrap().queues[0];
    assert!(
        queue.next_avail > 0,
        "requests went through the queue: {queue:?}"
    );
    assert!(
        !at_pause.contains("strata-guest: done"),
        "the workload finished before the pause; make it longer:\n{at_pause}"
    );
    assert!(matches!(ctl.resume(), Err(vmm::Error::NotPaused)));
    let outcome = runner.join().unwrap().unwrap();
    assert_eq!(outcome, Outcome::ExitPort(0), "{}", console.text());
    let original = done_line(&console.text());
    assert_eq!(field(&original, "errors"), 0, "{original}");
    drop(ctl);

    // Through the file format: seal, open, parse.
    let id = Identity::generate(MEM_SIZE).unwrap();
    let bytes = snapshot::encode(&state, &id).unwrap();
    eprintln!("machine state: {} bytes sealed", bytes.len());
    let decoded = snapshot::decode(&bytes, &id).unwrap();
    assert_eq!(decoded, state);
    let other = Identity::generate(MEM_SIZE).unwrap();
    let err = snapshot::decode(&bytes, &other).unwrap_err().to_string();
    assert!(err.contains("another VM"), "{err}");

    // The disk back at the checkpoint instant, and a VM restored onto it.
    disk.apply("cp", None).unwrap();
    let gate2 = Gate::new();
    let console2 = Console::default();
    let vm2 = Vm::restore(config(&console2, device(&disk, &gate2)), &decoded, mem).unwrap();
    let outcome = vm2.run().unwrap();
    let text = console2.text();
    assert_eq!(outcome, Outcome::ExitPort(0), "restored run:\n{text}");
    assert!(
        !text.contains("strata-guest: start"),
        "the restored guest started over instead of continuing:\n{text}"
    );
    let restored = done_line(&text);
    assert_eq!(field(&restored, "errors"), 0, "{restored}");
    assert_eq!(field(&restored, "ops"), field(&original, "ops"));
}

#[test]
fn damaged_states_are_refused_before_the_guest_runs() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let Started {
        mut disk,
        gate,
        console,
        ctl,
        runner,
    } = start_guest(dir.path(), 64 << 20);
    wait_for(&console, "strata-guest: progress");
    let (state, mem) = checkpoint(&ctl, &gate, &mut disk, &console);
    assert!(
        state.devices.virtio.as_ref().unwrap().active,
        "the driver set DRIVER_OK"
    );
    ctl.pause(Duration::from_secs(10)).unwrap();
    ctl.finish(Outcome::Stopped { signal: 0 });
    assert_eq!(
        runner.join().unwrap().unwrap(),
        Outcome::Stopped { signal: 0 }
    );
    drop(ctl);

    let try_restore = |s: &MachineState, vcpus: u8| {
        let gate = Gate::new();
        let mut cfg = config(&Console::default(), device(&disk, &gate));
        cfg.vcpus = vcpus;
        cfg.guest = Guest::Linux(vmm::boot::linux::LinuxSpec {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus,
        });
        match Vm::restore(cfg, s, copy_memory(&mem)) {
            Ok(_) => String::new(),
            Err(e) => chain(&e),
        }
    };
    let mmio = |s: &mut MachineState| s.devices.virtio.as_mut().unwrap().clone();

    let e = try_restore(&state, 2);
    assert!(e.contains("the state has 1 vCPUs, the VM has 2"), "{e}");

    let mut s = state.clone();
    let mut m = mmio(&mut s);
    m.queues[0].size = 1024;
    s.devices.virtio = Some(m);
    let e = try_restore(&s, 1);
    assert!(e.contains("queue 0"), "{e}");

    let mut s = state.clone();
    let mut m = mmio(&mut s);
    m.queues[0].used_ring = MEM_SIZE + 0x1000;
    s.devices.virtio = Some(m);
    let e = try_restore(&s, 1);
    assert!(e.contains("not inside guest memory"), "{e}");

    let mut s = state.clone();
    s.vcpus[0].lapic.0.truncate(100);
    let e = try_restore(&s, 1);
    assert!(e.contains("vCPU 0: LAPIC state is 100 bytes"), "{e}");

    let mut s = state.clone();
    let mut m = mmio(&mut s);
    m.device.config[0] ^= 1; // another disk size
    s.devices.virtio = Some(m);
    let e = try_restore(&s, 1);
    assert!(e.contains("configuration"), "{e}");

    let mut s = state.clone();
    s.mem_size *= 2;
    let e = try_restore(&s, 1);
    assert!(e.contains("memory"), "{e}");

    // A valid state restores, and the restored vCPU holds what was saved: an MSR and a LAPIC
    // register that we changed in the state (neither matters to the test guest) read back
    // changed, and the TSC does not go backwards. (On this nested host the guest TSC follows
    // the host's whatever IA32_TSC is set to, so TSC continuity itself cannot be seen here.)
    const TSC: u32 = 0x10;
    const SYSENTER_CS: u32 = 0x174;
    const APIC_TPR: usize = 0x80;
    let msr = |s: &MachineState, index: u32| {
        s.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.index == index)
            .unwrap_or_else(|| panic!("MSR {index:#x} is saved"))
            .data
    };
    // In-kernel devices the test guest does not use, changed the same way: the PIC master's
    // interrupt mask (`kvm_irqchip` = chip id, pad, then `kvm_pic_state`: imr is its 3rd
    // byte), an IOAPIC redirection entry (after id, pad, base, ioregsel, id, irr, pad), and
    // the mode of PIT channel 1 (24-byte channels, mode at byte 13).
    const PIC_IMR: usize = 8 + 2;
    const IOAPIC_REDIR_10: usize = 8 + 24 + 8 * 10;
    const PIT_CH1_MODE: usize = 24 + 13;
    let redir: u64 = 0x1_0031;
    let mut s = state.clone();
    s.vm.pic_master.0[PIC_IMR] = 0x5a;
    s.vm.ioapic.0[IOAPIC_REDIR_10..IOAPIC_REDIR_10 + 8].copy_from_slice(&redir.to_le_bytes());
    s.vm.pit.0[PIT_CH1_MODE] = 2;
    s.vcpus[0].lapic.0[APIC_TPR] = 0x20;
    // DR0 (the first u64 of `kvm_debugregs`; DR7 leaves it disabled).
    s.vcpus[0].debugregs.0[..8].copy_from_slice(&0x1234u64.to_le_bytes());
    for m in &mut s.vcpus[0].msrs {
        if m.index == SYSENTER_CS {
            m.data = 0x10;
        }
    }
    let gate = Gate::new();
    let console = Console::default();
    let vm = Vm::restore(
        config(&console, device(&disk, &gate)),
        &s,
        copy_memory(&mem),
    )
    .unwrap();
    let ctl = vm.controller();
    let runner = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match ctl.pause(Duration::from_secs(10)) {
            Ok(_) => {
                // Not drained: the device refuses, with a clear reason.
                if let Err(e) = ctl.capture() {
                    assert!(chain(&e).contains("in flight"), "{}", chain(&e));
                }
                let _drained = gate.pause(Duration::from_secs(10)).unwrap();
                break ctl.capture().unwrap();
            }
            Err(vmm::Error::NotRunning) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("pausing the restored VM: {e}"),
        }
    };
    ctl.finish(Outcome::Stopped { signal: 0 });
    runner.join().unwrap().unwrap();
    assert_eq!(again.vcpus[0].lapic.0[APIC_TPR], 0x20);
    assert_eq!(again.vcpus[0].debugregs.0[..8], 0x1234u64.to_le_bytes());
    assert_eq!(again.vm.pic_master.0[PIC_IMR], 0x5a);
    assert_eq!(
        again.vm.ioapic.0[IOAPIC_REDIR_10..IOAPIC_REDIR_10 + 8],
        redir.to_le_bytes()
    );
    assert_eq!(again.vm.pit.0[PIT_CH1_MODE], 2);
    assert_eq!(msr(&again, SYSENTER_CS), 0x10);
    let (before, after) = (msr(&s, TSC), msr(&again, TSC));
    assert!(
        after >= before,
        "the TSC continues from the checkpoint: saved {before}, restored VM at {after}"
    );
    assert!(!console.text().contains("strata-guest: start"));
}

#[test]
fn repeated_pause_capture_resume_keeps_the_guest_correct() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let Started {
        disk: _disk,
        gate,
        console,
        ctl,
        runner,
    } = start_guest(dir.path(), 64 << 20);
    let (mut paused, mut worst_stop, mut worst_capture) = (0, Duration::ZERO, Duration::ZERO);
    let mut last_avail = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        match ctl.pause(Duration::from_secs(10)) {
            Ok(stats) => {
                worst_stop = worst_stop.max(stats.stopped - stats.requested);
                assert!(matches!(
                    ctl.pause(Duration::from_secs(1)),
                    Err(vmm::Error::AlreadyPaused)
                ));
                let guard = gate.pause(Duration::from_secs(10)).unwrap();
                let t = Instant::now();
                let state = ctl.capture().unwrap();
                worst_capture = worst_capture.max(t.elapsed());
                drop(guard);
                let avail = state.devices.virtio.as_ref().unwrap().queues[0].next_avail;
                // The ring only moves forward between checkpoints (mod 2^16; this run is short).
                if let Some(prev) = last_avail {
                    assert!(avail.wrapping_sub(prev) < 0x8000, "{prev} -> {avail}");
                }
                last_avail = Some(avail);
                ctl.resume().unwrap();
                paused += 1;
            }
            Err(vmm::Error::NotRunning) => break, // the guest finished
            Err(e) => panic!("pause: {e}"),
        }
    }
    let outcome = runner.join().unwrap().unwrap();
    assert_eq!(outcome, Outcome::ExitPort(0), "{}", console.text());
    let done = done_line(&console.text());
    assert_eq!(field(&done, "errors"), 0, "{done}");
    assert!(
        paused >= 3,
        "only {paused} pauses before the guest finished"
    );
    eprintln!(
        "{paused} pauses; worst request-to-stopped {worst_stop:?}, worst capture {worst_capture:?}"
    );
}

/// The newest /boot/vmlinuz-*, if any.
fn stock_kernel() -> Option<std::path::PathBuf> {
    let mut k: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// Linux on 2 vCPUs, checkpointed a little after its banner and restored into a new VM: the
/// console continues past what was printed before the checkpoint, and the kernel does not
/// boot again (no second banner). Exercises what the test guest does not: AP MP states, the
/// IOAPIC/PIC, PIT, kvmclock and LAPIC timers. Needs a stock kernel in /boot (CI installs
/// linux-image-amd64); guest kernel code is emulated here, so this takes a minute or two.
#[test]
fn linux_on_two_vcpus_continues_after_restore() {
    require_kvm();
    let kernel = stock_kernel().expect(
        "no /boot/vmlinuz-* found: install a stock kernel (apt-get install linux-image-amd64)",
    );
    let dir = tempfile::tempdir().unwrap();
    let disk_dir = dir.path().join("disk");
    journal::Disk::create(&disk_dir, 64 << 20, None).unwrap();
    let mut disk = journal::Disk::open(&disk_dir, journal::OpenOptions::default()).unwrap();
    let linux_config = |console: &Console, dev| VmConfig {
        mem_size: 256 << 20,
        vcpus: 2,
        console: Box::new(console.clone()),
        guest: Guest::Linux(vmm::boot::linux::LinuxSpec {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: vmm::boot::linux::command_line(None).unwrap(),
            vcpus: 2,
        }),
        device: Some(dev),
    };
    let gate = Gate::new();
    let console = Console::default();
    let vm = Vm::new(linux_config(&console, device(&disk, &gate))).unwrap();
    let ctl = vm.controller();
    let runner = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(300);
    while !console.text().contains("BIOS-e820") {
        assert!(
            Instant::now() < deadline,
            "no banner and E820 map:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    ctl.pause(Duration::from_secs(10)).unwrap();
    let guard = gate.pause(Duration::from_secs(10)).unwrap();
    let state = ctl.capture().unwrap();
    let mem = {
        let src = ctl.memory();
        let dst = vmm::memory::create(256 << 20).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..(256u64 << 20)).step_by(buf.len()) {
            src.read_slice(&mut buf, GuestAddress(off)).unwrap();
            dst.write_slice(&buf, GuestAddress(off)).unwrap();
        }
        dst
    };
    disk.checkpoint("linux").unwrap();
    drop(guard);
    let before = console.text();
    ctl.finish(Outcome::Stopped { signal: 0 });
    runner.join().unwrap().unwrap();
    drop(ctl);
    assert_eq!(before.matches("Linux version").count(), 1, "{before}");

    disk.apply("linux", None).unwrap();
    let gate2 = Gate::new();
    let console2 = Console::default();
    let vm2 = Vm::restore(linux_config(&console2, device(&disk, &gate2)), &state, mem).unwrap();
    let ctl2 = vm2.controller();
    let runner2 = std::thread::spawn(move || vm2.run());
    // Wait for a good amount of new output (lines the first run never printed).
    let deadline = Instant::now() + Duration::from_secs(240);
    let enough = loop {
        let text = console2.text();
        if text.lines().filter(|l| !before.contains(*l)).count() >= 10 {
            break true;
        }
        if Instant::now() > deadline || runner2.is_finished() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ctl2.finish(Outcome::Stopped { signal: 0 });
    let outcome = runner2.join().unwrap().unwrap();
    let after = console2.text();
    assert!(
        enough,
        "the restored kernel printed too little ({outcome:?}).\nbefore:\n{before}\nafter:\n{after}"
    );
    assert!(
        !after.contains("Linux version"),
        "the restored kernel booted again:\n{after}"
    );
    eprintln!("restored Linux printed:\n{after}");
}
