//! COM1: a 16550 UART (vm-superio) at 0x3F8, IRQ 4 through an irqfd, output to a writer.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{SERIAL_PORT, SERIAL_PORT_LEN};
use crate::{Error, Result};

/// Raises the UART interrupt by writing the irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The COM1 UART.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl SerialConsole {
    /// Creates the UART writing to `out`; `irq` is signalled for interrupts (register it as
    /// an irqfd for [`crate::layout::SERIAL_IRQ`]).
    pub fn new(irq: &EventFd, out: ConsoleOut) -> Result<Self> {
        let irq = irq
            .try_clone()
            .map_err(Error::io("cloning the serial irqfd"))?;
        Ok(Self {
            uart: Serial::new(IrqTrigger(irq), out),
        })
    }

    /// Creates the UART in a saved state (a restored VM), writing to `out`.
    pub fn from_state(
        irq: &EventFd,
        out: ConsoleOut,
        state: &crate::snapshot::devices::SerialState,
    ) -> Result<Self> {
        let irq = irq
            .try_clone()
            .map_err(Error::io("cloning the serial irqfd"))?;
        let uart = Serial::from_state(
            &state.into(),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| Error::State(format!("serial port: {e:?}")))?;
        Ok(Self { uart })
    }

    /// The UART's registers and receive FIFO.
    pub fn state(&self) -> crate::snapshot::devices::SerialState {
        (&self.uart.state()).into()
    }

    /// True if `port` belongs to COM1.
    pub fn claims(port: u16) -> bool {
        (SERIAL_PORT..SERIAL_PORT + SERIAL_PORT_LEN).contains(&port)
    }

    /// Handles an `in`.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read(offset(port))
    }

    /// Handles an `out`. Output errors (a closed stdout, a full disk) are logged once per
    /// byte and otherwise ignored: the guest must not stop because its console went away.
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write(offset(port), value) {
            tracing::debug!("serial output: {e}");
        }
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            tracing::debug!("serial flush: {e}");
        }
    }
}

fn offset(port: u16) -> u8 {
    (port.wrapping_sub(SERIAL_PORT) & 0x7) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_output_and_lsr_reads_ready() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut com = SerialConsole::new(&irq, Box::new(sink.clone())).unwrap();
        assert!(SerialConsole::claims(0x3f8) && SerialConsole::claims(0x3ff));
        assert!(!SerialConsole::claims(0x400) && !SerialConsole::claims(0x3f7));
        for b in b"hi\n" {
            com.write(0x3f8, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(com.read(0x3fd) & 0x60, 0x60);
    }

    #[test]
    fn state_round_trips() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com = SerialConsole::new(&irq, Box::new(Sink::default())).unwrap();
        com.write(0x3fb, 0x83); // LCR: DLAB + 8 bits
        com.write(0x3f8, 0x01); // divisor low
        com.write(0x3fb, 0x03);
        com.write(0x3ff, 0x5a); // scratch
        let st = com.state();
        assert_eq!(
            (st.baud_divisor_low, st.line_control, st.scratch),
            (1, 3, 0x5a)
        );
        let mut back = SerialConsole::from_state(&irq, Box::new(Sink::default()), &st).unwrap();
        assert_eq!(back.read(0x3ff), 0x5a);
        assert_eq!(back.state(), st);
    }

    #[test]
    fn thr_empty_interrupt_fires_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com = SerialConsole::new(&irq, Box::new(Sink::default())).unwrap();
        com.write(0x3f9, 0x02); // IER: THR empty interrupt
        com.write(0x3f8, b'x');
        assert!(irq.read().unwrap() >= 1);
    }
}
