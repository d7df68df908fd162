//! Booting a stock Linux kernel with `strata run` (needs /dev/kvm and a kernel in /boot; CI
//! installs Debian's `linux-image-amd64`). The kernel must print its `Linux version` banner on
//! the serial console; the VM is killed after that (a full boot takes minutes on this
//! workplace's nested KVM, where guest kernel code is emulated).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound on waiting for the banner (it arrives after ~30 s here, mostly the kernel
/// clearing its BSS with an emulated `rep stosb`). Not a speed assertion: only a bound so a
/// hung VM fails the test instead of hanging it.
const BANNER_WAIT: Duration = Duration::from_secs(240);

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read/write access to /dev/kvm ({e}); run it on a KVM-capable host");
    }
}

/// The newest /boot/vmlinuz-*.
fn stock_kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    kernels.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vmlinuz-"))
    });
    kernels.sort();
    kernels.pop().unwrap_or_else(|| {
        panic!(
            "no /boot/vmlinuz-* found: install a stock kernel (apt-get install linux-image-amd64)"
        )
    })
}

/// Output of a running `strata run`, collected by a reader thread.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning strata");
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Running { child, out }
    }

    /// Waits until `needle` appears, the process exits, or `limit` passes.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.out.lock().unwrap().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                return self.out.lock().unwrap().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_banner(kernel: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let mut vm = Running::start(&[
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256M",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let seen = vm.wait_for("Linux version", BANNER_WAIT);
    // The E820 map follows the banner within a few seconds; the check is a bound, not a speed
    // assertion.
    let e820 = "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable";
    let seen_e820 = seen && vm.wait_for(e820, Duration::from_secs(120));
    let text = vm.text();
    drop(vm);
    assert!(
        seen,
        "no `Linux version` banner from {} within {BANNER_WAIT:?}; output:\n{text}",
        kernel.display()
    );
    assert!(
        seen_e820,
        "no E820 map with our RAM layout after the banner:\n{text}"
    );
    assert!(
        text.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "command line echoed:\n{text}"
    );
}

#[test]
fn stock_bzimage_prints_its_banner() {
    require_kvm();
    assert_banner(&stock_kernel());
}

#[test]
fn elf_vmlinux_extracted_from_the_bzimage_prints_its_banner() {
    require_kvm();
    let image = std::fs::read(stock_kernel()).unwrap();
    let payload = vmm::boot::decompress::bzimage_payload(&image).expect("bzImage payload");
    assert_eq!(
        vmm::boot::decompress::payload_format(payload),
        vmm::boot::decompress::PayloadFormat::Xz,
        "this test extracts XZ payloads (Debian's); other formats need another extractor"
    );
    let elf = vmm::boot::decompress::xz(payload, 1 << 30).expect("decompressing the payload");
    assert_eq!(&elf[..4], b"\x7fELF");
    let dir = tempfile::tempdir().unwrap();
    let vmlinux = dir.path().join("vmlinux");
    std::fs::write(&vmlinux, &elf).unwrap();
    assert_banner(&vmlinux);
}

#[test]
fn linux_finds_every_vcpu_in_the_mp_table() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let kernel = stock_kernel();
    let mut vm = Running::start(&[
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256M",
        "--vcpus",
        "2",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let seen = vm.wait_for(
        "smpboot: Allowing 2 CPUs",
        BANNER_WAIT + Duration::from_secs(120),
    );
    let text = vm.text();
    drop(vm);
    assert!(seen, "Linux did not find 2 CPUs; output:\n{text}");
    assert!(text.contains("MPTABLE: OEM ID: STRATA"), "{text}");
    assert!(
        text.contains("IOAPIC[0]: apic_id 3, version 17, address 0xfec00000, GSI 0-23"),
        "{text}"
    );
}

/// Runs `strata run` with `extra` arguments (on a fresh disk) and expects it to fail before
/// booting; returns its output. Bounded: a process still running after `limit` (a read that
/// never ends) fails the test.
fn refused(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let mut args = vec!["run", "--disk", disk.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm = Running::start(&args);
    let limit = Duration::from_secs(120);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < limit,
            "strata run {extra:?} still running after {limit:?} (it should have refused at once); output:\n{}",
            vm.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let the reader threads drain.
    std::thread::sleep(Duration::from_millis(200));
    let text = vm.text();
    assert!(!status.success(), "strata run {extra:?} succeeded:\n{text}");
    assert!(
        !text.contains("panicked"),
        "strata run {extra:?} panicked:\n{text}"
    );
    text
}

#[test]
fn a_kernel_too_big_for_guest_memory_says_so() {
    require_kvm();
    let kernel = stock_kernel();
    for memory in ["64M", "32M"] {
        let text = refused(&["--memory", memory, "--kernel", kernel.to_str().unwrap()]);
        assert!(
            text.contains("too little memory"),
            "--memory {memory}:\n{text}"
        );
    }
}

#[test]
fn initrd_and_kernel_that_are_not_regular_files_are_refused_without_reading() {
    require_kvm();
    let kernel = stock_kernel();
    let text = refused(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/dev/zero",
    ]);
    assert!(
        text.contains("initrd /dev/zero is a character device, not a regular file"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let text = refused(&["--kernel", fifo.to_str().unwrap()]);
    assert!(text.contains("is a FIFO, not a regular file"), "{text}");
    let text = refused(&["--kernel", "/dev/zero"]);
    assert!(text.contains("is a character device"), "{text}");
    // A sparse initrd far larger than guest memory is refused from its size.
    let big = dir.path().join("big-initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let text = refused(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
    ]);
    assert!(text.contains("more than the guest's"), "{text}");
}

#[test]
fn a_bzimage_with_cmdline_size_zero_gets_a_clear_error() {
    require_kvm();
    let mut image = std::fs::read(stock_kernel()).unwrap();
    // setup_header.cmdline_size (boot protocol 2.06+) is at 0x238 of the image.
    image[0x238..0x23c].copy_from_slice(&0u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz-cmdline0");
    std::fs::write(&kernel, &image).unwrap();
    let text = refused(&["--kernel", kernel.to_str().unwrap()]);
    assert!(
        text.contains("this kernel accepts at most 0 bytes"),
        "{text}"
    );
    assert!(!text.contains("18446744073709551615"), "{text}");
}
