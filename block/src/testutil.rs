//! Test helpers: guest memory, a driver-side queue, a real journal disk, an interrupt probe.
#![allow(dead_code)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use journal::{Completion, Disk, OpenOptions, Volume};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::config;
use crate::request::Limits;
use crate::virtio::VirtioInterrupt;

pub const MEM_SIZE: u64 = 64 << 20;
/// Where request headers go (one 64-byte slot per request).
pub const HDR: u64 = 0x10_0000;
/// Where status bytes go (one 16-byte slot per request).
pub const STATUS: u64 = 0x18_0000;
/// Where data buffers go.
pub const DATA: u64 = 0x20_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// A raw descriptor (the NEXT flag and `next` are filled in by the helpers that chain them).
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

pub fn write_header(mem: &GuestMemoryMmap, addr: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).expect("header");
}

/// Writes discard / write-zeroes segments `(sector, sectors, flags)` at `addr`.
pub fn write_segments(mem: &GuestMemoryMmap, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
    let mut off = addr;
    for &(sector, n, flags) in segs {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(off)).expect("segment");
        off += 16;
    }
    (segs.len() * 16) as u32
}

pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read guest memory");
    v
}

pub fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(addr)).expect("status")
}

/// Deterministic test data.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Limits with every feature negotiated.
pub fn all_limits(capacity: u64, read_only: bool) -> Limits {
    config::limits(capacity, read_only, config::avail_features(read_only))
}

/// A journal disk in a temporary directory.
pub struct TestDisk {
    pub disk: Disk,
    pub volume: Arc<Volume>,
    _dir: tempfile::TempDir,
}

pub fn test_disk(size: u64) -> TestDisk {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Disk::create(&path, size, None).expect("create disk");
    let disk = Disk::open(&path, OpenOptions::default()).expect("open disk");
    let volume = disk.now();
    TestDisk {
        disk,
        volume,
        _dir: dir,
    }
}

/// Counts interrupts.
#[derive(Default)]
pub struct TestInterrupt {
    pub used: AtomicU32,
    pub config: AtomicU32,
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The driver side of one queue.
pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub q: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    pub added: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Driver {
            mem,
            q: MockSplitQueue::new(mem, config::QUEUE_SIZE),
            next_desc: 0,
            added: 0,
        }
    }

    /// Adds a chain of `descs` (linked in order) to the available ring; returns its head.
    pub fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > config::QUEUE_SIZE {
            self.next_desc = 0;
        }
        let start = self.next_desc;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !F_NEXT
                } else {
                    d.flags() | F_NEXT
                };
                raw(
                    d.addr().0,
                    d.len(),
                    flags,
                    if last { 0 } else { start + i as u16 + 1 },
                )
            })
            .collect();
        // (MockSplitQueue::add_desc_chains does not wrap the avail ring, so do it here.)
        let table: Vec<(u16, RawDescriptor)> = linked
            .into_iter()
            .enumerate()
            .map(|(i, d)| (start + i as u16, d))
            .collect();
        self.add_raw(&table, start);
        self.next_desc += n;
        start
    }

    /// Adds descriptors exactly as given (no linking) and one avail entry for `head`.
    pub fn add_raw(&mut self, table: &[(u16, RawDescriptor)], head: u16) {
        for &(i, d) in table {
            self.q.desc_table().store(i, d).expect("store descriptor");
        }
        let idx = self.q.avail().idx().load();
        self.q
            .avail()
            .ring()
            .ref_at(usize::from(idx % config::QUEUE_SIZE))
            .expect("avail slot")
            .store(head);
        self.q.avail().idx().store(idx.wrapping_add(1));
        self.added = self.added.wrapping_add(1);
    }

    pub fn used_idx(&self) -> u16 {
        self.q.used().idx().load()
    }

    /// Used element `i` as (head, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .q
            .used()
            .ring()
            .ref_at(usize::from(i % config::QUEUE_SIZE))
            .expect("used slot")
            .load();
        (e.id(), e.len())
    }

    /// Waits (bounded, to catch hangs) until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.used_idx() != n {
            assert!(
                Instant::now() < deadline,
                "device hung: used idx {} != {}",
                self.used_idx(),
                n
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A device activated over one mock queue.
pub struct Harness<'a> {
    pub dev: crate::VirtioBlock,
    pub drv: Driver<'a>,
    pub irq: Arc<TestInterrupt>,
    pub kick: vmm_sys_util::eventfd::EventFd,
    /// Next free 4 KiB-aligned scratch area in guest memory for a request's data.
    slot: u64,
}

