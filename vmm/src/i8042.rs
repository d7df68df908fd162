//! A minimal i8042 keyboard controller: enough for Linux to probe it and to reset the machine
//! by writing 0xFE (pulse reset line) to the command port 0x64.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::layout::{I8042_CMD_PORT, I8042_DATA_PORT};
use crate::outcome::{ExitLatch, Outcome};

/// Records a reset in the exit latch.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitLatch>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(Outcome::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the controller; a reset command records [`Outcome::Reset`] in `latch`.
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(latch)),
        }
    }

    /// True if `port` belongs to this device.
    pub fn claims(port: u16) -> bool {
        port == I8042_DATA_PORT || port == I8042_CMD_PORT
    }

    /// Handles an `in`.
    pub fn read(&mut self, port: u16) -> u8 {
        self.dev.read(offset(port))
    }

    /// Handles an `out`.
    pub fn write(&mut self, port: u16, value: u8) {
        match self.dev.write(offset(port), value) {
            Ok(()) => {}
            Err(never) => match never {},
        }
    }
}

fn offset(port: u16) -> u8 {
    // Ports are 0x60 and 0x64; claims() guarantees the difference fits.
    (port.wrapping_sub(I8042_DATA_PORT) & 0xff) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_records_reset() {
        let latch = Arc::new(ExitLatch::new());
        let mut dev = I8042::new(Arc::clone(&latch));
        assert!(I8042::claims(0x64) && I8042::claims(0x60) && !I8042::claims(0x61));
        dev.write(0x60, 0xfe);
        assert_eq!(latch.get(), None);
        dev.write(0x64, 0xaa);
        assert_eq!(latch.get(), None);
        dev.write(0x64, 0xfe);
        assert_eq!(latch.get(), Some(Outcome::Reset));
    }
}
