//! VM machine-state files (`checkpoints/<id>/machine.state`): the envelope, the JSON payload,
//! the semantic checks against the VM it would restore into, and `Vm::restore` itself (KVM
//! calls with whatever passed the checks). A bad file must be an error, never a panic and never
//! a half-built VM that runs.
//!
//! Input: `flags`, then bytes. Flag 0x01: the bytes are the payload, sealed here into a valid
//! envelope for the fixture VM (so mutated JSON gets past the checksums); otherwise the bytes
//! are the whole file. Flag 0x02: restore even when validation is expected to fail (exercise
//! the error paths of `Vm::restore`).

use std::sync::OnceLock;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm::snapshot::envelope::{self, Kind};
use vmm::snapshot::{Expect, Identity};
use vmm::{Guest, Vm, VmConfig};

use super::Target;

pub const TARGET: Target = Target {
    name: "vm_state",
    about: "VM machine-state files (envelope, payload, validation, Vm::restore on KVM)",
    run,
    seeds,
    keep_last_input: false,
};

const MEM: u64 = 128 << 20;

fn identity() -> Identity {
    Identity {
        vm_uuid: [0x5a; 16],
        mem_size: MEM,
    }
}

fn memory() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| vmm::memory::create(MEM).expect("guest memory"))
}

fn config() -> VmConfig {
    VmConfig {
        mem_size: MEM,
        vcpus: 1,
        console: Box::new(std::io::sink()),
        guest: Guest::TestGuest {
            image: vmm::test_guest::IMAGE.to_vec(),
            workload: "seed=1".into(),
        },
        device: None,
    }
}

fn run(input: &[u8]) {
    let (&flags, body) = input.split_first().unwrap_or((&0, &[]));
    let id = identity();
    let file = if flags & 1 != 0 {
        envelope::seal(Kind::MachineState, &id, body)
    } else {
        body.to_vec()
    };
    let Ok(state) = vmm::snapshot::decode(&file, &id) else {
        return;
    };
    let valid = state
        .validate(&Expect {
            vcpus: 1,
            mem_size: MEM,
            mem: memory(),
        })
        .is_ok();
    if valid || flags & 2 != 0 {
        // Builds a VM around the state (no vCPU runs): KVM refuses what it refuses, and the
        // VMM must turn that into an error.
        if let Ok(vm) = Vm::restore(config(), &state, memory().clone()) {
            assert!(valid, "Vm::restore accepted a state that failed validation");
            drop(vm);
        }
    }
}

/// A real state: the built-in test guest (no disk) paused a moment after it starts.
fn seeds() -> Vec<Vec<u8>> {
    let id = identity();
    for wait_ms in [20u64, 5, 1, 50] {
        let Ok(vm) = Vm::new(config()) else { continue };
        let ctl = vm.controller();
        let t = std::thread::spawn(move || vm.run());
        std::thread::sleep(Duration::from_millis(wait_ms));
        let state = ctl
            .pause(Duration::from_secs(5))
            .ok()
            .and_then(|_| ctl.capture().ok());
        ctl.finish(vmm::Outcome::Stopped { signal: 0 });
        let _ = t.join();
        if let Some(state) = state {
            let file = vmm::snapshot::encode(&state, &id).expect("encode");
            let payload = serde_json::to_vec(&state).expect("json");
            let mut whole = vec![0u8];
            whole.extend_from_slice(&file);
            let mut sealed = vec![1u8];
            sealed.extend_from_slice(&payload);
            let mut forced = vec![3u8];
            forced.extend_from_slice(&payload);
            return vec![whole, sealed, forced];
        }
    }
    panic!("could not capture a machine state for the seed corpus");
}
