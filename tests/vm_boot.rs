//! Boots tiny hand-assembled guests through `vmm::Vm` (needs /dev/kvm): serial output, the
//! exit port, the virtio-mmio window, and the fault report of a triple fault.

mod vm_common;

use vm_common::{require_kvm, Console};
use vmm::{Guest, Outcome, Vm, VmConfig};

/// Prints "ok\n" on COM1, reads the virtio-mmio MagicValue and writes it to the exit port.
const HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'o', 0xee, // mov al, 'o'; out dx, al
    0xb0, b'k', 0xee, // mov al, 'k'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xa1, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov eax, [0xd0000000]
    0xe7, 0xf4, // out 0xf4, eax
    0xf4, // hlt (not reached)
];

fn run(image: &[u8], device: Option<Box<dyn block::VirtioDevice>>) -> (Outcome, String) {
    require_kvm();
    let out = Console::default();
    let vm = Vm::new(VmConfig {
        mem_size: 128 << 20,
        vcpus: 1,
        console: Box::new(out.clone()),
        guest: Guest::TestGuest {
            image: image.to_vec(),
            workload: "ops=1".into(),
        },
        device,
    })
    .expect("VM set-up");
    let outcome = vm.run().expect("VM run");
    let text = out.text();
    (outcome, text)
}

/// A device that only identifies itself (activation is never reached by these guests).
struct IdOnly;

impl block::VirtioDevice for IdOnly {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn avail_features(&self) -> u64 {
        1 << 32
    }
    fn set_acked_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: block::ActivateContext) -> Result<(), block::Error> {
        Err(block::Error::Activate("not supported".into()))
    }
    fn reset(&mut self) -> bool {
        false
    }
    fn needs_reset(&self) -> bool {
        false
    }
}

#[test]
fn serial_mmio_and_exit_port() {
    let (outcome, text) = run(HELLO, Some(Box::new(IdOnly)));
    assert_eq!(text, "ok\n");
    assert_eq!(
        outcome,
        Outcome::ExitPort(0x7472_6976),
        "MagicValue read through the transport"
    );
}

#[test]
fn empty_mmio_window_reads_all_ones() {
    let (outcome, _) = run(HELLO, None);
    assert_eq!(outcome, Outcome::ExitPort(0xffff_ffff));
}

#[test]
fn triple_fault_is_reported_with_code_bytes() {
    // ud2 with no IDT: #UD -> #GP -> #DF -> triple fault.
    let (outcome, _) = run(&[0x0f, 0x0b, 0x90, 0x90], None);
    match outcome {
        Outcome::Fault { cpu, what } => {
            assert_eq!(cpu, 0);
            assert!(what.contains("triple fault"), "{what}");
            assert!(what.contains("rip=0x100000"), "{what}");
            assert!(what.contains("code at rip: 0f 0b 90 90"), "{what}");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
}

/// Runs CPUID leaf `leaf` (subleaf 0) and exits with register `reg` (0=eax 1=ebx 2=ecx 3=edx).
fn cpuid_probe(leaf: u8, reg: u8) -> u32 {
    let mov_to_eax = match reg {
        0 => [0x89, 0xc0],
        1 => [0x89, 0xd8],
        2 => [0x89, 0xc8],
        _ => [0x89, 0xd0],
    };
    let mut code = vec![0xb8, leaf, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2]; // mov eax, leaf; xor ecx, ecx; cpuid
    code.extend_from_slice(&mov_to_eax);
    code.extend_from_slice(&[0xe7, 0xf4, 0xf4]); // out 0xf4, eax; hlt
    match run(&code, None).0 {
        Outcome::ExitPort(v) => v,
        other => panic!("cpuid probe: {other:?}"),
    }
}

#[test]
fn guest_runs_cpuid() {
    // KVM reports the hypervisor bit in every configuration. The masks of `boot::cpuid` are
    // not asserted here: on this workplace's nested "PVM" KVM, KVM_SET_CPUID2 succeeds but the
    // guest still sees the host's CPUID (KVM_GET_CPUID2 reads back unfiltered leaves).
    let ecx1 = cpuid_probe(1, 2);
    assert_ne!(ecx1 & (1 << 31), 0, "hypervisor bit: ecx={ecx1:#x}");
    let ebx1 = cpuid_probe(1, 1);
    assert_eq!(ebx1 >> 24, 0, "APIC ID of vCPU 0: ebx={ebx1:#x}");
}
