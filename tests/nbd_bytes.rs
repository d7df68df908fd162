//! Byte granularity over NBD, with real clients: the server advertises a minimum block size
//! of 1, `nbdfuse` serves a 1-byte `dd`, qemu-io writes and reads unaligned ranges, and
//! fuse2fs runs an ext4 filesystem on the export (it rewrites its superblock in place).

mod nbd_common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_common::fallible_client::NbdClient;
use nbd_common::{create_disk, qemu_io_ok, require_tool, run_ok, Server};

/// An `nbdfuse` mount of a served disk: the export appears as `mount/nbd`.
struct Fuse {
    child: Option<Child>,
    mount: std::path::PathBuf,
}

impl Fuse {
    fn mount(sock: &Path, mount: &Path) -> Fuse {
        std::fs::create_dir_all(mount).unwrap();
        let child = Command::new("nbdfuse")
            .arg(mount)
            .arg("--unix")
            .arg(sock)
            .stdout(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let fuse = Fuse {
            child: Some(child),
            mount: mount.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !fuse.file().exists() {
            assert!(Instant::now() < deadline, "nbdfuse never mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
        fuse
    }

    fn file(&self) -> std::path::PathBuf {
        self.mount.join("nbd")
    }

    fn unmount(mut self) {
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.mount));
        if let Some(mut c) = self.child.take() {
            assert!(c.wait().unwrap().success(), "nbdfuse failed");
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mount)
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True when `dir` is a mount point.
fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = format!(" {} ", dir.display());
    mounts.lines().any(|l| l.contains(&want))
}

/// Starts fuse2fs in the foreground on `image` at `dir` and waits for the mount.
fn fuse2fs(image: &Path, dir: &Path, opts: &str) -> Child {
    let mut child = Command::new("fuse2fs")
        .arg(image)
        .arg(dir)
        .args(["-f", "-o", opts])
        .stdout(Stdio::null())
        .spawn()
        .expect("start fuse2fs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mounted(dir) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("fuse2fs exited with {status} before mounting");
        }
        assert!(Instant::now() < deadline, "fuse2fs never mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Unmounts a fuse2fs mount and waits for the daemon, which writes its superblock last.
fn unmount_fuse2fs(dir: &Path, mut child: Child) {
    run_ok(Command::new("fusermount3").arg("-u").arg(dir));
    let status = child.wait().unwrap();
    assert!(status.success(), "fuse2fs exited with {status}");
}

fn dd(args: &[&str]) -> String {
    run_ok(Command::new("dd").args(args))
}

#[test]
fn minimum_block_size_is_one_and_raw_unaligned_requests_work() {
    require_tool("nbdinfo", "libnbd-bin");
    let t = tempfile::tempdir().unwrap();
    let disk = create_disk(t.path(), "disk", "8M");
    let server = Server::start(&disk, t.path(), &[]);
    let info = run_ok(Command::new("nbdinfo").arg(server.uri()));
    assert!(info.contains("block_size_minimum: 1"), "{info}");
    let mut c = NbdClient::connect(&server.sock).unwrap();
    assert_eq!(c.write(4093, b"abcdefg", false).unwrap(), 0);
    assert_eq!(c.write((8 << 20) - 1, b"E", true).unwrap(), 0);
    assert_eq!(c.read(4090, 12).unwrap().unwrap(), b"\0\0\0abcdefg\0\0");
    assert_eq!(c.read((8 << 20) - 2, 2).unwrap().unwrap(), b"\0E");
    // Past the end is still refused.
    assert_eq!(c.write(8 << 20, b"x", false).unwrap(), 28);
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
}

#[test]
fn qemu_io_unaligned_writes_read_back() {
    require_tool("qemu-io", "qemu-utils");
    let t = tempfile::tempdir().unwrap();
    let disk = create_disk(t.path(), "disk", "8M");
    let server = Server::start(&disk, t.path(), &[]);
    let uri = server.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x5a 12345 1",
            "write -P 0x33 100 3000",
            "write -z 1000 7",
            "read -P 0x5a 12345 1",
            "read -P 0 12344 1",
            "read -P 0 12346 1",
            "read -P 0x33 100 900",
            "read -P 0 1000 7",
            "read -P 0x33 1007 2093",
            "read -P 0 3100 1000",
        ],
    );
}

#[test]
fn nbdfuse_one_byte_dd_and_fuse2fs_work() {
    require_tool("nbdfuse", "libnbd-bin");
    require_tool("fuse2fs", "fuse2fs");
    require_tool("mkfs.ext4", "e2fsprogs");
    let t = tempfile::tempdir().unwrap();
    let disk = create_disk(t.path(), "disk", "16M");
    let server = Server::start(&disk, t.path(), &[]);
    let fuse = Fuse::mount(&server.sock, &t.path().join("m"));
    let dev = fuse.file();
    let dev_s = dev.to_str().unwrap();
    let src = t.path().join("one");
    std::fs::write(&src, b"Z").unwrap();
    dd(&[
        &format!("if={}", src.display()),
        &format!("of={dev_s}"),
        "bs=1",
        "seek=12345",
        "conv=notrunc,fsync",
    ]);
    let back = t.path().join("back");
    dd(&[
        &format!("if={dev_s}"),
        &format!("of={}", back.display()),
        "bs=1",
        "skip=12344",
        "count=3",
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), b"\0Z\0");

    // An ext4 filesystem through fuse2fs on the export.
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let fs = t.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let rw = fuse2fs(&dev, &fs, "fakeroot");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(fs.join("file"), &data).unwrap();
    std::fs::write(fs.join("small"), b"hello").unwrap();
    run_ok(Command::new("sync").arg("-f").arg(fs.join("file")));
    unmount_fuse2fs(&fs, rw);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let ro = fuse2fs(&dev, &fs, "fakeroot,ro");
    assert_eq!(std::fs::read(fs.join("file")).unwrap(), data);
    assert_eq!(std::fs::read(fs.join("small")).unwrap(), b"hello");
    unmount_fuse2fs(&fs, ro);
    fuse.unmount();
    server.stop();
}
