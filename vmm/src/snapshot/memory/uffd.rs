//! A thin, safe-ish wrapper over the userfaultfd ioctls this module uses (the installed kernel
//! headers are 6.1 and `libc` has no userfaultfd bindings, so the ABI is spelled out here).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_POISON`: `UFFDIO_POISON` exists.
const FEATURE_POISON: u64 = 1 << 14;

const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_WP: u64 = 2;
const WRITEPROTECT_MODE_WP: u64 = 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// The fault is a write-protect fault (the page is present and protected).
pub const FLAG_WP: u64 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

/// One message read from a userfaultfd (`struct uffd_msg`, 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Msg {
    pub event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    /// `arg.pagefault.flags` for page faults.
    pub flags: u64,
    /// `arg.pagefault.address` for page faults.
    pub address: u64,
    _feat: u64,
}

const _: () = assert!(std::mem::size_of::<Msg>() == 32);

/// What an `UFFDIO_COPY` did.
pub enum Copied {
    /// Every byte was installed.
    All,
    /// The first page already existed (another thread filled it): nothing was woken.
    Exists,
}

/// A userfaultfd with sync write-protect faults (no `UFFD_USER_MODE_ONLY`: KVM's own accesses
/// to guest memory must fault too).
pub struct Uffd {
    fd: OwnedFd,
    poison: bool,
}

/// A new non-blocking, close-on-exec userfaultfd, before its UFFDIO_API handshake.
fn open_userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes only flags; a non-negative result is a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("userfaultfd fd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Uffd {
    /// Opens a userfaultfd with write-protect fault reporting.
    pub fn new() -> io::Result<Uffd> {
        let fd = open_userfaultfd()?;
        let mut probe = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // A first UFFDIO_API with no features reports what the kernel supports; a uffd takes
        // UFFDIO_API once, so the real one goes to a second fd.
        ioctl(&fd, UFFDIO_API, &mut probe)?;
        if probe.features & FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(io::Error::other(
                "kernel userfaultfd lacks write-protect support",
            ));
        }
        let poison = probe.features & FEATURE_POISON != 0;
        drop(fd);
        let fd = open_userfaultfd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP | if poison { FEATURE_POISON } else { 0 },
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(Uffd { fd, poison })
    }

    /// Registers `[start, start + len)` for missing-page and write-protect faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
    }

    /// Write-protects (`protect`) or un-protects and wakes the range.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Installs `len` bytes from `src` at the missing pages at `dst` (write-protected when
    /// `wp`) and wakes the faulting threads.
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, wp: bool) -> io::Result<Copied> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: if wp { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        match ioctl(&self.fd, UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(Copied::All),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Copied::Exists),
            Err(e) => Err(e),
        }
    }

    /// Wakes threads waiting on faults in the range (after a failed or redundant resolve).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(&self.fd, UFFDIO_WAKE, &mut r)
    }

    /// Makes the missing pages in the range raise SIGBUS/EFAULT on access (a page whose saved
    /// data failed its checksum is never served). Without `UFFD_FEATURE_POISON`, returns an
    /// error and the caller leaves the faulter asleep on a broken VM.
    pub fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        if !self.poison {
            return Err(io::Error::other("kernel has no UFFDIO_POISON"));
        }
        let mut p = UffdioPoison {
            range: UffdioRange { start, len },
            mode: 0,
            updated: 0,
        };
        ioctl(&self.fd, UFFDIO_POISON, &mut p)
    }

    /// Reads pending fault messages into `msgs`, waiting up to `timeout_ms` for the first one.
    /// Returns how many were read (0 on timeout).
    pub fn read(&self, msgs: &mut [Msg], timeout_ms: i32) -> io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(0);
        }
        // The fd is non-blocking: a fault resolved by another thread between the poll and
        // the read leaves nothing to read (EAGAIN), never a read that blocks forever.
        // SAFETY: reads at most `size_of_val(msgs)` bytes into the caller's live buffer of
        // plain-old-data messages.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(msgs),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(got as usize / std::mem::size_of::<Msg>())
    }
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request number above is paired with its `#[repr(C)]` argument struct,
    // which lives for the call; the kernel reads/writes only that struct.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