impl<'a> Harness<'a> {
    /// Activates a device over `volume` with `acked` features (all offered if `None`).
    pub fn start(
        mem: &'a GuestMemoryMmap,
        volume: Arc<Volume>,
        kind: crate::BackendKind,
        acked: Option<u64>,
    ) -> Self {
        Self::start_gated(mem, volume, kind, acked, None)
    }

    /// Like [`Harness::start`], with the device's requests admitted through `gate`.
    pub fn start_gated(
        mem: &'a GuestMemoryMmap,
        volume: Arc<Volume>,
        kind: crate::BackendKind,
        acked: Option<u64>,
        gate: Option<Arc<dyn crate::RequestGate>>,
    ) -> Self {
        use crate::virtio::{ActivateContext, VirtioDevice};
        let mut dev = crate::VirtioBlock::new(volume, "conformance".into())
            .expect("device")
            .with_backend(kind);
        if let Some(g) = gate {
            dev = dev.with_gate(g);
        }
        let features = acked.unwrap_or_else(|| dev.avail_features());
        dev.set_acked_features(features);
        let drv = Driver::new(mem);
        let queue: virtio_queue::Queue = drv.q.create_queue().expect("queue");
        let kick = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .expect("eventfd");
        let irq = Arc::new(TestInterrupt::default());
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![(queue, kick.try_clone().expect("clone eventfd"))],
        })
        .expect("activate");
        Harness {
            dev,
            drv,
            irq,
            kick,
            slot: 0,
        }
    }

    fn mem(&self) -> &'a GuestMemoryMmap {
        self.drv.mem
    }

    /// A fresh header address and status address (16 requests rotate through the slots).
    pub fn slots(&mut self) -> (u64, u64) {
        let n = self.slot % 256;
        self.slot += 1;
        (HDR + 64 * n, STATUS + 16 * n)
    }

    /// Adds a chain (no kick).
    pub fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
        self.drv.add(descs)
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// Kicks and waits until every added chain is used.
    pub fn run(&mut self) {
        self.kick();
        self.drv.wait_used(self.drv.added);
    }

    /// One request: header at a fresh slot, `data` descriptors, status; returns the status.
    pub fn request(&mut self, ty: u32, sector: u64, data: &[RawDescriptor]) -> u8 {
        let (hdr, st) = self.slots();
        write_header(self.mem(), hdr, ty, sector);
        self.mem()
            .write_obj(0xffu8, GuestAddress(st))
            .expect("status");
        let mut descs = vec![desc(hdr, 16, 0)];
        descs.extend_from_slice(data);
        descs.push(desc(st, 1, F_WRITE));
        let head = self.add(&descs);
        self.run();
        let (id, _) = self.drv.used(self.drv.added.wrapping_sub(1));
        assert_eq!(id, u32::from(head), "used entry for another chain");
        status_at(self.mem(), st)
    }

    /// Writes `data` at `sector`, splitting the buffer in two descriptors when it can.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem()
            .write_slice(data, GuestAddress(DATA))
            .expect("data");
        let n = data.len() as u32;
        let descs = if n >= 1024 {
            let half = (n / 2) & !511;
            vec![
                desc(DATA, half, 0),
                desc(DATA + u64::from(half), n - half, 0),
            ]
        } else {
            vec![desc(DATA, n, 0)]
        };
        self.request(crate::request::VIRTIO_BLK_T_OUT, sector, &descs)
    }

    /// Reads `len` bytes at `sector` into a buffer split in two descriptors.
    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let junk = vec![0xa5u8; len as usize];
        self.mem()
            .write_slice(&junk, GuestAddress(DATA))
            .expect("poison");
        let descs = if len >= 1024 {
            let half = (len / 2) & !511;
            vec![
                desc(DATA, half, F_WRITE),
                desc(DATA + u64::from(half), len - half, F_WRITE),
            ]
        } else {
            vec![desc(DATA, len, F_WRITE)]
        };
        let st = self.request(crate::request::VIRTIO_BLK_T_IN, sector, &descs);
        (st, read_bytes(self.mem(), DATA, len as usize))
    }

    /// A discard or write-zeroes request with `segs`.
    pub fn dwz(&mut self, ty: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let n = write_segments(self.mem(), DATA, segs);
        self.request(ty, 0, &[desc(DATA, n, 0)])
    }
}

