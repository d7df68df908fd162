//! The conformance suite every front end (virtio-blk, NBD) and backend (io_uring, blocking)
//! must pass, written once against [`Frontend`]: a front end takes a batch of commands at
//! once (all in flight together, the way a guest fills its ring or an NBD client pipelines)
//! and answers each. The suite checks data, ordering across batches, FUA, FLUSH after
//! writes, discards and write-zeroes, errors, cancellation (a client that goes away with
//! requests in flight) and pause/drain through the quiesce gate, and looks into the journal
//! behind the front end to see what really happened.
//!
//! `block`'s own tests run it for virtio-blk on both backends (see [`VirtioFront`]); the
//! `engine` crate runs it for NBD over a real socket, and for virtio-blk under its real gate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::Volume;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::gate::RequestGate;
use crate::request::*;
use crate::testutil::{
    desc, read_bytes, status_at, write_header, write_segments, Harness, DATA, F_WRITE, MEM_SIZE,
};
use crate::BackendKind;

/// One command, in bytes.
#[derive(Clone, Debug)]
pub enum Cmd {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

/// Read data (empty for other commands), or the front end's error in words.
pub type Answer = Result<Vec<u8>, String>;

/// A front end as a client sees it.
pub trait Frontend {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// The journal volume behind it.
    fn volume(&self) -> Arc<Volume>;
    /// True if single writes can ask for FUA (NBD); virtio-blk cannot.
    fn has_fua(&self) -> bool;
    /// Puts every command in flight at once, without waiting.
    fn send(&mut self, cmds: Vec<Cmd>);
    /// Waits for the answers of everything sent, in the order sent.
    fn collect(&mut self) -> Vec<Answer>;
    /// Sends `cmds` and goes away without reading any answer (an NBD client closes its
    /// socket, a driver resets the device); returns once the front end let go of every
    /// request, then connects afresh on the same disk.
    fn abandon(&mut self, cmds: Vec<Cmd>);
    /// Buffer bytes the front end's shared budget holds now, if it has one.
    fn budget_used(&self) -> Option<usize>;

    fn run(&mut self, cmds: Vec<Cmd>) -> Vec<Answer> {
        self.send(cmds);
        self.collect()
    }
}

/// The controller side of the quiesce gate.
pub trait Quiesce {
    /// Closes the gate and waits until every admitted request completed; false on timeout.
    fn pause(&self) -> bool;
    /// Reopens the gate.
    fn resume(&self);
    /// Admitted requests not yet released.
    fn in_flight(&self) -> u64;
}

/// `len` bytes of a pattern that differs for every `seed` and offset.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i >> 9) as u8)
        })
        .collect()
}

const B: u64 = 4096;

fn ok(a: &Answer, what: &str) -> Vec<u8> {
    match a {
        Ok(d) => d.clone(),
        Err(e) => panic!("{what}: {e}"),
    }
}

fn direct(f: &dyn Frontend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.volume().read_at(&mut buf, offset).expect("direct read");
    buf
}

fn write(offset: u64, data: Vec<u8>) -> Cmd {
    Cmd::Write {
        offset,
        data,
        fua: false,
    }
}

fn read(offset: u64, len: u32) -> Cmd {
    Cmd::Read { offset, len }
}

/// Runs every check; `gate` is the controller of the front end's gate, if it has one.
pub fn suite(f: &mut dyn Frontend, gate: Option<&dyn Quiesce>) {
    data_and_errors(f);
    ordering(f);
    durability(f);
    discards(f);
    cancellation(f, gate);
    if let Some(q) = gate {
        pause_and_drain(f, q);
    }
    if let Some(used) = f.budget_used() {
        assert_eq!(used, 0, "buffer budget leaked");
    }
}

