//! Tests with real guest memory, real files, io_uring and userfaultfd.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::snapshot::Identity;

const MIB: u64 = 1 << 20;

fn ident(mem_size: u64) -> Identity {
    Identity {
        vm_uuid: *b"strata-test-vm-1",
        mem_size,
    }
}

/// Guest memory with a pattern in every third page (the rest stay zero).
fn patterned(mem_size: u64, seed: u8) -> GuestMemoryMmap {
    let mem = crate::memory::create(mem_size).unwrap();
    for i in (0..mem_size / PAGE_SIZE).step_by(3) {
        let page: Vec<u8> = (0..PAGE_SIZE)
            .map(|k| (i as u8).wrapping_mul(31) ^ (k as u8) ^ seed)
            .collect();
        mem.write_slice(&page, GuestAddress(i * PAGE_SIZE)).unwrap();
    }
    mem
}

fn contents(mem: &GuestMemoryMmap, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

/// Writes a recognisable 8-byte stamp into page `i`.
fn stamp(mem: &GuestMemoryMmap, i: u64, v: u64) {
    mem.write_obj(v, GuestAddress(i * PAGE_SIZE + (v % 500) * 8))
        .unwrap();
}

/// Lets a held copier go when dropped (a failing test must not hang in `LiveSave`'s drop).
struct Release(Arc<AtomicBool>);

impl Release {
    /// Lets the copier run.
    fn go(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.go();
    }
}

/// A full live save of `mem` to `path` whose copier waits until [`Release::go`], so that
/// every write before that faults and saves the old page first.
fn start_held(mem: &GuestMemoryMmap, path: &Path, id: &Identity) -> (LiveSave, Release) {
    let hold = Arc::new(AtomicBool::new(true));
    let options = LiveOptions {
        hold: Some(Arc::clone(&hold)),
        ..Default::default()
    };
    let live = start_live(mem, path, id, options).unwrap();
    (live, Release(hold))
}

/// A live save of `mem` to `path` (an increment over `parent` if given), run to its end.
fn live_to_end(
    mem: &GuestMemoryMmap,
    path: &Path,
    id: &Identity,
    parent: Option<&ImageRef>,
) -> ImageStats {
    let options = LiveOptions {
        parent,
        ..Default::default()
    };
    start_live(mem, path, id, options).unwrap().wait().unwrap()
}

/// The reference an increment over the image `stats` describes names.
fn parent_of(stats: &ImageStats) -> ImageRef {
    ImageRef {
        image_id: stats.image_id,
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let page = got
            .chunks(PAGE_SIZE as usize)
            .zip(want.chunks(PAGE_SIZE as usize))
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("{what}: page {page} differs");
    }
}

fn restored(chain: &[PathBuf], id: &Identity) -> Vec<u8> {
    let mem = restore(chain, id).unwrap();
    let v = contents(&mem, id.mem_size);
    release(&mem);
    v
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn stop_copy_round_trip_with_holes() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(32 * MIB);
    let mem = patterned(id.mem_size, 1);
    let want = contents(&mem, id.mem_size);
    let path = dir.path().join("full.img");
    let stats = save_full(&mem, &path, &id).unwrap();
    let pages = id.mem_size / PAGE_SIZE;
    assert_eq!(stats.pages, pages);
    assert_eq!(stats.data_pages, pages.div_ceil(3));
    assert_eq!(stats.bytes_written, stats.data_pages * PAGE_SIZE);
    assert!(!stats.incremental);
    // Zero pages are holes: about a third of the data is allocated.
    assert!(allocated_bytes(&path) < id.mem_size / 2);
    verify(std::slice::from_ref(&path), &id).unwrap();
    assert_same(
        &restored(std::slice::from_ref(&path), &id),
        &want,
        "restore",
    );
    release(&mem);
}

#[test]
fn live_save_is_the_instant_of_start_while_memory_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(32 * MIB);
    let pages = id.mem_size / PAGE_SIZE;
    let mem = patterned(id.mem_size, 2);
    let want = contents(&mem, id.mem_size);
    let path = dir.path().join("live.img");
    let (live, hold) = start_held(&mem, &path, &id);
    // The copier has not started: each of these writes faults and saves the old page first.
    let mut written = BTreeSet::new();
    for i in (0..pages).step_by(97) {
        stamp(&mem, i, 0xdead_0000 + i);
        stamp(&mem, i, 0xbeef_0000 + i); // second write: no fault
        written.insert(i);
    }
    // A second thread keeps writing while the copier runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, stop) = (mem.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut touched = BTreeSet::new();
            let mut x = 12345u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 2000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (x >> 33) % pages;
                stamp(&mem, i, x);
                touched.insert(i);
                n += 1;
            }
            touched
        })
    };
    hold.go();
    let (_, total) = live.progress();
    assert_eq!(total, pages);
    let stats = live.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let touched = writer.join().unwrap();
    assert!(stats.fault_pages >= written.len() as u64);
    assert_eq!(stats.pages, pages);
    assert_same(
        &restored(std::slice::from_ref(&path), &id),
        &want,
        "live image",
    );

    // Dirty tracking from the instant: the next increment holds exactly the pages written.
    let now = contents(&mem, id.mem_size);
    let incr = dir.path().join("incr.img");
    let parent = parent_of(&stats);
    let istats = live_to_end(&mem, &incr, &id, Some(&parent));
    let all: BTreeSet<u64> = written.union(&touched).copied().collect();
    assert!(istats.incremental);
    assert_eq!(istats.pages, all.len() as u64);
    assert_same(&restored(&[path, incr], &id), &now, "increment");
    release(&mem);
}

