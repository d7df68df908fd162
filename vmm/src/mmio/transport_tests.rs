//! Register-level tests of the virtio-mmio transport against a fake device.

use std::sync::{Arc, Mutex};

use block::{ActivateContext, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;

#[derive(Default)]
struct Log {
    acked: u64,
    activations: Vec<Vec<(u16, bool, u64)>>,
    resets: usize,
    config: Vec<u8>,
}

struct FakeDevice {
    log: Arc<Mutex<Log>>,
    needs_reset: Arc<Mutex<bool>>,
    fail_activate: bool,
    ctx: Option<ActivateContext>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << 9) | VIRTIO_RING_F_EVENT_IDX
    }
    fn set_acked_features(&mut self, features: u64) {
        self.log.lock().unwrap().acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, data: &[u8]) {
        self.log.lock().unwrap().config.extend_from_slice(data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), block::Error> {
        if self.fail_activate {
            return Err(block::Error::Activate("fake failure".into()));
        }
        let qs = ctx
            .queues
            .iter()
            .map(|(q, _)| (q.size(), q.ready(), q.desc_table()))
            .collect();
        self.log.lock().unwrap().activations.push(qs);
        self.ctx = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.log.lock().unwrap().resets += 1;
        self.ctx.take().is_some()
    }
    fn needs_reset(&self) -> bool {
        *self.needs_reset.lock().unwrap()
    }
}

struct Harness {
    t: MmioTransport,
    log: Arc<Mutex<Log>>,
    needs_reset: Arc<Mutex<bool>>,
}

