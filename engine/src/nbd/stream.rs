//! A client socket (unix or TCP), always non-blocking, with blocking-style helpers that give
//! up on a timeout or when the server shuts down.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::sys::{wait_readable, wait_writable, Readiness};

/// One accepted connection.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Puts the socket in non-blocking mode (every other method expects it).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            }
        }
    }

    /// Fills `buf` completely, waiting as needed for at most `timeout` overall.
    pub fn read_full(
        &mut self,
        buf: &mut [u8],
        cancel: RawFd,
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < buf.len() {
            match self.read(&mut buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    check(wait_readable(self.as_raw_fd(), Some(cancel), Some(left))?)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, waiting as needed for at most `timeout` overall.
    pub fn write_full(
        &mut self,
        buf: &[u8],
        cancel: Option<RawFd>,
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < buf.len() {
            match self.write(&buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    check(wait_writable(self.as_raw_fd(), cancel, Some(left))?)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn check(r: Readiness) -> io::Result<()> {
    match r {
        Readiness::Ready => Ok(()),
        Readiness::TimedOut => Err(io::Error::new(io::ErrorKind::TimedOut, "client too slow")),
        Readiness::Cancelled => Err(io::Error::other("server is shutting down")),
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{new_eventfd, Flag};

    #[test]
    fn read_full_waits_times_out_and_cancels() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        s.set_nonblocking().unwrap();
        let cancel = new_eventfd().unwrap();
        b.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_full(&mut buf, cancel.as_raw_fd(), Duration::from_secs(5))
            .unwrap();
        assert_eq!(&buf, b"hello");
        let err = s
            .read_full(&mut buf, cancel.as_raw_fd(), Duration::from_millis(10))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        cancel.notify();
        let err = s
            .read_full(&mut buf, cancel.as_raw_fd(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
        cancel.clear();
        b.write_all(b"ab").unwrap();
        drop(b);
        let err = s
            .read_full(&mut buf, cancel.as_raw_fd(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
