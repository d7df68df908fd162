//! Full Linux boot on hardware KVM (ignored by default: on this workplace's nested KVM a full
//! boot takes many minutes). Run with
//! `STRATA_FULLBOOT_KERNEL=/path/to/bzImage cargo test --test vm_linux_fullboot -- --ignored`.
//!
//! The kernel must have virtio-mmio command-line devices and virtio-blk built in
//! (`CONFIG_VIRTIO_MMIO=y CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y CONFIG_VIRTIO_BLK=y`; Debian's
//! stock kernel lacks the cmdline-devices option, and Strata has no ACPI tables to announce the
//! device otherwise). `/bin/busybox` must be the static build (Debian `busybox-static`).
//! The initramfs writes a pattern to /dev/vda, reads it back, and reboots; the test then
//! checks the pattern in the journalled disk.

use std::path::Path;
use std::process::Command;

const PATTERN: &[u8] = b"strata-fullboot-pattern";
const SECTOR: u64 = 2048;

/// One newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() & 3 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

fn initramfs(busybox: &[u8]) -> Vec<u8> {
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sys /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         i=0; while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do /bin/busybox sleep 1; i=$((i+1)); done\n\
         printf '{p}' | /bin/busybox dd of=/dev/vda bs=512 seek={s} conv=sync,fsync\n\
         got=$(/bin/busybox dd if=/dev/vda bs=512 skip={s} count=1 2>/dev/null | /bin/busybox head -c {n})\n\
         if [ \"$got\" = '{p}' ]; then echo STRATA-FULLBOOT-OK; else echo STRATA-FULLBOOT-BAD; fi\n\
         /bin/busybox sync\n\
         /bin/busybox reboot -f\n",
        p = std::str::from_utf8(PATTERN).unwrap(),
        s = SECTOR,
        n = PATTERN.len()
    );
    let mut out = Vec::new();
    let mut ino = 1;
    for dir in ["dev", "proc", "sys", "bin"] {
        cpio_entry(&mut out, ino, dir, 0o040755, (0, 0), &[]);
        ino += 1;
    }
    cpio_entry(&mut out, ino, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut out, ino + 1, "bin/busybox", 0o100755, (0, 0), busybox);
    cpio_entry(&mut out, ino + 2, "init", 0o100755, (0, 0), init.as_bytes());
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

#[test]
#[ignore = "full Linux boot: needs hardware KVM, STRATA_FULLBOOT_KERNEL and busybox-static"]
fn linux_writes_the_virtio_disk_and_reboots() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read/write access to /dev/kvm ({e})");
    }
    let kernel = std::env::var("STRATA_FULLBOOT_KERNEL").unwrap_or_else(|_| {
        panic!("set STRATA_FULLBOOT_KERNEL to a kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y")
    });
    let busybox = std::fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("/bin/busybox is needed (apt-get install busybox-static): {e}"));
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&busybox)).unwrap();
    let disk = dir.path().join("disk");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--disk"])
        .arg(&disk)
        .args(["--memory", "512M", "--kernel", &kernel, "--initrd"])
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 rdinit=/init"])
        .output()
        .expect("running strata");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("STRATA-FULLBOOT-OK"), "{text}");
    let disk = journal::Disk::open(
        Path::new(&disk),
        journal::OpenOptions {
            cache: journal::CacheMode::None,
            read_only: true,
        },
    )
    .expect("opening the disk");
    let mut sector = vec![0u8; 512];
    disk.now()
        .read_at(&mut sector, SECTOR * 512)
        .expect("reading the disk");
    assert_eq!(&sector[..PATTERN.len()], PATTERN);
}

#[test]
fn initramfs_is_valid_newc() {
    let img = initramfs(b"BUSYBOX");
    assert_eq!(&img[..6], b"070701");
    assert_eq!(img.len() & 3, 0);
    let text = String::from_utf8_lossy(&img);
    assert!(
        text.contains("TRAILER!!!") && text.contains("bin/busybox") && text.contains("BUSYBOX")
    );
    // Every header starts on a 4-byte boundary with the magic.
    let mut off = 0;
    let mut names = Vec::new();
    while off < img.len() {
        assert_eq!(&img[off..off + 6], b"070701", "at {off}");
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&img[off + 6 + i * 8..off + 14 + i * 8]).unwrap(),
                16,
            )
            .unwrap() as usize
        };
        let (size, namesize) = (field(6), field(11));
        let name = std::str::from_utf8(&img[off + 110..off + 110 + namesize - 1])
            .unwrap()
            .to_string();
        let data = (off + 110 + namesize + 3) & !3;
        off = (data + size + 3) & !3;
        let done = name == "TRAILER!!!";
        names.push(name);
        if done {
            break;
        }
    }
    assert_eq!(names.last().map(String::as_str), Some("TRAILER!!!"));
    assert!(names.contains(&"init".to_string()));
}