fn data_and_errors(f: &mut dyn Frontend) {
    let size = f.size();
    let a = pattern(1, 8192);
    ok(&f.run(vec![write(B, a.clone())])[0], "write");
    let r = f.run(vec![read(B, 8192), read(100 * B, 4096)]);
    assert_eq!(ok(&r[0], "read"), a, "read back what was written");
    assert_eq!(
        ok(&r[1], "read"),
        vec![0; 4096],
        "never written reads as zeros"
    );
    // 512 bytes inside a 4 KiB block.
    let b = pattern(2, 512);
    ok(&f.run(vec![write(B + 512, b.clone())])[0], "small write");
    let mut want = a;
    want[512..1024].copy_from_slice(&b);
    assert_eq!(ok(&f.run(vec![read(B, 8192)])[0], "read"), want);
    assert_eq!(direct(f, B, 8192), want, "the journal holds the same bytes");
    // The last block works, past the end does not, and failures change nothing.
    ok(
        &f.run(vec![write(size - B, pattern(3, 4096))])[0],
        "last block",
    );
    let r = f.run(vec![
        write(size - B, pattern(4, 8192)),
        read(size, 4096),
        read(size - B, 8192),
        Cmd::WriteZeroes {
            offset: size - B,
            len: 8192,
            fua: false,
        },
        Cmd::Discard {
            offset: size,
            len: 4096,
            fua: false,
        },
        read(B, 8192),
    ]);
    for (i, a) in r[..5].iter().enumerate() {
        assert!(a.is_err(), "request {i} past the end succeeded");
    }
    assert_eq!(ok(&r[5], "a good request beside bad ones"), want);
    assert_eq!(
        ok(&f.run(vec![read(size - B, 4096)])[0], "read"),
        pattern(3, 4096),
        "failed requests changed nothing"
    );
}

/// Requests in flight together are not ordered against each other; a request sent after
/// another was answered sees its effect. 64 writes in one batch, then 64 reads; then the
/// same blocks rewritten, interleaved with reads of other blocks.
fn ordering(f: &mut dyn Frontend) {
    let base = 256 * B;
    let writes = (0..64)
        .map(|i| write(base + i * B, pattern(i as u8, 4096)))
        .collect();
    for (i, a) in f.run(writes).iter().enumerate() {
        ok(a, &format!("batched write {i}"));
    }
    let reads = (0..64).map(|i| read(base + i * B, 4096)).collect();
    for (i, a) in f.run(reads).iter().enumerate() {
        assert_eq!(ok(a, "batched read"), pattern(i as u8, 4096), "block {i}");
    }
    let mut mixed = Vec::new();
    for i in 0..32u64 {
        mixed.push(write(base + 2 * i * B, pattern(100 + i as u8, 4096)));
        mixed.push(read(base + (2 * i + 1) * B, 4096));
    }
    let r = f.run(mixed);
    for i in 0..32usize {
        ok(&r[2 * i], "rewrite");
        assert_eq!(ok(&r[2 * i + 1], "read"), pattern(2 * i as u8 + 1, 4096));
    }
    let reads = (0..64).map(|i| read(base + i * B, 4096)).collect();
    for (i, a) in f.run(reads).iter().enumerate() {
        let want = if i % 2 == 0 {
            pattern(100 + (i / 2) as u8, 4096)
        } else {
            pattern(i as u8, 4096)
        };
        assert_eq!(ok(a, "read"), want, "the later write wins at block {i}");
    }
}

/// FUA writes and a FLUSH after writes complete, and what they covered is in the journal.
/// (Durability itself would need a power cut; the executor's unit tests check that FUA
/// reaches the journal and that a FUA discard is flushed before it completes.)
fn durability(f: &mut dyn Frontend) {
    let base = 512 * B;
    let fua = f.has_fua();
    let mut cmds: Vec<Cmd> = (0..16)
        .map(|i| Cmd::Write {
            offset: base + i * B,
            data: pattern(50 + i as u8, 4096),
            fua: fua && i % 2 == 0,
        })
        .collect();
    // A FLUSH in flight together with writes.
    cmds.push(Cmd::Flush);
    for (i, a) in f.run(cmds).iter().enumerate() {
        ok(a, &format!("write or flush {i}"));
    }
    // A FLUSH alone, after the writes were answered, covers them.
    ok(&f.run(vec![Cmd::Flush])[0], "flush");
    for i in 0..16u64 {
        assert_eq!(direct(f, base + i * B, 4096), pattern(50 + i as u8, 4096));
    }
    if fua {
        let r = f.run(vec![
            Cmd::WriteZeroes {
                offset: base,
                len: 4096,
                fua: true,
            },
            Cmd::Discard {
                offset: base + B,
                len: 4096,
                fua: true,
            },
        ]);
        ok(&r[0], "FUA write-zeroes");
        ok(&r[1], "FUA discard");
        assert_eq!(direct(f, base, 8192), vec![0; 8192]);
    }
}

