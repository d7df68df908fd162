//! The wait port: a 32-bit `in` from port [`WAIT_PORT`] puts the vCPU to sleep in the VMM
//! until the virtio-mmio device raises an interrupt, then returns the InterruptStatus bits it
//! acknowledged (0 when the sleep ended for another reason: a pause or stop of the VM, or the
//! [`WAIT_TIMEOUT`] safety net). It is the test guest's "halt until interrupt": the guest runs
//! at CPL3 (no `hlt`, no IDT), so instead of spinning on its used ring it clears
//! `VRING_AVAIL_F_NO_INTERRUPT`, looks at the ring once more, and reads this port. The vCPU
//! thread then sleeps instead of holding a host core that the device worker needs.
//!
//! The port has no state of its own: a checkpoint kicks the sleeping vCPU out (the read returns
//! 0 and completes before the vCPU parks) and the InterruptStatus it looks at is the
//! transport's, saved with the transport.

use std::time::Duration;

use crate::mmio::MmioInterrupt;

/// The port (next to the exit port 0xF4; opened in the test guest's TSS I/O bitmap).
pub const WAIT_PORT: u16 = crate::test_guest::WAIT_PORT;

/// Longest single sleep: the guest then looks at its ring (and its own timeout) again.
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(100);

/// Sleeps until `interrupt` has a pending bit, `kick` (the vCPU kick signal) arrives, or
/// [`WAIT_TIMEOUT`] passes; returns the bits taken. `cancelled` (a pause or stop requested) is
/// checked with `kick` blocked, and the sleep unblocks it atomically, so a kick sent after the
/// check ends the sleep at once.
pub fn wait(interrupt: &MmioInterrupt, kick: libc::c_int, cancelled: impl Fn() -> bool) -> u32 {
    // SAFETY: sigset_t is plain data for which all-zero bytes are a valid value.
    let mut block: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above (filled by pthread_sigmask before it is read).
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the sigset calls only write the local sigset they are given.
    unsafe {
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, kick);
    }
    // SAFETY: valid pointers to local sigsets; changes only this thread's mask.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old) } != 0 {
        return interrupt.take();
    }
    let bits = if cancelled() {
        interrupt.take()
    } else {
        // The mask during the sleep: the thread's usual one, without the kick blocked.
        let mut during = old;
        // SAFETY: writes only the local sigset `during`.
        unsafe { libc::sigdelset(&mut during, kick) };
        interrupt.sleep(&during, WAIT_TIMEOUT)
    };
    // SAFETY: restores this thread's mask from the value saved above; a kick that arrived
    // while blocked is delivered now (its handler sets `immediate_exit`, as it should).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::VirtioInterrupt;
    use std::sync::Arc;
    use std::time::Instant;
    use vmm_sys_util::eventfd::EventFd;

    fn interrupt() -> Arc<MmioInterrupt> {
        Arc::new(MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap())
    }

    #[test]
    fn a_pending_interrupt_returns_at_once_and_is_acknowledged() {
        let irq = interrupt();
        irq.signal_used_queue(0).unwrap();
        assert_eq!(wait(&irq, crate::vcpu::kick_signal(), || false), 1);
        assert_eq!(irq.status(), 0, "the wait acknowledged the bit");
    }

    #[test]
    fn a_cancelled_wait_does_not_sleep() {
        let irq = interrupt();
        // Nothing pending and cancelled: returns 0 without sleeping (no timing asserted: a
        // sleep would still return 0, so the check is that the interrupt stays untouched).
        assert_eq!(wait(&irq, crate::vcpu::kick_signal(), || true), 0);
        irq.signal_config_change().unwrap();
        assert_eq!(wait(&irq, crate::vcpu::kick_signal(), || true), 2);
    }

    #[test]
    fn a_signal_from_another_thread_wakes_the_sleeper() {
        let irq = interrupt();
        let sleeper = {
            let irq = Arc::clone(&irq);
            std::thread::spawn(move || {
                // Sleep until the interrupt: loop over timeouts so the test does not depend on
                // when the other thread signals.
                let start = Instant::now();
                loop {
                    let bits = wait(&irq, crate::vcpu::kick_signal(), || false);
                    if bits != 0 || start.elapsed() > Duration::from_secs(60) {
                        return bits;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        irq.signal_used_queue(0).unwrap();
        assert_eq!(sleeper.join().unwrap(), 1);
        assert_eq!(irq.irqfd().read().unwrap(), 1, "the irqfd still fires");
    }
}
