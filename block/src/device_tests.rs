//! Device-level tests: a hostile or buggy driver, notification suppression, reset.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::{self, bit, VIRTIO_RING_F_EVENT_IDX};
use crate::request::*;
use crate::status::VIRTIO_BLK_S_OK as OK;
use crate::testutil::*;

const SIZE: u64 = 4 << 20;

fn kinds() -> [BackendKind; 2] {
    [BackendKind::Blocking, BackendKind::Uring]
}

#[test]
fn config_space_and_features() {
    let disk = test_disk(SIZE);
    let mut dev = VirtioBlock::new(disk.volume.clone(), "x".repeat(40)).expect("device");
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[config::QUEUE_SIZE]);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SIZE / 512);
    let mut tail = [0xffu8; 8];
    dev.read_config(config::CONFIG_LEN as u64 - 4, &mut tail);
    assert_eq!(
        tail,
        [1, 0, 0, 0, 0, 0, 0, 0],
        "may_unmap, padding, then zeros past the end"
    );
    dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);
    dev.write_config(0, &[1, 2, 3]);
    dev.read_config(0, &mut cap);
    assert_eq!(
        u64::from_le_bytes(cap),
        SIZE / 512,
        "config space is read-only"
    );
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features, dev.avail_features());
    assert!(!dev.reset(), "never activated");
}

#[test]
fn long_ids_are_cut_to_twenty_bytes() {
    let disk = test_disk(SIZE);
    let m = mem();
    let dev =
        VirtioBlock::new(disk.volume.clone(), "0123456789abcdefghijKLMNOP".into()).expect("device");
    assert_eq!(&dev.id, b"0123456789abcdefghij");
    drop(dev);
    let mut h = Harness::start(&m, disk.volume.clone(), BackendKind::Blocking, None);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[desc(DATA, 32, F_WRITE)]),
        OK
    );
    assert_eq!(&read_bytes(&m, DATA, 12), b"conformance\0");
}

#[test]
fn chains_without_a_status_byte_need_a_reset_but_do_not_stop_the_device() {
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
        // Status outside guest memory.
        let (hdr, _) = h.slots();
        write_header(&m, hdr, VIRTIO_BLK_T_FLUSH, 0);
        let head = h.add(&[desc(hdr, 16, 0), desc(MEM_SIZE + 64, 1, F_WRITE)]);
        h.run();
        assert_eq!(h.drv.used(0), (u32::from(head), 0));
        assert!(h.dev.needs_reset());
        assert_eq!(h.irq.config.load(Ordering::SeqCst), 1);
        // A looping chain (1 -> 2 -> 1).
        write_header(&m, hdr, VIRTIO_BLK_T_IN, 0);
        h.drv.add_raw(
            &[
                (200, raw(hdr, 16, F_NEXT, 201)),
                (201, raw(DATA, 512, F_WRITE | F_NEXT, 200)),
            ],
            200,
        );
        h.run();
        assert_eq!(h.drv.used(1), (200, 0));
        assert_eq!(
            h.irq.config.load(Ordering::SeqCst),
            1,
            "config change is signalled once"
        );
        // A well-formed request still works.
        assert_eq!(h.write(0, &pattern(1, 4096)), OK);
        assert_eq!(h.read(0, 4096), (OK, pattern(1, 4096)));
        assert!(h.dev.reset());
        assert!(!h.dev.needs_reset(), "reset clears NEEDS_RESET");
    }
}

#[test]
fn a_corrupt_avail_index_does_not_hang_the_device() {
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
        assert_eq!(h.write(0, &pattern(1, 512)), OK);
        // The driver claims 1000 more chains than the ring holds.
        let idx = h.drv.q.avail().idx().load();
        h.drv.q.avail().idx().store(idx.wrapping_add(1000));
        h.kick();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !h.dev.needs_reset() {
            assert!(
                std::time::Instant::now() < deadline,
                "needs_reset never set"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(h.irq.config.load(Ordering::SeqCst), 1);
        assert!(h.dev.reset(), "reset completes");
        assert!(!h.dev.is_active());
    }
}

#[test]
fn refused_requests_still_complete() {
    let disk = test_disk(SIZE);
    let m = mem();
    let mut h = Harness::start(&m, disk.volume.clone(), BackendKind::Uring, None);
    // Data outside guest memory, wrong direction, too many descriptors, header too short.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[desc(MEM_SIZE - 512, 1024, F_WRITE)]),
        1
    );
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 512, 0)]), 1);
    let many: Vec<_> = (0..config::SEG_MAX as u64 + 1)
        .map(|i| desc(DATA + i * 512, 512, 0))
        .collect();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &many), 1);
    let (_, st) = h.slots();
    h.add(&[desc(HDR, 4, 0), desc(st, 1, F_WRITE)]);
    h.run();
    assert_eq!(status_at(&m, st), 1);
    assert!(!h.dev.needs_reset());
    let mut back = vec![0u8; 4096];
    disk.volume.read_at(&mut back, 0).expect("read");
    assert_eq!(back, vec![0u8; 4096], "no refused write reached the disk");
}

