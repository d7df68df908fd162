//! Small safe wrappers over the Linux descriptors the servers wait on: eventfd, epoll, poll,
//! signalfd, and binding a unix socket path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Turns a `-1` return of a libc call into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a freshly created descriptor.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking eventfd used as a level-triggered "something changed" flag.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new, clear eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked by `owned`.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        Ok(EventFd(owned(fd)?))
    }

    /// Makes the eventfd readable (until [`EventFd::clear`]).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own. A failure can only be
        // EAGAIN (counter saturated), which leaves the fd readable, which is what we want.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes the eventfd unreadable again.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own. EAGAIN means it was
        // already clear.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// True when notified and not yet cleared (does not clear).
    pub fn is_set(&self) -> bool {
        matches!(
            wait_readable(self.as_raw_fd(), None, Some(Duration::ZERO)),
            Ok(Readiness::Ready)
        )
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll instance whose events carry a `u64` token.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    /// A new epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked by `owned`.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        Ok(Epoll(owned(fd)?))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Starts watching `fd` for `events` (libc::EPOLLIN etc.).
    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events; returns `(token, events)` pairs in `out` (cleared first). An
    /// interrupted wait returns no events.
    pub fn wait(&self, out: &mut Vec<(u64, u32)>, timeout: Option<Duration>) -> io::Result<()> {
        const MAX: usize = 16;
        out.clear();
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        let ms = timeout_ms(timeout);
        // SAFETY: `evs` has room for MAX events and lives across the call.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), MAX as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for ev in evs.iter().take(n as usize) {
            let (token, events) = (ev.u64, ev.events);
            out.push((token, events));
        }
        Ok(())
    }
}

fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
            // Round up so that a short non-zero timeout does not become a busy poll.
            let ms = d.as_micros().div_ceil(1000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    }
}

/// What [`wait_readable`] / [`wait_writable`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The descriptor is ready (or has an error or hang-up to report).
    Ready,
    /// The cancel descriptor became readable first.
    Cancelled,
    /// The timeout passed.
    TimedOut,
}

fn wait_fd(
    fd: RawFd,
    events: i16,
    cancel: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: cancel.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
        ];
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // SAFETY: `fds` is a live array of two pollfd structs; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms(left)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            return Ok(Readiness::Cancelled);
        }
        if fds[1].revents != 0 {
            return Ok(Readiness::Ready);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Readiness::TimedOut);
        }
    }
}

/// Waits until `fd` is readable, `cancel` is readable, or `timeout` passes.
pub fn wait_readable(
    fd: RawFd,
    cancel: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    wait_fd(fd, libc::POLLIN, cancel, timeout)
}

/// Waits until `fd` is writable, `cancel` is readable, or `timeout` passes.
pub fn wait_writable(
    fd: RawFd,
    cancel: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    wait_fd(fd, libc::POLLOUT, cancel, timeout)
}

/// Blocks SIGINT and SIGTERM in the calling thread (and in threads it spawns afterwards) so
/// that they are only seen through a [`SignalFd`].
pub fn block_termination_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; these calls only write into it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: `set` is initialised; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// A signalfd for a blocked signal set.
#[derive(Debug)]
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// A non-blocking signalfd receiving the signals in `set` (which must be blocked).
    pub fn new(set: &libc::sigset_t) -> io::Result<SignalFd> {
        // SAFETY: `set` points to an initialised sigset_t for the duration of the call.
        let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        Ok(SignalFd(owned(fd)?))
    }

    /// The number of a pending signal, if any.
    pub fn take(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data, valid when zeroed.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into the live `info`.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Binds a unix socket at `path`. A leftover socket file that nobody listens on any more is
/// replaced; any other existing file is an error.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(e) => return Err(e),
        }
    }
    listen_unix(path, SOCKET_MODE)
}

/// Mode of the socket files this process creates: the owner only.
pub const SOCKET_MODE: libc::mode_t = 0o600;

/// socket + bind + listen, with the socket file created with `mode` (less the umask). The
/// mode is set on the socket before bind, which Linux copies to the new file, so there is no
/// moment when others may connect, and the process-wide umask is left alone.
fn listen_unix(path: &Path, mode: libc::mode_t) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a plain zeroed C struct; every field is valid as zero.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path is empty, contains NUL or is too long for a unix socket",
        ));
    }
    for (dst, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; a non-negative return is a new descriptor.
    let fd =
        owned(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fchmod on a descriptor we own.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a live sockaddr_un and `len` covers its family and NUL-terminated path.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })?;
    // SAFETY: listen on a bound socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_is_a_level_flag() {
        let e = EventFd::new().unwrap();
        assert!(!e.is_set());
        e.notify();
        e.notify();
        assert!(e.is_set());
        assert!(e.is_set(), "checking does not clear");
        e.clear();
        assert!(!e.is_set());
    }

    #[test]
    fn epoll_reports_tokens() {
        let ep = Epoll::new().unwrap();
        let a = EventFd::new().unwrap();
        let b = EventFd::new().unwrap();
        ep.add(a.as_raw_fd(), libc::EPOLLIN as u32, 7).unwrap();
        ep.add(b.as_raw_fd(), libc::EPOLLIN as u32, 9).unwrap();
        let mut out = Vec::new();
        ep.wait(&mut out, Some(Duration::ZERO)).unwrap();
        assert!(out.is_empty());
        b.notify();
        ep.wait(&mut out, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![9]);
        ep.modify(b.as_raw_fd(), 0, 9).unwrap();
        ep.wait(&mut out, Some(Duration::ZERO)).unwrap();
        assert!(out.is_empty(), "no interest, no event");
    }

    #[test]
    fn wait_readable_prefers_cancel() {
        let fd = EventFd::new().unwrap();
        let cancel = EventFd::new().unwrap();
        let r = wait_readable(
            fd.as_raw_fd(),
            Some(cancel.as_raw_fd()),
            Some(Duration::from_millis(1)),
        )
        .unwrap();
        assert_eq!(r, Readiness::TimedOut);
        fd.notify();
        cancel.notify();
        let r = wait_readable(fd.as_raw_fd(), Some(cancel.as_raw_fd()), None).unwrap();
        assert_eq!(r, Readiness::Cancelled);
        cancel.clear();
        let r = wait_readable(fd.as_raw_fd(), Some(cancel.as_raw_fd()), None).unwrap();
        assert_eq!(r, Readiness::Ready);
    }

    #[test]
    fn bind_unix_replaces_stale_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = bind_unix(&path).unwrap();
        assert!(bind_unix(&path).is_err(), "a live listener is not replaced");
        drop(l);
        let _l2 = bind_unix(&path).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind_unix(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn unix_sockets_are_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        // It is a working listener.
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        assert!(bind_unix(&dir.path().join("x".repeat(200))).is_err());
    }
}
