//! The test guest's exit port: a 32-bit `out` to port 0xF4 ends the VM with that status.

use std::sync::Arc;

use crate::outcome::{ExitLatch, Outcome};

/// The exit port device.
#[derive(Debug)]
pub struct ExitPort {
    latch: Arc<ExitLatch>,
}

impl ExitPort {
    /// Creates the device; a write records [`Outcome::ExitPort`] in `latch`.
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self { latch }
    }

    /// Handles an `out` of 1, 2 or 4 bytes (little endian, zero-extended).
    pub fn write(&self, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.latch.set(Outcome::ExitPort(u32::from_le_bytes(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_status() {
        let latch = Arc::new(ExitLatch::new());
        ExitPort::new(Arc::clone(&latch)).write(&[0x01, 0x02, 0, 0]);
        assert_eq!(latch.get(), Some(Outcome::ExitPort(0x0201)));
        let latch = Arc::new(ExitLatch::new());
        ExitPort::new(Arc::clone(&latch)).write(&[7]);
        assert_eq!(latch.get(), Some(Outcome::ExitPort(7)));
    }
}