#[test]
fn incremental_chain_restore_and_fold() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(32 * MIB);
    let pages = id.mem_size / PAGE_SIZE;
    let mem = patterned(id.mem_size, 3);
    let p = |n: &str| dir.path().join(n);
    let s0 = contents(&mem, id.mem_size);
    let full = live_to_end(&mem, &p("full"), &id, None);

    // 1% of the pages change.
    let a: BTreeSet<u64> = (0..pages / 100).map(|k| (k * 7919) % pages).collect();
    for &i in &a {
        stamp(&mem, i, 0xa000 + i);
    }
    let s1 = contents(&mem, id.mem_size);
    let r0 = parent_of(&full);
    let i1 = live_to_end(&mem, &p("i1"), &id, Some(&r0));
    assert_eq!(i1.pages, a.len() as u64);
    assert!(i1.bytes_written <= 3 * id.mem_size / 100);

    let b: BTreeSet<u64> = (0..pages / 50).map(|k| (k * 104729 + 5) % pages).collect();
    for &i in &b {
        stamp(&mem, i, 0xb000 + i);
    }
    // A page rewritten to zero must read back as zero through the chain.
    mem.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(0))
        .unwrap();
    let s2 = contents(&mem, id.mem_size);
    let r1 = parent_of(&i1);
    let i2 = save_stop_copy(&mem, &p("i2"), &id, Some(&r1)).unwrap();
    let mut b0 = b.clone();
    b0.insert(0);
    assert_eq!(i2.pages, b0.len() as u64);

    // A parent that is not the last image is refused (and changes nothing).
    assert!(matches!(
        start_live(&mem, &p("bad"), &id, LiveOptions::incremental(&r0)),
        Err(Error::NotParent)
    ));

    assert_same(&restored(&[p("full")], &id), &s0, "full");
    assert_same(&restored(&[p("full"), p("i1")], &id), &s1, "full+i1");
    assert_same(
        &restored(&[p("full"), p("i1"), p("i2")], &id),
        &s2,
        "full+i1+i2",
    );
    assert!(matches!(
        restore(&[p("full"), p("i2")], &id),
        Err(Error::Chain(_))
    ));
    assert!(matches!(restore(&[p("i1")], &id), Err(Error::Chain(_))));

    // Delete i1: fold it into i2.
    let f = fold(&p("i1"), &p("i2"), &p("i2.folded"), &id).unwrap();
    assert_eq!(f.image_id, i2.image_id);
    assert_eq!(f.pages, a.union(&b0).count() as u64);
    assert_same(
        &restored(&[p("full"), p("i2.folded")], &id),
        &s2,
        "full+folded",
    );
    // Delete the full image: fold it into i1 (the result is full).
    let f0 = fold(&p("full"), &p("i1"), &p("i1.folded"), &id).unwrap();
    assert!(!f0.incremental);
    assert_same(
        &restored(&[p("i1.folded"), p("i2")], &id),
        &s2,
        "folded full+i2",
    );
    assert!(fold(&p("full"), &p("i2"), &p("x"), &id).is_err());
    release(&mem);
}

