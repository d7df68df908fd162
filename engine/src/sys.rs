//! The Linux descriptors the servers wait on. Eventfds and epoll are vmm-sys-util's
//! ([`EventFd`], [`Epoll`]); this module adds what it does not offer: using an eventfd as a
//! level flag ([`Flag`]), an epoll wait with a [`Duration`] that shrugs off `EINTR`
//! ([`wait_events`]), waiting on one descriptor with a cancel descriptor and a deadline
//! ([`wait_readable`], [`wait_writable`]), a signalfd, and binding a unix socket path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

pub use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
pub use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK};

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

/// A new clear eventfd, non-blocking and close-on-exec, the way every [`Flag`] is made.
pub fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)
}

/// A non-blocking eventfd used as a level-triggered "something changed" flag: readable
/// from the first [`Flag::notify`] until [`Flag::clear`], however many notifications came.
pub trait Flag {
    /// Makes the eventfd readable (until [`Flag::clear`]).
    fn notify(&self);
    /// Makes the eventfd unreadable again.
    fn clear(&self);
    /// True when notified and not yet cleared (does not clear).
    fn is_set(&self) -> bool;
}

impl Flag for EventFd {
    fn notify(&self) {
        // The only failure of a non-blocking eventfd write is EAGAIN (counter saturated),
        // which leaves it readable: what a notification wants.
        let _ = self.write(1);
    }

    fn clear(&self) {
        // Reading resets the counter; EAGAIN means it was already clear.
        let _ = self.read();
    }

    fn is_set(&self) -> bool {
        matches!(
            wait_readable(self.as_raw_fd(), None, Some(Duration::ZERO)),
            Ok(Readiness::Ready)
        )
    }
}

/// Events one [`wait_events`] call returns at most (callers size their buffers with it).
pub const MAX_EVENTS: usize = 16;

/// Waits on `epoll` for at most `timeout` (`None`: forever) and returns the ready events,
/// stored in `buf`. An interrupted wait returns no events.
pub fn wait_events<'a>(
    epoll: &Epoll,
    buf: &'a mut [EpollEvent],
    timeout: Option<Duration>,
) -> io::Result<&'a [EpollEvent]> {
    match epoll.wait(timeout_ms(timeout), buf) {
        Ok(n) => Ok(&buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(&buf[..0]),
        Err(e) => Err(e),
    }
}

/// `epoll_wait`/`poll` timeout in milliseconds: -1 for none, rounded up so that a short
/// non-zero timeout does not become a busy poll.
fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
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

/// One `poll(2)` on `fd` and `cancel`, repeated until something happens or the deadline
/// passes. (A poll of two descriptors, not a throw-away epoll instance per wait, which is all
/// that vmm-sys-util's `PollContext` would give here.)
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
    let set = vmm_sys_util::signal::create_sigset(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: `set` is an initialised sigset_t that outlives the call; the old mask is not
    // requested (a null pointer is allowed there).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// A signalfd for a blocked signal set (vmm-sys-util 0.15 has none).
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
        let e = new_eventfd().unwrap();
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
        let a = new_eventfd().unwrap();
        let b = new_eventfd().unwrap();
        let add = |fd: &EventFd, token| {
            let ev = EpollEvent::new(EventSet::IN, token);
            ep.ctl(ControlOperation::Add, fd.as_raw_fd(), ev)
        };
        add(&a, 7).unwrap();
        add(&b, 9).unwrap();
        let mut buf = [EpollEvent::default(); MAX_EVENTS];
        assert!(wait_events(&ep, &mut buf, Some(Duration::ZERO))
            .unwrap()
            .is_empty());
        b.notify();
        let out = wait_events(&ep, &mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(out.iter().map(|e| e.data()).collect::<Vec<_>>(), vec![9]);
        assert_eq!(out[0].event_set(), EventSet::IN);
        let none = EpollEvent::new(EventSet::empty(), 9);
        ep.ctl(ControlOperation::Modify, b.as_raw_fd(), none)
            .unwrap();
        let out = wait_events(&ep, &mut buf, Some(Duration::ZERO)).unwrap();
        assert!(out.is_empty(), "no interest, no event");
    }

    #[test]
    fn wait_readable_prefers_cancel() {
        let fd = new_eventfd().unwrap();
        let cancel = new_eventfd().unwrap();
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
    fn blocked_termination_signals_arrive_on_the_signalfd() {
        // The mask is per thread: this changes only the test's own thread.
        let set = block_termination_signals().unwrap();
        let fd = SignalFd::new(&set).unwrap();
        assert_eq!(fd.take(), None, "nothing pending yet");
        // SAFETY: sends SIGTERM to this very thread, which has it blocked, so it stays
        // pending until the signalfd read takes it.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(rc, 0);
        let ready = wait_readable(fd.as_raw_fd(), None, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready, Readiness::Ready);
        assert_eq!(fd.take(), Some(libc::SIGTERM));
        assert_eq!(fd.take(), None, "taken once");
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