/// A backend whose requests the test completes by hand.
#[derive(Default)]
pub struct Held {
    pub submitted: Vec<(u64, journal::Request)>,
    pub ready: Vec<Completion>,
    /// Pretend the backend lost everything (in_flight reports 0).
    pub lost: bool,
}

pub struct HeldBackend {
    pub state: Arc<Mutex<Held>>,
    pub event: EventFd,
}

impl HeldBackend {
    /// A backend and the state the test completes its requests through.
    pub fn new() -> (HeldBackend, Arc<Mutex<Held>>) {
        let state = Arc::new(Mutex::new(Held::default()));
        let backend = HeldBackend {
            state: state.clone(),
            event: EventFd::new(0).expect("eventfd"),
        };
        (backend, state)
    }
}

/// Completes everything submitted so far with `ok` (reads get `fill` data).
pub fn complete_all(state: &Mutex<Held>, ok: bool, fill: u8) {
    let mut s = state.lock().expect("lock");
    let subs = std::mem::take(&mut s.submitted);
    for (token, req) in subs {
        let result = match (ok, req) {
            (false, _) => Err(journal::Error::Invalid("injected".into())),
            (true, journal::Request::Read { len, .. }) => {
                Ok(Some(journal::AlignedBuf::from_slice(&vec![
                    fill;
                    len as usize
                ])))
            }
            (true, _) => Ok(None),
        };
        s.ready.push(Completion { token, result });
    }
}

impl crate::backend::Backend for HeldBackend {
    fn submit(&mut self, token: u64, req: journal::Request) -> Result<(), journal::Rejected> {
        self.state
            .lock()
            .expect("lock")
            .submitted
            .push((token, req));
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> journal::Result<()> {
        out.append(&mut self.state.lock().expect("lock").ready);
        Ok(())
    }
    fn wait(&mut self, _min: usize, out: &mut Vec<Completion>) -> journal::Result<()> {
        self.poll(out)
    }
    fn in_flight(&self) -> usize {
        let s = self.state.lock().expect("lock");
        if s.lost {
            0
        } else {
            s.submitted.len() + s.ready.len()
        }
    }
    fn eventfd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.event.as_raw_fd()
    }
}

/// A quiesce gate for unit tests: counts admissions, refuses while closed, and fires its
/// waker when reopened (engine's `quiesce::Gate` is the real controller; block cannot use it).
pub struct TestGate {
    pub admitted: AtomicU32,
    pub closed: std::sync::atomic::AtomicBool,
    pub tries: AtomicU32,
    pub waker: EventFd,
}

impl TestGate {
    pub fn new() -> Arc<TestGate> {
        Arc::new(TestGate {
            admitted: AtomicU32::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            tries: AtomicU32::new(0),
            waker: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd"),
        })
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        let _ = self.waker.write(1);
    }

    pub fn in_flight(&self) -> u32 {
        self.admitted.load(Ordering::SeqCst)
    }
}

impl crate::gate::RequestGate for TestGate {
    fn try_admit(&self) -> bool {
        self.tries.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        self.admitted.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn release(&self) {
        let prev = self.admitted.fetch_sub(1, Ordering::SeqCst);
        assert!(prev > 0, "release without admit");
    }

    fn waker(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.waker.as_raw_fd()
    }

    fn clear_waker(&self) {
        let _ = self.waker.read();
    }
}