#[test]
fn restored_memory_takes_live_increments_and_full_images() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(32 * MIB);
    let pages = id.mem_size / PAGE_SIZE;
    let p = |n: &str| dir.path().join(n);
    let mem = patterned(id.mem_size, 4);
    let full = save_full(&mem, &p("full"), &id).unwrap();
    let s0 = contents(&mem, id.mem_size);
    release(&mem);

    // Restore without prefetch (every page loads by fault), and write: missing, then WP
    // faults.
    let r = restore::restore_with(&[p("full")], &id, false).unwrap();
    let mut want = s0.clone();
    let c: BTreeSet<u64> = (0..pages / 20).map(|k| (k * 613 + 11) % pages).collect();
    for &i in &c {
        let v = 0xc000 + i;
        stamp(&r, i, v);
        let at = (i * PAGE_SIZE + (v % 500) * 8) as usize;
        want[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    // A full live image of restored memory with most pages not loaded: writes after the
    // start fault on missing pages, whose saved content must be the chain's.
    let (live, hold) = start_held(&r, &p("rfull"), &id);
    for k in 0..pages / 10 {
        stamp(&r, (k * 389 + 1) % pages, 0xd000 + k);
    }
    hold.go();
    let stats = live.wait().unwrap();
    assert!(stats.fault_pages >= pages / 20);
    assert_same(
        &restored(&[p("rfull")], &id),
        &want,
        "full image of restored memory",
    );
    release(&r);

    // Stop-copy of restored memory with no page loaded: every page from the chain.
    let r = restore::restore_with(&[p("full")], &id, false).unwrap();
    save_full(&r, &p("rstop"), &id).unwrap();
    release(&r);
    assert_same(
        &restored(&[p("rstop")], &id),
        &s0,
        "stop-copy of unloaded memory",
    );

    let r = restore(&[p("full")], &id).unwrap();
    for &i in &c {
        stamp(&r, i, 0xc000 + i);
    }
    let parent = parent_of(&full);
    let incr = live_to_end(&r, &p("rincr"), &id, Some(&parent));
    assert_eq!(incr.pages, c.len() as u64);
    assert_same(&contents(&r, id.mem_size), &want, "restored memory");
    assert_same(
        &restored(&[p("full"), p("rincr")], &id),
        &want,
        "increment of restored memory",
    );
    release(&r);
}

fn damaged(path: &Path, id: &Identity, f: impl FnOnce(&mut Vec<u8>)) -> Error {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    let bad = path.with_extension("bad");
    std::fs::write(&bad, &bytes).unwrap();
    let e = match restore(&[bad], id) {
        Ok(_) => panic!("damaged image accepted"),
        Err(e) => e,
    };
    // One line, naming the file.
    let msg = e.to_string();
    assert!(!msg.contains('\n') && msg.contains("bad"), "{msg}");
    match e {
        Error::In { inner, .. } => *inner,
        e => e,
    }
}

#[test]
fn damaged_truncated_and_foreign_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(16 * MIB);
    let mem = patterned(id.mem_size, 5);
    let path = dir.path().join("img");
    save_full(&mem, &path, &id).unwrap();
    release(&mem);
    let meta_end = format::data_offset(id.mem_size / PAGE_SIZE) as usize;

    assert!(matches!(
        damaged(&path, &id, |b| b[3] ^= 1),
        Error::NotAnImage
    ));
    assert!(matches!(
        damaged(&path, &id, |b| b[20] ^= 1),
        Error::Checksum("envelope header")
    ));
    // Flipped bits in the bitmaps, the CRC table, the header fields.
    let crc_end = envelope::HEADER_LEN + format::payload_len(id.mem_size / PAGE_SIZE) as usize;
    for off in [
        envelope::HEADER_LEN + 4,
        envelope::HEADER_LEN + 100,
        crc_end - 10,
    ] {
        assert!(
            matches!(
                damaged(&path, &id, |b| b[off] ^= 0x10),
                Error::Checksum("image metadata")
            ),
            "flip at {off}"
        );
    }
    assert!(matches!(
        damaged(&path, &id, |b| b.truncate(b.len() - 4096)),
        Error::Truncated { .. }
    ));
    assert!(matches!(
        damaged(&path, &id, |b| b.truncate(100)),
        Error::Truncated { .. }
    ));
    assert!(matches!(
        damaged(&path, &id, |b| b.truncate(0)),
        Error::Truncated { .. }
    ));
    assert!(matches!(
        damaged(&path, &id, |b| {
            b[8] = 2;
            let c = crc32c::crc32c(&b[..44]);
            b[44..48].copy_from_slice(&c.to_le_bytes());
        }),
        Error::Version { found: 2 }
    ));
    let other = Identity {
        vm_uuid: *b"another-vm-uuid!",
        ..id
    };
    let e = restore(std::slice::from_ref(&path), &other).err().unwrap();
    assert!(matches!(e, Error::In { ref inner, .. } if matches!(**inner, Error::ForeignVm)));
    let bigger = ident(32 * MIB);
    let e = restore(std::slice::from_ref(&path), &bigger).err().unwrap();
    assert!(
        matches!(e, Error::In { ref inner, .. } if matches!(**inner, Error::MemSize { image, vm } if image == 16 * MIB && vm == 32 * MIB)),
        "{e}"
    );
    // Damaged page data: restore maps lazily, the full check finds it.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[meta_end + 3 * PAGE_SIZE as usize + 7] ^= 1;
    let bad = dir.path().join("page.bad");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(matches!(
        verify(std::slice::from_ref(&bad), &id),
        Err(Error::PageChecksum { page: 3, .. })
    ));
    // Lazily restored: the prefetch finds the damaged page and reports it (the page itself is
    // never installed).
    let r = restore(&[bad], &id).unwrap();
    let mut state = health(&r);
    for _ in 0..6000 {
        if !matches!(state, Ok(false)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        state = health(&r);
    }
    match state {
        Err(Error::Restored(msg)) => assert!(msg.contains("page 3 of"), "{msg}"),
        other => panic!("damage not reported: {other:?}"),
    }
    release(&r);
    // Not a regular file.
    assert!(restore(&[dir.path().to_path_buf()], &id).is_err());
}

#[test]
fn baseline_write_writes_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base");
    bench_baseline_write(&path, 5 * MIB + 4096).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len() as u64, 5 * MIB + 4096);
    assert!(data.iter().all(|&b| b != 0));
}

