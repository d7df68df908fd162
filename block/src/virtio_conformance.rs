//! virtio-blk's own request semantics (used lengths, GET_ID, malformed and unsupported
//! requests, read-only), run through the whole device against a real journal on both
//! backends. What every front end must do is in [`crate::conformance`].

use crate::config::MAX_DATA_BYTES;
use crate::request::*;
use crate::status::{
    VIRTIO_BLK_S_IOERR as IOERR, VIRTIO_BLK_S_OK as OK, VIRTIO_BLK_S_UNSUPP as UNSUPP,
};
use crate::testutil::*;
use crate::BackendKind;

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

    assert_eq!(h.read(u64::MAX / 8, 512).0, IOERR);

    // Bad lengths.
    assert_eq!(h.write(0, &pattern(4, 700)), IOERR);
    assert_eq!(h.read(0, MAX_DATA_BYTES + 512).0, IOERR);
    assert_eq!(
        h.read(8, 8192),
        (OK, a.clone()),
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

    let c = pattern(5, 16 * 4096);
    assert_eq!(h.write(2048, &c), OK);
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
        (OK, c),
        "refused discards changed nothing"
    );

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
