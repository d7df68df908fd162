//! Request semantics every backend must honour, run through the whole device (worker thread,
//! queue, parser, executor) against a real journal: once with the blocking backend and once
//! with io_uring.

use crate::config::MAX_DATA_BYTES;
use crate::request::*;
use crate::status::{
    VIRTIO_BLK_S_IOERR as IOERR, VIRTIO_BLK_S_OK as OK, VIRTIO_BLK_S_UNSUPP as UNSUPP,
};
use crate::testutil::*;
use crate::BackendKind;
use vm_memory::Bytes;

const SIZE: u64 = 16 << 20;

fn suite(kind: BackendKind) {
    let disk = test_disk(SIZE);
    let m = mem();
    let mut h = Harness::start(&m, disk.volume.clone(), kind, None);

    // Write then read back, across two guest buffers each way.
    let a = pattern(1, 8192);
    assert_eq!(h.write(8, &a), OK);
    assert_eq!(h.read(8, 8192), (OK, a.clone()));
    let (_, used_len) = h.drv.used(h.drv.added.wrapping_sub(1));
    assert_eq!(
        used_len,
        8192 + 1,
        "a read reports its data plus the status byte"
    );

    // Never-written sectors read as zeros; a 512-byte write lands inside a 4 KiB block.
    assert_eq!(h.read(1000, 4096), (OK, vec![0u8; 4096]));
    let b = pattern(2, 512);
    assert_eq!(h.write(9, &b), OK);
    let mut expect = a.clone();
    expect[512..1024].copy_from_slice(&b);
    assert_eq!(h.read(8, 8192), (OK, expect.clone()));

    // The journal saw the same bytes.
    let mut direct = vec![0u8; 8192];
    disk.volume
        .read_at(&mut direct, 8 * 512)
        .expect("volume read");
    assert_eq!(direct, expect);

    // The last sector of the disk is usable; one past it is not.
    let last = SIZE / 512 - 1;
    assert_eq!(h.write(last, &pattern(3, 512)), OK);
    assert_eq!(h.read(last, 512), (OK, pattern(3, 512)));
    assert_eq!(h.write(last, &pattern(3, 1024)), IOERR);
    assert_eq!(h.read(SIZE / 512, 512).0, IOERR);
    assert_eq!(h.read(u64::MAX / 8, 512).0, IOERR);

    // Bad lengths.
    assert_eq!(h.write(0, &pattern(4, 700)), IOERR);
    assert_eq!(h.read(0, MAX_DATA_BYTES + 512).0, IOERR);
    assert_eq!(
        h.read(8, 8192),
        (OK, expect.clone()),
        "failed requests changed nothing"
    );

    // Flush and GET_ID.
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), OK);
    let mut id = b"conformance".to_vec();
    id.resize(20, 0);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[desc(DATA, 20, F_WRITE)]),
        OK
    );
    assert_eq!(read_bytes(&m, DATA, 20), id);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[desc(DATA, 4, F_WRITE)]),
        OK
    );
    assert_eq!(read_bytes(&m, DATA, 4), b"conf");
    assert_eq!(h.drv.used(h.drv.added.wrapping_sub(1)).1, 5);

    // Discard and write zeroes make ranges read as zeros and leave neighbours alone.
    let c = pattern(5, 16 * 4096);
    assert_eq!(h.write(2048, &c), OK);
    assert_eq!(
        h.dwz(
            VIRTIO_BLK_T_DISCARD,
            &[(2048 + 8, 8, 0), (2048 + 32, 16, 0)]
        ),
        OK
    );
    assert_eq!(
        h.dwz(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(2048 + 64, 9, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
        ),
        OK
    );
    assert_eq!(h.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[(2048 + 100, 3, 0)]), OK);
    let mut want = c.clone();
    for (s, n) in [(8usize, 8usize), (32, 16), (64, 9), (100, 3)] {
        want[s * 512..(s + n) * 512].fill(0);
    }
    assert_eq!(h.read(2048, 16 * 4096), (OK, want.clone()));

    // Discard with the unmap flag, unknown write-zeroes flags and unknown types are UNSUPP.
    assert_eq!(
        h.dwz(
            VIRTIO_BLK_T_DISCARD,
            &[(2048, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
        ),
        UNSUPP
    );
    assert_eq!(h.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[(2048, 8, 0x80)]), UNSUPP);
    assert_eq!(
        h.dwz(VIRTIO_BLK_T_DISCARD, &[(SIZE / 512 - 4, 8, 0)]),
        IOERR
    );
    assert_eq!(h.request(42, 0, &[]), UNSUPP);
    assert_eq!(
        h.read(2048, 16 * 4096),
        (OK, want),
        "refused discards changed nothing"
    );

    // A batch: 64 writes made available before one kick, then 64 reads the same way.
    let mut statuses = Vec::new();
    for i in 0..64u64 {
        let (hdr, st) = h.slots();
        let data = DATA + 0x10_0000 + i * 4096;
        m.write_slice(&pattern(i as u8, 4096), vm_memory::GuestAddress(data))
            .expect("data");
        write_header(&m, hdr, VIRTIO_BLK_T_OUT, 4096 + i * 8);
        h.add(&[desc(hdr, 16, 0), desc(data, 4096, 0), desc(st, 1, F_WRITE)]);
        statuses.push(st);
    }
    h.run();
    assert!(statuses.iter().all(|&st| status_at(&m, st) == OK));
    let mut statuses = Vec::new();
    for i in 0..64u64 {
        let (hdr, st) = h.slots();
        let data = DATA + 0x10_0000 + i * 4096;
        m.write_slice(&[0u8; 4096], vm_memory::GuestAddress(data))
            .expect("clear");
        write_header(&m, hdr, VIRTIO_BLK_T_IN, 4096 + i * 8);
        h.add(&[
            desc(hdr, 16, 0),
            desc(data, 4096, F_WRITE),
            desc(st, 1, F_WRITE),
        ]);
        statuses.push(st);
    }
    h.run();
    for (i, &st) in statuses.iter().enumerate() {
        assert_eq!(status_at(&m, st), OK);
        let data = DATA + 0x10_0000 + i as u64 * 4096;
        assert_eq!(
            read_bytes(&m, data, 4096),
            pattern(i as u8, 4096),
            "batched read {i}"
        );
    }
    assert!(!crate::VirtioDevice::needs_reset(&h.dev));
    assert!(crate::VirtioDevice::reset(&mut h.dev));
}

fn read_only_suite(kind: BackendKind) {
    let mut disk = test_disk(SIZE);
    disk.volume
        .write_at(&pattern(9, 4096), 0, false)
        .expect("seed");
    disk.disk.checkpoint("base").expect("checkpoint");
    let view = disk.disk.checkpoint_view("base").expect("view");
    assert!(view.read_only());
    let m = mem();
    let mut h = Harness::start(&m, view, kind, None);
    assert_ne!(
        crate::VirtioDevice::avail_features(&h.dev) & (1 << crate::config::VIRTIO_BLK_F_RO),
        0
    );
    assert_eq!(h.write(0, &pattern(1, 4096)), IOERR);
    assert_eq!(
        h.dwz(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]),
        UNSUPP,
        "not offered on a read-only disk"
    );
    assert_eq!(h.read(0, 4096), (OK, pattern(9, 4096)));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), OK);
}

#[test]
fn blocking_backend_conforms() {
    suite(BackendKind::Blocking);
}

#[test]
fn uring_backend_conforms() {
    suite(BackendKind::Uring);
}

#[test]
fn blocking_backend_read_only() {
    read_only_suite(BackendKind::Blocking);
}

#[test]
fn uring_backend_read_only() {
    read_only_suite(BackendKind::Uring);
}