/// Prints the memory-side checkpoint figures (`STRATA_BENCH_MIB=256,1024 cargo test --release
/// -p vmm bench_memory_figures -- --ignored --nocapture`). Measures, asserts nothing timed.
#[test]
#[ignore]
fn bench_memory_figures() {
    let sizes = std::env::var("STRATA_BENCH_MIB").unwrap_or_else(|_| "256".into());
    let dir = std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    for mib in sizes.split(',') {
        let size: u64 = mib.trim().parse::<u64>().unwrap() * MIB;
        let d = tempfile::tempdir_in(&dir).unwrap();
        let b = bench_memory(d.path(), size).unwrap();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "{mib} MiB: stop-copy first {:.1} ms (protect {:.2}), then {:.1} ms ({:.0} MB/s) vs io_uring \
             from memory {:.1} ms -> {:.2}x, from buffers {:.1} ms -> {:.2}x; \
             live first: pause {:.2} ms (protect {:.2}), total {:.1} ms; live again: pause {:.3} ms, total {:.1} ms; \
             incr after 1%: pause {:.3} ms, {} bytes ({:.2}% of memory), total {:.1} ms; \
             restore {:.2} ms, touch all {:.1} ms",
            ms(b.stop_copy_first.elapsed),
            ms(b.stop_copy_first.protect),
            ms(b.stop_copy.elapsed),
            b.stop_copy.bytes_written as f64 / b.stop_copy.elapsed.as_secs_f64() / 1e6,
            ms(b.baseline_memory),
            b.stop_copy_ratio(),
            ms(b.baseline),
            b.stop_copy_ratio_buffer(),
            ms(b.live_first.pause),
            ms(b.live_first.protect),
            ms(b.live_first.elapsed),
            ms(b.live_again.pause),
            ms(b.live_again.elapsed),
            ms(b.live_incremental.pause),
            b.live_incremental.bytes_written,
            100.0 * b.live_incremental.bytes_written as f64 / size as f64,
            ms(b.live_incremental.elapsed),
            ms(b.restore),
            ms(b.restore_touch_all),
        );
    }
}