fn discards(f: &mut dyn Frontend) {
    let base = 1024 * B;
    let c = pattern(5, 16 * 4096);
    ok(&f.run(vec![write(base, c.clone())])[0], "write");
    let ranges = [
        (4096usize, 4096usize, true),
        (4 * 4096, 8192, true),
        (8 * 4096, 4096 + 512, false),
        (12 * 4096 + 1024, 1536, false),
    ];
    let cmds = ranges
        .iter()
        .map(|&(s, n, discard)| {
            let (offset, len) = (base + s as u64, n as u32);
            if discard {
                Cmd::Discard {
                    offset,
                    len,
                    fua: false,
                }
            } else {
                Cmd::WriteZeroes {
                    offset,
                    len,
                    fua: false,
                }
            }
        })
        .collect();
    for a in &f.run(cmds) {
        ok(a, "discard or write-zeroes");
    }
    let mut want = c;
    for (s, n, _) in ranges {
        want[s..s + n].fill(0);
    }
    let got = ok(&f.run(vec![read(base, 16 * 4096)])[0], "read");
    assert!(
        got == want,
        "discarded ranges read as zeros, neighbours are kept"
    );
    assert!(direct(f, base, 16 * 4096) == want);
}

/// A client that goes away with requests in flight: each write happened whole or not at all,
/// nothing stays admitted or held, and the disk serves the next client.
fn cancellation(f: &mut dyn Frontend, gate: Option<&dyn Quiesce>) {
    let base = 2048 * B;
    let cmds = (0..48)
        .map(|i| {
            if i % 3 == 2 {
                read(base, 65536)
            } else {
                write(base + i * B, pattern(200 + i as u8, 4096))
            }
        })
        .collect();
    f.abandon(cmds);
    assert_eq!(
        f.volume().writes_in_flight(),
        0,
        "a write outlived its client"
    );
    if let Some(q) = gate {
        assert_eq!(q.in_flight(), 0, "an admission outlived its client");
    }
    if let Some(used) = f.budget_used() {
        assert_eq!(used, 0, "buffers outlived their client");
    }
    for i in 0..48u64 {
        if i % 3 == 2 {
            continue;
        }
        let got = direct(f, base + i * B, 4096);
        assert!(
            got == pattern(200 + i as u8, 4096) || got == vec![0; 4096],
            "block {i} is neither old nor new"
        );
    }
    let r = f.run(vec![write(base, pattern(9, 4096)), Cmd::Flush]);
    ok(&r[0], "a write after the abandoned client");
    ok(&r[1], "a flush after the abandoned client");
}

/// A pause waits for the requests in flight, admits nothing new until resumed, then runs
/// what waited.
fn pause_and_drain(f: &mut dyn Frontend, q: &dyn Quiesce) {
    let base = 3072 * B;
    f.send(
        (0..32)
            .map(|i| write(base + i * B, pattern(70 + i as u8, 4096)))
            .collect(),
    );
    assert!(q.pause(), "the gate did not drain");
    assert_eq!(q.in_flight(), 0);
    assert_eq!(
        f.volume().writes_in_flight(),
        0,
        "paused with writes in flight"
    );
    let held = base + 40 * B;
    f.send(vec![write(held, pattern(99, 4096)), Cmd::Flush]);
    // Give a broken gate the chance to let the write through (a correct one never does).
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert_eq!(
            direct(f, held, 4096),
            vec![0; 4096],
            "a write ran while paused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    q.resume();
    let r = f.collect();
    assert_eq!(r.len(), 34);
    for (i, a) in r.iter().enumerate() {
        ok(a, &format!("request {i} around the pause"));
    }
    assert_eq!(direct(f, held, 4096), pattern(99, 4096));
    for i in 0..32u64 {
        assert_eq!(direct(f, base + i * B, 4096), pattern(70 + i as u8, 4096));
    }
}

/// virtio-blk as the suite's front end: the whole device (worker thread, rings, parser,
/// executor) over one queue in guest memory.
pub struct VirtioFront<'a> {
    mem: &'a GuestMemoryMmap,
    volume: Arc<Volume>,
    kind: BackendKind,
    gate: Option<Arc<dyn RequestGate>>,
    pub h: Harness<'a>,
    /// Sent and not collected: status address, and where read data lands.
    sent: Vec<(u64, Option<(u64, u32)>)>,
    next_data: u64,
}

