//! Device state: COM1, i8042, exit port, the virtio-mmio transport with its queues, and the
//! device behind it. Plain data; [`DeviceState::validate`] checks it before a restore.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::mirror::mirror_fields;
use crate::{Error, Result};

/// The 16550 FIFO depth of vm-superio's UART.
pub const SERIAL_FIFO: usize = 64;

/// COM1 registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

mirror_fields!(
    SerialState,
    vm_superio::serial::SerialState,
    {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer
    }
);

/// The i8042: vm-superio's controller only forwards the reset command and holds no state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The exit port holds no state (a write ends the VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPortState {}

/// One virtqueue: its configuration and ring positions (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

mirror_fields!(
    QueueSnapshot,
    QueueState,
    {
        max_size,
        size,
        ready,
        desc_table,
        avail_ring,
        used_ring,
        next_avail,
        next_used,
        event_idx_enabled
    }
);

impl QueueSnapshot {
    /// Builds the validated queue (size a power of two within the maximum, aligned rings;
    /// with `in_memory`, rings inside `mem` when the queue is ready).
    pub fn to_queue(&self, mem: &GuestMemoryMmap, in_memory: bool) -> Result<Queue> {
        let q = Queue::try_from(QueueState::from(self))
            .map_err(|e| Error::State(format!("virtqueue: {e}")))?;
        if in_memory && self.ready && !q.is_valid(mem) {
            return Err(Error::State(format!(
                "virtqueue rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) are \
                 not inside guest memory",
                self.desc_table, self.avail_ring, self.used_ring, self.size
            )));
        }
        Ok(q)
    }
}

/// The device behind the transport (its own part; queues are in [`MmioState::queues`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceSnapshot {
    pub acked_features: u64,
    pub config: Vec<u8>,
    pub needs_reset: bool,
}

/// The virtio-mmio transport's registers, its interrupt state, its queues and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    /// The driver set DRIVER_OK and the device runs.
    pub active: bool,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceSnapshot,
}

/// Every userspace device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub exit_port: ExitPortState,
    pub virtio: Option<MmioState>,
}

impl MmioState {
    /// Checks registers and queues (rings inside `mem` when the device is active).
    pub fn validate(&self, mem: &GuestMemoryMmap) -> Result<()> {
        use crate::mmio::regs::*;
        let known = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_FEATURES_OK
            | STATUS_DRIVER_OK
            | STATUS_DEVICE_NEEDS_RESET
            | STATUS_FAILED;
        if self.status & !known != 0 {
            return Err(Error::State(format!(
                "virtio status {:#x} has unknown bits",
                self.status
            )));
        }
        if self.active && self.status & STATUS_DRIVER_OK == 0 {
            return Err(Error::State(
                "virtio device marked active without DRIVER_OK".into(),
            ));
        }
        if self.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(Error::State(format!(
                "virtio interrupt status {:#x} has unknown bits",
                self.interrupt_status
            )));
        }
        if self.queues.is_empty() {
            return Err(Error::State("virtio device without queues".into()));
        }
        let mut ready = 0;
        for (i, q) in self.queues.iter().enumerate() {
            q.to_queue(mem, self.active)
                .map_err(|e| Error::State(format!("queue {i}: {}", inner(&e))))?;
            if q.ready {
                ready += 1;
            }
        }
        if self.active && ready == 0 {
            return Err(Error::State(
                "virtio device is active but no queue is ready".into(),
            ));
        }
        Ok(())
    }
}

fn inner(e: &Error) -> String {
    match e {
        Error::State(s) => s.clone(),
        other => other.to_string(),
    }
}

impl DeviceState {
    /// Checks every device's state.
    pub fn validate(&self, mem: &GuestMemoryMmap) -> Result<()> {
        if self.serial.in_buffer.len() > SERIAL_FIFO {
            return Err(Error::State(format!(
                "serial receive FIFO holds {} bytes, at most {SERIAL_FIFO} fit",
                self.serial.in_buffer.len()
            )));
        }
        if let Some(v) = &self.virtio {
            v.validate(mem)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn mmio() -> MmioState {
        use crate::mmio::regs::*;
        MmioState {
            device_type: 2,
            device_features_sel: 0,
            driver_features_sel: 1,
            driver_features: VIRTIO_F_VERSION_1,
            queue_sel: 0,
            status: STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            active: true,
            interrupt_status: 0,
            config_generation: 0,
            queues: vec![QueueSnapshot {
                max_size: 256,
                size: 128,
                ready: true,
                desc_table: 0x1_0000,
                avail_ring: 0x2_0000,
                used_ring: 0x3_0000,
                next_avail: 7,
                next_used: 7,
                event_idx_enabled: false,
            }],
            device: VirtioDeviceSnapshot {
                acked_features: VIRTIO_F_VERSION_1,
                config: vec![0; 8],
                needs_reset: false,
            },
        }
    }

    #[test]
    fn queue_checks() {
        let m = mem();
        mmio().validate(&m).unwrap();
        let mut s = mmio();
        s.queues[0].size = 512;
        let e = s.validate(&m).unwrap_err().to_string();
        assert!(e.contains("queue 0"), "{e}");
        let mut s = mmio();
        s.queues[0].size = 100;
        assert!(s.validate(&m).is_err());
        let mut s = mmio();
        s.queues[0].used_ring = 0xff_f000; // beyond the 1 MiB of RAM
        let e = s.validate(&m).unwrap_err().to_string();
        assert!(e.contains("not inside guest memory"), "{e}");
        let mut s = mmio();
        s.queues[0].ready = false;
        let e = s.validate(&m).unwrap_err().to_string();
        assert!(e.contains("no queue is ready"), "{e}");
        let mut s = mmio();
        s.status |= 0x100;
        assert!(s.validate(&m).is_err());
        let mut s = mmio();
        s.status = 0;
        assert!(s.validate(&m).is_err(), "active without DRIVER_OK");
    }

    #[test]
    fn queue_state_round_trips() {
        let q = mmio().queues[0];
        let back = QueueSnapshot::from(&QueueState::from(&q));
        assert_eq!(back, q);
        let built = q.to_queue(&mem(), true).unwrap();
        assert_eq!(built.next_avail(), 7);
        assert_eq!(built.size(), 128);
    }
}