/// A tiny real KVM guest (64-bit, CPL3, identity-mapped with 2 MiB pages) whose code is a loop
/// writing `al` to `rcx` pages from `rdi` with stride `rsi`, then `out al, 0x10`.
mod kvm_guest {
    use kvm_bindings::{kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    pub const GDT: u64 = 0x1000;
    pub const PML4: u64 = 0x2000;
    pub const PDPT: u64 = 0x3000;
    pub const PD: u64 = 0x4000;
    pub const CODE: u64 = 0x1_0000;
    /// The loop above: mov %al,(%rdi); add %rsi,%rdi; dec %rcx; jnz; out %al,$0x10; jmp start.
    const LOOP: [u8; 14] = [
        0x88, 0x07, 0x48, 0x01, 0xf7, 0x48, 0xff, 0xc9, 0x75, 0xf6, 0xe6, 0x10, 0xeb, 0xf2,
    ];

    pub struct Guest {
        _kvm: Kvm,
        _vm: VmFd,
        vcpu: VcpuFd,
    }

    /// Writes the GDT, page tables and code into `mem` (only for a cold start).
    pub fn load(mem: &GuestMemoryMmap) {
        let gdt: [u64; 6] = [
            0,
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
        ];
        for (k, e) in gdt.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT + 8 * k as u64)).unwrap();
        }
        mem.write_obj(PDPT | 7, GuestAddress(PML4)).unwrap();
        mem.write_obj(PD | 7, GuestAddress(PDPT)).unwrap();
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x87, GuestAddress(PD + 8 * i))
                .unwrap();
        }
        mem.write_slice(&LOOP, GuestAddress(CODE)).unwrap();
    }

    /// A VM with `mem` as its RAM and one vCPU at CPL3.
    pub fn new(mem: &GuestMemoryMmap) -> Guest {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        crate::memory::register(&vm, mem).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let mut s = vcpu.get_sregs().unwrap();
        s.cr3 = PML4;
        s.cr4 = 0x20;
        s.cr0 = 0x8000_0011;
        s.efer = 0x500;
        let cs = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            present: 1,
            s: 1,
            g: 1,
            l: 1,
            type_: 11,
            dpl: 3,
            selector: 0x23,
            ..Default::default()
        };
        let ds = kvm_segment {
            type_: 3,
            l: 0,
            db: 1,
            selector: 0x2b,
            ..cs
        };
        s.cs = cs;
        (s.ds, s.es, s.fs, s.gs, s.ss) = (ds, ds, ds, ds, ds);
        s.gdt.base = GDT;
        s.gdt.limit = 6 * 8 - 1;
        vcpu.set_sregs(&s).unwrap();
        Guest {
            _kvm: kvm,
            _vm: vm,
            vcpu,
        }
    }

    impl Guest {
        /// Runs the guest writing `val` to `count` pages from `gpa` until its `out`.
        pub fn write_pages(&mut self, gpa: u64, count: u64, val: u8) {
            let regs = kvm_regs {
                rip: CODE,
                rax: u64::from(val),
                rcx: count,
                rdi: gpa,
                rsi: 4096,
                rsp: 0x1f_0000,
                rflags: 0x3002,
                ..Default::default()
            };
            self.vcpu.set_regs(&regs).unwrap();
            loop {
                match self.vcpu.run() {
                    Ok(VcpuExit::IoOut(0x10, _)) => return,
                    Ok(other) => panic!("unexpected guest exit {other:?}"),
                    Err(e) if e.errno() == libc::EINTR => continue,
                    Err(e) => panic!("KVM_RUN: {e}"),
                }
            }
        }
    }
}

#[test]
fn kvm_guest_writes_during_live_save_and_on_restored_memory() {
    let dir = tempfile::tempdir().unwrap();
    let id = ident(32 * MIB);
    let p = |n: &str| dir.path().join(n);
    const AREA: u64 = 16 * MIB;
    const AREA_PAGES: u64 = 16 * MIB / PAGE_SIZE;
    let mem = crate::memory::create(id.mem_size).unwrap();
    kvm_guest::load(&mem);
    let mut g = kvm_guest::new(&mem);
    g.write_pages(AREA, AREA_PAGES, 1);
    let s0 = contents(&mem, id.mem_size);

    // Copier held: every guest write faults inside KVM and the handler saves the old page.
    let (live, hold) = start_held(&mem, &p("full"), &id);
    g.write_pages(AREA, AREA_PAGES, 2);
    hold.go();
    let full = live.wait().unwrap();
    assert_eq!(full.fault_pages, AREA_PAGES);
    assert_same(&restored(&[p("full")], &id), &s0, "image at the instant");

    // Guest writes half the area again while the copier of an increment runs.
    let s1 = contents(&mem, id.mem_size);
    let parent = parent_of(&full);
    let live = start_live(&mem, &p("incr"), &id, LiveOptions::incremental(&parent)).unwrap();
    g.write_pages(AREA, AREA_PAGES / 2, 3);
    let incr = live.wait().unwrap();
    // Exactly the pages the guest wrote since the full image.
    assert_eq!(incr.pages, AREA_PAGES);
    assert_same(&restored(&[p("full"), p("incr")], &id), &s1, "increment");
    drop(g);
    release(&mem);

    // A new VM on lazily restored memory (no prefetch): its code and page tables load by
    // fault from the chain; its writes are tracked for the next increment.
    let r = restore::restore_with(&[p("full"), p("incr")], &id, false).unwrap();
    let mut g = kvm_guest::new(&r);
    g.write_pages(AREA + AREA / 2, AREA_PAGES / 4, 4);
    let s2 = contents(&r, id.mem_size);
    let mut want = s1.clone();
    for k in 0..AREA_PAGES / 4 {
        want[(AREA + AREA / 2 + k * PAGE_SIZE) as usize] = 4;
    }
    assert_same(&s2, &want, "guest on restored memory");
    let parent = parent_of(&incr);
    let i2 = live_to_end(&r, &p("incr2"), &id, Some(&parent));
    assert_eq!(i2.pages, AREA_PAGES / 4);
    drop(g);
    release(&r);
    assert_same(
        &restored(&[p("full"), p("incr"), p("incr2")], &id),
        &want,
        "chain of three",
    );
}

