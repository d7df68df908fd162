//! Routes port and MMIO accesses that leave KVM to the device that owns the address.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::exit_port::ExitPort;
use crate::i8042::I8042;
use crate::layout::{EXIT_PORT, MMIO_BASE, MMIO_SIZE};
use crate::mmio::MmioTransport;
use crate::outcome::ExitLatch;
use crate::serial::SerialConsole;
use crate::snapshot::devices::{DeviceState, ExitPortState, I8042State, MmioState};

/// The VM's userspace devices.
pub struct Bus {
    serial: Mutex<SerialConsole>,
    i8042: Mutex<I8042>,
    exit_port: ExitPort,
    virtio: Option<Mutex<MmioTransport>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a device lock leaves plain register state behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    /// Assembles the bus.
    pub fn new(
        serial: SerialConsole,
        latch: Arc<ExitLatch>,
        virtio: Option<MmioTransport>,
    ) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::new(Arc::clone(&latch))),
            exit_port: ExitPort::new(latch),
            virtio: virtio.map(Mutex::new),
        }
    }

    /// Handles an `in` from `port`. Unclaimed ports read as all ones (no device).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if SerialConsole::claims(port) && data.len() == 1 {
            data[0] = lock(&self.serial).read(port);
        } else if I8042::claims(port) && data.len() == 1 {
            data[0] = lock(&self.i8042).read(port);
        } else {
            data.fill(0xff);
        }
    }

    /// Handles an `out` to `port`. Writes to unclaimed ports are dropped.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if SerialConsole::claims(port) {
            let mut s = lock(&self.serial);
            for b in data {
                s.write(port, *b);
            }
        } else if I8042::claims(port) {
            if let Some(b) = data.first() {
                lock(&self.i8042).write(port, *b);
            }
        } else if port == EXIT_PORT {
            self.exit_port.write(data);
        }
    }

    /// The virtio-mmio device's interrupt state, if the VM has the device.
    pub fn virtio_interrupt(&self) -> Option<Arc<crate::mmio::MmioInterrupt>> {
        self.virtio
            .as_ref()
            .map(|v| Arc::clone(lock(v).interrupt()))
    }

    /// Handles an MMIO read. Addresses without a device read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match (&self.virtio, addr.checked_sub(MMIO_BASE)) {
            (Some(v), Some(off)) if off < MMIO_SIZE => lock(v).read(off, data),
            _ => {
                tracing::debug!("MMIO read from unassigned address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// Handles an MMIO write. Writes without a device are dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match (&self.virtio, addr.checked_sub(MMIO_BASE)) {
            (Some(v), Some(off)) if off < MMIO_SIZE => lock(v).write(off, data),
            _ => tracing::debug!("MMIO write to unassigned address {addr:#x}"),
        }
    }

    /// Every device's state for a checkpoint (vCPUs paused, block device drained).
    pub fn save_devices(&self) -> crate::Result<DeviceState> {
        let virtio = match &self.virtio {
            Some(v) => Some(lock(v).save_state()?),
            None => None,
        };
        Ok(DeviceState {
            serial: lock(&self.serial).state(),
            i8042: I8042State::default(),
            exit_port: ExitPortState::default(),
            virtio,
        })
    }

    /// Restores the virtio transport and restarts its device (a restored VM, before its
    /// vCPUs run).
    pub fn restore_virtio(&self, state: &MmioState) -> crate::Result<()> {
        match &self.virtio {
            Some(v) => lock(v).restore_state(state),
            None => Err(crate::Error::State(
                "the state has a virtio device but the VM has none".into(),
            )),
        }
    }

    /// Flushes console output.
    pub fn flush_console(&self) {
        lock(&self.serial).flush();
    }

    /// Stops the virtio device (waits for its in-flight requests).
    pub fn shutdown_devices(&self) {
        if let Some(v) = &self.virtio {
            lock(v).shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn routes_ports() {
        let latch = Arc::new(ExitLatch::new());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialConsole::new(&irq, Box::new(std::io::sink())).unwrap();
        let bus = Bus::new(serial, Arc::clone(&latch), None);
        let mut b = [0u8; 1];
        bus.pio_read(0x3fd, &mut b);
        assert_eq!(b[0] & 0x60, 0x60);
        bus.pio_read(0x2f8, &mut b);
        assert_eq!(b[0], 0xff);
        let mut w = [0u8; 4];
        bus.mmio_read(MMIO_BASE, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert_eq!(latch.get(), None);
        bus.pio_write(EXIT_PORT, &3u32.to_le_bytes());
        assert_eq!(latch.get(), Some(Outcome::ExitPort(3)));
    }
}
