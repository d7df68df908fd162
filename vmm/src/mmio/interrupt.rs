//! Interrupts of a virtio-mmio device: the InterruptStatus register plus an irqfd that KVM
//! routes to the device's GSI in the in-kernel irqchip.

use std::sync::atomic::{AtomicU32, Ordering};

use block::VirtioInterrupt;
use vmm_sys_util::eventfd::EventFd;

use super::regs::{INT_CONFIG, INT_VRING};

/// Interrupt state shared by the transport (register reads, acks) and the device (signals).
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// Creates the interrupt state; `irqfd` is written for every signal.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The irqfd (to register with KVM).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears all pending bits (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// Sets InterruptStatus and ConfigGeneration (a restored VM; no interrupt is raised: the
    /// in-kernel irqchip state carries any line still asserted).
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }

    /// ConfigGeneration: bumped on every configuration change.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irqfd.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.raise(INT_VRING)
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(INT_CONFIG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_set_bits_and_fire_the_irqfd() {
        let irq = MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue(0).unwrap();
        assert_eq!(irq.status(), INT_VRING);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