#[test]
fn memory_above_the_mmio_hole_round_trips() {
    // Two RAM regions (3 GiB below the hole, 64 MiB above 4 GiB), touched only sparsely:
    // untouched pages are holes and cost neither reads nor writes.
    let dir = tempfile::tempdir().unwrap();
    let id = ident(crate::layout::MMIO_HOLE_START + 64 * MIB);
    let p = |n: &str| dir.path().join(n);
    let mem = crate::memory::create(id.mem_size).unwrap();
    let high = crate::layout::HIGH_RAM_START;
    let low_end = crate::layout::MMIO_HOLE_START;
    let spots = [
        0x1000,
        low_end - PAGE_SIZE,
        high,
        high + 5 * PAGE_SIZE,
        high + 64 * MIB - PAGE_SIZE,
    ];
    for (k, &a) in spots.iter().enumerate() {
        mem.write_obj(0x5150_0000 + k as u64, GuestAddress(a + 8))
            .unwrap();
    }
    let full = save_full(&mem, &p("full"), &id).unwrap();
    assert_eq!(full.data_pages, spots.len() as u64);
    mem.write_obj(0x77u64, GuestAddress(high + 5 * PAGE_SIZE + 16))
        .unwrap();
    mem.write_obj(0x78u64, GuestAddress(low_end - 2 * PAGE_SIZE))
        .unwrap();
    let parent = parent_of(&full);
    let incr = live_to_end(&mem, &p("incr"), &id, Some(&parent));
    assert_eq!(incr.pages, 2);
    release(&mem);
    let r = restore(&[p("full"), p("incr")], &id).unwrap();
    let read = |a: u64| r.read_obj::<u64>(GuestAddress(a)).unwrap();
    for (k, &a) in spots.iter().enumerate() {
        assert_eq!(read(a + 8), 0x5150_0000 + k as u64);
    }
    assert_eq!(read(high + 5 * PAGE_SIZE + 16), 0x77);
    assert_eq!(read(low_end - 2 * PAGE_SIZE), 0x78);
    assert_eq!(read(high + 7 * PAGE_SIZE), 0);
    assert_eq!(read(2 << 30), 0);
    release(&r);
}

/// Prints the pause of live saves of a large, fully populated memory
/// (`STRATA_PAUSE_MIB=4096 cargo test --release -p vmm live_pause_figures -- --ignored --nocapture`).
#[test]
#[ignore]
fn live_pause_figures() {
    let mib: u64 = std::env::var("STRATA_PAUSE_MIB")
        .map(|v| v.parse().unwrap())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    let id = ident(mib * MIB);
    let mem = crate::memory::create(id.mem_size).unwrap();
    for (start, len) in crate::layout::ram_ranges(id.mem_size) {
        for a in (start..start + len).step_by(PAGE_SIZE as usize) {
            mem.write_obj(a | 1, GuestAddress(a)).unwrap();
        }
    }
    for round in 0..3 {
        let path = dir.path().join(format!("img{round}"));
        let s = live_to_end(&mem, &path, &id, None);
        println!(
            "{mib} MiB live round {round}: pause {:.3} ms (protect {:.3} ms), total {:.0} ms",
            s.pause.as_secs_f64() * 1e3,
            s.protect.as_secs_f64() * 1e3,
            s.elapsed.as_secs_f64() * 1e3
        );
        std::fs::remove_file(&path).unwrap();
    }
    release(&mem);
}