impl<'a> VirtioFront<'a> {
    pub fn new(
        mem: &'a GuestMemoryMmap,
        volume: Arc<Volume>,
        kind: BackendKind,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Self {
        let h = Harness::start_gated(mem, volume.clone(), kind, None, gate.clone());
        VirtioFront {
            mem,
            volume,
            kind,
            gate,
            h,
            sent: Vec::new(),
            next_data: DATA,
        }
    }

    fn data_area(&mut self, len: u64) -> u64 {
        let at = self.next_data;
        self.next_data += len.div_ceil(4096) * 4096;
        assert!(
            self.next_data < MEM_SIZE,
            "batch too large for the test's guest memory"
        );
        at
    }

    fn add(&mut self, cmd: Cmd) {
        let (hdr, st) = self.h.slots();
        self.mem
            .write_obj(0xffu8, GuestAddress(st))
            .expect("status");
        let sector = |o: u64| o / 512;
        let mut read = None;
        let descs = match cmd {
            Cmd::Read { offset, len } => {
                let at = self.data_area(u64::from(len));
                write_header(self.mem, hdr, VIRTIO_BLK_T_IN, sector(offset));
                read = Some((at, len));
                vec![desc(at, len, F_WRITE)]
            }
            Cmd::Write { offset, data, .. } => {
                let at = self.data_area(data.len() as u64);
                self.mem.write_slice(&data, GuestAddress(at)).expect("data");
                write_header(self.mem, hdr, VIRTIO_BLK_T_OUT, sector(offset));
                vec![desc(at, data.len() as u32, 0)]
            }
            Cmd::Flush => {
                write_header(self.mem, hdr, VIRTIO_BLK_T_FLUSH, 0);
                vec![]
            }
            Cmd::Discard { offset, len, .. } | Cmd::WriteZeroes { offset, len, .. } => {
                let ty = match cmd {
                    Cmd::Discard { .. } => VIRTIO_BLK_T_DISCARD,
                    _ => VIRTIO_BLK_T_WRITE_ZEROES,
                };
                let at = self.data_area(16);
                let n = write_segments(self.mem, at, &[(sector(offset), len / 512, 0)]);
                write_header(self.mem, hdr, ty, 0);
                vec![desc(at, n, 0)]
            }
        };
        let mut all = vec![desc(hdr, 16, 0)];
        all.extend(descs);
        all.push(desc(st, 1, F_WRITE));
        self.h.add(&all);
        self.sent.push((st, read));
    }
}

impl Frontend for VirtioFront<'_> {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn volume(&self) -> Arc<Volume> {
        self.volume.clone()
    }

    fn has_fua(&self) -> bool {
        false
    }

    fn send(&mut self, cmds: Vec<Cmd>) {
        assert!(
            self.sent.len() + cmds.len() <= 80,
            "three descriptors each must fit the queue"
        );
        for c in cmds {
            self.add(c);
        }
        self.h.kick();
    }

    fn collect(&mut self) -> Vec<Answer> {
        self.h.drv.wait_used(self.h.drv.added);
        self.next_data = DATA;
        std::mem::take(&mut self.sent)
            .into_iter()
            .map(|(st, read)| match status_at(self.mem, st) {
                0 => {
                    Ok(read
                        .map_or_else(Vec::new, |(at, len)| read_bytes(self.mem, at, len as usize)))
                }
                s => Err(format!("virtio status {s}")),
            })
            .collect()
    }

    fn abandon(&mut self, cmds: Vec<Cmd>) {
        for c in cmds {
            self.add(c);
        }
        self.h.kick();
        // The driver resets the device with requests in flight: reset waits for them.
        assert!(crate::VirtioDevice::reset(&mut self.h.dev));
        self.sent.clear();
        self.next_data = DATA;
        self.h = Harness::start_gated(
            self.mem,
            self.volume.clone(),
            self.kind,
            None,
            self.gate.clone(),
        );
    }

    fn budget_used(&self) -> Option<usize> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{mem, test_disk, TestGate};

    const SIZE: u64 = 16 << 20;

    struct TestQuiesce(Arc<TestGate>);

    impl Quiesce for TestQuiesce {
        fn pause(&self) -> bool {
            self.0.close();
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.0.in_flight() > 0 {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        }
        fn resume(&self) {
            self.0.open();
        }
        fn in_flight(&self) -> u64 {
            u64::from(self.0.in_flight())
        }
    }

    fn run(kind: BackendKind) {
        let disk = test_disk(SIZE);
        let m = mem();
        let gate = TestGate::new();
        let as_gate: Arc<dyn RequestGate> = gate.clone();
        let mut f = VirtioFront::new(&m, disk.volume.clone(), kind, Some(as_gate));
        suite(&mut f, Some(&TestQuiesce(gate)));
        assert!(!crate::VirtioDevice::needs_reset(&f.h.dev));
    }

    #[test]
    fn virtio_on_io_uring_conforms() {
        run(BackendKind::Uring);
    }

    #[test]
    fn virtio_on_blocking_calls_conforms() {
        run(BackendKind::Blocking);
    }
}
