//! VM checkpoints: the machine state (vCPUs, VM, devices) and its file format.
//!
//! - [`envelope`]: the versioned, checksummed container of every state file;
//! - [`cpu`]: vCPU and VM (irqchip, PIT, kvmclock) state;
//! - [`devices`]: serial, i8042, exit port, virtio-mmio transport, queues, block device;
//! - `memory` (helper M): memory images.
//!
//! [`MachineState`] is plain data and untrusted when decoded: [`decode`] opens the envelope
//! (kind 1) and [`MachineState::validate`] checks it against the VM it is restored into before
//! any of it reaches KVM or a device.

pub mod cpu;
pub mod devices;
pub mod envelope;
pub mod memory;
mod mirror;

use serde::{Deserialize, Serialize};

pub use cpu::{CpuContext, VcpuState, VmState};
pub use devices::DeviceState;
pub use envelope::{EnvelopeError, Kind};

use crate::{Error, Result};

/// Largest machine-state payload accepted (a few KiB per vCPU; this only bounds a hostile
/// file).
pub const MAX_MACHINE_STATE: u64 = 64 << 20;
/// Version of the [`MachineState`] payload layout (inside envelope format 1).
pub const MACHINE_STATE_VERSION: u32 = 1;

/// Who a state file belongs to: every file carries the VM's uuid; a file of another VM, or of
/// another memory size, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub vm_uuid: [u8; 16],
    pub mem_size: u64,
}

/// 32 lowercase hex digits.
pub fn uuid_text(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

impl Identity {
    /// A new identity with a random uuid.
    pub fn generate(mem_size: u64) -> Result<Self> {
        let mut vm_uuid = [0u8; 16];
        let mut filled = 0;
        while filled < vm_uuid.len() {
            let rest = &mut vm_uuid[filled..];
            // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes owned by this
            // function; getrandom writes at most that many bytes into it.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("reading random bytes for a VM uuid")(e));
            }
            filled += n as usize;
        }
        Ok(Self { vm_uuid, mem_size })
    }

    /// The uuid as 32 hex digits.
    pub fn uuid_text(&self) -> String {
        uuid_text(&self.vm_uuid)
    }

    /// Parses 32 hex digits (as written by [`Identity::uuid_text`]).
    pub fn parse_uuid(text: &str) -> Result<[u8; 16]> {
        let bad = || Error::Config(format!("{text:?} is not a VM uuid (32 hex digits)"));
        let text = text.trim();
        if text.len() != 32 || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

/// Everything of a paused VM except guest memory and the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// [`MACHINE_STATE_VERSION`].
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceState,
    pub mem_size: u64,
}

/// What a state is checked against before it is restored.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub vcpus: u8,
    pub mem_size: u64,
    pub mem: &'a vm_memory::GuestMemoryMmap,
}

impl MachineState {
    /// Checks the state against the VM it is about to be restored into: versions, vCPU count,
    /// memory size, every KVM blob's length, device registers, queue sizes and ring addresses
    /// (inside guest memory).
    pub fn validate(&self, expect: &Expect<'_>) -> Result<()> {
        if self.version != MACHINE_STATE_VERSION {
            return Err(Error::State(format!(
                "machine state version {}, this build reads {MACHINE_STATE_VERSION}",
                self.version
            )));
        }
        if self.vcpus.len() != usize::from(expect.vcpus) {
            return Err(Error::State(format!(
                "the state has {} vCPUs, the VM has {}",
                self.vcpus.len(),
                expect.vcpus
            )));
        }
        if self.mem_size != expect.mem_size {
            return Err(Error::State(format!(
                "the state is of a VM with {} bytes of memory, this VM has {}",
                self.mem_size, expect.mem_size
            )));
        }
        let have = crate::memory::total_size(expect.mem);
        if have != self.mem_size {
            return Err(Error::State(format!(
                "the guest memory given holds {have} bytes, the state needs {}",
                self.mem_size
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            v.validate()
                .map_err(|e| Error::State(format!("vCPU {i}: {}", state_text(&e))))?;
        }
        self.vm.validate()?;
        self.devices.validate(expect.mem)
    }
}

fn state_text(e: &Error) -> String {
    match e {
        Error::State(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Serialises `state` into a sealed envelope (kind 1) for `identity`.
pub fn encode(state: &MachineState, identity: &Identity) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(state)
        .map_err(|e| Error::Capture(format!("encoding the machine state: {e}")))?;
    Ok(envelope::seal(Kind::MachineState, identity, &payload))
}

/// Opens and parses a machine-state file's bytes for `identity`. The result still has to pass
/// [`MachineState::validate`] against the VM (done by `Vm::restore`).
pub fn decode(bytes: &[u8], identity: &Identity) -> Result<MachineState> {
    let payload = envelope::open(Kind::MachineState, identity, bytes, MAX_MACHINE_STATE)?;
    decode_payload(payload, identity)
}

/// Parses an already opened payload (see [`decode`]).
pub fn decode_payload(payload: &[u8], identity: &Identity) -> Result<MachineState> {
    let state: MachineState = serde_json::from_slice(payload)
        .map_err(|e| Error::State(format!("cannot parse the machine state: {e}")))?;
    if state.mem_size != identity.mem_size {
        return Err(Error::State(format!(
            "the state is of a VM with {} bytes of memory, expected {}",
            state.mem_size, identity.mem_size
        )));
    }
    Ok(state)
}

#[cfg(test)]
#[path = "fuzz_tests.rs"]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_and_differ() {
        let a = Identity::generate(1 << 30).unwrap();
        let b = Identity::generate(1 << 30).unwrap();
        assert_ne!(a.vm_uuid, b.vm_uuid);
        assert_eq!(Identity::parse_uuid(&a.uuid_text()).unwrap(), a.vm_uuid);
        assert!(Identity::parse_uuid("xyz").is_err());
        assert!(Identity::parse_uuid(&"g".repeat(32)).is_err());
    }
}