#[test]
fn interrupts_honour_no_interrupt_and_event_idx() {
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT suppresses the interrupt.
        let no_event_idx = VirtioBlock::new(disk.volume.clone(), String::new())
            .expect("dev")
            .avail_features()
            & !bit(VIRTIO_RING_F_EVENT_IDX);
        let mut h = Harness::start(&m, disk.volume.clone(), kind, Some(no_event_idx));
        assert_eq!(h.write(0, &pattern(1, 512)), OK);
        let before = h.irq.used.load(Ordering::SeqCst);
        assert!(before >= 1);
        m.write_obj(1u16, h.drv.q.avail_addr())
            .expect("avail flags");
        assert_eq!(h.write(0, &pattern(2, 512)), OK);
        assert_eq!(
            h.irq.used.load(Ordering::SeqCst),
            before,
            "NO_INTERRUPT was ignored"
        );
        m.write_obj(0u16, h.drv.q.avail_addr())
            .expect("avail flags");
        assert_eq!(h.write(0, &pattern(3, 512)), OK);
        assert_eq!(h.irq.used.load(Ordering::SeqCst), before + 1);
        drop(h);

        // With EVENT_IDX: the driver asks to be interrupted only when used idx passes 10.
        let m = mem();
        let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
        let used_event = h.drv.q.avail_addr().0 + 4 + 2 * u64::from(config::QUEUE_SIZE);
        m.write_obj(9u16, GuestAddress(used_event))
            .expect("used_event");
        for i in 0..9u8 {
            assert_eq!(h.write(0, &pattern(i, 512)), OK);
        }
        assert_eq!(
            h.irq.used.load(Ordering::SeqCst),
            0,
            "interrupted before used_event"
        );
        assert_eq!(h.write(0, &pattern(9, 512)), OK);
        assert_eq!(h.irq.used.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn reset_drains_in_flight_requests() {
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
        let mut sts = Vec::new();
        for i in 0..80u64 {
            let (hdr, st) = h.slots();
            write_header(&m, hdr, VIRTIO_BLK_T_OUT, i * 8);
            m.write_slice(&pattern(i as u8, 4096), GuestAddress(DATA + i * 4096))
                .expect("data");
            m.write_obj(0xffu8, GuestAddress(st)).expect("status");
            h.add(&[
                desc(hdr, 16, 0),
                desc(DATA + i * 4096, 4096, 0),
                desc(st, 1, F_WRITE),
            ]);
            sts.push(st);
        }
        h.kick();
        // Wait until the device has started, then reset while requests may be in flight.
        while h.drv.used_idx() == 0 {
            std::thread::yield_now();
        }
        assert!(h.dev.reset());
        assert!(!h.dev.reset(), "already stopped");
        // Every request the device completed is in the used ring with its status, and its data
        // is on disk; nothing is left half done.
        let used = h.drv.used_idx();
        assert!((1..=80).contains(&used));
        let mut completed = [false; 80];
        for n in 0..used {
            let (head, _) = h.drv.used(n);
            let i = u64::from(head) / 3;
            completed[i as usize] = true;
            assert_eq!(status_at(&m, sts[i as usize]), OK);
            let mut back = vec![0u8; 4096];
            disk.volume.read_at(&mut back, i * 4096).expect("read");
            assert_eq!(back, pattern(i as u8, 4096));
        }
        // A request without a used entry was never started: its status byte is untouched.
        for (i, done) in completed.iter().enumerate() {
            if !done {
                assert_eq!(
                    status_at(&m, sts[i]),
                    0xff,
                    "request {i} finished without a used entry"
                );
            }
        }
        // The device can be activated again after a reset.
        drop(h);
        let m2 = mem();
        let mut h2 = Harness::start(&m2, disk.volume.clone(), kind, None);
        assert_eq!(h2.read(0, 4096), (OK, pattern(0, 4096)));
    }
}

#[test]
fn activating_twice_fails() {
    let disk = test_disk(SIZE);
    let m = mem();
    let mut h = Harness::start(&m, disk.volume.clone(), BackendKind::Blocking, None);
    let q: virtio_queue::Queue = h.drv.q.create_queue().expect("queue");
    let evt = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let err = h.dev.activate(ActivateContext {
        mem: m.clone(),
        interrupt: h.irq.clone(),
        queues: vec![(q, evt)],
    });
    assert!(matches!(err, Err(Error::Activate(_))));
    assert_eq!(
        h.write(0, &pattern(1, 512)),
        OK,
        "the first activation still works"
    );
}

/// A gate the test opens and closes.
struct TestGate {
    closed: std::sync::atomic::AtomicBool,
    admitted: std::sync::atomic::AtomicU32,
    released: std::sync::atomic::AtomicU32,
    refused: std::sync::atomic::AtomicU32,
    waker: vmm_sys_util::eventfd::EventFd,
}

impl crate::RequestGate for TestGate {
    fn try_admit(&self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        self.admitted.fetch_add(1, Ordering::SeqCst);
        true
    }
    fn release(&self) {
        self.released.fetch_add(1, Ordering::SeqCst);
    }
    fn waker(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.waker.as_raw_fd()
    }
    fn clear_waker(&self) {
        let _ = self.waker.read();
    }
}

impl TestGate {
    fn new(closed: bool) -> Arc<TestGate> {
        Arc::new(TestGate {
            closed: AtomicBool::new(closed),
            admitted: Default::default(),
            released: Default::default(),
            refused: Default::default(),
            waker: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        })
    }

    /// Waits until the worker has asked the gate and been refused (`what` it means if not).
    fn wait_refused(&self, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.refused.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Acks every feature and activates `dev` with the one queue of a new driver over `m`;
/// returns the driver, the queue's kick eventfd and the interrupt.
fn activate_one_queue<'a>(
    dev: &mut VirtioBlock,
    m: &'a vm_memory::GuestMemoryMmap,
) -> (Driver<'a>, EventFd, Arc<TestInterrupt>) {
    use crate::virtio::VirtioDevice;
    dev.set_acked_features(dev.avail_features());
    let drv = Driver::new(m);
    let queue: virtio_queue::Queue = drv.q.create_queue().expect("queue");
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let irq = Arc::new(TestInterrupt::default());
    dev.activate(ActivateContext {
        mem: m.clone(),
        interrupt: irq.clone(),
        queues: vec![(queue, kick.try_clone().expect("clone"))],
    })
    .expect("activate");
    (drv, kick, irq)
}

/// Makes one 4 KiB write of `pattern(seed)` to sector 0 available (header at HDR, data at
/// DATA, status at STATUS) and kicks the queue.
fn kick_one_write(m: &vm_memory::GuestMemoryMmap, drv: &mut Driver, kick: &EventFd, seed: u8) {
    write_header(m, HDR, VIRTIO_BLK_T_OUT, 0);
    m.write_slice(&pattern(seed, 4096), GuestAddress(DATA))
        .expect("data");
    drv.add(&[
        desc(HDR, 16, 0),
        desc(DATA, 4096, 0),
        desc(STATUS, 1, F_WRITE),
    ]);
    kick.write(1).expect("kick");
}

#[test]
fn a_closed_gate_holds_new_requests_until_it_reopens() {
    use crate::virtio::VirtioDevice;
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        let gate = TestGate::new(false);
        let mut dev = VirtioBlock::new(disk.volume.clone(), "g".into())
            .expect("device")
            .with_backend(kind)
            .with_gate(gate.clone());
        let (mut drv, kick, _irq) = activate_one_queue(&mut dev, &m);

        gate.closed.store(true, Ordering::SeqCst);
        kick_one_write(&m, &mut drv, &kick, 7);
        gate.wait_refused("the worker never asked the gate");
        assert_eq!(
            drv.used_idx(),
            0,
            "a request completed through a closed gate"
        );
        let mut back = vec![0u8; 4096];
        disk.volume.read_at(&mut back, 0).expect("read");
        assert_eq!(back, vec![0u8; 4096]);

        gate.closed.store(false, Ordering::SeqCst);
        gate.waker.write(1).expect("wake");
        drv.wait_used(1);
        assert_eq!(status_at(&m, STATUS), OK);
        disk.volume.read_at(&mut back, 0).expect("read");
        assert_eq!(back, pattern(7, 4096));
        assert!(dev.reset());
        assert_eq!(gate.admitted.load(Ordering::SeqCst), 1);
        assert_eq!(gate.released.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn many_batches_wrap_the_rings() {
    for kind in kinds() {
        let disk = test_disk(SIZE);
        let m = mem();
        let mut h = Harness::start(&m, disk.volume.clone(), kind, None);
        // 12 batches of 60 chains: the avail and used rings (256 entries) wrap twice.
        for round in 0..12u64 {
            let ty = if round % 2 == 0 {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            let mut sts = Vec::new();
            for i in 0..60u64 {
                let (hdr, st) = h.slots();
                let data = DATA + i * 4096;
                let seed = (round / 2 * 60 + i) as u8;
                if ty == VIRTIO_BLK_T_OUT {
                    m.write_slice(&pattern(seed, 4096), GuestAddress(data))
                        .expect("data");
                } else {
                    m.write_slice(&[0u8; 4096], GuestAddress(data))
                        .expect("clear");
                }
                write_header(&m, hdr, ty, i * 8);
                let f = if ty == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
                h.add(&[desc(hdr, 16, 0), desc(data, 4096, f), desc(st, 1, F_WRITE)]);
                sts.push((st, data, seed));
            }
            h.run();
            for (st, data, seed) in sts {
                assert_eq!(status_at(&m, st), OK);
                if ty == VIRTIO_BLK_T_IN {
                    assert_eq!(
                        read_bytes(&m, data, 4096),
                        pattern(seed, 4096),
                        "round {round}"
                    );
                }
            }
        }
        assert_eq!(h.drv.used_idx(), 720);
        assert!(!h.dev.needs_reset());
    }
}

#[test]
fn one_interrupt_per_batch() {
    // With the blocking backend every request of a batch completes while the batch is being
    // popped, so a batch of 64 chains made available before one kick yields one interrupt.
    let disk = test_disk(SIZE);
    let m = mem();
    let mut h = Harness::start(&m, disk.volume.clone(), BackendKind::Blocking, None);
    // Warm up so the worker is idle in its event loop (it pops chains only after a kick).
    assert_eq!(h.write(0, &pattern(1, 512)), OK);
    while h.irq.used.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    for i in 0..64u64 {
        let (hdr, st) = h.slots();
        write_header(&m, hdr, VIRTIO_BLK_T_OUT, i * 8);
        h.add(&[
            desc(hdr, 16, 0),
            desc(DATA + i * 4096, 4096, 0),
            desc(st, 1, F_WRITE),
        ]);
    }
    h.run();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while h.irq.used.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no interrupt for the batch"
        );
        std::thread::yield_now();
    }
    assert_eq!(
        h.irq.used.load(Ordering::SeqCst),
        2,
        "one interrupt for the whole batch"
    );
}

#[test]
fn checkpoint_state_rewinds_untaken_chains_and_a_restored_device_serves_waiting_chains() {
    use crate::virtio::VirtioDevice;
    let disk = test_disk(SIZE);
    let m = mem();
    let gate = TestGate::new(true);
    let mut dev = VirtioBlock::new(disk.volume.clone(), "s".into())
        .expect("device")
        .with_gate(gate.clone());
    let inactive = dev.save_state().expect("state of an inactive device");
    assert!(inactive.queues.is_empty());
    let (mut drv, kick, irq) = activate_one_queue(&mut dev, &m);

    // A write the worker takes from the ring but the closed gate keeps from starting.
    kick_one_write(&m, &mut drv, &kick, 3);
    gate.wait_refused("the gate was never asked");
    let st = dev.save_state().expect("state");
    assert_eq!(st.acked_features, dev.avail_features());
    assert_eq!(st.queues.len(), 1);
    assert_eq!(
        (st.queues[0].next_avail, st.queues[0].next_used),
        (0, 0),
        "the taken-but-not-started chain counts as still available"
    );
    assert_eq!(st.queues[0].size, config::QUEUE_SIZE);
    assert!(st.queues[0].ready);

    // The original goes on once the gate opens.
    gate.closed.store(false, Ordering::SeqCst);
    gate.waker.write(1).expect("wake");
    drv.wait_used(1);
    let st1 = dev.save_state().expect("state");
    assert_eq!((st1.queues[0].next_avail, st1.queues[0].next_used), (1, 1));
    assert!(dev.reset());

    // A new device restored from the first state takes that chain again, with no kick.
    disk.volume
        .write_at(&vec![0u8; 4096], 0, false)
        .expect("undo");
    let mut dev2 = VirtioBlock::new(disk.volume.clone(), "s".into()).expect("device");
    let q = virtio_queue::Queue::try_from(st.queues[0]).expect("queue from state");
    let kick2 = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    drv.q.used().idx().store(0);
    dev2.restore_state(
        &st,
        Some(ActivateContext {
            mem: m.clone(),
            interrupt: irq.clone(),
            queues: vec![(q, kick2)],
        }),
    )
    .expect("restore");
    drv.wait_used(1);
    let mut back = vec![0u8; 4096];
    disk.volume.read_at(&mut back, 0).expect("read");
    assert_eq!(back, pattern(3, 4096));

    // A state for another disk is refused.
    let mut other = st.clone();
    other.config[0] ^= 1;
    let mut dev3 = VirtioBlock::new(disk.volume.clone(), "s".into()).expect("device");
    let err = dev3.restore_state(&other, None).unwrap_err().to_string();
    assert!(err.contains("configuration"), "{err}");
    assert!(dev2.reset());
}
