//! Interrupts of a virtio-mmio device: the InterruptStatus register plus an irqfd that KVM
//! routes to the device's GSI in the in-kernel irqchip, and a waker for vCPUs sleeping on the
//! wait port until the device interrupts (see [`crate::wait_port`]).

use std::os::fd::AsRawFd;
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
    /// vCPUs inside [`MmioInterrupt::sleep`].
    sleepers: AtomicU32,
    /// Written by a signal while a vCPU sleeps.
    waker: EventFd,
}

impl MmioInterrupt {
    /// Creates the interrupt state; `irqfd` is written for every signal.
    pub fn new(irqfd: EventFd) -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
            sleepers: AtomicU32::new(0),
            waker: EventFd::new(libc::EFD_NONBLOCK)?,
        })
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

    /// Takes (acknowledges) every pending InterruptStatus bit, as a driver's read of the
    /// register followed by a write of InterruptACK would.
    pub fn take(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    /// Sleeps until an InterruptStatus bit is pending, a signal not in `mask` arrives, or
    /// `timeout` passes; then takes and returns the pending bits (0 if none). `mask` is the
    /// signal mask during the sleep (`ppoll`), so a caller that blocked its wake-up signal
    /// before checking why it should not sleep loses no wake-up. No interrupt is lost either: a
    /// sleeper is counted before the status is looked at, and a signal sets the status before
    /// it looks for sleepers (both sequentially consistent).
    pub fn sleep(&self, mask: &libc::sigset_t, timeout: std::time::Duration) -> u32 {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        if self.status.load(Ordering::SeqCst) == 0 {
            let mut fd = libc::pollfd {
                fd: self.waker.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
            };
            // SAFETY: `fd`, `ts` and `mask` are valid for the duration of the call; the waker
            // is open while `self` lives; ppoll only writes `fd.revents`. An error (EINTR from
            // a signal) just ends the sleep early.
            let _ = unsafe { libc::ppoll(&mut fd, 1, &ts, mask) };
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        // A wake-up meant for this sleep (or a stale one) is consumed here; a later signal
        // sets the status bit the next sleep looks at first.
        let _ = self.waker.read();
        self.take()
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.waker.write(1)?;
        }
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
        let irq = MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
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
