//! Decoding untrusted machine-state files: random damage never panics, and a damaged envelope
//! is always refused; structured mutations of a valid payload (re-sealed, so the checksums
//! pass) reach `validate`, which refuses or accepts without panicking.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde_json::Value;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::cpu::{Blob, FpuState, MsrValue};
use super::devices::*;
use super::*;

const MEM: u64 = 1 << 20;

fn zeros<T>() -> Blob {
    Blob(vec![0; std::mem::size_of::<T>()])
}

fn chip(id: u8) -> Blob {
    let mut b = zeros::<kvm_irqchip>();
    b.0[0] = id;
    b
}

fn sample() -> MachineState {
    use crate::mmio::regs::*;
    let vcpu = VcpuState {
        regs: zeros::<kvm_regs>(),
        sregs: zeros::<kvm_sregs>(),
        fpu: FpuState {
            fpr: [[0; 16]; 8],
            fcw: 0x37f,
            fsw: 0,
            ftwx: 0,
            last_opcode: 0,
            last_ip: 0,
            last_dp: 0,
            xmm: [[0; 16]; 16],
            mxcsr: 0x1f80,
        },
        xsave: zeros::<kvm_xsave>(),
        xcrs: zeros::<kvm_xcrs>(),
        lapic: zeros::<kvm_lapic_state>(),
        msrs: vec![
            MsrValue {
                index: 0x10,
                data: 12345,
            },
            MsrValue {
                index: 0x174,
                data: 0,
            },
        ],
        events: zeros::<kvm_vcpu_events>(),
        mp_state: 0,
        debugregs: zeros::<kvm_debugregs>(),
        tsc_khz: 2_000_000,
    };
    MachineState {
        version: MACHINE_STATE_VERSION,
        vcpus: vec![vcpu],
        vm: VmState {
            pic_master: chip(0),
            pic_slave: chip(1),
            ioapic: chip(2),
            pit: zeros::<kvm_pit_state2>(),
            clock: zeros::<kvm_clock_data>(),
        },
        devices: DeviceState {
            serial: SerialState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            i8042: I8042State {},
            exit_port: ExitPortState {},
            virtio: Some(MmioState {
                device_type: 2,
                device_features_sel: 1,
                driver_features_sel: 1,
                driver_features: VIRTIO_F_VERSION_1,
                queue_sel: 0,
                status: STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                active: true,
                interrupt_status: 0,
                config_generation: 0,
                queues: vec![QueueSnapshot {
                    max_size: 256,
                    size: 64,
                    ready: true,
                    desc_table: 0x1_0000,
                    avail_ring: 0x2_0000,
                    used_ring: 0x3_0000,
                    next_avail: 100,
                    next_used: 98,
                    event_idx_enabled: true,
                }],
                device: VirtioDeviceSnapshot {
                    acked_features: VIRTIO_F_VERSION_1,
                    config: vec![0; 60],
                    needs_reset: false,
                },
            }),
        },
        mem_size: MEM,
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn id() -> Identity {
    Identity {
        vm_uuid: [7; 16],
        mem_size: MEM,
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

/// Decodes and validates; returns whether the state was accepted.
fn try_all(bytes: &[u8], m: &GuestMemoryMmap) -> bool {
    match decode(bytes, &id()) {
        Ok(s) => s
            .validate(&Expect {
                vcpus: 1,
                mem_size: MEM,
                mem: m,
            })
            .is_ok(),
        Err(_) => false,
    }
}

#[test]
fn the_sample_is_valid() {
    let bytes = encode(&sample(), &id()).unwrap();
    assert!(try_all(&bytes, &mem()));
}

#[test]
fn every_damaged_envelope_is_refused() {
    let m = mem();
    let good = encode(&sample(), &id()).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let mut b = good.clone();
        match rng.below(4) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 + rng.below(255) as u8;
            }
            1 => b.truncate(rng.below(good.len())),
            2 => {
                let i = rng.below(b.len());
                b.insert(i, rng.next() as u8);
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                if b == good {
                    continue;
                }
            }
        }
        assert!(!try_all(&b, &m), "a damaged file was accepted");
    }
}

/// All number leaves of a JSON value, as paths of keys/indices.
fn number_paths(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Number(_) | Value::Bool(_) => out.push(path.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(Value::from(i));
                number_paths(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(Value::from(k.clone()));
                number_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, p| match p {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

#[test]
fn structured_mutations_never_panic() {
    let m = mem();
    let payload = serde_json::to_vec(&sample()).unwrap();
    let base: Value = serde_json::from_slice(&payload).unwrap();
    let mut paths = Vec::new();
    number_paths(&base, &mut Vec::new(), &mut paths);
    assert!(paths.len() > 100);
    let mut rng = Rng(42);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..4000 {
        let mut v = base.clone();
        for _ in 0..1 + rng.below(3) {
            let p = &paths[rng.below(paths.len())];
            *at(&mut v, p) = match rng.below(6) {
                0 => Value::from(0),
                1 => Value::from(rng.next()),
                2 => Value::from(-1),
                3 => Value::from(rng.next() % 70_000),
                4 => Value::from(true),
                _ => Value::from(rng.next() % 256),
            };
        }
        // Arrays shrink or grow too (blobs of the wrong length, extra queues or vCPUs).
        if rng.below(4) == 0 {
            let p = &paths[rng.below(paths.len())];
            if let Some(parent) = p.split_last().map(|(_, head)| head) {
                if let Value::Array(a) = at(&mut v, parent) {
                    if rng.below(2) == 0 {
                        a.pop();
                    } else if let Some(x) = a.first().cloned() {
                        a.push(x);
                    }
                }
            }
        }
        let bytes = envelope::seal(Kind::MachineState, &id(), &serde_json::to_vec(&v).unwrap());
        if try_all(&bytes, &m) {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    // Most random values in a register file are still "valid" plain data; what matters is
    // that lengths, counts, sizes, addresses and enums were checked.
    assert!(refused > 500, "refused {refused}, accepted {accepted}");
    assert!(accepted > 0);
}

#[test]
fn semantic_refusals_name_the_problem() {
    let m = mem();
    let check = |f: &dyn Fn(&mut MachineState), want: &str| {
        let mut s = sample();
        f(&mut s);
        let e = s
            .validate(&Expect {
                vcpus: 1,
                mem_size: MEM,
                mem: &m,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e} (wanted {want:?})");
    };
    check(&|s| s.vcpus.push(s.vcpus[0].clone()), "2 vCPUs");
    check(&|s| s.vcpus[0].mp_state = 99, "MP state 99");
    check(
        &|s| {
            let first = s.vcpus[0].msrs[0];
            s.vcpus[0].msrs.push(first)
        },
        "appears twice",
    );
    check(&|s| s.vcpus[0].xsave.0.push(0), "XSAVE area is 4097 bytes");
    check(&|s| s.vm.ioapic = chip(0), "IOAPIC state is for irqchip 0");
    check(&|s| s.vm.pit.0.clear(), "PIT state is 0 bytes");
    check(&|s| s.devices.serial.in_buffer = vec![0; 65], "FIFO");
    fn q(s: &mut MachineState) -> &mut QueueSnapshot {
        &mut s.devices.virtio.as_mut().unwrap().queues[0]
    }
    check(&|s| q(s).size = 512, "queue 0");
    check(&|s| q(s).desc_table = 0x1_0001, "queue 0");
    check(&|s| q(s).avail_ring = MEM - 4, "not inside guest memory");
    check(&|s| s.version = 2, "machine state version 2");
    check(&|s| s.mem_size = 2 * MEM, "memory");
}