fn harness(fail_activate: bool) -> Harness {
    let log = Arc::new(Mutex::new(Log::default()));
    let needs_reset = Arc::new(Mutex::new(false));
    let dev = FakeDevice {
        log: Arc::clone(&log),
        needs_reset: Arc::clone(&needs_reset),
        fail_activate,
        ctx: None,
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap());
    let t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
    Harness {
        t,
        log,
        needs_reset,
    }
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Runs the driver side of initialisation up to (not including) DRIVER_OK.
fn negotiate(t: &mut MmioTransport, features_hi: u32) {
    wr(t, STATUS, STATUS_ACKNOWLEDGE);
    wr(t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(t, DRIVER_FEATURES_SEL, 0);
    wr(t, DRIVER_FEATURES, 1 << 9);
    wr(t, DRIVER_FEATURES_SEL, 1);
    wr(t, DRIVER_FEATURES, features_hi);
    wr(
        t,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport) {
    wr(t, QUEUE_SEL, 0);
    wr(t, QUEUE_NUM, 128);
    wr(t, QUEUE_DESC_LOW, 0x1_0000);
    wr(t, QUEUE_DESC_HIGH, 0);
    wr(t, QUEUE_DRIVER_LOW, 0x2_0000);
    wr(t, QUEUE_DEVICE_LOW, 0x3_0000);
    wr(t, QUEUE_READY, 1);
}

const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identification_registers() {
    let mut h = harness(false);
    assert_eq!(rd(&mut h.t, MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut h.t, VERSION), 2);
    assert_eq!(rd(&mut h.t, DEVICE_ID), 2);
    assert_eq!(rd(&mut h.t, VENDOR_ID), VENDOR);
    wr(&mut h.t, DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), (1 << 9) | (1 << 29));
    wr(&mut h.t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 1);
    wr(&mut h.t, DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 0);
    assert_eq!(rd(&mut h.t, QUEUE_NUM_MAX), 256);
    wr(&mut h.t, QUEUE_SEL, 1);
    assert_eq!(rd(&mut h.t, QUEUE_NUM_MAX), 0);
    assert_eq!(rd(&mut h.t, SHM_LEN_LOW), u32::MAX);
}

#[test]
fn config_space_any_width() {
    let mut h = harness(false);
    let mut b = [0u8; 2];
    h.t.read(CONFIG + 1, &mut b);
    assert_eq!(b, [0x22, 0x33]);
    let mut b = [0u8; 4];
    h.t.read(CONFIG + 6, &mut b);
    assert_eq!(b, [0x77, 0x88, 0, 0]);
    // Config writes before DRIVER are ignored.
    h.t.write(CONFIG, &[9]);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    h.t.write(CONFIG, &[7]);
    assert_eq!(h.log.lock().unwrap().config, vec![7]);
}

#[test]
fn full_initialisation_activates_with_the_configured_queue() {
    let mut h = harness(false);
    negotiate(&mut h.t, 1);
    assert_eq!(
        rd(&mut h.t, STATUS) & STATUS_FEATURES_OK,
        STATUS_FEATURES_OK
    );
    assert_eq!(h.log.lock().unwrap().acked, VIRTIO_F_VERSION_1 | (1 << 9));
    setup_queue(&mut h.t);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 1);
    wr(&mut h.t, STATUS, ALL_OK);
    assert_eq!(rd(&mut h.t, STATUS), ALL_OK);
    assert!(h.t.is_active());
    assert_eq!(
        h.log.lock().unwrap().activations,
        vec![vec![(128, true, 0x1_0000)]]
    );
    // Queue registers are frozen after DRIVER_OK.
    wr(&mut h.t, QUEUE_NUM, 64);
    wr(&mut h.t, STATUS, 0);
    assert!(!h.t.is_active());
    assert_eq!(h.log.lock().unwrap().resets, 1);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut h = harness(false);
    negotiate(&mut h.t, 0);
    assert_eq!(rd(&mut h.t, STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Unoffered features are refused too.
    let mut h = harness(false);
    negotiate(&mut h.t, 1 | 2);
    assert_eq!(rd(&mut h.t, STATUS) & STATUS_FEATURES_OK, 0);
}

#[test]
fn out_of_order_status_is_ignored() {
    let mut h = harness(false);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(&mut h.t, STATUS, STATUS_ACKNOWLEDGE); // clearing a bit
    assert_eq!(rd(&mut h.t, STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Queue setup before FEATURES_OK is ignored.
    wr(&mut h.t, QUEUE_READY, 1);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
    assert!(h.log.lock().unwrap().activations.is_empty());
}

#[test]
fn queue_outside_memory_sets_needs_reset() {
    let mut h = harness(false);
    negotiate(&mut h.t, 1);
    wr(&mut h.t, QUEUE_SEL, 0);
    wr(&mut h.t, QUEUE_DESC_LOW, 0x00ff_0000); // beyond the 1 MiB of RAM
    wr(&mut h.t, QUEUE_READY, 1);
    wr(&mut h.t, STATUS, ALL_OK);
    assert!(!h.t.is_active());
    assert_eq!(rd(&mut h.t, STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(h.t.interrupt().irqfd().read().unwrap(), 1);
    wr(&mut h.t, STATUS, 0);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 0);
}

#[test]
fn failed_activation_and_device_errors_report_needs_reset() {
    let mut h = harness(true);
    negotiate(&mut h.t, 1);
    setup_queue(&mut h.t);
    wr(&mut h.t, STATUS, ALL_OK);
    assert_eq!(
        rd(&mut h.t, STATUS) & STATUS_DEVICE_NEEDS_RESET,
        STATUS_DEVICE_NEEDS_RESET
    );

    let mut h = harness(false);
    negotiate(&mut h.t, 1);
    setup_queue(&mut h.t);
    wr(&mut h.t, STATUS, ALL_OK);
    assert_eq!(rd(&mut h.t, STATUS), ALL_OK);
    *h.needs_reset.lock().unwrap() = true;
    assert_eq!(rd(&mut h.t, STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
}

#[test]
fn notify_and_interrupt_ack() {
    let mut h = harness(false);
    wr(&mut h.t, QUEUE_NOTIFY, 0);
    assert_eq!(h.t.queue_events()[0].read().unwrap(), 1);
    wr(&mut h.t, QUEUE_NOTIFY, 5); // absent queue: ignored
    use block::VirtioInterrupt;
    h.t.interrupt().signal_used_queue(0).unwrap();
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), INT_VRING);
    wr(&mut h.t, INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 0);
}

#[test]
fn bad_register_accesses_are_harmless() {
    let mut h = harness(false);
    let mut b = [0xffu8; 2];
    h.t.read(MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    h.t.write(STATUS, &[1, 0]);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    h.t.write(STATUS + 1, &[1, 0, 0, 0]);
    assert_eq!(rd(&mut h.t, STATUS), 0);
}

#[test]
fn event_idx_follows_the_acked_features() {
    let mut h = harness(false);
    negotiate(&mut h.t, 1);
    wr(&mut h.t, DRIVER_FEATURES_SEL, 0);
    // Too late: FEATURES_OK is set, the write is ignored.
    wr(&mut h.t, DRIVER_FEATURES, 1 << 29);
    assert_eq!(h.log.lock().unwrap().acked & (1 << 29), 0);
}
