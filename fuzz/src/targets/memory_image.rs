//! Guest memory images (`checkpoints/<id>/memory.img`) and chains of them: the header, the
//! metadata (page bitmaps, per-page CRCs), the chain links, lazy restore with its background
//! prefetch, full verification and fold. A damaged image must be refused or its damaged pages
//! reported, never served, never a panic or a hang.
//!
//! Input: `flags`, offset (u32 LE), then bytes written over one image of a real chain (a full
//! image and an increment over it) at that offset. Flag 0x01: damage the increment (else the
//! full image). Flag 0x02: reseal the damaged image's header and metadata checksums so the
//! damage reaches the metadata parser. Flag 0x04: truncate the image at the offset instead.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::snapshot::envelope::{self, Kind, HEADER_LEN};
use vmm::snapshot::memory as mem;
use vmm::snapshot::Identity;

use super::Target;

pub const TARGET: Target = Target {
    name: "memory_image",
    about: "memory images and chains (metadata, links, lazy restore, verify, fold)",
    run,
    seeds,
    keep_last_input: false,
};

const MEM: u64 = 16 << 20;
const PAGE: u64 = 4096;

fn identity() -> Identity {
    Identity {
        vm_uuid: [0xa5; 16],
        mem_size: MEM,
    }
}

/// Page `i`'s expected first word in the full image and after the increment.
fn word(i: u64, gen: u64) -> u64 {
    (i << 8) | gen | 1
}

/// The real chain (full, increment) written once.
fn fixture() -> &'static (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    static F: OnceLock<(tempfile::TempDir, Vec<u8>, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir_in(crate::disk::scratch_root()).expect("dir");
        let id = identity();
        let m = vmm::memory::create(MEM).expect("memory");
        for i in (0..MEM / PAGE).step_by(3) {
            m.write_obj(word(i, 0), GuestAddress(i * PAGE))
                .expect("write");
        }
        let full = dir.path().join("full.img");
        let stats = mem::save_full(&m, &full, &id).expect("full image");
        for i in (0..MEM / PAGE).step_by(7) {
            m.write_obj(word(i, 2), GuestAddress(i * PAGE))
                .expect("write");
        }
        let parent = mem::ImageRef {
            image_id: stats.image_id,
        };
        let incr = dir.path().join("incr.img");
        mem::save_stop_copy(&m, &incr, &id, Some(&parent)).expect("increment");
        mem::release(&m);
        let a = std::fs::read(&full).expect("read");
        let b = std::fs::read(&incr).expect("read");
        (dir, a, b)
    })
}

fn expected(i: u64) -> u64 {
    if i.is_multiple_of(7) {
        word(i, 2)
    } else if i.is_multiple_of(3) {
        word(i, 0)
    } else {
        0
    }
}

fn run(input: &[u8]) {
    let (&flags, rest) = input.split_first().unwrap_or((&0, &[]));
    let (off, bytes) = rest.split_at(rest.len().min(4));
    let mut o = [0u8; 4];
    o[..off.len()].copy_from_slice(off);
    let (scratch, full, incr) = fixture();
    let dir = tempfile::tempdir_in(scratch.path()).expect("dir");
    let mut images = [full.clone(), incr.clone()];
    let victim = usize::from(flags & 1 != 0);
    let img = &mut images[victim];
    let offset = (u32::from_le_bytes(o) as usize) % (img.len() + 1);
    if flags & 4 != 0 {
        img.truncate(offset);
    } else {
        let end = (offset + bytes.len()).min(img.len());
        img[offset..end].copy_from_slice(&bytes[..end - offset]);
        if flags & 2 != 0 && img.len() >= HEADER_LEN + 16 {
            reseal(img);
        }
    }
    let unchanged = images[0] == *full && images[1] == *incr;
    let paths: Vec<PathBuf> = ["full.img", "incr.img"]
        .iter()
        .zip(&images)
        .map(|(n, data)| {
            let p = dir.path().join(n);
            std::fs::write(&p, data).expect("write image");
            p
        })
        .collect();
    let id = identity();
    let checked = mem::check_chain(&paths, &id);
    if unchanged {
        checked
            .as_ref()
            .expect("the real chain must pass its checks");
    }
    if checked.is_err() {
        assert!(
            mem::restore(&paths, &id).is_err(),
            "restore took a chain its checks refuse"
        );
        return;
    }
    let verified = mem::verify(&paths, &id).is_ok();
    if let Ok(m) = mem::restore(&paths, &id) {
        let loaded = wait_loaded(&m);
        if unchanged {
            assert!(loaded, "the real chain must load");
            for i in 0..MEM / PAGE {
                let w: u64 = m.read_obj(GuestAddress(i * PAGE)).expect("read");
                assert_eq!(w, expected(i), "page {i} of the restored memory");
            }
        }
        assert!(!loaded || verified || !unchanged);
        mem::release(&m);
    }
    // Folding the increment into the full image makes one full image that restores alike.
    let out = dir.path().join("folded.img");
    if mem::fold(&paths[0], &paths[1], &out, &id).is_ok() && unchanged {
        mem::check_chain(std::slice::from_ref(&out), &id).expect("folded image");
    }
}

/// Waits for the prefetch: true once every page is loaded and checked, false if one failed.
fn wait_loaded(m: &GuestMemoryMmap) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match mem::health(m) {
            Ok(true) => return true,
            Err(_) => return false,
            Ok(false) if Instant::now() > deadline => panic!("restored memory never loaded"),
            Ok(false) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Recomputes the envelope checksums over the (damaged) metadata of an image.
fn reseal(img: &mut [u8]) {
    let len = u64::from_le_bytes(img[32..40].try_into().expect("8 bytes")) as usize;
    let end = HEADER_LEN.saturating_add(len).min(img.len());
    let sealed = envelope::seal(Kind::MemoryImage, &identity(), &img[HEADER_LEN..end]);
    img[..HEADER_LEN].copy_from_slice(&sealed[..HEADER_LEN]);
}

fn seeds() -> Vec<Vec<u8>> {
    let seed = |flags: u8, off: u32, bytes: &[u8]| {
        let mut v = vec![flags];
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(bytes);
        v
    };
    vec![
        seed(0, 0, &[]),
        seed(1, 0, &[]),
        seed(0, 10, &[0xff]),
        seed(2, 60, &[0, 0, 0, 0x80]),
        seed(3, 64, &[0xff; 8]),
        seed(4, 4096, &[]),
        seed(5, 100, &[]),
        seed(2, 4200, &[1, 2, 3, 4]),
    ]
}
